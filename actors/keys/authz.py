"""Who may name which key ids: `[[principal]]` patterns with `*` and `?`, root always allowed."""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs


def wildmatch(pattern: str) -> re.Pattern[str]:
    """Compile a wildmatch pattern: `*` any run, `?` one character, the rest literal."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


@attrs.frozen
class KeyPrincipal:
    uid: int
    keys: list[str] = attrs.field(factory=list)


class KeyAuthorizer:
    def __init__(self, principals: Iterable[KeyPrincipal]) -> None:
        merged: dict[int, list[re.Pattern[str]]] = {}
        for principal in principals:
            merged.setdefault(principal.uid, []).extend(wildmatch(p) for p in principal.keys)
        self._patterns = merged

    def allows(self, uid: int, key_id: str) -> bool:
        if uid == 0:
            return True
        return any(p.fullmatch(key_id) for p in self._patterns.get(uid, ()))
