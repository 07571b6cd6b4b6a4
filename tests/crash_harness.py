"""Crash safety: SIGKILL aziotd at random moments during a stream of writes, then check.

A client thread sends key writes one at a time (imports, creations, key pair creations, moves,
deletions) and records each one the daemon acknowledged. The keys live in files, or on a SoftHSM
token when the daemon is given one (its base slot). At a random moment the daemon is
killed with SIGKILL; the one request then in flight may or may not have taken effect. After a
restart every acknowledged write must be there and intact, nothing half-written may be visible,
and handles issued before the kill must still work.

Used by tests/test_crash_safety.py (a bounded run) and bench/crash_safety.py (a long one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aziot.actors.keys.store import key_file_name
from tests.daemon import Keyd
from tests.softhsm import SoftHsmToken

# Writes acknowledged in each cycle before its kill may come.
MIN_WRITES = 2
# Widen the windows between writing, syncing and renaming, so kills land inside them.
FAULTS = "store.fsync=delay=0.003@0.5;store.write=delay=0.002@0.3;pkcs11.call=delay=0.002@0.3"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@attrs.define
class Expected:
    """What the store must hold for one id: absent, a symmetric key's bytes, or a key pair."""

    # "absent", "sym" (data set), "any-sym" (generated: exists, bytes unknown), "pair",
    # "sym-mac" (a key on the token, whose bytes stay there: data is its HMAC of PROBE)
    kind: str
    data: bytes = b""
    public: bytes = b""  # for pairs: the ec-point or modulus the daemon reported


@attrs.define
class Model:
    state: dict[str, Expected] = attrs.field(factory=dict)
    handles: dict[str, tuple[str, str]] = attrs.field(factory=dict)  # id -> (handle, kind)
    # The request in flight at the kill: (id, the state if it took effect).
    pending: list[tuple[str, Expected]] = attrs.field(factory=list)
    acknowledged: int = 0

    def accept(self, key_id: str, after: Expected, *, pending: bool) -> None:
        if pending:
            self.pending.append((key_id, after))
        else:
            self.state[key_id] = after
            self.acknowledged += 1


@attrs.define
class CycleReport:
    acknowledged: int
    operations: Counter[str]
    violations: list[str]


class WriteStream:
    """Sequential key writes against `keyd`, recorded in `model`, until the daemon dies."""

    def __init__(self, keyd: Keyd, model: Model, rng: random.Random, ids: int = 24) -> None:
        self.keyd = keyd
        # On a token a key pair and a secret key may share a label (they are objects of two
        # classes), where files share one name; moves there only target ids without a secret.
        # SoftHSM refuses HMAC-SHA256 with a key under 32 bytes: only such keys are imported.
        self.on_token = keyd.token is not None
        self.sizes = [32, 64, 128] if self.on_token else [16, 32, 64, 700]
        self.model = model
        self.rng = rng
        self.ids = [f"crash-{n}" for n in range(ids)]
        self.operations: Counter[str] = Counter()
        self.failure: str | None = None

    def run(self) -> None:
        try:
            while True:
                self.step()
        except OSError:
            return  # the daemon was killed; the last step recorded its pending write
        except Exception as error:  # a wrong answer before the kill: the check reports it
            self.failure = f"before the kill: {error!r}"

    def _call(self, method: str, path: str, body: Any, key_id: str, after: Expected) -> Any:
        try:
            reply = self.keyd.call(method, path, body)
        except OSError:
            self.model.accept(key_id, after, pending=True)
            raise
        return reply

    def step(self) -> None:
        rng, model = self.rng, self.model
        key_id = rng.choice(self.ids)
        current = model.state.get(key_id, Expected("absent"))
        choice = rng.random()
        if current.kind == "pair":
            if choice < 0.5:
                self._move(key_id)
            else:
                self._delete(key_id, "pair")
            return
        if current.kind in ("sym", "any-sym", "sym-mac") and choice < 0.25:
            self._delete(key_id, "sym")
            return
        if current.kind == "absent" and choice < 0.3:
            self._create_pair(key_id)
            return
        if current.kind == "absent" and choice < 0.5:
            after = Expected("any-sym")
            reply = self._call("POST", "/key", {"keyId": key_id, "usage": "sign"}, key_id, after)
            self._acknowledge(reply, key_id, after, "sym", "generate")
            return
        data = rng.randbytes(rng.choice(self.sizes))
        after = Expected("sym", data)
        body = {"keyId": key_id, "usage": "sign", "keyBytes": b64(data)}
        reply = self._call("POST", "/key", body, key_id, after)
        self._acknowledge(reply, key_id, after, "sym", "import")

    def _acknowledge(self, reply: Any, key_id: str, after: Expected, kind: str, op: str) -> None:
        if reply.status != 200:
            raise AssertionError(f"{op} {key_id}: {reply.status} {reply.body!r}")
        self.model.accept(key_id, after, pending=False)
        self.model.handles[key_id] = (reply.json()["keyHandle"], kind)
        self.operations[op] += 1

    def _create_pair(self, key_id: str) -> None:
        algorithm = self.rng.choice(["ec-p256", "ec-p256", "rsa-2048"])
        after = Expected("pair")
        body = {"keyId": key_id, "preferredAlgorithms": algorithm}
        reply = self._call("POST", "/keypair", body, key_id, after)
        self._acknowledge(reply, key_id, after, "pair", "create-pair")
        # Remember the public half so that a later check can tell this pair from another.
        handle = reply.json()["keyHandle"]
        name = "ec-point" if algorithm == "ec-p256" else "rsa-modulus"
        self.model.state[key_id].public = self._parameter(handle, name, key_id)

    def _parameter(self, handle: str, name: str, key_id: str) -> bytes:
        reply = self._call(
            "POST", f"/parameters/{name}", {"keyHandle": handle}, key_id, self.model.state[key_id]
        )
        if reply.status != 200:
            raise AssertionError(f"parameter {name} of {key_id}: {reply.status} {reply.body!r}")
        return base64.b64decode(reply.json()["value"])

    def _move(self, source: str) -> None:
        targets = [i for i in self.ids if i != source]
        if self.on_token:
            targets = [i for i in targets if self._kind(i) in ("absent", "pair")] or [source]
            if targets == [source]:
                self._delete(source, "pair")
                return
        target = self.rng.choice(targets)
        moved = attrs.evolve(self.model.state[source])
        try:
            reply = self.keyd.call("POST", f"/keypair/{target}", {"from": source})
        except OSError:
            # Either nothing happened, or the source is gone and the target holds the pair.
            self.model.pending.append((source, Expected("absent")))
            self.model.pending.append((target, moved))
            raise
        if reply.status != 204:
            raise AssertionError(f"move {source} -> {target}: {reply.status} {reply.body!r}")
        self.model.state[source] = Expected("absent")
        self.model.state[target] = moved
        self.model.handles.pop(source, None)
        self.model.handles.pop(target, None)
        self.model.acknowledged += 1
        self.operations["move"] += 1

    def _kind(self, key_id: str) -> str:
        return self.model.state.get(key_id, Expected("absent")).kind

    def _delete(self, key_id: str, kind: str) -> None:
        handle = self.model.handles.get(key_id)
        if handle is None:
            reply = self.keyd.call("GET", f"/{'keypair' if kind == 'pair' else 'key'}/{key_id}")
            if reply.status != 200:
                raise AssertionError(f"load {key_id}: {reply.status} {reply.body!r}")
            handle = (reply.json()["keyHandle"], kind)
        after = Expected("absent")
        path = "/keypair" if kind == "pair" else "/key"
        reply = self._call("DELETE", path, {"keyHandle": handle[0]}, key_id, after)
        if reply.status != 204:
            raise AssertionError(f"delete {key_id}: {reply.status} {reply.body!r}")
        self.model.accept(key_id, after, pending=False)
        self.model.handles.pop(key_id, None)
        self.operations["delete"] += 1


PROBE = b"which key is this?"


def stored_state(keyd: Keyd, key_id: str) -> tuple[Expected, str | None]:
    """What is on disk for `key_id`, and a problem if the file is unreadable or torn."""
    path = keyd.keys_dir / key_file_name(key_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Expected("absent"), None
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, None)
        except ValueError as error:
            return Expected("pair"), f"{path.name}: torn key pair file ({error})"
        numbers = key.public_key().public_numbers()
        if hasattr(numbers, "n"):
            public = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        else:
            public = key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            )
        return Expected("pair", public=public), None
    if not data:
        return Expected("sym"), f"{path.name}: empty symmetric key file"
    return Expected("sym", data), None


class TokenView:
    """What the token holds, as pkcs11-tool lists it (one listing per check). Key bytes never
    leave the token: a symmetric key is known by its HMAC of PROBE, asked of the daemon."""

    def __init__(self, keyd: Keyd) -> None:
        self.keyd = keyd
        self.objects = keyd.token_objects()

    def _labelled(self, kind: str, key_id: str) -> list[dict[str, str]]:
        return [o for o in self.objects if o["type"].startswith(kind) and o.get("label") == key_id]

    def state(self, key_id: str) -> tuple[Expected, str | None]:
        privates = self._labelled("Private Key", key_id)
        secrets = self._labelled("Secret Key", key_id)
        if privates and secrets:
            return Expected("pair"), f"{key_id}: both a key pair and a secret key on the token"
        if len(privates) > 1:
            return Expected("pair"), f"{key_id}: {len(privates)} private keys on the token"
        if privates:
            return self._pair(key_id, privates[0])
        if secrets:
            return self._secret(key_id)
        return Expected("absent"), None

    def _pair(self, key_id: str, private: dict[str, str]) -> tuple[Expected, str | None]:
        halves = [
            o
            for o in self.objects
            if o["type"].startswith("Public Key") and o.get("ID") == private.get("ID")
        ]
        if not halves:
            return Expected("pair"), f"{key_id}: a private key without its public half"
        point = halves[0].get("EC_POINT")
        if point is not None:  # DER OCTET STRING around the uncompressed point
            public = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), bytes.fromhex(point)[2:]
            ).public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
            return Expected("pair", public=public), None
        reply = self.keyd.call("GET", f"/keypair/{key_id}")
        if reply.status != 200:
            return Expected("pair"), f"{key_id}: load answered {reply.status} {reply.body!r}"
        handle = reply.json()["keyHandle"]
        reply = self.keyd.call("POST", "/parameters/rsa-modulus", {"keyHandle": handle})
        if reply.status != 200:
            return Expected("pair"), f"{key_id}: modulus answered {reply.status} {reply.body!r}"
        return Expected("pair", public=base64.b64decode(reply.json()["value"])), None

    def _secret(self, key_id: str) -> tuple[Expected, str | None]:
        reply = self.keyd.call("GET", f"/key/{key_id}")
        if reply.status != 200:
            return Expected("sym-mac"), f"{key_id}: load answered {reply.status} {reply.body!r}"
        body = {
            "keyHandle": reply.json()["keyHandle"],
            "algorithm": "HMAC-SHA256",
            "parameters": {"message": b64(PROBE)},
        }
        reply = self.keyd.call("POST", "/sign", body)
        if reply.status != 200:
            return Expected("sym-mac"), f"{key_id}: HMAC answered {reply.status} {reply.body!r}"
        return Expected("sym-mac", base64.b64decode(reply.json()["signature"])), None


def describe(state: Expected) -> str:
    if state.kind == "sym":
        return f"a {len(state.data)}-byte key {state.data[:4].hex()}…"
    if state.kind == "pair":
        return f"a key pair {state.public[:4].hex()}…"
    if state.kind == "sym-mac":
        return f"a key on the token with HMAC {state.data[:4].hex()}…"
    return {"absent": "nothing", "any-sym": "a generated 32-byte key"}[state.kind]


def matches(found: Expected, wanted: Expected) -> bool:
    if wanted.kind == "absent":
        return found.kind == "absent"
    if found.kind == "sym-mac":
        if wanted.kind == "sym":
            return found.data == hmac.new(wanted.data, PROBE, hashlib.sha256).digest()
        return wanted.kind == "any-sym" or (wanted.kind == "sym-mac" and found.data == wanted.data)
    if wanted.kind == "any-sym":
        return found.kind == "sym" and len(found.data) == 32
    if wanted.kind == "sym":
        return found.kind == "sym" and found.data == wanted.data
    return found.kind == "pair" and (not wanted.public or found.public == wanted.public)


def check(keyd: Keyd, model: Model) -> list[str]:
    """Every acknowledged write is intact (or the in-flight one took effect); nothing torn."""
    violations = []
    pending: dict[str, list[Expected]] = {}
    for key_id, after in model.pending:
        pending.setdefault(key_id, []).append(after)
    token = TokenView(keyd) if keyd.token is not None else None
    for key_id in sorted(set(model.state) | set(pending)):
        found, problem = token.state(key_id) if token else stored_state(keyd, key_id)
        if problem:
            violations.append(problem)
            continue
        allowed = [model.state.get(key_id, Expected("absent")), *pending.get(key_id, [])]
        if not any(matches(found, wanted) for wanted in allowed):
            violations.append(
                f"{key_id}: stored {describe(found)}, acknowledged {describe(allowed[0])}"
                + (
                    f" (or in flight: {', '.join(describe(p) for p in allowed[1:])})"
                    * bool(allowed[1:])
                )
            )
            continue
        if not matches(found, allowed[0]):
            model.handles.pop(key_id, None)  # the in-flight write won; its handle never came
        model.state[key_id] = found  # what the next cycle starts from
    model.pending.clear()
    leftovers = [p.name for p in keyd.keys_dir.glob(".*")] if keyd.keys_dir.exists() else []
    if leftovers:
        violations.append(f"temporary files left after restart: {leftovers}")
    return violations


def check_handles(keyd: Keyd, model: Model) -> list[str]:
    """Handles issued before the kill still work after the restart."""
    violations = []
    for key_id, (handle, kind) in sorted(model.handles.items()):
        if kind == "sym":
            body = {
                "keyHandle": handle,
                "algorithm": "HMAC-SHA256",
                "parameters": {"message": b64(b"after the crash")},
            }
            reply = keyd.call("POST", "/sign", body)
        else:
            reply = keyd.call("POST", "/parameters/algorithm", {"keyHandle": handle})
        if reply.status != 200:
            violations.append(f"{key_id}: old handle answered {reply.status} {reply.body!r}")
    return violations


def run_cycle(keyd: Keyd, model: Model, rng: random.Random, max_wait: float) -> CycleReport:
    """Stream writes to the running daemon, SIGKILL it at a random moment, restart, check.

    The daemon is left running for the next cycle.
    """
    stream = WriteStream(keyd, model, rng)
    client = threading.Thread(target=stream.run, name="crash-client")
    client.start()
    # The kill comes at a random moment after the cycle's first writes were acknowledged, so
    # that how much a run exercises does not depend on the machine's speed or load.
    started = model.acknowledged
    deadline = time.monotonic() + 30
    while model.acknowledged < started + MIN_WRITES and client.is_alive():
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.01, max_wait))
    assert keyd.process is not None
    os.kill(keyd.process.pid, signal.SIGKILL)
    keyd.process.wait(10)
    keyd.process = None
    client.join(30)
    if client.is_alive():
        raise AssertionError("the client thread hung after the kill")
    before = model.acknowledged
    keyd.start()
    violations = check(keyd, model) + check_handles(keyd, model)
    if stream.failure:
        violations.insert(0, stream.failure)
    return CycleReport(before, stream.operations, violations)


def new_keyd(root: Path, token: SoftHsmToken | None = None) -> Keyd:
    """A daemon whose keys live in files, or on `token` if given."""
    return Keyd(root, env={"AZIOTD_FAULTS": FAULTS, "AZIOT_LOG_LEVEL": "warn"}, token=token)
