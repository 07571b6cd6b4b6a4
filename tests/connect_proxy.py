"""A minimal HTTP CONNECT proxy for tests: it tunnels bytes and records where each tunnel went,
so a test can show that TLS (client certificate included) ran end to end through it.

`routes` sends a CONNECT target to another address: a test names a host the client cannot
resolve (or a port nothing listens on) and routes it to the real server, so whatever reached
that server came through the proxy."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Mapping
from typing import Self


class _Tunnel(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _ = line.split(" ", 2)
        self.server.seen.append(line)
        self.server.heads.append(head.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        address = self.server.routes.get(target.lower(), (host, int(port)))
        try:
            upstream = socket.create_connection(address, timeout=10)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            pump = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
            pump.start()
            _copy(client, upstream)
            pump.join(timeout=10)


def _copy(source: socket.socket, destination: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            destination.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            destination.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    seen: list[str]
    heads: list[str]
    routes: Mapping[str, tuple[str, int]]


class ConnectProxy:
    """`with ConnectProxy() as proxy:` … `proxy.url`, `proxy.seen` (request lines),
    `proxy.heads` (each request's line and headers). `routes`: CONNECT target (`host:port`,
    any case) → the address the tunnel really goes to."""

    def __init__(self, routes: Mapping[str, tuple[str, int]] | None = None) -> None:
        self._server = _Server(("127.0.0.1", 0), _Tunnel)
        self._server.seen = []
        self._server.heads = []
        self._server.routes = {k.lower(): v for k, v in (routes or {}).items()}
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def seen(self) -> list[str]:
        return list(self._server.seen)

    @property
    def heads(self) -> list[str]:
        return list(self._server.heads)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
