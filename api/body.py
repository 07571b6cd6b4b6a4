"""JSON request bodies checked the way the original's serde does, with its 422 texts.

Errors read like serde_json's (``missing field `keyId` at line 1 column 16``); the position is
where serde would stop: the end of the top-level value for shape errors.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from functools import partial
from typing import Any

_PY_JSON_ERROR = re.compile(r"^(?P<what>.*?): line (?P<line>\d+) column (?P<col>\d+)")
_SERDE_WORDING = {
    "Expecting value": "expected value",
    "Extra data": "trailing characters",
    "Expecting property name enclosed in double quotes": "key must be a string",
    "Expecting ':' delimiter": "expected `:`",
    "Expecting ',' delimiter": "expected `,` or `}`",
    "Unterminated string starting at": "EOF while parsing a string",
    "Invalid control character at": (
        "control character (\\u0000-\\u001F) found while parsing a string"
    ),
}


class ShapeError(Exception):
    """The body is JSON but not the shape the route wants (serde's error, before its position)."""


class JsonSyntaxError(ShapeError):
    """The body is not JSON; the message already says where."""


def _end_position(text: str) -> str:
    stripped = text.rstrip()
    lines = stripped.split("\n")
    return f"line {len(lines)} column {len(lines[-1])}"


def parse_json(raw: bytes) -> Any:
    """Parse `raw` or raise JsonSyntaxError carrying serde's wording and position."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JsonSyntaxError(
            f"invalid unicode code point at line 1 column {error.start + 1}"
        ) from None
    if not text.strip():
        lines = text.split("\n")
        raise JsonSyntaxError(
            f"EOF while parsing a value at line {len(lines)} column {len(lines[-1])}"
        )
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=partial(_no_constant, text)
        )
    except JsonSyntaxError:
        raise
    except RecursionError:
        # serde_json stops at depth 128; Python would only fail much deeper, and with a crash.
        raise JsonSyntaxError(f"recursion limit exceeded at {_end_position(text)}") from None
    except ShapeError as error:
        raise JsonSyntaxError(f"{error} at {_end_position(text)}") from None
    except json.JSONDecodeError as error:
        match = _PY_JSON_ERROR.match(str(error))
        what = match["what"] if match else error.msg
        wording = next((v for k, v in _SERDE_WORDING.items() if what.startswith(k)), what)
        if error.pos >= len(text.rstrip()):
            wording = "EOF while parsing a value"
        raise JsonSyntaxError(f"{wording} at line {error.lineno} column {error.colno}") from None
    if _LONE_SURROGATE.search(text) and _has_surrogate(value):
        raise JsonSyntaxError(f"lone leading surrogate in hex escape at {_end_position(text)}")
    if _depth_over(value, 127):
        raise JsonSyntaxError(f"recursion limit exceeded at {_end_position(text)}")
    return value


_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _no_constant(text: str, name: str) -> Any:
    """NaN and Infinity are not JSON; serde_json refuses them."""
    before = text[: max(text.find(name), 0)]
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    raise JsonSyntaxError(f"expected value at line {line} column {column}")


def _has_surrogate(value: Any) -> bool:
    """Whether a decoded string holds a UTF-16 surrogate (serde_json refuses lone ones)."""
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """serde's derived structs refuse a repeated field; silently keeping one would let the two
    implementations act on different values of the same request."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ShapeError(f"duplicate field `{key}`")
        result[key] = value
    return result


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    if isinstance(value, list):
        return "sequence"
    return "map"


class Fields:
    """Typed access to one JSON object of a request body.

    `what` is serde's name for the struct. With `order` (the struct's fields as declared), a
    JSON array of the fields in that order is taken too, as serde's derived structs take it;
    structs with a flattened field have no such form and pass no order.
    """

    def __init__(self, value: Any, what: str, order: tuple[str, ...] | None = None) -> None:
        if isinstance(value, list) and order is not None:
            value = _from_sequence(value, what, order)
        if not isinstance(value, dict):
            raise ShapeError(f"invalid type: {describe(value)}, expected {what}")
        self._value = value

    def has(self, name: str) -> bool:
        return self._value.get(name) is not None

    def raw(self, name: str) -> Any:
        if name not in self._value:
            raise ShapeError(f"missing field `{name}`")
        return self._value[name]

    def string(self, name: str) -> str:
        value = self.raw(name)
        if not isinstance(value, str):
            raise ShapeError(f"invalid type: {describe(value)}, expected a string")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self._value.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ShapeError(f"invalid type: {describe(value)}, expected a string")
        return value

    def b64(self, name: str) -> bytes:
        return decode_b64(self.string(name))

    def optional_b64(self, name: str) -> bytes | None:
        value = self.optional_string(name)
        return None if value is None else decode_b64(value)

    def object(self, name: str, what: str, order: tuple[str, ...] | None = None) -> Fields:
        return Fields(self.raw(name), what, order)

    def choice(self, name: str, variants: tuple[str, ...]) -> str:
        value = self.string(name)
        if value not in variants:
            expected = " or ".join(f"`{v}`" for v in variants)
            if len(variants) > 2:
                expected = ", ".join(f"`{v}`" for v in variants[:-1]) + f", or `{variants[-1]}`"
            raise ShapeError(f"unknown variant `{value}`, expected {expected}")
        return value


def _from_sequence(items: list[Any], what: str, order: tuple[str, ...]) -> dict[str, Any]:
    if len(items) < len(order):
        count = len(order)
        raise ShapeError(
            f"invalid length {len(items)}, expected {what} with {count} "
            f"element{'' if count == 1 else 's'}"
        )
    if len(items) > len(order):
        raise ShapeError("trailing characters")
    return dict(zip(order, items, strict=True))


def decode_b64(text: str) -> bytes:
    """Standard, padded, canonical base64, as Rust's strict engine wants it."""
    for index, char in enumerate(text):
        if not (char.isascii() and (char.isalnum() or char in "+/=")):
            raise ShapeError(f"Invalid symbol {ord(char)}, offset {index}.")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ShapeError("Invalid padding") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise ShapeError(
            f"Invalid last symbol {ord(text.rstrip('=')[-1])}, offset {len(text.rstrip('=')) - 1}."
        )
    return raw


def shape_message(error: ShapeError, raw: bytes) -> str:
    if isinstance(error, JsonSyntaxError):
        return str(error)
    return f"{error} at {_end_position(raw.decode('utf-8', 'replace'))}"
