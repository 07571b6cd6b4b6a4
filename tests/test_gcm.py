"""AES-256-GCM with IVs of any length, checked against OpenSSL's own EVP AES-256-GCM (the
original's cipher, called through ctypes by the tests' own binding: `cryptography` refuses IVs
under 8 bytes) and against `cryptography`'s AESGCM where it takes the IV."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aziot.actors.keys import gcm
from tests.openssl_gcm import openssl_seal


@pytest.mark.parametrize("iv_length", [1, 2, 3, 5, 7, 8, 12, 13, 16, 60, 128])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4099])
def test_sealed_as_openssl_seals_and_opened_again(iv_length: int, size: int) -> None:
    key, iv = os.urandom(32), os.urandom(iv_length)
    plaintext, aad = os.urandom(size), os.urandom(size % 41)
    sealed = gcm.encrypt(key, iv, plaintext, aad)
    assert sealed == openssl_seal(key, iv, plaintext, aad)
    assert gcm.decrypt(key, iv, sealed, aad) == plaintext


@pytest.mark.parametrize("iv_length", [1, 7, 8, 12, 128])
def test_aesgcm_opens_what_was_sealed_where_it_takes_the_iv(iv_length: int) -> None:
    """Short IVs go to OpenSSL's EVP directly, longer ones to `cryptography`: both must agree
    with `cryptography`'s AESGCM wherever that takes the IV (8 bytes and more)."""
    key, iv, plaintext, aad = os.urandom(32), os.urandom(iv_length), os.urandom(999), b"aad"
    sealed = gcm.encrypt(key, iv, plaintext, aad)
    if iv_length >= 8:
        assert AESGCM(key).decrypt(iv, sealed, aad) == plaintext
    assert gcm.decrypt(key, iv, sealed, aad) == plaintext


@pytest.mark.parametrize("flip", ["ciphertext", "tag", "aad", "iv"])
def test_any_change_is_refused_with_a_short_iv(flip: str) -> None:
    key, iv, aad = os.urandom(32), b"\x01\x02\x03", b"context"
    sealed = bytearray(gcm.encrypt(key, iv, b"the secret message", aad))
    if flip == "ciphertext":
        sealed[0] ^= 1
    elif flip == "tag":
        sealed[-1] ^= 0x80
    elif flip == "aad":
        aad = b"Context"
    else:
        iv = b"\x01\x02\x04"
    with pytest.raises(InvalidTag):
        gcm.decrypt(key, iv, bytes(sealed), aad)


def test_an_empty_iv_and_a_short_sealed_text_are_errors() -> None:
    key = os.urandom(32)
    with pytest.raises(ValueError):
        gcm.encrypt(key, b"", b"x", b"")
    with pytest.raises(InvalidTag):
        gcm.decrypt(key, b"\x00", bytes(15), b"")
