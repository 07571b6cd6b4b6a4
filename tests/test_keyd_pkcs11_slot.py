"""keyd given a `pkcs11_base_slot` by slot-id that SoftHSM does not have (spec/lessons.md row 2;
IIS #334: "slot not found" with no word on what was there). The token-label spelling of the same
mistake is in tests/test_keyd_pkcs11.py (`test_an_unusable_token_is_named_and_file_keys_keep_working`).

The log must name what was searched, in which library, and every slot that exists; file keys keep
working; keys that would live on the token get a clear 503 and nothing is written anywhere.
`softhsm2-util --show-slots` is the oracle for which slots exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.daemon import Keyd
from tests.softhsm import SoftHsmToken, make_softhsm_token, softhsm_available
from tests.test_keyd import ec_public_key, handle_of
from tests.test_keyd_pkcs11 import preloaded_file_key, wait_for_log

pytestmark = pytest.mark.skipif(not softhsm_available(), reason="softhsm2 is not installed")

ABSENT_SLOT = 4242


@pytest.fixture
def token(world_dir: Path) -> SoftHsmToken:
    return make_softhsm_token(world_dir / "softhsm", label="keyd-hsm")


def free_slot(token: SoftHsmToken) -> int:
    """The slot SoftHSM keeps with an uninitialized token, as softhsm2-util shows it."""
    shown = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env=token.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    slots = re.findall(r"^Slot (\d+)$.*?Initialized:\s+(\w+)", shown, re.M | re.S)
    assert (str(token.slot_id), "yes") in slots, shown
    free = [int(slot) for slot, initialized in slots if initialized == "no"]
    assert len(free) == 1, shown
    return free[0]


@pytest.mark.parametrize("case", ["absent", "uninitialized"])
def test_a_slot_id_that_is_not_usable_names_what_exists_and_file_keys_keep_working(
    world_dir: Path, token: SoftHsmToken, case: str
) -> None:
    free = free_slot(token)
    slot = ABSENT_SLOT if case == "absent" else free
    assert slot != token.slot_id
    path, device_key = preloaded_file_key(world_dir)
    keyd = Keyd(
        world_dir / "keyd",
        extra_config=(
            f'pkcs11_lib_path = "{token.lib_path}"\n'
            f'pkcs11_base_slot = "pkcs11:slot-id={slot}?pin-value={token.pin}"\n'
            f'[preloaded_keys]\ndevice-id = "file://{path}"\n'
        ),
        env={"SOFTHSM2_CONF": str(token.conf_path)},
    ).start()
    try:
        if case == "absent":
            searched = f"no PKCS#11 slot with slot-id {slot} in {token.lib_path}; present: "
        else:
            searched = (
                f"the PKCS#11 token found by slot-id {slot} (slot {slot}) is not initialized; "
                "present: "
            )
        logs = wait_for_log(keyd, searched)
        # Every slot that exists, with what it holds.
        line = logs[logs.index(searched) :].splitlines()[0]
        assert f"slot {token.slot_id}: token 'keyd-hsm'" in line, line
        assert f"slot {free}: uninitialized token" in line, line
        assert token.pin not in logs
        # The preloaded file key still serves.
        handle = handle_of(keyd.call("GET", "/keypair/device-id"))
        public = ec_public_key(keyd, handle)
        assert public.public_numbers() == device_key.public_key().public_numbers()
        before = keyd.snapshot()
        for method, target, body in [
            ("POST", "/keypair", {"keyId": "new-pair"}),
            ("POST", "/key", {"keyId": "new-key", "usage": "sign"}),
        ]:
            reply = keyd.call(method, target, body)
            assert reply.status == 503, (target, reply.body)
            assert reply.message.startswith("the PKCS#11 token is unavailable: ")
            assert f"slot-id {slot}" in reply.message or f"slot {slot}" in reply.message
        assert keyd.snapshot() == before
        # Nothing was made on the real token either.
        listed = token.pkcs11_tool("--list-objects").stdout
        assert "new-pair" not in listed and "new-key" not in listed
    finally:
        keyd.stop()
