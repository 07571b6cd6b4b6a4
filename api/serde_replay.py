"""serde_json's one-pass reading of a request body into the original's request struct, replayed.

The hot path parses with Python's `json` (`body.parse_json`) and lets the handler check the
fields (`body.Fields`); neither computes a client's error text. When the parser refuses a body
(anything serde might read otherwise) or a handler refuses a field, the body is read again here,
the way the original reads it: serde_json 1.0.149's `Deserializer` over the raw bytes (`de.rs`,
`read.rs`) driving serde 1.0.228's derived visitors, fed by a declaration of the route's body type
(`@serde_body`). The result is serde's verdict, which decides every 422: its error text with its
position (the reader's byte index when it gave up, columns counted in bytes), or acceptance with
the value serde would have built, in the shape handlers read. Number assembly and base64 decoding
are `body`'s, shared.

What follows serde_json, and why it matters here:
- errors come in body order (one pass), not in the order a handler reads fields;
- an error raised by a visitor has no position until the innermost `deserialize_*` call that
  returns it (`fix_position`), after that call's `end_map`/`end_seq` has run;
- values of fields the struct does not know are skipped by `ignore_value`: iteratively (no depth
  limit), without checking `\\u` escapes or UTF-8, but numbers are still syntax-checked;
- values serde must read (known fields, and every value of a struct with a flattened field,
  which it buffers as `Content`) count against the recursion limit of 128;
- strings in `invalid type` texts are Rust `{:?}`-quoted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from .body import (
    OUT_OF_RANGE,
    ShapeError,
    decode_b64,
    describe,
    f64_from_parts,
    overflows,
)
from .rust_text import rust_debug

# -- the declaration of a body type --------------------------------------------------------------


@attrs.frozen
class Str:
    """A `String` (or a newtype over one, as `KeyHandle`), or a string-only custom type."""

    expecting: str = "a string"


@attrs.frozen
class Base64:
    """`http_common::ByteString`: a string, standard base64 (the `base64` crate's errors)."""

    expecting: str = "a base64-encoded string"


@attrs.frozen
class Usage:
    """keyd's `key_usage` visitor: a comma-separated string of usages."""

    names: tuple[str, ...]
    expecting: str = "KeyUsage"


@attrs.frozen
class Opt:
    """`Option<T>`: null is None; missing from a map is None too (not in a sequence)."""

    inner: Any


@attrs.frozen
class Field:
    name: str  # as on the wire (after `#[serde(rename)]`)
    type: Any


@attrs.frozen
class Variant:
    name: str  # as on the wire
    ident: str  # the Rust name, for texts
    fields: tuple[Field, ...] | None  # None: a unit variant


@attrs.frozen
class Tagged:
    """A `#[serde(tag, content)]` enum, flattened into its struct."""

    name: str
    tag: str
    content: str
    variants: tuple[Variant, ...]


@attrs.frozen
class Swallowed:
    """A flattened `Option<enum>`: serde's `FlatMapDeserializer` turns any error into None, so
    only the buffering of the values can fail. Handlers get the buffered values as they are."""


@attrs.frozen
class Struct:
    """A derived struct. Without flattened members it takes a map or a sequence of its fields in
    declaration order; with them, maps only (serde then buffers every unknown value)."""

    name: str
    fields: tuple[Field, ...]
    flatten: tuple[Tagged | Swallowed, ...] = ()


@attrs.frozen
class Ignored:
    """`serde::de::IgnoredAny`: any JSON value."""


IGNORED_ANY = Ignored()
STRING = Str()
BASE64 = Base64()

_H = TypeVar("_H")


def serde_body(declaration: Any) -> Callable[[_H], _H]:
    """Declares the body type a route handler's original deserializes (else `IgnoredAny`)."""

    def mark(handler: _H) -> _H:
        handler.serde_body = declaration  # type: ignore[attr-defined]
        return handler

    return mark


def body_type_of(handler: Any) -> Any:
    return getattr(handler, "serde_body", IGNORED_ANY)


# -- the verdict ----------------------------------------------------------------------------------


@attrs.frozen
class Refused:
    message: str  # with " at line L column C"


@attrs.frozen
class Accepted:
    value: Any  # what serde built, as JSON-like values in the shape handlers read


# -- the replay ------------------------------------------------------------------------------------

EOF_LIST = "EOF while parsing a list"
EOF_OBJECT = "EOF while parsing an object"
EOF_STRING = "EOF while parsing a string"
EOF_VALUE = "EOF while parsing a value"
EXPECTED_COLON = "expected `:`"
EXPECTED_LIST_COMMA_OR_END = "expected `,` or `]`"
EXPECTED_OBJECT_COMMA_OR_END = "expected `,` or `}`"
EXPECTED_IDENT = "expected ident"
EXPECTED_VALUE = "expected value"
INVALID_ESCAPE = "invalid escape"
INVALID_NUMBER = "invalid number"
NUMBER_OUT_OF_RANGE = "number out of range"
INVALID_UNICODE = "invalid unicode code point"
CONTROL_CHARACTER = "control character (\\u0000-\\u001F) found while parsing a string"
KEY_MUST_BE_A_STRING = "key must be a string"
LONE_LEADING_SURROGATE = "lone leading surrogate in hex escape"
TRAILING_COMMA = "trailing comma"
TRAILING_CHARACTERS = "trailing characters"
UNEXPECTED_END_OF_HEX_ESCAPE = "unexpected end of hex escape"
RECURSION_LIMIT = "recursion limit exceeded"

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_PLAIN_STRING = re.compile(rb'[^"\\\x00-\x1f]*')
_DIGITS = re.compile(rb"[0-9]*")
_OPEN_SEQS = re.compile(rb"\[(?:[ \t\n\r]*\[)*")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_U64_MAX = (1 << 64) - 1
_I32_MAX = (1 << 31) - 1
_I32_MIN = -(1 << 31)
_ZERO, _NINE, _MINUS = ord("0"), ord("9"), ord("-")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN_SEQ, _CLOSE_SEQ, _OPEN_MAP, _CLOSE_MAP = b"[]{}"
_COMMA, _COLON = ord(","), ord(":")


class _Fail(Exception):
    """A serde_json error; `at` is the byte index its position is computed from, None until
    `fix_position` gives it one."""

    def __init__(self, message: str, at: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.at = at


class _Map:
    """A buffered JSON object (serde's `Content::Map`): every pair, repeated keys included."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def _invalid_type(unexpected: str, expecting: str) -> _Fail:
    return _Fail(f"invalid type: {unexpected}, expected {expecting}")


def _one_of(names: tuple[str, ...]) -> str:
    quoted = [f"`{name}`" for name in names]
    if len(quoted) == 1:
        return quoted[0]
    if len(quoted) == 2:
        return f"{quoted[0]} or {quoted[1]}"
    return ", ".join(quoted[:-1]) + f", or {quoted[-1]}"


def _plain(value: Any) -> Any:
    """A buffered value as a handler reads JSON (maps as dicts, the last of repeated keys)."""
    if isinstance(value, _Map):
        return {key: _plain(item) for key, item in value.pairs}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


class _Reader:
    """serde_json's `Deserializer<SliceRead>`: `i` is the slice index."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0
        self.remaining_depth = 128

    # -- positions (SliceRead::position / peek_position, Deserializer::error / peek_error) --

    def error(self, message: str) -> _Fail:
        return _Fail(message, self.i)

    def peek_error(self, message: str) -> _Fail:
        return _Fail(message, min(len(self.data), self.i + 1))

    def fix(self, fail: _Fail) -> _Fail:
        if fail.at is None:
            fail.at = self.i
        return fail

    def position(self, at: int) -> str:
        start = self.data.rfind(b"\n", 0, at) + 1
        line = self.data.count(b"\n", 0, start) + 1
        return f"line {line} column {at - start}"

    # -- bytes --

    def peek(self) -> int | None:
        return self.data[self.i] if self.i < len(self.data) else None

    def peek_or_null(self) -> int:
        return self.data[self.i] if self.i < len(self.data) else 0

    def next_char(self) -> int | None:
        if self.i < len(self.data):
            self.i += 1
            return self.data[self.i - 1]
        return None

    def whitespace(self) -> int | None:
        match = _WHITESPACE.match(self.data, self.i)
        assert match is not None
        self.i = match.end()
        return self.peek()

    def ident(self, rest: bytes) -> None:
        for expected in rest:
            got = self.next_char()
            if got is None:
                raise self.error(EOF_VALUE)
            if got != expected:
                raise self.error(EXPECTED_IDENT)

    def descend(self) -> None:
        self.remaining_depth -= 1
        if self.remaining_depth == 0:
            raise self.peek_error(RECURSION_LIMIT)

    # -- strings (read.rs) --

    def parse_str(self) -> str:
        """After the opening quote; validates escapes and UTF-8 (`parse_str`)."""
        data = self.data
        scratch = bytearray()
        while True:
            match = _PLAIN_STRING.match(data, self.i)
            assert match is not None
            scratch += data[self.i : match.end()]
            self.i = match.end()
            if self.i == len(data):
                raise self.error(EOF_STRING)
            byte = data[self.i]
            self.i += 1
            if byte == _QUOTE:
                try:
                    return scratch.decode("utf-8")
                except UnicodeDecodeError:
                    raise self.error(INVALID_UNICODE) from None
            if byte != _BACKSLASH:
                raise self.error(CONTROL_CHARACTER)
            escape = self.next_char()
            if escape is None:
                raise self.error(EOF_STRING)
            simple = _SIMPLE_ESCAPES.get(escape)
            if simple is not None:
                scratch += simple.encode()
            elif escape == ord("u"):
                scratch += self.unicode_escape().encode("utf-8")
            else:
                raise self.error(INVALID_ESCAPE)

    def hex_escape(self) -> int:
        digits = self.data[self.i : self.i + 4]
        if len(digits) < 4:
            self.i = len(self.data)
            raise self.error(EOF_STRING)
        self.i += 4
        if not all(d in _HEX for d in digits):
            raise self.error(INVALID_ESCAPE)
        return int(digits, 16)

    def unicode_escape(self) -> str:
        n = self.hex_escape()
        if 0xDC00 <= n <= 0xDFFF:
            raise self.error(LONE_LEADING_SURROGATE)
        if not 0xD800 <= n <= 0xDBFF:
            return chr(n)
        for expected in (_BACKSLASH, ord("u")):
            got = self.peek()
            if got is None:
                raise self.error(EOF_STRING)
            self.i += 1
            if got != expected:
                raise self.error(UNEXPECTED_END_OF_HEX_ESCAPE)
        n2 = self.hex_escape()
        if not 0xDC00 <= n2 <= 0xDFFF:
            raise self.error(LONE_LEADING_SURROGATE)
        return chr((((n - 0xD800) << 10) | (n2 - 0xDC00)) + 0x10000)

    def ignore_str(self) -> None:
        """After the opening quote; escapes only consumed, UTF-8 unchecked (`ignore_str`)."""
        data = self.data
        while True:
            match = _PLAIN_STRING.match(data, self.i)
            assert match is not None
            self.i = match.end()
            if self.i == len(data):
                raise self.error(EOF_STRING)
            byte = data[self.i]
            if byte == _QUOTE:
                self.i += 1
                return
            if byte != _BACKSLASH:
                raise self.error(CONTROL_CHARACTER)  # unlike parse_str, before the byte
            self.i += 1
            escape = self.next_char()
            if escape is None:
                raise self.error(EOF_STRING)
            if escape == ord("u"):
                self.hex_escape()
            elif escape not in _SIMPLE_ESCAPES:
                raise self.error(INVALID_ESCAPE)

    # -- numbers (parse_integer and what it calls; no float_roundtrip) --

    def parse_integer(self, positive: bool) -> int | float:
        first = self.next_char()
        if first is None:
            raise self.error(EOF_VALUE)
        if first == _ZERO:
            if _ZERO <= self.peek_or_null() <= _NINE:
                raise self.peek_error(INVALID_NUMBER)
            return self.parse_number(positive, 0)
        if not _ZERO < first <= _NINE:
            raise self.error(INVALID_NUMBER)
        significand = first - _ZERO
        while _ZERO <= (byte := self.peek_or_null()) <= _NINE:
            digit = byte - _ZERO
            if overflows(significand, digit, _U64_MAX):
                return self.parse_long_integer(positive, significand)
            self.i += 1
            significand = significand * 10 + digit
        return self.parse_number(positive, significand)

    def skip_digits(self) -> int:
        match = _DIGITS.match(self.data, self.i)
        assert match is not None
        count = match.end() - self.i
        self.i = match.end()
        return count

    def parse_long_integer(self, positive: bool, significand: int) -> float:
        exponent = self.skip_digits()
        byte = self.peek_or_null()
        if byte == ord("."):
            return self.parse_decimal(positive, significand, exponent)
        if byte in b"eE":
            return self.parse_exponent(positive, significand, exponent)
        return self.f64_from_parts(positive, significand, exponent)

    def parse_number(self, positive: bool, significand: int) -> int | float:
        byte = self.peek_or_null()
        if byte == ord("."):
            return self.parse_decimal(positive, significand, 0)
        if byte in b"eE":
            return self.parse_exponent(positive, significand, 0)
        if positive:
            return significand
        if significand == 0 or significand > 1 << 63:
            return -float(significand)  # "-0" and below i64::MIN are floats
        return -significand

    def parse_decimal(self, positive: bool, significand: int, before: int) -> float:
        self.i += 1
        after = 0
        while _ZERO <= (byte := self.peek_or_null()) <= _NINE:
            digit = byte - _ZERO
            if overflows(significand, digit, _U64_MAX):
                self.skip_digits()
                if self.peek_or_null() in b"eE":
                    return self.parse_exponent(positive, significand, before + after)
                return self.f64_from_parts(positive, significand, before + after)
            self.i += 1
            significand = significand * 10 + digit
            after -= 1
        if after == 0:
            if self.peek() is not None:
                raise self.peek_error(INVALID_NUMBER)
            raise self.peek_error(EOF_VALUE)
        if self.peek_or_null() in b"eE":
            return self.parse_exponent(positive, significand, before + after)
        return self.f64_from_parts(positive, significand, before + after)

    def parse_exponent(self, positive: bool, significand: int, starting: int) -> float:
        self.i += 1
        positive_exponent = True
        sign = self.peek_or_null()
        if sign in b"+-":
            self.i += 1
            positive_exponent = sign == ord("+")
        first = self.next_char()
        if first is None:
            raise self.error(EOF_VALUE)
        if not _ZERO <= first <= _NINE:
            raise self.error(INVALID_NUMBER)
        exponent = first - _ZERO
        while _ZERO <= (byte := self.peek_or_null()) <= _NINE:
            self.i += 1
            digit = byte - _ZERO
            if overflows(exponent, digit, _I32_MAX):
                if significand != 0 and positive_exponent:
                    raise self.error(NUMBER_OUT_OF_RANGE)
                self.skip_digits()
                return 0.0 if positive else -0.0
            exponent = exponent * 10 + digit
        final = starting + exponent if positive_exponent else starting - exponent
        return self.f64_from_parts(positive, significand, max(_I32_MIN, min(_I32_MAX, final)))

    def f64_from_parts(self, positive: bool, significand: int, exponent: int) -> float:
        value = f64_from_parts(positive, significand, exponent)
        if value is OUT_OF_RANGE:
            raise self.error(NUMBER_OUT_OF_RANGE)
        assert isinstance(value, float)
        return value

    def parse_any_number(self) -> int | float:
        if self.peek() == _MINUS:
            self.i += 1
            return self.parse_integer(False)
        return self.parse_integer(True)

    # -- skipping (ignore_value and its helpers) --

    def ignore_integer(self) -> None:
        first = self.next_char() or 0
        if first == _ZERO:
            if _ZERO <= self.peek_or_null() <= _NINE:
                raise self.peek_error(INVALID_NUMBER)
        elif _ZERO < first <= _NINE:
            self.skip_digits()
        else:
            raise self.error(INVALID_NUMBER)
        byte = self.peek_or_null()
        if byte == ord("."):
            self.ignore_decimal()
        elif byte in b"eE":
            self.ignore_exponent()

    def ignore_decimal(self) -> None:
        self.i += 1
        if self.skip_digits() == 0:
            raise self.peek_error(INVALID_NUMBER)
        if self.peek_or_null() in b"eE":
            self.ignore_exponent()

    def ignore_exponent(self) -> None:
        self.i += 1
        if self.peek_or_null() in b"+-":
            self.i += 1
        first = self.next_char() or 0
        if not _ZERO <= first <= _NINE:
            raise self.error(INVALID_NUMBER)
        self.skip_digits()

    def ignore_value(self) -> None:
        """Iterative, as serde_json's: `scratch` holds the open brackets, so no depth limit."""
        scratch = bytearray()
        enclosing: int | None = None
        while True:
            peek = self.whitespace()
            if peek is None:
                raise self.peek_error(EOF_VALUE)
            frame: int | None = None
            if peek == ord("n"):
                self.i += 1
                self.ident(b"ull")
            elif peek == ord("t"):
                self.i += 1
                self.ident(b"rue")
            elif peek == ord("f"):
                self.i += 1
                self.ident(b"alse")
            elif peek == _MINUS:
                self.i += 1
                self.ignore_integer()
            elif _ZERO <= peek <= _NINE:
                self.ignore_integer()
            elif peek == _QUOTE:
                self.i += 1
                self.ignore_str()
            elif peek in (_OPEN_SEQ, _OPEN_MAP):
                if enclosing is not None:
                    scratch.append(enclosing)
                    enclosing = None
                frame = peek
                if peek == _OPEN_SEQ:
                    # A run of `[`, each opening the next value: one frame each, at once.
                    match = _OPEN_SEQS.match(self.data, self.i)
                    assert match is not None
                    scratch += b"[" * (self.data.count(b"[", self.i, match.end()) - 1)
                    self.i = match.end()
                else:
                    self.i += 1
            else:
                raise self.peek_error(EXPECTED_VALUE)

            if frame is not None:
                accept_comma = False
            elif enclosing is not None:
                frame, enclosing, accept_comma = enclosing, None, True
            elif scratch:
                frame, accept_comma = scratch.pop(), True
            else:
                return

            while True:
                peek = self.whitespace()
                if peek == _COMMA and accept_comma:
                    self.i += 1
                    break
                if (peek == _CLOSE_SEQ and frame == _OPEN_SEQ) or (
                    peek == _CLOSE_MAP and frame == _OPEN_MAP
                ):
                    self.i += 1
                    if not scratch:
                        return
                    frame = scratch.pop()
                    accept_comma = True
                    continue
                if peek is None:
                    raise self.peek_error(EOF_LIST if frame == _OPEN_SEQ else EOF_OBJECT)
                if accept_comma:
                    raise self.peek_error(
                        EXPECTED_LIST_COMMA_OR_END
                        if frame == _OPEN_SEQ
                        else EXPECTED_OBJECT_COMMA_OR_END
                    )
                break

            if frame == _OPEN_MAP:
                peek = self.whitespace()
                if peek is None:
                    raise self.peek_error(EOF_OBJECT)
                if peek != _QUOTE:
                    raise self.peek_error(KEY_MUST_BE_A_STRING)
                self.i += 1
                self.ignore_str()
                peek = self.whitespace()
                if peek is None:
                    raise self.peek_error(EOF_OBJECT)
                if peek != _COLON:
                    raise self.peek_error(EXPECTED_COLON)
                self.i += 1
            enclosing = frame

    # -- containers (SeqAccess, MapAccess, end_seq, end_map) --

    def has_next_element(self, first: bool) -> bool:
        peek = self.whitespace()
        if peek is None:
            raise self.peek_error(EOF_LIST)
        if peek == _CLOSE_SEQ:
            return False
        if first:
            return True
        if peek != _COMMA:
            raise self.peek_error(EXPECTED_LIST_COMMA_OR_END)
        self.i += 1
        peek = self.whitespace()
        if peek == _CLOSE_SEQ:
            raise self.peek_error(TRAILING_COMMA)
        if peek is None:
            raise self.peek_error(EOF_VALUE)
        return True

    def next_key(self, first: bool) -> str | None:
        peek = self.whitespace()
        if peek is None:
            raise self.peek_error(EOF_OBJECT)
        if peek == _CLOSE_MAP:
            return None
        if first:
            if peek != _QUOTE:
                raise self.peek_error(KEY_MUST_BE_A_STRING)
        elif peek == _COMMA:
            self.i += 1
            peek = self.whitespace()
            if peek == _CLOSE_MAP:
                raise self.peek_error(TRAILING_COMMA)
            if peek is None:
                raise self.peek_error(EOF_VALUE)
            if peek != _QUOTE:
                raise self.peek_error(KEY_MUST_BE_A_STRING)
        else:
            raise self.peek_error(EXPECTED_OBJECT_COMMA_OR_END)
        self.i += 1
        return self.parse_str()

    def colon(self) -> None:
        peek = self.whitespace()
        if peek == _COLON:
            self.i += 1
        elif peek is None:
            raise self.peek_error(EOF_OBJECT)
        else:
            raise self.peek_error(EXPECTED_COLON)

    def end_seq(self) -> None:
        peek = self.whitespace()
        if peek == _CLOSE_SEQ:
            self.i += 1
        elif peek == _COMMA:
            self.i += 1
            if self.whitespace() == _CLOSE_SEQ:
                raise self.peek_error(TRAILING_COMMA)
            raise self.peek_error(TRAILING_CHARACTERS)
        elif peek is None:
            raise self.peek_error(EOF_LIST)
        else:
            raise self.peek_error(TRAILING_CHARACTERS)

    def end_map(self) -> None:
        peek = self.whitespace()
        if peek == _CLOSE_MAP:
            self.i += 1
        elif peek == _COMMA:
            raise self.peek_error(TRAILING_COMMA)
        elif peek is None:
            raise self.peek_error(EOF_OBJECT)
        else:
            raise self.peek_error(TRAILING_CHARACTERS)

    def container(self, visit: Callable[[], Any], end: Callable[[], None]) -> Any:
        """`check_recursion! { eat; visit }` then `match (ret, end())`: the end runs (and may
        move the reader) even when the visit failed; the visit's error wins."""
        self.descend()
        self.i += 1
        failure: _Fail | None = None
        value = None
        try:
            value = visit()
        except _Fail as fail:
            failure = fail
        self.remaining_depth += 1
        try:
            end()
        except _Fail as fail:
            failure = failure or fail
        if failure is not None:
            raise self.fix(failure)
        return value

    # -- typed reading (Deserializer's deserialize_*) --

    def invalid_type(self, expecting: str) -> _Fail:
        """`peek_invalid_type`: reads the offending scalar whole, then positions after it."""
        peek = self.peek_or_null()
        if peek == ord("n"):
            self.i += 1
            self.ident(b"ull")
            unexpected = "null"
        elif peek == ord("t"):
            self.i += 1
            self.ident(b"rue")
            unexpected = "boolean `true`"
        elif peek == ord("f"):
            self.i += 1
            self.ident(b"alse")
            unexpected = "boolean `false`"
        elif peek == _MINUS or _ZERO <= peek <= _NINE:
            unexpected = describe(self.parse_any_number())
        elif peek == _QUOTE:
            self.i += 1
            unexpected = describe(self.parse_str())
        elif peek == _OPEN_SEQ:
            unexpected = "sequence"
        elif peek == _OPEN_MAP:
            unexpected = "map"
        else:
            return self.peek_error(EXPECTED_VALUE)
        return self.fix(_invalid_type(unexpected, expecting))

    def read(self, kind: Any) -> Any:
        if isinstance(kind, Str | Base64 | Usage):
            return self.read_str(kind)
        if isinstance(kind, Opt):
            if self.whitespace() == ord("n"):
                self.i += 1
                self.ident(b"ull")
                return None
            return self.read(kind.inner)
        if isinstance(kind, Struct):
            return self.read_flat_struct(kind) if kind.flatten else self.read_struct(kind)
        if isinstance(kind, Ignored):
            self.ignore_value()
            return None
        raise TypeError(f"not a body type: {kind!r}")

    def read_str(self, kind: Str | Base64 | Usage) -> str:
        peek = self.whitespace()
        if peek is None:
            raise self.peek_error(EOF_VALUE)
        if peek != _QUOTE:
            raise self.fix(self.invalid_type(kind.expecting))
        self.i += 1
        text = self.parse_str()
        try:
            _visit_str(kind, text)
        except _Fail as fail:
            raise self.fix(fail) from None
        return text

    def read_struct(self, kind: Struct) -> dict[str, Any]:
        peek = self.whitespace()
        if peek is None:
            raise self.peek_error(EOF_VALUE)
        if peek == _OPEN_SEQ:
            return self.container(lambda: self.struct_seq(kind), self.end_seq)
        if peek == _OPEN_MAP:
            return self.container(lambda: self.struct_map(kind), self.end_map)
        raise self.fix(self.invalid_type(f"struct {kind.name}"))

    def struct_seq(self, kind: Struct) -> dict[str, Any]:
        values: dict[str, Any] = {}
        count = len(kind.fields)
        for index, field in enumerate(kind.fields):
            if not self.has_next_element(index == 0):
                raise _Fail(
                    f"invalid length {index}, expected struct {kind.name} with {count} "
                    f"element{'' if count == 1 else 's'}"
                )
            values[field.name] = self.read(field.type)
        return values

    def known_fields(self, kind: Struct, unknown: Callable[[str], None]) -> dict[str, Any]:
        """A derived visit_map's loop: known fields read, each other key left to `unknown`."""
        fields = {field.name: field for field in kind.fields}
        values: dict[str, Any] = {}
        first = True
        while (key := self.next_key(first)) is not None:
            first = False
            field = fields.get(key)
            if field is None:
                unknown(key)
                continue
            if key in values:
                raise _Fail(f"duplicate field `{key}`")
            self.colon()
            values[key] = self.read(field.type)
        for field in kind.fields:
            if field.name not in values:
                if not isinstance(field.type, Opt):
                    raise _Fail(f"missing field `{field.name}`")
                values[field.name] = None
        return values

    def struct_map(self, kind: Struct) -> dict[str, Any]:
        def ignore(_key: str) -> None:
            self.colon()
            self.ignore_value()

        return self.known_fields(kind, ignore)

    def read_flat_struct(self, kind: Struct) -> dict[str, Any]:
        """A struct with a flattened member: `deserialize_map`, every unknown value buffered."""
        peek = self.whitespace()
        if peek is None:
            raise self.peek_error(EOF_VALUE)
        if peek != _OPEN_MAP:
            raise self.fix(self.invalid_type(f"struct {kind.name}"))
        return self.container(lambda: self.flat_map(kind), self.end_map)

    def flat_map(self, kind: Struct) -> dict[str, Any]:
        collected: list[tuple[str, Any] | None] = []

        def collect(key: str) -> None:
            self.colon()
            collected.append((key, self.content()))

        values = self.known_fields(kind, collect)
        for member in kind.flatten:
            if isinstance(member, Tagged):
                values.update(_tagged(member, collected))
            else:
                for entry in collected:
                    if entry is not None:
                        values.setdefault(entry[0], _plain(entry[1]))
        return values

    def content(self) -> Any:
        """`Content::deserialize`: deserialize_any, recursion limit and all."""
        peek = self.whitespace()
        if peek is None:
            raise self.peek_error(EOF_VALUE)
        if peek == ord("n"):
            self.i += 1
            self.ident(b"ull")
            return None
        if peek == ord("t"):
            self.i += 1
            self.ident(b"rue")
            return True
        if peek == ord("f"):
            self.i += 1
            self.ident(b"alse")
            return False
        if peek == _MINUS or _ZERO <= peek <= _NINE:
            return self.parse_any_number()
        if peek == _QUOTE:
            self.i += 1
            return self.parse_str()
        if peek == _OPEN_SEQ:
            return self.container(self.content_seq, self.end_seq)
        if peek == _OPEN_MAP:
            return self.container(self.content_map, self.end_map)
        raise self.peek_error(EXPECTED_VALUE)

    def content_seq(self) -> list[Any]:
        items = []
        while self.has_next_element(not items):
            items.append(self.content())
        return items

    def content_map(self) -> _Map:
        pairs: list[tuple[str, Any]] = []
        while (key := self.next_key(not pairs)) is not None:
            self.colon()
            pairs.append((key, self.content()))
        return _Map(pairs)


def _visit_str(kind: Str | Base64 | Usage, text: str) -> None:
    """The visitor's `visit_str`: its errors have no position yet."""
    if isinstance(kind, Base64):
        try:
            decode_b64(text)
        except ShapeError as error:
            raise _Fail(str(error)) from None
    elif isinstance(kind, Usage):
        for token in text.split(","):
            if token not in kind.names:
                raise _Fail(f"invalid value: string {rust_debug(token)}, expected {kind.expecting}")


# -- flattened, adjacently tagged enums: serde's FlatStructAccess over the buffered values --------


def _tagged(kind: Tagged, collected: list[tuple[str, Any] | None]) -> dict[str, Any]:
    def next_relevant() -> tuple[str, Any] | None:
        for index, entry in enumerate(collected):
            if entry is not None and entry[0] in (kind.tag, kind.content):
                collected[index] = None  # flat_map_take_entry
                return entry
        return None

    def no_more(result: dict[str, Any]) -> dict[str, Any]:
        again = next_relevant()
        if again is not None:
            raise _Fail(f"duplicate field `{again[0]}`")
        return result

    first = next_relevant()
    if first is None:
        raise _Fail(f"missing field `{kind.tag}`")
    if first[0] == kind.tag:
        variant = _variant(kind, first[1])
        second = next_relevant()
        if second is None:
            if variant.fields is not None:
                raise _Fail(f"missing field `{kind.content}`")
            return {kind.tag: variant.name}
        if second[0] == kind.tag:
            raise _Fail(f"duplicate field `{kind.tag}`")
        return no_more(_variant_content(kind, variant, second[1]))
    content = first[1]
    second = next_relevant()
    if second is None:
        raise _Fail(f"missing field `{kind.tag}`")
    if second[0] == kind.content:
        raise _Fail(f"duplicate field `{kind.content}`")
    variant = _variant(kind, second[1])
    return no_more(_variant_content(kind, variant, content))


def _variant(kind: Tagged, tag: Any) -> Variant:
    """`AdjacentlyTaggedEnumVariantSeed` on a buffered value: ContentDeserializer's
    deserialize_enum, so a string or a map of one key whose value is unit."""
    value = None
    if isinstance(tag, _Map):
        if len(tag.pairs) != 1:
            raise _Fail("invalid value: map, expected map with a single key")
        (tag, value), *_ = tag.pairs
    elif not isinstance(tag, str):
        raise _invalid_type(describe(tag), "string or map")
    for variant in kind.variants:
        if variant.name == tag:
            break
    else:
        names = tuple(v.name for v in kind.variants)
        raise _Fail(f"unknown variant `{tag}`, expected {_one_of(names)}")
    if value is not None and not (isinstance(value, _Map) and not value.pairs):
        raise _invalid_type(describe(value), "unit")
    return variant


def _variant_content(kind: Tagged, variant: Variant, content: Any) -> dict[str, Any]:
    """The variant's content through ContentDeserializer::deserialize_any (the untagged form of
    a struct variant: maps only)."""
    result: dict[str, Any] = {kind.tag: variant.name}
    if variant.fields is None:
        if content is not None:
            raise _invalid_type(describe(content), f"unit variant {kind.name}::{variant.ident}")
        return result
    expecting = f"struct variant {kind.name}::{variant.ident}"
    if not isinstance(content, _Map):
        raise _invalid_type(describe(content), expecting)
    fields = {field.name: field for field in variant.fields}
    values: dict[str, Any] = {}
    for key, value in content.pairs:
        field = fields.get(key)
        if field is None:
            continue
        if key in values:
            raise _Fail(f"duplicate field `{key}`")
        values[key] = _from_content(field.type, value)
    for field in variant.fields:
        if field.name not in values:
            raise _Fail(f"missing field `{field.name}`")
    result[kind.content] = values
    return result


def _from_content(kind: Any, value: Any) -> Any:
    if isinstance(kind, Str | Base64 | Usage):
        if not isinstance(value, str):
            raise _invalid_type(describe(value), kind.expecting)
        _visit_str(kind, value)
        return value
    raise TypeError(f"not a variant field type: {kind!r}")


def replay(raw: bytes, kind: Any) -> Refused | Accepted:
    """serde_json::from_slice::<kind>(raw): its error text, or what it built."""
    reader = _Reader(raw)
    try:
        value = reader.read(kind)
        if reader.whitespace() is not None:
            raise reader.peek_error(TRAILING_CHARACTERS)
    except _Fail as fail:
        at = reader.i if fail.at is None else fail.at
        return Refused(f"{fail.message} at {reader.position(at)}")
    return Accepted(value)
