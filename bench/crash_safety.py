"""The long crash-safety run: SIGKILL aziotd N times during key writes, check after each.

Run: .venv/bin/python bench/crash_safety.py [--cycles 500] [--max-wait 0.5] [--seed N] [--token]
With --token the keys live on a fresh SoftHSM2 token (keyd's base slot) instead of in files.
Prints a line every 25 cycles and a summary; exits 1 if any acknowledged write was lost or torn.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.crash_harness import Model, new_keyd, run_cycle  # noqa: E402
from tests.softhsm import make_softhsm_token  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=500, help="kills to survive")
    parser.add_argument("--max-wait", type=float, default=0.5, help="longest run before a kill")
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    parser.add_argument("--token", action="store_true", help="keep the keys on SoftHSM2")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="aziot-crash-"))
    token = make_softhsm_token(root / "softhsm", label="crash") if args.token else None
    keyd = new_keyd(root / "keyd", token)
    print(f"daemon and its log under {root}", flush=True)
    model = Model()
    operations: Counter[str] = Counter()
    violations: list[str] = []
    started = time.monotonic()
    keyd.start()
    try:
        for cycle in range(1, args.cycles + 1):
            report = run_cycle(keyd, model, rng, args.max_wait)
            operations.update(report.operations)
            violations += [f"cycle {cycle}: {v}" for v in report.violations]
            if cycle % 25 == 0:
                print(
                    f"{cycle} kills survived, {model.acknowledged} acknowledged writes, "
                    f"{len(violations)} violations, {time.monotonic() - started:.0f} s",
                    flush=True,
                )
    finally:
        keyd.stop()
    print(f"seed {seed}: {args.cycles} kills, {model.acknowledged} acknowledged writes")
    print(f"writes by kind: {dict(sorted(operations.items()))}")
    print(f"violations: {len(violations)}")
    for line in violations[:50]:
        print(f"  {line}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
