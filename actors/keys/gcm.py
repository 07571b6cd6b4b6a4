"""AES-256-GCM with an IV of any length, as OpenSSL's AES-256-GCM takes it (the original's cipher).

`cryptography`'s AESGCM takes IVs of 8 bytes or more; shorter ones (1 to 7 bytes, which the
original accepts) go to OpenSSL's EVP interface directly (`openssl.aes_gcm_seal`). Both are
OpenSSL's constant-time GCM: nothing here computes GHASH in Python, where the multiply would
branch on bits of the hash key.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import openssl

TAG_LEN = openssl.TAG_LEN
_AESGCM_SHORTEST_IV = 8


def encrypt(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Ciphertext followed by the 16-byte tag, for a 32-byte key and an IV of any length."""
    if len(iv) >= _AESGCM_SHORTEST_IV:
        return AESGCM(key).encrypt(iv, plaintext, aad)
    return openssl.aes_gcm_seal(key, iv, plaintext, aad)


def decrypt(key: bytes, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ciphertext + tag; InvalidTag when the tag does not match."""
    if len(iv) >= _AESGCM_SHORTEST_IV:
        return AESGCM(key).decrypt(iv, sealed, aad)
    return openssl.aes_gcm_open(key, iv, sealed, aad)
