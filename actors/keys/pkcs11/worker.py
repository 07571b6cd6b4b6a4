"""The PKCS#11 worker actor: one OS thread owns the library; the trio loop never blocks on it.

python-pkcs11 calls C_Initialize without OS locking, so SoftHSM (and many tokens) are only safe
from one thread. Every call is a bus request `{op: <method>, args: {uri, ...}}` run in order on
that thread. A token that hangs holds up only token work: each caller gives up at its deadline
with `timeout`, and the keys actor keeps serving file keys.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from bus.errors import BusError, ErrorKind
from bus.faults import Faults

from .token import (
    InvalidParameter,
    KeyNotFound,
    MechanismMissing,
    Pkcs11Error,
    Pkcs11Library,
    TokenUnavailable,
)
from .uri import Pkcs11Uri

log = logging.getLogger(__name__)

# The token operations callers may ask for, by name: nothing else of the library is reachable.
OPERATIONS = frozenset(
    {
        "mechanisms",
        "find_key_pair",
        "find_secret",
        "public_parameters",
        "generate_key_pair",
        "generate_secret",
        "import_secret",
        "delete",
        "move_key_pair",
        "sign_ecdsa",
        "hmac_sha256",
        "aes_gcm_encrypt",
        "aes_gcm_decrypt",
        "rsa_private",
    }
)
_STOP = object()
# A call running this long means the token hangs: later calls fail at once instead of queueing
# behind it, so callers with somewhere else to look (file keys) are not held up.
HUNG_AFTER = 5.0
# Token answers that mean "this token cannot make that kind of key", after which libaziot-keys
# tries the next location.
_UNSUPPORTED_CKRS = frozenset({"CKR_FUNCTION_NOT_SUPPORTED", "CKR_MECHANISM_INVALID"})


def to_bus_error(error: Exception) -> BusError:
    """Token errors as bus errors that keep the token's own words (lessons row 2).

    The code is the error's class name, so the keys actor can tell a missing key from a token
    that cannot make that kind of key, or one that cannot be reached at all.
    """
    code = type(error).__name__
    if isinstance(error, KeyNotFound):
        return BusError(ErrorKind.NOT_FOUND, str(error), code)
    if isinstance(error, MechanismMissing):
        return BusError(
            ErrorKind.INVALID,
            f'parameter "mechanism" has an invalid value\ncaused by: the token does not '
            f"support {error.mechanism}",
            code,
        )
    if isinstance(error, InvalidParameter):
        return BusError(ErrorKind.INVALID, str(error), code)
    if isinstance(error, TokenUnavailable):
        return BusError(ErrorKind.UNAVAILABLE, str(error), code)
    if isinstance(error, Pkcs11Error) and error.ckr in _UNSUPPORTED_CKRS:
        code = "Unsupported"
    return BusError(ErrorKind.INTERNAL, str(error), code)


class TokenThread:
    """A thread that owns one `Pkcs11Library` and runs jobs one at a time.

    It outlives restarts of the actor in front of it: a second thread on the same library
    would be exactly the unsafe sharing this design avoids.
    """

    def __init__(self, lib_path: str, faults: Faults) -> None:
        self._lib_path = lib_path
        self._faults = faults
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pkcs11-worker", daemon=True)
        self._library: Pkcs11Library | None = None
        self._load_error: Exception | None = None
        self.busy_since: float | None = None  # monotonic start of the running job
        self._thread.start()

    def _run(self) -> None:
        try:
            self._library = Pkcs11Library(self._lib_path)
        except Exception as error:  # reported to every caller, the daemon keeps running
            self._load_error = error
            log.error("%s; keys on the token are unavailable, file keys keep working", error)
        while (job := self._jobs.get()) is not _STOP:
            call, deliver = job
            self.busy_since = time.monotonic()
            try:
                self._faults.hit_blocking("pkcs11.call")
                if self._library is None:
                    raise self._load_error or TokenUnavailable("PKCS#11 library not loaded")
                outcome: tuple[bool, Any] = (True, call(self._library))
            except Exception as error:
                outcome = (False, error)
            self.busy_since = None
            deliver(outcome)

    def submit(self, call: Callable[[Pkcs11Library], Any], deliver: Callable[[Any], None]) -> None:
        self._jobs.put((call, deliver))

    def stop(self) -> None:
        self._jobs.put(_STOP)


class Pkcs11Worker:
    """The bus-facing side: decodes a request, queues it for the thread, awaits the result."""

    def __init__(self, thread: TokenThread) -> None:
        self._thread = thread

    async def handle(self, op: str, args: dict[str, Any], caller: Any = None) -> Any:
        if op not in OPERATIONS:
            raise BusError(ErrorKind.INVALID, f"unknown PKCS#11 operation {op!r}")
        busy_since = self._thread.busy_since
        if busy_since is not None and time.monotonic() - busy_since > HUNG_AFTER:
            raise BusError(
                ErrorKind.UNAVAILABLE,
                f"the PKCS#11 token has not answered a call for "
                f"{time.monotonic() - busy_since:.0f} s",
                "TokenUnavailable",
            )
        try:
            uri = Pkcs11Uri.parse(args.pop("uri"))
        except (KeyError, ValueError) as error:
            raise BusError(ErrorKind.INVALID, f"bad PKCS#11 URI: {error}") from None
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def deliver(outcome: tuple[bool, Any]) -> None:
            box.append(outcome)
            with contextlib.suppress(trio.RunFinishedError):  # stopped while the token was busy
                token.run_sync_soon(done.set)

        self._thread.submit(lambda library: getattr(library, op)(uri, **args), deliver)
        await done.wait()  # the actor loop cancels this at the request's deadline
        ok, value = box[0]
        if ok:
            return _wire(value)
        raise to_bus_error(value)

    def stop(self) -> None:
        self._thread.stop()


def _wire(value: Any) -> Any:
    """Results as plain msgpack-able values (PublicParameters becomes a map)."""
    if attrs.has(type(value)):
        return {k: v for k, v in attrs.asdict(value).items() if v is not None}
    return value
