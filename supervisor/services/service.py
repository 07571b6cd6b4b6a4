"""What the supervisor needs of a service: its config paths, socket, actors, routes, reload."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs

from aziot.api.http import ServiceApp
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.config.loader import ConfigError, ServicePaths

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
    # Awaited before the socket serves (identityd: once provisioned or on its backup); the
    # other services' sockets do not wait for it.
    ready: Callable[[], Awaitable[None]] | None = None


Builder = Callable[[ServicePaths, Bus, Faults, dict[str, str]], Service]
