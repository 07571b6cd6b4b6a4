"""Read a service's config as the original does: a base file merged with `config.d/*.toml`.

A missing base file is an empty table. Files in the directory are merged in sorted order:
tables merge recursively, arrays concatenate (so `[[principal]]` files accumulate), and any
other value replaces the earlier one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import tomli


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the problem."""


@attrs.frozen
class ServicePaths:
    """Where one service's config lives, from the environment or the original's defaults."""

    name: str  # "keyd", "certd", "identityd", "tpmd"
    config_file: Path
    config_dir: Path

    @classmethod
    def from_env(cls, name: str, environ: dict[str, str] | None = None) -> ServicePaths:
        environ = os.environ if environ is None else environ
        upper = name.upper()
        return cls(
            name,
            Path(environ.get(f"AZIOT_{upper}_CONFIG", f"/etc/aziot/{name}/config.toml")),
            Path(environ.get(f"AZIOT_{upper}_CONFIG_DIR", f"/etc/aziot/{name}/config.d")),
        )

    def configured(self) -> bool:
        """The base file exists, or a `*.toml` drop-in does."""
        if self.config_file.is_file():
            return True
        try:
            return any(
                path.suffix == ".toml" and path.is_file() for path in self.config_dir.iterdir()
            )
        except OSError:
            return False


def type_name(value: Any) -> str:
    """A TOML value's kind as config errors name it ("found an integer")."""
    if isinstance(value, bool):
        return "a boolean"
    return {
        str: "a string",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }.get(type(value), f"a {type(value).__name__}")


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            merged[key] = old + value
        else:
            merged[key] = value
    return merged


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomli.load(file)
    except tomli.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except PermissionError:
        raise ConfigError(
            f"{path}: permission denied for uid {os.geteuid()}; the file must be readable by it"
        ) from None


def load_merged(paths: ServicePaths) -> dict[str, Any]:
    table = read_toml(paths.config_file) if paths.config_file.is_file() else {}
    if paths.config_dir.is_dir():
        for path in sorted(paths.config_dir.iterdir()):
            if path.suffix == ".toml" and path.is_file():
                table = merge(table, read_toml(path))
    return table
