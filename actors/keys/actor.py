"""The keys actor: key ids to locations, handles, authorization, and the operations of keyd.

It mirrors libaziot-keys' semantics (create-if-absent, import overwrites, one namespace and one
file per id, the errors that become 400 or 500) on top of `FileStore` and `filecrypto`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import trio

from bus.errors import BusError, internal, invalid, unauthorized

from . import filecrypto
from .authz import KeyAuthorizer, KeyPrincipal
from .filecrypto import LibError, bad_parameter, external
from .handles import HANDLE_VALIDATION_KEY_ID, HandleSealer, KeyRef, invalid_handle
from .messages import (
    CreateDerivedKey,
    CreateKey,
    CreateKeyPair,
    Decrypt,
    DeleteKey,
    DeleteKeyPair,
    Encrypt,
    ExportDerivedKey,
    GetParameter,
    LoadKey,
    LoadKeyPair,
    MoveKeyPair,
    ReloadPrincipals,
    Sign,
    from_wire,
)
from .store import FileStore

log = logging.getLogger(__name__)

GENERIC_INVALID = "a parameter has an invalid value"
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
    position = key_id.find("\0")
    if position >= 0:
        raise invalid(
            'parameter "id" has an invalid value\n'
            f"caused by: nul byte found in provided data at position: {position}"
        )


class KeysActor:
    """Owns the key store, the handle sealer and the principals of one keyd."""

    def __init__(
        self,
        store: FileStore,
        preloaded: dict[str, str],
        principals: list[KeyPrincipal],
    ) -> None:
        self._store = store
        self._preloaded = preloaded
        self._authorizer = KeyAuthorizer(principals)
        self._sealer: HandleSealer | None = None
        # create-if-absent is check-then-write: one writer at a time keeps it honest.
        self._write_lock = trio.Lock()
        self._handlers = {
            CreateKey: self._create_key,
            LoadKey: self._load_key,
            CreateKeyPair: self._create_key_pair,
            LoadKeyPair: self._load_key_pair,
            MoveKeyPair: self._move_key_pair,
            DeleteKey: self._delete_key,
            DeleteKeyPair: self._delete_key_pair,
            GetParameter: self._get_parameter,
            CreateDerivedKey: self._create_derived_key,
            ExportDerivedKey: self._export_derived_key,
            Sign: self._sign,
            Encrypt: self._encrypt,
            Decrypt: self._decrypt,
            ReloadPrincipals: self._reload_principals,
        }

    async def start(self) -> None:
        """Load (or create) the handle-validation key; handles depend on it."""
        await trio.to_thread.run_sync(self._store.prepare)
        path = self._location(HANDLE_VALIDATION_KEY_ID)
        async with self._write_lock:
            key = await self._read(path)
            if not key:
                key = os.urandom(32)
                await self._write(path, key)
                log.info("created the handle-validation key at %s", path)
        self._sealer = HandleSealer(key)

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        try:
            message = from_wire(op, args)
        except KeyError:
            raise invalid(f"unknown operation {op!r}") from None
        except Exception as error:
            raise invalid(f"malformed {op} request: {error}") from None
        try:
            return await self._handlers[type(message)](message)
        except LibError as error:
            log.warning("%s failed: %s", op, error)
            if error.generic:
                raise invalid(GENERIC_INVALID) from None
            raise internal("internal error") from None
        except OSError as error:
            log.error("%s failed: %s", op, error)
            raise internal("internal error") from None

    # -- locations and files -------------------------------------------------------------

    def _location(self, key_id: str) -> Path:
        check_id(key_id)
        preloaded = self._preloaded.get(key_id)
        if preloaded is not None:
            uri = urlsplit(preloaded)
            if uri.scheme == "file":
                return Path(unquote(uri.path))
            if uri.scheme == "pkcs11":
                raise bad_parameter(f"preloaded key {key_id} is in PKCS#11 but no library is set")
            raise bad_parameter(f"preloaded key {key_id} has an unsupported URI {preloaded!r}")
        path = self._store.path_of(key_id)
        if path is None:
            raise bad_parameter("no way to create keys: aziot_keys.homedir_path is not set")
        return path

    async def _read(self, path: Path) -> bytes | None:
        return await self._store.read(path)

    async def _write(self, path: Path, data: bytes) -> None:
        await self._store.write(path, data)

    async def _symmetric_bytes(self, key_id: str) -> bytes:
        data = await self._read(self._location(key_id))
        if data is None:
            raise bad_parameter(f"key {key_id} not found")
        if not data:
            raise external(f"key {key_id} is empty")
        return data

    async def _key_pair(self, key_id: str) -> filecrypto.PrivateKey:
        found = await self._store.parsed(
            self._location(key_id), "key_pair", filecrypto.parse_key_pair
        )
        if found is None:
            raise bad_parameter(f"key pair {key_id} not found")
        if found[1] is None:
            raise external(f"key pair {key_id} is not a private key we can read")
        return found[1]

    def _authorize(self, uid: int, key_id: str) -> None:
        if not self._authorizer.allows(uid, key_id):
            raise unauthorized(f"user {uid} is not authorized to access the key {key_id}")

    # -- handles -------------------------------------------------------------------------

    def _open(self, handle: str) -> KeyRef:
        assert self._sealer is not None
        return self._sealer.open(handle)

    def _seal(self, ref: KeyRef) -> dict[str, str]:
        assert self._sealer is not None
        return {"handle": self._sealer.seal(ref)}

    async def _secret_of(self, ref: KeyRef) -> bytes:
        """The symmetric key a Key or Derived reference stands for."""
        if ref.kind == "Derived":
            base = self._open(ref.base_handle)
            return filecrypto.hmac_sha256(
                await self._symmetric_bytes(base.key_id), ref.derivation_data
            )
        return await self._symmetric_bytes(ref.key_id)

    # -- operations ----------------------------------------------------------------------

    async def _create_key(self, msg: CreateKey) -> dict[str, str]:
        check_id(msg.key_id)
        self._authorize(msg.uid, msg.key_id)
        path = self._location(msg.key_id)
        async with self._write_lock:
            if msg.key_bytes is not None:
                await self._write(path, msg.key_bytes)
                log.info("imported symmetric key %s (uid %d)", msg.key_id, msg.uid)
            elif not await self._read(path):
                await self._write(path, os.urandom(32))
                log.info("created symmetric key %s (uid %d)", msg.key_id, msg.uid)
        return self._seal(KeyRef("Key", msg.key_id))

    async def _load_key(self, msg: LoadKey) -> dict[str, str]:
        check_id(msg.key_id)
        self._authorize(msg.uid, msg.key_id)
        await self._symmetric_bytes(msg.key_id)
        return self._seal(KeyRef("Key", msg.key_id))

    async def _create_key_pair(self, msg: CreateKeyPair) -> dict[str, str]:
        check_id(msg.key_id)
        self._authorize(msg.uid, msg.key_id)
        path = self._location(msg.key_id)
        async with self._write_lock:
            found = await self._store.parsed(path, "key_pair", filecrypto.parse_key_pair)
            if found is None or found[1] is None:
                algorithms = parse_preferred_algorithms(msg.preferred_algorithms)
                if not algorithms:
                    raise bad_parameter(
                        f"no usable algorithm in {msg.preferred_algorithms!r} for {msg.key_id}"
                    )
                key = await trio.to_thread.run_sync(filecrypto.generate_key_pair, algorithms[0])
                await self._write(path, filecrypto.key_pair_pem(key))
                log.info("created %s key pair %s (uid %d)", algorithms[0], msg.key_id, msg.uid)
        return self._seal(KeyRef("KeyPair", msg.key_id))

    async def _load_key_pair(self, msg: LoadKeyPair) -> dict[str, str]:
        check_id(msg.key_id)
        self._authorize(msg.uid, msg.key_id)
        await self._key_pair(msg.key_id)
        return self._seal(KeyRef("KeyPair", msg.key_id))

    async def _move_key_pair(self, msg: MoveKeyPair) -> None:
        check_id(msg.source)
        check_id(msg.destination)
        self._authorize(msg.uid, msg.source)
        self._authorize(msg.uid, msg.destination)
        source, destination = self._location(msg.source), self._location(msg.destination)
        async with self._write_lock:
            try:
                await self._store.rename(source, destination)
            except FileNotFoundError:
                raise external(f"key pair {msg.source} does not exist") from None
        log.info("moved key pair %s to %s (uid %d)", msg.source, msg.destination, msg.uid)

    async def _delete(self, handle: str, kind: str, noun: str) -> None:
        ref = self._open(handle)
        if ref.kind != kind:
            raise invalid_handle(f"handle is not for {noun}")
        path = self._location(ref.key_id)
        async with self._write_lock:
            await self._store.remove(path)
        log.info("deleted %s %s", noun, ref.key_id)

    async def _delete_key(self, msg: DeleteKey) -> None:
        await self._delete(msg.handle, "Key", "a key")

    async def _delete_key_pair(self, msg: DeleteKeyPair) -> None:
        await self._delete(msg.handle, "KeyPair", "a key pair")

    async def _get_parameter(self, msg: GetParameter) -> dict[str, Any]:
        assert self._sealer is not None
        ref = self._sealer.base_of(self._open(msg.handle))
        key = await self._key_pair(ref.key_id)
        return {"value": filecrypto.public_parameter(key, msg.name)}

    async def _create_derived_key(self, msg: CreateDerivedKey) -> dict[str, str]:
        if self._open(msg.handle).kind == "Derived":
            raise invalid_handle(
                "nested derived keys are not supported, import the outer derived key first"
            )
        return self._seal(
            KeyRef("Derived", base_handle=msg.handle, derivation_data=msg.derivation_data)
        )

    async def _export_derived_key(self, msg: ExportDerivedKey) -> dict[str, bytes]:
        ref = self._open(msg.handle)
        if ref.kind != "Derived":
            raise invalid_handle("handle is not for a derived key")
        return {"key": await self._secret_of(ref)}

    async def _sign(self, msg: Sign) -> dict[str, bytes]:
        ref = self._open(msg.handle)
        if ref.kind == "KeyPair" and msg.algorithm == "ECDSA":
            key = await self._key_pair(ref.key_id)
            if not isinstance(key, filecrypto.ec.EllipticCurvePrivateKey):
                raise bad_parameter(f"ECDSA asked of the non-EC key pair {ref.key_id}")
            return {"signature": filecrypto.ecdsa_sign(key, msg.data)}
        if ref.kind in ("Key", "Derived") and msg.algorithm == "HMAC-SHA256":
            return {"signature": filecrypto.hmac_sha256(await self._secret_of(ref), msg.data)}
        raise mechanism_error()

    async def _encrypt(self, msg: Encrypt) -> dict[str, bytes]:
        ref = self._open(msg.handle)
        if ref.kind in ("Key", "Derived") and msg.algorithm == "AEAD":
            key = await self._secret_of(ref)
            return {"ciphertext": filecrypto.aead_encrypt(key, msg.iv, msg.aad, msg.plaintext)}
        if ref.kind == "KeyPair" and msg.algorithm in ("RSA-PKCS1", "RSA-NO-PADDING"):
            key = await self._key_pair(ref.key_id)
            out = filecrypto.rsa_private_encrypt(key, msg.plaintext, msg.algorithm)
            return {"ciphertext": out}
        raise mechanism_error()

    async def _decrypt(self, msg: Decrypt) -> dict[str, bytes]:
        ref = self._open(msg.handle)
        if ref.kind in ("Key", "Derived") and msg.algorithm == "AEAD":
            key = await self._secret_of(ref)
            return {"plaintext": filecrypto.aead_decrypt(key, msg.iv, msg.aad, msg.ciphertext)}
        raise mechanism_error()

    async def _reload_principals(self, msg: ReloadPrincipals) -> None:
        self._authorizer = KeyAuthorizer(KeyPrincipal(p.uid, p.keys) for p in msg.principals)
        log.info("principals reloaded: %d entries", len(msg.principals))
