"""`aziotctl config mp` (spec/provisioning.md §5.2), the connection-string parser it shares with
apply, and contrib/config.toml.template: each of its blocks, uncommented, is a super-config
apply accepts.
"""

from __future__ import annotations

import base64
import io
import re
import stat
from pathlib import Path

import pytest
import tomli

from aziot.cli import apply as apply_cmd
from aziot.cli.layout import Layout
from aziot.cli.main import main as aziotctl
from aziot.config.super_config import (
    ConnectionString,
    ManualConnectionString,
    decode_base64_key,
    parse_super_config_text,
)

KEY = base64.b64encode(b"aziot-identity-service|aziot-ide").decode()
CS = f"HostName=example.azure-devices.net;DeviceId=my-device;SharedAccessKey={KEY}"
TEMPLATE = Path(__file__).resolve().parent.parent / "contrib" / "config.toml.template"


# --------------------------------------------------------------------------------------------
# The connection string


def test_connection_string_parts_and_ignored_extras() -> None:
    parsed = ConnectionString.parse(f"GatewayHostName=gw;{CS};ModuleId=m")
    assert parsed.iothub_hostname == "example.azure-devices.net"
    assert parsed.device_id == "my-device"
    assert parsed.key == b"aziot-identity-service|aziot-ide"
    assert KEY not in repr(parsed)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("DeviceId=d;SharedAccessKey=AAAA", '"HostName" is missing'),
        ("HostName=h;SharedAccessKey=AAAA", '"DeviceId" is missing'),
        ("HostName=h;DeviceId=d", '"SharedAccessKey" is missing'),
        ("hostname=h;DeviceId=d;SharedAccessKey=AAAA", '"HostName" is missing'),  # case matters
        ("HostName=h;DeviceId=;SharedAccessKey=AAAA", '"DeviceId" is empty'),
        ("HostName=h;DeviceId=d;SharedAccessKey=not base64!", "not valid base64"),
    ],
)
def test_bad_connection_strings(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        ConnectionString.parse(text)


def test_base64_padding_tolerance() -> None:
    assert decode_base64_key("YWJj") == b"abc"
    assert decode_base64_key("YWI=") == decode_base64_key("YWI") == b"ab"
    assert decode_base64_key("YQ==") == decode_base64_key("YQ") == b"a"
    for bad in ("YQ=", "YWI==", "YR==", "Y", "YW=I"):
        with pytest.raises(ValueError):
            decode_base64_key(bad)


# --------------------------------------------------------------------------------------------
# config mp


def test_mp_writes_a_manual_super_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "config.toml"
    assert aziotctl(["config", "mp", "-c", CS, "-o", str(out)]) == 0
    assert tomli.loads(out.read_text()) == {
        "provisioning": {"source": "manual", "connection_string": CS}
    }
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"sudo aziotctl config apply -c '{out}'" in capsys.readouterr().out
    # What mp wrote is what apply reads.
    config = parse_super_config_text(out.read_text(), str(out))
    assert isinstance(config.provisioning, ManualConnectionString)
    assert config.provisioning.connection_string.key == b"aziot-identity-service|aziot-ide"
    assert list(out.parent.iterdir()) == [out]  # no temp file left


def test_mp_defaults_to_the_layouts_super_config(tmp_path: Path) -> None:
    assert aziotctl(["--root", str(tmp_path), "config", "mp", "-c", CS]) == 0
    assert Layout(tmp_path).super_config.is_file()


def test_mp_refuses_an_existing_file_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.toml"
    out.write_text("# the operator's\n")
    out.chmod(0o644)
    assert aziotctl(["config", "mp", "-c", CS, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and str(out) in err
    assert out.read_text() == "# the operator's\n"
    assert aziotctl(["config", "mp", "-c", CS, "-o", str(out), "--force"]) == 0
    assert "connection_string" in out.read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_mp_refuses_a_bad_connection_string_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.toml"
    assert aziotctl(["config", "mp", "-c", "HostName=h;DeviceId=d", "-o", str(out)]) == 1
    assert '"SharedAccessKey" is missing' in capsys.readouterr().err
    assert not out.exists()


def test_a_connection_string_with_quotes_round_trips(tmp_path: Path) -> None:
    # TOML escaping: a quote or backslash in a part must not break the file.
    odd = f'HostName=h"\\x;DeviceId=d;SharedAccessKey={KEY}'
    out = tmp_path / "config.toml"
    assert aziotctl(["config", "mp", "-c", odd, "-o", str(out)]) == 0
    assert tomli.loads(out.read_text())["provisioning"]["connection_string"] == odd


# --------------------------------------------------------------------------------------------
# contrib/config.toml.template


def _blocks() -> dict[str, list[str]]:
    """The template's `## BEGIN <name>` … `## END` blocks, by name."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith("## BEGIN "):
            current = blocks.setdefault(line.removeprefix("## BEGIN "), [])
        elif line == "## END":
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _uncommented(lines: list[str]) -> str:
    """A block as an operator uncomments it: settings lose their "# ", explanations stay."""
    out = []
    for line in lines:
        if line.startswith("## "):
            out.append(line)
        elif line.startswith("# ") or line == "#":
            out.append(line[2:])
        else:
            raise AssertionError(f"unexpected template line {line!r}")
    return "\n".join(out) + "\n"


def test_the_template_as_shipped_is_all_comments() -> None:
    text = TEMPLATE.read_text()
    assert tomli.loads(text) == {}
    # auth_key_index is offered as an integer (the original's template quotes it).
    assert "# auth_key_index = 0x00_01_00" in text


PROVISIONING = sorted(name for name in _blocks() if name.startswith("provisioning "))


def test_the_template_offers_every_provisioning_shape() -> None:
    assert PROVISIONING == [
        "provisioning dps-symmetric-key",
        "provisioning dps-tpm",
        "provisioning dps-x509",
        "provisioning dps-x509-issued",
        "provisioning manual-connection-string",
        "provisioning manual-sas",
        "provisioning manual-x509",
        "provisioning manual-x509-issued",
    ]


@pytest.mark.parametrize("block", PROVISIONING)
def test_each_provisioning_block_uncommented_parses_and_renders(block: str) -> None:
    blocks = _blocks()
    others = [
        name
        for name in blocks
        if not name.startswith("provisioning ")
        # nested mode cannot be combined with DPS
        and not (name == "local_gateway" and "dps" in block)
    ]
    text = "".join(_uncommented(blocks[name]) for name in [*others, block])
    config = parse_super_config_text(text, str(TEMPLATE))
    result = apply_cmd.render(
        config, identityd_uid=5556, certd_uid=5555, hostname="h", layout=Layout()
    )
    apply_cmd.check_rendered(result, Layout())
    assert tomli.loads(result.text("tpmd")) == {
        "hierarchy_authorization": {"endorsement": "hello", "owner": "world"}
    }
    # Alone (without the optional sections) it parses too.
    parse_super_config_text(_uncommented(blocks[block]), str(TEMPLATE))


def test_the_template_mp_output_applies(tmp_path: Path) -> None:
    out = tmp_path / "config.toml"
    assert aziotctl(["config", "mp", "-c", CS, "-o", str(out)]) == 0
    layout = Layout(tmp_path / "root")
    apply_cmd.apply(out, layout, io.StringIO())
    assert (layout.keyd_secrets / "device-id").read_bytes() == b"aziot-identity-service|aziot-ide"
