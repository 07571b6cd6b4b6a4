"""Strings as the original's error texts show them: Rust's `{:?}` (Debug) formatting."""

from __future__ import annotations

import unicodedata

_RUST_ESCAPES = {"\0": "\\0", "\t": "\\t", "\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
# Characters Rust's Debug shows as \u{..}: controls, format, separators, private use, unassigned.
_RUST_UNPRINTABLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn", "Cs"})
# str's Debug also escapes Grapheme_Extend characters (combining marks), which would otherwise
# join the quote before them: the general categories Mn and Me, and Other_Grapheme_Extend's
# few characters of other categories (those Python's unicodedata can tell apart).
_GRAPHEME_EXTEND = frozenset({"Mn", "Me"})
_OTHER_GRAPHEME_EXTEND = frozenset(
    "\u09be\u09d7\u0b3e\u0b57\u0bbe\u0bd7\u0cc2\u0cd5\u0cd6\u0d3e\u0d57\u0dcf\u0ddf"
    "\u1b35\u200c\u302e\u302f\uff9e\uff9f"
)


def rust_debug(text: str) -> str:
    """A string as Rust's `{:?}` shows it: quoted, with quotes, backslashes and unprintables
    escaped."""
    out = []
    for char in text:
        escaped = _RUST_ESCAPES.get(char)
        if escaped is not None:
            out.append(escaped)
        elif char != " " and (
            (category := unicodedata.category(char)) in _RUST_UNPRINTABLE
            or category in _GRAPHEME_EXTEND
            or char in _OTHER_GRAPHEME_EXTEND
        ):
            out.append(f"\\u{{{ord(char):x}}}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
