"""A blocking JSON-over-HTTP call to one of aziotd's Unix sockets, for the checks that ask a
service (certs-read, key-pairs-read). Only the standard library: the CLI stays light."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs

KEYD_API = "2021-05-01"
CERTD_API = "2020-09-01"
# Characters the original's clients leave as they are in a key or cert id (spec/api.md §3.5).
_ID_SAFE = "/%!$&'()*+,;=:@-._~"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@attrs.frozen
class Reply:
    status: int
    body: Any

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("message"), str):
            return self.body["message"]
        return repr(self.body)


def quote_id(item_id: str) -> str:
    return quote(item_id, safe=_ID_SAFE)


def call(
    socket_path: Path, method: str, target: str, body: Any = None, timeout: float = 10.0
) -> Reply:
    """Raises OSError when the socket does not answer."""
    connection = _UnixConnection(socket_path, timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if payload is None else {"content-type": "application/json"}
        connection.request(method, target, body=payload, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except http.client.HTTPException as error:
        raise OSError(f"bad HTTP reply from {socket_path}: {error!r}") from None
    finally:
        connection.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return Reply(response.status, parsed)
