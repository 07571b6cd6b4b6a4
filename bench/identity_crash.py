"""The long identityd crash-safety run: SIGKILL aziotd (keyd + identityd, against mockcloud's
DPS and IoT Hub) N times during module creations, updates, reads, deletions and
reprovisionings, and check after each kill and restart (see tests/identity_crash.py).

Run: .venv/bin/python bench/identity_crash.py [--cycles 200] [--max-wait 0.5] [--seed N]
                                             [--reprovision-every 8] [--start-kills 0.3]
Every DPS registration waits the original's 5 s before its first status poll: a cycle that
reprovisions, or restarts without `device_info`, costs 5 to 15 s more than the others (~2 s).
Prints a line every 10 cycles and a summary; exits 1 if a check failed (temp files left after
a start, which identityd does not sweep, are listed apart and do not fail the run).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mockcloud.cloud import Cloud  # noqa: E402
from tests.identity_crash import (  # noqa: E402
    IdentityModel,
    RunSummary,
    run_identity_cycle,
    start_identity_world,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=200, help="cycles to run")
    parser.add_argument("--max-wait", type=float, default=0.5, help="longest run before a kill")
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    parser.add_argument(
        "--reprovision-every",
        type=int,
        default=8,
        help="aim one cycle in N at a reprovisioning (0: never)",
    )
    parser.add_argument(
        "--reprovision-rate",
        type=float,
        default=0.02,
        help="chance that any request of the stream is a reprovisioning",
    )
    parser.add_argument(
        "--start-kills", type=float, default=0.3, help="chance of a second kill during a start"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="aziot-identity-crash-"))
    print(f"seed {seed}; daemon, cloud and log under {root}", flush=True)
    summary = RunSummary()
    model = IdentityModel()
    started = time.monotonic()
    with Cloud(root / "cloud") as cloud:
        world = start_identity_world(root / "identityd", cloud)
        try:
            for cycle in range(1, args.cycles + 1):
                every = args.reprovision_every
                report = run_identity_cycle(
                    world,
                    model,
                    rng,
                    args.max_wait,
                    start_kills=args.start_kills,
                    reprovision=every > 0 and cycle % every == 0,
                    reprovision_rate=args.reprovision_rate,
                    register_twice=True,
                )
                summary.add(cycle, report)
                for line in report.violations:
                    print(f"  cycle {cycle}: {line}", flush=True)
                if cycle % 10 == 0:
                    print(
                        f"{cycle} cycles, {summary.kills} kills, {model.total} acknowledged, "
                        f"{len(summary.violations)} violations, {len(summary.leftovers)} temp "
                        f"files left, {time.monotonic() - started:.0f} s",
                        flush=True,
                    )
        finally:
            world.stop()
    print(f"seed {seed}: {summary.kills} kills in {summary.cycles} cycles, {model.total} acked")
    print(f"acknowledged by kind: {dict(sorted(model.acknowledged.items()))}")
    print(f"requests by kind: {dict(sorted(summary.operations.items()))}")
    print(f"observed: {dict(sorted(summary.notes.items()))}")
    print(f"temp files left after a start: {len(summary.leftovers)}")
    for line in summary.leftover_lines()[:20]:
        print(f"  {line}")
    print(f"violations: {len(summary.violations)}")
    for line in summary.violations[:50]:
        print(f"  {line}")
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
