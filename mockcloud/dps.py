"""A local Device Provisioning Service double (provisioning.md §8), the register-and-poll protocol
as identityd speaks it, with enrollments configured from Python or the command line.

Routes (every one needs `?api-version=`; identityd sends `2021-06-01`):

* `PUT /{idScope}/registrations/{registrationId}/register`, body
  `{"registrationId", "payload"?, "tpm"?}` (the body's id must equal the URL's: else 400) →
  202 `{"operationId", "status": "assigning"}`;
* `GET /{idScope}/registrations/{registrationId}/operations/{operationId}` → 202
  `{"operationId", "status": "assigning", "registrationState": {"registrationId", "status"}}`
  for the first `assigning_polls` polls of an operation, then 200 with `status` `assigned` and
  `registrationState` `{registrationId, createdDateTimeUtc, assignedHub, deviceId, status,
  substatus, lastUpdatedDateTimeUtc, etag, payload?, tpm?: {authenticationKey}}`, or `failed`
  with `registrationState` `{registrationId, status, errorCode, errorMessage, …}` (a disabled
  enrollment: `status` `disabled`). An operation can be polled again and again.

Authentication, on the register PUT and on every poll:

* symmetric key: `Authorization: SharedAccessSignature sr=<scope>/registrations/<id>&…&
  skn=registration` (see `mockcloud.sas`) signed with the individual enrollment's primary or
  secondary key, or else with a symmetric group's key derived for the registration id;
* X.509: a TLS client cert with CN = registration id that is the individual enrollment's cert
  (same thumbprint) or was issued directly by an enrollment group's CA (Python 3.11's `ssl` hands
  over only the leaf, so a device cert under an intermediate needs the intermediate enrolled);
* TPM: a register PUT with `tpm: {endorsementKey, storageRootKey}` and no `Authorization` whose
  endorsement key matches a TPM enrollment → 401 `{"authenticationKey": <base64 blob>}` carrying
  a fresh 32-byte key (see `TpmBlob`); then SAS as above signed with that key. The device is
  registered in the hub with that key as its SAS key.

The individual enrollment for a registration id wins over groups (a disabled one fails the
registration even if a group would match). Unknown devices and bad tokens get 401.
Errors carry the service's body `{"errorCode", "trackingId", "message", "timestampUtc"}`;
errorCode is the HTTP status times 1000 plus a detail number, as the real service writes them
(401002 for an unauthorized device; the other detail numbers are this double's choice).

On assignment the device is put in the hub `Registry` (a `HubServer` shares it), under
`device_id` (default: the registration id) with the credentials it attested with: the SAS keys
(derived ones for a group), its cert thumbprint (individual X.509: `selfSigned`), the group CA
(`certificateAuthority`), or the TPM key.

Misbehaviours beyond the common ones (`mockcloud.service.COMMON_MODES`): `disabled` (operations
that complete fail as if the enrollment were disabled) and `switch_hub` (an assignment goes to a
hub other than the one the registration id was last assigned to, as a re-provisioning that
moves the device; substatus `deviceDataMigrated`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509

from mockcloud import ca, sas
from mockcloud.https import HttpRequest, HttpResponse
from mockcloud.hub import DeviceAuth, HubServer, Registry, new_key
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
    tracking_id,
    utc_now_iso,
)

API_VERSION = "2021-06-01"
DEFAULT_ID_SCOPE = "0ne00000001"
DEFAULT_HUB = "mockhub.azure-devices.net"
MODES = (*COMMON_MODES, "disabled", "switch_hub")

Attestation = Literal["symmetric", "x509", "tpm"]

# kind -> (errorCode, default message)
ERROR_CODES: dict[str, int] = {
    "bad_request": 400004,
    "unauthorized": 401002,
    "not_found": 404201,
    "operation_not_found": 404202,
    "method": 405000,
    "throttled": 429001,
    "error": 500000,
}
DISABLED_CODE = 401004  # in a failed registrationState: the enrollment is disabled


@dataclass(frozen=True)
class TpmChallenge:
    """What DPS knows when it answers a TPM register request with 401."""

    registration_id: str
    endorsement_key: bytes  # as the device sent it: a marshalled TPM2B_PUBLIC
    storage_root_key: bytes  # as the device sent it: a marshalled TPM2B_PUBLIC
    auth_key: bytes  # the 32-byte HMAC key DPS will verify the device's SAS tokens with


class TpmBlob(Protocol):
    """Makes the `authenticationKey` blob (raw bytes; DPS sends them base64-encoded).

    The default, `plain_auth_key`, is the key itself: enough for a TPM double whose
    `import_auth_key` keeps the bytes it is given as the HMAC key. A test against a real or
    simulated TPM must supply a function that wraps `auth_key` the way tpmd unwraps it
    (provisioning.md §8.4): five consecutive marshalled TPM2B structures, a credential blob
    (TPM2B_ID_OBJECT) and encrypted secret (TPM2B_ENCRYPTED_SECRET) made by TPM2_MakeCredential
    for `endorsement_key` with the name of the storage root key, protecting the inner wrapping
    key; the duplicate private part (TPM2B_PRIVATE) of a keyed-hash (HMAC-SHA256) object whose
    secret is `auth_key`, encrypted under that inner key; an empty seed
    (TPM2B_ENCRYPTED_SECRET); and that object's public area (TPM2B_PUBLIC). After
    ActivateCredential and Import, the TPM's HMAC-SHA256 with the key must equal
    HMAC-SHA256(`auth_key`, ·).
    """

    def __call__(self, challenge: TpmChallenge) -> bytes: ...


def plain_auth_key(challenge: TpmChallenge) -> bytes:
    return challenge.auth_key


def echo_payload(payload: Any, registration_id: str) -> Any:
    """What the original's mock-iot-server answers to a request payload (a custom allocation
    function's reply); pass as `payload_reply`."""
    return {"msg": "custom allocation payload received", "request_payload": payload}


@dataclass
class Enrollment:
    """An individual enrollment (`name` = registration id) or an enrollment group (`name` =
    group id). Keys are base64 text."""

    name: str
    attestation: Attestation
    group: bool = False
    primary_key: str | None = None  # symmetric
    secondary_key: str | None = None
    certificate: x509.Certificate | None = None  # x509: the device cert, or the group's CA
    endorsement_key: bytes | None = None  # tpm
    device_id: str | None = None  # individual only; default: the registration id
    hub: str | None = None  # default: the DPS's first hub
    enabled: bool = True

    def keys_for(self, registration_id: str) -> list[str]:
        """The keys a device with this registration id signs with (derived for a group)."""
        keys = [k for k in (self.primary_key, self.secondary_key) if k]
        if self.group:
            return [sas.derive_device_key(k, registration_id) for k in keys]
        return keys


@dataclass(frozen=True)
class Registration:
    """A device DPS has assigned."""

    registration_id: str
    enrollment: str
    group: bool
    attestation: Attestation
    assigned_hub: str
    device_id: str
    substatus: str
    created: str
    last_updated: str


@dataclass
class _Operation:
    operation_id: str
    registration_id: str
    enrollment: Enrollment  # a snapshot at register time
    payload: Any
    polls_left: int
    credentials: dict[str, Any]
    answer: dict[str, Any] | None = None


class DpsServer(MockService):
    """A DPS double on a background thread. See the module docstring.

    `hubs`: the hub names assignments go to (a sequence, or a function called at assignment
    time, e.g. a `HubServer`'s `hostnames`), default the first; `registry`: the hub registry to
    put assigned devices in; `assigning_polls`: how many polls answer `assigning` before the
    result; `payload_reply`: a function of (request payload, registration id) whose result is
    the `payload` of the assignment (None: no payload); `tpm_blob`: see `TpmBlob`.
    """

    service = "dps"
    modes = MODES

    def __init__(
        self,
        directory: Path | str,
        *,
        id_scope: str = DEFAULT_ID_SCOPE,
        host: str = "127.0.0.1",
        port: int = 0,
        hubs: Sequence[str] | Callable[[], Sequence[str]] = (DEFAULT_HUB,),
        registry: Registry | None = None,
        trust: TrustStore | None = None,
        assigning_polls: int = 0,
        payload_reply: Callable[[Any, str], Any] | None = None,
        tpm_blob: TpmBlob = plain_auth_key,
    ) -> None:
        self.id_scope = id_scope
        self._hubs = hubs
        self.registry = registry if registry is not None else Registry()
        self.assigning_polls = assigning_polls
        self.payload_reply = payload_reply
        self.tpm_blob = tpm_blob
        self._enrollments: dict[tuple[bool, str], Enrollment] = {}
        self._operations: dict[str, _Operation] = {}
        self._registrations: dict[str, Registration] = {}
        self._tpm: dict[str, TpmChallenge] = {}
        self._counter = 0
        super().__init__(directory, host=host, port=port, trust=trust)

    @classmethod
    def for_hub(cls, directory: Path | str, hub: HubServer, **kwargs: Any) -> DpsServer:
        """A DPS assigning devices to `hub`'s names, sharing its registry and trust store."""
        return cls(
            directory,
            hubs=lambda: hub.hostnames,
            registry=hub.registry,
            trust=hub.trust,
            **kwargs,
        )

    @property
    def hubs(self) -> list[str]:
        hubs = self._hubs() if callable(self._hubs) else self._hubs
        return list(hubs)

    # -- enrollments -------------------------------------------------------------------------

    def add_symmetric_enrollment(
        self,
        registration_id: str,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        device_id: str | None = None,
        hub: str | None = None,
        enabled: bool = True,
    ) -> Enrollment:
        """An individual symmetric-key enrollment (keys generated if not given)."""
        return self._add(
            Enrollment(
                registration_id,
                "symmetric",
                primary_key=primary_key or new_key(),
                secondary_key=secondary_key or new_key(),
                device_id=device_id,
                hub=hub,
                enabled=enabled,
            )
        )

    def add_symmetric_group(
        self,
        group_id: str,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        hub: str | None = None,
        enabled: bool = True,
    ) -> Enrollment:
        """A symmetric-key enrollment group; a member signs with
        `sas.derive_device_key(group key, registration id)`."""
        return self._add(
            Enrollment(
                group_id,
                "symmetric",
                group=True,
                primary_key=primary_key or new_key(),
                secondary_key=secondary_key or new_key(),
                hub=hub,
                enabled=enabled,
            )
        )

    def add_x509_enrollment(
        self,
        registration_id: str,
        cert: x509.Certificate,
        *,
        device_id: str | None = None,
        hub: str | None = None,
        enabled: bool = True,
    ) -> Enrollment:
        """An individual X.509 enrollment for this device cert (matched by thumbprint; its CN
        must be the registration id). The cert is trusted for TLS."""
        self.trust.add(cert)
        return self._add(
            Enrollment(
                registration_id,
                "x509",
                certificate=cert,
                device_id=device_id,
                hub=hub,
                enabled=enabled,
            )
        )

    def add_x509_group(
        self,
        group_id: str,
        ca_cert: x509.Certificate,
        *,
        hub: str | None = None,
        enabled: bool = True,
    ) -> Enrollment:
        """An X.509 enrollment group: devices whose cert `ca_cert` issued (CN = registration
        id). The CA is trusted for TLS."""
        self.trust.add(ca_cert)
        return self._add(
            Enrollment(group_id, "x509", group=True, certificate=ca_cert, hub=hub, enabled=enabled)
        )

    def add_x509_ca_group(
        self, group_id: str, *, hub: str | None = None, enabled: bool = True
    ) -> tuple[Enrollment, ca.CertificateAuthority]:
        """A new CA (saved as `<dir>/<group_id>-ca.pem`/`.key.pem`) and a group for it."""
        authority = ca.CertificateAuthority.root(f"mockcloud DPS group CA {group_id}")
        authority.save(self.directory, f"{_stem(group_id)}-ca")
        return self.add_x509_group(group_id, authority.cert, hub=hub, enabled=enabled), authority

    def add_tpm_enrollment(
        self,
        registration_id: str,
        endorsement_key: bytes,
        *,
        device_id: str | None = None,
        hub: str | None = None,
        enabled: bool = True,
    ) -> Enrollment:
        """An individual TPM enrollment for this endorsement key (the bytes the device sends,
        base64-decoded)."""
        return self._add(
            Enrollment(
                registration_id,
                "tpm",
                endorsement_key=endorsement_key,
                device_id=device_id,
                hub=hub,
                enabled=enabled,
            )
        )

    def set_enabled(self, name: str, enabled: bool, *, group: bool = False) -> None:
        with self._lock:
            self._enrollments[(group, name)].enabled = enabled

    def remove_enrollment(self, name: str, *, group: bool = False) -> None:
        with self._lock:
            self._enrollments.pop((group, name), None)

    @property
    def enrollments(self) -> list[Enrollment]:
        with self._lock:
            return [dataclasses.replace(e) for e in self._enrollments.values()]

    @property
    def registrations(self) -> dict[str, Registration]:
        """Assigned devices by registration id (the latest assignment)."""
        with self._lock:
            return dict(self._registrations)

    def tpm_auth_key(self, registration_id: str) -> bytes | None:
        """The key of the latest TPM challenge for `registration_id`."""
        with self._lock:
            challenge = self._tpm.get(registration_id)
            return None if challenge is None else challenge.auth_key

    def _add(self, enrollment: Enrollment) -> Enrollment:
        with self._lock:
            self._enrollments[(enrollment.group, enrollment.name)] = enrollment
        return dataclasses.replace(enrollment)

    def issue_device_cert(
        self,
        authority: ca.CertificateAuthority,
        directory: Path | str,
        registration_id: str,
        *,
        days: int = 365,
    ) -> tuple[Path, Path]:
        """A device identity for an X.509 group: `<id>.pem` (leaf, then any intermediates) and
        `<id>.key.pem` under `directory`."""
        cert, key = authority.issue_leaf(registration_id, days=days)
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        intermediates = authority.chain[:-1] if authority.parents else ()
        return (
            ca.write_certs(target / f"{_stem(registration_id)}.pem", [cert, *intermediates]),
            ca.write_key(target / f"{_stem(registration_id)}.key.pem", key),
        )

    # -- serving -----------------------------------------------------------------------------

    def _error(
        self, status: int, kind: str, message: str, retry_after: str | None = None
    ) -> HttpResponse:
        code = ERROR_CODES.get(kind, status * 1000)
        body = {
            "errorCode": code,
            "trackingId": tracking_id(),
            "message": message,
            "timestampUtc": utc_now_iso(),
        }
        headers = {} if retry_after is None else {"retry-after": retry_after}
        return json_response(status, body, **headers)

    def _answer(self, call: Call, exchange: Exchange) -> HttpResponse:
        request, path = call.request, call.path
        parts = path.split("/")[1:]
        if len(parts) < 4 or parts[1] != "registrations":
            raise self._reject(404, "not_found", f"no such resource {path!r}")
        scope, registration_id, action = parts[0], parts[2], parts[3:]
        if not call.query.get("api-version"):
            raise self._reject(400, "bad_request", "api-version is required")
        if scope != self.id_scope:
            raise self._reject(404, "not_found", f"unknown ID scope {scope!r}")
        if action == ["register"]:
            if request.method != "PUT":
                raise self._reject(405, "method", "register takes PUT")
            return self._register(request, registration_id, call.body, exchange)
        if len(action) == 2 and action[0] == "operations":
            if request.method != "GET":
                raise self._reject(405, "method", "operation status takes GET")
            return self._poll(request, registration_id, action[1], exchange)
        raise self._reject(404, "not_found", f"no such resource {path!r}")

    def _register(
        self, request: HttpRequest, registration_id: str, body: Any, exchange: Exchange
    ) -> HttpResponse:
        if not isinstance(body, dict) or body.get("registrationId") != registration_id:
            raise self._reject(
                400, "bad_request", "the body must be JSON with the URL's registrationId"
            )
        tpm = body.get("tpm")
        if tpm is not None and "authorization" not in request.headers:
            return self._tpm_challenge(registration_id, tpm, exchange)
        enrollment, credentials = self._authenticate(request, registration_id, exchange)
        with self._lock:
            self._counter += 1
            operation_id = f"{self._counter}.{secrets.token_hex(8)}.{_uuid()}"
            self._operations[operation_id] = _Operation(
                operation_id,
                registration_id,
                dataclasses.replace(enrollment),
                body.get("payload"),
                self.assigning_polls,
                credentials,
            )
        return json_response(202, {"operationId": operation_id, "status": "assigning"})

    def _tpm_challenge(self, registration_id: str, tpm: Any, exchange: Exchange) -> HttpResponse:
        try:
            ek = base64.b64decode(tpm["endorsementKey"], validate=True)
            srk = base64.b64decode(tpm["storageRootKey"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise self._reject(
                400, "bad_request", "tpm needs base64 endorsementKey and storageRootKey"
            ) from None
        with self._lock:
            enrollment = self._enrollments.get((False, registration_id))
            if (
                enrollment is None
                or enrollment.attestation != "tpm"
                or enrollment.endorsement_key != ek
            ):
                raise Rejected(
                    self._error(401, "unauthorized", "Unauthorized"),
                    "no TPM enrollment with this endorsement key",
                )
            challenge = TpmChallenge(registration_id, ek, srk, secrets.token_bytes(32))
            self._tpm[registration_id] = challenge
        exchange.auth, exchange.identity = "tpm-challenge", registration_id
        blob = self.tpm_blob(challenge)
        return json_response(401, {"authenticationKey": base64.b64encode(blob).decode()})

    def _authenticate(
        self, request: HttpRequest, registration_id: str, exchange: Exchange
    ) -> tuple[Enrollment, dict[str, Any]]:
        """The enrollment the request proves membership of, and the hub credentials that go
        with it; else 401."""
        header = request.headers.get("authorization")
        cert = request.client_cert
        with self._lock:
            individual = self._enrollments.get((False, registration_id))
            groups = [e for (group, _), e in self._enrollments.items() if group]
            challenge = self._tpm.get(registration_id)
        tpm_key = None if challenge is None else challenge.auth_key
        if header is not None:
            audience = f"{self.id_scope}/registrations/{registration_id}"
            candidates: list[tuple[Enrollment, list[str | bytes]]] = []
            if individual is not None:
                if individual.attestation == "symmetric":
                    candidates.append((individual, list(individual.keys_for(registration_id))))
                elif individual.attestation == "tpm" and tpm_key is not None:
                    candidates.append((individual, [tpm_key]))
            else:
                candidates += [
                    (g, list(g.keys_for(registration_id)))
                    for g in groups
                    if g.attestation == "symmetric"
                ]
            last: sas.SasError | None = None
            for enrollment, keys in candidates:
                try:
                    token = sas.verify(header, audience=audience, keys=keys, policy="registration")
                except sas.SasError as error:
                    last = error
                    continue
                exchange.auth, exchange.identity = "sas", registration_id
                key = next(k for k in keys if token.signed_with(k))
                return enrollment, self._sas_credentials(enrollment, registration_id, key)
            if last is None:
                try:  # still say what is wrong with the token itself
                    sas.verify(header, audience=audience, keys=[], policy="registration")
                except sas.SasError as error:
                    last = error
            raise self._unauthorized(f"SAS token refused: {last}")
        if cert is not None:
            if common_name(cert) != registration_id:
                raise self._unauthorized(
                    f"client cert CN {common_name(cert)!r} is not the registration id"
                )
            if individual is not None:
                if (
                    individual.attestation == "x509"
                    and individual.certificate is not None
                    and cert_thumbprint(cert) == cert_thumbprint(individual.certificate)
                ):
                    exchange.auth, exchange.identity = "x509", registration_id
                    return individual, {
                        "auth_type": "selfSigned",
                        "thumbprint": cert_thumbprint(cert),
                    }
                raise self._unauthorized("client cert is not the enrolled one")
            for group in groups:
                if (
                    group.attestation == "x509"
                    and group.certificate is not None
                    and issued_by(cert, group.certificate)
                ):
                    exchange.auth, exchange.identity = "x509", registration_id
                    credentials = {
                        "auth_type": "certificateAuthority",
                        "ca_cert": group.certificate,
                    }
                    return group, credentials
            raise self._unauthorized("client cert not issued by an enrollment group CA")
        raise self._unauthorized("no credentials")

    def _sas_credentials(
        self, enrollment: Enrollment, registration_id: str, key: str | bytes
    ) -> dict[str, Any]:
        if enrollment.attestation == "tpm":
            primary = base64.b64encode(key).decode() if isinstance(key, bytes) else key
            return {"auth_type": "sas", "primary_key": primary, "secondary_key": None}
        keys = enrollment.keys_for(registration_id)
        return {
            "auth_type": "sas",
            "primary_key": keys[0],
            "secondary_key": keys[1] if len(keys) > 1 else None,
        }

    def _unauthorized(self, reason: str) -> Rejected:
        return Rejected(self._error(401, "unauthorized", "Unauthorized"), reason)

    def _poll(
        self, request: HttpRequest, registration_id: str, operation_id: str, exchange: Exchange
    ) -> HttpResponse:
        self._authenticate(request, registration_id, exchange)
        with self._lock:
            operation = self._operations.get(operation_id)
            if operation is None or operation.registration_id != registration_id:
                raise self._reject(
                    404, "operation_not_found", f"operation {operation_id!r} not found"
                )
            if operation.answer is None and operation.polls_left > 0:
                operation.polls_left -= 1
                return json_response(
                    202,
                    {
                        "operationId": operation_id,
                        "status": "assigning",
                        "registrationState": {
                            "registrationId": registration_id,
                            "status": "assigning",
                        },
                    },
                )
            if operation.answer is None:
                operation.answer = self._complete(operation, exchange)
            return json_response(200, operation.answer)

    def _complete(self, operation: _Operation, exchange: Exchange) -> dict[str, Any]:
        """Decide the operation's outcome (holding the lock)."""
        enrollment, registration_id = operation.enrollment, operation.registration_id
        now = utc_now_iso()
        with self._lock:
            current = self._enrollments.get((enrollment.group, enrollment.name))
        disabled = current is None or not current.enabled or not enrollment.enabled
        if disabled or self._take("disabled", exchange):
            return {
                "operationId": operation.operation_id,
                "status": "failed",
                "registrationState": {
                    "registrationId": registration_id,
                    "createdDateTimeUtc": now,
                    "status": "disabled",
                    "errorCode": DISABLED_CODE,
                    "errorMessage": "Device enrollment is disabled.",
                    "lastUpdatedDateTimeUtc": now,
                    "etag": _uuid(),
                },
            }
        hubs = self.hubs
        previous = self._registrations.get(registration_id)
        hub = enrollment.hub or hubs[0]
        substatus = "initialAssignment"
        if previous is not None and self._take("switch_hub", exchange):
            others = [h for h in hubs if h != previous.assigned_hub]
            if not others:
                others = [f"other-{previous.assigned_hub}"]
            hub = others[0]
        if previous is not None and previous.assigned_hub != hub:
            substatus = "deviceDataMigrated"
        device_id = (None if enrollment.group else enrollment.device_id) or registration_id
        credentials = dict(operation.credentials)
        auth_type: DeviceAuth = credentials.pop("auth_type")
        self.registry.put_device(hub, device_id, auth_type=auth_type, **credentials)
        self._registrations[registration_id] = Registration(
            registration_id=registration_id,
            enrollment=enrollment.name,
            group=enrollment.group,
            attestation=enrollment.attestation,
            assigned_hub=hub,
            device_id=device_id,
            substatus=substatus,
            created=previous.created if previous is not None else now,
            last_updated=now,
        )
        state: dict[str, Any] = {
            "registrationId": registration_id,
            "createdDateTimeUtc": previous.created if previous is not None else now,
            "assignedHub": hub,
            "deviceId": device_id,
            "status": "assigned",
            "substatus": substatus,
            "lastUpdatedDateTimeUtc": now,
            "etag": _uuid(),
        }
        if enrollment.group:
            kind = "x509" if enrollment.attestation == "x509" else "symmetricKey"
            state[kind] = {"enrollmentGroupId": enrollment.name}
        if enrollment.attestation == "tpm":
            challenge = self._tpm[registration_id]
            blob = self.tpm_blob(challenge)
            state["tpm"] = {"authenticationKey": base64.b64encode(blob).decode()}
        if self.payload_reply is not None and operation.payload is not None:
            state["payload"] = self.payload_reply(operation.payload, registration_id)
        return {
            "operationId": operation.operation_id,
            "status": "assigned",
            "registrationState": state,
        }


def _uuid() -> str:
    return str(uuid.uuid4())


def _stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
