"""Serve an ASGI app on a Unix socket with hypercorn's HTTP/1.1 machinery, plus what we need.

hypercorn 0.18.0 (pinned) is used below its `serve()`: we run the accept loop so that each
connection's peer credentials are read once (SO_PEERCRED) and handed to the app in the scope
as `scope["peer"] = (uid, pid)`, and so that the per-uid connection limit of the original
(`max_requests`) applies before any byte is read. `_Connection` also holds a response head
until its body follows, so the status line, headers and body leave in one write: the
original's synchronous key client requires the whole head in its first read.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import struct
from collections import Counter
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from . import h11_as_hyper, http1_only

log = logging.getLogger(__name__)

GRACE_PERIOD = 10.0  # how long in-flight requests may run on after SIGTERM
_PEERCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(uid, pid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return uid, pid


def bind_unix(path: Path, mode: int = 0o660) -> socket.socket:
    """Bind `path` as the original does: remove what is there (even a directory), then chmod."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def hypercorn_config() -> Config:
    config = Config()
    config.include_server_header = False  # hyper sends none
    config.keep_alive_timeout = 30
    # hypercorn closes a keep-alive connection after this many requests, racing the client's
    # next request on it; a device's clients never get near this.
    config.keep_alive_max_requests = 1 << 62
    config.h11_max_incomplete_size = 16 * 1024
    return config


class _PeerApp:
    """hypercorn's app wrapper for one connection: puts the peer into every request's scope."""

    def __init__(self, inner: ASGIWrapper, peer: tuple[int, int]) -> None:
        self._inner = inner
        self._peer = peer

    async def __call__(self, scope: dict[str, Any], *rest: Any) -> None:
        scope["peer"] = self._peer
        await self._inner(scope, *rest)


class _Connection(TCPServer):
    """hypercorn's per-connection server, with three changes: a response head leaves together
    with its body; a connection the peer has closed ends at once instead of waiting out the
    keep-alive timer (it would hold its uid's connection slot until then); and the close waits
    for a response being written, as hyper writes its answer before it closes."""

    _held = b""

    async def _close(self) -> None:
        # hypercorn sends EOF outside its send lock: when a client half-closes while its answer
        # is being written, the EOF collides with the write (BusyResourceError) and the answer
        # is lost.
        async with self.send_lock:
            await super()._close()

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            data = event.data
            if self._held:
                data, self._held = self._held + data, b""
            elif data.startswith(b"HTTP/1.1 ") and data[9:10] != b"1":
                self._held = _with_reason(data)  # a final response head: its body comes next
                return
            await super().protocol_send(RawData(data=data))
            return
        if self._held:
            held, self._held = self._held, b""
            await super().protocol_send(RawData(data=held))
        await super().protocol_send(event)


def _with_reason(head: bytes) -> bytes:
    """h11 leaves the reason phrase empty when ASGI gives none; hyper sends the standard one."""
    if head[12:14] != b" \r":
        return head
    try:
        phrase = HTTPStatus(int(head[9:12])).phrase.encode("ascii")
    except ValueError:
        return head
    return head[:13] + phrase + head[13:]


class UnixServer:
    """One service's socket: accepts, limits connections per uid, drains on shutdown."""

    def __init__(self, name: str, app: Any, sock: socket.socket, max_connections: int) -> None:
        self.name = name
        self._app = ASGIWrapper(app)
        self._sock = sock
        self.max_connections = max_connections
        self._config = hypercorn_config()
        self._context = WorkerContext(None)
        self._per_uid: Counter[int] = Counter()
        self._streams: set[trio.SocketStream] = set()
        h11_as_hyper.install()
        http1_only.install()

    async def serve(
        self, shutdown: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        async with trio.open_nursery() as watchdog:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners,
                            self._serve_connection,
                            [listener],
                            handler_nursery=connections,
                        )
                    )
                    task_status.started()
                    await shutdown.wait()
                    accepting.cancel_scope.cancel()
                await listener.aclose()
                await self._context.terminated.set()  # idle keep-alive connections close now
                connections.cancel_scope.deadline = trio.current_time() + GRACE_PERIOD
                watchdog.start_soon(self._close_stuck_connections, GRACE_PERIOD + 1.0)
                log.info("%s: stopped accepting; draining open connections", self.name)
            watchdog.cancel_scope.cancel()
        log.info("%s: socket closed", self.name)

    async def _close_stuck_connections(self, after: float) -> None:
        """Cancellation cannot reach a response write hypercorn shields: a client that stops
        reading would hold the shutdown forever. Closing the socket ends that write."""
        await trio.sleep(after)
        for stream in list(self._streams):
            log.warning("%s: closing a connection whose client stopped reading", self.name)
            stream.socket.close()

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            uid, pid = peer_credentials(stream.socket)
        except OSError as error:
            log.warning("%s: could not read peer credentials: %s", self.name, error)
            await stream.aclose()
            return
        if self._per_uid[uid] >= self.max_connections:
            log.warning(
                "%s: Max simultaneous connections reached for user %d (pid %d)", self.name, uid, pid
            )
            await stream.aclose()
            return
        self._per_uid[uid] += 1
        self._streams.add(stream)
        try:
            await _Connection(
                _PeerApp(self._app, (uid, pid)), self._config, self._context, {}, stream
            ).run()
        finally:
            self._streams.discard(stream)
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]
