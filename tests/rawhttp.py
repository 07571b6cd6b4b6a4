"""A deliberately small HTTP/1.1 client over a Unix socket, independent of the server's stack.

It sends exactly the bytes a test asks for, like the original's synchronous key client, and
parses the response strictly: status line, headers, a body of `content-length` bytes.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import attrs


@attrs.frozen
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    first_read: bytes  # what one recv() returned: the head must be in it

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> str:
        return self.json()["message"]


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def build(
    method: str,
    target: str,
    body: Any = None,
    *,
    raw_body: bytes | None = None,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    if body is not None:
        raw_body = json.dumps(body).encode()
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if raw_body is not None:
        lines.append(f"content-length: {len(raw_body)}")
        if content_type is not None:
            lines.append(f"content-type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (raw_body or b"")


def read_reply(sock: socket.socket, head_request: bool = False) -> Reply:
    first = sock.recv(65536)
    data = first
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed mid-head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    _version, status, reason = (status_line.split(" ", 2) + [""])[:3]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_request else int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Reply(int(status), reason, headers, rest[:length], first)


def request(path: str, method: str, target: str, body: Any = None, **options: Any) -> Reply:
    """One request on a fresh connection, as the synchronous key client does it."""
    with connect(path) as sock:
        sock.sendall(build(method, target, body, **options))
        return read_reply(sock, head_request=method == "HEAD")
