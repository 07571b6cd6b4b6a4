"""identityd's HTTP API (spec/api.md §5): JSON in, one identity-actor request, JSON out."""

from __future__ import annotations

from aziot.actors.identity.messages import (
    CreateModule,
    DeleteModule,
    GetDevice,
    GetIdentity,
    GetModule,
    GetProvisioning,
    Identity,
    ListModules,
    Reprovision,
    UpdateModule,
)
from aziot.bus.bus import Bus
from aziot.bus.protocol import Caller, Client

from .body import Fields
from .http import Request, Response, Route, ServiceApp, route
from .serde_replay import STRING, Field, Struct, Swallowed, serde_body

API_VERSIONS = ("2020-09-01", "2021-12-01", "2022-08-01")
REQUEST = "struct Request"
# identityd reaches the cloud inside requests (DPS up to its timeouts): callers wait longer.
CLOUD_CALL_TIMEOUT = 300.0

# The original's request structs (aziot-identity-common-http), as serde reads them; the other
# routes' bodies are `IgnoredAny`, the default. create_module_identity's `opts` is a flattened
# `Option<CreateModuleOpts>`: serde buffers every unknown value, then drops any error reading it.
GET_DEVICE = Struct("Request", (Field("type", STRING),))
CREATE_MODULE = Struct(
    "Request", (Field("type", STRING), Field("moduleId", STRING)), flatten=(Swallowed(),)
)


class IdentitydApi:
    """Route handlers; each one is a translation, the identity actor does the work."""

    def __init__(self, bus: Bus) -> None:
        self._identity = Client(bus, Identity, Caller(service="identityd"))

    def app(self) -> ServiceApp:
        routes: list[Route] = [
            route("/identities/modules", GET=self.list_modules, POST=self.create_module),
            route("/identities/identity", GET=self.get_identity),
            route("/identities/device", POST=self.get_device),
            route("/identities/provisioning", min_version="2021-12-01", GET=self.provisioning),
            route("/trust-bundle", GET=self.trust_bundle),
            route(
                "/identities/modules/([^/]+)",
                GET=self.get_module,
                PUT=self.update_module,
                DELETE=self.delete_module,
            ),
            route("/identities/device/reprovision", POST=self.reprovision),
        ]
        return ServiceApp("identityd", API_VERSIONS, routes)

    async def _call(self, request: Request, operation, message) -> Response:  # noqa: ANN001
        reply = await self._identity.call(
            operation, message, caller=Caller(uid=request.uid), timeout=CLOUD_CALL_TIMEOUT
        )
        return Response(200, reply.body)

    async def get_identity(self, request: Request) -> Response:
        return await self._call(request, Identity.get_identity, GetIdentity())

    @serde_body(GET_DEVICE)
    async def get_device(self, request: Request) -> Response:
        Fields(request.body(), REQUEST, ("type",)).string("type")  # required, value unused
        return await self._call(request, Identity.get_device, GetDevice())

    async def provisioning(self, request: Request) -> Response:
        return await self._call(request, Identity.get_provisioning, GetProvisioning())

    async def trust_bundle(self, request: Request) -> Response:
        # The original's trust bundle is an unimplemented TODO: always an empty string.
        return Response(200, {"certificate": ""})

    async def list_modules(self, request: Request) -> Response:
        type_ = request.query.get("type")
        return await self._call(request, Identity.list_modules, ListModules(type_))

    @serde_body(CREATE_MODULE)
    async def create_module(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST)
        type_ = body.string("type")
        module_id = body.string("moduleId")
        local_opts = body.raw("localIdOpts") if body.has("localIdOpts") else None
        create = CreateModule(type_, module_id, local_opts)
        return await self._call(request, Identity.create_module, create)

    async def get_module(self, request: Request) -> Response:
        (module_id,) = request.params
        get = GetModule(module_id, request.query.get("type"))
        return await self._call(request, Identity.get_module, get)

    async def update_module(self, request: Request) -> Response:
        (module_id,) = request.params
        # The body must be JSON (PUT bodies always are parsed) but is not used: `type` comes
        # from the query, as in the original.
        update = UpdateModule(module_id, request.query.get("type"))
        return await self._call(request, Identity.update_module, update)

    async def delete_module(self, request: Request) -> Response:
        (module_id,) = request.params
        delete = DeleteModule(module_id, request.query.get("type"))
        await self._identity.call(
            Identity.delete_module,
            delete,
            caller=Caller(uid=request.uid),
            timeout=CLOUD_CALL_TIMEOUT,
        )
        return Response(204)

    async def reprovision(self, request: Request) -> Response:
        await self._identity.call(
            Identity.reprovision,
            Reprovision(),
            caller=Caller(uid=request.uid),
            timeout=CLOUD_CALL_TIMEOUT,
        )
        return Response(204)
