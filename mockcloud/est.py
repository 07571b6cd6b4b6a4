"""A local EST server (RFC 7030) for tests and the demo, with misbehaviours on demand.

certd enrolls certificates from an EST server (api.md §4.4, provisioning.md §15.2). Real servers
differ in ways that broke the original client (lessons.md row 5): a 401 challenge, 202 with
Retry-After, PEM instead of base64 DER, a wrong content type, a CA chain that does not match.
This server speaks the protocol as the original client uses it and can be told, at runtime and
from any thread, to do each of those things, while it records every request for assertions.

Three CAs back it, written as PEM files under the caller's directory (reused if present):

* server TLS CA: signs this server's TLS cert (the client's `trusted_certs`);
* issuing CA: signs enrolled certs; by default an intermediate under a root, so `/cacerts`
  returns a real chain;
* bootstrap CA: signs bootstrap identities, accepted as TLS client certs for `simpleenroll`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hmac
import logging
import re
import textwrap
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from mockcloud import ca
from mockcloud.https import HttpRequest, HttpResponse, server_tls_context
from mockcloud.service import MockServer

log = logging.getLogger(__name__)

Mode = Literal[
    "unauthorized",
    "retry_after",
    "pem",
    "wrong_content_type",
    "broken_chain",
    "html_error",
    "slow",
    "refuse",
]
MODES: tuple[Mode, ...] = get_args(Mode)
AuthMethod = Literal["basic", "cert"]
Operation = Literal["simpleenroll", "simplereenroll", "cacerts"]
ClientCertIssuer = Literal["bootstrap", "issuing", "unknown"]

DEFAULT_BASE_PATH = "/.well-known/est"
REALM = "mockcloud-est"
DEFAULT_NOT_BEFORE = -300  # backdated, as a clock-skew-aware CA would
DEFAULT_NOT_AFTER = 30 * 86400

_ENROLL_CONTENT_TYPE = "application/pkcs7-mime; smime-type=certs-only"
_CACERTS_CONTENT_TYPE = "application/pkcs7-mime"
_OPERATIONS: tuple[Operation, ...] = ("simpleenroll", "simplereenroll", "cacerts")
# Who may authenticate with a TLS client cert, per operation. Re-enrollment is a renewal of a
# cert this server issued (RFC 7030 §4.2.2), so a bootstrap cert does not do there.
_CERT_ISSUERS: dict[Operation, frozenset[ClientCertIssuer]] = {
    "simpleenroll": frozenset({"bootstrap", "issuing"}),
    "simplereenroll": frozenset({"issuing"}),
    "cacerts": frozenset({"bootstrap", "issuing"}),
}
_HTML_ERROR = (
    "<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n"
    "<body><h1>Internal Server Error</h1><p>The upstream CA is unavailable.</p></body></html>\n"
)


@dataclass(frozen=True)
class Misbehaviour:
    """One way to misbehave. `count` is how many more requests it affects (None: until
    `behave`); each mode counts only the requests it actually changed."""

    mode: Mode
    count: int | None = None
    seconds: float = 1.0  # retry_after: the Retry-After value (whole seconds); slow: the delay
    content_type: str = "text/plain"  # wrong_content_type
    target: Literal["cacerts", "enroll"] = "cacerts"  # broken_chain: which answer is wrong


@dataclass(frozen=True)
class SeenRequest:
    """What a client sent, as the server understood it, and how it was answered."""

    method: str
    path: str
    operation: Operation | None  # None: not an EST path
    label: str | None
    headers: Mapping[str, str]  # lower-case names
    username: str | None  # from a basic Authorization header, right or wrong
    auth: frozenset[AuthMethod]  # methods that succeeded
    client_cert_subject: str | None  # RFC 4514
    client_cert_issuer: ClientCertIssuer | None
    csr_subject: str | None  # RFC 4514
    status: int
    misbehaviour: Mode | None  # the mode that shaped the answer, if one did
    issued: x509.Certificate | None


@dataclass
class _Exchange:
    """Collects a `SeenRequest` while a request is being answered."""

    operation: Operation | None = None
    label: str | None = None
    username: str | None = None
    auth: frozenset[AuthMethod] = frozenset()
    client_cert_subject: str | None = None
    client_cert_issuer: ClientCertIssuer | None = None
    csr_subject: str | None = None
    misbehaviour: Mode | None = None
    issued: x509.Certificate | None = None


class _Rejected(Exception):
    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(frozen=True)
class EstCas:
    """The CAs behind one EST server, and where their PEM files are."""

    server_ca: ca.CertificateAuthority
    root: ca.CertificateAuthority
    issuing: ca.CertificateAuthority
    bootstrap: ca.CertificateAuthority

    @classmethod
    def load_or_create(
        cls, directory: Path, *, intermediate: bool = True, key_type: ca.KeyType = "ec-p256"
    ) -> EstCas:
        """The CAs saved in `directory` if they are all there and fit together, else new ones
        (so a restarted demo server keeps the trust anchors its clients were configured with)."""
        try:
            cas = cls._load(directory)
        except (OSError, ValueError) as error:
            log.debug("new EST CAs in %s (%s)", directory, error)
        else:
            if (cas.root is not cas.issuing) == intermediate:
                return cas
        cas = cls._create(intermediate=intermediate, key_type=key_type)
        cas._save(directory)
        return cas

    @classmethod
    def _create(cls, *, intermediate: bool, key_type: ca.KeyType) -> EstCas:
        root = ca.CertificateAuthority.root("mockcloud EST root CA", key_type=key_type)
        issuing = (
            root.intermediate("mockcloud EST issuing CA", key_type=key_type)
            if intermediate
            else root
        )
        return cls(
            server_ca=ca.CertificateAuthority.root("mockcloud server CA", key_type=key_type),
            root=root,
            issuing=issuing,
            bootstrap=ca.CertificateAuthority.root("mockcloud bootstrap CA", key_type=key_type),
        )

    @classmethod
    def _load(cls, directory: Path) -> EstCas:
        root = ca.CertificateAuthority.load(directory, "est-root-ca")
        issuing = ca.CertificateAuthority.load(directory, "est-issuing-ca")
        if issuing.cert == root.cert:
            issuing = root
        elif not root.directly_issued(issuing.cert):
            raise ValueError("issuing CA not issued by root CA")
        return cls(
            server_ca=ca.CertificateAuthority.load(directory, "server-ca"),
            root=root,
            issuing=issuing,
            bootstrap=ca.CertificateAuthority.load(directory, "bootstrap-ca"),
        )

    def _save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.server_ca.save(directory, "server-ca")
        self.root.save(directory, "est-root-ca")
        self.issuing.save(directory, "est-issuing-ca")
        if not self.issuing.parents:
            ca.write_certs(directory / "est-issuing-ca-chain.pem", self.issuing.chain)
        self.bootstrap.save(directory, "bootstrap-ca")


class EstServer(MockServer[Misbehaviour, SeenRequest]):
    """An EST server on a background thread. See the module docstring for what it is for.

    `auth` names what `simpleenroll` (and `cacerts` with `cacerts_auth`) accepts: "basic"
    (the username/password) and/or "cert" (a TLS client cert from the bootstrap or issuing CA).
    One of them is enough unless `require_all`. By default: both if a username is given, else
    "cert". `auth=()` serves anyone. `simplereenroll` always needs a cert from the issuing CA.
    Validity offsets are seconds from the moment of issue.
    """

    title = "EST server"
    modes: tuple[str, ...] = MODES
    _log = log

    def __init__(
        self,
        directory: Path | str,
        *,
        username: str | None = None,
        password: str | None = None,
        auth: Iterable[AuthMethod] | None = None,
        require_all: bool = False,
        cacerts_auth: bool = False,
        check_reenroll_subject: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        base_path: str = DEFAULT_BASE_PATH,
        intermediate: bool = True,
        not_before: float = DEFAULT_NOT_BEFORE,
        not_after: float = DEFAULT_NOT_AFTER,
        key_type: ca.KeyType = "ec-p256",
    ) -> None:
        self.directory = Path(directory)
        methods = frozenset(auth) if auth is not None else None
        if methods is None:
            methods = frozenset({"basic", "cert"} if username is not None else {"cert"})
        if not methods <= {"basic", "cert"}:
            raise ValueError(f"unknown auth methods: {sorted(methods - {'basic', 'cert'})}")
        if "basic" in methods and (username is None or password is None):
            raise ValueError("basic auth needs a username and a password")
        self.username = username
        self.password = password
        self.auth: frozenset[AuthMethod] = methods
        self.require_all = require_all
        self.cacerts_auth = cacerts_auth
        self.check_reenroll_subject = check_reenroll_subject
        self.base_path = "/" + base_path.strip("/")

        self.cas = EstCas.load_or_create(
            self.directory, intermediate=intermediate, key_type=key_type
        )
        d = self.directory
        self.server_ca_pem_path = d / "server-ca.pem"
        self.root_ca_pem_path = d / "est-root-ca.pem"
        self.issuing_ca_pem_path = d / "est-issuing-ca.pem"
        self.issuing_chain_pem_path = d / "est-issuing-ca-chain.pem"
        self.bootstrap_ca_pem_path = d / "bootstrap-ca.pem"
        # What the TLS layer accepts as client certs; the HTTP layer then says which CA counts.
        self.client_ca_bundle_path = ca.write_certs(
            d / "client-ca-bundle.pem", [self.cas.bootstrap.cert, *self.cas.issuing.chain]
        )
        self.server_cert_pem_path, self.server_key_pem_path = self._write_server_identity(
            self.cas.server_ca, d, "server", "mockcloud EST server", (host,), key_type
        )
        # Same name as the issuing CA, other key: chains match by name and fail by signature.
        self._impostor = ca.CertificateAuthority.root(self.cas.issuing.cert.subject)

        self._validity = (float(not_before), float(not_after))
        tls = server_tls_context(
            str(self.server_cert_pem_path),
            str(self.server_key_pem_path),
            str(self.client_ca_bundle_path),
        )
        super().__init__(self._serve, tls, host=host, port=port, name="mockcloud-est")

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The EST base URL, without a trailing slash (the client adds one)."""
        return self.url_for(None)

    def url_for(self, label: str | None) -> str:
        """The base URL for an optional label (RFC 7030 §3.2.2)."""
        suffix = f"/{label}" if label else ""
        return f"https://{self.host}:{self.port}{self.base_path}{suffix}"

    # -- runtime control (any thread) ------------------------------------------------------

    def misbehave(
        self,
        mode: Mode,
        *,
        count: int | None = None,
        seconds: float = 1.0,
        content_type: str = "text/plain",
        target: Literal["cacerts", "enroll"] = "cacerts",
    ) -> None:
        """Start misbehaving in `mode` (replacing earlier settings of the same mode; other modes
        stay on). `refuse` closes the port until `behave()` and ignores `count`; `retry_after`
        affects only enroll requests, as RFC 7030 §4.2.3 defines it only for them."""
        self._misbehave(Misbehaviour(mode, count, seconds, content_type, target))

    def set_validity(
        self, *, not_before: float | None = None, not_after: float | None = None
    ) -> None:
        """Validity of certs issued from now on, in seconds from the moment of issue; e.g.
        (-90, 10) gives a cert 90% through its life."""
        with self._lock:
            nb, na = self._validity
            self._validity = (
                nb if not_before is None else float(not_before),
                na if not_after is None else float(not_after),
            )

    # -- client identities -----------------------------------------------------------------

    def make_bootstrap_identity(
        self, directory: Path | str, common_name: str, *, days: int = 365
    ) -> tuple[Path, Path]:
        """A bootstrap cert for a device, as an operator would provision one: `<cn>.pem` and
        `<cn>.key.pem` (PKCS#8) under `directory`."""
        return self.make_identity(directory, common_name, issuer="bootstrap", days=days)

    def make_identity(
        self,
        directory: Path | str,
        common_name: str,
        *,
        issuer: Literal["bootstrap", "issuing", "untrusted"] = "issuing",
        days: int = 365,
    ) -> tuple[Path, Path]:
        """A TLS client identity signed by one of the CAs (or by a look-alike of the issuing CA
        the TLS layer rejects). The cert file holds the leaf then any intermediates, the way a
        client sends them."""
        signer = {
            "bootstrap": self.cas.bootstrap,
            "issuing": self.cas.issuing,
            "untrusted": self._impostor,
        }[issuer]
        cert, key = signer.issue_leaf(common_name, days=days)
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", common_name)
        intermediates = signer.chain[:-1] if signer.parents else ()
        cert_path = ca.write_certs(target / f"{stem}.pem", [cert, *intermediates])
        key_path = ca.write_key(target / f"{stem}.key.pem", key)
        return cert_path, key_path

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, request: HttpRequest) -> HttpResponse:
        exchange = _Exchange()
        try:
            response = self._answer(request, exchange)
        except _Rejected as rejected:
            response = rejected.response
        seen = SeenRequest(
            method=request.method,
            path=request.path,
            headers=request.headers,
            status=response.status,
            # Not dataclasses.asdict: it would deep-copy the issued certificate.
            **{f.name: getattr(exchange, f.name) for f in dataclasses.fields(exchange)},
        )
        self._record(seen)
        log.info(
            "%s %s -> %d auth=%s user=%s cert=%s csr=%s%s",
            request.method,
            request.path,
            response.status,
            ",".join(sorted(seen.auth)) or "-",
            seen.username or "-",
            seen.client_cert_subject or "-",
            seen.csr_subject or "-",
            f" misbehaviour={seen.misbehaviour}" if seen.misbehaviour else "",
        )
        return response

    def _answer(self, request: HttpRequest, exchange: _Exchange) -> HttpResponse:
        operation, label = self._route(urlsplit(request.path).path)
        exchange.operation, exchange.label = operation, label
        if operation is None:
            return HttpResponse.text(404, "not an EST operation this server offers")
        method = "GET" if operation == "cacerts" else "POST"
        if request.method != method:
            return HttpResponse.text(405, f"{operation} takes {method}", allow=method)

        credentials = self._credentials(request, operation, exchange)

        if slow := self._take("slow", exchange):
            time.sleep(slow.seconds)
        if self._take("html_error", exchange):
            return HttpResponse(500, _HTML_ERROR.encode(), {"content-type": "text/html"})
        if self._take("unauthorized", exchange) or not self._authorized(operation, credentials):
            return self._challenge()

        if operation == "cacerts":
            broken = self._take("broken_chain", exchange, lambda m: m.target == "cacerts")
            chain = self._impostor.chain if broken else self.cas.issuing.chain
            return self._pkcs7(list(chain), _CACERTS_CONTENT_TYPE, exchange)

        csr = self._csr(request)
        exchange.csr_subject = csr.subject.rfc4514_string()
        if operation == "simplereenroll" and self.check_reenroll_subject:
            _check_same_subject(csr, request.client_cert)
        if retry := self._take("retry_after", exchange):
            return HttpResponse.text(
                202, "enrollment pending", **{"retry-after": str(int(retry.seconds))}
            )
        broken = self._take("broken_chain", exchange, lambda m: m.target == "enroll")
        cert = self._issue(csr, self._impostor if broken else self.cas.issuing)
        exchange.issued = cert
        return self._pkcs7([cert], _ENROLL_CONTENT_TYPE, exchange)

    def _route(self, path: str) -> tuple[Operation | None, str | None]:
        prefix = self.base_path + "/"
        if not path.startswith(prefix):
            return None, None
        parts = path[len(prefix) :].split("/")
        if len(parts) == 1 and parts[0] in _OPERATIONS:
            return parts[0], None  # type: ignore[return-value]
        if len(parts) == 2 and parts[0] and parts[1] in _OPERATIONS:
            return parts[1], parts[0]  # type: ignore[return-value]
        return None, None

    def _credentials(
        self, request: HttpRequest, operation: Operation, exchange: _Exchange
    ) -> frozenset[AuthMethod]:
        """Which auth methods the request satisfies for `operation` (recorded as it goes)."""
        satisfied: set[AuthMethod] = set()
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", None
            exchange.username = user
            if (
                self.username is not None
                and self.password is not None
                and password is not None
                and hmac.compare_digest(user.encode(), self.username.encode())
                and hmac.compare_digest(password.encode(), self.password.encode())
            ):
                satisfied.add("basic")
        cert = request.client_cert
        if cert is not None:
            issuer = self._issuer_of(cert)
            exchange.client_cert_subject = cert.subject.rfc4514_string()
            exchange.client_cert_issuer = issuer
            if issuer in _CERT_ISSUERS[operation]:
                satisfied.add("cert")
        exchange.auth = frozenset(satisfied)
        return exchange.auth

    def _issuer_of(self, cert: x509.Certificate) -> ClientCertIssuer:
        if self.cas.issuing.directly_issued(cert):
            return "issuing"
        if self.cas.bootstrap.directly_issued(cert):
            return "bootstrap"
        return "unknown"

    def _authorized(self, operation: Operation, satisfied: frozenset[AuthMethod]) -> bool:
        if operation == "cacerts" and not self.cacerts_auth:
            return True  # RFC 7030 §4.1.1: the CA certs are public
        if operation == "simplereenroll":
            if "cert" not in satisfied:
                return False
            return not (self.require_all and "basic" in self.auth) or "basic" in satisfied
        if not self.auth:
            return True
        if self.require_all:
            return self.auth <= satisfied
        return bool(self.auth & satisfied)

    def _challenge(self) -> HttpResponse:
        headers = {}
        if "basic" in self.auth:
            headers["www-authenticate"] = f'Basic realm="{REALM}"'
        return HttpResponse.text(401, "unauthorized", **headers)

    def _csr(self, request: HttpRequest) -> x509.CertificateSigningRequest:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/pkcs10":
            raise _Rejected(HttpResponse.text(415, "expected content-type application/pkcs10"))
        # RFC 8951: the body is base64 whatever content-transfer-encoding says; line breaks
        # and other whitespace are not part of it.
        text = b"".join(request.body.split())
        try:
            csr = x509.load_der_x509_csr(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError) as error:
            raise _Rejected(HttpResponse.text(400, f"not a base64 DER CSR: {error}")) from None
        if not csr.is_signature_valid:
            raise _Rejected(HttpResponse.text(400, "CSR signature does not verify"))
        return csr

    def _issue(
        self, csr: x509.CertificateSigningRequest, signer: ca.CertificateAuthority
    ) -> x509.Certificate:
        with self._lock:
            not_before, not_after = self._validity
        now = ca.now()
        return signer.issue_from_csr(
            csr,
            not_before=now + datetime.timedelta(seconds=not_before),
            not_after=now + datetime.timedelta(seconds=not_after),
        )

    def _pkcs7(
        self, certs: list[x509.Certificate], content_type: str, exchange: _Exchange
    ) -> HttpResponse:
        if wrong := self._take("wrong_content_type", exchange):
            content_type = wrong.content_type
        if self._take("pem", exchange):
            body = pkcs7.serialize_certificates(certs, Encoding.PEM)
            return HttpResponse(200, body, {"content-type": content_type})
        der = pkcs7.serialize_certificates(certs, Encoding.DER)
        body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64)) + "\n"
        return HttpResponse(
            200,
            body.encode(),
            {"content-type": content_type, "content-transfer-encoding": "base64"},
        )


def _check_same_subject(csr: x509.CertificateSigningRequest, cert: x509.Certificate | None) -> None:
    """RFC 7030 §4.2.2: a re-enrollment keeps the subject and subjectAltName of the cert it
    renews."""
    if cert is None or csr.subject == cert.subject and _san(csr) == _san(cert):
        return
    raise _Rejected(
        HttpResponse.text(
            400,
            f"CSR subject {csr.subject.rfc4514_string()!r} does not match the client cert "
            f"{cert.subject.rfc4514_string()!r}",
        )
    )


def _san(
    item: x509.Certificate | x509.CertificateSigningRequest,
) -> x509.SubjectAlternativeName | None:
    try:
        return item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
