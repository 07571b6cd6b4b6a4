"""The cryptography of keys kept in files, with the original's results and error classes.

Errors raise `LibError`: `generic=True` is the library's INVALID_PARAMETER (the façade answers 400
"a parameter has an invalid value"), otherwise it is an external failure (500 "internal error").
The detail always reaches the log.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from . import gcm, openssl

P256_OID_DER = bytes.fromhex("06082a8648ce3d030107")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class LibError(Exception):
    def __init__(self, detail: str, *, generic: bool) -> None:
        super().__init__(detail)
        self.generic = generic


def bad_parameter(detail: str) -> LibError:
    return LibError(detail, generic=True)


def external(detail: str) -> LibError:
    return LibError(detail, generic=False)


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def generate_key_pair(algorithm: str) -> PrivateKey:
    if algorithm == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    bits = {"rsa-2048": 2048, "rsa-4096": 4096}.get(algorithm)
    if bits is None:
        raise bad_parameter(f"unsupported key pair algorithm {algorithm!r}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def key_pair_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_key_pair(data: bytes) -> PrivateKey | None:
    """The private key in a PEM file, or None when the bytes are not one we can use."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else None


def _check_aes256(key: bytes) -> None:
    if len(key) != 32:  # AES would quietly run AES-128 or AES-192
        raise external(f"AES-256-GCM needs a 32-byte key, this one has {len(key)} bytes")


def aead_encrypt(key: bytes, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
    _check_aes256(key)
    try:
        sealed = gcm.encrypt(key, iv, plaintext, aad)
    except ValueError as error:
        raise external(f"AES-256-GCM encryption failed: {error}") from None
    return b"\x02" + sealed


def aead_decrypt(key: bytes, iv: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    if not ciphertext:
        raise bad_parameter("ciphertext has no version byte")
    version, rest = ciphertext[0], ciphertext[1:]
    if version not in (1, 2):
        raise bad_parameter(f"unknown ciphertext version {version}")
    if len(rest) < gcm.TAG_LEN:
        raise bad_parameter("ciphertext is shorter than its tag")
    if version == 1:  # IoT Edge 1.1 wrote the tag first
        rest = rest[gcm.TAG_LEN :] + rest[: gcm.TAG_LEN]
    _check_aes256(key)
    try:
        return gcm.decrypt(key, iv, rest, aad)
    except InvalidTag:
        raise external("AEAD tag mismatch") from None
    except ValueError as error:
        raise external(f"AES-256-GCM decryption failed: {error}") from None


def ecdsa_sign(key: PrivateKey, digest: bytes) -> bytes:
    """Sign `digest` as given, truncated or zero-extended to the order's size as OpenSSL does."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise bad_parameter("ECDSA needs an EC key")
    size = (key.curve.key_size + 7) // 8
    prehash = {32: hashes.SHA256(), 48: hashes.SHA384(), 66: hashes.SHA512()}.get(size)
    if prehash is None:
        raise bad_parameter(f"ECDSA on curve {key.curve.name} is not supported")
    if size == 66:  # P-521: OpenSSL keeps the leftmost 521 bits; a SHA-512-sized value fits
        if len(digest) > 64:
            raise bad_parameter("digests longer than 64 bytes are not supported on P-521")
        digest = digest.rjust(64, b"\0")
    else:
        digest = digest[:size].rjust(size, b"\0")
    return key.sign(digest, ec.ECDSA(utils.Prehashed(prehash)))


def rsa_private_encrypt(key: PrivateKey, data: bytes, mechanism: str) -> bytes:
    """RSA_private_encrypt: PKCS#1 v1.5 type-1 padding ("RSA-PKCS1") or none ("RSA-NO-PADDING"),
    by OpenSSL itself (blinded, its CRT result verified) where libcrypto can be loaded."""
    if not isinstance(key, rsa.RSAPrivateKey):
        raise bad_parameter("RSA operation on a non-RSA key")
    size = (key.key_size + 7) // 8
    if mechanism == "RSA-PKCS1":
        if len(data) > size - 11:
            raise external("data too large for the key size")
        block = b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data
    elif len(data) != size:
        raise external("data is not the size of the modulus")
    else:
        block = data
    if int.from_bytes(block, "big") >= key.private_numbers().public_numbers.n:
        raise external("data too large for the modulus")
    if openssl.available():
        try:
            return _openssl_rsa(key).private_encrypt(block, openssl.RSA_NO_PADDING)
        except openssl.OpenSslError as error:
            raise external(str(error)) from None
    return rsa_crt(key.private_numbers(), block)


_RSA_KEYS: OrderedDict[tuple[int, int], openssl.RsaKey] = OrderedDict()
_RSA_KEYS_KEPT = 16  # a device has a handful of RSA keys; each costs OpenSSL a few KiB
_RSA_KEYS_LOCK = threading.Lock()  # RSA operations run in worker threads


def _openssl_rsa(key: rsa.RSAPrivateKey) -> openssl.RsaKey:
    """The key loaded into libcrypto, kept for the next operation with the same key."""
    numbers = key.private_numbers()
    name = (numbers.public_numbers.n, numbers.d)
    with _RSA_KEYS_LOCK:
        loaded = _RSA_KEYS.get(name)
        if loaded is not None:
            _RSA_KEYS.move_to_end(name)
            return loaded
    loaded = openssl.RsaKey(key)
    with _RSA_KEYS_LOCK:
        _RSA_KEYS[name] = loaded
        while len(_RSA_KEYS) > _RSA_KEYS_KEPT:
            _RSA_KEYS.popitem(last=False)
    return loaded


def rsa_crt(numbers: rsa.RSAPrivateNumbers, block: bytes) -> bytes:
    """m^d mod n by CRT, for a system without libcrypto: blinded (r^e * m), and the result
    checked with the public exponent before it leaves, as OpenSSL does. A fault in one of the
    two halves (a glitch, a bad dmp1) would otherwise give out a signature s with s^e = m mod
    one prime only, and gcd(s^e - m, n) is then a factor of the modulus."""
    public = numbers.public_numbers
    n, e = public.n, public.e
    message = int.from_bytes(block, "big")
    blind = secrets.randbelow(n - 2) + 2
    blinded = message * pow(blind, e, n) % n
    m1 = pow(blinded, numbers.dmp1, numbers.p)
    m2 = pow(blinded, numbers.dmq1, numbers.q)
    h = numbers.iqmp * (m1 - m2) % numbers.p
    signature = (m2 + h * numbers.q) * pow(blind, -1, n) % n
    if pow(signature, e, n) != message:
        raise external("the RSA private operation gave a wrong result (CRT check failed)")
    return signature.to_bytes((n.bit_length() + 7) // 8, "big")


def public_parameter(key: PrivateKey, name: str) -> bytes | str:
    """One public parameter of the key pair, as `/parameters/{name}` reports it (before base64)."""
    if name == "algorithm":
        return "ECDSA" if isinstance(key, ec.EllipticCurvePrivateKey) else "RSA"
    if name in ("ec-curve-oid", "ec-point"):
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise bad_parameter(f"{name} asked of a non-EC key")
        if not isinstance(key.curve, ec.SECP256R1):
            raise bad_parameter(f"curve {key.curve.name} is not supported")
        if name == "ec-curve-oid":
            return P256_OID_DER
        return key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    if name in ("rsa-modulus", "rsa-exponent"):
        if not isinstance(key, rsa.RSAPrivateKey):
            raise bad_parameter(f"{name} asked of a non-RSA key")
        numbers = key.public_key().public_numbers()
        value = numbers.n if name == "rsa-modulus" else numbers.e
        return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    raise bad_parameter(f"unknown parameter {name!r}")
