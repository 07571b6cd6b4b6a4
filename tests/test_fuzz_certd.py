"""Hypothesis fuzzing of every certd route against one real aziotd (keyd + certd) on certd's socket.

How it works, as `tests/test_fuzz.py` does it for keyd. Every example is one request on a fresh
connection with a 10 s timeout (a hang is a failure). `expect()` is a model of the original
written from spec/api.md (§1.2-§1.3 framing and processing order, §2.2 authorization, §4 certd,
§7 status table) and from the original's own code where the spec is silent (aziot-certd's
`create_cert`, `get_cert_inner`, `X509::stack_from_pem`, serde_json 1.0.149's error positions).
It knows the cert store the module fixture built and gives, for a request, every status the
original can answer with the exact message where one is known, which store files a success may
change, and an independent check of a success (the stored PEM equals the returned one; an issued
cert carries the CSR's public key, is signed by the issuer key read from keyd, and is followed by
the issuer's chain; verified with `cryptography`). A 500 is allowed only where the original
answers 500: issuance failures (no issuance config, a bad issuer key handle, EST unreachable, a
self-signed id without its key pair), an issuer file that is not a list of certs, writes and
deletes of a bundle id, and file names over NAME_MAX. 503/504 are never allowed.

serde's 422 texts are modelled exactly, position included: a JSON body is read by a small parser
that keeps every value's byte span, and the original's typed deserialization (create_cert's
`Request`/`Issuer`, import's `Request`, `IgnoredAny` elsewhere) is replayed on it. The judge
takes no other wording.

After every example: the daemon still runs, the response head came in the client's first read
(spec §1.6), error bodies are exactly `{"message": str}`, the daemon logged no traceback, and
the cert store (`<certd home>/certs`) and the preloaded files equal the baseline; after a success
only the file of that cert id may differ, and the baseline is then put back.

The example counts are fixed per test (300, 250, 300 and 60: about 900 in all, 10-20 s on two
shared cores); `CERTD_FUZZ_SCALE=<factor>` multiplies them for a longer run. Examples are
derandomized (derived from the test's name), so a failure reproduces on every run.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from tests import rawhttp
from tests.certd_world import start_certd
from tests.daemon import Daemon
from tests.fuzz_common import (
    Answered,
    Unmodelled,
    check_head,
    form_decode,
    percent_decode,
    quiet_event,
)

API_VERSION = "2020-09-01"
NAME_MAX = 255
NOBODY = 65534
NOBODY_PATTERNS = ("mod-*", "pre-*", "exact", "?x", "local-ca")
SCALE = float(os.environ.get("CERTD_FUZZ_SCALE", "1"))

INTERNAL = "internal error"
NOT_ALLOWED = "method not allowed"
NOT_FOUND = "not found"
MISSING_BODY = "missing request body"
ID_NOT_FOUND = 'parameter "id" has an invalid value\ncaused by: not found'
ISSUER_NOT_FOUND = 'parameter "issuer.certId" has an invalid value\ncaused by: not found'
INVALID_ISSUER = 'parameter "issuer.certId" has an invalid value\ncaused by: invalid issuer'
CSR_PREFIX = 'parameter "csr" has an invalid value\ncaused by: '
CSR_UNVERIFIED = CSR_PREFIX + "CSR failed to be verified with its public key"
NOT_JSON_415 = "request body must be application/json"
SERDE_POSITION = re.compile(r" at line \d+ column \d+\Z")


def examples(count: int) -> int:
    return max(1, int(count * SCALE))


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


# -- the model: outcomes -----------------------------------------------------------------------

Store = dict[str, bytes]
Check = Callable[[Any, Store], None]


@attrs.frozen
class Answer:
    messages: frozenset[str] | None = None  # the original's message, and known variants of ours
    prefix: str | None = None
    changes: frozenset[str] = frozenset()
    check: Check | None = None


Expect = dict[int, Answer]


def error(status: int, *messages: str, prefix: str | None = None) -> Expect:
    return {status: Answer(frozenset(messages) if messages else None, prefix)}


def success(status: int, changes: tuple[str, ...] = (), check: Check | None = None) -> Expect:
    return {status: Answer(changes=frozenset(changes), check=check)}


# -- serde_json as the original reads a body (positions in bytes, as serde counts them) --------


class JsonSyntax(Exception):
    """Not JSON: a 422 whose text the model does not predict (test_body.py pins those)."""


@attrs.frozen
class Node:
    kind: str  # object, array, string, number, true, false, null
    start: int  # byte offsets into the body
    end: int
    value: Any = None  # scalars: the value; array: [Node]; object: [(key, key Node, Node)]
    text: str = ""  # a number's literal
    surrogate: bool = False  # a string with a lone surrogate escape


_WS = b" \t\n\r"
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


class _Parser:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.raw) and self.raw[self.i] in _WS:
            self.i += 1

    def value(self, depth: int = 0) -> Node:
        if depth > 900:
            raise Unmodelled("nesting too deep for the model's parser")
        self.ws()
        raw, start = self.raw, self.i
        if start >= len(raw):
            raise JsonSyntax
        char = raw[start : start + 1]
        if char == b"{":
            self.i += 1
            items = []
            self.ws()
            if raw[self.i : self.i + 1] == b"}":
                self.i += 1
                return Node("object", start, self.i, items)
            while True:
                self.ws()
                key = self.string()
                self.ws()
                if raw[self.i : self.i + 1] != b":":
                    raise JsonSyntax
                self.i += 1
                items.append((key.value, key, self.value(depth + 1)))
                self.ws()
                sep = raw[self.i : self.i + 1]
                self.i += 1
                if sep == b"}":
                    return Node("object", start, self.i, items)
                if sep != b",":
                    raise JsonSyntax
        if char == b"[":
            self.i += 1
            elements: list[Node] = []
            self.ws()
            if raw[self.i : self.i + 1] == b"]":
                self.i += 1
                return Node("array", start, self.i, elements)
            while True:
                elements.append(self.value(depth + 1))
                self.ws()
                sep = raw[self.i : self.i + 1]
                self.i += 1
                if sep == b"]":
                    return Node("array", start, self.i, elements)
                if sep != b",":
                    raise JsonSyntax
        if char == b'"':
            return self.string()
        for word, kind, value in ((b"true", "true", True), (b"false", "false", False)):
            if raw.startswith(word, start):
                self.i += len(word)
                return Node(kind, start, self.i, value)
        if raw.startswith(b"null", start):
            self.i += 4
            return Node("null", start, self.i)
        found = _NUMBER.match(raw, start)
        if found is None:
            raise JsonSyntax
        self.i = found.end()
        return Node("number", start, self.i, text=found.group().decode())

    def string(self) -> Node:
        raw, start = self.raw, self.i
        if raw[start : start + 1] != b'"':
            raise JsonSyntax
        i = start + 1
        while i < len(raw) and raw[i : i + 1] != b'"':
            i += 2 if raw[i : i + 1] == b"\\" else 1
        if i >= len(raw):
            raise JsonSyntax
        self.i = i + 1
        try:
            value = json.loads(raw[start : self.i].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise JsonSyntax from None
        lone = any("\ud800" <= c <= "\udfff" for c in value)
        return Node("string", start, self.i, value, surrogate=lone)


def parse_body(raw: bytes) -> Node:
    parser = _Parser(raw)
    node = parser.value()
    parser.ws()
    if parser.i != len(raw):
        raise JsonSyntax
    return node


def position(raw: bytes, index: int) -> str:
    """serde_json's `position_of_index`: lines and byte columns."""
    before = raw[:index]
    line_start = before.rfind(b"\n") + 1
    lines = before.count(b"\n") + 1
    return f"line {lines} column {index - line_start}"


class SerdeError(Exception):
    def __init__(self, text: str, index: int, exact: bool = True) -> None:
        super().__init__(text)
        self.text = text
        self.index = index
        self.exact = exact  # False: the text after "invalid type: " is not predicted


RUST_ESCAPES = {"\t": "\\t", "\r": "\\r", "\n": "\\n", "\\": "\\\\", '"': '\\"', "\0": "\\0"}
PRINTABLE_EXTRA = set("éüßà中€ñ")  # non-ASCII characters Rust's is_printable passes as they are


def rust_debug(text: str) -> str | None:
    """Rust's `{:?}` of a str, or None where the model cannot say (uncommon characters)."""
    out = []
    for char in text:
        if char in RUST_ESCAPES:
            out.append(RUST_ESCAPES[char])
        elif char < " " or char == "\x7f":
            out.append(f"\\u{{{ord(char):x}}}")
        elif char.isascii() or char in PRINTABLE_EXTRA:
            out.append(char)
        else:
            return None
    return '"' + "".join(out) + '"'


FLOAT_TEXTS = {"1.5": "1.5", "-0.25": "-0.25", "0.0": "0.0", "-0.0": "-0.0", "2.5": "2.5"}
FLOAT_TEXTS |= {"1e3": "1000.0", "1E3": "1000.0", "1e-3": "0.001", "0.5e1": "5.0"}


def unexpected(node: Node) -> str | None:
    """serde_json's `JsonUnexpected` of a value: None where the model cannot predict it."""
    if node.kind == "null":
        return "null"
    if node.kind in ("true", "false"):
        return f"boolean `{node.kind}`"
    if node.kind == "array":
        return "sequence"
    if node.kind == "object":
        return "map"
    if node.kind == "string":
        shown = rust_debug(node.value)
        return None if shown is None or node.surrogate else f"string {shown}"
    literal = node.text
    if re.fullmatch(r"-?[0-9]+", literal):
        number = int(literal)
        if -(1 << 63) <= number < (1 << 64) and literal not in ("-0",):
            return f"integer `{number}`"
        return None
    shown = FLOAT_TEXTS.get(literal)
    return None if shown is None else f"floating point `{shown}`"


def invalid_type(node: Node, expected: str) -> SerdeError:
    # peek_invalid_type: a scalar is consumed first, a `[` or `{` is not.
    index = node.start if node.kind in ("array", "object") else node.end
    shown = unexpected(node)
    if shown is None:
        return SerdeError(f"invalid type: {expected}", index, exact=False)
    return SerdeError(f"invalid type: {shown}, expected {expected}", index)


# Field kinds of the original's request types.
STRING, PEM, HANDLE, ISSUER = "string", "pem", "handle", "issuer"
EXPECTING = {STRING: "a string", PEM: "a base64-encoded string", HANDLE: "a string"}
CREATE = ("struct Request", (("certId", STRING), ("csr", PEM), ("issuer", ISSUER)))
ISSUER_STRUCT = ("struct Issuer", (("certId", STRING), ("privateKeyHandle", HANDLE)))
IMPORT = ("struct Request", (("pem", PEM),))


def de_field(node: Node, kind: str) -> Any:
    if kind == ISSUER:
        if node.kind == "null":
            return None  # Option: null is None
        return de_struct(node, ISSUER_STRUCT)
    if node.kind != "string":
        raise invalid_type(node, EXPECTING[kind])
    if node.surrogate:
        raise Unmodelled("a lone surrogate in a string serde reads")
    return node.value


def de_struct(node: Node, schema: tuple[str, tuple[tuple[str, str], ...]]) -> dict[str, Any]:
    name, fields = schema
    kinds = dict(fields)
    if node.kind == "object":
        found: dict[str, Any] = {}
        for key, key_node, value in node.value:
            if key not in kinds:
                continue  # IgnoredAny: any JSON at all
            if key in found:
                raise SerdeError(f"duplicate field `{key}`", key_node.end)
            found[key] = de_field(value, kinds[key])
        for key, kind in fields:
            if key not in found:
                if kind != ISSUER:
                    raise SerdeError(f"missing field `{key}`", node.end)
                found[key] = None
        return found
    if node.kind == "array":
        found = {}
        count = len(fields)
        for index, (key, kind) in enumerate(fields):
            if index >= len(node.value):
                plural = "" if count == 1 else "s"
                raise SerdeError(
                    f"invalid length {index}, expected {name} with {count} element{plural}",
                    node.end,
                )
            found[key] = de_field(node.value[index], kind)
        if len(node.value) > count:
            raise SerdeError("trailing characters", node.value[count].start + 1)
        return found
    raise invalid_type(node, name)


def read_body(raw: bytes, schema: Any) -> Any:
    """The original's reading of a body into `schema` (None: IgnoredAny); an Expect if 422."""
    if not raw.strip(_WS):
        lines = raw.split(b"\n")
        text = f"EOF while parsing a value at line {len(lines)} column {len(lines[-1])}"
        raise Answered(error(422, text))
    try:
        node = parse_body(raw)
    except JsonSyntax:
        raise Answered(error(422)) from None
    if schema is None:
        return node
    try:
        return de_struct(node, schema)
    except SerdeError as failure:
        if not failure.exact:
            quiet_event("422 text not predicted (uncommon characters or numbers)")
            raise Answered(error(422)) from None
        raise Answered(error(422, f"{failure.text} at {position(raw, failure.index)}")) from None


# -- the model: the store (spec §4.2) -------------------------------------------------------------


def file_name(cert_id: str) -> str:
    alnum = "".join(c for c in cert_id if c.isascii() and c.isalnum())
    return f"{alnum}-{hashlib.sha256(cert_id.encode('utf-8')).hexdigest()}.cer"


def too_long(cert_id: str) -> bool:
    return len(file_name(cert_id).encode()) > NAME_MAX


def wildmatch(pattern: str, text: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.S) is not None


# -- the world: one aziotd and the store it starts every example with -----------------------------


@attrs.define(repr=False)
class World:
    daemon: Daemon
    preloaded_dir: Path
    preloaded: dict[str, str | list[str]]
    config_certs: dict[str, str]  # cert id -> method
    handles: dict[str, str] = attrs.field(factory=dict)  # name -> a handle keyd minted
    publics: dict[str, Any] = attrs.field(factory=dict)  # key pair id -> its public key
    csrs: dict[str, Any] = attrs.field(factory=dict)  # CSR text -> (kind, public key)
    pool: list[tuple[str, Any]] = attrs.field(factory=list)  # valid CSRs and their keys
    baseline: Store = attrs.field(factory=dict)
    log_offset: int = 0

    def __repr__(self) -> str:
        return f"World({self.daemon.root})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    @property
    def certs_dir(self) -> Path:
        return self.daemon.services["certd"].home / "certs"

    @property
    def socket(self) -> str:
        return str(self.daemon.services["certd"].socket)

    def snapshot(self) -> Store:
        files = {}
        for folder, prefix in ((self.certs_dir, ""), (self.preloaded_dir, "preloaded/")):
            if folder.is_dir():
                for path in folder.iterdir():
                    files[prefix + path.name] = path.read_bytes()
        return files

    def restore(self) -> None:
        now = self.snapshot()
        if now == self.baseline:
            return
        for name in set(now) - set(self.baseline):
            self.path_of(name).unlink()
        for name, data in self.baseline.items():
            if now.get(name) != data:
                path = self.path_of(name)
                temp = path.parent.parent / f"restore-{path.name}"
                temp.write_bytes(data)
                os.chmod(temp, 0o600)
                os.replace(temp, path)
        assert self.snapshot() == self.baseline

    def path_of(self, name: str) -> Path:
        if name.startswith("preloaded/"):
            return self.preloaded_dir / name.removeprefix("preloaded/")
        return self.certs_dir / name

    # The store as the model sees it.

    def store_name(self, cert_id: str) -> str | None:
        """The snapshot name of a single-cert id's file; None for a bundle id."""
        entry = self.preloaded.get(cert_id)
        if isinstance(entry, list):
            return None
        if entry is not None:
            return "preloaded/" + Path(entry.removeprefix("file://")).name
        return file_name(cert_id)

    def read(self, cert_id: str) -> bytes | None:
        """get_cert_inner: a file's bytes, a bundle's members concatenated, None if missing;
        Answered(500) where the file cannot be read (a name over NAME_MAX)."""
        entry = self.preloaded.get(cert_id)
        if isinstance(entry, list):
            parts = [self.read(member) for member in entry]
            joined = b"".join(p for p in parts if p)
            return joined or None
        if entry is None and too_long(cert_id):
            raise Answered(error(500, INTERNAL))
        name = self.store_name(cert_id)
        assert name is not None
        return self.baseline.get(name)

    def writable(self, cert_id: str) -> str:
        """The snapshot name a write or delete of `cert_id` touches, or Answered(500)."""
        name = self.store_name(cert_id)
        if name is None or (cert_id not in self.preloaded and too_long(cert_id)):
            raise Answered(error(500, INTERNAL))
        return name

    # Sending and judging.

    def send(self, wire: bytes, head: bool = False) -> rawhttp.Reply:
        with rawhttp.connect(self.socket, timeout=10.0) as sock:
            sock.sendall(wire)
            return rawhttp.read_reply(sock, head_request=head)

    def exchange(self, request: Request, uid: int = 0) -> rawhttp.Reply:
        try:
            want = expect(self, request, uid)
        except Unmodelled as skipped:
            event(f"dropped: {skipped}")
            reject()
        try:
            if uid == 0:
                reply = self.send(request.wire(), head=request.method == "HEAD")
            else:
                reply = send_as(uid, self.socket, request.wire(), request.method == "HEAD")
            found = route(request.path)
            event(f"{request.method[:8]} {found[0] if found else '-'} -> {reply.status}")
            self.judge(request, want, reply)
            return reply
        finally:
            self.restore()

    def judge(self, request: Request, want: Expect, reply: rawhttp.Reply) -> None:
        what = f"{request.describe()}\n  -> {reply.status} {reply.body[:400]!r}"
        assert self.daemon.process is not None and self.daemon.process.poll() is None, (
            f"aziotd exited after {what}"
        )
        assert reply.status in want, f"{what}\n  the original answers {sorted(want)}"
        assert reply.status not in (503, 504), what
        check_head(reply)
        answer = want[reply.status]
        status = reply.status
        if status >= 400:
            assert reply.headers.get("content-type") == "application/json", what
            if request.method == "HEAD":
                assert reply.body == b"", what
            else:
                body = json.loads(reply.body)
                assert isinstance(body, dict) and list(body) == ["message"], what
                text = body["message"]
                assert isinstance(text, str), what
                if answer.messages is not None:
                    assert text in answer.messages, f"{what}\n  wanted {sorted(answer.messages)}"
                if answer.prefix is not None:
                    assert text.startswith(answer.prefix), f"{what}\n  wanted {answer.prefix!r}"
                if status == 422:
                    assert SERDE_POSITION.search(text), what
                    quiet_event("422: " + re.sub(r"[`\"].*", "", text.split(" at line ")[0]))
        elif status == 204:
            assert reply.body == b"" and "content-type" not in reply.headers, what
        else:
            assert reply.headers.get("content-type") == "application/json", what
        after = self.snapshot()
        if 200 <= status < 300:
            changed = {
                name
                for name in set(after) | set(self.baseline)
                if after.get(name) != self.baseline.get(name)
            }
            assert changed <= answer.changes, f"{what}\n  changed {sorted(changed)}"
            if answer.check is not None:
                answer.check(reply.json() if reply.body else None, after)
        else:
            assert after == self.baseline, f"{what}\n  a rejected request changed the store"
        self.check_log(what)

    def check_log(self, what: str) -> None:
        with self.daemon.log.open("rb") as log:
            log.seek(self.log_offset)
            new = log.read()
        self.log_offset += len(new)
        assert b"Traceback" not in new, f"{what}\n  aziotd logged:\n{new.decode(errors='replace')}"


def send_as(uid: int, path: str, wire: bytes, head: bool) -> rawhttp.Reply:
    """One request from a forked child that has dropped to `uid`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: syscalls and os._exit only
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with rawhttp.connect(path, timeout=10.0) as sock:
                sock.sendall(wire)
                reply = rawhttp.read_reply(sock, head_request=head)
            fields = [reply.status, reply.reason, reply.headers]
            fields += [base64.b64encode(reply.body).decode(), b64(reply.first_read)]
            payload = json.dumps(fields)
        except BaseException as failure:
            payload = json.dumps([-1, repr(failure)])
        os.write(write_end, payload.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    fields = json.loads(b"".join(chunks))
    assert fields[0] != -1, fields[1]
    status, reason, headers, body, first = fields
    return rawhttp.Reply(status, reason, headers, base64.b64decode(body), base64.b64decode(first))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@attrs.frozen
class Request:
    method: str
    path: str
    query: str | None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    content_type: str | None = "application/json"

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
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
        return head + (self.body or b"")

    def describe(self) -> str:
        return repr(self.wire()[:2500])


# -- the model: framing and routing (spec §1.3) ---------------------------------------------------


def api_version(query: str | None) -> str | None:
    found = None
    for pair in (query or "").split("&"):
        name, _, value = pair.partition("=")
        if pair and form_decode(name) == "api-version":
            found = form_decode(value)
    return found


CERT_PATH = re.compile("/certificates/([^/]+)")


def route(path: str) -> tuple[str, tuple[str, ...]] | None:
    """create::Route (the literal path), then get_or_import_or_delete::Route (a regex on the raw
    path, the id percent-decoded and required to be UTF-8)."""
    if path == "/certificates":
        return "create", ()
    found = CERT_PATH.fullmatch(path)
    if found is None:
        return None
    try:
        return "cert", (percent_decode(found.group(1)).decode("utf-8"),)
    except UnicodeDecodeError:
        return None


def content_type_of(request: Request) -> str | None:
    """hyper's first Content-Type header, if it is visible ASCII (`to_str()`), else none."""
    values = [v for n, v in request.headers if n.lower() == "content-type"]
    if request.body is not None and request.content_type is not None:
        values.append(request.content_type)
    if not values:
        return None
    value = values[0]
    if not all(" " <= c <= "~" or c == "\t" for c in value):
        return None
    return value


SCHEMAS = {("create", "POST"): CREATE, ("cert", "PUT"): IMPORT}


def expect(world: World, request: Request, uid: int = 0) -> Expect:
    """Every answer the original can give to `request`, in its processing order."""
    version = api_version(request.query)
    if version is None:
        return error(400, "api-version not specified")
    if version != API_VERSION:
        shown = rust_debug(version)
        if shown is None:
            return error(400, prefix='invalid api-version "')
        return error(400, f"invalid api-version {shown}")
    found = route(request.path)
    if found is None:
        return error(404, NOT_FOUND)
    name, params = found
    method = request.method
    body: Any = None
    try:
        if method in ("POST", "DELETE", "PUT"):
            content_type = content_type_of(request)
            is_json = content_type is None or content_type.split(";")[0].strip() == (
                "application/json"
            )
            if method == "PUT" and not is_json:
                return error(415, NOT_JSON_415)
            raw = request.body or b""
            if method == "PUT" or (raw and is_json):
                body = read_body(raw, SCHEMAS.get((name, method)))
        elif method != "GET":
            return error(400, NOT_ALLOWED)
        handler = HANDLERS[name].get(method)
        if handler is None:
            return error(400, NOT_ALLOWED)
        return handler(world, params, body, uid)
    except Answered as answered:
        return answered.expect


def authorize(world: World, uid: int, cert_id: str) -> None:
    if uid == 0:
        return
    if not any(wildmatch(p, cert_id) for p in NOBODY_PATTERNS):
        raise Answered(error(401, f"user {uid} is not authorized to modify the cert {cert_id}"))


def stored(name: str, data: bytes) -> Check:
    def check(body: Any, store: Store) -> None:
        assert store.get(name) == data, f"{name} holds {store.get(name)!r}, not {data!r}"

    return check


def get_cert(world: World, params: tuple[str, ...], body: Any, uid: int) -> Expect:
    (cert_id,) = params
    data = world.read(cert_id)
    if data is None:
        return error(400, ID_NOT_FOUND)
    text = data.decode("utf-8")

    def returned(body: Any, store: Store) -> None:
        assert body == {"pem": text}, body

    return success(200, (), returned)


def import_cert(world: World, params: tuple[str, ...], body: Any, uid: int) -> Expect:
    (cert_id,) = params
    pem = body["pem"]
    authorize(world, uid, cert_id)
    name = world.writable(cert_id)
    data = pem.encode("utf-8")

    def echoed(reply: Any, store: Store) -> None:
        assert reply == {"pem": pem}, reply
        stored(name, data)(reply, store)

    return success(201, (name,), echoed)


def delete_cert(world: World, params: tuple[str, ...], body: Any, uid: int) -> Expect:
    (cert_id,) = params
    authorize(world, uid, cert_id)
    name = world.writable(cert_id)

    def deleted(reply: Any, store: Store) -> None:
        assert name not in store, f"{name} is still there"

    return success(204, (name,), deleted)


# Issuer files as X509::stack_from_pem reads them (the fixture's files and their bundles).
def stack_of(data: bytes) -> list[x509.Certificate] | None:
    """The certs of an issuer file, [] when it has none (PEM blocks of other types skipped),
    None when OpenSSL fails on it (a CERTIFICATE block that is not a cert)."""
    blocks = re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", data, re.S)
    for label, _ in blocks:
        if label not in (b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"):
            continue
        if label != b"CERTIFICATE":
            raise Unmodelled("an old PEM label")
    if not any(label == b"CERTIFICATE" for label, _ in blocks):
        return []
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return None
    if len(certs) != sum(label == b"CERTIFICATE" for label, _ in blocks):
        raise Unmodelled("PEM blocks the model does not count alike")
    return certs


def nul_message(handle: str) -> str:
    at = handle.encode("utf-8").index(b"\0")
    return (
        'parameter "issuer.privateKeyHandle" has an invalid value\n'
        f"caused by: nul byte found in provided data at position: {at}"
    )


def create_cert(world: World, params: tuple[str, ...], body: Any, uid: int) -> Expect:
    if body is None:
        return error(400, MISSING_BODY)
    cert_id, csr, issuer = body["certId"], body["csr"], body["issuer"]
    authorize(world, uid, cert_id)
    kind, public = world.csrs.get(csr, ("garbage", None))
    if kind == "garbage":
        return error(400, prefix=CSR_PREFIX)
    if kind == "unverified":
        return error(400, CSR_UNVERIFIED)
    chain: list[x509.Certificate] = []
    signer: str | None = None
    if issuer is not None:
        data = world.read(issuer["certId"])
        if data is None:
            return error(400, ISSUER_NOT_FOUND)
        stack = stack_of(data)
        if stack is None:
            return error(500, INTERNAL)
        if not stack:
            return error(400, INVALID_ISSUER)
        handle = issuer["privateKeyHandle"]
        if "\0" in handle:
            return error(400, nul_message(handle))
        signer = next((k for k, h in world.handles.items() if h == handle), None)
        if signer not in world.publics:
            return error(500, INTERNAL)  # keyd refuses the handle: an issuance failure
        chain = stack
    else:
        method = world.config_certs.get(cert_id)
        if method is None or method == "est":
            return error(500, INTERNAL)  # no issuance config; EST unreachable
        if method == "self_signed":
            if cert_id not in world.publics:
                return error(500, INTERNAL)  # no key pair of that id in keyd
            signer = cert_id
        else:
            stack = stack_of(world.read(LOCAL_CA_CERT) or b"")
            assert stack, "the fixture's local CA cert"
            chain, signer = stack, LOCAL_CA_KEY
    name = world.writable(cert_id)
    return success(201, (name,), issued(world, name, public, chain, world.publics[signer]))


def issued(world: World, name: str, public: Any, chain: list[x509.Certificate], key: Any) -> Check:
    def check(body: Any, store: Store) -> None:
        quiet_event(f"issued and verified: {'self-signed' if not chain else 'chain'}")
        assert isinstance(body, dict) and list(body) == ["pem"], body
        pem = body["pem"]
        assert store.get(name) == pem.encode(), "the stored PEM is not the returned one"
        certs = x509.load_pem_x509_certificates(pem.encode())
        assert len(certs) == 1 + len(chain), pem
        leaf = certs[0]
        assert leaf.public_key() == public, "the cert is not for the CSR's key"
        assert certs[1:] == chain, "the issuer chain does not follow the cert"
        if chain:
            assert leaf.issuer == chain[0].subject
        else:
            assert leaf.issuer == leaf.subject
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(
                leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256()
            )

    return check


Handler = Callable[[World, tuple[str, ...], Any, int], Expect]
HANDLERS: dict[str, dict[str, Handler]] = {
    "create": {"POST": create_cert},
    "cert": {"GET": get_cert, "PUT": import_cert, "DELETE": delete_cert},
}


# -- the daemon -----------------------------------------------------------------------------------

LOCAL_CA_CERT = LOCAL_CA_KEY = "local-ca"
KEY_PAIRS = {"local-ca": "ec-p256", "self-signed": "ec-p256", "rsa-issuer": "rsa-2048"}
CONFIG_CERTS = {
    "local-ca": "self_signed",
    "self-signed": "self_signed",
    "self-nokey": "self_signed",
    "mod-leaf": "local_ca",
    "est-cert": "est",
}


def throwaway_cert(common_name: str, key: Any = None, ca: bool = True) -> x509.Certificate:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(key, hashes.SHA256())


def pem_of(*certs: x509.Certificate) -> str:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs).decode()


def csr_of(key: Any, common_name: str, extensions: tuple[Any, ...] = ()) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


CSR_POOL_SIZE = 4  # the fuzzing's CSRs; the pool's fifth, an Ed25519 one, is pinned below


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="aziot-certd-fuzz-"))
    os.chmod(root, 0o755)
    preloaded_dir = root / "preloaded"
    preloaded_dir.mkdir()
    pre_cert = throwaway_cert("preloaded")
    (preloaded_dir / "pre.pem").write_text(pem_of(pre_cert))
    preloaded: dict[str, str | list[str]] = {
        "pre-file": f"file://{preloaded_dir / 'pre.pem'}",
        "pre-absent": f"file://{preloaded_dir / 'absent.pem'}",
        "pre-bundle": ["pre-file", "local-ca", "nothing-here"],
        "pre-empty-bundle": ["nothing-here", "pre-absent"],
    }
    lines = ["[cert_issuance]", f'local_ca = {{ cert = "{LOCAL_CA_CERT}", pk = "{LOCAL_CA_KEY}" }}']
    lines += [
        'local-ca = { method = "self_signed", expiry_days = 365, common_name = "Fuzz CA" }',
        'self-signed = { method = "self_signed", common_name = "self" }',
        'self-nokey = { method = "self_signed" }',
        'mod-leaf = { method = "local_ca", expiry_days = 10, subject = { CN = "leaf", L = "x" } }',
        'est-cert = { method = "est", url = "https://127.0.0.1:1/.well-known/est", '
        'username = "u", password = "p" }',
        "[preloaded_certs]",
    ]
    for cert_id, entry in preloaded.items():
        lines.append(f"{cert_id} = {json.dumps(entry)}")
    lines += ["[[principal]]", f"uid = {NOBODY}", f"certs = {json.dumps(list(NOBODY_PATTERNS))}"]
    daemon = start_certd(
        root / "d", "\n".join(lines) + "\n", env={"NO_PROXY": "*", "no_proxy": "*"}
    )
    try:
        world = World(daemon, preloaded_dir, preloaded, dict(CONFIG_CERTS))
        for key_id, algorithm in KEY_PAIRS.items():
            body = {"keyId": key_id, "preferredAlgorithms": algorithm}
            reply = daemon.request("keyd", "POST", "/keypair", body)
            assert reply.status == 200, reply.body
            world.handles[key_id] = reply.json()["keyHandle"]
            world.publics[key_id] = keyd_public_key(daemon, world.handles[key_id])
        reply = daemon.request("keyd", "POST", "/key", {"keyId": "sym", "usage": "sign"})
        world.handles["sym"] = reply.json()["keyHandle"]
        # The CSRs the fuzzing sends: their keys are the test's.
        keys: list[Any] = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
        keys += [rsa.generate_private_key(public_exponent=65537, key_size=2048)]
        keys += [ed25519.Ed25519PrivateKey.generate()]
        ca_ext = (x509.BasicConstraints(ca=True, path_length=None),)
        san = (x509.SubjectAlternativeName([x509.DNSName("m.local")]),)
        world.pool = [
            (csr_of(key, f"fuzz-{i}", (ca_ext, san, ())[i % 3]), key.public_key())
            for i, key in enumerate(keys)
        ]
        assert len(world.pool) == CSR_POOL_SIZE + 1
        # The local CA's cert: self-signed by certd with keyd's key `local-ca`.
        csr, public = world.pool[0]
        reply = daemon.request("certd", "POST", "/certificates", {"certId": "local-ca", "csr": csr})
        assert reply.status == 201, reply.body
        key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain_ca = throwaway_cert("chain ca")
        imports = {
            "chain": pem_of(throwaway_cert("chain leaf", ca=False), chain_ca),
            "empty": "",
            "text": "no certs here",
            "bad-cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "cert-then-text": pem_of(throwaway_cert("then text")) + "trailing words\n",
            "rsa-ca": pem_of(throwaway_cert("rsa ca")),
            "unicode-é": pem_of(throwaway_cert("unicode")),
            "exact": pem_of(throwaway_cert("exact")),
            "key-pem": key_pem.decode(),
            "csr-only": world.pool[1][0],
        }
        for cert_id, pem in imports.items():
            reply = daemon.request("certd", "PUT", "/certificates/" + pct(cert_id), {"pem": pem})
            assert reply.status == 201, reply.body
        os.chmod(world.socket, 0o666)
        world.baseline = world.snapshot()
        assert len(world.baseline) == 1 + 1 + len(imports)
        world.log_offset = daemon.log.stat().st_size
        yield world
        reply = world.send(Request("GET", "/certificates/chain", "api-version=2020-09-01").wire())
        assert reply.status == 200, reply.body
    finally:
        if daemon.process is not None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def keyd_public_key(daemon: Daemon, handle: str) -> Any:
    def parameter(name: str) -> bytes:
        reply = daemon.request("keyd", "POST", f"/parameters/{name}", {"keyHandle": handle})
        assert reply.status == 200, reply.body
        value = reply.json()["value"]
        return value.encode() if name == "algorithm" else base64.b64decode(value)

    if parameter("algorithm") == b"ECDSA":
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), parameter("ec-point"))
    modulus = int.from_bytes(parameter("rsa-modulus"))
    exponent = int.from_bytes(parameter("rsa-exponent"))
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def pct(text: str) -> str:
    return "".join(c if c in UNRESERVED else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


# -- strategies -----------------------------------------------------------------------------------

UNRESERVED = string.ascii_letters + string.digits + "-._~"
PATH_SAFE = UNRESERVED + "!$&'()*+,;=:@"
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
TEXT_ALPHABET = st.sampled_from(
    list(string.ascii_letters + string.digits + " -_./%*?\"\\'\n\t\0\x01\x7f")
    + sorted(PRINTABLE_EXTRA)
)
any_text = st.text(TEXT_ALPHABET, max_size=10)
STORE_IDS = (
    "local-ca", "chain", "empty", "text", "bad-cert", "cert-then-text", "rsa-ca", "unicode-é",
    "exact", "key-pem", "csr-only", "pre-file", "pre-absent", "pre-bundle", "pre-empty-bundle", "missing", "mod-1",
)  # fmt: skip
long_ids = st.builds(
    lambda char, count: char * count, st.sampled_from("aZ9-"), st.integers(170, 260)
)
cert_ids = st.one_of(
    st.sampled_from(STORE_IDS),
    st.sampled_from(STORE_IDS),
    st.sampled_from(sorted(CONFIG_CERTS)),
    st.text(alphabet=UNRESERVED, min_size=1, max_size=10),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8),
    long_ids,
)


@attrs.frozen
class Csr:
    """A CSR made when the example runs: the pool's `index`, changed by `variant`."""

    index: int
    variant: str


VALID_VARIANTS = ("plain", "crlf", "leading-text", "trailing-text", "old-label", "no-newline")
BAD_VARIANTS = ("tampered-signature", "tampered-subject")
GARBAGE_VARIANTS = ("cert-label", "key-label", "truncated", "empty", "garbage", "der-garbage")
csrs = st.builds(
    Csr,
    st.integers(0, CSR_POOL_SIZE - 1),
    st.one_of(
        st.just("plain"),
        st.just("plain"),
        st.sampled_from(VALID_VARIANTS),
        st.sampled_from(BAD_VARIANTS),
        st.sampled_from(GARBAGE_VARIANTS),
    ),
)


def make_csr(world: World, spec: Csr) -> str:
    pem, public = world.pool[spec.index]
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    variant = spec.variant

    def wrap(data: bytes, label: str = "CERTIFICATE REQUEST") -> str:
        body = base64.encodebytes(data).decode()
        return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"

    kind = "valid"
    if variant == "plain":
        text = pem
    elif variant == "crlf":
        text = pem.replace("\n", "\r\n")
    elif variant == "leading-text":
        text = "a CSR follows\n" + pem
    elif variant == "trailing-text":
        text = pem + "that was a CSR\n"
    elif variant == "old-label":
        text = wrap(der, "NEW CERTIFICATE REQUEST")
    elif variant == "no-newline":
        text = pem.rstrip("\n")
    elif variant == "tampered-signature":
        changed = bytearray(der)
        changed[-1] ^= 0x01
        text, kind = wrap(bytes(changed)), "unverified"
    elif variant == "tampered-subject":
        at = der.index(f"fuzz-{spec.index}".encode())
        text, kind = wrap(der[:at] + b"F" + der[at + 1 :]), "unverified"
    else:
        kind = "garbage"
        text = {
            "cert-label": wrap(der, "CERTIFICATE"),
            "key-label": wrap(der, "PRIVATE KEY"),
            "truncated": pem[: len(pem) // 2] + "\n-----END CERTIFICATE REQUEST-----\n",
            "empty": "",
            "garbage": "not a CSR at all",
            "der-garbage": wrap(b"\x30\x03\x02\x01\x00"),
        }[variant]
    world.csrs[text] = (kind, public)
    return text


@attrs.frozen
class Handle:
    how: str  # real, edited, nul, text
    name: str = ""
    at: int = 0


handle_specs = st.one_of(
    st.builds(Handle, st.just("real"), st.sampled_from([*KEY_PAIRS, "sym"])),
    st.builds(Handle, st.just("real"), st.sampled_from(list(KEY_PAIRS))),
    st.builds(
        Handle,
        st.sampled_from(["cut", "flip", "prefix", "nul"]),
        st.sampled_from([*KEY_PAIRS, "sym"]),
        st.integers(0, 10_000),
    ),  # fmt: skip
    st.builds(Handle, st.just("text"), any_text),
)


def make_handle(world: World, spec: Handle) -> str:
    if spec.how == "text":
        return spec.name
    handle = world.handles[spec.name]
    if spec.how == "real":
        return handle
    at = spec.at % len(handle)
    if spec.how == "cut":
        return handle[:at]
    if spec.how == "prefix":
        return "x" + handle
    if spec.how == "nul":
        return handle[:at] + "\0" + handle[at:]
    sig = handle.rindex("sig=") + 4  # a character of the signature, changed
    at = sig + spec.at % (len(handle) - sig)
    return handle[:at] + ("A" if handle[at] != "A" else "B") + handle[at + 1 :]


# JSON values of any shape (no repeated keys, shallow: see the pins for those).
NUMBER_TEXTS = ("0", "5", "-7", "18446744073709551615", "-9223372036854775808", *FLOAT_TEXTS)


@attrs.frozen
class Number:
    text: str


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from(NUMBER_TEXTS).map(Number)
    | st.integers(-1000, 10**6).map(lambda n: Number(str(n)))
    | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)


def issuer_objects() -> st.SearchStrategy[Any]:
    good = st.fixed_dictionaries(
        {
            "certId": st.one_of(
                st.sampled_from(["local-ca", "chain", "rsa-ca", "pre-file", "pre-bundle"]),
                cert_ids,
            ),
            "privateKeyHandle": handle_specs,
        }
    )
    bad = st.one_of(shaped(("certId", "privateKeyHandle"), good), json_values)
    return mostly(good, bad)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` about four times in five (one_of drops repeated branches: these are distinct)."""
    return weighted(good, 4, bad)


def weighted(good: st.SearchStrategy[Any], times: int, bad: st.SearchStrategy[Any]) -> Any:
    return st.one_of(*[good.map(lambda value: value) for _ in range(times)], bad)


def shaped(names: tuple[str, ...], good: st.SearchStrategy[dict]) -> st.SearchStrategy[Any]:
    """A good object made bad: a field dropped, of another type, an extra field, or as a JSON
    array of its fields (which serde takes for a struct), possibly too short or too long."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        body = dict(draw(good))
        roll = draw(st.sampled_from(["array", "extra", "retype", "drop", "array"]))
        name = draw(st.sampled_from(names))
        if roll == "drop":
            body.pop(name, None)
        elif roll == "retype":
            body[name] = draw(json_values)
        elif roll == "extra":
            body[draw(any_text)] = draw(json_values)
        else:
            values = [body.get(n) for n in names]
            cut = draw(st.integers(0, len(values) + 1))
            return values[:cut] + ([draw(json_values)] if cut > len(values) else [])
        return body

    return build()


create_ids = st.one_of(
    st.sampled_from(sorted(CONFIG_CERTS)), st.sampled_from(sorted(CONFIG_CERTS)), cert_ids
)
create_good = st.fixed_dictionaries(
    {"certId": create_ids, "csr": csrs},
    optional={"issuer": st.one_of(st.none(), issuer_objects())},
)
create_bodies = st.one_of(
    create_good, create_good, shaped(("certId", "csr", "issuer"), create_good)
)
pem_texts = st.one_of(
    any_text,
    st.sampled_from(["", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]),
    st.builds(lambda n: "x" * n, st.integers(0, 5000)),
)
import_good = st.fixed_dictionaries({"pem": pem_texts})
import_bodies = mostly(import_good, shaped(("pem",), import_good))


@attrs.frozen
class Body:
    """A JSON body as drawn (CSRs and handles made at run time), and how it is written."""

    value: Any
    separators: tuple[str, str] = (",", ":")
    ascii_only: bool = True
    newlines: bool = False
    padding: str = ""


bodies_of = {
    "create": create_bodies,
    "import": import_bodies,
    "junk": json_values,
    # POST /certificates' own test: shapes are the other tests' business, issuance is this one's
    "create-issuance": weighted(create_good, 6, create_bodies),
}


def body_strategy(kind: str) -> st.SearchStrategy[Body]:
    return st.builds(
        Body,
        bodies_of[kind],
        st.sampled_from([(",", ":"), (", ", ": ")]),
        st.booleans(),
        st.integers(0, 5).map(lambda n: n == 0),
        st.sampled_from(["", "", " ", "\n", " \r\n\t"]),
    )


def make(world: World, value: Any) -> Any:
    if isinstance(value, Csr):
        return make_csr(world, value)
    if isinstance(value, Handle):
        return make_handle(world, value)
    if isinstance(value, list):
        return [make(world, v) for v in value]
    if isinstance(value, dict):
        return {k: make(world, v) for k, v in value.items()}
    return value


def encode(value: Any, body: Body) -> str:
    item, key = body.separators
    if body.newlines:
        item = item.rstrip() + "\n"
    if isinstance(value, Number):
        return value.text
    if isinstance(value, list):
        return "[" + item.join(encode(v, body) for v in value) + "]"
    if isinstance(value, dict):
        inner = item.join(
            json.dumps(k, ensure_ascii=body.ascii_only) + key + encode(v, body)
            for k, v in value.items()
        )
        return "{" + inner + "}"
    return json.dumps(value, ensure_ascii=body.ascii_only)


@attrs.frozen
class Case:
    method: str
    path: str
    query: str | None = "api-version=2020-09-01"
    headers: tuple[tuple[str, str], ...] = ()
    body: Body | bytes | None = None
    content_type: str | None = "application/json"

    def request(self, world: World) -> Request:
        raw = self.body
        if isinstance(raw, Body):
            text = encode(make(world, raw.value), raw)
            raw = (raw.padding + text + raw.padding).encode("utf-8")
        return Request(self.method, self.path, self.query, self.headers, raw, self.content_type)


@st.composite
def segment(draw: st.DrawFn, text: str) -> str:
    mode = draw(st.sampled_from(["minimal", "minimal", "all", "mixed"]))
    upper = draw(st.booleans())
    out = []
    for char in text:
        if char not in PATH_SAFE or mode == "all" or (mode == "mixed" and draw(st.booleans())):
            pattern = "%{:02X}" if upper else "%{:02x}"
            out.append("".join(pattern.format(b) for b in char.encode("utf-8")))
        else:
            out.append(char)
    return "".join(out)


@st.composite
def cert_paths(draw: st.DrawFn) -> str:
    return "/certificates/" + draw(segment(draw(cert_ids)))


junk_paths = st.one_of(
    st.sampled_from(
        [
            "/certificates/",
            "/certificates/chain/",
            "/certificates/chain/x",
            "/certificates//x",
            "/Certificates/chain",
            "/certificate",
            "/certificates%2Fchain",
            "/",
            "/key",
            "/certificates/%C3%28",
            "/certificates/%FF",
            "/certificates/%zz",
            "/certificates/%",
            "/certificates/%2F",
            "/certificates/%00",
            "//certificates",
            "/certificates/.",
        ]
    ),  # fmt: skip
    st.lists(st.text(alphabet=PATH_SAFE, max_size=6), max_size=3).map(
        lambda parts: "/" + "/".join(parts)
    ),
)
paths = st.one_of(st.just("/certificates"), cert_paths(), cert_paths(), junk_paths)


@st.composite
def queries(draw: st.DrawFn) -> str | None:
    if draw(st.integers(0, 9)) < 6:
        return "api-version=" + API_VERSION
    if draw(st.integers(0, 5)) == 0:
        return None
    names = st.sampled_from(["api-version", "api-version", "api%2Dversion", "API-VERSION", "x"])
    values = st.one_of(
        st.sampled_from([API_VERSION, "2021-05-01", "2022-08-01", "", "2020-09-01 ", "2020-9-1"]),
        any_text,
    )
    pairs = draw(st.lists(st.tuples(names, values), max_size=3))
    encoded = []
    for name, value in pairs:
        text = "".join(
            c if c in UNRESERVED else "+" if c == " " else "".join(f"%{b:02X}" for b in c.encode())
            for c in value
        )
        encoded.append(f"{name}={text}" if draw(st.integers(0, 7)) else name)
    return "&".join(encoded)


content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json",
            "application/json; charset=utf-8",
            " application/json ;x",
            "APPLICATION/JSON",
            "application/jsonx",
            "text/plain",
            "",
        ]
    ),  # fmt: skip
    st.none(),
)
header_lists = st.lists(
    st.tuples(
        st.sampled_from(["host", "accept", "user-agent", "x-request-id"]),
        st.sampled_from(["certd.sock", "", "*/*", "fuzz"]),
    ),
    max_size=2,
).map(tuple)
methods = st.integers(0, 9).flatmap(
    lambda roll: (
        st.sampled_from(["GET", "POST", "DELETE", "PUT"])
        if roll < 8
        else st.sampled_from(["PATCH", "HEAD", "OPTIONS", "get", "Put"])
    )
)
bodies = st.one_of(
    st.none(),
    st.just(b""),
    body_strategy("create"),
    body_strategy("import"),
    body_strategy("junk"),
    st.sampled_from([b"null", b"{", b"[1,]", b'{"pem":"x"} x', b"\xff\xfe", b"{}"]),
    st.binary(max_size=24),
)


# -- the fuzz tests -------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(300))
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
    """Methods, paths, api-versions, content types and bodies of every kind on both routes and
    beyond: §1.3's order (api-version, route, method, body rules, serde) and then certd's."""
    world.exchange(case.request(world))


@st.composite
def store_cases(draw: st.DrawFn) -> Case:
    method = draw(st.sampled_from(["GET", "GET", "PUT", "PUT", "DELETE", "DELETE"]))
    path = draw(cert_paths())
    if method == "PUT":
        return Case("PUT", path, body=draw(body_strategy("import")))
    if method == "DELETE":
        body = draw(st.one_of(st.none(), body_strategy("junk")))
        return Case("DELETE", path, body=body)
    return Case("GET", path)


@settings(FUZZ, max_examples=examples(250))
@given(store_cases())
def test_store(world: World, case: Case) -> None:
    """GET, PUT and DELETE of any cert id: the store's files, preloaded files and bundles,
    missing ids, ids percent-encoded every way, ids whose file name is over NAME_MAX."""
    world.exchange(case.request(world))


@settings(FUZZ, max_examples=examples(300))
@given(body_strategy("create-issuance"))
def test_create(world: World, body: Body) -> None:
    """POST /certificates: CSRs valid, tampered, mislabelled and garbled; no issuer, a null one,
    issuer objects naming certs, missing, empty, non-cert and bundle files, with key handles
    real, edited, junk and NUL-containing; certIds self-signed, local-CA, EST, unconfigured."""
    world.exchange(Case("POST", "/certificates", body=body).request(world))


@st.composite
def nobody_cases(draw: st.DrawFn) -> Case:
    cert_id = draw(
        st.one_of(
            st.sampled_from(["mod-1", "mod-", "pre-file", "exact", "ex", "ax", "x", "chain"]),
            st.sampled_from(["local-ca", "pre-bundle", "mod-leaf", "self-signed"]),
            cert_ids,
        )
    )
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "POST"]))
    if method == "POST":
        body = Body({"certId": cert_id, "csr": draw(csrs)})
        return Case("POST", "/certificates", body=body)
    path = "/certificates/" + draw(segment(cert_id))
    if method == "PUT":
        return Case("PUT", path, body=draw(body_strategy("import")))
    return Case(method, path)


@settings(FUZZ, max_examples=examples(60))
@given(nobody_cases())
def test_principals(world: World, case: Case) -> None:
    """Another uid (65534, principal patterns mod-*, pre-*, exact, ?x, local-ca): writes outside
    its patterns are 401 with the original's text, before anything else; reads are open."""
    world.exchange(case.request(world), uid=NOBODY)


def test_the_daemon_survived(world: World) -> None:
    reply = world.send(Request("GET", "/certificates/local-ca", "api-version=2020-09-01").wire())
    assert reply.status == 200
    assert world.snapshot() == world.baseline
    world.check_log("the end")


# -- differences from the original that the fuzzing above found (all fixed) ---------------------


def pin(world: World, request: Request, want: Expect) -> None:
    try:
        reply = world.send(request.wire(), head=request.method == "HEAD")
        world.judge(request, want, reply)
    finally:
        world.restore()


def raw_request(method: str, path: str, raw: bytes) -> Request:
    return Request(method, path, "api-version=2020-09-01", body=raw)


def put(cert_id: str, raw: bytes, **options: Any) -> Request:
    target = "/certificates/" + pct(cert_id)
    return Request("PUT", target, "api-version=2020-09-01", body=raw, **options)


def pem_stored(world: World, cert_id: str, pem: str) -> Expect:
    name = world.writable(cert_id)
    return success(201, (name,), stored(name, pem.encode()))


def test_ed25519_csrs_are_issued(world: World) -> None:
    """OpenSSL reads and verifies an Ed25519 CSR and certifies its key with the issuer's
    (create_cert only checks the CSR's self-signature)."""
    csr, public = world.pool[CSR_POOL_SIZE]
    assert isinstance(public, ed25519.Ed25519PublicKey)
    name = world.writable("self-signed")
    raw = json.dumps({"certId": "self-signed", "csr": csr}).encode()
    check = issued(world, name, public, [], world.publics["self-signed"])
    pin(world, raw_request("POST", "/certificates", raw), success(201, (name,), check))


@pytest.mark.parametrize("issuer", ["csr-only", "key-pem"])
def test_an_issuer_file_without_certificate_blocks_is_an_invalid_issuer(
    world: World, issuer: str
) -> None:
    """X509::stack_from_pem skips PEM blocks of other types and stops at "no start line": no
    certs, so 400 "invalid issuer"."""
    csr = world.pool[0][0]
    body = {"certId": "x", "csr": csr, "issuer": {"certId": issuer, "privateKeyHandle": "h"}}
    request = raw_request("POST", "/certificates", json.dumps(body).encode())
    pin(world, request, error(400, INVALID_ISSUER))


def test_a_non_ascii_content_type_is_no_content_type(world: World) -> None:
    """hyper's `HeaderValue::to_str()` fails on obs-text, and the original then treats the
    body as JSON (`map_or(true, …)`)."""
    request = put("x", b'{"pem":"ct"}', content_type="text/plain\u00e9")
    pin(world, request, pem_stored(world, "x", "ct"))


def test_the_first_content_type_counts(world: World) -> None:
    headers = (("Content-Type", "application/json"),)
    request = put("x", b'{"pem":"first"}', headers=headers, content_type="text/plain")
    pin(world, request, pem_stored(world, "x", "first"))


@pytest.mark.parametrize("where", ["unknown-field", "delete-body"])
def test_deep_json_where_it_is_ignored(world: World, where: str) -> None:
    """serde_json's `ignore_value` is iterative (no recursion limit): an unknown field's value
    and an `IgnoredAny` body (DELETE) may be nested any depth."""
    deep = b"[" * 300 + b"]" * 300
    if where == "delete-body":
        name = world.writable("chain")
        pin(world, raw_request("DELETE", "/certificates/chain", deep), success(204, (name,)))
    else:
        raw = b'{"pem":"deep","x":' + deep + b"}"
        pin(world, put("x", raw), pem_stored(world, "x", "deep"))


@pytest.mark.parametrize("where", ["unknown-field", "delete-body"])
def test_repeated_ignored_keys(world: World, where: str) -> None:
    """serde refuses a repeated *field* of the struct, never a repeated unknown key, and an
    `IgnoredAny` body is any JSON."""
    if where == "delete-body":
        name = world.writable("chain")
        request = raw_request("DELETE", "/certificates/chain", b'{"a":1,"a":2}')
        pin(world, request, success(204, (name,)))
    else:
        pin(world, put("x", b'{"pem":"twice","z":1,"z":2}'), pem_stored(world, "x", "twice"))


def test_lone_surrogates_where_they_are_ignored(world: World) -> None:
    """serde_json's `ignore_str` consumes a \\u escape without checking it."""
    pin(world, put("x", b'{"pem":"s","z":"\\ud800"}'), pem_stored(world, "x", "s"))


# 422 texts: serde's words and position (one pass in body order, byte columns, Rust quoting).


def test_invalid_type_position_is_just_after_the_value(world: World) -> None:
    text = "invalid type: integer `5`, expected a base64-encoded string at line 1 column 9"
    pin(world, put("x", b'{"pem": 5}'), error(422, text))


def test_serde_columns_count_bytes(world: World) -> None:
    pin(world, put("x", '{"é":1}'.encode()), error(422, "missing field `pem` at line 1 column 8"))


def test_the_first_bad_field_in_the_body_is_reported(world: World) -> None:
    text = "invalid type: integer `5`, expected a base64-encoded string at line 1 column 8"
    pin(world, raw_request("POST", "/certificates", b'{"csr":5}'), error(422, text))


def test_strings_in_invalid_type_texts_are_rust_debug_quoted(world: World) -> None:
    raw = '{"certId":"x","csr":"y","issuer":"é"}'.encode()
    text = 'invalid type: string "é", expected struct Issuer at line 1 column 37'
    pin(world, raw_request("POST", "/certificates", raw), error(422, text))
