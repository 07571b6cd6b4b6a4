"""certd, the Certificates Service: its config, its actor (certs), its routes and its reload.

certd asks keyd for every signature, over the bus as the service `certd`, so it runs in the
same aziotd as keyd: a certd config without a keyd config is refused at start.
"""

from __future__ import annotations

from aziot.actors.certs.actor import CertsActor
from aziot.actors.certs.issuance import subject_override
from aziot.actors.certs.messages import Certs, Reload
from aziot.actors.certs.renewal import parse_policy
from aziot.actors.keys.messages import Keys
from aziot.api.certd import CertdApi
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.bus.protocol import Caller, Client
from aziot.config.certd import CertdConfig, load_certd
from aziot.config.loader import ConfigError, ServicePaths

from .service import ActorSpec, Service, socket_path


def check_certd(config: CertdConfig, source: str) -> None:
    """What the config parser leaves to the actors' modules: renewal policy strings, subject
    names OpenSSL understands."""
    est_policy = config.est.identity_auto_renew if config.est else None
    policies = [("cert_issuance.est.identity_auto_renew", est_policy)]
    policies += [(f"cert_issuance.{i}.auto_renew", o.auto_renew) for i, o in config.certs.items()]
    for where, policy in policies:
        if not policy:
            continue
        for key, text in (("threshold", policy.threshold), ("retry", policy.retry)):
            try:
                parse_policy(text)
            except ValueError as error:
                raise ConfigError(f"{source}: {where}.{key}: {error}") from None
    for cert_id, options in config.certs.items():
        try:
            subject_override(options.common_name, options.subject)
        except ValueError as error:
            raise ConfigError(f"{source}: cert_issuance.{cert_id}.subject: {error}") from None


def load_checked(paths: ServicePaths) -> CertdConfig:
    config = load_certd(paths)
    check_certd(config, f"{paths.config_file} (+ {paths.config_dir}/*.toml)")
    return config


def certd(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
    config = load_checked(paths)
    keyd_paths = ServicePaths.from_env("keyd", environ)
    if not keyd_paths.configured():
        raise ConfigError(
            f"{paths.config_file}: certd needs keyd in the same aziotd for its signatures, "
            f"but there is no keyd config at {keyd_paths.config_file}"
        )

    current = [config]  # the settings last loaded: a restarted actor keeps a reload's

    def reload_config() -> CertdConfig:
        current[0] = load_checked(paths)
        return current[0]

    async def start_certs() -> CertsActor:
        actor = CertsActor(
            current[0],
            faults,
            Client(bus, Keys, Caller(service="certd")),
            load_config=reload_config,
        )
        await actor.start()
        return actor

    async def reload(bus: Bus) -> None:
        await Client(bus, Certs, Caller(service="certd")).call(Certs.reload, Reload())

    return Service(
        name="certd",
        paths=paths,
        socket=socket_path("certd", config.endpoints.aziot_certd, environ),
        max_connections=config.max_requests,
        actors=[ActorSpec("certs", start_certs)],
        app=CertdApi(bus).app(),
        reload=reload,
    )
