"""The keyd config: `[aziot_keys]`, `[preloaded_keys]`, `[[principal]]`, `max_requests`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import cattrs

from .loader import ConfigError, ServicePaths, load_merged
from .pkcs11_uri import Pkcs11Uri

# The names libaziot-keys accepts; any other name makes the original refuse to start.
AZIOT_KEYS_NAMES = frozenset({"homedir_path", "pkcs11_lib_path", "pkcs11_base_slot"})


@attrs.frozen
class Principal:
    uid: int
    keys: list[str] = attrs.field(factory=list)


@attrs.frozen
class Endpoints:
    aziot_keyd: str | None = None
    aziot_certd: str | None = None
    aziot_identityd: str | None = None
    aziot_tpmd: str | None = None


@attrs.frozen
class KeydConfig:
    aziot_keys: dict[str, str] = attrs.field(factory=dict)
    preloaded_keys: dict[str, str] = attrs.field(factory=dict)
    principal: list[Principal] = attrs.field(factory=list)
    endpoints: Endpoints = attrs.field(factory=Endpoints)
    max_requests: int = 10

    @property
    def homedir(self) -> Path | None:
        value = self.aziot_keys.get("homedir_path")
        return Path(value) if value else None


_converter = cattrs.Converter(forbid_extra_keys=False)


def parse_keyd(table: dict[str, Any], source: str) -> KeydConfig:
    try:
        config = _converter.structure(table, KeydConfig)
    except cattrs.ClassValidationError as error:
        details = "; ".join(cattrs.transform_error(error))
        raise ConfigError(f"{source}: {details}") from None
    unknown = sorted(set(config.aziot_keys) - AZIOT_KEYS_NAMES)
    if unknown:
        raise ConfigError(
            f"{source}: unknown [aziot_keys] names {', '.join(unknown)}; "
            f"known: {', '.join(sorted(AZIOT_KEYS_NAMES))}"
        )
    if config.max_requests < 1:
        raise ConfigError(f"{source}: max_requests must be at least 1")
    if config.homedir is None and "pkcs11_base_slot" not in config.aziot_keys:
        raise ConfigError(
            f"{source}: [aziot_keys] sets neither homedir_path nor pkcs11_base_slot, "
            "so keyd would have nowhere to keep keys"
        )
    check_pkcs11_uris(config, source)
    return config


def check_pkcs11_uris(config: KeydConfig, source: str) -> None:
    """A PKCS#11 URI keyd could never use is a start-up error, as in the original."""
    named = [("aziot_keys.pkcs11_base_slot", config.aziot_keys.get("pkcs11_base_slot"))]
    named += [
        (f"preloaded_keys.{key_id}", uri)
        for key_id, uri in config.preloaded_keys.items()
        if uri.lower().startswith("pkcs11:")
    ]
    for name, uri in named:
        if uri is None:
            continue
        try:
            Pkcs11Uri.parse(uri)
        except ValueError as error:
            raise ConfigError(f"{source}: {name}: {error}") from None


def load_keyd(paths: ServicePaths) -> KeydConfig:
    return parse_keyd(load_merged(paths), f"{paths.config_file} (+ {paths.config_dir}/*.toml)")
