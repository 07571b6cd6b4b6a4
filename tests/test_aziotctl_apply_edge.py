"""`aziotctl config apply` on an IoT Edge device, whose `/etc/aziot/config.toml` is IoT Edge's
super-config: its own sections are accepted and left alone, the four services' configs are what
the same file without them gives, one note names what was left; `[endpoints]` (the original's
debug builds only) likewise; misspellings near IoT Edge's names or ours are still refused, with
nothing written.

The IoT Edge config here was written for these tests from the shape IoT Edge 1.5 documents
(its super-config's fields and its template's sections); every value is made up.
"""

from __future__ import annotations

import io
from pathlib import Path

import attrs
import pytest

from aziot.cli import apply as apply_cmd
from aziot.cli.layout import SERVICES, Layout
from aziot.cli.main import main as aziotctl
from aziot.config import super_config as sc
from aziot.config.loader import ConfigError

# The file as (belongs to IoT Edge, text) blocks, our sections and IoT Edge's interleaved as an
# operator's file would have them. TOML wants the top-level keys before the first table.
EDGE_DEVICE = [
    (False, 'hostname = "lighthouse-gw-3"\n'),
    (True, 'trust_bundle_cert = "file:///etc/lighthouse/trust-bundle.pem"\n'),
    (True, "allow_elevated_docker_permissions = false\n"),
    (False, "cloud_timeout_sec = 120\n"),
    (True, 'auto_reprovisioning_mode = "AlwaysOnStartup"\n'),
    (True, 'imported_master_encryption_key = "/var/lib/iotedge/hsm/enc_keys/master.key"\n'),
    (True, 'manifest_trust_bundle_cert = "file:///etc/lighthouse/manifest-root.pem"\n'),
    (False, "prefer_module_identity_cache = true\n"),
    (True, 'additional_info = "file:///etc/lighthouse/device-info.toml"\n'),
    (True, "\n[iotedge_max_requests]\nmanagement = 40\nworkload = 25\n"),
    (
        False,
        '\n[provisioning]\nsource = "dps"\n'
        'global_endpoint = "https://global.azure-devices-provisioning.net/"\n'
        'id_scope = "0ne00LIGHT5"\n'
        '\n[provisioning.attestation]\nmethod = "x509"\nregistration_id = "lighthouse-gw-3"\n'
        '\n[provisioning.attestation.identity_cert]\nmethod = "est"\n'
        'common_name = "lighthouse-gw-3"\n'
        "\n[provisioning.attestation.identity_cert.auto_renew]\n"
        'rotate_key = true\nthreshold = "75%"\nretry = "5%"\n',
    ),
    (
        True,
        '\n[agent]\nname = "edgeAgent"\ntype = "docker"\nimagePullPolicy = "on-create"\n'
        '\n[agent.config]\nimage = "mcr.microsoft.com/azureiotedge-agent:1.5"\n'
        '\n[agent.config.createOptions.HostConfig]\nBinds = ["/srv/edge-agent:/tmp/edge"]\n'
        '\n[agent.config.auth]\nserveraddress = "lighthouse.azurecr.io"\n'
        'username = "puller"\npassword = "not-a-real-password"\n'
        '\n[agent.env]\nRuntimeLogLevel = "debug"\nUpstreamProtocol = "AmqpWs"\n',
    ),
    (
        False,
        '\n[cert_issuance.est]\ntrusted_certs = ["file:///etc/lighthouse/est-root.pem"]\n'
        '\n[cert_issuance.est.auth]\nusername = "lighthouse"\npassword = "est-pass"\n'
        '\n[cert_issuance.est.urls]\ndefault = "https://est.lighthouse.example/.well-known/est"\n',
    ),
    (
        True,
        '\n[connect]\nworkload_uri = "unix:///var/run/iotedge/workload.sock"\n'
        'management_uri = "unix:///var/run/iotedge/mgmt.sock"\n'
        '\n[listen]\nworkload_uri = "fd://aziot-edged.workload.socket"\n'
        'management_uri = "fd://aziot-edged.mgmt.socket"\n'
        '\n[watchdog]\nmax_retries = "infinite"\n',
    ),
    (
        True,
        "\n[edge_ca]\nauto_generated_edge_ca_expiry_days = 180\n"
        '\n[edge_ca.auto_renew]\nrotate_key = true\nthreshold = "80%"\nretry = "4%"\n',
    ),
    (False, "\n[aziot_keys]\n"),
    (False, '\n[preloaded_certs]\nlighthouse-root = "file:///etc/lighthouse/root.pem"\n'),
    (
        True,
        '\n[image_garbage_collection]\nenabled = true\ncleanup_recurrence = "1d"\n'
        'image_age_cleanup_threshold = "7d"\ncleanup_time = "03:30"\n',
    ),
    (
        True,
        '\n[moby_runtime]\nuri = "unix:///var/run/docker.sock"\nnetwork = "azure-iot-edge"\n'
        "\n[moby_runtime.content_trust.ca_certs]\n"
        '"lighthouse.azurecr.io" = "file:///etc/lighthouse/notary-root.pem"\n',
    ),
    (False, "\n[aziot_max_requests]\nkeyd = 20\ncertd = 20\ntpmd = 5\nidentityd = 30\n"),
    (False, '\n[tpm]\ntcti = "swtpm:port=2321"\n'),
]
FULL = "".join(text for _, text in EDGE_DEVICE)
AZIOT_ONLY = "".join(text for edge, text in EDGE_DEVICE if not edge)

EDGE_NOTE = (
    "Note: left for IoT Edge: additional_info, agent, allow_elevated_docker_permissions, "
    "auto_reprovisioning_mode, connect, edge_ca, image_garbage_collection, "
    "imported_master_encryption_key, iotedge_max_requests, listen, "
    "manifest_trust_bundle_cert, moby_runtime, trust_bundle_cert, watchdog "
    "(`iotedge config apply` reads them)"
)
ENDPOINTS_NOTE = "`[endpoints]` is read only by debug builds of the original: ignored"

NONE = '[provisioning]\nsource = "none"\n'

# Each top-level key of IoT Edge 1.4/1.5's super-config, alone, in a shape IoT Edge takes.
EDGE_ALONE = {
    "trust_bundle_cert": 'trust_bundle_cert = "file:///etc/lighthouse/trust-bundle.pem"\n',
    "allow_elevated_docker_permissions": "allow_elevated_docker_permissions = true\n",
    "auto_reprovisioning_mode": 'auto_reprovisioning_mode = "OnErrorOnly"\n',
    "imported_master_encryption_key": 'imported_master_encryption_key = "/var/lib/k.key"\n',
    "manifest_trust_bundle_cert": 'manifest_trust_bundle_cert = "file:///etc/m.pem"\n',
    "additional_info": 'additional_info = "file:///etc/lighthouse/info.toml"\n',
    "iotedge_max_requests": "[iotedge_max_requests]\nmanagement = 50\nworkload = 10\n",
    "agent": '[agent]\nname = "edgeAgent"\ntype = "docker"\n[agent.config]\nimage = "a:1.5"\n',
    "connect": '[connect]\nworkload_uri = "unix:///w.sock"\nmanagement_uri = "unix:///m.sock"\n',
    "listen": '[listen]\nworkload_uri = "fd://w.socket"\nmanagement_uri = "fd://m.socket"\n',
    "watchdog": "[watchdog]\nmax_retries = 3\n",
    "edge_ca": '[edge_ca]\ncert = "file:///etc/ca.pem"\npk = "file:///etc/ca.key.pem"\n',
    "moby_runtime": '[moby_runtime]\nuri = "unix:///var/run/docker.sock"\nnetwork = "n"\n',
    "image_garbage_collection": "[image_garbage_collection]\nenabled = false\n",
}


def config_file(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def left_notes(out: str) -> list[str]:
    """The lines of apply's output about keys left alone (not the other notes, e.g. users)."""
    return [
        line
        for line in out.splitlines()
        if line.startswith("Note: ") and ("IoT Edge" in line or "[endpoints]" in line)
    ]


def applied(layout: Layout) -> dict[str, str]:
    return {service: layout.applied_config(service).read_text() for service in SERVICES}


# --------------------------------------------------------------------------------------------
# A whole IoT Edge device's config


def test_edge_sections_are_left_alone_and_named() -> None:
    full = sc.parse_super_config_text(FULL, "/etc/aziot/config.toml")
    bare = sc.parse_super_config_text(AZIOT_ONLY, "/etc/aziot/config.toml")
    assert full.left_for_iot_edge == tuple(sorted(EDGE_ALONE))
    assert full.ignored_debug_only == ()
    assert bare.left_for_iot_edge == ()
    # Apart from what was left alone, the two read the same.
    assert attrs.evolve(full, left_for_iot_edge=()) == bare
    assert full.hostname == "lighthouse-gw-3" and full.cloud_timeout_sec == 120
    assert full.max_requests == sc.MaxRequests(keyd=20, certd=20, tpmd=5, identityd=30)


def test_edge_device_applies_the_same_four_configs_with_one_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = Layout(tmp_path / "root")
    bare = config_file(tmp_path, AZIOT_ONLY, "bare.toml")
    assert aziotctl(["--root", str(layout.root), "config", "apply", "-c", str(bare)]) == 0
    without_edge = applied(layout)
    assert left_notes(capsys.readouterr().out) == []

    full = config_file(tmp_path, FULL)
    assert aziotctl(["--root", str(layout.root), "config", "apply", "-c", str(full)]) == 0
    out = capsys.readouterr().out
    assert applied(layout) == without_edge
    assert left_notes(out) == [EDGE_NOTE]
    assert f"Applied {full}; wrote:" in out
    # What the services read is ours only: none of IoT Edge's names leaked in.
    for text in without_edge.values():
        for key in EDGE_ALONE:
            assert key not in text
    assert "tcti" in without_edge["tpmd"] and "max_requests = 30" in without_edge["identityd"]


@pytest.mark.parametrize("key", sorted(EDGE_ALONE))
def test_each_edge_section_alone_is_accepted(tmp_path: Path, key: str) -> None:
    # Top-level keys must precede [provisioning]; tables may go either side.
    text = EDGE_ALONE[key] + NONE if "[" not in EDGE_ALONE[key] else NONE + EDGE_ALONE[key]
    out = io.StringIO()
    layout = Layout(tmp_path / "root")
    apply_cmd.apply(config_file(tmp_path, text), layout, out)
    assert left_notes(out.getvalue()) == [
        f"Note: left for IoT Edge: {key} (`iotedge config apply` reads them)"
    ]
    assert applied(layout)["identityd"].count("[provisioning]") == 1


def test_the_edge_list_is_iot_edges() -> None:
    assert set(sc.IOT_EDGE_KEYS) == set(EDGE_ALONE)
    assert not set(sc.IOT_EDGE_KEYS) & {"hostname", "provisioning", "endpoints", "tpm"}


# --------------------------------------------------------------------------------------------
# [endpoints]


def test_endpoints_is_accepted_with_its_note(tmp_path: Path) -> None:
    text = NONE + '[endpoints]\naziot_keyd = "unix:///run/aziot/keyd.sock"\n'
    config = sc.parse_super_config_text(text, "config.toml")
    assert config.ignored_debug_only == ("endpoints",)
    assert config.left_for_iot_edge == ()
    out = io.StringIO()
    layout = Layout(tmp_path / "root")
    apply_cmd.apply(config_file(tmp_path, text), layout, out)
    assert left_notes(out.getvalue()) == [f"Note: {ENDPOINTS_NOTE}"]
    assert all("keyd.sock" not in text for text in applied(layout).values())


def test_endpoints_and_edge_share_one_note_line(tmp_path: Path) -> None:
    text = FULL + '\n[endpoints]\naziot_identityd = "unix:///run/aziot/identityd.sock"\n'
    out = io.StringIO()
    apply_cmd.apply(config_file(tmp_path, text), Layout(tmp_path / "root"), out)
    assert left_notes(out.getvalue()) == [f"{EDGE_NOTE}; {ENDPOINTS_NOTE}"]


# --------------------------------------------------------------------------------------------
# Misspellings are still refused, nothing written

MISSPELT = [
    # (text, line, key, the name suggested)
    ('trust_bundle_certs = "file:///t.pem"\n' + NONE, 1, "trust_bundle_certs", "trust_bundle_cert"),
    ('auto_reprovisionning_mode = "Dynamic"\n' + NONE, 1, "auto_reprovisionning_mode", None),
    (NONE + "[edge-ca]\nauto_generated_edge_ca_expiry_days = 9\n", 3, "edge-ca", "edge_ca"),
    (NONE + "[Edge_CA]\nauto_generated_edge_ca_expiry_days = 9\n", 3, "Edge_CA", "edge_ca"),
    (NONE + '[agents]\nname = "edgeAgent"\n', 3, "agents", "agent"),
    (NONE + '[moby_runtim]\nuri = "unix:///d.sock"\n', 3, "moby_runtim", "moby_runtime"),
    (NONE + "[iotedge_max_request]\nworkload = 5\n", 3, "iotedge_max_request", None),
    (NONE + '[endpoint]\naziot_keyd = "unix:///k.sock"\n', 3, "endpoint", "endpoints"),
    ('hostnmae = "gw"\n' + NONE, 1, "hostnmae", "hostname"),
    ('[provisoning]\nsource = "none"\n', 1, "provisoning", "provisioning"),
    (NONE + "[cert_issuence.local_ca]\n", 3, "cert_issuence", "cert_issuance"),
    ('parent_host_name = "gw"\n' + NONE, 1, "parent_host_name", "parent_hostname"),
    # A key of ours under an Edge name's table is IoT Edge's business; one of IoT Edge's under
    # ours is not: nested keys stay strict.
    (NONE + "trust_bundle_cert = 'file:///t.pem'\n", 3, "provisioning.trust_bundle_cert", None),
    (NONE + "[tpm]\nedge_ca = 'x'\n", 4, "tpm.edge_ca", None),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "suggested"), MISSPELT, ids=[m[2] for m in MISSPELT]
)
def test_misspellings_are_refused_naming_them(
    tmp_path: Path, text: str, line: int, key: str, suggested: str | None
) -> None:
    path = config_file(tmp_path, text)
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as error:
        apply_cmd.apply(path, Layout(root), io.StringIO())
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: {key}: unknown key"), message
    if suggested is not None:
        assert f"(did you mean {suggested}?)" in message
    assert not root.exists()  # nothing was written


def test_a_misspelling_in_a_full_edge_config_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = Layout(tmp_path / "root")
    good = config_file(tmp_path, FULL)
    assert aziotctl(["--root", str(layout.root), "config", "apply", "-c", str(good)]) == 0
    before = applied(layout)
    capsys.readouterr()
    typo = FULL.replace("[watchdog]", "[watchdogs]").replace('"lighthouse-gw-3"\n', '"gw-4"\n', 1)
    bad = config_file(tmp_path, typo, "typo.toml")
    assert aziotctl(["--root", str(layout.root), "config", "apply", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    line = typo.splitlines().index("[watchdogs]") + 1
    assert f"{bad}:{line}: watchdogs: unknown key" in err
    assert "did you mean watchdog?" in err and "Nothing was changed" in err
    assert applied(layout) == before
