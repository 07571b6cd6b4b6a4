"""Soak: a mixed keyd load for minutes, sampling the daemon's RSS to see whether it levels off.

Run: .venv/bin/python bench/soak.py [--minutes 2] [--connections 8] [--sample-seconds 5]

N keep-alive connections (closed loop, as bench/load.py) send a weighted mix: HMAC and ECDSA
sign, GET /key, POST /key create and import, POST /keypair create, derived key create and
export, key and key pair delete. Ids come from a bounded space, so the key store stays small
however long it runs. Every few seconds a line shows RSS, open fds, key files and the rate; the
summary gives requests and errors by kind and status, RSS start/end/max, and whether RSS
levelled off (mean of the last quarter of samples against the second quarter).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import selectors
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.keyd_bench import post, rss_mib  # noqa: E402
from bench.load import _complete  # noqa: E402
from tests import rawhttp  # noqa: E402
from tests.daemon import Keyd  # noqa: E402

VERSION = "2021-05-01"
IDS = 32  # ids per kind of created key: the store holds at most ~3 × IDS + a few files
REQUEST_TIMEOUT = 30.0  # an answer slower than this counts as a hang and the connection is redone

# kind -> weight in the mix
MIX = {
    "hmac-sign": 6,
    "ecdsa-sign": 3,
    "get-key": 3,
    "create-key": 1,
    "import-key": 1,
    "create-keypair": 1,
    "derive": 1,
    "export-derived": 1,
    "delete": 2,
}
EXPECTED = dict.fromkeys(MIX, 200) | {"delete": 204}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def target(path: str) -> str:
    return f"{path}?api-version={VERSION}"


def hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@attrs.define
class Op:
    kind: str
    request: bytes
    key_id: str | None = None  # an id of the bounded space, busy while this op is in flight
    check: Any = None  # what the answer must hold, or what to remember from it


@attrs.define
class Conn:
    sock: socket.socket
    op: Op | None = None
    buffer: bytes = b""
    sent_at: float = 0.0


class Mix:
    """Builds the next request; remembers handles that deletes and exports may use."""

    def __init__(self, sym: str, sym_bytes: bytes, ec: str, base: str, base_bytes: bytes) -> None:
        self.sym, self.sym_bytes, self.ec = sym, sym_bytes, ec
        self.base, self.base_bytes = base, base_bytes
        self.deletable: dict[str, tuple[str, str]] = {}  # key id -> (route, handle)
        self.derived: list[tuple[str, bytes]] = []  # (handle, exported key), the last few
        self.busy: set[str] = set()
        self.kinds = list(MIX)
        self.weights = list(MIX.values())

    def _free_id(self, prefix: str) -> str | None:
        for _ in range(8):
            key_id = f"{prefix}-{random.randrange(IDS)}"
            if key_id not in self.busy:
                return key_id
        return None

    def next(self) -> Op:
        kind = random.choices(self.kinds, self.weights)[0]
        op = self._build(kind)
        if op is None:  # nothing to delete or export yet, or every id busy
            op = self._build("hmac-sign")
            assert op is not None
        if op.key_id is not None:
            self.busy.add(op.key_id)
        return op

    def _build(self, kind: str) -> Op | None:
        if kind == "hmac-sign":
            message = os.urandom(64)
            body = {
                "keyHandle": self.sym,
                "algorithm": "HMAC-SHA256",
                "parameters": {"message": b64(message)},
            }
            expected = hmac.new(self.sym_bytes, message, hashlib.sha256).digest()
            return Op(kind, post(target("/sign"), body), check={"signature": b64(expected)})
        if kind == "ecdsa-sign":
            body = {
                "keyHandle": self.ec,
                "algorithm": "ECDSA",
                "parameters": {"digest": b64(os.urandom(32))},
            }
            return Op(kind, post(target("/sign"), body))
        if kind == "get-key":
            request = rawhttp.build("GET", target("/key/soak-sym"), headers={"host": "keyd.sock"})
            return Op(kind, request)
        if kind in ("create-key", "import-key", "create-keypair"):
            prefix = {"create-key": "soak-gen", "import-key": "soak-imp"}.get(kind, "soak-pair")
            key_id = self._free_id(prefix)
            if key_id is None:
                return None
            if kind == "create-key":
                body = {"keyId": key_id, "usage": "sign"}
            elif kind == "import-key":
                body = {"keyId": key_id, "usage": "sign", "keyBytes": b64(os.urandom(32))}
            else:
                body = {"keyId": key_id, "preferredAlgorithms": "ec-p256"}
            route = "/keypair" if kind == "create-keypair" else "/key"
            return Op(kind, post(target(route), body), key_id, check=route)
        if kind == "derive":
            data = os.urandom(16)
            body = {"baseKeyHandle": self.base, "derivationData": b64(data)}
            exported = hmac.new(self.base_bytes, data, hashlib.sha256).digest()
            return Op(kind, post(target("/derivedkey"), body), check=exported)
        if kind == "export-derived":
            if not self.derived:
                return None
            handle, exported = random.choice(self.derived)
            body = {"keyHandle": handle}
            return Op(kind, post(target("/derivedkey/export"), body), check={"key": b64(exported)})
        if kind == "delete":
            free = [key_id for key_id in self.deletable if key_id not in self.busy]
            if not free:
                return None
            key_id = random.choice(free)
            route, handle = self.deletable.pop(key_id)
            request = rawhttp.build(
                "DELETE", target(route), {"keyHandle": handle}, headers={"host": "keyd.sock"}
            )
            return Op(kind, request, key_id)
        raise ValueError(kind)

    def answered(self, op: Op, status: int, body: bytes) -> str | None:
        """Book the answer; an error label when it is not what the op must get."""
        if op.key_id is not None:
            self.busy.discard(op.key_id)
        if status != EXPECTED[op.kind]:
            return str(status)
        if op.kind in ("create-key", "import-key", "create-keypair"):
            assert op.key_id is not None
            self.deletable[op.key_id] = (op.check, json.loads(body)["keyHandle"])
        elif op.kind == "derive":
            self.derived.append((json.loads(body)["keyHandle"], op.check))
            del self.derived[:-16]
        elif isinstance(op.check, dict) and json.loads(body) != op.check:
            return "wrong answer"
        return None

    def abandoned(self, op: Op) -> None:
        if op.key_id is not None:
            self.busy.discard(op.key_id)


def setup(keyd: Keyd) -> Mix:
    sym_bytes, base_bytes = os.urandom(32), os.urandom(32)
    sym = keyd.call(
        "POST", "/key", {"keyId": "soak-sym", "usage": "sign", "keyBytes": b64(sym_bytes)}
    )
    base = keyd.call(
        "POST", "/key", {"keyId": "soak-base", "usage": "derive", "keyBytes": b64(base_bytes)}
    )
    ec = keyd.call("POST", "/keypair", {"keyId": "soak-ec", "preferredAlgorithms": "ec-p256"})
    for reply in (sym, base, ec):
        assert reply.status == 200, reply
    return Mix(
        sym.json()["keyHandle"],
        sym_bytes,
        ec.json()["keyHandle"],
        base.json()["keyHandle"],
        base_bytes,
    )


@attrs.define
class Sample:
    seconds: float
    rss: float


@attrs.define
class Tally:
    sent: int = 0
    done: Counter[str] = attrs.field(factory=Counter)  # kind -> answers
    errors: Counter[tuple[str, str]] = attrs.field(factory=Counter)  # (kind, what) -> count
    latencies: list[float] = attrs.field(factory=list)  # since the last sample


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="aziot-soak-"))
    keyd = Keyd(
        work / "keyd",
        env={"AZIOT_LOG_LEVEL": "warn"},
        top_config=f"max_requests = {args.connections + 8}\n",
    ).start()
    assert keyd.process is not None
    pid = keyd.process.pid
    mix = setup(keyd)
    selector = selectors.DefaultSelector()
    conns: dict[socket.socket, Conn] = {}
    tally = Tally()

    def send_next(conn: Conn) -> None:
        conn.op = mix.next()
        conn.buffer = b""
        conn.sent_at = time.perf_counter()
        tally.sent += 1
        conn.sock.sendall(conn.op.request)  # requests are small: the buffer takes them

    def open_conn() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(keyd.socket)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        conns[sock] = conn = Conn(sock)
        send_next(conn)

    def redo(conn: Conn, what: str) -> None:
        assert conn.op is not None
        tally.errors[(conn.op.kind, what)] += 1
        mix.abandoned(conn.op)
        selector.unregister(conn.sock)
        del conns[conn.sock]
        conn.sock.close()
        open_conn()

    rss_start = rss_mib(pid)
    print(
        f"soak: {args.minutes:g} min, {args.connections} connections, sample every "
        f"{args.sample_seconds:g} s; RSS at start {rss_start:.1f} MiB",
        flush=True,
    )
    for _ in range(args.connections):
        open_conn()
    samples: list[Sample] = []
    start = time.perf_counter()
    stop = start + args.minutes * 60
    next_sample = start + args.sample_seconds
    done_at_last = 0
    while True:
        now = time.perf_counter()
        if now >= next_sample:
            rss = rss_mib(pid)
            samples.append(Sample(now - start, rss))
            done = sum(tally.done.values())
            tally.latencies.sort()
            count = len(tally.latencies)
            p50 = tally.latencies[count // 2] * 1000 if count else 0.0
            p99 = tally.latencies[int(count * 0.99)] * 1000 if count else 0.0
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            key_files = len(list(keyd.keys_dir.iterdir()))
            print(
                f"t={now - start:6.0f} s  rss {rss:6.1f} MiB  fds {fds:3}  key files {key_files:3}"
                f"  answered {done:8}  {(done - done_at_last) / args.sample_seconds:6.0f}/s"
                f"  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  errors {sum(tally.errors.values())}",
                flush=True,
            )
            done_at_last = done
            tally.latencies.clear()
            next_sample += args.sample_seconds
        if now >= stop:
            break
        for key, _ in selector.select(timeout=min(0.5, max(0.0, next_sample - now))):
            conn = conns[key.fileobj]  # type: ignore[index]
            try:
                data = conn.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                redo(conn, "disconnected")
                continue
            conn.buffer += data
            complete = _complete(conn.buffer)
            if complete is None:
                continue
            status, total = complete
            assert conn.op is not None
            tally.latencies.append(time.perf_counter() - conn.sent_at)
            tally.done[conn.op.kind] += 1
            head_end = conn.buffer.find(b"\r\n\r\n") + 4
            error = mix.answered(conn.op, status, conn.buffer[head_end:total])
            if error is not None:
                tally.errors[(conn.op.kind, error)] += 1
            send_next(conn)
        for conn in list(conns.values()):
            if time.perf_counter() - conn.sent_at > REQUEST_TIMEOUT:
                redo(conn, "no answer in 30 s")
    for conn in conns.values():
        conn.sock.close()
    rss_end, rss_peak = rss_mib(pid), hwm_mib(pid)
    key_files = len(list(keyd.keys_dir.iterdir()))
    code = keyd.stop()
    shutil.rmtree(work, ignore_errors=True)
    report(args, tally, samples, rss_start, rss_end, rss_peak, key_files, code)
    return 0 if code == 0 and not tally.errors else 1


def levelled(samples: list[Sample]) -> str:
    quarter = len(samples) // 4
    if quarter < 1:
        return "too few samples to judge (need 4)"
    second = samples[quarter : 2 * quarter]
    last = samples[-quarter:]
    growth = sum(s.rss for s in last) / quarter - sum(s.rss for s in second) / quarter
    minutes = (
        sum(s.seconds for s in last) / quarter - sum(s.seconds for s in second) / quarter
    ) / 60
    detail = (
        f"mean of the last quarter {growth:+.2f} MiB against the second quarter, "
        f"{minutes:.1f} min apart"
    )
    if growth < 1.0:
        return f"levelled ({detail})"
    return f"still growing {growth / minutes:.2f} MiB/min ({detail})"


def report(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[Sample],
    rss_start: float,
    rss_end: float,
    rss_peak: float,
    key_files: int,
    code: int,
) -> None:
    answered = sum(tally.done.values())
    seconds = args.minutes * 60
    print("\nsummary")
    print(f"  requests sent {tally.sent}, answered {answered} ({answered / seconds:.0f}/s)")
    for kind in MIX:
        errors = {what: n for (k, what), n in tally.errors.items() if k == kind}
        shown = ", ".join(f"{what}: {n}" for what, n in sorted(errors.items())) or "none"
        print(f"    {kind:15} {tally.done[kind]:8} answered   errors {shown}")
    print(f"  errors {sum(tally.errors.values())}")
    print(
        f"  RSS start {rss_start:.1f} MiB, end {rss_end:.1f} MiB, max sampled "
        f"{max((s.rss for s in samples), default=rss_end):.1f} MiB, peak (VmHWM) {rss_peak:.1f} MiB"
    )
    print(f"  RSS {levelled(samples)}")
    print(f"  key files at the end {key_files}; daemon exit code after SIGTERM {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long to run the load")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    parser.add_argument(
        "--sample-seconds", type=float, default=5.0, help="RSS sampling and report period"
    )
    args = parser.parse_args()
    sys.exit(run(args))


if __name__ == "__main__":
    main()
