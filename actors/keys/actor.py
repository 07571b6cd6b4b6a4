"""The keys actor: key ids to locations, handles, authorization, and the operations of keyd.

It mirrors libaziot-keys' semantics (create-if-absent, import overwrites, one namespace per id,
locations tried in order, the errors that become 400 or 500) on top of `FileStore` and
`filecrypto` for file keys and of the PKCS#11 worker for keys in a token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from aziot.actors.offload import in_worker, sized
from aziot.actors.texts import GENERIC_INVALID
from aziot.bus.errors import BusError, ErrorKind, internal, invalid, unauthorized
from aziot.bus.protocol import NOTHING, Caller, Nothing, Operation, dispatcher

from . import filecrypto
from .authz import KeyAuthorizer, KeyPrincipal
from .cstring import check_nul
from .filecrypto import LibError, bad_parameter, external
from .handles import (
    HANDLE_VALIDATION_KEY_ID,
    HandleSealer,
    KeyRef,
    Mac,
    invalid_handle,
    software_mac,
)
from .locations import FileLocation, Locator, TokenLocation
from .messages import (
    Ciphertext,
    CreateDerivedKey,
    CreateKey,
    CreateKeyPair,
    Decrypt,
    DeleteKey,
    DeleteKeyPair,
    DerivedKeyBytes,
    Encrypt,
    ExportDerivedKey,
    GetParameter,
    KeyHandle,
    Keys,
    LoadKey,
    LoadKeyPair,
    MoveKeyPair,
    Parameter,
    Plaintext,
    ReloadPrincipals,
    Sign,
    Signature,
)
from .pkcs11.protocol import Pkcs11, PublicParameters, TokenErrorCode
from .store import FileStore
from .token_client import TokenClient, TokenError

log = logging.getLogger(__name__)

DEFAULT_ALGORITHMS = ["ec-p256", "rsa-2048"]
KNOWN_ALGORITHMS = ("ec-p256", "rsa-2048", "rsa-4096")


def parse_preferred_algorithms(text: str | None) -> list[str]:
    """`ec-p256:rsa-2048:*` to an ordered list; unknown parts ignored, duplicates dropped."""
    if text is None:
        return list(DEFAULT_ALGORITHMS)
    result: list[str] = []
    for part in text.split(":"):
        expanded = DEFAULT_ALGORITHMS if part == "*" else [part] if part in KNOWN_ALGORITHMS else []
        result.extend(a for a in expanded if a not in result)
    return result


def mechanism_error() -> BusError:
    return invalid(
        'parameter "mechanism" has an invalid value\n'
        "caused by: mechanism cannot be used with this key type"
    )


def check_id(key_id: str) -> None:
    check_nul("id", key_id)


@attrs.frozen
class Secret:
    """A symmetric key that was found: its bytes (file) or its place on a token."""

    data: bytes = b""
    token: TokenLocation | None = None
    result: Any = None  # what the token answered to the operation asked while finding it


@attrs.frozen
class Pair:
    """A key pair that was found: parsed from its file, or its place on a token."""

    key: filecrypto.PrivateKey | None = None
    token: TokenLocation | None = None
    result: Any = None


def token_parameter(params: PublicParameters, name: str) -> bytes | str:
    """`/parameters/{name}` of a key pair on a token, with the file keys' rules."""
    algorithm = params.algorithm
    if name == "algorithm":
        return str(algorithm)
    if name in ("ec-curve-oid", "ec-point"):
        if algorithm != "ECDSA":
            raise bad_parameter(f"{name} asked of a non-EC key")
        if params.curve_oid != filecrypto.P256_OID_DER:
            raise bad_parameter("only P-256 curves are supported")
        if name == "ec-curve-oid":
            return filecrypto.P256_OID_DER
        assert params.ec_point is not None
        return params.ec_point
    if name in ("rsa-modulus", "rsa-exponent"):
        if algorithm != "RSA":
            raise bad_parameter(f"{name} asked of a non-RSA key")
        value = params.modulus if name == "rsa-modulus" else params.exponent
        assert value is not None
        return value
    raise bad_parameter(f"unknown parameter {name!r}")


TokenUse = Callable[[TokenLocation], Awaitable[Any]]
Found = TypeVar("Found", "Secret", "Pair")


class KeysActor:
    """Owns the key locations, the handle sealer and the principals of one keyd."""

    def __init__(
        self,
        store: FileStore,
        preloaded: dict[str, str],
        principals: list[KeyPrincipal],
        *,
        token: TokenClient | None = None,
        pkcs11_lib_path: str | None = None,
        pkcs11_base_slot: str | None = None,
    ) -> None:
        self._store = store
        self._locator = Locator(store, preloaded, pkcs11_lib_path, pkcs11_base_slot)
        self._token = token
        self._authorizer = KeyAuthorizer(principals)
        self._sealer: HandleSealer | None = None
        self._sealer_lock = trio.Lock()
        # create-if-absent is check-then-write: one writer at a time keeps it honest.
        self._write_lock = trio.Lock()
        self._dispatch = dispatcher(Keys, self)

    async def start(self) -> None:
        """Sweep the key directory and get the handle-validation key ready.

        A token that cannot give the handle-validation key is not fatal: the next location is
        used, or, with none, each request tries again (and answers 503 meanwhile).
        """
        await trio.to_thread.run_sync(self._store.prepare)
        try:
            await self._handle_sealer()
        except (BusError, LibError, OSError) as error:
            log.error("the handle-validation key is not available yet: %s", error)

    async def handle(self, op: str, args: dict[str, Any], caller: list[Any] | None) -> Any:
        """The bus entry: each operation of `Keys` is served by the method of its name."""
        try:
            return await self._dispatch(op, args, caller)
        except TokenError as error:
            raise error.for_client() from None
        except BusError as error:
            if error.kind is not ErrorKind.INTERNAL or error.message == "internal error":
                raise
            log.error("%s failed: %s", op, error.message)  # e.g. an injected disk fault
            raise internal("internal error") from None
        except LibError as error:
            log.warning("%s failed: %s", op, error)
            if error.generic:
                raise invalid(GENERIC_INVALID) from None
            raise internal("internal error") from None
        except OSError as error:
            log.error("%s failed: %s", op, error)
            raise internal("internal error") from None

    # -- the handle-validation key -------------------------------------------------------

    async def _handle_sealer(self) -> HandleSealer:
        if self._sealer is not None:
            return self._sealer
        async with self._sealer_lock:
            if self._sealer is None:
                self._sealer = await self._load_handle_validation_key()
            return self._sealer

    async def _load_handle_validation_key(self) -> HandleSealer:
        """Find or create the key like any other (so one found anywhere is kept), except that
        an unreachable token falls back to the file location: handles for file keys must work
        while the token is down."""
        key_id = HANDLE_VALIDATION_KEY_ID
        async with self._write_lock:
            try:
                found = await self._find_secret(key_id, creating=True)
                if found is None:
                    where = await self._store_secret(key_id, ["sign"], None)
                    log.info("created the handle-validation key in %s", where)
                    found = await self._find_secret(key_id)
            except TokenError as error:
                files = [w for w in self._locator.of(key_id) if isinstance(w, FileLocation)]
                if not error.unreachable or not files:
                    raise
                log.error(
                    "the handle-validation key cannot be read from the token (%s); using %s "
                    "until the next start, so handles made now stop working once the token is "
                    "back",
                    error,
                    files[0].path,
                )
                key = await self._store.read(files[0].path)
                if not key:
                    key = os.urandom(32)
                    await self._store.write(files[0].path, key)
                found = Secret(data=key)
        if found is None:
            raise external("the handle-validation key was created but cannot be found")
        if found.token is not None:
            log.info("the handle-validation key is %s", found.token.describe())
            return HandleSealer(self._token_mac(found.token))
        return HandleSealer(software_mac(found.data))

    def _token_mac(self, where: TokenLocation) -> Mac:
        token = self._need_token()

        async def mac(data: bytes) -> bytes:
            try:
                return await token.hmac(where, data)
            except TokenError as error:
                raise error.for_client() from None

        return mac

    def _need_token(self) -> TokenClient:
        if self._token is None:
            raise bad_parameter("a PKCS#11 key was asked for but no PKCS#11 library is set")
        return self._token

    # -- finding keys ----------------------------------------------------------------------

    async def _find_secret(
        self, key_id: str, *, creating: bool = False, use: TokenUse | None = None
    ) -> Secret | None:
        """The first location holding `key_id`'s symmetric key, tried in order.

        With `use`, a token location is not asked whether it has the key: the operation is run
        there at once (one token call instead of two), and "not found" passes to the next
        location. An unreachable token is skipped while looking for a key to use, so file keys
        keep working; if the key is nowhere else, the token's error is the answer, since the
        key may well be on it. When creating, an unreachable token stops the search: a second
        key elsewhere would shadow the real one.
        """

        async def from_file(where: FileLocation) -> Secret | None:
            data = await self._store.read(where.path)
            if data:
                return Secret(data=data)
            if data is not None and not creating:
                raise external(f"key {key_id} is empty")
            return None

        def on_token(where: TokenLocation, result: Any) -> Secret:
            return Secret(token=where, result=result)

        return await self._search(key_id, creating, use, from_file, Pkcs11.find_secret, on_token)

    async def _find_key_pair(
        self, key_id: str, *, creating: bool = False, use: TokenUse | None = None
    ) -> Pair | None:
        """As `_find_secret`, for key pairs (an unreadable file counts as absent when creating)."""

        async def from_file(where: FileLocation) -> Pair | None:
            found = await self._store.parsed(where.path, "key_pair", filecrypto.parse_key_pair)
            if found is None:
                return None
            if found[1] is None:
                if creating:
                    return None
                raise external(f"key pair {key_id} is not a private key we can read")
            return Pair(key=found[1])

        def on_token(where: TokenLocation, result: Any) -> Pair:
            return Pair(token=where, result=result)

        return await self._search(key_id, creating, use, from_file, Pkcs11.find_key_pair, on_token)

    async def _search(
        self,
        key_id: str,
        creating: bool,
        use: TokenUse | None,
        from_file: Callable[[FileLocation], Awaitable[Found | None]],
        find_op: Operation[Any, Any],
        on_token: Callable[[TokenLocation, Any], Found],
    ) -> Found | None:
        unreachable: TokenError | None = None
        for where in self._locator.of(key_id):
            if isinstance(where, FileLocation):
                found = await from_file(where)
                if found is not None:
                    return found
                continue
            try:
                if use is not None:
                    return on_token(where, await use(where))
                if await self._need_token().call(find_op, where):
                    return on_token(where, None)
            except TokenError as error:
                if error.missing:
                    continue
                if creating or not error.unreachable:
                    raise
                unreachable = error
        if unreachable is not None:
            raise unreachable
        return None

    async def _secret(self, key_id: str, use: TokenUse | None = None) -> Secret:
        found = await self._find_secret(key_id, use=use)
        if found is None:
            raise bad_parameter(f"key {key_id} not found")
        return found

    async def _key_pair(self, key_id: str, use: TokenUse | None = None) -> Pair:
        found = await self._find_key_pair(key_id, use=use)
        if found is None:
            raise bad_parameter(f"key pair {key_id} not found")
        return found

    def _on_token(self, op: Operation[Any, Any], **args: Any) -> TokenUse:
        async def use(where: TokenLocation) -> Any:
            return await self._need_token().call(op, where, **args)

        return use

    def _authorize(self, caller: Caller, key_id: str) -> None:
        """Clients by their principals; a service of this daemon asks for itself."""
        uid = caller.uid
        if uid is not None and not self._authorizer.allows(uid, key_id):
            raise unauthorized(f"user {uid} is not authorized to access the key {key_id}")

    # -- handles ---------------------------------------------------------------------------

    async def _open(self, handle: str) -> KeyRef:
        return await (await self._handle_sealer()).open(handle)

    async def _seal(self, ref: KeyRef) -> KeyHandle:
        return KeyHandle(await (await self._handle_sealer()).seal(ref))

    async def _hmac_with(self, key_id: str, message: bytes) -> bytes:
        """HMAC-SHA256 with symmetric key `key_id`, by the token if it is there."""
        secret = await self._secret(key_id, self._on_token(Pkcs11.hmac_sha256, message=message))
        if secret.token is not None:
            return bytes(secret.result)
        return await sized(len(message), filecrypto.hmac_sha256, secret.data, message)

    async def _derived_key(self, ref: KeyRef) -> bytes:
        """The bytes of a derived key: HMAC of its base key (done by the token for token keys)."""
        base = await self._open(ref.base_handle)
        return await self._hmac_with(base.key_id, ref.derivation_data)

    # -- operations ------------------------------------------------------------------------

    async def create_key(self, msg: CreateKey, caller: Caller) -> KeyHandle:
        check_id(msg.key_id)
        self._authorize(caller, msg.key_id)
        async with self._write_lock:
            if msg.key_bytes is not None:
                where = await self._store_secret(msg.key_id, msg.usage, msg.key_bytes)
                log.info("imported symmetric key %s into %s (%s)", msg.key_id, where, caller)
            elif await self._find_secret(msg.key_id, creating=True) is None:
                where = await self._store_secret(msg.key_id, msg.usage, None)
                log.info("created symmetric key %s in %s (%s)", msg.key_id, where, caller)
            if await self._find_secret(msg.key_id) is None:
                raise external(f"key {msg.key_id} was created but cannot be found")
        return await self._seal(KeyRef("Key", msg.key_id))

    async def _store_secret(self, key_id: str, usage: list[str], key_bytes: bytes | None) -> str:
        """Generate (None) or import a symmetric key in the first location that takes it."""
        refused: TokenError | None = None
        for where in self._locator.of(key_id):
            if isinstance(where, FileLocation):
                await self._store.write(
                    where.path, os.urandom(32) if key_bytes is None else key_bytes
                )
                return where.describe()
            token = self._need_token()
            try:
                if key_bytes is None:
                    await token.call(Pkcs11.generate_secret, where, usage=usage)
                else:
                    await token.call(Pkcs11.import_secret, where, key_bytes=key_bytes, usage=usage)
                return where.describe()
            except TokenError as error:
                # As libaziot-keys: a token that cannot make such a key passes to the next
                # location; an import the token rejects does too.
                if not (error.refused or (key_bytes is not None and not error.unreachable)):
                    raise
                log.warning("%s; trying the next location", error)
                refused = error
        if refused is not None and refused.error.code == TokenErrorCode.MECHANISM_MISSING:
            raise refused
        raise external(f"no location could take the symmetric key {key_id}")

    async def load_key(self, msg: LoadKey, caller: Caller) -> KeyHandle:
        check_id(msg.key_id)
        self._authorize(caller, msg.key_id)
        await self._secret(msg.key_id)
        return await self._seal(KeyRef("Key", msg.key_id))

    async def create_key_pair(self, msg: CreateKeyPair, caller: Caller) -> KeyHandle:
        check_id(msg.key_id)
        self._authorize(caller, msg.key_id)
        if msg.preferred_algorithms is not None:
            check_nul("preferred_algorithms", msg.preferred_algorithms)
        async with self._write_lock:
            if await self._find_key_pair(msg.key_id, creating=True) is None:
                algorithms = parse_preferred_algorithms(msg.preferred_algorithms)
                if not algorithms:
                    raise bad_parameter(
                        f"no usable algorithm in {msg.preferred_algorithms!r} for {msg.key_id}"
                    )
                where = self._locator.of(msg.key_id)[0]
                if isinstance(where, FileLocation):
                    key = await trio.to_thread.run_sync(filecrypto.generate_key_pair, algorithms[0])
                    await self._store.write(where.path, filecrypto.key_pair_pem(key))
                    used = algorithms[0]
                else:
                    used = await self._need_token().call(
                        Pkcs11.generate_key_pair, where, algorithms=algorithms
                    )
                log.info(
                    "created %s key pair %s in %s (%s)",
                    used,
                    msg.key_id,
                    where.describe(),
                    caller,
                )
        return await self._seal(KeyRef("KeyPair", msg.key_id))

    async def load_key_pair(self, msg: LoadKeyPair, caller: Caller) -> KeyHandle:
        check_id(msg.key_id)
        self._authorize(caller, msg.key_id)
        await self._key_pair(msg.key_id)
        return await self._seal(KeyRef("KeyPair", msg.key_id))

    async def move_key_pair(self, msg: MoveKeyPair, caller: Caller) -> Nothing:
        check_id(msg.source)
        check_id(msg.destination)
        self._authorize(caller, msg.source)
        self._authorize(caller, msg.destination)
        async with self._write_lock:
            try:
                found = await self._find_key_pair(msg.source)
            except LibError:
                # An unreadable file: the original renames whatever the file holds.
                found = Pair()
            candidates = self._locator.of(msg.source)
            source: FileLocation | TokenLocation = candidates[0]
            if found is not None and found.token is not None:
                source = found.token
            elif found is not None:
                source = next(w for w in candidates if isinstance(w, FileLocation))
            destination = self._locator.of(msg.destination)[0]
            if isinstance(source, FileLocation) and isinstance(destination, FileLocation):
                try:
                    await self._store.rename(source.path, destination.path)
                except FileNotFoundError:
                    raise external(f"key pair {msg.source} does not exist") from None
            elif isinstance(source, TokenLocation) and isinstance(destination, TokenLocation):
                if source.token != destination.token:
                    raise bad_parameter("cannot move a key pair between two PKCS#11 tokens")
                await self._need_token().move_key_pair(source, destination.label)
            else:
                raise bad_parameter("cannot move a key pair between a file and a PKCS#11 token")
        log.info("moved key pair %s to %s (%s)", msg.source, msg.destination, caller)
        return NOTHING

    async def _delete(self, handle: str, kind: str, noun: str) -> None:
        ref = await self._open(handle)
        if ref.kind != kind:
            raise invalid_handle(f"handle is not for {noun}")
        token_kind = "secret" if kind == "Key" else "key_pair"
        async with self._write_lock:
            # As libaziot-keys: every location of the id is cleared, not just the first.
            for where in self._locator.of(ref.key_id):
                if isinstance(where, FileLocation):
                    await self._store.remove(where.path)
                else:
                    await self._need_token().call(Pkcs11.delete, where, kind=token_kind)
        log.info("deleted %s %s", noun, ref.key_id)

    async def delete_key(self, msg: DeleteKey, caller: Caller) -> Nothing:
        await self._delete(msg.handle, "Key", "a key")
        return NOTHING

    async def delete_key_pair(self, msg: DeleteKeyPair, caller: Caller) -> Nothing:
        await self._delete(msg.handle, "KeyPair", "a key pair")
        return NOTHING

    async def get_parameter(self, msg: GetParameter, caller: Caller) -> Parameter:
        sealer = await self._handle_sealer()
        ref = await sealer.base_of(await sealer.open(msg.handle))
        pair = await self._key_pair(ref.key_id, self._on_token(Pkcs11.public_parameters))
        if pair.token is not None:
            return Parameter(token_parameter(pair.result, msg.name))
        assert pair.key is not None
        return Parameter(filecrypto.public_parameter(pair.key, msg.name))

    async def create_derived_key(self, msg: CreateDerivedKey, caller: Caller) -> KeyHandle:
        if (await self._open(msg.handle)).kind == "Derived":
            raise invalid_handle(
                "nested derived keys are not supported, import the outer derived key first"
            )
        return await self._seal(
            KeyRef("Derived", base_handle=msg.handle, derivation_data=msg.derivation_data)
        )

    async def export_derived_key(self, msg: ExportDerivedKey, caller: Caller) -> DerivedKeyBytes:
        ref = await self._open(msg.handle)
        if ref.kind != "Derived":
            raise invalid_handle("handle is not for a derived key")
        return DerivedKeyBytes(await self._derived_key(ref))

    async def sign(self, msg: Sign, caller: Caller) -> Signature:
        ref = await self._open(msg.handle)
        if ref.kind == "KeyPair" and msg.algorithm == "ECDSA":
            pair = await self._key_pair(
                ref.key_id, self._on_token(Pkcs11.sign_ecdsa, digest=msg.data)
            )
            if pair.token is not None:
                return Signature(pair.result)
            if not isinstance(pair.key, filecrypto.ec.EllipticCurvePrivateKey):
                raise bad_parameter(f"ECDSA asked of the non-EC key pair {ref.key_id}")
            return Signature(filecrypto.ecdsa_sign(pair.key, msg.data))
        if ref.kind == "Key" and msg.algorithm == "HMAC-SHA256":
            return Signature(await self._hmac_with(ref.key_id, msg.data))
        if ref.kind == "Derived" and msg.algorithm == "HMAC-SHA256":
            key = await self._derived_key(ref)
            signature = await sized(len(msg.data), filecrypto.hmac_sha256, key, msg.data)
            return Signature(signature)
        raise mechanism_error()

    async def encrypt(self, msg: Encrypt, caller: Caller) -> Ciphertext:
        ref = await self._open(msg.handle)
        if ref.kind in ("Key", "Derived") and msg.algorithm == "AEAD":
            if ref.kind == "Derived":
                key = await self._derived_key(ref)
            else:
                use = self._on_token(
                    Pkcs11.aes_gcm_encrypt, iv=msg.iv, aad=msg.aad, plaintext=msg.plaintext
                )
                secret = await self._secret(ref.key_id, use)
                if secret.token is not None:
                    return Ciphertext(b"\x02" + secret.result)
                key = secret.data
            size = len(msg.plaintext) + len(msg.aad)
            sealed = await sized(size, filecrypto.aead_encrypt, key, msg.iv, msg.aad, msg.plaintext)
            return Ciphertext(sealed)
        if ref.kind == "KeyPair" and msg.algorithm in ("RSA-PKCS1", "RSA-NO-PADDING"):
            padding = "pkcs1" if msg.algorithm == "RSA-PKCS1" else "none"
            use = self._on_token(Pkcs11.rsa_private, data=msg.plaintext, padding=padding)
            pair = await self._key_pair(ref.key_id, use)
            if pair.token is not None:
                return Ciphertext(pair.result)
            assert pair.key is not None
            # Milliseconds of OpenSSL for RSA-4096: always off the loop.
            out = await in_worker(
                filecrypto.rsa_private_encrypt, pair.key, msg.plaintext, msg.algorithm
            )
            return Ciphertext(out)
        raise mechanism_error()

    async def decrypt(self, msg: Decrypt, caller: Caller) -> Plaintext:
        ref = await self._open(msg.handle)
        if ref.kind not in ("Key", "Derived") or msg.algorithm != "AEAD":
            raise mechanism_error()
        if ref.kind == "Derived":
            key = await self._derived_key(ref)
        else:

            async def use(where: TokenLocation) -> Any:
                # Token keys only know the current format (0x02 || ciphertext || tag).
                if len(msg.ciphertext) < 17:
                    raise bad_parameter("ciphertext is malformed")
                if msg.ciphertext[0] != 2:
                    raise bad_parameter(f"unknown ciphertext version {msg.ciphertext[0]}")
                return await self._need_token().call(
                    Pkcs11.aes_gcm_decrypt,
                    where,
                    iv=msg.iv,
                    aad=msg.aad,
                    ciphertext_and_tag=msg.ciphertext[1:],
                )

            secret = await self._secret(ref.key_id, use)
            if secret.token is not None:
                return Plaintext(secret.result)
            key = secret.data
        size = len(msg.ciphertext) + len(msg.aad)
        opened = await sized(size, filecrypto.aead_decrypt, key, msg.iv, msg.aad, msg.ciphertext)
        return Plaintext(opened)

    async def reload_principals(self, msg: ReloadPrincipals, caller: Caller) -> Nothing:
        self._authorizer = KeyAuthorizer(KeyPrincipal(p.uid, p.keys) for p in msg.principals)
        log.info("principals reloaded: %d entries", len(msg.principals))
        return NOTHING
