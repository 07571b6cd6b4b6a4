"""What the three fuzzers of the services' request handling (`test_fuzz.py` for keyd,
`test_fuzz_certd.py`, `test_fuzz_identityd.py`) share: the query decoding their models use,
the check every answer's head passes, and the exceptions and markers of their judges."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from hypothesis import event
from hypothesis.errors import InvalidArgument

from tests import rawhttp


class Answered(Exception):
    """The model decided the outcome deep inside a handler."""

    def __init__(self, expect: Any) -> None:
        super().__init__(expect)
        self.expect = expect


class Unmodelled(Exception):
    """The model cannot judge this example honestly; it is dropped."""


def percent_decode(text: str) -> bytes:
    out = bytearray()
    raw = text.encode("utf-8")
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"%" and re.fullmatch(rb"[0-9A-Fa-f]{2}", raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def form_decode(text: str) -> str:
    return percent_decode(text.replace("+", " ")).decode("utf-8", "replace")


def check_head(reply: rawhttp.Reply) -> None:
    """Status line and headers in the first read, in under 512 bytes (spec §1.6)."""
    end = reply.first_read.find(b"\r\n\r\n")
    assert end >= 0, f"head not in the first read: {reply.first_read!r}"
    assert end + 4 < 512, f"head is {end + 4} bytes"
    assert reply.first_read.startswith(f"HTTP/1.1 {reply.status} ".encode())


def quiet_event(text: str) -> None:
    """`event()`, also usable from the pinned tests, which run outside Hypothesis."""
    with contextlib.suppress(InvalidArgument):
        event(text)
