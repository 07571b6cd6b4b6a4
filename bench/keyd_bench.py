"""keyd throughput, latency, memory and start time, as ratios to a ceiling measured in the run.

The ceiling (bench/ceiling_server.py) is bare trio sockets with httptools answering the same
HMAC sign request with nothing of ours in between; every figure is given as a ratio to it.

Run: .venv/bin/python bench/keyd_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import run  # noqa: E402
from tests import rawhttp  # noqa: E402
from tests.daemon import Keyd  # noqa: E402

VERSION = "2021-05-01"


def post(target: str, body: dict) -> bytes:
    return rawhttp.build("POST", target, body, headers={"host": "keyd.sock"})


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def first_answer_seconds(keyd: Keyd) -> float:
    launched = time.perf_counter()
    keyd.start(wait=False)
    while True:
        try:
            if rawhttp.request(keyd.socket, "GET", "/key/x").status == 400:
                return time.perf_counter() - launched
        except OSError:
            time.sleep(0.002)


def wait_for_socket(path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("baseline server did not start")
        time.sleep(0.05)
    time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per scenario")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aziot-bench-"))
    keyd = Keyd(work / "keyd", env={"AZIOT_LOG_LEVEL": "warn"}, top_config="max_requests = 64\n")
    started = first_answer_seconds(keyd)
    assert keyd.process is not None
    print(
        f"aziotd: first answer {started * 1000:.0f} ms after launch; "
        f"RSS after start {rss_mib(keyd.process.pid):.1f} MiB"
    )

    secret = base64.b64encode(b"k" * 32).decode()
    sym = keyd.call("POST", "/key", {"keyId": "bench-sym", "usage": "sign", "keyBytes": secret})
    pair = keyd.call("POST", "/keypair", {"keyId": "bench-ec", "preferredAlgorithms": "ec-p256"})
    message = base64.b64encode(b"m" * 64).decode()
    digest = base64.b64encode(b"d" * 32).decode()
    scenarios = {
        "HMAC-SHA256 sign": post(
            f"/sign?api-version={VERSION}",
            {
                "keyHandle": sym.json()["keyHandle"],
                "algorithm": "HMAC-SHA256",
                "parameters": {"message": message},
            },
        ),
        "ECDSA P-256 sign": post(
            f"/sign?api-version={VERSION}",
            {
                "keyHandle": pair.json()["keyHandle"],
                "algorithm": "ECDSA",
                "parameters": {"digest": digest},
            },
        ),
        "GET /key/{id}": rawhttp.build(
            "GET", f"/key/bench-sym?api-version={VERSION}", headers={"host": "keyd.sock"}
        ),
    }
    results = {}
    for name, request in scenarios.items():
        for connections in (1, 16):
            figures = run(keyd.socket, request, connections, args.seconds)
            results[f"aziotd {name}, {connections} conn"] = figures
            print(figures.line(f"aziotd {name}, {connections} conn"), flush=True)
    print(f"aziotd: RSS after load {rss_mib(keyd.process.pid):.1f} MiB")
    keyd.stop()

    socket_path = str(work / "ceiling.sock")
    ceiling = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ceiling_server.py"), socket_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_socket(socket_path, ceiling)
        for connections in (1, 16):
            figures = run(socket_path, scenarios["HMAC-SHA256 sign"], connections, args.seconds)
            print(figures.line(f"ceiling HMAC-SHA256 sign, {connections} conn"), flush=True)
            for name in scenarios:
                ratio = results[f"aziotd {name}, {connections} conn"].rate / figures.rate
                print(f"  aziotd {name}, {connections} conn / ceiling: {ratio:.2f}")
    finally:
        ceiling.terminate()
        ceiling.wait()
    print(json.dumps({k: round(v.rate) for k, v in results.items()}))


if __name__ == "__main__":
    main()
