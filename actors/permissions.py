"""Whether a user can read a file, and if not, what blocks it and what would work.

Users chmod 777 their key folders when keyd cannot read a preloaded key (spec/lessons.md 1).
Both `aziotctl check` (for the uid aziotd runs as) and the daemon itself (when a read fails)
say which file or directory blocks, its owner and mode, the uid that must read it and an
ownership or mode that would work.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

import attrs

SEARCH, READ = 0o1, 0o4


@attrs.frozen
class Reader:
    uid: int
    gids: frozenset[int]
    # How the uid was found, completing "uid 996 (aziotks), ...".
    how: str

    @classmethod
    def this_process(cls) -> Reader:
        return cls(
            os.geteuid(),
            frozenset(os.getgroups()) | {os.getegid()},
            "the user aziotd runs as",
        )

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


def exposed(path: Path) -> str | None:
    """Why a private key file is open to every user on the device, or None.

    The usual leftover of `chmod -R 777` on a key folder: any local user can then copy the
    device's identity (other-read) or replace it (other-write on the file or its folder)."""
    try:
        file_mode = stat.S_IMODE(os.stat(path).st_mode)
        folder = os.stat(path.parent)
    except OSError:
        return None  # unreadable or missing: `unreadable` says so
    folder_mode = stat.S_IMODE(folder.st_mode)
    if file_mode & 0o006:
        can = "read and replace" if file_mode & 0o002 else "read"
        enough = 0o640 if file_mode & 0o040 else 0o600  # keep a group that reads it today
        return (
            f"{path} has mode {file_mode:04o}: every user on the device can {can} this private "
            f"key. For example `chmod {enough:04o} {path}`"
        )
    if folder_mode & 0o002 and not folder_mode & stat.S_ISVTX:
        return (
            f"{path.parent} has mode {folder_mode:04o}: every user on the device can replace "
            f"the private key {path.name} in it. For example `chmod o-w {path.parent}`"
        )
    return None
