"""The DPS and IoT Hub doubles and the SAS token code, checked with httpx as the client and
tokens computed by hand from provisioning.md §7. identityd's tests rely on these doubles meaning
what they say."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from mockcloud import ca, sas
from mockcloud.cloud import Cloud
from mockcloud.dps import echo_payload

REPO = Path(__file__).resolve().parent.parent
DPS_API = "api-version=2021-06-01"
HUB_API = "api-version=2017-11-08-preview"
SCOPE = "0ne00ABCDEF"


# -- helpers -----------------------------------------------------------------------------------


def hand_sig(key_b64: str, sr: str, se: int) -> str:
    mac = hmac.new(base64.b64decode(key_b64), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def http(cloud: Cloud, identity: tuple[Path, Path] | None = None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(cloud.server_ca_pem_path))
    if identity is not None:
        context.load_cert_chain(*map(str, identity))
    return httpx.Client(verify=context, timeout=10)


def dps_token(cloud: Cloud, regid: str, key: str | bytes, **kwargs: Any) -> str:
    return sas.make_token(
        f"{cloud.id_scope}/registrations/{regid}", key, policy="registration", **kwargs
    )


def register(
    client: httpx.Client,
    cloud: Cloud,
    regid: str,
    token: str | None = None,
    body: dict[str, Any] | None = None,
) -> httpx.Response:
    headers = {"authorization": token} if token else {}
    return client.put(
        f"{cloud.dps_url}/{cloud.id_scope}/registrations/{regid}/register?{DPS_API}",
        json=body if body is not None else {"registrationId": regid},
        headers=headers,
    )


def poll(
    client: httpx.Client, cloud: Cloud, regid: str, operation_id: str, token: str | None = None
) -> httpx.Response:
    headers = {"authorization": token} if token else {}
    return client.get(
        f"{cloud.dps_url}/{cloud.id_scope}/registrations/{regid}/operations/{operation_id}?{DPS_API}",
        headers=headers,
    )


def provision(
    client: httpx.Client, cloud: Cloud, regid: str, token: str | None = None
) -> dict[str, Any]:
    """Register and poll until done, as identityd does (without its 5 s sleeps)."""
    first = register(client, cloud, regid, token)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "assigning"
    operation_id = first.json()["operationId"]
    for _ in range(10):
        answer = poll(client, cloud, regid, operation_id, token)
        assert answer.status_code in (200, 202), answer.text
        if answer.json()["status"] != "assigning":
            return answer.json()
    raise AssertionError("still assigning")


def assert_dps_error(response: httpx.Response, status: int, code: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"errorCode", "trackingId", "message", "timestampUtc"}
    assert body["errorCode"] == code
    assert body["timestampUtc"].endswith("Z")


def assert_hub_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["Message"].startswith(f"ErrorCode:{code};"), body
    assert body["ExceptionMessage"].startswith("Tracking ID:")
    assert response.headers["iothub-errorcode"] == code


def hub_url(hub: str, device: str, rest: str = "modules") -> str:
    return f"https://{hub}/devices/{quote(device, safe='')}/{rest}?{HUB_API}"


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    with Cloud(tmp_path / "cloud", id_scope=SCOPE, assigning_polls=1) as c:
        yield c


def provisioned(cloud: Cloud, regid: str = "dev-1") -> tuple[httpx.Client, str, str]:
    """A device provisioned with an individual symmetric key: (client, hub, device key)."""
    enrollment = cloud.dps.add_symmetric_enrollment(regid)
    client = http(cloud)
    assert enrollment.primary_key is not None
    result = provision(client, cloud, regid, dps_token(cloud, regid, enrollment.primary_key))
    assert result["status"] == "assigned"
    return client, result["registrationState"]["assignedHub"], enrollment.primary_key


# -- SAS tokens --------------------------------------------------------------------------------


def test_token_matches_the_spec_formula_by_hand() -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    token = sas.make_token("MyHub.azure-devices.net/devices/Dev1", key, expiry=1700000030)
    sr = "myhub.azure-devices.net/devices/dev1"  # lower-cased, '/' and '.' left alone
    sig = hand_sig(key, sr, 1700000030)
    form_sig = sig.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    assert token == f"SharedAccessSignature sr={sr}&sig={form_sig}&se=1700000030"

    dps = sas.make_token("0ne00ABCDEF/registrations/A b=c#d", key, expiry=5, policy="registration")
    sr = "0ne00abcdef/registrations/a%20b%3Dc%23d"
    assert dps == (
        f"SharedAccessSignature sr={sr}&sig={quote(hand_sig(key, sr, 5), safe='')}"
        f"&se=5&skn=registration"
    )
    # The same HMAC from openssl, as the e2e test computes it.
    mac = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha256",
            "-mac",
            "HMAC",
            "-macopt",
            f"hexkey:{bytes(range(32)).hex()}",
        ],
        input=f"{sr}\n5".encode(),
        capture_output=True,
        timeout=10,
    ).stdout.decode()
    assert mac.strip().endswith(base64.b64decode(hand_sig(key, sr, 5)).hex())


def test_encode_set_and_form_encoding() -> None:
    assert sas.encode_resource('A"<>`{}?#= :/é\x7f') == "a%22%3C%3E%60%7B%7D%3F%23%3D%20:/%C3%A9%7F"
    assert sas.form_urlencode("a+b/c= ~*-._") == "a%2Bb%2Fc%3D+%7E*-._"


def test_verify_accepts_good_and_names_each_failure() -> None:
    key = sas.derive_device_key(base64.b64encode(b"g" * 32).decode(), "x")
    audience = "hub:1/devices/d"
    now = 1_000_000
    good = sas.make_token(audience, key, expiry=now + 30)
    token = sas.verify(good, audience="HUB:1/devices/D", keys=["AAAA", key], now=now)
    assert token.resource == "hub:1/devices/d" and token.expiry == now + 30 and token.skn is None
    assert sas.verify(good, audience=audience, keys=[key], now=now + 30)  # se == now: still good

    cases = {
        "signature": (good, [base64.b64encode(b"other").decode()], audience, now),
        "expired": (good, [key], audience, now + 31),
        "resource": (good, [key], "hub:1/devices/e", now),
        "malformed": ("SharedAccessSignature sr=x&se=1", [key], audience, now),
    }
    for reason, (header, keys, aud, at) in cases.items():
        with pytest.raises(sas.SasError) as caught:
            sas.verify(header, audience=aud, keys=keys, now=at)
        assert caught.value.reason == reason
    with pytest.raises(sas.SasError) as caught:
        sas.verify(good, audience=audience, keys=[key], now=now, policy="registration")
    assert caught.value.reason == "policy"


def test_sdk_style_encoded_slashes_verify() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    sr = quote("scope/registrations/dev", safe="").lower()  # scope%2fregistrations%2fdev
    token = f"SharedAccessSignature sr={sr}&sig={quote(hand_sig(key, sr, 99), safe='')}&se=99&skn=registration"
    assert sas.verify(token, audience="scope/registrations/dev", keys=[key], now=1).sr == sr


def test_group_key_derivation_by_hand() -> None:
    group = base64.b64encode(b"\x01" * 64).decode()
    expected = base64.b64encode(hmac.new(b"\x01" * 64, b"dev-7", hashlib.sha256).digest()).decode()
    assert sas.derive_device_key(group, "dev-7") == expected


# -- DPS ---------------------------------------------------------------------------------------


def test_symmetric_individual_register_poll_assign(cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev-1", device_id="device-one")
    token = dps_token(cloud, "dev-1", enrollment.secondary_key or "")
    with http(cloud) as client:
        first = register(client, cloud, "dev-1", token)
        assert first.status_code == 202
        operation_id = first.json()["operationId"]
        assert first.json() == {"operationId": operation_id, "status": "assigning"}
        waiting = poll(client, cloud, "dev-1", operation_id, token)
        assert waiting.status_code == 202
        assert waiting.json()["registrationState"] == {
            "registrationId": "dev-1",
            "status": "assigning",
        }
        done = poll(client, cloud, "dev-1", operation_id, token)
        again = poll(client, cloud, "dev-1", operation_id, token)
    assert done.status_code == 200 and again.json() == done.json()
    state = done.json()["registrationState"]
    assert done.json()["status"] == "assigned"
    assert state["assignedHub"] == cloud.hub_hostname
    assert state["deviceId"] == "device-one"
    assert state["registrationId"] == "dev-1"
    assert (state["status"], state["substatus"]) == ("assigned", "initialAssignment")
    assert "payload" not in state and "tpm" not in state
    device = cloud.hub.device("device-one")
    assert device is not None and device.auth_type == "sas"
    assert (device.primary_key, device.secondary_key) == (
        enrollment.primary_key,
        enrollment.secondary_key,
    )
    assert cloud.dps.registrations["dev-1"].device_id == "device-one"
    seen = cloud.dps.requests
    assert [(r.method, r.status, r.auth, r.identity) for r in seen] == [
        ("PUT", 202, "sas", "dev-1"),
        ("GET", 202, "sas", "dev-1"),
        ("GET", 200, "sas", "dev-1"),
        ("GET", 200, "sas", "dev-1"),
    ]
    assert seen[0].body == {"registrationId": "dev-1"} and seen[0].query["api-version"]


def test_group_enrollment_uses_derived_key(cloud: Cloud) -> None:
    group = cloud.dps.add_symmetric_group("fleet")
    assert group.primary_key is not None
    derived = sas.derive_device_key(group.primary_key, "member-3")
    with http(cloud) as client:
        wrong = register(client, cloud, "member-3", dps_token(cloud, "member-3", group.primary_key))
        assert_dps_error(wrong, 401, 401002)
        result = provision(client, cloud, "member-3", dps_token(cloud, "member-3", derived))
    assert result["status"] == "assigned"
    assert result["registrationState"]["symmetricKey"] == {"enrollmentGroupId": "fleet"}
    device = cloud.hub.device("member-3")
    assert device is not None and device.primary_key == derived


def test_payload_is_answered_when_asked(tmp_path: Path) -> None:
    with Cloud(tmp_path, payload_reply=echo_payload) as cloud, http(cloud) as client:
        e = cloud.dps.add_symmetric_enrollment("p")
        token = dps_token(cloud, "p", e.primary_key or "")
        body = {"registrationId": "p", "payload": {"modelId": "x", "n": [1, 2]}}
        first = register(client, cloud, "p", token, body)
        state = poll(client, cloud, "p", first.json()["operationId"], token).json()
    assert state["registrationState"]["payload"] == {
        "msg": "custom allocation payload received",
        "request_payload": {"modelId": "x", "n": [1, 2]},
    }


def test_x509_group_and_individual(cloud: Cloud, tmp_path: Path) -> None:
    _, authority = cloud.dps.add_x509_ca_group("x509-fleet")
    identity = cloud.dps.issue_device_cert(authority, tmp_path / "ids", "cam-1")
    with http(cloud, identity) as client:
        result = provision(client, cloud, "cam-1")
        # CN is the registration id; any other id is refused.
        assert_dps_error(register(client, cloud, "cam-2"), 401, 401002)
    assert result["registrationState"]["x509"] == {"enrollmentGroupId": "x509-fleet"}
    device = cloud.hub.device("cam-1")
    assert device is not None and device.auth_type == "certificateAuthority"
    assert cloud.dps.requests[0].auth == "x509"
    assert cloud.dps.requests[0].client_cert_subject == "CN=cam-1"

    # The device cert also opens the hub (telemetry and module list).
    with http(cloud, identity) as client:
        hub = result["registrationState"]["assignedHub"]
        assert (
            client.post(hub_url(hub, "cam-1", "messages/events"), content=b"hi").status_code == 204
        )
        assert client.get(hub_url(hub, "cam-1")).json() == []
        # Another device's routes are not its own.
        assert_hub_error(client.get(hub_url(hub, "cam-9")), 401, "IotHubUnauthorizedAccess")

    # Individual X.509: a self-signed cert matched by thumbprint.
    own = ca.CertificateAuthority.root("selfie")
    cert, key = own.issue_leaf("selfie")  # issued by a CA only the TLS layer trusts
    cloud.dps.trust_client_cert(own.cert)
    cloud.dps.add_x509_enrollment("selfie", cert)
    ca.write_certs(tmp_path / "s.pem", [cert])
    ca.write_key(tmp_path / "s.key", key)
    other, other_key = own.issue_leaf("selfie")  # same CN, not the enrolled cert
    ca.write_certs(tmp_path / "o.pem", [other])
    ca.write_key(tmp_path / "o.key", other_key)
    with http(cloud, (tmp_path / "o.pem", tmp_path / "o.key")) as client:
        assert_dps_error(register(client, cloud, "selfie"), 401, 401002)
    with http(cloud, (tmp_path / "s.pem", tmp_path / "s.key")) as client:
        assert provision(client, cloud, "selfie")["status"] == "assigned"
    device = cloud.hub.device("selfie")
    assert device is not None and device.auth_type == "selfSigned"


def test_bad_tokens_are_401_with_dps_error_body(cloud: Cloud) -> None:
    e = cloud.dps.add_symmetric_enrollment("dev-1")
    key = e.primary_key or ""
    audience = f"{cloud.id_scope}/registrations/dev-1"
    with http(cloud) as client:
        bad_sig = dps_token(cloud, "dev-1", base64.b64encode(b"x" * 32).decode())
        expired = dps_token(cloud, "dev-1", key, expiry=int(time.time()) - 5)
        wrong_resource = dps_token(cloud, "dev-2", key)
        no_skn = sas.make_token(audience, key)
        for token in (bad_sig, expired, wrong_resource, no_skn, None, "Basic abc"):
            assert_dps_error(register(client, cloud, "dev-1", token), 401, 401002)
        unknown = dps_token(cloud, "nobody", key)
        assert_dps_error(register(client, cloud, "nobody", unknown), 401, 401002)
        good = dps_token(cloud, "dev-1", key)
        operation_id = register(client, cloud, "dev-1", good).json()["operationId"]
        assert_dps_error(poll(client, cloud, "dev-1", operation_id, expired), 401, 401002)
        assert_dps_error(poll(client, cloud, "dev-1", "nope", good), 404, 404202)
        # Body and URL ids must agree; the api-version and the scope must be there.
        mismatch = register(client, cloud, "dev-1", good, {"registrationId": "dev-2"})
        assert_dps_error(mismatch, 400, 400004)
        base = f"{cloud.dps_url}/{cloud.id_scope}/registrations/dev-1/register"
        no_version = client.put(
            base, json={"registrationId": "dev-1"}, headers={"authorization": good}
        )
        assert_dps_error(no_version, 400, 400004)
        other_scope = client.put(
            f"{cloud.dps_url}/0neOTHER/registrations/dev-1/register?{DPS_API}",
            json={"registrationId": "dev-1"},
            headers={"authorization": good},
        )
        assert_dps_error(other_scope, 404, 404201)
    errors = [r.error for r in cloud.dps.requests[:3]]
    assert (
        "signature" in str(errors[0]) and "expired" in str(errors[1]) and "is for" in str(errors[2])
    )


def test_disabled_enrollment_fails(cloud: Cloud) -> None:
    e = cloud.dps.add_symmetric_enrollment("off", enabled=False)
    with http(cloud) as client:
        result = provision(client, cloud, "off", dps_token(cloud, "off", e.primary_key or ""))
    assert result["status"] == "failed"
    state = result["registrationState"]
    assert state["registrationId"] == "off" and state["status"] == "disabled"
    assert isinstance(state["errorCode"], int) and state["errorMessage"]
    assert cloud.hub.device("off") is None

    # A disabled individual enrollment is not rescued by a group.
    group = cloud.dps.add_symmetric_group("g")
    derived = sas.derive_device_key(group.primary_key or "", "off")
    with http(cloud) as client:
        assert_dps_error(
            register(client, cloud, "off", dps_token(cloud, "off", derived)), 401, 401002
        )

    # Disabling after registration fails the pending operation; the misbehaviour does it too.
    group_member = dps_token(cloud, "m", sas.derive_device_key(group.primary_key or "", "m"))
    with http(cloud) as client:
        operation_id = register(client, cloud, "m", group_member).json()["operationId"]
        cloud.dps.set_enabled("g", False, group=True)
        assert poll(client, cloud, "m", operation_id, group_member).json()["status"] == "assigning"
        assert poll(client, cloud, "m", operation_id, group_member).json()["status"] == "failed"
        cloud.dps.set_enabled("g", True, group=True)
        cloud.dps.misbehave("disabled", count=1)
        assert provision(client, cloud, "m", group_member)["status"] == "failed"
        assert provision(client, cloud, "m", group_member)["status"] == "assigned"


def test_tpm_challenge_then_sas_with_the_delivered_key(cloud: Cloud) -> None:
    ek, srk = b"\x00\x3aEK-public-area", b"\x00\x3aSRK-public-area"
    cloud.dps.add_tpm_enrollment("tpm-dev", ek)
    tpm = {
        "endorsementKey": base64.b64encode(ek).decode(),
        "storageRootKey": base64.b64encode(srk).decode(),
    }
    with http(cloud) as client:
        bad = {"registrationId": "tpm-dev", "tpm": {**tpm, "endorsementKey": "AAAA"}}
        assert_dps_error(register(client, cloud, "tpm-dev", None, bad), 401, 401002)
        challenge = register(
            client, cloud, "tpm-dev", None, {"registrationId": "tpm-dev", "tpm": tpm}
        )
        assert challenge.status_code == 401
        assert set(challenge.json()) == {"authenticationKey"}
        key = base64.b64decode(challenge.json()["authenticationKey"])
        assert key == cloud.dps.tpm_auth_key("tpm-dev") and len(key) == 32
        result = provision(client, cloud, "tpm-dev", dps_token(cloud, "tpm-dev", key))
    assert result["status"] == "assigned"
    assert base64.b64decode(result["registrationState"]["tpm"]["authenticationKey"]) == key
    device = cloud.hub.device("tpm-dev")
    assert device is not None and device.primary_key == base64.b64encode(key).decode()
    assert cloud.dps.requests[1].auth == "tpm-challenge"


def test_dps_throttle_and_errors(cloud: Cloud) -> None:
    e = cloud.dps.add_symmetric_enrollment("d")
    token = dps_token(cloud, "d", e.primary_key or "")
    with http(cloud) as client:
        cloud.dps.misbehave("throttle", count=1, seconds=7)
        throttled = register(client, cloud, "d", token)
        assert_dps_error(throttled, 429, 429001)
        assert throttled.headers["retry-after"] == "7"
        cloud.dps.misbehave("error", count=1, status=503)
        assert register(client, cloud, "d", token).status_code == 503
        cloud.dps.misbehave("empty_error", count=1)
        empty = register(client, cloud, "d", token)
        assert (empty.status_code, empty.content) == (500, b"")
        cloud.dps.misbehave("unauthorized", count=1)
        assert_dps_error(register(client, cloud, "d", token), 401, 401002)
        assert register(client, cloud, "d", token).status_code == 202
    assert [r.misbehaviour for r in cloud.dps.requests] == [
        "throttle",
        "error",
        "empty_error",
        "unauthorized",
        None,
    ]


def test_switch_hub_on_reprovision(cloud: Cloud) -> None:
    client, hub, key = provisioned(cloud, "mover")
    device_token = sas.make_token(f"{hub}/devices/mover", key)
    assert (
        client.put(
            hub_url(hub, "mover", "modules/m"),
            json={"moduleId": "m"},
            headers={"authorization": device_token},
        ).status_code
        == 200
    )
    cloud.dps.misbehave("switch_hub", count=1)
    token = dps_token(cloud, "mover", key)
    moved = provision(client, cloud, "mover", token)["registrationState"]
    assert moved["assignedHub"] == cloud.hub.hostnames[1] != hub
    assert moved["substatus"] == "deviceDataMigrated"
    # The new hub has the device but none of its modules; both hubs answer on the same port.
    new_hub = moved["assignedHub"]
    new_token = sas.make_token(f"{new_hub}/devices/mover", key)
    assert client.get(hub_url(new_hub, "mover"), headers={"authorization": new_token}).json() == []
    assert (
        len(client.get(hub_url(hub, "mover"), headers={"authorization": device_token}).json()) == 1
    )
    # A token for the old hub does not open the new one.
    assert_hub_error(
        client.get(hub_url(new_hub, "mover"), headers={"authorization": device_token}),
        401,
        "IotHubUnauthorizedAccess",
    )
    # Without the misbehaviour a re-registration keeps the hub it names.
    again = provision(client, cloud, "mover", token)["registrationState"]
    assert again["assignedHub"] == hub and again["substatus"] == "deviceDataMigrated"
    client.close()


# -- IoT Hub -----------------------------------------------------------------------------------


def test_module_crud_with_device_sas(cloud: Cloud) -> None:
    client, hub, key = provisioned(cloud)

    def auth() -> dict[str, str]:
        return {"authorization": sas.make_token(f"{hub}/devices/dev-1", key)}

    url = hub_url(hub, "dev-1", "modules/mod-a")
    assert client.get(hub_url(hub, "dev-1"), headers=auth()).json() == []
    created = client.put(url, json={"moduleId": "mod-a", "deviceId": "dev-1"}, headers=auth())
    assert created.status_code == 200
    module = created.json()
    assert (module["moduleId"], module["deviceId"]) == ("mod-a", "dev-1")
    assert module["generationId"].isdigit() and len(module["generationId"]) == 18
    assert module["authentication"]["type"] == "sas"
    assert len(base64.b64decode(module["authentication"]["symmetricKey"]["primaryKey"])) == 32
    assert "managedBy" not in module

    again = client.put(url, json={"moduleId": "mod-a", "deviceId": "dev-1"}, headers=auth())
    assert_hub_error(again, 409, "ModuleAlreadyExistsOnDevice")

    primary = base64.b64encode(b"p" * 32).decode()
    secondary = base64.b64encode(b"s" * 32).decode()
    update = {
        "moduleId": "mod-a",
        "deviceId": "dev-1",
        "authentication": {
            "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary},
            "type": "sas",
        },
    }
    updated = client.put(url, json=update, headers={**auth(), "if-match": "*"})
    assert updated.status_code == 200
    assert updated.json()["generationId"] == module["generationId"]
    assert updated.json()["etag"] != module["etag"]
    assert updated.json()["authentication"]["symmetricKey"] == {
        "primaryKey": primary,
        "secondaryKey": secondary,
    }
    stale = client.put(url, json=update, headers={**auth(), "if-match": f'"{module["etag"]}"'})
    assert_hub_error(stale, 412, "PreconditionFailed")
    missing = client.put(
        hub_url(hub, "dev-1", "modules/nope"),
        json=update | {"moduleId": "nope"},
        headers={**auth(), "if-match": "*"},
    )
    assert_hub_error(missing, 404, "ModuleNotFound")
    short_key = {"authentication": {"symmetricKey": {"primaryKey": "AAAA"}, "type": "sas"}}
    assert_hub_error(
        client.put(url, json=short_key, headers={**auth(), "if-match": "*"}), 400, "ArgumentInvalid"
    )
    assert_hub_error(
        client.put(url, json={"moduleId": "other"}, headers=auth()), 400, "ArgumentInvalid"
    )

    got = client.get(url, headers=auth())
    assert got.json() == updated.json() and got.headers["etag"] == f'"{updated.json()["etag"]}"'
    assert [m["moduleId"] for m in client.get(hub_url(hub, "dev-1"), headers=auth()).json()] == [
        "mod-a"
    ]

    deleted = client.delete(url, headers={**auth(), "if-match": "*"})
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert_hub_error(client.get(url, headers=auth()), 404, "ModuleNotFound")
    assert_hub_error(client.delete(url, headers={**auth(), "if-match": "*"}), 404, "ModuleNotFound")

    # Percent-encoded path segments are decoded, as a server does.
    encoded = hub_url(hub, "dev-1", "modules/acc%41mod")
    assert (
        client.put(encoded, json={"deviceId": "dev-1"}, headers=auth()).json()["moduleId"]
        == "accAmod"
    )

    # A token for another device, no token, a module route as a module: all 401.
    other = sas.make_token(f"{hub}/devices/dev-2", key)
    assert_hub_error(
        client.get(url, headers={"authorization": other}), 401, "IotHubUnauthorizedAccess"
    )
    assert_hub_error(client.get(url), 401, "IotHubUnauthorizedAccess")
    assert_hub_error(
        client.get(
            hub_url(hub, "ghost"),
            headers={"authorization": sas.make_token(f"{hub}/devices/ghost", key)},
        ),
        401,
        "IotHubUnauthorizedAccess",
    )
    assert_hub_error(
        client.get(hub_url(hub, "dev-1", "modules/mod-a").replace(f"?{HUB_API}", "")),
        400,
        "ArgumentInvalid",
    )
    assert [r.auth for r in cloud.hub.requests[:2]] == ["sas", "sas"]
    client.close()


def test_telemetry_proves_module_tokens(cloud: Cloud) -> None:
    client, hub, key = provisioned(cloud)
    device_auth = {"authorization": sas.make_token(f"{hub}/devices/dev-1", key)}
    module_key = base64.b64encode(
        hmac.new(b"master", b"mod:1:primary", hashlib.sha256).digest()
    ).decode()
    body = {
        "authentication": {
            "symmetricKey": {"primaryKey": module_key, "secondaryKey": module_key},
            "type": "sas",
        }
    }
    client.put(hub_url(hub, "dev-1", "modules/mod"), json={"moduleId": "mod"}, headers=device_auth)
    client.put(
        hub_url(hub, "dev-1", "modules/mod"), json=body, headers={**device_auth, "if-match": "*"}
    )

    events = hub_url(hub, "dev-1", "modules/mod/messages/events")
    good = sas.make_token(f"{hub}/devices/dev-1/modules/mod", module_key)
    accepted = client.post(events, content=b'{"t": 21}', headers={"authorization": good})
    assert accepted.status_code == 204
    for bad in (
        sas.make_token(f"{hub}/devices/dev-1/modules/mod", key),  # the device's key
        sas.make_token(f"{hub}/devices/dev-1", module_key),  # the device's resource
        sas.make_token(f"{hub}/devices/dev-1/modules/mod", module_key, expiry=int(time.time()) - 1),
        device_auth["authorization"],
    ):
        assert_hub_error(
            client.post(events, content=b"x", headers={"authorization": bad}),
            401,
            "IotHubUnauthorizedAccess",
        )
    device_events = hub_url(hub, "dev-1", "messages/events")
    assert client.post(device_events, content=b"d", headers=device_auth).status_code == 204
    assert_hub_error(
        client.post(device_events, content=b"d", headers={"authorization": good}),
        401,
        "IotHubUnauthorizedAccess",
    )
    assert [(m.device_id, m.module_id, m.body) for m in cloud.hub.messages] == [
        ("dev-1", "mod", b'{"t": 21}'),
        ("dev-1", None, b"d"),
    ]
    client.close()


def test_hub_throttle_errors_and_unauthorized(cloud: Cloud) -> None:
    client, hub, key = provisioned(cloud)
    auth = {"authorization": sas.make_token(f"{hub}/devices/dev-1", key)}
    cloud.hub.misbehave("throttle", count=2, seconds=3)
    for _ in range(2):
        throttled = client.get(hub_url(hub, "dev-1"), headers=auth)
        assert_hub_error(throttled, 429, "ThrottlingException")
        assert throttled.headers["retry-after"] == "3"
    assert client.get(hub_url(hub, "dev-1"), headers=auth).status_code == 200
    cloud.hub.misbehave("error", count=1)
    assert_hub_error(client.get(hub_url(hub, "dev-1"), headers=auth), 500, "ServerError")
    cloud.hub.misbehave("empty_error", count=1)
    empty = client.get(hub_url(hub, "dev-1"), headers=auth)
    assert (empty.status_code, empty.content) == (500, b"")
    cloud.hub.misbehave("unauthorized")
    assert_hub_error(
        client.get(hub_url(hub, "dev-1"), headers=auth), 401, "IotHubUnauthorizedAccess"
    )
    cloud.hub.behave("unauthorized")
    assert client.get(hub_url(hub, "dev-1"), headers=auth).status_code == 200
    with pytest.raises(ValueError, match="unknown misbehaviour"):
        cloud.hub.misbehave("switch_hub")
    client.close()


def test_slow_and_refuse(cloud: Cloud) -> None:
    client, hub, key = provisioned(cloud)
    auth = {"authorization": sas.make_token(f"{hub}/devices/dev-1", key)}
    cloud.hub.misbehave("slow", count=1, seconds=0.4)
    started = time.monotonic()
    assert client.get(hub_url(hub, "dev-1"), headers=auth).status_code == 200
    assert time.monotonic() - started >= 0.4
    port = cloud.dps.port
    cloud.dps.misbehave("refuse")
    with pytest.raises(httpx.TransportError):
        register(client, cloud, "dev-1", None)
    cloud.dps.behave()
    assert cloud.dps.port == port
    assert register(client, cloud, "dev-1", None).status_code == 401
    client.close()


# -- command line ------------------------------------------------------------------------------


def _run_module(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "mockcloud", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_cloud_help() -> None:
    process = _run_module("cloud", "--help")
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "usage: python -m mockcloud cloud" in out
    for option in ("--symmetric", "--group", "--x509-group", "--tpm", "--disabled", "--misbehave"):
        assert option in out


def test_cloud_command_line(tmp_path: Path) -> None:
    key = base64.b64encode(b"k" * 32).decode()
    process = _run_module(
        "cloud", "--dir", str(tmp_path), "--id-scope", SCOPE,
        "--symmetric", f"dev-1={key}", "--group", "g", "--x509-group", "xg",
        "--x509-device", "xg:cam", "--misbehave", "hub:throttle:count=1,seconds=9",
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = {}
        while True:
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            if line.strip() == "ready":
                break
            name, _, value = line.rstrip("\n").partition(": ")
            lines[name] = value
        assert lines["symmetric[dev-1]"].split(" ")[0] == key
        assert lines["id_scope"] == SCOPE and Path(lines["x509_group_ca[xg]"]).is_file()
        context = ssl.create_default_context(cafile=lines["server_ca"])
        with httpx.Client(verify=context, timeout=10) as client:
            url = f"{lines['dps_url']}/{SCOPE}/registrations/dev-1"
            token = sas.make_token(f"{SCOPE}/registrations/dev-1", key, policy="registration")
            first = client.put(
                f"{url}/register?{DPS_API}",
                json={"registrationId": "dev-1"},
                headers={"authorization": token},
            )
            assert first.status_code == 202
            done = client.get(
                f"{url}/operations/{first.json()['operationId']}?{DPS_API}",
                headers={"authorization": token},
            )
            hub = done.json()["registrationState"]["assignedHub"]
            assert hub == lines["hub_hostname"]
            auth = {"authorization": sas.make_token(f"{hub}/devices/dev-1", key)}
            throttled = client.get(hub_url(hub, "dev-1"), headers=auth)
            assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "9")
            assert client.get(hub_url(hub, "dev-1"), headers=auth).json() == []
        cert, key_path = lines["x509_identity[cam]"].split(" ")
        context.load_cert_chain(cert, key_path)
        with httpx.Client(verify=context, timeout=10) as client:
            first = client.put(
                f"{lines['dps_url']}/{SCOPE}/registrations/cam/register?{DPS_API}",
                json={"registrationId": "cam"},
            )
            assert first.status_code == 202
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
