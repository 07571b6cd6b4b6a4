"""identityd's cloud clients (`aziot.actors.identity`: sas, cloud, dps, hub) against the DPS and
IoT Hub doubles over real HTTPS on loopback, with SAS tokens checked against the formula of
provisioning.md §7 computed by hand, and time (sleeps, clocks) injected: nothing here waits for
a real poll period or backoff."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from aziot.actors.identity import sas
from aziot.actors.identity.cloud import CloudClient, CloudError
from aziot.actors.identity.dps import (
    DpsClient,
    DpsNotSupportedInNestedMode,
    refuse_nested,
)
from aziot.actors.identity.hub import (
    AuthMechanism,
    HubClient,
    Module,
    SymmetricKey,
    X509Thumbprint,
    derived_key_data,
    sas_authentication,
)
from aziot.actors.remote_key import client_context
from mockcloud import sas as mock_sas
from mockcloud.cloud import Cloud
from mockcloud.dps import echo_payload

SCOPE = "0ne00ABCDEF"
JITTER = 0.5  # the injected random(): every throttle sleep is base + jitter * 0.5


# -- helpers -----------------------------------------------------------------------------------


class FakeTime:
    """Injected sleep/now/clock: a sleep advances both clocks at once and is recorded; hooks
    run on given sleeps (1-based) to change the world meanwhile."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []
        self.hooks: dict[int, Callable[[], None]] = {}
        self.lock = threading.Lock()

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.offset += seconds
            hook = self.hooks.pop(len(self.sleeps), None)
        if hook is not None:
            hook()

    def now(self) -> float:
        return time.time() + self.offset

    def clock(self) -> float:
        return time.monotonic() + self.offset


def hand_token(audience: str, key: bytes, se: int, skn: str | None = None) -> str:
    """§7 by hand: lower-case, encode the few bytes the original encodes, HMAC, form-encode."""
    sr = audience.lower()
    for char, code in (("%", "%"), (" ", "%20"), ("#", "%23"), ("=", "%3D"), ("?", "%3F")):
        sr = sr.replace(char, code)
    mac = hmac.new(key, f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    sig = base64.b64encode(mac).decode()
    sig = sig.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    token = f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"
    return token + (f"&skn={skn}" if skn else "")


def server_trust(cloud: Cloud) -> ssl.SSLContext:
    return client_context(None, None, [cloud.server_ca_pem_path.read_bytes()])


def cloud_client(
    context: ssl.SSLContext, clock: FakeTime, transport: httpx.BaseTransport | None = None
) -> CloudClient:
    return CloudClient(
        context,
        sleep=clock.sleep,
        random=lambda: JITTER,
        clock=clock.clock,
        now=clock.now,
        transport=transport,
    )


def dps_client(cloud: Cloud, client: CloudClient, regid: str, **kwargs: Any) -> DpsClient:
    return DpsClient(
        client, scope_id=cloud.id_scope, registration_id=regid, endpoint=cloud.dps_url, **kwargs
    )


def key_bytes(key: str | None) -> bytes:
    assert key is not None
    return base64.b64decode(key)


def token_expiry(header: str) -> int:
    match = re.search(r"&se=(\d+)", header)
    assert match, header
    return int(match.group(1))


class EcSigner:
    """A remote_key private_op over a key the test holds (keyd's part, done locally)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key
        self.calls = 0

    def __call__(self, algorithm: str, data: bytes) -> bytes:
        assert algorithm == "ECDSA"
        self.calls += 1
        hashes = {32: "SHA256", 48: "SHA384", 64: "SHA512"}
        from cryptography.hazmat.primitives import hashes as h

        algorithm_ = getattr(h, hashes[len(data)])()
        return self.key.sign(data, ec.ECDSA(utils.Prehashed(algorithm_)))


class Counting(httpx.HTTPTransport):
    """httpx's transport, counting the requests it is handed (connection attempts included)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(verify=context)
        self.count = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        return super().handle_request(request)


def canned(
    status: int, body: Any = None, content_type: str | None = "application/json", raw=None
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport answering every request alike, keeping the requests."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        content = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        headers = {} if content_type is None else {"content-type": content_type}
        return httpx.Response(status, content=content, headers=headers)

    return httpx.MockTransport(answer), seen


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    with Cloud(tmp_path / "cloud", id_scope=SCOPE, assigning_polls=1) as c:
        yield c


@pytest.fixture
def clock() -> FakeTime:
    return FakeTime()


def provision(
    cloud: Cloud, clock: FakeTime, regid: str = "dev-1"
) -> tuple[CloudClient, str, bytes]:
    """An individually enrolled symmetric-key device, registered: (client, hub, device key)."""
    enrollment = cloud.dps.add_symmetric_enrollment(regid)
    client = cloud_client(server_trust(cloud), clock)
    key = key_bytes(enrollment.primary_key)
    assignment = dps_client(cloud, client, regid).register(sas.hmac_sign(key))
    return client, assignment.assigned_hub, key


# -- SAS tokens --------------------------------------------------------------------------------


def test_sas_token_is_the_spec_formula() -> None:
    key = bytes(range(32))
    signed: list[bytes] = []

    def sign(data: bytes) -> bytes:
        signed.append(data)
        return hmac.new(key, data, hashlib.sha256).digest()

    token = sas.sas_token("MyHub.azure-devices.net/devices/Dev1", 1700000030, sign)
    assert token == hand_token("MyHub.azure-devices.net/devices/Dev1", key, 1700000030)
    assert signed == [b"myhub.azure-devices.net/devices/dev1\n1700000030"]
    # The spec's example shape: a signature with '+', '/' and '=' is form-encoded.
    raw = base64.b64decode("ab+/cQ==")
    assert (
        sas.sas_token("MyHub.azure-devices.net/devices/Dev1", 1700000030, lambda _: raw)
        == "SharedAccessSignature sr=myhub.azure-devices.net/devices/dev1&sig=ab%2B%2FcQ%3D%3D&se=1700000030"
    )

    audience = sas.dps_audience(SCOPE, "A b=c#d?e")
    dps = sas.sas_token(audience, 5, sas.hmac_sign(key), policy="registration")
    assert dps == hand_token(audience, key, 5, "registration")
    assert dps.startswith("SharedAccessSignature sr=0ne00abcdef/registrations/a%20b%3Dc%23d%3Fe&")
    # The double's verifier agrees (it is the hub's and DPS's view of a token).
    assert (
        mock_sas.verify(dps, audience=audience, keys=[key], now=1, policy="registration").expiry
        == 5
    )
    assert sas.expiry_after(1000.9) == 1030
    assert sas.hub_audience("h", "d", "m") == "h/devices/d/modules/m"
    with pytest.raises(ValueError):
        sas.sas_token("a", 1, lambda _: b"")


def test_encode_sets() -> None:
    # C0, DEL, space " # < > ? ` { } = and non-ASCII; not '/', ':', '%' or the rest.
    assert sas.percent_encode('A"<>`{}?#= :/é\x7f\x01%41') == (
        "A%22%3C%3E%60%7B%7D%3F%23%3D%20:/%C3%A9%7F%01%41"
    )
    assert sas.percent_encode(":@$!()',*+~|^[]\\") == ":@$!()',*+~|^[]\\"
    assert sas.resource_uri("HUB/Devices/X Y") == "hub/devices/x%20y"
    assert sas.path_encode("a=b c#") == "a=b%20c%23"
    assert sas.form_urlencode("a+b/c= ~*-._") == "a%2Bb%2Fc%3D+%7E*-._"
    assert derived_key_data("m", "g", "primary") == b"m:g:primary"


# -- DPS ---------------------------------------------------------------------------------------


def test_dps_symmetric_individual(cloud: Cloud, clock: FakeTime) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev-1", device_id="device-one")
    key = key_bytes(enrollment.secondary_key)
    with cloud_client(server_trust(cloud), clock) as client:
        # Any path, query or fragment in the endpoint is dropped.
        dps = DpsClient(
            client,
            scope_id=SCOPE,
            registration_id="dev-1",
            endpoint=cloud.dps_url + "/some/path?x=1#f",
        )
        assert dps.register_url == (
            f"{cloud.dps_url}/{SCOPE}/registrations/dev-1/register?api-version=2021-06-01"
        )
        assignment = dps.register(sas.hmac_sign(key))
    assert (assignment.assigned_hub, assignment.device_id) == (cloud.hub_hostname, "device-one")
    assert assignment.payload is None and assignment.authentication_key is None
    assert clock.sleeps == [5.0, 5.0]  # before the first poll, and after the one "assigning"

    seen = cloud.dps.requests
    assert [(r.method, r.status, r.auth) for r in seen] == [
        ("PUT", 202, "sas"),
        ("GET", 202, "sas"),
        ("GET", 200, "sas"),
    ]
    put = seen[0]
    assert put.path == f"/{SCOPE}/registrations/dev-1/register"
    assert put.query == {"api-version": "2021-06-01"}
    assert put.raw_body == b'{"registrationId":"dev-1"}'
    assert put.headers["content-type"] == "application/json"
    for absent in ("user-agent", "accept", "accept-encoding", "cookie"):
        assert absent not in put.headers
    assert "content-type" not in seen[1].headers
    assert seen[1].path == f"/{SCOPE}/registrations/dev-1/operations/{assignment.operation_id}"
    # One token for the round: the PUT and the polls carry the same one, as the original's.
    header = put.headers["authorization"]
    assert {r.headers["authorization"] for r in seen} == {header}
    se = token_expiry(header)
    audience = f"{SCOPE}/registrations/dev-1"
    assert header == hand_token(audience, key, se, "registration")
    assert abs(se - (time.time() + 30)) <= 5  # made at the start: real now + 30


def test_dps_group_member_signs_with_the_derived_key(cloud: Cloud, clock: FakeTime) -> None:
    group = cloud.dps.add_symmetric_group("fleet")
    group_key = key_bytes(group.primary_key)
    derived = hmac.new(group_key, b"member-3", hashlib.sha256).digest()  # §8.6, by hand
    with cloud_client(server_trust(cloud), clock) as client:
        dps = dps_client(cloud, client, "member-3")
        with pytest.raises(CloudError) as refused:
            dps.register(sas.hmac_sign(group_key))
        assignment = dps.register(sas.hmac_sign(derived))
    error = refused.value
    assert (str(error), error.status, error.code, error.network) == (
        "Unauthorized",
        401,
        401002,
        False,
    )
    assert assignment.device_id == "member-3"
    device = cloud.hub.device("member-3")
    assert device is not None and key_bytes(device.primary_key) == derived


def test_dps_payload_sent_and_returned(tmp_path: Path, clock: FakeTime) -> None:
    with Cloud(tmp_path, id_scope=SCOPE, payload_reply=echo_payload) as cloud:
        key = key_bytes(cloud.dps.add_symmetric_enrollment("p").primary_key)
        with cloud_client(server_trust(cloud), clock) as client:
            payload = {"modelId": "dtmi:x;1", "n": [1, 2], "é": None}
            assignment = dps_client(cloud, client, "p").register(
                sas.hmac_sign(key), payload=payload
            )
        assert cloud.dps.requests[0].body == {"registrationId": "p", "payload": payload}
    assert assignment.payload == {
        "msg": "custom allocation payload received",
        "request_payload": payload,
    }


def test_a_null_payload_is_sent_as_null_and_no_payload_as_no_field(
    tmp_path: Path, clock: FakeTime
) -> None:
    """A payload file holding `null` is a payload: the original sends `"payload": null`."""
    with Cloud(tmp_path, id_scope=SCOPE) as cloud:
        key = key_bytes(cloud.dps.add_symmetric_enrollment("p").primary_key)
        with cloud_client(server_trust(cloud), clock) as client:
            dps_client(cloud, client, "p").register(sas.hmac_sign(key), payload=None)
            dps_client(cloud, client, "p").register(sas.hmac_sign(key))
        puts = [r.body for r in cloud.dps.requests if r.method == "PUT"]
        assert puts == [{"registrationId": "p", "payload": None}, {"registrationId": "p"}]


def test_dps_x509_then_hub_modules_with_the_same_cert(cloud: Cloud, clock: FakeTime) -> None:
    _, authority = cloud.dps.add_x509_ca_group("x509-fleet")
    cert, key = authority.issue_leaf("cam-1")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signer = EcSigner(key)
    chain = cert.public_bytes(serialization.Encoding.PEM)
    context = client_context(chain, signer, [cloud.server_ca_pem_path.read_bytes()])
    with cloud_client(context, clock) as client:
        assignment = dps_client(cloud, client, "cam-1").register()
        hub = HubClient(client, iothub_hostname=assignment.assigned_hub, device_id="cam-1")
        created = hub.create_module("edge-a", managed_by="me")
        assert [m.module_id for m in hub.list_modules()] == ["edge-a"]
        assert hub.get_module("edge-a") == created
        hub.delete_module("edge-a")
        assert hub.list_modules() == []
    assert assignment.device_id == "cam-1" and signer.calls >= 1
    assert created.managed_by == "me" and created.generation_id
    for seen in cloud.dps.requests + cloud.hub.requests:
        assert seen.auth == "x509" and "authorization" not in seen.headers
        assert seen.client_cert_subject == "CN=cam-1"


def test_dps_failed_registration_is_a_clear_error(cloud: Cloud, clock: FakeTime) -> None:
    key = key_bytes(cloud.dps.add_symmetric_enrollment("off", enabled=False).primary_key)
    with cloud_client(server_trust(cloud), clock) as client, pytest.raises(CloudError) as failed:
        dps_client(cloud, client, "off").register(sas.hmac_sign(key))
    assert str(failed.value) == "Device enrollment is disabled."
    assert (failed.value.code, failed.value.status, failed.value.network) == (401004, 200, False)
    assert cloud.hub.device("off") is None


def test_dps_polling_past_30_s_gets_a_fresh_token(tmp_path: Path, clock: FakeTime) -> None:
    with Cloud(tmp_path, id_scope=SCOPE, assigning_polls=9) as cloud:
        key = key_bytes(cloud.dps.add_symmetric_enrollment("slow").primary_key)
        start = clock.now()
        with cloud_client(server_trust(cloud), clock) as client:
            assignment = dps_client(cloud, client, "slow").register(sas.hmac_sign(key))
        seen = cloud.dps.requests
    assert assignment.device_id == "slow"
    assert clock.sleeps == [5.0] * 10 and len(seen) == 11
    tokens = [r.headers["authorization"] for r in seen]
    # Request i went out at virtual time start + 5 i; each token outlives it by ≥ 5 s.
    for i, token in enumerate(tokens):
        assert token_expiry(token) >= start + 5 * i + 5, (i, token)
        assert mock_sas.verify(
            token,
            audience=f"{SCOPE}/registrations/slow",
            keys=[key],
            now=start + 5 * i,
            policy="registration",
        )
    # Reused while fresh: 50 s of polling needs two fresh tokens, not one per poll.
    assert len(set(tokens)) == 3
    assert tokens[:5] == [tokens[0]] * 5 and tokens[5] != tokens[0]


def test_dps_tpm_challenge_then_registration(cloud: Cloud, clock: FakeTime) -> None:
    ek, srk = b"\x00\x3aEK-public", b"\x00\x3aSRK-public"
    cloud.dps.add_tpm_enrollment("tpm-dev", ek)
    with cloud_client(server_trust(cloud), clock) as client:
        dps = dps_client(cloud, client, "tpm-dev")
        with pytest.raises(CloudError) as wrong:
            dps.tpm_challenge(b"other-ek", srk)
        blob = dps.tpm_challenge(ek, srk, payload={"a": 1})
        assert blob == cloud.dps.tpm_auth_key("tpm-dev")
        assignment = dps.register(sas.hmac_sign(blob))  # the TPM's HMAC, done here
    assert (str(wrong.value), wrong.value.status, wrong.value.code) == ("Unauthorized", 401, 401002)
    assert assignment.authentication_key == blob
    challenge = cloud.dps.requests[1]
    assert "authorization" not in challenge.headers
    assert challenge.body == {
        "registrationId": "tpm-dev",
        "tpm": {
            "endorsementKey": base64.b64encode(ek).decode(),
            "storageRootKey": base64.b64encode(srk).decode(),
        },
        "payload": {"a": 1},
    }
    assert "tpm" not in cloud.dps.requests[2].body


def test_dps_answers_the_original_refuses() -> None:
    context = ssl.create_default_context()

    def register(transport: httpx.MockTransport) -> CloudError:
        clock = FakeTime()
        with cloud_client(context, clock, transport) as client:
            dps = DpsClient(client, scope_id="s", registration_id="r", endpoint="https://dps")
            with pytest.raises(CloudError) as caught:
                dps.register(sas.hmac_sign(b"k"))
        return caught.value

    assert str(register(canned(200, {"operationId": "x"})[0])) == (
        "Expected one of [202], got 200 OK"
    )
    assert str(register(canned(503)[0])) == "HTTP error 503 Service Unavailable"
    html = register(canned(502, content_type="text/html", raw=b"<html>bad gateway</html>")[0])
    assert str(html).startswith("invalid Content-Type; expected JSON") and html.status == 502
    not_dps = register(canned(400, {"error": "x"})[0])
    assert "invalid DPS error body" in str(not_dps) and not not_dps.network
    shaped = register(canned(404, {"code": 404201, "message": "no such scope"})[0])
    assert (str(shaped), shaped.code) == ("no such scope", 404201)

    # A missing Content-Type is accepted; any casing of application/json too.
    def flow(status_doc: dict[str, Any], content_type: str | None) -> httpx.MockTransport:
        def answer(request: httpx.Request) -> httpx.Response:
            headers = {} if content_type is None else {"content-type": content_type}
            if request.method == "PUT":
                return httpx.Response(202, json={"operationId": "op"}, headers=headers)
            return httpx.Response(200, content=json.dumps(status_doc).encode(), headers=headers)

        return httpx.MockTransport(answer)

    unknown = register(flow({"status": "disabled", "registrationState": {}}, None))
    assert "unknown registration status 'disabled'" in str(unknown)
    no_hub = register(flow({"status": "assigned", "registrationState": {"deviceId": "d"}}, None))
    assert "assignedHub and deviceId" in str(no_hub)
    failed = register(
        flow(
            {"status": "failed", "registrationState": {"code": 7, "message": "nope"}},
            "Application/JSON; charset=utf-8",
        )
    )
    assert (str(failed), failed.code) == ("nope", 7)

    with pytest.raises(DpsNotSupportedInNestedMode, match="not supported in nested mode"):
        refuse_nested("parent-gateway")
    refuse_nested(None)


# -- the request policy ------------------------------------------------------------------------


def test_throttling_backs_off_per_policy_with_fresh_tokens(cloud: Cloud, clock: FakeTime) -> None:
    client, hub_name, key = provision(cloud, clock)
    clock.sleeps.clear()
    cloud.hub.clear_requests()
    hub = HubClient(client, iothub_hostname=hub_name, device_id="dev-1", sign=sas.hmac_sign(key))

    cloud.hub.misbehave("throttle", count=2, seconds=7)  # Retry-After: 7, which is not obeyed
    assert hub.list_modules() == []
    assert clock.sleeps == [60 + 10 * JITTER, 120 + 20 * JITTER]
    seen = cloud.hub.requests
    assert [r.status for r in seen] == [429, 429, 200]
    expiries = [token_expiry(r.headers["authorization"]) for r in seen]
    assert expiries[1] - expiries[0] >= 64 and expiries[2] - expiries[1] >= 129

    # Throttled for good: 5 requests, 4 sleeps, then an error (whatever cloud_retries says).
    clock.sleeps.clear()
    cloud.hub.clear_requests()
    cloud.hub.misbehave("throttle", seconds=1)
    hub.retries = 10
    with pytest.raises(CloudError) as throttled:
        hub.get_module("m")
    assert clock.sleeps == [65.0, 130.0, 195.0, 315.0]
    assert len(cloud.hub.requests) == 5
    error = throttled.value
    assert (error.status, error.throttled, error.network) == (429, True, False)
    assert str(error) == "429: Too many requests"
    cloud.hub.behave()
    client.close()


def test_throttle_and_transport_retries_share_the_attempt_count(
    cloud: Cloud, clock: FakeTime
) -> None:
    # attempt 1: refused (3 s), attempt 2: 429 (the second backoff step), attempt 3: served.
    key = key_bytes(cloud.dps.add_symmetric_enrollment("d").primary_key)
    cloud.dps.misbehave("refuse")

    def reopen() -> None:
        cloud.dps.behave()
        cloud.dps.misbehave("throttle", count=1)

    clock.hooks[1] = reopen
    with cloud_client(server_trust(cloud), clock) as client:
        assignment = dps_client(cloud, client, "d", retries=1).register(sas.hmac_sign(key))
    assert assignment.device_id == "d"
    assert clock.sleeps == [3.0, 120 + 20 * JITTER, 5.0, 5.0]


def test_transport_errors_retry_cloud_retries_times(cloud: Cloud, clock: FakeTime) -> None:
    context = server_trust(cloud)
    transport = Counting(context)
    cloud.dps.misbehave("refuse")
    with cloud_client(context, clock, transport) as client, pytest.raises(CloudError) as refused:
        dps_client(cloud, client, "x", retries=2).register(sas.hmac_sign(b"k"))
    assert transport.count == 3 and clock.sleeps == [3.0, 3.0]
    assert refused.value.network and refused.value.status is None
    assert str(refused.value).startswith(f"cannot connect to {cloud.dps_url}/")
    cloud.dps.behave()

    # Status polls are never retried: a refused poll fails at once, whatever cloud_retries is.
    key = key_bytes(cloud.dps.add_symmetric_enrollment("p").primary_key)
    clock.sleeps.clear()
    clock.hooks[1] = lambda: cloud.dps.misbehave("refuse")
    with cloud_client(context, clock) as client, pytest.raises(CloudError) as poll_refused:
        dps_client(cloud, client, "p", retries=3).register(sas.hmac_sign(key))
    assert clock.sleeps == [5.0] and poll_refused.value.network
    cloud.dps.behave()


def test_timeouts_are_network_errors_and_retried(cloud: Cloud, clock: FakeTime) -> None:
    client, hub_name, key = provision(cloud, clock)
    clock.sleeps.clear()
    cloud.hub.clear_requests()
    hub = HubClient(
        client,
        iothub_hostname=hub_name,
        device_id="dev-1",
        sign=sas.hmac_sign(key),
        timeout=0.3,
        retries=1,
    )
    cloud.hub.misbehave("slow", count=2, seconds=0.8)
    with pytest.raises(CloudError) as slow:
        hub.list_modules()
    assert slow.value.network and "did not answer within 0.3 s" in str(slow.value)
    assert clock.sleeps == [3.0]
    cloud.hub.misbehave("slow", count=1, seconds=0.8)
    assert hub.list_modules() == []  # the retry is answered in time
    client.close()


def test_network_classification(cloud: Cloud, clock: FakeTime, tmp_path: Path) -> None:
    client, hub_name, key = provision(cloud, clock)
    hub = HubClient(client, iothub_hostname=hub_name, device_id="dev-1", sign=sas.hmac_sign(key))

    # A Hub 500 with a Message: a parent edgeHub saying IoT Hub is unreachable.
    cloud.hub.misbehave("error", count=1)
    with pytest.raises(CloudError) as server:
        hub.list_modules()
    assert server.value.network and server.value.status == 500
    assert str(server.value) == "ErrorCode:ServerError;The service failed (mock)."
    # A 500 without a body is invalid data, not network.
    cloud.hub.misbehave("empty_error", count=1)
    with pytest.raises(CloudError) as empty:
        hub.get_module("m")
    assert not empty.value.network and empty.value.status == 500
    # Other statuses from the service are not network either.
    cloud.hub.misbehave("error", count=1, status=503)
    with pytest.raises(CloudError) as unavailable:
        hub.list_modules()
    assert not unavailable.value.network and unavailable.value.status == 503
    with pytest.raises(CloudError) as missing:
        hub.get_module("nope")
    assert not missing.value.network
    # An untrusted server: the TLS handshake fails, which the original counts as network.
    with (
        CloudClient(client_context(None, None, []), sleep=clock.sleep) as untrusting,
        pytest.raises(CloudError) as tls,
    ):
        dps_client(cloud, untrusting, "dev-1").register(sas.hmac_sign(key))
    assert tls.value.network and "TLS handshake" in str(tls.value)
    client.close()

    # `networkError: true` in any Hub error body makes it network; a DELETE's 500 is not.
    context = ssl.create_default_context()
    body = {"Message": "upstream unreachable", "networkError": True}
    with cloud_client(context, clock, canned(502, body)[0]) as canned_client:
        canned_hub = HubClient(canned_client, iothub_hostname="h", device_id="d")
        with pytest.raises(CloudError) as flagged:
            canned_hub.list_modules()
        assert flagged.value.network and str(flagged.value) == "upstream unreachable"
    with cloud_client(context, clock, canned(500, body)[0]) as canned_client:
        canned_hub = HubClient(canned_client, iothub_hostname="h", device_id="d")
        with pytest.raises(CloudError) as deleted:
            canned_hub.delete_module("m")
        assert not deleted.value.network
        assert str(deleted.value) == "unexpected HTTP status code: 500 Internal Server Error"


# -- IoT Hub -----------------------------------------------------------------------------------


def test_hub_module_crud_with_sas(cloud: Cloud, clock: FakeTime) -> None:
    client, hub_name, key = provision(cloud, clock)
    cloud.hub.clear_requests()
    hub = HubClient(client, iothub_hostname=hub_name, device_id="dev-1", sign=sas.hmac_sign(key))

    assert hub.list_modules() == []
    created = hub.create_module("mod-a")
    assert (created.module_id, created.device_id) == ("mod-a", "dev-1")
    assert created.generation_id and created.managed_by is None
    assert created.authentication is not None and created.authentication.type == "sas"

    with pytest.raises(CloudError) as exists:
        hub.create_module("mod-a")
    assert exists.value.status == 409
    assert str(exists.value).startswith("ErrorCode:ModuleAlreadyExistsOnDevice;")

    # §10: keys derived from the master key over "<module>:<generation>:primary|secondary".
    master = b"identityd master key, 32 bytes!!"
    primary = hmac.new(
        master, derived_key_data("mod-a", created.generation_id, "primary"), hashlib.sha256
    ).digest()
    secondary = hmac.new(
        master, b"mod-a:" + created.generation_id.encode() + b":secondary", hashlib.sha256
    ).digest()
    updated = hub.update_module("mod-a", sas_authentication(primary, secondary))
    assert updated.generation_id == created.generation_id
    assert updated.authentication == AuthMechanism(
        SymmetricKey(primary, secondary), X509Thumbprint(None, None), "sas"
    )
    assert hub.get_module("mod-a") == updated
    assert hub.list_modules() == [updated]

    with pytest.raises(CloudError) as not_found:
        hub.update_module("ghost", sas_authentication(primary, secondary))
    assert not_found.value.status == 404
    assert str(not_found.value).startswith("ErrorCode:ModuleNotFound;")

    # A module token signed with the derived key opens the module's telemetry route.
    module_token = sas.sas_token(
        sas.hub_audience(hub_name, "dev-1", "mod-a"),
        sas.expiry_after(time.time()),
        sas.hmac_sign(primary),
    )
    with httpx.Client(verify=server_trust(cloud)) as plain:
        sent = plain.post(
            f"https://{hub_name}/devices/dev-1/modules/mod-a/messages/events"
            "?api-version=2017-11-08-preview",
            content=b'{"t": 21}',
            headers={"authorization": module_token},
        )
    assert sent.status_code == 204
    assert [(m.module_id, m.body) for m in cloud.hub.messages] == [("mod-a", b'{"t": 21}')]

    hub.delete_module("mod-a")
    with pytest.raises(CloudError) as gone:
        hub.get_module("mod-a")
    assert (gone.value.status, gone.value.network) == (404, False)
    with pytest.raises(CloudError) as again:
        hub.delete_module("mod-a")
    assert str(again.value) == "unexpected HTTP status code: 404 Not Found"

    seen = [r for r in cloud.hub.requests if not r.path.endswith("/messages/events")]
    by_kind = {(r.method, r.path, "if-match" in r.headers) for r in seen}
    assert ("PUT", "/devices/dev-1/modules/mod-a", False) in by_kind  # create: no If-Match
    updates = [r for r in seen if r.method in ("PUT", "DELETE") and "if-match" in r.headers]
    assert updates and all(r.headers["if-match"] == "*" for r in updates)
    assert seen[1].raw_body == b'{"moduleId":"mod-a","deviceId":"dev-1"}'
    update_body = next(r.body for r in updates if r.method == "PUT")
    assert update_body == {
        "moduleId": "mod-a",
        "deviceId": "dev-1",
        "authentication": {
            "symmetricKey": {
                "primaryKey": base64.b64encode(primary).decode(),
                "secondaryKey": base64.b64encode(secondary).decode(),
            },
            "type": "sas",
        },
    }
    for r in seen:
        assert r.query == {"api-version": "2017-11-08-preview"}
        header = r.headers["authorization"]
        assert header == hand_token(f"{hub_name}/devices/dev-1", key, token_expiry(header))
        assert "skn=" not in header
    client.close()


def test_hub_ids_are_percent_encoded_with_the_sas_set(cloud: Cloud, clock: FakeTime) -> None:
    client, hub_name, key = provision(cloud, clock)
    cloud.hub.clear_requests()
    hub = HubClient(client, iothub_hostname=hub_name, device_id="dev-1", sign=sas.hmac_sign(key))
    spaced = hub.create_module("a b#c?d=e")
    assert spaced.module_id == "a b#c?d=e"
    assert cloud.hub.requests[0].path == "/devices/dev-1/modules/a%20b%23c%3Fd%3De"
    # '%' is not encoded: "acc%41mod" reaches the Hub as "accAmod" (the body still says
    # "acc%41mod": the double goes by the URL).
    assert hub.url("acc%41mod").endswith("/modules/acc%41mod?api-version=2017-11-08-preview")
    assert hub.url("a:@$!()',*+").endswith("/modules/a:@$!()',*+?api-version=2017-11-08-preview")
    client.close()


def test_hub_through_a_gateway_signs_for_the_hub() -> None:
    transport, seen = canned(200, [{"moduleId": "m", "deviceId": "d", "extra": 1}])
    clock = FakeTime()
    with cloud_client(ssl.create_default_context(), clock, transport) as client:
        hub = HubClient(
            client,
            iothub_hostname="MyHub.azure-devices.net",
            device_id="d",
            local_gateway_hostname="parent.local",
            sign=sas.hmac_sign(b"k" * 32),
        )
        assert hub.list_modules() == [Module("m", "d")]
    request = seen[0]
    assert (
        str(request.url) == "https://parent.local/devices/d/modules?api-version=2017-11-08-preview"
    )
    assert request.headers["authorization"].startswith(
        "SharedAccessSignature sr=myhub.azure-devices.net/devices/d&sig="
    )
    assert "user-agent" not in request.headers and "accept" not in request.headers


def canned_hub_error(status: int, body: Any, call: Callable[[HubClient], Any]) -> CloudError:
    with cloud_client(ssl.create_default_context(), FakeTime(), canned(status, body)[0]) as client:
        hub = HubClient(client, iothub_hostname="h", device_id="d")
        with pytest.raises(CloudError) as caught:
            call(hub)
    return caught.value


def test_hub_412_and_invalid_answers() -> None:
    precondition = {"Message": "ErrorCode:PreconditionFailed;Precondition failed: etag mismatch"}
    keys = sas_authentication(b"p" * 32, b"s" * 32)
    failed = canned_hub_error(412, precondition, lambda hub: hub.update_module("m", keys))
    assert str(failed) == precondition["Message"] and failed.status == 412
    invalid = canned_hub_error(200, {"moduleId": "m"}, lambda hub: hub.get_module("m"))
    assert "invalid module" in str(invalid)
    not_hub = canned_hub_error(404, {"message": "lower-case"}, lambda hub: hub.get_module("m"))
    assert "invalid IoT Hub error body" in str(not_hub)
    alias = canned_hub_error(404, {"errorMessage": "alias"}, lambda hub: hub.get_module("m"))
    assert str(alias) == "alias"
    listed = canned_hub_error(200, {"moduleId": "m"}, lambda hub: hub.list_modules())
    assert "not a JSON array" in str(listed)


def test_module_json_mapping() -> None:
    module = Module(
        "m",
        "d",
        managed_by=None,
        generation_id="1",
        authentication=AuthMechanism(None, X509Thumbprint("AB", None), "x509"),
    )
    assert module.to_json() == {
        "moduleId": "m",
        "deviceId": "d",
        "generationId": "1",
        "authentication": {"x509Thumbprint": {"primaryThumbprint": "AB"}, "type": "x509"},
    }
    assert Module.from_json(module.to_json()) == module
    assert Module("m", "d").to_json() == {"moduleId": "m", "deviceId": "d"}
    hub_answer = {
        "moduleId": "m",
        "deviceId": "d",
        "generationId": None,
        "managedBy": "iotedge",
        "authentication": {
            "symmetricKey": {"primaryKey": None, "secondaryKey": "AAEC"},
            "type": "selfSigned",
        },
        "connectionState": "Disconnected",
    }
    assert Module.from_json(hub_answer) == Module(
        "m",
        "d",
        "iotedge",
        None,
        AuthMechanism(SymmetricKey(None, b"\x00\x01\x02"), None, "selfSigned"),
    )


async def test_from_a_trio_actor(cloud: Cloud) -> None:
    """How identityd calls it: the client in a worker thread, the HMAC done on the trio loop
    (keyd's place) through `trio.from_thread.run`."""
    import trio

    key = key_bytes(cloud.dps.add_symmetric_enrollment("trio-dev").primary_key)
    loop_signs: list[bytes] = []

    async def keyd_sign(data: bytes) -> bytes:  # stands in for keyd's /sign
        await trio.sleep(0)
        loop_signs.append(data)
        return hmac.new(key, data, hashlib.sha256).digest()

    def sign(data: bytes) -> bytes:
        return trio.from_thread.run(keyd_sign, data)

    def provision_in_thread() -> tuple[str, list[str]]:
        with CloudClient(server_trust(cloud), sleep=lambda _: None) as client:
            assignment = dps_client(cloud, client, "trio-dev").register(sign)
            hub = HubClient(
                client,
                iothub_hostname=assignment.assigned_hub,
                device_id=assignment.device_id,
                sign=sign,
            )
            hub.create_module("m")
            return assignment.device_id, [m.module_id for m in hub.list_modules()]

    assert await trio.to_thread.run_sync(provision_in_thread) == ("trio-dev", ["m"])
    assert len(loop_signs) == 3  # one DPS token for the round, one per Hub request
