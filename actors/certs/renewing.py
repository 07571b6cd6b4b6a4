"""How certd keeps certs renewed: the EST identity certs (the original's policy), and (ours)
every issued cert with an `auto_renew` table, on `renewal.RenewalEngine`. A renewal commits by
writing the cert, then moving a rotated key (`<key>-temp`) over the old one; a crash between the
two is finished at the next start (spec/provisioning.md §15.3, §16). A mixin of `CertsActor`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from aziot.actors.keys.messages import CreateKeyPair, DeleteKeyPair, Keys, LoadKeyPair, MoveKeyPair
from aziot.actors.remote_private_key import KeyNotUsable, public_key_of
from aziot.bus.errors import BusError
from aziot.bus.faults import Faults
from aziot.bus.protocol import Client
from aziot.config.certd import CertdConfig, CertKey, IssuanceOptions

from . import issuance, renewal
from .est import EstClient, EstError
from .issuing import EST_KEY_ALGORITHMS, IssueFailed
from .store import CertStore

log = logging.getLogger(__name__)

TEMP_SUFFIX = "-temp"  # a rotated key is made under `<key id>-temp`, then moved over the old
# Statuses by which an EST server says it has no /simplereenroll: then renew by /simpleenroll.
NO_REENROLL = (404, 405, 501)


class Renewing:
    """Renewal of EST identities and of issued certs with a policy."""

    # What CertsActor holds, used here (see actor.py).
    config: CertdConfig
    store: CertStore
    _keys: Client
    _faults: Faults
    _est: EstClient
    _cloud_threads: trio.CapacityLimiter
    _est_identity_lock: trio.Lock
    _renewals: renewal.RenewalEngine

    # Also used here, from issuing.Issuing: _issue, _chain, _load_key_pair, _signing_key,
    # _sign_locally, _est_call, est_settings; and CertsActor's _now.

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
