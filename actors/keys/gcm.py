"""AES-GCM with an IV of any length, as OpenSSL's AES-256-GCM takes it (the original's cipher).

`cryptography`'s AESGCM refuses IVs under 8 bytes, so for those the mode is assembled here from
single AES blocks, AES-CTR and AESGCM itself (NIST SP 800-38D):

- the pre-counter block J0 is GHASH of the padded IV and its bit length (two GHASH blocks for
  a short IV: cheap in Python);
- the data is AES-CTR from inc32(J0);
- GHASH over the AAD and the ciphertext is too slow in Python for large bodies, so AESGCM
  computes it: encrypting, under a fixed 12-byte nonce N, the plaintext that yields our very
  ciphertext makes AESGCM's tag equal GHASH(AAD, C) xor E(N || 1). The tag is then
  GHASH(AAD, C) xor E(J0).
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TAG_LEN = 16
_BLOCK = 16
_NONCE = bytes(12)  # any fixed value works: only the tag of this pass is used
_R = 0xE1 << 120


def _block(key: bytes, block: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def _gf_multiply(x: int, y: int) -> int:
    """Multiplication in GF(2^128) with GCM's bit order."""
    product = 0
    for bit in range(127, -1, -1):
        if (x >> bit) & 1:
            product ^= y
        y = (y >> 1) ^ _R if y & 1 else y >> 1
    return product


def _ghash(h: bytes, data: bytes) -> bytes:
    """GHASH of `data`, a whole number of blocks."""
    subkey, state = int.from_bytes(h), 0
    for start in range(0, len(data), _BLOCK):
        state = _gf_multiply(state ^ int.from_bytes(data[start : start + _BLOCK]), subkey)
    return state.to_bytes(_BLOCK)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % _BLOCK)


def _ctr32(key: bytes, counter: bytes, data: bytes) -> bytes:
    """AES-CTR where only the low 32 bits of the counter count (GCM's inc32), wrapping."""
    prefix, low = counter[:12], int.from_bytes(counter[12:])
    output = []
    while data:
        blocks_before_wrap = (1 << 32) - low
        part, data = data[: blocks_before_wrap * _BLOCK], data[blocks_before_wrap * _BLOCK :]
        encryptor = Cipher(algorithms.AES(key), modes.CTR(prefix + low.to_bytes(4))).encryptor()
        output.append(encryptor.update(part) + encryptor.finalize())
        low = 0
    return b"".join(output)


def _inc32(block: bytes) -> bytes:
    return block[:12] + ((int.from_bytes(block[12:]) + 1) % (1 << 32)).to_bytes(4)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(len(a))


def _pre_counter(key: bytes, iv: bytes) -> bytes:
    if len(iv) == 12:
        return iv + (1).to_bytes(4)
    h = _block(key, bytes(_BLOCK))
    return _ghash(h, _pad(iv) + (len(iv) * 8).to_bytes(_BLOCK))


def _tag(key: bytes, j0: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    # Under nonce N, AESGCM encrypts with the keystream CTR(N || 2): this plaintext makes its
    # ciphertext ours, so its tag is GHASH(aad, ciphertext) xor E(N || 1).
    stand_in = _ctr32(key, _NONCE + (2).to_bytes(4), ciphertext)
    their_tag = AESGCM(key).encrypt(_NONCE, stand_in, aad)[-TAG_LEN:]
    ghash = _xor(their_tag, _block(key, _NONCE + (1).to_bytes(4)))
    return _xor(ghash, _block(key, j0))


def encrypt(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Ciphertext followed by the 16-byte tag, for a 32-byte key and an IV of any length."""
    if len(iv) >= 8:
        return AESGCM(key).encrypt(iv, plaintext, aad)
    return encrypt_assembled(key, iv, plaintext, aad)


def decrypt(key: bytes, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of ciphertext + tag; InvalidTag when the tag does not match."""
    if len(iv) >= 8:
        return AESGCM(key).decrypt(iv, sealed, aad)
    return decrypt_assembled(key, iv, sealed, aad)


def encrypt_assembled(key: bytes, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
    if not iv:
        raise ValueError("the IV is empty")
    j0 = _pre_counter(key, iv)
    ciphertext = _ctr32(key, _inc32(j0), plaintext)
    return ciphertext + _tag(key, j0, aad, ciphertext)


def decrypt_assembled(key: bytes, iv: bytes, sealed: bytes, aad: bytes) -> bytes:
    if not iv:
        raise ValueError("the IV is empty")
    if len(sealed) < TAG_LEN:
        raise InvalidTag()
    ciphertext, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]
    j0 = _pre_counter(key, iv)
    if not hmac.compare_digest(_tag(key, j0, aad, ciphertext), tag):
        raise InvalidTag()
    return _ctr32(key, _inc32(j0), ciphertext)
