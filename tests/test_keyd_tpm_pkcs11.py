"""keyd with key pairs in a TPM, through tpm2-pkcs11 as a PKCS#11 token on swtpm.

The setup is the README's ("Keys in the TPM through PKCS#11"): `tpm2_ptool init` makes the store
and the TPM primary key, `pkcs11-tool --init-token`/`--init-pin` makes the token through the
library itself, and keyd gets the library and the token as its base slot. Independent checks:
`cryptography` verifies keyd's signatures against the key pkcs11-tool exports; `pkcs11-tool` and
`tpm2_ptool` list the token.

What Debian bookworm's tpm2-pkcs11 1.9 does differently, found here:

- No `C_CopyObject` (CKR_FUNCTION_NOT_SUPPORTED), keyd's usual commit of a token write. keyd
  finds that out once and commits by relabelling the staged objects instead (`C_SetAttributeValue`
  of CKA_LABEL, which it supports); a key pair creation killed after any step leaves no key or
  the whole key once keyd starts again (tested here in a subprocess killed at each step). A key
  rotation (`<id>-temp` moved onto `<id>`) retires the old pair, relabels the new one and then
  destroys the retired one; killed after any step, the next start leaves the old key or the new
  one under `<id>`.
- Objects destroyed, a new object can get the handle of one still on the token; keyd
  re-initializes the library before its next creation.
- An EC template with CKA_ENCRYPT false and CKA_VERIFY true on the public half is refused
  (CKR_GENERAL_ERROR: in the TPM, encrypt goes with sign and verify with decrypt); keyd retries
  once without those two and remembers the token's preference.
- Generic secret keys: no CKM_GENERIC_SECRET_KEY_GEN and no secret import, so the
  handle-validation key and symmetric keys go to keyd's files (its fallback).
- Without a resource manager (a device has /dev/tpmrm0) tpm2-tools and tpm2-pkcs11 leave
  transient objects loaded in the TPM, which has three slots, and the library leaks one on a
  refused template: the provisioned-key test flushes them (`tpm2_flushcontext -t`) after each
  process; the tests of keys keyd creates run swtpm behind tpm2-abrmd (`tests.swtpm.Tabrmd`),
  which flushes what each client leaves when it disconnects.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from tests.daemon import Keyd
from tests.swtpm import Swtpm, Tabrmd, swtpm_available, tabrmd_available
from tests.test_keyd import ec_public_key, handle_of, sign

TPM2_PKCS11_LIB = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
HVK_FILE = (
    "handlevalidationkey-40f1ca41fe8b50f53e10f3e3a580dcae24087f37aa498ba9903f2612b03e90ba.key"
)


def tpm2_pkcs11_available() -> bool:
    return (
        swtpm_available()
        and os.path.exists(TPM2_PKCS11_LIB)
        and all(shutil.which(tool) for tool in ("tpm2_ptool", "pkcs11-tool", "tpm2_flushcontext"))
    )


pytestmark = pytest.mark.skipif(
    not tpm2_pkcs11_available(),
    reason="swtpm, tpm2-tools, libtpm2-pkcs11-1, libtpm2-pkcs11-tools or opensc is not installed",
)


@attrs.frozen
class TpmToken:
    store: Path
    label: str
    pin: str
    env: dict[str, str]  # os.environ plus the store and the TCTIs, for the tools

    @property
    def keyd_env(self) -> dict[str, str]:
        """What the library reads: the store and its own TCTI variable (and the D-Bus session
        bus, when the TCTI is the resource manager's)."""
        names = ("TPM2_PKCS11_STORE", "TPM2_PKCS11_TCTI", "DBUS_SESSION_BUS_ADDRESS")
        return {name: self.env[name] for name in names if name in self.env}

    @property
    def keyd_config(self) -> str:
        return (
            f'pkcs11_lib_path = "{TPM2_PKCS11_LIB}"\n'
            f'pkcs11_base_slot = "pkcs11:token={self.label}?pin-value={self.pin}"\n'
        )

    def run(self, *args: str) -> str:
        result = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
        return result.stdout

    def pkcs11_tool(self, *args: str) -> str:
        return self.run(
            "pkcs11-tool", "--module", TPM2_PKCS11_LIB, "--token-label", self.label,
            "--login", "--pin", self.pin, *args,
        )  # fmt: skip

    def flush_transients(self) -> None:
        self.run("tpm2_flushcontext", "-t")


def make_tpm_token(
    swtpm: Swtpm | Tabrmd, store: Path, label: str, pin: str, so_pin: str
) -> TpmToken:
    store.mkdir(parents=True)
    env = dict(
        os.environ,
        **(swtpm.env if isinstance(swtpm, Tabrmd) else {}),
        TPM2TOOLS_TCTI=swtpm.tcti,  # tpm2_ptool runs tpm2-tools, which read this
        TPM2_PKCS11_TCTI=swtpm.tcti,  # the library reads only this one
        TPM2_PKCS11_STORE=str(store),
    )
    token = TpmToken(store, label, pin, env)
    token.run("tpm2_ptool", "init", "--path", str(store))  # primary key persisted at 0x81000001
    token.flush_transients()
    # `tpm2_ptool addtoken` runs out of TPM object memory without a resource manager; the
    # library's own C_InitToken and C_InitPIN make the same token.
    lib = ("pkcs11-tool", "--module", TPM2_PKCS11_LIB)
    token.run(*lib, "--init-token", "--label", label, "--so-pin", so_pin)
    token.run(
        *lib, "--token-label", label, "--login", "--login-type", "so", "--so-pin", so_pin,
        "--init-pin", "--pin", pin,
    )  # fmt: skip
    return token


@pytest.fixture
def swtpm(world_dir: Path) -> Iterator[Swtpm]:
    with Swtpm(world_dir / "swtpm") as tpm:
        yield tpm


@pytest.fixture
def token(swtpm: Swtpm, world_dir: Path) -> TpmToken:
    return make_tpm_token(swtpm, world_dir / "tpm2-pkcs11", "keyd-tpm", "1234", "5678")


@pytest.fixture
def keyd_on(world_dir: Path) -> Iterator[list[Keyd]]:
    started: list[Keyd] = []
    yield started
    for daemon in started:
        if daemon.process is not None:
            daemon.stop()


def start_keyd(world_dir: Path, token: TpmToken, started: list[Keyd]) -> Keyd:
    daemon = Keyd(world_dir / "keyd", extra_config=token.keyd_config, env=token.keyd_env)
    started.append(daemon)
    return daemon.start()


def token_objects(token: TpmToken) -> list[str]:
    """pkcs11-tool's object headers: "Private Key Object; EC", "Public Key Object; EC  ..."."""
    listed = token.pkcs11_tool("--list-objects")
    return [line for line in listed.splitlines() if line and not line.startswith(" ")]


def test_an_ec_key_pair_in_the_tpm_signs_through_keyd(world_dir, token, keyd_on) -> None:
    # Provisioning puts the key pair on the token; keyd finds it by label (= key id).
    token.pkcs11_tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", "tpm-key")
    exported = world_dir / "tpm-key.der"
    token.pkcs11_tool(
        "--read-object", "--type", "pubkey", "--label", "tpm-key", "--output-file", str(exported)
    )
    token_public = serialization.load_der_public_key(exported.read_bytes())
    assert isinstance(token_public, ec.EllipticCurvePublicKey)

    keyd = start_keyd(world_dir, token, keyd_on)
    handle = handle_of(
        keyd.call("POST", "/keypair", {"keyId": "tpm-key", "preferredAlgorithms": "ec-p256"})
    )
    public = ec_public_key(keyd, handle)  # from /parameters/ec-point
    assert public.public_numbers() == token_public.public_numbers()
    for message in (b"registration", b"tls"):
        digest = hashlib.sha256(message).digest()
        signature = sign(keyd, handle, "ECDSA", digest=digest)
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert "created the handle-validation key in" in keyd.logs()  # no secret keys on this token
    assert (keyd.keys_dir / HVK_FILE).exists()

    keyd.restart()  # the same handle opens the same TPM key after a restart
    digest = hashlib.sha256(b"after restart").digest()
    public.verify(
        sign(keyd, handle, "ECDSA", digest=digest),
        digest,
        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
    )
    keyd.stop()
    token.flush_transients()  # what keyd's library session left loaded

    listed = token.pkcs11_tool("--list-objects")
    assert token_objects(token) == [
        "Public Key Object; EC  EC_POINT 256 bits",
        "Private Key Object; EC",
    ], listed
    assert listed.count("label:      tpm-key") == 2
    assert "sensitive, always sensitive, never extractable, local" in listed
    objects = token.run("tpm2_ptool", "listobjects", "--label", token.label)
    assert objects.count("CKA_LABEL: tpm-key") == 2 and "CKO_PRIVATE_KEY" in objects, objects


@pytest.fixture
def managed_token(swtpm: Swtpm, world_dir: Path) -> Iterator[TpmToken]:
    """The token on swtpm behind a resource manager (tpm2-abrmd), as on a device's /dev/tpmrm0."""
    if not tabrmd_available():
        pytest.skip("tpm2-abrmd, libtss2-tcti-tabrmd0 or dbus-daemon is not installed")
    with Tabrmd(swtpm, world_dir / "tabrmd") as manager:
        yield make_tpm_token(manager, world_dir / "tpm2-pkcs11", "keyd-tpm", "1234", "5678")


def test_keyd_creates_a_key_pair_on_the_tpm_token(world_dir, managed_token, keyd_on) -> None:
    token = managed_token
    keyd = start_keyd(world_dir, token, keyd_on)
    reply = keyd.call("POST", "/keypair", {"keyId": "new-key", "preferredAlgorithms": "ec-p256"})
    handle = handle_of(reply)
    logs = keyd.logs()
    # tpm2-pkcs11 1.9 has no C_CopyObject: the write committed by relabelling its staged pair.
    assert "has no C_CopyObject (CKR_FUNCTION_NOT_SUPPORTED)" in logs, logs
    # ... and refused keyd's EC template once, then took it without CKA_ENCRYPT/CKA_VERIFY.
    assert "refused keyd's EC template for 'new-key' (CKR_GENERAL_ERROR" in logs, logs
    assert "generated ec-p256 key pair 'new-key'" in logs, logs
    public = ec_public_key(keyd, handle)
    assert isinstance(public.curve, ec.SECP256R1)
    digest = hashlib.sha256(b"registration").digest()
    public.verify(
        sign(keyd, handle, "ECDSA", digest=digest),
        digest,
        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
    )

    # The token, seen by other tools: one key pair under its label, nothing staged left.
    exported = world_dir / "new-key.der"
    token.pkcs11_tool(
        "--read-object", "--type", "pubkey", "--label", "new-key", "--output-file", str(exported)
    )
    token_public = serialization.load_der_public_key(exported.read_bytes())
    assert isinstance(token_public, ec.EllipticCurvePublicKey)
    assert token_public.public_numbers() == public.public_numbers()
    listed = token.pkcs11_tool("--list-objects")
    assert token_objects(token) == [
        "Public Key Object; EC  EC_POINT 256 bits",
        "Private Key Object; EC",
    ], listed
    assert listed.count("label:      new-key") == 2, listed
    # Made in the TPM, never to leave it, and allowed to sign but not to decrypt.
    assert "sensitive, always sensitive, never extractable, local" in listed, listed
    private_usage = listed.split("Private Key Object; EC")[1]
    assert "Usage:      sign" in private_usage and "decrypt" not in private_usage, listed
    objects = token.run("tpm2_ptool", "listobjects", "--label", token.label)
    assert objects.count("CKA_LABEL: new-key") == 2 and "CKO_PRIVATE_KEY" in objects, objects

    # A second key pair on the same token goes straight to the template it takes, and
    # creating an existing key id again returns the same key.
    again = keyd.call("POST", "/keypair", {"keyId": "new-key", "preferredAlgorithms": "ec-p256"})
    assert ec_public_key(keyd, handle_of(again)).public_numbers() == public.public_numbers()
    other = handle_of(
        keyd.call("POST", "/keypair", {"keyId": "other-key", "preferredAlgorithms": "ec-p256"})
    )
    assert ec_public_key(keyd, other).public_numbers() != public.public_numbers()
    assert keyd.logs().count("refused keyd's EC template") == 1

    keyd.restart()  # the key survives aziotd's restart: the same handle signs with it
    digest = hashlib.sha256(b"after restart").digest()
    public.verify(
        sign(keyd, handle, "ECDSA", digest=digest),
        digest,
        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
    )
    assert "repaired" not in keyd.logs()


# A keyd process on the token, killed (os._exit: no clean-up, no C_Finalize) right after a
# given step of a key pair creation, or started afresh to see what its start-up repair left.
_WRITER = """
import hashlib, logging, os, sys
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from aziot.actors.keys.pkcs11.token import KeyNotFound, Pkcs11Library
from aziot.config.pkcs11_uri import Pkcs11Uri

logging.basicConfig(level=logging.WARNING, format="%(message)s")
library = Pkcs11Library(sys.argv[1])
uri = Pkcs11Uri.parse(sys.argv[2])
if sys.argv[3] == "kill":
    seen = []

    def stop(name):
        seen.append(name)
        if len(seen) > int(sys.argv[4]):
            print(name, flush=True)
            os._exit(9)

    library.on_step = stop
    library.generate_key_pair(uri, "crash-key", ["ec-p256"])
    print("finished:", "|".join(seen), flush=True)
elif sys.argv[3] in ("rotate", "move-kill"):
    seen = []

    def stop(name):
        seen.append(name)
        if len(seen) > int(sys.argv[4]):
            print(name, flush=True)
            os._exit(9)

    if sys.argv[3] == "rotate":
        for label in ("rot-key", "rot-key-temp"):
            library.generate_key_pair(uri, label, ["ec-p256"])
    library.on_step = stop
    source, destination = sys.argv[5:7] if len(sys.argv) > 6 else ("rot-key-temp", "rot-key")
    library.move_key_pair(uri, source, destination)
    print("finished:", "|".join(seen), flush=True)
elif sys.argv[3] == "keys":
    # Each label: its compressed EC point and whether its private half signs for it.
    for label in sys.argv[4:]:
        try:
            public = library.public_parameters(uri, label)
        except KeyNotFound:
            print(label, "none")
            continue
        digest = hashlib.sha256(label.encode()).digest()
        signature = library.sign_ecdsa(uri, label, digest)
        public.public_key().verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        print(label, public.ec_point.hex(), "signs")
else:
    try:
        public = library.public_parameters(uri, "crash-key")
    except KeyNotFound:
        print("no key")
    else:
        library.sign_ecdsa(uri, "crash-key", hashlib.sha256(b"x").digest())
        print("key signs")
"""


def run_writer(token: TpmToken, *args: str) -> subprocess.CompletedProcess[str]:
    uri = f"pkcs11:token={token.label}?pin-value={token.pin}"
    return subprocess.run(
        [sys.executable, "-c", _WRITER, TPM2_PKCS11_LIB, uri, *args],
        env=token.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keyd_rotates_a_key_pair_on_the_tpm_token(world_dir, managed_token, keyd_on) -> None:
    """The rotation certd and identityd do on renewal: a new pair under `<id>-temp` moved onto
    `<id>` (POST /keypair/<id> {"from": ...}, the bus operation Keys.move_key_pair that
    actors/certs/renewing.py and actors/identity/renewal.py call). Without C_CopyObject keyd
    retires the old pair, relabels the new one and then destroys the old one."""
    token = managed_token
    keyd = start_keyd(world_dir, token, keyd_on)
    handle = handle_of(
        keyd.call("POST", "/keypair", {"keyId": "device-id", "preferredAlgorithms": "ec-p256"})
    )
    old_public = ec_public_key(keyd, handle)
    temp = handle_of(
        keyd.call("POST", "/keypair", {"keyId": "device-id-temp", "preferredAlgorithms": "ec-p256"})
    )
    new_public = ec_public_key(keyd, temp)
    assert new_public.public_numbers() != old_public.public_numbers()

    moved = keyd.call("POST", "/keypair/device-id", {"from": "device-id-temp"})
    assert moved.status == 204, moved.body
    logs = keyd.logs()
    assert (
        "moved key pair 'device-id-temp' to 'device-id' on token 'keyd-tpm' (slot 1) by "
        "relabelling (replaced 2 object(s))"
    ) in logs, logs

    # The handle of `device-id` from before the move signs with the new key now.
    assert ec_public_key(keyd, handle).public_numbers() == new_public.public_numbers()
    digest = hashlib.sha256(b"renewed identity").digest()
    new_public.verify(
        sign(keyd, handle, "ECDSA", digest=digest),
        digest,
        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
    )
    assert keyd.call("GET", "/keypair/device-id-temp").status != 200
    reloaded = handle_of(keyd.call("GET", "/keypair/device-id"))
    assert ec_public_key(keyd, reloaded).public_numbers() == new_public.public_numbers()

    # Other tools see one pair, under `device-id`, the new one; the old pair is gone and nothing
    # is left under a retiring label (which starts with NUL: pkcs11-tool prints it empty).
    listed = token.pkcs11_tool("--list-objects")
    assert token_objects(token) == [
        "Public Key Object; EC  EC_POINT 256 bits",
        "Private Key Object; EC",
    ], listed
    assert listed.count("label:      device-id\n") == 2, listed
    assert "device-id-temp" not in listed, listed
    exported = world_dir / "device-id.der"
    token.pkcs11_tool(
        "--read-object", "--type", "pubkey", "--label", "device-id", "--output-file", str(exported)
    )
    token_public = serialization.load_der_public_key(exported.read_bytes())
    assert isinstance(token_public, ec.EllipticCurvePublicKey)
    assert token_public.public_numbers() == new_public.public_numbers()

    # A second rotation on the same token, then a restart: the same handle, the newest key.
    handle_of(
        keyd.call("POST", "/keypair", {"keyId": "device-id-temp", "preferredAlgorithms": "ec-p256"})
    )
    newest = ec_public_key(keyd, handle_of(keyd.call("GET", "/keypair/device-id-temp")))
    assert newest.public_numbers() != new_public.public_numbers()
    # tpm2-pkcs11 hands new objects the handles of objects still there once some were
    # destroyed; keyd re-initializes it before creating the next key.
    assert "it reuses the handles of destroyed objects" in keyd.logs()
    assert keyd.call("POST", "/keypair/device-id", {"from": "device-id-temp"}).status == 204
    keyd.restart()
    digest = hashlib.sha256(b"after restart").digest()
    newest.verify(
        sign(keyd, handle, "ECDSA", digest=digest),
        digest,
        ec.ECDSA(utils.Prehashed(hashes.SHA256())),
    )
    assert "repaired" not in keyd.logs()
    assert len(token_objects(token)) == 2


_ROTATION_STEPS = [
    "move: retired an object of the old key",
    "move: retired an object of the old key",
    "move: committed a relabel",
    "move: committed a relabel",
    "move: destroyed a retired object",
    "move: destroyed a retired object",
]


def _keys(token: TpmToken, *labels: str) -> tuple[dict[str, str], str]:
    """Each label's compressed EC point (or "none"), after the start-up repair; and its log."""
    checked = run_writer(token, "keys", *labels)
    assert checked.returncode == 0, checked
    found = {}
    for line in checked.stdout.splitlines():
        label, point, *signs = line.split()
        assert point == "none" or signs == ["signs"], line
        found[label] = point
    return found, checked.stderr


def _clear(token: TpmToken, *labels: str) -> None:
    for label in labels:
        for kind in ("privkey", "pubkey"):
            listed = token.pkcs11_tool("--list-objects", "--type", kind, "--label", label)
            if f"label:      {label}\n" in listed:
                token.pkcs11_tool("--delete-object", "--type", kind, "--label", label)


def test_a_rotation_killed_after_any_step_leaves_the_old_key_or_the_new_one(
    managed_token,
) -> None:
    """Killed before the new private half is under `rot-key`, the next start rolls back: the
    old pair under `rot-key`, the new one still under `rot-key-temp` (for certd's own repair);
    killed after, it rolls forward: the new pair under `rot-key`, the old one gone. Never no
    key, never both, nothing retiring left, and a `repaired:` line where it repaired."""
    token = managed_token
    labels = ("rot-key", "rot-key-temp")
    finished = run_writer(token, "rotate", "99")
    assert finished.stdout.strip() == "finished: " + "|".join(_ROTATION_STEPS), finished
    assert "repaired" not in finished.stderr, finished
    _clear(token, *labels)
    for step, name in enumerate(_ROTATION_STEPS):
        killed = run_writer(token, "rotate", str(step))
        assert killed.returncode == 9 and killed.stdout.strip() == name, (step, killed)
        # What the kill left: the keys were made in this run, so read them from the token.
        listed = token.pkcs11_tool("--list-objects")
        found, log = _keys(token, *labels)
        committed = step >= 3  # the new private half's relabel is the commit point
        if committed:
            assert found["rot-key"] != "none" and found["rot-key-temp"] == "none", (name, found)
            assert len(token_objects(token)) == 2, (name, listed)
        else:
            assert "none" not in found.values(), (name, found)
            assert found["rot-key"] != found["rot-key-temp"]
            assert len(token_objects(token)) == 4, (name, listed)
        after = token.pkcs11_tool("--list-objects")
        assert after.count("label:      rot-key\n") == 2, (name, after)
        if step < 3:
            assert (
                "repaired: rolled back the interrupted move to 'rot-key' from 'rot-key-temp': "
                "it had not committed (the old key's " + ("1" if step == 0 else "2")
            ) in log, (name, log)
            assert ("1 object(s) of the source back under 'rot-key-temp'" in log) == (step == 2)
        elif step < 5:
            assert (
                "repaired: finished the interrupted move to 'rot-key' from 'rot-key-temp': it "
                f"had committed ({5 - step} retired object(s) of the old key removed)"
            ) in log, (name, log)
        else:
            assert "repaired" not in log, (name, log)
        # A second start finds nothing left to repair, and the same key.
        again, log = _keys(token, *labels)
        assert again == found and "repaired" not in log, (name, again, log)
        _clear(token, *labels)


def test_a_rolled_back_rotation_keeps_the_old_key_and_the_new_one(managed_token) -> None:
    """Rolled back, each key is whole where it was (the old one under `rot-key`, the new one
    under `rot-key-temp`, each signing for its own public key), so the rotation run again takes
    the new one into place."""
    token = managed_token
    killed = run_writer(token, "rotate", "2")  # the new public half under rot-key, not its private
    assert killed.returncode == 9, killed
    found, log = _keys(token, "rot-key", "rot-key-temp")
    assert "repaired: rolled back" in log, log
    old, new = found["rot-key"], found["rot-key-temp"]
    assert "none" not in (old, new) and old != new
    finished = run_writer(token, "move-kill", "99")
    assert finished.stdout.strip() == "finished: " + "|".join(_ROTATION_STEPS), finished
    after, log = _keys(token, "rot-key", "rot-key-temp")
    assert after == {"rot-key": new, "rot-key-temp": "none"} and "repaired" not in log, after


def test_a_move_onto_a_free_label_killed_between_its_relabels_is_put_back(managed_token) -> None:
    """Nothing to retire: killed after the public half's relabel, the key is still the source's
    (its private half is the commit), and the repair puts the public half back beside it."""
    token = managed_token
    run_writer(token, "rotate", "99")  # rot-key holds a pair
    before, _ = _keys(token, "rot-key")
    killed = run_writer(token, "move-kill", "0", "rot-key", "spare-key")
    assert killed.returncode == 9 and killed.stdout.strip() == "move: committed a relabel", killed
    listed = token.pkcs11_tool("--list-objects")
    assert "label:      spare-key" in listed, listed
    found, log = _keys(token, "rot-key", "spare-key")
    assert found == {"rot-key": before["rot-key"], "spare-key": "none"}, found
    assert (
        "repaired: put the public half of key pair 'rot-key' back under its label (an "
        "interrupted move had left it under 'spare-key')"
    ) in log, log
    listed = token.pkcs11_tool("--list-objects")
    assert listed.count("label:      rot-key\n") == 2 and "spare-key" not in listed, listed
    # Run to its end, the move takes the whole pair to the free label.
    finished = run_writer(token, "move-kill", "99", "rot-key", "spare-key")
    assert finished.stdout.strip() == "finished: move: committed a relabel|" * 1 + (
        "move: committed a relabel"
    ), finished
    found, log = _keys(token, "rot-key", "spare-key")
    assert found == {"rot-key": "none", "spare-key": before["rot-key"]}, found


def test_a_key_pair_creation_killed_after_any_step_leaves_no_key_or_the_whole_key(
    managed_token,
) -> None:
    """The relabel commit (module doc of actors/keys/pkcs11/token.py): killed before the
    private half is relabelled, the next start removes every object of the write; killed
    after, the key is there whole and signs."""
    token = managed_token

    def writer(*args: str) -> subprocess.CompletedProcess[str]:
        return run_writer(token, *args)

    steps = writer("kill", "99").stdout.strip().removeprefix("finished: ").split("|")
    assert steps == [
        "pair: staged",
        "pair: committed a relabel",
        "pair: committed a relabel",
        "pair: destroyed what it replaces",
    ], steps
    token.pkcs11_tool("--delete-object", "--type", "privkey", "--label", "crash-key")
    token.pkcs11_tool("--delete-object", "--type", "pubkey", "--label", "crash-key")
    for step, name in enumerate(steps):
        killed = writer("kill", str(step))
        assert killed.returncode == 9 and killed.stdout.strip() == name, killed
        after = writer("check")
        committed = step >= 2  # the private half's relabel is the commit point
        assert after.stdout.strip() == ("key signs" if committed else "no key"), (name, after)
        if step < 2:
            assert "undid the interrupted creation of key pair 'crash-key'" in after.stderr
        # Staged labels start with NUL, which pkcs11-tool prints as an empty label: count all.
        listed = token.pkcs11_tool("--list-objects")
        assert len(token_objects(token)) == (2 if committed else 0), (name, listed)
        assert listed.count("label:      crash-key") == (2 if committed else 0), (name, listed)
        if committed:
            token.pkcs11_tool("--delete-object", "--type", "privkey", "--label", "crash-key")
            token.pkcs11_tool("--delete-object", "--type", "pubkey", "--label", "crash-key")
