"""The loop that serves one actor's mailbox.

An actor is any object with `async handle(op, args, caller) -> result` (`protocol.dispatcher`
makes one from a typed protocol). Its loop decodes each envelope,
runs the handler in a task of its own (bounded by `max_in_flight`, so a full mailbox still pushes
back), replies, and keeps going. A handler's `BusError` goes back to the caller as is; any other
exception becomes `internal` for that caller only. `InjectedCrash` (or any BaseException that is
not a cancellation) kills the actor: every request it was serving gets `unavailable`, and the
supervisor decides whether to start it again.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from . import codec
from .bus import Bus
from .errors import BusError, ErrorKind
from .faults import Faults, InjectedCrash

log = logging.getLogger(__name__)


class Handler(Protocol):
    async def handle(self, op: str, args: dict[str, Any], caller: list[Any] | None) -> Any: ...


class ActorCrashed(Exception):
    """The actor died; `__cause__` says why."""


async def serve_actor(
    bus: Bus,
    name: str,
    handler: Handler,
    inbox: trio.MemoryReceiveChannel[bytes],
    faults: Faults,
    *,
    max_in_flight: int = 64,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `inbox` until it is closed; raise `ActorCrashed` if the actor dies."""
    in_flight: set[int] = set()
    slots = trio.Semaphore(max_in_flight)
    deliver_point = f"bus.deliver.{name}"

    async def serve_one(message: dict[str, Any]) -> None:
        request_id = message["id"]
        try:
            await faults.hit(deliver_point)
            with trio.move_on_at(message["deadline"]) as scope:
                result = await handler.handle(message["op"], message["args"], message["caller"])
            if not scope.cancelled_caught:  # else its caller has already been told `timeout`
                bus.send_result(request_id, result)
        except BusError as error:
            bus.send_error(request_id, error)
        except InjectedCrash:
            raise
        except Exception as error:
            log.exception("%s: %s failed: %s", name, message.get("op"), error)
            bus.send_error(request_id, BusError(ErrorKind.INTERNAL, "internal error"))
        finally:
            slots.release()
        # Reached only once the caller has its answer; a crash or cancellation skips it, and
        # the loop's cleanup answers `unavailable` instead.
        in_flight.discard(request_id)

    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for encoded in inbox:
                message = codec.decode(encoded)
                if message["deadline"] <= trio.current_time():
                    continue  # its caller stopped waiting while it sat in the mailbox
                try:
                    slots.acquire_nowait()  # the usual case: no extra trip through the scheduler
                except trio.WouldBlock:
                    await slots.acquire()
                in_flight.add(message["id"])
                nursery.start_soon(serve_one, message)
    except* InjectedCrash as group:
        raise ActorCrashed(f"actor {name} crashed") from group.exceptions[0]
    finally:
        for request_id in in_flight:
            bus.send_error(
                request_id,
                BusError(ErrorKind.UNAVAILABLE, f"{name} restarted while serving this request"),
            )
