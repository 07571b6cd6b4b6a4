"""What certd's tests share: a keyd + certd aziotd, CSRs made by `cryptography`, and checks of
issued chains with `cryptography` and `openssl verify`."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.daemon import Daemon, ServiceDir, keyd_config

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def certd_config(extra: str = "") -> Callable[[ServiceDir], str]:
    def config(service: ServiceDir) -> str:
        return f'homedir_path = "{service.home}"\n{extra}'

    return config


def start_certd(
    root: Path,
    extra: str = "",
    keyd_extra: str = "",
    env: dict[str, str] | None = None,
    config_d: dict[str, dict[str, str]] | None = None,
) -> Daemon:
    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + keyd_extra

    return Daemon(
        root, {"keyd": keyd, "certd": certd_config(extra)}, env=env, config_d=config_d
    ).start()


def make_csr(
    common_name: str,
    key: PrivateKey | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
) -> tuple[str, PrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


class KeydEcKey(ec.EllipticCurvePrivateKey):
    """Test-side: a P-256 key in keyd, signing through its `/sign` (for CSRs of keyd keys)."""

    def __init__(self, daemon: Daemon, key_id: str) -> None:
        self._daemon = daemon
        reply = daemon.request(
            "keyd", "POST", "/keypair", {"keyId": key_id, "preferredAlgorithms": "ec-p256"}
        )
        assert reply.status == 200, reply.body
        self.handle = reply.json()["keyHandle"]
        reply = daemon.request("keyd", "POST", "/parameters/ec-point", {"keyHandle": self.handle})
        point = base64.b64decode(reply.json()["value"])
        self._public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    def sign(self, data: bytes, signature_algorithm: Any) -> bytes:
        digest = hashlib.sha256(data).digest()
        body = {"keyHandle": self.handle, "algorithm": "ECDSA", "parameters": {"digest": ""}}
        body["parameters"]["digest"] = base64.b64encode(digest).decode()
        reply = self._daemon.request("keyd", "POST", "/sign", body)
        assert reply.status == 200, reply.body
        return base64.b64decode(reply.json()["signature"])

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return 256

    def exchange(self, *args: Any) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> Any:
        raise NotImplementedError

    def private_bytes(self, *args: Any) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> KeydEcKey:
        return self

    def __deepcopy__(self, memo: Any) -> KeydEcKey:
        return self


def certs_of(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def openssl_verify(root: Path, chain: list[x509.Certificate], work: Path) -> str:
    """`openssl verify` of chain[0] with chain[1:] as untrusted and `root` as the anchor."""
    work.mkdir(parents=True, exist_ok=True)
    leaf = work / "leaf.pem"
    leaf.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    command = ["openssl", "verify", "-CAfile", str(root)]
    if len(chain) > 1:
        untrusted = work / "untrusted.pem"
        untrusted.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:])
        )
        command += ["-untrusted", str(untrusted)]
    result = subprocess.run([*command, str(leaf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
