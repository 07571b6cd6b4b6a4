"""Hypothesis fuzzing of every identityd route against one real aziotd (keyd + identityd),
provisioned by DPS (symmetric key) against a module-scoped mockcloud `Cloud`.

How it works, as `tests/test_fuzz_certd.py` does it for certd. Every example is one request on a
fresh connection with a 10 s timeout (a hang is a failure), as root or, from a forked child, as
another uid. `expect()` is a model of the original written from spec/api.md (§1.2-§1.3 framing
and processing order, §2.3 authorization, §5 identityd, §7, §9), spec/provisioning.md §9 and
§12-§14, and the original's own code where the spec is silent (aziot-identityd 1.6's routes,
`Api::*_identity`, `IdentityManager::*_module_identity`). It knows the world the module fixture
built (the hub's modules for the device, identityd's backups) and gives, for a request, every
status the original can answer with the exact message where one is known (a prefix for the hub's
causes), which homedir files and hub modules a success may change, and an independent check of a
success: the identity's shape, its ids and genId equal to the hub's, and its key handle signing
(through keyd) exactly as the hub's key for that identity does.

The world: device `fuzz-dev` on the hub; principals mod1 (uid 4242, idtype module: reconciled
into the hub), devproc (4243, idtype device), edged (4244, no idtype: the daemon); 65534 has no
principal. Hub modules: mod1, made (created through the API), foreign (put in the hub directly,
with the hub's own keys, no backup), nogen (no generation id), and a backup-only module, ghost
(created through the API, then removed from the hub behind identityd's back).

After every example: the daemon still runs, the response head came in the client's first read,
error bodies are exactly `{"message": str}`, the daemon logged no traceback, and the hub's module
set and identityd's homedir (`device_info`, `prev_state`, `modules/…`) equal the baseline,
except for what the answer allows (a success's module and its backup; a hub read's backup, which
the original writes too). Then both are put back exactly, so examples start from the same state.

`type=local`: this world has no `[localid]` and no local principal, so a local create is the
original's 500 (`no local id settings specified`) and a local read its 400 (`local identity for
<id> doesn't exist`); issuing local identities needs certd and is tested in test_identityd.py.

A few kinds of request are not fuzzed: a reprovision by root or the daemon (a DPS round trip and
a reconciliation: one deterministic test below), JSON with repeated keys, lone surrogates or deep
nesting (serde's rules for those are pinned in test_fuzz_certd.py and test_body.py).

The example counts are fixed per test (120, 110 and 70: 300 in all, about 30 s after a ~7 s
start); `IDENTITYD_FUZZ_SCALE=<factor>` multiplies them. Examples are derandomized.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import re
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import attrs
import pytest
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from mockcloud.cloud import Cloud
from mockcloud.hub import Module
from tests import rawhttp
from tests.daemon import Daemon
from tests.fuzz_common import (
    Answered,
    Unmodelled,
    check_head,
    form_decode,
    percent_decode,
    quiet_event,
)
from tests.test_daemon import as_uid
from tests.test_identityd import MODULE_PRINCIPAL, MODULE_UID, dps_config, sign_with, start

SCALE = float(os.environ.get("IDENTITYD_FUZZ_SCALE", "1"))
VERSIONS = ("2020-09-01", "2021-12-01", "2022-08-01")
DEVICE_ID = "fuzz-dev"
DEVICE_UID, DAEMON_UID, NOBODY = 4243, 4244, 65534
PRINCIPALS = (
    MODULE_PRINCIPAL
    + f'\n[[principal]]\nuid = {DEVICE_UID}\nname = "devproc"\nidtype = ["device"]\n'
    + f'\n[[principal]]\nuid = {DAEMON_UID}\nname = "edged"\n'
)

NOT_FOUND = "not found"
NOT_ALLOWED = "method not allowed"
MISSING_BODY = "missing request body"
NOT_JSON_415 = "request body must be application/json"
AUTHZ = "authorization error"
INTERNAL = "internal error"
TYPE_MISSING = 'parameter "type" has an invalid value\ncaused by: missing parameter'
TYPE_INVALID = 'parameter "type" has an invalid value\ncaused by: invalid type: '
EMPTY_NAME = 'parameter "module_id" has an invalid value\ncaused by: module name cannot be empty'
NO_GENERATION = "module identity not found"
HUB = "Hub client error\ncaused by: "
DELETE_MISSING = HUB + "unexpected HTTP status code: 404 Not Found"
MASTER_ID = "aziot_identityd_master_id"
MASTER_FILE = f"aziotidentitydmasterid-{hashlib.sha256(MASTER_ID.encode()).hexdigest()}.key"
SERDE_POSITION = re.compile(r" at line \d+ column \d+\Z")
# Rust's char::is_whitespace (Unicode White_Space): what the original's `trim()` strips.
RUST_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)


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


# -- the model: outcomes -------------------------------------------------------------------------

Files = dict[str, bytes]
Hub = dict[str, tuple[Any, ...]]  # module id -> what the hub keeps of it (not its etag)
Check = Callable[["World", Any, Files, Hub], None]


@attrs.frozen
class Answer:
    messages: frozenset[str] | None = None  # the original's message, and known variants of ours
    prefix: str | None = None
    files: frozenset[str] = frozenset()  # homedir files this answer may change
    hub: frozenset[str] = frozenset()  # hub modules this answer may change
    check: Check | None = None


Expect = dict[int, Answer]


def error(status: int, *messages: str, prefix: str | None = None, files: Any = ()) -> Expect:
    return {status: Answer(frozenset(messages) if messages else None, prefix, frozenset(files))}


def success(status: int, check: Check, files: Any = (), hub: Any = ()) -> Expect:
    return {status: Answer(files=frozenset(files), hub=frozenset(hub), check=check)}


# -- requests ------------------------------------------------------------------------------------


@attrs.frozen
class Request:
    method: str
    path: str
    query: str | None
    body: bytes | None = None
    content_type: str | None = "application/json"

    @property
    def target(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        if self.body is not None:
            lines.append(f"content-length: {len(self.body)}")
            if self.content_type is not None:
                lines.append(f"content-type: {self.content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (self.body or b"")

    def describe(self) -> str:
        return repr(self.wire()[:1500])


def query_pairs(query: str | None) -> list[tuple[str, str]]:
    pairs = []
    for pair in (query or "").split("&"):
        if pair:
            name, _, value = pair.partition("=")
            pairs.append((form_decode(name), form_decode(value)))
    return pairs


def rust_debug(text: str) -> str | None:
    """Rust's `{:?}` of a str, or None where the model cannot say."""
    escapes = {"\t": "\\t", "\r": "\\r", "\n": "\\n", "\\": "\\\\", '"': '\\"', "\0": "\\0"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif char < " " or char == "\x7f":
            out.append(f"\\u{{{ord(char):x}}}")
        elif char.isascii():
            out.append(char)
        else:
            return None
    return '"' + "".join(out) + '"'


MODULE_PATH = re.compile("/identities/modules/([^/]+)")


def route(path: str, version: str) -> tuple[str, str | None] | None:
    """The original's routes in order (spec §5): literal paths, the module regex on the raw path
    (its id percent-decoded, UTF-8 or no match), provisioning only from 2021-12-01."""
    literal = {
        "/identities/modules": "modules",
        "/identities/identity": "identity",
        "/identities/device": "device",
        "/trust-bundle": "trust-bundle",
        "/identities/device/reprovision": "reprovision",
    }
    if path in literal:
        return literal[path], None
    if path == "/identities/provisioning":
        return ("provisioning", None) if version >= "2021-12-01" else None
    found = MODULE_PATH.fullmatch(path)
    if found is None:
        return None
    try:
        return "module", percent_decode(found.group(1)).decode("utf-8")
    except UnicodeDecodeError:
        return None


def content_type_is_json(request: Request) -> bool:
    value = request.content_type if request.body is not None else None
    if value is None or not all(" " <= c <= "~" or c == "\t" for c in value):
        return True
    return value.split(";")[0].strip() == "application/json"


# -- serde, as the original reads the two typed bodies ------------------------------------------


def unexpected(value: Any) -> str | None:
    """serde_json's `Unexpected` of a value as Python decoded it (None: not predicted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`" if -(1 << 63) <= value < (1 << 64) else None
    if isinstance(value, float):
        return {1.5: "floating point `1.5`", -0.25: "floating point `-0.25`"}.get(value)
    if isinstance(value, list):
        return "sequence"
    if isinstance(value, dict):
        return "map"
    shown = rust_debug(value)
    return None if shown is None else f"string {shown}"


def invalid_type(value: Any, expected: str) -> str:
    shown = unexpected(value)
    if shown is None:
        raise Answered(error(422, prefix="invalid type: "))
    return f"invalid type: {shown}, expected {expected}"


def serde_texts(value: Any, fields: tuple[str, ...], flatten: bool) -> set[str]:
    """The original's 422 text (before its position) for a body typed `struct Request` with
    string `fields`; empty when the body deserializes."""
    if isinstance(value, list) and not flatten:
        if len(value) < len(fields):
            plural = "" if len(fields) == 1 else "s"
            text = f"invalid length {len(value)}, expected struct Request with {len(fields)}"
            return {f"{text} element{plural}"}
        for item in value[: len(fields)]:
            if not isinstance(item, str):
                return {invalid_type(item, "a string")}
        return {"trailing characters"} if len(value) > len(fields) else set()
    if not isinstance(value, dict):
        return {invalid_type(value, "struct Request")}
    theirs = None
    for key, item in value.items():  # serde: the body's order, a bad value at once
        if key in fields and not isinstance(item, str):
            theirs = invalid_type(item, "a string")
            break
    missing = [f"missing field `{name}`" for name in fields if name not in value]
    if theirs is None and missing:
        theirs = missing[0]
    return set() if theirs is None else {theirs}


def read_body(raw: bytes, typed: tuple[tuple[str, ...], bool] | None) -> Any:
    """The body as the route's type reads it; Answered(422) when it cannot be read."""
    if not raw.strip(b" \t\n\r"):
        raise Answered(error(422, prefix="EOF while parsing a value"))
    try:
        text = raw.decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise Answered(error(422)) from None
    if typed is None:
        return value
    texts = serde_texts(value, *typed)
    if texts:
        raise Answered(error(422, *texts))
    if isinstance(value, list):
        value = dict(zip(typed[0], value, strict=False))
    return value


# -- the world -----------------------------------------------------------------------------------


def module_file(device_dir: str, module_id: str) -> str:
    alnum = "".join(c for c in module_id if c.isascii() and c.isalnum())
    return f"modules/{device_dir}/{alnum}-{hashlib.sha256(module_id.encode()).hexdigest()}"


def hub_view(module: Module) -> tuple[Any, ...]:
    return (
        module.generation_id,
        module.auth_type,
        module.primary_key,
        module.secondary_key,
        module.managed_by,
    )


def hub_id(module_id: str) -> str | None:
    """The module id the hub reads from identityd's request path (spec provisioning.md §9: the
    SAS set is escaped, `%` and `/` are not, and the hub percent-decodes), None when the path is
    not one module's (a `/` in the id, or a dot segment the HTTP client folds away)."""
    if "/" in module_id or module_id in (".", ".."):
        return None
    return unquote(module_id)


@attrs.define(repr=False)
class World:
    daemon: Daemon
    cloud: Cloud
    root: Path
    hub_name: str = ""
    device_dir: str = ""
    baseline_files: Files = attrs.field(factory=dict)
    baseline_modules: dict[str, Module] = attrs.field(factory=dict)
    baseline_hub: Hub = attrs.field(factory=dict)
    master: bytes = b""  # identityd's master key, read from keyd's key file
    log_offset: int = 0

    def __repr__(self) -> str:
        return f"World({self.root})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    @property
    def home(self) -> Path:
        return self.daemon.services["identityd"].home

    @property
    def socket(self) -> str:
        return str(self.daemon.services["identityd"].socket)

    def files(self) -> Files:
        return {
            str(path.relative_to(self.home)): path.read_bytes()
            for path in self.home.rglob("*")
            if path.is_file()
        }

    def hub(self) -> Hub:
        device = self.cloud.hub.device(DEVICE_ID)
        assert device is not None
        return {name: hub_view(module) for name, module in device.modules.items()}

    def restore(self) -> None:
        registry = self.cloud.registry
        with registry.lock:
            device = registry._live(self.hub_name, DEVICE_ID)
            assert device is not None
            device.modules = copy.deepcopy(self.baseline_modules)
        now = self.files()
        if now == self.baseline_files:
            return
        for name in set(now) - set(self.baseline_files):
            (self.home / name).unlink()
        for name, data in self.baseline_files.items():
            if now.get(name) != data:
                path = self.home / name
                path.parent.mkdir(parents=True, exist_ok=True)
                temp = path.parent / f".restore-{path.name}"
                temp.write_bytes(data)
                os.chmod(temp, 0o600)
                os.replace(temp, path)
        assert self.files() == self.baseline_files

    def backup_of(self, module_id: str) -> dict[str, Any] | None:
        data = self.baseline_files.get(module_file(self.device_dir, module_id))
        return None if data is None else json.loads(data)

    # Sending and judging.

    def send(self, request: Request, uid: int = 0) -> rawhttp.Reply:
        if uid != 0:
            return send_as(uid, self.socket, request.wire())
        with rawhttp.connect(self.socket, timeout=10.0) as sock:
            sock.sendall(request.wire())
            return rawhttp.read_reply(sock, head_request=request.method == "HEAD")

    def exchange(self, request: Request, uid: int = 0) -> rawhttp.Reply:
        try:
            want = expect(self, request, uid)
        except Unmodelled as skipped:
            event(f"dropped: {skipped}")
            reject()
        try:
            reply = self.send(request, uid)
            version = api_version(request.query) or ""
            found = route(request.path, version)
            event(f"{request.method[:8]} {found[0] if found else '-'} -> {reply.status}")
            self.judge(request, want, reply, uid)
            return reply
        finally:
            self.restore()

    def judge(self, request: Request, want: Expect, reply: rawhttp.Reply, uid: int = 0) -> None:
        what = f"uid {uid}: {request.describe()}\n  -> {reply.status} {reply.body[:400]!r}"
        assert self.daemon.process is not None and self.daemon.process.poll() is None, (
            f"aziotd exited after {what}"
        )
        assert reply.status not in (503, 504), what
        assert reply.status in want, f"{what}\n  the original answers {sorted(want)}"
        check_head(reply)
        answer = want[reply.status]
        status = reply.status
        if status >= 400:
            assert reply.headers.get("content-type") == "application/json", what
            if request.method != "HEAD":
                body = json.loads(reply.body)
                assert isinstance(body, dict) and list(body) == ["message"], what
                text = body["message"]
                assert isinstance(text, str), what
                if status == 422:  # serde's text: judged without its position (see the pins)
                    assert SERDE_POSITION.search(text), what
                    text = SERDE_POSITION.sub("", text)
                    quiet_event("422: " + re.sub(r"[`\"].*", "", text))
                if answer.messages is not None:
                    assert text in answer.messages, f"{what}\n  wanted {sorted(answer.messages)}"
                if answer.prefix is not None:
                    assert text.startswith(answer.prefix), f"{what}\n  wanted {answer.prefix!r}"
        elif status == 204:
            assert reply.body == b"" and "content-type" not in reply.headers, what
        else:
            assert reply.headers.get("content-type") == "application/json", what
        files, hub = self.files(), self.hub()
        changed = {
            n
            for n in set(files) | set(self.baseline_files)
            if files.get(n) != self.baseline_files.get(n)
        }
        assert changed <= answer.files, f"{what}\n  homedir files changed: {sorted(changed)}"
        moved = {
            n for n in set(hub) | set(self.baseline_hub) if hub.get(n) != self.baseline_hub.get(n)
        }
        assert moved <= answer.hub, f"{what}\n  hub modules changed: {sorted(moved)}"
        if answer.check is not None:
            answer.check(self, reply.json() if reply.body else None, files, hub)
        self.check_log(what)

    def check_log(self, what: str) -> None:
        with self.daemon.log.open("rb") as log:
            log.seek(self.log_offset)
            new = log.read()
        self.log_offset += len(new)
        assert b"Traceback" not in new, f"{what}\n  aziotd logged:\n{new.decode(errors='replace')}"

    def derived(self, module_id: str, generation: str, which: str) -> str:
        data = f"{module_id}:{generation}:{which}".encode()
        return base64.b64encode(hmac.new(self.master, data, hashlib.sha256).digest()).decode()

    def signs_like(self, handle: str, key_b64: str | None) -> bool:
        """Whether keyd's HMAC with `handle` is the hub's with `key_b64` (the identity's key)."""
        if key_b64 is None:
            return False
        data = os.urandom(16)
        theirs = hmac.new(base64.b64decode(key_b64), data, hashlib.sha256).digest()
        return sign_with(self.daemon, handle, data) == theirs


def send_as(uid: int, path: str, wire: bytes) -> rawhttp.Reply:
    """One raw request from a forked child that has dropped to `uid` (test_daemon.as_uid's
    way, keeping the whole reply so that it is judged as root's are)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: syscalls and os._exit only
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with rawhttp.connect(path, timeout=10.0) as sock:
                sock.sendall(wire)
                reply = rawhttp.read_reply(sock)
            fields = [reply.status, reply.reason, reply.headers]
            fields += [
                base64.b64encode(reply.body).decode(),
                base64.b64encode(reply.first_read).decode(),
            ]
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


# -- the model: framing, routing, authorization, identityd (spec §1.3, §2.3, §5) ------------------


def api_version(query: str | None) -> str | None:
    found = None
    for name, value in query_pairs(query):
        if name == "api-version":
            found = value
    return found


def type_of(query: str | None) -> str | None:
    """The original's `type`: the first query parameter named exactly `type` (find_map)."""
    return next((value for name, value in query_pairs(query) if name == "type"), None)


@attrs.frozen
class Who:
    kind: str  # root, daemon, host, unknown
    name: str | None = None
    idtype: tuple[str, ...] = ()

    @property
    def manages(self) -> bool:
        return self.kind in ("root", "daemon")

    @property
    def gets_device(self) -> bool:
        return self.manages or (self.kind == "host" and "device" in self.idtype)

    def gets_module(self, module_id: str) -> bool:
        if self.manages:
            return True
        return self.kind == "host" and self.name == module_id and "module" in self.idtype


CALLERS = {
    0: Who("root"),
    MODULE_UID: Who("host", "mod1", ("module",)),
    DEVICE_UID: Who("host", "devproc", ("device",)),
    DAEMON_UID: Who("daemon", "edged"),
    NOBODY: Who("unknown"),
}
# The typed bodies: (fields, flattened); every other body is serde's IgnoredAny.
TYPED = {("device", "POST"): (("type",), False), ("modules", "POST"): (("type", "moduleId"), True)}


def expect(world: World, request: Request, uid: int = 0) -> Expect:
    """Every answer the original can give to `request`, in its processing order."""
    version = api_version(request.query)
    if version is None:
        return error(400, "api-version not specified")
    if version not in VERSIONS:
        shown = rust_debug(version)
        if shown is None:
            return error(400, prefix='invalid api-version "')
        return error(400, f"invalid api-version {shown}")
    found = route(request.path, version)
    if found is None:
        return error(404, NOT_FOUND)
    name, module_id = found
    method = request.method
    body: Any = None
    try:
        if method in ("POST", "DELETE", "PUT"):
            is_json = content_type_is_json(request)
            if method == "PUT" and not is_json:
                return error(415, NOT_JSON_415)
            raw = request.body or b""
            if method == "PUT" or (raw and is_json):
                body = read_body(raw, TYPED.get((name, method)))
        elif method != "GET":
            return error(400, NOT_ALLOWED)
        handler = HANDLERS[name].get(method)
        if handler is None:
            return error(400, NOT_ALLOWED)
        return handler(world, CALLERS[uid], module_id, request.query, body)
    except Answered as answered:
        return answered.expect


def check_type(value: str | None, allowed: tuple[str, ...] = ("aziot",)) -> str:
    if value is None:
        raise Answered(error(400, TYPE_MISSING))
    if value not in allowed:
        raise Answered(error(400, TYPE_INVALID + value))
    return value


def refuse(allowed: bool) -> None:
    if not allowed:
        raise Answered(error(401, AUTHZ))


def merge(theirs: Expect, ours: Expect, why: str) -> Expect:
    """The original's answers, and our daemon's where it is known to differ (pinned below)."""
    quiet_event(f"tolerated: {why} (pinned below)")
    merged = dict(theirs)
    for status, answer in ours.items():
        if status not in merged:
            merged[status] = answer
            continue
        mine = merged[status]
        messages = None
        if mine.messages is not None and answer.messages is not None:
            messages = mine.messages | answer.messages
        prefix = mine.prefix if mine.prefix == answer.prefix else None
        merged[status] = Answer(messages, prefix, mine.files | answer.files, mine.hub | answer.hub)
    return merged


def blank(module_id: str, then: Callable[[], Expect], create: bool = False) -> Expect:
    """`IdentityManager`'s check in create, get, update and delete: Rust's `trim()`, then
    `then()`. Ours checks create only, with Python's `strip()` (which also takes \x1c-\x1f)."""
    theirs_blank = all(c in RUST_WHITESPACE for c in module_id)
    ours_blank = theirs_blank  # ours checks as the original does now
    if theirs_blank == ours_blank:
        return error(400, EMPTY_NAME) if theirs_blank else then()
    refused, proceeds = error(400, EMPTY_NAME), then()
    if theirs_blank:
        return merge(refused, proceeds, "a blank module name sent to the hub")
    return merge(proceeds, refused, "a \\x1c-\\x1f module name refused as blank")


def device_identity(world: World, body: Any, files: Files, hub: Hub) -> None:
    assert body["type"] == "aziot" and set(body) == {"type", "spec"}, body
    spec = body["spec"]
    assert set(spec) == {"hubName", "gatewayHost", "deviceId", "auth"}, spec
    assert spec["hubName"] == spec["gatewayHost"] == world.hub_name
    assert spec["deviceId"] == DEVICE_ID
    auth = spec["auth"]
    assert set(auth) == {"type", "keyHandle"} and auth["type"] == "sas", auth
    device = world.cloud.hub.device(DEVICE_ID)
    assert device is not None
    assert world.signs_like(auth["keyHandle"], device.primary_key), "the device handle's key"


def module_identity(
    expected_id: str, generation: str | None = None, uploaded: bool = False, judged: bool = True
) -> Check:
    """A module identity of `expected_id` with this genId (the hub's after the request when
    None) whose handle signs with the key derived from identityd's master key (spec §10,
    computed here from keyd's key file); `uploaded`: the hub holds the derived keys too."""

    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert body["type"] == "aziot" and set(body) == {"type", "spec"}, body
        spec = body["spec"]
        assert set(spec) == {"hubName", "gatewayHost", "deviceId", "moduleId", "genId", "auth"}
        assert spec["hubName"] == spec["gatewayHost"] == world.hub_name
        assert spec["deviceId"] == DEVICE_ID and spec["moduleId"] == expected_id, spec
        wanted = generation if generation is not None else hub[expected_id][0]
        assert spec["genId"] == wanted, spec
        auth = spec["auth"]
        assert set(auth) == {"type", "keyHandle"} and auth["type"] == "sas", auth
        primary, secondary = (
            world.derived(expected_id, wanted, w) for w in ("primary", "secondary")
        )
        if uploaded:
            assert hub[expected_id][2:4] == (primary, secondary), "the hub's keys are not derived"
        if not judged:
            quiet_event("tolerated: a handle derived from the requested id (pinned below)")
            return
        assert world.signs_like(auth["keyHandle"], primary), (
            f"the handle of {expected_id!r} does not sign with its derived key"
        )

    return check


# The handlers: (world, who, module id, query, body) -> Expect.


def get_identity(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    if who.gets_device:
        return success(200, device_identity)
    if who.kind == "host" and who.name is not None and who.gets_module(who.name):
        return get_aziot_module(world, who.name)
    return error(401, AUTHZ)


def get_device(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    if body is None:
        return error(400, MISSING_BODY)
    refuse(who.gets_device)
    return success(200, device_identity)


def provisioning(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert body == {
            "source": "dps",
            "auth": "symmetric_key",
            "endpoint": world.cloud.dps_url.rstrip("/") + "/",
            "scope_id": world.cloud.id_scope,
            "registration_id": DEVICE_ID,
            "payload": None,
        }, body

    return success(200, check)


def trust_bundle(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert body == {"certificate": ""}, body

    return success(200, check)


def list_modules(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    refuse(who.manages)
    check_type(type_of(query))

    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert set(body) == {"identities"}, body
        seen = {}
        for identity in body["identities"]:
            assert identity["type"] == "aziot" and set(identity) == {"type", "spec"}, identity
            spec = identity["spec"]
            assert spec["hubName"] == spec["gatewayHost"] == world.hub_name
            assert spec["deviceId"] == DEVICE_ID and "auth" not in spec, spec
            seen[spec["moduleId"]] = spec.get("genId")
        assert seen == {n: v[0] for n, v in world.baseline_hub.items()}, seen

    # The original writes a backup of every module it lists (IdentityManager::
    # list_module_identities_from_hub); ours does not (pinned below): either is taken here.
    backups = {module_file(world.device_dir, n) for n in world.baseline_hub}
    return success(200, check, files=backups)


def create_module(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    if body is None:
        return error(400, MISSING_BODY)
    refuse(who.manages)
    kind = check_type(body["type"], ("aziot", "local"))
    module_id = body["moduleId"]
    if kind == "local":
        return error(500, INTERNAL)  # no local principal here, and no [localid]: issuance fails
    return blank(module_id, lambda: create_aziot_module(world, module_id), create=True)


def create_aziot_module(world: World, module_id: str) -> Expect:
    seen = hub_id(module_id)
    if seen != module_id or module_id in world.baseline_hub:
        return error(404, prefix=HUB)  # another path, a body not matching it, or 409

    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert module_id in hub, f"{module_id!r} is not in the hub"
        module_identity(module_id, uploaded=True)(world, body, files, hub)
        backup = json.loads(files[module_file(world.device_dir, module_id)])
        assert backup == {
            "moduleId": module_id,
            "deviceId": DEVICE_ID,
            "generationId": hub[module_id][0],
        }, backup

    return success(200, check, files={module_file(world.device_dir, module_id)}, hub={module_id})


def get_module(world: World, who: Who, module_id: Any, query: Any, body: Any) -> Expect:
    refuse(who.gets_module(module_id))
    kind = check_type(type_of(query), ("aziot", "local"))
    if kind == "local":
        return error(
            400, f'parameter "moduleId" has an invalid value\ncaused by: '
            f"local identity for {module_id} doesn't exist"
        )  # fmt: skip
    return get_aziot_module(world, module_id)


def get_aziot_module(world: World, module_id: str) -> Expect:
    return blank(module_id, lambda: read_aziot_module(world, module_id))


def read_aziot_module(world: World, module_id: str) -> Expect:
    """IdentityManager::get_module_identity: the hub first, then the backup."""
    seen = hub_id(module_id)
    if seen is not None and seen in world.baseline_hub:
        generation = world.baseline_hub[seen][0]
        backup = {module_file(world.device_dir, seen)}
        if generation is None:
            return error(400, NO_GENERATION, files=backup)
        # The key is derived from the hub's module id, which differs from the requested one
        # when the hub decoded a `%XX` in it.
        check = module_identity(seen, generation)
        return success(200, check, backup)
    cached = world.backup_of(module_id)
    if cached is not None:
        return success(200, module_identity(module_id, cached["generationId"]))
    # Not found anywhere: the original says `module <id> not found`.
    return error(404, HUB + f"module {module_id} not found")


def update_module(world: World, who: Who, module_id: Any, query: Any, body: Any) -> Expect:
    refuse(who.manages)
    check_type(type_of(query))
    return blank(module_id, lambda: update_aziot_module(world, module_id))


def update_aziot_module(world: World, module_id: str) -> Expect:
    seen = hub_id(module_id)
    if seen is None or seen not in world.baseline_hub:
        return error(404, prefix=HUB)
    if world.baseline_hub[seen][0] is None:
        return error(400, NO_GENERATION)
    changes = {module_file(world.device_dir, seen)}
    check = module_identity(seen, world.baseline_hub[seen][0], uploaded=True)
    return success(200, check, changes, {seen})


def delete_module(world: World, who: Who, module_id: Any, query: Any, body: Any) -> Expect:
    refuse(who.manages)
    check_type(type_of(query))
    return blank(module_id, lambda: delete_aziot_module(world, module_id))


def delete_aziot_module(world: World, module_id: str) -> Expect:
    seen = hub_id(module_id)
    if seen is None:
        return error(404, prefix=HUB)
    if seen not in world.baseline_hub:
        return error(404, DELETE_MISSING)
    backup = module_file(world.device_dir, module_id)

    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert seen not in hub, f"{seen!r} is still in the hub"
        assert backup not in files, f"the backup of {module_id!r} is still there"

    return success(204, check, files={backup}, hub={seen})


def reprovision(world: World, who: Who, _id: Any, query: Any, body: Any) -> Expect:
    refuse(who.manages)
    raise Unmodelled("a reprovision (tested on its own)")


Handler = Callable[[World, Who, Any, Any, Any], Expect]
HANDLERS: dict[str, dict[str, Handler]] = {
    "modules": {"GET": list_modules, "POST": create_module},
    "identity": {"GET": get_identity},
    "device": {"POST": get_device},
    "provisioning": {"GET": provisioning},
    "trust-bundle": {"GET": trust_bundle},
    "module": {"GET": get_module, "PUT": update_module, "DELETE": delete_module},
    "reprovision": {"POST": reprovision},
}


# -- the fixture ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="aziot-identityd-fuzz-"))
    os.chmod(root, 0o755)
    cloud = Cloud(root / "cloud").start()
    daemon = None
    try:
        enrollment = cloud.dps.add_symmetric_enrollment(DEVICE_ID)
        config = dps_config(cloud, DEVICE_ID, PRINCIPALS)
        daemon = start(root, cloud, config, enrollment.primary_key)
        world = World(daemon, cloud, root, hub_name=cloud.hub_hostname)
        world.device_dir = "-".join(
            hashlib.sha256(text.encode()).hexdigest() for text in (world.hub_name, DEVICE_ID)
        )
        for made in ("made", "ghost"):
            body = {"type": "aziot", "moduleId": made}
            reply = daemon.request("identityd", "POST", "/identities/modules", body)
            assert reply.status == 200, reply.body
        with cloud.registry.lock:
            device = cloud.registry._live(world.hub_name, DEVICE_ID)
            assert device is not None
            device.modules.pop("ghost")
            device.modules["foreign"] = Module(DEVICE_ID, "foreign", "600000000000000001")
            device.modules["foreign"].primary_key = base64.b64encode(os.urandom(32)).decode()
            device.modules["foreign"].secondary_key = base64.b64encode(os.urandom(32)).decode()
            device.modules["nogen"] = Module(DEVICE_ID, "nogen", None)  # type: ignore[arg-type]
            world.baseline_modules = copy.deepcopy(device.modules)
        world.baseline_hub = world.hub()
        keys = daemon.services["keyd"].home / "keys"
        world.master = (keys / (MASTER_FILE)).read_bytes()
        assert len(world.master) == 32
        for name in ("mod1", "made"):  # identityd's modules carry its derived keys
            keys_now = world.baseline_hub[name][2:4]
            generation = world.baseline_hub[name][0]
            assert keys_now == tuple(
                world.derived(name, generation, w) for w in ("primary", "secondary")
            )
        assert set(world.baseline_hub) == {"mod1", "made", "foreign", "nogen"}
        os.chmod(world.socket, 0o666)
        os.chmod(world.socket.rsplit("/", 1)[0], 0o755)
        world.baseline_files = world.files()
        assert world.backup_of("ghost") is not None and world.backup_of("mod1") is not None
        assert "device_info" in world.baseline_files and "prev_state" in world.baseline_files
        world.log_offset = daemon.log.stat().st_size
        yield world
    finally:
        if daemon is not None and daemon.process is not None:
            daemon.stop()
        cloud.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- strategies ----------------------------------------------------------------------------------

UNRESERVED = string.ascii_letters + string.digits + "-._~"
PATH_SAFE = UNRESERVED + "!$&'()*+,;=:@"
KNOWN_IDS = ("mod1", "made", "foreign", "nogen", "ghost", "devproc", "edged", "new-1")
WHITESPACE_IDS = (" ", "\t", "  \n", "\u00a0", "\u3000", "\x1f", "\u200b", "\x85 ")
WEIRD_IDS = (
    "mod%31", "acc%41mod", "a%zz", "%", "x/y", "mod1/", "é-mod", "a b", "a+b", "a?b", "a#b",
    "m:o@d", "$edgeAgent", "MOD1", " mod1", "中", "a\\b", "q=1", ".",
)  # fmt: skip
module_ids = st.one_of(
    st.sampled_from(KNOWN_IDS),
    st.sampled_from(KNOWN_IDS),
    st.sampled_from(WHITESPACE_IDS),
    st.sampled_from(WEIRD_IDS),
    st.text(alphabet=string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=8),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=5),
).filter(lambda text: ".." not in text.split("/") and "." not in text.split("/")[1:])


@st.composite
def segment(draw: st.DrawFn, text: str) -> str:
    mode = draw(st.sampled_from(["minimal", "minimal", "all", "mixed"]))
    out = []
    for char in text:
        if char not in PATH_SAFE or mode == "all" or (mode == "mixed" and draw(st.booleans())):
            out.append("".join(f"%{b:02X}" for b in char.encode("utf-8")))
        else:
            out.append(char)
    return "".join(out)


@st.composite
def module_paths(draw: st.DrawFn) -> str:
    return "/identities/modules/" + draw(segment(draw(module_ids)))


ROUTE_PATHS = (
    "/identities/modules", "/identities/identity", "/identities/device",
    "/identities/provisioning", "/trust-bundle", "/identities/device/reprovision",
)  # fmt: skip
junk_paths = st.sampled_from(
    [
        "/identities/modules/", "/identities/modules/mod1/", "/identities/modules/mod1/x",
        "/identities/modules//mod1", "/identities/identity/", "/identities", "/",
        "/Identities/modules", "/identities/modules%2Fmod1", "/identities/modules/%FF",
        "/identities/modules/%C3%28", "/identities/modules/%", "/identities/modules/%2F",
        "/identities/device/", "/trust-bundle/", "/identities/device/reprovision/x",
        "/identities/modules/mod1%2F", "//identities/modules",
    ]
)  # fmt: skip
paths = st.one_of(st.sampled_from(ROUTE_PATHS), module_paths(), module_paths(), junk_paths)
type_values = st.one_of(
    st.sampled_from(["aziot", "aziot", "aziot", "local", "AZIOT", "", "aziot ", "x", "device"]),
    st.text(alphabet=string.ascii_letters + " %+&é", max_size=6),
)


def form_encode(text: str) -> str:
    return "".join(
        c if c in UNRESERVED else "+" if c == " " else "".join(f"%{b:02X}" for b in c.encode())
        for c in text
    )


@st.composite
def queries(draw: st.DrawFn) -> str | None:
    roll = draw(st.integers(0, 19))
    pairs: list[tuple[str, str]] = []
    if roll == 0:
        return None
    if roll == 1:
        pairs.append(("api-version", draw(st.sampled_from(["", "2021-05-01", "2020-9-1", "é"]))))
    elif roll == 2:
        pairs.append(("api-version", draw(st.text(alphabet="0123456789-x ", max_size=10))))
    elif roll != 3:
        pairs.append(("api-version", draw(st.sampled_from(VERSIONS))))
    if draw(st.booleans()):
        pairs.append(("type", "aziot"))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["type", "type", "type", "TYPE", "typ", "api-version"]))
        if name == "type" and any(n == "type" for n, _ in pairs):
            continue  # one `type` only: ours takes the last, the original the first (pinned)
        value = draw(type_values) if name != "api-version" else draw(st.sampled_from(VERSIONS))
        pairs.append((name, value))
    pairs = draw(st.permutations(pairs))
    encoded = [f"{form_encode(n)}={form_encode(v)}" for n, v in pairs]
    return "&".join(encoded) or None


# JSON values of any shape (no repeated keys, shallow, numbers serde shows predictably).
texts = st.text(
    st.sampled_from(list(string.ascii_letters + string.digits + ' -_./"\\\n')), max_size=8
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 10**6) | st.sampled_from([1.5, -0.25]) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
local_opts = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("x509"), "attributes": st.sampled_from(["client", "server"])}
    ),
    st.fixed_dictionaries({"type": st.just("x509")}),
    json_values,
)
create_good = st.fixed_dictionaries(
    {"type": type_values, "moduleId": module_ids}, optional={"localIdOpts": local_opts}
)


@st.composite
def shaped(draw: st.DrawFn, good: st.SearchStrategy[dict], names: tuple[str, ...]) -> Any:
    """A good body made bad: a field dropped, retyped, an extra one, or as an array."""
    body = dict(draw(good))
    roll = draw(st.sampled_from(["drop", "retype", "extra", "array", "reorder"]))
    name = draw(st.sampled_from(names))
    if roll == "drop":
        body.pop(name, None)
    elif roll == "retype":
        body[name] = draw(json_values)
    elif roll == "extra":
        body[draw(texts.filter(lambda k: k not in body))] = draw(json_values)
    elif roll == "reorder":
        body = dict(reversed(list(body.items())))
        body[name] = draw(json_values)
    else:
        return [body.get(n) for n in names][: draw(st.integers(0, len(names) + 1))]
    return body


device_good = st.fixed_dictionaries({"type": type_values})
bodies = st.one_of(
    st.none(),
    st.just(b""),
    create_good,
    create_good,
    shaped(create_good, ("type", "moduleId")),
    device_good,
    shaped(device_good, ("type",)),
    json_values,
    st.sampled_from([b"null", b"{", b"[1,]", b'{"type":"aziot"} x', b"\xff\xfe", b"{}", b" \n"]),
)
content_types = st.one_of(
    st.sampled_from(
        ["application/json"] * 4 + ["application/json; charset=utf-8", "text/plain", ""]
    ),
    st.none(),
)
methods = st.integers(0, 9).flatmap(
    lambda roll: (
        st.sampled_from(["GET", "POST", "DELETE", "PUT"])
        if roll < 9
        else st.sampled_from(["PATCH", "HEAD", "OPTIONS", "get"])
    )
)


def encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


@st.composite
def requests(draw: st.DrawFn, methods: Any = methods, paths: Any = paths) -> Request:
    return Request(
        draw(methods),
        draw(paths),
        draw(queries()),
        encode(draw(bodies)),
        draw(content_types),
    )


# -- the fuzz tests ------------------------------------------------------------------------------


@settings(FUZZ, max_examples=examples(120))
@given(requests())
def test_any_request(world: World, request: Request) -> None:
    """Any method, path, api-version, `type`, body and content type, as root: §1.3's order
    (api-version, route, method, body rules, serde), then §5's (authorization, `type`, the
    module name, the device, the hub)."""
    world.exchange(request)


@st.composite
def module_requests(draw: st.DrawFn) -> Request:
    method = draw(st.sampled_from(["GET", "GET", "PUT", "DELETE", "POST", "POST"]))
    version = draw(st.sampled_from(VERSIONS))
    if method == "POST":
        body = draw(
            st.one_of(
                create_good, create_good, create_good, shaped(create_good, ("type", "moduleId"))
            )
        )
        return Request("POST", "/identities/modules", f"api-version={version}", encode(body))
    query = f"api-version={version}"
    kind = draw(st.sampled_from(["aziot"] * 5 + ["local", "none", "other", "list"]))
    if kind == "none":
        pass
    elif kind == "other":
        query += "&type=" + form_encode(draw(type_values))
    else:
        query += "&type=" + kind.replace("list", "aziot")
    if kind == "list" and method != "PUT":
        return Request(method if method != "DELETE" else "GET", "/identities/modules", query)
    body = None
    if method == "PUT":
        body = draw(
            st.one_of(st.just({}), st.just({"type": "aziot", "moduleId": "m"}), json_values)
        )
    elif method == "DELETE":
        body = draw(st.one_of(st.none(), json_values))
    return Request(method, draw(module_paths()), query, encode(body))


@settings(FUZZ, max_examples=examples(110))
@given(module_requests())
def test_module_identities(world: World, request: Request) -> None:
    """Create, get, update, delete and list module identities as root: ids known to the hub,
    to the backups only, to neither, blank, percent-encoded every way, with `%`, `/` and other
    characters the hub client leaves as they are; the hub and the backups after each."""
    world.exchange(request)


UIDS = (MODULE_UID, DEVICE_UID, DAEMON_UID, NOBODY)
principal_paths = st.one_of(
    st.sampled_from(ROUTE_PATHS),
    st.sampled_from(["/identities/modules/mod1", "/identities/modules/devproc"]),
    st.sampled_from(["/identities/modules/edged", "/identities/modules/made"]),
    module_paths(),
)


@st.composite
def principal_requests(draw: st.DrawFn) -> tuple[int, Request]:
    uid = draw(st.sampled_from(UIDS))
    path = draw(principal_paths)
    if path.startswith("/identities/modules/"):
        method = draw(st.sampled_from(["GET", "GET", "PUT", "DELETE"]))
    elif path in ("/identities/device", "/identities/device/reprovision"):
        method = "POST"
    elif path == "/identities/modules":
        method = draw(st.sampled_from(["GET", "POST"]))
    else:
        method = "GET"
    if uid == DAEMON_UID and path == "/identities/device/reprovision":
        method = "GET"  # the daemon may reprovision: tested on its own
    query = "api-version=" + draw(st.sampled_from(VERSIONS))
    query += draw(st.sampled_from(["&type=aziot"] * 4 + ["", "&type=local", "&type=x"]))
    body = None
    if method in ("POST", "PUT"):
        body = draw(st.one_of(create_good, device_good, st.just({})))
    return uid, Request(method, path, query, encode(body))


@settings(FUZZ, max_examples=examples(70))
@given(principal_requests())
def test_principals(world: World, case: tuple[int, Request]) -> None:
    """The authorization matrix (spec §2.3) from uids 4242 (mod1, module), 4243 (devproc,
    device), 4244 (edged, the daemon) and 65534 (no principal): 401 `authorization error`
    before the `type` and module checks, never before a body's 400 or 422."""
    uid, request = case
    world.exchange(request, uid)


# -- deterministic tests -------------------------------------------------------------------------


def pin(world: World, request: Request, want: Expect, uid: int = 0) -> None:
    try:
        world.judge(request, want, world.send(request, uid), uid)
    finally:
        world.restore()


def test_the_authorization_matrix_with_as_uid(world: World) -> None:
    """test_daemon.as_uid's view of the matrix: each uid's own identity and the trust bundle."""
    target = "/identities/identity?api-version=2022-08-01"
    status, body = as_uid(NOBODY, world.socket, "GET", target)
    assert (status, body) == (401, {"message": AUTHZ})
    status, body = as_uid(MODULE_UID, world.socket, "GET", target)
    assert status == 200 and body["spec"]["moduleId"] == "mod1", body
    status, body = as_uid(DEVICE_UID, world.socket, "GET", target)
    assert status == 200 and "moduleId" not in body["spec"], body
    status, body = as_uid(DAEMON_UID, world.socket, "GET", target)
    assert status == 200 and body["spec"]["deviceId"] == DEVICE_ID, body
    for uid in UIDS:
        status, body = as_uid(uid, world.socket, "GET", "/trust-bundle?api-version=2020-09-01")
        assert (status, body) == (200, {"certificate": ""})
    world.check_log("as_uid")


def test_reprovision(world: World) -> None:
    """The daemon (and so root) reprovisions: 204, DPS registers again, the reconciliation deletes
    and recreates mod1 (device_info was cleared: prev is empty), the device stays the same."""
    registrations = len([r for r in world.cloud.dps.requests if r.method == "PUT"])
    before = world.hub()["mod1"][0]
    request = Request("POST", "/identities/device/reprovision", "api-version=2021-12-01")

    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert len([r for r in world.cloud.dps.requests if r.method == "PUT"]) > registrations
        assert hub["mod1"][0] != before, "mod1 was not recreated"
        assert set(hub) == set(world.baseline_hub)

    changes = set(world.baseline_files) | {module_file(world.device_dir, "mod1")}
    pin(world, request, success(204, check, changes, {"mod1"}), DAEMON_UID)
    # Afterwards (the hub and the backups put back as they were) mod1 reads as before.
    get = Request("GET", "/identities/modules/mod1", "api-version=2022-08-01&type=aziot")
    pin(world, get, expect(world, get))


def test_the_daemon_survived(world: World) -> None:
    request = Request("GET", "/identities/identity", "api-version=2020-09-01")
    pin(world, request, success(200, device_identity))
    assert world.files() == world.baseline_files and world.hub() == world.baseline_hub
    world.check_log("the end")


# -- differences from the original that the fuzzing above found (all fixed) ---------------------


def query(extra: str) -> str:
    return "api-version=2022-08-01" + extra


@pytest.mark.parametrize("order", ["aziot-first", "local-first"])
def test_the_first_type_parameter_counts(world: World, order: str) -> None:
    """The original's routes read `type` with `query.iter().find_map(..)`: the first wins."""
    if order == "aziot-first":
        request = Request("GET", "/identities/modules", query("&type=aziot&type=local"))
        want = list_modules(world, CALLERS[0], None, "type=aziot", None)
    else:
        request = Request("GET", "/identities/modules/mod1", query("&type=local&type=aziot"))
        want = error(
            400, 'parameter "moduleId" has an invalid value\ncaused by: '
            "local identity for mod1 doesn't exist"
        )  # fmt: skip
    pin(world, request, want)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("segment", ["%20", "%09%20", "%E3%80%80"])
def test_a_blank_module_name_is_refused_by_get_update_and_delete(
    world: World, method: str, segment: str
) -> None:
    """IdentityManager::get/update/delete_module_identity begin as create does: an id that is
    empty after Rust's `trim()` is 400 `module name cannot be empty` (spec §5.2 says so for
    create; the original's code checks all four)."""
    body = b"{}" if method == "PUT" else None
    request = Request(method, "/identities/modules/" + segment, query("&type=aziot"), body)
    pin(world, request, error(400, EMPTY_NAME))


def test_information_separators_are_not_whitespace(world: World) -> None:
    """char::is_whitespace is Unicode White_Space, without U+001C..U+001F (which Python's
    str.isspace has): the original creates the module `\\x1f` in the hub."""
    body = json.dumps({"type": "aziot", "moduleId": "\x1f"}).encode()
    request = Request("POST", "/identities/modules", query(""), body)
    pin(world, request, create_aziot_module(world, "\x1f"))


def test_the_handle_is_derived_from_the_hubs_module_id(world: World) -> None:
    """`mod%31` reaches the hub as /modules/mod%31, which it reads as mod1 (spec provisioning.md
    §9); the original derives the handle from the module the hub answered (get_module_derived_
    keys(module)): the identity says mod1 and its handle must sign with mod1's key. Ours signs
    with a key derived from `mod%31:<genId>:primary`, which no hub identity has."""
    request = Request("GET", "/identities/modules/mod%2531", query("&type=aziot"))
    generation = world.baseline_hub["mod1"][0]
    backup = {module_file(world.device_dir, "mod1")}
    pin(world, request, success(200, module_identity("mod1", generation), backup))


def test_a_module_found_nowhere(world: World) -> None:
    """IdentityManager::get_module_identity: the hub failed and there is no backup, so
    `Error::HubClient(io::Error::new(NotFound, "module <id> not found"))`."""
    request = Request("GET", "/identities/modules/nothing-here", query("&type=aziot"))
    pin(world, request, error(404, HUB + "module nothing-here not found"))


def test_listing_backs_up_every_module(world: World) -> None:
    """IdentityManager::list_module_identities_from_hub calls set_module_backup for each module
    the hub lists, so `foreign` (never read before) can be served offline afterwards."""
    request = Request("GET", "/identities/modules", query("&type=aziot"))
    listed = list_modules(world, CALLERS[0], None, "type=aziot", None)[200]

    def check(world: World, body: Any, files: Files, hub: Hub) -> None:
        assert listed.check is not None
        listed.check(world, body, files, hub)
        backup = files.get(module_file(world.device_dir, "foreign"))
        assert backup is not None, "no backup of foreign"
        assert json.loads(backup) == {
            "moduleId": "foreign",
            "deviceId": DEVICE_ID,
            "generationId": world.baseline_hub["foreign"][0],
        }

    pin(world, request, success(200, check, listed.files))


def test_the_first_bad_field_in_the_body_is_reported(world: World) -> None:
    body = b'{"moduleId":5}'
    text = "invalid type: integer `5`, expected a string"
    pin(world, Request("POST", "/identities/modules", query(""), body), error(422, text))
