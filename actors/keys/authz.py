"""Who may name which key ids: `[[principal]]` patterns with `*` and `?`, root always allowed."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from aziot.actors.principals import Principals


@attrs.frozen
class KeyPrincipal:
    uid: int
    keys: list[str] = attrs.field(factory=list)


class KeyAuthorizer:
    def __init__(self, principals: Iterable[KeyPrincipal]) -> None:
        self._principals = Principals((p.uid, p.keys) for p in principals)

    def allows(self, uid: int, key_id: str) -> bool:
        return self._principals.allows(uid, key_id)
