"""The long crash-safety run: SIGKILL aziotd N times during key writes, check after each.

Run: .venv/bin/python bench/crash_safety.py [--cycles 500] [--max-wait 0.5] [--seed N]
                                           [--token | --certs [--race]]
With --token the keys live on a fresh SoftHSM2 token (keyd's base slot) instead of in files.
With --certs the stream is certd's instead: cert imports, issuances by a local CA, deletions,
and the renewals (with key rotation in keyd) that follow each issuance and each restart; with
--race as well, imports and deletions do not wait for a renewal of the same cert to end.
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

from tests.crash_harness import (  # noqa: E402
    CertModel,
    CycleReport,
    Model,
    cert_log_counts,
    new_keyd,
    run_cert_cycle,
    run_cycle,
    start_cert_world,
)
from tests.softhsm import make_softhsm_token  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=500, help="kills to survive")
    parser.add_argument("--max-wait", type=float, default=0.5, help="longest run before a kill")
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--token", action="store_true", help="keep the keys on SoftHSM2")
    kind.add_argument("--certs", action="store_true", help="stream certd's writes instead")
    parser.add_argument(
        "--race",
        action="store_true",
        help="with --certs: imports and deletions do not wait for a renewal of their cert",
    )
    args = parser.parse_args()
    if args.race and not args.certs:
        parser.error("--race goes with --certs")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="aziot-crash-"))
    print(f"daemon and its log under {root}", flush=True)
    operations: Counter[str] = Counter()
    violations: list[str] = []
    started = time.monotonic()
    if args.certs:
        world = start_cert_world(root / "certd")
        daemon = world.daemon
        cert_model = CertModel()

        def cycle_once() -> CycleReport:
            return run_cert_cycle(world, cert_model, rng, args.max_wait, args.race)

        def acknowledged() -> int:
            return cert_model.total
    else:
        token = make_softhsm_token(root / "softhsm", label="crash") if args.token else None
        daemon = new_keyd(root / "keyd", token)
        model = Model()
        daemon.start()

        def cycle_once() -> CycleReport:
            return run_cycle(daemon, model, rng, args.max_wait)

        def acknowledged() -> int:
            return model.acknowledged

    try:
        for cycle in range(1, args.cycles + 1):
            report = cycle_once()
            operations.update(report.operations)
            violations += [f"cycle {cycle}: {v}" for v in report.violations]
            if cycle % 25 == 0:
                print(
                    f"{cycle} kills survived, {acknowledged()} acknowledged writes, "
                    f"{len(violations)} violations, {time.monotonic() - started:.0f} s",
                    flush=True,
                )
    finally:
        daemon.stop()
    print(f"seed {seed}: {args.cycles} kills, {acknowledged()} acknowledged writes")
    print(f"writes by kind: {dict(sorted(operations.items()))}")
    if args.certs:
        print(f"in the background: {dict(cert_log_counts(world))}")
    print(f"violations: {len(violations)}")
    for line in violations[:50]:
        print(f"  {line}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
