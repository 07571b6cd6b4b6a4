"""certd's EST enrollment end to end: a real aziotd (keyd + certd) against mockcloud's RFC 7030
server over TLS on loopback, with basic auth, with a client cert whose key stays in keyd, and
with the bootstrap flow; renewal of the EST identity cert; every misbehaviour of the server.

Each failure must be a 500 `internal error` to the caller, nothing written to the store, and a
log line that says what the server did.
"""

from __future__ import annotations

import hashlib
import re
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


# -- TLS client certificates whose key stays in keyd: the bootstrap flow, renewal ----------------


def x509_config(server: EstServer, boot_cert: Path, extra: str = "") -> str:
    return f"""
[preloaded_certs]
est-server-ca = "file://{server.server_ca_pem_path}"
bootstrap = "file://{boot_cert}"

[cert_issuance.device-id]
method = "est"

[cert_issuance.est]
trusted_certs = ["est-server-ca"]
identity_cert = "est-id"
identity_pk = "est-id"
bootstrap_identity_cert = "bootstrap"
bootstrap_identity_pk = "bootstrap"
{extra}
[cert_issuance.est.urls]
default = "{server.url}"
"""


@pytest.fixture
def cert_server(world_dir: Path) -> Iterator[EstServer]:
    server = EstServer(world_dir / "est", auth=("cert",))
    server.start()
    yield server
    server.stop()


def start_x509(
    world_dir: Path, server: EstServer, extra: str = "", **options
) -> tuple[Daemon, Path]:
    boot_cert, boot_key = server.make_bootstrap_identity(world_dir / "boot", "bootstrap-device")
    keyd_extra = f'[preloaded_keys]\nbootstrap = "file://{boot_key}"\n'
    config = x509_config(server, boot_cert, extra)
    return start_certd(world_dir / "d", config, keyd_extra=keyd_extra, **options), boot_cert


def keyd_public_key(daemon: Daemon, key_id: str):  # noqa: ANN201
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec

    reply = daemon.request("keyd", "GET", f"/keypair/{key_id}")
    if reply.status != 200:
        return None
    handle = reply.json()["keyHandle"]
    point = daemon.request("keyd", "POST", "/parameters/ec-point", {"keyHandle": handle})
    raw = base64.b64decode(point.json()["value"])
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)


def test_bootstrap_then_enroll_with_the_est_identity(
    world_dir: Path, cert_server: EstServer
) -> None:
    daemon, _ = start_x509(world_dir, cert_server)
    try:
        reply, key = enroll(daemon)
        assert reply.status == 201, reply.body
        assert certs_of(reply.json()["pem"])[0].public_key() == key.public_key()
        enrolls = [r for r in cert_server.requests if r.operation == "simpleenroll"]
        # First the EST identity, with the bootstrap cert; then the cert asked for, with it.
        assert [r.client_cert_issuer for r in enrolls] == ["bootstrap", "issuing"]
        assert enrolls[0].client_cert_subject == "CN=bootstrap-device"
        assert enrolls[0].csr_subject == "CN=my-device"  # the request's subject, as the original
        identity = certs_of(cert_file(daemon, "est-id").read_text())[0]
        assert enrolls[1].client_cert_subject == identity.subject.rfc4514_string()
        eku = identity.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
        # The identity's key is keyd's `est-id`: certd never held it.
        assert identity.public_key() == keyd_public_key(daemon, "est-id")
        # A second enrollment reuses the identity: no new bootstrap.
        cert_server.clear_requests()
        reply, _ = enroll(daemon, cn="second")
        assert reply.status == 201, reply.body
        enrolls = [r for r in cert_server.requests if r.operation == "simpleenroll"]
        assert [r.client_cert_issuer for r in enrolls] == ["issuing"]
        assert "obtained EST identity cert est-id with the bootstrap identity" in daemon.logs()
    finally:
        daemon.stop()


def test_deleting_the_identity_bootstraps_again_with_a_new_key(
    world_dir: Path, cert_server: EstServer
) -> None:
    daemon, _ = start_x509(world_dir, cert_server)
    try:
        assert enroll(daemon)[0].status == 201
        first_key = keyd_public_key(daemon, "est-id")
        assert daemon.request("certd", "DELETE", "/certificates/est-id").status == 204
        cert_server.clear_requests()
        assert enroll(daemon)[0].status == 201
        enrolls = [r for r in cert_server.requests if r.operation == "simpleenroll"]
        assert [r.client_cert_issuer for r in enrolls] == ["bootstrap", "issuing"]
        assert keyd_public_key(daemon, "est-id") != first_key
    finally:
        daemon.stop()


def test_without_a_bootstrap_identity_enrollment_fails_clearly(
    world_dir: Path, cert_server: EstServer
) -> None:
    config = x509_config(cert_server, world_dir / "none.pem")
    config = config.replace('bootstrap_identity_cert = "bootstrap"\n', "")
    config = config.replace('bootstrap_identity_pk = "bootstrap"\n', "")
    daemon = start_certd(world_dir / "d", config)
    try:
        reply, _ = enroll(daemon)
        assert reply.status == 500
        assert "EST bootstrap identity is not configured" in daemon.logs()
        assert not cert_file(daemon, "device-id").exists()
    finally:
        daemon.stop()


def test_the_est_identity_is_renewed_by_reenroll_with_a_rotated_key(
    world_dir: Path, cert_server: EstServer
) -> None:
    # Identity certs that are 90% through their life at once: due at the 80% threshold.
    cert_server.set_validity(not_before=-9 * 86400, not_after=86400)
    daemon, _ = start_x509(world_dir, cert_server)
    try:
        assert enroll(daemon)[0].status == 201
        bootstrapped = next(r for r in cert_server.requests if r.operation == "simpleenroll")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "renewed EST identity cert est-id" not in (
            daemon.logs()
        ):
            time.sleep(0.1)
        assert "renewed EST identity cert est-id (key rotated)" in daemon.logs()
        reenrolls = [r for r in cert_server.requests if r.operation == "simplereenroll"]
        # Renewed once: the new cert is as due as the old, so the next try waits the retry.
        assert len(reenrolls) == 1 and reenrolls[0].client_cert_issuer == "issuing"
        assert reenrolls[0].client_cert_subject == bootstrapped.issued.subject.rfc4514_string()
        renewed = certs_of(cert_file(daemon, "est-id").read_text())[0]
        assert renewed == reenrolls[0].issued
        assert renewed.public_key() != bootstrapped.issued.public_key()
        assert renewed.public_key() == keyd_public_key(daemon, "est-id")
        assert keyd_public_key(daemon, "est-id-temp") is None
    finally:
        daemon.stop()


def test_renewal_while_the_server_is_down_is_retried_until_it_is_back(
    world_dir: Path, cert_server: EstServer
) -> None:
    import datetime

    daemon, _ = start_x509(world_dir, cert_server)
    try:
        assert enroll(daemon)[0].status == 201
        # An operator imports an identity cert for the same key that is due now: 100 s long,
        # 85 s gone, retry 4% = every 4 s. The server is down when its renewal comes.
        now = datetime.datetime.now(datetime.UTC)
        public = keyd_public_key(daemon, "est-id")
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "my-device")])
        due = cert_server.cas.issuing.issue(
            name,
            public,
            not_before=now - datetime.timedelta(seconds=85),
            not_after=now + datetime.timedelta(seconds=15),
        )
        pem = due.public_bytes(serialization.Encoding.PEM).decode()
        cert_server.misbehave("refuse")
        assert daemon.request("certd", "PUT", "/certificates/est-id", {"pem": pem}).status == 201
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "cert est-id: renewal failed" not in daemon.logs():
            time.sleep(0.1)
        line = next(x for x in daemon.logs().splitlines() if "cert est-id: renewal failed" in x)
        assert "cannot connect to" in line and "retrying at" in line
        assert cert_file(daemon, "est-id").read_text() == pem  # the old cert stays meanwhile
        cert_server.behave()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cert_file(daemon, "est-id").read_text() == pem:
            time.sleep(0.1)
        renewed = certs_of(cert_file(daemon, "est-id").read_text())[0]
        assert renewed != due and renewed.public_key() == keyd_public_key(daemon, "est-id")
    finally:
        daemon.stop()


def test_an_expired_identity_is_renewed_with_the_bootstrap_cert_after_a_restart(
    world_dir: Path, cert_server: EstServer
) -> None:
    cert_server.set_validity(not_before=-300, not_after=3)
    daemon, _ = start_x509(world_dir, cert_server)
    try:
        assert enroll(daemon)[0].status == 201
        daemon.stop()
        time.sleep(4)  # the identity cert expires while the daemon is down
        cert_server.set_validity(not_before=-300, not_after=30 * 86400)
        cert_server.clear_requests()
        renewed_before = daemon.logs().count("renewed EST identity cert")
        daemon.start()
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline
            and daemon.logs().count("renewed EST identity cert") == renewed_before
        ):
            time.sleep(0.1)
        enrolls = [r for r in cert_server.requests if r.operation == "simpleenroll"]
        assert enrolls and enrolls[0].client_cert_issuer == "bootstrap"
        renewed = certs_of(cert_file(daemon, "est-id").read_text())[0]
        assert renewed.public_key() == keyd_public_key(daemon, "est-id")
    finally:
        daemon.stop()


SPY = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"


@pytest.mark.skipif(not Path(SPY).exists(), reason="pkcs11-spy (opensc) is not installed")
def test_an_identity_key_on_a_token_signs_the_handshake_without_leaving_it(
    world_dir: Path, cert_server: EstServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.softhsm import make_softhsm_token, softhsm_available

    if not softhsm_available():
        pytest.skip("softhsm2 is not installed")
    monkeypatch.setenv("SOFTHSM2_CONF", "")  # make_softhsm_token sets it; restored after
    token = make_softhsm_token(world_dir / "softhsm", label="est-id-token")
    spy_log = world_dir / "spy.log"
    # keyd loads pkcs11-spy, which logs every call and passes it on to SoftHSM.
    keyd_extra = f'pkcs11_lib_path = "{SPY}"\npkcs11_base_slot = "{token.uri()}"\n'
    env = {
        "SOFTHSM2_CONF": str(token.conf_path),
        "PKCS11SPY": token.lib_path,
        "PKCS11SPY_OUTPUT": str(spy_log),
    }
    boot_cert, boot_key = cert_server.make_bootstrap_identity(world_dir / "boot", "boot")
    config = x509_config(cert_server, boot_cert)
    keyd_config = keyd_extra + f'[preloaded_keys]\nbootstrap = "file://{boot_key}"\n'
    # [aziot_keys] settings must precede the preloaded table: put them in the keyd snippet.
    daemon = start_certd(world_dir / "d", config, keyd_extra=keyd_config, env=env)
    try:
        reply, _ = enroll(daemon)
        assert reply.status == 201, reply.body
        objects = token.pkcs11_tool("--list-objects").stdout
        private = objects.split("Private Key Object")[1].split("Object")[0]
        assert "label:      est-id" in private
        assert "never extractable" in private and "sensitive" in private
        calls = spy_log.read_text(errors="replace")
        # The identity's CSR and the second enrollment's TLS handshake were signed by the
        # token (the handle-validation key's HMACs are C_Sign calls too).
        # ECDSA on the token: the identity CSR, then the second enrollment's handshake.
        assert calls.count("pMechanism->type = CKM_ECDSA") >= 2
        # No attribute holding private key material was ever asked for.
        secrets = ("CKA_VALUE", "CKA_PRIVATE_EXPONENT", "CKA_PRIME_1", "CKA_PRIME_2")
        asked = set(re.findall(r"CKA_[A-Z_0-9]+", calls))
        assert not asked & set(secrets), asked & set(secrets)
    finally:
        daemon.stop()


def test_https_proxy_tunnels_tls_with_the_client_cert(
    world_dir: Path, cert_server: EstServer
) -> None:
    from tests.connect_proxy import ConnectProxy

    with ConnectProxy() as proxy:
        # As the original: HTTPS_PROXY wins over https_proxy, and NO_PROXY is not read.
        env = {"HTTPS_PROXY": proxy.url, "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "*"}
        daemon, _ = start_x509(world_dir, cert_server, env=env)
        try:
            reply, _ = enroll(daemon)
            assert reply.status == 201, reply.body
        finally:
            daemon.stop()
        # Every EST request went through a CONNECT tunnel to the server...
        target = f"CONNECT 127.0.0.1:{cert_server.port} HTTP/1.1"
        assert proxy.seen and all(line == target for line in proxy.seen), proxy.seen
        # ...and TLS inside it still carried the client certs (bootstrap, then the identity).
        enrolls = [r for r in cert_server.requests if r.operation == "simpleenroll"]
        assert [r.client_cert_issuer for r in enrolls] == ["bootstrap", "issuing"]


def test_a_slow_server_is_waited_for(basic: Daemon, est_server: EstServer) -> None:
    est_server.misbehave("slow", seconds=2)
    started = time.monotonic()
    reply, _ = enroll(basic)
    assert reply.status == 201, reply.body
    assert time.monotonic() - started >= 2
