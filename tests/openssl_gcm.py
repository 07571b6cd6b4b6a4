"""OpenSSL's own EVP AES-256-GCM, called through ctypes: the original's cipher, which takes IVs
of any length from 1 byte (`cryptography` refuses IVs under 8 bytes)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from cryptography.exceptions import InvalidTag

_EVP_CTRL_GCM_SET_IVLEN = 0x9
_EVP_CTRL_GCM_GET_TAG = 0x10
_EVP_CTRL_GCM_SET_TAG = 0x11


@functools.cache
def _libcrypto() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise RuntimeError("libcrypto (OpenSSL) is not installed")
    lib = ctypes.CDLL(name)
    pointer, size = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)
    lib.EVP_CIPHER_CTX_new.restype = pointer
    lib.EVP_aes_256_gcm.restype = pointer
    lib.EVP_CIPHER_CTX_free.argtypes = [pointer]
    lib.EVP_CIPHER_CTX_ctrl.argtypes = [pointer, ctypes.c_int, ctypes.c_int, pointer]
    for direction in ("Encrypt", "Decrypt"):
        getattr(lib, f"EVP_{direction}Init_ex").argtypes = [pointer] * 5
        getattr(lib, f"EVP_{direction}Update").argtypes = [
            pointer,
            pointer,
            size,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        getattr(lib, f"EVP_{direction}Final_ex").argtypes = [pointer, pointer, size]
    return lib


def _run(direction: str, key: bytes, iv: bytes, data: bytes, aad: bytes, tag: bytes) -> bytes:
    """One AES-256-GCM pass; `tag` is checked when decrypting, and appended when encrypting."""
    lib = _libcrypto()
    init, update, final = (
        getattr(lib, f"EVP_{direction}{s}") for s in ("Init_ex", "Update", "Final_ex")
    )
    ctx = lib.EVP_CIPHER_CTX_new()
    try:
        assert init(ctx, lib.EVP_aes_256_gcm(), None, None, None) == 1
        assert lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_IVLEN, len(iv), None) == 1
        assert init(ctx, None, None, key, iv) == 1
        written = ctypes.c_int(0)
        assert update(ctx, None, ctypes.byref(written), aad, len(aad)) == 1
        out = ctypes.create_string_buffer(len(data) + 16)
        assert update(ctx, out, ctypes.byref(written), data, len(data)) == 1
        total = written.value
        if direction == "Decrypt":
            assert lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_SET_TAG, 16, tag) == 1
        if final(ctx, ctypes.create_string_buffer(16), ctypes.byref(written)) != 1:
            raise InvalidTag()
        if direction == "Decrypt":
            return out.raw[:total]
        made = ctypes.create_string_buffer(16)
        assert lib.EVP_CIPHER_CTX_ctrl(ctx, _EVP_CTRL_GCM_GET_TAG, 16, made) == 1
        return out.raw[:total] + made.raw
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def openssl_seal(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Ciphertext + 16-byte tag."""
    return _run("Encrypt", key, iv, plaintext, aad, b"")


def openssl_open(key: bytes, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ciphertext + 16-byte tag; InvalidTag when OpenSSL refuses the tag."""
    return _run("Decrypt", key, iv, sealed[:-16], aad, sealed[-16:])
