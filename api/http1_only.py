"""Speak HTTP/1.1 only, as the original's server (hyper, http1) does.

hypercorn switches a connection to HTTP/2 on an `Upgrade: h2c` request or on the HTTP/2
preface. Over HTTP/2 one connection carries many requests at once, which would slip past the
per-uid connection limit (spec §1.5) and the one-request-at-a-time framing clients rely on. With
the check gone, an `Upgrade` header is ignored and a preface is just a request we refuse.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import h11 as hypercorn_h11


async def _stay_on_http1(self: Any, event: Any) -> None:
    return None


def install() -> None:
    """Idempotent."""
    hypercorn_h11.H11Protocol._check_protocol = _stay_on_http1  # type: ignore[method-assign]
