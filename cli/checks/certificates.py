"""Certificate checks: validity of the identity, EST and local CA certs, the preloaded certs
(readable by certd's user, PEM, valid), reading them through certd, and EST over HTTPS."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography import x509

from aziot.actors.files import file_name
from aziot.config.certd import CertdConfig
from aziot.config.identityd import Dps, Manual, ManualX509, X509Attestation

from ..uds import UdsError, request
from .context import Context
from .ids import CERTD_API, quote_id
from .outcome import IGNORED, OK, SKIPPED, CheckFailed, Outcome, failed, warning
from .readers import reader_for, unreadable

EXPIRY_WARNING = datetime.timedelta(days=7)
_SEVERITY = {"ok": 0, "warning": 1, "failed": 2}


def preloaded_path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def cert_path(certd: CertdConfig, cert_id: str) -> Path:
    entry = certd.preloaded_certs.get(cert_id)
    if isinstance(entry, list):
        raise CheckFailed(f"preloaded cert {cert_id!r} is a list of IDs, not a single file")
    if entry is not None:
        return preloaded_path(entry)
    return certd.homedir / "certs" / file_name(cert_id, "cer")


def validity(cert: x509.Certificate, name: str, cert_id: str, now: datetime.datetime) -> Outcome:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not_before > now:
        return failed(f"{name} '{cert_id}' has not-before time {not_before} which is in the future")
    if not_after < now:
        return failed(f"{name} '{cert_id}' expired at {not_after}")
    if not_after < now + EXPIRY_WARNING:
        return warning(
            f"{name} '{cert_id}' will expire soon ({not_after}, in {(not_after - now).days} days)"
        )
    return OK


def read_cert_file(ctx: Context, path: Path, cert_id: str) -> x509.Certificate:
    """The first cert of a PEM file certd's user can read; CheckFailed says why not."""
    reader = ctx.cache.get("certd_reader")
    if reader is None:
        reader = ctx.cache["certd_reader"] = reader_for(ctx.layout, "certd")
    problem = unreadable(path, reader, private=False)
    if problem is not None:
        raise CheckFailed(f"cert '{cert_id}': {problem}")
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as error:
        raise CheckFailed(f"Could not read cert file {path}: {error.strerror}") from None
    except ValueError as error:
        raise CheckFailed(f"could not parse {path} as a valid .pem: {error}") from None
    return certs[0]


def _validity_info(cert: x509.Certificate, name: str, cert_id: str) -> dict[str, str]:
    return {
        "cert_name": name,
        "cert_id": cert_id,
        "not_after": cert.not_valid_after_utc.isoformat(),
        "not_before": cert.not_valid_before_utc.isoformat(),
    }


def validate_cert(
    ctx: Context, certd: CertdConfig, cert_id: str, name: str
) -> tuple[Outcome, dict[str, str] | None]:
    """A cert that exists must be valid; one not issued yet must at least be issuable."""
    path = cert_path(certd, cert_id)
    if path.exists():
        cert = read_cert_file(ctx, path, cert_id)
        now = datetime.datetime.now(datetime.UTC)
        return validity(cert, name, cert_id, now), _validity_info(cert, name, cert_id)
    if cert_id not in certd.preloaded_certs and cert_id not in certd.certs:
        raise CheckFailed(
            f"{name} certificate is neither preloaded nor configured to be dynamically issued, "
            "and thus cannot be used."
        )
    if cert_id in certd.preloaded_certs:
        raise CheckFailed(
            f"{name} certificate '{cert_id}' is preloaded from {path}, which does not exist"
        )
    return OK, None


def identity_certificate_expiry(ctx: Context, info: dict[str, Any]) -> Outcome:
    kind = ctx.need_identityd().provisioning.kind
    cert: tuple[str, str] | None = None
    if isinstance(kind, Dps):
        info["provisioning_mode"] = (
            "dps-x509" if isinstance(kind.attestation, X509Attestation) else "dps-other"
        )
        if isinstance(kind.attestation, X509Attestation):
            cert = (kind.attestation.identity_cert, "DPS identity")
    elif isinstance(kind, Manual):
        x509_auth = isinstance(kind.authentication, ManualX509)
        info["provisioning_mode"] = "manual-x509" if x509_auth else "manual-other"
        if isinstance(kind.authentication, ManualX509):
            cert = (kind.authentication.identity_cert, "Manual identity")
    else:
        info["provisioning_mode"] = "none"
    if cert is None:
        return IGNORED
    outcome, cert_info = validate_cert(ctx, ctx.need_certd(), *cert)
    info["certificate_info"] = cert_info
    return outcome


def est_identity_and_bootstrap_certificate_expiry(ctx: Context, info: dict[str, Any]) -> Outcome:
    certd = ctx.need_certd()
    auth = certd.est.auth if certd.est is not None else None
    if auth is None or auth.identity is None:
        return IGNORED
    outcome, info["identity_certificate_info"] = validate_cert(
        ctx, certd, auth.identity.cert, "x509 identity"
    )
    if outcome.kind != "ok":
        return outcome
    if auth.bootstrap_identity is not None:
        outcome, info["bootstrap_certificate_info"] = validate_cert(
            ctx, certd, auth.bootstrap_identity.cert, "x509 bootstrap"
        )
    return outcome


def local_ca_certificate_expiry(ctx: Context, info: dict[str, Any]) -> Outcome:
    certd = ctx.need_certd()
    if certd.local_ca is None:
        return IGNORED
    outcome, info["certificate_info"] = validate_cert(ctx, certd, certd.local_ca.cert, "Local CA")
    return outcome


def _worst(outcomes: list[Outcome]) -> Outcome:
    """Every problem in one report (the original stops at the first), at the worst level."""
    problems = [o for o in outcomes if o.kind != "ok"]
    if not problems:
        return OK
    worst = max(problems, key=lambda o: _SEVERITY[o.kind])
    return Outcome(worst.kind, "\n".join(o.message for o in problems))


def certs_preloaded(ctx: Context, info: dict[str, Any]) -> Outcome:
    certd = ctx.need_certd()
    now = datetime.datetime.now(datetime.UTC)
    outcomes: list[Outcome] = []
    seen: set[str] = set()

    def walk(cert_id: str) -> None:
        if cert_id in seen:
            return
        seen.add(cert_id)
        entry = certd.preloaded_certs.get(cert_id)
        if isinstance(entry, list):
            for member in entry:
                walk(member)
        elif entry is not None:
            if urlsplit(entry).scheme != "file":
                outcomes.append(
                    failed(f"preloaded cert {cert_id!r} has a scheme other than `file://`")
                )
                return
            try:
                cert = read_cert_file(ctx, preloaded_path(entry), cert_id)
            except CheckFailed as error:
                outcomes.append(error.outcome())
                return
            outcomes.append(validity(cert, "preloaded certificate", cert_id, now))

    for cert_id in certd.preloaded_certs:
        walk(cert_id)
    if "certd_reader" in ctx.cache:
        info["files_checked_for"] = ctx.cache["certd_reader"].describe()
    return _worst(outcomes)


def certs_read(ctx: Context, info: dict[str, Any]) -> Outcome:
    certd = ctx.need_certd()
    if not ctx.running.get("certd"):
        return SKIPPED
    socket = ctx.layout.socket("certd")
    errors = []
    for cert_id in certd.preloaded_certs:
        target = f"/certificates/{quote_id(cert_id)}?api-version={CERTD_API}"
        try:
            reply = request(socket, "GET", target)
        except UdsError as error:
            errors.append(f"could not load cert with ID {cert_id!r}: {error}")
            continue
        if reply.status != 200:
            errors.append(
                f"could not load cert with ID {cert_id!r}: certd answered {reply.status} "
                f"{reply.message}"
            )
            continue
        try:
            certs = x509.load_pem_x509_certificates(str(reply.json()["pem"]).encode())
        except (ValueError, KeyError, TypeError) as error:
            errors.append(f"could not load cert with ID {cert_id!r}: {error}")
            continue
        ctx.certs[cert_id] = certs[0]
    if errors:
        return failed("\n".join(errors))
    return OK


def est_server_https(ctx: Context, info: dict[str, Any]) -> Outcome:
    certd = ctx.need_certd()
    urls = list(certd.est.urls.values()) if certd.est is not None else []
    urls += [
        options.url for options in certd.certs.values() if options.method == "est" and options.url
    ]
    lines = []
    for url in urls:
        if urlsplit(url).scheme != "https":
            lines.append(
                f"EST server URL {url!r} is configured with unencrypted HTTP, which may expose "
                "device to man-in-the-middle attacks."
            )
            lines.append(
                "To clear this warning, configure HTTPS for your EST server and update the URL."
            )
    return warning("\n".join(lines)) if lines else OK
