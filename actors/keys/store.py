"""Key files on disk: the original's names, atomic writes, and a cache of parsed keys.

The cache is keyed by path and checked against the file's inode, size and mtime on every use,
so a file changed behind the daemon's back (an operator replacing a preloaded key) is re-read,
while the common case, signing again with the same key, costs one stat() and no parsing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import attrs
import trio

from bus.faults import Faults

log = logging.getLogger(__name__)


def key_file_name(key_id: str) -> str:
    alnum = "".join(c for c in key_id if c.isascii() and c.isalnum())
    return f"{alnum}-{hashlib.sha256(key_id.encode('utf-8')).hexdigest()}.key"


@attrs.define
class _Cached:
    signature: tuple[int, int, int]
    data: bytes
    parsed: dict[str, Any] = attrs.field(factory=dict)


def write_atomic(path: Path, data: bytes, faults: Faults, mode: int = 0o600) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix."""
    directory = path.parent
    # A short name: the key file name itself may already be at the 255-byte limit.
    fd, temp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            faults.hit_blocking("store.write")
            file.write(data)
            file.flush()
            faults.hit_blocking("store.fsync")
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


class FileStore:
    """Reads, writes, renames and deletes key files; owned by the keys actor."""

    def __init__(self, keys_dir: Path | None, faults: Faults) -> None:
        self.keys_dir = keys_dir
        self._faults = faults
        self._cache: dict[Path, _Cached] = {}

    def prepare(self) -> None:
        """Create the keys directory and sweep temp files that a crash mid-write left behind."""
        if self.keys_dir is None:
            return
        self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in self.keys_dir.glob(".*.tmp"):
            log.info("removing %s, left by an interrupted write", stale)
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def path_of(self, key_id: str) -> Path | None:
        """Where `key_id` lives in the keys dir; None when keyd has no homedir."""
        return None if self.keys_dir is None else self.keys_dir / key_file_name(key_id)

    async def read(self, path: Path) -> bytes | None:
        entry = await self._entry(path)
        return None if entry is None else entry.data

    async def parsed(self, path: Path, kind: str, parse: Any) -> tuple[bytes, Any] | None:
        """The file's bytes and `parse(bytes)`, parsed once per version of the file."""
        entry = await self._entry(path)
        if entry is None:
            return None
        if kind not in entry.parsed:
            entry.parsed[kind] = parse(entry.data)
        return entry.data, entry.parsed[kind]

    async def _entry(self, path: Path) -> _Cached | None:
        await self._faults.hit("store.read")
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(path, None)
            return None
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        entry = self._cache.get(path)
        if entry is not None and entry.signature == signature:
            return entry
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        entry = self._cache[path] = _Cached(signature, data)
        return entry

    async def write(self, path: Path, data: bytes) -> None:
        self._cache.pop(path, None)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await trio.to_thread.run_sync(write_atomic, path, data, self._faults)
        self._cache.pop(path, None)

    async def remove(self, path: Path) -> None:
        self._cache.pop(path, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            await trio.to_thread.run_sync(fsync_directory, path.parent)

    async def rename(self, source: Path, destination: Path) -> None:
        self._cache.pop(source, None)
        self._cache.pop(destination, None)
        os.replace(source, destination)
        await trio.to_thread.run_sync(fsync_directory, destination.parent)
