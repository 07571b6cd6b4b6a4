"""Mutual TLS with `remote_key.client_context`: the key signs only through `private_op`.

Peers: a Python `ssl` server in threads that requires a client certificate and verifies it
against a root the client certificate does not chain to directly (so the intermediate must be
sent), and `openssl s_server` as an independent implementation. Keys: EC P-256 and RSA-2048,
held by the test (a `private_op` over `cryptography`) or by a real keyd over its socket.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import datetime
import gc
import ipaddress
import logging
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aziot.actors import remote_key
from aziot.actors.remote_key import PrivateOp, client_context
from tests.daemon import Keyd

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_HASHES: dict[int, hashes.HashAlgorithm] = {
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}


# --- a small PKI ---------------------------------------------------------------------------


@attrs.frozen
class Issued:
    key: PrivateKey | None  # None when the key lives in keyd
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(
    subject: str,
    public: PublicKey,
    issuer: Issued | None,
    *,
    ca: bool = False,
    server: bool = False,
    self_key: PrivateKey | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer.cert.subject if issuer else name(subject))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    signing_key = issuer.key if issuer else self_key
    assert signing_key is not None
    return builder.sign(signing_key, hashes.SHA256())


def new_key(kind: str) -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@attrs.frozen
class Pki:
    root: Issued  # the only anchor the server trusts for clients
    intermediate: Issued  # issues client certs: the client must send it
    server: Issued
    directory: Path

    def client(self, subject: str, key: PrivateKey) -> Issued:
        return Issued(key, issue(subject, key.public_key(), self.intermediate))

    def chain(self, leaf: Issued) -> bytes:
        return leaf.pem + self.intermediate.pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    root_key = new_key("ec")
    root = Issued(
        root_key, issue("Test Root", root_key.public_key(), None, ca=True, self_key=root_key)
    )
    inter_key = new_key("ec")
    intermediate = Issued(
        inter_key, issue("Test Intermediate", inter_key.public_key(), root, ca=True)
    )
    server_key = new_key("ec")
    server = Issued(server_key, issue("localhost", server_key.public_key(), root, server=True))
    (directory / "root.pem").write_bytes(root.pem)
    (directory / "server.pem").write_bytes(server.pem)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(root, intermediate, server, directory)


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {"ec": new_key("ec"), "rsa": new_key("rsa")}


# --- private_op over a local key, counting its calls ---------------------------------------


class LocalSigner:
    """A PrivateOp made from a key the test holds: what keyd would compute, and a call log."""

    def __init__(self, key: PrivateKey, fail: BaseException | None = None):
        self.key = key
        self.fail = fail
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, algorithm: str, data: bytes) -> bytes:
        with self.lock:
            self.calls.append(algorithm)
        if self.fail is not None:
            raise self.fail
        if algorithm == "ECDSA":
            assert isinstance(self.key, ec.EllipticCurvePrivateKey)
            return self.key.sign(data, ec.ECDSA(utils.Prehashed(_HASHES[len(data)])))
        assert isinstance(self.key, rsa.RSAPrivateKey)
        numbers = self.key.private_numbers()
        n, size = numbers.public_numbers.n, self.key.key_size // 8
        if algorithm == "RSA-PKCS1":
            block = b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data
        else:
            assert algorithm == "RSA-NO-PADDING" and len(data) == size
            block = data
        return pow(int.from_bytes(block), numbers.d, n).to_bytes(size, "big")


# --- a Python TLS server requiring a client certificate -------------------------------------


@attrs.define
class Seen:
    """What the server saw of one connection."""

    subject: str | None = None
    peer_der: bytes | None = None
    version: str | None = None
    error: BaseException | None = None


class TlsServer:
    """Accepts on 127.0.0.1 in a thread, one thread per connection; answers one HTTP request."""

    def __init__(self, pki: Pki, max_version: ssl.TLSVersion | None = None):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.directory / "server.pem", pki.directory / "server.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cadata=pki.root.pem.decode())
        if max_version is not None:
            self.context.maximum_version = max_version
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: queue.Queue[Seen] = queue.Queue()
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)

    def client_sigalgs(self, sigalgs: str) -> None:
        """Restrict what the server accepts in the client's CertificateVerify (no ssl API)."""
        lib = remote_key._openssl()
        pointer = remote_key._ssl_ctx_pointer(self.context, lib)
        set_client_sigalgs_list = 102  # SSL_CTRL_SET_CLIENT_SIGALGS_LIST
        text = ctypes.create_string_buffer(sigalgs.encode())
        assert lib.SSL_CTX_ctrl(pointer, set_client_sigalgs_list, 0, ctypes.addressof(text)) == 1

    def __enter__(self) -> TlsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Closing alone does not wake a thread blocked in accept(); shutting down does.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)

    def accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        seen = Seen()
        conn.settimeout(10)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                peer = tls.getpeercert()
                seen.peer_der = tls.getpeercert(binary_form=True)
                seen.version = tls.version()
                seen.subject = dict(field[0] for field in peer["subject"])["commonName"]
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                body = f"hello {seen.subject}".encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
        except (OSError, ssl.SSLError) as error:
            seen.error = error
        finally:
            self.seen.put(seen)


def get(ctx: ssl.SSLContext, port: int) -> bytes:
    """One handshake and one HTTP request over a plain `SSLSocket`; the response body."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", reply
    return body


# --- native checks ----------------------------------------------------------------------------


def installed_key_has_no_private_part(ctx: ssl.SSLContext) -> bool:
    """Whether the key in ctx's SSL_CTX lacks a private scalar/exponent (OpenSSL's own view)."""
    lib = remote_key._load_ssl_libraries()
    pointer = remote_key._ssl_ctx_pointer(ctx, remote_key._openssl())

    def bind(name: str) -> Any:
        return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)((name, lib))

    pkey = bind("SSL_CTX_get0_privatekey")(pointer)
    assert pkey
    if eckey := bind("EVP_PKEY_get0_EC_KEY")(pkey):
        return not bind("EC_KEY_get0_private_key")(eckey)
    rsakey = bind("EVP_PKEY_get0_RSA")(pkey)
    assert rsakey
    return not bind("RSA_get0_d")(rsakey)


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec", "rsa"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_mutual_tls_signs_through_private_op(
    pki: Pki, keys: dict[str, PrivateKey], kind: str, version: ssl.TLSVersion
) -> None:
    client = pki.client(f"device-{kind}", keys[kind])
    signer = LocalSigner(keys[kind])
    ctx = client_context(pki.chain(client), signer, [pki.root.pem])
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert installed_key_has_no_private_part(ctx)
    with TlsServer(pki, max_version=version) as server:
        assert get(ctx, server.port) == f"hello device-{kind}".encode()
        seen = server.seen.get(timeout=10)
    assert seen.error is None
    assert seen.version == version.name.replace("_", ".")
    assert seen.subject == f"device-{kind}"
    assert seen.peer_der == client.cert.public_bytes(serialization.Encoding.DER)
    expected = {"ec": "ECDSA", "rsa": "RSA-NO-PADDING"}[kind]  # TLS 1.3 and OpenSSL prefer PSS
    assert signer.calls == [expected]


@pytest.mark.parametrize(
    ("sigalgs", "algorithm"),
    [("RSA+SHA256", "RSA-PKCS1"), ("rsa_pss_rsae_sha256", "RSA-NO-PADDING")],
)
def test_tls12_rsa_pkcs1_and_pss(
    pki: Pki, keys: dict[str, PrivateKey], sigalgs: str, algorithm: str
) -> None:
    signer = LocalSigner(keys["rsa"])
    ctx = client_context(pki.chain(pki.client("device-rsa", keys["rsa"])), signer, [pki.root.pem])
    with TlsServer(pki, max_version=ssl.TLSVersion.TLSv1_2) as server:
        server.client_sigalgs(sigalgs)
        assert get(ctx, server.port) == b"hello device-rsa"
        assert server.seen.get(timeout=10).error is None
    assert signer.calls == [algorithm]


def test_without_the_intermediate_the_server_refuses(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    """The chain test's control: the server really needs the intermediate the client sends."""
    client = pki.client("device-ec", keys["ec"])
    ctx = client_context(client.pem, LocalSigner(keys["ec"]), [pki.root.pem])
    with TlsServer(pki) as server, pytest.raises((ssl.SSLError, OSError)):
        get(ctx, server.port)
    assert isinstance(server.seen.get(timeout=10).error, ssl.SSLError)


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_failing_private_op_fails_the_handshake_and_is_logged(
    pki: Pki, keys: dict[str, PrivateKey], kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    signer = LocalSigner(keys[kind], fail=RuntimeError("keyd is unreachable"))
    ctx = client_context(pki.chain(pki.client("device", keys[kind])), signer, [pki.root.pem])
    with caplog.at_level(logging.ERROR, logger=remote_key.__name__):
        with TlsServer(pki) as server, pytest.raises(ssl.SSLError):
            get(ctx, server.port)
        assert server.seen.get(timeout=10).error is not None
    assert len(signer.calls) == 1
    record = next(r for r in caplog.records if r.name == remote_key.__name__)
    assert record.exc_info is not None and "keyd is unreachable" in str(record.exc_info[1])
    assert "CN=device" in record.getMessage()
    # The context, the process and the callbacks stay usable.
    signer.fail = None
    with TlsServer(pki) as server:
        assert get(ctx, server.port) == b"hello device"


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_wrong_signature_never_reaches_the_server_as_valid(
    pki: Pki, keys: dict[str, PrivateKey], kind: str
) -> None:
    other = new_key(kind)  # signs with a key that is not the certificate's
    ctx = client_context(
        pki.chain(pki.client("device", keys[kind])), LocalSigner(other), [pki.root.pem]
    )
    with TlsServer(pki) as server, pytest.raises((ssl.SSLError, OSError)):
        get(ctx, server.port)
    assert server.seen.get(timeout=10).error is not None


def test_garbage_from_private_op_fails_cleanly(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    for kind, garbage in [("ec", b"\x30" * 200), ("ec", b"nope"), ("rsa", b"\x01" * 300)]:
        ctx = client_context(
            pki.chain(pki.client("device", keys[kind])), lambda _a, _d, g=garbage: g, [pki.root.pem]
        )
        with TlsServer(pki) as server, pytest.raises(ssl.SSLError):
            get(ctx, server.port)


def test_eight_threads_with_different_keys(pki: Pki) -> None:
    kinds = ["ec", "rsa"] * 4
    clients = [(f"device-{i}", LocalSigner(new_key(kind))) for i, kind in enumerate(kinds)]
    contexts = [
        client_context(pki.chain(pki.client(subject, signer.key)), signer, [pki.root.pem])
        for subject, signer in clients
    ]
    rounds = 5
    with TlsServer(pki) as server:
        barrier = threading.Barrier(len(contexts))

        def run(ctx: ssl.SSLContext) -> list[bytes]:
            barrier.wait()
            return [get(ctx, server.port) for _ in range(rounds)]

        with concurrent.futures.ThreadPoolExecutor(len(contexts)) as pool:
            bodies = list(pool.map(run, contexts))
    assert bodies == [[f"hello {subject}".encode()] * rounds for subject, _ in clients]
    assert all(len(signer.calls) == rounds for _, signer in clients)


def test_one_context_shared_by_threads(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    signer = LocalSigner(keys["rsa"])
    ctx = client_context(pki.chain(pki.client("shared", keys["rsa"])), signer, [pki.root.pem])
    with TlsServer(pki) as server, concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda _: get(ctx, server.port), range(12)))
    assert bodies == [b"hello shared"] * 12 and len(signer.calls) == 12


def test_httpx_client(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    signer = LocalSigner(keys["ec"])
    ctx = client_context(pki.chain(pki.client("device-ec", keys["ec"])), signer, [pki.root.pem])
    with TlsServer(pki) as server, httpx.Client(verify=ctx) as http:
        reply = http.get(f"https://localhost:{server.port}/")
        assert reply.status_code == 200 and reply.text == "hello device-ec"
    assert signer.calls == ["ECDSA"]


async def test_httpx_in_a_worker_thread_signing_on_the_trio_loop(
    pki: Pki, keys: dict[str, PrivateKey]
) -> None:
    """The intended use: a sync client in a worker thread, each signature a trip to the loop."""
    local = LocalSigner(keys["rsa"])
    on_loop: list[str] = []

    async def sign_on_loop(algorithm: str, data: bytes) -> bytes:
        on_loop.append(algorithm)
        await trio.sleep(0)
        return local(algorithm, data)

    def private_op(algorithm: str, data: bytes) -> bytes:
        return trio.from_thread.run(sign_on_loop, algorithm, data)

    ctx = client_context(
        pki.chain(pki.client("device-rsa", keys["rsa"])), private_op, [pki.root.pem]
    )
    with TlsServer(pki) as server:

        def fetch() -> str:
            with httpx.Client(verify=ctx) as http:
                return http.get(f"https://127.0.0.1:{server.port}/").text

        assert await trio.to_thread.run_sync(fetch) == "hello device-rsa"
    assert on_loop == ["RSA-NO-PADDING"]


def test_socket_keeps_the_signer_alive_without_the_context(
    pki: Pki, keys: dict[str, PrivateKey]
) -> None:
    """The lifetime argument of the module: only the socket refers to the context."""
    signer = LocalSigner(keys["ec"])
    chain = pki.chain(pki.client("orphan", keys["ec"]))
    with TlsServer(pki) as server:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        tls = client_context(chain, signer, [pki.root.pem]).wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False
        )
        gc.collect()
        with tls:
            tls.do_handshake()
            tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")
    assert signer.calls == ["ECDSA"]


def test_contexts_come_and_go(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    """Keys with our methods are freed with their contexts; the shared methods stay valid."""
    chains = {kind: pki.chain(pki.client(kind, keys[kind])) for kind in keys}
    for _ in range(50):
        for kind, chain in chains.items():
            client_context(chain, LocalSigner(keys[kind]), [pki.root.pem])
    gc.collect()
    signer = LocalSigner(keys["rsa"])
    with TlsServer(pki) as server:
        assert (
            get(client_context(chains["rsa"], signer, [pki.root.pem]), server.port) == b"hello rsa"
        )


def test_server_authentication_stays_on(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    signer = LocalSigner(keys["ec"])
    chain = pki.chain(pki.client("device", keys["ec"]))
    with TlsServer(pki) as server:
        untrusting = client_context(chain, signer)  # default paths only: the test root is unknown
        with pytest.raises(ssl.SSLCertVerificationError):
            get(untrusting, server.port)
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            ctx = client_context(chain, signer, [pki.root.pem])
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                ctx.wrap_socket(raw, server_hostname="elsewhere.example")
    assert signer.calls == []


def test_ssl_cert_file_is_honoured(
    pki: Pki, keys: dict[str, PrivateKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.directory / "root.pem"))
    ctx = client_context(pki.chain(pki.client("device", keys["ec"])), LocalSigner(keys["ec"]))
    with TlsServer(pki) as server:
        assert get(ctx, server.port) == b"hello device"


def test_no_client_certificate(pki: Pki) -> None:
    ctx = client_context(None, None, [pki.root.pem])
    with TlsServer(pki) as server, pytest.raises((ssl.SSLError, OSError)):
        get(ctx, server.port)
    assert isinstance(server.seen.get(timeout=10).error, ssl.SSLError)


def test_bad_arguments(pki: Pki, keys: dict[str, PrivateKey]) -> None:
    chain = pki.chain(pki.client("device", keys["ec"]))
    with pytest.raises(ValueError, match="private_op"):
        client_context(chain, None)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = ed25519.Ed25519PrivateKey.generate()
    ed_cert = issue("ed", ed.public_key(), pki.intermediate)
    with pytest.raises(ValueError, match="not EC or RSA"):
        client_context(ed_cert.public_bytes(serialization.Encoding.PEM), LocalSigner(keys["ec"]))
    with pytest.raises(ValueError):
        client_context(b"not a pem", LocalSigner(keys["ec"]))


# --- openssl s_server as an independent peer ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
@pytest.mark.parametrize(
    ("kind", "extra"), [("ec", []), ("rsa", ["-tls1_2", "-client_sigalgs", "RSA+SHA256"])]
)
def test_openssl_s_server(
    pki: Pki, keys: dict[str, PrivateKey], kind: str, extra: list[str], tmp_path: Path
) -> None:
    (tmp_path / "root.pem").write_bytes(pki.root.pem)
    port = free_port()
    command = [
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1", "-www",
        "-cert", str(pki.directory / "server.pem"), "-key", str(pki.directory / "server.key"),
        "-Verify", "2", "-verify_return_error", "-CAfile", str(tmp_path / "root.pem"), *extra,
    ]  # fmt: skip
    signer = LocalSigner(keys[kind])
    ctx = client_context(
        pki.chain(pki.client(f"device-{kind}", keys[kind])), signer, [pki.root.pem]
    )
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if line.startswith(b"ACCEPT"):
                break
        body = get(ctx, port)
        out, _ = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    # -www answers with a status page: the client certificate it verified and how it signed.
    page = body.decode()
    assert "Verify return code: 0 (ok)" in page
    assert "Client certificate" in page and f"Subject: CN=device-{kind}\n" in page
    assert f"Peer signature type: {kind.upper().replace('EC', 'ECDSA')}\n" in page
    assert b"verify error" not in out
    assert signer.calls == [{"ec": "ECDSA", "rsa": "RSA-PKCS1"}[kind]]


# --- keys held by a real Keys Service ------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def keyd_public_key(keyd: Keyd, handle: str) -> PublicKey:
    def parameter(name: str) -> bytes:
        reply = keyd.call("POST", f"/parameters/{name}", {"keyHandle": handle})
        assert reply.status == 200, reply.body
        return reply.json()["value"]

    if parameter("algorithm") == "ECDSA":
        point = base64.b64decode(parameter("ec-point"))
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    modulus = int.from_bytes(base64.b64decode(parameter("rsa-modulus")))
    exponent = int.from_bytes(base64.b64decode(parameter("rsa-exponent")))
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def keyd_private_op(keyd: Keyd, handle: str, calls: Counter[str]) -> PrivateOp:
    """What certd/identityd do, without the bus: one keyd request per signature."""

    def private_op(algorithm: str, data: bytes) -> bytes:
        calls[algorithm] += 1
        if algorithm == "ECDSA":
            body = {"keyHandle": handle, "algorithm": "ECDSA", "parameters": {"digest": b64(data)}}
            reply = keyd.call("POST", "/sign", body)
            field = "signature"
        else:
            body = {"keyHandle": handle, "algorithm": algorithm, "plaintext": b64(data)}
            reply = keyd.call("POST", "/encrypt", body)
            field = "ciphertext"
        if reply.status != 200:
            raise RuntimeError(f"keyd answered {reply.status}: {reply.body!r}")
        return base64.b64decode(reply.json()[field])

    return private_op


@pytest.fixture
def keyd_server(pki: Pki) -> Iterator[Callable[[ssl.TLSVersion | None], TlsServer]]:
    servers: list[TlsServer] = []

    def start(version: ssl.TLSVersion | None) -> TlsServer:
        servers.append(TlsServer(pki, max_version=version).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.__exit__()


@pytest.mark.parametrize(("algorithms", "kind"), [("ec-p256", "ec"), ("rsa-2048", "rsa")])
def test_keys_service_signs_the_handshake(
    keyd: Keyd,
    pki: Pki,
    keyd_server: Callable[[ssl.TLSVersion | None], TlsServer],
    algorithms: str,
    kind: str,
) -> None:
    reply = keyd.call(
        "POST", "/keypair", {"keyId": f"tls-{kind}", "preferredAlgorithms": algorithms}
    )
    assert reply.status == 200, reply.body
    handle = reply.json()["keyHandle"]
    public = keyd_public_key(keyd, handle)
    client = Issued(None, issue(f"keyd-{kind}", public, pki.intermediate))
    calls: Counter[str] = Counter()
    ctx = client_context(pki.chain(client), keyd_private_op(keyd, handle, calls), [pki.root.pem])
    timings = []
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        server = keyd_server(version)
        started = time.perf_counter()
        assert get(ctx, server.port) == f"hello keyd-{kind}".encode()
        timings.append(time.perf_counter() - started)
        assert server.seen.get(timeout=10).subject == f"keyd-{kind}"
    if kind == "rsa":
        server = keyd_server(ssl.TLSVersion.TLSv1_2)
        server.client_sigalgs("RSA+SHA256")
        assert get(ctx, server.port) == b"hello keyd-rsa"
        assert calls == {"RSA-NO-PADDING": 2, "RSA-PKCS1": 1}
    else:
        assert calls == {"ECDSA": 2}
    logging.getLogger(__name__).info(
        "keyd %s: handshake + GET %s ms", kind, [round(t * 1000, 1) for t in timings]
    )
