"""Local identities (`type=local`, spec/api.md §5.4): a key made here and a cert from certd, for
modules that authenticate to each other on the device rather than to the cloud.

The key is RSA-2048 generated in this process (as the original: it goes to the caller, so keyd
never holds it); the CSR's subject is `<module>.<hostname>.<domain>` and its extensions make a
leaf for TLS clients (or servers); certd issues it as cert id `<module>`, by its
`[cert_issuance.<module>]` (a local CA, typically). Nothing is stored by identityd.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CN_MAX_BYTES = 64


def options(local_opts: Any) -> str:
    """The `attributes` of `localIdOpts` (`client` or `server`); anything malformed is the
    default, `client`, as the original silently takes it."""
    if (
        isinstance(local_opts, dict)
        and local_opts.get("type") == "x509"
        and local_opts.get("attributes") in ("client", "server")
    ):
        return str(local_opts["attributes"])
    return "client"


def common_name(module_id: str, hostname: str, domain: str) -> str:
    """`<module>.<hostname>.<domain>`, cut to 64 bytes of UTF-8 at a character boundary."""
    name = f"{module_id}.{hostname}.{domain}"
    raw = name.encode("utf-8")[:CN_MAX_BYTES]
    return raw.decode("utf-8", "ignore")


def key_and_csr(cn: str, attributes: str) -> tuple[bytes, str]:
    """A new RSA-2048 key (PKCS#8 PEM) and its CSR (PEM), with the original's extensions."""
    key = rsa.generate_private_key(65537, 2048)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if attributes == "server":
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=True)
    )
    csr = builder.sign(key, hashes.SHA256())
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem_key, csr.public_bytes(serialization.Encoding.PEM).decode()


def expiration(chain_pem: str) -> str:
    """The cert's notAfter as the original writes it: RFC 3339 with `+00:00`."""
    leaf = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    return leaf.not_valid_after_utc.isoformat()
