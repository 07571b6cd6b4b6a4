"""How a check ends: the original's six results, with a message and optional causes."""

from __future__ import annotations

from typing import Literal

import attrs

Kind = Literal["ok", "warning", "ignored", "skipped", "failed", "fatal"]


@attrs.frozen
class Outcome:
    kind: Kind
    # The first line of the text report; JSON `details` is this followed by the causes.
    message: str = ""
    causes: tuple[str, ...] = ()

    @property
    def details(self) -> list[str]:
        return [self.message, *self.causes] if self.message else list(self.causes)


OK = Outcome("ok")
IGNORED = Outcome("ignored")
SKIPPED = Outcome("skipped")


def warning(message: str, *causes: str) -> Outcome:
    return Outcome("warning", message, causes)


def failed(message: str, *causes: str) -> Outcome:
    return Outcome("failed", message, causes)


def fatal(message: str, *causes: str) -> Outcome:
    return Outcome("fatal", message, causes)


class CheckFailed(Exception):
    """Raised inside a check to end it as `failed` with this message and causes."""

    def __init__(self, message: str, *causes: str) -> None:
        super().__init__(message)
        self.message = message
        self.causes = causes

    def outcome(self) -> Outcome:
        return failed(self.message, *self.causes)


class Skip(Exception):
    """Raised inside a check whose prerequisite (an earlier check) did not succeed."""
