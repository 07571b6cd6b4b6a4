"""The keys actor's side of the PKCS#11 worker: bus calls and what their errors mean to keyd.

The worker speaks in the token's words; keyd's clients must see the original's answers. So a
missing key or an unusable request becomes the generic 400, a token failure the generic 500
(the token's own error goes to the log, lessons.md row 2), while a missing mechanism keeps its
400 naming the mechanism, and an unreachable or hung token its 503/504.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from aziot.actors.texts import GENERIC_INVALID, INTERNAL_ERROR
from aziot.bus.bus import Bus
from aziot.bus.errors import BusError, ErrorKind, internal, invalid
from aziot.bus.protocol import Caller, Client, Operation

from .locations import TokenLocation
from .pkcs11.protocol import Mechanisms, MoveKeyPair, Pkcs11, TokenErrorCode

log = logging.getLogger(__name__)

R = TypeVar("R")
CALL_TIMEOUT = 10.0  # seconds; the worker also fails fast once the token has hung for 5 s

# Codes after which libaziot-keys tries the next location when creating a symmetric key.
REFUSED_CODES = frozenset(
    {
        TokenErrorCode.MECHANISM_MISSING,
        TokenErrorCode.CREATE_REFUSED,
        TokenErrorCode.UNSUPPORTED,
    }
)
# Codes that say nothing about the key, only that the token cannot be asked right now.
UNREACHABLE_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT})


class TokenError(Exception):
    """A worker error, kept whole until the keys actor decides what the client sees."""

    def __init__(self, error: BusError, what: str) -> None:
        super().__init__(f"{what}: {error.message}")
        self.error = error
        self.what = what

    @property
    def unreachable(self) -> bool:
        return self.error.kind in UNREACHABLE_KINDS

    @property
    def missing(self) -> bool:
        return self.error.kind is ErrorKind.NOT_FOUND

    @property
    def refused(self) -> bool:
        return self.error.code in REFUSED_CODES

    def for_client(self) -> BusError:
        """What keyd answers for this error, as the original would (plus 503/504)."""
        error = self.error
        if error.kind in UNREACHABLE_KINDS:
            log.error("%s: the PKCS#11 token is unreachable: %s", self.what, error.message)
            return BusError(error.kind, f"the PKCS#11 token is unavailable: {error.message}")
        if error.code == TokenErrorCode.MECHANISM_MISSING:
            log.warning("%s: %s", self.what, error.message.replace("\n", " "))
            return error
        if error.kind in (ErrorKind.INVALID, ErrorKind.NOT_FOUND):
            log.warning("%s: %s", self.what, error.message)
            return invalid(GENERIC_INVALID)
        log.error("%s: PKCS#11 error: %s", self.what, error.message)
        return internal(INTERNAL_ERROR)


class TokenClient:
    """Calls to the PKCS#11 worker actor for one keyd."""

    def __init__(self, bus: Bus) -> None:
        self._pkcs11 = Client(bus, Pkcs11, Caller(service="keyd"))

    async def call(
        self, operation: Operation[Any, Any], where: TokenLocation, **fields: Any
    ) -> Any:
        """`operation` on the object at `where`; the value of its reply."""
        request = operation.request(uri=where.uri, label=where.label, **fields)
        reply = await self._ask(operation, request, f"{operation.name} of {where.describe()}")
        return reply.value

    async def hmac(self, where: TokenLocation, message: bytes) -> bytes:
        return bytes(await self.call(Pkcs11.hmac_sha256, where, message=message))

    async def mechanisms(self, uri: str, timeout: float = CALL_TIMEOUT) -> list[str]:
        reply = await self._ask(
            Pkcs11.mechanisms, Mechanisms(uri), "listing the token's mechanisms", timeout
        )
        return list(reply.value)

    async def move_key_pair(self, source: TokenLocation, to_label: str) -> None:
        request = MoveKeyPair(source.uri, source.label, to_label)
        await self._ask(
            Pkcs11.move_key_pair, request, f"moving {source.describe()} to {to_label!r}"
        )

    async def _ask(
        self,
        operation: Operation[Any, R],
        request: Any,
        what: str,
        timeout: float = CALL_TIMEOUT,
    ) -> R:
        try:
            return await self._pkcs11.call(operation, request, timeout=timeout)
        except BusError as error:
            raise TokenError(error, what) from None
