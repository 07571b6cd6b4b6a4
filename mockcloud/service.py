"""What the DPS and IoT Hub doubles share: a server CA and TLS set-up with client certs trusted
at runtime, request records, and misbehaviours switched on and off from any thread.

TLS client certs: Python's `ssl` cannot ask for a client cert without also verifying it, so a
client cert must chain to something in `TrustStore` or the handshake fails (the real services
accept any cert at the TLS layer and answer 401 later). Enrollment CAs and device certs are added
to the trust store when they are enrolled; `trust()` adds a cert that should reach the HTTP layer
and be refused there (401) rather than in the handshake. Partial chains are allowed, so an
intermediate CA is a trust anchor by itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, Self, TypeVar
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from mockcloud import ca
from mockcloud.https import (
    App,
    HttpRequest,
    HttpResponse,
    HttpsServer,
    Lifecycle,
    server_tls_context,
)

log = logging.getLogger(__name__)

Service = Literal["dps", "hub"]
JSON_TYPE = "application/json; charset=utf-8"

# Modes both doubles know. `refuse`: the port is closed until `behave()`. `slow`: each answer
# waits `seconds`. `throttle`: 429 with `Retry-After: <seconds>`. `error`: `status` (500) with the
# service's error body. `empty_error`: `status` (500) with no body. `unauthorized`: 401 even for
# good credentials.
COMMON_MODES = ("refuse", "slow", "throttle", "error", "empty_error", "unauthorized")


@dataclass(frozen=True)
class Misbehaviour:
    """One way to misbehave. `count`: how many more requests it affects (None: until
    `behave`)."""

    mode: str
    count: int | None = None
    seconds: float = 1.0  # slow: the delay; throttle: the Retry-After value (whole seconds)
    status: int = 500  # error, empty_error


@dataclass(frozen=True)
class SeenRequest:
    """What a client sent, as the double understood it, and how it was answered."""

    service: Service
    method: str
    path: str  # without the query
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: Any  # parsed JSON, or None (empty or not JSON: see raw_body)
    raw_body: bytes
    client_cert_subject: str | None  # RFC 4514
    auth: Literal["sas", "x509", "tpm-challenge"] | None  # what authenticated the request
    identity: str | None  # registration id, device id or "<device>/<module>" it acted as
    status: int
    answer: Any  # the JSON answer, or None
    error: str | None  # why it was refused, if it was
    misbehaviour: str | None  # the mode that shaped the answer, if one did


class Rejected(Exception):
    def __init__(self, response: HttpResponse, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


@dataclass
class Exchange:
    """Collects a `SeenRequest` while a request is answered."""

    auth: Literal["sas", "x509", "tpm-challenge"] | None = None
    identity: str | None = None
    error: str | None = None
    misbehaviour: str | None = None


@dataclass(frozen=True)
class Call:
    """A request as the doubles read it."""

    request: HttpRequest
    path: str  # without the query
    query: Mapping[str, str]
    body: Any  # parsed JSON, or None


def json_response(status: int, body: Any, **headers: str) -> HttpResponse:
    return HttpResponse(status, json.dumps(body).encode(), {"content-type": JSON_TYPE, **headers})


def utc_now_iso() -> str:
    """`2024-05-01T12:00:00.1234567Z`, the form Azure services write."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}0Z"


def tracking_id() -> str:
    return str(uuid.uuid4())


class TrustStore:
    """Certs trusted for TLS client auth, applied to every attached TLS context, even live ones
    (OpenSSL reads a context's store at each handshake)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._certs: dict[bytes, x509.Certificate] = {}
        self._contexts: list[ssl.SSLContext] = []

    def add(self, cert: x509.Certificate) -> None:
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        with self._lock:
            fingerprint = cert.fingerprint(_SHA256)
            if fingerprint in self._certs:
                return
            self._certs[fingerprint] = cert
            for context in self._contexts:
                context.load_verify_locations(cadata=pem)

    def attach(self, context: ssl.SSLContext) -> None:
        with self._lock:
            self._contexts.append(context)
            for cert in self._certs.values():
                context.load_verify_locations(
                    cadata=cert.public_bytes(serialization.Encoding.PEM).decode()
                )

    @property
    def certs(self) -> list[x509.Certificate]:
        with self._lock:
            return list(self._certs.values())


_SHA256 = hashes.SHA256()


def load_or_create_server_ca(directory: Path) -> ca.CertificateAuthority:
    """`server-ca.pem` / `server-ca.key.pem` in `directory` (shared with an EST server using the
    same directory), created if absent."""
    try:
        return ca.CertificateAuthority.load(directory, "server-ca")
    except (OSError, ValueError):
        authority = ca.CertificateAuthority.root("mockcloud server CA")
        directory.mkdir(parents=True, exist_ok=True)
        authority.save(directory, "server-ca")
        return authority


def client_tls_server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """TLS 1.2+ server context asking every client for a cert (optional), trusting only what a
    `TrustStore` adds, partial chains allowed."""
    context = server_tls_context(str(cert_path), str(key_path))
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


class _Switch(Protocol):
    """What `MockServer` needs of a misbehaviour: its mode and how many more requests."""

    @property
    def mode(self) -> str: ...

    @property
    def count(self) -> int | None: ...


class _Shaped(Protocol):
    """What `MockServer` needs of an exchange: where to note the misbehaviour that shaped it."""

    misbehaviour: Any


SwitchT = TypeVar("SwitchT", bound=_Switch)
SeenT = TypeVar("SeenT")


class MockServer(Lifecycle, Generic[SwitchT, SeenT]):
    """Base of every mock cloud server (EST, DPS, IoT Hub): an `HttpsServer` on a background
    thread, misbehaviours switched on and off from any thread, and request records.

    Subclasses set `title` (for logs) and `modes`, give their public `misbehave` its options
    and call `_misbehave`, consult `_take` while answering, and `_record` what they saw."""

    title: str = "mock server"
    modes: tuple[str, ...] = ()
    _log: logging.Logger = log

    def __init__(self, app: App, tls: ssl.SSLContext, *, host: str, port: int, name: str) -> None:
        self.host = host
        self._lock = threading.RLock()
        self._modes: dict[str, SwitchT] = {}
        self._seen: list[SeenT] = []
        self._http = HttpsServer(app, tls, host=host, port=port, name=name)

    @staticmethod
    def _write_server_identity(
        server_ca: ca.CertificateAuthority,
        directory: Path,
        stem: str,
        common_name: str,
        hosts: Iterable[str],
        key_type: ca.KeyType = "ec-p256",
    ) -> tuple[Path, Path]:
        """A TLS server cert for `hosts` (and 127.0.0.1, localhost) and its key, as
        `<stem>.pem` and `<stem>.key.pem` under `directory`. Remade on every start-up so it
        always names the current hosts."""
        cert, key = server_ca.issue_leaf(
            common_name,
            client=False,
            server_hosts=sorted({"127.0.0.1", "localhost", *hosts}),
            key_type=key_type,
        )
        return (
            ca.write_certs(directory / f"{stem}.pem", [cert]),
            ca.write_key(directory / f"{stem}.key.pem", key),
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        self._http.start()
        self._log.info("%s at %s", self.title, self.url)
        return self

    def stop(self) -> None:
        self._http.stop()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        """`https://<host>:<port>` (no trailing slash)."""
        return f"https://{self.host}:{self.port}"

    # -- misbehaviour (any thread) ---------------------------------------------------------

    def _misbehave(self, misbehaviour: SwitchT) -> None:
        """Start `misbehaviour` (replacing an earlier setting of its mode; other modes stay
        on). `refuse` closes the port until `behave()` and ignores `count`."""
        mode, count = misbehaviour.mode, misbehaviour.count
        if mode not in self.modes:
            raise ValueError(f"unknown misbehaviour {mode!r}; one of {', '.join(self.modes)}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        if mode == "refuse":
            self._http.pause()
        with self._lock:
            self._modes[mode] = misbehaviour
        self._log.info("%s misbehaves: %s (count=%s)", self.title, mode, count)

    def behave(self, mode: str | None = None) -> None:
        """Stop misbehaving in `mode`, or in every mode."""
        with self._lock:
            dropped = [mode] if mode is not None else list(self._modes)
            for each in dropped:
                self._modes.pop(each, None)
        if "refuse" in dropped and self._http.started and not self._http.listening:
            self._http.resume()
        self._log.info("%s behaves again (%s)", self.title, mode or "all modes")

    @property
    def misbehaviours(self) -> dict[str, SwitchT]:
        with self._lock:
            return dict(self._modes)

    def _take(
        self,
        mode: str,
        exchange: _Shaped | None = None,
        applies: Callable[[SwitchT], bool] | None = None,
    ) -> SwitchT | None:
        """The misbehaviour `mode` if it is on (and `applies` to it), using up one of its
        count; noted in `exchange` as what shaped the answer."""
        with self._lock:
            current = self._modes.get(mode)
            if current is None or (applies is not None and not applies(current)):
                return None
            if current.count is not None:
                if current.count <= 1:
                    del self._modes[mode]
                else:
                    self._modes[mode] = dataclasses.replace(  # type: ignore[type-var]
                        current, count=current.count - 1
                    )
        if exchange is not None:
            exchange.misbehaviour = mode
        return current

    # -- records ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[SeenT]:
        """Every request seen so far, oldest first (a copy)."""
        with self._lock:
            return list(self._seen)

    def clear_requests(self) -> None:
        with self._lock:
            self._seen.clear()

    def _record(self, seen: SeenT) -> None:
        with self._lock:
            self._seen.append(seen)


class MockService(MockServer[Misbehaviour, SeenRequest]):
    """Base of `DpsServer` and `HubServer`: TLS with a runtime trust store, the common
    misbehaviours, JSON request records. Subclasses implement `_answer` and the service's error
    bodies."""

    service: Service
    modes: tuple[str, ...] = COMMON_MODES

    def __init__(
        self,
        directory: Path | str,
        *,
        host: str,
        port: int,
        trust: TrustStore | None,
        server_hosts: tuple[str, ...] = (),
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.trust = trust if trust is not None else TrustStore()
        self.server_ca = load_or_create_server_ca(self.directory)
        self.server_ca_pem_path = self.directory / "server-ca.pem"
        self.server_cert_pem_path, self.server_key_pem_path = self._write_server_identity(
            self.server_ca,
            self.directory,
            f"{self.service}-server",
            f"mockcloud {self.service} server",
            (host, *server_hosts),
        )
        self._tls = client_tls_server_context(self.server_cert_pem_path, self.server_key_pem_path)
        self.trust.attach(self._tls)
        self.title = f"{self.service} double"
        super().__init__(
            self._serve, self._tls, host=host, port=port, name=f"mockcloud-{self.service}"
        )

    def trust_client_cert(self, cert: x509.Certificate) -> None:
        """Let `cert` (a CA or a leaf) through the TLS handshake, so the HTTP layer decides."""
        self.trust.add(cert)

    def misbehave(
        self, mode: str, *, count: int | None = None, seconds: float = 1.0, status: int = 500
    ) -> None:
        """Start misbehaving in `mode` (replacing an earlier setting of that mode; other modes
        stay on). `refuse` closes the port until `behave()` and ignores `count`."""
        self._misbehave(Misbehaviour(mode, count, seconds, status))

    # -- serving ---------------------------------------------------------------------------

    def _serve(self, request: HttpRequest) -> HttpResponse:
        exchange = Exchange()
        split = urlsplit(request.path)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        body: Any = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError:
                body = None
        try:
            call = Call(request, split.path, query, body)
            response = self._common(request, exchange) or self._answer(call, exchange)
        except Rejected as rejected:
            response = rejected.response
            exchange.error = rejected.reason
        answer: Any = None
        if response.body and response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            answer = json.loads(response.body)
        cert = request.client_cert
        seen = SeenRequest(
            service=self.service,
            method=request.method,
            path=split.path,
            query=query,
            headers=request.headers,
            body=body,
            raw_body=request.body,
            client_cert_subject=cert.subject.rfc4514_string() if cert is not None else None,
            auth=exchange.auth,
            identity=exchange.identity,
            status=response.status,
            answer=answer,
            error=exchange.error,
            misbehaviour=exchange.misbehaviour,
        )
        self._record(seen)
        log.info(
            "%s %s %s -> %d%s%s",
            self.service,
            request.method,
            request.path,
            response.status,
            f" as {exchange.identity}" if exchange.identity else "",
            f" ({exchange.error})" if exchange.error else "",
        )
        return response

    def _common(self, request: HttpRequest, exchange: Exchange) -> HttpResponse | None:
        """Answers the common misbehaviours impose before the service looks at the request."""
        if slow := self._take("slow", exchange):
            time.sleep(slow.seconds)
        if throttle := self._take("throttle", exchange):
            seconds = str(max(0, int(throttle.seconds)))
            return self._error(429, "throttled", "Requests are being throttled.", seconds)
        if error := self._take("error", exchange):
            return self._error(error.status, "error", "The service failed (mock).")
        if empty := self._take("empty_error", exchange):
            return HttpResponse(empty.status, b"")
        if self._take("unauthorized", exchange):
            exchange.error = "unauthorized (misbehaviour)"
            return self._error(401, "unauthorized", "Unauthorized")
        return None

    def _answer(self, call: Call, exchange: Exchange) -> HttpResponse:
        raise NotImplementedError

    def _error(
        self, status: int, kind: str, message: str, retry_after: str | None = None
    ) -> HttpResponse:
        """The service's error answer. `kind` is one of the keys of the subclass's table."""
        raise NotImplementedError

    def _reject(self, status: int, kind: str, message: str) -> Rejected:
        return Rejected(self._error(status, kind, message), message)


def cert_thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 thumbprint, uppercase hex: the form IoT Hub and DPS show."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key signed `cert` (names alone are not trusted)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
