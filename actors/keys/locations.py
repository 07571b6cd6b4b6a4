"""Where a key id lives: libaziot-keys' `Location::of` (api.md §3.5).

A preloaded entry pins an id to one place (`file://` path or `pkcs11:` object). Any other id may
be on the base slot's token (object label = id) and then in the key directory, in that order.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import attrs

from aziot.config.pkcs11_uri import Pkcs11Uri

from .filecrypto import bad_parameter
from .store import FileStore


@attrs.frozen
class FileLocation:
    path: Path

    def describe(self) -> str:
        return str(self.path)


@attrs.frozen
class TokenLocation:
    uri: str = attrs.field(repr=False)  # as configured, PIN included: never log it
    label: str
    token: tuple[int | None, str | None]  # (slot-id, token label): which token, for moves

    def describe(self) -> str:
        slot, token = self.token
        where = f"slot {slot}" if slot is not None else f"token {token!r}"
        return f"PKCS#11 object {self.label!r} on {where}"


Location = FileLocation | TokenLocation


def token_location(uri_text: str, label: str) -> TokenLocation:
    uri = Pkcs11Uri.parse(uri_text)
    return TokenLocation(uri_text, label, (uri.slot_id, uri.token))


@attrs.frozen
class Locator:
    """Turns key ids into their candidate locations, in the order they are tried."""

    store: FileStore
    preloaded: dict[str, str]
    pkcs11_lib_path: str | None = None
    pkcs11_base_slot: str | None = None

    @property
    def uses_token(self) -> bool:
        return self.pkcs11_lib_path is not None

    def of(self, key_id: str) -> list[Location]:
        preloaded = self.preloaded.get(key_id)
        if preloaded is not None:
            return [self._preloaded(key_id, preloaded)]
        candidates: list[Location] = []
        if self.pkcs11_lib_path and self.pkcs11_base_slot:
            candidates.append(token_location(self.pkcs11_base_slot, key_id))
        path = self.store.path_of(key_id)
        if path is not None:
            candidates.append(FileLocation(path))
        if not candidates:
            raise bad_parameter(
                "no way to create keys: neither aziot_keys.homedir_path nor a PKCS#11 base slot"
            )
        return candidates

    def _preloaded(self, key_id: str, text: str) -> Location:
        uri = urlsplit(text)
        if uri.scheme == "file":
            return FileLocation(Path(unquote(uri.path)))
        if uri.scheme == "pkcs11":
            if not self.pkcs11_lib_path:
                raise bad_parameter(
                    f"preloaded key {key_id} is in PKCS#11 "
                    "but aziot_keys.pkcs11_lib_path is not set"
                )
            parsed = Pkcs11Uri.parse(text)
            if not parsed.object_label:
                raise bad_parameter(
                    f"preloaded key {key_id}: its PKCS#11 URI names no object (object=<label>)"
                )
            return TokenLocation(text, parsed.object_label, (parsed.slot_id, parsed.token))
        raise bad_parameter(f"preloaded key {key_id} has an unsupported URI scheme {uri.scheme!r}")
