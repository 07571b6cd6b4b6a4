"""Serve one service's HTTP API on a Unix socket: accept, identify, limit, drain.

Each connection's peer credentials are read once (SO_PEERCRED) and the per-uid connection limit
of the original (`max_requests`) applies before any byte is read. Each connection is then served
by its own task (`http1.Http1Connection`), which calls the service for each request.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import stat
import struct
import time
from collections import Counter
from pathlib import Path

import trio

from .http1 import IDLE_TIMEOUT, Http1Connection, Responder

log = logging.getLogger(__name__)

GRACE_PERIOD = 10.0  # how long in-flight requests may run on after SIGTERM
# struct ucred: pid_t is signed, uid_t and gid_t are unsigned (a uid may be 2^31 or more)
_PEERCRED = struct.Struct("iII")
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(uid, pid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return uid, pid


def bind_unix(path: Path, mode: int = 0o660) -> socket.socket:
    """Bind `path` as the original does: remove what is there (even a directory), then chmod."""
    _make_dirs(path.parent, 0o755)
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


def _make_dirs(path: Path, mode: int) -> None:
    """mkdir -p with `mode` whatever the umask: a world-writable socket dir would let another
    user put their own socket in our place."""
    if path.is_dir():
        return
    _make_dirs(path.parent, mode)
    try:
        path.mkdir()
    except FileExistsError:
        return
    os.chmod(path, mode)


class UnixServer:
    """One service's socket: accepts, limits connections per uid, drains on shutdown."""

    def __init__(
        self,
        name: str,
        respond: Responder,
        sock: socket.socket,
        max_connections: int,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.name = name
        self._respond = respond
        self._sock = sock
        self.max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._per_uid: Counter[int] = Counter()
        self._open: dict[Http1Connection, trio.CancelScope] = {}

    async def serve(
        self, shutdown: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = trio.socket.from_stdlib_socket(self._sock)
        async with trio.open_nursery() as watchdog:
            async with trio.open_nursery() as connections:
                with trio.CancelScope() as accepting:
                    connections.start_soon(self._cancel_on, shutdown, accepting)
                    watchdog.start_soon(self._close_idle_connections)
                    task_status.started()
                    while True:
                        await self._accept(listener, connections)
                listener.close()
                log.info("%s: stopped accepting; draining open connections", self.name)
                for connection, scope in list(self._open.items()):
                    connection.stopping = True
                    if connection.idle:  # between requests: nothing in flight to finish
                        scope.cancel()
                watchdog.start_soon(self._close_stuck_connections, GRACE_PERIOD)
            watchdog.cancel_scope.cancel()
        log.info("%s: socket closed", self.name)

    async def _accept(self, listener: trio.socket.SocketType, connections: trio.Nursery) -> None:
        try:
            client, _ = await listener.accept()
        except OSError as error:
            if error.errno not in _OUT_OF_RESOURCES:
                raise
            # Out of file descriptors: the connections we have will free some.
            log.warning("%s: cannot accept a connection: %s", self.name, error)
            await trio.sleep(0.1)
            return
        self._admit(client, connections)

    @staticmethod
    async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    def _admit(self, client: trio.socket.SocketType, connections: trio.Nursery) -> None:
        try:
            uid, pid = peer_credentials(client)  # type: ignore[arg-type]
        except OSError as error:
            log.warning("%s: could not read peer credentials: %s", self.name, error)
            client.close()
            return
        if self._per_uid[uid] >= self.max_connections:
            log.warning(
                "%s: Max simultaneous connections reached for user %d (pid %d)", self.name, uid, pid
            )
            client.close()
            return
        self._per_uid[uid] += 1
        connection = Http1Connection(client, self._respond, uid, pid, self._idle_timeout)
        connections.start_soon(self._serve, connection)

    async def _serve(self, connection: Http1Connection) -> None:
        with trio.CancelScope() as scope:
            self._open[connection] = scope
            try:
                await connection.serve()
            finally:
                del self._open[connection]
                uid = connection.uid
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]

    async def _close_idle_connections(self) -> None:
        """A connection waiting for its next head longer than the idle timeout is closed, as
        the original's keep-alive timer does. One sweep here instead of a timer per request."""
        period = min(1.0, self._idle_timeout / 4)
        while True:
            await trio.sleep(period)
            too_old = time.monotonic() - self._idle_timeout
            for connection, scope in list(self._open.items()):
                since = connection.waiting_since
                if since is not None and since < too_old:
                    scope.cancel()

    async def _close_stuck_connections(self, after: float) -> None:
        """In-flight requests had `after` seconds to finish; whatever is still open ends now."""
        await trio.sleep(after)
        for connection, scope in list(self._open.items()):
            if connection.sending:
                log.warning("%s: closing a connection whose client stopped reading", self.name)
            else:
                log.warning(
                    "%s: closing a connection whose request did not finish in %.0f s",
                    self.name,
                    after,
                )
            scope.cancel()
