"""Crash safety: SIGKILL aziotd at random moments during a stream of writes, then check.

A client thread sends key writes one at a time (imports, creations, key pair creations, moves,
deletions) and records each one the daemon acknowledged. The keys live in files, or on a SoftHSM
token when the daemon is given one (its base slot). At a random moment the daemon is
killed with SIGKILL; the one request then in flight may or may not have taken effect. After a
restart every acknowledged write must be there and intact, nothing half-written may be visible,
and handles issued before the kill must still work.

The same loop runs against keyd + certd (`CertStream`, `run_cert_cycle`): cert imports,
issuances by a local CA and deletions, while renewals rotate keys in the background; after a
restart every cert file is the acknowledged one (or the in-flight write's), a renewed cert is
for keyd's key, and no temp file or `<id>-temp` key is left.

Used by tests/test_crash_safety.py (a bounded run) and bench/crash_safety.py (a long one).
"""

from __future__ import annotations

import base64
import datetime
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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aziot.actors.files import file_name
from aziot.actors.keys.store import key_file_name
from tests.certd_world import KeydEcKey, certd_config, make_csr
from tests.daemon import Daemon, Keyd, keyd_config
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


# -- certd: cert imports, issuances and renewals -----------------------------------------------
#
# The same kill-and-check loop against an aziotd serving keyd and certd. certd's config has a
# local CA and CERT_IDS ids `crash-cert-N` issued by it; the even ones carry
# `auto_renew = { rotate_key = true, threshold = "1440min", ... }` on 1-day certs, so each
# issuance is followed at once by a renewal in the background (a new key under `<id>-temp`, the
# new cert written, the key moved over `<id>` in keyd), and every restart renews them all again.
# A kill can land anywhere in those steps as well as in the client's own writes.
#
# The client leaves an id alone while its renewal is in flight (it waits for the renewal's log
# line): a write racing a renewal of the same cert is a question of concurrency, not of crash
# safety. The `race` mode lets imports and deletions go ahead anyway; as of this writing certd
# loses them (the renewal's commit writes its cert over an import acknowledged meanwhile, and
# back after a deletion acknowledged meanwhile), which tests/test_crash_safety.py records.

CERT_FAULTS = (
    "certs.store.write=delay=0.003@0.5;certs.store.fsync=delay=0.003@0.5;"
    "store.write=delay=0.002@0.3;store.fsync=delay=0.002@0.3"
)
CERT_IDS = 6
LOCAL_CA = "local-ca"
TEMP_SUFFIX = "-temp"
# How long a restart may take to renew the due certs (and so to finish any interrupted rotation).
SETTLE_SECONDS = 20.0


def is_renewed(cert_id: str) -> bool:
    """Whether `crash-cert-N` has an auto_renew policy: the even N."""
    return int(cert_id.rsplit("-", 1)[1]) % 2 == 0


def cert_ids(count: int = CERT_IDS) -> list[str]:
    return [f"crash-cert-{n}" for n in range(count)]


def crash_certd_config(count: int = CERT_IDS) -> str:
    lines = [
        "not_before_margin_secs = 0",
        "[cert_issuance]",
        f'local_ca = {{ cert = "{LOCAL_CA}", pk = "{LOCAL_CA}" }}',
        f'{LOCAL_CA} = {{ method = "self_signed", expiry_days = 30, common_name = "Crash CA" }}',
    ]
    for cert_id in cert_ids(count):
        lines += [f"[cert_issuance.{cert_id}]", 'method = "local_ca"']
        if is_renewed(cert_id):
            lines += [
                "expiry_days = 1",
                'auto_renew = { rotate_key = true, threshold = "1440min", retry = "4%" }',
            ]
        else:
            lines.append("expiry_days = 2")
    return "\n".join(lines) + "\n"


def spki(public: Any) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@attrs.define
class CertExpected:
    """What certd's store must hold for one id.

    "absent"; "exact" (these bytes: an import, or an issuance of an id that is not renewed);
    "issued" (a renewed id: a chain whose leaf the local CA signed for keyd's key `<id>`, and
    with a notAfter no earlier than `not_after`, the acknowledged cert's, when known);
    "issued-for" (an issuance in flight at the kill: a leaf the local CA signed for `public`).
    """

    kind: str
    data: bytes = b""
    not_after: datetime.datetime | None = None
    public: bytes = b""


@attrs.define
class CertModel:
    state: dict[str, CertExpected] = attrs.field(factory=dict)
    pending: list[tuple[str, CertExpected]] = attrs.field(factory=list)
    acknowledged: Counter[str] = attrs.field(factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.acknowledged.values())

    def accept(self, cert_id: str, after: CertExpected, op: str | None) -> None:
        """`op` names an acknowledged write; None records the one in flight at the kill."""
        if op is None:
            self.pending.append((cert_id, after))
        else:
            self.state[cert_id] = after
            self.acknowledged[op] += 1


@attrs.define
class CertWorld:
    """A keyd + certd aziotd with its local CA issued, and where its files are."""

    daemon: Daemon
    ca: x509.Certificate
    ca_file: bytes  # the local CA's cert file, which no operation of the stream touches
    certs_dir: Path
    keys_dir: Path
    # Valid certs to import (not issued by the local CA, valid for months: never due).
    pool: list[bytes]

    def request(self, service: str, method: str, path: str, body: Any = None) -> Any:
        return self.daemon.request(service, method, path, body)

    def cert_path(self, cert_id: str) -> Path:
        return self.certs_dir / file_name(cert_id, "cer")

    def log_size(self) -> int:
        return self.daemon.log.stat().st_size if self.daemon.log.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.daemon.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def keyd_public(self, key_id: str) -> bytes | None:
        """The SPKI of keyd's key pair `key_id`, or None when there is none."""
        reply = self.request("keyd", "GET", f"/keypair/{key_id}")
        if reply.status != 200:
            return None
        handle = reply.json()["keyHandle"]
        reply = self.request("keyd", "POST", "/parameters/ec-point", {"keyHandle": handle})
        if reply.status != 200:
            raise AssertionError(f"ec-point of {key_id}: {reply.status} {reply.body!r}")
        point = base64.b64decode(reply.json()["value"])
        return spki(ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point))


def _cert_pool(count: int = 8) -> list[bytes]:
    """A small CA, an intermediate and leaves, as PEM blocks to build import chains from."""
    now = datetime.datetime.now(datetime.UTC)

    def make(subject: str, issuer: tuple[str, Any] | None, ca: bool, days: int) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer_name, issuer_key = issuer if issuer else (subject, key)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), key

    root, root_key = make("Import Root", None, True, 365)
    middle, middle_key = make("Import Intermediate", ("Import Root", root_key), True, 200)
    leaves = [
        make(f"import-leaf-{n}", ("Import Intermediate", middle_key), False, 30 + 20 * n)[0]
        for n in range(count)
    ]
    return [*leaves, middle, root]


def start_cert_world(root: Path) -> CertWorld:
    """Start keyd + certd under `root` and issue the local CA (a CA cert for keyd's `local-ca`)."""
    daemon = Daemon(
        root,
        {"keyd": keyd_config, "certd": certd_config(crash_certd_config())},
        env={"AZIOTD_FAULTS": CERT_FAULTS, "AZIOT_LOG_LEVEL": "info"},
    ).start()
    constraints = x509.BasicConstraints(ca=True, path_length=None)
    csr, _ = make_csr("Crash CA", KeydEcKey(daemon, LOCAL_CA), [(constraints, True)])
    reply = daemon.request("certd", "POST", "/certificates", {"certId": LOCAL_CA, "csr": csr})
    if reply.status != 201:
        raise AssertionError(f"issuing the local CA: {reply.status} {reply.body!r}")
    certs_dir = daemon.services["certd"].home / "certs"
    world = CertWorld(
        daemon,
        x509.load_pem_x509_certificate(reply.json()["pem"].encode()),
        b"",
        certs_dir,
        daemon.services["keyd"].home / "keys",
        _cert_pool(),
    )
    world.ca_file = world.cert_path(LOCAL_CA).read_bytes()
    return world


def renewal_seen(text: str, cert_id: str) -> bool:
    """Whether the log `text` shows a renewal of `cert_id` that ended (committed or failed)."""
    return f"cert {cert_id}: renewed" in text or f"cert {cert_id}: renewal failed" in text


class CertStream:
    """Sequential cert writes against `world`, recorded in `model`, until the daemon dies."""

    def __init__(
        self, world: CertWorld, model: CertModel, rng: random.Random, *, race: bool = False
    ) -> None:
        self.world = world
        self.model = model
        self.rng = rng
        # With `race`, imports and deletions do not wait for a renewal in flight of their id.
        self.race = race
        self.ids = cert_ids()
        # Renewed ids issued in this cycle whose renewal has not ended yet: log offset then.
        self.renewing: dict[str, int] = {}
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

    def _settled(self, cert_id: str) -> bool:
        offset = self.renewing.get(cert_id)
        if offset is None:
            return True
        if renewal_seen(self.world.log_since(offset), cert_id):
            del self.renewing[cert_id]
            return True
        return False

    def step(self) -> None:
        choice = self.rng.random()
        op = "import-chain" if choice < 0.3 else "import-text" if choice < 0.45 else "issue"
        op = "delete" if choice >= 0.85 else op
        # Issuances always wait: a rotation moving a new key over keyd's `<id>` while the
        # client signs its CSR with `<id>` would make the client's CSR fail its own signature.
        racing = self.race and op != "issue"
        ready = [cert_id for cert_id in self.ids if racing or self._settled(cert_id)]
        if not ready:
            time.sleep(0.005)
            return
        cert_id = self.rng.choice(ready)
        if racing and self.renewing and self.rng.random() < 0.5:
            # Aim at a renewal that may still be in flight, or races would be rare.
            cert_id = self.rng.choice(sorted(self.renewing))
        if op == "issue":
            self._issue(cert_id)
        elif op == "delete":
            self._delete(cert_id)
        else:
            text = self._chain_text() if op == "import-chain" else self._junk_text()
            self._import(cert_id, text, op)

    def _call(self, method: str, path: str, body: Any, cert_id: str, after: CertExpected) -> Any:
        try:
            return self.world.request("certd", method, path, body)
        except OSError:
            self.model.accept(cert_id, after, None)
            raise

    def _chain_text(self) -> str:
        """One to four valid certs, concatenated (a chain, or any list of certs)."""
        blocks = self.rng.sample(self.world.pool, self.rng.randint(1, 4))
        return b"".join(blocks).decode()

    def _junk_text(self) -> str:
        """PEM-looking text that is not a list of certs: random base64 inside the armour, a
        valid cert cut short, or plain words. Stored as-is, it must come back byte for byte."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.4:
            body = base64.encodebytes(rng.randbytes(rng.choice([48, 700, 6000, 40000])))
            return f"-----BEGIN CERTIFICATE-----\n{body.decode()}-----END CERTIFICATE-----\n"
        if kind < 0.8:
            whole = self._chain_text()
            return whole[: rng.randrange(40, len(whole) - 1)]
        return " ".join(rng.choice(["not", "a", "cert", "PEM", "-----"]) for _ in range(50))

    def _import(self, cert_id: str, text: str, op: str) -> None:
        after = CertExpected("exact", text.encode())
        reply = self._call("PUT", f"/certificates/{cert_id}", {"pem": text}, cert_id, after)
        if reply.status != 201 or reply.json()["pem"] != text:
            raise AssertionError(f"import {cert_id}: {reply.status} {reply.body[:200]!r}")
        self.model.accept(cert_id, after, op)
        self.operations[op] += 1

    def _issue(self, cert_id: str) -> None:
        world = self.world
        renewed = is_renewed(cert_id)
        # A renewed id's cert is for keyd's `<id>` (made here if absent), so rotation moves a new
        # key there; the others are for a key the client holds. A kill during the keyd requests
        # leaves no cert write in flight.
        key: Any = (
            KeydEcKey(world.daemon, cert_id) if renewed else ec.generate_private_key(ec.SECP256R1())
        )
        csr, _ = make_csr(cert_id, key)
        public = spki(key.public_key())
        offset = world.log_size()
        after = CertExpected("issued") if renewed else CertExpected("issued-for", public=public)
        body = {"certId": cert_id, "csr": csr}
        reply = self._call("POST", "/certificates", body, cert_id, after)
        if reply.status != 201:
            raise AssertionError(f"issue {cert_id}: {reply.status} {reply.body[:300]!r}")
        pem = reply.json()["pem"].encode()
        leaf = x509.load_pem_x509_certificates(pem)[0]
        leaf.verify_directly_issued_by(world.ca)
        if spki(leaf.public_key()) != public:
            raise AssertionError(f"issue {cert_id}: the cert is not for the CSR's key")
        if renewed:
            after = CertExpected("issued", pem, leaf.not_valid_after_utc)
            self.renewing[cert_id] = offset
        else:
            after = CertExpected("exact", pem)
        op = "issue-renewed" if renewed else "issue"
        self.model.accept(cert_id, after, op)
        self.operations[op] += 1

    def _delete(self, cert_id: str) -> None:
        after = CertExpected("absent")
        reply = self._call("DELETE", f"/certificates/{cert_id}", None, cert_id, after)
        if reply.status != 204:
            raise AssertionError(f"delete {cert_id}: {reply.status} {reply.body[:200]!r}")
        self.model.accept(cert_id, after, "delete")
        self.operations["delete"] += 1


def parse_fully(data: bytes) -> list[x509.Certificate]:
    """Every cert of `data`, refusing what `cryptography` alone would let pass: a block cut off
    after the last whole cert (it stops at the last END line), or text after it."""
    chain = x509.load_pem_x509_certificates(data)
    if data.count(b"-----BEGIN") != len(chain) or not data.rstrip().endswith(
        b"-----END CERTIFICATE-----"
    ):
        raise ValueError(f"{data.count(b'-----BEGIN')} PEM blocks, {len(chain)} whole certs")
    return chain


def _issued_leaf(data: bytes | None, ca: x509.Certificate) -> x509.Certificate | None:
    """The leaf of `data` if it is exactly a leaf the local CA signed followed by the CA."""
    if data is None:
        return None
    try:
        chain = parse_fully(data)
        chain[0].verify_directly_issued_by(ca)
    except Exception:
        return None
    return chain[0] if chain[1:] == [ca] else None


def cert_matches(
    found: bytes | None, wanted: CertExpected, ca: x509.Certificate, keyd_key: bytes | None
) -> bool:
    if wanted.kind == "absent":
        return found is None
    if wanted.kind == "exact":
        return found == wanted.data
    leaf = _issued_leaf(found, ca)
    if leaf is None:
        return False
    if wanted.kind == "issued-for":
        return spki(leaf.public_key()) == wanted.public
    if keyd_key is None or spki(leaf.public_key()) != keyd_key:
        return False
    return wanted.not_after is None or leaf.not_valid_after_utc >= wanted.not_after


def describe_cert(data: bytes | None, ca: x509.Certificate, keyd_key: bytes | None) -> str:
    if data is None:
        return "nothing"
    try:
        chain = parse_fully(data)
    except ValueError as error:
        return (
            f"{len(data)} bytes that are not a whole list of certs ({error}; ends {data[-24:]!r})"
        )
    leaf = chain[0]
    issued = _issued_leaf(data, ca) is not None
    key = spki(leaf.public_key())
    return (
        f"a chain of {len(chain)} (leaf {leaf.subject.rfc4514_string()}, "
        f"{'issued by the local CA' if issued else 'not issued by the local CA'}, "
        f"notAfter {leaf.not_valid_after_utc:%H:%M:%S}, key {hashlib.sha256(key).hexdigest()[:8]}"
        f"{'' if keyd_key is None else ', keyd key ' + hashlib.sha256(keyd_key).hexdigest()[:8]})"
    )


def describe_expected(wanted: CertExpected) -> str:
    if wanted.kind == "absent":
        return "nothing"
    if wanted.kind == "exact":
        return f"exactly {len(wanted.data)} acknowledged bytes ({wanted.data[:12]!r}…)"
    if wanted.kind == "issued-for":
        return f"a local CA cert for key {hashlib.sha256(wanted.public).hexdigest()[:8]}"
    after = f" expiring at {wanted.not_after:%H:%M:%S} or later" if wanted.not_after else ""
    return f"a local CA cert for keyd's key{after}"


def settle(world: CertWorld, offset: int) -> list[str]:
    """Wait until every renewed id whose stored cert the local CA issued (all due at once) has
    been renewed since the restart (log from `offset`); a rotation a kill interrupted is
    finished by then. Returns the ids that were not."""
    waiting = [
        cert_id
        for cert_id in cert_ids()
        if is_renewed(cert_id) and _issued_leaf(_read(world.cert_path(cert_id)), world.ca)
    ]
    deadline = time.monotonic() + SETTLE_SECONDS
    while waiting and time.monotonic() < deadline:
        text = world.log_since(offset)
        waiting = [cert_id for cert_id in waiting if not renewal_seen(text, cert_id)]
        if waiting:
            time.sleep(0.02)
    return waiting


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def check_certs(world: CertWorld, model: CertModel, offset: int) -> list[str]:
    """After a restart (its log starting at `offset`) and the renewals it starts: every
    acknowledged write is there (or the one in flight took effect), renewed ids hold a cert for
    keyd's key and no `<id>-temp`, nothing is torn, no temp file is left."""
    violations = [
        f"{cert_id}: not renewed within {SETTLE_SECONDS:.0f} s of the restart"
        for cert_id in settle(world, offset)
    ]
    pending: dict[str, list[CertExpected]] = {}
    for cert_id, after in model.pending:
        pending.setdefault(cert_id, []).append(after)
    for cert_id in cert_ids():
        found = _read(world.cert_path(cert_id))
        keyd_key = None
        if is_renewed(cert_id):
            keyd_key = world.keyd_public(cert_id)
            if world.keyd_public(cert_id + TEMP_SUFFIX) is not None:
                violations.append(f"{cert_id}: keyd still holds {cert_id}{TEMP_SUFFIX}")
        allowed = [model.state.get(cert_id, CertExpected("absent")), *pending.get(cert_id, [])]
        leaf = _issued_leaf(found, world.ca)
        if not any(cert_matches(found, wanted, world.ca, keyd_key) for wanted in allowed):
            violations.append(
                f"{cert_id}: stored {describe_cert(found, world.ca, keyd_key)}, acknowledged "
                f"{describe_expected(allowed[0])}"
                + (
                    f" (or in flight: {', '.join(describe_expected(p) for p in allowed[1:])})"
                    * bool(allowed[1:])
                )
            )
        # What the next cycle starts from.
        if found is None:
            model.state[cert_id] = CertExpected("absent")
        elif is_renewed(cert_id) and leaf is not None:
            # Renewed at every start from now on (imports are never the local CA's certs).
            model.state[cert_id] = CertExpected("issued", found, leaf.not_valid_after_utc)
        else:
            model.state[cert_id] = CertExpected("exact", found)
    model.pending.clear()
    if _read(world.cert_path(LOCAL_CA)) != world.ca_file:
        violations.append(f"{LOCAL_CA}: the local CA's cert file changed")
    known = {world.cert_path(cert_id).name for cert_id in [*cert_ids(), LOCAL_CA]}
    for path in sorted(world.certs_dir.iterdir()):
        if path.name.startswith("."):
            violations.append(f"temporary file left in the cert store: {path.name}")
        elif path.name not in known:
            violations.append(f"a cert file of no id written: {path.name}")
    leftovers = [p.name for p in world.keys_dir.glob(".*")] if world.keys_dir.exists() else []
    if leftovers:
        violations.append(f"temporary files left in the key store: {leftovers}")
    return violations


def run_cert_cycle(
    world: CertWorld, model: CertModel, rng: random.Random, max_wait: float, race: bool = False
) -> CycleReport:
    """Stream cert writes, SIGKILL aziotd at a random moment, restart, let the restart's
    renewals run, check. The daemon is left running for the next cycle. With `race`, imports
    and deletions of a renewed id do not wait for its renewal in flight (see CertStream)."""
    daemon = world.daemon
    stream = CertStream(world, model, rng, race=race)
    client = threading.Thread(target=stream.run, name="crash-cert-client")
    client.start()
    started = model.total
    deadline = time.monotonic() + 30
    while model.total < started + MIN_WRITES and client.is_alive():
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.01, max_wait))
    assert daemon.process is not None
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(10)
    daemon.process = None
    client.join(30)
    if client.is_alive():
        raise AssertionError("the client thread hung after the kill")
    before = model.total
    offset = world.log_size()
    daemon.start()
    violations = check_certs(world, model, offset)
    if stream.failure:
        violations.insert(0, stream.failure)
    return CycleReport(before, stream.operations, violations)


def cert_log_counts(world: CertWorld) -> Counter[str]:
    """What the daemon's log says happened in the background: renewals committed and failed,
    and interrupted rotations repaired at start (moved into place, or dropped)."""
    text = world.log_since(0)
    return Counter(
        {
            "renewals": text.count("renewed cert crash-cert-"),
            "renewal failures": text.count(": renewal failed ("),
            "repairs (key moved into place)": text.count(
                "repaired: finished the interrupted key rotation"
            ),
            "repairs (temp key dropped)": text.count("repaired: removed"),
        }
    )
