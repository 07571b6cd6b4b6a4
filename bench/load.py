"""A closed-loop HTTP/1.1 load generator over a Unix socket: N keep-alive connections, each
sending its next request as soon as the previous answer is complete."""

from __future__ import annotations

import itertools
import selectors
import socket
import time
from collections import Counter
from collections.abc import Sequence

import attrs


@attrs.frozen
class Figures:
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    reconnects: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def line(self, label: str) -> str:
        return (
            f"{label:44} {self.rate:8.0f} req/s   p50 {self.p50_ms:6.2f} ms   "
            f"p99 {self.p99_ms:6.2f} ms   errors {self.errors}   reconnects {self.reconnects}"
        )


def _complete(buffer: bytes) -> tuple[int, int] | None:
    """(status, total length) once a whole response is in `buffer`."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].decode("latin-1")
    status = int(head[9:12])
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    total = end + 4 + length
    return (status, total) if len(buffer) >= total else None


def run(
    path: str,
    request: bytes | Sequence[bytes],
    connections: int,
    seconds: float,
    warmup: float = 0.3,
    *,
    expected: int = 200,
    statuses: Counter[int] | None = None,
) -> Figures:
    """`request`, or several sent in turn across all connections; an answer whose status is
    not `expected` is an error, and `statuses` (when given) counts every status measured."""
    selector = selectors.DefaultSelector()
    state: dict[socket.socket, list] = {}
    turn = itertools.cycle([request] if isinstance(request, bytes) else request)

    def send(sock: socket.socket) -> None:
        state[sock][1] = time.perf_counter()
        sock.sendall(next(turn))  # small requests: the socket buffer takes them whole

    def open_connection() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        selector.register(sock, selectors.EVENT_READ)
        state[sock] = [b"", 0.0]
        sock.setblocking(False)
        send(sock)

    for _ in range(connections):
        open_connection()
    latencies: list[float] = []
    errors = reconnects = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds
    while True:
        now = time.perf_counter()
        if now >= stop:
            break
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:  # the server closed it: reconnect, count it
                selector.unregister(sock)
                del state[sock]
                sock.close()
                reconnects += 1
                open_connection()
                continue
            entry = state[sock]
            entry[0] += data
            done = _complete(entry[0])
            if done is None:
                continue
            status, total = done
            finished = time.perf_counter()
            if finished >= measure_from:
                latencies.append(finished - entry[1])
                errors += status != expected
                if statuses is not None:
                    statuses[status] += 1
            entry[0] = entry[0][total:]
            send(sock)
    for sock in state:
        sock.close()
    latencies.sort()
    count = len(latencies)
    return Figures(
        requests=count,
        errors=errors,
        seconds=seconds,
        p50_ms=latencies[count // 2] * 1000 if count else 0.0,
        p99_ms=latencies[int(count * 0.99)] * 1000 if count else 0.0,
        reconnects=reconnects,
    )
