"""certd's HTTP API (spec/api.md §4): JSON in, one certs-actor request, JSON out."""

from __future__ import annotations

from aziot.actors.certs.messages import (
    Certs,
    CreateCert,
    DeleteCert,
    GetCert,
    ImportCert,
    Issuer,
)
from aziot.bus.bus import Bus
from aziot.bus.protocol import Caller, Client

from .body import Fields, ShapeError, describe
from .http import Request, Response, Route, ServiceApp, route
from .serde_replay import STRING, Field, Opt, Str, Struct, serde_body

API_VERSIONS = ("2020-09-01",)
REQUEST = "struct Request"
# The original's `Pem` field type says so when it is given something other than a string.
PEM_EXPECTED = "a base64-encoded string"

# The original's request structs (aziot-cert-common-http), as serde reads them. DELETE's body
# is `IgnoredAny`, the default.
PEM = Str(PEM_EXPECTED)
ISSUER = Struct("Issuer", (Field("certId", STRING), Field("privateKeyHandle", STRING)))
CREATE_CERT = Struct(
    "Request", (Field("certId", STRING), Field("csr", PEM), Field("issuer", Opt(ISSUER)))
)
IMPORT_CERT = Struct("Request", (Field("pem", PEM),))


def pem_field(body: Fields, name: str) -> str:
    value = body.raw(name)
    if not isinstance(value, str):
        raise ShapeError(f"invalid type: {describe(value)}, expected {PEM_EXPECTED}")
    return value


class CertdApi:
    """Route handlers; each one is a translation, the certs actor does the work."""

    def __init__(self, bus: Bus) -> None:
        self._certs = Client(bus, Certs, Caller(service="certd"))

    def app(self) -> ServiceApp:
        routes: list[Route] = [
            route("/certificates", POST=self.create_cert),
            route(
                "/certificates/([^/]+)",
                GET=self.get_cert,
                PUT=self.import_cert,
                DELETE=self.delete_cert,
            ),
        ]
        return ServiceApp("certd", API_VERSIONS, routes)

    @serde_body(CREATE_CERT)
    async def create_cert(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("certId", "csr", "issuer"))
        cert_id = body.string("certId")
        csr = pem_field(body, "csr")
        issuer = None
        if body.has("issuer"):
            fields = body.object("issuer", "struct Issuer", ("certId", "privateKeyHandle"))
            issuer = Issuer(fields.string("certId"), fields.string("privateKeyHandle"))
        create = CreateCert(cert_id, csr, issuer)
        reply = await self._certs.call(
            Certs.create_cert, create, caller=Caller(uid=request.uid), timeout=60.0
        )
        return Response(201, {"pem": reply.pem})

    async def get_cert(self, request: Request) -> Response:
        (cert_id,) = request.params
        reply = await self._certs.call(
            Certs.get_cert, GetCert(cert_id), caller=Caller(uid=request.uid)
        )
        return Response(200, {"pem": reply.pem})

    @serde_body(IMPORT_CERT)
    async def import_cert(self, request: Request) -> Response:
        (cert_id,) = request.params
        pem = pem_field(Fields(request.parsed_body, REQUEST, ("pem",)), "pem")
        reply = await self._certs.call(
            Certs.import_cert, ImportCert(cert_id, pem), caller=Caller(uid=request.uid)
        )
        return Response(201, {"pem": reply.pem})

    async def delete_cert(self, request: Request) -> Response:
        (cert_id,) = request.params
        await self._certs.call(
            Certs.delete_cert, DeleteCert(cert_id), caller=Caller(uid=request.uid)
        )
        return Response(204)
