"""keyd end to end: every endpoint's success path, checked by `cryptography`.

Each test runs twice: on file keys, and with a SoftHSM token as the base slot (where keyd keeps
new keys on the token, and `pkcs11-tool` checks what is stored there).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aziot.actors.keys.store import key_file_name
from tests.daemon import Keyd
from tests.softhsm import make_softhsm_token, softhsm_available


@pytest.fixture(params=["file", "pkcs11"])
def keyd(request, world_dir: Path) -> Iterator[Keyd]:
    token = None
    if request.param == "pkcs11":
        if not softhsm_available():
            pytest.skip("softhsm2 is not installed")
        token = make_softhsm_token(world_dir / "softhsm", label="keyd-e2e")
    daemon = Keyd(world_dir / "keyd", token=token).start()
    yield daemon
    if daemon.process is not None:
        daemon.stop()


def token_object(keyd: Keyd, label: str, kind: str) -> dict[str, str]:
    """The one token object of `kind` ("Private Key", "Secret Key"...) labelled `label`."""
    found = [
        o for o in keyd.token_objects() if o.get("label") == label and o["type"].startswith(kind)
    ]
    assert len(found) == 1, keyd.token_objects()
    return found[0]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def handle_of(reply) -> str:
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    return reply.json()["keyHandle"]


def create_key_pair(keyd: Keyd, key_id: str, algorithms: str | None = "ec-p256") -> str:
    return handle_of(
        keyd.call("POST", "/keypair", {"keyId": key_id, "preferredAlgorithms": algorithms})
    )


def parameter(keyd: Keyd, handle: str, name: str) -> str:
    reply = keyd.call("POST", f"/parameters/{name}", {"keyHandle": handle})
    assert reply.status == 200, reply.body
    return reply.json()["value"]


def ec_public_key(keyd: Keyd, handle: str) -> ec.EllipticCurvePublicKey:
    assert parameter(keyd, handle, "algorithm") == "ECDSA"
    assert parameter(keyd, handle, "ec-curve-oid") == "BggqhkjOPQMBBw=="
    point = unb64(parameter(keyd, handle, "ec-point"))
    assert len(point) == 33 and point[0] in (2, 3)
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def rsa_public_key(keyd: Keyd, handle: str) -> rsa.RSAPublicKey:
    assert parameter(keyd, handle, "algorithm") == "RSA"
    n = int.from_bytes(unb64(parameter(keyd, handle, "rsa-modulus")), "big")
    exponent = unb64(parameter(keyd, handle, "rsa-exponent"))
    assert exponent == b"\x01\x00\x01"
    return rsa.RSAPublicNumbers(65537, n).public_key()


def sign(keyd: Keyd, handle: str, algorithm: str, **params: bytes) -> bytes:
    body = {
        "keyHandle": handle,
        "algorithm": algorithm,
        "parameters": {k: b64(v) for k, v in params.items()},
    }
    reply = keyd.call("POST", "/sign", body)
    assert reply.status == 200, reply.body
    return unb64(reply.json()["signature"])


def test_ec_key_pair_signs_digests_that_verify(keyd: Keyd) -> None:
    handle = create_key_pair(keyd, "device-id")
    public = ec_public_key(keyd, handle)
    digest = hashlib.sha256(b"hello").digest()
    signature = sign(keyd, handle, "ECDSA", digest=digest)
    assert len(signature) <= 72 and signature[0] == 0x30  # DER SEQUENCE
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    path = (
        keyd.keys_dir
        / "deviceid-bd732105ef89cf8edd2606a5309c8a26b7b5599a4e124a0fe6199b6b2f60e655.key"
    )
    if keyd.token is not None:
        private = token_object(keyd, "device-id", "Private Key Object; EC")
        assert "sensitive" in private["Access"] and "never extractable" in private["Access"]
        public_object = token_object(keyd, "device-id", "Public Key Object; EC")
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        assert public_object["EC_POINT"].endswith(point.hex())
        assert not path.exists()
        return
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = serialization.load_pem_private_key(pem, None)
    assert stored.public_key().public_numbers() == public.public_numbers()


def test_create_key_pair_is_create_if_absent_with_a_new_handle_each_time(keyd: Keyd) -> None:
    first = create_key_pair(keyd, "pair")
    before = keyd.snapshot()
    second = create_key_pair(keyd, "pair", "rsa-2048")
    assert first != second
    assert keyd.snapshot() == before
    assert parameter(keyd, second, "algorithm") == "ECDSA"
    loaded = handle_of(keyd.call("GET", "/keypair/pair"))
    assert parameter(keyd, loaded, "ec-point") == parameter(keyd, first, "ec-point")


@pytest.mark.parametrize(
    ("algorithms", "expected"),
    [(None, "ECDSA"), ("*", "ECDSA"), ("rsa-2048:*", "RSA"), ("bogus:rsa-2048", "RSA")],
)
def test_preferred_algorithms_pick_the_first_known(keyd: Keyd, algorithms, expected) -> None:
    handle = create_key_pair(keyd, f"alg-{expected}-{algorithms}", algorithms)
    assert parameter(keyd, handle, "algorithm") == expected


def test_rsa_private_operations_verify(keyd: Keyd) -> None:
    handle = create_key_pair(keyd, "rsa", "rsa-2048")
    public = rsa_public_key(keyd, handle)
    assert public.key_size == 2048
    digest = hashlib.sha256(b"tls transcript").digest()
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    reply = keyd.call(
        "POST",
        "/encrypt",
        {"keyHandle": handle, "algorithm": "RSA-PKCS1", "plaintext": b64(digest_info)},
    )
    assert reply.status == 200, reply.body
    signature = unb64(reply.json()["ciphertext"])
    public.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    # No padding: the caller pads (as OpenSSL does for PSS), keyd only exponentiates.
    block = b"\x00" + os.urandom(255)
    reply = keyd.call(
        "POST",
        "/encrypt",
        {"keyHandle": handle, "algorithm": "RSA-NO-PADDING", "plaintext": b64(block)},
    )
    assert reply.status == 200, reply.body
    raw = int.from_bytes(unb64(reply.json()["ciphertext"]), "big")
    assert pow(raw, 65537, public.public_numbers().n) == int.from_bytes(block, "big")
    # A PKCS#1 input that is no DigestInfo still gets type-1 padding.
    odd = b"not a digest info"
    reply = keyd.call(
        "POST", "/encrypt", {"keyHandle": handle, "algorithm": "RSA-PKCS1", "plaintext": b64(odd)}
    )
    opened = pow(
        int.from_bytes(unb64(reply.json()["ciphertext"]), "big"), 65537, public.public_numbers().n
    ).to_bytes(256, "big")
    assert opened == b"\x00\x01" + b"\xff" * (256 - 3 - len(odd)) + b"\x00" + odd


def test_rsa_4096_key_pair(keyd: Keyd) -> None:
    handle = create_key_pair(keyd, "big", "rsa-4096")
    assert rsa_public_key(keyd, handle).key_size == 4096


def test_symmetric_key_create_import_hmac_and_aead(keyd: Keyd) -> None:
    secret = os.urandom(32)
    handle = handle_of(
        keyd.call("POST", "/key", {"keyId": "sym", "usage": "sign", "keyBytes": b64(secret)})
    )
    if keyd.token is None:
        assert (keyd.keys_dir / key_file_name("sym")).read_bytes() == secret
    else:
        assert "sensitive" in token_object(keyd, "sym", "Secret Key")["Access"]
        assert not (keyd.keys_dir / key_file_name("sym")).exists()
    message = b"SharedAccessSignature payload"
    assert (
        sign(keyd, handle, "HMAC-SHA256", message=message)
        == hmac.new(secret, message, hashlib.sha256).digest()
    )
    if keyd.token is not None:
        # On a token the usage picks the key type: AES-GCM needs an "encrypt" key.
        handle = handle_of(
            keyd.call("POST", "/key", {"keyId": "aes", "usage": "encrypt", "keyBytes": b64(secret)})
        )
        assert token_object(keyd, "aes", "Secret Key Object; AES")
    iv, aad, plaintext = os.urandom(12), b"aad", b"module secret"
    reply = keyd.call(
        "POST",
        "/encrypt",
        {
            "keyHandle": handle,
            "algorithm": "AEAD",
            "parameters": {"iv": b64(iv), "aad": b64(aad)},
            "plaintext": b64(plaintext),
        },
    )
    assert reply.status == 200, reply.body
    ciphertext = unb64(reply.json()["ciphertext"])
    assert ciphertext[0] == 2
    assert AESGCM(secret).decrypt(iv, ciphertext[1:], aad) == plaintext
    reply = keyd.call(
        "POST",
        "/decrypt",
        {
            "keyHandle": handle,
            "algorithm": "AEAD",
            "parameters": {"iv": b64(iv), "aad": b64(aad)},
            "ciphertext": b64(ciphertext),
        },
    )
    assert reply.status == 200 and unb64(reply.json()["plaintext"]) == plaintext
    # IoT Edge 1.1 wrote version 1: tag first. (File keys only, as in the original.)
    sealed = AESGCM(secret).encrypt(iv, plaintext, aad)
    legacy = b"\x01" + sealed[-16:] + sealed[:-16]
    if keyd.token is not None:
        reply = keyd.call(
            "POST",
            "/decrypt",
            {
                "keyHandle": handle,
                "algorithm": "AEAD",
                "parameters": {"iv": b64(iv), "aad": b64(aad)},
                "ciphertext": b64(legacy),
            },
        )
        assert (reply.status, reply.message) == (400, "a parameter has an invalid value")
        return
    reply = keyd.call(
        "POST",
        "/decrypt",
        {
            "keyHandle": handle,
            "algorithm": "AEAD",
            "parameters": {"iv": b64(iv), "aad": b64(aad)},
            "ciphertext": b64(legacy),
        },
    )
    assert reply.status == 200 and unb64(reply.json()["plaintext"]) == plaintext


def test_generate_is_create_if_absent_and_import_overwrites(keyd: Keyd) -> None:
    first = handle_of(
        keyd.call("POST", "/key", {"keyId": "master", "usage": "derive,sign", "keyBytes": None})
    )
    path = keyd.keys_dir / key_file_name("master")
    before = keyd.snapshot()
    if keyd.token is None:
        assert len(path.read_bytes()) == 32
    else:
        assert token_object(keyd, "master", "Secret Key Object; Generic secret length 32")
        assert not path.exists()
    generated = sign(keyd, first, "HMAC-SHA256", message=b"m")
    handle_of(keyd.call("POST", "/key", {"keyId": "master", "usage": "encrypt"}))
    assert keyd.snapshot() == before
    assert sign(keyd, first, "HMAC-SHA256", message=b"m") == generated
    replacement = os.urandom(32)
    handle = handle_of(
        keyd.call(
            "POST", "/key", {"keyId": "master", "usage": "sign", "keyBytes": b64(replacement)}
        )
    )
    if keyd.token is None:
        assert path.read_bytes() == replacement
    else:
        assert token_object(keyd, "master", "Secret Key")  # replaced, not duplicated
    assert (
        sign(keyd, handle, "HMAC-SHA256", message=b"m")
        == hmac.new(replacement, b"m", hashlib.sha256).digest()
    )
    loaded = handle_of(keyd.call("GET", "/key/master"))
    assert sign(keyd, loaded, "HMAC-SHA256", message=b"m") == sign(
        keyd, handle, "HMAC-SHA256", message=b"m"
    )


def test_derived_keys_sign_and_export(keyd: Keyd) -> None:
    master = os.urandom(32)
    base = handle_of(
        keyd.call("POST", "/key", {"keyId": "master", "usage": "derive", "keyBytes": b64(master)})
    )
    data = b"module-1"
    derived = handle_of(
        keyd.call("POST", "/derivedkey", {"baseKeyHandle": base, "derivationData": b64(data)})
    )
    expected_key = hmac.new(master, data, hashlib.sha256).digest()
    reply = keyd.call("POST", "/derivedkey/export", {"keyHandle": derived})
    assert reply.status == 200 and unb64(reply.json()["key"]) == expected_key
    assert (
        sign(keyd, derived, "HMAC-SHA256", message=b"sas")
        == hmac.new(expected_key, b"sas", hashlib.sha256).digest()
    )
    nested = keyd.call(
        "POST", "/derivedkey", {"baseKeyHandle": derived, "derivationData": b64(b"x")}
    )
    assert nested.status == 400
    assert nested.message == (
        'parameter "handle" has an invalid value\ncaused by: nested derived '
        "keys are not supported, import the outer derived key first"
    )


def test_move_and_delete(keyd: Keyd) -> None:
    temp = create_key_pair(keyd, "cert-key-temp")
    point = parameter(keyd, temp, "ec-point")
    reply = keyd.call("POST", "/keypair/cert-key", {"from": "cert-key-temp"})
    assert reply.status == 204 and reply.body == b"" and "content-type" not in reply.headers
    assert not keyd.has_key("cert-key-temp", key_file_name("cert-key-temp"))
    assert keyd.has_key("cert-key", key_file_name("cert-key"))
    moved = handle_of(keyd.call("GET", "/keypair/cert-key"))
    assert parameter(keyd, moved, "ec-point") == point
    assert keyd.call("DELETE", "/keypair", {"keyHandle": moved}).status == 204
    assert not keyd.has_key("cert-key", key_file_name("cert-key"))
    assert keyd.call("GET", "/keypair/cert-key").status == 400
    sym = handle_of(keyd.call("POST", "/key", {"keyId": "gone", "usage": "sign"}))
    assert keyd.call("DELETE", "/key", {"keyHandle": sym}).status == 204
    assert keyd.call("DELETE", "/key", {"keyHandle": sym}).status == 204  # absent is fine
    assert not keyd.has_key("gone", key_file_name("gone"))


def test_handles_survive_a_restart(keyd: Keyd) -> None:
    pair = create_key_pair(keyd, "device-id")
    sym = handle_of(keyd.call("POST", "/key", {"keyId": "sym", "usage": "sign"}))
    before = sign(keyd, sym, "HMAC-SHA256", message=b"x")
    keyd.restart()
    digest = hashlib.sha256(b"after").digest()
    ec_public_key(keyd, pair).verify(
        sign(keyd, pair, "ECDSA", digest=digest), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    )
    assert sign(keyd, sym, "HMAC-SHA256", message=b"x") == before


def test_preloaded_file_keys(world_dir) -> None:
    preloaded = world_dir / "secrets"
    preloaded.mkdir()
    device_key = ec.generate_private_key(ec.SECP256R1())
    (preloaded / "device.pem").write_bytes(
        device_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    secret = os.urandom(32)
    (preloaded / "sym.key").write_bytes(secret)
    keyd = Keyd(
        world_dir / "keyd",
        extra_config=(
            f'[preloaded_keys]\ndevice-id = "file://{preloaded}/device.pem"\n'
            f'sym = "file://{preloaded}/sym.key"\n'
        ),
    ).start()
    try:
        handle = handle_of(keyd.call("GET", "/keypair/device-id"))
        assert (
            ec_public_key(keyd, handle).public_numbers() == device_key.public_key().public_numbers()
        )
        sym = handle_of(keyd.call("GET", "/key/sym"))
        assert (
            sign(keyd, sym, "HMAC-SHA256", message=b"m")
            == hmac.new(secret, b"m", hashlib.sha256).digest()
        )
        # Replacing a preloaded file behind the daemon's back takes effect: no stale cache.
        fresh = os.urandom(32)
        (preloaded / "sym.key").write_bytes(fresh)
        assert (
            sign(keyd, sym, "HMAC-SHA256", message=b"m")
            == hmac.new(fresh, b"m", hashlib.sha256).digest()
        )
        assert not (keyd.keys_dir / key_file_name("device-id")).exists()
    finally:
        keyd.stop()


def test_responses_frame_like_the_original(keyd: Keyd) -> None:
    reply = keyd.call("POST", "/keypair", {"keyId": "k"})
    head = reply.first_read.split(b"\r\n\r\n")[0]
    assert reply.first_read.startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(head) < 512
    assert reply.headers["content-type"] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert "server" not in reply.headers
    # The whole response, body included, came in the first read.
    assert reply.first_read.endswith(reply.body)
