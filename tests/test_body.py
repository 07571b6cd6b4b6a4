"""Request bodies: the hot path's parse refuses what serde might read otherwise, and
serde_replay, which then decides the 422, reads a body as serde_json does."""

from __future__ import annotations

import time

import pytest

from aziot.api.body import OUT_OF_RANGE, JsonSyntaxError, parse_json
from aziot.api.serde_replay import (
    BASE64,
    IGNORED_ANY,
    STRING,
    Accepted,
    Field,
    Opt,
    Refused,
    Str,
    Struct,
    Tagged,
    Usage,
    Variant,
    replay,
)

# -- serde_replay: serde_json's one-pass reading of a body into the route's request struct ----

PEM_TEXT = "a base64-encoded string"
ISSUER = Struct("Issuer", (Field("certId", STRING), Field("privateKeyHandle", STRING)))
CREATE_CERT = Struct(
    "Request",
    (Field("certId", STRING), Field("csr", Str(PEM_TEXT)), Field("issuer", Opt(ISSUER))),
)
IMPORT_CERT = Struct("Request", (Field("pem", Str(PEM_TEXT)),))
DEEP = b"[" * 300 + b"]" * 300


def refused(raw: bytes, kind: object = IMPORT_CERT) -> str:
    verdict = replay(raw, kind)
    assert isinstance(verdict, Refused), verdict
    return verdict.message


def accepted(raw: bytes, kind: object = IMPORT_CERT) -> object:
    verdict = replay(raw, kind)
    assert isinstance(verdict, Accepted), verdict
    return verdict.value


KEY_ID = Struct("Request", (Field("keyId", STRING),))


@pytest.mark.parametrize(
    ("raw", "kind", "message"),
    [
        (b"{", KEY_ID, "EOF while parsing an object at line 1 column 1"),
        (b"[", KEY_ID, "EOF while parsing a list at line 1 column 1"),
        (b'{"keyId"', KEY_ID, "EOF while parsing an object at line 1 column 8"),
        (b'{"keyId":', KEY_ID, "EOF while parsing a value at line 1 column 9"),
        (b'{"keyId":"a",', KEY_ID, "EOF while parsing a value at line 1 column 13"),
        (b'{"keyId":"a"', KEY_ID, "EOF while parsing an object at line 1 column 12"),
        (b'{"keyId":"ab', KEY_ID, "EOF while parsing a string at line 1 column 12"),
        (b"[1,", IGNORED_ANY, "EOF while parsing a value at line 1 column 3"),
        (b"[1", IGNORED_ANY, "EOF while parsing a list at line 1 column 2"),
        (b'{"a":[1,{"b":"x]"', KEY_ID, "EOF while parsing an object at line 1 column 17"),
        (b"{ \n", KEY_ID, "EOF while parsing an object at line 2 column 0"),
        (b"", KEY_ID, "EOF while parsing a value at line 1 column 0"),
        # ignore_value, unlike a map's next key, is still inside the object after a comma
        (b'{"keyId":"a",', IGNORED_ANY, "EOF while parsing an object at line 1 column 13"),
    ],
)
def test_a_body_cut_short_is_named_as_serde_names_it(
    raw: bytes, kind: object, message: str
) -> None:
    """What serde was parsing when the input ran out, at the input's end (bytes on its line)."""
    with pytest.raises(JsonSyntaxError):
        parse_json(raw)
    assert refused(raw, kind) == message


@pytest.mark.parametrize(
    ("raw", "kind", "message"),
    [
        # a second leading zero: at the digit serde peeked
        (b'{"keyId":01}', KEY_ID, "invalid number at line 1 column 11"),
        (b'{"keyId":-01}', KEY_ID, "invalid number at line 1 column 12"),
        # no digit after '-', '.', or the exponent: at the byte serde consumed or peeked
        (b'{"keyId":-x}', KEY_ID, "invalid number at line 1 column 11"),
        (b'{"keyId":1.x}', KEY_ID, "invalid number at line 1 column 12"),
        (b'{"keyId":1ex}', KEY_ID, "invalid number at line 1 column 12"),
        (b'{"keyId":1e+x}', KEY_ID, "invalid number at line 1 column 13"),
        (b"[1,2,3.]", IGNORED_ANY, "invalid number at line 1 column 8"),
        (b"01", KEY_ID, "invalid number at line 1 column 2"),
        # the input ends inside a number serde must read
        (b'{"keyId":-', KEY_ID, "EOF while parsing a value at line 1 column 10"),
        (b'{"keyId":1.', KEY_ID, "EOF while parsing a value at line 1 column 11"),
        (b'{"keyId":1e+', KEY_ID, "EOF while parsing a value at line 1 column 12"),
        # a well-formed number followed by junk is about what follows it
        (b'{"keyId":1x}', IGNORED_ANY, "expected `,` or `}` at line 1 column 11"),
        (b'{"keyId":+1}', KEY_ID, "expected value at line 1 column 10"),
        # a number where a string is wanted is read whole first, then refused after it
        (
            b'{"keyId":1x}',
            KEY_ID,
            "invalid type: integer `1`, expected a string at line 1 column 10",
        ),
    ],
)
def test_malformed_numbers_are_named_as_serde_names_them(
    raw: bytes, kind: object, message: str
) -> None:
    """Positions as serde_json's parse_integer / parse_decimal / parse_exponent give them."""
    with pytest.raises(JsonSyntaxError):
        parse_json(raw)
    assert refused(raw, kind) == message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # the reader's position after the offending value; missing fields after the `}`
        (b'{"pem": 5}', f"invalid type: integer `5`, expected {PEM_TEXT} at line 1 column 9"),
        (b'{"pem": 5 }', f"invalid type: integer `5`, expected {PEM_TEXT} at line 1 column 9"),
        (b'{"pem":[1]}', f"invalid type: sequence, expected {PEM_TEXT} at line 1 column 7"),
        (b'{"a":1 }', "missing field `pem` at line 1 column 8"),
        # columns count bytes, lines restart them
        ('{"é":1}'.encode(), "missing field `pem` at line 1 column 8"),
        (
            '{"ééé":1,"pem":true}'.encode(),
            f"invalid type: boolean `true`, expected {PEM_TEXT} at line 1 column 22",
        ),
        (
            b'{"a":1,\n "pem":true}',
            f"invalid type: boolean `true`, expected {PEM_TEXT} at line 2 column 11",
        ),
        # a repeated field: after the key and the whitespace end_map skipped
        (b'{"pem":"a","pem" :"b"}', "duplicate field `pem` at line 1 column 17"),
        # the sequence form of a struct
        (b"[]", "invalid length 0, expected struct Request with 1 element at line 1 column 2"),
        (b'["a", "b"]', "trailing characters at line 1 column 7"),
        (b'["a",]', "trailing comma at line 1 column 6"),
        (b'"x"', 'invalid type: string "x", expected struct Request at line 1 column 3'),
        (b'{"pem":"a"} x', "trailing characters at line 1 column 13"),
        (b'{"pem":1e400}', "number out of range at line 1 column 12"),
        # a trailing surrogate alone; a leading one not followed by `\u` (after that byte)
        (b'{"pem":"\\udc00"}', "lone leading surrogate in hex escape at line 1 column 14"),
        (b'{"pem":"\\ud800"}', "unexpected end of hex escape at line 1 column 15"),
        (b'{"pem":"\\ud800\\u0041"}', "lone leading surrogate in hex escape at line 1 column 20"),
        (b'{"pem":"a\xff"}', "invalid unicode code point at line 1 column 11"),
        # a control character: parse_str counts it, ignore_str does not
        (
            b'{"pem":"a\x01"}',
            "control character (\\u0000-\\u001F) found while parsing a string at line 1 column 10",
        ),
        (
            b'{"x":"a\x01"}',
            "control character (\\u0000-\\u001F) found while parsing a string at line 1 column 7",
        ),
    ],
)
def test_serde_positions(raw: bytes, message: str) -> None:
    assert refused(raw) == message


def test_the_first_bad_field_in_the_body_is_reported() -> None:
    """One pass in body order: `csr` is wrong before `certId` is found missing."""
    text = f"invalid type: integer `5`, expected {PEM_TEXT} at line 1 column 8"
    assert refused(b'{"csr":5}', CREATE_CERT) == text
    assert refused(b'{"csr":"x"}', CREATE_CERT) == "missing field `certId` at line 1 column 11"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('"é"', '"é"'),
        ('"a\\nb\\"c\\\\d\\u001f\\t\\r\\u0000"', '"a\\nb\\"c\\\\d\\u{1f}\\t\\r\\0"'),
        ('"\\u00ad"', '"\\u{ad}"'),
        ('"e\\u0301"', '"e\\u{301}"'),  # a combining mark (Grapheme_Extend) is escaped
        ('"\\u0bbe"', '"\\u{bbe}"'),  # Other_Grapheme_Extend, though a spacing mark (Mc)
        ("-3", "integer `-3`"),
        ("1.5e3", "floating point `1500.0`"),
    ],
)
def test_invalid_type_texts_quote_strings_as_rust_debug(value: str, shown: str) -> None:
    raw = f'{{"certId":"x","csr":"y","issuer":{value}}}'.encode()
    message = refused(raw, CREATE_CERT)
    prefix = "invalid type: " + ("" if not value.startswith('"') else "string ")
    assert message.startswith(f"{prefix}{shown}, expected struct Issuer at line 1 column "), message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # serde's ignore_integer reads a NUL at the end: `invalid number`, not EOF
        (b'{"pem":"s","z":-', "invalid number at line 1 column 16"),
        (b'{"pem":"s","z":1.', "invalid number at line 1 column 17"),
        (b'{"pem":"s","z":1e', "invalid number at line 1 column 17"),
        (b'{"pem":"s","z":[01]}', "invalid number at line 1 column 18"),
        # a string or a key cut short
        (b'{"pem":"s","z":"ab', "EOF while parsing a string at line 1 column 18"),
        (b'{"pem":"s","z":[1,{"a" ', "EOF while parsing an object at line 1 column 23"),
    ],
)
def test_ignored_values_are_still_json(raw: bytes, message: str) -> None:
    assert refused(raw) == message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"pem":"s","x":' + DEEP + b"}",  # ignore_value has no depth limit
        b'{"pem":"s","z":1,"z":{"a":2,"a":3}}',  # repeated unknown keys
        b'{"pem":"s","z":"\\ud800\\udc00\\ud800"}',  # \u escapes are not checked when skipped
        b'{"z":"\xff\xfe","pem":"s"}',  # nor is UTF-8
        b'{"pem":"s","x":' + b"9" * 5000 + b"}",  # any size of number
        b'["s"]',
    ],
)
def test_what_serde_only_skips_is_accepted(raw: bytes) -> None:
    assert accepted(raw) == {"pem": "s"}


def test_an_ignored_any_body_takes_any_json_and_no_depth_limit() -> None:
    assert accepted(DEEP, IGNORED_ANY) is None
    assert accepted(b' {"a":1,"a":[{}]} ', IGNORED_ANY) is None
    assert refused(b"{[}", IGNORED_ANY) == "key must be a string at line 1 column 2"
    assert refused(b"[1 2]", IGNORED_ANY) == "expected `,` or `]` at line 1 column 4"


def test_a_hostile_body_is_replayed_in_linear_time() -> None:
    for raw in (b"[" * (1 << 20), b"[" * (1 << 19) + b"]" * (1 << 19) + b"]"):
        started = time.monotonic()
        message = refused(raw, IGNORED_ANY)
        assert time.monotonic() - started < 5.0, message
    assert refused(b"[" * (1 << 20), IGNORED_ANY) == (
        f"EOF while parsing a list at line 1 column {1 << 20}"
    )


SIGN = Struct(
    "Request",
    (Field("keyHandle", STRING),),
    (
        Tagged(
            "Parameters",
            "algorithm",
            "parameters",
            (
                Variant("ECDSA", "Ecdsa", (Field("digest", BASE64),)),
                Variant("HMAC-SHA256", "HmacSha256", (Field("message", BASE64),)),
            ),
        ),
    ),
)
ENCRYPT = Struct(
    "Request",
    (Field("keyHandle", STRING), Field("plaintext", BASE64)),
    (Tagged("Parameters", "algorithm", "parameters", (Variant("RSA-PKCS1", "RsaPkcs1", None),)),),
)


def test_a_flattened_struct_buffers_every_value_and_counts_its_depth() -> None:
    """The object is level 1: the 127th `[` inside is the 128th level, refused at that byte."""
    prefix = b'{"keyHandle":"h","x":'
    raw = prefix + DEEP + b"}"
    assert refused(raw, SIGN) == f"recursion limit exceeded at line 1 column {len(prefix) + 127}"
    lone = b'{"keyHandle":"h","x":"\\ud800"}'
    assert refused(lone, SIGN) == "unexpected end of hex escape at line 1 column 29"


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ('"algorithm":"RSA"', "unknown variant `RSA`, expected `ECDSA` or `HMAC-SHA256`"),
        ('"algorithm":0', "invalid type: integer `0`, expected string or map"),
        ('"algorithm":{}', "invalid value: map, expected map with a single key"),
        ('"algorithm":{"ECDSA":1}', "invalid type: integer `1`, expected unit"),
        ('"algorithm":"ECDSA"', "missing field `parameters`"),
        ('"parameters":{"digest":""}', "missing field `algorithm`"),
        (
            '"algorithm":"ECDSA","parameters":[""]',
            "invalid type: sequence, expected struct variant Parameters::Ecdsa",
        ),
        ('"algorithm":"ECDSA","parameters":{}', "missing field `digest`"),
        ('"algorithm":"ECDSA","parameters":{"digest":"x"}', "Invalid padding"),
        ('"algorithm":"ECDSA","algorithm":"ECDSA"', "duplicate field `algorithm`"),
        (
            '"parameters":{"digest":""},"algorithm":"ECDSA","parameters":1',
            "duplicate field `parameters`",
        ),
    ],
)
def test_an_adjacently_tagged_flattened_enum(tail: str, message: str) -> None:
    """Read from the buffer after the whole object: positioned after its `}`."""
    raw = f'{{"keyHandle":"h",{tail}}}'.encode()
    assert refused(raw, SIGN) == f"{message} at line 1 column {len(raw)}"


def test_what_the_flattened_enum_accepts_is_handed_over_as_handlers_read_it() -> None:
    raw = b'{"parameters":{"digest":"","x":1},"keyHandle":"h","algorithm":{"ECDSA":null}}'
    assert accepted(raw, SIGN) == {
        "keyHandle": "h",
        "algorithm": "ECDSA",
        "parameters": {"digest": ""},
    }
    raw = b'{"keyHandle":"h","algorithm":"RSA-PKCS1","parameters":null,"plaintext":""}'
    assert accepted(raw, ENCRYPT) == {"keyHandle": "h", "plaintext": "", "algorithm": "RSA-PKCS1"}
    raw = b'{"keyHandle":"h","algorithm":"RSA-PKCS1","parameters":{},"plaintext":""}'
    text = "invalid type: map, expected unit variant Parameters::RsaPkcs1"
    assert refused(raw, ENCRYPT) == f"{text} at line 1 column {len(raw)}"


def test_visitor_errors_are_placed_after_the_string() -> None:
    kind = Struct("Request", (Field("data", BASE64), Field("usage", Usage(("sign",)))))
    assert refused(b'{"data":"a" , "usage":"sign"}', kind) == "Invalid padding at line 1 column 11"
    text = 'invalid value: string "sig\\n", expected KeyUsage at line 1 column 31'
    assert refused(b'{"data":"","usage":"sign,sig\\n"}', kind) == text


# -- parse_json: the hot path's reading, or a refusal that sends the body to the replay --------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("9999999999999999999", 9999999999999999999),  # 19 digits always fit u64
        ("18446744073709551615", (1 << 64) - 1),
        ("18446744073709551616", 18446744073709551616.0),  # past u64: an f64
        ("-999999999999999999", -999999999999999999),
        ("-9223372036854775808", -(1 << 63)),
        ("-9223372036854775809", -9223372036854775809.0),  # below i64::MIN: an f64
        ("-0", -0.0),  # serde reads a negative zero as a float
        ("0", 0),
        ("1e400", OUT_OF_RANGE),
    ],
)
def test_numbers_are_read_as_serde_reads_them(text: str, value: object) -> None:
    parsed = parse_json(f'{{"a":[{text}]}}'.encode())["a"][0]
    assert repr(parsed) == repr(value)  # the type too, and the sign of a zero


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":1}',
        b'[{"b":{"a":1,"a":2}}]',
        b'{"a":NaN}',
        b"[-Infinity]",
        b'["\\ud800"]',
        b'{"\\udc00":1}',
        b"[" * 128 + b"]" * 128,
        b"[" * 100000 + b"]" * 100000,
        b'{"a":"\xff"}',
        b"\xef\xbb\xbf{}",
        b" ",
    ],
)
def test_what_serde_might_read_otherwise_is_left_to_the_replay(raw: bytes) -> None:
    with pytest.raises(JsonSyntaxError):
        parse_json(raw)


def test_what_both_read_alike_is_parsed() -> None:
    assert parse_json(b' {"a":["\\ud800\\udc00"],"b":{"a":1}}\n') == {
        "a": ["\U00010000"],
        "b": {"a": 1},
    }
    assert parse_json(b"[" * 127 + b"]" * 127) is not None
