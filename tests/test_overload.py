"""Overload: many clients at once, against a real aziotd serving keyd on file keys.

Each scenario combines load the single-request tests (test_keyd_errors, test_daemon) cover one
at a time: a uid at its connection limit (spec/api.md §1.5) with more connections refused, slow
bodies (the original's 5 s body timeout → 408), bodies over 1 MiB (413), thousands of idle
connections from many uids. Through all of it:

* other uids are answered, correctly (their latency is printed, never asserted: the only time
  bounds here are generous hang detectors);
* the excess is refused as the original refuses it: the connection is closed without a byte;
* the daemon's memory stays bounded (VmHWM, its peak RSS, against the RSS before the load);
* every key import keyd acknowledged with 200 is on disk with the exact bytes, and its handle
  still signs after a SIGKILL and a restart;
* SIGTERM still stops the daemon, even with a client that never reads its answers (its
  connection is closed once the grace period is over).

Other uids are forked children of this process that drop to that uid (`UidClient`); they are
forked before any thread starts, use only sockets and pipes, and leave with `os._exit`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import json
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aziot.actors.keys.store import key_file_name
from tests import rawhttp
from tests.daemon import KEYD_VERSION, Keyd

NOBODY = 65534
LIMIT = 10  # max_requests: simultaneous connections per uid
MiB = 1 << 20
REFUSED = "Max simultaneous connections reached for user"
FLOOD = 1000  # idle connections uid 0 opens beyond its limit
HUGE_ROUNDS = 10  # 8 MiB bodies per client
EDGE_ROUNDS = 10  # 1 MiB imports per client
PRINCIPAL = f'[[principal]]\nuid = {NOBODY}\nkeys = ["other*"]\n'


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def target(path: str) -> str:
    return f"{path}?api-version={KEYD_VERSION}"


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect, waiting while the listen backlog is full: a Unix socket with a timeout (so
    non-blocking underneath) gets EAGAIN there instead of blocking as a plain client would."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def classify(
    socks: list[socket.socket], expect_closed: int, timeout: float = 20.0
) -> dict[socket.socket, str]:
    """Which of `socks` the server has closed ("closed": EOF or reset, nothing received), which
    are still open ("open") and which received bytes ("data"). Waits until `expect_closed` are
    closed (or `timeout`), then looks once more after a pause so that late closes count too."""
    states = dict.fromkeys(socks, "open")

    def sweep(wait: float) -> None:
        poller = select.poll()
        by_fd = {}
        for sock, state in states.items():
            if state == "open":
                poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
                by_fd[sock.fileno()] = sock
        for fd, _event in poller.poll(int(wait * 1000)):
            sock = by_fd[fd]
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            states[sock] = "data" if data else "closed"

    deadline = time.monotonic() + timeout
    while Counter(states.values())["closed"] < expect_closed and time.monotonic() < deadline:
        sweep(0.1)
    time.sleep(0.3)
    sweep(0)
    return states


def count(states: dict[socket.socket, str]) -> dict[str, int]:
    return dict(Counter(states.values()))


def is_refused(sock: socket.socket) -> bool:
    """Whether the server closed `sock` without sending a byte (after we sent a request)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def send_and_check_refused(sock: socket.socket, request: bytes) -> bool:
    """Send `request` and tell whether the server closed without answering. A refusing
    server may close before the request is all written: that is a refusal too."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(request)
    return is_refused(sock)


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def figures(seconds: list[float]) -> str:
    if not seconds:
        return "no samples"
    ordered = sorted(seconds)
    return (
        f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.1f} ms "
        f"p99={ordered[int(len(ordered) * 0.99)] * 1000:.1f} ms max={ordered[-1] * 1000:.1f} ms"
    )


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, f"fd hard limit {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def start_keyd(world_dir: Path, max_requests: int) -> Keyd:
    """A daemon with `max_requests` and a principal for uid 65534 (ids `other*`)."""
    keyd = Keyd(
        world_dir / "keyd",
        env={"AZIOT_LOG_LEVEL": "info"},
        top_config=f"max_requests = {max_requests}\n",
    )
    (keyd.config_dir / "50-other.toml").write_text(PRINCIPAL)
    keyd.start()
    os.chown(keyd.socket, 0, NOBODY)  # mode 0660: group NOBODY may connect
    time.sleep(0.3)  # the readiness probes' connections must be gone from uid 0's count
    return keyd


@pytest.fixture
def started(world_dir: Path) -> Iterator[Callable[[int], Keyd]]:
    """`started(max_requests)` starts a daemon; one a failed test left running is killed."""
    made: list[Keyd] = []

    def start(max_requests: int) -> Keyd:
        made.append(start_keyd(world_dir, max_requests))
        return made[-1]

    yield start
    for keyd in made:
        if keyd.process is not None:
            keyd.stop(signal.SIGKILL)


# -- another uid: a forked child taking orders over pipes --------------------------------


class UidClient:
    """A child process running as `uid` (primary group `gid`), doing socket work on command.

    Fork these before starting any thread: the child inherits only the forking thread."""

    def __init__(self, uid: int, socket_path: str, gid: int = NOBODY) -> None:
        command_read, command_write = os.pipe()
        reply_read, reply_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 0
            try:
                keep = {0, 1, 2, command_read, reply_write}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                _Child(socket_path, command_read, reply_write).serve()
            except BaseException:
                code = 1
            os._exit(code)
        os.close(command_read)
        os.close(reply_write)
        self.uid = uid
        self.pid = pid
        self._out = command_write
        self._in = reply_read
        self._buffer = b""

    def send(self, op: str, **args: Any) -> None:
        os.write(self._out, json.dumps({"op": op, **args}).encode() + b"\n")

    def receive(self, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"uid {self.uid}: no answer from the child within {timeout} s"
            chunk = os.read(self._in, 65536)
            assert chunk, f"uid {self.uid}: the child died"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line)
        assert "error" not in answer, f"uid {self.uid}: {answer['error']}"
        return answer["result"]

    def call(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        return self.receive()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
        """One request on a fresh connection: (status, JSON body or None, seconds)."""
        status, reply, seconds = self.call("request", method=method, path=path, body=body)
        return status, reply, seconds

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("exit")
        os.close(self._out)
        os.close(self._in)
        os.waitpid(self.pid, 0)


class _Child:
    def __init__(self, socket_path: str, command_fd: int, reply_fd: int) -> None:
        self.path = socket_path
        self.command_fd = command_fd
        self.reply_fd = reply_fd
        self.held: list[socket.socket] = []

    def serve(self) -> None:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                chunk = os.read(self.command_fd, 65536)
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            command = json.loads(line)
            op = command.pop("op")
            if op == "exit":
                return
            try:
                answer = {"result": getattr(self, f"op_{op}")(**command)}
            except Exception as error:
                answer = {"error": repr(error)}
            data = json.dumps(answer).encode() + b"\n"
            while data:
                data = data[os.write(self.reply_fd, data) :]

    def op_hold(self, count: int) -> int:
        for _ in range(count):
            self.held.append(connect(self.path))
        return len(self.held)

    def op_classify(self, expect_closed: int) -> dict[str, int]:
        states = classify(self.held, expect_closed)
        self.held = [sock for sock, state in states.items() if state == "open"]
        for sock, state in states.items():
            if state != "open":
                sock.close()
        return count(states)

    def op_use_held(self, method: str, path: str) -> list[list[Any]]:
        """One request on every held connection, all sent before any answer is read."""
        for sock in self.held:
            sock.sendall(rawhttp.build(method, target(path)))
        answers = []
        for sock in self.held:
            reply = rawhttp.read_reply(sock)
            answers.append([reply.status, reply.json()])
        return answers

    def op_release(self) -> int:
        for sock in self.held:
            sock.close()
        count, self.held = len(self.held), []
        return count

    def op_request(self, method: str, path: str, body: Any) -> list[Any]:
        started = time.monotonic()
        with connect(self.path) as sock:
            sock.sendall(rawhttp.build(method, target(path), body))
            reply = rawhttp.read_reply(sock)
        return [reply.status, reply.json() if reply.body else None, time.monotonic() - started]


# -- uid 0 importing keys on one keep-alive connection -----------------------------------


class Writer(threading.Thread):
    """Imports symmetric keys `<prefix>-<n>` with random bytes, one after the other (`most`
    of them at most), on one keep-alive connection that holds one of uid 0's slots until
    `finish()`, and remembers what keyd acknowledged."""

    def __init__(self, socket_path: str, prefix: str, most: int = 300) -> None:
        super().__init__(daemon=True)
        self.path = socket_path
        self.prefix = prefix
        self.most = most
        self.acked: dict[str, tuple[bytes, str]] = {}  # key id -> (bytes, handle)
        self.unacked: dict[str, bytes] = {}
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.ready = threading.Event()
        self.halt = threading.Event()
        self.sock = connect(socket_path)

    def run(self) -> None:
        try:
            for n in range(self.most):
                if self.halt.is_set():
                    break
                key_id, data = f"{self.prefix}-{n}", os.urandom(32)
                self.unacked[key_id] = data
                body = {"keyId": key_id, "usage": "sign", "keyBytes": b64(data)}
                started = time.monotonic()
                self.sock.sendall(rawhttp.build("POST", target("/key"), body))
                reply = rawhttp.read_reply(self.sock)
                self.latencies.append(time.monotonic() - started)
                self.statuses[reply.status] += 1
                if reply.status == 200:
                    self.acked[key_id] = (self.unacked.pop(key_id), reply.json()["keyHandle"])
                self.ready.set()
                time.sleep(0.01)
            self.halt.wait()  # its slot stays taken until the test is done
        except Exception as error:  # the test reports it
            self.failures.append(repr(error))
        finally:
            self.ready.set()
            self.sock.close()

    def start_and_wait(self) -> Writer:
        self.start()
        assert self.ready.wait(10)
        assert not self.failures, self.failures
        return self

    def finish(self) -> None:
        self.halt.set()
        self.join(20)
        assert not self.is_alive(), "the writer hangs"
        assert not self.failures, self.failures
        assert set(self.statuses) == {200}, self.statuses  # never refused, never an error
        assert len(self.acked) >= 5, self.statuses
        print(f"  writer: {len(self.acked)} imports acknowledged, {figures(self.latencies)}")


def check_on_disk(
    keyd: Keyd, acked: dict[str, tuple[bytes, str]], unacked: dict[str, bytes]
) -> None:
    """Acknowledged imports are on disk byte for byte; an unacknowledged one whole or absent."""
    for key_id, (data, _handle) in acked.items():
        path = keyd.keys_dir / key_file_name(key_id)
        assert path.exists(), f"acknowledged import {key_id} is not on disk"
        assert path.read_bytes() == data, f"{key_id} holds other bytes than were imported"
    for key_id, data in unacked.items():
        path = keyd.keys_dir / key_file_name(key_id)
        assert not path.exists() or path.read_bytes() == data, key_id


def check_handles_sign(keyd: Keyd, acked: dict[str, tuple[bytes, str]]) -> None:
    """The handle each import returned still signs, with the imported bytes."""
    for key_id, (data, handle) in acked.items():
        reply = keyd.call(
            "POST",
            "/sign",
            {"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": b64(b"m")}},
        )
        assert reply.status == 200, (key_id, reply.body)
        expected = hmac.new(data, b"m", hashlib.sha256).digest()
        assert base64.b64decode(reply.json()["signature"]) == expected, key_id


# -- the scenarios -----------------------------------------------------------------------


def test_other_uid_is_served_while_root_is_saturated_by_idle_and_slow_clients(
    started: Callable[[int], Keyd],
) -> None:
    """uid 0 holds all of its 10 slots (a writer, 4 slow bodies, 5 idle keep-alive
    connections) and tries 20 more; uid 65534 meanwhile imports, loads and signs. The slow
    bodies get 408 after the 5 s timeout and their slots, exactly 4, are free again. SIGTERM
    with all those connections open stops the daemon cleanly."""
    keyd = started(LIMIT)
    other = UidClient(NOBODY, keyd.socket)  # forked before any thread
    socks: list[socket.socket] = []
    dribbling = threading.Event()
    try:
        writer = Writer(keyd.socket, "ack").start_and_wait()  # slot 1
        slow = []
        for n in range(4):  # slots 2-5: a head, part of a 200-byte body, then a trickle or nothing
            sock = connect(keyd.socket, timeout=20)
            sock.sendall(
                f"POST {target('/key')} HTTP/1.1\r\ncontent-length: 200\r\n"
                f'content-type: application/json\r\n\r\n{{"keyId": "slow-{n}", '.encode()
            )
            slow.append(sock)
        sent_at = time.monotonic()
        idle = []
        for _ in range(5):  # slots 6-10; once these are answered the slow ones are counted too
            sock = connect(keyd.socket)
            sock.sendall(rawhttp.build("GET", target("/key/x")))
            assert rawhttp.read_reply(sock).status == 400  # served: no such key
            idle.append(sock)
        socks += slow + idle

        def trickle() -> None:
            while not dribbling.is_set():
                for sock in slow[:2]:
                    with contextlib.suppress(OSError):
                        sock.send(b" ")
                time.sleep(0.25)

        dribbler = threading.Thread(target=trickle, daemon=True)
        dribbler.start()

        refused = 0
        for _ in range(20):  # over the limit: closed without an answer
            with connect(keyd.socket) as sock:
                refused += send_and_check_refused(sock, rawhttp.build("GET", target("/key/x")))
        # A hang detector, and the condition for the count: no slow body has timed out yet.
        assert time.monotonic() - sent_at < 4.5, "20 refusals took seconds"
        assert refused == 20

        latencies = []
        for n in range(15):  # uid 65534 is not affected by uid 0's load
            secret = os.urandom(32)
            status, reply, seconds = other.request(
                "POST", "/key", {"keyId": f"other-{n}", "usage": "sign", "keyBytes": b64(secret)}
            )
            assert status == 200, reply
            handle = reply["keyHandle"]
            sign = {
                "keyHandle": handle,
                "algorithm": "HMAC-SHA256",
                "parameters": {"message": "bQ=="},
            }
            status, reply, more = other.request("POST", "/sign", sign)
            assert status == 200, reply
            assert base64.b64decode(reply["signature"]) == hmac.new(secret, b"m", "sha256").digest()
            status, reply, most = other.request("GET", f"/key/other-{n}")
            assert status == 200, reply
            assert other.request("POST", "/sign", sign | {"keyHandle": reply["keyHandle"]})[:2] == (
                200,
                {"signature": b64(hmac.new(secret, b"m", "sha256").digest())},
            )
            latencies += [seconds, more, most]
        status, reply, _ = other.request("GET", "/key/not-theirs")
        assert (status, reply) == (
            401,
            {"message": f"user {NOBODY} is not authorized to access the key not-theirs"},
        )
        print(f"\n  uid {NOBODY} while uid 0 is saturated: {figures(latencies)}")

        for sock in slow:  # 408 after the original's 5 s, then the connection is closed
            sock.settimeout(15)
            reply = rawhttp.read_reply(sock)
            assert (reply.status, reply.json()) == (408, {"message": "deadline has elapsed"})
            assert reply.headers["content-type"] == "application/json"
            assert is_refused(sock)  # i.e. closed: nothing more comes
        print(f"  slow bodies answered 408 after {time.monotonic() - sent_at:.1f} s")
        dribbling.set()
        dribbler.join(5)

        fresh: list[socket.socket] = []
        deadline = time.monotonic() + 10
        while len(fresh) < 4:  # exactly the slow bodies' 4 slots are free again
            sock = connect(keyd.socket)
            try:
                sock.sendall(rawhttp.build("GET", target("/key/x")))
                assert rawhttp.read_reply(sock).status == 400
                fresh.append(sock)
                socks.append(sock)
            except (ConnectionError, AssertionError):
                sock.close()  # the server has not seen a slow one's close yet
                assert time.monotonic() < deadline, "the slow bodies' slots are not freed"
                time.sleep(0.05)
        with connect(keyd.socket) as sock:
            request = rawhttp.build("GET", target("/key/x"))
            assert send_and_check_refused(sock, request), (
                "more than the freed slots were handed out"
            )

        writer.finish()
        check_on_disk(keyd, writer.acked, writer.unacked)
        assert f"{REFUSED} 0" in keyd.logs()
        assert f"{REFUSED} {NOBODY}" not in keyd.logs()
        assert keyd.stop() == 0  # idle keep-alive connections do not hold up the shutdown
    finally:
        dribbling.set()
        for sock in socks:
            sock.close()
        other.close()


def test_thousands_of_idle_connections_keep_memory_bounded(
    started: Callable[[int], Keyd],
) -> None:
    """120 uids open 15 idle connections each and uid 0 opens 1000 more than it may: each uid
    keeps exactly 10, the rest are closed without a byte; all 1210 kept ones are served at
    once, memory stays bounded, uid 0's imports go on, and every fd is released afterwards."""
    uids = [NOBODY] + list(range(30001, 30120))
    raise_fd_limit(2 * 15 * len(uids) + 2 * FLOOD + 1000)
    keyd = started(LIMIT)
    assert keyd.process is not None
    pid = keyd.process.pid
    clients = [UidClient(uid, keyd.socket) for uid in uids]  # forked before any thread
    flood: list[socket.socket] = []
    try:
        fds_before = open_fds(pid)
        writer = Writer(keyd.socket, "ack").start_and_wait()  # one of uid 0's slots
        before = memory_kib(pid)
        started = time.monotonic()
        for client in clients:
            client.send("hold", count=15)
        for client in clients:
            assert client.receive() == 15
        for _ in range(FLOOD):
            flood.append(connect(keyd.socket))
        for client in clients:
            client.send("classify", expect_closed=5)
        states = count(classify(flood, expect_closed=FLOOD - (LIMIT - 1)))
        assert states == {"open": LIMIT - 1, "closed": FLOOD - (LIMIT - 1)}, states
        for client in clients:
            assert client.receive() == {"open": LIMIT, "closed": 5}, client.uid
        held = len(clients) * LIMIT + LIMIT
        print(
            f"\n  {len(clients) * 15 + FLOOD} connections opened, {held} kept, "
            f"after {time.monotonic() - started:.1f} s; daemon fds {open_fds(pid)}"
        )

        for client in clients:  # every kept connection is a live one: one request on each
            client.send("use_held", method="GET", path="/key/nope")
        for client in clients:
            answers = client.receive()
            assert len(answers) == LIMIT
            message = f"user {client.uid} is not authorized to access the key nope"
            assert answers == [[401, {"message": message}]] * LIMIT, answers
        assert time.monotonic() - started < 25, "idle connections near the 30 s keep-alive timeout"
        peak = memory_kib(pid)
        growth = (peak["VmHWM"] - before["VmRSS"]) / 1024
        print(
            f"  RSS before {before['VmRSS'] / 1024:.1f} MiB, with {held} held "
            f"{peak['VmRSS'] / 1024:.1f} MiB, peak {peak['VmHWM'] / 1024:.1f} MiB "
            f"(+{growth:.1f} MiB)"
        )
        assert growth < 100, f"RSS grew {growth:.1f} MiB"

        for client in clients:
            client.send("release")
        for client in clients:
            assert client.receive() == LIMIT
        for sock in flood:
            sock.close()
        flood.clear()
        deadline = time.monotonic() + 10  # every connection's fd is released (the writer's stays)
        while open_fds(pid) > fds_before + 1:
            assert time.monotonic() < deadline, f"{open_fds(pid)} fds, {fds_before} before"
            time.sleep(0.1)
        status, reply, seconds = clients[0].request(
            "POST", "/key", {"keyId": "other-after", "usage": "sign"}
        )
        assert status == 200 and reply["keyHandle"].startswith("sr="), reply
        print(
            f"  after release: RSS {memory_kib(pid)['VmRSS'] / 1024:.1f} MiB, "
            f"fds {open_fds(pid)} (before {fds_before}), uid {NOBODY} answered in "
            f"{seconds * 1000:.1f} ms"
        )
        writer.finish()
        check_on_disk(keyd, writer.acked, writer.unacked)
        assert (keyd.keys_dir / key_file_name("other-after")).exists()
        logs = keyd.logs()
        assert f"{REFUSED} 0" in logs and f"{REFUSED} 30119" in logs
    finally:
        for sock in flood:
            sock.close()
        for client in clients:
            client.close()
    assert keyd.stop() == 0


def _huge_body(socket_path: str, chunked: bool) -> rawhttp.Reply:
    """An 8 MiB body, declared up front or chunked; sent until the server stops reading."""
    chunk = b" " * 0x10000
    with connect(socket_path, timeout=20) as sock:
        if chunked:
            head = "transfer-encoding: chunked"
            body = (b"10000\r\n" + chunk + b"\r\n") * 128 + b"0\r\n\r\n"
        else:
            head = f"content-length: {8 * MiB}"
            body = chunk * 128
        sock.sendall(
            f"POST {target('/key')} HTTP/1.1\r\n{head}\r\n"
            "content-type: application/json\r\n\r\n".encode()
        )
        try:
            sock.sendall(body)
        except OSError as error:  # it answers before reading it all, and closes
            assert error.errno in (errno.EPIPE, errno.ECONNRESET), error
        return rawhttp.read_reply(sock)


def test_concurrent_huge_bodies_get_413_and_acknowledged_writes_survive(
    started: Callable[[int], Keyd],
) -> None:
    """8 clients send 8 MiB bodies (declared or chunked) over and over, 2 others import keys
    with bodies of exactly 1 MiB, a writer imports small ones: the huge ones get 413, the
    others 200, memory stays bounded, and after a SIGKILL and a restart every acknowledged
    key is on disk and its handle signs."""
    keyd = started(32)
    assert keyd.process is not None
    pid = keyd.process.pid
    writer = Writer(keyd.socket, "ack").start_and_wait()
    before = memory_kib(pid)
    results: dict[str, list[Any]] = {"huge": [], "edge": [], "errors": []}
    edge_acked: dict[str, tuple[bytes, str]] = {}

    def huge(n: int) -> None:
        try:
            for round_ in range(HUGE_ROUNDS):
                reply = _huge_body(keyd.socket, chunked=(n + round_) % 2 == 1)
                results["huge"].append((reply.status, reply.json(), reply.headers["content-type"]))
        except Exception as error:
            results["errors"].append(repr(error))

    def edge(n: int) -> None:
        try:
            for round_ in range(EDGE_ROUNDS):
                key_id, data = f"edge-{n}-{round_}", os.urandom(32)
                start = json.dumps({"keyId": key_id, "usage": "sign", "keyBytes": b64(data)})
                raw = start.encode() + b" " * (MiB - len(start))
                with connect(keyd.socket, timeout=20) as sock:
                    sock.sendall(rawhttp.build("POST", target("/key"), raw_body=raw))
                    reply = rawhttp.read_reply(sock)
                results["edge"].append(reply.status)
                if reply.status == 200:
                    edge_acked[key_id] = (data, reply.json()["keyHandle"])
        except Exception as error:
            results["errors"].append(repr(error))

    threads = [threading.Thread(target=huge, args=(n,), daemon=True) for n in range(8)]
    threads += [threading.Thread(target=edge, args=(n,), daemon=True) for n in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a client hangs"
    elapsed = time.monotonic() - started
    peak = memory_kib(pid)
    writer.finish()

    assert results["errors"] == []
    too_large = (413, {"message": "request body too large"}, "application/json")
    assert results["huge"] == [too_large] * (8 * HUGE_ROUNDS)
    assert results["edge"] == [200] * (2 * EDGE_ROUNDS)
    growth = (peak["VmHWM"] - before["VmRSS"]) / 1024
    print(
        f"\n  {8 * HUGE_ROUNDS} × 8 MiB bodies refused, {2 * EDGE_ROUNDS} × 1 MiB imports "
        f"done in {elapsed:.1f} s; "
        f"RSS before {before['VmRSS'] / 1024:.1f} MiB, after {peak['VmRSS'] / 1024:.1f} MiB, "
        f"peak {peak['VmHWM'] / 1024:.1f} MiB (+{growth:.1f} MiB)"
    )
    assert growth < 100, f"RSS grew {growth:.1f} MiB"

    acked = writer.acked | edge_acked
    check_on_disk(keyd, acked, writer.unacked)
    keyd.stop(signal.SIGKILL)  # no chance to flush anything more
    keyd.start()
    check_on_disk(keyd, acked, writer.unacked)
    check_handles_sign(keyd, acked)
    reloaded = {}  # the id still names the key: a fresh handle from GET signs the same
    for key_id in list(edge_acked) + list(writer.acked)[:10]:
        reply = keyd.call("GET", f"/key/{key_id}")
        assert reply.status == 200, (key_id, reply.body)
        reloaded[key_id] = (acked[key_id][0], reply.json()["keyHandle"])
    check_handles_sign(keyd, reloaded)
    assert all(p.suffix == ".key" for p in keyd.keys_dir.iterdir())  # no temp file left
    assert keyd.stop() == 0


def test_a_client_that_never_reads_its_answers_does_not_hold_up_sigterm(
    started: Callable[[int], Keyd],
) -> None:
    """A client pipelines requests and never reads an answer, until the daemon's writes to it
    block and it stops reading. Others are still served, and SIGTERM still stops the daemon
    within its 10 s grace period (15 s allowed): the stuck connection is closed."""
    keyd = started(LIMIT)
    stuck = connect(keyd.socket)
    stuck.setblocking(False)
    requests = rawhttp.build("GET", target("/key/x")) * 100
    sent, progress, began = 0, time.monotonic(), time.monotonic()
    while time.monotonic() - progress < 1.0:  # until the daemon has read nothing for 1 s
        assert time.monotonic() - began < 30, "the daemon keeps reading and never blocks"
        try:
            sent += stuck.send(requests)
            progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:  # the daemon dropped the connection: fine too
            break
    print(
        f"\n  {sent // (len(requests) // 100)} requests pipelined before the daemon stopped reading"
    )
    try:
        assert keyd.call("GET", "/key/x").status == 400  # others are served meanwhile
        assert keyd.call("GET", "/key/y").status == 400
        try:
            code = keyd.stop(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        stuck.close()
    assert code == 0, "SIGTERM did not stop the daemon within 15 s"
    assert "closing a connection whose client stopped reading" in keyd.logs()


def test_the_per_uid_limit_holds_at_2000_connections_while_another_uid_is_served(
    started: Callable[[int], Keyd],
) -> None:
    """max_requests = 2000: uid 0 opens 2000 connections and each is served on the new loop;
    the next 50 are closed without a byte; uid 65534 imports and signs meanwhile; once uid 0
    lets go, every fd is released."""
    big = 2000
    raise_fd_limit(2 * big + 1000)
    keyd = started(big)
    assert keyd.process is not None
    pid = keyd.process.pid
    other = UidClient(NOBODY, keyd.socket)
    held: list[socket.socket] = []
    try:
        fds_before = open_fds(pid)
        request = rawhttp.build("GET", target("/key/x"))
        for _ in range(big):
            sock = connect(keyd.socket, timeout=20)
            sock.sendall(request)
            held.append(sock)
        for sock in held:  # every one of them is a served connection
            assert rawhttp.read_reply(sock).status == 400
        extra = [connect(keyd.socket) for _ in range(50)]
        states = count(classify(extra, expect_closed=50))
        assert states == {"closed": 50}, states
        status, reply, _ = other.request(
            "POST", "/key", {"keyId": "other-2000", "usage": "sign", "keyBytes": b64(bytes(32))}
        )
        assert status == 200, reply
        sign = {
            "keyHandle": reply["keyHandle"],
            "algorithm": "HMAC-SHA256",
            "parameters": {"message": b64(b"m")},
        }
        status, reply, _ = other.request("POST", "/sign", sign)
        assert status == 200, reply
        for sock in held[:10]:  # kept alive: a second request on the same connections
            sock.sendall(request)
            assert rawhttp.read_reply(sock).status == 400
        assert f"{REFUSED} 0" in keyd.logs()
        for sock in held + extra:
            sock.close()
        deadline = time.monotonic() + 10
        while open_fds(pid) > fds_before:
            assert time.monotonic() < deadline, f"{open_fds(pid)} fds, {fds_before} before"
            time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        other.close()
    assert keyd.stop() == 0
