"""identityd, the Identity Service: its config, its actor (identity), its routes, and its
socket, which serves once the device is provisioned (or its backup taken), as in the original.

identityd asks keyd for every key operation over the bus as the service `identityd`, so it runs
in the same aziotd as keyd: an identityd config without a keyd config is refused at start.
"""

from __future__ import annotations

import trio

from aziot.actors.certs.messages import Certs
from aziot.actors.certs.renewal import parse_policy
from aziot.actors.identity.actor import ConfigWatch, IdentityActor
from aziot.actors.identity.messages import Identity, Reload
from aziot.actors.keys.messages import Keys
from aziot.actors.tpm.protocol import Tpm
from aziot.api.identityd import IdentitydApi
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.bus.protocol import Caller, Client
from aziot.config.identityd import IdentitydConfig, load_identityd
from aziot.config.loader import ConfigError, ServicePaths

from .service import ActorSpec, Service, socket_path


def check_supported(config: IdentitydConfig, source: str, environ: dict[str, str]) -> None:
    """What this version provisions: manual (SAS or X.509), DPS with a symmetric key or X.509
    without `identity_auto_renew`, and none. X.509 needs certd in the same aziotd."""
    kind = config.provisioning.kind
    x509 = False
    if config.provisioning.source == "manual":
        x509 = kind.authentication.METHOD == "x509"  # type: ignore[union-attr]
    elif config.provisioning.source == "dps":
        attestation = kind.attestation  # type: ignore[union-attr]
        if attestation.METHOD == "tpm" and not (
            ServicePaths.from_env("tpmd", environ).configured()
        ):
            raise ConfigError(
                f"{source}: TPM attestation goes through tpmd, but tpmd is not configured in "
                "this aziotd"
            )
        x509 = attestation.METHOD == "x509"
        renew = attestation.identity_auto_renew if x509 else None
        if renew is not None:
            for key in ("threshold", "retry"):
                try:
                    parse_policy(getattr(renew, key))
                except ValueError as error:
                    raise ConfigError(
                        f"{source}: provisioning.attestation.identity_auto_renew.{key}: {error}"
                    ) from None
    if x509 and not ServicePaths.from_env("certd", environ).configured():
        raise ConfigError(
            f"{source}: X.509 provisioning takes the identity cert from certd, but certd is "
            "not configured in this aziotd"
        )
    wants_local = any(p.idtype and "local" in p.idtype for p in config.principal)
    if wants_local and not ServicePaths.from_env("certd", environ).configured():
        raise ConfigError(
            f"{source}: local identities are issued by certd, but certd is not configured in "
            "this aziotd"
        )


def identityd(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
    config = load_identityd(paths)
    check_supported(config, str(paths.config_file), environ)
    keyd_paths = ServicePaths.from_env("keyd", environ)
    if not keyd_paths.configured():
        raise ConfigError(
            f"{paths.config_file}: identityd needs keyd in the same aziotd for its keys, "
            f"but there is no keyd config at {keyd_paths.config_file}"
        )
    current = [config]  # the settings last loaded: a restarted actor keeps a reload's

    def reload_config() -> IdentitydConfig:
        fresh = load_identityd(paths)
        check_supported(fresh, str(paths.config_file), environ)
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
            certs=Client(bus, Certs, Caller(service="identityd")),
            tpm=Client(bus, Tpm, Caller(service="identityd")),
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
