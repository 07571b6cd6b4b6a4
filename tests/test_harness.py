"""The daemon harness (tests/daemon.py): any set of services in one aziotd, each from its own
config snippet, one socket dir, ready when every socket answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from aziot.actors.keys.store import key_file_name
from aziot.supervisor.services import SERVICES
from tests.daemon import MINIMAL_CONFIGS, Daemon, keyd_config


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process is not None:
            daemon.stop()


def test_keyd_alone_serves_its_socket_and_no_other(world_dir: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(world_dir / "d", {"keyd": keyd_config})
    daemons.append(daemon.start())
    keyd = daemon.services["keyd"]
    assert keyd.config == world_dir / "d" / "keyd" / "config.toml"
    assert daemon.serving() == {"keyd": world_dir / "d" / "run" / "keyd.sock"}
    assert re.search(r"ready in \d+ ms: keyd$", daemon.logs(), re.MULTILINE), daemon.logs()

    reply = daemon.request("keyd", "POST", "/key", {"keyId": "sym", "usage": "sign"})
    assert reply.status == 200, reply.body
    assert (keyd.home / "keys" / key_file_name("sym")).is_file()
    assert daemon.stop() == 0
    assert daemon.serving() == {}


def test_a_config_d_snippet_reaches_its_service(world_dir: Path) -> None:
    daemon = Daemon(
        world_dir / "d",
        {"keyd": keyd_config},
        config_d={"keyd": {"50-typo.toml": '[aziot_keys]\npkcs11_bogus = "x"\n'}},
    )
    daemon.start(wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(30) == 78
    daemon.process = None
    assert "unknown [aziot_keys] names pkcs11_bogus" in daemon.logs()


def test_every_declared_service_starts_beside_the_others(
    world_dir: Path, daemons: list[Daemon]
) -> None:
    # A service added to SERVICES adds its least config to MINIMAL_CONFIGS, and then runs here
    # beside every other one in a single aziotd.
    assert set(MINIMAL_CONFIGS) == set(SERVICES)
    daemon = Daemon(world_dir / "all", MINIMAL_CONFIGS)
    daemons.append(daemon.start())
    assert set(daemon.serving()) == set(SERVICES)
