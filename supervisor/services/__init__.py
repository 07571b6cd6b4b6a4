"""The services aziotd can run, one declaration each, in start order.

Adding a service is its folders (`actors/<name>/`, `api/<name>d.py`, `config/<name>d.py`), its
declaration here beside keyd's, and one line in `SERVICES`. What every service needs is shared
under `actors/`: `files` (the atomic store, `<alnum>-<sha256>.<ext>` names), `principals`,
`texts` (the original's error texts), `b64`, `offload` (worker threads). Its tests start it with
`tests/daemon.py`'s `Daemon`, and its least config goes into `MINIMAL_CONFIGS` there so that one
test runs every declared service in one aziotd.
"""

from __future__ import annotations

import importlib
import logging
import os

from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.config.loader import ServicePaths

from .service import ActorSpec, Builder, Service, socket_path

__all__ = ["SERVICES", "ActorSpec", "Service", "configured_services", "socket_path"]

log = logging.getLogger(__name__)


def declared(name: str) -> Builder:
    """The builder `<name>` of module `.<name>`, imported only when the service is configured:
    a device running keyd alone does not pay for certd's imports at every start."""

    def build(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
        module = importlib.import_module(f"{__name__}.{name}")
        builder: Builder = getattr(module, name)
        return builder(paths, bus, faults, environ)

    build.__name__ = name
    return build


SERVICES: dict[str, Builder] = {
    "keyd": declared("keyd"),
    "certd": declared("certd"),
    "tpmd": declared("tpmd"),
    "identityd": declared("identityd"),
}


def configured_services(
    bus: Bus, faults: Faults, environ: dict[str, str] | None = None
) -> list[Service]:
    """Every service with a config: its base file, or a drop-in in its `config.d` (all that
    `aziotctl config apply` writes is `config.d/00-super.toml`); the others are not started."""
    environ = dict(os.environ) if environ is None else environ
    services = []
    for name, build in SERVICES.items():
        paths = ServicePaths.from_env(name, environ)
        if not paths.configured():
            log.info(
                "%s: no config at %s nor in %s; not starting it",
                name,
                paths.config_file,
                paths.config_dir,
            )
            continue
        services.append(build(paths, bus, faults, environ))
    return services
