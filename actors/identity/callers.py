"""Who is calling identityd, and what each caller may do (spec/api.md §2.3).

A caller is known by uid only. A `[[principal]]` with `idtype` is a host process that may read
its own identity; the first principal without `idtype` is the daemon (IoT Edge's runtime), which
may manage every module; uid 0 without a principal is local root, which may do the same; anyone
else only reads the trust bundle. A principal for uid 0 makes root a restricted host process,
as in the original.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Any

import attrs

log = logging.getLogger(__name__)


class Kind(enum.Enum):
    LOCAL_ROOT = "local root"
    DAEMON = "daemon"
    HOST_PROCESS = "host process"
    UNKNOWN = "unknown"


@attrs.frozen
class Caller:
    kind: Kind
    name: str | None = None
    idtype: tuple[str, ...] = ()

    @property
    def manages(self) -> bool:
        """Root and the daemon: list, create, update, delete modules; reprovision."""
        return self.kind in (Kind.LOCAL_ROOT, Kind.DAEMON)

    @property
    def gets_device(self) -> bool:
        return self.manages or (self.kind is Kind.HOST_PROCESS and "device" in self.idtype)

    def gets_module(self, module_id: str) -> bool:
        if self.manages:
            return True
        return (
            self.kind is Kind.HOST_PROCESS
            and self.name == module_id
            and ("module" in self.idtype or "local" in self.idtype)
        )


class Callers:
    """The principal table, built as the original builds it."""

    def __init__(self, principals: Iterable[Any]) -> None:
        table: dict[int, Caller] = {}
        daemon_seen = False
        for principal in principals:
            if principal.idtype is None:
                if daemon_seen:
                    log.warning(
                        "principal %s (uid %d) has no idtype, but only one such principal "
                        "(the daemon) is allowed; it is ignored",
                        principal.name,
                        principal.uid,
                    )
                    continue
                daemon_seen = True
                table[principal.uid] = Caller(Kind.DAEMON, principal.name)
            else:
                table[principal.uid] = Caller(
                    Kind.HOST_PROCESS, principal.name, tuple(principal.idtype)
                )
        self._table = table

    def of(self, uid: int | None) -> Caller:
        """Requests from other services of this daemon (uid None) act as local root."""
        if uid is None:
            return Caller(Kind.LOCAL_ROOT)
        found = self._table.get(uid)
        if found is not None:
            return found
        return Caller(Kind.LOCAL_ROOT) if uid == 0 else Caller(Kind.UNKNOWN)
