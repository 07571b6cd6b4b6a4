"""Fairness: another uid's `GET /key/{id}` latency while one uid sends expensive requests.

Run as root: `.venv/bin/python bench/fairness_bench.py [--seconds 10] [--heavy 10]`.

One aziotd serves file keys. uid 65533 (the heavy caller) keeps `--heavy` connections busy with
the requests that cost keyd the most CPU per byte: raw RSA-4096 (`RSA-NO-PADDING`), AES-GCM over
64 KiB with a 4-byte IV (the path `cryptography` cannot take), and `POST /derivedkey` with a
~1 MiB body. uid 65534 (the victim) sends one `GET /key/{id}` at a time. The victim's p50 and
p99 are printed alone and under that load; each caller is a forked process that has dropped to
its uid, so keyd sees them as the original would (SO_PEERCRED).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import rawhttp  # noqa: E402
from tests.daemon import KEYD_VERSION, Keyd  # noqa: E402

HEAVY_UID, VICTIM_UID, GROUP = 65533, 65534, 65534
PRINCIPALS = (
    f'[[principal]]\nuid = {HEAVY_UID}\nkeys = ["heavy*"]\n'
    f'[[principal]]\nuid = {VICTIM_UID}\nkeys = ["other*"]\n'
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def call(socket_path: str, method: str, path: str, body: Any = None) -> rawhttp.Reply:
    target = f"{path}?api-version={KEYD_VERSION}"
    return rawhttp.request(socket_path, method, target, body)


def heavy_bodies(socket_path: str) -> list[tuple[str, dict[str, Any]]]:
    """The expensive requests, made with handles root obtained (handles carry no uid)."""
    rsa = call(
        socket_path, "POST", "/keypair", {"keyId": "heavy-rsa", "preferredAlgorithms": "rsa-4096"}
    ).json()["keyHandle"]
    aes = call(
        socket_path, "POST", "/key", {"keyId": "heavy-aes", "usage": "encrypt", "keyBytes": None}
    ).json()["keyHandle"]
    block = b"\x00\x01" + os.urandom(510)  # below the modulus: a valid NO-PADDING input
    return [
        ("/encrypt", {"keyHandle": rsa, "algorithm": "RSA-NO-PADDING", "plaintext": b64(block)}),
        (
            "/encrypt",
            {
                "keyHandle": aes,
                "algorithm": "AEAD",
                "parameters": {"iv": b64(b"\x01\x02\x03\x04"), "aad": b64(b"x")},
                "plaintext": b64(os.urandom(64 * 1024)),
            },
        ),
        ("/derivedkey", {"baseKeyHandle": aes, "derivationData": b64(os.urandom(760 * 1024))}),
    ]


def drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(GROUP)
    os.setuid(uid)


def heavy_loop(socket_path: str, bodies: list[tuple[str, dict[str, Any]]]) -> None:
    encoded = [rawhttp.build("POST", f"{p}?api-version={KEYD_VERSION}", b) for p, b in bodies]
    sock = rawhttp.connect(socket_path, timeout=60)
    n = 0
    while True:
        try:
            sock.sendall(encoded[n % len(encoded)])
            reply = rawhttp.read_reply(sock)
            assert reply.status == 200, (reply.status, reply.body[:200])
        except (OSError, ConnectionError):
            sock.close()
            sock = rawhttp.connect(socket_path, timeout=60)
        n += 1


def victim_run(socket_path: str, seconds: float, out_fd: int) -> None:
    latencies: list[float] = []
    request = rawhttp.build("GET", f"/key/other-key?api-version={KEYD_VERSION}")
    deadline = time.monotonic() + seconds
    sock = rawhttp.connect(socket_path, timeout=60)
    while time.monotonic() < deadline:
        started = time.monotonic()
        sock.sendall(request)
        reply = rawhttp.read_reply(sock)
        latencies.append(time.monotonic() - started)
        assert reply.status == 200, reply.status
    os.write(out_fd, json.dumps(latencies).encode())
    os.close(out_fd)


def fork(target: Any, *args: Any, uid: int) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            drop_to(uid)
            target(*args)
        except BaseException as error:  # noqa: BLE001 - a child reports and exits
            print(f"child {os.getpid()} (uid {uid}): {error!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    return pid


def measure_victim(socket_path: str, seconds: float) -> list[float]:
    read_fd, write_fd = os.pipe()
    pid = fork(victim_run, socket_path, seconds, write_fd, uid=VICTIM_UID)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 1 << 20):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b"[]")


def figures(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "no answers"
    ms = sorted(x * 1000 for x in latencies)
    p99 = statistics.quantiles(ms, n=100)[98]
    return f"p50 {statistics.median(ms):7.1f} ms  p99 {p99:7.1f} ms  ({len(ms)} GETs)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--heavy", type=int, default=10, help="heavy connections (max_requests)")
    parser.add_argument(
        "--only", choices=("rsa", "gcm", "derive"), help="one kind of heavy request, not all three"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the callers are forked processes that drop to other uids")
        return 2
    root = Path(tempfile.mkdtemp(prefix="aziot-fair-"))
    os.chmod(root, 0o755)
    keyd = Keyd(
        root / "keyd", env={"AZIOT_LOG_LEVEL": "warn"}, top_config=f"max_requests = {args.heavy}\n"
    )
    (keyd.config_dir / "50-callers.toml").write_text(PRINCIPALS)
    keyd.start()
    heavy: list[int] = []
    try:
        os.chown(keyd.socket, 0, GROUP)
        assert (
            call(
                keyd.socket,
                "POST",
                "/key",
                {"keyId": "other-key", "usage": "sign", "keyBytes": None},
            ).status
            == 200
        )
        bodies = heavy_bodies(keyd.socket)
        if args.only:
            bodies = [bodies[("rsa", "gcm", "derive").index(args.only)]]
        alone = measure_victim(keyd.socket, args.seconds)
        print(f"victim alone:                          {figures(alone)}")
        heavy = [fork(heavy_loop, keyd.socket, bodies, uid=HEAVY_UID) for _ in range(args.heavy)]
        time.sleep(1.0)
        loaded = measure_victim(keyd.socket, args.seconds)
        print(f"victim, {args.heavy} heavy connections of uid {HEAVY_UID}: {figures(loaded)}")
    finally:
        for pid in heavy:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        keyd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
