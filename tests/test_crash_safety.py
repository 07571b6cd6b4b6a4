"""SIGKILL during a stream of key writes, 50 times on files and 25 on a SoftHSM token, and 30
times during cert imports, issuances and background renewals: nothing acknowledged is lost or
torn, and a renewed cert's key is keyd's once the restart's renewals have run.

The long version is `bench/crash_safety.py --cycles N [--token | --certs]`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.crash_harness import (
    MIN_WRITES,
    CertModel,
    Model,
    cert_log_counts,
    new_keyd,
    run_cert_cycle,
    run_cycle,
    start_cert_world,
)
from tests.daemon import Keyd
from tests.softhsm import make_softhsm_token, softhsm_available

WRITES = {"import", "generate", "create-pair", "move", "delete"}
CERT_WRITES = {"import-chain", "import-text", "issue", "issue-renewed", "delete"}


def survive(keyd: Keyd, cycles: int, seed: int) -> tuple[Model, Counter[str]]:
    model = Model()
    rng = random.Random(seed)
    operations: Counter[str] = Counter()
    failures = []
    keyd.start()
    try:
        for cycle in range(cycles):
            report = run_cycle(keyd, model, rng, max_wait=0.4)
            operations.update(report.operations)
            failures += [f"cycle {cycle}: {v}" for v in report.violations]
    finally:
        keyd.stop()
    print(f"{cycles} kills, {model.acknowledged} acknowledged writes, {dict(operations)}")
    assert not failures, "\n".join(failures[:20])
    return model, operations


def test_acknowledged_writes_survive_sigkill(world_dir: Path) -> None:
    model, operations = survive(new_keyd(world_dir / "keyd"), 50, 20261123)
    # The run did exercise every kind of write, and kills landed mid-stream.
    assert model.acknowledged >= MIN_WRITES * 50
    assert set(operations) >= WRITES


@pytest.mark.skipif(not softhsm_available(), reason="SoftHSM2 is not installed")
def test_acknowledged_token_writes_survive_sigkill(
    world_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", "")  # make_softhsm_token sets it; restored after
    token = make_softhsm_token(world_dir / "softhsm", label="crash")
    keyd = new_keyd(world_dir / "keyd", token)
    model, operations = survive(keyd, 25, 20261124)
    assert model.acknowledged >= MIN_WRITES * 25
    assert set(operations) >= WRITES
    # Everything went to the token: no key file was written.
    assert not keyd.keys_dir.exists() or not list(keyd.keys_dir.iterdir())


def survive_certs(
    root: Path, cycles: int, seed: int, race: bool = False
) -> tuple[CertModel, Counter[str], Counter[str]]:
    started = time.monotonic()
    world = start_cert_world(root)
    model = CertModel()
    rng = random.Random(seed)
    operations: Counter[str] = Counter()
    failures = []
    try:
        for cycle in range(cycles):
            report = run_cert_cycle(world, model, rng, max_wait=0.4, race=race)
            operations.update(report.operations)
            failures += [f"cycle {cycle}: {v}" for v in report.violations]
    finally:
        world.daemon.stop()
    background = cert_log_counts(world)
    print(
        f"{cycles} kills, {model.total} acknowledged cert writes {dict(model.acknowledged)}, "
        f"{dict(background)}, {time.monotonic() - started:.1f} s"
    )
    assert not failures, "\n".join(failures[:20])
    return model, operations, background


def test_acknowledged_cert_writes_survive_sigkill(world_dir: Path) -> None:
    cycles = 30
    model, operations, background = survive_certs(world_dir / "certd", cycles, 20261125)
    assert model.total >= MIN_WRITES * cycles
    assert set(operations) >= CERT_WRITES
    # Renewals ran in the background (after each issuance of a renewed id, and at each start).
    assert background["renewals"] >= cycles
    assert background["renewal failures"] == 0


def test_cert_writes_racing_a_renewal_survive_sigkill(world_dir: Path) -> None:
    # As above, but imports and deletions of a renewed id do not wait for its renewal.
    survive_certs(world_dir / "certd", 10, 20261126, race=True)
