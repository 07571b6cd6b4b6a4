"""keyd's HTTP API (spec/api.md §3): JSON in, one keys-actor request, JSON out."""

from __future__ import annotations

from aziot.actors.b64 import encode as b64
from aziot.actors.keys import messages as m
from aziot.actors.keys.messages import Keys
from aziot.bus.bus import Bus
from aziot.bus.protocol import Caller, Client

from .body import Fields, ShapeError
from .http import HttpError, Request, Response, Route, ServiceApp, route
from .rust_text import rust_debug
from .serde_replay import BASE64, STRING, Field, Opt, Struct, Tagged, Usage, Variant, serde_body

API_VERSIONS = ("2020-09-01", "2021-05-01")
USAGES = ("derive", "encrypt", "sign")
ID = "([^/]+)"
# Every request struct of the original is named `Request` (one per module); serde's errors say so.
REQUEST = "struct Request"


# The original's request structs (aziot-key-common-http), as serde reads them.
def _request(*fields: Field, flatten: Tagged | None = None) -> Struct:
    return Struct("Request", fields, () if flatten is None else (flatten,))


def _parameters(*variants: Variant) -> Tagged:
    return Tagged("Parameters", "algorithm", "parameters", variants)


KEY_HANDLE = Field("keyHandle", STRING)
CREATE_KEY = _request(
    Field("keyId", STRING), Field("keyBytes", Opt(BASE64)), Field("usage", Usage(USAGES))
)
CREATE_KEY_PAIR = _request(Field("keyId", STRING), Field("preferredAlgorithms", Opt(STRING)))
BY_HANDLE = _request(KEY_HANDLE)  # delete, export_derived_key, get_key_pair_public_parameter
CREATE_DERIVED_KEY = _request(Field("baseKeyHandle", STRING), Field("derivationData", BASE64))
MOVE = _request(Field("from", STRING))
SIGN = _request(
    KEY_HANDLE,
    flatten=_parameters(
        Variant("ECDSA", "Ecdsa", (Field("digest", BASE64),)),
        Variant("HMAC-SHA256", "HmacSha256", (Field("message", BASE64),)),
    ),
)
CIPHER_PARAMETERS = _parameters(
    Variant("AEAD", "Aead", (Field("iv", BASE64), Field("aad", BASE64))),
    Variant("RSA-PKCS1", "RsaPkcs1", None),
    Variant("RSA-NO-PADDING", "RsaNoPadding", None),
)
ENCRYPT = _request(KEY_HANDLE, Field("plaintext", BASE64), flatten=CIPHER_PARAMETERS)
DECRYPT = _request(KEY_HANDLE, Field("ciphertext", BASE64), flatten=CIPHER_PARAMETERS)


def caller(request: Request) -> Caller:
    return Caller(uid=request.uid)


def parse_usage(text: str) -> list[str]:
    usage = text.split(",")
    for token in usage:
        if token not in USAGES:
            # the original's own usage visitor, not a derived enum: serde's invalid_value
            raise ShapeError(f"invalid value: string {rust_debug(token)}, expected KeyUsage")
    return usage


class KeydApi:
    """Route handlers; each one is a translation, the keys actor does the work."""

    def __init__(self, bus: Bus) -> None:
        self._keys = Client(bus, Keys, Caller(service="keyd"))

    @staticmethod
    def _handle(reply: m.KeyHandle) -> Response:
        return Response(200, {"keyHandle": reply.handle})

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

    @serde_body(CREATE_KEY)
    async def create_key(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("keyId", "keyBytes", "usage"))
        key_id = body.string("keyId")
        usage = parse_usage(body.string("usage"))
        key_bytes = body.optional_b64("keyBytes")
        reply = await self._keys.call(
            Keys.create_key, m.CreateKey(key_id, usage, key_bytes), caller=caller(request)
        )
        return self._handle(reply)

    @serde_body(BY_HANDLE)
    async def delete_key(self, request: Request) -> Response:
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        await self._keys.call(Keys.delete_key, m.DeleteKey(handle), caller=caller(request))
        return Response(204)

    @serde_body(CREATE_KEY_PAIR)
    async def create_key_pair(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("keyId", "preferredAlgorithms"))
        key_id = body.string("keyId")
        algorithms = body.optional_string("preferredAlgorithms")
        request_ = m.CreateKeyPair(key_id, algorithms)
        return self._handle(
            await self._keys.call(Keys.create_key_pair, request_, caller=caller(request))
        )

    @serde_body(BY_HANDLE)
    async def delete_key_pair(self, request: Request) -> Response:
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        await self._keys.call(Keys.delete_key_pair, m.DeleteKeyPair(handle), caller=caller(request))
        return Response(204)

    async def load(self, request: Request) -> Response:
        kind, key_id = request.params
        if kind == "key":
            return self._handle(
                await self._keys.call(Keys.load_key, m.LoadKey(key_id), caller=caller(request))
            )
        return self._handle(
            await self._keys.call(Keys.load_key_pair, m.LoadKeyPair(key_id), caller=caller(request))
        )

    @serde_body(MOVE)
    async def move_key_pair(self, request: Request) -> Response:
        kind, destination = request.params
        source = Fields(request.body(), REQUEST, ("from",)).string("from")
        if source == destination:
            raise HttpError(400, "source and destination for move are identical")
        if kind != "keypair":
            raise HttpError(400, f'invalid type "{kind}"')
        move = m.MoveKeyPair(source, destination)
        await self._keys.call(Keys.move_key_pair, move, caller=caller(request))
        return Response(204)

    @serde_body(BY_HANDLE)
    async def get_parameter(self, request: Request) -> Response:
        (name,) = request.params
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        result = await self._keys.call(
            Keys.get_parameter, m.GetParameter(handle, name), caller=caller(request)
        )
        value = result.value
        return Response(200, {"value": value if isinstance(value, str) else b64(value)})

    @serde_body(CREATE_DERIVED_KEY)
    async def create_derived_key(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST, ("baseKeyHandle", "derivationData"))
        handle = body.string("baseKeyHandle")
        data = body.b64("derivationData")
        derive = m.CreateDerivedKey(handle, data)
        return self._handle(
            await self._keys.call(Keys.create_derived_key, derive, caller=caller(request))
        )

    @serde_body(BY_HANDLE)
    async def export_derived_key(self, request: Request) -> Response:
        handle = Fields(request.body(), REQUEST, ("keyHandle",)).string("keyHandle")
        result = await self._keys.call(
            Keys.export_derived_key, m.ExportDerivedKey(handle), caller=caller(request)
        )
        return Response(200, {"key": b64(result.key)})

    @serde_body(SIGN)
    async def sign(self, request: Request) -> Response:
        body = Fields(request.body(), REQUEST)
        handle = body.string("keyHandle")
        algorithm = body.choice("algorithm", ("ECDSA", "HMAC-SHA256"))
        field = "digest" if algorithm == "ECDSA" else "message"
        variant = "Ecdsa" if algorithm == "ECDSA" else "HmacSha256"
        parameters = body.object("parameters", f"struct variant Parameters::{variant}")
        data = parameters.b64(field)
        result = await self._keys.call(
            Keys.sign, m.Sign(handle, algorithm, data), caller=caller(request)
        )
        return Response(200, {"signature": b64(result.signature)})

    def _cipher_fields(self, request: Request) -> tuple[Fields, str, str, bytes, bytes]:
        body = Fields(request.body(), REQUEST)
        handle = body.string("keyHandle")
        algorithm = body.choice("algorithm", ("AEAD", "RSA-PKCS1", "RSA-NO-PADDING"))
        iv = aad = b""
        if algorithm == "AEAD":
            parameters = body.object("parameters", "struct variant Parameters::Aead")
            iv, aad = parameters.b64("iv"), parameters.b64("aad")
        elif body.has("parameters"):
            # A unit variant's content may only be null; serde's own text comes from the replay.
            raise ShapeError(f"parameters given for unit variant {algorithm}")
        return body, handle, algorithm, iv, aad

    @serde_body(ENCRYPT)
    async def encrypt(self, request: Request) -> Response:
        body, handle, algorithm, iv, aad = self._cipher_fields(request)
        plaintext = body.b64("plaintext")
        encrypt = m.Encrypt(handle, algorithm, plaintext, iv, aad)
        result = await self._keys.call(Keys.encrypt, encrypt, caller=caller(request))
        return Response(200, {"ciphertext": b64(result.ciphertext)})

    @serde_body(DECRYPT)
    async def decrypt(self, request: Request) -> Response:
        body, handle, algorithm, iv, aad = self._cipher_fields(request)
        ciphertext = body.b64("ciphertext")
        decrypt = m.Decrypt(handle, algorithm, ciphertext, iv, aad)
        result = await self._keys.call(Keys.decrypt, decrypt, caller=caller(request))
        return Response(200, {"plaintext": b64(result.plaintext)})
