"""Who must read a preloaded key or cert (whether they can, and what blocks them, is
`aziot.actors.permissions.unreadable`, which the daemon also uses when a read fails).

The reader is the running aziotd's uid (from its pid file and /proc); without a running daemon,
the original's service user (`aziotks` for keys, `aziotcs` for certs); failing both, the current
user, and the message says so.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from aziot.actors.permissions import Reader, unreadable

from ..layout import SERVICE_USERS, Layout


def _daemon_ids(layout: Layout) -> tuple[int, int, frozenset[int], int] | None:
    """(effective uid, effective gid, groups, pid) of the aziotd named by the pid file, if alive."""
    try:
        pid = int(layout.pid_file.read_text().strip())
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        uid = int(fields["Uid"].split()[1])
        gid = int(fields["Gid"].split()[1])
        groups = frozenset(int(g) for g in fields.get("Groups", "").split())
    except (KeyError, IndexError, ValueError):
        return None
    return uid, gid, groups | {gid}, pid


def reader_for(layout: Layout, service: str) -> Reader:
    """Who reads `service`'s files (service is "keyd" or "certd")."""
    ids = _daemon_ids(layout)
    if ids is not None:
        uid, _gid, gids, pid = ids
        return Reader(uid, gids, f"the user aziotd (pid {pid}) runs as")
    user_name = SERVICE_USERS[service]
    try:
        user = pwd.getpwnam(user_name)
    except KeyError:
        uid = os.geteuid()
        return Reader(
            uid,
            frozenset(os.getgroups()) | {os.getegid()},
            f"the current user: aziotd is not running ({layout.pid_file} names no live process) "
            f"and there is no user {user_name}, so which user {service} runs as is unknown",
        )
    gids = frozenset(os.getgrouplist(user_name, user.pw_gid))
    return Reader(
        user.pw_uid, gids, f"the {service} service user (aziotd is not running to ask it)"
    )


__all__ = ["Reader", "reader_for", "unreadable"]
