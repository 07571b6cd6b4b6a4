"""Principal patterns shared by every service: `*` any run of characters, `?` exactly one.

The original matches them with the `wildmatch` crate: whole-string, case-sensitive, per Unicode
character, and never exponential. A caller chooses the id, so matching must cost time linear in
the id whatever the pattern: a regex built from `*-*-temp` backtracks, quadratically per star,
and one long id then stalls every other caller of the event loop.

Here a pattern is split at its stars into fixed-length pieces. The first piece must sit at the
start of the id and the last at its end; each piece between them is taken at its leftmost place
after the previous one. Leftmost is always right for fixed-length pieces (a later place leaves
less room to the rest, never more), so there is no backtracking at all. Pieces without `?` are
found by `str.find`; a piece with `?` by a regex without quantifiers (it only tries each
start in turn, in C), so the cost is linear in the id for a given pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class _Piece:
    """A run of literal characters and `?`, of fixed length, matched at one place of the id."""

    def __init__(self, text: str) -> None:
        self.text = text
        # Without quantifiers a regex cannot backtrack: it only tries each start in turn, in C.
        self._regex = None
        if "?" in text:
            self._regex = re.compile(
                "".join("." if c == "?" else re.escape(c) for c in text), re.DOTALL
            )

    def fits_at(self, subject: str, at: int) -> bool:
        end = at + len(self.text)
        if at < 0 or end > len(subject):
            return False
        if self._regex is None:
            return subject.startswith(self.text, at)
        return self._regex.match(subject, at, end) is not None

    def find(self, subject: str, start: int, end: int) -> int:
        """The leftmost place in subject[start:end] where the whole piece fits, or -1."""
        if self._regex is None:
            return subject.find(self.text, start, end)
        found = self._regex.search(subject, start, end)
        return -1 if found is None else found.start()


class Pattern:
    """One principal pattern, ready to match ids."""

    def __init__(self, pattern: str) -> None:
        self.text = pattern
        pieces = pattern.split("*")
        self._starless = len(pieces) == 1
        self._head = _Piece(pieces[0])
        self._tail = _Piece(pieces[-1])
        self._middle = [_Piece(p) for p in pieces[1:-1] if p]
        self._least = len(pattern) - pattern.count("*")  # the shortest id it can match

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def matches(self, subject: str) -> bool:
        if self._starless:
            return len(subject) == len(self._head.text) and self._head.fits_at(subject, 0)
        if len(subject) < self._least:
            return False
        if not self._head.fits_at(subject, 0):
            return False
        tail_at = len(subject) - len(self._tail.text)
        if not self._tail.fits_at(subject, tail_at):
            return False
        at = len(self._head.text)
        for piece in self._middle:
            found = piece.find(subject, at, tail_at)
            if found < 0:
                return False
            at = found + len(piece.text)
        return True


class Principals:
    """uid -> patterns, as `[[principal]]` tables give them (entries of one uid are merged).

    uid 0 is always allowed, as in every service of the original."""

    def __init__(self, entries: Iterable[tuple[int, Iterable[str]]]) -> None:
        merged: dict[int, list[Pattern]] = {}
        for uid, patterns in entries:
            merged.setdefault(uid, []).extend(Pattern(p) for p in patterns)
        self._patterns = merged

    def allows(self, uid: int, name: str) -> bool:
        if uid == 0:
            return True
        return any(p.matches(name) for p in self._patterns.get(uid, ()))
