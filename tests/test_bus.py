"""The bus on its own: codec, request/reply, deadlines, back-pressure, crashes, fault rules."""

from __future__ import annotations

from functools import partial
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from aziot.bus import codec
from aziot.bus.actor import ActorCrashed, serve_actor
from aziot.bus.bus import Bus
from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.faults import Action, Faults, InjectedCrash, parse_rules


class Echo:
    def __init__(self) -> None:
        self.release = trio.Event()

    async def handle(self, op: str, args: dict[str, Any], caller: Any = None) -> Any:
        if op == "echo":
            return args
        if op == "fail":
            raise BusError(ErrorKind.UNAUTHORIZED, "user 5 is not authorized")
        if op == "bug":
            raise RuntimeError("a bug")
        if op == "wait":
            await self.release.wait()
            return "released"
        if op == "crash":
            raise InjectedCrash("boom")
        raise BusError(ErrorKind.INVALID, f"unknown op {op}")


def test_codec_round_trip_keeps_bytes_as_msgpack_bin() -> None:
    message = {"to": "keys", "op": "sign", "args": {"data": b"\x00\xff", "n": 1, "s": "é"}}
    encoded = codec.encode(message)
    assert b"\xc4\x02\x00\xff" in encoded  # bin 8, length 2: never base64
    assert codec.decode(encoded) == message
    with pytest.raises(ValueError, match="must be a map"):
        codec.decode(msgpack.packb([1, 2]))


async def test_request_reply_and_typed_errors() -> None:
    bus = Bus()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_actor, bus, "echo", Echo(), bus.open_mailbox("echo"), Faults())
        assert await bus.request("echo", "echo", {"b": b"x"}) == {"b": b"x"}
        with pytest.raises(BusError) as caught:
            await bus.request("echo", "fail")
        assert caught.value.kind is ErrorKind.UNAUTHORIZED
        assert caught.value.message == "user 5 is not authorized"
        with pytest.raises(BusError) as caught:
            await bus.request("echo", "bug")
        assert (caught.value.kind, caught.value.message) == (ErrorKind.INTERNAL, "internal error")
        assert await bus.request("echo", "echo", {"still": "serving"}) == {"still": "serving"}
        nursery.cancel_scope.cancel()


async def test_unknown_actor_is_unavailable() -> None:
    with pytest.raises(BusError) as caught:
        await Bus().request("nobody", "op")
    assert caught.value.kind is ErrorKind.UNAVAILABLE


async def test_deadline_expiry_gives_timeout_not_a_stuck_caller() -> None:
    bus = Bus()
    echo = Echo()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_actor, bus, "echo", echo, bus.open_mailbox("echo"), Faults())
        with trio.fail_after(2):
            with pytest.raises(BusError) as caught:
                await bus.request("echo", "wait", timeout=0.2)
        assert caught.value.kind is ErrorKind.TIMEOUT
        echo.release.set()
        assert await bus.request("echo", "echo", {"a": 1}) == {"a": 1}
        nursery.cancel_scope.cancel()


async def test_a_full_mailbox_pushes_back_on_the_sender() -> None:
    bus = Bus()
    inbox = bus.open_mailbox("slow", capacity=2)  # nobody serves it yet
    outcomes: list[str] = []

    async def call(n: int) -> None:
        try:
            await bus.request("slow", "echo", {"n": n}, timeout=0.3)
            outcomes.append("ok")
        except BusError as error:
            outcomes.append(error.kind.value)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(call, n)
    # Two fit in the mailbox, two waited for room until their deadline: nothing was dropped.
    assert outcomes.count("timeout") == 4
    assert inbox.statistics().current_buffer_used == 2
    assert inbox.statistics().tasks_waiting_send == 0


async def test_a_crashed_actor_answers_its_callers_unavailable() -> None:
    bus = Bus()
    echo = Echo()
    results: list[Any] = []

    async def waiting_caller() -> None:
        try:
            await bus.request("echo", "wait", timeout=5)
        except BusError as error:
            results.append(error.kind)

    with pytest.RaisesGroup(ActorCrashed):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_actor, bus, "echo", echo, bus.open_mailbox("echo"), Faults())
            await trio.sleep(0)
            nursery.start_soon(waiting_caller)
            await trio.sleep(0.05)
            with pytest.raises(BusError) as caught:
                await bus.request("echo", "crash")
            assert caught.value.kind is ErrorKind.UNAVAILABLE
    assert results == [ErrorKind.UNAVAILABLE]


def test_fault_rules_parse_and_refuse_nonsense() -> None:
    rules = parse_rules("bus.deliver.keys=crash*1; store.write=delay=0.5@0.25, pkcs11.call=hang")
    assert [(r.point, r.action, r.delay, r.probability, r.remaining) for r in rules] == [
        ("bus.deliver.keys", Action.CRASH, 0.0, 1.0, 1),
        ("store.write", Action.DELAY, 0.5, 0.25, None),
        ("pkcs11.call", Action.HANG, 0.0, 1.0, None),
    ]
    for bad in ("nopoint", "x=explode", "x=error@2", "x=delay=soon", "x=error*many"):
        with pytest.raises(ValueError, match="fault rule"):
            parse_rules(bad)


async def test_fault_counts_are_exact() -> None:
    faults = Faults.from_spec("p=error*2")
    for _ in range(2):
        with pytest.raises(BusError, match="injected fault at p"):
            await faults.hit("p")
    await faults.hit("p")  # spent
    await Faults().hit("p")  # off: nothing happens


async def test_a_busy_actor_pushes_back_on_direct_callers() -> None:
    """While an actor runs, callers reach it directly; its in-flight slots bound them, and a
    caller that finds none waits until its deadline, then gets `timeout`: none is dropped."""
    bus = Bus()
    echo = Echo()
    outcomes: list[str] = []

    async def call(op: str, timeout: float) -> None:
        try:
            await bus.request("echo", op, timeout=timeout)
            outcomes.append(f"{op} ok")
        except BusError as error:
            outcomes.append(f"{op} {error.kind.value}")

    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_actor, max_in_flight=2),
            bus,
            "echo",
            echo,
            bus.open_mailbox("echo"),
            Faults(),
        )
        async with trio.open_nursery() as callers:
            for _ in range(2):
                callers.start_soon(call, "wait", 1.0)  # they hold both slots for 1 s
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(2):
                callers.start_soon(call, "echo", 0.3)  # no slot before their deadline
        assert outcomes == ["echo timeout"] * 2 + ["wait timeout"] * 2
        echo.release.set()
        assert await bus.request("echo", "echo", {"after": 1}) == {"after": 1}
        nursery.cancel_scope.cancel()


async def test_a_request_from_the_mailbox_gets_unavailable_when_the_actor_crashes() -> None:
    """Requests sent while the actor was (re)starting wait in its mailbox and are served from
    there; a crash meanwhile answers them `unavailable`, as it does the direct ones."""
    bus = Bus()
    echo = Echo()
    inbox = bus.open_mailbox("echo")
    results: list[Any] = []

    async def queued_caller() -> None:
        try:
            await bus.request("echo", "wait", timeout=5)
        except BusError as error:
            results.append(error.kind)

    with pytest.RaisesGroup(ActorCrashed):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(queued_caller)
            await trio.testing.wait_all_tasks_blocked()  # it sits in the mailbox: no actor yet
            await nursery.start(serve_actor, bus, "echo", echo, inbox, Faults())
            await trio.testing.wait_all_tasks_blocked()  # now being served from the mailbox
            with trio.fail_after(2), pytest.raises(BusError) as caught:
                await bus.request("echo", "crash")
            assert caught.value.kind is ErrorKind.UNAVAILABLE
            with trio.fail_after(2):
                while not results:
                    await trio.sleep(0.01)
    assert results == [ErrorKind.UNAVAILABLE]


async def test_a_request_right_after_a_crash_waits_for_the_restarted_actor() -> None:
    """Until the crashed actor's task has unwound, its endpoint is still on the bus; a request
    sent then must wait in the mailbox for the next incarnation, not be served by the dying one
    and answered `unavailable` (the second of two back-to-back requests after a crash)."""
    bus = Bus()
    echo = Echo()
    inbox = bus.open_mailbox("echo")
    gone = trio.Event()

    async def first_incarnation(task_status: trio.TaskStatus[None]) -> None:
        try:
            await serve_actor(bus, "echo", echo, inbox, Faults(), task_status=task_status)
        except ActorCrashed:
            gone.set()

    async def restart_then_release(nursery: trio.Nursery) -> None:
        await gone.wait()
        await nursery.start(serve_actor, bus, "echo", echo, inbox, Faults())
        echo.release.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(first_incarnation)
            nursery.start_soon(restart_then_release, nursery)
            with pytest.raises(BusError) as caught:
                await bus.request("echo", "crash")  # no checkpoint: the actor has not unwound
            assert caught.value.kind is ErrorKind.UNAVAILABLE
            assert await bus.request("echo", "wait", timeout=5) == "released"
            nursery.cancel_scope.cancel()
