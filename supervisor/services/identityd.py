"""identityd, the Identity Service: its config, its actor (identity), its routes, and its
socket, which serves once the device is provisioned (or its backup taken), as in the original.

identityd asks keyd for every key operation over the bus as the service `identityd`, so it runs
in the same aziotd as keyd: an identityd config without a keyd config is refused at start.
"""

from __future__ import annotations

import trio

from aziot.actors.identity.actor import ConfigWatch, IdentityActor
from aziot.actors.identity.messages import Identity, Reload
from aziot.actors.keys.messages import Keys
from aziot.api.identityd import IdentitydApi
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.bus.protocol import Caller, Client
from aziot.config.identityd import IdentitydConfig, load_identityd
from aziot.config.loader import ConfigError, ServicePaths

from .service import ActorSpec, Service, socket_path


def check_supported(config: IdentitydConfig, source: str) -> None:
    """What this version provisions: manual with a SAS key, DPS with a symmetric key, none."""
    kind = config.provisioning.kind
    method = None
    if config.provisioning.source == "manual":
        method = kind.authentication.METHOD  # type: ignore[union-attr]
        supported = method == "sas"
    elif config.provisioning.source == "dps":
        method = kind.attestation.METHOD  # type: ignore[union-attr]
        supported = method == "symmetric_key"
    else:
        supported = True
    if not supported:
        raise ConfigError(
            f"{source}: provisioning with {config.provisioning.source} {method} is not "
            "supported by this version of aziotd yet (manual sas, dps symmetric_key and none are)"
        )
    if any(p.idtype and "local" in p.idtype for p in config.principal):
        raise ConfigError(
            f'{source}: principals with idtype "local" (local identities) are not supported by '
            "this version of aziotd yet"
        )


def identityd(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
    config = load_identityd(paths)
    check_supported(config, str(paths.config_file))
    keyd_paths = ServicePaths.from_env("keyd", environ)
    if not keyd_paths.config_file.is_file():
        raise ConfigError(
            f"{paths.config_file}: identityd needs keyd in the same aziotd for its keys, "
            f"but there is no keyd config at {keyd_paths.config_file}"
        )
    current = [config]  # the settings last loaded: a restarted actor keeps a reload's

    def reload_config() -> IdentitydConfig:
        fresh = load_identityd(paths)
        check_supported(fresh, str(paths.config_file))
        current[0] = fresh
        return fresh

    readiness: list[trio.Event] = []  # one event for the daemon's life, made inside trio

    def ready_event() -> trio.Event:
        if not readiness:
            readiness.append(trio.Event())
        return readiness[0]

    async def start_identity() -> IdentityActor:
        actor = IdentityActor(
            current[0],
            faults,
            Client(bus, Keys, Caller(service="identityd")),
            ready=ready_event(),
            load_config=reload_config,
            watch=ConfigWatch(paths.config_file, paths.config_dir),
        )
        await actor.start()
        return actor

    async def ready() -> None:
        await ready_event().wait()

    async def reload(bus: Bus) -> None:
        await Client(bus, Identity, Caller(service="identityd")).call(Identity.reload, Reload())

    return Service(
        name="identityd",
        paths=paths,
        socket=socket_path("identityd", config.endpoints.aziot_identityd, environ),
        max_connections=config.max_requests,
        actors=[ActorSpec("identity", start_identity)],
        app=IdentitydApi(bus).app(),
        reload=reload,
        ready=ready,
    )
