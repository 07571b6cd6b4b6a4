"""Request/reply between actors: directly to a running actor's endpoint, else through its
bounded mailbox until it runs (see `actor`).

An envelope is a msgpack map `{to, op, args, caller, id, deadline}`; the reply is `{id, ok}` or
`{id, err: [kind, message, code]}`. `caller` is who asks (see `protocol.Caller`), set by the
sender beside the arguments.

`deadline` is on trio's clock, which is monotonic: a device's wall clock jumps at its first NTP
sync, and a wall-clock deadline would then expire (or stretch) every queued request at once. A
message that leaves the process must carry seconds-left instead and be given a deadline on the
receiver's clock again; none does today.
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

import attrs
import trio

from . import codec
from .errors import BusError, ErrorKind

DEFAULT_TIMEOUT = 30.0
DEFAULT_CAPACITY = 64


class Endpoint(Protocol):
    stopped: bool  # crashed or stopping: what arrives now waits for the restart instead

    async def call(self, encoded: bytes) -> dict[str, Any] | None: ...


@attrs.define
class _Pending:
    target: str
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: dict[str, Any] | None = None


class Bus:
    """Routes encoded requests to actor mailboxes and replies back to the waiting callers."""

    def __init__(self) -> None:
        self._mailboxes: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

    def open_mailbox(
        self, name: str, capacity: int = DEFAULT_CAPACITY
    ) -> trio.MemoryReceiveChannel[bytes]:
        """Create the bounded mailbox of actor `name`; a full one makes senders wait."""
        if name in self._mailboxes:
            raise ValueError(f"actor {name!r} already has a mailbox")
        send, receive = trio.open_memory_channel[bytes](capacity)
        self._mailboxes[name] = send
        return receive

    def has_actor(self, name: str) -> bool:
        return name in self._mailboxes

    def attach(self, name: str, endpoint: Endpoint) -> None:
        """While actor `name` runs, its requests go to `endpoint` directly."""
        self._endpoints[name] = endpoint

    def detach(self, name: str, endpoint: Endpoint) -> None:
        """Until the actor runs again, its requests wait in its mailbox."""
        if self._endpoints.get(name) is endpoint:
            del self._endpoints[name]

    async def request(
        self,
        to: str,
        op: str,
        args: dict[str, Any] | None = None,
        *,
        caller: list[Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send `op` to actor `to` and return its result, or raise its `BusError`.

        Waiting for room in a full mailbox counts against the deadline: back-pressure shows up
        as `timeout`, never as a dropped message.
        """
        mailbox = self._mailboxes.get(to)
        if mailbox is None:
            raise BusError(ErrorKind.UNAVAILABLE, f"no actor named {to!r} is running")
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        request_id = next(self._ids)
        envelope = codec.encode(
            {
                "to": to,
                "op": op,
                "args": args or {},
                "caller": caller,
                "id": request_id,
                "deadline": trio.current_time() + timeout,
            }
        )
        endpoint = self._endpoints.get(to)
        if endpoint is not None and not endpoint.stopped:
            reply = await endpoint.call(envelope)
            return self._result(reply, to, op, timeout)
        pending = self._pending[request_id] = _Pending(to)
        try:
            with trio.move_on_after(timeout):
                await mailbox.send(envelope)
                await pending.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise BusError(ErrorKind.UNAVAILABLE, f"actor {to!r} has stopped") from None
        finally:
            del self._pending[request_id]
        return self._result(pending.reply, to, op, timeout)

    @staticmethod
    def _result(reply: dict[str, Any] | None, to: str, op: str, timeout: float) -> Any:
        if reply is None:
            raise BusError(ErrorKind.TIMEOUT, f"{to} did not answer {op} within {timeout:g} s")
        error = reply.get("err")
        if error is not None:
            raise BusError.from_wire(error)
        return reply.get("ok")

    def requeue(self, name: str, encoded: bytes) -> bool:
        """Put a request back in `name`'s mailbox for its next incarnation (one that a crashing
        actor took out but never started); False when the mailbox is full or closed."""
        mailbox = self._mailboxes.get(name)
        if mailbox is None:
            return False
        try:
            mailbox.send_nowait(encoded)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def reply(self, encoded: bytes) -> None:
        """Deliver an encoded reply; one whose caller already gave up is dropped."""
        message = codec.decode(encoded)
        pending = self._pending.get(message["id"])
        if pending is not None and pending.reply is None:
            pending.reply = message
            pending.done.set()

    def send_result(self, request_id: int, result: Any) -> None:
        self.reply(codec.encode({"id": request_id, "ok": result}))

    def send_error(self, request_id: int, error: BusError) -> None:
        self.reply(codec.encode({"id": request_id, "err": error.to_wire()}))

    def close_mailbox(self, name: str) -> None:
        """Stop delivery to `name`: queued and future requests get `unavailable`."""
        mailbox = self._mailboxes.pop(name, None)
        if mailbox is not None:
            mailbox.close()
        for request_id, pending in list(self._pending.items()):
            if pending.target == name and pending.reply is None:
                self.send_error(
                    request_id, BusError(ErrorKind.UNAVAILABLE, f"actor {name!r} has stopped")
                )
