"""SIGKILL during a stream of key writes, 50 times on files and 25 on a SoftHSM token: nothing
acknowledged is lost or torn.

The long version is `bench/crash_safety.py --cycles N [--token]`.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from tests.crash_harness import MIN_WRITES, Model, new_keyd, run_cycle
from tests.daemon import Keyd
from tests.softhsm import make_softhsm_token, softhsm_available

WRITES = {"import", "generate", "create-pair", "move", "delete"}


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
