"""tpmd end to end against swtpm: its API byte for byte (spec/api.md §6), the EK/SRK as
tpm2-tools reads them, an auth key made the way DPS makes it imported and used for HMAC, and a
TPM that is absent at start, restarted, or given a bad blob.

tpm2-tools is the oracle for what is in the TPM; `hmac`/`hashlib` for what the TPM signs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aziot.config.loader import ConfigError
from aziot.config.tpmd import TpmdConfig, parse_tpmd
from mockcloud.tpm_blob import make_auth_key_blob
from tests.daemon import Daemon, keyd_config
from tests.swtpm import Swtpm, swtpm_available

pytestmark = pytest.mark.skipif(not swtpm_available(), reason="swtpm/tpm2-tools not installed")

EK, SRK, AUTH_KEY = 0x81010001, 0x81000001, 0x81000100
INTERNAL = {"message": "internal error"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tpmd_config(tpm: Swtpm, extra: str = "") -> str:
    return f'tcti = "{tpm.tcti}"\n{extra}'


def wait_for_tpm(daemon: Daemon, timeout: float = 30.0) -> dict[str, str]:
    """The keys, once tpmd has the TPM open (it opens it in the background after start)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        if reply.status == 200:
            keys: dict[str, str] = reply.json()
            return keys
        if time.monotonic() > deadline:
            raise TimeoutError(f"tpmd did not open the TPM:\n{daemon.logs()}")
        time.sleep(0.1)


def import_key(daemon: Daemon, keys: dict[str, str], key: bytes) -> int:
    blob = make_auth_key_blob(
        base64.b64decode(keys["endorsement_key"]), base64.b64decode(keys["storage_root_key"]), key
    )
    reply = daemon.request("tpmd", "POST", "/import_auth_key", {"key": b64(blob)})
    assert reply.status != 200 or reply.json() == {}
    return reply.status


def sign(daemon: Daemon, data: bytes) -> bytes | None:
    reply = daemon.request("tpmd", "POST", "/sign_with_auth_key", {"data": b64(data)})
    if reply.status != 200:
        assert (reply.status, reply.json()) == (500, INTERNAL)
        return None
    return base64.b64decode(reply.json()["digest"])


def expected(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def persistent_handles(tpm: Swtpm) -> set[int]:
    out = tpm.tools("tpm2_getcap", "handles-persistent").stdout.decode()
    return {int(line.strip("- \n"), 16) for line in out.splitlines() if line.strip()}


@pytest.fixture
def tpm(world_dir: Path) -> Iterator[Swtpm]:
    with Swtpm(world_dir / "tpm") as started:
        yield started


@pytest.fixture
def tpmd(world_dir: Path, tpm: Swtpm) -> Iterator[Daemon]:
    daemon = Daemon(world_dir / "d", {"tpmd": tpmd_config(tpm)}).start()
    yield daemon
    if daemon.process is not None:
        daemon.stop()


# -- EK and SRK --------------------------------------------------------------------------------


def test_get_tpm_keys_is_what_tpm2_readpublic_reads(tpmd: Daemon, tpm: Swtpm) -> None:
    keys = wait_for_tpm(tpmd)
    assert set(keys) == {"endorsement_key", "storage_root_key"}
    assert {EK, SRK} <= persistent_handles(tpm)
    for handle, field in ((EK, "endorsement_key"), (SRK, "storage_root_key")):
        out = tpm.directory / f"{handle:x}.pub"
        tpm.tools("tpm2_readpublic", "-c", hex(handle), "-f", "tss", "-o", str(out))
        assert base64.b64decode(keys[field]) == out.read_bytes()
    # The EK is the standard one (TCG template L-1): tpm2_createek derives the same key.
    ek_pub = tpm.directory / "createek.pub"
    ctx = tpm.directory / "ek.ctx"
    tpm.tools("tpm2_createek", "-c", str(ctx), "-G", "rsa", "-u", str(ek_pub), "-f", "tss")
    assert base64.b64decode(keys["endorsement_key"]) == ek_pub.read_bytes()


def test_existing_keys_are_kept_and_stale_transients_flushed(world_dir: Path, tpm: Swtpm) -> None:
    ek_pub = tpm.directory / "ek.pub"
    tpm.tools("tpm2_createek", "-c", hex(EK), "-G", "rsa", "-u", str(ek_pub), "-f", "tss")
    # a transient object another process left loaded (swtpm has no resource manager)
    tpm.tools("tpm2_createprimary", "-C", "o", "-c", str(tpm.directory / "stale.ctx"))
    assert tpm.tools("tpm2_getcap", "handles-transient").stdout.strip()
    daemon = Daemon(world_dir / "d", {"tpmd": tpmd_config(tpm)}).start()
    try:
        keys = wait_for_tpm(daemon)
        assert base64.b64decode(keys["endorsement_key"]) == ek_pub.read_bytes()
        assert not tpm.tools("tpm2_getcap", "handles-transient").stdout.strip()
        assert "flushed 1 stale transient object(s)" in daemon.logs()
    finally:
        daemon.stop()


# -- the auth key ------------------------------------------------------------------------------


def test_an_auth_key_from_dps_imports_and_signs_as_hmac_sha256(tpmd: Daemon, tpm: Swtpm) -> None:
    keys = wait_for_tpm(tpmd)
    assert sign(tpmd, b"before any import") is None  # the original's 500 without a key
    key = os.urandom(32)
    assert import_key(tpmd, keys, key) == 200
    assert AUTH_KEY in persistent_handles(tpm)
    for data in (b"", b"sr=my-scope%2fregistrations%2fdev\n1700000000", os.urandom(3000)):
        assert sign(tpmd, data) == expected(key, data)
    # the key is in the TPM, not in tpmd: a restarted daemon signs with it
    tpmd.restart()
    wait_for_tpm(tpmd)
    assert sign(tpmd, b"again") == expected(key, b"again")
    # a second import replaces it
    second = os.urandom(32)
    assert import_key(tpmd, keys, second) == 200
    assert sign(tpmd, b"x") == expected(second, b"x")


def test_a_bad_blob_is_500_and_the_previous_key_still_signs(tpmd: Daemon, tpm: Swtpm) -> None:
    keys = wait_for_tpm(tpmd)
    key = os.urandom(32)
    assert import_key(tpmd, keys, key) == 200
    good = make_auth_key_blob(
        base64.b64decode(keys["endorsement_key"]),
        base64.b64decode(keys["storage_root_key"]),
        os.urandom(32),
    )
    corrupt_duplicate = bytearray(good)
    corrupt_duplicate[-120] ^= 0xFF  # inside the duplicate or seed: the integrity check fails
    other_tpm_ek = bytearray(good)
    other_tpm_ek[10] ^= 0xFF  # the credential blob: ActivateCredential fails
    for blob in (b"", b"\x00\x10abc", good[:200], bytes(corrupt_duplicate), bytes(other_tpm_ek)):
        reply = tpmd.request("tpmd", "POST", "/import_auth_key", {"key": b64(blob)})
        assert (reply.status, reply.json()) == (500, INTERNAL)
        assert sign(tpmd, b"still") == expected(key, b"still")
    assert AUTH_KEY in persistent_handles(tpm)
    logs = tpmd.logs()
    assert "could not import auth key: the auth key blob is malformed" in logs
    assert "could not import auth key: activating the credential" in logs


# -- a TPM that comes and goes -----------------------------------------------------------------


def test_a_restarted_swtpm_is_picked_up_again(tpmd: Daemon, tpm: Swtpm) -> None:
    keys = wait_for_tpm(tpmd)
    key = os.urandom(32)
    assert import_key(tpmd, keys, key) == 200
    tpm.stop()
    reply = tpmd.request("tpmd", "POST", "/sign_with_auth_key", {"data": b64(b"gone")})
    assert (reply.status, reply.json()) == (500, INTERNAL)
    tpm.start()  # a TPM reset: transient state gone, persistent keys kept
    assert wait_for_tpm(tpmd) == keys
    assert sign(tpmd, b"back") == expected(key, b"back")
    assert "the TPM was lost; reopening it" in tpmd.logs()


def test_swtpm_absent_at_start_keyd_serves_and_tpmd_recovers(world_dir: Path) -> None:
    tpm = Swtpm(world_dir / "tpm")
    daemon = Daemon(world_dir / "d", {"keyd": keyd_config, "tpmd": tpmd_config(tpm)}).start()
    try:
        reply = daemon.request("keyd", "POST", "/key", {"keyId": "k", "usage": "sign"})
        assert reply.status == 200
        for method, path, body in (
            ("GET", "/get_tpm_keys", None),
            ("POST", "/import_auth_key", {"key": b64(b"blob")}),
            ("POST", "/sign_with_auth_key", {"data": b64(b"data")}),
        ):
            reply = daemon.request("tpmd", method, path, body)
            assert (reply.status, reply.json()) == (500, INTERNAL)
        assert f"cannot open the TPM through TCTI '{tpm.tcti}'" in daemon.logs()
        with tpm:
            keys = wait_for_tpm(daemon)
            assert import_key(daemon, keys, b"k" * 32) == 200
            assert sign(daemon, b"d") == expected(b"k" * 32, b"d")
    finally:
        daemon.stop()


def test_a_crash_in_the_worker_restarts_it(world_dir: Path, tpm: Swtpm) -> None:
    daemon = Daemon(
        world_dir / "d", {"tpmd": tpmd_config(tpm)}, env={"AZIOTD_FAULTS": "tpm.call=crash*1"}
    ).start()
    try:
        wait_for_tpm(daemon)
        assert "actor tpm crashed" in daemon.logs()
    finally:
        daemon.stop()


def test_a_hung_tpm_gets_quick_500s_while_keyd_serves(world_dir: Path, tpm: Swtpm) -> None:
    daemon = Daemon(
        world_dir / "d",
        {"keyd": keyd_config, "tpmd": tpmd_config(tpm)},
        env={"AZIOTD_FAULTS": "tpm.call=hang*1"},  # the first TPM call (opening it) never returns
    ).start()
    try:
        started = time.monotonic()
        reply = daemon.request("tpmd", "POST", "/sign_with_auth_key", {"data": b64(b"x")})
        assert (reply.status, reply.json()) == (500, INTERNAL)
        assert time.monotonic() - started < 2
        reply = daemon.request("keyd", "POST", "/key", {"keyId": "k", "usage": "sign"})
        assert reply.status == 200
        assert "could not sign with auth key: the TPM is not available" in daemon.logs()
    finally:
        daemon.stop()


def test_a_wrong_owner_password_is_named_in_the_log(world_dir: Path, tpm: Swtpm) -> None:
    config = tpmd_config(tpm, '[hierarchy_authorization]\nowner = "not-the-password"\n')
    daemon = Daemon(world_dir / "d", {"tpmd": config}).start()
    try:
        deadline = time.monotonic() + 20
        while "owner hierarchy's authorization" not in daemon.logs():
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.1)
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        assert (reply.status, reply.json()) == (500, INTERNAL)
    finally:
        daemon.stop()


# -- the HTTP surface --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_tpmd() -> Iterator[Daemon]:
    """A tpmd whose TPM is absent: every request here is refused before the TPM is asked."""
    root = Path(tempfile.mkdtemp(prefix="aziot-tpmd-"))
    daemon = Daemon(root, {"tpmd": f'tcti = "swtpm:path={root}/absent.sock"\n'}).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        (
            "GET",
            "/get_tpm_keys?api-version=2021-05-01",
            None,
            400,
            'invalid api-version "2021-05-01"',
        ),
        ("GET", "/get_tpm_keys?x=1&api-version=", None, 400, 'invalid api-version ""'),
        ("GET", "/get_tpm_key", None, 404, "not found"),
        ("POST", "/get_tpm_keys", {}, 400, "method not allowed"),
        ("GET", "/import_auth_key", None, 400, "method not allowed"),
        ("DELETE", "/sign_with_auth_key", {}, 400, "method not allowed"),
        ("POST", "/import_auth_key", None, 400, "missing request body"),
        ("POST", "/sign_with_auth_key", None, 400, "missing request body"),
        ("POST", "/import_auth_key", {}, 422, "missing field `key` at line 1 column 2"),
        (
            "POST",
            "/sign_with_auth_key",
            {"digest": "AA=="},
            422,
            "missing field `data` at line 1 column 18",
        ),
        (
            "POST",
            "/sign_with_auth_key",
            {"data": 5},
            422,
            "invalid type: integer `5`, expected a base64-encoded string at line 1 column 10",
        ),
        (
            "POST",
            "/import_auth_key",
            {"key": "a$=="},
            422,
            "Invalid symbol 36, offset 1. at line 1 column 14",
        ),
    ],
)
def test_bad_requests_get_the_original_answers(
    idle_tpmd: Daemon, method: str, path: str, body: object, status: int, message: str
) -> None:
    reply = idle_tpmd.request("tpmd", method, path, body)
    assert (reply.status, reply.json()) == (status, {"message": message})


def test_api_version_is_required(idle_tpmd: Daemon) -> None:
    from tests import rawhttp

    socket = str(idle_tpmd.services["tpmd"].socket)
    reply = rawhttp.request(socket, "GET", "/get_tpm_keys")
    assert (reply.status, reply.json()) == (400, {"message": "api-version not specified"})


# -- config ------------------------------------------------------------------------------------


def test_config_defaults_and_values() -> None:
    assert parse_tpmd({}, "f") == TpmdConfig()
    assert TpmdConfig().tcti == "device"
    assert TpmdConfig().auth_key_handle == 0x81000100
    import tomli

    config = parse_tpmd(
        tomli.loads(
            'max_requests = 50\ntcti = "swtpm:host=127.0.0.1,port=2321"\n'
            "auth_key_index = 0x01_02_03\n"
            '[hierarchy_authorization]\nendorsement = "hello"\nowner = "world"\n'
            '[endpoints]\naziot_tpmd = "unix:///run/t.sock"\n'
        ),
        "f",
    )
    assert (config.max_requests, config.tcti, config.auth_key_handle) == (
        50,
        "swtpm:host=127.0.0.1,port=2321",
        0x81010203,
    )
    assert config.hierarchy_authorization.endorsement == "hello"
    assert config.hierarchy_authorization.owner == "world"
    assert "world" not in repr(config)
    assert config.endpoints.aziot_tpmd == "unix:///run/t.sock"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"auth_key_index": 0x80_00_00}, "auth_key_index: 0x800000 is out of range"),
        ({"auth_key_index": -1}, "auth_key_index: -0x1 is out of range"),
        ({"auth_key_index": "0x00_01_00"}, "auth_key_index: expected an integer"),
        ({"tcti": 2}, "tcti: expected a string, found an integer"),
        ({"tcti": "a\0b"}, "tcti: must not contain a NUL"),
        ({"max_requests": 0}, "max_requests: 0 is out of range (expected an integer at least 1)"),
        ({"max_requests": True}, "max_requests: expected an integer, found a boolean"),
        ({"auth_key_idx": 1}, "auth_key_idx: unknown key"),
        ({"hierarchy_authorization": {"ownr": "x"}}, "hierarchy_authorization.ownr: unknown key"),
        (
            {"hierarchy_authorization": {"owner": 1}},
            "hierarchy_authorization.owner: expected a string",
        ),
        ({"hierarchy_authorization": "x"}, "hierarchy_authorization: expected a table"),
        ({"endpoints": {"aziot_keyd": "unix:///k"}}, "endpoints.aziot_keyd: unknown key"),
    ],
)
def test_bad_config_is_refused_naming_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_tpmd(data, "/etc/aziot/tpmd/config.toml")
    assert str(caught.value).startswith("/etc/aziot/tpmd/config.toml: ")
    assert message in str(caught.value)


def test_a_bad_config_d_file_stops_the_daemon(world_dir: Path) -> None:
    daemon = Daemon(
        world_dir / "d",
        {"tpmd": 'tcti = "device"\n'},
        config_d={"tpmd": {"50-typo.toml": "auth_key_index = 0x80_00_00\n"}},
    )
    daemon.start(wait=False)
    assert daemon.process is not None
    assert daemon.process.wait(30) == 78
    daemon.process = None
    assert "config.d/50-typo.toml:1: auth_key_index: 0x800000 is out of range" in daemon.logs()
