"""The tpmd config: `max_requests`, `tcti`, `auth_key_index`, `[hierarchy_authorization]`,
`[endpoints]` (spec/provisioning.md §2.4, §4.4, the original's aziot-tpmd-config).

The original's serde structs take unknown keys silently (a misspelt `auth_key_idx` leaves the
auth key at its default handle). Here an unknown, misspelt or mistyped key stops the start with
the file and the key named, as the other services' configs do.
"""

from __future__ import annotations

from typing import Any

import attrs

from .loader import ConfigError, ServicePaths, load_merged, type_name

DEFAULT_TCTI = "device"
DEFAULT_AUTH_KEY_INDEX = 0x00_01_00
MAX_AUTH_KEY_INDEX = 0x7F_FF_FF  # TPM2 spec part 3, 28.5.1: the persistent range's offsets
PERSISTENT_OBJECT_BASE = 0x81_00_00_00
DEFAULT_MAX_REQUESTS = 10


@attrs.frozen
class HierarchyAuthorization:
    endorsement: str = attrs.field(default="", repr=False)
    owner: str = attrs.field(default="", repr=False)


@attrs.frozen
class Endpoints:
    aziot_tpmd: str | None = None


@attrs.frozen
class TpmdConfig:
    max_requests: int = DEFAULT_MAX_REQUESTS
    tcti: str = DEFAULT_TCTI
    auth_key_index: int = DEFAULT_AUTH_KEY_INDEX
    hierarchy_authorization: HierarchyAuthorization = attrs.field(factory=HierarchyAuthorization)
    endpoints: Endpoints = attrs.field(factory=Endpoints)

    @property
    def auth_key_handle(self) -> int:
        """The persistent handle the auth key is kept at."""
        return PERSISTENT_OBJECT_BASE + self.auth_key_index


def _get(table: dict[str, Any], where: str, key: str, kind: type, expected: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}{key}: expected {expected}, found {type_name(value)}")
    return value


def _refuse_others(table: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        names = ", ".join(f"{where}{key}" for key in unknown)
        raise ConfigError(f"unknown key {names}; known: {', '.join(known)}")


def _c_string(table: dict[str, Any], where: str, key: str) -> str | None:
    """tss2 and the original take these as C strings: a NUL inside cannot be passed on."""
    value: str | None = _get(table, where, key, str, "a string")
    if value is not None and "\0" in value:
        raise ConfigError(f"{where}{key}: must not contain a NUL character")
    return value


def _parse(data: dict[str, Any]) -> TpmdConfig:
    max_requests = _get(data, "", "max_requests", int, "an integer")
    if max_requests is not None and max_requests < 1:
        raise ConfigError("max_requests must be at least 1")
    tcti = _c_string(data, "", "tcti")
    index = _get(data, "", "auth_key_index", int, f"an integer 0 to {MAX_AUTH_KEY_INDEX:#x}")
    if index is not None and not 0 <= index <= MAX_AUTH_KEY_INDEX:
        raise ConfigError(
            f"auth_key_index: {index:#x} is out of range; expected an integer in range "
            f"0x00_00_00..=0x7F_FF_FF (an offset from {PERSISTENT_OBJECT_BASE:#x})"
        )
    auth = HierarchyAuthorization()
    auth_table = _get(data, "", "hierarchy_authorization", dict, "a table")
    if auth_table is not None:
        where = "hierarchy_authorization."
        auth = HierarchyAuthorization(
            _c_string(auth_table, where, "endorsement") or "",
            _c_string(auth_table, where, "owner") or "",
        )
        _refuse_others(auth_table, where, ("endorsement", "owner"))
    endpoints = Endpoints()
    endpoint_table = _get(data, "", "endpoints", dict, "a table")
    if endpoint_table is not None:
        endpoints = Endpoints(_get(endpoint_table, "endpoints.", "aziot_tpmd", str, "a string"))
        _refuse_others(endpoint_table, "endpoints.", ("aziot_tpmd",))
    _refuse_others(
        data,
        "",
        ("max_requests", "tcti", "auth_key_index", "hierarchy_authorization", "endpoints"),
    )
    return TpmdConfig(
        max_requests=DEFAULT_MAX_REQUESTS if max_requests is None else max_requests,
        tcti=DEFAULT_TCTI if tcti is None else tcti,
        auth_key_index=DEFAULT_AUTH_KEY_INDEX if index is None else index,
        hierarchy_authorization=auth,
        endpoints=endpoints,
    )


def parse_tpmd(data: dict[str, Any], source: str) -> TpmdConfig:
    try:
        return _parse(data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_tpmd(paths: ServicePaths) -> TpmdConfig:
    return parse_tpmd(load_merged(paths), f"{paths.config_file} (+ {paths.config_dir}/*.toml)")
