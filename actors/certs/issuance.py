"""Local issuance: a certificate built from a CSR and signed by an issuer key in the Keys Service.

The rules are the original's (spec/api.md §4.3): subject from the config override or the CSR,
the CSR's public key and every one of its extensions copied, SKID added when the CSR has none,
AKID from the issuer's SKID, notAfter capped by the issuer's, SHA-256, and the issuer's chain
after the new cert. Two deliberate differences, both about certs that verifiers reject:

- a random positive 128-bit serial number, where the original leaves it 0 (every cert of a
  device then has the same issuer and serial, which breaks revocation and some verifiers);
- notBefore dated back by a margin (default 5 minutes): a device or peer whose clock is a little
  behind would otherwise find a fresh cert "not yet valid" (lessons.md row 14); but never before
  the issuer's own notBefore, so a CA made a moment ago issues chains valid from its first
  second. An issuer dated in the future gets leaves dated now, as the original dates them all.

These functions are synchronous: they run in a worker thread, where the issuer key's `sign()`
calls back to the trio loop for the Keys Service.
"""

from __future__ import annotations

import datetime
import re
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aziot.actors.texts import invalid_parameter

CN_MAX_LENGTH = 64  # the original truncates configured common names to 64 characters
DEFAULT_EXPIRY_DAYS = 30

# What OpenSSL's `X509_NAME_add_entry_by_txt` understands for `subject = { … }` keys: its short
# and long names (case-sensitive, as OpenSSL's lookup).
NAME_OIDS: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "countryName": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "stateOrProvinceName": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "localityName": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "organizationName": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "organizationalUnitName": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "commonName": NameOID.COMMON_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "DC": NameOID.DOMAIN_COMPONENT,
    "domainComponent": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "userId": NameOID.USER_ID,
    "GN": NameOID.GIVEN_NAME,
    "givenName": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME,
    "surname": NameOID.SURNAME,
    "title": NameOID.TITLE,
    "street": NameOID.STREET_ADDRESS,
    "streetAddress": NameOID.STREET_ADDRESS,
    "postalCode": NameOID.POSTAL_CODE,
    "businessCategory": NameOID.BUSINESS_CATEGORY,
    "pseudonym": NameOID.PSEUDONYM,
    "initials": NameOID.INITIALS,
    "generationQualifier": NameOID.GENERATION_QUALIFIER,
    "dnQualifier": NameOID.DN_QUALIFIER,
    "x500UniqueIdentifier": NameOID.X500_UNIQUE_IDENTIFIER,
    "jurisdictionC": NameOID.JURISDICTION_COUNTRY_NAME,
    "jurisdictionCountryName": NameOID.JURISDICTION_COUNTRY_NAME,
    "jurisdictionST": NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME,
    "jurisdictionStateOrProvinceName": NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME,
    "jurisdictionL": NameOID.JURISDICTION_LOCALITY_NAME,
    "jurisdictionLocalityName": NameOID.JURISDICTION_LOCALITY_NAME,
    "organizationIdentifier": NameOID.ORGANIZATION_IDENTIFIER,
}
_DOTTED = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def name_oid(name: str) -> x509.ObjectIdentifier:
    """A subject attribute by OpenSSL name (short or long) or dotted OID, as OpenSSL takes it."""
    oid = NAME_OIDS.get(name)
    if oid is not None:
        return oid
    if _DOTTED.fullmatch(name):
        return x509.ObjectIdentifier(name)
    raise ValueError(
        f"unknown subject attribute {name!r}; use an OpenSSL name ({', '.join(NAME_OIDS)}) "
        "or a dotted OID"
    )


SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class IssuanceError(Exception):
    """Issuance could not be done; the message says why (logged; the caller gets a 500)."""


def subject_override(common_name: str | None, subject: dict[str, str] | None) -> x509.Name | None:
    """The configured subject, built as the original builds it (entries in key order)."""
    if common_name is not None:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:CN_MAX_LENGTH])])
    if subject is None:
        return None
    attributes = []
    for name in sorted(subject):
        oid = name_oid(name)
        value = subject[name]
        if name.lower() in ("cn", "commonname"):
            value = value[:CN_MAX_LENGTH]
        attributes.append(x509.NameAttribute(oid, value))
    return x509.Name(attributes)


def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    """The CSR of a request, with its self-signature checked: a 400 naming `csr` otherwise."""
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8"))
        csr.public_key()
    except (ValueError, TypeError, UnicodeEncodeError) as error:
        raise invalid_parameter("csr", _load_failure(pem, error)) from None
    try:
        valid = csr.is_signature_valid
    except Exception as error:  # an unsupported signature algorithm, for one
        raise invalid_parameter("csr", str(error)) from None
    if not valid:
        raise invalid_parameter("csr", "CSR failed to be verified with its public key")
    return csr


def _load_failure(pem: str, error: Exception) -> str:
    if "-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        return "no PEM block of type CERTIFICATE REQUEST found (expecting: CERTIFICATE REQUEST)"
    return f"the CERTIFICATE REQUEST block is not a valid PKCS#10 request: {error}"


_CERT_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


def parse_chain(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM file, in order; [] when it has none. Blocks of other types
    (a key, a CSR) are skipped, as OpenSSL's `X509::stack_from_pem` skips them."""
    blocks = _CERT_BLOCK.findall(pem)
    return [x509.load_pem_x509_certificate(block) for block in blocks]


def issue(
    csr: x509.CertificateSigningRequest,
    issuer_chain: list[x509.Certificate],
    key: SigningKey,
    *,
    subject: x509.Name | None,
    expiry_days: int | None,
    not_before_margin: datetime.timedelta,
    now: datetime.datetime,
) -> bytes:
    """The new cert's PEM followed by the issuer chain's; self-signed when the chain is empty."""
    subject_name = subject if subject is not None else csr.subject
    not_after = now + datetime.timedelta(days=expiry_days or DEFAULT_EXPIRY_DAYS)
    issuer_cert = issuer_chain[0] if issuer_chain else None
    issuer_name = subject_name
    if issuer_cert is not None:
        issuer_name = issuer_cert.subject
        not_after = min(not_after, issuer_cert.not_valid_after_utc)
    not_before = min(now - not_before_margin, not_after)
    if issuer_cert is not None:
        not_before = max(not_before, min(issuer_cert.not_valid_before_utc, now))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer_name)
        .public_key(csr.public_key())
        .serial_number(secrets.randbits(127) | 1 << 126)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    copied = set()
    for extension in csr.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
        copied.add(extension.oid)
    if x509.SubjectKeyIdentifier.oid not in copied:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False
        )
    if issuer_cert is not None and x509.AuthorityKeyIdentifier.oid not in copied:
        try:
            skid = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            pass  # as the original: no AKID when the issuer has no SKID
        else:
            akid = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(skid.value)
            builder = builder.add_extension(akid, critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    return pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issuer_chain)


def renewal_csr(current: x509.Certificate, key: SigningKey) -> x509.CertificateSigningRequest:
    """A CSR asking again for `current`: its subject and extensions (but the key ids, which
    issuance makes afresh for the possibly new key), signed by the key it will certify."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(current.subject)
    for extension in current.extensions:
        if extension.oid in (
            x509.SubjectKeyIdentifier.oid,
            x509.AuthorityKeyIdentifier.oid,
        ):
            continue
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(key, hashes.SHA256())


def key_algorithm_like(public: object) -> str:
    """keyd's name for a new key of the same kind as `public` (a rotated key keeps its kind)."""
    if isinstance(public, rsa.RSAPublicKey):
        return f"rsa-{public.key_size}" if public.key_size in (2048, 4096) else "rsa-2048"
    return "ec-p256"


def client_csr(subject: x509.Name, key: SigningKey) -> bytes:
    """A CSR (DER) for an EST identity cert: the subject, EKU clientAuth, SHA-256."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
