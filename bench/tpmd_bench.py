"""tpmd `POST /sign_with_auth_key` through the service against raw tpm2-pytss in-process.

Starts swtpm (Unix-socket mode, a temp state dir) and an aziotd serving tpmd alone, imports an
auth key as DPS sends it (`mockcloud/tpm_blob.py` against the EK and SRK from
`GET /get_tpm_keys`), then measures req/s, p50 and p99 of `sign_with_auth_key` at 1 and 4
keep-alive connections. It then stops the daemon and, on the same swtpm, opens an ESAPI context
in this process with the same TCTI and times `esapi.hmac` with the same persisted key (one
caller: the TPM is one serial device), and prints each service figure as a ratio to that.
Every answer is checked against `hmac.new(key, data, sha256)`.

Run: .venv/bin/python bench/tpmd_bench.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import Figures, run  # noqa: E402
from mockcloud.tpm_blob import make_auth_key_blob  # noqa: E402
from tests import rawhttp  # noqa: E402
from tests.daemon import Daemon  # noqa: E402
from tests.swtpm import Swtpm, swtpm_available  # noqa: E402

VERSION = "2020-09-01"
AUTH_KEY_HANDLE = 0x81000100  # 0x81000000 + tpmd's default auth_key_index 0x00_01_00
# What a SAS token signs: "<resource uri>\n<expiry>".
DATA = b"myhub.azure-devices.net%2Fdevices%2Fdevice-1\n1767225600"


def wait_for_tpm(daemon: Daemon, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        if reply.status == 200:
            keys: dict[str, str] = reply.json()
            return keys
        if time.monotonic() > deadline:
            raise TimeoutError(f"tpmd did not open the TPM:\n{daemon.logs()}")
        time.sleep(0.1)


def raw_hmac(tcti: str, key: bytes, seconds: float, warmup: float = 0.3) -> Figures:
    """esapi.hmac with the persisted auth key, in this process, one call after another."""
    from tpm2_pytss import ESAPI, TPM2_ALG

    latencies: list[float] = []
    with ESAPI(tcti) as esapi:
        auth_key = esapi.tr_from_tpmpublic(AUTH_KEY_HANDLE)
        expected = hmac.new(key, DATA, hashlib.sha256).digest()
        assert bytes(esapi.hmac(auth_key, DATA, TPM2_ALG.SHA256)) == expected
        start = time.perf_counter()
        measure_from = start + warmup
        stop = measure_from + seconds
        while True:
            began = time.perf_counter()
            if began >= stop:
                break
            esapi.hmac(auth_key, DATA, TPM2_ALG.SHA256)
            finished = time.perf_counter()
            if finished >= measure_from:
                latencies.append(finished - began)
    latencies.sort()
    count = len(latencies)
    return Figures(
        requests=count,
        errors=0,
        seconds=seconds,
        p50_ms=latencies[count // 2] * 1000 if count else 0.0,
        p99_ms=latencies[int(count * 0.99)] * 1000 if count else 0.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per scenario")
    args = parser.parse_args()
    if not swtpm_available():
        sys.exit("swtpm and tpm2-tools are needed: scripts/setup --test installs them")

    work = Path(tempfile.mkdtemp(prefix="aziot-tpmd-bench-"))
    with Swtpm(work / "swtpm") as tpm:
        daemon = Daemon(
            work / "d",
            {"tpmd": f'tcti = "{tpm.tcti}"\nmax_requests = 64\n'},
            env={"AZIOT_LOG_LEVEL": "warn"},
        ).start()
        try:
            keys = wait_for_tpm(daemon)
            key = os.urandom(32)
            blob = make_auth_key_blob(
                base64.b64decode(keys["endorsement_key"]),
                base64.b64decode(keys["storage_root_key"]),
                key,
            )
            reply = daemon.request(
                "tpmd", "POST", "/import_auth_key", {"key": base64.b64encode(blob).decode()}
            )
            assert reply.status == 200, reply.body
            body = {"data": base64.b64encode(DATA).decode()}
            reply = daemon.request("tpmd", "POST", "/sign_with_auth_key", body)
            expected = hmac.new(key, DATA, hashlib.sha256).digest()
            assert base64.b64decode(reply.json()["digest"]) == expected, reply.body

            request = rawhttp.build(
                "POST",
                f"/sign_with_auth_key?api-version={VERSION}",
                body,
                headers={"host": "tpmd.sock"},
            )
            socket_path = str(daemon.services["tpmd"].socket)
            service: dict[int, Figures] = {}
            for connections in (1, 4):
                figures = run(socket_path, request, connections, args.seconds)
                service[connections] = figures
                print(figures.line(f"tpmd sign_with_auth_key, {connections} conn"), flush=True)
        finally:
            daemon.stop()

        raw = raw_hmac(tpm.tcti, key, args.seconds)
        print(raw.line("raw tpm2-pytss esapi.hmac, in-process"), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    for connections, figures in service.items():
        print(
            f"  tpmd, {connections} conn / raw: {figures.rate / raw.rate:.2f} of the rate, "
            f"p50 {figures.p50_ms / raw.p50_ms:.2f}x"
        )


if __name__ == "__main__":
    main()
