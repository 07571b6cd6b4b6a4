"""Key files on disk: the shared file store (`aziot.actors.files`) as keyd uses it.

`<homedir>/keys/<alnum>-<sha256>.key`, passing the fault points `store.read`, `store.write` and
`store.fsync` (the names operators already use in `AZIOTD_FAULTS`).
"""

from __future__ import annotations

from pathlib import Path

from aziot.actors.files import FileStore, file_name
from aziot.bus.faults import Faults

__all__ = ["FileStore", "key_file_name", "key_store"]

EXTENSION = "key"
FAULT_POINTS = "store"


def key_file_name(key_id: str) -> str:
    return file_name(key_id, EXTENSION)


def key_store(keys_dir: Path | None, faults: Faults) -> FileStore:
    return FileStore(
        keys_dir,
        faults,
        extension=EXTENSION,
        points=FAULT_POINTS,
        contents="the keys and the handle-validation key",
        service_user="aziotks",
    )
