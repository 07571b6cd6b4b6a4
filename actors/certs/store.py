"""Where each cert id lives: a preloaded file, a bundle of other ids, or the store directory.

As the original (spec/api.md §4.2): `[preloaded_certs]` maps an id to a `file://` path, which
reads, imports and deletes then use directly, or to a list of ids, read as the concatenation of
its members that exist; writing or deleting a list id fails. Every other id is
`<homedir>/certs/<alnum>-<sha256>.cer`. The original recurses into nested lists without a cycle
check (a loop overflows its stack); here a member already being read is skipped.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from aziot.actors.files import FileStore
from aziot.bus.errors import internal
from aziot.bus.faults import Faults


def preloaded_path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


class CertStore:
    """Reads and atomically writes PEM files by cert id; owned by the certs actor."""

    def __init__(
        self, homedir: Path, preloaded: dict[str, str | list[str]], faults: Faults
    ) -> None:
        self.files = FileStore(
            homedir / "certs",
            faults,
            extension="cer",
            points="certs.store",
            contents="the certificates",
            service_user="aziotcs",
            private=False,  # certificates are public: the advice may say world-readable
        )
        self.preloaded = preloaded

    def prepare(self) -> None:
        self.files.prepare()

    def path_of(self, cert_id: str) -> Path:
        """The file behind a single-cert id; a bundle id has none (an internal error)."""
        entry = self.preloaded.get(cert_id)
        if isinstance(entry, list):
            raise internal(f"preloaded cert {cert_id!r} is a list of IDs, not a single URI")
        if entry is not None:
            return preloaded_path(entry)
        path = self.files.path_of(cert_id)
        assert path is not None
        return path

    async def read(self, cert_id: str, _reading: frozenset[str] = frozenset()) -> bytes | None:
        entry = self.preloaded.get(cert_id)
        if not isinstance(entry, list):
            try:
                return await self.files.read(self.path_of(cert_id))
            except (IsADirectoryError, PermissionError, OSError) as error:
                raise internal(f"could not read cert file for {cert_id!r}: {error}") from None
        reading = _reading | {cert_id}
        parts = []
        for member in entry:
            if member in reading:
                continue
            data = await self.read(member, reading)
            if data is not None:
                parts.append(data)
        return b"".join(parts) or None

    async def write(self, cert_id: str, data: bytes) -> None:
        path = self.path_of(cert_id)
        try:
            await self.files.write(path, data)
        except OSError as error:
            raise internal(f"could not write cert file {path}: {error}") from None

    async def remove(self, cert_id: str) -> None:
        path = self.path_of(cert_id)
        try:
            await self.files.remove(path)
        except OSError as error:
            raise internal(f"could not delete cert file {path}: {error}") from None
