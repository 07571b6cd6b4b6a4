"""Key handles: `sr=<B64(json)>&sig=<B64(HMAC-SHA256(handle-validation-key, json))>`.

The JSON is what the original's serde writes, byte for byte, so handles minted by either
implementation validate in the other as long as they share the handle-validation key.
"""

from __future__ import annotations

import binascii
import hmac
import json
import os
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from aziot.actors.b64 import decode_strict as b64decode_strict
from aziot.actors.b64 import encode as b64encode
from aziot.actors.offload import in_worker
from aziot.actors.texts import invalid_parameter
from aziot.bus.errors import BusError

from .cstring import check_nul

HANDLE_VALIDATION_KEY_ID = "handle-validation-key"
# Known-good handles are remembered by bytes, not by count: a derived handle carries its
# derivation data (a caller may send ~780 KB of it, a 3.7 MB handle), and 4,096 of those would
# be gigabytes. Handles of real clients are a few hundred bytes; larger ones are not kept at all
# and pay their MAC again on each use, in a worker thread.
_CACHE_BYTES = 4 << 20
_CACHEABLE = 16 << 10
_LARGE = 64 << 10  # a handle or body this long is encoded, decoded and MACed off the loop


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
    return invalid_parameter("handle", detail)


Mac = Callable[[bytes], Awaitable[bytes]]


def software_mac(key: bytes) -> Mac:
    """HMAC-SHA256 with a handle-validation key held in memory (the file store's case)."""

    def digest(data: bytes) -> bytes:
        return hmac.digest(key, data, "sha256")

    async def mac(data: bytes) -> bytes:
        if len(data) < _LARGE:
            return digest(data)
        return await in_worker(digest, data)

    return mac


class HandleSealer:
    """Mints and opens handles with one handle-validation key; remembers recent good handles.

    The MAC is a coroutine because the key may live in a PKCS#11 token, where each HMAC is a
    call to the token's worker.
    """

    def __init__(self, mac: Mac) -> None:
        self._mac = mac
        self._opened: OrderedDict[str, KeyRef] = OrderedDict()
        self._cached_bytes = 0

    async def seal(self, ref: KeyRef) -> str:
        nonce = b64encode(os.urandom(64))
        if len(ref.derivation_data) < _LARGE // 5:  # JSON writes up to 4 characters a byte
            body = _sealed_body(ref, nonce)
        else:
            body = await in_worker(_sealed_body, ref, nonce)
        signature = b64encode(await self._mac(body))
        if len(body) < _LARGE:
            handle = f"sr={b64encode(body)}&sig={signature}"
        else:
            encoded = await in_worker(_b64encode_sliced, body)
            handle = f"sr={encoded}&sig={signature}"
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

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def _remember(self, handle: str, ref: KeyRef) -> None:
        size = _footprint(handle, ref)
        if size > _CACHEABLE or handle in self._opened:
            return
        self._opened[handle] = ref
        self._cached_bytes += size
        while self._cached_bytes > _CACHE_BYTES:
            old_handle, old_ref = self._opened.popitem(last=False)
            self._cached_bytes -= _footprint(old_handle, old_ref)

    async def _open_uncached(self, handle: str) -> KeyRef:
        if len(handle) < _LARGE:
            body, signature = _split(handle)
        else:
            body, signature = await in_worker(_split, handle)
        if not hmac.compare_digest(await self._mac(body), signature):
            raise invalid_handle()
        if len(body) < _LARGE:
            kind, value = _decode_body(body)
        else:
            kind, value = await in_worker(_decode_body, body)
        if kind in ("Key", "KeyPair") and isinstance(value, str):
            return KeyRef(kind, _storable_id(value))
        if kind == "Derived":
            base, data = value
            await self.open(base)
            return KeyRef("Derived", base_handle=base, derivation_data=data)
        raise invalid_handle()

    async def base_of(self, ref: KeyRef) -> KeyRef:
        """The key a (possibly derived) reference finally uses."""
        while ref.kind == "Derived":
            ref = await self.open(ref.base_handle)
        return ref


def _footprint(handle: str, ref: KeyRef) -> int:
    """About what a cache entry holds: the handle, and what it names."""
    return len(handle) + len(ref.key_id) + len(ref.base_handle) + len(ref.derivation_data) + 200


# The long parts of a large handle are converted in slices: a single C call over megabytes
# (json.dumps, b64encode) holds the GIL throughout and stalls the event loop as surely as
# running it there; between slices the interpreter lets the loop's thread run.
_SLICE = 48 << 10
_BYTE_TEXT = [str(i).encode("ascii") for i in range(256)]


def _sealed_body(ref: KeyRef, nonce: str) -> bytes:
    if ref.kind != "Derived" or len(ref.derivation_data) < _SLICE:
        return json.dumps(
            {"key_id": ref.to_json(), "nonce": nonce}, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    # serde's compact form, byte for byte: {"key_id":{"Derived":["<base>",[1,2,...]]},...}
    data = ref.derivation_data
    numbers = [
        b",".join(map(_BYTE_TEXT.__getitem__, data[at : at + _SLICE]))
        for at in range(0, len(data), _SLICE)
    ]
    base = json.dumps(ref.base_handle, ensure_ascii=False).encode("utf-8")
    return b"".join(
        [
            b'{"key_id":{"Derived":[',
            base,
            b",[",
            b",".join(numbers),
            b']]},"nonce":"',
            nonce.encode("ascii"),
            b'"}',
        ]
    )


def _b64encode_sliced(data: bytes) -> str:
    step = 3 * _SLICE  # whole 3-byte groups: the slices' texts join into the whole's
    return "".join(b64encode(data[at : at + step]) for at in range(0, len(data), step))


_DERIVED_BODY = re.compile(
    rb'\{"key_id":\{"Derived":\[("[A-Za-z0-9+/=&]*"),\[([0-9,]*)\]\]\},"nonce":"[A-Za-z0-9+/=]*"\}'
)


def _split(handle: str) -> tuple[bytes, bytes]:
    """The `sr` JSON and the `sig` MAC of a handle, both decoded."""
    body = signature = None
    try:  # every part is decoded, as the original does: a bad one fails even if later ones
        for part in handle.split("&"):
            if part.startswith("sr="):
                body = b64decode_strict(part[3:])
                body.decode("utf-8")
            elif part.startswith("sig="):
                signature = b64decode_strict(part[4:])
    except (binascii.Error, ValueError):
        raise invalid_handle() from None
    if body is None or signature is None:
        raise invalid_handle()
    return body, signature


def _decode_body(body: bytes) -> tuple[str, Any]:
    """(kind, value) of a MAC-checked `sr` JSON; a Derived value as (base handle, bytes)."""
    if len(body) >= _SLICE:
        # A large derived handle in serde's compact form (the only writer of a body that passed
        # the MAC): its byte list is read in slices rather than by one json.loads.
        found = _DERIVED_BODY.fullmatch(body)
        if found is not None:
            try:
                numbers = found[2].split(b",") if found[2] else []
                data = b"".join(
                    bytes(map(int, numbers[at : at + _SLICE]))
                    for at in range(0, len(numbers), _SLICE)
                )
            except ValueError:
                raise invalid_handle() from None
            return "Derived", (json.loads(found[1]), data)
    try:
        key_id = json.loads(body.decode("utf-8"))["key_id"]
        ((kind, value),) = key_id.items()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise invalid_handle() from None
    if kind == "Derived":
        try:
            base, data = value
            data = bytes(data)
        except (ValueError, TypeError):
            raise invalid_handle() from None
        if not isinstance(base, str):
            raise invalid_handle()
        return kind, (base, data)
    return kind, value


def _storable_id(key_id: str) -> str:
    """Only a forger holding the handle-validation key can name these; the original's serde
    refuses a lone surrogate escape, and its C string conversion refuses NUL."""
    if any("\ud800" <= c <= "\udfff" for c in key_id):
        raise invalid_handle()
    check_nul("handle", key_id)
    return key_id
