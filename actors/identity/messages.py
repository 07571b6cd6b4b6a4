"""The identity actor's protocol: one declaration per operation of identityd's API.

Identities have several optional parts that the original omits (never `null`), so replies carry
the JSON object itself (`Json`), built by the actor in the original's shapes (spec/api.md §5.1).
Who asks travels in the bus envelope.
"""

from __future__ import annotations

from typing import Any

import attrs

from aziot.bus.protocol import Nothing, Operation, Protocol


@attrs.frozen
class GetIdentity:
    """The caller's own identity: the device's, or its module's."""


@attrs.frozen
class GetDevice:
    pass


@attrs.frozen
class GetProvisioning:
    pass


@attrs.frozen
class ListModules:
    type: str | None


@attrs.frozen
class CreateModule:
    type: str
    module_id: str
    local_opts: Any = None  # the body's `localIdOpts`, as sent (malformed ones are ignored)


@attrs.frozen
class GetModule:
    module_id: str
    type: str | None


@attrs.frozen
class UpdateModule:
    module_id: str
    type: str | None


@attrs.frozen
class DeleteModule:
    module_id: str
    type: str | None


@attrs.frozen
class Reprovision:
    pass


@attrs.frozen
class Reload:
    pass


@attrs.frozen
class Json:
    body: dict[str, Any]


class Identity(Protocol):
    """The identity actor's operations; `IdentityActor` has a method of each name."""

    actor = "identity"
    get_identity = Operation(GetIdentity, Json)
    get_device = Operation(GetDevice, Json)
    get_provisioning = Operation(GetProvisioning, Json)
    list_modules = Operation(ListModules, Json)
    create_module = Operation(CreateModule, Json)
    get_module = Operation(GetModule, Json)
    update_module = Operation(UpdateModule, Json)
    delete_module = Operation(DeleteModule, Nothing)
    reprovision = Operation(Reprovision, Nothing)
    reload = Operation(Reload, Nothing)
