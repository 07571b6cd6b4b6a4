"""A local IoT Hub double: the device and module identity REST calls identityd makes
(provisioning.md §9) and a telemetry endpoint that proves a SAS token good.

Routes (every one needs `?api-version=`; identityd sends `2017-11-08-preview`):

* `GET /devices/{d}/modules` → 200, JSON array of modules;
* `GET /devices/{d}/modules/{m}` → 200 module, or 404 `ModuleNotFound`;
* `PUT /devices/{d}/modules/{m}` without `If-Match` → create: 200 module (keys generated when the
  body has none), 409 `ModuleAlreadyExistsOnDevice` if it exists; with `If-Match: *` or the
  module's etag → update `authentication`/`managedBy`: 200 module, 404 if absent, 412
  `PreconditionFailed` if the etag differs. The body's `moduleId`/`deviceId`, when given, must
  match the URL (400 `ArgumentInvalid`); SAS keys must be base64 of 16 to 64 bytes;
* `DELETE /devices/{d}/modules/{m}` → 204 (an `If-Match` other than `*` must match the etag:
  412; no `If-Match` is accepted too);
* `POST /devices/{d}/messages/events` and `POST /devices/{d}/modules/{m}/messages/events` →
  204, the message kept in `messages`.

Path segments are percent-decoded. Identity routes need the device's credentials: a SAS token
for `<hub>/devices/<d>` signed with the device's primary or secondary key, or a TLS client cert
(the device's self-signed thumbprint, or CN = device id issued by the device's CA). Module
telemetry needs a token for `<hub>/devices/<d>/modules/<m>` signed with the module's key (what
the client last PUT). Errors have the real service's body shape,
`{"Message": "ErrorCode:<code>;<text>", "ExceptionMessage": "Tracking ID:…"}`, and an
`iothub-errorcode` header.

One server answers for several hub names (`hostnames`: `localhost:<port>` and
`127.0.0.1:<port>` by default), chosen by the `Host` header, each with its own devices: so DPS
can assign a device to "another hub" the client reaches on the same port. Devices live in a
`Registry` that a `DpsServer` fills when it assigns a device (or `add_device` from Python).
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from cryptography import x509

from mockcloud import sas
from mockcloud.https import HttpRequest, HttpResponse
from mockcloud.service import (
    COMMON_MODES,
    Call,
    Exchange,
    MockService,
    Rejected,
    TrustStore,
    cert_thumbprint,
    common_name,
    issued_by,
    json_response,
)

API_VERSION = "2017-11-08-preview"
DeviceAuth = Literal["sas", "selfSigned", "certificateAuthority"]

# kind -> the hub's ErrorCode name
ERROR_CODES = {
    "bad_request": "ArgumentInvalid",
    "unauthorized": "IotHubUnauthorizedAccess",
    "device_not_found": "DeviceNotFound",
    "module_not_found": "ModuleNotFound",
    "not_found": "NotFound",
    "method": "MethodNotAllowed",
    "module_exists": "ModuleAlreadyExistsOnDevice",
    "precondition": "PreconditionFailed",
    "throttled": "ThrottlingException",
    "error": "ServerError",
}


def new_key() -> str:
    """A random 32-byte key, base64: what IoT Hub generates."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _generation_id() -> str:
    # Hub generation ids are 18-digit decimal strings (a .NET tick count).
    return str(secrets.randbelow(10**17) + 6 * 10**17)


def _etag(version: int) -> str:
    return base64.b64encode(str(version).encode()).decode()


@dataclass
class Module:
    device_id: str
    module_id: str
    generation_id: str
    auth_type: str = "sas"  # "sas" | "selfSigned" | "certificateAuthority" | "none"
    primary_key: str | None = None
    secondary_key: str | None = None
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None
    managed_by: str | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return _etag(self.version)

    def to_json(self) -> dict[str, Any]:
        """As IoT Hub answers it."""
        body: dict[str, Any] = {
            "moduleId": self.module_id,
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": "Disconnected",
            "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {
                    "primaryKey": self.primary_key,
                    "secondaryKey": self.secondary_key,
                },
                "x509Thumbprint": {
                    "primaryThumbprint": self.primary_thumbprint,
                    "secondaryThumbprint": self.secondary_thumbprint,
                },
                "type": self.auth_type,
            },
        }
        if self.managed_by is not None:
            body["managedBy"] = self.managed_by
        return body


@dataclass
class Device:
    hub: str  # lower-case host[:port]
    device_id: str
    generation_id: str
    auth_type: DeviceAuth
    primary_key: str | None = None  # base64
    secondary_key: str | None = None
    thumbprint: str | None = None  # selfSigned: SHA-1 of the device cert
    ca_cert: x509.Certificate | None = None  # certificateAuthority: the CA that issued it
    status: Literal["enabled", "disabled"] = "enabled"
    modules: dict[str, Module] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    hub: str
    device_id: str
    module_id: str | None
    body: bytes
    headers: Mapping[str, str]


class Registry:
    """The devices of every hub, shared by the Hub double and DPS. Thread-safe; readers get
    copies."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._devices: dict[tuple[str, str], Device] = {}

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def put_device(
        self,
        hub: str,
        device_id: str,
        *,
        auth_type: DeviceAuth = "sas",
        primary_key: str | None = None,
        secondary_key: str | None = None,
        thumbprint: str | None = None,
        ca_cert: x509.Certificate | None = None,
    ) -> Device:
        """Create the device on `hub`, or give an existing one new credentials (its modules and
        generation id stay, as when DPS re-assigns a device to the hub it is on)."""
        if auth_type == "sas" and primary_key is None:
            primary_key, secondary_key = new_key(), new_key()
        with self._lock:
            key = (hub.lower(), device_id)
            device = self._devices.get(key)
            if device is None:
                device = Device(hub.lower(), device_id, _generation_id(), auth_type)
                self._devices[key] = device
            device.auth_type = auth_type
            device.primary_key, device.secondary_key = primary_key, secondary_key
            device.thumbprint, device.ca_cert = thumbprint, ca_cert
            return copy.deepcopy(device)

    def remove_device(self, hub: str, device_id: str) -> None:
        with self._lock:
            self._devices.pop((hub.lower(), device_id), None)

    def device(self, hub: str, device_id: str) -> Device | None:
        with self._lock:
            device = self._devices.get((hub.lower(), device_id))
            return copy.deepcopy(device)

    def devices(self, hub: str | None = None) -> list[Device]:
        with self._lock:
            return [
                copy.deepcopy(d)
                for (h, _), d in self._devices.items()
                if hub is None or h == hub.lower()
            ]

    def _live(self, hub: str, device_id: str) -> Device | None:
        """The stored device itself; hold `lock` while using it."""
        return self._devices.get((hub.lower(), device_id))


class HubServer(MockService):
    """An IoT Hub double on a background thread. See the module docstring.

    `hub_hosts`: the host parts of this server's hub names (each becomes `<host>:<port>`);
    `registry`: shared with a `DpsServer` (a new one if not given); `trust`: the TLS client cert
    trust store (shared with DPS in a `Cloud`).
    """

    service = "hub"
    modes = COMMON_MODES

    def __init__(
        self,
        directory: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hub_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        registry: Registry | None = None,
        trust: TrustStore | None = None,
    ) -> None:
        self.hub_hosts = tuple(h.lower() for h in hub_hosts)
        if not self.hub_hosts:
            raise ValueError("a hub needs at least one host name")
        self.registry = registry if registry is not None else Registry()
        self._messages: list[Message] = []
        super().__init__(directory, host=host, port=port, trust=trust, server_hosts=self.hub_hosts)

    # -- names and registry ------------------------------------------------------------------

    @property
    def hostnames(self) -> list[str]:
        """This server's hub names, `<host>:<port>`, the default first."""
        return [f"{h}:{self.port}" for h in self.hub_hosts]

    @property
    def hostname(self) -> str:
        """The default hub name (what DPS assigns unless told otherwise)."""
        return self.hostnames[0]

    def add_device(
        self,
        device_id: str,
        *,
        hub: str | None = None,
        auth_type: DeviceAuth = "sas",
        primary_key: str | None = None,
        secondary_key: str | None = None,
        cert: x509.Certificate | None = None,
    ) -> Device:
        """Register a device by hand (manual provisioning). `cert`: the device cert for
        `selfSigned` (its thumbprint is kept) or the CA for `certificateAuthority`; either is
        added to the TLS trust store."""
        thumbprint = ca_cert = None
        if cert is not None:
            self.trust.add(cert)
            if auth_type == "selfSigned":
                thumbprint = cert_thumbprint(cert)
            else:
                ca_cert = cert
        return self.registry.put_device(
            hub or self.hostname,
            device_id,
            auth_type=auth_type,
            primary_key=primary_key,
            secondary_key=secondary_key,
            thumbprint=thumbprint,
            ca_cert=ca_cert,
        )

    def device(self, device_id: str, *, hub: str | None = None) -> Device | None:
        return self.registry.device(hub or self.hostname, device_id)

    def module(self, device_id: str, module_id: str, *, hub: str | None = None) -> Module | None:
        device = self.device(device_id, hub=hub)
        return None if device is None else device.modules.get(module_id)

    @property
    def messages(self) -> list[Message]:
        """Telemetry accepted so far, oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    # -- serving -----------------------------------------------------------------------------

    def _error(
        self, status: int, kind: str, message: str, retry_after: str | None = None
    ) -> HttpResponse:
        code = ERROR_CODES.get(kind, "ServerError")
        stamp = datetime.datetime.now(datetime.UTC).strftime("%m/%d/%Y %H:%M:%S")
        body = {
            "Message": f"ErrorCode:{code};{message}",
            "ExceptionMessage": f"Tracking ID:{secrets.token_hex(16)}-G:0-TimeStamp:{stamp}",
        }
        headers = {"iothub-errorcode": code}
        if retry_after is not None:
            headers["retry-after"] = retry_after
        return json_response(status, body, **headers)

    def _hub_for(self, request: HttpRequest) -> str:
        host = request.headers.get("host", "").lower()
        names = self.hostnames
        return host if host in names else names[0]

    def _answer(self, call: Call, exchange: Exchange) -> HttpResponse:
        request, path = call.request, call.path
        parts = [unquote(p) for p in path.split("/")[1:]]
        if len(parts) < 3 or parts[0] != "devices" or not parts[1]:
            raise self._reject(404, "not_found", f"no such resource {path!r}")
        if not call.query.get("api-version"):
            raise self._reject(400, "bad_request", "api-version is required")
        hub = self._hub_for(request)
        device_id, rest = parts[1], parts[2:]
        method = request.method
        if rest == ["messages", "events"]:
            self._need(method, "POST")
            self._authenticate(request, hub, device_id, None, exchange)
            return self._telemetry(request, hub, device_id, None)
        if len(rest) == 4 and rest[0] == "modules" and rest[2:] == ["messages", "events"]:
            self._need(method, "POST")
            self._authenticate(request, hub, device_id, rest[1], exchange)
            return self._telemetry(request, hub, device_id, rest[1])
        if rest == ["modules"]:
            self._need(method, "GET")
            self._authenticate(request, hub, device_id, None, exchange)
            with self.registry.lock:
                device = self._device(hub, device_id)
                modules = [m.to_json() for m in device.modules.values()]
            return json_response(200, modules)
        if len(rest) == 2 and rest[0] == "modules" and rest[1]:
            self._need(method, "GET", "PUT", "DELETE")
            self._authenticate(request, hub, device_id, None, exchange)
            module_id = rest[1]
            if method == "GET":
                with self.registry.lock:
                    module = self._module(hub, device_id, module_id)
                    return json_response(200, module.to_json(), etag=f'"{module.etag}"')
            if method == "PUT":
                return self._put_module(request, hub, device_id, module_id, call.body)
            return self._delete_module(request, hub, device_id, module_id)
        raise self._reject(404, "not_found", f"no such resource {path!r}")

    def _need(self, method: str, *allowed: str) -> None:
        if method not in allowed:
            raise Rejected(
                self._error(405, "method", f"{method} is not allowed here"), "method not allowed"
            )

    def _device(self, hub: str, device_id: str) -> Device:
        device = self.registry._live(hub, device_id)
        if device is None:
            raise self._reject(404, "device_not_found", f"Device {device_id} not found")
        return device

    def _module(self, hub: str, device_id: str, module_id: str) -> Module:
        module = self._device(hub, device_id).modules.get(module_id)
        if module is None:
            raise self._reject(
                404, "module_not_found", f"Module {module_id} on device {device_id} not found"
            )
        return module

    def _authenticate(
        self,
        request: HttpRequest,
        hub: str,
        device_id: str,
        module_id: str | None,
        exchange: Exchange,
    ) -> None:
        """Accept the device's (or, for `module_id`, the module's) credentials, or raise 401."""
        identity = device_id if module_id is None else f"{device_id}/{module_id}"
        header = request.headers.get("authorization")
        with self.registry.lock:
            device = self.registry._live(hub, device_id)
            if header is not None:
                audience = f"{hub}/devices/{device_id}"
                keys: list[str] = []
                if device is not None and module_id is None and device.auth_type == "sas":
                    keys = [k for k in (device.primary_key, device.secondary_key) if k]
                elif device is not None and module_id is not None:
                    audience += f"/modules/{module_id}"
                    module = device.modules.get(module_id)
                    if module is not None and module.auth_type == "sas":
                        keys = [k for k in (module.primary_key, module.secondary_key) if k]
                try:
                    sas.verify(header, audience=audience, keys=keys)
                except sas.SasError as error:
                    raise self._unauthorized(f"SAS token refused: {error}") from None
                exchange.auth, exchange.identity = "sas", identity
                return
            cert = request.client_cert
            if cert is not None and device is not None and module_id is None:
                if device.auth_type == "selfSigned" and cert_thumbprint(cert) == device.thumbprint:
                    exchange.auth, exchange.identity = "x509", identity
                    return
                if (
                    device.auth_type == "certificateAuthority"
                    and device.ca_cert is not None
                    and common_name(cert) == device_id
                    and issued_by(cert, device.ca_cert)
                ):
                    exchange.auth, exchange.identity = "x509", identity
                    return
                raise self._unauthorized("client certificate does not identify the device")
        raise self._unauthorized("no credentials")

    def _unauthorized(self, reason: str) -> Rejected:
        return Rejected(self._error(401, "unauthorized", "Unauthorized"), reason)

    def _put_module(
        self, request: HttpRequest, hub: str, device_id: str, module_id: str, body: Any
    ) -> HttpResponse:
        if not isinstance(body, dict):
            raise self._reject(400, "bad_request", "the body must be a JSON module object")
        for name, expected in (("moduleId", module_id), ("deviceId", device_id)):
            if name in body and body[name] != expected:
                raise self._reject(
                    400, "bad_request", f"{name} {body[name]!r} in the body does not match the URI"
                )
        auth = body.get("authentication")
        auth_type, keys, thumbprints = self._module_auth(auth)
        if_match = request.headers.get("if-match")
        with self.registry.lock:
            device = self._device(hub, device_id)
            module = device.modules.get(module_id)
            if if_match is None:
                if module is not None:
                    raise self._reject(
                        409,
                        "module_exists",
                        f"Module {module_id} already exists on device {device_id}",
                    )
                if auth_type == "sas" and keys == (None, None):
                    keys = (new_key(), new_key())
                module = Module(device_id, module_id, _generation_id(), auth_type)
                device.modules[module_id] = module
            else:
                if module is None:
                    raise self._reject(
                        404,
                        "module_not_found",
                        f"Module {module_id} on device {device_id} not found",
                    )
                if if_match.strip() != "*" and if_match.strip().strip('"') != module.etag:
                    raise self._reject(412, "precondition", "Precondition failed: etag mismatch")
                if auth_type == "sas" and keys == (None, None):
                    keys = (module.primary_key, module.secondary_key)
                module.auth_type = auth_type
                module.version += 1
            module.primary_key, module.secondary_key = keys
            module.primary_thumbprint, module.secondary_thumbprint = thumbprints
            if "managedBy" in body:
                module.managed_by = body["managedBy"]
            return json_response(200, module.to_json(), etag=f'"{module.etag}"')

    def _module_auth(
        self, auth: Any
    ) -> tuple[str, tuple[str | None, str | None], tuple[str | None, str | None]]:
        if auth is None:
            return "sas", (None, None), (None, None)
        if not isinstance(auth, dict):
            raise self._reject(400, "bad_request", "authentication must be an object")
        auth_type = auth.get("type", "sas")
        if auth_type not in ("sas", "selfSigned", "certificateAuthority", "none"):
            raise self._reject(400, "bad_request", f"unknown authentication type {auth_type!r}")
        symmetric = auth.get("symmetricKey") or {}
        keys = (symmetric.get("primaryKey"), symmetric.get("secondaryKey"))
        for key in keys:
            if key is None:
                continue
            try:
                raw = base64.b64decode(key, validate=True)
            except (binascii.Error, TypeError):
                raw = b""
            if not 16 <= len(raw) <= 64:
                raise self._reject(
                    400, "bad_request", "symmetric keys must be base64 of 16 to 64 bytes"
                )
        thumbs = auth.get("x509Thumbprint") or {}
        return (
            auth_type,
            keys,
            (thumbs.get("primaryThumbprint"), thumbs.get("secondaryThumbprint")),
        )

    def _delete_module(
        self, request: HttpRequest, hub: str, device_id: str, module_id: str
    ) -> HttpResponse:
        if_match = request.headers.get("if-match")
        with self.registry.lock:
            device = self._device(hub, device_id)
            module = self._module(hub, device_id, module_id)
            if if_match is not None and if_match.strip().strip('"') not in ("*", module.etag):
                raise self._reject(412, "precondition", "Precondition failed: etag mismatch")
            del device.modules[module_id]
        return HttpResponse(204)

    def _telemetry(
        self, request: HttpRequest, hub: str, device_id: str, module_id: str | None
    ) -> HttpResponse:
        message = Message(hub, device_id, module_id, request.body, request.headers)
        with self._lock:
            self._messages.append(message)
        return HttpResponse(204)


def module_json_keys(answer: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(primaryKey, secondaryKey) of a module as the Hub answers it."""
    symmetric = answer.get("authentication", {}).get("symmetricKey", {})
    return symmetric.get("primaryKey"), symmetric.get("secondaryKey")
