"""Files a service keeps on disk, shared by every service: the original's names, atomic writes,
private directories, and a cache of what was read and parsed.

keyd keeps `<homedir>/keys/<alnum>-<sha256>.key`, certd `<homedir>/certs/<alnum>-<sha256>.cer`:
the same naming, the same crash safety and the same refusal of a directory another user can
write to, so one `FileStore` serves both, told its extension and its fault points.

The cache is keyed by path and checked against the file's inode, size and mtime on every use,
so a file changed behind the daemon's back (an operator replacing a preloaded key or cert) is
re-read, while the common case, using the same file again, costs one stat() and no parsing. It
is bounded by bytes, least recently used first out: a device may hold more bytes than it has
memory to spare, and a caller allowed to import keys or certs chooses their size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from aziot.actors.permissions import Reader, unreadable
from aziot.bus.faults import Faults
from aziot.config.loader import ConfigError

from .offload import in_worker

log = logging.getLogger(__name__)

CACHE_BYTES = 4 << 20
CACHEABLE = 64 << 10  # real key and cert files are a few KiB; larger ones are read on each use
PARSED_COST = 4 << 10  # about what a parsed key or cert costs OpenSSL beside its file's bytes
_LARGE = 64 << 10  # a file this large is read in a worker thread


_PATH_CACHE_ENTRIES = 1024
_PATH_CACHE_ID_LENGTH = 255


def file_name(item_id: str, extension: str) -> str:
    """The original's file name for an id: its ASCII alphanumerics, then the SHA-256 of all of it
    (so ids differing only in other characters still get files of their own)."""
    alnum = "".join(c for c in item_id if c.isascii() and c.isalnum())
    return f"{alnum}-{hashlib.sha256(item_id.encode('utf-8')).hexdigest()}.{extension}"


class UnsafeDirectory(ConfigError):
    """A store directory (or the home directory holding it) can be changed by another user: a
    configuration problem, so the daemon exits 78 at once instead of restarting the service."""


def make_directories(
    path: Path, mode: int, parents_mode: int = 0o755, service_user: str | None = None
) -> None:
    """Create `path` with `mode`, and any missing parent with `parents_mode`, whatever the umask
    (under umask 0, mkdir -p would leave them 0777 and anyone could swap what is inside).
    A directory made inside one of `service_user`'s is given to it (see `inherited_owner`)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        wanted = mode if directory == path else parents_mode
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked by the caller
            os.mkdir(directory, wanted)
            os.chmod(directory, wanted)
            owner = inherited_owner(directory.parent, service_user)
            if owner is not None:
                os.chown(directory, *owner)


def inherited_owner(directory: Path, service_user: str | None) -> tuple[int, int] | None:
    """Who should own what root creates in `directory`: `service_user`, when it owns it.

    Installed, aziotd runs as root over directories the original keeps under its service users
    (`/var/lib/aziot/keyd` is aziotks's). Files and directories made there are given to that
    user, as the original's would be, so the original can take the device back and read them.
    That user owns the directory already and could replace anything in it: nothing is given
    that it did not have. Any other owner (a developer's checkout run with sudo) gets nothing."""
    if os.geteuid() != 0 or service_user is None:
        return None
    info = os.stat(directory)
    if info.st_uid == 0 or info.st_uid != _uid_of(service_user):
        return None
    return info.st_uid, info.st_gid


def _uid_of(user: str | None) -> int | None:
    if user is None:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def check_private_directory(path: Path, contents: str, service_user: str | None = None) -> None:
    """Refuse a directory that a user other than this one (or root) could write to; `contents`
    says what such a user could replace ("the keys and the handle-validation key").

    `service_user` is the original's user for this service (`aziotks`, ...): installed as a
    system service, aziotd runs as root over the state the original keeps under those users,
    so a directory they own is the service's own, not another user's."""
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory (mode {stat.filemode(info.st_mode)})")
    trusted = {0, os.geteuid()}
    if os.geteuid() == 0 and (service_uid := _uid_of(service_user)) is not None:
        trusted.add(service_uid)
    if info.st_uid not in trusted:
        also = f" nor to {service_user}" if service_user and os.geteuid() == 0 else ""
        raise UnsafeDirectory(
            f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}){also}; "
            f"it could replace {contents}"
        )
    if mode & 0o022:
        raise UnsafeDirectory(
            f"{path} has mode {mode:04o}: users other than its owner can write to it and could "
            f"replace {contents} (chmod go-w {path})"
        )


def write_atomic(
    path: Path,
    data: bytes,
    faults: Faults,
    points: str,
    mode: int = 0o600,
    service_user: str | None = None,
) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix.
    `points` names the fault points passed (`<points>.write`, `<points>.fsync`); the file is
    `service_user`'s when the directory is (see `inherited_owner`)."""
    directory = path.parent
    # A short name: the file name itself may already be at the 255-byte limit.
    fd, temp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        owner = inherited_owner(directory, service_user)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as file:
            faults.hit_blocking(f"{points}.write")
            file.write(data)
            file.flush()
            faults.hit_blocking(f"{points}.fsync")
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define
class _Cached:
    signature: tuple[int, int, int]
    data: bytes
    parsed: dict[str, Any] = attrs.field(factory=dict)

    @property
    def cost(self) -> int:
        return len(self.data) + PARSED_COST * len(self.parsed) + 200


class FileStore:
    """Reads, writes, renames and deletes the files of one store directory; owned by one actor.

    `extension` is the files' (`key`, `cer`), `points` the prefix of the fault points it passes
    (`<points>.read`, `.write`, `.fsync`), `contents` what the files are, for the message that
    refuses an unsafe directory. `directory` is None when the service has no homedir.
    """

    def __init__(
        self,
        directory: Path | None,
        faults: Faults,
        *,
        extension: str,
        points: str,
        contents: str,
        service_user: str | None = None,
        private: bool = True,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.directory = directory
        self._private = private  # advice for an unreadable file never makes it world-readable
        self._service_user = service_user
        self.extension = extension
        self._faults = faults
        self._points = points
        self._contents = contents
        self._cache_limit = cache_bytes
        self._cache: OrderedDict[Path, _Cached] = OrderedDict()
        self._cached_bytes = 0
        # Each request names its id: hashing it to a file name every time costs more than
        # the file's stat. Short ids only, and a bounded count, so callers cannot grow it.
        self._paths: dict[str, Path] = {}

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def prepare(self) -> None:
        """Create the store directory (and the home directory) 0700, refuse them if another user
        can write to them, and sweep temp files that a crash mid-write left behind."""
        if self.directory is None:
            return
        make_directories(self.directory.parent, 0o700, service_user=self._service_user)
        make_directories(self.directory, 0o700, service_user=self._service_user)
        check_private_directory(self.directory.parent, self._contents, self._service_user)
        check_private_directory(self.directory, self._contents, self._service_user)
        for stale in self.directory.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted write", stale)
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def path_of(self, item_id: str) -> Path | None:
        """Where `item_id` lives in the store; None when the service has no homedir."""
        if self.directory is None:
            return None
        path = self._paths.get(item_id)
        if path is None:
            path = self.directory / file_name(item_id, self.extension)
            if len(item_id) <= _PATH_CACHE_ID_LENGTH:
                if len(self._paths) >= _PATH_CACHE_ENTRIES:
                    del self._paths[next(iter(self._paths))]  # the oldest
                self._paths[item_id] = path
        return path

    async def read(self, path: Path) -> bytes | None:
        entry = await self._entry(path)
        return None if entry is None else entry.data

    async def parsed(
        self, path: Path, kind: str, parse: Callable[[bytes], Any]
    ) -> tuple[bytes, Any] | None:
        """The file's bytes and `parse(bytes)`, parsed once per version of the file."""
        entry = await self._entry(path)
        if entry is None:
            return None
        if kind not in entry.parsed:
            # Parsing checks what it reads (an RSA key's primes, for one): off the loop.
            parsed = await in_worker(parse, entry.data)
            if self._cache.get(path) is entry:
                self._cached_bytes -= entry.cost
                entry.parsed[kind] = parsed
                self._cached_bytes += entry.cost
                self._trim()
            else:
                entry.parsed[kind] = parsed
        return entry.data, entry.parsed[kind]

    async def _entry(self, path: Path) -> _Cached | None:
        await self._faults.hit(f"{self._points}.read")
        try:
            info = os.stat(path)
        except FileNotFoundError:
            self._forget(path)
            return None
        except PermissionError:
            raise self._unreadable(path) from None
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        entry = self._cache.get(path)
        if entry is not None and entry.signature == signature:
            self._cache.move_to_end(path)
            return entry
        self._forget(path)
        try:
            if info.st_size < _LARGE:
                data = path.read_bytes()
            else:
                data = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise self._unreadable(path) from None
        entry = _Cached(signature, data)
        if len(data) <= CACHEABLE:
            self._cache[path] = entry
            self._cached_bytes += entry.cost
            self._trim()
        return entry

    def _unreadable(self, path: Path) -> PermissionError:
        """The refusal with what blocks and what would work, for the log (spec/lessons.md 1)."""
        why = unreadable(path, Reader.this_process(), private=self._private)
        return PermissionError(why or f"{path}: permission denied")

    def _forget(self, path: Path) -> None:
        entry = self._cache.pop(path, None)
        if entry is not None:
            self._cached_bytes -= entry.cost

    def _trim(self) -> None:
        while self._cached_bytes > self._cache_limit and self._cache:
            _, oldest = self._cache.popitem(last=False)
            self._cached_bytes -= oldest.cost

    async def write(self, path: Path, data: bytes) -> None:
        self._forget(path)
        make_directories(path.parent, 0o700, service_user=self._service_user)
        await trio.to_thread.run_sync(
            partial(
                write_atomic,
                path,
                data,
                self._faults,
                self._points,
                service_user=self._service_user,
            )
        )
        self._forget(path)

    async def remove(self, path: Path) -> None:
        self._forget(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            await trio.to_thread.run_sync(fsync_directory, path.parent)

    async def rename(self, source: Path, destination: Path) -> None:
        self._forget(source)
        self._forget(destination)
        os.replace(source, destination)
        await trio.to_thread.run_sync(fsync_directory, destination.parent)
