"""keyd's rejected requests, through a real aziotd on its Unix socket.

spec/api.md §1.2–§1.4 (framing, processing order, api-versions), §3 (keyd), the keyd rows of §7,
§8 and §9. Every rejected request must:

* answer with the exact status, and the exact `message` where the spec gives one;
* carry `content-type: application/json` exactly (no parameters) and a `{"message": str}` body;
* put its whole head (status line + headers) in the client's first read, in under 512 bytes, as
  the original's synchronous key client requires (spec §1.6);
* leave every key file byte-for-byte as it was.

One daemon serves the whole module; the key store it holds after setup is the baseline that
every rejected request is compared against.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests import rawhttp
from tests.daemon import KEYD_VERSION, Keyd
from tests.keyd_texts import (
    GENERIC,
    INTERNAL,
    INVALID_HANDLE,
    MECHANISM,
    MISSING_BODY,
    NESTED,
    NOT_A_KEY,
    NOT_A_KEY_PAIR,
    NOT_ALLOWED,
    NOT_DERIVED,
    NOT_FOUND,
    SAME,
    SERDE_POSITION,
)

NOBODY = 65534  # a uid with a [[principal]] entry for `shared*` ids only


IV = base64.b64encode(bytes(range(12))).decode()
HANDLE_KEY_FILE = (
    "handlevalidationkey-40f1ca41fe8b50f53e10f3e3a580dcae24087f37aa498ba9903f2612b03e90ba.key"
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def nul_in_id(position: int) -> str:
    return (
        'parameter "id" has an invalid value\n'
        f"caused by: nul byte found in provided data at position: {position}"
    )


def unauthorized(key_id: str) -> str:
    return f"user {NOBODY} is not authorized to access the key {key_id}"


def check_head(reply: rawhttp.Reply) -> None:
    """Status line and headers in the first read, in under 512 bytes (spec §1.6)."""
    end = reply.first_read.find(b"\r\n\r\n")
    assert end >= 0, f"head not in the first read: {reply.first_read!r}"
    assert end + 4 < 512, f"head is {end + 4} bytes"
    assert reply.first_read.startswith(f"HTTP/1.1 {reply.status} ".encode())


def forge(key: bytes, sr: bytes) -> str:
    """A handle over any `sr` bytes, sealed with the daemon's own handle-validation key."""
    sig = hmac.new(key, sr, hashlib.sha256).digest()
    return f"sr={b64(sr)}&sig={b64(sig)}"


def sr_of(key_id: Any) -> bytes:
    nonce = b64(os.urandom(64))
    return json.dumps({"key_id": key_id, "nonce": nonce}, separators=(",", ":")).encode()


@attrs.define
class World:
    keyd: Keyd
    preloaded: Path
    handles: dict[str, str] = attrs.field(factory=dict)
    key_bytes: dict[str, bytes] = attrs.field(factory=dict)
    baseline: dict[str, bytes] = attrs.field(factory=dict)
    validation_key: bytes = b""

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        version: str | None = KEYD_VERSION,
        **options: Any,
    ) -> rawhttp.Reply:
        """One request on a fresh connection, as the synchronous key client sends it: no Host,
        only content-length and content-type; `version=None` sends no api-version at all."""
        target = path
        if version is not None:
            target += ("&" if "?" in path else "?") + f"api-version={version}"
        reply = rawhttp.request(self.keyd.socket, method, target, body, **options)
        check_head(reply)
        return reply

    def ok(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        reply = self.send(method, path, body, **options)
        assert reply.status == 200, (reply.status, reply.body)
        assert reply.headers.get("content-type") == "application/json"
        return reply.json()

    def expect(
        self,
        reply: rawhttp.Reply,
        status: int,
        message: str | None = None,
        *,
        prefix: str | None = None,
    ) -> str:
        """Assert a rejection; `message` exact, or `prefix` + serde's position for a 422."""
        assert reply.status == status, (reply.status, reply.body)
        assert reply.headers.get("content-type") == "application/json", reply.headers
        check_head(reply)
        body = reply.json()
        assert list(body) == ["message"], body
        text = body["message"]
        assert isinstance(text, str)
        if message is not None:
            assert text == message
        if prefix is not None:
            assert text.startswith(prefix), text
        if status == 422:
            assert SERDE_POSITION.search(text), text
        self.assert_unchanged()
        return text

    def assert_unchanged(self) -> None:
        """The key store is the baseline; if not, put the baseline back (so one failure does
        not cascade through the module) and fail."""
        now = self.keyd.snapshot()
        if now == self.baseline:
            return
        for name in set(now) - set(self.baseline):
            (self.keyd.keys_dir / name).unlink()
        for name, data in self.baseline.items():
            if now.get(name) != data:
                (self.keyd.keys_dir / name).write_bytes(data)
        assert now == self.baseline, "a rejected request changed the key store"

    def reject(
        self,
        method: str,
        path: str,
        body: Any,
        status: int,
        message: str | None = None,
        *,
        prefix: str | None = None,
        **options: Any,
    ) -> str:
        return self.expect(self.send(method, path, body, **options), status, message, prefix=prefix)

    def forged(self, key_id: Any) -> str:
        return forge(self.validation_key, sr_of(key_id))


PRINCIPALS = f"""
[[principal]]
uid = {NOBODY}
keys = ["shared*"]
"""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="aziot-keyd-errors-"))
    os.chmod(root, 0o755)  # uid NOBODY must reach the socket
    preloaded = root / "preloaded"
    preloaded.mkdir()
    (preloaded / "empty.key").write_bytes(b"")
    (preloaded / "a-directory").mkdir()
    config = PRINCIPALS + (
        "[preloaded_keys]\n"
        'hsm = "pkcs11:token=Key pairs;object=hsm?pin-value=1234"\n'
        f'empty = "file://{preloaded}/empty.key"\n'
        f'gone = "file://{preloaded}/gone.key"\n'
        f'dir = "file://{preloaded}/a-directory"\n'
    )
    keyd = Keyd(root / "keyd", extra_config=config).start()
    try:
        world = World(keyd, preloaded)
        handles = world.handles
        body = {"keyId": "sym", "usage": "derive,sign"}
        handles["sym"] = world.ok("POST", "/key", body)["keyHandle"]
        for name, size in (("short", 16), ("odd", 20)):
            world.key_bytes[name] = os.urandom(size)
            body = {"keyId": name, "usage": "encrypt", "keyBytes": b64(world.key_bytes[name])}
            handles[name] = world.ok("POST", "/key", body)["keyHandle"]
        for name, algorithm in (("ec", "ec-p256"), ("rsa", "rsa-2048")):
            body = {"keyId": name, "preferredAlgorithms": algorithm}
            handles[name] = world.ok("POST", "/keypair", body)["keyHandle"]
        body = {"baseKeyHandle": handles["sym"], "derivationData": b64(b"device-1")}
        handles["derived"] = world.ok("POST", "/derivedkey", body)["keyHandle"]
        world.validation_key = (keyd.keys_dir / HANDLE_KEY_FILE).read_bytes()
        world.baseline = keyd.snapshot()
        assert len(world.baseline) == 6  # the handle-validation key and the five above
        yield world
    finally:
        if keyd.process is not None:
            keyd.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- the harness itself ----------------------------------------------------------------------


def test_forged_handles_are_real_handles(world: World) -> None:
    """The forging helper seals exactly as keyd does, so 'missing key' cases below are real."""
    signatures = []
    for handle in (world.handles["sym"], world.forged({"Key": "sym"})):
        body = {
            "keyHandle": handle,
            "algorithm": "HMAC-SHA256",
            "parameters": {"message": b64(b"hello")},
        }
        signatures.append(world.ok("POST", "/sign", body))
    assert signatures[0] == signatures[1]
    world.assert_unchanged()


# -- §1.2: framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"host": "keyd.sock"}, {"host": ""}], ids=["no-host", "host", "empty-host"]
)
def test_host_is_not_needed(world: World, headers: dict[str, str]) -> None:
    """The synchronous key client sends no Host header; the async one sends `keyd.sock`."""
    reply = world.send("GET", "/key/sym", headers=headers)
    assert reply.status == 200, (reply.status, reply.headers, reply.body)
    assert reply.headers.get("content-type") == "application/json"
    message = "api-version not specified"
    world.reject("GET", "/nothing", None, 400, message, version=None, headers=headers)
    world.reject("GET", "/nothing", None, 404, NOT_FOUND, headers=headers)


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET /key/a b?api-version=2021-05-01 HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /key/sym?api-version=2021-05-01 HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n",
    ],
    ids=["garbage-request-line", "space-in-path", "header-without-colon"],
)
def test_unparseable_requests_get_a_bare_400_and_a_close(world: World, raw: bytes) -> None:
    """§1.2's exception: hyper answers these itself, with no content-type and no body."""
    with rawhttp.connect(world.keyd.socket) as sock:
        sock.sendall(raw)
        reply = rawhttp.read_reply(sock)
        assert sock.recv(16) == b""  # and the connection is closed
    assert reply.status == 400
    assert reply.headers.get("content-length") == "0"
    assert "content-type" not in reply.headers
    assert reply.body == b""
    check_head(reply)
    world.assert_unchanged()


# -- §1.3 steps 1–3: api-version -------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("path", ["/key/sym", "/sign", "/nothing", "/key/", "/"])
def test_api_version_is_required_even_for_unknown_paths(
    world: World, path: str, method: str
) -> None:
    body = {"keyId": "sym", "usage": "sign"}
    world.reject(method, path, body, 400, "api-version not specified", version=None)


@pytest.mark.parametrize(
    "query, shown",
    [
        ("api-version=2019-01-01", "2019-01-01"),
        ("api-version=2022-08-01", "2022-08-01"),  # identityd's, not keyd's
        ("api-version=", ""),
        ("api-version=2021-05-01+", "2021-05-01 "),  # `+` is a space
        ("api-version=2021-05-01%20", "2021-05-01 "),
        ("api-version=a%22b%5Cc", 'a\\"b\\\\c'),  # Rust debug quoting
        ("api-version=2021-05-01&api-version=bad", "bad"),  # the last one wins
        ("api-version=bad&foo=1", "bad"),
        ("api-version=%01", "\\u{1}"),
        ("api-version=%0A%09%0D", "\\n\\t\\r"),
        ("api-version=%7F", "\\u{7f}"),
        ("api-version=%FF", "\ufffd"),  # lossy UTF-8
        ("api-version=caf%C3%A9", "caf\u00e9"),
        ("api-version=it's", "it's"),
        # Rust's `{:?}` writes NUL as `\0` and escapes non-printable (Zs, Cc, Cf) characters.
        ("api-version=%00", "\\0"),
        ("api-version=a%C2%A0b", "a\\u{a0}b"),
        ("api-version=%C2%85", "\\u{85}"),
        ("api-version=%E2%80%8B", "\\u{200b}"),
    ],
)
@pytest.mark.parametrize("path", ["/key/sym", "/nothing"])
def test_invalid_api_version(world: World, path: str, query: str, shown: str) -> None:
    reply = world.send("GET", f"{path}?{query}", version=None)
    world.expect(reply, 400, f'invalid api-version "{shown}"')


@pytest.mark.parametrize(
    "query",
    [
        "api-version=bad&api-version=2021-05-01",
        "api-version=2021-05-01&api-version=2020-09-01",
        "api-version=2020-09-01",
        "api-version=2021%2D05%2D01",
        "foo=bar&api-version=2021-05-01",
    ],
)
def test_valid_api_version_variants_reach_the_route(world: World, query: str) -> None:
    reply = world.send("GET", f"/key/sym?{query}", version=None)
    assert reply.status == 200, reply.body
    assert reply.headers.get("content-type") == "application/json"
    # ... and the last api-version also decides between 404 and 400 on unknown paths.
    reply = world.send("GET", f"/nothing?{query}", version=None)
    world.expect(reply, 404, NOT_FOUND)


# -- §1.3 step 4: routing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nothing",
        "/keys",
        "/key/",
        "/keypair/",
        "/sign/",
        "/encrypt/",
        "/decrypt/",
        "/derivedkey/",
        "/derivedkey/export/",
        "/parameters/",
        "/parameters",
        "/key/sym/",
        "/key/a/b",
        "/keypair/a/b",
        "/KEY/sym",
        "/key//sym",
        "//key",
        "/key/%FF",  # not UTF-8 once decoded: the route does not match
        "/%6Bey/sym",  # routes match the raw path, before any decoding
        "/key%2Fsym",
        "/%73ign",
        "/parameters/%C3%28",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PATCH"])
def test_unknown_paths_are_404(world: World, path: str, method: str) -> None:
    world.reject(method, path, {"keyHandle": world.handles["sym"]}, 404, NOT_FOUND)


# -- §1.3 step 5: methods --------------------------------------------------------------------

EVERY_PATH = [
    "/key",
    "/keypair",
    "/derivedkey",
    "/derivedkey/export",
    "/sign",
    "/encrypt",
    "/decrypt",
    "/parameters/algorithm",
    "/key/sym",
    "/keypair/ec",
]


@pytest.mark.parametrize("method", ["PATCH", "OPTIONS", "TRACE", "FOO"])
@pytest.mark.parametrize("path", EVERY_PATH)
def test_other_methods_are_400(world: World, path: str, method: str) -> None:
    world.reject(method, path, {"keyId": "sym", "usage": "sign"}, 400, NOT_ALLOWED)
    world.reject(method, path, None, 400, NOT_ALLOWED)
    # Their bodies are never parsed.
    world.reject(method, path, None, 400, NOT_ALLOWED, raw_body=b"{bad")


@pytest.mark.parametrize("path", EVERY_PATH)
def test_head_is_400_with_the_length_of_a_body_it_does_not_send(world: World, path: str) -> None:
    target = f"{path}?api-version={KEYD_VERSION}"
    with rawhttp.connect(world.keyd.socket) as sock:
        sock.sendall(rawhttp.build("HEAD", target))
        reply = rawhttp.read_reply(sock, head_request=True)
        # Nothing follows the head: the next response on this connection starts cleanly.
        sock.sendall(rawhttp.build("GET", f"/key/sym?api-version={KEYD_VERSION}"))
        after = rawhttp.read_reply(sock)
    assert reply.status == 400
    assert reply.headers.get("content-type") == "application/json"
    assert reply.headers.get("content-length") == "32"  # len('{"message":"method not allowed"}')
    assert reply.first_read.endswith(b"\r\n\r\n")
    check_head(reply)
    assert after.status == 200
    world.assert_unchanged()


@pytest.mark.parametrize(
    "path, version, status, message",
    [
        ("/nothing", KEYD_VERSION, 404, NOT_FOUND),
        ("/key/", KEYD_VERSION, 404, NOT_FOUND),
        ("/key/sym", None, 400, "api-version not specified"),
        ("/nothing", "x", 400, 'invalid api-version "x"'),
    ],
)
def test_head_gets_the_head_of_any_earlier_error(
    world: World, path: str, version: str | None, status: int, message: str
) -> None:
    reply = world.send("HEAD", path, version=version)
    assert reply.status == status
    assert reply.headers.get("content-type") == "application/json"
    length = len(json.dumps({"message": message}, separators=(",", ":")))
    assert reply.headers.get("content-length") == str(length)
    assert reply.first_read.endswith(b"\r\n\r\n")
    world.assert_unchanged()


WRONG_METHODS = [
    ("GET", "/key"),
    ("GET", "/keypair"),
    ("GET", "/derivedkey"),
    ("GET", "/derivedkey/export"),
    ("GET", "/sign"),
    ("GET", "/encrypt"),
    ("GET", "/decrypt"),
    ("GET", "/parameters/algorithm"),
    ("DELETE", "/derivedkey"),
    ("DELETE", "/derivedkey/export"),
    ("DELETE", "/sign"),
    ("DELETE", "/encrypt"),
    ("DELETE", "/decrypt"),
    ("DELETE", "/parameters/algorithm"),
    ("DELETE", "/key/sym"),
    ("DELETE", "/keypair/ec"),
    ("PUT", "/key"),
    ("PUT", "/keypair"),
    ("PUT", "/sign"),
    ("PUT", "/key/sym"),
    ("PUT", "/keypair/ec"),
]


@pytest.mark.parametrize("method, path", WRONG_METHODS)
def test_methods_a_route_does_not_implement_are_400(world: World, method: str, path: str) -> None:
    good = {"keyHandle": world.handles["sym"], "keyId": "sym", "usage": "sign", "from": "x"}
    world.reject(method, path, good, 400, NOT_ALLOWED)
    world.reject(method, path, {}, 400, NOT_ALLOWED)  # any JSON will do, its shape is not checked


@pytest.mark.parametrize("method, path", [(m, p) for m, p in WRONG_METHODS if m != "GET"])
@pytest.mark.parametrize("raw", [b"{bad", b"[1,", b"{} {}"])
def test_a_malformed_body_is_422_before_the_method_check(
    world: World, method: str, path: str, raw: bytes
) -> None:
    world.reject(method, path, None, 422, raw_body=raw)


@pytest.mark.parametrize("path", ["/key", "/keypair", "/sign", "/key/sym", "/keypair/ec"])
def test_get_never_reads_a_body(world: World, path: str) -> None:
    reply = world.send("GET", path, None, raw_body=b"{bad")
    if path.count("/") == 2:
        assert reply.status == 200, reply.body  # a load, body ignored
        world.assert_unchanged()
    else:
        world.expect(reply, 400, NOT_ALLOWED)


# -- §1.3 step 5: bodies and content types ---------------------------------------------------


def good_bodies(world: World) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """A well-formed body for every route that needs one (each would succeed, or be a no-op)."""
    h = world.handles
    return {
        "create-key": ("POST", "/key", {"keyId": "sym", "usage": "sign"}),
        "delete-key": ("DELETE", "/key", {"keyHandle": h["sym"]}),
        "create-key-pair": ("POST", "/keypair", {"keyId": "ec"}),
        "delete-key-pair": ("DELETE", "/keypair", {"keyHandle": h["ec"]}),
        "move": ("POST", "/keypair/moved", {"from": "ec"}),
        "parameters": ("POST", "/parameters/algorithm", {"keyHandle": h["ec"]}),
        "derive": ("POST", "/derivedkey", {"baseKeyHandle": h["sym"], "derivationData": "AA=="}),
        "export": ("POST", "/derivedkey/export", {"keyHandle": h["derived"]}),
        "sign": (
            "POST",
            "/sign",
            {"keyHandle": h["sym"], "algorithm": "HMAC-SHA256", "parameters": {"message": ""}},
        ),
        "encrypt": (
            "POST",
            "/encrypt",
            {
                "keyHandle": h["sym"],
                "algorithm": "AEAD",
                "parameters": {"iv": IV, "aad": ""},
                "plaintext": "AA==",
            },
        ),
        "decrypt": (
            "POST",
            "/decrypt",
            {
                "keyHandle": h["sym"],
                "algorithm": "AEAD",
                "parameters": {"iv": IV, "aad": ""},
                "ciphertext": "AA==",
            },
        ),
    }


ROUTES = [
    "create-key",
    "delete-key",
    "create-key-pair",
    "delete-key-pair",
    "move",
    "parameters",
    "derive",
    "export",
    "sign",
    "encrypt",
    "decrypt",
]


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "application/json-patch+json",
        "json",
        "",
    ],
)
@pytest.mark.parametrize("route", ROUTES)
def test_a_non_json_content_type_drops_the_body(
    world: World, route: str, content_type: str
) -> None:
    method, path, body = good_bodies(world)[route]
    world.reject(method, path, body, 400, MISSING_BODY, content_type=content_type)


@pytest.mark.parametrize("route", ROUTES)
def test_no_body_is_400(world: World, route: str) -> None:
    method, path, _body = good_bodies(world)[route]
    world.reject(method, path, None, 400, MISSING_BODY)  # no content-length at all
    world.reject(method, path, None, 400, MISSING_BODY, raw_body=b"")  # content-length: 0
    world.reject(method, path, None, 400, MISSING_BODY, raw_body=b"", content_type=None)


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", " application/json ;x"],
)
@pytest.mark.parametrize("route", ROUTES)
def test_json_bodies_are_parsed_with_or_without_content_type(
    world: World, route: str, content_type: str | None
) -> None:
    method, path, _body = good_bodies(world)[route]
    world.reject(method, path, None, 422, raw_body=b"{bad", content_type=content_type)


def test_a_json_body_without_content_type_is_used(world: World) -> None:
    raw = json.dumps({"keyId": "sym", "usage": "sign"}).encode()
    reply = world.send("POST", "/key", None, raw_body=raw, content_type=None)
    assert reply.status == 200, reply.body  # create-if-not-exists on an existing key
    world.assert_unchanged()


@pytest.mark.parametrize("path", ["/key", "/keypair", "/sign", "/key/sym", "/parameters/x"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/jsonx"])
def test_put_with_a_non_json_content_type_is_415(
    world: World, path: str, content_type: str
) -> None:
    message = "request body must be application/json"
    world.reject("PUT", path, {}, 415, message, content_type=content_type)


@pytest.mark.parametrize("path", ["/key", "/key/sym"])
def test_put_bodies_are_always_parsed(world: World, path: str) -> None:
    eof = "EOF while parsing a value at line 1 column 0"
    world.reject("PUT", path, None, 422, eof)  # no body at all
    world.reject("PUT", path, None, 422, eof, raw_body=b"")
    world.reject("PUT", path, None, 422, eof, raw_body=b"", content_type=None)
    world.reject("PUT", path, {}, 400, NOT_ALLOWED, content_type="application/json; charset=utf-8")


def test_put_to_an_unknown_path_is_404_before_415(world: World) -> None:
    world.reject("PUT", "/nothing", {}, 404, NOT_FOUND, content_type="text/plain")


@pytest.mark.parametrize(
    "raw",
    [
        b"{bad",
        b'{"keyId":',
        b'{"keyId": "sym", "usage": "sign",}',
        b'{"keyId": "sym", "usage": "sign"} x',
        b'{"keyId": "sym"  "usage": "sign"}',
        b"   ",
        b"\n\n",
        b"\xff\xfe{}",
        b'{"keyId": "a\x01b", "usage": "sign"}',
        b"null",
        b"[]",
        b'"sym"',
        b"42",
        b"true",
    ],
)
@pytest.mark.parametrize("route", ROUTES)
def test_bad_json_is_422(world: World, route: str, raw: bytes) -> None:
    method, path, _body = good_bodies(world)[route]
    world.reject(method, path, None, 422, raw_body=raw)


MiB = 1 << 20


def test_a_body_of_exactly_1_mib_is_read(world: World) -> None:
    start = b'{"keyId": "sym", "usage": "bogus"}'
    raw = start + b" " * (MiB - len(start))
    world.reject("POST", "/key", None, 422, prefix="", raw_body=raw)


@pytest.mark.parametrize(
    "method, path", [("POST", "/key"), ("DELETE", "/keypair"), ("PUT", "/key")]
)
def test_a_body_over_1_mib_is_413(world: World, method: str, path: str) -> None:
    raw = b'{"keyId": "sym", "usage": "sign"}'
    raw += b" " * (MiB + 1 - len(raw))
    target = f"{path}?api-version={KEYD_VERSION}"
    with rawhttp.connect(world.keyd.socket) as sock:
        request = rawhttp.build(method, target, raw_body=raw)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # it may answer before reading it all
        reply = rawhttp.read_reply(sock)
    world.expect(reply, 413, "request body too large")


def test_a_chunked_body_over_1_mib_is_413(world: World) -> None:
    target = f"/key?api-version={KEYD_VERSION}"
    chunk = b" " * 0x10000
    with rawhttp.connect(world.keyd.socket) as sock:
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nhost: keyd.sock\r\ntransfer-encoding: chunked\r\n"
            "content-type: application/json\r\n\r\n".encode()
        )
        try:
            for _ in range(17):  # 17 × 64 KiB > 1 MiB
                sock.sendall(b"10000\r\n" + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = rawhttp.read_reply(sock)
    world.expect(reply, 413, "request body too large")


def test_a_slow_body_is_408_after_5_seconds(world: World) -> None:
    target = f"/key?api-version={KEYD_VERSION}"
    with rawhttp.connect(world.keyd.socket, timeout=15) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST {target} HTTP/1.1\r\nhost: keyd.sock\r\ncontent-length: 40\r\n"
            'content-type: application/json\r\n\r\n{"keyId": "sym", '.encode()
        )
        reply = rawhttp.read_reply(sock)
        elapsed = time.monotonic() - started
    world.expect(reply, 408, "deadline has elapsed")
    assert 4.5 <= elapsed < 7.5, elapsed


# -- §3.3 request shapes: missing fields, wrong types ----------------------------------------


def shape_cases(world: World) -> dict[str, tuple[str, str, Any, str]]:
    """(method, path, body, message prefix) of bodies serde refuses."""
    h = world.handles
    sym, ec = h["sym"], h["ec"]
    aead = {"iv": IV, "aad": ""}
    return {
        "key/no-keyId": ("POST", "/key", {"usage": "sign"}, "missing field `keyId`"),
        "key/no-usage": ("POST", "/key", {"keyId": "sym"}, "missing field `usage`"),
        "key/import-no-usage": (
            "POST",
            "/key",
            {"keyId": "sym", "keyBytes": b64(bytes(32))},
            "missing field `usage`",
        ),
        "key/keyId-number": ("POST", "/key", {"keyId": 5, "usage": "sign"}, "invalid type"),
        "key/keyId-null": ("POST", "/key", {"keyId": None, "usage": "sign"}, "invalid type"),
        "key/usage-list": ("POST", "/key", {"keyId": "sym", "usage": ["sign"]}, "invalid type"),
        "key/usage-null": ("POST", "/key", {"keyId": "sym", "usage": None}, "invalid type"),
        "key/keyBytes-number": (
            "POST",
            "/key",
            {"keyId": "sym", "usage": "sign", "keyBytes": 1},
            "invalid type",
        ),
        "keypair/no-keyId": ("POST", "/keypair", {"preferredAlgorithms": "*"}, "missing field"),
        "keypair/algorithms-number": (
            "POST",
            "/keypair",
            {"keyId": "ec", "preferredAlgorithms": 1},
            "invalid type",
        ),
        "delete-key/no-handle": ("DELETE", "/key", {}, "missing field `keyHandle`"),
        "delete-key/handle-number": ("DELETE", "/key", {"keyHandle": 1}, "invalid type"),
        "delete-keypair/no-handle": ("DELETE", "/keypair", {"handle": ec}, "missing field"),
        "move/no-from": ("POST", "/keypair/moved", {"to": "ec"}, "missing field `from`"),
        "move/from-null": ("POST", "/keypair/moved", {"from": None}, "invalid type"),
        "parameters/no-handle": ("POST", "/parameters/algorithm", {}, "missing field"),
        "derive/no-base": (
            "POST",
            "/derivedkey",
            {"derivationData": "AA=="},
            "missing field `baseKeyHandle`",
        ),
        "derive/no-data": (
            "POST",
            "/derivedkey",
            {"baseKeyHandle": sym},
            "missing field `derivationData`",
        ),
        "derive/data-null": (
            "POST",
            "/derivedkey",
            {"baseKeyHandle": sym, "derivationData": None},
            "invalid type",
        ),
        "export/no-handle": ("POST", "/derivedkey/export", {"key": "x"}, "missing field"),
        "sign/no-handle": (
            "POST",
            "/sign",
            {"algorithm": "HMAC-SHA256", "parameters": {"message": ""}},
            "missing field `keyHandle`",
        ),
        "sign/no-algorithm": (
            "POST",
            "/sign",
            {"keyHandle": sym, "parameters": {"message": ""}},
            "missing field",
        ),
        "sign/no-parameters": (
            "POST",
            "/sign",
            {"keyHandle": sym, "algorithm": "HMAC-SHA256"},
            "missing field",
        ),
        "sign/parameters-null": (
            "POST",
            "/sign",
            {"keyHandle": sym, "algorithm": "HMAC-SHA256", "parameters": None},
            "",
        ),
        "sign/no-message": (
            "POST",
            "/sign",
            {"keyHandle": sym, "algorithm": "HMAC-SHA256", "parameters": {"digest": ""}},
            "missing field `message`",
        ),
        "sign/no-digest": (
            "POST",
            "/sign",
            {"keyHandle": ec, "algorithm": "ECDSA", "parameters": {"message": ""}},
            "missing field `digest`",
        ),
        "encrypt/no-algorithm": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "plaintext": ""},
            "missing field",
        ),
        "encrypt/no-parameters": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "plaintext": ""},
            "missing field",
        ),
        "encrypt/no-iv": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": {"aad": ""}, "plaintext": ""},
            "missing field `iv`",
        ),
        "encrypt/no-aad": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": {"iv": IV}, "plaintext": ""},
            "missing field `aad`",
        ),
        "encrypt/no-plaintext": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead},
            "missing field `plaintext`",
        ),
        "encrypt/no-handle": (
            "POST",
            "/encrypt",
            {"algorithm": "AEAD", "parameters": aead, "plaintext": ""},
            "missing field `keyHandle`",
        ),
        "decrypt/no-iv": (
            "POST",
            "/decrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": {"aad": ""}, "ciphertext": ""},
            "missing field `iv`",
        ),
        "decrypt/no-aad": (
            "POST",
            "/decrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": {"iv": IV}, "ciphertext": ""},
            "missing field `aad`",
        ),
        "decrypt/no-ciphertext": (
            "POST",
            "/decrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead},
            "missing field `ciphertext`",
        ),
        "decrypt/no-parameters": (
            "POST",
            "/decrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "ciphertext": ""},
            "missing field",
        ),
    }


SHAPES = [
    "key/no-keyId", "key/no-usage", "key/import-no-usage", "key/keyId-number", "key/keyId-null",
    "key/usage-list", "key/usage-null", "key/keyBytes-number", "keypair/no-keyId",
    "keypair/algorithms-number", "delete-key/no-handle", "delete-key/handle-number",
    "delete-keypair/no-handle", "move/no-from", "move/from-null", "parameters/no-handle",
    "derive/no-base", "derive/no-data", "derive/data-null", "export/no-handle", "sign/no-handle",
    "sign/no-algorithm", "sign/no-parameters", "sign/parameters-null", "sign/no-message",
    "sign/no-digest", "encrypt/no-algorithm", "encrypt/no-parameters", "encrypt/no-iv",
    "encrypt/no-aad", "encrypt/no-plaintext", "encrypt/no-handle", "decrypt/no-iv",
    "decrypt/no-aad", "decrypt/no-ciphertext", "decrypt/no-parameters",
]  # fmt: skip


@pytest.mark.parametrize("case", SHAPES)
def test_shape_errors_are_422(world: World, case: str) -> None:
    method, path, body, prefix = shape_cases(world)[case]
    world.reject(method, path, body, 422, prefix=prefix)


@pytest.mark.parametrize(
    "method, path, body, field",
    [
        ("POST", "/key", {}, "keyId"),
        ("POST", "/key", {"keyId": "sym"}, "usage"),
        ("POST", "/keypair", {}, "keyId"),
        ("DELETE", "/key", {}, "keyHandle"),
        ("DELETE", "/keypair", {}, "keyHandle"),
        ("POST", "/keypair/moved", {}, "from"),
        ("POST", "/parameters/algorithm", {}, "keyHandle"),
        ("POST", "/derivedkey", {}, "baseKeyHandle"),
        ("POST", "/derivedkey/export", {}, "keyHandle"),
    ],
)
def test_missing_field_texts_are_serdes(
    world: World, method: str, path: str, body: Any, field: str
) -> None:
    """e.g. ``missing field `keyId` at line 1 column 2`` for `{}` (spec §1.3)."""
    column = len(json.dumps(body))
    message = f"missing field `{field}` at line 1 column {column}"
    world.reject(method, path, body, 422, message)


@pytest.mark.parametrize(
    "method, path, raw, field",
    [
        # The last value of each would be harmless, so a server that takes it changes nothing.
        ("POST", "/key", b'{"keyId": "other", "keyId": "sym", "usage": "sign"}', "keyId"),
        ("POST", "/key", b'{"keyId": "sym", "usage": "sign", "usage": "bogus"}', "usage"),
        (
            "POST",
            "/key",
            b'{"keyId": "sym", "usage": "sign", "keyBytes": "AAAA", "keyBytes": null}',
            "keyBytes",
        ),
        ("POST", "/keypair", b'{"keyId": "other", "keyId": "ec"}', "keyId"),
        ("POST", "/keypair/moved", b'{"from": "ec", "from": "missing"}', "from"),
        ("DELETE", "/key", b'{"keyHandle": "x", "keyHandle": "y"}', "keyHandle"),
    ],
)
def test_duplicate_fields_are_422(
    world: World, method: str, path: str, raw: bytes, field: str
) -> None:
    """serde's derived structs refuse a repeated field; a last-one-wins parser would act on it."""
    world.reject(method, path, None, 422, prefix=f"duplicate field `{field}`", raw_body=raw)


def test_a_bad_value_before_its_repeat_is_reported_first(world: World) -> None:
    """serde reads each value as it comes: a bad first value fails before the repeat is seen."""
    raw = b'{"keyId": "sym", "usage": "bogus", "usage": "sign"}'
    world.reject("POST", "/key", None, 422, prefix='invalid value: string "bogus"', raw_body=raw)


@pytest.mark.parametrize(
    "usage",
    ["", "verify", "sign,verify", "sign,", ",sign", "sign, encrypt", "Sign", "sign,,derive", "*"],
)
@pytest.mark.parametrize("imports", [False, True], ids=["generate", "import"])
def test_bad_usage_is_422(world: World, usage: str, imports: bool) -> None:
    """Even an import with good keyBytes is refused as a whole: nothing is overwritten."""
    body: dict[str, Any] = {"keyId": "sym", "usage": usage}
    if imports:
        body["keyBytes"] = b64(os.urandom(32))
    world.reject("POST", "/key", body, 422)


BAD_B64 = [
    "AAA",  # unpadded
    "AA",
    "A",
    "AAAAA",
    "AA=A",  # padding in the middle
    "A===",
    "====",
    "AA===",
    "AB==",  # non-canonical: trailing bits set
    "AAB=",
    "QUJDRB==",
    "AA-_",  # URL-safe alphabet
    "AA==\n",
    " AA==",
    "AA ==",
    "!!!!",
    "AAAA\u00e9AAA",
]


def b64_bodies(world: World, value: str) -> dict[str, tuple[str, str, Any]]:
    h = world.handles
    sym, ec = h["sym"], h["ec"]

    def aead(iv: str = IV, aad: str = "") -> dict[str, str]:
        return {"iv": iv, "aad": aad}

    return {
        "keyBytes": ("POST", "/key", {"keyId": "sym", "usage": "sign", "keyBytes": value}),
        "derivationData": ("POST", "/derivedkey", {"baseKeyHandle": sym, "derivationData": value}),
        "digest": (
            "POST",
            "/sign",
            {"keyHandle": ec, "algorithm": "ECDSA", "parameters": {"digest": value}},
        ),
        "message": (
            "POST",
            "/sign",
            {"keyHandle": sym, "algorithm": "HMAC-SHA256", "parameters": {"message": value}},
        ),
        "encrypt-iv": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead(iv=value), "plaintext": ""},
        ),
        "encrypt-aad": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead(aad=value), "plaintext": ""},
        ),
        "plaintext": (
            "POST",
            "/encrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead(), "plaintext": value},
        ),
        "rsa-plaintext": (
            "POST",
            "/encrypt",
            {"keyHandle": h["rsa"], "algorithm": "RSA-PKCS1", "plaintext": value},
        ),
        "decrypt-iv": (
            "POST",
            "/decrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead(iv=value), "ciphertext": ""},
        ),
        "decrypt-aad": (
            "POST",
            "/decrypt",
            {
                "keyHandle": sym,
                "algorithm": "AEAD",
                "parameters": aead(aad=value),
                "ciphertext": "",
            },
        ),
        "ciphertext": (
            "POST",
            "/decrypt",
            {"keyHandle": sym, "algorithm": "AEAD", "parameters": aead(), "ciphertext": value},
        ),
    }


B64_FIELDS = [
    "keyBytes", "derivationData", "digest", "message", "encrypt-iv", "encrypt-aad", "plaintext",
    "rsa-plaintext", "decrypt-iv", "decrypt-aad", "ciphertext",
]  # fmt: skip


@pytest.mark.parametrize("value", BAD_B64)
@pytest.mark.parametrize("field", B64_FIELDS)
def test_bad_base64_is_422(world: World, field: str, value: str) -> None:
    method, path, body = b64_bodies(world, value)[field]
    world.reject(method, path, body, 422)


@pytest.mark.parametrize(
    "path, algorithm, extra",
    [
        ("/sign", "RSA", {"parameters": {"digest": ""}}),
        ("/sign", "ecdsa", {"parameters": {"digest": ""}}),
        ("/sign", "HMAC-SHA512", {"parameters": {"message": ""}}),
        ("/sign", "hmac-sha256", {"parameters": {"message": ""}}),
        ("/sign", "RSA-PSS", {"parameters": {"digest": ""}}),
        ("/sign", "RSA-PKCS1", {"parameters": {"digest": ""}}),
        ("/sign", "AEAD", {"parameters": {"iv": IV, "aad": ""}}),
        ("/sign", "", {"parameters": {"message": ""}}),
        ("/sign", 1, {"parameters": {"message": ""}}),
        ("/encrypt", "AES", {"plaintext": ""}),
        ("/encrypt", "aead", {"parameters": {"iv": IV, "aad": ""}, "plaintext": ""}),
        ("/encrypt", "RSA-OAEP", {"plaintext": ""}),
        ("/encrypt", "RSA_PKCS1", {"plaintext": ""}),
        ("/encrypt", "ECDSA", {"plaintext": ""}),
        ("/encrypt", "HMAC-SHA256", {"parameters": {"message": ""}, "plaintext": ""}),
        ("/encrypt", None, {"plaintext": ""}),
        ("/decrypt", "AES-GCM", {"ciphertext": ""}),
        ("/decrypt", "RSA-OAEP", {"ciphertext": ""}),
        ("/decrypt", "", {"parameters": {"iv": IV, "aad": ""}, "ciphertext": ""}),
    ],
)
def test_unknown_algorithm_is_422(world: World, path: str, algorithm: Any, extra: Any) -> None:
    body = {"keyHandle": world.handles["sym"], "algorithm": algorithm, **extra}
    text = world.reject("POST", path, body, 422)
    if isinstance(algorithm, str) and algorithm:
        assert f"`{algorithm}`" in text


# -- §3.4: handles ---------------------------------------------------------------------------


def split(handle: str) -> tuple[str, str]:
    sr, sig = handle.split("&")
    assert sr.startswith("sr=") and sig.startswith("sig=")
    return sr[3:], sig[4:]


def replace_char(text: str, index: int) -> str:
    new = "B" if text[index] == "A" else "A"
    return text[:index] + new + text[index + 1 :]


def noncanonical_sig(handle: str) -> str:
    """Same HMAC bytes, but the 2 unused bits of the last symbol are set: strict decoders refuse."""
    sr, sig = split(handle)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-2])
    assert last & 3 == 0
    bent = sig[:-2] + alphabet[last | 1] + "="
    assert base64.b64decode(bent) == base64.b64decode(sig)
    return f"sr={sr}&sig={bent}"


def unpadded_sr(handle: str) -> str:
    sr, sig = split(handle)
    assert sr.endswith("=")  # `{"key_id":{"Key":"short"},…}` is 125 bytes: one `=`
    return f"sr={sr.rstrip('=')}&sig={sig}"


def urlsafe_sig(world: World) -> str:
    """A good handle with its sig in the URL-safe alphabet (same bytes, other symbols)."""
    while True:
        sr, sig = split(world.forged({"Key": "sym"}))
        if "+" in sig or "/" in sig:
            return f"sr={sr}&sig={sig.replace('+', '-').replace('/', '_')}"


TAMPERS: dict[str, Callable[[World], str]] = {
    "flip-sr": lambda w: "sr={}&sig={}".format(
        replace_char(split(w.handles["sym"])[0], 40), split(w.handles["sym"])[1]
    ),
    "flip-sr-start": lambda w: "sr={}&sig={}".format(
        replace_char(split(w.handles["ec"])[0], 2), split(w.handles["ec"])[1]
    ),
    "flip-sig": lambda w: "sr={}&sig={}".format(
        split(w.handles["sym"])[0], replace_char(split(w.handles["sym"])[1], 5)
    ),
    "swap-sig": lambda w: "sr={}&sig={}".format(
        split(w.handles["sym"])[0], split(w.handles["ec"])[1]
    ),
    "swap-sig-derived": lambda w: "sr={}&sig={}".format(
        split(w.handles["derived"])[0], split(w.handles["sym"])[1]
    ),
    "noncanonical-sig": lambda w: noncanonical_sig(w.handles["sym"]),
    "unpadded-sig": lambda w: w.handles["sym"].rstrip("="),
    "unpadded-sr": lambda w: unpadded_sr(w.handles["short"]),
    "no-sig": lambda w: w.handles["sym"].split("&")[0],
    "no-sr": lambda w: "&" + w.handles["sym"].split("&")[1],
    "empty": lambda w: "",
    "garbage": lambda w: "hello",
    "sr-sig-empty": lambda w: "sr=&sig=",
    "urlsafe-sig": lambda w: urlsafe_sig(w),
    "other-sealing-key": lambda w: forge(os.urandom(32), sr_of({"Key": "sym"})),
    "forged-not-json": lambda w: forge(w.validation_key, b"hello"),
    "forged-not-utf8": lambda w: forge(w.validation_key, b'{"key_id":{"Key":"\xff"}}'),
    "forged-unknown-kind": lambda w: w.forged({"Secret": "sym"}),
    "forged-bare-id": lambda w: w.forged("sym"),
    "forged-key-number": lambda w: w.forged({"Key": 5}),
    "forged-derived-bad-base": lambda w: w.forged(
        {"Derived": [TAMPERS["flip-sig"](w), list(b"data")]}
    ),
    "forged-derived-bad-data": lambda w: w.forged({"Derived": [w.handles["sym"], [256]]}),
}


def handle_requests(handle: str) -> dict[str, tuple[str, str, Any]]:
    aead = {"iv": IV, "aad": ""}
    return {
        "delete-key": ("DELETE", "/key", {"keyHandle": handle}),
        "delete-key-pair": ("DELETE", "/keypair", {"keyHandle": handle}),
        "parameters": ("POST", "/parameters/algorithm", {"keyHandle": handle}),
        "derive": ("POST", "/derivedkey", {"baseKeyHandle": handle, "derivationData": "AA=="}),
        "export": ("POST", "/derivedkey/export", {"keyHandle": handle}),
        "hmac": (
            "POST",
            "/sign",
            {"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": ""}},
        ),
        "ecdsa": (
            "POST",
            "/sign",
            {"keyHandle": handle, "algorithm": "ECDSA", "parameters": {"digest": b64(bytes(32))}},
        ),
        "aead-encrypt": (
            "POST",
            "/encrypt",
            {"keyHandle": handle, "algorithm": "AEAD", "parameters": aead, "plaintext": ""},
        ),
        "rsa-encrypt": (
            "POST",
            "/encrypt",
            {"keyHandle": handle, "algorithm": "RSA-PKCS1", "plaintext": ""},
        ),
        "aead-decrypt": (
            "POST",
            "/decrypt",
            {"keyHandle": handle, "algorithm": "AEAD", "parameters": aead, "ciphertext": ""},
        ),
    }


HANDLE_ROUTES = [
    "delete-key", "delete-key-pair", "parameters", "derive", "export", "hmac", "ecdsa",
    "aead-encrypt", "rsa-encrypt", "aead-decrypt",
]  # fmt: skip


@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("route", HANDLE_ROUTES)
def test_tampered_handles_are_refused(world: World, route: str, tamper: str) -> None:
    handle = TAMPERS[tamper](world)
    method, path, body = handle_requests(handle)[route]
    world.reject(method, path, body, 400, INVALID_HANDLE)


def test_handle_parts_in_any_order_and_extra_parts_are_accepted(world: World) -> None:
    """The parser splits on `&` and picks `sr=`/`sig=` out; a control for the cases above."""
    sr, sig = split(world.handles["sym"])
    for handle in (f"sig={sig}&sr={sr}", f"x=1&sr={sr}&y&sig={sig}"):
        method, path, body = handle_requests(handle)["hmac"]
        assert world.ok(method, path, body)["signature"]
    world.assert_unchanged()


WRONG_TYPES = [
    ("delete-key", "ec", NOT_A_KEY),
    ("delete-key", "rsa", NOT_A_KEY),
    ("delete-key", "derived", NOT_A_KEY),
    ("delete-key-pair", "sym", NOT_A_KEY_PAIR),
    ("delete-key-pair", "derived", NOT_A_KEY_PAIR),
    ("hmac", "ec", MECHANISM),
    ("hmac", "rsa", MECHANISM),
    ("ecdsa", "sym", MECHANISM),
    ("ecdsa", "derived", MECHANISM),
    ("ecdsa", "rsa", GENERIC),  # the library refuses ECDSA with an RSA key
    ("aead-encrypt", "ec", MECHANISM),
    ("aead-encrypt", "rsa", MECHANISM),
    ("rsa-encrypt", "sym", MECHANISM),
    ("rsa-encrypt", "derived", MECHANISM),
    ("rsa-encrypt", "ec", GENERIC),  # the library refuses RSA with an EC key
    ("aead-decrypt", "ec", MECHANISM),
    ("aead-decrypt", "rsa", MECHANISM),
    ("derive", "derived", NESTED),
    ("export", "sym", NOT_DERIVED),
    ("export", "ec", NOT_DERIVED),
    ("export", "rsa", NOT_DERIVED),
]


@pytest.mark.parametrize("route, kind, message", WRONG_TYPES)
def test_wrong_handle_types(world: World, route: str, kind: str, message: str) -> None:
    method, path, body = handle_requests(world.handles[kind])[route]
    world.reject(method, path, body, 400, message)


@pytest.mark.parametrize("algorithm", ["RSA-PKCS1", "RSA-NO-PADDING"])
@pytest.mark.parametrize("kind", ["sym", "derived", "rsa", "ec"])
def test_decrypt_has_no_rsa(world: World, kind: str, algorithm: str) -> None:
    body = {"keyHandle": world.handles[kind], "algorithm": algorithm, "ciphertext": b64(bytes(256))}
    world.reject("POST", "/decrypt", body, 400, MECHANISM)


def test_rsa_no_padding_on_a_symmetric_key_is_a_mechanism_error(world: World) -> None:
    body = {"keyHandle": world.handles["sym"], "algorithm": "RSA-NO-PADDING", "plaintext": ""}
    world.reject("POST", "/encrypt", body, 400, MECHANISM)


# -- §3.3 /parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind, status, message",
    [
        ("algorithm", "sym", 500, INTERNAL),  # a symmetric key's bytes are not a PEM
        ("ec-point", "sym", 500, INTERNAL),
        ("rsa-modulus", "short", 500, INTERNAL),
        ("algorithm", "derived", 500, INTERNAL),  # resolves to its base: symmetric
        ("ec-point", "rsa", 400, GENERIC),
        ("ec-curve-oid", "rsa", 400, GENERIC),
        ("rsa-modulus", "ec", 400, GENERIC),
        ("rsa-exponent", "ec", 400, GENERIC),
        ("curve", "ec", 400, GENERIC),
        ("ALGORITHM", "ec", 400, GENERIC),
        ("ec_point", "ec", 400, GENERIC),
        ("modulus", "rsa", 400, GENERIC),
        ("algorithm%20", "ec", 400, GENERIC),
        ("%00", "rsa", 400, GENERIC),
    ],
)
def test_parameter_errors(world: World, name: str, kind: str, status: int, message: str) -> None:
    body = {"keyHandle": world.handles[kind]}
    world.reject("POST", f"/parameters/{name}", body, status, message)


# -- §3.3 key ids: NUL, missing keys, loads --------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body, position",
    [
        ("POST", "/key", {"keyId": "a\u0000b", "usage": "sign"}, 1),
        ("POST", "/key", {"keyId": "\u0000", "usage": "encrypt", "keyBytes": "AAAA"}, 0),
        ("POST", "/keypair", {"keyId": "ec\u0000"}, 2),
        ("POST", "/keypair", {"keyId": "\u0000ec", "preferredAlgorithms": "ec-p256"}, 0),
        ("GET", "/key/a%00b", None, 1),
        ("GET", "/key/%00", None, 0),
        ("GET", "/keypair/ec%00", None, 2),
        ("POST", "/keypair/a%00b", {"from": "ec"}, 1),
        ("POST", "/keypair/moved", {"from": "e\u0000c"}, 1),
    ],
)
def test_nul_in_a_key_id_is_400(
    world: World, method: str, path: str, body: Any, position: int
) -> None:
    world.reject(method, path, body, 400, nul_in_id(position))


@pytest.mark.parametrize(
    "path",
    [
        "/key/missing",
        "/keypair/missing",
        "/key/a%2Fb",
        "/keypair/%E2%9C%93",
        "/key/gone",
        "/keypair/gone",
        "/key/handle-validation-keyx",
    ],
)
def test_loading_a_missing_key_is_400(world: World, path: str) -> None:
    world.reject("GET", path, None, 400, GENERIC)


@pytest.mark.parametrize("path", ["/keypair/sym", "/keypair/short", "/keypair/empty", "/key/empty"])
def test_loading_what_is_not_a_key_of_that_kind_is_500(world: World, path: str) -> None:
    world.reject("GET", path, None, 500, INTERNAL)


def test_operations_on_missing_keys_are_400(world: World) -> None:
    missing_key = world.forged({"Key": "missing"})
    missing_pair = world.forged({"KeyPair": "missing"})
    for route, handle in (
        ("hmac", missing_key),
        ("aead-encrypt", missing_key),
        ("aead-decrypt", missing_key),
        ("ecdsa", missing_pair),
        ("rsa-encrypt", missing_pair),
        ("parameters", missing_pair),
    ):
        method, path, body = handle_requests(handle)[route]
        world.reject(method, path, body, 400, GENERIC)
    # /derivedkey does not look at the base key; exporting from it does.
    body = {"baseKeyHandle": missing_key, "derivationData": "AA=="}
    derived = world.ok("POST", "/derivedkey", body)["keyHandle"]
    for route in ("export", "hmac", "aead-encrypt"):
        method, path, body = handle_requests(derived)[route]
        world.reject(method, path, body, 400, GENERIC)


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/key", {"keyId": "hsm", "usage": "sign"}),
        ("POST", "/key", {"keyId": "hsm", "usage": "encrypt", "keyBytes": b64(bytes(32))}),
        ("GET", "/key/hsm", None),
        ("POST", "/keypair", {"keyId": "hsm"}),
        ("GET", "/keypair/hsm", None),
    ],
)
def test_a_pkcs11_preloaded_key_without_a_library_is_400(
    world: World, method: str, path: str, body: Any
) -> None:
    world.reject(method, path, body, 400, GENERIC)


@pytest.mark.parametrize(
    "algorithms", ["", "dsa", "ec-p384", "EC-P256", "rsa-1024:ed25519", ":", "ec-p256 "]
)
def test_no_usable_algorithm_for_a_new_key_pair_is_400(world: World, algorithms: str) -> None:
    body = {"keyId": "brand-new", "preferredAlgorithms": algorithms}
    world.reject("POST", "/keypair", body, 400, GENERIC)


def test_io_failures_are_500(world: World) -> None:
    """The preloaded `dir` key is a directory: every read, write or delete of it fails."""
    world.reject("GET", "/key/dir", None, 500, INTERNAL)
    world.reject("GET", "/keypair/dir", None, 500, INTERNAL)
    world.reject("POST", "/key", {"keyId": "dir", "usage": "sign"}, 500, INTERNAL)
    world.reject("POST", "/keypair", {"keyId": "dir"}, 500, INTERNAL)
    for route, handle in (
        ("delete-key", world.forged({"Key": "dir"})),
        ("delete-key-pair", world.forged({"KeyPair": "dir"})),
        ("hmac", world.forged({"Key": "dir"})),
        ("parameters", world.forged({"KeyPair": "dir"})),
    ):
        method, path, body = handle_requests(handle)[route]
        world.reject(method, path, body, 500, INTERNAL)
    # A move onto it fails in rename(2) and leaves the source in place.
    world.reject("POST", "/keypair/dir", {"from": "rsa"}, 500, INTERNAL)
    assert (world.preloaded / "a-directory").is_dir()


# -- §3.3 move -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/keypair/ec", {"from": "ec"}, 400, SAME),
        ("/key/ec", {"from": "ec"}, 400, SAME),
        ("/keypair/a%20b", {"from": "a b"}, 400, SAME),
        ("/key/ec", {"from": "rsa"}, 400, 'invalid type "key"'),
        ("/key/moved", {"from": "ec"}, 400, 'invalid type "key"'),
        ("/key/moved", {"from": "missing"}, 400, 'invalid type "key"'),
        ("/keypair/moved", {"from": "missing"}, 500, INTERNAL),
        ("/keypair/rsa", {"from": "missing"}, 500, INTERNAL),  # the destination survives
    ],
)
def test_move_errors(world: World, path: str, body: Any, status: int, message: str) -> None:
    world.reject("POST", path, body, status, message)


def test_move_checks_the_body_first(world: World) -> None:
    world.reject("POST", "/key/ec", None, 400, MISSING_BODY)
    world.reject("POST", "/keypair/ec", None, 400, MISSING_BODY, raw_body=b"")
    world.reject("POST", "/key/ec", {"from": "ec"}, 400, MISSING_BODY, content_type="text/plain")
    world.reject("POST", "/key/ec", {}, 422, "missing field `from` at line 1 column 2")


# -- §3.3 AEAD and RSA failures --------------------------------------------------------------


def decrypt_body(world: World, handle: str, ciphertext: bytes, iv: str = IV, aad: str = "") -> Any:
    return {
        "keyHandle": handle,
        "algorithm": "AEAD",
        "parameters": {"iv": iv, "aad": aad},
        "ciphertext": b64(ciphertext),
    }


@pytest.mark.parametrize(
    "ciphertext",
    [
        b"",  # no version byte
        b"\x02",
        b"\x02" + bytes(15),  # fewer than 16 bytes after the version
        b"\x01" + bytes(15),
        b"\x00" + bytes(32),  # unknown versions
        b"\x03" + bytes(32),
        b"\xff" + bytes(48),
        b"A" + bytes(16),
    ],
)
@pytest.mark.parametrize("kind", ["sym", "derived"])
def test_malformed_aead_ciphertext_is_400(world: World, kind: str, ciphertext: bytes) -> None:
    body = decrypt_body(world, world.handles[kind], ciphertext)
    world.reject("POST", "/decrypt", body, 400, GENERIC)


def test_aead_tag_mismatch_is_500(world: World) -> None:
    sym = world.handles["sym"]
    body = {
        "keyHandle": sym,
        "algorithm": "AEAD",
        "parameters": {"iv": IV, "aad": b64(b"context")},
        "plaintext": b64(b"a secret"),
    }
    good = base64.b64decode(world.ok("POST", "/encrypt", body)["ciphertext"])
    assert good[0] == 2 and len(good) == 1 + 8 + 16
    plain = world.ok("POST", "/decrypt", decrypt_body(world, sym, good, aad=b64(b"context")))
    assert plain == {"plaintext": b64(b"a secret")}  # the control
    flipped_tag = good[:-1] + bytes([good[-1] ^ 1])
    flipped_ct = good[:1] + bytes([good[1] ^ 1]) + good[2:]
    legacy = b"\x01" + good[-16:] + good[1:-16]  # right bytes, but the v1 layout is tag-first...
    cases = [
        decrypt_body(world, sym, flipped_tag, aad=b64(b"context")),
        decrypt_body(world, sym, flipped_ct, aad=b64(b"context")),
        decrypt_body(world, sym, good, aad=b64(b"other")),
        decrypt_body(world, sym, good, aad=""),
        decrypt_body(world, sym, good, iv=b64(bytes(12)), aad=b64(b"context")),
        decrypt_body(world, world.handles["derived"], good, aad=b64(b"context")),
        decrypt_body(world, sym, b"\x02" + bytes(16)),  # nothing but a (wrong) tag
        decrypt_body(world, sym, b"\x01" + bytes(40)),
        decrypt_body(world, sym, legacy, aad=b64(b"other")),  # ... and the aad is wrong
    ]
    for case in cases:
        world.reject("POST", "/decrypt", case, 500, INTERNAL)


@pytest.mark.parametrize(
    "kind, path",
    [
        ("short", "/encrypt"),
        ("short", "/decrypt"),
        ("odd", "/encrypt"),
        ("odd", "/decrypt"),
    ],
)
def test_aead_with_a_key_that_is_not_32_bytes_is_500(world: World, kind: str, path: str) -> None:
    """AES-256-GCM takes 32-byte keys only: a 16- or 20-byte file key cannot be used."""
    iv = bytes(range(12))
    body = {
        "keyHandle": world.handles[kind],
        "algorithm": "AEAD",
        "parameters": {"iv": b64(iv), "aad": ""},
    }
    if path == "/encrypt":
        body["plaintext"] = b64(b"a secret")
    else:
        # What AES-128-GCM under the short key would accept, so only the key size can refuse it.
        key = world.key_bytes[kind]
        sealed = AESGCM(key).encrypt(iv, b"a secret", b"") if len(key) == 16 else bytes(24)
        body["ciphertext"] = b64(b"\x02" + sealed)
    world.reject("POST", path, body, 500, INTERNAL)


@pytest.mark.parametrize(
    "algorithm, plaintext",
    [
        ("RSA-NO-PADDING", b""),
        ("RSA-NO-PADDING", bytes(255)),
        ("RSA-NO-PADDING", bytes(257)),
        ("RSA-NO-PADDING", bytes(32)),
        ("RSA-NO-PADDING", b"\xff" * 256),  # right length, but not below the modulus
        ("RSA-PKCS1", bytes(246)),  # more than 256 - 11
        ("RSA-PKCS1", bytes(256)),
    ],
)
def test_rsa_size_errors_are_500(world: World, algorithm: str, plaintext: bytes) -> None:
    body = {"keyHandle": world.handles["rsa"], "algorithm": algorithm, "plaintext": b64(plaintext)}
    world.reject("POST", "/encrypt", body, 500, INTERNAL)


# -- §2.1 / §7: 401 for a uid without the key ------------------------------------------------


def request_as(world: World, uid: int, method: str, path: str, body: Any) -> rawhttp.Reply:
    """One request from a forked child that connects as `uid` (SO_PEERCRED is taken then)."""
    target = f"{path}?api-version={KEYD_VERSION}"
    request = rawhttp.build(method, target, body)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(0)  # the socket is root:root 0660
            os.setuid(uid)
            with rawhttp.connect(world.keyd.socket) as sock:
                sock.sendall(request)
                result: Any = rawhttp.read_reply(sock)
            status = 0
        except BaseException as error:  # reported to the parent
            result = RuntimeError(repr(error))
        try:
            with os.fdopen(write_end, "wb") as out:
                out.write(pickle.dumps(result))
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as source:
        data = source.read()
    _pid, code = os.waitpid(pid, 0)
    result = pickle.loads(data)
    if isinstance(result, BaseException):
        raise result
    assert code == 0
    check_head(result)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/key", {"keyId": "sym", "usage": "sign"}, 401, unauthorized("sym")),
        (
            "POST",
            "/key",
            {"keyId": "ec", "usage": "sign", "keyBytes": b64(bytes(32))},
            401,
            unauthorized("ec"),
        ),
        ("GET", "/key/sym", None, 401, unauthorized("sym")),
        ("GET", "/keypair/ec", None, 401, unauthorized("ec")),
        ("GET", "/key/missing", None, 401, unauthorized("missing")),
        ("POST", "/keypair", {"keyId": "ec"}, 401, unauthorized("ec")),
        ("POST", "/keypair", {"keyId": "sym"}, 401, unauthorized("sym")),  # would replace it
        ("POST", "/keypair/shared-dst", {"from": "ec"}, 401, unauthorized("ec")),
        ("POST", "/keypair/ec", {"from": "shared-src"}, 401, unauthorized("ec")),
        ("POST", "/keypair/rsa", {"from": "ec"}, 401, unauthorized("ec")),  # `from` first
        # The route-level checks of a move come before authorization.
        ("POST", "/keypair/ec", {"from": "ec"}, 400, SAME),
        ("POST", "/key/ec", {"from": "rsa"}, 400, 'invalid type "key"'),
        # An authorized id that does not exist: the library's 400, not a 401.
        ("GET", "/key/shared-missing", None, 400, GENERIC),
        ("GET", "/keypair/shared-missing", None, 400, GENERIC),
        ("GET", "/key/shared%00x", None, 400, nul_in_id(6)),
        ("POST", "/key", {"keyId": "shared\u0000", "usage": "sign"}, 400, nul_in_id(6)),
        ("POST", "/keypair/shared-dst", {"from": "shared-src"}, 500, INTERNAL),
    ],
)
def test_unauthorized_uids(
    world: World, method: str, path: str, body: Any, status: int, message: str
) -> None:
    reply = request_as(world, NOBODY, method, path, body)
    world.expect(reply, status, message)


def test_connection_level_errors_keep_the_socket_usable(world: World) -> None:
    """After a run of rejections on one keep-alive connection, a good request still works."""
    target = f"?api-version={KEYD_VERSION}"
    with rawhttp.connect(world.keyd.socket) as sock:
        for method, path, body, status in (
            ("POST", "/key", {}, 422),
            ("PATCH", "/key", None, 400),
            ("GET", "/nothing", None, 404),
            ("POST", "/sign", {"keyHandle": "x", "algorithm": "ECDSA", "parameters": {}}, 422),
            (
                "POST",
                "/decrypt",
                {"keyHandle": "x", "algorithm": "RSA-PKCS1", "ciphertext": ""},
                400,
            ),
            ("GET", "/key/sym", None, 200),
        ):
            sock.sendall(rawhttp.build(method, path + target, body))
            reply = rawhttp.read_reply(sock)
            check_head(reply)
            assert reply.status == status, (method, path, reply.body)
            assert reply.headers.get("content-type") == "application/json"
    world.assert_unchanged()


@pytest.mark.parametrize(
    "path, raw, message",
    [
        ("/derivedkey/export", b"[]", "invalid length 0, expected struct Request with 1 element"),
        ("/key", b'["sym", null]', "invalid length 2, expected struct Request with 3 elements"),
        ("/keypair", b'["a", null, "b"]', "trailing characters"),
        ("/derivedkey", b"[5, 6]", "invalid type: integer `5`, expected a string"),
        ("/sign", b'["h", "HMAC-SHA256", {"message": ""}]', "invalid type: sequence"),
        ("/key", b'{"keyId": "sym", "usage": "sign,Derive"}', 'invalid value: string "Derive"'),
    ],
)
def test_struct_bodies_as_json_arrays_are_checked_as_serde_checks_them(
    world: World, path: str, raw: bytes, message: str
) -> None:
    """serde's derived structs take a JSON array of their fields in declared order, except the
    ones with a flattened field (sign, encrypt, decrypt)."""
    world.reject("POST", path, None, 422, prefix=message, raw_body=raw)


def test_a_struct_body_may_be_a_json_array_of_its_fields_but_not_sign_parameters(
    world: World,
) -> None:
    reply = world.send("POST", "/key", None, raw_body=json.dumps(["short", None, "sign"]).encode())
    assert reply.status == 200, reply.body
    base = reply.json()["keyHandle"]
    reply = world.send("POST", "/derivedkey", None, raw_body=json.dumps([base, "eA=="]).encode())
    assert reply.status == 200, reply.body
    sign = {
        "keyHandle": reply.json()["keyHandle"],
        "algorithm": "HMAC-SHA256",
        "parameters": [b64(b"msg")],
    }
    # Not the adjacently tagged `parameters`: serde_derive gives an untagged struct variant no
    # sequence form (and the flattened request buffers it), so only the map form is read.
    world.reject(
        "POST",
        "/sign",
        sign,
        422,
        prefix="invalid type: sequence, expected struct variant Parameters::HmacSha256 at ",
    )
    sign["parameters"] = {"message": b64(b"msg")}
    reply = world.send("POST", "/sign", sign)
    assert reply.status == 200, reply.body
    derived = hmac.new(world.key_bytes["short"], b"x", hashlib.sha256).digest()
    want = hmac.new(derived, b"msg", hashlib.sha256).digest()
    assert base64.b64decode(reply.json()["signature"]) == want
    world.assert_unchanged()
