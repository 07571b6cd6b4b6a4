"""identityd's files under its homedir, as the original lays them out (spec/provisioning.md §13),
so a device provisioned by the original keeps its state:

- `device_info`: TOML `hub_name`, `local_gateway_hostname`, `device_id`, or the text
  `unprovisioned`; the DPS result reused at the next start instead of registering again;
- `prev_state`: the principals of the last successful reconciliation (the original writes its
  whole settings; only the principals are read back, by it and by us);
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

from aziot.actors.files import file_name, make_directories, write_atomic
from aziot.bus.faults import Faults

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
        try:
            table = tomli.loads(self.prev_state_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, tomli.TOMLDecodeError):
            return set()
        names = set()
        for principal in table.get("principal", []):
            if isinstance(principal, dict) and "module" in (principal.get("idtype") or []):
                names.add(str(principal.get("name")))
        return names

    def write_prev_state(self, principals: list[tuple[int, str, list[str] | None]]) -> None:
        lines = ["# the principals of identityd's last successful reconciliation\n"]
        for uid, name, idtype in principals:
            lines.append(f"\n[[principal]]\nuid = {uid}\nname = {json.dumps(name)}\n")
            if idtype is not None:
                lines.append(f"idtype = {json.dumps(idtype)}\n")
        self._write(self.prev_state_path, "".join(lines))

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
