"""The mock EST server, checked with clients that share none of its code: httpx for HTTP and
TLS, the openssl and curl command lines for PKCS#7 parsing, chain verification and TLS client
certs. The daemon's EST tests rely on this server meaning what it says."""

from __future__ import annotations

import base64
import datetime
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mockcloud.est import EstServer

REPO = Path(__file__).resolve().parent.parent
PKCS10 = {"content-type": "application/pkcs10", "content-transfer-encoding": "base64"}


# -- helpers -----------------------------------------------------------------------------------


def make_csr(
    common_name: str,
    key: ec.EllipticCurvePrivateKey | None = None,
    *,
    ca: bool = False,
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(True, None), critical=True)
    return builder.sign(key, hashes.SHA256()), key


def csr_body(csr: x509.CertificateSigningRequest) -> bytes:
    """As the original client sends it: base64 DER wrapped at 64 characters, each line ending
    in a newline."""
    text = base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()
    return "".join(text[i : i + 64] + "\n" for i in range(0, len(text), 64)).encode()


def client(
    server: EstServer,
    *,
    identity: tuple[Path, Path] | None = None,
    auth: tuple[str, str] | None = None,
    max_tls: ssl.TLSVersion | None = None,
) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(server.server_ca_pem_path))
    if max_tls is not None:
        context.maximum_version = max_tls
    if identity is not None:
        context.load_cert_chain(*map(str, identity))
    return httpx.Client(verify=context, auth=auth, timeout=10)


def enroll(
    http: httpx.Client, url: str, csr: x509.CertificateSigningRequest, op: str = "simpleenroll"
) -> httpx.Response:
    return http.post(f"{url}/{op}", content=csr_body(csr), headers=PKCS10)


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=10)


def pkcs7_certs(response: httpx.Response) -> list[x509.Certificate]:
    """The certs in a PKCS#7 answer, as `openssl pkcs7` reads them (base64 DER or PEM)."""
    body = response.content
    if body.startswith(b"-----BEGIN PKCS7-----"):
        result = openssl("pkcs7", "-inform", "PEM", "-print_certs", input=body)
    else:
        der = base64.b64decode(b"".join(body.split()), validate=True)
        result = openssl("pkcs7", "-inform", "DER", "-print_certs", input=der)
    assert result.returncode == 0, result.stderr.decode()
    return x509.load_pem_x509_certificates(result.stdout)


def write_pem(path: Path, certs: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def verifies(tmp: Path, leaf: x509.Certificate, chain: list[x509.Certificate]) -> bool:
    """`openssl verify` of `leaf` with the self-signed certs of `chain` as roots and the rest
    as intermediates."""
    roots = [c for c in chain if c.issuer == c.subject]
    intermediates = [c for c in chain if c.issuer != c.subject]
    args = ["verify", "-CAfile", str(write_pem(tmp / "roots.pem", roots))]
    if intermediates:
        args += ["-untrusted", str(write_pem(tmp / "intermediates.pem", intermediates))]
    result = openssl(*args, str(write_pem(tmp / "leaf.pem", [leaf])))
    return result.returncode == 0


def ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EstServer]:
    with EstServer(tmp_path / "est", username="user", password="pass") as est:
        yield est


# -- enrollment and CA certs -------------------------------------------------------------------


def test_enroll_with_basic_auth(server: EstServer, tmp_path: Path) -> None:
    csr, key = make_csr("device-1")
    with client(server, auth=("user", "pass")) as http:
        response = enroll(http, server.url, csr)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
    [cert] = pkcs7_certs(response)
    assert cert.subject == csr.subject
    assert cert.public_key() == key.public_key()
    assert ext(cert, x509.ExtendedKeyUsage) == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    issuing = server.cas.issuing.cert
    assert cert.issuer == issuing.subject
    assert ext(cert, x509.SubjectKeyIdentifier) == x509.SubjectKeyIdentifier.from_public_key(
        key.public_key()
    )
    akid = ext(cert, x509.AuthorityKeyIdentifier)
    assert akid.key_identifier == ext(issuing, x509.SubjectKeyIdentifier).digest
    chain = x509.load_pem_x509_certificates(server.issuing_chain_pem_path.read_bytes())
    assert verifies(tmp_path, cert, chain)

    [seen] = server.requests
    assert (seen.method, seen.operation, seen.status) == ("POST", "simpleenroll", 200)
    assert seen.auth == {"basic"} and seen.username == "user"
    assert seen.csr_subject == "CN=device-1" and seen.client_cert_subject is None
    assert seen.headers["content-transfer-encoding"] == "base64"
    assert seen.issued == cert


def test_csr_extensions_copied_serials_random(server: EstServer) -> None:
    csr, _ = make_csr("device-ca", ca=True)
    with client(server, auth=("user", "pass")) as http:
        first = pkcs7_certs(enroll(http, server.url, csr))[0]
        second = pkcs7_certs(enroll(http, server.url, csr))[0]
    assert ext(first, x509.BasicConstraints).ca is True
    assert first.serial_number != second.serial_number


def test_cacerts_chain_verifies(server: EstServer, tmp_path: Path) -> None:
    with client(server) as http:  # RFC 7030 §4.1.1: no auth needed for the CA certs
        response = http.get(f"{server.url}/cacerts")
    with client(server, auth=("user", "pass")) as http:
        issued = pkcs7_certs(enroll(http, server.url, make_csr("d")[0]))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/pkcs7-mime"
    chain = pkcs7_certs(response)
    assert {c.subject.rfc4514_string() for c in chain} == {
        "CN=mockcloud EST root CA",
        "CN=mockcloud EST issuing CA",
    }
    root = [c for c in chain if c.subject == c.issuer]
    assert root == x509.load_pem_x509_certificates(server.root_ca_pem_path.read_bytes())
    issuing = next(c for c in chain if c.subject != c.issuer)
    assert verifies(tmp_path, issuing, root)
    assert verifies(tmp_path, issued[0], chain)


def test_cas_reused_from_directory(tmp_path: Path) -> None:
    first = EstServer(tmp_path)
    second = EstServer(tmp_path)
    assert first.cas.root.cert == second.cas.root.cert
    assert first.cas.issuing.cert == second.cas.issuing.cert
    assert first.cas.bootstrap.cert == second.cas.bootstrap.cert
    flat = EstServer(tmp_path / "flat", intermediate=False)
    assert flat.cas.issuing is flat.cas.root


def test_label_segment(server: EstServer) -> None:
    with client(server, auth=("user", "pass")) as http:
        assert enroll(http, server.url_for("edge-ca"), make_csr("d")[0]).status_code == 200
        assert http.get(f"{server.url}/a/b/simpleenroll").status_code == 404
        assert http.get(f"{server.url}/simpleenroll").status_code == 405
    assert [r.label for r in server.requests] == ["edge-ca", None, None]


def test_validity_changes_at_runtime(server: EstServer) -> None:
    server.set_validity(not_before=-90, not_after=10)
    with client(server, auth=("user", "pass")) as http:
        [cert] = pkcs7_certs(enroll(http, server.url, make_csr("short-lived")[0]))
    now = datetime.datetime.now(datetime.UTC)
    assert abs((cert.not_valid_before_utc - now).total_seconds() + 90) < 5
    assert abs((cert.not_valid_after_utc - now).total_seconds() - 10) < 5


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_cert_auth_with_bootstrap_identity(tmp_path: Path, tls: ssl.TLSVersion) -> None:
    with EstServer(tmp_path / "est", auth=("cert",)) as server:
        identity = server.make_bootstrap_identity(tmp_path / "boot", "device-1")
        with client(server, identity=identity, max_tls=tls) as http:
            response = enroll(http, server.url, make_csr("device-1")[0])
            version = response.extensions["network_stream"].get_extra_info("ssl_object").version()
        assert response.status_code == 200, response.text
        assert (
            version == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[tls]
        )
        with client(server) as http:
            anonymous = enroll(http, server.url, make_csr("device-1")[0])
        assert anonymous.status_code == 401
        assert "www-authenticate" not in anonymous.headers  # no basic auth to offer
    seen = server.requests
    assert seen[0].auth == {"cert"}
    assert seen[0].client_cert_subject == "CN=device-1"
    assert seen[0].client_cert_issuer == "bootstrap"
    assert seen[1].auth == frozenset() and seen[1].client_cert_subject is None


def test_client_cert_from_unknown_ca_fails_tls(tmp_path: Path) -> None:
    with EstServer(tmp_path / "est", auth=("cert",)) as server:
        identity = server.make_identity(tmp_path / "bad", "forged", issuer="untrusted")
        with client(server, identity=identity) as http, pytest.raises(httpx.TransportError):
            enroll(http, server.url, make_csr("forged")[0])
    assert server.requests == []


def test_curl_enrolls_with_bootstrap_cert(tmp_path: Path) -> None:
    with EstServer(tmp_path / "est", auth=("cert",)) as server:
        cert, key = server.make_bootstrap_identity(tmp_path / "boot", "curl-device")
        (tmp_path / "csr.b64").write_bytes(csr_body(make_csr("curl-device")[0]))
        result = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(server.server_ca_pem_path),
             "--cert", str(cert), "--key", str(key),
             "-H", "content-type: application/pkcs10",
             "-H", "content-transfer-encoding: base64",
             "--data-binary", f"@{tmp_path / 'csr.b64'}",
             f"{server.url}/simpleenroll"],
            capture_output=True, timeout=10,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    der = base64.b64decode(b"".join(result.stdout.split()))
    printed = openssl("pkcs7", "-inform", "DER", "-print_certs", "-noout", input=der)
    assert b"subject=CN = curl-device" in printed.stdout
    assert server.requests[0].client_cert_issuer == "bootstrap"


@pytest.mark.parametrize("credentials", [None, ("user", "wrong"), ("nobody", "pass")])
def test_basic_auth_failures_are_401(
    server: EstServer, credentials: tuple[str, str] | None
) -> None:
    with client(server, auth=credentials) as http:
        response = enroll(http, server.url, make_csr("d")[0])
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="mockcloud-est"'
    [seen] = server.requests
    assert seen.auth == frozenset()
    assert seen.username == (credentials[0] if credentials else None)


def test_require_all_needs_basic_and_cert(tmp_path: Path) -> None:
    est = EstServer(tmp_path / "est", username="u", password="p", require_all=True)
    with est as server:
        identity = server.make_bootstrap_identity(tmp_path / "boot", "d")
        csr = make_csr("d")[0]
        with client(server, auth=("u", "p")) as http:
            assert enroll(http, server.url, csr).status_code == 401
        with client(server, identity=identity) as http:
            assert enroll(http, server.url, csr).status_code == 401
        with client(server, identity=identity, auth=("u", "p")) as http:
            assert enroll(http, server.url, csr).status_code == 200
    assert server.requests[-1].auth == {"basic", "cert"}


def test_cacerts_auth_when_asked(tmp_path: Path) -> None:
    with EstServer(tmp_path / "est", username="u", password="p", cacerts_auth=True) as server:
        with client(server) as http:
            assert http.get(f"{server.url}/cacerts").status_code == 401
        with client(server, auth=("u", "p")) as http:
            assert http.get(f"{server.url}/cacerts").status_code == 200


def test_reenroll_with_issued_cert(server: EstServer, tmp_path: Path) -> None:
    csr, key = make_csr("device-1")
    with client(server, auth=("user", "pass")) as http:
        [cert] = pkcs7_certs(enroll(http, server.url, csr))
    (tmp_path / "id.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "id.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    issued = (tmp_path / "id.pem", tmp_path / "id.key")
    with client(server, identity=issued) as http:
        renewed = enroll(http, server.url, make_csr("device-1")[0], "simplereenroll")
        other_subject = enroll(http, server.url, make_csr("device-2")[0], "simplereenroll")
    assert renewed.status_code == 200, renewed.text
    assert pkcs7_certs(renewed)[0].subject == cert.subject
    assert other_subject.status_code == 400
    assert "does not match" in other_subject.text

    bootstrap = server.make_bootstrap_identity(tmp_path / "boot", "device-1")
    with client(server, identity=bootstrap, auth=("user", "pass")) as http:
        # RFC 7030 §4.2.2: re-enrollment renews a cert this CA issued; basic auth is not it.
        assert (
            enroll(http, server.url, make_csr("device-1")[0], "simplereenroll").status_code == 401
        )
    seen = server.requests[1]
    assert (seen.operation, seen.client_cert_issuer, seen.auth) == (
        "simplereenroll",
        "issuing",
        {"cert"},
    )


def test_bad_csr_is_400(server: EstServer) -> None:
    csr, _ = make_csr("d")
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte is in the signature
    tampered = base64.encodebytes(bytes(der))
    with client(server, auth=("user", "pass")) as http:
        url = f"{server.url}/simpleenroll"
        bad_signature = http.post(url, content=tampered, headers=PKCS10)
        not_base64 = http.post(url, content=b"%%%not base64%%%", headers=PKCS10)
        not_a_csr = http.post(url, content=base64.b64encode(b"hello"), headers=PKCS10)
        wrong_type = http.post(url, content=csr_body(csr), headers={"content-type": "text/plain"})
    assert bad_signature.status_code == 400 and "signature" in bad_signature.text
    assert not_base64.status_code == 400
    assert not_a_csr.status_code == 400
    assert wrong_type.status_code == 415


# -- misbehaviours -----------------------------------------------------------------------------


def test_unauthorized(server: EstServer) -> None:
    server.misbehave("unauthorized")
    with client(server, auth=("user", "pass")) as http:
        assert enroll(http, server.url, make_csr("d")[0]).status_code == 401
        assert http.get(f"{server.url}/cacerts").status_code == 401
        server.behave()
        assert enroll(http, server.url, make_csr("d")[0]).status_code == 200
    assert [r.misbehaviour for r in server.requests] == ["unauthorized", "unauthorized", None]


def test_retry_after_then_normal(server: EstServer) -> None:
    server.misbehave("retry_after", count=2, seconds=3)
    with client(server, auth=("user", "pass")) as http:
        assert http.get(f"{server.url}/cacerts").status_code == 200  # enroll only
        answers = [enroll(http, server.url, make_csr("d")[0]) for _ in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 200]
    assert [a.headers.get("retry-after") for a in answers] == ["3", "3", None]
    assert server.misbehaviours == {}


def test_pem_answer(server: EstServer) -> None:
    server.misbehave("pem")
    with client(server, auth=("user", "pass")) as http:
        response = enroll(http, server.url, make_csr("pem-device")[0])
    assert response.status_code == 200
    assert response.text.startswith("-----BEGIN PKCS7-----")
    assert response.headers["content-type"].startswith("application/pkcs7-mime")
    assert pkcs7_certs(response)[0].subject.rfc4514_string() == "CN=pem-device"


def test_wrong_content_type(server: EstServer) -> None:
    server.misbehave("wrong_content_type", count=1)
    with client(server) as http:
        wrong = http.get(f"{server.url}/cacerts")
        right = http.get(f"{server.url}/cacerts")
    assert wrong.headers["content-type"] == "text/plain"
    assert len(pkcs7_certs(wrong)) == 2  # only the label is wrong
    assert right.headers["content-type"] == "application/pkcs7-mime"


def test_broken_chain_in_cacerts(server: EstServer, tmp_path: Path) -> None:
    server.misbehave("broken_chain")
    with client(server, auth=("user", "pass")) as http:
        chain = pkcs7_certs(http.get(f"{server.url}/cacerts"))
        [cert] = pkcs7_certs(enroll(http, server.url, make_csr("d")[0]))
    # The look-alike has the issuing CA's name, so only the signature gives it away.
    assert [c.subject for c in chain] == [server.cas.issuing.cert.subject]
    assert not verifies(tmp_path, cert, chain)
    assert verifies(tmp_path, cert, list(server.cas.issuing.chain))


def test_broken_chain_in_enroll(server: EstServer, tmp_path: Path) -> None:
    server.misbehave("broken_chain", target="enroll")
    with client(server, auth=("user", "pass")) as http:
        chain = pkcs7_certs(http.get(f"{server.url}/cacerts"))
        [cert] = pkcs7_certs(enroll(http, server.url, make_csr("d")[0]))
    assert cert.issuer == server.cas.issuing.cert.subject
    assert not verifies(tmp_path, cert, chain)


def test_html_error_once(server: EstServer) -> None:
    server.misbehave("html_error", count=1)
    with client(server, auth=("user", "pass")) as http:
        broken = enroll(http, server.url, make_csr("d")[0])
        fine = enroll(http, server.url, make_csr("d")[0])
    assert broken.status_code == 500
    assert broken.headers["content-type"] == "text/html"
    assert "<html>" in broken.text
    assert fine.status_code == 200


def test_slow(server: EstServer) -> None:
    server.misbehave("slow", seconds=0.4)
    with client(server) as http:
        started = time.monotonic()
        assert http.get(f"{server.url}/cacerts").status_code == 200
        assert time.monotonic() - started >= 0.4
        with pytest.raises(httpx.ReadTimeout):
            http.get(f"{server.url}/cacerts", timeout=0.1)


def test_refuse_and_back(server: EstServer) -> None:
    port = server.port
    with client(server) as http:
        assert http.get(f"{server.url}/cacerts").status_code == 200
        server.misbehave("refuse")
        # The open keep-alive connection is cut too, and a new one is refused.
        with pytest.raises(httpx.TransportError):
            http.get(f"{server.url}/cacerts")
        with pytest.raises(httpx.ConnectError):
            http.get(f"{server.url}/cacerts")
        server.behave()
        assert http.get(f"{server.url}/cacerts").status_code == 200
    assert server.port == port


def test_misbehave_rejects_unknown_mode(server: EstServer) -> None:
    with pytest.raises(ValueError, match="unknown misbehaviour"):
        server.misbehave("teapot")  # type: ignore[arg-type]


# -- command line ------------------------------------------------------------------------------


def _run_module(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "mockcloud", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,  # type: ignore[call-overload]
    )


def test_help() -> None:
    for args in (["--help"], ["est", "--help"]):
        process = _run_module(*args)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        assert "usage: python -m mockcloud" in out
    assert "--misbehave" in out and "retry_after" in out


def test_command_line_server(tmp_path: Path) -> None:
    process = _run_module(
        "est",
        "--dir", str(tmp_path / "est"),
        "--username", "u", "--password", "p",
        "--misbehave", "retry_after:count=1,seconds=7",
        "--bootstrap-identity", "dev-1",
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = {}
        while "bootstrap_identity[dev-1]" not in lines:
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            key, _, value = line.rstrip("\n").partition(": ")
            lines[key] = value
        url = lines["url"]
        assert url.startswith("https://127.0.0.1:") and url.endswith("/.well-known/est")
        cert, key = lines["bootstrap_identity[dev-1]"].split(" ")
        context = ssl.create_default_context(cafile=lines["server_ca"])
        context.load_cert_chain(cert, key)
        with httpx.Client(verify=context, timeout=10) as http:
            first = enroll(http, url, make_csr("dev-1")[0])
            second = enroll(http, url, make_csr("dev-1")[0])
        assert (first.status_code, first.headers["retry-after"]) == (202, "7")
        assert second.status_code == 200
        for name in ("root_ca", "issuing_ca", "issuing_chain", "bootstrap_ca"):
            assert Path(lines[name]).is_file()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
