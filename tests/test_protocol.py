"""The typed bus protocol in process: one declaration per operation gives the encoding, the
actor's dispatch and the client; the caller travels in the envelope; deadlines keep to trio's
clock when the wall clock jumps."""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import trio

from aziot.bus import codec
from aziot.bus.actor import serve_actor
from aziot.bus.bus import Bus
from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.faults import Faults
from aziot.bus.protocol import NOTHING, Caller, Client, Nothing, Operation, Protocol, dispatcher


@attrs.frozen
class Add:
    numbers: list[int]
    label: bytes = b""


@attrs.frozen
class Sum:
    total: int
    label: bytes


@attrs.frozen
class Who:
    pass


@attrs.frozen
class Identity:
    uid: int | None
    service: str | None


@attrs.frozen
class Wait:
    seconds: float


class Calculator(Protocol):
    actor = "calculator"
    add = Operation(Add, Sum)
    who = Operation(Who, Identity)
    wait = Operation(Wait, Nothing)


class CalculatorActor:
    def __init__(self) -> None:
        self.handle = dispatcher(Calculator, self)

    async def add(self, request: Add, caller: Caller) -> Sum:
        return Sum(sum(request.numbers), request.label)

    async def who(self, request: Who, caller: Caller) -> Identity:
        return Identity(caller.uid, caller.service)

    async def wait(self, request: Wait, caller: Caller) -> Nothing:
        await trio.sleep(request.seconds)
        return NOTHING


async def started(nursery: trio.Nursery, bus: Bus) -> None:
    actor = CalculatorActor()
    await nursery.start(
        serve_actor, bus, "calculator", actor, bus.open_mailbox("calculator"), Faults()
    )


def test_the_declaration_names_each_operation() -> None:
    assert Calculator.add.name == "add"
    assert set(Calculator.operations) == {"add", "who", "wait"}


def test_an_actor_without_a_handler_is_refused_at_start() -> None:
    class Partial:
        async def add(self, request: Add, caller: Caller) -> Sum:
            raise AssertionError

    with pytest.raises(TypeError, match="no handler for Calculator.who"):
        dispatcher(Calculator, Partial())


async def test_a_typed_call_round_trips_through_msgpack() -> None:
    bus = Bus()
    async with trio.open_nursery() as nursery:
        await started(nursery, bus)
        client = Client(bus, Calculator, Caller(service="test"))
        reply = await client.call(Calculator.add, Add([1, 2, 39], b"\x00\xff"))
        assert reply == Sum(42, b"\x00\xff")
        nursery.cancel_scope.cancel()


async def test_the_caller_travels_in_the_envelope_not_the_payload() -> None:
    bus = Bus()
    async with trio.open_nursery() as nursery:
        await started(nursery, bus)
        client = Client(bus, Calculator, Caller(service="identity"))
        assert await client.call(Calculator.who, Who()) == Identity(None, "identity")
        as_uid = await client.call(Calculator.who, Who(), caller=Caller(uid=2**31 + 7))
        assert as_uid == Identity(2**31 + 7, None)
        # A payload cannot claim a caller: an unknown field is refused, the envelope decides.
        with pytest.raises(BusError) as caught:
            await bus.request("calculator", "who", {"uid": 0}, caller=[1000, None])
        assert caught.value.kind is ErrorKind.INVALID
        nursery.cancel_scope.cancel()


def test_an_envelope_carries_the_caller_beside_the_arguments() -> None:
    envelope = codec.decode(
        codec.encode({"to": "x", "op": "who", "args": {}, "caller": [5, None], "id": 1})
    )
    assert Caller.from_wire(envelope["caller"]) == Caller(uid=5)


async def test_unknown_and_malformed_operations_are_invalid() -> None:
    bus = Bus()
    async with trio.open_nursery() as nursery:
        await started(nursery, bus)
        for op, args in (("nope", {}), ("add", {"numbers": "x"}), ("add", {})):
            with pytest.raises(BusError) as caught:
                await bus.request("calculator", op, args)
            assert caught.value.kind is ErrorKind.INVALID, op
        nursery.cancel_scope.cancel()


async def test_a_wall_clock_jump_does_not_drop_queued_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device's first NTP sync moves the wall clock by hours: requests already queued are
    still answered, and their deadlines still hold on the monotonic clock."""
    bus = Bus()
    async with trio.open_nursery() as nursery:
        actor = CalculatorActor()
        inbox = bus.open_mailbox("calculator", capacity=64)
        client = Client(bus, Calculator, Caller(service="test"))
        replies: list[Any] = []

        async def ask(n: int) -> None:
            replies.append(await client.call(Calculator.add, Add([n]), timeout=5))

        for n in range(20):  # queued while the actor is not serving yet
            nursery.start_soon(ask, n)
        await trio.testing.wait_all_tasks_blocked()
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3 * 3600)
        await nursery.start(serve_actor, bus, "calculator", actor, inbox, Faults())
        with trio.fail_after(2):
            while len(replies) < 20:
                await trio.sleep(0.01)
        assert sorted(r.total for r in replies) == list(range(20))
        # A deadline still expires on time, jump or not.
        with trio.fail_after(2), pytest.raises(BusError) as caught:
            await client.call(Calculator.wait, Wait(10), timeout=0.2)
        assert caught.value.kind is ErrorKind.TIMEOUT
        monkeypatch.setattr(time, "time", lambda: real() - 3 * 3600)  # and backwards
        assert await client.call(Calculator.add, Add([1, 1])) == Sum(2, b"")
        nursery.cancel_scope.cancel()
