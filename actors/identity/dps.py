"""DPS registration as the original does it (spec/provisioning.md §8): register, then poll the
operation every 5 s until it is assigned or failed. Synchronous: run it in a worker thread
(see `aziot.actors.identity.cloud`).

    with CloudClient(context) as cloud:
        dps = DpsClient(cloud, scope_id=..., registration_id=..., endpoint=global_endpoint,
                        timeout=cloud_timeout_sec, retries=cloud_retries)
        assignment = dps.register(sign)                     # symmetric key: keyd HMAC
        assignment = dps.register()                         # X.509: the context's client cert
        blob = dps.tpm_challenge(ek, srk)                   # TPM, step 1 (expects 401) …
        assignment = dps.register(tpm_sign)                 # … then SAS signed in the TPM

Credentials: symmetric key and TPM sign SAS tokens (`skn=registration`); X.509 authenticates
in the TLS handshake, so `sign` is None and the `CloudClient`'s context carries the cert.

Beyond the original: the original signs one token per registration round and reuses it for
every poll, so a registration that takes longer than 30 s fails with 401; here a token that
would expire within `TOKEN_REFRESH_MARGIN` seconds is replaced before the next request.
A status other than `assigned`, `assigning` or `failed` is an error, as in the original; an
`assigning` answer without `registrationState` is still waited on (the original would fail).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

from aziot.actors.identity.cloud import (
    DEFAULT_TIMEOUT,
    CloudClient,
    CloudError,
    CloudResponse,
    check_json,
    invalid_data,
    parse,
    shown,
)
from aziot.actors.identity.sas import (
    DPS_POLICY,
    Sign,
    dps_audience,
    expiry_after,
    path_encode,
    sas_token,
)

log = logging.getLogger(__name__)

API_VERSION = "api-version=2021-06-01"
DEFAULT_ENDPOINT = "https://global.azure-devices-provisioning.net"
POLL_PERIOD = 5.0  # seconds before the first status request and between them
STATUS_TIMEOUT = 30.0  # seconds per status request (the original's fixed value)
TOKEN_REFRESH_MARGIN = 5.0  # seconds: a token closer than this to its expiry is replaced


class DpsNotSupportedInNestedMode(Exception):
    """DPS provisioning was asked for with a `local_gateway_hostname` (§8.7)."""

    def __init__(self) -> None:
        super().__init__("DPS provisioning is not supported in nested mode")


class _NoPayload:
    """No payload is configured: the request has no `payload` field. Distinct from None, which
    is a payload file holding JSON `null` and is sent as `"payload": null`, as the original
    sends it (its `Some(Value::Null)` is not skipped)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_PAYLOAD"


NO_PAYLOAD: Any = _NoPayload()


def refuse_nested(local_gateway_hostname: str | None) -> None:
    """Raise `DpsNotSupportedInNestedMode` when a local gateway is configured."""
    if local_gateway_hostname is not None:
        raise DpsNotSupportedInNestedMode()


@attrs.frozen
class DpsAssignment:
    """What DPS assigned. `payload`: the assignment's `payload`, if any (the original parses
    and drops it). `authentication_key`: a TPM enrollment's `registrationState.tpm.
    authenticationKey`, decoded: import it into the TPM (replacing the previous auth key)."""

    assigned_hub: str
    device_id: str
    payload: Any = None
    authentication_key: bytes | None = attrs.field(default=None, repr=False)
    operation_id: str = ""


class DpsClient:
    """Registers one registration id in one ID scope. `endpoint`: `global_endpoint` (its path,
    query and fragment are dropped; scheme, host and port kept). `timeout` and `retries`:
    `cloud_timeout_sec` and `cloud_retries` for the register requests; status polls use
    30 s and no transport retries. `poll_period`: seconds between polls (sleeps go through
    `cloud.sleep`; token times through `cloud.now`)."""

    def __init__(
        self,
        cloud: CloudClient,
        *,
        scope_id: str,
        registration_id: str,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
        poll_period: float = POLL_PERIOD,
    ) -> None:
        self.cloud = cloud
        self.scope_id = scope_id
        self.registration_id = registration_id
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.poll_period = poll_period
        split = urlsplit(endpoint)
        if not split.scheme or not split.hostname:
            raise ValueError(f"DPS endpoint {endpoint!r} is not an absolute URL")
        self._origin = (split.scheme, split.netloc.rpartition("@")[2])

    # -- URLs --------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        scheme, netloc = self._origin
        return urlunsplit((scheme, netloc, "/" + path_encode(path), API_VERSION, ""))

    @property
    def register_url(self) -> str:
        return self._url(f"{self.scope_id}/registrations/{self.registration_id}/register")

    def status_url(self, operation_id: str) -> str:
        return self._url(
            f"{self.scope_id}/registrations/{self.registration_id}/operations/{operation_id}"
        )

    # -- registration ------------------------------------------------------------------------

    def tpm_challenge(
        self, endorsement_key: bytes, storage_root_key: bytes, *, payload: Any = NO_PAYLOAD
    ) -> bytes:
        """TPM step 1: register without Authorization, sending the TPM's endorsement and
        storage root keys (marshalled TPM2B_PUBLIC); DPS answers 401 with the encrypted auth
        key. Returns that blob decoded, for tpmd's `import_auth_key`. Then call `register`
        with a `sign` that HMACs in the TPM."""
        body: dict[str, Any] = {
            "registrationId": self.registration_id,
            "tpm": {
                "endorsementKey": base64.b64encode(endorsement_key).decode("ascii"),
                "storageRootKey": base64.b64encode(storage_root_key).decode("ascii"),
            },
        }
        if payload is not NO_PAYLOAD:
            body["payload"] = payload
        log.info("Sending DPS TPM registration request for %s.", self.registration_id)
        response = self.cloud.send(
            "PUT",
            self.register_url,
            body=body,
            has_body=True,
            timeout=self.timeout,
            retries=self.retries,
        )
        check_json(response)
        document = parse(response, [401], dps_error)
        key = document.get("authenticationKey") if isinstance(document, dict) else None
        if not isinstance(key, str):
            # A 401 without a key is DPS refusing the endorsement key: say what DPS said.
            refusal = _service_error(document, response)
            if refusal is not None:
                raise refusal
            raise invalid_data(response, "TPM challenge (no authenticationKey)")
        return _b64(key, response, "authenticationKey")

    def register(self, sign: Sign | None = None, *, payload: Any = NO_PAYLOAD) -> DpsAssignment:
        """Register and poll until DPS decides. `sign` HMACs the SAS token (symmetric key or
        TPM); None for X.509. `payload`: any JSON value to send (`NO_PAYLOAD`: no field).
        Raises `CloudError`: an HTTP or transport failure, DPS's error (`message` is DPS's
        text), or a `failed` registration (DPS's `errorMessage`, `code` its `errorCode`)."""
        token = _Token(self, sign)
        headers = token.headers if sign is not None else None
        body: dict[str, Any] = {"registrationId": self.registration_id}
        if payload is not NO_PAYLOAD:
            body["payload"] = payload
        log.info("Sending DPS registration request for %s.", self.registration_id)
        response = self.cloud.send(
            "PUT",
            self.register_url,
            body=body,
            has_body=True,
            headers=headers,
            timeout=self.timeout,
            retries=self.retries,
        )
        check_json(response)
        operation = parse(response, [202], dps_error)
        operation_id = operation.get("operationId") if isinstance(operation, dict) else None
        if not isinstance(operation_id, str):
            raise invalid_data(response, "operation status (no operationId)")
        status_url = self.status_url(operation_id)

        self.cloud.sleep(self.poll_period)
        while True:
            log.info("Checking DPS registration status.")
            response = self.cloud.send(
                "GET", status_url, headers=headers, timeout=STATUS_TIMEOUT, retries=0
            )
            check_json(response)
            document = parse(response, [200, 202], dps_error)
            assignment = self._outcome(document, response, operation_id)
            if assignment is not None:
                log.info("Assigned to IoT hub: %s", assignment.assigned_hub)
                return assignment
            log.info("DPS registration is still in progress.")
            self.cloud.sleep(self.poll_period)

    def _outcome(
        self, document: Any, response: CloudResponse, operation_id: str
    ) -> DpsAssignment | None:
        """The assignment, None while assigning; a failure raises."""
        status = document.get("status") if isinstance(document, dict) else None
        state = document.get("registrationState") if isinstance(document, dict) else None
        if status == "assigning":
            return None
        if status == "assigned":
            if not isinstance(state, dict):
                raise invalid_data(response, "assignment (no registrationState)")
            hub, device_id = state.get("assignedHub"), state.get("deviceId")
            if not isinstance(hub, str) or not isinstance(device_id, str):
                raise invalid_data(response, "assignment (assignedHub and deviceId needed)")
            key = None
            tpm = state.get("tpm")
            if tpm is not None:
                value = tpm.get("authenticationKey") if isinstance(tpm, dict) else None
                if not isinstance(value, str):
                    raise invalid_data(response, "assignment (tpm without authenticationKey)")
                key = _b64(value, response, "tpm.authenticationKey")
            return DpsAssignment(hub, device_id, state.get("payload"), key, operation_id)
        if status == "failed":
            failure = _service_error(state, response)
            if failure is None:
                raise invalid_data(response, "failed registration (errorCode and errorMessage)")
            raise failure
        raise CloudError(
            f"DPS answered an unknown registration status {status!r} (expected assigned, "
            f"assigning or failed): {shown(response.body)}",
            status=response.status,
            url=response.url,
        )


class _Token:
    """One SAS token for a registration round, replaced only when about to expire."""

    def __init__(self, client: DpsClient, sign: Sign | None) -> None:
        self._client = client
        self._sign = sign
        self._value: str | None = None
        self._expiry = 0

    def headers(self) -> dict[str, str]:
        assert self._sign is not None
        now = self._client.cloud.now()
        if self._value is None or now + TOKEN_REFRESH_MARGIN >= self._expiry:
            if self._value is not None:
                log.info("DPS SAS token expires at %d; signing a fresh one.", self._expiry)
            self._expiry = expiry_after(now)
            audience = dps_audience(self._client.scope_id, self._client.registration_id)
            self._value = sas_token(audience, self._expiry, self._sign, policy=DPS_POLICY)
        return {"authorization": self._value}


def _service_error(document: Any, response: CloudResponse) -> CloudError | None:
    """DPS's `{code|errorCode: int, message|errorMessage: str}` as a CloudError, or None."""
    if not isinstance(document, dict):
        return None
    code = document.get("errorCode", document.get("code"))
    message = document.get("errorMessage", document.get("message"))
    if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
        return None
    return CloudError(message, status=response.status, code=code, url=response.url)


def dps_error(document: Any, response: CloudResponse) -> CloudError:
    """A 4xx/5xx answer's body → DPS's error; a body of another shape is invalid data."""
    error = _service_error(document, response)
    return error if error is not None else invalid_data(response, "DPS error body")


def _b64(value: str, response: CloudResponse, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_data(response, f"{what} (not base64)") from None
