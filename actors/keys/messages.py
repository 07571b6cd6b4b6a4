"""The keys actor's protocol: its requests, their replies, and one declaration per operation.

Who asks travels in the bus envelope (`bus.protocol.Caller`), not in these messages.
"""

from __future__ import annotations

import attrs

from aziot.bus.protocol import Nothing, Operation, Protocol


@attrs.frozen
class CreateKey:
    key_id: str
    usage: list[str]
    key_bytes: bytes | None = None


@attrs.frozen
class LoadKey:
    key_id: str


@attrs.frozen
class CreateKeyPair:
    key_id: str
    preferred_algorithms: str | None = None


@attrs.frozen
class LoadKeyPair:
    key_id: str


@attrs.frozen
class MoveKeyPair:
    source: str
    destination: str


@attrs.frozen
class DeleteKey:
    handle: str


@attrs.frozen
class DeleteKeyPair:
    handle: str


@attrs.frozen
class GetParameter:
    handle: str
    name: str


@attrs.frozen
class CreateDerivedKey:
    handle: str
    derivation_data: bytes


@attrs.frozen
class ExportDerivedKey:
    handle: str


@attrs.frozen
class Sign:
    handle: str
    algorithm: str  # "ECDSA" or "HMAC-SHA256"
    data: bytes  # the digest for ECDSA, the message for HMAC


@attrs.frozen
class Encrypt:
    handle: str
    algorithm: str  # "AEAD", "RSA-PKCS1" or "RSA-NO-PADDING"
    plaintext: bytes
    iv: bytes = b""
    aad: bytes = b""


@attrs.frozen
class Decrypt:
    handle: str
    algorithm: str
    ciphertext: bytes
    iv: bytes = b""
    aad: bytes = b""


@attrs.frozen
class Principal:
    uid: int
    keys: list[str]


@attrs.frozen
class ReloadPrincipals:
    principals: list[Principal]


# -- replies ---------------------------------------------------------------------------------


@attrs.frozen
class KeyHandle:
    handle: str


@attrs.frozen
class Parameter:
    value: bytes | str  # bytes for binary parameters, text for names such as the algorithm


@attrs.frozen
class DerivedKeyBytes:
    key: bytes


@attrs.frozen
class Signature:
    signature: bytes


@attrs.frozen
class Ciphertext:
    ciphertext: bytes


@attrs.frozen
class Plaintext:
    plaintext: bytes


class Keys(Protocol):
    """The keys actor's operations; `KeysActor` has a method of each name."""

    actor = "keys"
    create_key = Operation(CreateKey, KeyHandle)
    load_key = Operation(LoadKey, KeyHandle)
    create_key_pair = Operation(CreateKeyPair, KeyHandle)
    load_key_pair = Operation(LoadKeyPair, KeyHandle)
    move_key_pair = Operation(MoveKeyPair, Nothing)
    delete_key = Operation(DeleteKey, Nothing)
    delete_key_pair = Operation(DeleteKeyPair, Nothing)
    get_parameter = Operation(GetParameter, Parameter)
    create_derived_key = Operation(CreateDerivedKey, KeyHandle)
    export_derived_key = Operation(ExportDerivedKey, DerivedKeyBytes)
    sign = Operation(Sign, Signature)
    encrypt = Operation(Encrypt, Ciphertext)
    decrypt = Operation(Decrypt, Plaintext)
    reload_principals = Operation(ReloadPrincipals, Nothing)
