"""The PKCS#11 worker actor: one OS thread owns the library; the trio loop never blocks on it.

python-pkcs11 calls C_Initialize without OS locking, so SoftHSM (and many tokens) are only safe
from one thread. Every call is a bus request `{op: <method>, args: {uri, ...}}` run in order on
that thread. A token that hangs holds up only token work: each caller gives up at its deadline
with `timeout`, and the keys actor keeps serving file keys.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs

from aziot.actors.texts import invalid_parameter
from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.faults import Faults
from aziot.bus.library_thread import LibraryThread
from aziot.config.pkcs11_uri import Pkcs11Uri

from .token import (
    InvalidParameter,
    KeyNotFound,
    MechanismMissing,
    Pkcs11Error,
    Pkcs11Library,
    TokenUnavailable,
)

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
        return invalid_parameter(
            "mechanism", f"the token does not support {error.mechanism}", code
        )
    if isinstance(error, InvalidParameter):
        return BusError(ErrorKind.INVALID, str(error), code)
    if isinstance(error, TokenUnavailable):
        return BusError(ErrorKind.UNAVAILABLE, str(error), code)
    if isinstance(error, Pkcs11Error) and error.ckr in _UNSUPPORTED_CKRS:
        code = "Unsupported"
    return BusError(ErrorKind.INTERNAL, str(error), code)


class TokenThread(LibraryThread[Pkcs11Library]):
    """The one thread that owns the PKCS#11 library (see `bus.library_thread`)."""

    def __init__(self, lib_path: str, faults: Faults) -> None:
        super().__init__(
            "pkcs11-worker",
            lambda: Pkcs11Library(lib_path),
            before_job=lambda: faults.hit_blocking("pkcs11.call"),
        )


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
        try:
            # The actor loop cancels this at the request's deadline; a job still queued then
            # is skipped, so a token that was slow does not later make writes nobody awaits.
            value = await self._thread.run(lambda library: getattr(library, op)(uri, **args))
        except Exception as error:
            raise to_bus_error(error) from None
        return _wire(value)

    def stop(self) -> None:
        self._thread.stop()


def _wire(value: Any) -> Any:
    """Results as plain msgpack-able values (PublicParameters becomes a map)."""
    if attrs.has(type(value)):
        return {k: v for k, v in attrs.asdict(value).items() if v is not None}
    return value
