"""certd throughput, latency and memory, as ratios to a ceiling measured in the same run.

One aziotd serves keyd and certd from a temp dir (keys in files). A local CA is made the way the
tests make it (tests/test_certd.py `issue_local_ca`: a CSR signed through keyd with the key pair
`local-ca`, self-signed by certd), then, at 1 and 16 keep-alive connections:

- `GET /certificates/{id}` of a stored cert (a leaf and the CA, as certd stores an issued chain);
- `POST /certificates` issuing by the local CA (`method = "local_ca"`) from P-256 CSRs: a few
  CSRs made up front with keyd keys, each for its own cert id, sent in turn, so the same few
  cert files are written over and over.

Every answer's status is checked (200 for GET, 201 for POST); others are counted as errors.
The ceiling (bench/ceiling_server.py) is bare trio sockets with httptools, nothing of ours in
between: its GET answers a fixed body, its POST an HMAC, so the POST ratio says how far issuing
a cert is from the bare server, not from another issuer. The original's figures, measured on
this machine class, are printed for reference. Figures on a shared machine are noisy.

Run: .venv/bin/python bench/certd_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402

from bench import load  # noqa: E402
from bench.load import Figures  # noqa: E402
from tests import rawhttp  # noqa: E402
from tests.certd_world import KeydEcKey, certs_of, make_csr  # noqa: E402
from tests.daemon import API_VERSIONS, Daemon, keyd_config  # noqa: E402

VERSION = API_VERSIONS["certd"]
CSRS = 4  # pre-made CSRs, one cert id each
# The original (Rust aziot-certd), on this machine class: GET /certificates/{id} req/s.
ORIGINAL_GET = {1: 26_678, 16: 32_193}
ORIGINAL_POST: dict[int, int] = {}  # not measured for the original


def certd_config(home: Path) -> str:
    issued = "".join(
        f'bench-{i} = {{ method = "local_ca", expiry_days = 30 }}\n' for i in range(CSRS)
    )
    return (
        "max_requests = 64\n"
        f'homedir_path = "{home}"\n'
        "[cert_issuance]\n"
        'local_ca = { cert = "local-ca", pk = "local-ca" }\n'
        'local-ca = { method = "self_signed", expiry_days = 365, common_name = "Bench CA" }\n'
        'bench-get = { method = "local_ca", expiry_days = 30 }\n'
        f"{issued}"
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def rss_line(pid: int) -> str:
    own = rss_mib(pid)
    kids = children(pid)
    if not kids:
        return f"{own:.1f} MiB"
    total = own + sum(rss_mib(kid) for kid in kids)
    return f"{own:.1f} MiB (with {len(kids)} child processes {total:.1f} MiB)"


def run(
    path: str,
    requests: list[bytes],
    expected: int,
    connections: int,
    seconds: float,
    warmup: float = 0.3,
) -> tuple[Figures, Counter[int]]:
    """bench/load.py's closed loop, sending `requests` in turn across all connections; the
    statuses by count, for the report."""
    statuses: Counter[int] = Counter()
    figures = load.run(
        path, requests, connections, seconds, warmup, expected=expected, statuses=statuses
    )
    return figures, statuses


def request(method: str, target: str, body: dict | None = None) -> bytes:
    sep = "&" if "?" in target else "?"
    target = f"{target}{sep}api-version={VERSION}"
    return rawhttp.build(method, target, body, headers={"host": "certd.sock"})


def issue(daemon: Daemon, cert_id: str, csr: str) -> list[x509.Certificate]:
    reply = daemon.request("certd", "POST", "/certificates", {"certId": cert_id, "csr": csr})
    if reply.status != 201:
        raise RuntimeError(f"issuing {cert_id}: {reply.status} {reply.body!r}")
    return certs_of(reply.json()["pem"])


def start(root: Path) -> Daemon:
    launched = time.perf_counter()
    daemon = Daemon(
        root,
        {
            "keyd": lambda s: "max_requests = 64\n" + keyd_config(s),
            "certd": lambda s: certd_config(s.home),
        },
        env={"AZIOT_LOG_LEVEL": "warn"},
    ).start()
    assert daemon.process is not None
    print(
        f"aziotd (keyd + certd): both sockets answer {(time.perf_counter() - launched) * 1000:.0f}"
        f" ms after launch; RSS after start {rss_line(daemon.process.pid)}",
        flush=True,
    )
    return daemon


def wait_for_socket(path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("ceiling server did not start")
        time.sleep(0.05)
    time.sleep(0.3)


def status_note(statuses: Counter[int], expected: int) -> str:
    other = {status: n for status, n in sorted(statuses.items()) if status != expected}
    return f"  (statuses other than {expected}: {other})" if other else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measuring time per scenario (default 3)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aziot-certd-bench-"))
    daemon = start(work / "d")
    assert daemon.process is not None
    pid = daemon.process.pid
    socket_path = str(daemon.services["certd"].socket)
    try:
        # The local CA, as tests/test_certd.py `issue_local_ca` makes it.
        ca = x509.BasicConstraints(ca=True, path_length=None)
        ca_csr, _ = make_csr("ignored", key=KeydEcKey(daemon, "local-ca"), extensions=[(ca, True)])
        issue(daemon, "local-ca", ca_csr)
        csrs = [make_csr(f"bench-{i}", key=KeydEcKey(daemon, f"bench-{i}"))[0] for i in range(CSRS)]
        stored = issue(daemon, "bench-get", make_csr("bench-get")[0])
        for i, csr in enumerate(csrs):
            assert len(issue(daemon, f"bench-{i}", csr)) == 2
        get = [request("GET", "/certificates/bench-get")]
        reply = rawhttp.request(
            socket_path, "GET", f"/certificates/bench-get?api-version={VERSION}"
        )
        print(
            f"stored cert for GET: {len(stored)} certs in the chain, answer body "
            f"{len(reply.body)} bytes; POST: {CSRS} P-256 CSRs (keyd keys), cert ids "
            f"bench-0..bench-{CSRS - 1}, issued by the local CA (P-256)",
            flush=True,
        )
        posts = [
            request("POST", "/certificates", {"certId": f"bench-{i}", "csr": csr})
            for i, csr in enumerate(csrs)
        ]
        scenarios = {
            "GET /certificates/{id}": (get, 200),
            "POST /certificates local_ca": (posts, 201),
        }
        results: dict[tuple[str, int], Figures] = {}
        for name, (requests, expected) in scenarios.items():
            for connections in (1, 16):
                figures, statuses = run(socket_path, requests, expected, connections, args.seconds)
                results[(name, connections)] = figures
                label = f"aziotd {name}, {connections} conn"
                print(figures.line(label) + status_note(statuses, expected), flush=True)
        print(f"aziotd: RSS after load {rss_line(pid)}", flush=True)
    finally:
        daemon.stop()

    ceiling_path = str(work / "ceiling.sock")
    ceiling = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ceiling_server.py"), ceiling_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hmac_body = {"keyHandle": "x", "algorithm": "HMAC-SHA256", "parameters": {"message": "bQ=="}}
    ceiling_requests = {
        "GET /certificates/{id}": rawhttp.build("GET", "/x", headers={"host": "c"}),
        "POST /certificates local_ca": rawhttp.build(
            "POST", "/sign", hmac_body, headers={"host": "c"}
        ),
    }
    ceilings: dict[tuple[str, int], Figures] = {}
    try:
        wait_for_socket(ceiling_path, ceiling)
        for name, ceiling_request in ceiling_requests.items():
            kind = "GET (fixed body)" if name.startswith("GET") else "POST (HMAC sign)"
            for connections in (1, 16):
                figures, _ = run(ceiling_path, [ceiling_request], 200, connections, args.seconds)
                ceilings[(name, connections)] = figures
                print(figures.line(f"ceiling {kind}, {connections} conn"), flush=True)
    finally:
        ceiling.terminate()
        ceiling.wait()

    print("ratios (aziotd req/s / ceiling req/s in this run; original's req/s for reference):")
    originals = {
        "GET /certificates/{id}": ORIGINAL_GET,
        "POST /certificates local_ca": ORIGINAL_POST,
    }
    for (name, connections), figures in results.items():
        ratio = figures.rate / ceilings[(name, connections)].rate
        original = originals[name].get(connections)
        versus = (
            f"original {original:,} req/s, ours / original {figures.rate / original:.2f}"
            if original
            else "original: not measured"
        )
        print(f"  {name}, {connections} conn: / ceiling {ratio:.2f}; {versus}")
    summary = {
        f"{name}, {connections} conn": {
            "req_s": round(figures.rate),
            "errors": figures.errors,
            "ceiling_req_s": round(ceilings[(name, connections)].rate),
        }
        for (name, connections), figures in results.items()
    }
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
