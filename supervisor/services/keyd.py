"""keyd, the Keys Service: its config, its actors (keys, and pkcs11 when a token is set), its
routes and its reload."""

from __future__ import annotations

import logging
from typing import Any

from aziot.actors.keys.actor import KeysActor
from aziot.actors.keys.authz import KeyPrincipal
from aziot.actors.keys.messages import Keys, Principal, ReloadPrincipals
from aziot.actors.keys.store import key_store
from aziot.actors.keys.token_client import TokenClient, TokenError
from aziot.api.keyd import KeydApi
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.bus.protocol import Caller, Client
from aziot.config.keyd import KeydConfig, load_keyd
from aziot.config.loader import ServicePaths
from aziot.config.pkcs11_uri import Pkcs11Uri

from .service import ActorSpec, Service, socket_path

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # a token that hangs at start delays readiness by this much, no more


def token_uris(config: KeydConfig) -> list[str]:
    """Each distinct token keyd is configured to use, as one URI apiece (PINs included)."""
    uris = [config.aziot_keys.get("pkcs11_base_slot", "")]
    uris += [u for u in config.preloaded_keys.values() if u.lower().startswith("pkcs11:")]
    seen: dict[tuple[int | None, str | None], str] = {}
    for uri in filter(None, uris):
        parsed = Pkcs11Uri.parse(uri)
        seen.setdefault((parsed.slot_id, parsed.token), uri)
    return list(seen.values())


async def probe_tokens(token: TokenClient, uris: list[str]) -> None:
    """Open each token once at start: its mechanisms are logged, or why it cannot be used."""
    for uri in uris:
        where = Pkcs11Uri.parse(uri)
        try:
            mechanisms = await token.mechanisms(uri, timeout=PROBE_TIMEOUT)
        except TokenError as error:
            log.error(
                "keyd: PKCS#11 token %s is unavailable; keys on it will fail until it is "
                "fixed, other keys are served: %s",
                where.redacted(),
                error.error.message,
            )
            continue
        log.info(
            "keyd: PKCS#11 token %s ready with %d mechanisms", where.redacted(), len(mechanisms)
        )


def keyd(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
    config = load_keyd(paths)
    lib_path = config.aziot_keys.get("pkcs11_lib_path")
    token = TokenClient(bus) if lib_path else None
    threads: list[Any] = []  # the one library thread, kept across worker restarts

    async def start_pkcs11() -> Any:
        # Imported only when a token is configured: python-pkcs11 costs memory and start time.
        from aziot.actors.keys.pkcs11.worker import Pkcs11Worker, TokenThread

        assert lib_path is not None
        if not threads:
            threads.append(TokenThread(lib_path, faults))
        return Pkcs11Worker(threads[0])

    async def start_keys() -> KeysActor:
        keys_dir = config.homedir / "keys" if config.homedir else None
        if token is not None:
            await probe_tokens(token, token_uris(config))
        actor = KeysActor(
            key_store(keys_dir, faults),
            dict(config.preloaded_keys),
            [KeyPrincipal(p.uid, list(p.keys)) for p in config.principal],
            token=token,
            pkcs11_lib_path=lib_path,
            pkcs11_base_slot=config.aziot_keys.get("pkcs11_base_slot"),
        )
        await actor.start()
        return actor

    async def reload(bus: Bus) -> None:
        fresh: KeydConfig = load_keyd(paths)
        principals = [Principal(p.uid, list(p.keys)) for p in fresh.principal]
        await Client(bus, Keys, Caller(service="keyd")).call(
            Keys.reload_principals, ReloadPrincipals(principals)
        )

    return Service(
        name="keyd",
        paths=paths,
        socket=socket_path("keyd", config.endpoints.aziot_keyd, environ),
        max_connections=config.max_requests,
        actors=[ActorSpec("pkcs11", start_pkcs11)] * bool(lib_path)
        + [ActorSpec("keys", start_keys)],
        app=KeydApi(bus).app(),
        reload=reload,
    )
