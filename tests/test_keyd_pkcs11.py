"""keyd with keys in a SoftHSM token: what only a token case shows.

Independent checks: `pkcs11-tool` lists and exports what keyd stored; `cryptography` verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from aziot.actors.keys.store import key_file_name
from tests import rawhttp
from tests.daemon import KEYD_VERSION, Keyd
from tests.softhsm import SoftHsmToken, make_softhsm_token, softhsm_available
from tests.test_keyd import b64, ec_public_key, handle_of, parameter, sign, token_object, unb64

pytestmark = pytest.mark.skipif(not softhsm_available(), reason="softhsm2 is not installed")

HVK_FILE = (
    "handlevalidationkey-40f1ca41fe8b50f53e10f3e3a580dcae24087f37aa498ba9903f2612b03e90ba.key"
)
GENERIC_400 = "a parameter has an invalid value"


@pytest.fixture
def token(world_dir: Path) -> SoftHsmToken:
    return make_softhsm_token(world_dir / "softhsm", label="keyd-hsm")


@pytest.fixture
def keyd(world_dir: Path, token: SoftHsmToken) -> Iterator[Keyd]:
    daemon = Keyd(world_dir / "keyd", token=token).start()
    yield daemon
    if daemon.process is not None:
        daemon.stop()


def wait_for_log(keyd: Keyd, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in keyd.logs():
            return keyd.logs()
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never logged:\n{keyd.logs()}")


def preloaded_file_key(world_dir: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = world_dir / "device.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path, key


def test_handle_validation_key_lives_on_the_token_and_survives_restart(keyd: Keyd) -> None:
    handle = handle_of(keyd.call("POST", "/keypair", {"keyId": "device-id"}))
    hvk = token_object(keyd, "handle-validation-key", "Secret Key")
    assert "sensitive" in hvk["Access"] and "never extractable" in hvk["Access"]
    assert not (keyd.keys_dir / HVK_FILE).exists()
    assert "ready with" in keyd.logs() and "CKM_ECDSA" in keyd.logs()
    keyd.restart()
    assert parameter(keyd, handle, "algorithm") == "ECDSA"  # the old handle still opens


def test_signature_verifies_with_the_key_pkcs11_tool_exports(keyd: Keyd, world_dir) -> None:
    handle = handle_of(
        keyd.call("POST", "/keypair", {"keyId": "device-id", "preferredAlgorithms": "ec-p256"})
    )
    digest = hashlib.sha256(b"registration").digest()
    signature = sign(keyd, handle, "ECDSA", digest=digest)
    exported = world_dir / "device-id.der"
    keyd.token.pkcs11_tool(
        "--read-object", "--type", "pubkey", "--label", "device-id", "--output-file", str(exported)
    )
    public = serialization.load_der_public_key(exported.read_bytes())
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert public.public_numbers() == ec_public_key(keyd, handle).public_numbers()


def test_rsa_on_the_token(keyd: Keyd) -> None:
    handle = handle_of(
        keyd.call("POST", "/keypair", {"keyId": "rsa", "preferredAlgorithms": "rsa-2048"})
    )
    private = token_object(keyd, "rsa", "Private Key Object; RSA")
    assert "sensitive" in private["Access"] and "never extractable" in private["Access"]
    assert parameter(keyd, handle, "algorithm") == "RSA"
    assert unb64(parameter(keyd, handle, "rsa-exponent")) == b"\x01\x00\x01"
    n = int.from_bytes(unb64(parameter(keyd, handle, "rsa-modulus")), "big")
    block = b"\x00" + os.urandom(255)
    reply = keyd.call(
        "POST",
        "/encrypt",
        {"keyHandle": handle, "algorithm": "RSA-NO-PADDING", "plaintext": b64(block)},
    )
    assert reply.status == 200, reply.body
    assert pow(
        int.from_bytes(unb64(reply.json()["ciphertext"]), "big"), 65537, n
    ) == int.from_bytes(block, "big")
    # Wrong-length raw input: 500, as the original.
    reply = keyd.call(
        "POST",
        "/encrypt",
        {"keyHandle": handle, "algorithm": "RSA-NO-PADDING", "plaintext": b64(b"x")},
    )
    assert (reply.status, reply.message) == (500, "internal error")


def test_derived_keys_are_computed_by_the_token(keyd: Keyd) -> None:
    master = os.urandom(32)
    base = handle_of(
        keyd.call("POST", "/key", {"keyId": "master", "usage": "derive", "keyBytes": b64(master)})
    )
    derived = handle_of(
        keyd.call("POST", "/derivedkey", {"baseKeyHandle": base, "derivationData": b64(b"mod-1")})
    )
    reply = keyd.call("POST", "/derivedkey/export", {"keyHandle": derived})
    assert reply.status == 200
    expected = hmac.new(master, b"mod-1", hashlib.sha256).digest()
    assert unb64(reply.json()["key"]) == expected
    assert (
        sign(keyd, derived, "HMAC-SHA256", message=b"sas")
        == hmac.new(expected, b"sas", hashlib.sha256).digest()
    )


def test_a_key_made_by_pkcs11_tool_is_usable_when_preloaded(world_dir, token) -> None:
    token.pkcs11_tool(
        "--keypairgen", "--key-type", "EC:prime256v1", "--label", "factory-key", "--id", "42"
    )
    exported = world_dir / "factory.der"
    token.pkcs11_tool(
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "factory-key",
        "--output-file",
        str(exported),
    )
    public = serialization.load_der_public_key(exported.read_bytes())
    uri = token.uri(object_label="factory-key")
    keyd = Keyd(
        world_dir / "keyd",
        extra_config=f'pkcs11_lib_path = "{token.lib_path}"\n[preloaded_keys]\ndevice-id = "{uri}"\n',
        env={"SOFTHSM2_CONF": str(token.conf_path)},
    ).start()
    try:
        handle = handle_of(keyd.call("GET", "/keypair/device-id"))
        assert ec_public_key(keyd, handle).public_numbers() == public.public_numbers()
        digest = hashlib.sha256(b"tls").digest()
        public.verify(
            sign(keyd, handle, "ECDSA", digest=digest),
            digest,
            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
        )
        # No base slot: new keys and the handle-validation key go to files.
        assert (keyd.keys_dir / HVK_FILE).exists()
    finally:
        keyd.stop()


def test_missing_mechanism_is_a_400_naming_it(world_dir) -> None:
    token = make_softhsm_token(world_dir / "softhsm", label="no-ecdsa", mechanisms="-,CKM_ECDSA")
    keyd = Keyd(world_dir / "keyd", token=token).start()
    try:
        handle = handle_of(keyd.call("POST", "/keypair", {"keyId": "device-id"}))
        token_object(keyd, "device-id", "Private Key Object; EC")
        before = keyd.snapshot()
        reply = keyd.call(
            "POST",
            "/sign",
            {"keyHandle": handle, "algorithm": "ECDSA", "parameters": {"digest": b64(b"d" * 32)}},
        )
        assert reply.status == 400
        assert reply.message == (
            'parameter "mechanism" has an invalid value\n'
            "caused by: the token does not support CKM_ECDSA"
        )
        assert keyd.snapshot() == before
    finally:
        keyd.stop()


def test_a_token_that_cannot_make_hmac_keys_passes_them_to_files(world_dir) -> None:
    token = make_softhsm_token(
        world_dir / "softhsm", label="no-hmac", mechanisms="-,CKM_GENERIC_SECRET_KEY_GEN"
    )
    keyd = Keyd(world_dir / "keyd", token=token).start()
    try:
        handle = handle_of(keyd.call("POST", "/key", {"keyId": "sas", "usage": "sign"}))
        secret = (keyd.keys_dir / key_file_name("sas")).read_bytes()
        assert (
            sign(keyd, handle, "HMAC-SHA256", message=b"m")
            == hmac.new(secret, b"m", hashlib.sha256).digest()
        )
        assert not any(o.get("label") == "sas" for o in keyd.token_objects())
        # Key pairs still go to the token, which can make them.
        handle_of(keyd.call("POST", "/keypair", {"keyId": "device-id"}))
        token_object(keyd, "device-id", "Private Key")
    finally:
        keyd.stop()


@pytest.mark.parametrize(
    ("breakage", "logged"),
    [
        ("pin", "the PIN was rejected for token 'keyd-hsm'"),
        ("token", "no PKCS#11 token with token label 'absent-token'"),
        ("library", "could not load PKCS#11 library '/nonexistent/libnothing.so'"),
    ],
)
def test_an_unusable_token_is_named_and_file_keys_keep_working(
    world_dir, token, breakage, logged
) -> None:
    path, device_key = preloaded_file_key(world_dir)
    base_slot = token.uri()
    lib_path = token.lib_path
    if breakage == "pin":
        base_slot = base_slot.replace("pin-value=1234", "pin-value=9999")
    elif breakage == "token":
        base_slot = base_slot.replace("token=keyd-hsm", "token=absent-token")
    else:
        lib_path = "/nonexistent/libnothing.so"
    keyd = Keyd(
        world_dir / "keyd",
        extra_config=(
            f'pkcs11_lib_path = "{lib_path}"\npkcs11_base_slot = "{base_slot}"\n'
            f'[preloaded_keys]\ndevice-id = "file://{path}"\n'
        ),
        env={"SOFTHSM2_CONF": str(token.conf_path)},
    ).start()
    try:
        logs = wait_for_log(keyd, logged)
        assert "9999" not in logs
        if breakage == "token":
            assert "present: slot" in logs and "'keyd-hsm'" in logs  # what was there instead
        handle = handle_of(keyd.call("GET", "/keypair/device-id"))
        assert (
            ec_public_key(keyd, handle).public_numbers() == device_key.public_key().public_numbers()
        )
        before = keyd.snapshot()
        # Keys that would live on the token: a clear 503, nothing written anywhere.
        for method, target, body in [
            ("POST", "/keypair", {"keyId": "new-pair"}),
            ("GET", "/keypair/new-pair", None),
            ("POST", "/key", {"keyId": "new-key", "usage": "sign"}),
        ]:
            reply = keyd.call(method, target, body)
            assert reply.status == 503, (target, reply.body)
            assert reply.message.startswith("the PKCS#11 token is unavailable: ")
            assert "9999" not in reply.message
        assert keyd.snapshot() == before
    finally:
        keyd.stop()


def test_moves_between_a_file_and_the_token_are_refused(world_dir, token) -> None:
    path, _ = preloaded_file_key(world_dir)
    keyd = Keyd(
        world_dir / "keyd",
        token=token,
        extra_config=f'[preloaded_keys]\nfile-pair = "file://{path}"\n',
    ).start()
    try:
        handle_of(keyd.call("POST", "/keypair", {"keyId": "token-pair"}))
        before = keyd.snapshot()
        reply = keyd.call("POST", "/keypair/token-pair", {"from": "file-pair"})
        assert (reply.status, reply.message) == (400, GENERIC_400)
        reply = keyd.call("POST", "/keypair/file-pair", {"from": "token-pair"})
        assert (reply.status, reply.message) == (400, GENERIC_400)
        assert keyd.snapshot() == before and path.exists()
    finally:
        keyd.stop()


def test_a_hung_token_does_not_stop_file_keys(world_dir, token) -> None:
    path, device_key = preloaded_file_key(world_dir)
    keyd = Keyd(
        world_dir / "keyd",
        token=token,
        extra_config=f'[preloaded_keys]\ndevice-id = "file://{path}"\n',
        env={"AZIOTD_FAULTS": "pkcs11.call=hang*1"},  # the first token call never returns
    ).start()
    try:
        wait_for_log(keyd, "is unavailable")
        started = time.monotonic()
        handle = handle_of(keyd.call("GET", "/keypair/device-id"))
        digest = hashlib.sha256(b"still here").digest()
        device_key.public_key().verify(
            sign(keyd, handle, "ECDSA", digest=digest),
            digest,
            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
        )
        reply = keyd.call("POST", "/keypair", {"keyId": "on-token"})
        assert reply.status == 503 and "has not answered" in reply.message
        assert time.monotonic() - started < 5  # answered at once, not after a token timeout
    finally:
        keyd.stop(timeout=30)


def test_a_crashed_token_worker_restarts_and_file_keys_never_notice(world_dir, token) -> None:
    path, device_key = preloaded_file_key(world_dir)
    keyd = Keyd(
        world_dir / "keyd",
        token=token,
        extra_config=f'[preloaded_keys]\nfile-key = "file://{path}"\n',
        env={"AZIOTD_FAULTS": "bus.deliver.pkcs11=crash@0.3*4"},
    ).start()
    try:
        # Minting a handle needs the token (the handle-validation key is there): retry that.
        replies = [keyd.call("GET", "/keypair/file-key") for _ in range(5)]
        file_handle = handle_of(next(r for r in replies if r.status == 200))
        statuses: Counter[int] = Counter()
        digest = hashlib.sha256(b"m").digest()
        for n in range(30):
            reply = keyd.call("POST", "/keypair", {"keyId": f"token-{n % 3}"})
            statuses[reply.status] += 1
            if reply.status == 503:
                assert reply.message.startswith(
                    "the PKCS#11 token is unavailable: pkcs11 restarted"
                )
            else:
                assert reply.status == 200, reply.body
            # Signing with a file key's (already opened) handle never needs the worker.
            device_key.public_key().verify(
                sign(keyd, file_handle, "ECDSA", digest=digest),
                digest,
                ec.ECDSA(utils.Prehashed(hashes.SHA256())),
            )
        assert statuses[200] >= 20, statuses
        assert "actor pkcs11 crashed" in keyd.logs()
        assert keyd.process.poll() is None
    finally:
        keyd.stop()


def test_eight_clients_sign_for_ten_seconds_without_error(keyd: Keyd) -> None:
    pair = handle_of(keyd.call("POST", "/keypair", {"keyId": "device-id"}))
    secret = handle_of(keyd.call("POST", "/key", {"keyId": "sas", "usage": "sign"}))
    public = ec_public_key(keyd, pair)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + 10

    def client(index: int) -> None:
        local: Counter[str] = Counter()
        digest = hashlib.sha256(f"client {index}".encode()).digest()
        with rawhttp.connect(keyd.socket) as sock:
            while time.monotonic() < stop_at:
                if index % 2:
                    body = {
                        "keyHandle": pair,
                        "algorithm": "ECDSA",
                        "parameters": {"digest": b64(digest)},
                    }
                else:
                    body = {
                        "keyHandle": secret,
                        "algorithm": "HMAC-SHA256",
                        "parameters": {"message": b64(digest)},
                    }
                sock.sendall(rawhttp.build("POST", f"/sign?api-version={KEYD_VERSION}", body))
                reply = rawhttp.read_reply(sock)
                if reply.status != 200:
                    local[f"status {reply.status}: {reply.body[:80]!r}"] += 1
                    continue
                signature = unb64(reply.json()["signature"])
                if index % 2:
                    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                local["ok"] += 1
        with lock:
            outcomes.update(local)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(outcomes) == {"ok"}, outcomes
    assert outcomes["ok"] > 100
    assert keyd.process.poll() is None
