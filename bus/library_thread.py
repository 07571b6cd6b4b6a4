"""One OS thread per C library: blocking jobs run there in order, never on the trio loop.

C libraries such as a PKCS#11 module (python-pkcs11 initializes it without OS locking) or a TPM's
ESAPI context are not safe to call from several threads. A :class:`LibraryThread` owns one such
context for the life of the process: it opens it on its own thread, then runs the jobs submitted
to it one at a time, in order. It knows nothing of the library; the worker actor in front of it
decides what a job does.

Each job carries its caller's deadline and cancellation. A caller that gives up (its deadline
passed, or its task was cancelled) while its job still waits in the queue has the job skipped:
it never runs, so a hung or slow library does not later perform writes nobody is waiting for.
A job that already started cannot be stopped (a C call cannot be interrupted); its result is
dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
import trio

log = logging.getLogger(__name__)

C = TypeVar("C")  # the library context a job is given
T = TypeVar("T")

_STOP = object()


@attrs.define(eq=False)
class Job(Generic[C]):
    """One blocking call for the thread, with what its caller still wants."""

    call: Callable[[C], Any]
    deliver: Callable[[tuple[bool, Any]], None]
    # time.monotonic() after which the caller no longer waits (inf: no deadline).
    deadline: float = math.inf
    abandoned: bool = False  # set from the caller's side when it gives up

    def wanted(self) -> bool:
        return not self.abandoned and time.monotonic() < self.deadline


class LibraryThread(Generic[C]):
    """A thread that opens one library context with `open_context` and runs jobs on it.

    `before_job` runs on the thread before each job (e.g. a fault-injection point); an exception
    from it, from `open_context` or from the job is the job's outcome. The thread outlives
    restarts of the actor in front of it: a second thread on the same library would be exactly
    the unsafe sharing this avoids.
    """

    def __init__(
        self,
        name: str,
        open_context: Callable[[], C],
        *,
        before_job: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._open_context = open_context
        self._before_job = before_job
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._context: C | None = None
        self.open_error: Exception | None = None
        self.busy_since: float | None = None  # time.monotonic() start of the running job
        self.skipped = 0  # jobs dropped because their caller had given up
        self.ident: int | None = None  # the OS thread's identifier, once it runs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.ident = threading.get_ident()
        try:
            self._context = self._open_context()
        except Exception as error:  # reported to every job; the process keeps running
            self.open_error = error
            log.error("%s: %s", self.name, error)
        while (job := self._jobs.get()) is not _STOP:
            if not job.wanted():
                self.skipped += 1
                log.debug("%s: skipped a job whose caller had given up", self.name)
                continue
            self.busy_since = time.monotonic()
            try:
                if self._before_job is not None:
                    self._before_job()
                if self._context is None:
                    raise self.open_error or RuntimeError(f"{self.name}: library not opened")
                outcome: tuple[bool, Any] = (True, job.call(self._context))
            except Exception as error:
                outcome = (False, error)
            self.busy_since = None
            job.deliver(outcome)

    def submit(self, job: Job[C]) -> None:
        """Queue `job` (from any thread); its `deliver` is called on this thread."""
        self._jobs.put(job)

    async def run(self, call: Callable[[C], T]) -> T:
        """Run `call(context)` on the thread and return its result (or raise its error).

        The caller's trio deadline travels with the job; if the caller is cancelled first, the
        job is skipped when its turn comes, or its result dropped if it is already running.
        """
        trio_token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def deliver(outcome: tuple[bool, Any]) -> None:
            box.append(outcome)
            with contextlib.suppress(trio.RunFinishedError):  # the loop ended meanwhile
                trio_token.run_sync_soon(done.set)

        left = trio.current_effective_deadline() - trio.current_time()
        job: Job[C] = Job(call, deliver, deadline=time.monotonic() + left)
        self.submit(job)
        try:
            await done.wait()
        except BaseException:
            job.abandoned = True
            raise
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def stop(self) -> None:
        """Let the thread end after the jobs already queued."""
        self._jobs.put(_STOP)
