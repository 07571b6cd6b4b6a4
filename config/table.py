"""Read a parsed TOML table key by key, so that every refusal names the file, line and key.

`Table` remembers which keys were taken, so that what is left (a misspelt or unknown key) can
be refused with `refuse_others`. Errors are `ConfigError`s of the form

    /etc/aziot/config.toml:12: provisioning.attestation.registration_id: expected a string,
    found an integer

A `Table` is read against where its data came from:

- `Source`: one file's name and text. tomli keeps no positions, so the line is found by
  scanning the text for the table headers and keys (best effort: a key the scan cannot place is
  given the line of its nearest table, or none). A table named only as part of a dotted name
  (`[cert_issuance.est]` makes `cert_issuance`) has the line of the first such name. Arrays
  of tables are counted, so `principal[1].uid` is found under the second `[[principal]]`. A
  `Source` with no text (a table that was never a file, or whose text the caller does not
  have) names only the file.
- `MergedSource`: a service config as aziotd loads it, the base file merged with its
  `config.d/*.toml` drop-ins (as `loader.merge` merges them). Each key is traced to the file
  that gave its value (the last one to set it), and its line is looked up in that file. The
  error names the key by its merged path and the place by that file's own: `principal[2]`,
  appended by a drop-in that holds only one `[[principal]]`, is that drop-in's line of it. A
  key that is in no file (a missing one) is placed at its nearest table that is, in the file
  that gave that table; with no such table, at the config as a whole (`config.toml (missing)`,
  the one file there is, or `config.toml (+ config.d/*.toml)`). A file's text is read only
  when an error needs a line from it (best effort: a file changed since it was parsed gives
  a wrong or no line, never a wrong file or key).

`parse_certd`, `parse_identityd` and `parse_tpmd` also take a plain file name (what `aziotctl`
passes for the configs it renders): errors then name the file and key, without a line.

All four config models (super-config, certd, identityd, tpmd) read through this module.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .loader import ConfigError, ServicePaths, merge, read_toml, type_name

_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY_PART = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGNMENT = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_DOTTED_KEY})\s*=")


def _split_key(text: str) -> list[str]:
    parts = re.findall(_KEY_PART, text)
    return [part[1:-1] if part[:1] in "\"'" else part for part in parts]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _extend(path: str, dotted_key: str) -> str:
    for part in _split_key(dotted_key):
        path = _join(path, part)
    return path


def _parent(path: str) -> str:
    """`a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> ``."""
    cut = max(path.rfind("."), path.rfind("["))
    return path[:cut] if cut > 0 else ""


def _error(where: str, path: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


class Source:
    """A config file's name and text, and the line each dotted key path starts on."""

    def __init__(self, name: str, text: str = "") -> None:
        self.name = name
        self._lines: dict[str, int] = {}
        # Tables only implied by a dotted name (`[a.b]` makes `a`): their first such line.
        self._implied: dict[str, int] = {}
        arrays: dict[str, int] = {}  # array-of-tables path -> how many elements so far
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                table = self._table_path(header.group(1) == "[[", header.group(2), arrays)
                self._lines.setdefault(table, number)
                self._imply_parents(table, number)
                continue
            assignment = _ASSIGNMENT.match(line)
            if not assignment:
                continue
            path = _extend(table, assignment.group(1))
            self._lines.setdefault(path, number)
            self._imply_parents(path, number)
            # Keys of an inline table on the same line (`pk = { uri = "…" }`).
            rest = line[assignment.end() :]
            for inner in _INLINE_KEY.finditer(rest):
                self._lines.setdefault(_extend(path, inner.group(1)), number)

    def _imply_parents(self, path: str, number: int) -> None:
        parent = _parent(path)
        while parent:
            self._implied.setdefault(parent, number)
            parent = _parent(parent)

    @staticmethod
    def _table_path(is_array: bool, key: str, arrays: dict[str, int]) -> str:
        """A header's path with the index of each array of tables it is in (or appends to)."""
        parts = _split_key(key)
        path = ""
        for position, part in enumerate(parts):
            path = _join(path, part)
            if is_array and position == len(parts) - 1:
                count = arrays.get(path, 0)
                arrays[path] = count + 1
                path = f"{path}[{count}]"
            elif path in arrays:
                path = f"{path}[{arrays[path] - 1}]"
        return path

    def line(self, path: str) -> int | None:
        """The line of `path` (its own header or key, else the first dotted name implying it),
        else of its nearest enclosing table that the scan found."""
        while path:
            if path in self._lines:
                return self._lines[path]
            if path in self._implied:
                return self._implied[path]
            path = _parent(path)
        return None

    def where(self, path: str) -> str:
        """`file:line` of `path`, or the file alone when no line is known."""
        line = self.line(path)
        return f"{self.name}:{line}" if line is not None else self.name

    def position(self, path: str) -> tuple[int, int]:
        """A sort key: where `path` stands in the text."""
        return (0, self.line(path) or 0)

    def error(self, path: str, message: str) -> ConfigError:
        return _error(self.where(path), path, message)


class MergedSource:
    """Files merged in order as `loader.merge` merges them; each key traced to its file.

    `data` is the merged table. `origin(path)` is the file that gave `path` its value and the
    path it has in that file (an array element's index counts from that file's first).
    """

    def __init__(self, name: str, files: Sequence[tuple[Path, dict[str, Any]]]) -> None:
        self.name = name
        self.files = [path for path, _ in files]
        self._origins: dict[str, tuple[int, str]] = {}
        self._sources: dict[int, Source] = {}
        merged: dict[str, Any] = {}
        for index, (_, table) in enumerate(files):
            self._note(merged, table, index, "", "")
            merged = merge(merged, table)
        self.data = merged

    def _note(
        self, before: dict[str, Any], overlay: dict[str, Any], file: int, path: str, local: str
    ) -> None:
        for key, value in overlay.items():
            where, here = _join(path, key), _join(local, key)
            old = before.get(key)
            if isinstance(old, dict) and isinstance(value, dict):
                self._note(old, value, file, where, here)
                continue
            self._origins[where] = (file, here)
            if isinstance(value, dict):
                self._note({}, value, file, where, here)
            elif isinstance(value, list):
                offset = len(old) if isinstance(old, list) else 0
                for index, item in enumerate(value):
                    element, local_element = f"{where}[{offset + index}]", f"{here}[{index}]"
                    self._origins[element] = (file, local_element)
                    if isinstance(item, dict):
                        self._note({}, item, file, element, local_element)

    def origin(self, path: str) -> tuple[int, str] | None:
        """The index of the file `path` (or its nearest table that a file had) came from, and
        the path it has there."""
        rest = ""
        while path:
            if path in self._origins:
                file, local = self._origins[path]
                return file, local + rest
            cut = _parent(path)
            rest = path[len(cut) :] + rest
            path = cut
        return None

    def _source(self, file: int) -> Source:
        if file not in self._sources:
            path = self.files[file]
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""  # the line is a help; the file and key are still named
            self._sources[file] = Source(str(path), text)
        return self._sources[file]

    def where(self, path: str) -> str:
        origin = self.origin(path)
        if origin is None:
            return self.name
        file, local = origin
        return self._source(file).where(local)

    def position(self, path: str) -> tuple[int, int]:
        origin = self.origin(path)
        if origin is None:
            return (-1, 0)
        file, local = origin
        return (file, self._source(file).line(local) or 0)

    def error(self, path: str, message: str) -> ConfigError:
        return _error(self.where(path), path, message)


def load_merged_source(paths: ServicePaths) -> MergedSource:
    """A service's base file and `config.d/*.toml`, merged as `loader.load_merged` does."""
    files = [paths.config_file] if paths.config_file.is_file() else []
    if paths.config_dir.is_dir():
        files += sorted(
            path for path in paths.config_dir.iterdir() if path.suffix == ".toml" and path.is_file()
        )
    if not files:
        name = f"{paths.config_file} (missing)"
    elif len(files) == 1:
        name = str(files[0])
    else:
        name = f"{paths.config_file} (+ {paths.config_dir}/*.toml)"
    return MergedSource(name, [(path, read_toml(path)) for path in files])


Locator = Source | MergedSource


def locator(source: str | Locator) -> Locator:
    """A file name alone (a table the caller has no text for) names just the file."""
    return Source(source) if isinstance(source, str) else source


class Table:
    """A TOML table being read; `where` is its dotted path ("" for the top level)."""

    def __init__(self, data: Any, where: str, source: Locator) -> None:
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

    def integer(
        self, key: str, low: int | None = None, high: int | None = None, what: str = "an integer"
    ) -> int | None:
        """An integer in [low, high] (either bound may be open); `what` is what a value of
        another type is told was expected."""
        value: int | None = self._get(key, (int,), what)
        if value is None:
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                bound = f"at least {low}"
            elif low is None:
                bound = f"at most {high}"
            else:
                bound = f"from {low} to {high}"
            raise self.error(key, f"{value} is out of range (expected an integer {bound})")
        return value

    def required_integer(self, key: str, low: int | None = None, high: int | None = None) -> int:
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

    def refuse_others(
        self, known: Sequence[str], condition: str = "", *, suggest: bool = False
    ) -> None:
        """Refuse every key not taken, naming the first in the file and what is known here
        (under `condition`, e.g. 'for method = "est"', when what is known depends on it).

        With `suggest`, the known key closest to the first (if any is close) is offered, for
        a table whose known list is too long to scan by eye."""
        unknown = sorted(set(self.data) - self._taken)
        if unknown:
            first = min(unknown, key=lambda key: self.source.position(self.name(key)))
            others = [self.name(key) for key in unknown if key != first]
            also = f" (and {', '.join(others)})" if others else ""
            when = f" ({condition})" if condition else ""
            hint = ""
            if suggest:
                close = _closest(first, known)
                hint = f" (did you mean {close}?)" if close is not None else ""
            raise self.source.error(
                self.name(first),
                f"unknown key{also}, misspelt or not used here{hint}; "
                f"known here{when}: {', '.join(known) or 'none'}",
            )


def _closest(key: str, known: Sequence[str]) -> str | None:
    """The known name `key` most likely misspells (case aside), or None when none is close."""
    by_lower = {name.lower(): name for name in known}
    matches = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.75)
    return by_lower[matches[0]] if matches else None
