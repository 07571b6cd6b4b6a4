"""The texts keyd answers with, as the original words them (spec/api.md §3.2, §7)."""

from __future__ import annotations

import re

GENERIC = "a parameter has an invalid value"
INTERNAL = "internal error"
MISSING_BODY = "missing request body"
NOT_ALLOWED = "method not allowed"
NOT_FOUND = "not found"
SAME = "source and destination for move are identical"
INVALID_HANDLE = 'parameter "handle" has an invalid value\ncaused by: invalid handle'
MECHANISM = (
    'parameter "mechanism" has an invalid value\n'
    "caused by: mechanism cannot be used with this key type"
)
NOT_A_KEY = 'parameter "handle" has an invalid value\ncaused by: handle is not for a key'
NOT_A_KEY_PAIR = 'parameter "handle" has an invalid value\ncaused by: handle is not for a key pair'
NOT_DERIVED = 'parameter "handle" has an invalid value\ncaused by: handle is not for a derived key'
NESTED = (
    'parameter "handle" has an invalid value\ncaused by: '
    "nested derived keys are not supported, import the outer derived key first"
)
# serde_json ends every error with the position where it stopped.
SERDE_POSITION = re.compile(r" at line \d+ column \d+\Z")
