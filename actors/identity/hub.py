"""IoT Hub module identities over REST, as the original does it (spec/provisioning.md §9).
Synchronous: run it in a worker thread (see `aziot.actors.identity.cloud`).

    with CloudClient(context) as cloud:
        hub = HubClient(cloud, iothub_hostname=..., device_id=..., sign=sign,
                        local_gateway_hostname=..., timeout=..., retries=...)
        created = hub.create_module("m")                    # gets its generationId
        keys = sas_authentication(primary, secondary)       # derived by keyd (§10)
        module = hub.update_module("m", keys)
        hub.delete_module("m")

Requests go to `https://<local_gateway_hostname>` (the hub itself unless nested); SAS tokens are
always for `<iothub_hostname>/devices/<device_id>` (no `skn`), signed afresh for every attempt;
an X.509 device authenticates in the TLS handshake (`sign` None).

Errors are `CloudError`, `message` being the Hub's `Message` (or `errorMessage`), which
identityd shows as the cause (`Hub client error\\ncaused by: ErrorCode:ModuleNotFound;…`):

* 500 with a `Message` → a network error (a parent edgeHub's way to say IoT Hub is out of reach);
  a 500 with an empty or other body is invalid data, not network;
* other 4xx/5xx: an empty body → `HTTP error 404 Not Found`; else `Message`, a network error
  only when the body says `"networkError": true`;
* DELETE wants 204 exactly and never reads the body: anything else is `unexpected HTTP status
  code: 404 Not Found` (not network, even a 500).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any, Literal

import attrs

from aziot.actors.identity.cloud import (
    DEFAULT_TIMEOUT,
    CloudClient,
    CloudError,
    CloudResponse,
    check_json,
    invalid_data,
    parse,
)
from aziot.actors.identity.sas import Sign, expiry_after, hub_audience, percent_encode, sas_token

log = logging.getLogger(__name__)

API_VERSION = "api-version=2017-11-08-preview"


class ModuleFormatError(ValueError):
    """A Hub module document that is not one (missing ids, wrong types, bad base64)."""


def _opt_str(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is not None and not isinstance(value, str):
        raise ModuleFormatError(f"{name} is {type(value).__name__}, not a string")
    return value


def _opt_dict(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    value = document.get(name)
    if value is not None and not isinstance(value, dict):
        raise ModuleFormatError(f"{name} is {type(value).__name__}, not an object")
    return value


def _opt_key(document: dict[str, Any], name: str) -> bytes | None:
    value = _opt_str(document, name)
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ModuleFormatError(f"{name} is not base64") from None


def _without_none(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if v is not None}


@attrs.frozen
class SymmetricKey:
    """Module SAS keys, raw bytes (base64 in JSON)."""

    primary_key: bytes | None = attrs.field(default=None, repr=False)
    secondary_key: bytes | None = attrs.field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return _without_none(
            {
                "primaryKey": _b64(self.primary_key),
                "secondaryKey": _b64(self.secondary_key),
            }
        )

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> SymmetricKey:
        return cls(_opt_key(document, "primaryKey"), _opt_key(document, "secondaryKey"))


@attrs.frozen
class X509Thumbprint:
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _without_none(
            {
                "primaryThumbprint": self.primary_thumbprint,
                "secondaryThumbprint": self.secondary_thumbprint,
            }
        )

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> X509Thumbprint:
        return cls(
            _opt_str(document, "primaryThumbprint"), _opt_str(document, "secondaryThumbprint")
        )


@attrs.frozen
class AuthMechanism:
    """A module's `authentication`. `type`: `sas`, `x509`, `none` (what the original knows),
    or what else the Hub says (`selfSigned`, `certificateAuthority`), kept as given."""

    symmetric_key: SymmetricKey | None = None
    x509_thumbprint: X509Thumbprint | None = None
    type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _without_none(
            {
                "symmetricKey": (
                    None if self.symmetric_key is None else self.symmetric_key.to_json()
                ),
                "x509Thumbprint": (
                    None if self.x509_thumbprint is None else self.x509_thumbprint.to_json()
                ),
                "type": self.type,
            }
        )

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> AuthMechanism:
        symmetric = _opt_dict(document, "symmetricKey")
        thumbprint = _opt_dict(document, "x509Thumbprint")
        return cls(
            None if symmetric is None else SymmetricKey.from_json(symmetric),
            None if thumbprint is None else X509Thumbprint.from_json(thumbprint),
            _opt_str(document, "type"),
        )


def sas_authentication(primary_key: bytes, secondary_key: bytes) -> AuthMechanism:
    """What identityd sends in every update: both keys and `type: "sas"`."""
    return AuthMechanism(SymmetricKey(primary_key, secondary_key), None, "sas")


def derived_key_data(
    module_id: str, generation_id: str, which: Literal["primary", "secondary"]
) -> bytes:
    """The bytes keyd's `create_derived_key` HMACs with the master key for a module key (§10):
    `<module id>:<generation id>:primary` (or `secondary`), UTF-8."""
    return f"{module_id}:{generation_id}:{which}".encode()


@attrs.frozen
class Module:
    """A module identity. Optional fields are left out of the JSON when absent; unknown
    fields in the Hub's answers (etag, connectionState, …) are ignored."""

    module_id: str
    device_id: str
    managed_by: str | None = None
    generation_id: str | None = None
    authentication: AuthMechanism | None = None

    def to_json(self) -> dict[str, Any]:
        return _without_none(
            {
                "moduleId": self.module_id,
                "managedBy": self.managed_by,
                "deviceId": self.device_id,
                "generationId": self.generation_id,
                "authentication": (
                    None if self.authentication is None else self.authentication.to_json()
                ),
            }
        )

    @classmethod
    def from_json(cls, document: Any) -> Module:
        if not isinstance(document, dict):
            raise ModuleFormatError(f"a module is an object, not {type(document).__name__}")
        module_id, device_id = _opt_str(document, "moduleId"), _opt_str(document, "deviceId")
        if module_id is None or device_id is None:
            raise ModuleFormatError("a module needs moduleId and deviceId")
        authentication = _opt_dict(document, "authentication")
        return cls(
            module_id,
            device_id,
            _opt_str(document, "managedBy"),
            _opt_str(document, "generationId"),
            None if authentication is None else AuthMechanism.from_json(authentication),
        )


class HubClient:
    """Module identities of one device. `sign`: HMACs the device's SAS tokens (keyd with the
    device key, or the TPM); None for an X.509 device. `timeout`, `retries`:
    `cloud_timeout_sec`, `cloud_retries`. Token times go through `cloud.now`."""

    def __init__(
        self,
        cloud: CloudClient,
        *,
        iothub_hostname: str,
        device_id: str,
        sign: Sign | None = None,
        local_gateway_hostname: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
    ) -> None:
        self.cloud = cloud
        self.iothub_hostname = iothub_hostname
        self.device_id = device_id
        self.sign = sign
        self.local_gateway_hostname = local_gateway_hostname or iothub_hostname
        self.timeout = timeout
        self.retries = retries

    def url(self, module_id: str | None = None) -> str:
        path = f"/devices/{percent_encode(self.device_id)}/modules"
        if module_id is not None:
            path += f"/{percent_encode(module_id)}"
        return f"https://{self.local_gateway_hostname}{path}?{API_VERSION}"

    def _headers(self) -> dict[str, str]:
        if self.sign is None:
            return {}
        audience = hub_audience(self.iothub_hostname, self.device_id)
        return {"authorization": sas_token(audience, expiry_after(self.cloud.now()), self.sign)}

    def _send(
        self,
        method: str,
        module_id: str | None,
        body: Module | None = None,
        *,
        if_match: bool = False,
        read_body: bool = True,
    ) -> CloudResponse:
        def headers() -> dict[str, str]:
            attempt = self._headers()
            if if_match:
                attempt["if-match"] = "*"
            return attempt

        return self.cloud.send(
            method,
            self.url(module_id),
            body=None if body is None else body.to_json(),
            has_body=body is not None,
            headers=headers,
            timeout=self.timeout,
            retries=self.retries,
            read_body=read_body,
        )

    def list_modules(self) -> list[Module]:
        document = _parse_hub(self._send("GET", None))
        if not isinstance(document, list):
            raise CloudError(f"the Hub's module list is not a JSON array: {document!r:.200}")
        return [_module(entry) for entry in document]

    def get_module(self, module_id: str) -> Module:
        return _module(_parse_hub(self._send("GET", module_id)))

    def create_module(
        self,
        module_id: str,
        authentication: AuthMechanism | None = None,
        managed_by: str | None = None,
    ) -> Module:
        """PUT without If-Match: a module that exists is the Hub's 409."""
        body = Module(module_id, self.device_id, managed_by, None, authentication)
        return _module(_parse_hub(self._send("PUT", module_id, body)))

    def update_module(
        self,
        module_id: str,
        authentication: AuthMechanism | None = None,
        managed_by: str | None = None,
    ) -> Module:
        """PUT with `If-Match: *`: a missing module is the Hub's 404."""
        body = Module(module_id, self.device_id, managed_by, None, authentication)
        return _module(_parse_hub(self._send("PUT", module_id, body, if_match=True)))

    def delete_module(self, module_id: str) -> None:
        response = self._send("DELETE", module_id, if_match=True, read_body=False)
        if response.status != 204:
            raise CloudError(
                f"unexpected HTTP status code: {response.status_text}",
                status=response.status,
                url=response.url,
            )


def _module(document: Any) -> Module:
    try:
        return Module.from_json(document)
    except ModuleFormatError as error:
        raise CloudError(f"the Hub answered an invalid module: {error}") from None


def _hub_message(document: Any) -> str | None:
    if not isinstance(document, dict):
        return None
    message = document.get("Message", document.get("errorMessage"))
    return message if isinstance(message, str) else None


def hub_error(document: Any, response: CloudResponse) -> CloudError:
    """A 4xx/5xx body → the Hub's error: `Message` (or `errorMessage`) as the text, a network
    error when `networkError` is true; another shape is invalid data."""
    message = _hub_message(document)
    network = document.get("networkError") if isinstance(document, dict) else None
    if message is None or (network is not None and not isinstance(network, bool)):
        return invalid_data(response, "IoT Hub error body")
    return CloudError(message, status=response.status, network=network is True, url=response.url)


def _parse_hub(response: CloudResponse) -> Any:
    check_json(response)
    if response.status == 500:
        # A parent edgeHub says "IoT Hub is unreachable" with a 500.
        try:
            document = parse(response, [500], hub_error)
        except CloudError:
            raise invalid_data(response, "IoT Hub error body") from None
        message = _hub_message(document)
        if message is None:
            raise invalid_data(response, "IoT Hub error body")
        raise CloudError(message, status=500, network=True, url=response.url)
    return parse(response, [200], hub_error)


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")
