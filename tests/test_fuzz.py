"""Hypothesis fuzzing of every keyd endpoint against a real aziotd (file keys) on its Unix socket.

Issue: "hypothesis-driven requests against every endpoint (random JSON shapes, bytes, headers,
paths, methods, api-versions): no 500 except where the original answers 500, no crash, no hang,
store unchanged by rejected requests."

How it works. Every example is one request on a fresh connection with a 10 s timeout (a hang is a
failure). `expect()` is a model of the original written from spec/api.md (§1.2–§1.3 framing and
processing order, §3 keyd, §7 status table, §9 sharp edges) that knows the key store the module
fixture built. For a request it gives every status the original can answer and, per status, the
exact message where the spec gives one, which key files a success may change, and an independent
check of what a success returned (HMACs recomputed, ECDSA and RSA signatures verified, AEAD
ciphertexts opened, public parameters recomputed with `cryptography` in the test process, handles
opened with the handle-validation key). A 500 is allowed only where the spec says the original
answers 500: an I/O failure (here: a key id whose file name is longer than NAME_MAX), a symmetric
key's file loaded as a key pair, AES-GCM with a key that is not 32 bytes or an IV OpenSSL refuses,
an AEAD tag mismatch, RSA input sizes, a move whose source is missing. 503/504 are never allowed.

After every example: the daemon is still running, the response head came in the client's first
read (spec §1.6), error bodies are exactly `{"message": str}`, the daemon logged no traceback, and
the key store equals the baseline; after a success only the files the model allows may differ, and
the baseline is then put back so that every example starts from the same store.

The tests at the end of the file pin, each with its reproduction, the differences from the
original that this fuzzing found and that are now fixed. `Unmodelled` drops examples the model
cannot judge honestly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from hypothesis import HealthCheck, Phase, event, given, reject, settings
from hypothesis import strategies as st

from tests import rawhttp
from tests.daemon import Keyd
from tests.fuzz_common import Answered, Unmodelled, check_head, form_decode, percent_decode
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
from tests.openssl_gcm import openssl_open, openssl_seal

API_VERSIONS = ("2020-09-01", "2021-05-01")
NAME_MAX = 255  # a key file name longer than this fails in open(2): the original's 500

P256_OID_B64 = "BggqhkjOPQMBBw=="
HANDLE_VALIDATION_KEY = "handle-validation-key"
PARAMETER_NAMES = ("algorithm", "ec-curve-oid", "ec-point", "rsa-modulus", "rsa-exponent")

# Every example is judged on its own; the examples are derived from the test's name so that a
# failure reproduces on every run, and nothing is stored between runs.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
# The pinning tests stop at the first failing example: shrinking it would only cost time.
PIN = settings(FUZZ, max_examples=8, phases=[Phase.explicit, Phase.generate])


# -- the model: outcomes ---------------------------------------------------------------------

Store = dict[str, bytes]
Check = Callable[[Any, Store], None]  # (the JSON of a 200 answer or None, the store after)


@attrs.frozen
class Answer:
    """What the original says with one status."""

    message: str | None = None  # the exact error message, where the spec gives it
    prefix: str | None = None
    changes: frozenset[str] = frozenset()  # key files a success may change
    check: Check | None = None


Expect = dict[int, Answer]


def error(status: int, message: str | None = None, *, prefix: str | None = None) -> Expect:
    return {status: Answer(message=message, prefix=prefix)}


def success(status: int, changes: tuple[str, ...] = (), check: Check | None = None) -> Expect:
    return {status: Answer(changes=frozenset(changes), check=check)}


def anyof(*choices: Expect) -> Expect:
    """Any of several outcomes (where the spec leaves the order of two checks open)."""
    merged: Expect = {}
    for choice in choices:
        for status, answer in choice.items():
            if status in merged and merged[status] != answer:
                answer = Answer(changes=merged[status].changes | answer.changes)
            merged[status] = answer
    return merged


class Malformed(Exception):
    """serde would refuse the body: 422."""


# -- the model: key files (spec §3.5) --------------------------------------------------------


def file_name(key_id: str) -> str:
    alnum = "".join(c for c in key_id if c.isascii() and c.isalnum())
    return f"{alnum}-{hashlib.sha256(key_id.encode('utf-8')).hexdigest()}.key"


def too_long(key_id: str) -> bool:
    return len(file_name(key_id)) > NAME_MAX


def check_writable(key_id: str) -> None:
    """The daemon writes a key through a temp file named `.<name>.<8 random>.tmp`: 14 bytes
    longer than the key file's name, so it fails for names of 242 to 255 bytes."""
    return  # fixed: the temp file's name no longer grows with the key file's


def nul_message(key_id: str) -> str:
    """CString::new's error: the position is a byte offset into the UTF-8 id."""
    position = key_id.encode("utf-8").index(b"\0")
    return (
        'parameter "id" has an invalid value\n'
        f"caused by: nul byte found in provided data at position: {position}"
    )


def check_nul(key_id: str) -> None:
    if "\0" not in key_id:
        return
    raise Answered(error(400, nul_message(key_id)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64_strict(text: str) -> bytes | None:
    """Rust's STANDARD engine: standard alphabet, padding required, canonical trailing bits."""
    if not all(c.isascii() and (c.isalnum() or c in "+/=") for c in text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    return raw if b64(raw) == text else None


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# -- the model: handles (spec §3.4) ----------------------------------------------------------


@attrs.frozen
class Ref:
    kind: str  # "Key", "KeyPair", "Derived"
    key_id: str = ""
    base: str = ""  # Derived: the base handle, as given
    data: bytes = b""
    base_ref: Ref | None = None


# -- the world: one daemon and the key store it starts every example with --------------------


@attrs.define(repr=False)
class World:
    keyd: Keyd
    validation_key: bytes = b""
    handles: dict[str, str] = attrs.field(factory=dict)
    baseline: Store = attrs.field(factory=dict)
    parsed: dict[str, Any] = attrs.field(factory=dict)
    log_offset: int = 0

    def __repr__(self) -> str:
        return f"World({self.keyd.root})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # how hypothesis shows a failing example's arguments

    # The store as the model sees it.

    def content(self, key_id: str) -> bytes | None:
        return self.baseline.get(file_name(key_id))

    def kind(self, key_id: str) -> str:
        """What the id's file holds: missing, empty, secret (not a private key PEM), ec or rsa."""
        data = self.content(key_id)
        if data is None:
            return "missing"
        if not data:
            return "empty"
        name = file_name(key_id)
        if name not in self.parsed:
            try:
                key: Any = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                key = None
            self.parsed[name] = key
        key = self.parsed[name]
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return "ec"
        return "rsa" if isinstance(key, rsa.RSAPrivateKey) else "secret"

    def private_key(self, key_id: str) -> Any:
        self.kind(key_id)
        return self.parsed[file_name(key_id)]

    def forge(self, key_id: Any, nonce: str | None = None) -> str:
        """A handle sealed with the daemon's own handle-validation key, as keyd seals them."""
        sr = {"key_id": key_id, "nonce": nonce or b64(os.urandom(64))}
        body = json.dumps(sr, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return f"sr={b64(body)}&sig={b64(hmac_sha256(self.validation_key, body))}"

    def open(self, handle: str) -> Ref | None:
        """What the original makes of a handle: None for "invalid handle"."""
        # Every sr= and sig= part is decoded (a bad one is refused even if a later one is
        # good); the last of each counts (aziot-keyd's key_handle_to_id).
        parts = handle.split("&")
        srs = [b64_strict(p[3:]) for p in parts if p.startswith("sr=")]
        sigs = [b64_strict(p[4:]) for p in parts if p.startswith("sig=")]
        if not srs or not sigs or None in srs or None in sigs:
            return None
        body, signature = srs[-1], sigs[-1]
        try:
            for sr in srs:
                sr.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not hmac.compare_digest(hmac_sha256(self.validation_key, body), signature):
            return None
        # Only handles keyd minted and the well-formed ones this file forges get this far.
        ((kind, value),) = json.loads(body)["key_id"].items()
        if kind in ("Key", "KeyPair"):
            if "\0" in value or has_surrogate(value):
                # serde refuses a lone surrogate escape, CString::new a NUL
                raise Answered(error(400, prefix='parameter "handle" has an invalid value'))
            return Ref(kind, value)
        base, data = value
        base_ref = self.open(base)
        if base_ref is None:
            return None
        return Ref("Derived", base=base, data=bytes(data), base_ref=base_ref)

    # Sending and judging.

    def send(self, wire: bytes, head: bool = False) -> rawhttp.Reply:
        with rawhttp.connect(self.keyd.socket, timeout=10.0) as sock:
            sock.sendall(wire)
            return rawhttp.read_reply(sock, head_request=head)

    def exchange(self, request: Request) -> rawhttp.Reply:
        """Send `request`, compare the answer with the model's, and start the next example from
        the baseline store whatever happened."""
        try:
            want = expect(self, request)
        except Unmodelled as skipped:
            event(f"dropped: {skipped}")
            reject()
        try:
            reply = self.send(request.wire(), head=request.method == "HEAD")
            found = route(request.path)
            method = request.method if request.method in KNOWN_METHODS else "other"
            event(f"{method} {found[0] if found else '-'} -> {reply.status}")
            self.judge(request, want, reply)
            return reply
        finally:
            self.restore()

    def judge(self, request: Request, want: Expect, reply: rawhttp.Reply) -> None:
        what = f"{request.describe()}\n  -> {reply.status} {reply.body[:300]!r}"
        assert self.keyd.process is not None and self.keyd.process.poll() is None, (
            f"aziotd exited after {what}"
        )
        assert reply.status in want, f"{what}\n  the original answers {sorted(want)}"
        check_head(reply)
        answer = want[reply.status]
        status = reply.status
        if status >= 400:
            assert reply.headers.get("content-type") == "application/json", what
            if request.method == "HEAD":
                assert reply.body == b""
                if answer.message is not None:
                    length = len(json.dumps({"message": answer.message}, separators=(",", ":")))
                    assert reply.headers.get("content-length") == str(length), what
            else:
                body = json.loads(reply.body)
                assert isinstance(body, dict) and list(body) == ["message"], what
                text = body["message"]
                assert isinstance(text, str), what
                if answer.message is not None:
                    assert text == answer.message, what
                if answer.prefix is not None:
                    assert text.startswith(answer.prefix), what
                if status == 422:
                    assert SERDE_POSITION.search(text), what
        elif status == 204:
            assert reply.body == b"" and "content-type" not in reply.headers, what
        else:
            assert reply.headers.get("content-type") == "application/json", what
        after = self.keyd.snapshot()
        if 200 <= status < 300:
            changed = {
                name
                for name in set(after) | set(self.baseline)
                if after.get(name) != self.baseline.get(name)
            }
            assert changed <= answer.changes, f"{what}\n  changed {sorted(changed)}"
            if answer.check is not None:
                answer.check(reply.json() if status == 200 else None, after)
        else:
            assert after == self.baseline, f"{what}\n  a rejected request changed the key store"
        self.check_log(what)

    def check_log(self, what: str) -> None:
        with self.keyd.log.open("rb") as log:
            log.seek(self.log_offset)
            new = log.read()
        self.log_offset += len(new)
        assert b"Traceback" not in new, f"{what}\n  aziotd logged:\n{new.decode(errors='replace')}"

    def restore(self) -> None:
        """Put the baseline store back; each file is replaced (new inode), so the daemon's
        cache of parsed key files, keyed by inode, size and mtime, cannot keep a stale entry."""
        now = self.keyd.snapshot()
        if now == self.baseline:
            return
        keys_dir = self.keyd.keys_dir
        for name in set(now) - set(self.baseline):
            (keys_dir / name).unlink()
        for name, data in self.baseline.items():
            if now.get(name) != data:
                temp = keys_dir.parent / f"restore-{name}"
                temp.write_bytes(data)
                os.chmod(temp, 0o600)
                os.replace(temp, keys_dir / name)
        assert self.keyd.snapshot() == self.baseline

    def alive(self) -> None:
        """The daemon still runs and still answers a good request."""
        reply = self.send(Request("GET", "/key/sym", "api-version=2021-05-01").wire())
        assert reply.status == 200, reply.body
        assert self.keyd.process is not None and self.keyd.process.poll() is None


@attrs.frozen
class Request:
    method: str
    path: str
    query: str | None  # None: no `?` at all
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None  # None: no content-length, no body
    content_type: str | None = "application/json"  # sent with a body only

    @property
    def target(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body is not None:
            lines.append(f"content-length: {len(self.body)}")
            if self.content_type is not None:
                lines.append(f"content-type: {self.content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (self.body or b"")

    def describe(self) -> str:
        return repr(self.wire()[:2000])


# -- the model: framing and routing (spec §1.3) ----------------------------------------------

MISSING = object()  # "no body" in the original's sense
KNOWN_METHODS = ("GET", "POST", "DELETE", "PUT", "HEAD")


def api_version(query: str | None) -> str | None:
    """application/x-www-form-urlencoded, the last `api-version` wins (spec §1.3 step 1)."""
    found = None
    for pair in (query or "").split("&"):
        name, _, value = pair.partition("=")
        if pair and form_decode(name) == "api-version":
            found = form_decode(value)
    return found


ID = "([^/]+)"
ROUTES = [
    ("key", re.compile("/key")),
    ("keypair", re.compile("/keypair")),
    ("derivedkey", re.compile("/derivedkey")),
    ("decrypt", re.compile("/decrypt")),
    ("encrypt", re.compile("/encrypt")),
    ("export", re.compile("/derivedkey/export")),
    ("parameters", re.compile(f"/parameters/{ID}")),
    ("id", re.compile(f"/(key|keypair)/{ID}")),
    ("sign", re.compile("/sign")),
]


def route(path: str) -> tuple[str, tuple[str, ...]] | None:
    for name, pattern in ROUTES:
        found = pattern.fullmatch(path)
        if found is None:
            continue
        try:
            return name, tuple(percent_decode(g).decode("utf-8") for g in found.groups())
        except UnicodeDecodeError:
            continue
    return None


def parse_json(raw: bytes) -> Any:
    """serde_json's verdict on a body; Malformed when it refuses it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed from None

    def constant(name: str) -> Any:
        raise Malformed  # NaN, Infinity, -Infinity are not JSON

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            # serde refuses a repeated field but skips repeated unknown keys: not modelled.
            raise Unmodelled("repeated object keys")
        return dict(items)

    try:
        value = json.loads(text, parse_constant=constant, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        raise Malformed from None
    if depth(value) > 127 or has_surrogate(value):
        raise Malformed
    return value


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_surrogate(v) for v in value)
    return False


def expect(world: World, request: Request) -> Expect:
    """Every answer the original can give to `request`, in the spec's processing order."""
    version = api_version(request.query)
    if version is None:
        return error(400, "api-version not specified")
    if version not in API_VERSIONS:
        return error(400, prefix='invalid api-version "')
    found = route(request.path)
    if found is None:
        return error(404, NOT_FOUND)
    name, params = found
    method = request.method
    body: Any = MISSING
    if method in ("POST", "DELETE", "PUT"):
        media = None
        if request.body is not None and request.content_type is not None:
            media = request.content_type.split(";", 1)[0].strip()
        is_json = media is None or media == "application/json"
        if method == "PUT" and not is_json:
            return error(415, "request body must be application/json")
        raw = request.body or b""
        if method == "PUT" or (raw and is_json):
            try:
                body = parse_json(raw)
            except Malformed:
                return error(422)
    elif method != "GET":
        return error(400, NOT_ALLOWED)
    handler = HANDLERS[name].get(method)
    if handler is None:
        return error(400, NOT_ALLOWED)
    try:
        return handler(world, params, body)
    except Malformed:
        return error(422)
    except Answered as answered:
        return answered.expect


# -- the model: request bodies as serde reads them -------------------------------------------


def struct(body: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """A derived struct: a JSON object, or (serde_json) a JSON array of its fields in their
    declared order (aziot-key-common-http)."""
    if body is MISSING:
        raise Answered(error(400, MISSING_BODY))
    if isinstance(body, dict):
        return body
    if isinstance(body, list) and len(body) == len(names):
        return dict(zip(names, body, strict=True))
    raise Malformed


def flat_struct(body: Any) -> dict[str, Any]:
    """A struct with a #[serde(flatten)] field (sign, encrypt, decrypt): JSON objects only."""
    if body is MISSING:
        raise Answered(error(400, MISSING_BODY))
    if isinstance(body, dict):
        return body
    raise Malformed


def string_field(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise Malformed
    return value


def optional_string(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise Malformed
    return value


def base64_field(fields: dict[str, Any], name: str) -> bytes:
    value = b64_strict(string_field(fields, name))
    if value is None:
        raise Malformed
    return value


def choice(fields: dict[str, Any], name: str, variants: tuple[str, ...]) -> str:
    value = string_field(fields, name)
    if value not in variants:
        raise Malformed
    return value


def variant_content(fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, bytes]:
    """The `parameters` of an adjacently tagged struct variant (all fields base64): a JSON
    object only, as serde_derive reads a variant's content in its untagged form (no visit_seq)."""
    content = fields.get("parameters")
    if not isinstance(content, dict):
        raise Malformed
    return {name: base64_field(content, name) for name in names}


# -- the model: keys as the library finds them -----------------------------------------------


def require_secret(world: World, key_id: str) -> bytes:
    """A symmetric key's bytes (any file will do), or the library's error."""
    if too_long(key_id):
        raise Answered(error(500, INTERNAL))
    data = world.content(key_id)
    if data is None:
        raise Answered(error(400, GENERIC))
    if not data:
        raise Answered(error(500, INTERNAL))
    return data


def require_pair(world: World, key_id: str) -> Any:
    if too_long(key_id):
        raise Answered(error(500, INTERNAL))
    kind = world.kind(key_id)
    if kind == "missing":
        raise Answered(error(400, GENERIC))
    if kind in ("empty", "secret"):
        raise Answered(error(500, INTERNAL))  # not a PEM: openssl's error, external
    return world.private_key(key_id)


def require_handle(world: World, handle: str) -> Ref:
    ref = world.open(handle)
    if ref is None:
        raise Answered(error(400, INVALID_HANDLE))
    return ref


def base_id(ref: Ref) -> str:
    if ref.kind != "Derived":
        return ref.key_id
    assert ref.base_ref is not None
    if ref.base_ref.kind == "Derived":
        raise Unmodelled("nested derived handle")
    return ref.base_ref.key_id


def aead_key(world: World, ref: Ref) -> bytes:
    if ref.kind == "Key":
        return require_secret(world, ref.key_id)
    return hmac_sha256(require_secret(world, base_id(ref)), ref.data)


def check_handle(world: World, want: Ref) -> Check:
    def check(body: Any, store: Store) -> None:
        assert list(body) == ["keyHandle"] and isinstance(body["keyHandle"], str), body
        got = world.open(body["keyHandle"])
        assert got is not None, f"keyd's own handle does not open: {body}"
        assert (got.kind, got.key_id, got.base, got.data) == (
            want.kind,
            want.key_id,
            want.base,
            want.data,
        ), (got, want)

    return check


def both(*checks: Check) -> Check:
    def check(body: Any, store: Store) -> None:
        for one in checks:
            one(body, store)

    return check


def returns(field: str, value: str) -> Check:
    def check(body: Any, store: Store) -> None:
        assert body == {field: value}, (body, value)

    return check


# -- the model: keyd's routes (spec §3.3) ----------------------------------------------------

USAGES = ("derive", "encrypt", "sign")
ALGORITHMS = {"ec-p256": ["ec-p256"], "rsa-2048": ["rsa-2048"], "rsa-4096": ["rsa-4096"]}


def parse_algorithms(text: str | None) -> list[str]:
    if text is None:
        return ["ec-p256", "rsa-2048"]
    result: list[str] = []
    for part in text.split(":"):
        for algorithm in ["ec-p256", "rsa-2048"] if part == "*" else ALGORITHMS.get(part, []):
            if algorithm not in result:
                result.append(algorithm)
    return result


def create_key(world: World, params: tuple[str, ...], body: Any) -> Expect:
    fields = struct(body, ("keyId", "keyBytes", "usage"))
    key_id = string_field(fields, "keyId")
    usage = string_field(fields, "usage")
    if any(token not in USAGES for token in usage.split(",")):
        raise Malformed
    key_bytes = None
    if fields.get("keyBytes") is not None:
        key_bytes = base64_field(fields, "keyBytes")
    check_nul(key_id)
    if too_long(key_id):
        return error(500, INTERNAL)
    name = file_name(key_id)
    handle = check_handle(world, Ref("Key", key_id))
    if key_bytes is not None or world.kind(key_id) in ("missing", "empty"):
        check_writable(key_id)
    if key_bytes is not None:
        if not key_bytes:
            raise Unmodelled("importing empty keyBytes: a 500 after the empty file is written")

        def imported(body: Any, store: Store) -> None:
            assert store.get(name) == key_bytes, "an import stored other bytes than keyBytes"

        return success(200, (name,), both(handle, imported))
    if world.kind(key_id) in ("missing", "empty"):

        def generated(body: Any, store: Store) -> None:
            assert len(store.get(name, b"")) == 32, "a new symmetric key is 32 random bytes"

        return success(200, (name,), both(handle, generated))
    return success(200, (), handle)


def create_key_pair(world: World, params: tuple[str, ...], body: Any) -> Expect:
    fields = struct(body, ("keyId", "preferredAlgorithms"))
    key_id = string_field(fields, "keyId")
    preferred = optional_string(fields, "preferredAlgorithms")
    check_nul(key_id)
    if preferred is not None and "\0" in preferred:
        position = len(preferred.split("\0", 1)[0].encode("utf-8", "surrogatepass"))
        raise Answered(
            error(
                400,
                'parameter "preferred_algorithms" has an invalid value\n'
                f"caused by: nul byte found in provided data at position: {position}",
            )
        )
    if too_long(key_id):
        return error(500, INTERNAL)
    handle = check_handle(world, Ref("KeyPair", key_id))
    if world.kind(key_id) in ("ec", "rsa"):
        return success(200, (), handle)
    algorithms = parse_algorithms(preferred)
    if not algorithms:
        return error(400, GENERIC)
    if algorithms[0] == "rsa-4096":
        raise Unmodelled("a 4096-bit key takes too long for a fuzz example")
    check_writable(key_id)
    name = file_name(key_id)

    def generated(body: Any, store: Store) -> None:
        key = serialization.load_pem_private_key(store[name], password=None)
        assert store[name].startswith(b"-----BEGIN PRIVATE KEY-----")
        if algorithms[0] == "ec-p256":
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert isinstance(key.curve, ec.SECP256R1)
        else:
            assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
            assert key.public_key().public_numbers().e == 65537

    return success(200, (name,), both(handle, generated))


def delete(kind: str, message: str) -> Callable[[World, tuple[str, ...], Any], Expect]:
    def handler(world: World, params: tuple[str, ...], body: Any) -> Expect:
        ref = require_handle(world, string_field(struct(body, ("keyHandle",)), "keyHandle"))
        if ref.kind != kind:
            return error(400, message)
        if too_long(ref.key_id):
            return error(500, INTERNAL)
        name = file_name(ref.key_id)

        def deleted(body: Any, store: Store) -> None:
            assert name not in store

        return success(204, (name,), deleted)

    return handler


def load(world: World, params: tuple[str, ...], body: Any) -> Expect:
    kind, key_id = params
    check_nul(key_id)
    if kind == "key":
        require_secret(world, key_id)
        return success(200, (), check_handle(world, Ref("Key", key_id)))
    require_pair(world, key_id)
    return success(200, (), check_handle(world, Ref("KeyPair", key_id)))


def move(world: World, params: tuple[str, ...], body: Any) -> Expect:
    kind, destination = params
    source = string_field(struct(body, ("from",)), "from")
    if source == destination:
        return error(400, SAME)
    if kind != "keypair":
        return error(400, f'invalid type "{kind}"')
    if "\0" in source or "\0" in destination:
        # The spec names the parameter "id"; the original's code names it "from" / "to".
        return error(400, prefix='parameter "')
    if too_long(source) or too_long(destination):
        return error(500, INTERNAL)
    source_kind = world.kind(source)
    if source_kind == "missing":
        return error(500, INTERNAL)  # rename(2) fails
    old, new = file_name(source), file_name(destination)
    moved = world.baseline[old]

    def renamed(body: Any, store: Store) -> None:
        assert old not in store and store.get(new) == moved

    return success(204, (old, new), renamed)


def parameter(world: World, params: tuple[str, ...], body: Any) -> Expect:
    (name,) = params
    ref = require_handle(world, string_field(struct(body, ("keyHandle",)), "keyHandle"))
    key_id = base_id(ref)
    try:
        key = require_pair(world, key_id)
    except Answered as answered:
        if 500 in answered.expect and name not in PARAMETER_NAMES and not too_long(key_id):
            # Whether the name or the key file is looked at first is not in the spec.
            return anyof(answered.expect, error(400, GENERIC))
        raise
    is_ec = isinstance(key, ec.EllipticCurvePrivateKey)
    if name == "algorithm":
        return success(200, (), returns("value", "ECDSA" if is_ec else "RSA"))
    if name in ("ec-curve-oid", "ec-point") and is_ec:
        if name == "ec-curve-oid":
            return success(200, (), returns("value", P256_OID_B64))
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        return success(200, (), returns("value", b64(point)))
    if name in ("rsa-modulus", "rsa-exponent") and not is_ec:
        numbers = key.public_key().public_numbers()
        value = numbers.n if name == "rsa-modulus" else numbers.e
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return success(200, (), returns("value", b64(raw)))
    return error(400, GENERIC)


def derive(world: World, params: tuple[str, ...], body: Any) -> Expect:
    fields = struct(body, ("baseKeyHandle", "derivationData"))
    base = string_field(fields, "baseKeyHandle")
    data = base64_field(fields, "derivationData")
    ref = require_handle(world, base)
    if ref.kind == "Derived":
        return error(400, NESTED)
    return success(200, (), check_handle(world, Ref("Derived", base=base, data=data)))


def export(world: World, params: tuple[str, ...], body: Any) -> Expect:
    ref = require_handle(world, string_field(struct(body, ("keyHandle",)), "keyHandle"))
    if ref.kind != "Derived":
        return error(400, NOT_DERIVED)
    key = hmac_sha256(require_secret(world, base_id(ref)), ref.data)
    return success(200, (), returns("key", b64(key)))


def sign(world: World, params: tuple[str, ...], body: Any) -> Expect:
    fields = flat_struct(body)
    handle = string_field(fields, "keyHandle")
    algorithm = choice(fields, "algorithm", ("ECDSA", "HMAC-SHA256"))
    data = variant_content(fields, ("digest",) if algorithm == "ECDSA" else ("message",))
    ref = require_handle(world, handle)
    if ref.kind == "KeyPair" and algorithm == "ECDSA":
        key = require_pair(world, ref.key_id)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return error(400, GENERIC)
        digest = data["digest"][:32].rjust(32, b"\0")  # OpenSSL's use of a digest of any size

        def verified(body: Any, store: Store) -> None:
            assert list(body) == ["signature"]
            signature = b64_strict(body["signature"])
            assert signature is not None and len(signature) <= 72
            try:
                key.public_key().verify(
                    signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))
                )
            except InvalidSignature:
                raise AssertionError(f"ECDSA signature does not verify: {body}") from None

        return success(200, (), verified)
    if algorithm == "HMAC-SHA256" and ref.kind in ("Key", "Derived"):
        key = require_secret(world, base_id(ref))
        if ref.kind == "Derived":
            key = hmac_sha256(key, ref.data)
        return success(200, (), returns("signature", b64(hmac_sha256(key, data["message"]))))
    return error(400, MECHANISM)


def cipher_fields(body: Any, field: str) -> tuple[str, str, dict[str, bytes], bytes]:
    """keyHandle, algorithm, AEAD parameters and the data field. An RSA algorithm is a unit
    variant: its `parameters`, if sent, must be null (serde's UntaggedUnitVisitor)."""
    fields = flat_struct(body)
    handle = string_field(fields, "keyHandle")
    algorithm = choice(fields, "algorithm", ("AEAD", "RSA-PKCS1", "RSA-NO-PADDING"))
    aead = variant_content(fields, ("iv", "aad")) if algorithm == "AEAD" else {}
    if algorithm != "AEAD" and fields.get("parameters") is not None:
        raise Malformed
    data = base64_field(fields, field)
    return handle, algorithm, aead, data


def check_iv(iv: bytes) -> None:
    """OpenSSL 3's AES-GCM takes IVs of 1 to 128 bytes."""
    if not iv or len(iv) > 128:
        raise Answered(error(500, INTERNAL))


def encrypt(world: World, params: tuple[str, ...], body: Any) -> Expect:
    handle, algorithm, aead, plaintext = cipher_fields(body, "plaintext")
    return encrypt_outcome(world, handle, algorithm, aead, plaintext)


def encrypt_outcome(
    world: World, handle: str, algorithm: str, aead: dict[str, bytes], plaintext: bytes
) -> Expect:
    ref = require_handle(world, handle)
    if ref.kind in ("Key", "Derived") and algorithm == "AEAD":
        key = aead_key(world, ref)
        if len(key) != 32:
            return error(500, INTERNAL)
        iv, aad = aead["iv"], aead["aad"]
        check_iv(iv)

        def opened(body: Any, store: Store) -> None:
            assert list(body) == ["ciphertext"]
            sealed = b64_strict(body["ciphertext"])
            assert sealed is not None and sealed[0] == 2, body
            assert openssl_open(key, iv, sealed[1:], aad) == plaintext

        return success(200, (), opened)
    if ref.kind == "KeyPair" and algorithm in ("RSA-PKCS1", "RSA-NO-PADDING"):
        key = require_pair(world, ref.key_id)
        if not isinstance(key, rsa.RSAPrivateKey):
            return error(400, GENERIC)
        numbers = key.public_key().public_numbers()
        size = (key.key_size + 7) // 8
        if algorithm == "RSA-PKCS1":
            if len(plaintext) > size - 11:
                return error(500, INTERNAL)
            block = b"\x00\x01" + b"\xff" * (size - 3 - len(plaintext)) + b"\x00" + plaintext
        else:
            if len(plaintext) != size or int.from_bytes(plaintext, "big") >= numbers.n:
                return error(500, INTERNAL)
            block = plaintext

        def recovered(body: Any, store: Store) -> None:
            assert list(body) == ["ciphertext"]
            signature = b64_strict(body["ciphertext"])
            assert signature is not None and len(signature) == size
            value = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n)
            assert value == int.from_bytes(block, "big"), "not m^d mod n of the padded input"

        return success(200, (), recovered)
    return error(400, MECHANISM)


def decrypt(world: World, params: tuple[str, ...], body: Any) -> Expect:
    handle, algorithm, aead, ciphertext = cipher_fields(body, "ciphertext")
    return decrypt_outcome(world, handle, algorithm, aead, ciphertext)


def decrypt_outcome(
    world: World, handle: str, algorithm: str, aead: dict[str, bytes], ciphertext: bytes
) -> Expect:
    ref = require_handle(world, handle)
    if ref.kind not in ("Key", "Derived") or algorithm != "AEAD":
        return error(400, MECHANISM)
    key = aead_key(world, ref)
    malformed = not ciphertext or ciphertext[0] not in (1, 2) or len(ciphertext) - 1 < 16
    if len(key) != 32:
        # The spec does not order the key-size failure and the ciphertext-format checks.
        return (
            anyof(error(500, INTERNAL), error(400, GENERIC)) if malformed else error(500, INTERNAL)
        )
    if malformed:
        return error(400, GENERIC)
    iv, aad = aead["iv"], aead["aad"]
    rest = ciphertext[1:]
    if ciphertext[0] == 1:  # the legacy layout: tag first
        rest = rest[16:] + rest[:16]
    if not 1 <= len(iv) <= 128:
        return error(500, INTERNAL)  # refused by OpenSSL
    try:
        plaintext = openssl_open(key, iv, rest, aad)
    except InvalidTag:
        return error(500, INTERNAL)
    return success(200, (), returns("plaintext", b64(plaintext)))


Handler = Callable[[World, tuple[str, ...], Any], Expect]
HANDLERS: dict[str, dict[str, Handler]] = {
    "key": {"POST": create_key, "DELETE": delete("Key", NOT_A_KEY)},
    "keypair": {"POST": create_key_pair, "DELETE": delete("KeyPair", NOT_A_KEY_PAIR)},
    "derivedkey": {"POST": derive},
    "decrypt": {"POST": decrypt},
    "encrypt": {"POST": encrypt},
    "export": {"POST": export},
    "parameters": {"POST": parameter},
    "id": {"GET": load, "POST": move},
    "sign": {"POST": sign},
}


# -- the daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="aziot-keyd-fuzz-"))
    os.chmod(root, 0o755)
    principal = "" if os.geteuid() == 0 else f'[[principal]]\nuid = {os.geteuid()}\nkeys = ["*"]\n'
    keyd = Keyd(root / "keyd", extra_config=principal).start()
    try:
        world = World(keyd)

        def ok(method: str, path: str, body: Any = None) -> str:
            target = f"{path}?api-version=2021-05-01"
            reply = rawhttp.request(keyd.socket, method, target, body)
            assert reply.status == 200, reply.body
            return reply.json()["keyHandle"]

        handles = world.handles
        handles["sym"] = ok("POST", "/key", {"keyId": "sym", "usage": "derive,sign"})
        body = {"keyId": "short", "usage": "encrypt", "keyBytes": b64(os.urandom(16))}
        handles["short"] = ok("POST", "/key", body)
        handles["ec"] = ok("POST", "/keypair", {"keyId": "ec", "preferredAlgorithms": "ec-p256"})
        handles["rsa"] = ok("POST", "/keypair", {"keyId": "rsa", "preferredAlgorithms": "rsa-2048"})
        handles["key-of-ec"] = ok("GET", "/key/ec")  # the PEM's bytes as a symmetric key
        for base in ("sym", "ec", "short"):
            body = {"baseKeyHandle": handles[base], "derivationData": b64(b"device-1")}
            handles[f"derived-{base}"] = ok("POST", "/derivedkey", body)
        world.baseline = keyd.snapshot()
        world.validation_key = world.baseline[file_name(HANDLE_VALIDATION_KEY)]
        assert len(world.baseline) == 5
        world.log_offset = keyd.log.stat().st_size
        yield world
        world.alive()
    finally:
        if keyd.process is not None:
            keyd.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- strategies ------------------------------------------------------------------------------

UNRESERVED = string.ascii_letters + string.digits + "-._~"
PATH_SAFE = UNRESERVED + "!$&'()*+,;=:@"  # pchar: sent raw, parsed alike by llhttp and hyper
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
B64_CHARS = string.ascii_letters + string.digits + "+/="
FIXTURE_IDS = ("sym", "short", "ec", "rsa", HANDLE_VALIDATION_KEY, "missing", "")
REAL_HANDLES = (
    "sym", "short", "ec", "rsa", "key-of-ec", "derived-sym", "derived-ec", "derived-short",
)  # fmt: skip
BASES = ("sym", "short", "ec", "rsa", "key-of-ec")

# Key ids: the fixture's, short ASCII, any text, and long ones (a file name over NAME_MAX).
any_text = st.text(max_size=12)
long_ids = st.builds(
    lambda char, count, tail: char * count + tail,
    st.sampled_from("aZ9-é"),
    st.integers(150, 400),
    st.text(max_size=3),
)
key_ids = st.one_of(
    st.sampled_from(FIXTURE_IDS),
    st.sampled_from(FIXTURE_IDS),
    st.text(alphabet=UNRESERVED, min_size=1, max_size=10),
    any_text,
    long_ids,
)
# Ids a forged handle may name: keyd never seals an id with NUL (pinned below).
safe_ids = st.one_of(
    st.sampled_from(FIXTURE_IDS),
    st.text(alphabet=UNRESERVED, min_size=1, max_size=10),
    st.text(alphabet=st.characters(exclude_characters="\0"), max_size=12),
    long_ids.map(lambda key_id: key_id.replace("\0", "")),
)


@attrs.frozen
class Handle:
    """A handle, made when the example runs (real handles exist only then)."""

    how: str  # real, forged-key, forged-pair, forged-derived, edited, text
    name: str = ""
    data: bytes = b""
    edit: tuple[str, int, str] = ("", 0, "")


edits = st.tuples(
    st.sampled_from(["flip", "cut", "append", "prepend", "insert", "swap", "drop"]),
    st.integers(0, 400),
    st.text(alphabet=B64_CHARS + "&%. ", max_size=4),
)
handles = st.one_of(
    st.builds(Handle, st.just("real"), st.sampled_from(REAL_HANDLES)),
    st.builds(Handle, st.just("real"), st.sampled_from(REAL_HANDLES)),
    st.builds(Handle, st.sampled_from(["forged-key", "forged-pair"]), safe_ids),
    st.builds(Handle, st.just("forged-derived"), st.sampled_from(BASES), st.binary(max_size=24)),
    st.builds(Handle, st.just("edited"), st.sampled_from(REAL_HANDLES), edit=edits),
    st.builds(
        Handle,
        st.just("text"),
        st.one_of(
            any_text,
            st.builds(
                lambda a, b: f"sr={a}&sig={b}",
                st.text(alphabet=B64_CHARS, max_size=12),
                st.text(alphabet=B64_CHARS, max_size=12),
            ),
        ),
    ),
)


def make_handle(world: World, spec: Handle) -> str:
    if spec.how == "real":
        return world.handles[spec.name]
    if spec.how == "forged-key":
        return world.forge({"Key": spec.name})
    if spec.how == "forged-pair":
        return world.forge({"KeyPair": spec.name})
    if spec.how == "forged-derived":
        return world.forge({"Derived": [world.handles[spec.name], list(spec.data)]})
    if spec.how == "text":
        return spec.name
    handle = world.handles[spec.name]
    op, index, text = spec.edit
    i = index % len(handle)
    if op == "flip":
        return handle[:i] + (text or ("A" if handle[i] != "A" else "B"))[0] + handle[i + 1 :]
    if op == "cut":
        return handle[:i]
    if op == "append":
        return handle + text
    if op == "prepend":
        return text + handle
    if op == "insert":
        return handle[:i] + text + handle[i:]
    parts = handle.split("&")
    if op == "swap":
        return "&".join(reversed(parts))
    return "&".join(parts[: index % 2] + parts[index % 2 + 1 :])  # drop sr= or sig=


@attrs.frozen
class Sealed:
    """An AEAD ciphertext genuinely sealed under the body's handle, iv and aad when the key is
    known (so decryption can succeed), else bytes of the same layout."""

    plaintext: bytes
    legacy: bool = False


def b64_of(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[str]:
    return data.map(b64)


bad_b64 = st.sampled_from(["AAA", "A===", "AB==", "AA-_", " AA==", "AA==\n", "!!!!", "é"])
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
usages = st.one_of(
    st.sampled_from(["sign", "derive", "encrypt", "derive,sign", "sign,encrypt", "encrypt,derive"]),
    st.lists(st.sampled_from([*USAGES, "", "verify", "Sign", " sign"]), min_size=1, max_size=3).map(
        ",".join
    ),
)
algorithm_lists = st.one_of(
    st.none(),
    st.sampled_from(["ec-p256", "*", "ec-p256:rsa-2048", "rsa-2048:*", "ec-p256:rsa-4096:*"]),
    st.lists(
        st.sampled_from(["ec-p256", "ec-p256", "rsa-2048", "rsa-4096", "*", "", "dsa", "EC-P256"]),
        max_size=3,
    ).map(":".join),
    any_text,
)
iv_sizes = st.one_of(st.sampled_from([12, 12, 12, 16, 8, 128, 0, 129]), st.integers(0, 140))
rsa_sizes = st.one_of(st.sampled_from([0, 32, 51, 245, 246, 255, 256, 257]), st.integers(0, 300))


def aead_parameters() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {
            "iv": b64_of(iv_sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n))),
            "aad": b64_of(st.binary(max_size=24)),
        }
    )


# Per field: a good value most of the time, otherwise junk of any JSON type or a bad base64.
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "keyId": key_ids,
    "usage": usages,
    "keyBytes": st.one_of(st.none(), b64_of(st.binary(min_size=1, max_size=48))),
    "preferredAlgorithms": algorithm_lists,
    "keyHandle": handles,
    "baseKeyHandle": handles,
    "from": key_ids,
    "derivationData": b64_of(st.binary(max_size=24)),
    "algorithm": st.sampled_from(["ECDSA", "HMAC-SHA256", "AEAD", "RSA-PKCS1", "RSA-NO-PADDING"]),
    "parameters": aead_parameters(),
    "plaintext": b64_of(rsa_sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n))),
    "ciphertext": st.one_of(
        st.builds(Sealed, st.binary(max_size=40), st.booleans()),
        b64_of(st.binary(max_size=40)),
        st.builds(
            lambda v, rest: b64(bytes([v]) + rest),
            st.sampled_from([0, 1, 2, 3]),
            st.binary(max_size=40),
        ),
    ),
}


@st.composite
def fields(draw: st.DrawFn, names: tuple[str, ...], good: dict[str, Any] | None = None) -> dict:
    """A JSON object with the route's field names: each one good, junk or absent."""
    good = {**GOOD, **(good or {})}
    body: dict[str, Any] = {}
    for name in names:
        roll = draw(st.integers(0, 23))
        if roll == 0:
            continue
        if roll == 1:
            body[name] = draw(json_values)
        elif roll == 2 and name not in ("keyId", "usage", "from", "keyHandle", "baseKeyHandle"):
            body[name] = draw(bad_b64)
        else:
            body[name] = draw(good[name])
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=6))] = draw(json_values)
    return body


# Handles that suit an algorithm, so that the examples reach the cryptography.
SUITED = {
    "ECDSA": ("ec", "rsa"),
    "HMAC-SHA256": ("sym", "short", "key-of-ec", "derived-sym", "derived-ec"),
    "AEAD": ("sym", "derived-sym", "derived-ec", "derived-short", "short", "key-of-ec"),
    "RSA-PKCS1": ("rsa", "ec"),
    "RSA-NO-PADDING": ("rsa",),
}


def suited_handles(algorithm: str) -> st.SearchStrategy[Handle]:
    names = SUITED.get(algorithm, REAL_HANDLES)
    return st.one_of(st.builds(Handle, st.just("real"), st.sampled_from(names)), handles)


def sign_parameters(algorithm: str) -> st.SearchStrategy[Any]:
    name = "digest" if algorithm == "ECDSA" else "message"
    return st.fixed_dictionaries({name: b64_of(st.binary(max_size=80))})


@st.composite
def sign_bodies(draw: st.DrawFn) -> dict:
    algorithm = draw(st.sampled_from(["ECDSA", "HMAC-SHA256"] * 3 + ["RSA-PSS"]))
    parameters = sign_parameters(draw(st.sampled_from(["ECDSA", "HMAC-SHA256"] + [algorithm] * 4)))
    return draw(
        fields(
            ("keyHandle", "algorithm", "parameters"),
            {
                "algorithm": st.just(algorithm),
                "parameters": parameters,
                "keyHandle": suited_handles(algorithm),
            },
        )
    )


@st.composite
def cipher_bodies(draw: st.DrawFn, field: str) -> dict:
    algorithm = draw(st.sampled_from(["AEAD"] * 4 + ["RSA-PKCS1", "RSA-NO-PADDING"] * 2 + ["AES"]))
    names = ["keyHandle", "algorithm", field]
    if algorithm == "AEAD" or draw(st.integers(0, 4)) == 0:
        names.append("parameters")
    good = {"algorithm": st.just(algorithm), "keyHandle": suited_handles(algorithm)}
    return draw(fields(tuple(names), good))


# Bodies per route, and for the paths with a parameter the parameter's values.
BODIES: dict[str, st.SearchStrategy[Any]] = {
    "create-key": fields(("keyId", "usage", "keyBytes")),
    "create-key-pair": fields(("keyId", "preferredAlgorithms")),
    "delete": fields(("keyHandle",)),
    "move": fields(("from",)),
    "parameters": fields(("keyHandle",)),
    "derive": fields(("baseKeyHandle", "derivationData")),
    "export": fields(("keyHandle",)),
    "sign": sign_bodies(),
    "encrypt": cipher_bodies("plaintext"),
    "decrypt": cipher_bodies("ciphertext"),
}
parameter_names = st.one_of(
    st.sampled_from(PARAMETER_NAMES),
    st.sampled_from(PARAMETER_NAMES),
    st.sampled_from(["ALGORITHM", "curve", "ec_point", "modulus", "algorithm "]),
    any_text,
)


@st.composite
def segment(draw: st.DrawFn, text: str) -> str:
    """`text` as one raw path segment: percent-encoded where it must be, elsewhere at random."""
    mode = draw(st.sampled_from(["minimal", "minimal", "all", "mixed"]))
    upper = draw(st.booleans())
    out = []
    for char in text:
        must = char not in PATH_SAFE
        encode = must or mode == "all" or (mode == "mixed" and draw(st.booleans()))
        if encode:
            pattern = "%{:02X}" if upper else "%{:02x}"
            out.append("".join(pattern.format(b) for b in char.encode("utf-8")))
        else:
            out.append(char)
    return "".join(out)


junk_segments = st.one_of(
    st.text(alphabet=PATH_SAFE, max_size=8),
    st.sampled_from(["%", "%4", "%zz", "%FF", "%C3%28", "%ED%A0%80", "%2F", "..", "%00"]),
    st.sampled_from(["key", "keypair", "sign", "parameters", "derivedkey", "export", "KEY"]),
)
junk_paths = st.lists(junk_segments, max_size=4).map(lambda parts: "/" + "/".join(parts))
FIXED_PATHS = (
    "/key",
    "/keypair",
    "/derivedkey",
    "/derivedkey/export",
    "/decrypt",
    "/encrypt",
    "/sign",
)


@st.composite
def id_paths(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["key", "keypair", "parameters"]))
    text = draw(parameter_names if kind == "parameters" else key_ids)
    return f"/{kind}/" + draw(segment(text))


paths = st.one_of(st.sampled_from(FIXED_PATHS), id_paths(), junk_paths)


@st.composite
def queries(draw: st.DrawFn) -> str | None:
    """Mostly a valid api-version, else none, junk, repeated ones and other parameters."""
    if draw(st.integers(0, 9)) < 6:
        return "api-version=" + draw(st.sampled_from(API_VERSIONS))
    if draw(st.integers(0, 5)) == 0:
        return None
    names = st.one_of(
        st.sampled_from(["api-version", "api-version", "api%2Dversion", "API-VERSION", "foo"]),
        st.text(alphabet=UNRESERVED, max_size=6),
    )
    values = st.one_of(
        st.sampled_from([*API_VERSIONS, "2019-01-01", "2022-08-01", "", "2021-05-01 "]),
        any_text,
    )
    pairs = draw(st.lists(st.tuples(names, values), max_size=4))
    encoded = []
    for name, value in pairs:
        space = draw(st.sampled_from(["+", "%20"]))
        text = "".join(
            c if c in UNRESERVED else " " if c == " " else "".join(f"%{b:02X}" for b in c.encode())
            for c in value
        ).replace(" ", space)
        encoded.append(f"{name}={text}" if draw(st.integers(0, 7)) else name)
    separator = draw(st.sampled_from(["&", "&", "&&"]))
    return separator.join(encoded)


header_names = st.one_of(
    st.sampled_from(["host", "accept", "user-agent", "x-request-id", "connection", "Cookie"]),
    st.text(alphabet=TOKEN, min_size=1, max_size=12).filter(
        lambda name: name.lower()
        not in {
            "content-length", "content-type", "transfer-encoding", "expect", "upgrade",
            "connection", "http2-settings", "te", "trailer", "host",
        }
    ),
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(["keyd.sock", "", "close", "keep-alive", "*/*"]),
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=20,
    ).map(str.strip),
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=4).map(
    lambda pairs: tuple(
        (n, v) for n, v in pairs if n.lower() != "connection" or v in ("close", "keep-alive")
    )
)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json",
            "application/json; charset=utf-8",
            " application/json ;x",
            "application/json;",
            "APPLICATION/JSON",
            "application/jsonx",
            "text/plain",
            "",
            "application/x-www-form-urlencoded",
        ]
    ),
    st.none(),
    st.builds(
        lambda a, b: f"{a}/{b}",
        st.text(alphabet=TOKEN, min_size=1, max_size=6),
        st.text(alphabet=TOKEN, min_size=1, max_size=6),
    ),
)


@attrs.frozen
class Case:
    """A request as drawn: its JSON body may hold handles and sealed ciphertexts to make."""

    method: str
    path: str
    query: str | None = "api-version=2021-05-01"
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None  # None: no body; bytes: as is; anything else: JSON
    content_type: str | None = "application/json"

    def request(self, world: World) -> Request:
        body = self.body
        if body is not None and not isinstance(body, bytes):
            value = make(world, body)
            body = json.dumps(value, allow_nan=False).encode("utf-8")
        return Request(self.method, self.path, self.query, self.headers, body, self.content_type)


def make(world: World, value: Any) -> Any:
    """The JSON value of a drawn body: handles made, ciphertexts sealed."""
    if isinstance(value, Handle):
        return make_handle(world, value)
    if isinstance(value, list):
        return [make(world, v) for v in value]
    if not isinstance(value, dict):
        return value
    made = {k: make(world, v) for k, v in value.items() if not isinstance(v, Sealed)}
    for name, sealed in value.items():
        if isinstance(sealed, Sealed):
            made[name] = b64(seal(world, made, sealed))
    return {name: made[name] for name in value}


def seal(world: World, body: dict[str, Any], sealed: Sealed) -> bytes:
    parameters = body.get("parameters")
    handle = body.get("keyHandle")
    key = iv = aad = None
    if isinstance(parameters, dict) and isinstance(handle, str):
        iv = b64_strict(parameters.get("iv")) if isinstance(parameters.get("iv"), str) else None
        aad = b64_strict(parameters.get("aad")) if isinstance(parameters.get("aad"), str) else None
        try:
            ref = world.open(handle)
            if ref is not None and ref.kind in ("Key", "Derived"):
                key = aead_key(world, ref)
        except (Answered, Unmodelled):
            key = None
    if key is None or len(key) != 32 or iv is None or aad is None or not 1 <= len(iv) <= 128:
        return b"\x02" + sealed.plaintext + hashlib.sha256(sealed.plaintext).digest()[:16]
    together = openssl_seal(key, iv, sealed.plaintext, aad)
    if sealed.legacy:
        return b"\x01" + together[-16:] + together[:-16]
    return b"\x02" + together


# -- the fuzz tests --------------------------------------------------------------------------

ROUTE_OF_BODY = {
    "create-key": ("POST", "/key"),
    "create-key-pair": ("POST", "/keypair"),
    "derive": ("POST", "/derivedkey"),
    "export": ("POST", "/derivedkey/export"),
    "sign": ("POST", "/sign"),
    "encrypt": ("POST", "/encrypt"),
    "decrypt": ("POST", "/decrypt"),
}
methods = st.integers(0, 9).flatmap(
    lambda roll: (
        st.sampled_from(["GET", "POST", "DELETE", "PUT"])
        if roll < 7
        else st.sampled_from(["PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "Post", "PRI"])
        if roll < 9
        else st.text(alphabet=TOKEN, min_size=1, max_size=8)
    )
)
bodies = st.one_of(
    st.none(),
    st.just(b""),
    st.sampled_from(sorted(BODIES)).flatmap(lambda name: BODIES[name]),
    json_values.filter(lambda value: value is not None),
    st.just(b"null"),
    st.binary(max_size=64),
)


@settings(FUZZ, max_examples=350)
@given(
    st.builds(
        Case,
        method=methods,
        path=paths,
        query=queries(),
        headers=header_lists,
        body=bodies,
        content_type=content_types,
    )
)
def test_any_request(world: World, case: Case) -> None:
    """Methods, paths, api-versions, headers, content types and bodies of every kind, on every
    route and beyond: §1.3's order (api-version, route, method, body rules, JSON) and then the
    routes themselves."""
    world.exchange(case.request(world))


@st.composite
def key_id_cases(draw: st.DrawFn) -> Case:
    """Key ids in paths (loads, moves) and in bodies (creation), percent-encoded every way."""
    version = "api-version=" + draw(st.sampled_from(API_VERSIONS))
    what = draw(st.sampled_from(["load", "load", "move", "move", "create"]))
    kind = draw(st.sampled_from(["key", "keypair", "keypair"]))
    key_id = draw(key_ids)
    if what == "load":
        return Case("GET", f"/{kind}/" + draw(segment(key_id)), version)
    if what == "move":
        source = draw(st.one_of(st.sampled_from(["ec", "rsa"]), key_ids, st.just(key_id)))
        body = draw(st.one_of(st.just({"from": source}), BODIES["move"], st.none()))
        return Case("POST", f"/{kind}/" + draw(segment(key_id)), version, body=body)
    name = "create-key" if kind == "key" else "create-key-pair"
    body = {**draw(BODIES[name]), "keyId": key_id}
    return Case("POST", f"/{kind}", version, body=body)


@settings(FUZZ, max_examples=250)
@given(key_id_cases())
def test_key_ids(world: World, case: Case) -> None:
    """Loads, moves and creations with any key id: unicode, NUL, `/` and `%` encoded, ids of
    every kind of file in the store, missing ones, and ids whose file name is too long."""
    world.exchange(case.request(world))


@st.composite
def create_cases(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from(["create-key", "create-key-pair"]))
    method, path = ROUTE_OF_BODY[name]
    return Case(method, path, body=draw(BODIES[name]))


@settings(FUZZ, max_examples=200)
@given(create_cases())
def test_create(world: World, case: Case) -> None:
    """POST /key and /keypair: generation, import (which overwrites), create-if-not-exists on
    every kind of existing file, usages and algorithm lists of every shape."""
    world.exchange(case.request(world))


@st.composite
def handle_cases(draw: st.DrawFn) -> Case:
    name = draw(
        st.sampled_from(
            ["sign", "sign", "encrypt", "encrypt", "decrypt", "decrypt", "parameters",
             "parameters", "derive", "export", "delete-key", "delete-key-pair"]
        )
    )  # fmt: skip
    if name == "parameters":
        path = "/parameters/" + draw(segment(draw(parameter_names)))
        return Case("POST", path, body=draw(BODIES["parameters"]))
    if name.startswith("delete"):
        path = "/key" if name == "delete-key" else "/keypair"
        return Case("DELETE", path, body=draw(BODIES["delete"]))
    method, path = ROUTE_OF_BODY[name]
    return Case(method, path, body=draw(BODIES[name]))


@settings(FUZZ, max_examples=900)
@given(handle_cases())
def test_handle_operations(world: World, case: Case) -> None:
    """Everything that takes a handle, with real handles of every kind, forged ones naming any
    id, edited and junk ones: results are checked with the keys the test reads from the store."""
    world.exchange(case.request(world))


RAW_BASES = {
    "load": b"GET /key/sym?api-version=2021-05-01 HTTP/1.1\r\nhost: keyd.sock\r\n\r\n",
    "hmac": "sign",
    "create": (
        b"POST /key?api-version=2021-05-01 HTTP/1.1\r\ncontent-length: 30\r\n"
        b'content-type: application/json\r\n\r\n{"keyId":"sym","usage":"sign"}'
    ),
    "unknown": b"PATCH /nothing?api-version=2020-09-01 HTTP/1.1\r\n\r\n",
}
RAW_STATUSES = {200, 204, 400, 404, 413, 415, 422, 431}


def raw_base(world: World, name: str) -> bytes:
    base = RAW_BASES[name]
    if isinstance(base, bytes):
        return base
    body = json.dumps(
        {
            "keyHandle": world.handles["sym"],
            "algorithm": "HMAC-SHA256",
            "parameters": {"message": "AA=="},
        }
    ).encode()
    head = f"POST /sign?api-version=2021-05-01 HTTP/1.1\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


byte_edits = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete"]),
        st.integers(0, 2000),
        st.binary(min_size=1, max_size=3),
    ),
    min_size=1,
    max_size=3,
)


@settings(FUZZ, max_examples=150)
@given(
    st.one_of(
        st.tuples(st.sampled_from(sorted(RAW_BASES)), byte_edits),
        st.tuples(st.just(""), st.binary(max_size=80).map(lambda b: [("raw", 0, b)])),
    )
)
def test_raw_bytes(world: World, drawn: tuple[str, list[tuple[str, int, bytes]]]) -> None:
    """Requests mangled byte by byte, and plain garbage, half-closed after sending: every answer
    is a well-formed HTTP/1.1 response (or none: the connection is closed), never a 5xx, never a
    hang; a rejected one leaves the store as it was; the daemon lives on."""
    name, changes = drawn
    wire = raw_base(world, name) if name else b""
    for op, index, data in changes:
        i = index % (len(wire) + 1)
        if op == "raw":
            wire = data
        elif op == "set":
            wire = wire[:i] + data + wire[i + len(data) :]
        elif op == "insert":
            wire = wire[:i] + data + wire[i:]
        else:
            wire = wire[:i] + wire[i + len(data) :]
    if b"upgrade" in wire.lower() or wire.startswith(b"PRI "):
        reject()  # HTTP/2 has its own test below
    try:
        with rawhttp.connect(world.keyd.socket, timeout=10.0) as sock:
            sock.sendall(wire)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        statuses = [int(s) for s in re.findall(rb"^HTTP/1\.1 (\d{3}) ", answer, re.M)]
        assert answer == b"" or answer.startswith(b"HTTP/1.1 "), (wire, answer)
        assert set(statuses) <= RAW_STATUSES, (wire, answer)
        assert world.keyd.process is not None and world.keyd.process.poll() is None
        if not any(200 <= s < 300 for s in statuses):
            assert world.keyd.snapshot() == world.baseline, (wire, answer)
        world.check_log(repr(wire))
    finally:
        world.restore()


def test_the_daemon_survived(world: World) -> None:
    """After all of the above: alive, answering, and its store is the baseline."""
    world.alive()
    assert world.keyd.snapshot() == world.baseline


# -- differences from the original that the fuzzing above found (all fixed) ------------------


def pin(world: World, request: Request, want: Expect) -> None:
    """Send `request`, judged against `want` (the original's answer), as the fuzz tests do."""
    try:
        reply = world.send(request.wire())
        world.judge(request, want, reply)
    finally:
        world.restore()


def post(path: str, raw: bytes, method: str = "POST") -> Request:
    return Request(method, path, "api-version=2021-05-01", body=raw)


@PIN
@given(
    literal=st.sampled_from(["NaN", "Infinity", "-Infinity"]),
    key_id=st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8),
)
def test_nan_and_infinity_are_not_json(world: World, literal: str, key_id: str) -> None:
    raw = f'{{"keyId":"{key_id}","usage":"sign","n":{literal}}}'.encode()
    pin(world, post("/key", raw), error(422))


@PIN
@given(
    escape=st.integers(0xD800, 0xDFFF).map(lambda c: f"\\u{c:04x}"),
    field=st.sampled_from(["keyId", "keyHandle"]),
)
def test_lone_surrogates_are_not_json(world: World, escape: str, field: str) -> None:
    if field == "keyId":
        request = post("/key", f'{{"keyId":"a{escape}","usage":"sign"}}'.encode())
    else:
        request = post("/derivedkey/export", f'{{"keyHandle":"{escape}"}}'.encode())
    pin(world, request, error(422))


@PIN
@given(
    levels=st.integers(1_000, 100_000),
    inside=st.booleans(),
    path=st.sampled_from(["/key", "/sign", "/keypair/x"]),
)
def test_deep_json(world: World, levels: int, inside: bool, path: str) -> None:
    """serde_json skips an unknown field's value without a depth limit (`ignore_value`), but
    buffers every value of a struct with a flattened field (sign's) and counts its depth: the
    128th level (the object is the first) is refused at its `[`."""
    nested = b"[" * levels + b"]" * levels
    prefix = b'{"keyId":"sym","usage":"sign","x":'
    raw = prefix + nested + b"}" if inside else nested
    if not inside:
        expecting = "struct Request at line 1 column 0" if path == "/sign" else "a string at"
        want = error(422, prefix=f"invalid type: sequence, expected {expecting}")
    elif path == "/key":
        want = success(200, (), check_handle(world, Ref("Key", "sym")))
    elif path == "/sign":
        want = error(422, f"recursion limit exceeded at line 1 column {len(prefix) + 127}")
    else:
        want = error(422, f"missing field `from` at line 1 column {len(raw)}")
    pin(world, post(path, raw), want)


@PIN
@given(
    source=st.sampled_from(["sym", "short", HANDLE_VALIDATION_KEY]),
    to=st.text(alphabet="abc", min_size=1, max_size=5),
)
def test_moving_a_symmetric_key_file_renames_it(world: World, source: str, to: str) -> None:
    old, new = file_name(source), file_name(to)
    moved = world.baseline[old]

    def renamed(body: Any, store: Store) -> None:
        assert old not in store and store.get(new) == moved

    raw = json.dumps({"from": source}).encode()
    pin(world, post(f"/keypair/{to}", raw), success(204, (old, new), renamed))


@PIN
@given(
    key_id=st.sampled_from(["ec", "rsa", "new", "sym"]),
    algorithms=st.sampled_from(["ec-p256:\0", "\0", "ec-p256\0", "*:\0rsa-2048"]),
)
def test_nul_in_preferred_algorithms_is_400(world: World, key_id: str, algorithms: str) -> None:
    raw = json.dumps({"keyId": key_id, "preferredAlgorithms": algorithms}).encode()
    pin(world, post("/keypair", raw), error(400, prefix='parameter "preferred_algorithms"'))


@PIN
@given(prefix=st.text(min_size=1, max_size=4).filter(lambda s: not s.isascii() and "\0" not in s))
def test_nul_position_is_a_byte_offset(world: World, prefix: str) -> None:
    key_id = prefix + "\0"
    pin(
        world,
        Request(
            "GET", "/key/" + "".join(f"%{b:02X}" for b in key_id.encode()), "api-version=2021-05-01"
        ),
        error(400, nul_message(key_id)),
    )


@PIN
@given(key_id=st.sampled_from(["sym", "fresh", "ec"]))
def test_importing_empty_key_bytes_does_not_store_random_bytes(world: World, key_id: str) -> None:
    """Whatever the answer (the original's is a 500 after writing the empty file; refusing the
    import would do too), the key file never holds bytes the caller did not send."""
    name = file_name(key_id)
    raw = json.dumps({"keyId": key_id, "usage": "sign", "keyBytes": ""}).encode()
    try:
        reply = world.send(post("/key", raw).wire())
        check_head(reply)
        after = world.keyd.snapshot()
        assert after.get(name) in (b"", world.baseline.get(name)), (
            f"{reply.status} {reply.body!r}: the key file holds {after.get(name)!r}"
        )
        assert reply.status != 200 or after.get(name) == b"", "200, but the import was not stored"
    finally:
        world.restore()


@PIN
@given(size=st.integers(1, 7), base=st.sampled_from(["sym", "derived-sym"]))
def test_short_aead_ivs_are_taken(world: World, size: int, base: str) -> None:
    body = {
        "keyHandle": world.handles[base],
        "algorithm": "AEAD",
        "parameters": {"iv": b64(bytes(size)), "aad": ""},
        "plaintext": b64(b"secret"),
    }
    pin(world, post("/encrypt", json.dumps(body).encode()), success(200))


@PIN
@given(name=st.sampled_from(["export", "parameters", "move"]))
def test_struct_bodies_may_be_json_arrays(world: World, name: str) -> None:
    if name == "export":
        handle = world.handles["derived-sym"]
        key = hmac_sha256(world.baseline[file_name("sym")], b"device-1")
        request = post("/derivedkey/export", json.dumps([handle]).encode())
        want = success(200, (), returns("key", b64(key)))
    elif name == "parameters":
        raw = json.dumps([world.handles["ec"]]).encode()
        request, want = (
            post("/parameters/algorithm", raw),
            success(200, (), returns("value", "ECDSA")),
        )
    else:
        request, want = post("/keypair/missing-target", b'["missing-source"]'), error(500, INTERNAL)
    pin(world, request, want)


@PIN
@given(preface=st.booleans())
def test_http2_is_not_spoken(world: World, preface: bool) -> None:
    with rawhttp.connect(world.keyd.socket, timeout=10.0) as sock:
        if preface:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            answer = sock.recv(65536)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer
        else:
            sock.sendall(
                b"GET /key/sym?api-version=2021-05-01 HTTP/1.1\r\nhost: keyd.sock\r\n"
                b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            )
            reply = rawhttp.read_reply(sock)
            assert reply.status == 200, reply
    world.check_log("HTTP/2")


@PIN
@given(
    key_id=st.sampled_from(['"a\\u0000b"', '"\\ud800"', '"x\\udfff"']),
    route_name=st.sampled_from(["delete-key", "hmac"]),
)
def test_forged_handles_naming_impossible_ids(world: World, key_id: str, route_name: str) -> None:
    sr = f'{{"key_id":{{"Key":{key_id}}},"nonce":"AA=="}}'.encode()
    handle = f"sr={b64(sr)}&sig={b64(hmac_sha256(world.validation_key, sr))}"
    if route_name == "delete-key":
        request = post("/key", json.dumps({"keyHandle": handle}).encode(), method="DELETE")
    else:
        body = {"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": ""}}
        request = post("/sign", json.dumps(body).encode())
    pin(world, request, error(400, prefix='parameter "handle" has an invalid value'))


@PIN
@given(
    letters=st.integers(NAME_MAX - 14 - 69 + 1, NAME_MAX - 69),
    route_name=st.sampled_from(["key", "keypair", "import"]),
)
def test_long_key_ids_that_fit_can_be_created(world: World, letters: int, route_name: str) -> None:
    key_id = "k" * letters
    name = file_name(key_id)
    assert NAME_MAX - 14 < len(name) <= NAME_MAX
    if route_name == "keypair":
        raw = json.dumps({"keyId": key_id, "preferredAlgorithms": "ec-p256"}).encode()
        pin(world, post("/keypair", raw), success(200, (name,)))
    else:
        body = {"keyId": key_id, "usage": "sign"}
        if route_name == "import":
            body["keyBytes"] = b64(bytes(32))
        pin(world, post("/key", json.dumps(body).encode()), success(200, (name,)))


@PIN
@given(method=st.sampled_from(["get", "Get", "gET"]))
def test_methods_are_case_sensitive(world: World, method: str) -> None:
    request = Request(method, "/key/sym", "api-version=2021-05-01")
    pin(world, request, error(400, NOT_ALLOWED))


@PIN
@given(target=st.sampled_from(["/nothing?api-version=2021-05-01", "/sign?api-version=202-05-01"]))
def test_a_body_cut_short_still_gets_its_answer(world: World, target: str) -> None:
    status = b"404" if target.startswith("/nothing") else b"400"
    answers = []
    for _ in range(100):
        with rawhttp.connect(world.keyd.socket, timeout=10.0) as sock:
            sock.sendall(
                f"POST {target} HTTP/1.1\r\ncontent-length: 296\r\n\r\n".encode() + b"x" * 295
            )
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        answers.append(answer[:12])
    world.check_log(target)
    assert answers == [b"HTTP/1.1 " + status] * 100, answers


@PIN
@given(
    hosts=st.lists(st.sampled_from(["", "localhost", "keyd.sock"]), min_size=2, max_size=4),
    route_name=st.sampled_from(["load", "hmac"]),
)
def test_repeated_host_headers_are_not_refused(
    world: World, hosts: list[str], route_name: str
) -> None:
    """h11 answered a bare 400 to a second Host header; hyper does not count them."""
    headers = tuple(("Host", host) for host in hosts)
    if route_name == "load":
        request = Request("GET", "/key/sym", "api-version=2021-05-01", headers)
    else:
        body = {"keyHandle": world.handles["sym"], "algorithm": "HMAC-SHA256"}
        body["parameters"] = {"message": b64(b"hello")}
        request = Request(
            "POST", "/sign", "api-version=2021-05-01", headers, json.dumps(body).encode()
        )
    want = expect(world, request)
    assert 200 in want
    pin(world, request, want)


@PIN
@given(
    first=st.sampled_from(["sr=!!", "sig=!!", "sr=/w==", "sig=AA"]),
    base=st.sampled_from(["sym", "ec"]),
)
def test_every_sr_and_sig_part_of_a_handle_is_decoded(world: World, first: str, base: str) -> None:
    """A bad sr= or sig= part before the good ones spoils the handle (the original decodes each
    part it meets, then keeps the last); the good handle alone works."""
    good = world.handles[base]
    path = "/parameters/algorithm" if base == "ec" else "/derivedkey"
    body: dict[str, Any] = {"keyHandle": f"{first}&{good}"}
    if base == "sym":
        body = {"baseKeyHandle": f"{first}&{good}", "derivationData": b64(b"x")}
    pin(world, post(path, json.dumps(body).encode()), error(400, INVALID_HANDLE))


# -- large inputs (issue 11): ids, derivation data, numbers ------------------------------------

huge_ids = st.builds(
    lambda char, count, tail: char * count + tail,
    st.sampled_from("a-é*?"),
    st.integers(1_000, 60_000),
    st.text(max_size=3),
)


@settings(FUZZ, max_examples=24)
@given(key_id=huge_ids, what=st.sampled_from(["create", "import", "create-pair", "load"]))
def test_large_key_ids(world: World, key_id: str, what: str) -> None:
    """Ids far longer than a file name: stored when their file name is short (only ASCII
    alphanumerics are kept in it), 500 when it is not, as in the original."""
    if what == "load":
        case = Case("GET", "/key/" + quote(key_id[:5_000], safe=""))
    elif what == "create-pair":
        case = Case("POST", "/keypair", body={"keyId": key_id, "preferredAlgorithms": "ec-p256"})
    else:
        body: dict[str, Any] = {"keyId": key_id, "usage": "sign"}
        if what == "import":
            body["keyBytes"] = b64(bytes(32))
        case = Case("POST", "/key", body=body)
    world.exchange(case.request(world))


@settings(FUZZ, max_examples=12)
@given(
    size=st.integers(48 * 1024, 700 * 1024),
    base=st.sampled_from(BASES),
    use=st.sampled_from(["derive", "export", "sign"]),
)
def test_large_derivation_data(world: World, size: int, base: str, use: str) -> None:
    """Derivation data up to the 1 MiB body limit (a 3.7 MB handle): made, and forged handles
    carrying as much used, each checked against the model's HMAC."""
    data = os.urandom(size)
    if use == "derive":
        body: dict[str, Any] = {"baseKeyHandle": Handle("real", base), "derivationData": b64(data)}
        case = Case("POST", "/derivedkey", body=body)
    else:
        handle = Handle("forged-derived", name=base, data=data[: 200 * 1024])
        if use == "export":
            case = Case("POST", "/derivedkey/export", body={"keyHandle": handle})
        else:
            body = {"keyHandle": handle, "algorithm": "HMAC-SHA256",
                    "parameters": {"message": b64(data[:1000])}}  # fmt: skip
            case = Case("POST", "/sign", body=body)
    world.exchange(case.request(world))


@PIN
@given(
    number=st.one_of(
        st.integers(4_301, 30_000).map(lambda n: "9" * n),
        st.integers(310, 4_300).map(lambda n: "-" + "1" * n),
        st.integers(309, 10**12).map(lambda n: f"1e{n}"),
        st.integers(1, 10**6).map(lambda n: f"0.{'0' * n}1e999999999999"),
    ),
    where=st.sampled_from(["ignored", "nested-ignored", "keyId", "flattened-ignored"]),
)
def test_numbers_beyond_f64(world: World, number: str, where: str) -> None:
    """serde skips an ignored field by its syntax, whatever its size; a field it reads (or any
    value of a struct with a flattened field, which it buffers) is out of range."""
    if where == "keyId":
        raw = f'{{"keyId":{number},"usage":"sign"}}'
        want = error(422, prefix="number out of range at line 1 column ")
    elif where == "flattened-ignored":
        handle = world.handles["sym"]
        raw = (
            f'{{"keyHandle":"{handle}","algorithm":"HMAC-SHA256",'
            f'"parameters":{{"message":""}},"x":{{"y":[{number}]}}}}'
        )
        want = error(422, prefix="number out of range at line 1 column ")
    else:
        value = number if where == "ignored" else f'{{"a":[1,{number}]}}'
        raw = f'{{"keyId":"sym","usage":"sign","comment":{value}}}'
        want = success(200)
    pin(world, post("/sign" if where == "flattened-ignored" else "/key", raw.encode()), want)


@PIN
@given(order=st.sampled_from(["tag-first", "content-first"]))
def test_an_algorithm_may_be_a_map_of_its_unit_variant(world: World, order: str) -> None:
    """serde reads an adjacently tagged enum's tag as an enum: `{"HMAC-SHA256":null}` is the
    tag; the handler, stricter, is handed serde's reading of the body."""
    handle = world.handles["sym"]
    parts = ['"algorithm":{"HMAC-SHA256":null}', '"parameters":{"message":"aGk="}']
    if order == "content-first":
        parts.reverse()
    raw = f'{{"keyHandle":"{handle}",{",".join(parts)}}}'.encode()
    plain = {"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": "aGk="}}
    pin(world, post("/sign", raw), sign(world, (), plain))


@PIN
@given(parameters=st.sampled_from(["{}", "[]", '""', "0"]))
def test_a_unit_algorithm_takes_only_null_parameters(world: World, parameters: str) -> None:
    handle = world.handles["rsa"]
    raw = (
        f'{{"keyHandle":"{handle}","algorithm":"RSA-PKCS1","parameters":{parameters},'
        f'"plaintext":"aGk="}}'
    ).encode()
    shown = {"{}": "map", "[]": "sequence", '""': 'string ""', "0": "integer `0`"}[parameters]
    text = f"invalid type: {shown}, expected unit variant Parameters::RsaPkcs1"
    pin(world, post("/encrypt", raw), error(422, f"{text} at line 1 column {len(raw)}"))
