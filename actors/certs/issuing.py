"""How certd issues a cert: locally (self-signed, an issuer in the request, the local CA),
signed by keyd through a key handle, or by an EST server, with the EST identity obtained
through the bootstrap identity when there is none yet (spec/api.md §4.3–§4.4,
spec/provisioning.md §15.1–§15.2). A mixin of `CertsActor`, which holds the state.
"""

from __future__ import annotations

import datetime
import logging
import ssl

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aziot.actors.keys.messages import CreateKeyPair, DeleteKeyPair, KeyHandle, Keys, LoadKeyPair
from aziot.actors.remote_private_key import (
    KeyNotUsable,
    keys_private_op,
    public_key_of,
    remote_private_key,
)
from aziot.actors.texts import invalid_parameter
from aziot.bus.errors import BusError, internal
from aziot.bus.faults import Faults
from aziot.bus.protocol import Client
from aziot.config.certd import CertdConfig, CertKey, EstAuth, IssuanceOptions

from . import issuance, renewal
from .est import EstClient, EstError, EstRequest, to_pem
from .store import CertStore

log = logging.getLogger(__name__)

EST_KEY_ALGORITHMS = "ec-p256:rsa-4096:*"  # the original's choice for EST identity keys


class IssueFailed(Exception):
    """Issuance failed for a reason the log must show; the caller gets a 500."""


def _nul_position(text: str) -> int:
    return text.encode("utf-8").index(b"\0")


class Issuing:
    """Issuance, local and EST."""

    # What CertsActor holds, used here (see actor.py).
    config: CertdConfig
    store: CertStore
    _keys: Client
    _faults: Faults
    _est: EstClient
    _cloud_threads: trio.CapacityLimiter
    _est_identity_lock: trio.Lock
    _renewals: renewal.RenewalEngine

    # Also used here: renewing.Renewing's _track, and CertsActor's _now.

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
