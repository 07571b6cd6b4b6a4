"""Key handles: `sr=<B64(json)>&sig=<B64(HMAC-SHA256(handle-validation-key, json))>`.

The JSON is what the original's serde writes, byte for byte, so handles minted by either
implementation validate in the other as long as they share the handle-validation key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import attrs

from bus.errors import BusError, invalid

from .cstring import check_nul

HANDLE_VALIDATION_KEY_ID = "handle-validation-key"
_CACHE_SIZE = 4096


@attrs.frozen
class KeyRef:
    """What a handle names: a symmetric key, a key pair, or data derived from another handle."""

    kind: str  # "Key", "KeyPair" or "Derived"
    key_id: str = ""
    base_handle: str = ""
    derivation_data: bytes = b""

    def to_json(self) -> object:
        if self.kind == "Derived":
            return {"Derived": [self.base_handle, list(self.derivation_data)]}
        return {self.kind: self.key_id}


def invalid_handle(detail: str = "invalid handle") -> BusError:
    return invalid(f'parameter "handle" has an invalid value\ncaused by: {detail}')


def b64decode_strict(text: str) -> bytes:
    """Decode standard padded base64, refusing what Rust's strict engine refuses."""
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode("ascii") != text:
        raise binascii.Error("non-canonical base64")
    return raw


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


Mac = Callable[[bytes], Awaitable[bytes]]


def software_mac(key: bytes) -> Mac:
    """HMAC-SHA256 with a handle-validation key held in memory (the file store's case)."""

    async def mac(data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.sha256).digest()

    return mac


class HandleSealer:
    """Mints and opens handles with one handle-validation key; remembers recent good handles.

    The MAC is a coroutine because the key may live in a PKCS#11 token, where each HMAC is a
    call to the token's worker.
    """

    def __init__(self, mac: Mac) -> None:
        self._mac = mac
        self._opened: OrderedDict[str, KeyRef] = OrderedDict()

    async def seal(self, ref: KeyRef) -> str:
        nonce = b64encode(os.urandom(64))
        body = json.dumps(
            {"key_id": ref.to_json(), "nonce": nonce}, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        handle = f"sr={b64encode(body)}&sig={b64encode(await self._mac(body))}"
        self._remember(handle, ref)  # minted here, so already known good: no MAC on first use
        return handle

    async def open(self, handle: str) -> KeyRef:
        """Validate `handle` and return what it names (a Derived base is validated too)."""
        ref = self._opened.get(handle)
        if ref is not None:
            self._opened.move_to_end(handle)
            return ref
        ref = await self._open_uncached(handle)
        self._remember(handle, ref)
        return ref

    def _remember(self, handle: str, ref: KeyRef) -> None:
        self._opened[handle] = ref
        if len(self._opened) > _CACHE_SIZE:
            self._opened.popitem(last=False)

    async def _open_uncached(self, handle: str) -> KeyRef:
        body = signature = None
        try:  # every part is decoded, as the original does: a bad one fails even if later ones
            for part in handle.split("&"):
                if part.startswith("sr="):
                    body = b64decode_strict(part[3:])
                    text = body.decode("utf-8")
                elif part.startswith("sig="):
                    signature = b64decode_strict(part[4:])
        except (binascii.Error, ValueError):
            raise invalid_handle() from None
        if body is None or signature is None:
            raise invalid_handle()
        if not hmac.compare_digest(await self._mac(body), signature):
            raise invalid_handle()
        try:
            key_id = json.loads(text)["key_id"]
            ((kind, value),) = key_id.items()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise invalid_handle() from None
        if kind in ("Key", "KeyPair") and isinstance(value, str):
            return KeyRef(kind, _storable_id(value))
        if kind == "Derived":
            try:
                base, data = value
                data = bytes(data)
            except (ValueError, TypeError):
                raise invalid_handle() from None
            if not isinstance(base, str):
                raise invalid_handle()
            await self.open(base)
            return KeyRef("Derived", base_handle=base, derivation_data=data)
        raise invalid_handle()

    async def base_of(self, ref: KeyRef) -> KeyRef:
        """The key a (possibly derived) reference finally uses."""
        while ref.kind == "Derived":
            ref = await self.open(ref.base_handle)
        return ref


def _storable_id(key_id: str) -> str:
    """Only a forger holding the handle-validation key can name these; the original's serde
    refuses a lone surrogate escape, and its C string conversion refuses NUL."""
    if any("\ud800" <= c <= "\udfff" for c in key_id):
        raise invalid_handle()
    check_nul("handle", key_id)
    return key_id
