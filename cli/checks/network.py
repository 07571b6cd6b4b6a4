"""Network calls bounded in time: TLS handshakes (directly or through an HTTP CONNECT proxy).

Name resolution is not covered by socket timeouts, so every call runs in a daemon thread that
the caller stops waiting for at its deadline: a device without DNS or internet gets an answer
in the time asked, never a hang.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote, urlsplit

T = TypeVar("T")


class Timeout(Exception):
    pass


def bounded(seconds: float, function: Callable[[], T]) -> T:
    """`function()`, or Timeout after `seconds` (the thread is left to end on its own)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(function())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="aziotctl-check-net")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise Timeout(f"no answer within {seconds:g} s")
    if error:
        raise error[0]
    return result[0]


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port)
    return value, default_port


def _connect_via_proxy(proxy_uri: str, host: str, port: int, deadline: float) -> socket.socket:
    proxy = urlsplit(proxy_uri)
    if proxy.scheme not in ("http", "") or not proxy.hostname:
        raise ValueError(f"proxy URI {proxy_uri!r} is not http://host[:port]")
    sock = socket.create_connection(
        (proxy.hostname, proxy.port or 80), timeout=max(deadline - time.monotonic(), 0.1)
    )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.username is not None:
        credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
        lines.append(
            f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}"
        )
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = b""
    while b"\r\n\r\n" not in head:
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        chunk = sock.recv(4096)
        if not chunk:
            sock.close()
            raise ConnectionError(f"proxy {proxy_uri} closed the connection before answering")
        head += chunk
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        sock.close()
        raise ConnectionError(f"proxy {proxy_uri} refused CONNECT {target}: {status_line}")
    return sock


def tls_handshake(host: str, port: int, proxy_uri: str | None, seconds: float) -> None:
    """Connect and complete a TLS handshake verified against the system's trust store (OpenSSL's
    defaults, so SSL_CERT_FILE / SSL_CERT_DIR apply), within `seconds`."""

    def run() -> None:
        deadline = time.monotonic() + seconds
        if proxy_uri:
            sock = _connect_via_proxy(proxy_uri, host, port, deadline)
        else:
            sock = socket.create_connection((host, port), timeout=seconds)
        context = ssl.create_default_context()
        with sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            with context.wrap_socket(sock, server_hostname=host):
                pass

    bounded(seconds, run)
