"""The two OpenSSL operations keyd needs that `cryptography` does not offer, through ctypes.

- AES-256-GCM with an IV of 1 to 7 bytes (`cryptography`'s AESGCM wants 8 or more), and
- the raw RSA private operation, `RSA_private_encrypt` with PKCS#1 type-1 padding or none, which
  is what the original does for `RSA-PKCS1` and `RSA-NO-PADDING`.

Both run in OpenSSL's own constant-time code: GHASH without branches on the hash key, RSA with
blinding and with the CRT result checked against the public exponent before it is returned (a
fault during the private operation would otherwise hand out a factor of the modulus). ctypes
releases the GIL for each call, so these run in parallel with the event loop when called from a
worker thread.

The library is the system's libcrypto, the one Python's own `ssl` module is linked with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_GET_TAG = 0x10
_EVP_CTRL_GCM_SET_TAG = 0x11
RSA_PKCS1_PADDING = 1
RSA_NO_PADDING = 3
TAG_LEN = 16


class OpenSslError(Exception):
    """OpenSSL refused an operation (its own error text, from its error queue)."""


@functools.cache
def libcrypto() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise OSError("libcrypto (OpenSSL) is not installed")
    lib = ctypes.CDLL(name)
    ptr, int_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)
    size_p = ctypes.POINTER(ctypes.c_size_t)
    signatures: dict[str, tuple[list[object], object]] = {
        "EVP_CIPHER_CTX_new": ([], ptr),
        "EVP_CIPHER_CTX_free": ([ptr], None),
        "EVP_aes_256_gcm": ([], ptr),
        "EVP_CIPHER_CTX_ctrl": ([ptr, ctypes.c_int, ctypes.c_int, ptr], ctypes.c_int),
        "EVP_EncryptInit_ex": ([ptr] * 5, ctypes.c_int),
        "EVP_DecryptInit_ex": ([ptr] * 5, ctypes.c_int),
        "EVP_EncryptUpdate": ([ptr, ptr, int_p, ptr, ctypes.c_int], ctypes.c_int),
        "EVP_DecryptUpdate": ([ptr, ptr, int_p, ptr, ctypes.c_int], ctypes.c_int),
        "EVP_EncryptFinal_ex": ([ptr, ptr, int_p], ctypes.c_int),
        "EVP_DecryptFinal_ex": ([ptr, ptr, int_p], ctypes.c_int),
        "d2i_AutoPrivateKey": ([ptr, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long], ptr),
        "EVP_PKEY_free": ([ptr], None),
        "EVP_PKEY_CTX_new": ([ptr, ptr], ptr),
        "EVP_PKEY_CTX_free": ([ptr], None),
        "EVP_PKEY_sign_init": ([ptr], ctypes.c_int),
        "EVP_PKEY_CTX_set_rsa_padding": ([ptr, ctypes.c_int], ctypes.c_int),
        "EVP_PKEY_sign": ([ptr, ptr, size_p, ptr, ctypes.c_size_t], ctypes.c_int),
        "ERR_get_error": ([], ctypes.c_ulong),
        "ERR_error_string_n": ([ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t], None),
    }
    for function, (argtypes, restype) in signatures.items():
        getattr(lib, function).argtypes = argtypes
        getattr(lib, function).restype = restype
    return lib


def available() -> bool:
    try:
        libcrypto()
    except OSError:
        return False
    return True


def _errors(lib: ctypes.CDLL) -> str:
    """OpenSSL's queued errors of this thread, oldest first (and the queue emptied)."""
    texts = []
    while code := lib.ERR_get_error():
        buffer = ctypes.create_string_buffer(256)
        lib.ERR_error_string_n(code, buffer, len(buffer))
        texts.append(buffer.value.decode("ascii", "replace"))
    return "; ".join(texts) or "no detail"


def _check(lib: ctypes.CDLL, result: int, what: str) -> None:
    if result != 1:
        raise OpenSslError(f"{what} failed: {_errors(lib)}")


def _gcm(encrypt: bool, key: bytes, iv: bytes, data: bytes, aad: bytes, tag: bytes) -> bytes:
    lib = libcrypto()
    way = "Encrypt" if encrypt else "Decrypt"
    init, update, final = (getattr(lib, f"EVP_{way}{s}") for s in ("Init_ex", "Update", "Final_ex"))
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx:
        raise MemoryError("EVP_CIPHER_CTX_new")
    try:
        _check(lib, init(ctx, lib.EVP_aes_256_gcm(), None, None, None), "GCM init")
        _check(lib, lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_IVLEN, len(iv), None), "IV")
        _check(lib, init(ctx, None, None, key, iv), "GCM key")
        written = ctypes.c_int(0)
        if aad:
            _check(lib, update(ctx, None, ctypes.byref(written), aad, len(aad)), "GCM aad")
        out = ctypes.create_string_buffer(len(data) + TAG_LEN)
        _check(lib, update(ctx, out, ctypes.byref(written), data, len(data)), "GCM update")
        total = written.value
        if not encrypt:
            tag_buffer = ctypes.create_string_buffer(tag, TAG_LEN)
            _check(
                lib,
                lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag_buffer),
                "GCM tag",
            )
        rest = ctypes.create_string_buffer(TAG_LEN)
        if final(ctx, rest, ctypes.byref(written)) != 1:
            _errors(lib)
            raise InvalidTag()
        if not encrypt:
            return out.raw[:total]
        made = ctypes.create_string_buffer(TAG_LEN)
        _check(lib, lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, TAG_LEN, made), "tag")
        return out.raw[:total] + made.raw
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def aes_gcm_seal(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Ciphertext followed by the 16-byte tag."""
    if not iv:
        raise ValueError("the IV is empty")
    return _gcm(True, key, iv, plaintext, aad, b"")


def aes_gcm_open(key: bytes, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ciphertext + tag; InvalidTag when the tag does not match."""
    if not iv:
        raise ValueError("the IV is empty")
    if len(sealed) < TAG_LEN:
        raise InvalidTag()
    return _gcm(False, key, iv, sealed[:-TAG_LEN], aad, sealed[-TAG_LEN:])


class RsaKey:
    """An RSA private key loaded into libcrypto once, freed with this object."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        lib = libcrypto()
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cursor = ctypes.c_char_p(der)
        pkey = lib.d2i_AutoPrivateKey(None, ctypes.byref(cursor), len(der))
        if not pkey:
            raise OpenSslError(f"d2i_AutoPrivateKey failed: {_errors(lib)}")
        self._lib = lib
        self._pkey = pkey
        self.size = (key.key_size + 7) // 8
        # An EVP_PKEY may be used from several threads at once for signing, but its lazily
        # built Montgomery/blinding caches are only safe under OpenSSL's own locks; keep one
        # operation at a time per key to stay clear of that detail.
        self._lock = threading.Lock()

    def __del__(self) -> None:
        pkey, self._pkey = getattr(self, "_pkey", None), None
        if pkey:
            self._lib.EVP_PKEY_free(pkey)

    def private_encrypt(self, data: bytes, padding: int) -> bytes:
        """RSA_private_encrypt(data) with `padding` (RSA_PKCS1_PADDING or RSA_NO_PADDING)."""
        lib = self._lib
        with self._lock:
            ctx = lib.EVP_PKEY_CTX_new(self._pkey, None)
            if not ctx:
                raise MemoryError("EVP_PKEY_CTX_new")
            try:
                _check(lib, lib.EVP_PKEY_sign_init(ctx), "RSA sign init")
                _check(lib, lib.EVP_PKEY_CTX_set_rsa_padding(ctx, padding), "RSA padding")
                out = ctypes.create_string_buffer(self.size)
                length = ctypes.c_size_t(self.size)
                result = lib.EVP_PKEY_sign(ctx, out, ctypes.byref(length), data, len(data))
                _check(lib, result, "RSA private operation")
                return out.raw[: length.value]
            finally:
                lib.EVP_PKEY_CTX_free(ctx)
