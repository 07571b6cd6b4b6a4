from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Keyd


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temp dir other uids can enter (pytest's tmp_path is 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="aziot-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keyd(world_dir: Path) -> Iterator[Keyd]:
    daemon = Keyd(world_dir / "keyd").start()
    yield daemon
    if daemon.process is not None:
        daemon.stop()
