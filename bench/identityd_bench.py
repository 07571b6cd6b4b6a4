"""identityd throughput, latency and memory, as ratios to a ceiling measured in the same run.

One aziotd serves keyd and identityd from a temp dir, provisioned by mockcloud's DPS (symmetric
key enrollment) onto its IoT Hub double, with one module principal (`mod1`, made in the hub by
the start's reconciliation). Then, at 1 and 16 keep-alive connections, as root (local root:
allowed everything, and `GET /identities/identity` answers the device identity):
- `GET /identities/identity`: the device identity, with a key handle keyd issues for the
  device's SAS key at each call;
- `GET /identities/modules/mod1?type=aziot`: a module identity; identityd asks the hub at most
  once per 5 s per module (otherwise reads its backup) and derives the module's key in keyd at
  each call.
Every answer's status is checked (200); others are counted as errors. The ceiling
(bench/ceiling_server.py) is bare trio sockets with httptools answering a fixed JSON body, with
nothing of ours in between. The original's figure for `GET /identities/identity`, measured on
this machine class, is printed for reference. Figures on a shared machine are noisy.

Run: .venv/bin/python bench/identityd_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.certd_bench import rss_line, run, status_note, wait_for_socket  # noqa: E402
from bench.load import Figures  # noqa: E402
from mockcloud.cloud import Cloud  # noqa: E402
from tests import rawhttp  # noqa: E402
from tests.daemon import API_VERSIONS, Daemon, ServiceDir, keyd_config  # noqa: E402
from tests.test_identityd import MODULE_PRINCIPAL, write_device_key  # noqa: E402

VERSION = API_VERSIONS["identityd"]
DEVICE_ID = "bench-dev"
# The original (Rust aziot-identityd), on this machine class: GET /identities/identity req/s.
ORIGINAL_IDENTITY = {1: 3_709, 16: 3_709}
ORIGINAL_MODULE: dict[int, int] = {}  # not measured for the original


def identityd_config(cloud: Cloud, service: ServiceDir) -> str:
    return f"""max_requests = 64
hostname = "bench-host"
homedir = "{service.home}"

[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}"
scope_id = "{cloud.id_scope}"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "{DEVICE_ID}"
symmetric_key = "device-key"
{MODULE_PRINCIPAL}"""


def start(work: Path, cloud: Cloud) -> Daemon:
    enrollment = cloud.dps.add_symmetric_enrollment(DEVICE_ID)
    key_file = write_device_key(work / "secrets", enrollment.primary_key)

    def keyd(service: ServiceDir) -> str:
        return (
            "max_requests = 64\n"
            + keyd_config(service)
            + f'[preloaded_keys]\ndevice-key = "file://{key_file}"\n'
        )

    env = {
        "SSL_CERT_FILE": str(cloud.server_ca_pem_path),
        "NO_PROXY": "*",
        "AZIOT_LOG_LEVEL": "warn",
    }
    launched = time.perf_counter()
    daemon = Daemon(
        work / "d",
        {"keyd": keyd, "identityd": lambda s: identityd_config(cloud, s)},
        env=env,
    )
    daemon.start(wait=False)
    daemon.wait_ready(60)
    assert daemon.process is not None
    print(
        f"aziotd (keyd + identityd): serving {(time.perf_counter() - launched) * 1000:.0f} ms "
        "after launch (DPS registration included: the original's 5 s wait before its first "
        f"status poll); RSS after start {rss_line(daemon.process.pid)}",
        flush=True,
    )
    return daemon


def request(target: str) -> bytes:
    sep = "&" if "?" in target else "?"
    return rawhttp.build("GET", f"{target}{sep}api-version={VERSION}", headers={"host": "i"})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measuring time per scenario (default 3)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aziot-identityd-bench-"))
    scenarios = {
        "GET /identities/identity": request("/identities/identity"),
        "GET /identities/modules/{m}": request("/identities/modules/mod1?type=aziot"),
    }
    results: dict[tuple[str, int], Figures] = {}
    with Cloud(work / "cloud") as cloud:
        daemon = start(work, cloud)
        assert daemon.process is not None
        pid = daemon.process.pid
        socket_path = str(daemon.services["identityd"].socket)
        try:
            for name, raw in scenarios.items():
                target = raw.split(b" ")[1].decode()
                reply = rawhttp.request(socket_path, "GET", target)
                if reply.status != 200:
                    raise RuntimeError(f"{name}: {reply.status} {reply.body!r}")
                print(f"{name}: answer body {len(reply.body)} bytes", flush=True)
            hub_before = len(cloud.hub.requests)
            for name, raw in scenarios.items():
                for connections in (1, 16):
                    figures, statuses = run(socket_path, [raw], 200, connections, args.seconds)
                    results[(name, connections)] = figures
                    label = f"aziotd {name}, {connections} conn"
                    print(figures.line(label) + status_note(statuses, 200), flush=True)
            print(
                f"hub requests during the load: {len(cloud.hub.requests) - hub_before}",
                flush=True,
            )
            print(f"aziotd: RSS after load {rss_line(pid)}", flush=True)
        finally:
            daemon.stop()

    ceiling_path = str(work / "ceiling.sock")
    ceiling = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ceiling_server.py"), ceiling_path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ceilings: dict[int, Figures] = {}
    try:
        wait_for_socket(ceiling_path, ceiling)
        for connections in (1, 16):
            raw = rawhttp.build("GET", "/x", headers={"host": "c"})
            figures, _ = run(ceiling_path, [raw], 200, connections, args.seconds)
            ceilings[connections] = figures
            print(figures.line(f"ceiling GET (fixed body), {connections} conn"), flush=True)
    finally:
        ceiling.terminate()
        ceiling.wait()

    print("ratios (aziotd req/s / ceiling req/s in this run; original's req/s for reference):")
    originals = {
        "GET /identities/identity": ORIGINAL_IDENTITY,
        "GET /identities/modules/{m}": ORIGINAL_MODULE,
    }
    for (name, connections), figures in results.items():
        ratio = figures.rate / ceilings[connections].rate
        original = originals[name].get(connections)
        versus = (
            f"original {original:,} req/s, ours / original {figures.rate / original:.2f}"
            if original
            else "original: not measured"
        )
        print(f"  {name}, {connections} conn: / ceiling {ratio:.3f}; {versus}")
    summary = {
        f"{name}, {connections} conn": {
            "req_s": round(figures.rate),
            "p50_ms": round(figures.p50_ms, 2),
            "p99_ms": round(figures.p99_ms, 2),
            "errors": figures.errors,
            "ceiling_req_s": round(ceilings[connections].rate),
        }
        for (name, connections), figures in results.items()
    }
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
