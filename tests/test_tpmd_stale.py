"""tpmd and a TPM left in a state it did not make (spec/lessons.md row 3; IIS #450): a foreign key
at the storage root key's persistent handle, and hierarchy passwords that do not match the
config. tpmd must name the handle or the hierarchy and the way out, answer 500 meanwhile, and
pick the TPM up by itself, without a restart, once the operator has fixed the TPM.

The original would take whatever sits at 0x81000001 as its SRK (and DPS attestation would then
fail far from the cause); tpmd refuses a key that is not a restricted decryption key instead.
tpm2-tools makes the bad state and is the oracle for what the TPM holds afterwards.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.swtpm import Swtpm, swtpm_available
from tests.test_tpmd import (
    AUTH_KEY,
    EK,
    INTERNAL,
    SRK,
    expected,
    import_key,
    sign,
    tpmd_config,
    wait_for_tpm,
)

pytestmark = pytest.mark.skipif(not swtpm_available(), reason="swtpm/tpm2-tools not installed")

# TPMA_OBJECT bits, as tpm2_readpublic's `tss` output holds them
RESTRICTED, DECRYPT, SIGN = 0x10000, 0x20000, 0x40000
KEYEDHASH, ECC = 0x0008, 0x0023  # TPM_ALG_ID of an object's type


@pytest.fixture
def tpm(world_dir: Path) -> Iterator[Swtpm]:
    with Swtpm(world_dir / "tpm") as started:
        yield started


def wait_for_log(daemon: Daemon, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (logs := daemon.logs()):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{logs}"
        time.sleep(0.1)
    return logs


def public_at(tpm: Swtpm, handle: int) -> bytes:
    """The TPM2B_PUBLIC of the key persisted at `handle`, as tpm2_readpublic reads it."""
    out = tpm.directory / f"{handle:x}-now.pub"
    tpm.tools("tpm2_readpublic", "-c", hex(handle), "-f", "tss", "-o", str(out))
    return out.read_bytes()


def attributes_at(tpm: Swtpm, handle: int) -> int:
    # TPM2B_PUBLIC: size (2), type (2), nameAlg (2), objectAttributes (4)
    return int.from_bytes(public_at(tpm, handle)[6:10], "big")


def type_at(tpm: Swtpm, handle: int) -> int:
    return int.from_bytes(public_at(tpm, handle)[2:4], "big")


def persist_signing_key(tpm: Swtpm, handle: int) -> None:
    context = tpm.directory / "signer.ctx"
    tpm.tools(
        "tpm2_createprimary", "-C", "o", "-G", "ecc",
        "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        "-c", str(context),
    )  # fmt: skip
    tpm.tools("tpm2_evictcontrol", "-C", "o", "-c", str(context), hex(handle))


def test_a_signing_key_at_the_srk_handle_is_named_and_tpmd_recovers_once_it_is_evicted(
    world_dir: Path, tpm: Swtpm
) -> None:
    persist_signing_key(tpm, SRK)
    daemon = Daemon(world_dir / "d", {"tpmd": tpmd_config(tpm)}).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    try:
        logs = wait_for_log(daemon, f"tpm2_evictcontrol -C o -c {SRK:#x}")
        cause = f"persistent handle {SRK:#x} holds a key that is not a storage root key"
        assert cause in logs, logs
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        assert (reply.status, reply.json()) == (500, INTERNAL)
        # Retried with backoff, but said once: not a line per retry.
        time.sleep(1.0)
        assert daemon.logs().count(f"the TPM cannot be used; retrying with backoff: {cause}") == 1
        # tpmd left the foreign key where it was.
        assert attributes_at(tpm, SRK) & SIGN
        # The operator evicts it; tpmd makes the SRK on its next try, in the same process.
        tpm.tools("tpm2_evictcontrol", "-C", "o", "-c", hex(SRK))
        keys = wait_for_tpm(daemon, timeout=20)
        attributes = attributes_at(tpm, SRK)
        assert attributes & (RESTRICTED | DECRYPT) == RESTRICTED | DECRYPT
        assert not attributes & SIGN
        srk = tpm.directory / "srk.pub"
        tpm.tools("tpm2_readpublic", "-c", hex(SRK), "-f", "tss", "-o", str(srk))
        assert base64.b64decode(keys["storage_root_key"]) == srk.read_bytes()
        assert "created and persisted the storage root key" in daemon.logs()
        assert daemon.process.pid == pid and daemon.process.poll() is None
        # And it works: an auth key made for these EK and SRK imports and signs.
        key = b"k" * 32
        assert import_key(daemon, keys, key) == 200
        assert sign(daemon, b"data") == expected(key, b"data")
    finally:
        daemon.stop()


def test_a_signing_key_at_the_ek_handle_is_named_too(world_dir: Path, tpm: Swtpm) -> None:
    persist_signing_key(tpm, EK)
    daemon = Daemon(world_dir / "d", {"tpmd": tpmd_config(tpm)}).start()
    try:
        logs = wait_for_log(daemon, f"tpm2_evictcontrol -C o -c {EK:#x}")
        assert f"persistent handle {EK:#x} holds a key that is not a endorsement key" not in logs
        assert f"persistent handle {EK:#x} holds a key that is not an endorsement key" in logs
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        assert (reply.status, reply.json()) == (500, INTERNAL)
    finally:
        daemon.stop()


def test_a_wrong_endorsement_password_is_named_and_tpmd_recovers_once_they_match(
    world_dir: Path, tpm: Swtpm
) -> None:
    # The TPM's endorsement hierarchy has a password the config does not: the EK cannot be made.
    tpm.tools("tpm2_changeauth", "-c", "e", "tpm-side")
    config = tpmd_config(tpm, '[hierarchy_authorization]\nendorsement = "config-side"\n')
    daemon = Daemon(world_dir / "d", {"tpmd": config}).start()
    try:
        logs = wait_for_log(daemon, "endorsement hierarchy's authorization")
        assert "creating the endorsement key" in logs
        assert "[hierarchy_authorization] endorsement in the tpmd config" in logs
        reply = daemon.request("tpmd", "GET", "/get_tpm_keys")
        assert (reply.status, reply.json()) == (500, INTERNAL)
        assert EK not in persistent(tpm)
        # The TPM is given the configured password: tpmd makes the EK without a restart.
        tpm.tools("tpm2_changeauth", "-c", "e", "-p", "tpm-side", "config-side")
        keys = wait_for_tpm(daemon, timeout=20)
        assert {EK, SRK} <= persistent(tpm)
        ek = tpm.directory / "ek.pub"
        tpm.tools("tpm2_readpublic", "-c", hex(EK), "-f", "tss", "-o", str(ek))
        assert base64.b64decode(keys["endorsement_key"]) == ek.read_bytes()
        # The password is used where the EK is: the credential activation of an import.
        assert import_key(daemon, keys, b"e" * 32) == 200
        assert sign(daemon, b"x") == expected(b"e" * 32, b"x")
    finally:
        daemon.stop()


def test_an_endorsement_password_changed_later_fails_the_import_by_name(
    world_dir: Path, tpm: Swtpm
) -> None:
    """The EK exists, so tpmd opens the TPM; only the import (PolicySecret on the endorsement
    hierarchy) needs the password, and its failure leaves the TPM open and usable."""
    daemon = Daemon(world_dir / "d", {"tpmd": tpmd_config(tpm)}).start()
    try:
        keys = wait_for_tpm(daemon)
        tpm.tools("tpm2_changeauth", "-c", "e", "changed")
        keys = wait_for_tpm(daemon)  # the TPM may have been reopened after tpm2-tools' turn
        assert import_key(daemon, keys, b"a" * 32) == 500
        logs = daemon.logs()
        assert "PolicySecret on the endorsement hierarchy: the TPM refused the endorsement" in logs
        assert sign(daemon, b"x") is None  # nothing was imported
        tpm.tools("tpm2_changeauth", "-c", "e", "-p", "changed")
        assert import_key(daemon, keys, b"a" * 32) == 200
        assert sign(daemon, b"x") == expected(b"a" * 32, b"x")
    finally:
        daemon.stop()


def persistent(tpm: Swtpm) -> set[int]:
    out = tpm.tools("tpm2_getcap", "handles-persistent").stdout.decode()
    return {int(line.strip("- \n"), 16) for line in out.splitlines() if line.strip()}


def test_a_signing_key_at_the_auth_key_handle_is_named_and_replaced_by_the_import(
    world_dir: Path, tpm: Swtpm
) -> None:
    """iotedge #6638's TPM: an object at the auth key handle that tpmd did not put there."""
    persist_signing_key(tpm, AUTH_KEY)
    assert type_at(tpm, AUTH_KEY) == ECC
    daemon = Daemon(world_dir / "d", {"tpmd": tpmd_config(tpm)}).start()
    try:
        keys = wait_for_tpm(daemon)
        stale = f"{AUTH_KEY:#x} holds an ECC key, not an HMAC auth key"
        assert f"the auth key handle {stale}; the next auth key import replaces it" in (
            daemon.logs()
        )
        assert sign(daemon, b"x") is None
        assert f"could not sign with auth key: no auth key has been imported ({stale})" in (
            daemon.logs()
        )
        key = b"r" * 32
        assert import_key(daemon, keys, key) == 200
        assert sign(daemon, b"x") == expected(key, b"x")
        assert type_at(tpm, AUTH_KEY) == KEYEDHASH
    finally:
        daemon.stop()
