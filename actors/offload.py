"""Work off the event loop, shared by every service.

Work that costs more than a thread hop (tens of microseconds) runs in worker threads, so one
caller's large or slow request does not hold the event loop that serves every other caller.
One limiter for the whole daemon, not one per service: the threads are kept to the cores, and
beyond that they would only queue inside the OS whichever service started them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

_limiter: trio.CapacityLimiter | None = None


def _workers() -> trio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
    return _limiter


async def in_worker(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread (for OpenSSL calls, which release the GIL)."""
    return await trio.to_thread.run_sync(function, *args, limiter=_workers())


# Input below which work costs less than the hop to a worker thread (hashing, AES, JSON).
SMALL = 64 * 1024


async def sized(size: int, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` here when its input is small, in a worker thread when it is large."""
    if size < SMALL:
        return function(*args)
    return await in_worker(function, *args)
