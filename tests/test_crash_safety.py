"""SIGKILL during a stream of key writes, 50 times: nothing acknowledged is lost or torn.

The long version is `bench/crash_safety.py --cycles N`.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from tests.crash_harness import Model, new_keyd, run_cycle

CYCLES = 50


def test_acknowledged_writes_survive_sigkill(world_dir: Path) -> None:
    keyd = new_keyd(world_dir / "keyd")
    model = Model()
    rng = random.Random(20261123)
    operations: Counter[str] = Counter()
    failures = []
    keyd.start()
    try:
        for cycle in range(CYCLES):
            report = run_cycle(keyd, model, rng, max_wait=0.4)
            operations.update(report.operations)
            failures += [f"cycle {cycle}: {v}" for v in report.violations]
    finally:
        keyd.stop()
    print(f"{CYCLES} kills, {model.acknowledged} acknowledged writes, {dict(operations)}")
    assert not failures, "\n".join(failures[:20])
    # The run did exercise every kind of write, and kills landed mid-stream.
    assert model.acknowledged > 5 * CYCLES
    assert {"import", "generate", "create-pair", "move", "delete"} <= set(operations)
