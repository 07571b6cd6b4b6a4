"""Read requests as the original's server (hyper) reads them, where h11 and hypercorn differ.

h11 (pinned 0.16.0 alongside hypercorn) builds each parsed request through the name `Request`
in `h11._readers`; we give it a factory that makes these changes, and nothing else:

- An HTTP/1.1 request without a Host header, or with several, is accepted (h11 answers 400).
  The original's synchronous key client (used by its openssl engine) never sends Host, and
  hyper does not count them. Only the first is kept: nothing here reads Host.
- A method is case-sensitive (RFC 9110 §9.1). hypercorn upper-cases it before the app sees it,
  so `get` would act as `GET` and `delete` would delete; for hyper `get` is just an unknown
  method. Such a method gets a `~` prefix (a token character no real method starts with),
  which keeps it unknown after hypercorn's upper-casing.
"""

from __future__ import annotations

from typing import Any

import h11
from h11 import _readers

_HOST = b"host"
UNKNOWN_METHOD_MARK = b"~"


def _request_as_hyper_reads_it(
    *, headers: list[tuple[bytes, bytes]], method: bytes, **fields: Any
) -> h11.Request:
    hosts = [index for index, (name, _) in enumerate(headers) if name.lower() == _HOST]
    if not hosts:
        headers = [*headers, (_HOST, b"")]
    elif len(hosts) > 1:
        headers = [header for index, header in enumerate(headers) if index not in hosts[1:]]
    if method != method.upper():
        method = UNKNOWN_METHOD_MARK + method
    return h11.Request(headers=headers, method=method, **fields)


def install() -> None:
    """Idempotent: applies to every request h11 reads from a client in this process."""
    _readers.Request = _request_as_hyper_reads_it  # type: ignore[attr-defined,assignment]
