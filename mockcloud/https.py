"""HTTPS plumbing shared by the mock cloud servers.

A mock server is a function from `HttpRequest` to `HttpResponse`; `HttpsServer` runs it on a
background thread over TLS (or plain HTTP), one thread per connection. It can stop listening and
start again on the same port, so a test can watch a client meet "connection refused" and recover.

The TLS handshake runs on the connection's own thread, not in `accept`, so one stuck or hostile
client cannot hold up the listener.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from cryptography import x509

log = logging.getLogger(__name__)

# How long a client may take to finish the handshake or send the next request.
IO_TIMEOUT = 30.0
# How often the listener checks for shutdown: short, so stop() and pause() are quick in tests.
POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str  # as sent, with any query string
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    client_cert: x509.Certificate | None  # TLS client leaf, already verified by the TLS layer
    client_address: tuple[str, int]


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, message: str, **headers: str) -> HttpResponse:
        return cls(status, message.encode(), {"content-type": "text/plain", **headers})


App = Callable[[HttpRequest], HttpResponse]


def server_tls_context(
    cert_chain_path: str, key_path: str, client_ca_path: str | None = None
) -> ssl.SSLContext:
    """TLS 1.2+ server context. With `client_ca_path` the server asks every client for a
    certificate in the first handshake (no TLS 1.3 post-handshake auth: many clients lack it)
    but lets clients without one through, so HTTP auth can decide."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_chain_path, key_path)
    if client_ca_path is not None:
        context.load_verify_locations(cafile=client_ca_path)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients expect
    timeout = IO_TIMEOUT
    server: _Listener

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except ValueError as error:
            self._send(HttpResponse.text(400, f"bad request body: {error}"))
            self.close_connection = True
            return
        request = HttpRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            client_cert=self._client_cert(),
            client_address=self.client_address[:2],
        )
        try:
            response = self.server.app(request)
        except Exception:
            log.exception("%s %s: the mock server failed", self.command, self.path)
            response = HttpResponse.text(500, "mock server failed")
        self._send(response)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers end at an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        if length < 0:
            raise ValueError("negative content-length")
        return self.rfile.read(length)

    def _client_cert(self) -> x509.Certificate | None:
        if not isinstance(self.connection, ssl.SSLSocket):
            return None
        der = self.connection.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None

    def _send(self, response: HttpResponse) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


class _Listener(ThreadingHTTPServer):
    """One listening socket; wraps each accepted connection in TLS on its own thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App, tls: ssl.SSLContext | None) -> None:
        self.app = app
        self.tls = tls
        self._live: set[socket.socket] = set()
        self._live_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN: a DNS lookup nobody here needs.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def finish_request(self, request: Any, client_address: Any) -> None:
        connection: socket.socket = request
        connection.settimeout(IO_TIMEOUT)
        if self.tls is not None:
            try:
                connection = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as error:
                log.info("TLS handshake with %s:%s failed: %s", *client_address[:2], error)
                return
        with self._live_lock:
            self._live.add(connection)
        try:
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            with self._live_lock:
                self._live.discard(connection)
            _close(connection)

    def drop_connections(self) -> None:
        """Cut every open connection, so keep-alive clients see the outage too."""
        with self._live_lock:
            live = list(self._live)
        for connection in live:
            _close(connection)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()


class Lifecycle:
    """`with` support for anything that starts and stops: `start()` on entry, `stop()` on exit."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class HttpsServer(Lifecycle):
    """Serves `app` on `host:port` (port 0: any free one) from a background thread."""

    def __init__(
        self,
        app: App,
        tls: ssl.SSLContext | None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "mockcloud",
    ) -> None:
        self._app = app
        self._tls = tls
        self._host = host
        self._port = port
        self._name = name
        self._lock = threading.Lock()
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._started = False

    @property
    def port(self) -> int:
        if not self._started:
            raise RuntimeError("server not started")
        return self._port

    @property
    def host(self) -> str:
        return self._host

    @property
    def scheme(self) -> str:
        return "http" if self._tls is None else "https"

    @property
    def started(self) -> bool:
        return self._started

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def start(self) -> Self:
        with self._lock:
            if self._started:
                raise RuntimeError("server already started")
            self._listen()
            self._started = True
        log.info("%s listening on %s://%s:%d", self._name, self.scheme, self._host, self._port)
        return self

    def stop(self) -> None:
        with self._lock:
            self._unlisten()
            self._started = False
        log.info("%s stopped", self._name)

    def pause(self) -> None:
        """Stop listening and drop open connections; new connections are refused."""
        with self._lock:
            if not self._started:
                raise RuntimeError("server not started")
            self._unlisten()
        log.info("%s refusing connections on port %d", self._name, self._port)

    def resume(self) -> None:
        """Listen again on the same port after `pause`."""
        with self._lock:
            if not self._started:
                raise RuntimeError("server not started")
            if self._listener is None:
                self._listen()
        log.info("%s listening again on port %d", self._name, self._port)

    def _listen(self) -> None:
        listener = _Listener((self._host, self._port), self._app, self._tls)
        self._port = listener.server_address[1]
        thread = threading.Thread(
            target=listener.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name=f"{self._name}:{self._port}",
            daemon=True,
        )
        thread.start()
        self._listener, self._thread = listener, thread

    def _unlisten(self) -> None:
        listener, thread = self._listener, self._thread
        self._listener = self._thread = None
        if listener is None:
            return
        listener.shutdown()
        listener.server_close()
        listener.drop_connections()
        if thread is not None:
            thread.join()
