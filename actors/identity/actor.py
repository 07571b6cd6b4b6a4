"""The identity actor: provisioning, the device and module identities, and identityd's API.

It follows the original's `IdentityManager` (spec/provisioning.md §10–§12, spec/api.md §5):
provisioning before serving (manual from the config, DPS with its `device_info` backup reused
at start), module identities kept in the hub with keys derived in keyd from the master key
`aziot_identityd_master_id` (nothing secret is stored), reconciliation of the principals' modules
with the hub, a backup of each module served when the hub is unreachable. Differences, all
where the original's users get stuck (spec/lessons.md rows 6 and 7):

- a start with the cloud unreachable and no backup keeps trying (the original exits and lets
  systemd retry);
- a start whose provisioning settings differ from those `device_info` was written under (the
  `[provisioning]` of `prev_state`) provisions again, as a reload with such a change does; the
  original keeps its backup until someone asks for a reprovisioning;
- a new provisioning happens beside the current device: `device_info`, the module backups and
  the device served change only once DPS answered (and `device_info` once the hub did too). A
  failure keeps the old device served and, where a config change asked for it, tries again with
  backoff; the original deletes its backup first and is left with no device;
- everything the cloud is asked happens in a worker thread so that a slow cloud never holds up
  the other services of this daemon.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from aziot.actors.certs import renewal as certs_renewal
from aziot.actors.certs.issuance import name_oid
from aziot.actors.certs.messages import Certs, CreateCert, GetCert
from aziot.actors.keys.messages import (
    CreateDerivedKey,
    CreateKey,
    CreateKeyPair,
    DeleteKeyPair,
    ExportDerivedKey,
    Keys,
    LoadKey,
    LoadKeyPair,
    Sign,
)
from aziot.actors.remote_private_key import keys_private_op, public_key_of, remote_private_key
from aziot.actors.texts import INTERNAL_ERROR, invalid_parameter
from aziot.actors.tpm.protocol import ImportAuthKey, SignWithAuthKey, Tpm
from aziot.bus.errors import BusError, ErrorKind, internal, invalid, unauthorized
from aziot.bus.faults import Faults
from aziot.bus.protocol import NOTHING, Caller, Client, Nothing, dispatcher

from . import cloudcalls, local, renewal
from .callers import Callers
from .cloud import THROTTLE_BACKOFF
from .cloudcalls import CloudFailed
from .messages import (
    CreateModule,
    DeleteModule,
    GetDevice,
    GetIdentity,
    GetModule,
    GetProvisioning,
    Identity,
    Json,
    ListModules,
    Reload,
    Reprovision,
    UpdateModule,
)
from .state import DeviceInfo, StateFiles, normalized_endpoint, provisioning_key

log = logging.getLogger(__name__)

MASTER_KEY_ID = "aziot_identityd_master_id"
HUB_FRESH = 5.0  # seconds a module the hub gave is served from its backup without asking again
CONFIG_POLL = 2.0  # seconds between looks at the config files' modification times
CONFIG_SETTLE = 2.0  # seconds a change must hold still before it is read (the original: 10)
RETRY_FIRST, RETRY_MOST = 5.0, 300.0  # seconds between provisioning attempts at start


def quiet_seconds(asked: float | None) -> float:
    """How long module reads leave a throttling hub alone: its Retry-After plus up to 10%
    jitter (so the modules of a fleet do not come back in step), else the client's first 429
    backoff; never less than `HUB_FRESH`, so a `Retry-After: 0` cannot turn into a loop."""
    if asked is None:
        base, jitter = THROTTLE_BACKOFF[0]
        return base + jitter * random.random()
    return max(asked * (1 + 0.1 * random.random()), HUB_FRESH)


def for_client(error: CloudFailed) -> BusError:
    """The original answers 404 for every DPS and hub client error, with the cause."""
    return BusError(ErrorKind.NOT_FOUND, f"{error.service} client error\ncaused by: {error.cause}")


class ConfigWatch:
    """The config file and the `*.toml` of its config.d, by modification time and size."""

    def __init__(self, config_file: Path, config_dir: Path) -> None:
        self._file = config_file
        self._dir = config_dir

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        paths = [self._file]
        if self._dir.is_dir():
            paths += sorted(p for p in self._dir.iterdir() if p.suffix == ".toml")
        found = []
        for path in paths:
            try:
                info = path.stat()
            except OSError:
                continue
            found.append((str(path), info.st_mtime_ns, info.st_size))
        return tuple(found)


@attrs.frozen
class Device:
    """The provisioned device: where it lives in the cloud and how it proves who it is."""

    info: DeviceInfo
    auth: str  # "sas", "x509" or "tpm"
    key_id: str | None  # keyd key of a SAS device, or of an X.509 device's key pair
    cert_id: str | None = None  # certd cert of an X.509 device


def x509_subject(common: str, configured: Any) -> x509.Name:
    """CN (cut to 64 characters, as the original) then the configured subject's other names."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common[:64])]
    for name, value in sorted((configured.rest if configured is not None else {}).items()):
        attributes.append(x509.NameAttribute(name_oid(name), value))
    return x509.Name(attributes)


def identity_csr(subject: x509.Name, key: Any) -> str:
    """The original's identity CSR: the subject, no extensions, SHA-256 (spec §8.3)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def common_name(chain: bytes) -> str:
    certs = x509.load_pem_x509_certificates(chain)
    names = certs[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise internal("the identity cert has no CN to take the registration id from")
    return str(names[0].value)


def _auto_renewed(config: Any) -> bool:
    kind = config.provisioning.kind
    attestation = getattr(kind, "attestation", None)
    return getattr(attestation, "identity_auto_renew", None) is not None


# Rust's `str::trim` (Unicode White_Space), which the original uses on module names; Python's
# `str.strip` also strips U+001C..U+001F, which Rust keeps.
RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def check_module_name(module_id: str) -> None:
    if not module_id.strip(RUST_WHITESPACE):
        raise invalid_parameter("module_id", "module name cannot be empty")


def throttled_cause(seconds: float) -> str:
    return (
        "the hub throttled this device (429 Too Many Requests); "
        f"not asking it again for {seconds:.0f} s"
    )


def device_not_found() -> BusError:
    return invalid("device identity not found")


class IdentityActor:
    """Owns identityd's state; served through `Identity`."""

    def __init__(
        self,
        config: Any,
        faults: Faults,
        keys: Client,
        *,
        certs: Client | None = None,
        tpm: Client | None = None,
        cloud: cloudcalls.Cloud | None = None,
        ready: trio.Event | None = None,
        load_config: Callable[[], Any] | None = None,
        watch: ConfigWatch | None = None,
    ) -> None:
        self.config = config
        self._keys = keys
        self._certs = certs
        self._tpm = tpm
        self._faults = faults
        self._state = StateFiles(config.homedir, faults)
        self._callers = Callers(config.principal)
        self._cloud = cloud or cloudcalls.Cloud(config, faults)
        self._device: Device | None = None
        self._changes = trio.Lock()  # provisioning and reconciliation, one at a time
        self._load_config = load_config
        self._watch = watch
        self._renewals: certs_renewal.RenewalEngine | None = None
        if _auto_renewed(config):
            self._renewals = certs_renewal.RenewalEngine()
        self._module_locks: dict[str, trio.Lock] = {}
        self._hub_fetched: dict[tuple[DeviceInfo, str], float] = {}  # trio clock
        # Per device: until when (trio clock) module reads leave a throttling hub alone.
        self._hub_quiet_until: dict[DeviceInfo, float] = {}
        # True while a reconciliation is owed because the hub could not be reached.
        self._reconcile_owed = False
        # True while the device served is a backup that the current settings no longer give
        # (they changed, or the hub refused it) and DPS could not be asked again yet.
        self._provision_owed = False
        self.ready = ready if ready is not None else trio.Event()
        self._dispatch = dispatcher(Identity, self)

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._state.prepare)

    async def background(self) -> None:
        """Provision (or take the backup), reconcile, and only then let the socket serve."""
        delay = RETRY_FIRST
        while True:
            try:
                await self._provision_at_start()
                break
            except CloudFailed as error:
                log.error(
                    "provisioning failed (%s client: %s); trying again in %.0f s",
                    error.service,
                    error.cause,
                    delay,
                )
            except BusError as error:
                log.error("provisioning failed: %s; trying again in %.0f s", error.message, delay)
            await trio.sleep(delay * (0.9 + 0.2 * random.random()))
            delay = min(delay * 2, RETRY_MOST)
        self.ready.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._retry_cloud)
            if self._renewals is not None:
                nursery.start_soon(self._renew_device_identity)
            if self._watch is not None:
                nursery.start_soon(self._watch_config)

    async def _retry_cloud(self) -> None:
        """What the cloud still owes, tried again with backoff: a provisioning that could not
        reach DPS (then its reconciliation), or a reconciliation that could not reach the hub
        (at start, after a reload). Modules added to the principals while offline get made
        once the hub is back, and `device_info` is written then, as after any success."""
        delay = RETRY_FIRST
        while True:
            await trio.sleep(delay * (0.9 + 0.2 * random.random()))
            if not (self._provision_owed or self._reconcile_owed):
                delay = RETRY_FIRST
                continue
            async with self._changes:
                provisioning = self._provision_owed
                device = self._device
                if not provisioning and (device is None or not self._reconcile_owed):
                    continue
                try:
                    if provisioning:
                        await self._provision_again()
                    else:
                        assert device is not None
                        await self._reconcile(device)
                except CloudFailed as error:
                    delay = min(delay * 2, RETRY_MOST)
                    log.warning(
                        "%s: %s client error (%s); trying again in about %.0f s",
                        "provisioning" if provisioning else "reconciliation",
                        error.service,
                        error.cause,
                        delay,
                    )
                    continue
                except BusError as error:
                    delay = min(delay * 2, RETRY_MOST)
                    log.error(
                        "%s failed: %s",
                        "provisioning" if provisioning else "reconciliation",
                        error.message,
                    )
                    continue
            if provisioning:
                log.info("provisioned again now that the cloud answers")
            else:
                log.info("reconciliation done after the hub came back")
            delay = RETRY_FIRST

    async def _renew_device_identity(self) -> None:
        """The device identity cert under the renewal engine (DPS X.509 `identity_auto_renew`)."""
        assert self._renewals is not None
        attestation = self.config.provisioning.kind.attestation
        setting = attestation.identity_auto_renew
        policy = certs_renewal.AutoRenew.parse(setting.rotate_key, setting.threshold, setting.retry)
        cert_id, key_id = attestation.identity_cert, attestation.identity_pk

        async def read() -> bytes | None:
            pem = await self._certd_pem(cert_id)
            return None if pem is None else pem.encode()

        async def renew(current: bytes, rotate: bool) -> None:
            assert self._certs is not None
            await renewal.finish_rotation(self._keys, current, key_id)
            await renewal.renew_device_identity(
                self._keys,
                self._certs,
                cert_id,
                key_id,
                current,
                rotate,
                self._register_with,
                identity_csr,
            )

        current = await read()
        if current is not None:
            await renewal.finish_rotation(self._keys, current, key_id)
        self._renewals.add(certs_renewal.Credential(cert_id, key_id, policy, read, renew))
        await self._renewals.run()

    async def _register_with(self, chain: bytes, handle: str) -> None:
        """Register with DPS with a renewed identity cert; the device stays as it was if this
        fails (the original forgets it first)."""
        async with self._changes:
            creds = cloudcalls.Credentials(
                chain=chain, private_op=keys_private_op(self._keys, handle)
            )
            info, _ = await self._cloud.register(creds, await self._registration_id())
            old = self._device
            if old is not None:
                self._device = attrs.evolve(old, info=info)
                if info != old.info:
                    self._reconcile_owed = True
            await trio.to_thread.run_sync(self._state.write_device_info, info)
            log.info("registered with DPS with the renewed identity cert as %s", info.device_id)

    async def _watch_config(self) -> None:
        """Reload when the config files change, as the original's watcher does (debounced:
        a change must hold still for `CONFIG_SETTLE` s). identityd writes only under its
        homedir, never the config, so its own writes never trigger a reload."""
        assert self._watch is not None
        seen = await trio.to_thread.run_sync(self._watch.signature)
        while True:
            await trio.sleep(CONFIG_POLL)
            now = await trio.to_thread.run_sync(self._watch.signature)
            if now == seen:
                continue
            await trio.sleep(CONFIG_SETTLE)
            settled = await trio.to_thread.run_sync(self._watch.signature)
            if settled != now:
                continue  # still being written: look again at the next turn
            seen = settled
            log.info("the config files changed; reloading")
            await self.reload(Reload(), Caller(service="identityd"))

    async def handle(self, op: str, args: dict[str, Any], caller: list[Any] | None) -> Any:
        try:
            return await self._dispatch(op, args, caller)
        except CloudFailed as error:
            log.warning("%s failed: %s client error: %s", op, error.service, error.cause)
            raise for_client(error) from None
        except BusError as error:
            if error.kind is not ErrorKind.INTERNAL or error.message == INTERNAL_ERROR:
                raise
            log.error("%s failed: %s", op, error.message)
            raise internal(INTERNAL_ERROR) from None

    # -- provisioning --------------------------------------------------------------------

    async def _provision_at_start(self) -> None:
        """The device from the backup if the settings it was provisioned under are still the
        config's, else from DPS (or the config, for manual); then the reconciliation. A hub
        that refuses the backup's device sends the device to DPS again (spec §12.1)."""
        async with self._changes:
            source = self.config.provisioning.source
            if source == "none":
                log.info("provisioning source is none: no device identity")
                return
            template = await self._template()
            backup = None if source == "manual" else await self._backup(template)
            if source == "manual" or backup is None:
                device = await self._provision(template)
            elif await self._settings_changed():
                log.info(
                    "the provisioning settings changed since %s was provisioned; "
                    "provisioning again",
                    backup.info.device_id,
                )
                self._device = backup
                await self._provision_again_at_start()
                return
            else:
                log.info(
                    "using the provisioning backup: %s on %s",
                    backup.info.device_id,
                    backup.info.hub_name,
                )
                device = backup
            self._device = device
            try:
                await self._reconcile(device)
            except CloudFailed as error:
                if error.network:
                    log.warning(
                        "cannot reach the hub (%s); serving from the backups, offline", error.cause
                    )
                    self._reconcile_owed = True
                    return
                log.warning("the hub refused the device (%s); provisioning again", error.cause)
                if source == "manual":
                    # The config is all there is to provision from: once more, as the original.
                    await self._reconcile(device)
                    return
                await self._provision_again_at_start()

    async def _provision_again_at_start(self) -> None:
        """DPS again while `self._device` is the backup's device. Anything failing before DPS
        answered keeps that device served (with its module backups), to be tried again with
        backoff; the original gives up here unless the failure was the network's."""
        try:
            await self._provision_again()
        except (CloudFailed, BusError) as error:
            if self._provision_owed:
                assert self._device is not None
                log.warning(
                    "cannot provision again (%s); serving %s from the backup meanwhile",
                    error.cause if isinstance(error, CloudFailed) else error.message,
                    self._device.info.device_id,
                )
                return
            if isinstance(error, CloudFailed) and error.network:
                log.warning(
                    "provisioned, but cannot reach the hub (%s); serving offline", error.cause
                )
                return
            raise

    async def _settings_changed(self) -> bool:
        """Whether the config's provisioning differs from that of the last reconciliation;
        unknown (no `prev_state`, or one without `[provisioning]`) counts as unchanged, so a
        backup is never dropped for want of a record."""
        previous = await trio.to_thread.run_sync(self._state.read_prev_provisioning)
        if previous is None:
            return False
        return provisioning_key(previous) != provisioning_key(self.config.provisioning)

    async def _provision_again(self, *, forget_modules: bool = False) -> None:
        """Provision afresh (DPS is always asked) beside the current device, which stays served
        until DPS answered; then the new device is reconciled, and served once the hub answered
        (or failed to), `device_info` (with `prev_state`) replaced only if it answered.
        `_provision_owed` is left set if it fails before DPS answered, cleared after.
        `forget_modules`: the original's reprovision request, whose reconciliation treats
        every module principal as new."""
        self._provision_owed = True
        old = self._device
        device = await self._provision()
        self._provision_owed = False
        if forget_modules and old is not None:
            await trio.to_thread.run_sync(self._state.clear_modules, old.info)
        try:
            await self._reconcile(device, forget_prev=forget_modules)
        except CloudFailed as error:
            if error.network:
                self._reconcile_owed = True
            raise
        finally:
            # Served from here on, whatever the hub said: DPS gave it. After a successful
            # reconciliation, `device_info` already names it.
            self._device = device

    async def _template(self) -> Device:
        """The device as the config gives it: complete for manual; for DPS, its credentials
        with no hub or device id yet (an X.509 identity cert certd lacks is issued first, as
        the original does)."""
        provisioning = self.config.provisioning
        kind = provisioning.kind
        if provisioning.source == "manual":
            hub = kind.iothub_hostname
            info = DeviceInfo(hub, provisioning.local_gateway_hostname or hub, kind.device_id)
            auth = kind.authentication
            if auth.METHOD == "sas":
                return Device(info, "sas", auth.device_id_pk)
            device = Device(info, "x509", auth.identity_pk, auth.identity_cert)
            await self._x509_identity(device, x509_subject(kind.device_id, auth.csr_subject))
            return device
        attestation = kind.attestation
        if attestation.METHOD == "symmetric_key":
            return Device(DeviceInfo("", "", ""), "sas", attestation.symmetric_key)
        if attestation.METHOD == "tpm":
            return Device(DeviceInfo("", "", ""), "tpm", None)
        template = Device(
            DeviceInfo("", "", ""), "x509", attestation.identity_pk, attestation.identity_cert
        )
        subject = attestation.registration_id
        if subject is not None:
            await self._x509_identity(template, x509_subject(subject.cn, subject))
        return template

    async def _backup(self, template: Device) -> Device | None:
        backup = await trio.to_thread.run_sync(self._state.read_device_info)
        return None if backup is None else attrs.evolve(template, info=backup)

    async def _provision(self, template: Device | None = None) -> Device:
        """The device from the config (manual) or DPS. Nothing is stored or served here: the
        caller decides what becomes of the result."""
        if template is None:
            template = await self._template()
        if self.config.provisioning.source == "manual":
            log.info(
                "provisioned manually as %s on %s", template.info.device_id, template.info.hub_name
            )
            return template
        registration_id = await self._registration_id()
        if template.auth == "tpm":
            keys = await self._tpm_call(Tpm.get_tpm_keys, NOTHING)
            blob = await self._cloud.tpm_challenge(
                registration_id, keys.endorsement_key, keys.storage_root_key
            )
            await self._tpm_call(Tpm.import_auth_key, ImportAuthKey(blob))
            log.info("imported the auth key DPS sent for this TPM")
        creds = await self._credentials(template)
        info, auth_key = await self._cloud.register(creds, registration_id)
        if auth_key is not None:
            await self._tpm_call(Tpm.import_auth_key, ImportAuthKey(auth_key))
        log.info("provisioned by DPS as %s on %s", info.device_id, info.hub_name)
        return attrs.evolve(template, info=info)

    async def _tpm_call(self, operation: Any, request: Any) -> Any:
        if self._tpm is None:
            raise internal("TPM attestation needs tpmd in this aziotd")
        try:
            return await self._tpm.call(operation, request)
        except BusError as error:
            raise internal(f"tpmd: {error.message}") from None

    def _tpm_signer(self) -> Callable[[bytes], bytes]:
        """HMAC-SHA256 with the TPM's auth key, callable from a worker thread."""

        async def sign(data: bytes) -> bytes:
            return (await self._tpm_call(Tpm.sign_with_auth_key, SignWithAuthKey(data))).digest

        return lambda data: trio.from_thread.run(sign, data)

    async def _registration_id(self) -> str:
        """DPS's registration id: configured, or (X.509) the identity cert's CN."""
        attestation = self.config.provisioning.kind.attestation
        if attestation.METHOD in ("symmetric_key", "tpm"):
            return attestation.registration_id
        if attestation.registration_id is not None:
            return attestation.registration_id.cn
        device = Device(
            DeviceInfo("", "", ""), "x509", attestation.identity_pk, attestation.identity_cert
        )
        chain, _ = await self._x509_identity(device, None)
        return common_name(chain)

    async def _x509_identity(self, device: Device, subject: Any) -> tuple[bytes, str]:
        """The device's identity cert chain (from certd) and its key pair's handle (keyd). A
        cert certd does not have is issued (spec §8.3): a new `rsa-2048` key pair, a CSR with
        `subject`, `POST /certificates` with no issuer, so certd's `[cert_issuance]` decides."""
        assert device.cert_id is not None and device.key_id is not None
        pem = await self._certd_pem(device.cert_id)
        if pem is None:
            if subject is None:
                raise internal(
                    f"the identity cert {device.cert_id} is not in certd and no subject is "
                    "configured to issue it"
                )
            pem = await self._issue_identity(device, subject)
        try:
            handle = (await self._keys.call(Keys.load_key_pair, LoadKeyPair(device.key_id))).handle
        except BusError as error:
            raise BusError(
                ErrorKind.NOT_FOUND, f"Key client error\ncaused by: {error.message}"
            ) from None
        return pem.encode(), handle

    async def _certd_pem(self, cert_id: str) -> str | None:
        if self._certs is None:
            raise internal("X.509 identities need certd in this aziotd")
        try:
            return (await self._certs.call(Certs.get_cert, GetCert(cert_id))).pem
        except BusError as error:
            if error.kind is ErrorKind.INVALID:
                return None  # certd's "not found"
            raise internal(f"certd cannot read {cert_id}: {error.message}") from None

    async def _issue_identity(self, device: Device, subject: Any) -> str:
        assert self._certs is not None and device.key_id is not None
        try:
            old = await self._keys.call(Keys.load_key_pair, LoadKeyPair(device.key_id))
            await self._keys.call(Keys.delete_key_pair, DeleteKeyPair(old.handle))
        except BusError:
            pass
        created = await self._keys.call(
            Keys.create_key_pair, CreateKeyPair(device.key_id, "rsa-2048:*")
        )
        public = await public_key_of(self._keys, created.handle)
        key = remote_private_key(public, keys_private_op(self._keys, created.handle))
        csr = await trio.to_thread.run_sync(identity_csr, subject, key)
        try:
            reply = await self._certs.call(
                Certs.create_cert, CreateCert(device.cert_id, csr), timeout=120.0
            )
        except BusError as error:
            raise internal(f"certd cannot issue {device.cert_id}: {error.message}") from None
        log.info("issued the device identity cert %s through certd", device.cert_id)
        return reply.pem

    async def _credentials(self, device: Device) -> cloudcalls.Credentials:
        if device.auth == "tpm":
            return cloudcalls.Credentials(sign=self._tpm_signer())
        if device.auth == "x509":
            chain, handle = await self._x509_identity(device, None)
            return cloudcalls.Credentials(
                chain=chain, private_op=keys_private_op(self._keys, handle)
            )
        assert device.key_id is not None
        return cloudcalls.Credentials(sign=await self._device_signer(device.key_id))

    async def _device_signer(self, key_id: str) -> Callable[[bytes], bytes]:
        """HMAC-SHA256 with the device's keyd key, callable from a worker thread."""
        handle = await self._key_handle(key_id)

        async def sign(data: bytes) -> bytes:
            reply = await self._keys.call(Keys.sign, Sign(handle, "HMAC-SHA256", data))
            return reply.signature

        return lambda data: trio.from_thread.run(sign, data)

    async def _key_handle(self, key_id: str) -> str:
        try:
            return (await self._keys.call(Keys.load_key, LoadKey(key_id))).handle
        except BusError as error:
            raise BusError(
                ErrorKind.NOT_FOUND, f"Key client error\ncaused by: {error.message}"
            ) from None

    # -- reconciliation ----------------------------------------------------------------------

    def _module_principals(self) -> list[str]:
        return [
            p.name for p in self.config.principal if p.idtype is not None and "module" in p.idtype
        ]

    async def _reconcile(self, device: Device, *, forget_prev: bool = False) -> None:
        """The principals' module identities made to match the hub (spec §12.3). `forget_prev`:
        as if `device_info` were gone (the original's reprovision request deletes it first), so
        every module principal is made anew."""
        current = set(self._module_principals())
        backup = await trio.to_thread.run_sync(self._state.read_device_info)
        prev: set[str] = set()
        if backup == device.info and not forget_prev:
            prev = await trio.to_thread.run_sync(self._state.read_prev_modules)
        creds = await self._credentials(device)
        modules = await self._cloud.list_modules(device.info, creds)
        kept = set()
        for module in modules:
            name = module["moduleId"]
            if (name not in current and name in prev) or (name in current and name not in prev):
                await self._cloud.delete_module(device.info, name, creds)
                await trio.to_thread.run_sync(self._state.remove_module, device.info, name)
                log.info("reconciliation: deleted module %s", name)
            elif name in current:
                kept.add(name)
        for name in sorted(current - kept):
            await self._create_hub_module(device, name, creds)
            log.info("reconciliation: created module %s", name)
        # device_info first: a crash between the two leaves the old settings recorded, so the
        # next start provisions again rather than trusting a backup made under other settings.
        await trio.to_thread.run_sync(self._state.write_device_info, device.info)
        await trio.to_thread.run_sync(self._state.write_prev_state, self.config)
        self._reconcile_owed = False

    # -- module identities -------------------------------------------------------------------

    async def _master_handle(self) -> str:
        create = CreateKey(MASTER_KEY_ID, ["derive", "sign"], None)
        try:
            return (await self._keys.call(Keys.create_key, create)).handle
        except BusError as error:
            raise BusError(
                ErrorKind.NOT_FOUND, f"Key client error\ncaused by: {error.message}"
            ) from None

    async def _module_keys(self, module_id: str, generation_id: str) -> tuple[str, bytes, bytes]:
        """The derived primary key's handle, and both keys' bytes (spec §10)."""
        master = await self._master_handle()
        handles = []
        keys = []
        for which in ("primary", "secondary"):
            data = f"{module_id}:{generation_id}:{which}".encode()
            derived = await self._keys.call(Keys.create_derived_key, CreateDerivedKey(master, data))
            exported = await self._keys.call(
                Keys.export_derived_key, ExportDerivedKey(derived.handle)
            )
            handles.append(derived.handle)
            keys.append(exported.key)
        return handles[0], keys[0], keys[1]

    async def _create_hub_module(
        self, device: Device, module_id: str, creds: cloudcalls.Credentials
    ) -> dict[str, Any]:
        module = await self._cloud.create_module(device.info, module_id, creds)
        return await self._key_module(device, module, creds)

    async def _key_module(
        self, device: Device, module: dict[str, Any], creds: cloudcalls.Credentials
    ) -> dict[str, Any]:
        generation = module.get("generationId")
        if generation is None:
            raise invalid("module identity not found")
        handle, primary, secondary = await self._module_keys(module["moduleId"], generation)
        updated = await self._cloud.update_module(device.info, module, primary, secondary, creds)
        await trio.to_thread.run_sync(self._state.write_module, device.info, updated)
        return self._module_identity(device, updated, handle)

    def _module_identity(
        self, device: Device, module: dict[str, Any], handle: str | None
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "hubName": device.info.hub_name,
            "gatewayHost": device.info.local_gateway_hostname,
            "deviceId": device.info.device_id,
            "moduleId": module["moduleId"],
        }
        if module.get("generationId") is not None:
            spec["genId"] = module["generationId"]
        if handle is not None:
            spec["auth"] = {"type": "sas", "keyHandle": handle}
        return {"type": "aziot", "spec": spec}

    async def _device_identity(self, device: Device) -> dict[str, Any]:
        auth: dict[str, Any] = {"type": device.auth}
        if device.auth == "sas" and device.key_id is not None:
            auth["keyHandle"] = await self._key_handle(device.key_id)
        elif device.auth == "x509":
            _, auth["keyHandle"] = await self._x509_identity(device, None)
            auth["certId"] = device.cert_id
        spec = {
            "hubName": device.info.hub_name,
            "gatewayHost": device.info.local_gateway_hostname,
            "deviceId": device.info.device_id,
            "auth": auth,
        }
        return {"type": "aziot", "spec": spec}

    def _need_device(self) -> Device:
        if self._device is None:
            raise device_not_found()
        return self._device

    async def _module(self, module_id: str) -> dict[str, Any]:
        """A module identity with its key handle: hub first, then the backup (or the other
        way round with `prefer_module_identity_cache`).

        Beyond the original, which asks the hub at every read (spec/lessons.md row 8): reads
        of one module share one hub request; a module the hub answered for less than
        `HUB_FRESH` s ago is read from its backup, so a caller polling its identity in a loop
        cannot make identityd hammer the hub; and a 429 is not slept off inside the read (the
        original waits a minute or more, then tries again): the backup answers, or without one
        the caller gets the hub's refusal at once, and no module read asks the hub of that
        device again until its Retry-After has passed."""
        device = self._need_device()
        lock = self._module_locks.setdefault(module_id, trio.Lock())
        async with lock:
            cached = await trio.to_thread.run_sync(self._state.read_module, device.info, module_id)
            fetched = self._hub_fetched.get((device.info, module_id))
            now = trio.current_time()
            fresh = fetched is not None and now - fetched < HUB_FRESH
            quiet = self._hub_quiet_until.get(device.info, now) - now
            module = cached if self.config.prefer_module_identity_cache or fresh else None
            if module is None and quiet > 0:
                if cached is None:
                    raise CloudFailed("Hub", throttled_cause(quiet), False, 429)
                module = cached
            if module is None:
                try:
                    creds = await self._credentials(device)
                    module = await self._cloud.get_module(
                        device.info, module_id, creds, wait_throttled=False
                    )
                    await trio.to_thread.run_sync(self._state.write_module, device.info, module)
                    self._hub_fetched[(device.info, module_id)] = trio.current_time()
                except CloudFailed as error:
                    if error.throttled:
                        quiet = quiet_seconds(error.retry_after)
                        self._hub_quiet_until[device.info] = trio.current_time() + quiet
                        log.warning(
                            "module %s: the hub throttled this device (Retry-After: %s); module "
                            "reads answer from their backups for %.0f s",
                            module_id,
                            error.retry_after,
                            quiet,
                        )
                        if cached is None:
                            raise CloudFailed("Hub", throttled_cause(quiet), False, 429) from None
                    elif cached is None:
                        if error.status == 404:
                            raise CloudFailed(
                                "Hub", f"module {module_id} not found", False, 404
                            ) from None
                        raise
                    else:
                        log.warning(
                            "module %s: the hub failed; answering from its backup", module_id
                        )
                    module = cached
        if not lock.locked() and lock.statistics().tasks_waiting == 0:
            self._module_locks.pop(module_id, None)
        generation = module.get("generationId")
        if generation is None:
            raise invalid("module identity not found")
        master = await self._master_handle()
        # The hub's module id, not the one asked for: they differ when the hub decodes `%XX`.
        data = f"{module['moduleId']}:{generation}:primary".encode()
        derived = await self._keys.call(Keys.create_derived_key, CreateDerivedKey(master, data))
        return self._module_identity(device, module, derived.handle)

    # -- the API -----------------------------------------------------------------------------

    def _who(self, caller: Caller):  # noqa: ANN202
        return self._callers.of(caller.uid)

    @staticmethod
    def _check_type(value: str | None, allowed: tuple[str, ...] = ("aziot",)) -> str:
        if value is None:
            raise invalid_parameter("type", "missing parameter")
        if value not in allowed:
            raise invalid_parameter("type", f"invalid type: {value}")
        return value

    async def get_identity(self, msg: GetIdentity, caller: Caller) -> Json:
        who = self._who(caller)
        if who.gets_device:
            return Json(await self._device_identity(self._need_device()))
        if who.name is not None and who.gets_module(who.name):
            return Json(await self._module(who.name))
        raise unauthorized("authorization error")

    async def get_device(self, msg: GetDevice, caller: Caller) -> Json:
        if not self._who(caller).gets_device:
            raise unauthorized("authorization error")
        return Json(await self._device_identity(self._need_device()))

    async def get_provisioning(self, msg: GetProvisioning, caller: Caller) -> Json:
        provisioning = self.config.provisioning
        kind = provisioning.kind
        if provisioning.source == "none":
            return Json({"source": "none"})
        if provisioning.source == "manual":
            return Json({"source": "manual", "auth": kind.authentication.METHOD})
        try:
            payload = await trio.to_thread.run_sync(cloudcalls.read_payload, provisioning)
        except (OSError, ValueError) as error:
            raise invalid_parameter("provisioning.payload", str(error)) from None
        if payload is cloudcalls.NO_PAYLOAD:
            payload = None  # the route's `payload` is always there, `null` without a file
        return Json(
            {
                "source": "dps",
                "auth": kind.attestation.METHOD,
                "endpoint": normalized_endpoint(kind.global_endpoint),
                "scope_id": kind.scope_id,
                "registration_id": await self._registration_id_for_route(),
                "payload": payload,
            }
        )

    async def _registration_id_for_route(self) -> str:
        try:
            return await self._registration_id()
        except BusError as error:
            raise internal(f"no registration id: {error.message}") from None

    async def list_modules(self, msg: ListModules, caller: Caller) -> Json:
        if not self._who(caller).manages:
            raise unauthorized("authorization error")
        self._check_type(msg.type)
        device = self._need_device()
        creds = await self._credentials(device)
        cached = await trio.to_thread.run_sync(self._state.read_modules, device.info)
        modules = cached if self.config.prefer_module_identity_cache and cached else None
        if modules is None:
            try:
                modules = await self._cloud.list_modules(device.info, creds)
                for module in modules:
                    await trio.to_thread.run_sync(self._state.write_module, device.info, module)
            except CloudFailed:
                if not cached:
                    raise
                modules = cached
        identities = [self._module_identity(device, m, None) for m in modules]
        return Json({"identities": identities})

    async def create_module(self, msg: CreateModule, caller: Caller) -> Json:
        if not self._who(caller).manages:
            raise unauthorized("authorization error")
        self._check_type(msg.type, ("aziot", "local"))
        if msg.type == "local":
            if msg.module_id in self._local_principals():
                raise invalid_parameter(
                    "moduleId", f"local identity for {msg.module_id} already exists"
                )
            return Json(await self._local_identity(msg.module_id, local.options(msg.local_opts)))
        check_module_name(msg.module_id)
        device = self._need_device()
        creds = await self._credentials(device)
        return Json(await self._create_hub_module(device, msg.module_id, creds))

    async def get_module(self, msg: GetModule, caller: Caller) -> Json:
        if not self._who(caller).gets_module(msg.module_id):
            raise unauthorized("authorization error")
        self._check_type(msg.type, ("aziot", "local"))
        if msg.type == "local":
            principal = self._local_principals().get(msg.module_id)
            if principal is None:
                raise invalid_parameter(
                    "moduleId", f"local identity for {msg.module_id} doesn't exist"
                )
            opts = principal.localid
            attributes = opts.attributes if opts is not None else "client"
            return Json(await self._local_identity(msg.module_id, attributes))
        check_module_name(msg.module_id)
        return Json(await self._module(msg.module_id))

    def _local_principals(self) -> dict[str, Any]:
        return {
            p.name: p for p in self.config.principal if p.idtype is not None and "local" in p.idtype
        }

    async def _local_identity(self, module_id: str, attributes: str) -> dict[str, Any]:
        """A fresh key and cert at every call, as the original (spec §5.4)."""
        if self.config.localid is None:
            raise internal("local identities need [localid] domain in the config")
        if self._certs is None:
            raise internal("local identities need certd in this aziotd")
        cn = local.common_name(module_id, self.config.hostname, self.config.localid.domain)
        key_pem, csr = await trio.to_thread.run_sync(local.key_and_csr, cn, attributes)
        try:
            reply = await self._certs.call(
                Certs.create_cert, CreateCert(module_id, csr), timeout=120.0
            )
        except BusError as error:
            raise internal(
                f"certd cannot issue local identity {module_id}: {error.message}"
            ) from None
        auth = {
            "privateKey": key_pem.decode(),
            "certificate": reply.pem,
            "expiration": local.expiration(reply.pem),
        }
        return {"type": "local", "spec": {"moduleId": module_id, "auth": auth}}

    async def update_module(self, msg: UpdateModule, caller: Caller) -> Json:
        if not self._who(caller).manages:
            raise unauthorized("authorization error")
        self._check_type(msg.type)
        check_module_name(msg.module_id)
        device = self._need_device()
        creds = await self._credentials(device)
        module = await self._cloud.get_module(device.info, msg.module_id, creds)
        return Json(await self._key_module(device, module, creds))

    async def delete_module(self, msg: DeleteModule, caller: Caller) -> Nothing:
        if not self._who(caller).manages:
            raise unauthorized("authorization error")
        self._check_type(msg.type)
        check_module_name(msg.module_id)
        device = self._need_device()
        creds = await self._credentials(device)
        await self._cloud.delete_module(device.info, msg.module_id, creds)
        await trio.to_thread.run_sync(self._state.remove_module, device.info, msg.module_id)
        return NOTHING

    async def reprovision(self, msg: Reprovision, caller: Caller) -> Nothing:
        if not self._who(caller).manages:
            raise unauthorized("authorization error")
        async with self._changes:
            await self._reprovision_locked()
        return NOTHING

    async def _reprovision_locked(self) -> None:
        """Provision again and reconcile, every module principal made anew (spec §12.2 `Api`).
        The original forgets the device and deletes its backups first, so a failure leaves it
        with none (400 `device identity not found` until a later success); here they are
        replaced only once DPS answered, and a failure answers the same error while the old
        device keeps being served."""
        if self.config.provisioning.source == "none":
            old = self._device
            await trio.to_thread.run_sync(self._state.clear_device_info)
            if old is not None:
                await trio.to_thread.run_sync(self._state.clear_modules, old.info)
            self._device = None
            self._provision_owed = self._reconcile_owed = False
            return
        owed = self._provision_owed
        try:
            await self._provision_again(forget_modules=True)
        except (CloudFailed, BusError):
            if self._provision_owed:
                # A caller asked, sees the failure and may ask again: retried in the
                # background only if a config change or the hub had asked for it before.
                self._provision_owed = owed
            raise

    async def reload(self, msg: Reload, caller: Caller) -> Nothing:
        """New settings and principals, then a reconciliation (spec §12.4). Beyond the
        original: a change of where or how the device provisions (hub, device id, DPS endpoint,
        scope, registration id, attestation) provisions again, where the original kept serving
        the old device until its backup was deleted by hand; the old device stays served until
        DPS answered, and a failure is tried again with backoff."""
        if self._load_config is None:
            return NOTHING
        try:
            fresh = await trio.to_thread.run_sync(self._load_config)
        except Exception as error:  # a broken file: keep serving with what we had
            log.error("cannot reload the config, keeping the current settings: %s", error)
            return NOTHING
        async with self._changes:
            old = self.config
            self.config = fresh
            self._callers = Callers(fresh.principal)
            self._cloud = cloudcalls.Cloud(fresh, self._faults)
            changed = provisioning_key(fresh.provisioning) != provisioning_key(old.provisioning)
            try:
                if fresh.provisioning.source == "none":
                    if old.provisioning.source != "none":
                        log.info("the provisioning source is now none; forgetting the device")
                        await self._reprovision_locked()
                elif changed or self._provision_owed:
                    log.info("the provisioning settings changed; provisioning again")
                    await self._provision_again()
                elif self._device is not None:
                    await self._reconcile(self._device)
            except CloudFailed as error:
                log.warning(
                    "after the reload: %s client error (%s); %s",
                    error.service,
                    error.cause,
                    "trying again later" if self._provision_owed else "running offline",
                )
                if error.network:
                    self._reconcile_owed = True
            except BusError as error:
                log.error("after the reload: %s", error.message)
        log.info("reloaded identityd's settings and principals")
        return NOTHING
