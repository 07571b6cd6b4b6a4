"""tpmd's HTTP API (spec/api.md §6, provisioning.md §18): JSON in, one TPM-worker request, JSON
out. No authorization beyond the socket's permissions, as the original; every failure is its
500 `internal error` (the cause is in the log)."""

from __future__ import annotations

from aziot.actors.b64 import encode as b64
from aziot.actors.tpm.protocol import ImportAuthKey, SignWithAuthKey, Tpm
from aziot.bus.bus import Bus
from aziot.bus.protocol import NOTHING, Caller, Client

from .body import Fields
from .http import Request, Response, Route, ServiceApp, route
from .serde_replay import BASE64, Field, Struct, serde_body

API_VERSIONS = ("2020-09-01",)
REQUEST = "struct Request"
# A little more than the worker's own CALL_TIMEOUT: the worker answers first, with its cause.
TIMEOUT = 25.0

# The original's request structs (aziot-tpm-common-http), as serde reads them.
IMPORT_AUTH_KEY = Struct("Request", (Field("key", BASE64),))
SIGN_WITH_AUTH_KEY = Struct("Request", (Field("data", BASE64),))


class TpmdApi:
    """Route handlers; each one is a translation, the TPM worker does the work."""

    def __init__(self, bus: Bus) -> None:
        self._tpm = Client(bus, Tpm, Caller(service="tpmd"))

    def app(self) -> ServiceApp:
        routes: list[Route] = [
            route("/get_tpm_keys", GET=self.get_tpm_keys),
            route("/import_auth_key", POST=self.import_auth_key),
            route("/sign_with_auth_key", POST=self.sign_with_auth_key),
        ]
        return ServiceApp("tpmd", API_VERSIONS, routes)

    async def get_tpm_keys(self, request: Request) -> Response:
        keys = await self._tpm.call(
            Tpm.get_tpm_keys, NOTHING, caller=Caller(uid=request.uid), timeout=TIMEOUT
        )
        return Response(
            200,
            {
                "endorsement_key": b64(keys.endorsement_key),
                "storage_root_key": b64(keys.storage_root_key),
            },
        )

    @serde_body(IMPORT_AUTH_KEY)
    async def import_auth_key(self, request: Request) -> Response:
        key = Fields(request.body(), REQUEST, ("key",)).b64("key")
        await self._tpm.call(
            Tpm.import_auth_key, ImportAuthKey(key), caller=Caller(uid=request.uid), timeout=TIMEOUT
        )
        return Response(200, {})

    @serde_body(SIGN_WITH_AUTH_KEY)
    async def sign_with_auth_key(self, request: Request) -> Response:
        data = Fields(request.body(), REQUEST, ("data",)).b64("data")
        reply = await self._tpm.call(
            Tpm.sign_with_auth_key,
            SignWithAuthKey(data),
            caller=Caller(uid=request.uid),
            timeout=TIMEOUT,
        )
        return Response(200, {"digest": b64(reply.digest)})
