"""The certs actor: the cert store, authorization, and the operations of certd.

It mirrors the original's `Api` (spec/api.md §4): writes need a principal (reads are open),
imports are stored as-is, a GET of a missing cert is a 400, issuance failures are 500s with
their cause in the log. Keys are never held: every signature is a keys-actor request through a
key handle, made from the worker thread that builds the cert or runs the TLS handshake. How a
cert is issued is `issuing.Issuing`; how it is kept renewed, `renewing.Renewing`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import trio

from aziot.actors.principals import Principals
from aziot.actors.texts import INTERNAL_ERROR, invalid_parameter
from aziot.bus.errors import BusError, ErrorKind, internal, unauthorized
from aziot.bus.faults import Faults
from aziot.bus.protocol import NOTHING, Caller, Client, Nothing, dispatcher
from aziot.config.certd import CertdConfig

from . import issuance, renewal
from .est import EstClient
from .issuing import IssueFailed, Issuing
from .messages import Certs, CreateCert, DeleteCert, GetCert, ImportCert, Pem, Reload
from .renewing import Renewing
from .store import CertStore

log = logging.getLogger(__name__)


class CertsActor(Issuing, Renewing):
    """Owns certd's store and settings; served through `Certs`."""

    def __init__(
        self,
        config: CertdConfig,
        faults: Faults,
        keys: Client,
        *,
        load_config: Callable[[], CertdConfig] | None = None,
        est_client: EstClient | None = None,
        clock: renewal.Clock | None = None,
    ) -> None:
        self._faults = faults
        self._keys = keys
        self._load_config = load_config
        self._est = est_client or EstClient()
        self._clock: renewal.Clock = clock or renewal.WallClock()
        self._cloud_threads = trio.CapacityLimiter(4)
        self._est_identity_lock = trio.Lock()
        self._renewals = renewal.RenewalEngine(self._clock)
        self._apply(config)
        self._dispatch = dispatcher(Certs, self)

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.now(), datetime.UTC)

    def _apply(self, config: CertdConfig) -> None:
        self.config = config
        self.store = CertStore(config.homedir, dict(config.preloaded_certs), self._faults)
        self._principals = Principals((p.uid, p.certs) for p in config.principal)

    async def start(self) -> None:
        await trio.to_thread.run_sync(self.store.prepare)
        await self._track_est_identities()
        await self._track_issued()

    async def background(self) -> None:
        """The renewal scheduler, for as long as the actor runs."""
        await self._renewals.run()

    async def handle(self, op: str, args: dict[str, Any], caller: list[Any] | None) -> Any:
        try:
            return await self._dispatch(op, args, caller)
        except BusError as error:
            if error.kind is not ErrorKind.INTERNAL or error.message == INTERNAL_ERROR:
                raise
            log.error("%s failed: %s", op, error.message)
            raise internal(INTERNAL_ERROR) from None
        except OSError as error:
            log.error("%s failed: %s", op, error)
            raise internal(INTERNAL_ERROR) from None

    def _authorize(self, caller: Caller, cert_id: str) -> None:
        uid = caller.uid
        if uid is not None and not self._principals.allows(uid, cert_id):
            raise unauthorized(f"user {uid} is not authorized to modify the cert {cert_id}")

    # -- the API ---------------------------------------------------------------------------

    async def get_cert(self, msg: GetCert, caller: Caller) -> Pem:
        data = await self.store.read(msg.cert_id)
        if data is None:
            raise invalid_parameter("id", "not found")
        return Pem(_text(data, msg.cert_id))

    async def import_cert(self, msg: ImportCert, caller: Caller) -> Pem:
        self._authorize(caller, msg.cert_id)
        async with self._renewals.exclusive(msg.cert_id):
            await self.store.write(msg.cert_id, msg.pem.encode("utf-8"))
        log.info("imported cert %s (%s)", msg.cert_id, caller)
        await self._follow_change(msg.cert_id)
        return Pem(msg.pem)

    async def delete_cert(self, msg: DeleteCert, caller: Caller) -> Nothing:
        self._authorize(caller, msg.cert_id)
        async with self._renewals.exclusive(msg.cert_id):
            await self.store.remove(msg.cert_id)
            removed = self._renewals.remove(msg.cert_id)
        log.info("deleted cert %s (%s)", msg.cert_id, caller)
        if removed:
            log.info("cert %s is no longer renewed: it was deleted", msg.cert_id)
        return NOTHING

    async def create_cert(self, msg: CreateCert, caller: Caller) -> Pem:
        self._authorize(caller, msg.cert_id)
        csr = await trio.to_thread.run_sync(issuance.parse_csr, msg.csr)
        issuer = None
        if msg.issuer is not None:
            issuer = await self._given_issuer(msg.issuer.cert_id, msg.issuer.key_handle)
        try:
            pem = await self._issue(msg.cert_id, csr, issuer)
        except IssueFailed as error:
            log.error("cannot issue cert %s (%s): %s", msg.cert_id, caller, error)
            raise internal(INTERNAL_ERROR) from None
        # A renewal of this id in flight commits first; ours, acknowledged last, stays.
        async with self._renewals.exclusive(msg.cert_id):
            await self.store.write(msg.cert_id, pem)
        log.info("issued cert %s (%s)", msg.cert_id, caller)
        self._track_issued_cert(msg.cert_id)
        return Pem(pem.decode("utf-8"))

    async def reload(self, msg: Reload, caller: Caller) -> Nothing:
        if self._load_config is None:
            return NOTHING
        fresh = await trio.to_thread.run_sync(self._load_config)
        self._apply(fresh)
        await trio.to_thread.run_sync(self.store.prepare)
        for cert_id in self._renewals.tracked():
            self._renewals.remove(cert_id)
        await self._track_est_identities()
        await self._track_issued()
        log.info("reloaded cert issuance, preloaded certs and principals")
        return NOTHING


def _text(data: bytes, cert_id: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise internal(f"cert file of {cert_id!r} is not UTF-8 text") from None
