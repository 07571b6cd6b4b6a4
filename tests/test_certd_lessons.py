"""certd against two field lessons (spec/lessons.md): EST servers that challenge for basic auth
(row 5) and clocks a little apart (row 14).

EST: the original sends `Authorization: Basic …` with the first request of both `simpleenroll`
and `cacerts`, never waiting for a 401 challenge, and fails at once on a 401; ours does the same,
and says in the log which URL refused which user. Local issuance: notBefore is dated back by
`not_before_margin_secs`, but never before the issuing CA's own notBefore, so a CA made a moment
ago still issues a chain that verifies now.
"""

from __future__ import annotations

import base64
import datetime
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mockcloud.est import REALM, EstServer
from tests.certd_world import certd_config, certs_of, make_csr, openssl_verify, start_certd
from tests.daemon import Daemon, ServiceDir, keyd_config
from tests.test_certd_est import PASSWORD, USER, basic_config, cert_file, enroll, store_files

UTC = datetime.UTC
EXPECTED_AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


# -- EST: basic auth and the 401 challenge ------------------------------------------------------


@pytest.fixture
def challenging(world_dir: Path) -> Iterator[EstServer]:
    """A server that answers 401 + `WWW-Authenticate: Basic` to any request without the right
    credentials, `cacerts` included."""
    server = EstServer(
        world_dir / "est", username=USER, password=PASSWORD, auth=("basic",), cacerts_auth=True
    )
    server.start()
    yield server
    server.stop()


def daemon_for(world_dir: Path, server: EstServer, password: str = PASSWORD) -> Daemon:
    config = basic_config(server).replace(f'password = "{PASSWORD}"', f'password = "{password}"')
    return start_certd(world_dir / "d", config)


def test_the_server_really_challenges_a_request_without_credentials(
    challenging: EstServer,
) -> None:
    # The premise of the tests below: without credentials this server answers the challenge.
    context = ssl.create_default_context(cafile=str(challenging.server_ca_pem_path))
    with httpx.Client(verify=context) as client:
        reply = client.get(challenging.url + "/cacerts")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == f'Basic realm="{REALM}"'


def test_basic_auth_goes_with_the_first_request_of_each_operation(
    world_dir: Path, challenging: EstServer
) -> None:
    daemon = daemon_for(world_dir, challenging)
    try:
        reply, key = enroll(daemon)
        assert reply.status == 201, reply.body
        chain = certs_of(reply.json()["pem"])
        assert chain[0].public_key() == key.public_key()
        assert cert_file(daemon, "device-id").read_text() == reply.json()["pem"]
    finally:
        daemon.stop()
    seen = challenging.requests
    # One request per operation, each already carrying the credentials: no 401 round trip.
    assert sorted((r.operation, r.status) for r in seen) == [
        ("cacerts", 200),
        ("simpleenroll", 200),
    ]
    for request in seen:
        assert request.headers["authorization"] == EXPECTED_AUTHORIZATION
        assert request.username == USER and request.auth == frozenset({"basic"})


def test_a_refused_password_is_a_500_naming_the_url_and_storing_nothing(
    world_dir: Path, challenging: EstServer
) -> None:
    wrong = "not the password"
    daemon = daemon_for(world_dir, challenging, password=wrong)
    try:
        before = store_files(daemon)
        reply, _ = enroll(daemon)
        assert (reply.status, reply.json()) == (500, {"message": "internal error"})
        assert store_files(daemon) == before
        assert not cert_file(daemon, "device-id").exists()
        logs = daemon.logs()
    finally:
        daemon.stop()
    line = next(line for line in logs.splitlines() if "answered 401" in line)
    assert "cannot issue cert device-id" in line
    assert f"{challenging.url}/simpleenroll" in line
    assert "the credentials were refused" in line
    assert f"basic auth as user {USER!r}" in line
    assert f'Basic realm="{REALM}"' in line
    assert wrong not in logs and PASSWORD not in logs
    # As the original: the same credentials are not sent again after the 401.
    enrolls = [r for r in challenging.requests if r.operation == "simpleenroll"]
    assert [(r.status, r.username) for r in enrolls] == [(401, USER)]
    assert enrolls[0].headers["authorization"] == (
        "Basic " + base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    )


def test_a_one_off_challenge_fails_that_request_and_the_next_one_succeeds(
    world_dir: Path, challenging: EstServer
) -> None:
    daemon = daemon_for(world_dir, challenging)
    try:
        challenging.misbehave("unauthorized", count=1)
        reply, _ = enroll(daemon)
        assert reply.status == 500
        assert not cert_file(daemon, "device-id").exists()
        assert "answered 401 Unauthorized: the credentials were refused" in daemon.logs()
        reply, _ = enroll(daemon)
        assert reply.status == 201, reply.body
        assert cert_file(daemon, "device-id").read_text() == reply.json()["pem"]
    finally:
        daemon.stop()
    answers = [r.status for r in challenging.requests if r.operation == "simpleenroll"]
    assert answers == [401, 200]


# -- local issuance and clock skew -------------------------------------------------------------


def make_ca(folder: Path, not_before: datetime.datetime) -> tuple[x509.Certificate, Path, Path]:
    """A self-signed CA valid from `not_before`: its cert and PKCS#8 key files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fresh Local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = folder / "ca.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "ca.key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, cert_path, key_path


def start_local_ca(
    world_dir: Path, ca_not_before: datetime.datetime, margin: int | None = None
) -> tuple[Daemon, x509.Certificate, Path]:
    ca, ca_path, key_path = make_ca(world_dir / "ca", ca_not_before)

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\nlocal-ca = "file://{key_path}"\n'

    top = "" if margin is None else f"not_before_margin_secs = {margin}\n"
    certd = f"""{top}
[preloaded_certs]
local-ca = "file://{ca_path}"

[cert_issuance]
local_ca = {{ cert = "local-ca", pk = "local-ca" }}
module-server = {{ method = "local_ca", expiry_days = 10 }}
"""
    daemon = Daemon(world_dir / "d", {"keyd": keyd, "certd": certd_config(certd)}).start()
    return daemon, ca, ca_path


def issue_leaf(
    daemon: Daemon,
) -> tuple[list[x509.Certificate], datetime.datetime, datetime.datetime]:
    """The issued chain, and the wall-clock times (whole seconds) around the request."""
    before = datetime.datetime.now(UTC).replace(microsecond=0)
    csr, _ = make_csr("module")
    reply = daemon.request(
        "certd", "POST", "/certificates", {"certId": "module-server", "csr": csr}
    )
    after = datetime.datetime.now(UTC)
    assert reply.status == 201, reply.body
    return certs_of(reply.json()["pem"]), before, after


def verify_at(
    ca_path: Path, chain: list[x509.Certificate], work: Path, when: datetime.datetime
) -> subprocess.CompletedProcess[str]:
    work.mkdir(parents=True, exist_ok=True)
    leaf = work / "leaf.pem"
    leaf.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-attime",
            str(int(when.timestamp())),
            "-CAfile",
            str(ca_path),
            str(leaf),
        ],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(("margin", "expected"), [(None, 300), (60, 60), (0, 0)])
def test_local_issuance_dates_not_before_back_by_the_margin(
    world_dir: Path, margin: int | None, expected: int
) -> None:
    day_old = datetime.datetime.now(UTC) - datetime.timedelta(days=1)
    daemon, ca, ca_path = start_local_ca(world_dir, day_old, margin)
    try:
        chain, before, after = issue_leaf(daemon)
    finally:
        daemon.stop()
    leaf = chain[0]
    back = datetime.timedelta(seconds=expected)
    assert before - back <= leaf.not_valid_before_utc <= after - back
    assert "leaf.pem: OK" in openssl_verify(ca_path, chain, world_dir / "verify")
    # A verifier whose clock is behind by less than the margin still accepts the cert.
    if expected:
        lagging = after - back + datetime.timedelta(seconds=2)
        assert verify_at(ca_path, chain, world_dir / "lag", lagging).returncode == 0


def test_a_fresh_ca_never_issues_a_leaf_valid_before_itself(world_dir: Path) -> None:
    # The CA was made 20 s ago: now - 300 s would precede it.
    fresh = (datetime.datetime.now(UTC) - datetime.timedelta(seconds=20)).replace(microsecond=0)
    daemon, ca, ca_path = start_local_ca(world_dir, fresh)
    try:
        chain, _, _ = issue_leaf(daemon)
    finally:
        daemon.stop()
    leaf = chain[0]
    assert chain[1] == ca
    assert leaf.not_valid_before_utc == ca.not_valid_before_utc
    assert "leaf.pem: OK" in openssl_verify(ca_path, chain, world_dir / "verify")
    # The chain is valid from the CA's first second on, and neither is before it.
    assert verify_at(ca_path, chain, world_dir / "first", fresh).returncode == 0
    early = verify_at(ca_path, chain, world_dir / "early", fresh - datetime.timedelta(seconds=2))
    assert early.returncode != 0 and "not yet valid" in early.stdout + early.stderr


def test_a_ca_dated_in_the_future_issues_from_now_as_the_original(world_dir: Path) -> None:
    # The CA came from a host whose clock is ahead: the original dates the leaf now, not later.
    ahead = (datetime.datetime.now(UTC) + datetime.timedelta(minutes=10)).replace(microsecond=0)
    daemon, ca, ca_path = start_local_ca(world_dir, ahead)
    try:
        chain, before, after = issue_leaf(daemon)
    finally:
        daemon.stop()
    leaf = chain[0]
    assert before <= leaf.not_valid_before_utc <= after
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    # Not valid now (its CA is not), valid once the CA is.
    assert verify_at(ca_path, chain, world_dir / "now", after).returncode != 0
    assert verify_at(ca_path, chain, world_dir / "later", ahead).returncode == 0
