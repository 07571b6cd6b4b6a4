"""What it takes to run each service: its config, its actors and its HTTP app."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from actors.keys.actor import KeysActor
from actors.keys.authz import KeyPrincipal
from actors.keys.messages import Principal, ReloadPrincipals, to_wire
from actors.keys.store import FileStore
from api.http import ServiceApp
from api.keyd import KeydApi
from bus.bus import Bus
from bus.faults import Faults
from config.keyd import KeydConfig, load_keyd
from config.loader import ConfigError, ServicePaths

log = logging.getLogger(__name__)

DEFAULT_SOCKET_DIR = "/run/aziot"


def socket_path(service: str, endpoint: str | None, environ: dict[str, str]) -> Path:
    """`[endpoints]` in the config, else $AZIOT_SOCKET_DIR/<service>.sock, else /run/aziot."""
    if endpoint:
        uri = urlsplit(endpoint)
        if uri.scheme != "unix":
            raise ConfigError(f"endpoint {endpoint!r}: only unix:// endpoints can be served")
        return Path(unquote(uri.path))
    return Path(environ.get("AZIOT_SOCKET_DIR", DEFAULT_SOCKET_DIR)) / f"{service}.sock"


@attrs.define
class ActorSpec:
    name: str
    start: Callable[[], Awaitable[Any]]


@attrs.define
class Service:
    """A configured service, ready to be started by the supervisor."""

    name: str
    paths: ServicePaths
    socket: Path
    max_connections: int
    actors: list[ActorSpec]
    app: ServiceApp
    reload: Callable[[Bus], Awaitable[None]]


def keyd_service(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
    config = load_keyd(paths)

    async def start_keys() -> KeysActor:
        keys_dir = config.homedir / "keys" if config.homedir else None
        actor = KeysActor(
            FileStore(keys_dir, faults),
            dict(config.preloaded_keys),
            [KeyPrincipal(p.uid, list(p.keys)) for p in config.principal],
        )
        await actor.start()
        return actor

    async def reload(bus: Bus) -> None:
        fresh: KeydConfig = load_keyd(paths)
        principals = [Principal(p.uid, list(p.keys)) for p in fresh.principal]
        op, args = to_wire(ReloadPrincipals(principals))
        await bus.request("keys", op, args)

    return Service(
        name="keyd",
        paths=paths,
        socket=socket_path("keyd", config.endpoints.aziot_keyd, environ),
        max_connections=config.max_requests,
        actors=[ActorSpec("keys", start_keys)],
        app=KeydApi(bus).app(),
        reload=reload,
    )


BUILDERS = {"keyd": keyd_service}


def configured_services(
    bus: Bus, faults: Faults, environ: dict[str, str] | None = None
) -> list[Service]:
    """Every service whose config file exists; the others are not started."""
    environ = dict(os.environ) if environ is None else environ
    services = []
    for name, build in BUILDERS.items():
        paths = ServicePaths.from_env(name, environ)
        if not paths.config_file.is_file():
            log.info("%s: no config at %s; not starting it", name, paths.config_file)
            continue
        services.append(build(paths, bus, faults, environ))
    return services
