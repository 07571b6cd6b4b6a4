"""A `cryptography` private key whose signatures are made by the Keys Service.

certd signs certificates and CSRs with keys it never holds: it has a key handle, and the keys
actor signs. `cryptography`'s builders (`CertificateBuilder.sign`, `CertificateSigningRequest
Builder.sign`) call the key object's own `sign()`, so a key class whose `sign()` asks the keys
actor lets them build, encode and sign as usual. The signing is synchronous inside the builder,
so a build runs in a worker thread and each signature is one trip back to the trio loop
(`trio.from_thread.run`) for one keys-actor request: the same operations the original's openssl
engine sends to keyd (ECDSA on the digest; the RSA private-key operation on a PKCS#1 DigestInfo).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from aziot.actors.keys.messages import Encrypt, GetParameter, Keys, Sign
from aziot.bus.protocol import Client

# private_op(algorithm, data) -> signature: "ECDSA" on a digest, "RSA-PKCS1" on a DigestInfo.
PrivateOp = Callable[[str, bytes], bytes]
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# DER of DigestInfo up to the digest itself (RFC 8017 §9.2, note 1).
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _digest(data: bytes, algorithm: Any) -> tuple[bytes, hashes.HashAlgorithm]:
    if isinstance(algorithm, utils.Prehashed):
        return data, algorithm._algorithm
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize(), algorithm


def _refuse(*_: Any) -> NoReturn:
    raise NotImplementedError("this key lives in the Keys Service and cannot be read out")


class RemoteEcKey(ec.EllipticCurvePrivateKey):
    """An EC private key that signs through `private_op("ECDSA", digest)`."""

    def __init__(self, public: ec.EllipticCurvePublicKey, private_op: PrivateOp) -> None:
        self._public = public
        self._op = private_op

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        assert isinstance(signature_algorithm, ec.ECDSA)
        digest, _ = _digest(data, signature_algorithm.algorithm)
        return self._op("ECDSA", digest)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    exchange = private_numbers = private_bytes = _refuse

    def __copy__(self) -> RemoteEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteEcKey:
        return self


class RemoteRsaKey(rsa.RSAPrivateKey):
    """An RSA private key that signs (PKCS#1 v1.5) through `private_op("RSA-PKCS1", info)`."""

    def __init__(self, public: rsa.RSAPublicKey, private_op: PrivateOp) -> None:
        self._public = public
        self._op = private_op

    def sign(self, data: bytes, pad: padding.AsymmetricPadding, algorithm: Any) -> bytes:
        if not isinstance(pad, padding.PKCS1v15):
            raise NotImplementedError(f"{pad.name} signatures are not made with keyd keys here")
        digest, hash_algorithm = _digest(data, algorithm)
        prefix = _DIGEST_INFO_PREFIX.get(hash_algorithm.name)
        if prefix is None:
            raise NotImplementedError(f"RSA signatures with {hash_algorithm.name}")
        return self._op("RSA-PKCS1", prefix + digest)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    decrypt = private_numbers = private_bytes = _refuse

    def __copy__(self) -> RemoteRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteRsaKey:
        return self


def remote_private_key(public: PublicKey, private_op: PrivateOp) -> RemoteEcKey | RemoteRsaKey:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return RemoteEcKey(public, private_op)
    return RemoteRsaKey(public, private_op)


class KeyNotUsable(Exception):
    """A key the Keys Service has, of a kind certd cannot sign with (not P-256 or RSA)."""


async def public_key_of(keys: Client, handle: str) -> PublicKey:
    """The public half of a key pair in the Keys Service, from its `/parameters`."""

    async def parameter(name: str) -> bytes | str:
        return (await keys.call(Keys.get_parameter, GetParameter(handle, name))).value

    algorithm = await parameter("algorithm")
    if algorithm == "ECDSA":
        point = await parameter("ec-point")
        assert isinstance(point, bytes)
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    if algorithm == "RSA":
        modulus, exponent = await parameter("rsa-modulus"), await parameter("rsa-exponent")
        assert isinstance(modulus, bytes) and isinstance(exponent, bytes)
        numbers = rsa.RSAPublicNumbers(int.from_bytes(exponent), int.from_bytes(modulus))
        return numbers.public_key()
    raise KeyNotUsable(f"a key pair of algorithm {algorithm!r}")


def keys_private_op(keys: Client, handle: str) -> PrivateOp:
    """A `PrivateOp` for a worker thread: each call is one keys-actor request made on the trio
    loop that started the thread."""

    async def private_op(algorithm: str, data: bytes) -> bytes:
        if algorithm == "ECDSA":
            reply = await keys.call(Keys.sign, Sign(handle, "ECDSA", data))
            return reply.signature
        return (await keys.call(Keys.encrypt, Encrypt(handle, algorithm, data))).ciphertext

    def call(algorithm: str, data: bytes) -> bytes:
        return trio.from_thread.run(private_op, algorithm, data)

    return call
