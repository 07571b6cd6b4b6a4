"""Running one actor: how its requests reach its handler, and what a crash does.

An actor is any object with `async handle(op, args, caller) -> result` (`protocol.dispatcher`
makes one from a typed protocol), and optionally `async background()`, run beside its requests
for as long as it runs. While it runs, the bus hands each request to its endpoint,
and the caller's task runs the handler on the decoded message, bounded by `max_in_flight` slots
and the request's deadline. Requests that arrive while it is (re)starting wait in its bounded
mailbox and are served from there once it runs; so do those sent after it crashed and
before its task unwound, for the next incarnation. A handler's `BusError` goes back to the caller
as is; any other exception becomes `internal` for that caller only. `InjectedCrash` kills the
actor: every request it is serving gets `unavailable`, and the supervisor decides whether to
start it again.
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


class HasBackground(Protocol):
    """An actor with work of its own between requests (certs: its renewal scheduler)."""

    async def background(self) -> None: ...


class ActorCrashed(Exception):
    """The actor died; `__cause__` says why."""


class _Endpoint:
    """A running actor as the bus reaches it directly: the caller's task runs the handler.

    Delivery through the mailbox costs three task switches and a task per request; here a
    request is still encoded and decoded, bounded by the actor's in-flight slots and its
    deadline, and a crash still takes down the actor (every request it is serving answers
    `unavailable`, the supervisor restarts it). Only which task runs the handler changes.
    """

    def __init__(self, name: str, handler: Handler, faults: Faults, max_in_flight: int) -> None:
        self.name = name
        self._handler = handler
        self._faults = faults
        self._deliver_point = f"bus.deliver.{name}"
        self._slots = trio.Semaphore(max_in_flight)
        self._running: set[trio.CancelScope] = set()
        self.crash: BaseException | None = None
        self.crashed = trio.Event()
        self.stopped = False

    async def call(self, encoded: bytes) -> dict[str, Any] | None:
        """Serve one encoded request: its encoded-then-decoded reply (`ok` or `err`), or None
        when its deadline passed first."""
        message = codec.decode(encoded)
        with trio.CancelScope(deadline=message["deadline"]) as scope:
            self._running.add(scope)
            try:
                await self._acquire()
                try:
                    return codec.decode(await self._serve(message))
                finally:
                    self._slots.release()
            finally:
                self._running.discard(scope)
        if self.crash is not None or self.stopped:
            return _unavailable(self.name)
        return None

    async def _acquire(self) -> None:
        try:
            self._slots.acquire_nowait()  # the usual case: no trip through the scheduler
        except trio.WouldBlock:
            await self._slots.acquire()

    async def _serve(self, message: dict[str, Any]) -> bytes:
        request_id = message["id"]
        try:
            await self._faults.hit(self._deliver_point)
            result = await self._handler.handle(message["op"], message["args"], message["caller"])
            return codec.encode({"id": request_id, "ok": result})
        except BusError as error:
            return codec.encode({"id": request_id, "err": error.to_wire()})
        except InjectedCrash as error:
            self.die(error)
            return codec.encode({"id": request_id, **_unavailable(self.name)})
        except Exception as error:
            log.exception("%s: %s failed: %s", self.name, message.get("op"), error)
            internal = BusError(ErrorKind.INTERNAL, "internal error")
            return codec.encode({"id": request_id, "err": internal.to_wire()})

    def die(self, error: BaseException) -> None:
        """The actor crashed: stop every request it is serving and tell its loop."""
        if self.crash is None:
            self.crash = error
        self.stop()
        self.crashed.set()

    def stop(self) -> None:
        """The actor is going away: the requests it is serving answer `unavailable`."""
        self.stopped = True
        for scope in list(self._running):
            scope.cancel()


def _unavailable(name: str) -> dict[str, Any]:
    error = BusError(ErrorKind.UNAVAILABLE, f"{name} restarted while serving this request")
    return {"err": error.to_wire()}


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
    """Serve the actor until its mailbox is closed or it is cancelled; raise `ActorCrashed` if
    it dies. Requests reach it directly while it runs; those queued in its mailbox while it
    was (re)starting are served from there."""
    endpoint = _Endpoint(name, handler, faults, max_in_flight)
    queued: set[int] = set()  # mailbox requests being served, answered `unavailable` on exit

    async def serve_queued(message: dict[str, Any]) -> None:
        queued.add(message["id"])
        reply = await endpoint.call(codec.encode(message))
        queued.discard(message["id"])
        if reply is not None:  # else its caller has already been told `timeout`
            bus.reply(codec.encode({**reply, "id": message["id"]}))

    async def watch() -> None:
        await endpoint.crashed.wait()
        raise ActorCrashed(f"actor {name} crashed") from endpoint.crash

    async def run_background(work: HasBackground) -> None:
        # Its failure is the actor's crash: the supervisor restarts the whole actor.
        try:
            await work.background()
        except Exception as error:
            endpoint.die(error)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            if hasattr(handler, "background"):
                nursery.start_soon(run_background, handler)
            bus.attach(name, endpoint)
            task_status.started()
            async for encoded in inbox:
                message = codec.decode(encoded)
                if message["deadline"] <= trio.current_time():
                    continue  # its caller stopped waiting while it sat in the mailbox
                if endpoint.stopped:
                    # Crashed, not yet unwound: leave it to the next incarnation, and take
                    # nothing more (`watch` ends this one as soon as it runs).
                    if not bus.requeue(name, encoded):
                        bus.reply(codec.encode({"id": message["id"], **_unavailable(name)}))
                    await endpoint.crashed.wait()
                    continue
                nursery.start_soon(serve_queued, message)
            nursery.cancel_scope.cancel()
    except* ActorCrashed as group:
        raise group.exceptions[0] from endpoint.crash
    finally:
        bus.detach(name, endpoint)
        endpoint.stop()
        for request_id in queued:
            bus.reply(codec.encode({"id": request_id, **_unavailable(name)}))
