"""The blocking PKCS#11 layer against a real SoftHSM2 token (one fresh token per test)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, ObjectClass

from aziot.actors.keys.pkcs11.token import (
    InvalidParameter,
    KeyExists,
    KeyNotFound,
    MechanismMissing,
    Pkcs11Error,
    Pkcs11Library,
    PublicParameters,
    TokenUnavailable,
    ckr_name,
    mechanism_name,
)
from aziot.config.pkcs11_uri import Pkcs11Uri

from .softhsm import SoftHsmToken, make_softhsm_token, softhsm_available

pytestmark = pytest.mark.skipif(not softhsm_available(), reason="SoftHSM2 is not installed")

P256_OID = bytes.fromhex("06082a8648ce3d030107")


@pytest.fixture
def restore_softhsm_conf() -> Iterator[None]:
    # make_softhsm_token points SOFTHSM2_CONF at its temp dir; later tests must not inherit it.
    previous = os.environ.get("SOFTHSM2_CONF")
    yield
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def softhsm_token(tmp_path: Path, restore_softhsm_conf: None) -> SoftHsmToken:
    return make_softhsm_token(tmp_path / "softhsm")


@pytest.fixture
def library(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11Library]:
    lib = Pkcs11Library(softhsm_token.lib_path)
    yield lib
    lib.close()


@pytest.fixture
def uri(softhsm_token: SoftHsmToken) -> Pkcs11Uri:
    return Pkcs11Uri.parse(softhsm_token.uri())


def _raw_session(token: SoftHsmToken) -> pkcs11.Session:
    # Opened without a PIN on purpose: login state is shared by every session of the process,
    # and the library under test is already logged in (logging in again would fail).
    return pkcs11.lib(token.lib_path).get_token(token_label=token.label).open()


def _verify_ecdsa(params: PublicParameters, signature: bytes, digest: bytes) -> None:
    public = params.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    algorithm = hashes.SHA256() if len(digest) == 32 else hashes.SHA512()
    public.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))


# ---------------------------------------------------------------------------------------------
# URI parsing


def test_uri_parses_token_object_and_pin_with_percent_decoding() -> None:
    parsed = Pkcs11Uri.parse("pkcs11:token=Key%20pairs;object=dev%2Fid%3B1?pin-value=12%2634")
    assert parsed == Pkcs11Uri(
        slot_id=None, token="Key pairs", object_label="dev/id;1", pin="12&34"
    )


def test_uri_slot_id_wins_and_unknown_attributes_are_ignored() -> None:
    parsed = Pkcs11Uri.parse(
        "pkcs11:manufacturer=SoftHSM;token=ignored;slot-id=42;id=%01%02;type=private"
        "?pin-source=file:/x&pin-value=1234&module-name=softhsm2"
    )
    assert parsed.slot_id == 42
    assert parsed.token == "ignored"
    assert parsed.object_label is None
    assert parsed.pin == "1234"


def test_uri_without_pin_and_with_object() -> None:
    parsed = Pkcs11Uri.parse("PKCS11:token=t")
    assert parsed.pin is None
    moved = parsed.with_object("device-id")
    assert moved.object_label == "device-id" and moved.token == "t"
    assert parsed.object_label is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs11:object=x?pin-value=1234", "slot-id=<number>"),
        ("pkcs11:", "slot-id=<number>"),
        ("file:///tmp/key", "must start with 'pkcs11:'"),
        ("pkcs11:slot-id=abc", "decimal number"),
        ("pkcs11:slot-id=-1", "decimal number"),
        ("pkcs11:token", "name=value"),
        ("pkcs11:token=%ff", "UTF-8"),
    ],
)
def test_uri_rejects_unusable_uris(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Pkcs11Uri.parse(text)


def test_uri_never_shows_the_pin() -> None:
    parsed = Pkcs11Uri.parse("pkcs11:token=t;object=o?pin-value=s3cret")
    assert "s3cret" not in repr(parsed)
    assert "s3cret" not in str(parsed)
    assert parsed.redacted() == "pkcs11:token=t;object=o?pin-value=***"
    with pytest.raises(ValueError) as info:
        Pkcs11Uri.parse("pkcs11:object=o?pin-value=s3cret")
    assert "s3cret" not in str(info.value)


def test_uri_round_trips_through_text() -> None:
    original = Pkcs11Uri(slot_id=7, token="a b;c", object_label="x/y?z", pin="p&q=r")
    assert Pkcs11Uri.parse(original.to_text()) == original


# ---------------------------------------------------------------------------------------------
# Error and mechanism names


def test_ckr_names_come_from_python_pkcs11_exception_classes() -> None:
    ex = pkcs11.exceptions
    assert ckr_name(ex.PinIncorrect()) == "CKR_PIN_INCORRECT"
    assert ckr_name(ex.SlotIDInvalid()) == "CKR_SLOT_ID_INVALID"
    assert ckr_name(ex.SessionReadWriteSOExists()) == "CKR_SESSION_READ_WRITE_SO_EXISTS"
    assert ckr_name(ex.AnotherUserAlreadyLoggedIn()) == "CKR_USER_ANOTHER_ALREADY_LOGGED_IN"
    assert ckr_name(ex.TokenNotRecognised()) == "CKR_TOKEN_NOT_RECOGNIZED"
    assert ckr_name(ex.GeneralError()) == "CKR_GENERAL_ERROR"
    assert ckr_name(ex.NoSuchKey()) is None
    assert ckr_name(ValueError()) is None
    assert mechanism_name(pkcs11.Mechanism.ECDSA) == "CKM_ECDSA"
    assert mechanism_name(0x80000123) == "CKM_VENDOR_0x80000123"


# ---------------------------------------------------------------------------------------------
# Key pairs


def test_mechanisms_are_listed(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    names = library.mechanisms(uri)
    for needed in ("CKM_ECDSA", "CKM_SHA256_HMAC", "CKM_AES_GCM", "CKM_RSA_X_509", "CKM_RSA_PKCS"):
        assert needed in names
    assert names == sorted(names)


def test_ec_p256_key_pair_signs_verifiable_der(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert not library.find_key_pair(uri, "device-id")
    assert library.generate_key_pair(uri, "device-id", ["ec-p256", "rsa-2048"]) == "ec-p256"
    assert library.find_key_pair(uri, "device-id")
    assert not library.find_secret(uri, "device-id")

    params = library.public_parameters(uri, "device-id")
    assert params.algorithm == "ECDSA"
    assert params.curve_oid == P256_OID
    assert params.ec_point is not None and len(params.ec_point) == 33
    assert params.ec_point[0] in (2, 3)
    assert params.modulus is None and params.exponent is None

    digest = hashlib.sha256(b"to be signed").digest()
    signature = library.sign_ecdsa(uri, "device-id", digest)
    assert signature[0] == 0x30 and len(signature) <= 72
    r, s = decode_dss_signature(signature)
    assert r > 0 and s > 0
    _verify_ecdsa(params, signature, digest)
    with pytest.raises(InvalidSignature):
        _verify_ecdsa(params, signature, hashlib.sha256(b"something else").digest())

    # A digest longer than the order is truncated the way OpenSSL does it.
    long_digest = hashlib.sha512(b"to be signed").digest()
    _verify_ecdsa(params, library.sign_ecdsa(uri, "device-id", long_digest), long_digest)


def test_ec_point_matches_the_token_attribute(
    library: Pkcs11Library, uri: Pkcs11Uri, softhsm_token: SoftHsmToken
) -> None:
    library.generate_key_pair(uri, "k", ["ec-p256"])
    params = library.public_parameters(uri, "k")
    with _raw_session(softhsm_token) as session:
        public = session.get_key(ObjectClass.PUBLIC_KEY, label="k")
        raw = public[Attribute.EC_POINT]
    # SoftHSM wraps the uncompressed point in a DER OCTET STRING (04 41 04 x y).
    assert raw[:3] == b"\x04\x41\x04" and len(raw) == 67
    public_key = params.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    uncompressed = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert uncompressed == raw[2:]


def test_ec_p384_key_pair(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert library.generate_key_pair(uri, "p384", ["ec-p384"]) == "ec-p384"
    params = library.public_parameters(uri, "p384")
    assert params.curve_oid == bytes.fromhex("06052b81040022")
    assert params.ec_point is not None and len(params.ec_point) == 49
    digest = hashlib.sha384(b"x").digest()
    signature = library.sign_ecdsa(uri, "p384", digest)
    public = params.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA384())))


def test_rsa_2048_private_operations(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert library.generate_key_pair(uri, "rsa", ["rsa-2048"]) == "rsa-2048"
    params = library.public_parameters(uri, "rsa")
    assert params.algorithm == "RSA"
    assert params.exponent == b"\x01\x00\x01"
    assert params.modulus is not None and len(params.modulus) == 256
    assert params.modulus[0] & 0x80
    public = params.public_key()
    assert isinstance(public, rsa.RSAPublicKey)

    # What the openssl engine sends for an RSA signature: a DigestInfo, padded by keyd.
    digest = hashlib.sha256(b"message").digest()
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    signature = library.rsa_private(uri, "rsa", digest_info, "pkcs1")
    assert len(signature) == 256
    public.verify(signature, b"message", padding.PKCS1v15(), hashes.SHA256())

    block = b"\x00\x01" + os.urandom(254)
    raw = library.rsa_private(uri, "rsa", block, "none")
    assert len(raw) == 256
    n = int.from_bytes(params.modulus, "big")
    assert pow(int.from_bytes(raw, "big"), 65537, n) == int.from_bytes(block, "big")

    # Sizes that cannot work are server-side errors (500), not bad requests.
    with pytest.raises(Pkcs11Error) as info:
        library.rsa_private(uri, "rsa", block[:-1], "none")
    assert not isinstance(info.value, InvalidParameter)
    with pytest.raises(Pkcs11Error) as info:
        library.rsa_private(uri, "rsa", b"\x01" * 246, "pkcs1")
    assert not isinstance(info.value, InvalidParameter)

    with pytest.raises(InvalidParameter, match="not an EC key"):
        library.sign_ecdsa(uri, "rsa", digest)
    with pytest.raises(InvalidParameter):
        library.rsa_private(uri, "rsa", digest, "oaep")  # type: ignore[arg-type]


def test_rsa_4096_key_pair(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert library.generate_key_pair(uri, "big", ["rsa-4096"]) == "rsa-4096"
    params = library.public_parameters(uri, "big")
    assert params.modulus is not None and len(params.modulus) == 512
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + bytes(32)
    signature = library.rsa_private(uri, "big", digest_info, "pkcs1")
    public = params.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.recover_data_from_signature(signature, padding.PKCS1v15(), None) == digest_info


def test_key_pair_algorithm_fallback_and_errors(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert library.generate_key_pair(uri, "k", ["ed25519", "ec-p256"]) == "ec-p256"
    with pytest.raises(KeyExists):
        library.generate_key_pair(uri, "k", ["ec-p256"])
    with pytest.raises(InvalidParameter, match="ed25519: unknown algorithm"):
        library.generate_key_pair(uri, "other", ["ed25519"])
    with pytest.raises(InvalidParameter):
        library.generate_key_pair(uri, "other", [])
    with pytest.raises(InvalidParameter):
        library.find_key_pair(uri, "")
    with pytest.raises(KeyNotFound, match="'missing'"):
        library.sign_ecdsa(uri, "missing", bytes(32))
    with pytest.raises(KeyNotFound):
        library.public_parameters(uri, "missing")
    with pytest.raises(InvalidParameter, match="non-empty digest"):
        library.sign_ecdsa(uri, "k", b"")
    with pytest.raises(InvalidParameter, match="not an RSA key"):
        library.rsa_private(uri, "k", bytes(256), "none")


@pytest.mark.usefixtures("restore_softhsm_conf")
def test_token_lacking_mechanisms(tmp_path: Path) -> None:
    # SoftHSM 2.6.1 ignores the first name of a "-" (deny) list, hence the empty one after "-".
    token = make_softhsm_token(
        tmp_path, mechanisms="-,CKM_EC_KEY_PAIR_GEN,CKM_ECDSA,CKM_AES_GCM,CKM_SHA256_HMAC"
    )
    library = Pkcs11Library(token.lib_path)
    uri = Pkcs11Uri.parse(token.uri())
    try:
        names = library.mechanisms(uri)
        assert "CKM_ECDSA" not in names and "CKM_RSA_PKCS" in names
        # The first algorithm the token cannot do is skipped.
        assert library.generate_key_pair(uri, "k", ["ec-p256", "rsa-2048"]) == "rsa-2048"
        with pytest.raises(InvalidParameter) as info:
            library.generate_key_pair(uri, "k2", ["ec-p256", "ec-p384"])
        assert "ec-p256: token lacks CKM_EC_KEY_PAIR_GEN" in str(info.value)
        assert "ec-p384" in str(info.value)
        assert not library.find_key_pair(uri, "k2")

        with pytest.raises(MechanismMissing) as missing:
            library.generate_secret(uri, "aes", ["encrypt"])
        assert missing.value.mechanism == "CKM_AES_GCM"
        assert "CKM_AES_GCM" in str(missing.value)
        assert not library.find_secret(uri, "aes")
        with pytest.raises(MechanismMissing, match="CKM_SHA256_HMAC"):
            library.import_secret(uri, "hmac", bytes(32), ["sign"])
        assert not library.find_secret(uri, "hmac")
    finally:
        library.close()


def test_key_pair_objects_are_sensitive_and_paired(
    library: Pkcs11Library, uri: Pkcs11Uri, softhsm_token: SoftHsmToken
) -> None:
    library.generate_key_pair(uri, "ec", ["ec-p256"])
    library.generate_key_pair(uri, "rsa", ["rsa-2048"])
    with _raw_session(softhsm_token) as session:
        for label in ("ec", "rsa"):
            private = session.get_key(ObjectClass.PRIVATE_KEY, label=label)
            public = session.get_key(ObjectClass.PUBLIC_KEY, label=label)
            assert private[Attribute.SENSITIVE] is True
            assert private[Attribute.EXTRACTABLE] is False
            assert private[Attribute.PRIVATE] is True
            assert private[Attribute.TOKEN] is True
            assert private[Attribute.SIGN] is True
            assert public[Attribute.TOKEN] is True
            assert len(private[Attribute.ID]) == 16
            assert private[Attribute.ID] == public[Attribute.ID]
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                private[Attribute.PRIVATE_EXPONENT if label == "rsa" else Attribute.VALUE]
        assert session.get_key(ObjectClass.PRIVATE_KEY, label="rsa")[Attribute.DECRYPT] is True
        assert session.get_key(ObjectClass.PRIVATE_KEY, label="ec")[Attribute.DECRYPT] is False


def test_pkcs11_tool_sees_the_objects(
    library: Pkcs11Library, uri: Pkcs11Uri, softhsm_token: SoftHsmToken
) -> None:
    library.generate_key_pair(uri, "pair-ec", ["ec-p256"])
    library.generate_key_pair(uri, "pair-rsa", ["rsa-2048"])
    library.generate_secret(uri, "sym-hmac", ["derive", "sign"])
    library.generate_secret(uri, "sym-aes", ["encrypt"])

    listing = softhsm_token.pkcs11_tool("--list-objects").stdout
    blocks: dict[str | None, list[str]] = {}
    for block in _split_objects(listing):
        label = next(
            (
                line.split(":", 1)[1].strip()
                for line in block.splitlines()
                if line.strip().startswith("label:")
            ),
            None,
        )
        blocks.setdefault(label, []).append(block)

    assert set(blocks) >= {"pair-ec", "pair-rsa", "sym-hmac", "sym-aes"}
    for label in ("pair-ec", "pair-rsa"):
        kinds = sorted(b.strip().splitlines()[0].split(";")[0] for b in blocks[label])
        assert kinds == ["Private Key Object", "Public Key Object"]
        private = next(b for b in blocks[label] if b.strip().startswith("Private Key Object"))
        assert "sensitive" in private and "never extractable" in private
        assert " extractable" not in private.replace("never extractable", "")
    for label in ("sym-hmac", "sym-aes"):
        (secret,) = blocks[label]
        assert secret.strip().startswith("Secret Key Object")
        assert "sensitive" in secret and "never extractable" in secret
    assert "AES" in blocks["sym-aes"][0]


def _split_objects(listing: str) -> list[str]:
    # pkcs11-tool separates objects only by their "... Object;" header lines.
    blocks: list[list[str]] = []
    for line in listing.splitlines():
        if line and not line.startswith(" ") and "Object" in line:
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    return ["\n".join(block) for block in blocks]


def test_preloaded_key_pair_from_pkcs11_tool(
    library: Pkcs11Library, softhsm_token: SoftHsmToken
) -> None:
    softhsm_token.pkcs11_tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", "preloaded")
    preloaded = Pkcs11Uri.parse(softhsm_token.uri(object_label="preloaded"))
    assert preloaded.object_label == "preloaded"
    assert library.find_key_pair(preloaded, preloaded.object_label)
    params = library.public_parameters(preloaded, "preloaded")
    assert params.curve_oid == P256_OID
    digest = hashlib.sha256(b"preloaded").digest()
    _verify_ecdsa(params, library.sign_ecdsa(preloaded, "preloaded", digest), digest)


# ---------------------------------------------------------------------------------------------
# Secret keys


def test_hmac_matches_python_hmac(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    key = bytes(range(32))
    assert library.import_secret(uri, "hmac", key, ["derive", "sign"]) == "hmac-256"
    for message in (b"", b"derivation data", os.urandom(5000)):
        expected = hmac.new(key, message, hashlib.sha256).digest()
        assert library.hmac_sha256(uri, "hmac", message) == expected

    # IoT Hub SAS keys are 64 bytes; any length is fine for HMAC.
    long_key = os.urandom(64)
    assert library.import_secret(uri, "sas", long_key, ["sign"]) == "hmac-512"
    expected = hmac.new(long_key, b"sr=hub", hashlib.sha256).digest()
    assert library.hmac_sha256(uri, "sas", b"sr=hub") == expected


def test_generated_hmac_key(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert library.generate_secret(uri, "handle-validation-key", ["sign"]) == "hmac-256"
    assert library.find_secret(uri, "handle-validation-key")
    first = library.hmac_sha256(uri, "handle-validation-key", b"m")
    assert len(first) == 32
    assert library.hmac_sha256(uri, "handle-validation-key", b"m") == first
    with pytest.raises(KeyExists):
        library.generate_secret(uri, "handle-validation-key", ["derive"])
    assert library.hmac_sha256(uri, "handle-validation-key", b"m") == first
    with pytest.raises(InvalidParameter, match="not an AES key"):
        library.aes_gcm_encrypt(uri, "handle-validation-key", bytes(12), b"", b"x")


def test_import_replaces_the_previous_key(
    library: Pkcs11Library, uri: Pkcs11Uri, softhsm_token: SoftHsmToken
) -> None:
    old, new = b"a" * 32, b"b" * 32
    library.import_secret(uri, "k", old, ["sign"])
    library.import_secret(uri, "k", new, ["sign"])
    assert library.hmac_sha256(uri, "k", b"x") == hmac.new(new, b"x", hashlib.sha256).digest()
    with _raw_session(softhsm_token) as session:
        found = list(
            session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: "k"})
        )
        assert len(found) == 1
        secret = found[0]
        assert secret[Attribute.SENSITIVE] is True
        assert secret[Attribute.EXTRACTABLE] is False
        assert secret[Attribute.SIGN] is True
        assert secret[Attribute.ENCRYPT] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            secret[Attribute.VALUE]
    # Replacing an HMAC key by an AES key under the same id works too.
    aes_key = os.urandom(32)
    assert library.import_secret(uri, "k", aes_key, ["encrypt"]) == "aes-256"
    with pytest.raises(InvalidParameter, match="AES key"):
        library.hmac_sha256(uri, "k", b"x")


@pytest.mark.parametrize(
    "usage", [["encrypt", "sign"], ["derive", "encrypt"], [], ["verify"], ["sign", "bogus"]]
)
def test_unsupported_usage_is_invalid(
    library: Pkcs11Library, uri: Pkcs11Uri, usage: list[str]
) -> None:
    with pytest.raises(InvalidParameter, match="usage"):
        library.generate_secret(uri, "k", usage)
    with pytest.raises(InvalidParameter, match="usage"):
        library.import_secret(uri, "k", bytes(32), usage)
    assert not library.find_secret(uri, "k")


def test_import_rejects_bad_key_material(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    with pytest.raises(InvalidParameter, match="16, 24 or 32"):
        library.import_secret(uri, "k", bytes(20), ["encrypt"])
    with pytest.raises(InvalidParameter, match="empty"):
        library.import_secret(uri, "k", b"", ["sign"])


def test_aes_gcm_round_trip(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    assert library.generate_secret(uri, "aes", ["encrypt"]) == "aes-256"
    iv, aad = os.urandom(12), b"associated"
    for plaintext in (b"", b"hello", os.urandom(10000)):
        sealed = library.aes_gcm_encrypt(uri, "aes", iv, aad, plaintext)
        assert len(sealed) == len(plaintext) + 16
        assert library.aes_gcm_decrypt(uri, "aes", iv, aad, sealed) == plaintext

    sealed = library.aes_gcm_encrypt(uri, "aes", iv, b"", b"no aad")
    assert library.aes_gcm_decrypt(uri, "aes", iv, b"", sealed) == b"no aad"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(Pkcs11Error) as info:
        library.aes_gcm_decrypt(uri, "aes", iv, b"", tampered)
    assert not isinstance(info.value, InvalidParameter)
    assert info.value.ckr is not None and info.value.ckr.startswith("CKR_")
    with pytest.raises(Pkcs11Error):
        library.aes_gcm_decrypt(uri, "aes", iv, b"other aad", sealed)
    with pytest.raises(InvalidParameter, match="tag"):
        library.aes_gcm_decrypt(uri, "aes", iv, b"", b"short")
    with pytest.raises(InvalidParameter, match="IV"):
        library.aes_gcm_encrypt(uri, "aes", b"", b"", b"x")
    with pytest.raises(InvalidParameter, match="AES key"):
        library.hmac_sha256(uri, "aes", b"x")


@pytest.mark.parametrize("iv_len", [12, 16, 8])
def test_aes_gcm_interoperates_with_cryptography(
    library: Pkcs11Library, uri: Pkcs11Uri, iv_len: int
) -> None:
    key = os.urandom(32)
    library.import_secret(uri, "aes", key, ["encrypt"])
    aesgcm = AESGCM(key)
    iv, aad, plaintext = os.urandom(iv_len), b"aad bytes", b"secret payload"

    sealed = library.aes_gcm_encrypt(uri, "aes", iv, aad, plaintext)
    assert aesgcm.decrypt(iv, sealed, aad) == plaintext
    assert library.aes_gcm_decrypt(uri, "aes", iv, aad, aesgcm.encrypt(iv, plaintext, aad)) == (
        plaintext
    )


def test_aes_128_import(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    key = os.urandom(16)
    assert library.import_secret(uri, "aes128", key, ["encrypt"]) == "aes-128"
    iv = os.urandom(12)
    sealed = library.aes_gcm_encrypt(uri, "aes128", iv, b"", b"data")
    assert AESGCM(key).decrypt(iv, sealed, None) == b"data"


# ---------------------------------------------------------------------------------------------
# Move and delete


def test_move_key_pair(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    library.generate_key_pair(uri, "id", ["ec-p256"])
    library.generate_key_pair(uri, "id-temp", ["ec-p256"])
    renewed = library.public_parameters(uri, "id-temp")
    assert renewed != library.public_parameters(uri, "id")

    library.move_key_pair(uri, "id-temp", "id")
    assert not library.find_key_pair(uri, "id-temp")
    assert library.public_parameters(uri, "id") == renewed
    digest = hashlib.sha256(b"after move").digest()
    _verify_ecdsa(renewed, library.sign_ecdsa(uri, "id", digest), digest)

    # Moving onto a free label works too.
    library.move_key_pair(uri, "id", "fresh")
    assert library.find_key_pair(uri, "fresh") and not library.find_key_pair(uri, "id")


@pytest.mark.parametrize(
    "half_moved", [ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY], ids=["private", "public"]
)
def test_a_move_cut_short_between_the_halves_leaves_a_whole_pair(
    library: Pkcs11Library, uri: Pkcs11Uri, softhsm_token: SoftHsmToken, half_moved: ObjectClass
) -> None:
    """A move relabels the two halves one after the other; a kill in between leaves them under
    two labels. The pair must still work under the label its private key has, and later
    creations, moves and deletions must neither use nor destroy the stray half."""
    library.generate_key_pair(uri, "from", ["ec-p256"])
    pair = library.public_parameters(uri, "from")
    session = (
        pkcs11.lib(softhsm_token.lib_path).get_token(token_label=softhsm_token.label).open(rw=True)
    )
    (half,) = session.get_objects({Attribute.CLASS: half_moved, Attribute.LABEL: "from"})
    half[Attribute.LABEL] = "to"  # the kill lands here
    library.close()
    library = Pkcs11Library(softhsm_token.lib_path)  # the restart: nothing found is cached
    owner = "to" if half_moved == ObjectClass.PRIVATE_KEY else "from"
    other = "from" if owner == "to" else "to"
    assert library.public_parameters(uri, owner) == pair
    digest = hashlib.sha256(b"cut short").digest()
    _verify_ecdsa(pair, library.sign_ecdsa(uri, owner, digest), digest)
    assert not library.find_key_pair(uri, other)

    # A new pair where the stray half lies leaves the old pair whole.
    library.generate_key_pair(uri, other, ["ec-p256"])
    assert library.public_parameters(uri, owner) == pair
    assert library.public_parameters(uri, other) != pair

    # Moving the old pair takes both halves along; deleting it leaves nothing of it behind.
    library.move_key_pair(uri, owner, "moved")
    assert library.public_parameters(uri, "moved") == pair
    assert library.delete(uri, "moved", "key_pair") == 2
    labels = [obj[Attribute.LABEL] for obj in session.get_objects({})]
    assert sorted(labels) == [other, other], labels


def test_move_refuses_without_touching_destination(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    library.generate_key_pair(uri, "dest", ["ec-p256"])
    before = library.public_parameters(uri, "dest")
    with pytest.raises(KeyNotFound):
        library.move_key_pair(uri, "absent", "dest")
    assert library.public_parameters(uri, "dest") == before
    with pytest.raises(InvalidParameter, match="identical"):
        library.move_key_pair(uri, "dest", "dest")


def test_delete(library: Pkcs11Library, uri: Pkcs11Uri) -> None:
    library.generate_key_pair(uri, "same", ["ec-p256"])
    library.import_secret(uri, "same", bytes(32), ["sign"])

    assert library.delete(uri, "same", "secret") == 1
    assert not library.find_secret(uri, "same")
    assert library.find_key_pair(uri, "same")  # the key pair is another object kind
    assert library.delete(uri, "same", "secret") == 0

    assert library.delete(uri, "same", "key_pair") == 2
    assert not library.find_key_pair(uri, "same")
    assert library.delete(uri, "same", "key_pair") == 0
    with pytest.raises(KeyNotFound):
        library.sign_ecdsa(uri, "same", bytes(32))
    with pytest.raises(KeyNotFound):
        library.hmac_sha256(uri, "same", b"")
    with pytest.raises(InvalidParameter):
        library.delete(uri, "same", "certificate")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Finding the token, logging in, and sessions


def test_slot_id_uri(library: Pkcs11Library, softhsm_token: SoftHsmToken) -> None:
    by_slot = Pkcs11Uri.parse(f"pkcs11:slot-id={softhsm_token.slot_id}?pin-value=1234")
    library.generate_key_pair(by_slot, "k", ["ec-p256"])
    # slot-id wins over a token label that does not exist.
    both = Pkcs11Uri.parse(f"pkcs11:token=not-there;slot-id={softhsm_token.slot_id}?pin-value=1234")
    assert library.find_key_pair(both, "k")
    by_label = Pkcs11Uri.parse(softhsm_token.uri())
    assert library.find_key_pair(by_label, "k")


def test_wrong_pin(softhsm_token: SoftHsmToken) -> None:
    library = Pkcs11Library(softhsm_token.lib_path)
    bad = Pkcs11Uri.parse(f"pkcs11:token={softhsm_token.label}?pin-value=9999")
    with pytest.raises(Pkcs11Error) as info:
        library.find_key_pair(bad, "k")
    message = str(info.value)
    assert "PIN was rejected" in message
    assert repr(softhsm_token.label) in message
    assert info.value.ckr == "CKR_PIN_INCORRECT"
    assert "9999" not in message
    # The same wrong PIN is not tried again: a real token would count it and lock the PIN.
    with pytest.raises(TokenUnavailable) as again:
        library.find_key_pair(bad, "k")
    assert "not trying it again" in str(again.value) and again.value.ckr == "CKR_PIN_INCORRECT"
    # The right PIN still works afterwards.
    good = Pkcs11Uri.parse(softhsm_token.uri())
    assert not library.find_key_pair(good, "k")
    library.close()


def test_missing_token_label(library: Pkcs11Library, softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(Pkcs11Error) as info:
        library.find_key_pair(Pkcs11Uri.parse("pkcs11:token=Key%20pairs?pin-value=1234"), "k")
    message = str(info.value)
    assert "token label 'Key pairs'" in message
    assert f"slot {softhsm_token.slot_id}: token {softhsm_token.label!r}" in message
    assert softhsm_token.lib_path in message


def test_missing_slot_id(library: Pkcs11Library, softhsm_token: SoftHsmToken) -> None:
    with pytest.raises(Pkcs11Error) as info:
        library.mechanisms(Pkcs11Uri.parse("pkcs11:slot-id=424242?pin-value=1234"))
    message = str(info.value)
    assert "slot-id 424242" in message
    assert repr(softhsm_token.label) in message


def test_bad_library_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "libnothere.so")
    with pytest.raises(Pkcs11Error) as info:
        Pkcs11Library(missing)
    assert missing in str(info.value)
    assert "could not load PKCS#11 library" in str(info.value)

    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_text("not an ELF file")
    with pytest.raises(Pkcs11Error, match="libfake.so"):
        Pkcs11Library(str(not_a_library))


def test_uri_without_pin(library: Pkcs11Library, softhsm_token: SoftHsmToken) -> None:
    public_only = Pkcs11Uri.parse(softhsm_token.uri(with_pin=False))
    with_pin = Pkcs11Uri.parse(softhsm_token.uri())
    # Mechanism probing needs no login; private objects are simply invisible.
    assert "CKM_ECDSA" in library.mechanisms(public_only)
    assert not library.find_key_pair(public_only, "anything")
    # A URI with a PIN for the same token replaces the anonymous session by a logged-in one.
    library.generate_key_pair(with_pin, "k", ["ec-p256"])
    assert library.find_key_pair(with_pin, "k")
    # ... which URIs without a PIN then share.
    assert library.find_key_pair(public_only, "k")


def test_slot_id_and_label_share_one_session(
    library: Pkcs11Library, uri: Pkcs11Uri, softhsm_token: SoftHsmToken
) -> None:
    library.generate_key_pair(uri, "k", ["ec-p256"])
    by_slot = Pkcs11Uri.parse(f"pkcs11:slot-id={softhsm_token.slot_id}?pin-value=1234")
    assert library.find_key_pair(by_slot, "k")
    assert len(library._sessions) == 1


# python-pkcs11 finalizes the failed object search from a destructor, which raises again on the
# dead session; it can only report that as an "unraisable" exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_closed_session_is_reopened(
    library: Pkcs11Library,
    uri: Pkcs11Uri,
    softhsm_token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aziot.actors.keys.pkcs11")
    library.generate_key_pair(uri, "k", ["ec-p256"])
    digest = hashlib.sha256(b"x").digest()
    params = library.public_parameters(uri, "k")

    # Close the cached session behind the library's back (this also logs the token out).
    state = library._sessions[softhsm_token.slot_id]
    old_handle = state.session.handle
    state.session.close()
    _verify_ecdsa(params, library.sign_ecdsa(uri, "k", digest), digest)
    assert library._sessions[softhsm_token.slot_id].session.handle != old_handle
    assert "CKR_SESSION_HANDLE_INVALID; reopening the session and retrying once" in caplog.text

    # Finalize and initialize the module: every session handle becomes invalid.
    caplog.clear()
    pkcs11.lib(softhsm_token.lib_path).reinitialize()
    _verify_ecdsa(params, library.sign_ecdsa(uri, "k", digest), digest)
    assert "reopening the session" in caplog.text

    # Finalize only: the library initializes the module again.
    pkcs11.lib(softhsm_token.lib_path).finalize()
    assert library.find_key_pair(uri, "k")


def test_second_library_instance_shares_login(
    library: Pkcs11Library,
    uri: Pkcs11Uri,
    softhsm_token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aziot.actors.keys.pkcs11")
    library.generate_key_pair(uri, "k", ["ec-p256"])
    # Same module, same process: the token is already logged in for this application.
    other = Pkcs11Library(softhsm_token.lib_path)
    assert other.find_key_pair(uri, "k")
    assert "already logged in" in caplog.text
    assert library.find_key_pair(uri, "k")


@pytest.mark.usefixtures("restore_softhsm_conf")
def test_pin_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = make_softhsm_token(tmp_path, pin="Pin-Xq9z-secret")
    caplog.set_level(logging.DEBUG, logger="aziot.actors.keys.pkcs11")
    library = Pkcs11Library(token.lib_path)
    uri = Pkcs11Uri.parse(token.uri())
    library.generate_key_pair(uri, "k", ["ec-p256"])
    with pytest.raises(Pkcs11Error) as info:
        Pkcs11Library(token.lib_path).find_key_pair(
            Pkcs11Uri.parse("pkcs11:token=absent?pin-value=Pin-Xq9z-secret"), "k"
        )
    library.close()
    assert "supports" in caplog.text  # the mechanism probe was logged
    assert "Pin-Xq9z-secret" not in caplog.text
    assert "Pin-Xq9z-secret" not in str(info.value)


def test_pkcs11_tool_runs_with_the_helper_environment(softhsm_token: SoftHsmToken) -> None:
    result = softhsm_token.pkcs11_tool("--list-token-slots", login=False)
    assert softhsm_token.label in result.stdout
    with pytest.raises(subprocess.CalledProcessError):
        softhsm_token.pkcs11_tool("--login", "--pin", "0000", "--list-objects", login=False)


def test_objects_changed_by_another_application_are_seen(
    library: Pkcs11Library, softhsm_token: SoftHsmToken
) -> None:
    """Found objects are cached; a key deleted or replaced by pkcs11-tool must not be used."""
    uri = Pkcs11Uri.parse(softhsm_token.uri())
    library.generate_key_pair(uri, "shared", ["ec-p256"])
    first = library.public_parameters(uri, "shared").public_key()
    digest = hashlib.sha256(b"x").digest()
    library.sign_ecdsa(uri, "shared", digest)  # now cached
    softhsm_token.pkcs11_tool("--delete-object", "--type", "privkey", "--label", "shared")
    softhsm_token.pkcs11_tool("--delete-object", "--type", "pubkey", "--label", "shared")
    with pytest.raises(KeyNotFound):
        library.sign_ecdsa(uri, "shared", digest)
    softhsm_token.pkcs11_tool(
        "--keypairgen", "--key-type", "EC:prime256v1", "--label", "shared", "--id", "07"
    )
    second = library.public_parameters(uri, "shared").public_key()
    assert second.public_numbers() != first.public_numbers()
    signature = library.sign_ecdsa(uri, "shared", digest)
    second.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# ---------------------------------------------------------------------------------------------
# Kills in the middle of a write (issue 9)


class _Killed(BaseException):
    """Stands for SIGKILL: raised between two token writes, so nothing after it runs (not even
    the write's own clean-up, which catches Exception)."""


def _steps_of(library: Pkcs11Library, write: Callable[[], object]) -> list[str]:
    steps: list[str] = []
    library.on_step = steps.append
    try:
        write()
    finally:
        library.on_step = None
    return steps


def _killed_at(
    library: Pkcs11Library, step: int, write: Callable[..., object], *args: object
) -> str:
    """Run `write(*args)` until its `step`-th step, stop it there, and return the step's name."""
    seen: list[str] = []

    def stop(name: str) -> None:
        seen.append(name)
        if len(seen) > step:
            raise _Killed(name)

    library.on_step = stop
    with pytest.raises(_Killed):
        write(*args)
    library.close()
    return seen[-1]


def _restarted(softhsm_token: SoftHsmToken, uri: Pkcs11Uri) -> Pkcs11Library:
    """A fresh instance, logged in (it reconciles then); raw sessions see private objects."""
    library = Pkcs11Library(softhsm_token.lib_path)
    library.mechanisms(uri)
    return library


def _labels(softhsm_token: SoftHsmToken) -> list[str]:
    with _raw_session(softhsm_token) as session:
        return sorted(obj[Attribute.LABEL] for obj in session.get_objects({Attribute.CLASS: 3}))


def _staged(softhsm_token: SoftHsmToken) -> list[str]:
    with _raw_session(softhsm_token) as session:
        objects = []
        for cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
            objects += list(session.get_objects({Attribute.CLASS: cls}))
        return [repr(obj[Attribute.LABEL]) for obj in objects if obj[Attribute.LABEL][:1] == "\0"]


def _private_keys(softhsm_token: SoftHsmToken, label: str) -> int:
    with _raw_session(softhsm_token) as session:
        query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
        return len(list(session.get_objects(query)))


def test_a_move_onto_a_key_pair_killed_between_any_two_token_writes(
    library: Pkcs11Library,
    uri: Pkcs11Uri,
    softhsm_token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failure mode 1 of issue 9: a move onto an id that holds an acknowledged key pair was
    killed after the destination had been destroyed and before the source was relabelled, so
    neither label held it any more (relabelling in place could also lose a half: SoftHSM
    rewrites an object's file in place). At every instant between two token writes of a move,
    the destination must hold the old pair or the moved one, whole and usable."""
    caplog.set_level(logging.WARNING, logger="aziot.actors.keys.pkcs11")
    library.generate_key_pair(uri, "probe-from", ["ec-p256"])
    library.generate_key_pair(uri, "probe-to", ["ec-p256"])
    steps = _steps_of(library, lambda: library.move_key_pair(uri, "probe-from", "probe-to"))
    assert len(steps) >= 5, steps
    digest = hashlib.sha256(b"after the kill").digest()
    for step in range(len(steps)):
        source, destination = f"from-{step}", f"to-{step}"
        library.generate_key_pair(uri, source, ["ec-p256"])
        library.generate_key_pair(uri, destination, ["ec-p256"])
        moved = library.public_parameters(uri, source)
        old = library.public_parameters(uri, destination)
        where = _killed_at(library, step, library.move_key_pair, uri, source, destination)
        caplog.clear()
        library = _restarted(softhsm_token, uri)
        found = library.public_parameters(uri, destination)
        assert found in (old, moved), where
        _verify_ecdsa(found, library.sign_ecdsa(uri, destination, digest), digest)
        assert _private_keys(softhsm_token, destination) == 1, where
        # The source is gone exactly when the move took effect.
        assert library.find_key_pair(uri, source) == (found == old), where
        if found == old:
            assert library.public_parameters(uri, source) == moved
        assert not _staged(softhsm_token), where
        if step < len(steps) - 1:
            assert "repaired: " in caplog.text, where
        assert library.reconcile(uri) == [], where  # one state, reached at once


@pytest.mark.parametrize("write", ["generate", "import"])
def test_a_secret_key_write_killed_between_any_two_token_writes(
    library: Pkcs11Library,
    uri: Pkcs11Uri,
    softhsm_token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
    write: str,
) -> None:
    """Failure mode 2 of issue 9: a secret key written under its label was found before it held
    its value (SoftHSM stores a new key's label, then its value), so HMAC answered 500, and the
    next start neither removed it nor served it. At every instant between two token writes, the
    id holds the old key or the new one, once, and HMAC with it works."""
    caplog.set_level(logging.WARNING, logger="aziot.actors.keys.pkcs11")
    old_key, new_key = b"o" * 32, b"n" * 32

    def run(label: str) -> object:
        if write == "generate":
            return library.generate_secret(uri, label, ["sign"])
        return library.import_secret(uri, label, new_key, ["sign"])

    if write == "import":
        library.import_secret(uri, "probe", old_key, ["sign"])
    steps = _steps_of(library, lambda: run("probe"))
    assert len(steps) >= 3, steps
    for step in range(len(steps)):
        label = f"secret-{step}"
        if write == "import":
            library.import_secret(uri, label, old_key, ["sign"])
        where = _killed_at(library, step, run, label)
        library = _restarted(softhsm_token, uri)
        assert not _staged(softhsm_token), where
        with _raw_session(softhsm_token) as session:
            query = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
            count = len(list(session.get_objects(query)))
        if write == "generate":
            # Absent (the write had not taken effect) or a whole key that works.
            if count:
                assert len(library.hmac_sha256(uri, label, b"x")) == 32, where
        else:
            mac = library.hmac_sha256(uri, label, b"x")
            allowed = [hmac.new(k, b"x", hashlib.sha256).digest() for k in (old_key, new_key)]
            assert mac in allowed, where
        assert count == 1 or (write == "generate" and count == 0), where
        assert library.reconcile(uri) == [], where
