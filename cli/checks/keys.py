"""Key checks: preloaded key files readable by keyd's user, key pairs loadable through keyd
(with their algorithm and size), and preloaded certs matching the key pair of the same id."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from aziot.actors.permissions import exposed

from ..uds import Reply, UdsError, request
from .context import Context
from .ids import KEYD_API, quote_id
from .outcome import OK, SKIPPED, Outcome, failed, warning
from .readers import reader_for, unreadable

RSA_RECOMMENDED_MIN_BITS = 2048
P256_OID = "BggqhkjOPQMBBw=="


class KeydRefused(Exception):
    def __init__(self, what: str, reply: Reply) -> None:
        super().__init__(f"{what}: keyd answered {reply.status} {reply.message}")


def _parameter(socket: Path, handle: str, name: str) -> str:
    reply = request(
        socket, "POST", f"/parameters/{name}?api-version={KEYD_API}", {"keyHandle": handle}
    )
    if reply.status != 200:
        raise KeydRefused(f"parameter {name}", reply)
    return str(reply.json()["value"])


def _number(value: str) -> int:
    return int.from_bytes(base64.b64decode(value), "big")


def public_key(socket: Path, handle: str) -> PublicKeyTypes:
    """The key pair's public half, rebuilt from keyd's public parameters (spec/api.md §3.3)."""
    algorithm = _parameter(socket, handle, "algorithm")
    if algorithm == "ECDSA":
        _parameter(socket, handle, "ec-curve-oid")  # keyd refuses every curve but P-256
        point = base64.b64decode(_parameter(socket, handle, "ec-point"))
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    if algorithm == "RSA":
        modulus = _number(_parameter(socket, handle, "rsa-modulus"))
        exponent = _number(_parameter(socket, handle, "rsa-exponent"))
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    raise ValueError(f"unknown algorithm {algorithm!r}")


def key_pairs_read(ctx: Context, info: dict[str, Any]) -> Outcome:
    keyd = ctx.need_keyd()
    if not ctx.running.get("keyd"):
        return SKIPPED
    socket = ctx.layout.socket("keyd")
    reader = reader_for(ctx.layout, "keyd")
    info["files_checked_for"] = reader.describe()
    certd = ctx.certd
    errors: list[str] = []
    warnings: list[str] = []
    for key_id, uri in keyd.preloaded_keys.items():
        if urlsplit(uri).scheme == "file":
            path = Path(unquote(urlsplit(uri).path))
            problem = unreadable(path, reader, private=True)
            if problem is not None:
                errors.append(f"preloaded key '{key_id}': {problem}")
                continue
            open_to_all = exposed(path)
            if open_to_all is not None:
                warnings.append(f"preloaded key '{key_id}': {open_to_all}")
        try:
            reply = request(socket, "GET", f"/keypair/{quote_id(key_id)}?api-version={KEYD_API}")
        except UdsError as error:
            errors.append(f"could not ask keyd for key pair '{key_id}': {error}")
            continue
        if reply.status != 200:
            # It may be a symmetric key, which this route refuses just as it refuses a broken
            # key pair; only an id that also names a preloaded cert is surely a key pair.
            if certd is not None and key_id in certd.preloaded_certs:
                errors.append(
                    f"could not load preloaded key pair '{key_id}' through keyd: "
                    f"{reply.status} {reply.message}"
                )
            continue
        try:
            key = public_key(socket, str(reply.json()["keyHandle"]))
        except KeydRefused as error:
            if "ec-curve-oid" in str(error):
                warnings.append(f"EC key {key_id} not using recommended curve (recommended: P-256)")
            else:
                errors.append(f"could not load preloaded private key with ID {key_id!r}: {error}")
            continue
        except (UdsError, ValueError, KeyError, TypeError) as error:
            errors.append(f"could not load preloaded private key with ID {key_id!r}: {error}")
            continue
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_RECOMMENDED_MIN_BITS:
            warnings.append(
                f"RSA key {key_id} has length {key.key_size} "
                f"(min recommended: {RSA_RECOMMENDED_MIN_BITS})"
            )
        ctx.public_keys[key_id] = key
    if errors:
        return failed("\n".join(errors))
    if warnings:
        return warning("\n".join(warnings))
    return OK


def certs_match_private_keys(ctx: Context, info: dict[str, Any]) -> Outcome:
    if not ctx.running.get("certd") or not ctx.running.get("keyd"):
        return SKIPPED
    errors = []
    for key_id, key in ctx.public_keys.items():
        cert = ctx.certs.get(key_id)
        if cert is not None and cert.public_key() != key:
            errors.append(
                f"preloaded cert with ID {key_id!r} does not match preloaded private key "
                f"with ID {key_id!r}"
            )
    if errors:
        return failed("\n".join(errors))
    return OK
