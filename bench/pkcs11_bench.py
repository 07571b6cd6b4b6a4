"""keyd on a SoftHSM token: ECDSA and HMAC signs through the service against the raw token.

"raw" is the same operation called in-process on the token (python-pkcs11, one thread, one
session), the ceiling the worker could reach. "worker" adds our bus and worker thread, no HTTP.
"service" is aziotd end to end over its Unix socket.

Run: .venv/bin/python bench/pkcs11_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aziot.actors.keys.pkcs11.protocol import HmacSha256, Pkcs11, SignEcdsa  # noqa: E402
from aziot.actors.keys.pkcs11.token import Pkcs11Library  # noqa: E402
from aziot.actors.keys.pkcs11.worker import Pkcs11Worker, TokenThread  # noqa: E402
from aziot.bus.actor import serve_actor  # noqa: E402
from aziot.bus.bus import Bus  # noqa: E402
from aziot.bus.faults import Faults  # noqa: E402
from aziot.bus.protocol import Caller, Client  # noqa: E402
from aziot.config.pkcs11_uri import Pkcs11Uri  # noqa: E402
from bench.keyd_bench import post, rss_mib  # noqa: E402
from bench.load import run  # noqa: E402
from tests.daemon import Keyd  # noqa: E402
from tests.softhsm import make_softhsm_token  # noqa: E402

VERSION = "2021-05-01"
DIGEST = hashlib.sha256(b"bench").digest()
MESSAGE = b"m" * 64


def raw_rate(library: Pkcs11Library, uri: Pkcs11Uri, op: str, seconds: float) -> float:
    call = {
        "ECDSA": lambda: library.sign_ecdsa(uri, "bench-ec", DIGEST),
        "HMAC": lambda: library.hmac_sha256(uri, "bench-hmac", MESSAGE),
    }[op]
    count, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        call()
        count += 1
    return count / seconds


async def worker_rate(lib_path: str, uri: str, op: str, seconds: float, callers: int) -> float:
    bus = Bus()
    thread = TokenThread(lib_path, Faults())
    count = 0
    pkcs11 = Client(bus, Pkcs11, Caller(service="bench"))
    operation, request = (
        (Pkcs11.sign_ecdsa, SignEcdsa(uri, "bench-ec", DIGEST))
        if op == "ECDSA"
        else (Pkcs11.hmac_sha256, HmacSha256(uri, "bench-hmac", MESSAGE))
    )

    async def caller(stop: float) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await pkcs11.call(operation, request)
            count += 1

    async with trio.open_nursery() as nursery:
        inbox = bus.open_mailbox("pkcs11")
        await nursery.start(serve_actor, bus, "pkcs11", Pkcs11Worker(thread), inbox, Faults())
        stop = time.perf_counter() + seconds
        async with trio.open_nursery() as callers_nursery:
            for _ in range(callers):
                callers_nursery.start_soon(caller, stop)
        nursery.cancel_scope.cancel()
    thread.stop()
    return count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per scenario")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aziot-bench-pkcs11-"))
    token = make_softhsm_token(work / "softhsm", label="bench")
    uri = Pkcs11Uri.parse(token.uri())

    library = Pkcs11Library(token.lib_path)
    library.generate_key_pair(uri, "bench-ec", ["ec-p256"])
    library.generate_secret(uri, "bench-hmac", ["sign"])
    raw = {op: raw_rate(library, uri, op, args.seconds) for op in ("ECDSA", "HMAC")}
    library.close()
    for op, rate in raw.items():
        print(f"raw token {op:5} sign, in-process, 1 thread: {rate:8.0f}/s", flush=True)
    for op in ("ECDSA", "HMAC"):
        rate = trio.run(worker_rate, token.lib_path, token.uri(), op, args.seconds, 16)
        print(f"worker    {op:5} sign over the bus, 16 callers: {rate:8.0f}/s", flush=True)

    keyd = Keyd(
        work / "keyd",
        token=token,
        env={"AZIOT_LOG_LEVEL": "warn"},
        top_config="max_requests = 64\n",
    ).start()
    assert keyd.process is not None
    pair = keyd.call("POST", "/keypair", {"keyId": "bench-ec"}).json()["keyHandle"]
    sym = keyd.call("POST", "/key", {"keyId": "bench-hmac", "usage": "sign"}).json()["keyHandle"]
    requests = {
        "ECDSA": post(
            f"/sign?api-version={VERSION}",
            {
                "keyHandle": pair,
                "algorithm": "ECDSA",
                "parameters": {"digest": base64.b64encode(DIGEST).decode()},
            },
        ),
        "HMAC": post(
            f"/sign?api-version={VERSION}",
            {
                "keyHandle": sym,
                "algorithm": "HMAC-SHA256",
                "parameters": {"message": base64.b64encode(MESSAGE).decode()},
            },
        ),
    }
    for op, request in requests.items():
        for connections in (1, 16):
            figures = run(keyd.socket, request, connections, args.seconds)
            label = f"service   {op:5} sign, {connections:2} conn"
            print(
                figures.line(label) + f"   (service/raw {figures.rate / raw[op]:.3f})", flush=True
            )
    print(f"aziotd with a token: RSS after load {rss_mib(keyd.process.pid):.1f} MiB")
    keyd.stop()


if __name__ == "__main__":
    main()
