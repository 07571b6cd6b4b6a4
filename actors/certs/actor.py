"""The certs actor: the cert store, authorization, and issuance (local or EST) of certd.

It mirrors the original's `Api` (spec/api.md §4): writes need a principal (reads are open),
imports are stored as-is, a GET of a missing cert is a 400, issuance failures are 500s with
their cause in the log. Keys are never held: every signature is a keys-actor request through a
key handle, made from the worker thread that builds the cert or runs the TLS handshake.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography import x509

from aziot.actors.keys.messages import (
    CreateKeyPair,
    DeleteKeyPair,
    KeyHandle,
    Keys,
    LoadKeyPair,
    MoveKeyPair,
)
from aziot.actors.principals import Principals
from aziot.actors.remote_private_key import (
    KeyNotUsable,
    keys_private_op,
    public_key_of,
    remote_private_key,
)
from aziot.actors.texts import INTERNAL_ERROR, invalid_parameter
from aziot.bus.errors import BusError, ErrorKind, internal, unauthorized
from aziot.bus.faults import Faults
from aziot.bus.protocol import NOTHING, Caller, Client, Nothing, dispatcher
from aziot.config.certd import CertdConfig, CertKey, EstAuth, IssuanceOptions

from . import issuance, renewal
from .est import EstClient, EstError, EstRequest, to_pem
from .messages import Certs, CreateCert, DeleteCert, GetCert, ImportCert, Pem, Reload
from .store import CertStore

log = logging.getLogger(__name__)

EST_KEY_ALGORITHMS = "ec-p256:rsa-4096:*"  # the original's choice for EST identity keys
TEMP_SUFFIX = "-temp"  # a rotated key is made under `<key id>-temp`, then moved over the old
# Statuses by which an EST server says it has no /simplereenroll: then renew by /simpleenroll.
NO_REENROLL = (404, 405, 501)


class IssueFailed(Exception):
    """Issuance failed for a reason the log must show; the caller gets a 500."""


def _nul_position(text: str) -> int:
    return text.encode("utf-8").index(b"\0")


class CertsActor:
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

    # -- issuance --------------------------------------------------------------------------

    async def _given_issuer(self, cert_id: str, handle: str) -> tuple[list[x509.Certificate], str]:
        data = await self.store.read(cert_id)
        if data is None:
            raise invalid_parameter("issuer.certId", "not found")
        chain = await self._chain(data, f"issuer {cert_id}")
        if not chain:
            raise invalid_parameter("issuer.certId", "invalid issuer")
        if "\0" in handle:
            raise invalid_parameter(
                "issuer.privateKeyHandle",
                f"nul byte found in provided data at position: {_nul_position(handle)}",
            )
        return chain, handle

    async def _chain(self, data: bytes, what: str) -> list[x509.Certificate]:
        try:
            return await trio.to_thread.run_sync(issuance.parse_chain, data)
        except ValueError as error:
            raise internal(f"{what}: the stored PEM is not a list of certs: {error}") from None

    async def _issue(
        self,
        cert_id: str,
        csr: x509.CertificateSigningRequest,
        issuer: tuple[list[x509.Certificate], str] | None,
    ) -> bytes:
        options = self.config.certs.get(cert_id)
        if issuer is not None:
            return await self._sign_locally(cert_id, csr, issuer[0], issuer[1], options)
        if options is None:
            raise IssueFailed(
                'parameter "issuer" has an invalid value: issuer is required for '
                f"locally-issued certs, and [cert_issuance.{cert_id}] is not configured"
            )
        if options.method == "self_signed":
            handle = await self._load_key_pair(cert_id, f"the self-signed cert {cert_id}'s key")
            return await self._sign_locally(cert_id, csr, [], handle, options)
        if options.method == "local_ca":
            local_ca = self.config.local_ca
            if local_ca is None:
                raise IssueFailed(
                    f"cert {cert_id!r} is configured to be issued by local CA, but local CA is "
                    "not configured"
                )
            data = await self.store.read(local_ca.cert)
            if data is None:
                raise IssueFailed(f"the local CA cert {local_ca.cert!r} is not in the store")
            chain = await self._chain(data, f"local CA cert {local_ca.cert}")
            if not chain:
                raise IssueFailed(f"the local CA cert {local_ca.cert!r} holds no certificate")
            handle = await self._load_key_pair(local_ca.pk, "the local CA's key")
            return await self._sign_locally(cert_id, csr, chain, handle, options)
        return await self._enroll(cert_id, csr, options)

    async def _load_key_pair(self, key_id: str, what: str) -> str:
        try:
            reply: KeyHandle = await self._keys.call(Keys.load_key_pair, LoadKeyPair(key_id))
        except BusError as error:
            raise IssueFailed(f"{what} ({key_id!r}) cannot be loaded from keyd: {error}") from None
        return reply.handle

    async def _signing_key(self, handle: str) -> issuance.SigningKey:
        try:
            public = await public_key_of(self._keys, handle)
        except (BusError, KeyNotUsable, ValueError) as error:
            raise IssueFailed(f"the issuer key cannot be used: {error}") from None
        return remote_private_key(public, keys_private_op(self._keys, handle))

    async def _sign_locally(
        self,
        cert_id: str,
        csr: x509.CertificateSigningRequest,
        chain: list[x509.Certificate],
        handle: str,
        options: IssuanceOptions | None,
    ) -> bytes:
        key = await self._signing_key(handle)
        subject = None
        expiry_days = None
        if options is not None:
            subject = issuance.subject_override(options.common_name, options.subject)
            expiry_days = options.expiry_days
        margin = datetime.timedelta(seconds=self.config.not_before_margin_secs)
        try:
            return await trio.to_thread.run_sync(
                lambda: issuance.issue(
                    csr,
                    chain,
                    key,
                    subject=subject,
                    expiry_days=expiry_days,
                    not_before_margin=margin,
                    now=self._now(),
                )
            )
        except BusError as error:
            raise IssueFailed(f"keyd could not sign cert {cert_id}: {error}") from None
        except (ValueError, TypeError) as error:
            raise IssueFailed(f"cannot build cert {cert_id}: {error}") from None

    # -- EST -------------------------------------------------------------------------------

    def est_settings(self, cert_id: str, options: IssuanceOptions | None) -> tuple[str, EstAuth]:
        """URL and auth for `cert_id`: its own, else `[cert_issuance.est]`'s (spec §4.4)."""
        est = self.config.est
        url = options.url if options is not None else None
        if url is None and est is not None:
            url = est.urls.get(cert_id) or est.urls.get("default")
        auth = options.auth if options is not None else None
        if auth is None and est is not None:
            auth = est.auth
        if auth is None:
            raise IssueFailed(
                f"cert {cert_id!r} is configured to be issued by EST, but EST auth is not "
                "configured"
            )
        if url is None:
            raise IssueFailed(
                f"cert {cert_id!r} is configured to be issued by EST, but EST URL is not configured"
            )
        return url, auth

    async def _trusted_pems(self) -> list[bytes]:
        pems = []
        for cert_id in self.config.est.trusted_certs if self.config.est else []:
            data = await self.store.read(cert_id)
            if data is None:
                log.warning("EST trusted cert %s is not in the store; not trusting it", cert_id)
                continue
            pems.append(data)
        return pems

    async def _client_context(self, identity: tuple[bytes, str] | None) -> ssl.SSLContext:
        """TLS for an EST server: OpenSSL's default trust plus `trusted_certs`, and the client
        identity (cert chain, key handle) when there is one."""
        from aziot.actors.remote_key import client_context

        trusted = await self._trusted_pems()
        if identity is None:
            return await trio.to_thread.run_sync(client_context, None, None, trusted)
        chain, handle = identity
        private_op = keys_private_op(self._keys, handle)
        return await trio.to_thread.run_sync(client_context, chain, private_op, trusted)

    async def _est_call(
        self,
        url: str,
        csr_der: bytes,
        auth: EstAuth,
        identity: tuple[bytes, str] | None,
        *,
        reenroll: bool = False,
    ) -> bytes:
        await self._faults.hit("est.request")
        context = await self._client_context(identity)
        basic = auth.basic
        request = EstRequest(
            url,
            csr_der,
            context,
            basic.username if basic else None,
            basic.password if basic else None,
            reenroll,
        )
        try:
            certs = await trio.to_thread.run_sync(
                self._est.enroll, request, limiter=self._cloud_threads
            )
        except EstError as error:
            raise IssueFailed(str(error)) from error
        return to_pem(certs)

    async def _enroll(
        self, cert_id: str, csr: x509.CertificateSigningRequest, options: IssuanceOptions
    ) -> bytes:
        url, auth = self.est_settings(cert_id, options)
        identity = None
        if auth.identity is not None:
            identity = await self.est_identity(cert_id, url, auth, options, csr.subject)
        from cryptography.hazmat.primitives import serialization

        csr_der = csr.public_bytes(serialization.Encoding.DER)
        return await self._est_call(url, csr_der, auth, identity)

    async def est_identity(
        self,
        cert_id: str,
        url: str,
        auth: EstAuth,
        options: IssuanceOptions,
        request_subject: x509.Name,
    ) -> tuple[bytes, str]:
        """The EST identity (cert chain PEM, key handle), obtained with the bootstrap identity
        when there is none yet (spec/provisioning.md §15.2 step 2)."""
        identity = auth.identity
        assert identity is not None
        async with self._est_identity_lock:
            current = await self._usable_identity(identity)
            if current is not None:
                return current
            bootstrap = auth.bootstrap_identity
            if bootstrap is None:
                raise IssueFailed(
                    f"cert {cert_id!r} is configured to be issued by EST, but EST identity "
                    "could not be obtained and EST bootstrap identity is not configured"
                )
            subject = issuance.subject_override(options.common_name, options.subject)
            pem = await self._bootstrap(identity, bootstrap, url, auth, subject or request_subject)
            async with self._renewals.exclusive(identity.cert):
                await self.store.write(identity.cert, pem)
            log.info("obtained EST identity cert %s with the bootstrap identity", identity.cert)
            handle = await self._load_key_pair(identity.pk, "the EST identity key")
            self._track(identity, cert_id, options)
            return pem, handle

    async def _usable_identity(self, identity: CertKey) -> tuple[bytes, str] | None:
        if identity.cert in self._renewals:
            try:
                await self._renewals.renew_now_if_due(identity.cert)
            except (renewal.RenewalError, KeyError) as error:
                log.warning("EST identity cert %s cannot be renewed now: %s", identity.cert, error)
        data = await self.store.read(identity.cert)
        if data is None:
            return None
        try:
            chain = await self._chain(data, f"EST identity cert {identity.cert}")
        except BusError:
            return None
        if not chain or chain[0].not_valid_after_utc <= self._now():
            return None
        try:
            reply = await self._keys.call(Keys.load_key_pair, LoadKeyPair(identity.pk))
        except BusError:
            return None
        return data, reply.handle

    async def _bootstrap(
        self,
        identity: CertKey,
        bootstrap: CertKey,
        url: str,
        auth: EstAuth,
        subject: x509.Name,
    ) -> bytes:
        boot_pem = await self.store.read(bootstrap.cert)
        if boot_pem is None:
            raise IssueFailed(
                f"could not get EST bootstrap identity cert: {bootstrap.cert!r} is not in the store"
            )
        boot_handle = await self._load_key_pair(bootstrap.pk, "the EST bootstrap identity key")
        try:
            old = await self._keys.call(Keys.load_key_pair, LoadKeyPair(identity.pk))
            await self._keys.call(Keys.delete_key_pair, DeleteKeyPair(old.handle))
        except BusError:
            pass  # no old identity key: nothing to delete
        try:
            created = await self._keys.call(
                Keys.create_key_pair, CreateKeyPair(identity.pk, EST_KEY_ALGORITHMS)
            )
        except BusError as error:
            raise IssueFailed(
                f"cannot create the EST identity key {identity.pk!r}: {error}"
            ) from None
        key = await self._signing_key(created.handle)
        csr_der = await trio.to_thread.run_sync(issuance.client_csr, subject, key)
        return await self._est_call(url, csr_der, auth, (boot_pem, boot_handle))

    # -- renewal of EST identity certs ------------------------------------------------------

    def _est_identities(self) -> list[tuple[CertKey, str, IssuanceOptions | None]]:
        """Each EST identity of the config, with the cert id whose EST settings renew it (the
        identity's own for the global one, as the original)."""
        found = []
        est = self.config.est
        if est is not None and est.auth is not None and est.auth.identity is not None:
            found.append((est.auth.identity, est.auth.identity.cert, None))
        for cert_id, options in self.config.certs.items():
            if options.method == "est" and options.auth and options.auth.identity:
                found.append((options.auth.identity, cert_id, options))
        return found

    async def _track_est_identities(self) -> None:
        """Put every EST identity cert that exists under renewal; finish first a key rotation
        that a crash interrupted, so the cert and its key agree again."""
        for identity, cert_id, options in self._est_identities():
            if identity.cert in self._renewals:
                continue
            data = await self.store.read(identity.cert)
            if data is None:
                continue
            await self._finish_rotation(identity, data)
            self._track(identity, cert_id, options)

    def _policy(self) -> renewal.AutoRenew:
        settings = self.config.est.identity_auto_renew if self.config.est else None
        if settings is None:
            return renewal.AutoRenew()
        return renewal.AutoRenew.parse(settings.rotate_key, settings.threshold, settings.retry)

    def _track(self, identity: CertKey, cert_id: str, options: IssuanceOptions | None) -> None:
        async def renew(current: bytes, rotate: bool) -> None:
            await self._renew_identity(identity, cert_id, options, current, rotate)

        self._track_credential(identity, self._policy(), renew)

    def _track_credential(
        self,
        cert_key: CertKey,
        policy: renewal.AutoRenew,
        renew: Callable[[bytes, bool], Awaitable[None]],
    ) -> None:
        async def read() -> bytes | None:
            return await self.store.read(cert_key.cert)

        credential = renewal.Credential(cert_key.cert, cert_key.pk, policy, read, renew)
        if cert_key.cert in self._renewals:
            self._renewals.replace(credential)
        else:
            self._renewals.add(credential)

    async def _follow_change(self, cert_id: str) -> None:
        """An import replaced `cert_id`: reschedule it if renewed, or start renewing it."""
        if cert_id in self._renewals:
            self._renewals.recheck(cert_id)
            return
        for identity, owner, options in self._est_identities():
            if identity.cert == cert_id:
                self._track(identity, owner, options)
                return
        self._track_issued_cert(cert_id)

    # -- renewal of issued certs with `auto_renew` (ours) ------------------------------------

    def _renewed_key(self, cert_id: str) -> tuple[CertKey, IssuanceOptions] | None:
        options = self.config.certs.get(cert_id)
        if options is None or options.auto_renew is None:
            return None
        return CertKey(cert_id, options.key or cert_id), options

    async def _track_issued(self) -> None:
        for cert_id in self.config.certs:
            if cert_id in self._renewals:
                continue
            found = self._renewed_key(cert_id)
            data = await self.store.read(cert_id) if found else None
            if found is None or data is None:
                continue
            await self._finish_rotation(found[0], data)
            self._track_issued_cert(cert_id)

    def _track_issued_cert(self, cert_id: str) -> None:
        found = self._renewed_key(cert_id)
        if found is None:
            return
        cert_key, options = found
        assert options.auto_renew is not None
        setting = options.auto_renew
        policy = renewal.AutoRenew.parse(setting.rotate_key, setting.threshold, setting.retry)

        async def renew(current: bytes, rotate: bool) -> None:
            try:
                await self._renew_issued(cert_key, options, current, rotate)
            except IssueFailed as error:
                raise renewal.RenewalError(str(error)) from None

        self._track_credential(cert_key, policy, renew)

    async def _renew_issued(
        self, cert_key: CertKey, options: IssuanceOptions, current: bytes, rotate: bool
    ) -> None:
        """Issue `cert_key.cert` again by its method, for a new key (`<key>-temp`, then moved
        into place) or the same one; commit as the EST identity's renewal does."""
        cert_id = cert_key.cert
        chain = await self._chain(current, f"cert {cert_id}")
        if not chain:
            raise IssueFailed(f"cert {cert_id} holds no certificate")
        await self._finish_rotation(cert_key, current)
        key_id = cert_key.pk + TEMP_SUFFIX if rotate else cert_key.pk
        if rotate:
            algorithm = issuance.key_algorithm_like(chain[0].public_key())
            handle = await self._fresh_key_pair(key_id, algorithm)
        else:
            handle = await self._load_key_pair(key_id, f"the key of cert {cert_id}")
        key = await self._signing_key(handle)
        csr = await trio.to_thread.run_sync(issuance.renewal_csr, chain[0], key)
        if options.method == "self_signed":
            pem = await self._sign_locally(cert_id, csr, [], handle, options)
        else:
            pem = await self._issue(cert_id, csr, None)
        await self._commit(cert_key, key_id, current, pem)
        log.info("renewed cert %s by %s (key %s)", cert_id, options.method, _kept(rotate))

    async def _fresh_key_pair(self, key_id: str, algorithms: str) -> str:
        """A new key pair under `key_id`: one left there by an earlier attempt is replaced."""
        try:
            stale = await self._keys.call(Keys.load_key_pair, LoadKeyPair(key_id))
            await self._keys.call(Keys.delete_key_pair, DeleteKeyPair(stale.handle))
        except BusError:
            pass
        try:
            created = await self._keys.call(Keys.create_key_pair, CreateKeyPair(key_id, algorithms))
        except BusError as error:
            raise IssueFailed(f"cannot create key {key_id!r}: {error}") from None
        return created.handle

    async def _commit(self, cert_key: CertKey, key_id: str, old: bytes, pem: bytes) -> None:
        """Write the new cert, then move a rotated key over the old one. A crash between the
        two is finished by `_finish_rotation` at the next start or renewal."""
        await self.store.write(cert_key.cert, pem)
        if key_id == cert_key.pk:
            return
        try:
            await self._keys.call(Keys.move_key_pair, MoveKeyPair(key_id, cert_key.pk))
        except BusError as error:
            await self.store.write(cert_key.cert, old)
            raise IssueFailed(
                f"renewed {cert_key.cert} but could not move {key_id} into place ({error}); "
                "kept the old cert and key"
            ) from None

    async def _finish_rotation(self, identity: CertKey, cert_pem: bytes) -> None:
        """A `<key>-temp` left by an interrupted renewal: moved into place if the cert on disk
        is already the new one (the crash came between the cert write and the key move),
        deleted otherwise (the renewal had not committed)."""
        temp_id = identity.pk + TEMP_SUFFIX
        try:
            temp = await self._keys.call(Keys.load_key_pair, LoadKeyPair(temp_id))
        except BusError:
            return
        try:
            chain = await self._chain(cert_pem, f"cert {identity.cert}")
            temp_public = await public_key_of(self._keys, temp.handle)
        except (BusError, KeyNotUsable, ValueError) as error:
            log.warning(
                "cannot compare %s with cert %s; leaving it for the next renewal: %s",
                temp_id,
                identity.cert,
                error,
            )
            return
        if chain and chain[0].public_key() == temp_public:
            await self._keys.call(Keys.move_key_pair, MoveKeyPair(temp_id, identity.pk))
            log.info(
                "repaired: finished the interrupted key rotation of %s (moved %s into place)",
                identity.cert,
                temp_id,
            )
        else:
            await self._keys.call(Keys.delete_key_pair, DeleteKeyPair(temp.handle))
            log.info("repaired: removed %s left by an unfinished renewal", temp_id)

    async def _renew_identity(
        self,
        identity: CertKey,
        cert_id: str,
        options: IssuanceOptions | None,
        current: bytes,
        rotate: bool,
    ) -> None:
        """Renew an EST identity cert (spec/provisioning.md §15.3), by /simplereenroll when the
        server has it; commit = write the cert, then move the rotated key over the old one."""
        try:
            await self._renew_identity_once(identity, cert_id, options, current, rotate)
        except IssueFailed as error:
            raise renewal.RenewalError(str(error)) from None

    async def _renew_identity_once(
        self,
        identity: CertKey,
        cert_id: str,
        options: IssuanceOptions | None,
        current: bytes,
        rotate: bool,
    ) -> None:
        url, auth = self.est_settings(cert_id, options)
        chain = await self._chain(current, f"EST identity cert {identity.cert}")
        if not chain:
            raise IssueFailed(f"EST identity cert {identity.cert} holds no certificate")
        await self._finish_rotation(identity, current)
        expired = chain[0].not_valid_after_utc <= self._now()
        if expired:
            bootstrap = auth.bootstrap_identity
            if bootstrap is None:
                raise IssueFailed(
                    f"EST identity cert {identity.cert} has expired and no bootstrap identity "
                    "is configured to obtain a new one"
                )
            boot_pem = await self.store.read(bootstrap.cert)
            if boot_pem is None:
                raise IssueFailed(f"the EST bootstrap cert {bootstrap.cert!r} is not in the store")
            client = (boot_pem, await self._load_key_pair(bootstrap.pk, "the bootstrap key"))
        else:
            client = (current, await self._load_key_pair(identity.pk, "the EST identity key"))
        key_id = identity.pk + TEMP_SUFFIX if rotate else identity.pk
        if rotate:
            handle = await self._fresh_key_pair(key_id, EST_KEY_ALGORITHMS)
        else:
            handle = await self._load_key_pair(key_id, "the EST identity key")
        key = await self._signing_key(handle)
        csr_der = await trio.to_thread.run_sync(issuance.client_csr, chain[0].subject, key)
        try:
            pem = await self._est_call(url, csr_der, auth, client, reenroll=not expired)
        except IssueFailed as error:
            cause = error.__cause__
            if expired or not isinstance(cause, EstError) or cause.status not in NO_REENROLL:
                raise
            log.info("%s has no /simplereenroll (%s); renewing by /simpleenroll", url, cause)
            pem = await self._est_call(url, csr_der, auth, client)
        await self._commit(identity, key_id, current, pem)
        log.info("renewed EST identity cert %s (key %s)", identity.cert, _kept(rotate))


def _kept(rotate: bool) -> str:
    return "rotated" if rotate else "kept"


def _text(data: bytes, cert_id: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise internal(f"cert file of {cert_id!r} is not UTF-8 text") from None


Starter = Callable[[], Awaitable[CertsActor]]
