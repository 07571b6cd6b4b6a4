"""The tpmd config: `max_requests`, `tcti`, `auth_key_index`, `[hierarchy_authorization]`,
`[endpoints]` (spec/provisioning.md §2.4, §4.4, the original's aziot-tpmd-config).

The original's serde structs take unknown keys silently (a misspelt `auth_key_idx` leaves the
auth key at its default handle). Here an unknown, misspelt or mistyped key stops the start with
the file and the key named, as the other services' configs do.
"""

from __future__ import annotations

from typing import Any

import attrs

from .loader import ServicePaths
from .table import Locator, Table, load_merged_source, locator

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


def _c_string(table: Table, key: str) -> str | None:
    """tss2 and the original take these as C strings: a NUL inside cannot be passed on."""
    value = table.string(key)
    if value is not None and "\0" in value:
        raise table.error(key, "must not contain a NUL character")
    return value


def parse_tpmd(data: dict[str, Any], source: str | Locator) -> TpmdConfig:
    """Parse one already-merged table; `source` is the file name errors start with, or where
    each key came from (`table.load_merged_source`)."""
    top = Table(data, "", locator(source))
    max_requests = top.integer("max_requests", 1)
    tcti = _c_string(top, "tcti")
    index = top.integer("auth_key_index", what=f"an integer 0 to {MAX_AUTH_KEY_INDEX:#x}")
    if index is not None and not 0 <= index <= MAX_AUTH_KEY_INDEX:
        raise top.error(
            "auth_key_index",
            f"{index:#x} is out of range; expected an integer in range "
            f"0x00_00_00..=0x7F_FF_FF (an offset from {PERSISTENT_OBJECT_BASE:#x})",
        )
    auth = HierarchyAuthorization()
    auth_table = top.table("hierarchy_authorization")
    if auth_table is not None:
        auth = HierarchyAuthorization(
            _c_string(auth_table, "endorsement") or "", _c_string(auth_table, "owner") or ""
        )
        auth_table.refuse_others(("endorsement", "owner"))
    endpoints = Endpoints()
    endpoint_table = top.table("endpoints")
    if endpoint_table is not None:
        endpoints = Endpoints(endpoint_table.string("aziot_tpmd"))
        endpoint_table.refuse_others(("aziot_tpmd",))
    top.refuse_others(
        ("max_requests", "tcti", "auth_key_index", "hierarchy_authorization", "endpoints")
    )
    return TpmdConfig(
        max_requests=DEFAULT_MAX_REQUESTS if max_requests is None else max_requests,
        tcti=DEFAULT_TCTI if tcti is None else tcti,
        auth_key_index=DEFAULT_AUTH_KEY_INDEX if index is None else index,
        hierarchy_authorization=auth,
        endpoints=endpoints,
    )


def load_tpmd(paths: ServicePaths) -> TpmdConfig:
    """config.toml merged with config.d/*.toml; a refusal names the file and line of the key."""
    source = load_merged_source(paths)
    return parse_tpmd(source.data, source)
