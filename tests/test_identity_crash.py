"""SIGKILL during identityd's writes: module creations, updates, reads and deletions, and a
reprovisioning, against mockcloud's DPS and IoT Hub; about 20 kills (some during the restart's
own provisioning and reconciliation), each followed by the checks of tests/identity_crash.py.

The long version is `bench/identity_crash.py --cycles N`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from mockcloud.cloud import Cloud
from tests.crash_harness import MIN_WRITES
from tests.identity_crash import (
    IdentityModel,
    LeftoverTempFiles,
    RunSummary,
    run_identity_cycle,
    start_identity_world,
)

CYCLES = 15
REPROVISION_CYCLE = 5  # the one cycle whose kill is aimed inside a reprovisioning
SEED = 20261130


def test_identity_writes_survive_sigkill(world_dir: Path) -> None:
    started = time.monotonic()
    summary = RunSummary()
    model = IdentityModel()
    rng = random.Random(SEED)
    with Cloud(world_dir / "cloud") as cloud:
        world = start_identity_world(world_dir / "identityd", cloud)
        try:
            for cycle in range(CYCLES):
                report = run_identity_cycle(
                    world,
                    model,
                    rng,
                    max_wait=0.4,
                    start_kills=0.35,
                    reprovision=cycle == REPROVISION_CYCLE,
                )
                summary.add(cycle, report)
        finally:
            world.stop()
    print(
        f"{summary.kills} kills in {summary.cycles} cycles, {model.total} acknowledged "
        f"{dict(model.acknowledged)}, {dict(summary.operations)}, {dict(summary.notes)}, "
        f"{len(summary.leftovers)} temp files left, {time.monotonic() - started:.1f} s"
    )
    assert not summary.violations, "\n".join(summary.violations[:20])
    # The run did exercise every kind of write, and kills landed mid-stream.
    assert summary.kills >= 18
    assert model.total >= MIN_WRITES * CYCLES
    assert {"create", "update", "read", "delete"} <= set(summary.operations)
    assert any(note.startswith("kills aimed at a reprovisioning") for note in summary.notes)
    if summary.leftovers:
        raise LeftoverTempFiles("\n".join(summary.leftover_lines()))
