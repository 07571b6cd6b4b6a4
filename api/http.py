"""The HTTP framework every service shares: spec/api.md §1.2–§1.3, step by step.

Called by the connection (`http1`) once per request. It knows HTTP and the original's framing
rules, nothing about keys: each route's handler turns a `Request` into one bus call and the
result into a `Response`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

import attrs

from aziot.actors.offload import SMALL, in_worker, sized
from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.logtext import loggable

from . import http1
from .body import JsonSyntaxError, ShapeError, at_body_end, parse_json
from .rust_text import rust_debug
from .serde_replay import Refused, body_type_of, replay

log = logging.getLogger(__name__)

JSON = b"application/json"
BODY_TIMEOUT = 5.0  # the original's body read timeout
MAX_BODY = 1 << 20  # 1 MiB: no request of any service comes close

STATUS_OF_KIND = {
    ErrorKind.INVALID: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.INTERNAL: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.TIMEOUT: 504,
}


def _visible_ascii(value: bytes) -> bool:
    return all(32 <= byte < 127 or byte == 9 for byte in value)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@attrs.frozen
class Request:
    method: str
    params: tuple[str, ...]
    query: dict[str, str]
    api_version: str
    raw_body: bytes | None  # None when the original would see "no body"
    parsed_body: Any
    uid: int
    pid: int

    def body(self) -> Any:
        """The parsed JSON body; a route that needs one answers 400 without it."""
        if self.raw_body is None:
            raise HttpError(400, "missing request body")
        return self.parsed_body


@attrs.frozen
class Response:
    status: int
    body: Any = None  # JSON-able; None for 204


Handler = Callable[[Request], Awaitable[Response]]


@attrs.frozen
class Route:
    pattern: re.Pattern[str]
    handlers: dict[str, Handler]
    min_version: str | None = None

    def match(self, path: str, api_version: str) -> tuple[str, ...] | None:
        if self.min_version is not None and api_version < self.min_version:
            return None
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        try:
            return tuple(unquote_to_bytes(g).decode("utf-8") for g in found.groups())
        except UnicodeDecodeError:
            return None


def _is_literal(pattern: str) -> bool:
    return re.escape(pattern) == pattern


def route(pattern: str, min_version: str | None = None, **handlers: Handler) -> Route:
    """`route("/key/([^/]+)", GET=handler)`: methods as keyword names."""
    return Route(re.compile(pattern), handlers, min_version)


def _large_answer(body: Any) -> bool:
    """Whether an answer carries a large string: every answer's long values (a key handle,
    plaintext, a certificate chain) sit at its top level."""
    if not isinstance(body, dict):
        return False
    return sum(len(value) for value in body.values() if isinstance(value, str)) >= SMALL


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_SLICE = 16 << 10  # characters of a long string escaped per json.dumps call


def encode_large_json(body: dict[str, Any]) -> bytes:
    """`encode_json(body)`, with each long top-level string escaped a slice at a time.

    One json.dumps over megabytes is one C call that holds the GIL throughout, in a worker
    thread as much as on the loop; between slices the loop's thread gets its turn. JSON escapes
    each character alone, and a Python string has no surrogate pairs to cut, so the slices'
    texts join into the whole's."""
    members = []
    for name, value in body.items():
        if isinstance(value, str) and len(value) > _SLICE:
            text = "".join(
                json.dumps(value[at : at + _SLICE], ensure_ascii=False)[1:-1]
                for at in range(0, len(value), _SLICE)
            )
            encoded = f'"{text}"'
        else:
            encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        members.append(json.dumps(name, ensure_ascii=False) + ":" + encoded)
    return ("{" + ",".join(members) + "}").encode("utf-8")


def _parse_as_serde(raw: bytes, handler: Handler | None) -> Any:
    """The body as Python's parser reads it; when that may not be serde's reading, serde's
    reading of it into the handler's body type decides: its error is the 422, or what it
    accepts is the body (JSON Python refuses only where serde skips it: deep, repeated or
    unchecked in values of unknown fields)."""
    try:
        return parse_json(raw)
    except JsonSyntaxError:
        verdict = replay(raw, body_type_of(handler))
        if isinstance(verdict, Refused):
            raise HttpError(422, verdict.message) from None
        return verdict.value


class ServiceApp:
    """One service's HTTP API: api-version check, routing, body rules, error mapping."""

    def __init__(self, name: str, api_versions: Iterable[str], routes: list[Route]) -> None:
        self.name = name
        self._versions = frozenset(api_versions)
        self._routes = routes
        # Literal paths (most routes: /sign, /key, …) are found by one dict lookup. That keeps
        # first-match order only while no pattern route also matches a literal one: checked.
        self._literal = {r.pattern.pattern: r for r in routes if _is_literal(r.pattern.pattern)}
        for literal in self._literal:
            for other in routes:
                if other.pattern.pattern != literal and other.pattern.fullmatch(literal):
                    raise ValueError(f"route {other.pattern.pattern!r} also matches {literal!r}")

    def _route(self, path: str, api_version: str) -> tuple[Route, tuple[str, ...]]:
        literal = self._literal.get(path)
        if literal is not None and literal.match(path, api_version) is not None:
            return literal, ()
        for candidate in self._routes:
            params = candidate.match(path, api_version)
            if params is not None:
                return candidate, params
        raise HttpError(404, "not found")

    @staticmethod
    async def _parse_json(raw: bytes, handler: Handler | None) -> Any:
        """A large body is parsed in a worker thread: parsing a megabyte holds the loop for
        tens of milliseconds, which every other caller would wait out."""
        return await sized(len(raw), _parse_as_serde, raw, handler)

    async def _handle_as_serde(
        self, handler: Handler, request: Request, error: ShapeError
    ) -> Response:
        """A handler refused the body: serde, reading it in one pass, has the last word. Its
        error is the 422; if it accepts (the handler was stricter, as on `{"ECDSA":null}` for
        an algorithm), the handler gets serde's reading of the body instead."""
        raw = request.raw_body or b""
        verdict = await sized(len(raw), replay, raw, body_type_of(handler))
        if isinstance(verdict, Refused):
            raise HttpError(422, verdict.message)
        try:
            return await handler(attrs.evolve(request, parsed_body=verdict.value))
        except ShapeError as again:
            log.warning("%s: serde accepts a body its handler refuses: %s", self.name, again)
            raise HttpError(422, at_body_end(error, raw)) from None

    async def __call__(self, incoming: http1.Request) -> http1.Response:
        try:
            response = await self._respond(incoming)
        except HttpError as error:
            response = Response(error.status, {"message": error.message})
        except BusError as error:
            response = self._bus_error(error)
        if response.status >= 500 or response.status in (401, 408, 413):
            log.warning(
                "%s %s %s uid=%d pid=%d -> %d %s",
                self.name,
                loggable(incoming.method),
                loggable(incoming.target.decode("latin-1")),
                incoming.uid,
                incoming.pid,
                response.status,
                loggable((response.body or {}).get("message", "").split("\n")[0]),
            )
        if response.status == 204:
            return http1.Response(204)
        if _large_answer(response.body):
            # A megabyte handle or plaintext: encoding it would hold the loop as parsing would.
            encoded = await in_worker(encode_large_json, response.body)
        else:
            encoded = encode_json(response.body)
        return http1.Response(response.status, encoded, JSON)

    @staticmethod
    def _bus_error(error: BusError) -> Response:
        status = STATUS_OF_KIND[error.kind]
        message = "internal error" if error.kind is ErrorKind.INTERNAL else error.message
        return Response(status, {"message": message})

    async def _respond(self, incoming: http1.Request) -> Response:
        path, _, query_text = incoming.target.decode("latin-1").partition("?")
        pairs = parse_qsl(query_text, keep_blank_values=True)
        # The original's api-version is the last one given; a route's own parameters (`type`)
        # are looked up with `find`, so the first one counts.
        query: dict[str, str] = {}
        api_version = None
        for name, value in pairs:
            if name == "api-version":
                api_version = value
            else:
                query.setdefault(name, value)
        if api_version is None:
            raise HttpError(400, "api-version not specified")
        if api_version not in self._versions:
            raise HttpError(400, f"invalid api-version {rust_debug(api_version)}")
        candidate, params = self._route(path, api_version)
        method = incoming.method
        raw_body = await self._read_body(incoming, method)
        handler = candidate.handlers.get(method)
        # The original parses the body (as `IgnoredAny` for a method the route lacks) before it
        # looks at the method: bad JSON wins over 400.
        parsed = None if raw_body is None else await self._parse_json(raw_body, handler)
        if handler is None:
            raise HttpError(400, "method not allowed")
        request = Request(
            method, params, query, api_version, raw_body, parsed, incoming.uid, incoming.pid
        )
        try:
            return await handler(request)
        except ShapeError as error:
            return await self._handle_as_serde(handler, request, error)

    @staticmethod
    async def _read_body(incoming: http1.Request, method: str) -> bytes | None:
        if method == "GET":
            return None
        if method not in ("POST", "DELETE", "PUT"):
            raise HttpError(400, "method not allowed")
        content_type = None
        seen_type = False
        for name, value in incoming.headers:
            if name == b"content-type" and not seen_type:
                # hyper's `headers.get` is the first one; a value that is not visible ASCII
                # fails its `to_str()`, and the original then reads the body as if untyped.
                seen_type = True
                if _visible_ascii(value):
                    content_type = value.decode("ascii").split(";", 1)[0].strip()
            elif name == b"content-length" and value.isdigit() and int(value) > MAX_BODY:
                raise HttpError(413, "request body too large")
        is_json = content_type is None or content_type == "application/json"
        if method == "PUT" and not is_json:
            raise HttpError(415, "request body must be application/json")
        try:
            body = await incoming.read_body(MAX_BODY, BODY_TIMEOUT)
        except http1.BodyError as error:
            raise HttpError(error.status, error.message) from None
        if method == "PUT":
            return body  # PUT bodies are always parsed, even empty ones
        if not body or not is_json:
            return None
        return body
