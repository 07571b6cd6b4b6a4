"""JSON bodies cut short: serde_json says what it was parsing when the input ran out, and
where: at the input's end (the count of bytes on its last line)."""

from __future__ import annotations

import pytest

from aziot.api.body import JsonSyntaxError, parse_json


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "EOF while parsing an object at line 1 column 1"),
        (b"[", "EOF while parsing a list at line 1 column 1"),
        (b'{"keyId"', "EOF while parsing an object at line 1 column 8"),
        (b'{"keyId":', "EOF while parsing a value at line 1 column 9"),
        (b'{"keyId":"a",', "EOF while parsing a value at line 1 column 13"),
        (b'{"keyId":"a"', "EOF while parsing an object at line 1 column 12"),
        (b'{"keyId":"ab', "EOF while parsing a string at line 1 column 12"),
        (b"[1,", "EOF while parsing a value at line 1 column 3"),
        (b"[1", "EOF while parsing a list at line 1 column 2"),
        (b'{"a":[1,{"b":"x]"', "EOF while parsing an object at line 1 column 17"),
        (b"{ \n", "EOF while parsing an object at line 2 column 0"),
        (b"", "EOF while parsing a value at line 1 column 0"),
    ],
)
def test_a_body_cut_short_is_named_as_serde_names_it(raw: bytes, message: str) -> None:
    with pytest.raises(JsonSyntaxError) as caught:
        parse_json(raw)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # a second leading zero: at the digit serde peeked
        (b'{"keyId":01}', "invalid number at line 1 column 11"),
        (b'{"keyId":-01}', "invalid number at line 1 column 12"),
        # no digit after '-', '.', or the exponent: at the byte serde consumed or peeked
        (b'{"keyId":-x}', "invalid number at line 1 column 11"),
        (b'{"keyId":1.x}', "invalid number at line 1 column 12"),
        (b'{"keyId":1ex}', "invalid number at line 1 column 12"),
        (b'{"keyId":1e+x}', "invalid number at line 1 column 13"),
        (b"[1,2,3.]", "invalid number at line 1 column 8"),
        (b"01", "invalid number at line 1 column 2"),
        # the input ends inside the number
        (b'{"keyId":-', "EOF while parsing a value at line 1 column 10"),
        (b'{"keyId":1.', "EOF while parsing a value at line 1 column 11"),
        (b'{"keyId":1e+', "EOF while parsing a value at line 1 column 12"),
        # a well-formed number followed by junk is about what follows it
        (b'{"keyId":1x}', "expected `,` or `}` at line 1 column 11"),
        (b'{"keyId":+1}', "expected value at line 1 column 10"),
    ],
)
def test_malformed_numbers_are_named_as_serde_names_them(raw: bytes, message: str) -> None:
    """Positions as serde_json's parse_integer / parse_decimal / parse_exponent give them."""
    with pytest.raises(JsonSyntaxError) as caught:
        parse_json(raw)
    assert str(caught.value) == message
