"""The TPM worker actor: one OS thread owns the ESAPI context; the trio loop never blocks on it.

ESAPI contexts are not thread-safe, so every TPM call runs on the one `TpmThread`
(`bus.library_thread`), in order, with its caller's deadline. The actor in front of it:

- opens the TPM in `background()`, and again whenever it is lost, with backoff (0.2 s doubling
  to 5 s): a TPM that appears after boot, or a swtpm or resource manager that restarts, is
  picked up by itself while keyd and certd serve;
- while the TPM is not open, answers every request at once with `internal` (the original's
  500 `internal error`) and logs why;
- gives up on a call after `CALL_TIMEOUT` (the caller gets its 500 then, not a hung socket);
  once a call has run for `HUNG_AFTER`, later calls fail at once instead of queueing behind it.

Fault point `tpm.call` runs before every job on the thread; an injected crash kills this actor
and the supervisor restarts it (the thread, and the one context, outlive it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.faults import Faults, InjectedCrash
from aziot.bus.library_thread import LibraryThread
from aziot.bus.protocol import NOTHING, Caller, Nothing, dispatcher

from .device import TpmDevice, TpmFailure, TpmSettings, TpmUnavailable
from .protocol import Digest, ImportAuthKey, SignWithAuthKey, Tpm, TpmKeys

log = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT = 20.0  # seconds one request's TPM work may take (import: three RSA operations)
OPEN_TIMEOUT = 120.0  # creating an RSA EK/SRK takes a real TPM tens of seconds
HUNG_AFTER = 30.0
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


class TpmThread(LibraryThread[TpmDevice]):
    """The one thread that owns the TPM's ESAPI context."""

    def __init__(self, settings: TpmSettings, faults: Faults) -> None:
        super().__init__(
            "tpm-worker",
            lambda: TpmDevice(settings),  # touches nothing: the worker opens it
            before_job=lambda: faults.hit_blocking("tpm.call"),
        )
        self.settings = settings


class TpmWorker:
    """The bus-facing side (actor `tpm`): each operation queued for the thread, awaited."""

    def __init__(self, thread: TpmThread) -> None:
        self._thread = thread
        self._dispatch = dispatcher(Tpm, self)
        self._open = False
        self._cause = "the TPM has not been opened yet"
        self._wake = trio.Event()

    async def handle(self, op: str, args: dict[str, Any], caller: list[Any] | None) -> Any:
        return await self._dispatch(op, args, caller)

    # -- opening, with backoff ------------------------------------------------------------------

    async def background(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            if self._open:
                await self._wake.wait()
                self._wake = trio.Event()
                backoff = BACKOFF_FIRST  # a loss is retried at once, then with backoff
                continue
            if await self._try_open():
                continue
            with trio.move_on_after(backoff):
                await self._wake.wait()  # a request asking for the TPM shortens the wait
            self._wake = trio.Event()
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _try_open(self) -> bool:
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                done = await self._thread.run(lambda device: device.open())
        except (TpmUnavailable, TpmFailure, BusError) as error:
            cause = str(getattr(error, "message", None) or error)
            if cause != self._cause:
                log.error("tpmd: the TPM cannot be used; retrying with backoff: %s", cause)
            else:
                log.debug("tpmd: the TPM still cannot be used: %s", cause)
            self._cause = cause
            return False
        except trio.TooSlowError:
            self._cause = f"opening the TPM took more than {OPEN_TIMEOUT:g} s"
            log.error("tpmd: %s; retrying", self._cause)
            return False
        self._open = True
        self._cause = ""
        log.info("tpmd: TPM open through TCTI %r: %s", self._thread.settings.tcti, done)
        return True

    def _lost(self, cause: str) -> None:
        self._open = False
        self._cause = cause
        self._wake.set()

    # -- the operations ------------------------------------------------------------------------

    async def _run(self, what: str, call: Callable[[TpmDevice], T]) -> T:
        if not self._open:
            self._wake.set()
            raise self._refuse(what, f"the TPM is not available: {self._cause}")
        busy_since = self._thread.busy_since
        if busy_since is not None and time.monotonic() - busy_since > HUNG_AFTER:
            raise self._refuse(
                what, f"the TPM has not answered a call for {time.monotonic() - busy_since:.0f} s"
            )
        try:
            deadline = min(trio.current_effective_deadline(), trio.current_time() + CALL_TIMEOUT)
            with trio.CancelScope(deadline=deadline) as scope:
                return await self._thread.run(call)
            if scope.cancelled_caught:
                raise self._refuse(what, f"the TPM did not answer within {CALL_TIMEOUT:g} s")
        except TpmUnavailable as error:
            self._lost(str(error))
            raise self._refuse(what, f"the TPM was lost; reopening it: {error}") from None
        except TpmFailure as error:
            raise self._refuse(what, str(error)) from None
        except InjectedCrash:
            raise
        except BusError as error:  # an injected fault at tpm.call
            raise self._refuse(what, error.message) from None
        raise AssertionError("unreachable")

    @staticmethod
    def _refuse(what: str, cause: str) -> BusError:
        """The original's one answer for every failure; the cause goes to the log only."""
        log.error("tpmd: could not %s: %s", what, cause)
        return BusError(ErrorKind.INTERNAL, f"could not {what}: {cause}")

    async def get_tpm_keys(self, r: Nothing, caller: Caller) -> TpmKeys:
        ek, srk = await self._run("get TPM keys", lambda device: device.get_tpm_keys())
        return TpmKeys(ek, srk)

    async def import_auth_key(self, r: ImportAuthKey, caller: Caller) -> Nothing:
        await self._run("import auth key", lambda device: device.import_auth_key(r.key))
        log.info("tpmd: auth key imported")
        return NOTHING

    async def sign_with_auth_key(self, r: SignWithAuthKey, caller: Caller) -> Digest:
        return Digest(
            await self._run("sign with auth key", lambda device: device.sign_with_auth_key(r.data))
        )
