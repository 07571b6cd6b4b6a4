"""EST client (RFC 7030) as the original speaks it: `/simpleenroll` and `/cacerts`, plus
`/simplereenroll` for renewals, which the original never uses.

Wire format (spec/provisioning.md §15.2): the CSR as base64 DER in 64-character lines,
`content-type: application/pkcs10`, `content-transfer-encoding: base64`, optional basic auth;
answers must be 200 `application/pkcs7-mime` holding a certs-only PKCS#7, as PEM or base64 DER.
The result is the enrolled cert(s) followed by the CA certs.

Basic auth is sent with the first request of each operation, never only after a 401 challenge,
as the original does; a 401 is final (retrying the same credentials cannot change the answer),
and its error says which credentials were refused and what the server asked for.

Where the original fails at once, this client waits out a `202` + `Retry-After` (RFC 7030
§4.2.3) within a bound, and every other surprise (a status, a content type, PEM where base64
was due, a body that is an HTML error page, a cert for another key, a chain whose CA is not the
enrolled cert's issuer) fails with an `EstError` whose message says what the server sent, for
the log line that an operator reads.

The calls are synchronous: they run in a worker thread, because a TLS client certificate whose
key is in the Keys Service signs inside the handshake (spec/tls-client-keys.md), and that
signature is a request to the trio loop, which must stay free to serve it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

PKCS7_MIME = "application/pkcs7-mime"
REQUEST_TIMEOUT = 20.0  # seconds per request; below the 30 s a certd caller waits
MAX_RETRY_WAIT = 15.0  # seconds spent waiting out 202 + Retry-After, in all
SHOWN_BODY = 160  # characters of an unexpected body quoted in the error


class EstError(Exception):
    """Enrollment failed; the message says what the server did (or that it was unreachable).
    `status` is the HTTP status the server answered, when it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class EstRequest:
    url: str
    csr_der: bytes
    context: ssl.SSLContext
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    reenroll: bool = False


def wrapped_base64(data: bytes) -> bytes:
    """Base64 in 64-character lines, each ending in `\\n`, as the original sends CSRs."""
    text = base64.b64encode(data)
    return b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))


def _shown(body: bytes) -> str:
    text = body[:SHOWN_BODY].decode("utf-8", "replace")
    text = " ".join(text.split())
    more = f" … ({len(body)} bytes)" if len(body) > SHOWN_BODY else ""
    return repr(text) + more


def parse_pkcs7(body: bytes, what: str) -> list[x509.Certificate]:
    """The certs of a certs-only PKCS#7 body: PEM (which the original accepts too) or base64
    DER (what RFC 7030 prescribes)."""
    if b"-----BEGIN" in body:
        log.warning("%s: PKCS#7 as PEM, where RFC 7030 says base64 DER; accepted", what)
        try:
            return pkcs7.load_pem_pkcs7_certificates(body)
        except ValueError as error:
            raise EstError(f"{what}: the PEM body is not a PKCS#7 with certs ({error})") from None
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise EstError(f"{what}: the body is neither base64 nor PEM: {_shown(body)}") from None
    try:
        return pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as error:
        raise EstError(
            f"{what}: the base64 body does not decode to a PKCS#7 with certs ({error}): "
            f"{_shown(body)}"
        ) from None


class EstClient:
    """One enrollment at a time per call; `sleep` and `clock` are injectable for tests."""

    def __init__(
        self,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sleep = sleep
        self._clock = clock

    def enroll(self, request: EstRequest) -> list[x509.Certificate]:
        """The enrolled cert(s) followed by the CA certs, each in the order the server sent."""
        import httpx  # here: it costs ~70 ms at start, and only EST needs it

        from aziot.actors import proxy  # imports httpx too

        base = request.url if request.url.endswith("/") else request.url + "/"
        operation = "simplereenroll" if request.reenroll else "simpleenroll"
        body = wrapped_base64(request.csr_der)
        common: dict[str, str] = {}
        if request.username is not None and request.password is not None:
            common["authorization"] = basic_authorization(request.username, request.password)
        headers = {
            **common,
            "content-type": "application/pkcs10",
            "content-transfer-encoding": "base64",
        }
        user = request.username if "authorization" in common else None
        try:
            proxy_url = proxy.proxy_from_env(os.environ)
        except proxy.UnusableProxy as error:
            raise EstError(f"EST {operation}: {error}") from None
        through = None if proxy_url is None else proxy.httpx_proxy(proxy_url, request.context)
        with httpx.Client(
            verify=request.context,
            proxy=through,
            trust_env=False,  # the proxy as the original reads it, not httpx's rules
            timeout=REQUEST_TIMEOUT,
        ) as client:
            enrolled = self._certs(
                client, "POST", base + operation, body, headers, f"EST {operation}", user
            )
            ca_certs = self._certs(
                client, "GET", base + "cacerts", None, common, "EST cacerts", user
            )
        csr = x509.load_der_x509_csr(request.csr_der)
        check_enrolled(enrolled, ca_certs, csr.public_key(), base)
        return enrolled + ca_certs

    def _certs(
        self,
        client: httpx.Client,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        what: str,
        user: str | None,
    ) -> list[x509.Certificate]:
        waited = 0.0
        while True:
            response = self._send(client, method, url, body, headers, what)
            if response.status_code != 202:
                break
            delay = retry_after(response.headers.get("retry-after"))
            if delay is None or waited + delay > MAX_RETRY_WAIT:
                raise EstError(
                    f"{what}: {url} answered 202 (retry later) with Retry-After "
                    f"{response.headers.get('retry-after')!r}; gave up after waiting "
                    f"{waited:g} s of at most {MAX_RETRY_WAIT:g} s"
                )
            log.info("%s: %s answered 202; retrying in %g s", what, url, delay)
            self._sleep(delay)
            waited += delay
        content_type = response.headers.get("content-type", "")
        if response.status_code == 401:
            raise refused(what, url, response, user)
        if response.status_code != 200:
            raise EstError(
                f"{what}: {url} answered {response.status_code} {response.reason_phrase} "
                f"({content_type or 'no content type'}): {_shown(response.content)}",
                response.status_code,
            )
        media = content_type.split(";", 1)[0].strip().lower()
        if media != PKCS7_MIME:
            raise EstError(
                f"{what}: {url} answered 200 with content type {content_type!r}, expected "
                f"{PKCS7_MIME}: {_shown(response.content)}"
            )
        certs = parse_pkcs7(response.content, f"{what} from {url}")
        if not certs:
            raise EstError(f"{what}: {url} answered a PKCS#7 without certificates")
        return certs

    @staticmethod
    def _send(
        client: httpx.Client,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        what: str,
    ) -> httpx.Response:
        import httpx

        try:
            return client.request(method, url, content=body, headers=headers)
        except httpx.ConnectError as error:
            cause = error.__cause__ or error.__context__ or error
            if isinstance(cause, ssl.SSLError) or "SSL" in str(error):
                raise EstError(f"{what}: TLS with {url} failed: {error}") from None
            raise EstError(f"{what}: cannot connect to {url}: {error}") from None
        except httpx.TimeoutException as error:
            raise EstError(
                f"{what}: {url} did not answer within {REQUEST_TIMEOUT:g} s "
                f"({type(error).__name__})"
            ) from None
        except httpx.HTTPError as error:
            raise EstError(f"{what}: {url}: {type(error).__name__}: {error}") from None


def basic_authorization(username: str, password: str) -> str:
    """The `Authorization` value for basic auth: base64 of `username:password` in UTF-8."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def refused(what: str, url: str, response: httpx.Response, user: str | None) -> EstError:
    """The error for a 401: which credentials were offered and what the server asks for, so an
    operator can tell a wrong password from a missing one (never the password itself)."""
    if user is not None:
        offered = f"basic auth as user {user!r}, sent with the request"
    else:
        offered = "no username/password is configured; only a TLS client cert, if any, was offered"
    challenge = response.headers.get("www-authenticate")
    asked = f"it asks for {challenge!r}" if challenge else "it sent no WWW-Authenticate challenge"
    return EstError(
        f"{what}: {url} answered 401 Unauthorized: the credentials were refused ({offered}); "
        f"{asked}: {_shown(response.content)}",
        401,
    )


def retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` of delta-seconds; None when absent or an HTTP date (a
    server that says "come back tomorrow" is not waited for inside a request)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(int(value.strip()))


def check_enrolled(
    enrolled: list[x509.Certificate],
    ca_certs: list[x509.Certificate],
    public_key: object,
    url: str,
) -> None:
    """The enrolled cert is for the CSR's key and its issuer is among the certs returned."""
    leaf = enrolled[0]
    if leaf.public_key() != public_key:
        raise EstError(
            f"EST simpleenroll: {url} returned a cert for another key than the CSR's "
            f"(subject {leaf.subject.rfc4514_string()!r})"
        )
    pool = enrolled[1:] + ca_certs
    for candidate in pool:
        if candidate.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, Exception):
            continue
        return
    subjects = ", ".join(repr(c.subject.rfc4514_string()) for c in pool) or "none"
    raise EstError(
        f"EST: {url} returned a cert issued by {leaf.issuer.rfc4514_string()!r}, but no CA "
        f"cert it returned signed it (CA certs: {subjects})"
    )


def to_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
