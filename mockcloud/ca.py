"""Throwaway certificate authorities for the mock cloud servers.

Every mock server (EST now, DPS and IoT Hub later) needs the same few things: a CA to sign its
own TLS certificate, CAs that sign what it hands out, leaf certificates for test clients, and all
of it as PEM files a daemon config can point at. Nothing here is secure on purpose: keys are
written unencrypted and readable, because tests run the daemon under other uids that must read
them.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-4096", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

# CAs outlive any test run or demo; a restarted mock server reuses them from disk.
CA_DAYS = 3650
# Clients on a skewed clock would otherwise see a brand-new cert as "not yet valid".
BACKDATE = datetime.timedelta(minutes=5)

# Extensions the issuer computes itself rather than trusting the request for.
_ISSUER_OWNED = (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)


def generate_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    """A new private key; EC P-256 by default because RSA generation is slow on a busy box."""
    match key_type:
        case "ec-p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "ec-p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "rsa-2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case "rsa-4096":
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
        case "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}")


def name(common_name: str | x509.Name) -> x509.Name:
    """A subject from a bare common name, or the name itself."""
    if isinstance(common_name, x509.Name):
        return common_name
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; passing a hash is an error for it.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate, its key, and the certificates above it (nearest first)."""

    cert: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...] = ()

    @classmethod
    def root(
        cls,
        subject: str | x509.Name,
        *,
        key_type: KeyType = "ec-p256",
        days: int = CA_DAYS,
    ) -> CertificateAuthority:
        """A self-signed CA. Any name is allowed, so a test can forge a look-alike of another CA."""
        return cls(*_new_ca(subject, None, key_type=key_type, days=days))

    def intermediate(
        self,
        subject: str | x509.Name,
        *,
        key_type: KeyType = "ec-p256",
        days: int = CA_DAYS,
    ) -> CertificateAuthority:
        """A CA signed by this one, so chains have more than one link."""
        return CertificateAuthority(
            *_new_ca(subject, self, key_type=key_type, days=days), self.chain
        )

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate followed by its parents: what a relying party needs."""
        return (self.cert, *self.parents)

    @property
    def root_cert(self) -> x509.Certificate:
        return self.chain[-1]

    def issue(
        self,
        subject: x509.Name,
        public_key: PublicKey,
        *,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        extensions: Iterable[x509.Extension[x509.ExtensionType]] = (),
    ) -> x509.Certificate:
        """Sign a certificate; SKID and AKID are always set from the keys, never taken as given."""
        return _sign(
            subject=subject,
            public_key=public_key,
            issuer_name=self.cert.subject,
            issuer_key=self.key,
            issuer_skid=_skid_of(self.cert),
            not_before=not_before,
            not_after=not_after,
            extensions=extensions,
        )

    def issue_from_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.Certificate:
        """Sign what a CSR asks for: its subject, key and extensions (a CA:TRUE request is kept,
        as device-CA enrollment needs it)."""
        return self.issue(
            csr.subject,
            csr.public_key(),  # type: ignore[arg-type]
            not_before=not_before,
            not_after=not_after,
            extensions=list(csr.extensions),
        )

    def issue_leaf(
        self,
        common_name: str,
        *,
        client: bool = True,
        server_hosts: Sequence[str] = (),
        key_type: KeyType = "ec-p256",
        days: int = 365,
    ) -> tuple[x509.Certificate, PrivateKey]:
        """A new key and an end-entity cert for it: a TLS client, a TLS server for
        `server_hosts` (IP addresses or DNS names), or both."""
        key = generate_key(key_type)
        usages = []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        extensions: list[x509.Extension[x509.ExtensionType]] = [
            x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(False, None)),
        ]
        if server_hosts:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            extensions.append(
                x509.Extension(
                    x509.SubjectAlternativeName.oid,
                    False,
                    x509.SubjectAlternativeName([_general_name(h) for h in server_hosts]),
                )
            )
        if usages:
            extensions.append(
                x509.Extension(x509.ExtendedKeyUsage.oid, False, x509.ExtendedKeyUsage(usages))
            )
        not_before, not_after = _validity(days)
        cert = self.issue(
            name(common_name),
            key.public_key(),
            not_before=not_before,
            not_after=not_after,
            extensions=extensions,
        )
        return cert, key

    def directly_issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA's key signed `cert` (names alone are not trusted: a forged look-alike
        CA has the same name)."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def save(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write `<stem>.pem` (this CA alone), `<stem>.key.pem` and, when it has parents,
        `<stem>-chain.pem` (this CA then its parents). Returns the cert and key paths."""
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key.pem"
        write_certs(cert_path, [self.cert])
        write_key(key_path, self.key)
        if self.parents:
            write_certs(directory / f"{stem}-chain.pem", self.chain)
        return cert_path, key_path

    @classmethod
    def load(cls, directory: Path, stem: str) -> CertificateAuthority:
        """Read what `save` wrote; raises OSError or ValueError if a file is missing or the key
        does not fit the certificate."""
        certs = read_certs(directory / f"{stem}.pem")
        key = read_key(directory / f"{stem}.key.pem")
        chain_path = directory / f"{stem}-chain.pem"
        parents = read_certs(chain_path)[1:] if chain_path.exists() else []
        if len(certs) != 1:
            raise ValueError(f"{stem}.pem: expected one certificate, found {len(certs)}")
        if certs[0].public_key() != key.public_key():
            raise ValueError(f"{stem}: key does not match certificate")
        return cls(certs[0], key, tuple(parents))


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    """`days` from now, backdated for clients on a skewed clock."""
    start = now() - BACKDATE
    return start, start + datetime.timedelta(days=days)


def _new_ca(
    subject: str | x509.Name,
    parent: CertificateAuthority | None,
    *,
    key_type: KeyType,
    days: int,
) -> tuple[x509.Certificate, PrivateKey]:
    """A new CA key and its cert, signed by `parent` (an intermediate) or by itself (a root)."""
    key = generate_key(key_type)
    not_before, not_after = _validity(days)
    subject_name = name(subject)
    cert = _sign(
        subject=subject_name,
        public_key=key.public_key(),
        issuer_name=subject_name if parent is None else parent.cert.subject,
        issuer_key=key if parent is None else parent.key,
        issuer_skid=None if parent is None else _skid_of(parent.cert),
        not_before=not_before,
        not_after=not_after,
        extensions=_ca_extensions(path_length=None if parent is None else 0),
    )
    return cert, key


def _ca_extensions(path_length: int | None) -> list[x509.Extension[x509.ExtensionType]]:
    return [
        x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(True, path_length)),
        x509.Extension(
            x509.KeyUsage.oid,
            True,
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
        ),
    ]


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _skid_of(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]


def _sign(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer_name: x509.Name,
    issuer_key: PrivateKey,
    issuer_skid: x509.SubjectKeyIdentifier | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    extensions: Iterable[x509.Extension[x509.ExtensionType]],
) -> x509.Certificate:
    skid = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        # RFC 5280 wants a positive serial of at most 20 octets; 159 random bits fit.
        .serial_number(secrets.randbits(159) | 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(skid, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_skid or skid),
            critical=False,
        )
    )
    for extension in extensions:
        if isinstance(extension.value, _ISSUER_OWNED):
            continue
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(issuer_key, _hash_for(issuer_key))  # type: ignore[arg-type]


def write_certs(path: Path, certs: Iterable[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key: PrivateKey) -> Path:
    """PKCS#8 PEM, unencrypted: the form keyd's preloaded keys and openssl both read."""
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def read_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def read_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, PrivateKey):
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
    return key
