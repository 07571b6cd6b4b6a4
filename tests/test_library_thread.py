"""bus.library_thread: one OS thread per library; a job whose caller gave up is never run."""

from __future__ import annotations

import threading

import pytest
import trio

from aziot.bus.library_thread import LibraryThread


class Context:
    """Stands for a C library's context: it records the thread of every call made on it."""

    def __init__(self) -> None:
        self.opened_on = threading.get_ident()
        self.calls: list[tuple[str, int]] = []

    def call(self, name: str) -> int:
        self.calls.append((name, threading.get_ident()))
        return threading.get_ident()


async def test_every_job_runs_on_the_one_thread_that_opened_the_context() -> None:
    runner = LibraryThread("test-library", Context)
    try:
        idents = [await runner.run(lambda ctx, n=n: ctx.call(f"job-{n}")) for n in range(20)]
        # Jobs submitted at once still run one at a time, in order, on that thread.
        async with trio.open_nursery() as nursery:
            for n in range(20, 40):
                nursery.start_soon(runner.run, lambda ctx, n=n: ctx.call(f"job-{n}"))
                await trio.sleep(0)
        context = await runner.run(lambda ctx: ctx)
    finally:
        runner.stop()
    assert set(idents) == {runner.ident} == {context.opened_on}
    assert runner.ident != threading.get_ident()  # never the trio loop's thread
    assert [name for name, _ in context.calls] == [f"job-{n}" for n in range(40)]
    assert {ident for _, ident in context.calls} == {runner.ident}


async def test_a_job_whose_caller_gave_up_is_skipped_not_run_late() -> None:
    runner = LibraryThread("test-library", Context)
    release = threading.Event()
    ran: list[str] = []
    try:
        # The library is busy with a slow call ...
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, lambda ctx: release.wait(10))
            await trio.sleep(0.05)
            # ... so a caller with a short deadline gives up while its job waits in the queue,
            with trio.move_on_after(0.1) as waited:
                await runner.run(lambda ctx: ran.append("abandoned"))
            assert waited.cancelled_caught
            # and a cancelled caller (no deadline, its scope cancelled) gives up too.
            with trio.CancelScope() as scope:
                nursery.start_soon(_cancel_soon, scope)
                await runner.run(lambda ctx: ran.append("cancelled"))
            assert scope.cancelled_caught
            release.set()
        # The next job runs at once: the two before it were dropped, never run late.
        assert await runner.run(lambda ctx: ran.append("wanted") or "done") == "done"
    finally:
        release.set()
        runner.stop()
    assert ran == ["wanted"]
    assert runner.skipped == 2


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.sleep(0.05)
    scope.cancel()


async def test_errors_reach_the_caller_and_a_failed_open_fails_every_job() -> None:
    runner = LibraryThread("test-library", Context)
    try:
        with pytest.raises(ZeroDivisionError):
            await runner.run(lambda ctx: 1 / 0)
        assert await runner.run(lambda ctx: "still serving") == "still serving"
    finally:
        runner.stop()

    def broken() -> Context:
        raise OSError("no such library")

    failed: LibraryThread[Context] = LibraryThread("broken-library", broken)
    try:
        for _ in range(2):
            with pytest.raises(OSError, match="no such library"):
                await failed.run(lambda ctx: ctx.call("never"))
    finally:
        failed.stop()
