"""`aziotctl check` / `check-list` against real parts: per-service configs written by hand under
a temp --root (the §4 format, as `config apply` would write them), the real aziotd where a check
asks a service, a local SNTP server, TLS servers on loopback and the CONNECT proxy."""

from __future__ import annotations

import datetime
import json
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aziot.actors.permissions import Reader, exposed, unreadable
from aziot.cli.layout import Layout
from aziot.cli.main import main
from aziot.supervisor.version import package_version
from mockcloud.ca import CertificateAuthority, generate_key, name
from tests.connect_proxy import ConnectProxy
from tests.daemon import AppliedDaemon

NOBODY = 65534
DAEMON_CHECKS = (
    "keyd-running certd-running tpmd-running identityd-running certs-read key-pairs-read "
    "certs-match-private-keys"
)
HUB_PORTS = (443, 5671, 8883)


# -- real parts ---------------------------------------------------------------------------------


class SntpServer:
    """Answers SNTP queries with its clock shifted by `offset` seconds."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _ntp(t: float) -> bytes:
        t += 2_208_988_800
        return struct.pack("!II", int(t), int((t % 1) * 2**32))

    def _serve(self) -> None:
        while True:
            try:
                request, peer = self.sock.recvfrom(512)
            except OSError:
                return
            now = self._ntp(time.time() + self.offset)
            reply = bytes([0x1C, 1, 0, 0]) + bytes(20) + request[40:48] + now + now
            self.sock.sendto(reply, peer)


@pytest.fixture
def ntp() -> Iterator[SntpServer]:
    server = SntpServer()
    yield server
    server.sock.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.root("aziotctl check test CA")


class TlsServers:
    """TLS servers on one loopback address (a fresh 127.x.y.z, so the privileged hub ports are
    free) that complete handshakes and hang up."""

    def __init__(self, ca: CertificateAuthority, directory: Path, ports: tuple[int, ...]) -> None:
        self.host = (
            f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        )
        cert, key = ca.issue_leaf("hub", client=False, server_hosts=[self.host])
        cert_file, key_file = directory / "server.pem", directory / "server.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.listeners = []
        self.ports = []
        for port in ports:
            listener = socket.create_server((self.host, port))
            self.listeners.append(listener)
            self.ports.append(listener.getsockname()[1])
            threading.Thread(target=self._serve, args=(listener,), daemon=True).start()

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


@pytest.fixture
def trust(ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test CA as the system trust store of the checks' TLS handshakes."""
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    return bundle


@pytest.fixture
def hub(ca: CertificateAuthority, tmp_path: Path, trust: Path) -> Iterator[TlsServers]:
    servers = TlsServers(ca, tmp_path, HUB_PORTS)
    yield servers
    servers.close()


# -- a device under a temp root ------------------------------------------------------------------


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Device:
    """Per-service configs under `root` at the Layout's paths, as `config apply` writes them
    (config.d/00-super.toml, the super-config older), with a preloaded device-id key and cert."""

    def __init__(self, root: Path, ca: CertificateAuthority, hub_host: str = "127.0.0.1") -> None:
        self.root = root
        self.layout = Layout(root, {"AZIOT_SOCKET_DIR": str(root / "run")})
        self.secrets = root / "secrets"
        self.secrets.mkdir(parents=True)
        self.key_file = self.secrets / "device-id.key.pem"
        self.cert_file = self.secrets / "device-id.cert.pem"
        self.key = generate_key("ec-p256")
        self.key_file.write_bytes(key_pem(self.key))
        self.key_file.chmod(0o600)
        self.ca = ca
        self.write_cert(days_before=1, days_after=365)
        self.configs: dict[str, str] = {
            "keyd": (
                f'[aziot_keys]\nhomedir_path = "{self.layout.homedir("keyd")}"\n'
                f'[preloaded_keys]\ndevice-id = "file://{self.key_file}"\n'
            ),
            "certd": (
                f'homedir_path = "{self.layout.homedir("certd")}"\n'
                f'[preloaded_certs]\ndevice-id = "file://{self.cert_file}"\n'
            ),
            "identityd": (
                f'hostname = "{socket.gethostname()}"\n'
                f'homedir = "{self.layout.homedir("identityd")}"\n'
                '[provisioning]\nsource = "manual"\n'
                f'iothub_hostname = "{hub_host}"\ndevice_id = "dev1"\n'
                '[provisioning.authentication]\nmethod = "x509"\n'
                'identity_cert = "device-id"\nidentity_pk = "device-id"\n'
            ),
        }
        self.write_configs()

    def write_cert(
        self, *, days_before: float, days_after: float, key: Any = None, path: Path | None = None
    ) -> None:
        now = datetime.datetime.now(datetime.UTC)
        cert = self.ca.issue(
            name("dev1"),
            (key or self.key).public_key(),
            not_before=now - datetime.timedelta(days=days_before),
            not_after=now + datetime.timedelta(days=days_after),
        )
        (path or self.cert_file).write_bytes(pem(cert))

    def write_configs(self) -> None:
        super_config = self.layout.super_config
        super_config.parent.mkdir(parents=True, exist_ok=True)
        super_config.write_text("# the super-config these were applied from\n")
        for service in ("keyd", "certd", "identityd", "tpmd"):
            applied = self.layout.applied_config(service)
            applied.parent.mkdir(parents=True, exist_ok=True)
            applied.write_text(self.configs.get(service, ""))
            # Applied after the super-config was written, as `config apply` leaves them.
            os.utime(super_config, (time.time() - 60, time.time() - 60))

    def daemon(self, services: tuple[str, ...] = ("keyd", "certd", "identityd")) -> AppliedDaemon:
        return AppliedDaemon(self.layout, services)


@pytest.fixture
def device(world_dir: Path, ca: CertificateAuthority) -> Device:
    return Device(world_dir, ca)


@pytest.fixture
def running(device: Device) -> Iterator[AppliedDaemon]:
    daemon = device.daemon().start()
    yield daemon
    daemon.stop()


def check(
    device: Device,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    ntp: SntpServer | None = None,
) -> tuple[int, dict[str, Any]]:
    """`aziotctl --root … check -o json …`: the exit code and the parsed document."""
    monkeypatch.setenv("AZIOT_SOCKET_DIR", str(device.root / "run"))
    capsys.readouterr()
    ntp_args = ["--ntp-server", ntp.address] if ntp else []
    code = main(
        [
            "--root",
            str(device.root),
            "check",
            "-o",
            "json",
            "--expected-aziot-version",
            package_version(),
            *ntp_args,
            *args,
        ]
    )
    return code, json.loads(capsys.readouterr().out)


def results(document: dict[str, Any]) -> dict[str, str]:
    return {check_id: c["result"]["result"] for check_id, c in document["checks"].items()}


def details(document: dict[str, Any], check_id: str) -> str:
    return "\n".join(document["checks"][check_id]["result"].get("details", []))


# -- tests ---------------------------------------------------------------------------------------


def test_healthy_device_passes_every_check(
    world_dir: Path, ca: CertificateAuthority, hub: TlsServers, ntp: SntpServer, capsys, monkeypatch
) -> None:
    device = Device(world_dir, ca)
    # identityd serves once provisioned: with no cloud here, it provisions nothing, and the hub
    # checks get their host from the command line.
    device.configs["identityd"] = device.configs["identityd"].split("[provisioning]")[0] + (
        '[provisioning]\nsource = "none"\n'
    )
    device.write_configs()
    daemon = device.daemon().start()
    assert daemon.process is not None
    daemon_pid = daemon.process.pid
    try:
        code, document = check(device, capsys, monkeypatch, "--iothub-hostname", hub.host, ntp=ntp)
    finally:
        daemon.stop()
    assert results(document) == {
        "keyd-config-well-formed": "ok",
        "certd-config-well-formed": "ok",
        "tpmd-config-well-formed": "ok",
        "identityd-config-well-formed": "ok",
        "configs-up-to-date": "ok",
        "hostname": "ok",
        "aziot-version": "ok",
        "host-local-time": "ok",
        "identity-certificate-expiry": "ignored",
        "est-identity-and-bootstrap-certificate-expiry": "ignored",
        "local-ca-certificate-expiry": "ignored",
        "certs-preloaded": "ok",
        "keyd-running": "ok",
        "certd-running": "ok",
        "tpmd-running": "ignored",
        "identityd-running": "ok",
        "certs-read": "ok",
        "key-pairs-read": "ok",
        "est-server-https": "ok",
        "certs-match-private-keys": "ok",
        "host-connect-iothub-amqp": "ok",
        "host-connect-iothub-https": "ok",
        "host-connect-iothub-mqtt": "ok",
        "host-connect-dps-endpoint": "ignored",
    }, document
    assert code == 0
    for check_id in ("key-pairs-read", "certs-preloaded"):
        checked_for = document["checks"][check_id]["additional_info"]["files_checked_for"]
        assert checked_for == f"uid 0 (root), the user aziotd (pid {daemon_pid}) runs as"
    info = document["additional_info"]
    assert {"now", "os", "dmi", "system_info"} <= set(info)
    assert (
        document["checks"]["hostname"]["additional_info"]["machine_hostname"]
        == socket.gethostname()
    )
    assert document["checks"]["identity-certificate-expiry"]["additional_info"] == {
        "provisioning_mode": "none"
    }


def test_text_output_and_json_stream(device: Device, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AZIOT_SOCKET_DIR", str(device.root / "run"))
    argv = [
        "--root",
        str(device.root),
        "check",
        "--ntp-server",
        "127.0.0.1:9",
        "--dont-run",
        DAEMON_CHECKS,
    ]
    assert main([*argv, "--expected-aziot-version", package_version()]) == 1
    text = capsys.readouterr().out
    assert text.startswith("Configuration checks\n--------------------\n")
    assert "\u221a keyd configuration is well-formed - OK" in text
    # The hub at 127.0.0.1:5671 is not there: a connectivity error, reported as such.
    assert (
        "\u00d7 host can connect to and perform TLS handshake with iothub AMQP port - Error" in text
    )
    assert "check(s) raised errors." in text

    assert main([*argv, "-o", "json-stream"]) == 1
    lines = capsys.readouterr().out.splitlines()
    objects = [json.loads(line) for line in lines]
    assert all("kind" in o for o in objects)
    assert objects[0] == {"kind": "section", "name": "Configuration checks"}
    assert objects[-1]["kind"] == "additional_info" and "now" in objects[-1]
    checks = {o["id"]: o for o in objects if o["kind"] == "check"}
    assert checks["keyd-running"]["result"] == {"result": "ignored"}
    assert checks["keyd-config-well-formed"]["description"] == "keyd configuration is well-formed"
    assert checks["aziot-version"]["result"]["result"] == "warning"  # 0.1.0 is not "latest"


def test_dont_run_marks_checks_ignored(
    device: Device, ntp: SntpServer, capsys, monkeypatch
) -> None:
    code, document = check(
        device, capsys, monkeypatch, "--dont-run", "hostname certs-preloaded", ntp=ntp
    )
    assert results(document)["hostname"] == "ignored"
    assert results(document)["certs-preloaded"] == "ignored"
    assert document["checks"]["hostname"]["result"] == {"result": "ignored"}
    assert results(document)["keyd-config-well-formed"] == "ok"


def test_service_not_running(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    code, document = check(device, capsys, monkeypatch, ntp=ntp)
    assert code == 1
    for service in ("keyd", "certd", "identityd"):
        assert results(document)[f"{service}-running"] == "error"
        assert str(device.layout.socket(service)) in details(document, f"{service}-running")
    # What needs a service is skipped, not failed twice.
    assert results(document)["certs-read"] == "skipped"
    assert results(document)["key-pairs-read"] == "skipped"
    assert results(document)["certs-match-private-keys"] == "skipped"


def _without_daemon(device, capsys, monkeypatch, ntp, *args):
    return check(
        device,
        capsys,
        monkeypatch,
        "--dont-run",
        DAEMON_CHECKS,
        "--dont-run",
        "host-connect-iothub-amqp host-connect-iothub-https host-connect-iothub-mqtt",
        *args,
        ntp=ntp,
    )


def test_expired_cert(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    device.write_cert(days_before=30, days_after=-1)
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert code == 1
    assert results(document)["certs-preloaded"] == "error"
    assert "'device-id' expired at" in details(document, "certs-preloaded")
    assert results(document)["identity-certificate-expiry"] == "error"
    assert "Manual identity 'device-id' expired at" in details(
        document, "identity-certificate-expiry"
    )


def test_not_yet_valid_cert(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    device.write_cert(days_before=-2, days_after=30)
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert code == 1
    assert results(document)["certs-preloaded"] == "error"
    assert "which is in the future" in details(document, "certs-preloaded")


def test_cert_expiring_soon_warns(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    device.write_cert(days_before=30, days_after=3)
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert results(document)["certs-preloaded"] == "warning"
    assert "will expire soon" in details(document, "certs-preloaded")
    assert "in 2 days" in details(document, "certs-preloaded")
    assert code == 0, document
    code, document = _without_daemon(device, capsys, monkeypatch, ntp, "--warnings-as-errors")
    assert results(document)["certs-preloaded"] == "error"
    assert code == 1


def test_super_config_newer_than_applied(
    device: Device, ntp: SntpServer, capsys, monkeypatch
) -> None:
    later = time.time() + 5
    os.utime(device.layout.super_config, (later, later))
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert results(document)["configs-up-to-date"] == "warning"
    assert "config apply" in details(document, "configs-up-to-date")
    assert str(device.layout.super_config) in details(document, "configs-up-to-date")
    earlier = time.time() - 60
    os.utime(device.layout.super_config, (earlier, earlier))
    device.layout.applied_config("certd").unlink()
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert f"{device.layout.applied_config('certd')} does not exist" in details(
        document, "configs-up-to-date"
    )


def test_est_url_over_http_warns(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    device.configs["certd"] += (
        '[cert_issuance.est.urls]\ndefault = "http://est.example/.well-known/est"\n'
    )
    device.write_configs()
    code, document = _without_daemon(device, capsys, monkeypatch, ntp, "--warnings-as-errors")
    assert results(document)["est-server-https"] == "error"
    assert "http://est.example/.well-known/est" in details(document, "est-server-https")
    assert "unencrypted HTTP" in details(document, "est-server-https")
    assert code == 1


def test_malformed_config_names_file_and_key(
    device: Device, ntp: SntpServer, capsys, monkeypatch
) -> None:
    device.configs["certd"] += 'max_requests = "ten"\n'
    device.write_configs()
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert code == 1
    assert results(document)["certd-config-well-formed"] == "error"
    text = details(document, "certd-config-well-formed")
    assert "max_requests" in text and str(device.layout.config_dir("certd")) in text
    # Checks that need certd's config are skipped, not failed.
    assert results(document)["certs-preloaded"] == "skipped"


def test_identityd_settings_check(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    device.configs["identityd"] += (
        '[[principal]]\nuid = 1000\nname = "m1"\n[[principal]]\nuid = 1001\nname = "m1"\n'
    )
    device.write_configs()
    code, document = _without_daemon(device, capsys, monkeypatch, ntp)
    assert results(document)["identityd-config-well-formed"] == "error"
    assert "m1" in details(document, "identityd-config-well-formed")
    assert results(document)["hostname"] == "skipped"


def test_a_private_key_open_to_every_user_is_a_warning(
    device: Device, ntp: SntpServer, capsys, monkeypatch
) -> None:
    """The leftover of `chmod -R 777` on a key folder (spec/lessons.md 1)."""
    device.key_file.chmod(0o644)
    daemon = device.daemon(("keyd", "certd")).start()
    try:
        _, document = check(device, capsys, monkeypatch, ntp=ntp)
    finally:
        daemon.stop()
    assert results(document)["key-pairs-read"] == "warning"
    text = details(document, "key-pairs-read")
    assert f"preloaded key 'device-id': {device.key_file} has mode 0644" in text
    assert "every user on the device can read this private key" in text
    assert f"chmod 0640 {device.key_file}" in text  # its group reads it today


def test_exposed_names_the_file_or_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    key = folder / "k.pem"
    key.write_text("x")
    for file_mode, folder_mode, expected in (
        (0o600, 0o700, None),
        (0o640, 0o750, None),
        (0o604, 0o700, "can read this private key. For example `chmod 0600"),
        (0o646, 0o700, "can read and replace this private key. For example `chmod 0640"),
        (0o600, 0o777, f"{folder} has mode 0777: every user on the device can replace"),
        (0o600, 0o1777, None),  # sticky: others cannot replace what they do not own
    ):
        key.chmod(file_mode)
        folder.chmod(folder_mode)
        problem = exposed(key)
        if expected is None:
            assert problem is None, (oct(file_mode), oct(folder_mode), problem)
        else:
            assert problem is not None and expected in problem, (oct(file_mode), problem)


def test_key_not_matching_its_cert(device: Device, ntp: SntpServer, capsys, monkeypatch) -> None:
    device.write_cert(days_before=1, days_after=365, key=generate_key("ec-p256"))
    daemon = device.daemon(("keyd", "certd")).start()
    try:
        code, document = check(device, capsys, monkeypatch, ntp=ntp)
    finally:
        daemon.stop()
    assert results(document)["certs-read"] == "ok"
    assert results(document)["key-pairs-read"] == "ok"
    assert results(document)["certs-match-private-keys"] == "error"
    assert (
        "preloaded cert with ID 'device-id' does not match preloaded private key with ID 'device-id'"
        in details(document, "certs-match-private-keys")
    )
    assert code == 1


def test_key_unreadable_by_the_daemons_user(
    device: Device, ntp: SntpServer, capsys, monkeypatch
) -> None:
    """aziotd runs as nobody: the key file (0600 root) and a key behind a 0700 directory are
    named with their owner, mode and the uid that must read them."""
    hidden = device.secrets / "hidden"
    hidden.mkdir(mode=0o700)
    other = hidden / "other.key.pem"
    other.write_bytes(key_pem(generate_key("ec-p256")))
    other.chmod(0o644)
    device.configs["keyd"] += f'other = "file://{other}"\n'
    device.write_configs()
    for path in (device.root / "run", device.layout.homedir("keyd").parent):
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, NOBODY, NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    daemon = AppliedDaemon(
        device.layout,
        ("keyd",),
        command=[*as_nobody, sys.executable, "-m", "aziot.supervisor.main"],
    ).start()
    try:
        code, document = check(device, capsys, monkeypatch, ntp=ntp)
        # keyd itself, asked for the key, logs the same explanation (the client gets the
        # original's 500 "internal error")
        reply = daemon.request("keyd", "GET", "/keypair/device-id")
        daemon_log = daemon.logs()
    finally:
        daemon.stop()
    assert (reply.status, reply.json()) == (500, {"message": "internal error"})
    assert f"{device.key_file} is not readable by uid {NOBODY}" in daemon_log
    assert "the user aziotd runs as" in daemon_log
    assert "owner root:root (uid 0, gid 0), mode 0600" in daemon_log
    assert code == 1
    assert results(document)["keyd-running"] == "ok"
    assert results(document)["key-pairs-read"] == "error"
    text = details(document, "key-pairs-read")
    assert f"{device.key_file} is not readable by uid {NOBODY}" in text
    assert "the user aziotd (pid" in text
    assert "owner root:root (uid 0, gid 0), mode 0600" in text
    assert f"chown {os.popen(f'id -nu {NOBODY}').read().strip()} {device.key_file}" in text
    assert f"its parent directory {hidden}" in text and "mode 0700" in text


def test_readable_verdict_follows_owner_group_other() -> None:
    """The mode-based verdict alone, against files whose modes are set here."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        path = Path(directory) / "key.pem"
        path.write_text("x")
        reader = Reader(NOBODY, frozenset({4242}), "a test reader")
        os.chown(path, 0, 4242)
        path.chmod(0o640)
        assert unreadable(path, reader, private=True) is None  # group may read
        path.chmod(0o604)
        problem = unreadable(path, reader, private=True)  # group class denies; other is not asked
        assert problem is not None and "mode 0604" in problem and "uid 65534" in problem
        os.chown(path, NOBODY, 0)
        path.chmod(0o400)
        assert unreadable(path, reader, private=True) is None
        path.chmod(0o044)
        assert unreadable(path, reader, private=True) is not None  # owner class denies
        assert unreadable(path, Reader(0, frozenset(), "root"), private=True) is None
        assert "does not exist" in (unreadable(path.with_name("nope"), reader, private=True) or "")


def test_ntp_offset_and_unreachable(device: Device, capsys, monkeypatch) -> None:
    late = SntpServer(offset=60)
    try:
        _, document = _without_daemon(device, capsys, monkeypatch, late)
    finally:
        late.sock.close()
    assert results(document)["host-local-time"] == "warning"
    assert document["checks"]["host-local-time"]["additional_info"]["offset"] in (59, 60, 61)
    start = time.monotonic()
    _, document = _without_daemon(device, capsys, monkeypatch, None, "--ntp-server", "127.0.0.1:9")
    assert results(document)["host-local-time"] == "warning"
    assert "Could not query NTP server 127.0.0.1:9" in details(document, "host-local-time")
    assert time.monotonic() - start < 10


def test_aziot_version_without_internet_warns_quickly(
    device: Device, ntp: SntpServer, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("AZIOT_SOCKET_DIR", str(device.root / "run"))
    start = time.monotonic()
    main(
        [
            "--root",
            str(device.root),
            "check",
            "-o",
            "json",
            "--ntp-server",
            ntp.address,
            "--dont-run",
            DAEMON_CHECKS
            + " host-connect-iothub-amqp host-connect-iothub-https host-connect-iothub-mqtt",
        ]
    )
    document = json.loads(capsys.readouterr().out)
    assert results(document)["aziot-version"] == "warning"
    assert time.monotonic() - start < 15
    _, document = check(device, capsys, monkeypatch, "--expected-aziot-version", "9.9.9", ntp=ntp)
    assert results(document)["aziot-version"] == "warning"
    assert "9.9.9 is the latest" in details(document, "aziot-version")


def test_hub_through_proxy_and_unreachable_hub(
    device: Device, hub: TlsServers, ntp: SntpServer, capsys, monkeypatch
) -> None:
    with ConnectProxy() as proxy:
        code, document = check(
            device,
            capsys,
            monkeypatch,
            "--dont-run",
            DAEMON_CHECKS,
            "--iothub-hostname",
            hub.host,
            "--proxy-uri",
            proxy.url,
            ntp=ntp,
        )
        seen = proxy.seen
    assert results(document)["host-connect-iothub-https"] == "ok"
    assert results(document)["host-connect-iothub-amqp"] == "ok"
    assert f"CONNECT {hub.host}:443 HTTP/1.1" in seen
    assert not any(":5671" in line or ":8883" in line for line in seen)  # only HTTPS is proxied
    info = document["checks"]["host-connect-iothub-https"]["additional_info"]
    assert info["iothub_hostname"] == hub.host and info["proxy"] == proxy.url

    nowhere = hub.host.rsplit(".", 1)[0] + ".1"
    code, document = check(
        device,
        capsys,
        monkeypatch,
        "--dont-run",
        DAEMON_CHECKS,
        "--iothub-hostname",
        nowhere,
        ntp=ntp,
    )
    assert results(document)["host-connect-iothub-mqtt"] == "error"
    assert f"{nowhere}:8883" in details(document, "host-connect-iothub-mqtt")
    assert code == 1


def test_untrusted_hub_certificate_fails(
    device: Device, ca: CertificateAuthority, tmp_path: Path, ntp: SntpServer, capsys, monkeypatch
) -> None:
    servers = TlsServers(ca, tmp_path, HUB_PORTS)  # not trusted: no SSL_CERT_FILE set
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "empty.pem"))
    (tmp_path / "empty.pem").write_text("")
    try:
        _, document = check(
            device,
            capsys,
            monkeypatch,
            "--dont-run",
            DAEMON_CHECKS,
            "--iothub-hostname",
            servers.host,
            ntp=ntp,
        )
    finally:
        servers.close()
    assert results(document)["host-connect-iothub-https"] == "error"
    assert "certificate verify failed" in details(document, "host-connect-iothub-https")


def test_dps_endpoint_through_proxy(
    device: Device,
    ca: CertificateAuthority,
    tmp_path: Path,
    trust: Path,
    ntp: SntpServer,
    capsys,
    monkeypatch,
) -> None:
    dps = TlsServers(ca, tmp_path, (0,))
    device.configs["identityd"] = (
        f'hostname = "{socket.gethostname()}"\nhomedir = "{device.layout.homedir("identityd")}"\n'
        '[provisioning]\nsource = "dps"\n'
        f'global_endpoint = "https://{dps.host}:{dps.ports[0]}/"\nscope_id = "0ne00000001"\n'
        '[provisioning.attestation]\nmethod = "symmetric_key"\nregistration_id = "dev1"\n'
        'symmetric_key = "device-id"\n'
    )
    device.write_configs()
    try:
        with ConnectProxy() as proxy:
            _, document = check(
                device,
                capsys,
                monkeypatch,
                "--dont-run",
                DAEMON_CHECKS,
                "--proxy-uri",
                proxy.url,
                ntp=ntp,
            )
            seen = proxy.seen
    finally:
        dps.close()
    assert results(document)["host-connect-dps-endpoint"] == "ok", document
    assert f"CONNECT {dps.host}:{dps.ports[0]} HTTP/1.1" in seen
    # No hub host is known with DPS: a warning that says how to give one.
    assert results(document)["host-connect-iothub-amqp"] == "warning"
    assert "--iothub-hostname" in details(document, "host-connect-iothub-amqp")
    assert results(document)["identity-certificate-expiry"] == "ignored"


def test_the_hub_dps_assigned_is_read_from_identityds_backup(
    device: Device,
    ca: CertificateAuthority,
    tmp_path: Path,
    trust: Path,
    ntp: SntpServer,
    capsys,
    monkeypatch,
) -> None:
    hub = TlsServers(ca, tmp_path, (0,))
    device.configs["identityd"] = (
        f'hostname = "{socket.gethostname()}"\nhomedir = "{device.layout.homedir("identityd")}"\n'
        '[provisioning]\nsource = "dps"\n'
        'global_endpoint = "https://127.0.0.1:9/"\nscope_id = "0ne00000001"\n'
        '[provisioning.attestation]\nmethod = "symmetric_key"\nregistration_id = "dev1"\n'
        'symmetric_key = "device-id"\n'
    )
    device.write_configs()
    home = device.layout.homedir("identityd")
    home.mkdir(parents=True, exist_ok=True)
    # As identityd writes it after DPS assigned a hub that serves on one port of its own.
    (home / "device_info").write_text(
        f'hub_name = "{hub.host}:{hub.ports[0]}"\nlocal_gateway_hostname = "{hub.host}"\n'
        'device_id = "dev1"\n'
    )
    try:
        _, document = check(device, capsys, monkeypatch, "--dont-run", DAEMON_CHECKS, ntp=ntp)
    finally:
        hub.close()
    outcome = results(document)
    assert outcome["host-connect-iothub-https"] == "ok", document
    info = document["checks"]["host-connect-iothub-https"]["additional_info"]
    assert info["iothub_hostname"] == f"{hub.host}:{hub.ports[0]}"
    assert info["port_number"] == hub.ports[0]
    # Nothing listens for AMQP or MQTT on a hub named with its one port.
    assert outcome["host-connect-iothub-amqp"] == outcome["host-connect-iothub-mqtt"] == "ignored"


def test_unreadable_config_is_fatal(device: Device) -> None:
    """As a user who may not read keyd's config: fatal, and nothing after it runs."""
    device.layout.applied_config("keyd").chmod(0o600)
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-m",
            "aziot.cli.main",
            "--root",
            str(device.root),
            "check",
            "-o",
            "json",
            "--ntp-server",
            "127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "AZIOT_SOCKET_DIR": str(device.root / "run")},
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert results(document) == {"keyd-config-well-formed": "fatal"}
    assert str(device.layout.applied_config("keyd")) in details(document, "keyd-config-well-formed")


def test_check_list(capsys) -> None:
    assert main(["check-list", "-o", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert list(listing) == ["Configuration checks", "Connectivity checks"]
    ids = [c["id"] for c in listing["Configuration checks"]]
    assert ids[:4] == [
        "keyd-config-well-formed",
        "certd-config-well-formed",
        "tpmd-config-well-formed",
        "identityd-config-well-formed",
    ]
    assert ids[-1] == "certs-match-private-keys" and len(ids) == 20
    assert [c["id"] for c in listing["Connectivity checks"]] == [
        "host-connect-iothub-amqp",
        "host-connect-iothub-https",
        "host-connect-iothub-mqtt",
        "host-connect-dps-endpoint",
    ]
    assert main(["check-list"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["CATEGORY", "ID", "DESCRIPTION"]
    assert text[2].split()[2] == "keyd-config-well-formed"
