"""identityd end to end: a real aziotd (keyd + identityd) provisions itself with mockcloud's DPS
over HTTPS, reconciles its principals' module identities with the mock IoT Hub, and hands out
identities whose key handles sign SAS tokens the hub accepts (its telemetry endpoint is the
proof). Also: the provisioning backup at restart, offline start, reprovisioning, manual
provisioning, the API's errors and authorization.
"""

from __future__ import annotations

import base64
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from mockcloud import sas as mock_sas
from mockcloud.cloud import Cloud
from tests.daemon import Daemon, ServiceDir, Snippet, keyd_config

if TYPE_CHECKING:
    from cryptography import x509

VERSION = "2022-08-01"
MODULE_UID = 4242


def write_device_key(root: Path, key: str) -> Path:
    path = root / "device-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(key))
    return path


def dps_config(cloud: Cloud, registration_id: str, principals: str = "") -> str:
    def config(service: ServiceDir) -> str:
        return f"""
hostname = "my-device"
homedir = "{service.home}"

[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}"
scope_id = "{cloud.id_scope}"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "{registration_id}"
symmetric_key = "device-key"
{principals}"""

    return config  # type: ignore[return-value]


MODULE_PRINCIPAL = f"""
[[principal]]
uid = {MODULE_UID}
name = "mod1"
idtype = ["module"]
"""


@pytest.fixture
def cloud(world_dir: Path) -> Iterator[Cloud]:
    with Cloud(world_dir / "cloud") as cloud:
        yield cloud


def start(world_dir: Path, cloud: Cloud, identityd: object, key: str, **options: object) -> Daemon:
    key_file = write_device_key(world_dir / "secrets", key)

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\ndevice-key = "file://{key_file}"\n'

    env = {"SSL_CERT_FILE": str(cloud.server_ca_pem_path), "NO_PROXY": "*"}
    env.update(options.pop("env", {}))  # type: ignore[arg-type]
    daemon = Daemon(world_dir / "d", {"keyd": keyd, "identityd": identityd}, env=env)
    return daemon.start()


def get(daemon: Daemon, path: str, **options: object):  # noqa: ANN201
    return daemon.request("identityd", "GET", path, **options)


def sign_with(daemon: Daemon, handle: str, data: bytes) -> bytes:
    body = {"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": ""}}
    body["parameters"]["message"] = base64.b64encode(data).decode()
    reply = daemon.request("keyd", "POST", "/sign", body)
    assert reply.status == 200, reply.body
    return base64.b64decode(reply.json()["signature"])


def token_from_keyd(daemon: Daemon, audience: str, handle: str) -> str:
    """A SAS token per spec/provisioning.md §7, signed by keyd with the identity's handle."""
    sr = mock_sas.encode_resource(audience)
    se = str(int(time.time()) + 60)
    sig = base64.b64encode(sign_with(daemon, handle, f"{sr}\n{se}".encode())).decode()
    return f"SharedAccessSignature sr={sr}&sig={mock_sas.form_urlencode(sig)}&se={se}"


def telemetry(cloud: Cloud, path: str, token: str) -> int:
    url = f"https://{cloud.hub_hostname}{path}?api-version=2020-03-13"
    context = ssl.create_default_context(cafile=str(cloud.server_ca_pem_path))
    with httpx.Client(verify=context) as client:
        return client.post(url, headers={"Authorization": token}, content=b"hello").status_code


def test_dps_provisioning_and_a_module_token_the_hub_accepts(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("my-device")
    daemon = start(
        world_dir, cloud, dps_config(cloud, "my-device", MODULE_PRINCIPAL), enrollment.primary_key
    )
    try:
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200, reply.body
        spec = reply.json()["spec"]
        assert reply.json()["type"] == "aziot"
        assert spec["hubName"] == cloud.hub_hostname == spec["gatewayHost"]
        assert spec["deviceId"] == "my-device"
        assert spec["auth"]["type"] == "sas" and "keyHandle" in spec["auth"]
        # The device's handle signs a token the hub takes.
        audience = f"{spec['hubName']}/devices/my-device"
        token = token_from_keyd(daemon, audience, spec["auth"]["keyHandle"])
        assert telemetry(cloud, "/devices/my-device/messages/events", token) == 204
        # Reconciliation made mod1 in the hub; its handle signs module tokens the hub takes.
        assert cloud.hub.module("my-device", "mod1") is not None
        reply = get(daemon, "/identities/modules/mod1?type=aziot")
        assert reply.status == 200, reply.body
        module = reply.json()["spec"]
        assert module["moduleId"] == "mod1" and module["genId"]
        audience = f"{spec['hubName']}/devices/my-device/modules/mod1"
        token = token_from_keyd(daemon, audience, module["auth"]["keyHandle"])
        assert telemetry(cloud, "/devices/my-device/modules/mod1/messages/events", token) == 204
        # The state on disk, as the original lays it out.
        home = daemon.services["identityd"].home
        info = (home / "device_info").read_text()
        assert 'device_id = "my-device"' in info and cloud.hub_hostname in info
        assert "mod1" in (home / "prev_state").read_text()
    finally:
        daemon.stop()


def test_module_create_list_update_delete(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev2")
    daemon = start(world_dir, cloud, dps_config(cloud, "dev2"), enrollment.primary_key)
    try:
        body = {"type": "aziot", "moduleId": "made"}
        reply = daemon.request("identityd", "POST", "/identities/modules", body)
        assert reply.status == 200, reply.body
        first = reply.json()["spec"]
        assert first["moduleId"] == "made" and first["auth"]["type"] == "sas"
        listed = get(daemon, "/identities/modules?type=aziot").json()["identities"]
        assert [i["spec"]["moduleId"] for i in listed] == ["made"]
        assert "auth" not in listed[0]["spec"]
        # Creating it again: the hub's 409, answered 404 "Hub client error" as the original.
        again = daemon.request("identityd", "POST", "/identities/modules", body)
        assert again.status == 404
        assert again.json()["message"].startswith("Hub client error\ncaused by: ")
        updated = daemon.request("identityd", "PUT", "/identities/modules/made?type=aziot", {})
        assert updated.status == 200, updated.body
        assert updated.json()["spec"]["genId"] == first["genId"]
        deleted = daemon.request("identityd", "DELETE", "/identities/modules/made?type=aziot")
        assert deleted.status == 204
        assert cloud.hub.module("dev2", "made") is None
    finally:
        daemon.stop()


ORIGINAL_ANSWERS = [
    (
        "GET",
        "/identities/modules",
        None,
        400,
        'parameter "type" has an invalid value\ncaused by: missing parameter',
    ),
    (
        "GET",
        "/identities/modules?type=local",
        None,
        400,
        'parameter "type" has an invalid value\ncaused by: invalid type: local',
    ),
    (
        "POST",
        "/identities/modules",
        {"type": "aziot", "moduleId": " "},
        400,
        'parameter "module_id" has an invalid value\ncaused by: module name cannot be empty',
    ),
    ("POST", "/identities/modules", {"moduleId": "x"}, 422, None),
    ("POST", "/identities/device", None, 400, "missing request body"),
    ("GET", "/identities/provisioning?api-version=2020-09-01", None, 404, "not found"),
    ("GET", "/trust-bundle", None, 200, None),
]


def test_the_original_answers(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev3")
    daemon = start(world_dir, cloud, dps_config(cloud, "dev3"), enrollment.primary_key)
    try:
        for method, path, body, status, message in ORIGINAL_ANSWERS:
            reply = daemon.request("identityd", method, path, body)
            assert reply.status == status, (path, reply.body)
            if message is not None:
                assert reply.json() == {"message": message}, path
            if path == "/trust-bundle":
                assert reply.json() == {"certificate": ""}
    finally:
        daemon.stop()


def test_the_backup_is_used_at_restart_and_offline(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev4")
    daemon = start(
        world_dir, cloud, dps_config(cloud, "dev4", MODULE_PRINCIPAL), enrollment.primary_key
    )
    try:
        registrations = [r for r in cloud.dps.requests if r.method == "PUT"]
        assert len(registrations) == 1
        daemon.stop()
        # The cloud is gone: the backup still gives the device and its module identities.
        cloud.dps.misbehave("refuse")
        cloud.hub.misbehave("refuse")
        daemon.start()
        assert len([r for r in cloud.dps.requests if r.method == "PUT"]) == 1
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200 and reply.json()["spec"]["deviceId"] == "dev4"
        module = get(daemon, "/identities/modules/mod1?type=aziot")
        assert module.status == 200, module.body
        assert "served from the backups" in daemon.logs() or "offline" in daemon.logs()
    finally:
        daemon.stop()


def test_provisioning_route_and_reprovision(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev5")
    daemon = start(world_dir, cloud, dps_config(cloud, "dev5"), enrollment.primary_key)
    try:
        reply = get(daemon, "/identities/provisioning")
        assert reply.status == 200
        assert reply.json() == {
            "source": "dps",
            "auth": "symmetric_key",
            "endpoint": cloud.dps_url.rstrip("/") + "/",
            "scope_id": cloud.id_scope,
            "registration_id": "dev5",
            "payload": None,
        }
        before = len([r for r in cloud.dps.requests if r.method == "PUT"])
        reply = daemon.request(
            "identityd", "POST", "/identities/device/reprovision", {"type": "aziot"}
        )
        assert reply.status == 204, reply.body
        assert len([r for r in cloud.dps.requests if r.method == "PUT"]) == before + 1
    finally:
        daemon.stop()


def test_manual_sas_and_unknown_callers(world_dir: Path, cloud: Cloud) -> None:
    from tests.test_daemon import NOBODY, as_uid

    cloud.hub.add_device("manual-dev", primary_key=base64.b64encode(os.urandom(32)).decode())
    key = cloud.hub.device("manual-dev").primary_key

    def config(service: ServiceDir) -> str:
        return f"""
hostname = "h"
homedir = "{service.home}"
[provisioning]
source = "manual"
iothub_hostname = "{cloud.hub_hostname}"
device_id = "manual-dev"
[provisioning.authentication]
method = "sas"
device_id_pk = "device-key"
"""

    daemon = start(world_dir, cloud, config, key)
    try:
        reply = daemon.request("identityd", "POST", "/identities/device", {"type": "aziot"})
        assert reply.status == 200, reply.body
        assert reply.json()["spec"]["deviceId"] == "manual-dev"
        assert get(daemon, "/identities/provisioning").json() == {
            "source": "manual",
            "auth": "sas",
        }
        socket = str(daemon.services["identityd"].socket)
        os.chmod(socket, 0o666)
        status, body = as_uid(NOBODY, socket, "GET", f"/identities/identity?api-version={VERSION}")
        assert (status, body) == (401, {"message": "authorization error"})
        status, body = as_uid(NOBODY, socket, "GET", f"/trust-bundle?api-version={VERSION}")
        assert (status, body) == (200, {"certificate": ""})
    finally:
        daemon.stop()


def test_config_changes_are_picked_up_without_a_restart(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev6")
    other = cloud.dps.add_symmetric_enrollment("dev6b", primary_key=enrollment.primary_key)
    assert other
    daemon = start(world_dir, cloud, dps_config(cloud, "dev6"), enrollment.primary_key)
    try:
        config_dir = daemon.services["identityd"].config_dir
        # A new module principal in config.d: reconciled into the hub.
        (config_dir / "50-module.toml").write_text(MODULE_PRINCIPAL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cloud.hub.module("dev6", "mod1") is None:
            time.sleep(0.2)
        assert cloud.hub.module("dev6", "mod1") is not None
        assert "the config files changed; reloading" in daemon.logs()
        # A new registration id: the backup is dropped and the device provisions again.
        config = daemon.services["identityd"].config
        config.write_text(config.read_text().replace('"dev6"', '"dev6b"'))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            reply = get(daemon, "/identities/identity")
            if reply.status == 200 and reply.json()["spec"]["deviceId"] == "dev6b":
                break
            time.sleep(0.2)
        assert get(daemon, "/identities/identity").json()["spec"]["deviceId"] == "dev6b"
        assert "the provisioning settings changed; provisioning again" in daemon.logs()
        info_file = daemon.services["identityd"].home / "device_info"
        deadline = time.monotonic() + 10  # written once the reconciliation is done
        while time.monotonic() < deadline and not info_file.exists():
            time.sleep(0.1)
        assert 'device_id = "dev6b"' in info_file.read_text()
    finally:
        daemon.stop()


def make_ca(directory: Path) -> tuple[Path, Path, object]:
    """A device CA made here with `cryptography`: its cert and PKCS#8 key as files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test device CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert


def local_ca_issuing(world_dir: Path) -> tuple[x509.Certificate, Snippet, Snippet]:
    """A local CA whose key keyd holds and from which certd issues `device-id`: the CA cert,
    and keyd's and certd's config snippets."""
    ca_pem, ca_key, ca_cert = make_ca(world_dir / "ca")

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\nlocal-ca = "file://{ca_key}"\n'

    def certd(service: ServiceDir) -> str:
        return f"""homedir_path = "{service.home}"
[cert_issuance]
local_ca = {{ cert = "local-ca", pk = "local-ca" }}
device-id = {{ method = "local_ca" }}
[preloaded_certs]
local-ca = "file://{ca_pem}"
"""

    return ca_cert, keyd, certd


def test_dps_x509_with_an_identity_cert_issued_through_certd(world_dir: Path, cloud: Cloud) -> None:
    from cryptography import x509

    ca_cert, keyd, certd = local_ca_issuing(world_dir)
    cloud.dps.add_x509_group("x509-group", ca_cert)

    def identityd(service: ServiceDir) -> str:
        return f"""hostname = "x509-dev"
homedir = "{service.home}"
[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}"
scope_id = "{cloud.id_scope}"
[provisioning.attestation]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"
registration_id = "x509-dev"
{MODULE_PRINCIPAL}"""

    env = {"SSL_CERT_FILE": str(cloud.server_ca_pem_path), "NO_PROXY": "*"}
    services = {"keyd": keyd, "certd": certd, "identityd": identityd}
    daemon = Daemon(world_dir / "d", services, env=env).start()
    try:
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200, reply.body
        spec = reply.json()["spec"]
        assert spec["deviceId"] == "x509-dev"
        assert spec["auth"]["type"] == "x509" and spec["auth"]["certId"] == "device-id"
        # The identity cert certd issued: CN = the registration id, from the device CA, for
        # keyd's key pair `device-id` (RSA-2048, as the original makes it).
        pem = daemon.request("certd", "GET", "/certificates/device-id").json()["pem"]
        leaf = x509.load_pem_x509_certificates(pem.encode())[0]
        assert leaf.subject.rfc4514_string() == "CN=x509-dev"
        leaf.verify_directly_issued_by(ca_cert)
        assert leaf.public_key().key_size == 2048
        # DPS saw the client cert in the TLS handshake; no SAS token was sent.
        registers = [r for r in cloud.dps.requests if r.method == "PUT"]
        assert registers and all(r.auth == "x509" for r in registers), registers
        assert all("authorization" not in r.headers for r in registers)
        # The hub was reached with the same cert: the module exists and its token works.
        assert cloud.hub.module("x509-dev", "mod1") is not None
        module = get(daemon, "/identities/modules/mod1?type=aziot").json()["spec"]
        audience = f"{spec['hubName']}/devices/x509-dev/modules/mod1"
        token = token_from_keyd(daemon, audience, module["auth"]["keyHandle"])
        assert telemetry(cloud, "/devices/x509-dev/modules/mod1/messages/events", token) == 204
        provisioning = get(daemon, "/identities/provisioning").json()
        assert provisioning["auth"] == "x509" and provisioning["registration_id"] == "x509-dev"
    finally:
        daemon.stop()


def test_local_identities_issued_through_certd(world_dir: Path, cloud: Cloud) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_pem, ca_key, ca_cert = make_ca(world_dir / "ca")

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\nlocal-ca = "file://{ca_key}"\n'

    def certd(service: ServiceDir) -> str:
        return f"""homedir_path = "{service.home}"
[cert_issuance]
local_ca = {{ cert = "local-ca", pk = "local-ca" }}
web = {{ method = "local_ca" }}
adhoc = {{ method = "local_ca" }}
[preloaded_certs]
local-ca = "file://{ca_pem}"
"""

    def identityd(service: ServiceDir) -> str:
        return f"""hostname = "gw"
homedir = "{service.home}"
[provisioning]
source = "none"
[localid]
domain = "example.local"
[[principal]]
uid = 4243
name = "web"
idtype = ["local"]
localid = {{ type = "x509", attributes = "server" }}
"""

    services = {"keyd": keyd, "certd": certd, "identityd": identityd}
    daemon = Daemon(world_dir / "d", services).start()
    try:
        reply = get(daemon, "/identities/modules/web?type=local")
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["type"] == "local" and body["spec"]["moduleId"] == "web"
        auth = body["spec"]["auth"]
        key = serialization.load_pem_private_key(auth["privateKey"].encode(), None)
        leaf = x509.load_pem_x509_certificates(auth["certificate"].encode())[0]
        assert leaf.public_key() == key.public_key() and key.key_size == 2048
        assert leaf.subject.rfc4514_string() == "CN=web.gw.example.local"
        leaf.verify_directly_issued_by(ca_cert)
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
        assert auth["expiration"] == leaf.not_valid_after_utc.isoformat()
        assert auth["expiration"].endswith("+00:00")
        # A new key at every call.
        again = get(daemon, "/identities/modules/web?type=local").json()["spec"]["auth"]
        assert again["privateKey"] != auth["privateKey"]
        # POST type=local: a principal's id is refused; another gets a client identity.
        body = {"type": "local", "moduleId": "web"}
        reply = daemon.request("identityd", "POST", "/identities/modules", body)
        assert (reply.status, reply.json()) == (
            400,
            {
                "message": 'parameter "moduleId" has an invalid value\n'
                "caused by: local identity for web already exists"
            },
        )
        body = {"type": "local", "moduleId": "adhoc", "localIdOpts": {"bogus": 1}}
        reply = daemon.request("identityd", "POST", "/identities/modules", body)
        assert reply.status == 200, reply.body
        cert = reply.json()["spec"]["auth"]["certificate"]
        leaf = x509.load_pem_x509_certificates(cert.encode())[0]
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        reply = get(daemon, "/identities/modules/other?type=local")
        assert reply.json() == {
            "message": 'parameter "moduleId" has an invalid value\n'
            "caused by: local identity for other doesn't exist"
        }
        # source = none: no device.
        reply = daemon.request("identityd", "POST", "/identities/device", {"type": "aziot"})
        assert (reply.status, reply.json()) == (400, {"message": "device identity not found"})
    finally:
        daemon.stop()


def test_a_hub_outage_during_reconciliation_is_retried(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev7")
    cloud.hub.misbehave("refuse")
    daemon = start(
        world_dir, cloud, dps_config(cloud, "dev7", MODULE_PRINCIPAL), enrollment.primary_key
    )
    try:
        # Provisioned by DPS, the hub unreachable: serving, nothing reconciled or backed up yet.
        assert get(daemon, "/identities/identity").json()["spec"]["deviceId"] == "dev7"
        home = daemon.services["identityd"].home
        assert not (home / "device_info").exists()
        cloud.hub.behave()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and cloud.hub.module("dev7", "mod1") is None:
            time.sleep(0.2)
        assert cloud.hub.module("dev7", "mod1") is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (home / "device_info").exists():
            time.sleep(0.1)
        assert 'device_id = "dev7"' in (home / "device_info").read_text()
        assert "reconciliation done after the hub came back" in daemon.logs()
    finally:
        daemon.stop()


def test_a_caller_polling_its_identity_does_not_hammer_the_hub(
    world_dir: Path, cloud: Cloud
) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev8")
    daemon = start(
        world_dir, cloud, dps_config(cloud, "dev8", MODULE_PRINCIPAL), enrollment.primary_key
    )
    try:
        cloud.hub.clear_requests()
        for _ in range(30):
            reply = get(daemon, "/identities/modules/mod1?type=aziot")
            assert reply.status == 200, reply.body
        gets = [r for r in cloud.hub.requests if r.method == "GET" and r.path.endswith("/mod1")]
        assert 1 <= len(gets) <= 3, len(gets)  # one per 5 s at most
    finally:
        daemon.stop()


def test_the_device_identity_cert_is_renewed_and_registered_again(
    world_dir: Path, cloud: Cloud
) -> None:
    import base64 as b64

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca_pem, ca_key, ca_cert = make_ca(world_dir / "ca")
    cloud.dps.add_x509_group("renewing-group", ca_cert)

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\nlocal-ca = "file://{ca_key}"\n'

    def certd(service: ServiceDir) -> str:
        return f"""homedir_path = "{service.home}"
not_before_margin_secs = 0
[cert_issuance]
local_ca = {{ cert = "local-ca", pk = "local-ca" }}
device-id = {{ method = "local_ca", expiry_days = 1 }}
device-id-temp = {{ method = "local_ca", expiry_days = 1 }}
[preloaded_certs]
local-ca = "file://{ca_pem}"
"""

    def identityd(service: ServiceDir) -> str:
        return f"""hostname = "renewing-dev"
homedir = "{service.home}"
[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}"
scope_id = "{cloud.id_scope}"
[provisioning.attestation]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"
registration_id = "renewing-dev"
identity_auto_renew = {{ rotate_key = true, threshold = "1440min", retry = "4%" }}
"""

    env = {"SSL_CERT_FILE": str(cloud.server_ca_pem_path), "NO_PROXY": "*"}
    services = {"keyd": keyd, "certd": certd, "identityd": identityd}
    daemon = Daemon(world_dir / "d", services, env=env).start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "renewed the device identity cert" not in (
            daemon.logs()
        ):
            time.sleep(0.2)
        assert "renewed the device identity cert device-id (key rotated)" in daemon.logs()
        registers = [r for r in cloud.dps.requests if r.method == "PUT"]
        assert len(registers) == 2 and all(r.auth == "x509" for r in registers)
        pem = daemon.request("certd", "GET", "/certificates/device-id").json()["pem"]
        leaf = x509.load_pem_x509_certificates(pem.encode())[0]
        leaf.verify_directly_issued_by(ca_cert)
        # keyd's device-id is the renewed cert's key; the temporary key and cert are gone.
        handle = daemon.request("keyd", "GET", "/keypair/device-id").json()["keyHandle"]
        modulus = daemon.request(
            "keyd", "POST", "/parameters/rsa-modulus", {"keyHandle": handle}
        ).json()["value"]
        public = leaf.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert int.from_bytes(b64.b64decode(modulus)) == public.public_numbers().n
        assert daemon.request("keyd", "GET", "/keypair/device-id-temp").status == 400
        assert daemon.request("certd", "GET", "/certificates/device-id-temp").status == 400
        reply = get(daemon, "/identities/identity")
        assert reply.status == 200 and reply.json()["spec"]["deviceId"] == "renewing-dev"
    finally:
        daemon.stop()
