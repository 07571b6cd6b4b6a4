"""Who must read a preloaded key or cert, and whether the file's modes let them.

Users chmod 777 their key folders when keyd cannot read a preloaded key (spec/lessons.md 1), so
a refusal here names the file or the directory that blocks, its owner and mode, the uid that
must read it and an ownership or mode that would work.

The reader is the running aziotd's uid (from its pid file and /proc); without a running daemon,
the original's service user (`aziotks` for keys, `aziotcs` for certs); failing both, the current
user, and the message says so.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

import attrs

from ..layout import SERVICE_USERS, Layout

SEARCH, READ = 0o1, 0o4


@attrs.frozen
class Reader:
    uid: int
    gids: frozenset[int]
    # How the uid was found, completing "uid 996 (aziotks), ...".
    how: str

    def describe(self) -> str:
        return f"uid {self.uid}{_user_suffix(self.uid)}, {self.how}"


def _user_suffix(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


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


def _allows(st: os.stat_result, reader: Reader, bits: int) -> bool:
    # The kernel picks one class (owner, else group, else other) and uses only its bits.
    if reader.uid == 0:
        return True
    if st.st_uid == reader.uid:
        return (st.st_mode >> 6) & bits == bits
    if st.st_gid in reader.gids:
        return (st.st_mode >> 3) & bits == bits
    return st.st_mode & bits == bits


def _owned(st: os.stat_result) -> str:
    return (
        f"owner {_user_name(st.st_uid)}:{_group_name(st.st_gid)} "
        f"(uid {st.st_uid}, gid {st.st_gid}), mode {stat.S_IMODE(st.st_mode):04o}"
    )


def _directories(path: Path) -> list[Path]:
    """Every directory the kernel walks to reach `path`, as written and after symlinks."""
    chain = list(reversed(path.parents))
    resolved = path.resolve()
    if resolved != path:
        chain += [d for d in reversed(resolved.parents) if d not in chain]
    return chain


def unreadable(path: Path, reader: Reader, *, private: bool) -> str | None:
    """Why `reader` cannot read `path`, or None when it can. `private` keys are never made
    world-readable in the advice."""
    try:
        file_st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError as error:
        return (
            f"could not stat {path} as uid {os.geteuid()}: {error.strerror}; "
            "run `aziotctl check` as root to check it"
        )
    who = reader.describe()
    for directory in _directories(path):
        try:
            st = os.stat(directory)
        except OSError as error:
            return f"could not stat {directory}: {error.strerror}"
        if not _allows(st, reader, SEARCH):
            return (
                f"{path} cannot be reached by {who}: its parent directory {directory} "
                f"({_owned(st)}) does not let that uid search it (x). "
                f"For example `chmod o+x {directory}` (search only, no listing)"
                + (
                    f", or `chgrp {_group_name(next(iter(sorted(reader.gids))))} {directory}` "
                    f"and `chmod g+x {directory}`"
                    if reader.gids
                    else ""
                )
            )
    if _allows(file_st, reader, READ):
        return None
    mode = stat.S_IMODE(file_st.st_mode)
    owner_mode = mode | 0o400
    advice = [f"`chown {_user_name(reader.uid)} {path}` with mode {owner_mode:04o}"]
    other_gids = sorted(reader.gids - {0})
    if other_gids:
        group_mode = (mode | 0o040) & ~0o007 if private else mode | 0o040
        advice.append(f"`chgrp {_group_name(other_gids[0])} {path}` with mode {group_mode:04o}")
    if not private:
        advice.append(f"mode {mode | 0o444:04o} (a certificate is public)")
    return f"{path} is not readable by {who}: {_owned(file_st)}. For example {' or '.join(advice)}"
