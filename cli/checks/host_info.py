"""The top-level `additional_info` of `check --output json`: time, OS, DMI, memory and disks,
and the hub / gateway host names when identityd's config names them."""

from __future__ import annotations

import datetime
import os
import platform
import struct
from pathlib import Path
from typing import Any

from aziot.config.identityd import IdentitydConfig, Manual

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _pretty(size: float) -> str:
    unit = 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size /= 1024
        unit += 1
    return f"{size:.2f} {_UNITS[unit]}"


def _os_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            name = {
                "ID": "id",
                "VERSION_ID": "version_id",
                "VARIANT_ID": "variant_id",
                "BUILD_ID": "build_id",
            }.get(key)
            if name:
                info[name] = value.strip("'\"")
        break
    info["arch"] = platform.machine()
    info["bitness"] = struct.calcsize("P") * 8
    return info


def _dmi(name: str) -> str | None:
    try:
        return Path(f"/sys/devices/virtual/dmi/id/{name}").read_text().strip() or None
    except OSError:
        return None


def _memory() -> dict[str, str]:
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    total, available = fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
    swap_total, swap_free = fields.get("SwapTotal", 0), fields.get("SwapFree", 0)
    return {
        "used_ram": _pretty(total - available),
        "total_ram": _pretty(total),
        "used_swap": _pretty(swap_total - swap_free),
        "total_swap": _pretty(swap_total),
    }


def _disks() -> list[dict[str, str]]:
    disks = []
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("/dev/"):
            continue
        try:
            st = os.statvfs(parts[1])
        except OSError:
            continue
        total, available = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        disks.append(
            {
                "name": parts[0],
                "mount_point": parts[1],
                "percent_free": f"{available / total * 100:.1f}%" if total else "0.0%",
                "available_space": _pretty(available),
                "total_space": _pretty(total),
                "file_system": parts[2],
            }
        )
    return disks


def additional_info(identityd: IdentitydConfig | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "now": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
        "os": _os_info(),
        "dmi": {"product": _dmi("product_name"), "vendor": _dmi("sys_vendor")},
        "system_info": {**_memory(), "disks": _disks()},
    }
    if identityd is not None:
        kind = identityd.provisioning.kind
        if isinstance(kind, Manual):
            info["iothub_hostname"] = kind.iothub_hostname
        if identityd.provisioning.local_gateway_hostname is not None:
            info["local_gateway_hostname"] = identityd.provisioning.local_gateway_hostname
    return info
