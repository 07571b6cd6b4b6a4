"""identityd honours a provisioning change across restarts and never loses its backup before a
new provisioning succeeded (spec/lessons.md rows 6 and 7), with a real aziotd and mockcloud:

- a start whose `[provisioning]` differs from the one `prev_state` recorded registers with DPS
  again; a start with the same settings makes no DPS call, also with a `prev_state` written by
  the original (a device moved from it);
- the hub refusing the backup's device while DPS is unreachable, and a reprovision request
  while DPS is unreachable, keep the old device served and `device_info` on disk; once DPS
  answers again, the device provisions.

Each DPS registration waits the original's 5 s before its first poll, hence the length.
"""

from __future__ import annotations

import time
from pathlib import Path

import tomli

from aziot.actors.identity.state import StateFiles, provisioning_key, settings_table
from aziot.bus.faults import Faults
from aziot.config.identityd import parse_identityd
from mockcloud.cloud import Cloud
from tests.daemon import Daemon
from tests.test_identityd import MODULE_PRINCIPAL, MODULE_UID, cloud, dps_config, get, start

__all__ = ["cloud"]  # the fixture, shared with tests/test_identityd.py


def registrations(cloud: Cloud) -> int:
    return len([r for r in cloud.dps.requests if r.method == "PUT"])


def served_device(daemon: Daemon) -> str:
    reply = get(daemon, "/identities/identity")
    assert reply.status == 200, reply.body
    return reply.json()["spec"]["deviceId"]


def module_generation(daemon: Daemon) -> str:
    reply = get(daemon, "/identities/modules/mod1?type=aziot")
    assert reply.status == 200, reply.body
    return reply.json()["spec"]["genId"]


def device_info(daemon: Daemon) -> dict[str, str]:
    return tomli.loads((daemon.services["identityd"].home / "device_info").read_text())


def wait_for(condition, seconds: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def original_prev_state(cloud: Cloud, home: Path, registration_id: str) -> str:
    """`prev_state` as the original writes it: its whole settings through `toml::to_string`,
    the endpoint as `url::Url` shows it (a trailing `/`)."""
    return f"""hostname = "my-device"
homedir = "{home}"
prefer_module_identity_cache = false

[provisioning]
source = "dps"
global_endpoint = "{cloud.dps_url}/"
scope_id = "{cloud.id_scope}"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "{registration_id}"
symmetric_key = "device-key"

[[principal]]
uid = {MODULE_UID}
name = "mod1"
idtype = ["module"]
"""


def test_a_restart_provisions_again_only_when_the_settings_changed(
    world_dir: Path, cloud: Cloud
) -> None:
    first = cloud.dps.add_symmetric_enrollment("rid-a")
    cloud.dps.add_symmetric_enrollment("rid-b", primary_key=first.primary_key)
    daemon = start(
        world_dir, cloud, dps_config(cloud, "rid-a", MODULE_PRINCIPAL), first.primary_key
    )
    try:
        assert registrations(cloud) == 1 and served_device(daemon) == "rid-a"
        generation = module_generation(daemon)
        home = daemon.services["identityd"].home
        # What we record is what the original records: its settings, `[provisioning]` included.
        recorded = tomli.loads((home / "prev_state").read_text())
        assert recorded["provisioning"]["attestation"]["registration_id"] == "rid-a"
        assert recorded["principal"] == [{"uid": MODULE_UID, "name": "mod1", "idtype": ["module"]}]

        # Unchanged settings, recorded by the original: the backup, no DPS call, mod1 kept.
        daemon.stop()
        (home / "prev_state").write_text(original_prev_state(cloud, home, "rid-a"))
        daemon.start()
        assert registrations(cloud) == 1
        assert served_device(daemon) == "rid-a"
        assert module_generation(daemon) == generation
        assert "using the provisioning backup: rid-a" in daemon.logs()

        # `config apply` with another registration id, then the restart it makes: DPS again.
        daemon.stop()
        config = daemon.services["identityd"].config
        config.write_text(config.read_text().replace('"rid-a"', '"rid-b"'))
        daemon.start()
        assert registrations(cloud) == 2
        assert served_device(daemon) == "rid-b"
        assert device_info(daemon)["device_id"] == "rid-b"
        recorded = tomli.loads((home / "prev_state").read_text())
        assert recorded["provisioning"]["attestation"]["registration_id"] == "rid-b"
        assert cloud.hub.module("rid-b", "mod1") is not None
        assert "the provisioning settings changed since rid-a was provisioned" in daemon.logs()

        # And the next restart, unchanged again: no DPS call.
        daemon.stop()
        daemon.start()
        assert registrations(cloud) == 2 and served_device(daemon) == "rid-b"
    finally:
        daemon.stop()


def test_dps_down_keeps_the_backup_served_until_it_answers(world_dir: Path, cloud: Cloud) -> None:
    enrollment = cloud.dps.add_symmetric_enrollment("dev-c")
    daemon = start(
        world_dir, cloud, dps_config(cloud, "dev-c", MODULE_PRINCIPAL), enrollment.primary_key
    )
    try:
        assert registrations(cloud) == 1
        generation = module_generation(daemon)
        backup = (daemon.services["identityd"].home / "device_info").read_text()

        # The hub refuses the backup's device once, and DPS cannot be reached: the original
        # would have deleted device_info first; here the old device stays served.
        daemon.stop()
        cloud.dps.misbehave("refuse")
        cloud.hub.misbehave("unauthorized", count=1)
        daemon.start()
        assert "the hub refused the device" in daemon.logs()
        assert "serving dev-c from the backup meanwhile" in daemon.logs()
        assert (daemon.services["identityd"].home / "device_info").read_text() == backup
        assert served_device(daemon) == "dev-c"
        assert module_generation(daemon) == generation

        # A reprovision request while DPS is down: the original's answer, the device kept.
        reply = daemon.request(
            "identityd", "POST", "/identities/device/reprovision", {"type": "aziot"}
        )
        assert reply.status == 404, reply.body
        assert reply.json()["message"].startswith("DPS client error\ncaused by: ")
        assert served_device(daemon) == "dev-c"
        assert module_generation(daemon) == generation
        assert (daemon.services["identityd"].home / "device_info").read_text() == backup

        # DPS back: the retry with backoff provisions, and the hub takes the device again.
        cloud.dps.behave()
        assert wait_for(lambda: "provisioned again now that the cloud answers" in daemon.logs(), 40)
        assert registrations(cloud) == 2
        assert served_device(daemon) == "dev-c"
        assert device_info(daemon)["device_id"] == "dev-c"
        # Same device: its module principal is kept (not made anew) by this retry.
        assert module_generation(daemon) == generation

        # A reprovision request now succeeds and, as the original's, makes mod1 anew.
        reply = daemon.request(
            "identityd", "POST", "/identities/device/reprovision", {"type": "aziot"}
        )
        assert reply.status == 204, reply.body
        assert registrations(cloud) == 3
        assert module_generation(daemon) != generation
    finally:
        daemon.stop()


# -- what prev_state records, without a daemon ---------------------------------------------

DPS_CONFIG = """
hostname = "h"
homedir = "/var/lib/aziot/identityd"
cloud_timeout_sec = 90
[provisioning]
source = "dps"
global_endpoint = "https://global.azure-devices-provisioning.net"
scope_id = "0ab1234C5D6"
payload = { uri = "file:///etc/aziot/payload.json" }
[provisioning.attestation]
method = "x509"
identity_cert = "device-id"
identity_pk = "device-id"
registration_id = { CN = "dev", O = "Contoso" }
identity_auto_renew = { rotate_key = true, threshold = "80%", retry = "4%" }
[localid]
domain = "example.local"
[[principal]]
uid = 1000
name = "edge"
[[principal]]
uid = 1001
name = "web"
idtype = ["local"]
localid = { type = "x509", attributes = "server" }
"""


def test_the_recorded_settings_read_back_as_the_same_provisioning(tmp_path: Path) -> None:
    import tomli_w

    config = parse_identityd(tomli.loads(DPS_CONFIG), "config.toml")
    table = settings_table(config)
    # As the original's `toml::to_string`: the endpoint with its `/`, defaults left out.
    assert table["provisioning"]["global_endpoint"].endswith(".net/")
    assert "max_requests" not in table and table["cloud_timeout_sec"] == 90
    assert "endpoints" not in table
    again = parse_identityd(tomli.loads(tomli_w.dumps(table)), "prev_state")
    assert again.principal == config.principal and again.localid == config.localid
    assert provisioning_key(again.provisioning) == provisioning_key(config.provisioning)

    state = StateFiles(tmp_path, Faults())
    state.prepare()
    assert state.read_prev_provisioning() is None  # no record: the backup is trusted
    state.write_prev_state(config)
    recorded = state.read_prev_provisioning()
    assert recorded is not None
    assert provisioning_key(recorded) == provisioning_key(config.provisioning)
    # A prev_state of an earlier version of this project (principals only): unknown.
    state.prev_state_path.write_text('[[principal]]\nuid = 1\nname = "m"\nidtype = ["module"]\n')
    assert state.read_prev_provisioning() is None
    assert state.read_prev_modules() == {"m"}
    # A broken one: unknown, not an error.
    state.prev_state_path.write_text("[provisioning]\nsource = 7\n")
    assert state.read_prev_provisioning() is None


def test_what_counts_as_a_provisioning_change() -> None:
    base = parse_identityd(tomli.loads(DPS_CONFIG), "config.toml").provisioning

    def variant(old: str, new: str):  # noqa: ANN202
        assert old in DPS_CONFIG
        return parse_identityd(tomli.loads(DPS_CONFIG.replace(old, new)), "c").provisioning

    same = [
        ('provisioning.net"', 'provisioning.net/"'),  # url::Url's form of the same endpoint
        ('threshold = "80%"', 'threshold = "70%"'),  # how the cert renews, not which device
        ('O = "Contoso"', 'O = "Fabrikam"'),  # the CSR's other names
    ]
    for old, new in same:
        assert provisioning_key(variant(old, new)) == provisioning_key(base), new
    changed = [
        ('scope_id = "0ab1234C5D6"', 'scope_id = "0ne00000001"'),
        ('CN = "dev"', 'CN = "dev2"'),
        ("global.azure-devices", "other.azure-devices"),
        ('identity_pk = "device-id"', 'identity_pk = "device-id-2"'),
        ("payload.json", "payload2.json"),
    ]
    for old, new in changed:
        assert provisioning_key(variant(old, new)) != provisioning_key(base), new
