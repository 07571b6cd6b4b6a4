"""identityd's files under its homedir, as the original lays them out (spec/provisioning.md §13),
so a device provisioned by the original keeps its state:

- `device_info`: TOML `hub_name`, `local_gateway_hostname`, `device_id`, or the text
  `unprovisioned`; the DPS result reused at the next start instead of registering again;
- `prev_state`: the settings of the last successful reconciliation, as the original writes them
  (TOML of the whole identityd config but `[endpoints]`). Its principals decide which hub modules
  identityd made; its `[provisioning]` tells whether the settings changed since `device_info`
  was written, so a start after `aziotctl config apply` provisions again (the original reads
  only the principals back, and keeps the backup whatever the config says);
- `modules/<sha256(hub)>-<sha256(device)>/<alnum>-<sha256>`: each module identity as the hub
  last gave it, without keys, served when the hub cannot be reached.

Every write is atomic (`actors.files.write_atomic`): a crash leaves the old file or the new.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import attrs
import tomli
import tomli_w

from aziot.actors.files import file_name, make_directories, write_atomic
from aziot.bus.faults import Faults
from aziot.config import identityd as settings
from aziot.config.loader import ConfigError

log = logging.getLogger(__name__)

POINTS = "identity.state"
SERVICE_USER = "aziotid"  # the original's user for identityd's state (see inherited_owner)


@attrs.frozen
class DeviceInfo:
    hub_name: str
    local_gateway_hostname: str
    device_id: str

    def to_toml(self) -> str:
        def quoted(value: str) -> str:
            return json.dumps(value, ensure_ascii=False)

        return (
            f"hub_name = {quoted(self.hub_name)}\n"
            f"local_gateway_hostname = {quoted(self.local_gateway_hostname)}\n"
            f"device_id = {quoted(self.device_id)}\n"
        )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class StateFiles:
    """The homedir's files; sync methods, run in a worker thread by the actor."""

    def __init__(self, homedir: Path, faults: Faults) -> None:
        self.homedir = homedir
        self._faults = faults

    @property
    def device_info_path(self) -> Path:
        return self.homedir / "device_info"

    @property
    def prev_state_path(self) -> Path:
        return self.homedir / "prev_state"

    def prepare(self) -> None:
        """The homedir 0700, and temp files that a crash mid-write left behind removed (the
        renames they were for never happened, so they hold nothing anyone acknowledged)."""
        make_directories(self.homedir, 0o700, service_user=SERVICE_USER)
        for stale in [*self.homedir.glob(".*.tmp"), *self.homedir.glob("modules/*/.*.tmp")]:
            log.info("removing %s, left by an interrupted write", stale)
            stale.unlink(missing_ok=True)

    def _write(self, path: Path, text: str) -> None:
        make_directories(path.parent, 0o700, service_user=SERVICE_USER)
        write_atomic(path, text.encode("utf-8"), self._faults, POINTS, service_user=SERVICE_USER)

    # -- device_info ---------------------------------------------------------------------

    def read_device_info(self) -> DeviceInfo | None:
        """The backup, or None when absent, `unprovisioned` or unreadable (then it is
        removed, as the original does)."""
        try:
            text = self.device_info_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if text.strip() == "unprovisioned":
            return None
        try:
            table = tomli.loads(text)
            return DeviceInfo(
                str(table["hub_name"]),
                str(table["local_gateway_hostname"]),
                str(table["device_id"]),
            )
        except (tomli.TOMLDecodeError, KeyError) as error:
            log.warning("%s is not readable (%s); removing it", self.device_info_path, error)
            self.device_info_path.unlink(missing_ok=True)
            return None

    def write_device_info(self, info: DeviceInfo) -> None:
        self._write(self.device_info_path, info.to_toml())

    def clear_device_info(self) -> None:
        self.device_info_path.unlink(missing_ok=True)

    # -- prev_state -------------------------------------------------------------------------

    def read_prev_modules(self) -> set[str]:
        """Names of the module principals of the last successful reconciliation."""
        table = self._read_prev_state()
        names = set()
        for principal in (table or {}).get("principal", []):
            if isinstance(principal, dict) and "module" in (principal.get("idtype") or []):
                names.add(str(principal.get("name")))
        return names

    def read_prev_provisioning(self) -> settings.Provisioning | None:
        """The `[provisioning]` that `device_info` was written under, or None when unknown:
        no `prev_state`, one without `[provisioning]` (written by an earlier version of this
        project, which kept only the principals), or one that does not parse."""
        table = self._read_prev_state()
        if table is None or not isinstance(table.get("provisioning"), dict):
            return None
        # Only the provisioning table is read back: the rest of the original's settings may hold
        # what this project refuses in a config, and none of it says where the device lives.
        minimal = {"hostname": "-", "homedir": "/", "provisioning": table["provisioning"]}
        try:
            return settings.parse_identityd(minimal, str(self.prev_state_path)).provisioning
        except ConfigError as error:
            log.warning("ignoring the provisioning settings in %s: %s", self.prev_state_path, error)
            return None

    def _read_prev_state(self) -> dict[str, Any] | None:
        try:
            return tomli.loads(self.prev_state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (tomli.TOMLDecodeError, UnicodeDecodeError, OSError) as error:
            log.warning("ignoring %s: %s", self.prev_state_path, error)
            return None

    def write_prev_state(self, config: settings.IdentitydConfig) -> None:
        self._write(self.prev_state_path, tomli_w.dumps(settings_table(config)))

    # -- module backups ---------------------------------------------------------------------

    def _device_dir(self, device: DeviceInfo) -> Path:
        return self.homedir / "modules" / f"{_sha(device.hub_name)}-{_sha(device.device_id)}"

    def _module_path(self, device: DeviceInfo, module_id: str) -> Path:
        return self._device_dir(device) / file_name(module_id, "")[:-1]

    def read_module(self, device: DeviceInfo, module_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._module_path(device, module_id).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_modules(self, device: DeviceInfo) -> list[dict[str, Any]]:
        folder = self._device_dir(device)
        found = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name.startswith("."):
                continue
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    found.append(data)
        return found

    def write_module(self, device: DeviceInfo, module: dict[str, Any]) -> None:
        folder = self._device_dir(device)
        if not folder.is_dir():
            # One device's backups at a time: a new device's folder replaces every other.
            shutil.rmtree(self.homedir / "modules", ignore_errors=True)
        kept = {
            k: module[k]
            for k in ("moduleId", "managedBy", "deviceId", "generationId")
            if k in module
        }
        self._write(self._module_path(device, module["moduleId"]), json.dumps(kept))

    def remove_module(self, device: DeviceInfo, module_id: str) -> None:
        self._module_path(device, module_id).unlink(missing_ok=True)

    def clear_modules(self, device: DeviceInfo) -> None:
        shutil.rmtree(self._device_dir(device), ignore_errors=True)


# -- what prev_state holds ------------------------------------------------------------------


def settings_table(config: settings.IdentitydConfig) -> dict[str, Any]:
    """The settings as the original serializes them into `prev_state`: defaults of the cloud
    knobs left out, no `[endpoints]`, an endpoint URL as `url::Url` shows it. The original
    reads this file back as its own settings, so a device moved back to it keeps its modules."""
    table: dict[str, Any] = {
        "hostname": config.hostname,
        "homedir": str(config.homedir),
        "prefer_module_identity_cache": config.prefer_module_identity_cache,
    }
    if config.max_requests != settings.DEFAULT_MAX_REQUESTS:
        table["max_requests"] = config.max_requests
    if config.cloud_timeout_sec != settings.DEFAULT_CLOUD_TIMEOUT_SEC:
        table["cloud_timeout_sec"] = config.cloud_timeout_sec
    if config.cloud_retries != settings.DEFAULT_CLOUD_RETRIES:
        table["cloud_retries"] = config.cloud_retries
    table["provisioning"] = _provisioning_table(config.provisioning)
    if config.principal:
        table["principal"] = [_principal_table(p) for p in config.principal]
    if config.localid is not None:
        table["localid"] = {"domain": config.localid.domain}
    return table


def _subject(subject: settings.CsrSubject) -> str | dict[str, str]:
    return {"CN": subject.cn, **subject.rest} if subject.rest else subject.cn


def _provisioning_table(provisioning: settings.Provisioning) -> dict[str, Any]:
    table: dict[str, Any] = {}
    if provisioning.local_gateway_hostname is not None:
        table["local_gateway_hostname"] = provisioning.local_gateway_hostname
    kind = provisioning.kind
    table["source"] = kind.SOURCE
    if isinstance(kind, settings.Manual):
        table["iothub_hostname"] = kind.iothub_hostname
        table["device_id"] = kind.device_id
        auth = kind.authentication
        if isinstance(auth, settings.ManualSas):
            table["authentication"] = {"method": "sas", "device_id_pk": auth.device_id_pk}
        else:
            manual: dict[str, Any] = {
                "method": "x509",
                "identity_cert": auth.identity_cert,
                "identity_pk": auth.identity_pk,
            }
            if auth.csr_subject is not None:
                manual["csr_subject"] = _subject(auth.csr_subject)
            table["authentication"] = manual
    elif isinstance(kind, settings.Dps):
        table["global_endpoint"] = normalized_endpoint(kind.global_endpoint)
        table["scope_id"] = kind.scope_id
        attestation = kind.attestation
        att: dict[str, Any] = {"method": attestation.METHOD}
        if isinstance(attestation, settings.SymmetricKeyAttestation):
            att["registration_id"] = attestation.registration_id
            att["symmetric_key"] = attestation.symmetric_key
        elif isinstance(attestation, settings.X509Attestation):
            att["identity_cert"] = attestation.identity_cert
            att["identity_pk"] = attestation.identity_pk
            if attestation.registration_id is not None:
                att["registration_id"] = _subject(attestation.registration_id)
            renew = attestation.identity_auto_renew
            if renew is not None:
                att["identity_auto_renew"] = {
                    "rotate_key": renew.rotate_key,
                    "threshold": renew.threshold,
                    "retry": renew.retry,
                }
        else:
            att["registration_id"] = attestation.registration_id
        table["attestation"] = att
        if kind.payload is not None:
            table["payload"] = {"uri": kind.payload.uri}
    return table


def _principal_table(principal: settings.Principal) -> dict[str, Any]:
    table: dict[str, Any] = {"uid": principal.uid, "name": principal.name}
    if principal.idtype is not None:
        table["idtype"] = list(principal.idtype)
    if principal.localid is not None:
        table["localid"] = {
            "type": principal.localid.type,
            "attributes": principal.localid.attributes,
        }
    return table


def normalized_endpoint(url: str) -> str:
    """The endpoint as the original's `url::Url` shows it: a bare host gets a `/` path."""
    scheme, sep, rest = url.partition("://")
    return url + "/" if sep and "/" not in rest else url


def provisioning_key(provisioning: settings.Provisioning) -> tuple[Any, ...]:
    """What decides which device the cloud gives and how it proves who it is: two settings with
    the same key need no new provisioning. The renewal policy and the CSR's other names are
    left out (they change how a cert is made, not which device it is for); the payload counts
    by its URI only (its file's contents are not compared)."""
    gateway = provisioning.local_gateway_hostname
    kind = provisioning.kind
    if isinstance(kind, settings.Manual):
        auth = kind.authentication
        ids = (
            (auth.device_id_pk,)
            if isinstance(auth, settings.ManualSas)
            else (auth.identity_cert, auth.identity_pk)
        )
        return ("manual", gateway, kind.iothub_hostname, kind.device_id, auth.METHOD, ids)
    if isinstance(kind, settings.Dps):
        attestation = kind.attestation
        registration: str | None
        if isinstance(attestation, settings.SymmetricKeyAttestation):
            registration, ids = attestation.registration_id, (attestation.symmetric_key,)
        elif isinstance(attestation, settings.X509Attestation):
            subject = attestation.registration_id
            registration = None if subject is None else subject.cn
            ids = (attestation.identity_cert, attestation.identity_pk)
        else:
            registration, ids = attestation.registration_id, ()
        payload = None if kind.payload is None else str(kind.payload.path)
        return (
            "dps",
            gateway,
            normalized_endpoint(kind.global_endpoint),
            kind.scope_id,
            attestation.METHOD,
            registration,
            ids,
            payload,
        )
    return ("none", gateway)
