"""keyd's HTTP API (spec/api.md §3): JSON in, one keys-actor request, JSON out."""

from __future__ import annotations

import base64
from typing import Any

from actors.keys import messages as m
from bus.bus import Bus

from .body import Fields, ShapeError
from .http import HttpError, Request, Response, Route, ServiceApp, route, rust_debug

API_VERSIONS = ("2020-09-01", "2021-05-01")
USAGES = ("derive", "encrypt", "sign")
ID = "([^/]+)"
# Every request struct of the original is named `Request` (one per module); serde's errors say so.
REQUEST = "struct Request"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_usage(text: str) -> list[str]:
    usage = text.split(",")
    for token in usage:
        if token not in USAGES:
            # the original's own usage visitor, not a derived enum: serde's invalid_value
            raise ShapeError(f"invalid value: string {rust_debug(token)}, expected KeyUsage")
    return usage


class KeydApi:
    """Route handlers; each one is a translation, the keys actor does the work."""

    def __init__(self, bus: Bus, actor: str = "keys") -> None:
        self._bus = bus
        self._actor = actor

    async def _call(self, message: Any) -> Any:
        op, args = m.to_wire(message)
        return await self._bus.request(self._actor, op, args)

    async def _handle_reply(self, message: Any) -> Response:
        result = await self._call(message)
        return Response(200, {"keyHandle": result["handle"]})

    def app(self) -> ServiceApp:
        routes: list[Route] = [
            route("/key", POST=self.create_key, DELETE=self.delete_key),
            route("/keypair", POST=self.create_key_pair, DELETE=self.delete_key_pair),
            route("/derivedkey", POST=self.create_derived_key),
            route("/decrypt", POST=self.decrypt),
            route("/encrypt", POST=self.encrypt),
            route("/derivedkey/export", POST=self.export_derived_key),
            route(f"/parameters/{ID}", POST=self.get_parameter),
            route(f"/(key|keypair)/{ID}", GET=self.load, POST=self.move_key_pair),
            route("/sign", POST=self.sign),
        ]
        return ServiceApp("keyd", API_VERSIONS, routes)

    async def create_key(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("keyId", "keyBytes", "usage"))
        key_id = body.string("keyId")
        usage = parse_usage(body.string("usage"))
        key_bytes = body.optional_b64("keyBytes")
        return await self._handle_reply(m.CreateKey(request.uid, key_id, usage, key_bytes))

    async def delete_key(self, request: Request) -> Response:
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        await self._call(m.DeleteKey(handle))
        return Response(204)

    async def create_key_pair(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("keyId", "preferredAlgorithms"))
        key_id = body.string("keyId")
        algorithms = body.optional_string("preferredAlgorithms")
        return await self._handle_reply(m.CreateKeyPair(request.uid, key_id, algorithms))

    async def delete_key_pair(self, request: Request) -> Response:
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        await self._call(m.DeleteKeyPair(handle))
        return Response(204)

    async def load(self, request: Request) -> Response:
        kind, key_id = request.params
        if kind == "key":
            return await self._handle_reply(m.LoadKey(request.uid, key_id))
        return await self._handle_reply(m.LoadKeyPair(request.uid, key_id))

    async def move_key_pair(self, request: Request) -> Response:
        kind, destination = request.params
        source = Fields(request.body(), REQUEST, ("from",)).string("from")
        if source == destination:
            raise HttpError(400, "source and destination for move are identical")
        if kind != "keypair":
            raise HttpError(400, f'invalid type "{kind}"')
        await self._call(m.MoveKeyPair(request.uid, source, destination))
        return Response(204)

    async def get_parameter(self, request: Request) -> Response:
        (name,) = request.params
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        result = await self._call(m.GetParameter(handle, name))
        value = result["value"]
        return Response(200, {"value": value if isinstance(value, str) else b64(value)})

    async def create_derived_key(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("baseKeyHandle", "derivationData"))
        handle = body.string("baseKeyHandle")
        data = body.b64("derivationData")
        return await self._handle_reply(m.CreateDerivedKey(handle, data))

    async def export_derived_key(self, request: Request) -> Response:
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        result = await self._call(m.ExportDerivedKey(handle))
        return Response(200, {"key": b64(result["key"])})

    async def sign(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST)
        handle = body.string("keyHandle")
        algorithm = body.choice("algorithm", ("ECDSA", "HMAC-SHA256"))
        field = "digest" if algorithm == "ECDSA" else "message"
        variant = "Ecdsa" if algorithm == "ECDSA" else "HmacSha256"
        parameters = body.object("parameters", f"struct variant Parameters::{variant}", (field,))
        data = parameters.b64(field)
        result = await self._call(m.Sign(handle, algorithm, data))
        return Response(200, {"signature": b64(result["signature"])})

    def _cipher_fields(self, request: Request) -> tuple[Fields, str, str, bytes, bytes]:
        body = Fields(request.body(), REQUEST)
        handle = body.string("keyHandle")
        algorithm = body.choice("algorithm", ("AEAD", "RSA-PKCS1", "RSA-NO-PADDING"))
        iv = aad = b""
        if algorithm == "AEAD":
            parameters = body.object("parameters", "struct variant Parameters::Aead", ("iv", "aad"))
            iv, aad = parameters.b64("iv"), parameters.b64("aad")
        return body, handle, algorithm, iv, aad

    async def encrypt(self, request: Request) -> Response:
        body, handle, algorithm, iv, aad = self._cipher_fields(request)
        plaintext = body.b64("plaintext")
        result = await self._call(m.Encrypt(handle, algorithm, plaintext, iv, aad))
        return Response(200, {"ciphertext": b64(result["ciphertext"])})

    async def decrypt(self, request: Request) -> Response:
        body, handle, algorithm, iv, aad = self._cipher_fields(request)
        ciphertext = body.b64("ciphertext")
        result = await self._call(m.Decrypt(handle, algorithm, ciphertext, iv, aad))
        return Response(200, {"plaintext": b64(result["plaintext"])})
