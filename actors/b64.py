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
    `binascii.Error`, a text that is not the canonical encoding `NonCanonical`."""
    raw = base64.b64decode(text, validate=True)
    if base64.b64encode(raw).decode("ascii") != text:
        raise NonCanonical("non-canonical base64")
    return raw
