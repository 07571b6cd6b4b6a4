"""The files aziotd keeps beside its sockets for aziotctl, named once for both sides."""

from __future__ import annotations

import os
from pathlib import Path

PID_FILE = "aziotd.pid"  # written once aziotd is ready, removed at stop
LOG_LEVEL_FILE = "aziotd.log-level"  # written by `aziotctl system set-log-level`, read on SIGHUP


def replace_text(path: Path, text: str) -> None:
    """`text` in `path` (mode 0644) through a temp file and a rename: a reader sees the old
    file or the whole new one. Raises OSError, with the temp file gone."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        temp.write_text(text)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
