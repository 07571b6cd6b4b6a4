"""The README's install section, walked through in a temp root: `contrib/install`, the original's
users, `aziotctl config apply` of a DPS super-config, aziotd from the installed venv started as
its unit would start it, and the device provisioned against mockcloud.

Only what needs a running systemd is left out (there is none here): the units are enabled
offline with `systemctl --root`, checked with `systemd-analyze verify`, and aziotd is started by
the test with the environment the unit gives it, with the paths moved under the root.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aziot.cli.layout import Layout
from mockcloud.cloud import Cloud
from tests.daemon import AppliedDaemon

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"keyd": "aziotks", "certd": "aziotcs", "identityd": "aziotid", "tpmd": "aziottpm"}


def passwd_entries(root: Path, database: str) -> dict[str, list[str]]:
    lines = (root / "etc" / database).read_text().splitlines()
    return {line.split(":")[0]: line.split(":") for line in lines if line}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with a minimal /etc, after `contrib/install --root`."""
    root = tmp_path_factory.mktemp("root")
    etc = root / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o600)
    done = subprocess.run(
        [str(ROOT / "contrib" / "install"), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "aziotctl config apply" in done.stdout
    return root


def test_the_original_users_own_their_folders(installed: Path) -> None:
    users = passwd_entries(installed, "passwd")
    groups = passwd_entries(installed, "group")
    for service, user in SERVICES.items():
        assert user in users and user in groups, (user, users.keys())
        uid, gid, home, shell = (
            int(users[user][2]),
            int(users[user][3]),
            users[user][5],
            users[user][6],
        )
        assert gid == int(groups[user][2])
        assert uid < 1000, "a system user"
        assert home == f"/var/lib/aziot/{service}" and shell == "/usr/sbin/nologin"
        for folder in (
            installed / "var/lib/aziot" / service,
            installed / "etc/aziot" / service / "config.d",
        ):
            status = folder.stat()
            assert (status.st_uid, status.st_gid) == (uid, gid), folder
            assert stat.S_IMODE(status.st_mode) == 0o700, folder
        # Not the host's: the host has no such user.
        assert not (Path("/etc/passwd").read_text().count(f"\n{user}:"))
    template = installed / "etc/aziot/config.toml.template"
    assert stat.S_IMODE(template.stat().st_mode) == 0o600


def test_the_units_are_enabled_under_their_own_and_the_original_names(installed: Path) -> None:
    units = installed / "etc/systemd/system"
    for alias in ("aziot-keyd", "aziot-certd", "aziot-identityd", "aziot-tpmd"):
        link = units / f"{alias}.service"
        assert link.is_symlink() and os.readlink(link) == "/etc/systemd/system/aziotd.service"
        wanted = units / "sockets.target.wants" / f"{alias}.socket"
        assert os.readlink(wanted) == f"/etc/systemd/system/{alias}.socket"
        text = (units / f"{alias}.socket").read_text()
        service = alias.removeprefix("aziot-")
        assert f"ListenStream=/run/aziot/{service}.sock" in text
        assert f"FileDescriptorName={service}" in text
        assert f"SocketUser={SERVICES[service]}" in text and "SocketMode=0660" in text
    assert (units / "multi-user.target.wants/aziotd.service").is_symlink()
    assert "ExecStart=/opt/aziot/bin/aziotd\n" in (units / "aziotd.service").read_text()


def test_installing_again_upgrades_in_place(installed: Path) -> None:
    before = {
        name: (installed / "etc" / name).read_text() for name in ("passwd", "group", "shadow")
    }
    config = installed / "etc/aziot/keyd/config.d/50-mine.toml"
    config.write_text("# an operator's drop-in\n")
    done = subprocess.run(
        [str(ROOT / "contrib" / "install"), "--root", str(installed)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "added user" not in done.stdout
    for name, text in before.items():
        assert (installed / "etc" / name).read_text() == text, name
    assert config.read_text() == "# an operator's drop-in\n"
    status = (installed / "var/lib/aziot/keyd").stat()
    assert stat.S_IMODE(status.st_mode) == 0o700


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_units(installed: Path, tmp_path: Path) -> None:
    # verify wants ExecStart to exist: point it at the installed binary, in a copy.
    for unit in (installed / "etc/systemd/system").glob("*.s*"):
        if unit.is_symlink() or unit.is_dir():
            continue
        text = unit.read_text().replace("/opt/aziot/", f"{installed}/opt/aziot/")
        (tmp_path / unit.name).write_text(text)
    units = sorted(str(path) for path in tmp_path.iterdir())
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    with Cloud(tmp_path / "cloud") as cloud:
        yield cloud


def super_config(cloud: Cloud, key: str) -> str:
    return f"""\
hostname = "walkthrough-device"

[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}"
id_scope = "{cloud.id_scope}"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "walkthrough-device"
symmetric_key = {{ value = "{key}" }}
"""


def test_config_apply_then_aziotd_provisions_the_device(installed: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("walkthrough-device")
    (installed / "etc/aziot/config.toml").write_text(super_config(cloud, enrollment.primary_key))
    aziotctl = str(installed / "opt/aziot/bin/aziotctl")
    applied = subprocess.run(
        [aziotctl, "--root", str(installed), "config", "apply"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    for service in SERVICES:
        assert (installed / f"etc/aziot/{service}/config.d/00-super.toml").is_file()

    # aziotd runs here outside the root, where the root's users are unknown: it would refuse
    # homedirs owned by them, as it refuses any other user's. Installed for real, /etc/passwd
    # has them and it trusts them (tests/test_files.py checks that).
    for service in SERVICES:
        os.chown(installed / "var/lib/aziot" / service, 0, 0)
    layout = Layout(installed, {})
    env = {"SSL_CERT_FILE": str(cloud.server_ca_pem_path), "NO_PROXY": "*"}
    daemon = AppliedDaemon(
        layout, tuple(SERVICES), env=env, command=[str(installed / "opt/aziot/bin/aziotd")]
    ).start()
    try:
        reply = daemon.request("identityd", "GET", "/identities/identity")
        assert reply.status == 200, reply.body
        spec = reply.json()["spec"]
        assert spec["deviceId"] == "walkthrough-device"
        assert spec["hubName"] == cloud.hub_hostname
        # The key apply wrote for keyd is the enrollment's, and it sits where keyd reads it.
        secret = installed / "var/secrets/aziot/keyd/device-id"
        assert secret.read_bytes() == base64.b64decode(enrollment.primary_key)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        status = subprocess.run(
            [aziotctl, "--root", str(installed), "system", "status"],
            capture_output=True,
            text=True,
            env=dict(os.environ, AZIOT_SOCKET_DIR=str(layout.socket_dir)),
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "aziotd: running" in status.stdout
    finally:
        assert daemon.stop() == 0, daemon.logs()
