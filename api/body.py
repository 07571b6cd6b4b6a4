"""JSON request bodies on the hot path: Python's parser with serde_json's number rules, and
typed access for handlers.

No text here reaches a client as the original's would. `parse_json` only has to be right about
which bodies Python reads as serde would: it raises a plain `JsonSyntaxError` for any other, and a
handler's `Fields` raise `ShapeError` (serde's wording, no position) for a shape it refuses. Either
sends the body to `serde_replay`, which reads it as the original does and gives the 422's text.
The number helpers (`serde_number`, `f64_from_parts`, ...) are shared with that replay.
"""

from __future__ import annotations

import binascii
import decimal
import json
import re
from typing import Any

from aziot.actors.b64 import NonCanonical, decode_strict

from .rust_text import rust_debug


class OutOfRange:
    """A number serde_json cannot hold (an f64 overflow): an error only where a field is read.

    serde skips an ignored field's number by its syntax alone, whatever its size, but a number
    it must deserialize (a known field, or any value of a struct with a flattened field, which
    serde buffers whole) fails with "number out of range"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OutOfRange()"


OUT_OF_RANGE = OutOfRange()
_U64_MAX = (1 << 64) - 1
_I32_MAX = (1 << 31) - 1
# serde_json's table of powers of ten (Rust float literals, correctly rounded as Python's are)
_POW10 = [float(f"1e{i}") for i in range(309)]


def overflows(value: int, digit: int, limit: int) -> bool:
    """serde_json's `overflow!(value * 10 + digit, limit)`."""
    return value >= limit // 10 and (value > limit // 10 or digit > limit % 10)


def f64_from_parts(positive: bool, significand: int, exponent: int) -> float | OutOfRange:
    """serde_json's float assembly (without its `float_roundtrip` feature, as the original
    builds it): the u64 significand times or over one power of ten, not correctly rounded."""
    value = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            if exponent >= 0:
                value *= _POW10[exponent]
                if value == float("inf"):
                    return OUT_OF_RANGE
            else:
                value /= _POW10[-exponent]
            break
        if value == 0.0:
            break
        if exponent >= 0:
            return OUT_OF_RANGE
        value /= 1e308
        exponent += 308
    return value if positive else -value


def serde_number(text: str) -> int | float | OutOfRange:
    """The value serde_json reads from the JSON number `text` (already known to be valid JSON):
    an integer when it fits u64 (or i64 when negative), else an f64, else out of range.

    Python's own reading differs at the edges: integers beyond 4,300 digits raise, `-0` is an
    integer, `1e400` is infinity, and floats are correctly rounded where serde is not."""
    positive = not text.startswith("-")
    at = 0 if positive else 1
    end = len(text)
    significand = exponent = 0
    digits = text[at:]
    if len(digits) < 19 and digits.isascii() and digits.isdigit():
        significand = int(digits)  # the common case: an integer of at most 18 digits
        at = end
    while at < end and text[at].isdigit():
        digit = ord(text[at]) - 48
        if overflows(significand, digit, _U64_MAX):
            start = at  # the digits past u64 only scale it
            while at < end and text[at].isdigit():
                at += 1
            exponent = at - start
            break
        significand = significand * 10 + digit
        at += 1
    if at == end and exponent == 0:
        if positive:
            return significand
        if significand == 0 or significand > 1 << 63:
            return -float(significand)  # serde: "-0" and below i64::MIN are floats
        return -significand
    if at < end and text[at] == ".":
        at += 1
        while at < end and text[at].isdigit():
            digit = ord(text[at]) - 48
            if overflows(significand, digit, _U64_MAX):
                while at < end and text[at].isdigit():
                    at += 1
                break
            significand = significand * 10 + digit
            exponent -= 1
            at += 1
    if at < end and text[at] in "eE":
        at += 1
        positive_exponent = text[at] != "-"
        if text[at] in "+-":
            at += 1
        power = 0
        while at < end:
            digit = ord(text[at]) - 48
            if power and overflows(power, digit, _I32_MAX):
                if significand != 0 and positive_exponent:
                    return OUT_OF_RANGE
                return 0.0 if positive else -0.0
            power = power * 10 + digit
            at += 1
        exponent = exponent + power if positive_exponent else exponent - power
        exponent = max(-(1 << 31), min(_I32_MAX, exponent))  # Rust's saturating i32 arithmetic
    return f64_from_parts(positive, significand, exponent)


def rust_float(value: float) -> str:
    """An f64 as serde's error texts show it: Rust's shortest round-trip digits written out
    without an exponent, and `.0` added when that has no decimal point."""
    text = format(decimal.Decimal(repr(value)), "f")
    return text if "." in text else text + ".0"


def _has_out_of_range(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if item is OUT_OF_RANGE:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class ShapeError(Exception):
    """The body is JSON but not the shape the handler wants (serde's wording, no position)."""


class JsonSyntaxError(ShapeError):
    """Python's reading of the body may not be serde_json's: `serde_replay` must decide."""


def parse_json(raw: bytes) -> Any:
    """The body as Python's parser reads it, numbers as serde reads them; JsonSyntaxError for
    anything serde might read otherwise (bad JSON or UTF-8, NaN, repeated keys, lone surrogates,
    depth past serde's limit). Its text is Python's, for logs: the client's comes from the replay.
    """
    try:
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
    except (ValueError, RecursionError) as error:
        # ValueError: bad UTF-8 or bad JSON. RecursionError: far deeper than serde's limit.
        raise JsonSyntaxError(str(error) or type(error).__name__) from None
    if _LONE_SURROGATE.search(text) and _has_surrogate(value):
        raise JsonSyntaxError("lone surrogate in a \\u escape")
    # Depth is at most the number of brackets: most bodies need no walk at all.
    if text.count("{") + text.count("[") > 127 and _depth_over(value, 127):
        raise JsonSyntaxError("deeper than serde's recursion limit of 128")
    return value


_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _integer(text: str) -> int | float | OutOfRange:
    """`serde_number` for a JSON integer, without its walk where the answer is plain: at most
    19 digits always fit u64, and 18 with a `-` fit i64 (but serde reads `-0` as a float)."""
    if len(text) < 20 and text != "-0":
        return int(text)
    return serde_number(text)


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON; serde_json refuses them."""
    raise JsonSyntaxError(f"{name} is not JSON")


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
    result = dict(pairs)  # in C: a Python loop over the pairs costs every request
    if len(result) != len(pairs):
        raise JsonSyntaxError("repeated key")
    return result


# One decoder, as `json.loads` keeps one for its defaults: building one per body (what passing
# hooks to `json.loads` does) took a third of a small body's parse. It holds no state between
# calls, so threads parsing large bodies share it safely.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_constant=_no_constant,
    parse_int=_integer,
    parse_float=serde_number,
)


def describe(value: Any) -> str:
    """serde's `Unexpected` for a value, as serde_json's errors print it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{rust_float(value)}`"
    if isinstance(value, str):
        return f"string {rust_debug(value)}"
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
        if value is OUT_OF_RANGE:
            raise ShapeError("number out of range")
        if isinstance(value, list) and order is not None:
            value = _from_sequence(value, what, order)
        if not isinstance(value, dict):
            raise ShapeError(f"invalid type: {describe(value)}, expected {what}")
        if order is None and _has_out_of_range(value):
            # A flattened field makes serde buffer every value, ignored ones too, as numbers.
            raise ShapeError("number out of range")
        self._value = value

    def has(self, name: str) -> bool:
        return self._value.get(name) is not None

    def raw(self, name: str) -> Any:
        if name not in self._value:
            raise ShapeError(f"missing field `{name}`")
        value = self._value[name]
        if value is OUT_OF_RANGE:
            raise ShapeError("number out of range")
        return value

    def string(self, name: str) -> str:
        value = self.raw(name)
        if not isinstance(value, str):
            raise ShapeError(f"invalid type: {describe(value)}, expected a string")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self._value.get(name)
        if value is OUT_OF_RANGE:
            raise ShapeError("number out of range")
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


_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=]")


def decode_b64(text: str) -> bytes:
    """Standard, padded, canonical base64, as Rust's strict engine wants it."""
    try:
        return decode_strict(text)  # in C; a megabyte takes milliseconds, not tens of them
    except ValueError:
        pass  # the exact refusal below, for a bad text only
    bad = _NOT_BASE64.search(text)
    if bad is not None:
        raise ShapeError(f"Invalid symbol {ord(bad[0])}, offset {bad.start()}.")
    try:
        return decode_strict(text)
    except NonCanonical:
        raise ShapeError(
            f"Invalid last symbol {ord(text.rstrip('=')[-1])}, offset {len(text.rstrip('=')) - 1}."
        ) from None
    except binascii.Error:
        raise ShapeError("Invalid padding") from None


def at_body_end(error: ShapeError, raw: bytes) -> str:
    """A handler's refusal placed at the body's end, as serde places a struct's missing field:
    the 422's text only when serde accepts a body its handler refuses (a route whose `@serde_body`
    declaration is out of step with its handler), so no better position is known."""
    lines = raw.decode("utf-8", "replace").rstrip().split("\n")
    return f"{error} at line {len(lines)} column {len(lines[-1])}"
