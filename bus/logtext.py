"""Caller-supplied text made safe for one log line.

Ids, paths and methods come from callers. Written raw, a `\\n` in a key id forges a second log
line, and a 1 MiB id floods the journal at every refused request. `loggable` escapes every
control character and shortens long values, saying how long they were.
"""

from __future__ import annotations

import re

MAX_LOGGED = 200  # characters of a caller's value kept in a log line

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")


def _escape(found: re.Match[str]) -> str:
    char = found[0]
    named = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if named is not None:
        return named
    return f"\\x{ord(char):02x}" if ord(char) <= 0xFF else f"\\u{ord(char):04x}"


def loggable(value: object, limit: int = MAX_LOGGED) -> str:
    """`value` as text with control characters escaped, cut to `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return _UNSAFE.sub(_escape, text[:limit]) + f"… ({len(text)} characters)"
    return _UNSAFE.sub(_escape, text)
