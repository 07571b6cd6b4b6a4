"""certd's EST enrollment end to end: a real aziotd (keyd + certd) against mockcloud's RFC 7030
server over TLS on loopback, with basic auth, with a client cert whose key stays in keyd, and
with the bootstrap flow; renewal of the EST identity cert; every misbehaviour of the server.

Each failure must be a 500 `internal error` to the caller, nothing written to the store, and a
log line that says what the server did.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mockcloud.est import EstServer
from tests.certd_world import certs_of, make_csr, openssl_verify, start_certd
from tests.daemon import Daemon

USER, PASSWORD = "device-user", "s3cret pass"


def cert_file(daemon: Daemon, cert_id: str) -> Path:
    name = "".join(c for c in cert_id if c.isascii() and c.isalnum())
    digest = hashlib.sha256(cert_id.encode()).hexdigest()
    return daemon.services["certd"].home / "certs" / f"{name}-{digest}.cer"


def store_files(daemon: Daemon) -> dict[str, bytes]:
    folder = daemon.services["certd"].home / "certs"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def basic_config(server: EstServer, extra: str = "") -> str:
    return f"""
[preloaded_certs]
est-server-ca = "file://{server.server_ca_pem_path}"

[cert_issuance.device-id]
method = "est"

[cert_issuance.est]
trusted_certs = ["est-server-ca"]
username = "{USER}"
password = "{PASSWORD}"

[cert_issuance.est.urls]
default = "{server.url}"
{extra}"""


@pytest.fixture
def est_server(world_dir: Path) -> Iterator[EstServer]:
    server = EstServer(world_dir / "est", username=USER, password=PASSWORD, auth=("basic",))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def basic(world_dir: Path, est_server: EstServer) -> Iterator[Daemon]:
    daemon = start_certd(world_dir / "d", basic_config(est_server))
    yield daemon
    if daemon.process is not None:
        daemon.stop()


def enroll(daemon: Daemon, cert_id: str = "device-id", cn: str = "my-device"):
    csr, key = make_csr(cn)
    return daemon.request("certd", "POST", "/certificates", {"certId": cert_id, "csr": csr}), key


def test_enroll_with_basic_auth(basic: Daemon, est_server: EstServer, world_dir: Path) -> None:
    reply, key = enroll(basic)
    assert reply.status == 201, reply.body
    pem = reply.json()["pem"]
    chain = certs_of(pem)
    # The enrolled cert, then /cacerts: the issuing CA and its root.
    assert chain[0].subject.rfc4514_string() == "CN=my-device"
    assert chain[0].public_key() == key.public_key()
    ca_subjects = [c.subject for c in certs_of(est_server.issuing_chain_pem_path.read_text())]
    assert sorted(c.subject.rfc4514_string() for c in chain[1:]) == sorted(
        s.rfc4514_string() for s in ca_subjects
    )
    assert "leaf.pem: OK" in openssl_verify(
        est_server.root_ca_pem_path, chain, world_dir / "verify"
    )
    assert cert_file(basic, "device-id").read_text() == pem
    enrolls = [r for r in est_server.requests if r.operation == "simpleenroll"]
    assert len(enrolls) == 1
    seen = enrolls[0]
    assert seen.username == USER and "basic" in seen.auth
    assert seen.headers["content-type"] == "application/pkcs10"
    assert seen.headers["content-transfer-encoding"] == "base64"
    assert seen.client_cert_subject is None
    assert seen.csr_subject == "CN=my-device"
    assert any(r.operation == "cacerts" for r in est_server.requests)


def test_an_explicit_issuer_is_used_even_for_an_est_cert(basic: Daemon) -> None:
    # spec §4.3: the request's issuer wins over [cert_issuance.<id>] method = "est".
    reply = basic.request(
        "certd",
        "POST",
        "/certificates",
        {
            "certId": "device-id",
            "csr": make_csr("x")[0],
            "issuer": {"certId": "est-server-ca", "privateKeyHandle": "not-a-handle"},
        },
    )
    assert reply.status == 500  # the handle is not valid: local signing, not EST, failed
    assert not cert_file(basic, "device-id").exists()


@pytest.mark.parametrize(
    ("mode", "options", "logged"),
    [
        ("unauthorized", {}, "answered 401"),
        ("wrong_content_type", {"content_type": "text/plain"}, "content type 'text/plain'"),
        ("html_error", {}, "answered 500"),
        ("broken_chain", {"target": "cacerts"}, "but no CA cert it returned signed it"),
        ("broken_chain", {"target": "enroll"}, "but no CA cert it returned signed it"),
        ("retry_after", {"seconds": 3600}, "answered 202 (retry later)"),
        ("refuse", {}, "cannot connect to"),
    ],
)
def test_each_misbehaviour_is_a_500_that_stores_nothing_and_says_why(
    basic: Daemon, est_server: EstServer, mode: str, options: dict, logged: str
) -> None:
    before = store_files(basic)
    est_server.misbehave(mode, **options)
    reply, _ = enroll(basic)
    assert (reply.status, reply.json()) == (500, {"message": "internal error"})
    assert store_files(basic) == before
    assert logged in basic.logs()
    assert "cannot issue cert device-id" in basic.logs()
    # Back to normal, the same request works: nothing was left half-done.
    est_server.behave()
    reply, _ = enroll(basic)
    assert reply.status == 201, reply.body


def test_an_html_error_page_is_quoted_in_the_log(basic: Daemon, est_server: EstServer) -> None:
    est_server.misbehave("html_error")
    enroll(basic)
    line = next(line for line in basic.logs().splitlines() if "answered 500" in line)
    assert "<html" in line.lower()


def test_202_retry_after_is_waited_out_within_a_bound(basic: Daemon, est_server: EstServer) -> None:
    est_server.misbehave("retry_after", count=2, seconds=1)
    started = time.monotonic()
    reply, _ = enroll(basic)
    assert reply.status == 201, reply.body
    assert time.monotonic() - started >= 2
    answers = [r.status for r in est_server.requests if r.operation == "simpleenroll"]
    assert answers == [202, 202, 200]


def test_pkcs7_as_pem_is_accepted_as_the_original_does(
    basic: Daemon, est_server: EstServer
) -> None:
    est_server.misbehave("pem")
    reply, _ = enroll(basic)
    assert reply.status == 201, reply.body
    assert len(certs_of(reply.json()["pem"])) >= 2


def test_an_untrusted_server_cert_fails_tls(world_dir: Path, est_server: EstServer) -> None:
    config = basic_config(est_server).replace('trusted_certs = ["est-server-ca"]', "")
    daemon = start_certd(world_dir / "d", config)
    try:
        reply, _ = enroll(daemon)
        assert reply.status == 500
        assert "TLS with" in daemon.logs()
        assert store_files(daemon) == {}
        assert not any(r.operation == "simpleenroll" for r in est_server.requests)
    finally:
        daemon.stop()


def test_ssl_cert_file_is_trusted_like_openssl_default_paths(
    world_dir: Path, est_server: EstServer
) -> None:
    config = basic_config(est_server).replace('trusted_certs = ["est-server-ca"]', "")
    env = {"SSL_CERT_FILE": str(est_server.server_ca_pem_path)}
    daemon = start_certd(world_dir / "d", config, env=env)
    try:
        reply, _ = enroll(daemon)
        assert reply.status == 201, reply.body
    finally:
        daemon.stop()


def test_an_injected_est_fault_is_a_500_and_nothing_stored(
    world_dir: Path, est_server: EstServer
) -> None:
    daemon = start_certd(
        world_dir / "d", basic_config(est_server), env={"AZIOTD_FAULTS": "est.request=error*1"}
    )
    try:
        reply, _ = enroll(daemon)
        assert reply.status == 500
        assert store_files(daemon) == {}
        assert not est_server.requests
        reply, _ = enroll(daemon)
        assert reply.status == 201
    finally:
        daemon.stop()


def test_no_url_or_no_auth_is_a_500_naming_it(world_dir: Path, est_server: EstServer) -> None:
    config = "[cert_issuance.device-id]\nmethod = 'est'\n"
    daemon = start_certd(world_dir / "d", config)
    try:
        reply, _ = enroll(daemon)
        assert reply.status == 500
        assert "EST auth is not configured" in daemon.logs()
    finally:
        daemon.stop()


def test_cert_written_is_what_is_returned_after_a_restart(
    basic: Daemon, est_server: EstServer
) -> None:
    reply, _ = enroll(basic)
    basic.restart()
    again = basic.request("certd", "GET", "/certificates/device-id")
    assert again.json() == reply.json()
    leaf = x509.load_pem_x509_certificate(again.json()["pem"].encode())
    assert leaf.public_bytes(serialization.Encoding.PEM).decode() in reply.json()["pem"]
