"""Read a parsed TOML table key by key, so that every refusal names the file, line and key.

`Table` remembers which keys were taken, so that what is left (a misspelt or unknown key) can
be refused with `refuse_others`. Errors are `ConfigError`s of the form

    /etc/aziot/config.toml:12: provisioning.attestation.registration_id: expected a string,
    found an integer

`Source` knows the file's name and text; tomli keeps no positions, so the line is found by
scanning the text for the table header and key (best effort: a key the scan cannot place is
given the line of its nearest table, or none).

certd, identityd and tpmd each still carry a private reader of their own; this one is meant to
replace them.
"""

from __future__ import annotations

import re
from typing import Any

from .loader import ConfigError, type_name

_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY_PART = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGNMENT = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_DOTTED_KEY})\s*=")


def _split_key(text: str) -> list[str]:
    parts = re.findall(_KEY_PART, text)
    return [part[1:-1] if part[:1] in "\"'" else part for part in parts]


class Source:
    """A config file's name and text, and the line each dotted key path starts on."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self._lines: dict[str, int] = {}
        table: list[str] = []
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                table = _split_key(header.group(1))
                self._lines.setdefault(".".join(table), number)
                continue
            assignment = _ASSIGNMENT.match(line)
            if not assignment:
                continue
            path = table + _split_key(assignment.group(1))
            self._lines.setdefault(".".join(path), number)
            # Keys of an inline table on the same line (`pk = { uri = "…" }`).
            rest = line[assignment.end() :]
            for inner in _INLINE_KEY.finditer(rest):
                self._lines.setdefault(".".join(path + _split_key(inner.group(1))), number)

    def line(self, path: str) -> int | None:
        """The line of `path`, else of its nearest enclosing table that the scan found."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path.rpartition(".")[0]
        return None

    def error(self, path: str, message: str) -> ConfigError:
        line = self.line(path)
        where = f"{self.name}:{line}" if line is not None else self.name
        return ConfigError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


class Table:
    """A TOML table being read; `where` is its dotted path ("" for the top level)."""

    def __init__(self, data: Any, where: str, source: Source) -> None:
        self.where = where
        self.source = source
        if not isinstance(data, dict):
            raise source.error(where, f"expected a table, found {type_name(data)}")
        self.data: dict[str, Any] = data
        self._taken: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str | None, message: str) -> ConfigError:
        """An error about `key` of this table (or the table itself when `key` is None)."""
        return self.source.error(self.where if key is None else self.name(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def take(self, key: str) -> Any:
        """The raw value (None when absent), marked as known."""
        self._taken.add(key)
        return self.data.get(key)

    def _get(self, key: str, kinds: tuple[type, ...], expected: str) -> Any:
        value = self.take(key)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise self.error(key, f"expected {expected}, found {type_name(value)}")
        return value

    def _required(self, key: str, value: Any, what: str) -> Any:
        if value is None:
            raise self.error(key, f"is missing: expected {what}")
        return value

    def string(self, key: str) -> str | None:
        value: str | None = self._get(key, (str,), "a string")
        return value

    def required_string(self, key: str, what: str = "a string") -> str:
        value: str = self._required(key, self.string(key), what)
        if not value:
            raise self.error(key, f"is empty: expected {what}")
        return value

    def integer(self, key: str, low: int, high: int | None = None) -> int | None:
        value: int | None = self._get(key, (int,), "an integer")
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"at least {low}" if high is None else f"from {low} to {high}"
            raise self.error(key, f"{value} is out of range (expected an integer {bound})")
        return value

    def required_integer(self, key: str, low: int, high: int | None = None) -> int:
        value: int = self._required(key, self.integer(key, low, high), "an integer")
        return value

    def boolean(self, key: str) -> bool | None:
        value: bool | None = self._get(key, (bool,), "true or false")
        return value

    def required_boolean(self, key: str) -> bool:
        value: bool = self._required(key, self.boolean(key), "true or false")
        return value

    def table(self, key: str) -> Table | None:
        value = self._get(key, (dict,), "a table")
        return None if value is None else Table(value, self.name(key), self.source)

    def required_table(self, key: str, what: str = "a table") -> Table:
        table = self.table(key)
        if table is None:
            raise self.error(key, f"is missing: expected {what}")
        return table

    def strings(self, key: str) -> list[str] | None:
        value = self._get(key, (list,), "an array of strings")
        if value is None:
            return None
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(
                    key, f"expected an array of strings, found {type_name(item)} at [{index}]"
                )
        return list(value)

    def string_map(self, key: str) -> dict[str, str]:
        """A table whose every value is a string (`[aziot_keys]`); {} when absent."""
        table = self.table(key)
        if table is None:
            return {}
        for name in table.data:
            table.required_string(name)
        return dict(table.data)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.string(key)
        if value not in choices:
            expected = ", ".join(repr(choice) for choice in choices)
            if value is None:
                raise self.error(key, f"is missing: expected one of {expected}")
            raise self.error(key, f"expected one of {expected}, found {value!r}")
        return value

    def refuse_others(self, known: tuple[str, ...] | list[str]) -> None:
        """Refuse every key not taken, naming the first in the file and what is known here."""
        unknown = sorted(set(self.data) - self._taken)
        if unknown:
            first = min(unknown, key=lambda key: self.source.line(self.name(key)) or 0)
            others = [self.name(key) for key in unknown if key != first]
            also = f" (and {', '.join(others)})" if others else ""
            raise self.source.error(
                self.name(first),
                f"unknown key{also}, misspelt or not used here; "
                f"known here: {', '.join(known) or 'none'}",
            )
