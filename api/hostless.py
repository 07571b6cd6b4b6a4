"""Accept HTTP/1.1 requests without a Host header, as the original's server (hyper) does.

The original's synchronous key client (used by its openssl engine) never sends Host; h11
answers such requests with 400. h11 (pinned 0.16.0 alongside hypercorn) builds parsed requests
through the name `Request` in `h11._readers`; we give it a factory that supplies an empty Host
when none was sent. Nothing else about h11's parsing changes.
"""

from __future__ import annotations

from typing import Any

import h11
from h11 import _readers

_HOST = b"host"


def _request_host_optional(*, headers: list[tuple[bytes, bytes]], **fields: Any) -> h11.Request:
    if not any(name.lower() == _HOST for name, _ in headers):
        headers = [*headers, (_HOST, b"")]
    return h11.Request(headers=headers, **fields)


def install() -> None:
    """Idempotent: the requests h11 reads from clients may then omit Host."""
    _readers.Request = _request_host_optional  # type: ignore[attr-defined,assignment]
