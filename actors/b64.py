"""Base64 as the original's serde fields and key handles use it: standard alphabet, padded,
and decoded by Rust's strict engine, which refuses what Python's decoder lets through (trailing
bits set in the last symbol, so two texts for the same bytes)."""

from __future__ import annotations

import base64
import binascii


class NonCanonical(binascii.Error):
    """Valid symbols and padding, but not the one text that encodes these bytes."""


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_strict(text: str) -> bytes:
    """Decode standard padded base64; a symbol outside the alphabet or bad padding raises
    `binascii.Error`, a text that is not the canonical encoding `NonCanonical`.

    The symbols and padding are checked by binascii's strict mode in C, and canonical form by
    the last symbol's unused bits alone: re-encoding a megabyte to compare would cost as much
    again as the decoding, on the event loop."""
    raw = binascii.a2b_base64(text, strict_mode=True)
    if len(text) % 4:
        raise NonCanonical("non-canonical base64")  # padding beyond a whole quantum
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    if padding and _SYMBOL_VALUES.get(text[-1 - padding], 0xFF) & _UNUSED_BITS[padding]:
        raise NonCanonical("non-canonical base64")
    return raw


_SYMBOL_VALUES = {
    symbol: value
    for value, symbol in enumerate(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    )
}
# With one `=` the last symbol carries 4 bits of data and 2 unused, with `==` 2 and 4 unused.
_UNUSED_BITS = {1: 0b11, 2: 0b1111}
