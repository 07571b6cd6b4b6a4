"""The PKCS#11 worker's protocol: one declaration per token operation.

Each request names the token (`uri`, PIN included) and, but for `mechanisms`, the object's
label; `Pkcs11Worker` serves each with its method of the same name, which runs the
`Pkcs11Library` method of that name on the library thread. This module imports nothing of
python-pkcs11: the keys actor uses it whether or not a token is configured.
"""

from __future__ import annotations

import enum

import attrs

from aziot.bus.protocol import Nothing, Operation, Protocol


@attrs.frozen
class Mechanisms:
    uri: str


@attrs.frozen
class FindKeyPair:
    uri: str
    label: str


@attrs.frozen
class FindSecret:
    uri: str
    label: str


@attrs.frozen
class PublicParametersOf:
    uri: str
    label: str


@attrs.frozen
class GenerateKeyPair:
    uri: str
    label: str
    algorithms: list[str]


@attrs.frozen
class GenerateSecret:
    uri: str
    label: str
    usage: list[str]


@attrs.frozen
class ImportSecret:
    uri: str
    label: str
    key_bytes: bytes
    usage: list[str]


@attrs.frozen
class Delete:
    uri: str
    label: str
    kind: str  # "key_pair" or "secret"


@attrs.frozen
class MoveKeyPair:
    uri: str
    from_label: str
    to_label: str


@attrs.frozen
class SignEcdsa:
    uri: str
    label: str
    digest: bytes


@attrs.frozen
class HmacSha256:
    uri: str
    label: str
    message: bytes


@attrs.frozen
class AesGcmEncrypt:
    uri: str
    label: str
    iv: bytes
    aad: bytes
    plaintext: bytes


@attrs.frozen
class AesGcmDecrypt:
    uri: str
    label: str
    iv: bytes
    aad: bytes
    ciphertext_and_tag: bytes


@attrs.frozen
class RsaPrivate:
    uri: str
    label: str
    data: bytes
    padding: str  # "pkcs1" or "none"


class TokenErrorCode(enum.StrEnum):
    """What a token error means to the keys actor, beside its kind (`BusError.code`)."""

    KEY_NOT_FOUND = "KeyNotFound"
    MECHANISM_MISSING = "MechanismMissing"  # the token lacks the mechanism: 400 naming it
    CREATE_REFUSED = "CreateRefused"  # the token cannot make such a key: try the next place
    UNSUPPORTED = "Unsupported"  # CKR_FUNCTION_NOT_SUPPORTED / CKR_MECHANISM_INVALID
    INVALID = "InvalidParameter"
    KEY_EXISTS = "KeyExists"
    UNAVAILABLE = "TokenUnavailable"  # cannot be reached now: 503, file keys still served
    FAILED = "Pkcs11Error"


# -- replies ---------------------------------------------------------------------------------


@attrs.frozen
class Names:
    value: list[str]


@attrs.frozen
class Found:
    value: bool


@attrs.frozen
class PublicParameters:
    """A key pair's public half, in the encodings keyd's `/parameters` serves."""

    algorithm: str  # "ECDSA" or "RSA"
    curve_oid: bytes | None = None
    ec_point: bytes | None = None
    modulus: bytes | None = None
    exponent: bytes | None = None


@attrs.frozen
class Public:
    value: PublicParameters


@attrs.frozen
class Kind:
    value: str  # the algorithm or secret kind the token made


@attrs.frozen
class Count:
    value: int


@attrs.frozen
class Output:
    value: bytes


class Pkcs11(Protocol):
    """The PKCS#11 worker's operations; `Pkcs11Worker` has a method of each name."""

    actor = "pkcs11"
    mechanisms = Operation(Mechanisms, Names)
    find_key_pair = Operation(FindKeyPair, Found)
    find_secret = Operation(FindSecret, Found)
    public_parameters = Operation(PublicParametersOf, Public)
    generate_key_pair = Operation(GenerateKeyPair, Kind)
    generate_secret = Operation(GenerateSecret, Kind)
    import_secret = Operation(ImportSecret, Kind)
    delete = Operation(Delete, Count)
    move_key_pair = Operation(MoveKeyPair, Nothing)
    sign_ecdsa = Operation(SignEcdsa, Output)
    hmac_sha256 = Operation(HmacSha256, Output)
    aes_gcm_encrypt = Operation(AesGcmEncrypt, Output)
    aes_gcm_decrypt = Operation(AesGcmDecrypt, Output)
    rsa_private = Operation(RsaPrivate, Output)
