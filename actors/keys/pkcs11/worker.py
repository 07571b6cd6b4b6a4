"""The PKCS#11 worker actor: one OS thread owns the library; the trio loop never blocks on it.

python-pkcs11 calls C_Initialize without OS locking, so SoftHSM (and many tokens) are only safe
from one thread. Every call is an operation of `protocol.Pkcs11`, served by the method of its
name here, which runs the library method of that name on that thread, in order. A token that
hangs holds up only token work: each caller gives up at its deadline with `timeout`, and the
keys actor keeps serving file keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from aziot.actors.texts import invalid_parameter
from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.faults import Faults
from aziot.bus.library_thread import LibraryThread
from aziot.bus.protocol import NOTHING, Caller, Nothing, dispatcher
from aziot.config.pkcs11_uri import Pkcs11Uri

from .protocol import (
    AesGcmDecrypt,
    AesGcmEncrypt,
    Count,
    Delete,
    FindKeyPair,
    FindSecret,
    Found,
    GenerateKeyPair,
    GenerateSecret,
    HmacSha256,
    ImportSecret,
    Kind,
    Mechanisms,
    MoveKeyPair,
    Names,
    Output,
    Pkcs11,
    Public,
    PublicParameters,
    PublicParametersOf,
    RsaPrivate,
    SignEcdsa,
    TokenErrorCode,
)
from .token import (
    CreateRefused,
    InvalidParameter,
    KeyExists,
    KeyNotFound,
    MechanismMissing,
    ObjectKind,
    Pkcs11Error,
    Pkcs11Library,
    RsaPadding,
    TokenUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A call running this long means the token hangs: later calls fail at once instead of queueing
# behind it, so callers with somewhere else to look (file keys) are not held up.
HUNG_AFTER = 5.0
# Token answers that mean "this token cannot make that kind of key", after which libaziot-keys
# tries the next location.
_UNSUPPORTED_CKRS = frozenset({"CKR_FUNCTION_NOT_SUPPORTED", "CKR_MECHANISM_INVALID"})


def to_bus_error(error: Exception) -> BusError:
    """Token errors as bus errors that keep the token's own words (lessons row 2), with a
    `TokenErrorCode` so the keys actor can tell a missing key from a token that cannot make
    that kind of key, or one that cannot be reached at all."""
    if isinstance(error, KeyNotFound):
        return BusError(ErrorKind.NOT_FOUND, str(error), TokenErrorCode.KEY_NOT_FOUND)
    if isinstance(error, MechanismMissing):
        return invalid_parameter(
            "mechanism",
            f"the token does not support {error.mechanism}",
            TokenErrorCode.MECHANISM_MISSING,
        )
    if isinstance(error, KeyExists):
        return BusError(ErrorKind.INVALID, str(error), TokenErrorCode.KEY_EXISTS)
    if isinstance(error, InvalidParameter):
        return BusError(ErrorKind.INVALID, str(error), TokenErrorCode.INVALID)
    if isinstance(error, TokenUnavailable):
        return BusError(ErrorKind.UNAVAILABLE, str(error), TokenErrorCode.UNAVAILABLE)
    if isinstance(error, CreateRefused):
        return BusError(ErrorKind.INTERNAL, str(error), TokenErrorCode.CREATE_REFUSED)
    if isinstance(error, Pkcs11Error) and error.ckr in _UNSUPPORTED_CKRS:
        return BusError(ErrorKind.INTERNAL, str(error), TokenErrorCode.UNSUPPORTED)
    return BusError(ErrorKind.INTERNAL, str(error), TokenErrorCode.FAILED)


class TokenThread(LibraryThread[Pkcs11Library]):
    """The one thread that owns the PKCS#11 library (see `bus.library_thread`)."""

    def __init__(self, lib_path: str, faults: Faults) -> None:
        super().__init__(
            "pkcs11-worker",
            lambda: Pkcs11Library(lib_path),
            before_job=lambda: faults.hit_blocking("pkcs11.call"),
        )


class Pkcs11Worker:
    """The bus-facing side: each operation queued for the thread, its result awaited."""

    def __init__(self, thread: TokenThread) -> None:
        self._thread = thread
        self._dispatch = dispatcher(Pkcs11, self)

    async def handle(self, op: str, args: dict[str, Any], caller: list[Any] | None) -> Any:
        busy_since = self._thread.busy_since
        if busy_since is not None and time.monotonic() - busy_since > HUNG_AFTER:
            raise BusError(
                ErrorKind.UNAVAILABLE,
                f"the PKCS#11 token has not answered a call for "
                f"{time.monotonic() - busy_since:.0f} s",
                TokenErrorCode.UNAVAILABLE,
            )
        return await self._dispatch(op, args, caller)

    async def _run(self, uri: str, call: Callable[[Pkcs11Library, Pkcs11Uri], T]) -> T:
        try:
            where = Pkcs11Uri.parse(uri)
        except ValueError as error:
            raise BusError(ErrorKind.INVALID, f"bad PKCS#11 URI: {error}") from None
        try:
            # Cancelled at the request's deadline; a job still queued then is skipped, so a
            # token that was slow does not later make writes nobody awaits.
            return await self._thread.run(lambda library: call(library, where))
        except Exception as error:
            raise to_bus_error(error) from None

    async def mechanisms(self, r: Mechanisms, caller: Caller) -> Names:
        return Names(await self._run(r.uri, lambda lib, at: lib.mechanisms(at)))

    async def find_key_pair(self, r: FindKeyPair, caller: Caller) -> Found:
        return Found(await self._run(r.uri, lambda lib, at: lib.find_key_pair(at, r.label)))

    async def find_secret(self, r: FindSecret, caller: Caller) -> Found:
        return Found(await self._run(r.uri, lambda lib, at: lib.find_secret(at, r.label)))

    async def public_parameters(self, r: PublicParametersOf, caller: Caller) -> Public:
        found = await self._run(r.uri, lambda lib, at: lib.public_parameters(at, r.label))
        return Public(PublicParameters(**attrs.asdict(found)))

    async def generate_key_pair(self, r: GenerateKeyPair, caller: Caller) -> Kind:
        return Kind(
            await self._run(r.uri, lambda lib, at: lib.generate_key_pair(at, r.label, r.algorithms))
        )

    async def generate_secret(self, r: GenerateSecret, caller: Caller) -> Kind:
        return Kind(
            await self._run(r.uri, lambda lib, at: lib.generate_secret(at, r.label, r.usage))
        )

    async def import_secret(self, r: ImportSecret, caller: Caller) -> Kind:
        return Kind(
            await self._run(
                r.uri, lambda lib, at: lib.import_secret(at, r.label, r.key_bytes, r.usage)
            )
        )

    async def delete(self, r: Delete, caller: Caller) -> Count:
        if r.kind not in ("key_pair", "secret"):
            raise BusError(ErrorKind.INVALID, f"unknown object kind {r.kind!r}")
        kind: ObjectKind = "key_pair" if r.kind == "key_pair" else "secret"
        return Count(await self._run(r.uri, lambda lib, at: lib.delete(at, r.label, kind)))

    async def move_key_pair(self, r: MoveKeyPair, caller: Caller) -> Nothing:
        await self._run(r.uri, lambda lib, at: lib.move_key_pair(at, r.from_label, r.to_label))
        return NOTHING

    async def sign_ecdsa(self, r: SignEcdsa, caller: Caller) -> Output:
        return Output(await self._run(r.uri, lambda lib, at: lib.sign_ecdsa(at, r.label, r.digest)))

    async def hmac_sha256(self, r: HmacSha256, caller: Caller) -> Output:
        return Output(
            await self._run(r.uri, lambda lib, at: lib.hmac_sha256(at, r.label, r.message))
        )

    async def aes_gcm_encrypt(self, r: AesGcmEncrypt, caller: Caller) -> Output:
        return Output(
            await self._run(
                r.uri, lambda lib, at: lib.aes_gcm_encrypt(at, r.label, r.iv, r.aad, r.plaintext)
            )
        )

    async def aes_gcm_decrypt(self, r: AesGcmDecrypt, caller: Caller) -> Output:
        return Output(
            await self._run(
                r.uri,
                lambda lib, at: lib.aes_gcm_decrypt(at, r.label, r.iv, r.aad, r.ciphertext_and_tag),
            )
        )

    async def rsa_private(self, r: RsaPrivate, caller: Caller) -> Output:
        if r.padding not in ("pkcs1", "none"):
            raise BusError(ErrorKind.INVALID, f"unknown RSA padding {r.padding!r}")
        padding: RsaPadding = "pkcs1" if r.padding == "pkcs1" else "none"
        return Output(
            await self._run(r.uri, lambda lib, at: lib.rsa_private(at, r.label, r.data, padding))
        )

    def stop(self) -> None:
        self._thread.stop()
