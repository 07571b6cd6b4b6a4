"""The requests the keys actor serves, as typed messages (attrs in code, maps on the bus)."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

converter = cattrs.Converter()


@attrs.frozen
class CreateKey:
    uid: int
    key_id: str
    usage: list[str]
    key_bytes: bytes | None = None


@attrs.frozen
class LoadKey:
    uid: int
    key_id: str


@attrs.frozen
class CreateKeyPair:
    uid: int
    key_id: str
    preferred_algorithms: str | None = None


@attrs.frozen
class LoadKeyPair:
    uid: int
    key_id: str


@attrs.frozen
class MoveKeyPair:
    uid: int
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


OPS: dict[str, type] = {
    "create_key": CreateKey,
    "load_key": LoadKey,
    "create_key_pair": CreateKeyPair,
    "load_key_pair": LoadKeyPair,
    "move_key_pair": MoveKeyPair,
    "delete_key": DeleteKey,
    "delete_key_pair": DeleteKeyPair,
    "get_parameter": GetParameter,
    "create_derived_key": CreateDerivedKey,
    "export_derived_key": ExportDerivedKey,
    "sign": Sign,
    "encrypt": Encrypt,
    "decrypt": Decrypt,
    "reload_principals": ReloadPrincipals,
}
OP_NAMES: dict[type, str] = {cls: name for name, cls in OPS.items()}


def to_wire(message: Any) -> tuple[str, dict[str, Any]]:
    """The bus operation name and argument map for `message`."""
    return OP_NAMES[type(message)], converter.unstructure(message)


def from_wire(op: str, args: dict[str, Any]) -> Any:
    cls = OPS.get(op)
    if cls is None:
        raise KeyError(op)
    return converter.structure(args, cls)
