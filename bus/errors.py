"""Typed errors that cross the bus.

A handler raises `BusError(kind, message)`; the bus carries `[kind, message]` back to the caller,
where the same exception is raised again. The façade maps kinds to HTTP statuses, so the message
of an `invalid` or `unauthorized` error is exactly what the HTTP client reads.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class BusError(Exception):
    """An error reply: a kind the caller can act on and a message a person can read."""

    def __init__(self, kind: ErrorKind | str, message: str, code: str = "") -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        # A machine-readable refinement of `kind` for the calling actor (never shown to clients).
        self.code = code

    def __repr__(self) -> str:
        return f"BusError({self.kind.value!r}, {self.message!r}, {self.code!r})"

    def to_wire(self) -> list[str]:
        return [self.kind.value, self.message, self.code]

    @classmethod
    def from_wire(cls, wire: list[str]) -> BusError:
        kind, message, *rest = wire
        code = rest[0] if rest else ""
        try:
            return cls(kind, message, code)
        except ValueError:
            return cls(ErrorKind.INTERNAL, f"unknown error kind {kind!r}: {message}")


def invalid(message: str) -> BusError:
    return BusError(ErrorKind.INVALID, message)


def internal(message: str) -> BusError:
    return BusError(ErrorKind.INTERNAL, message)


def unauthorized(message: str) -> BusError:
    return BusError(ErrorKind.UNAUTHORIZED, message)
