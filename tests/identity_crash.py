"""Crash safety of identityd: SIGKILL aziotd (keyd + identityd) at random moments during a
stream of module creations, updates, reads and deletions and of reprovisionings, against
mockcloud's DPS and IoT Hub, then check what the crash left and what the restart serves.

A client thread sends one request at a time to identityd as root (`POST /identities/modules`
type aziot, `PUT` and `GET /identities/modules/<m>?type=aziot`, `DELETE` the same,
`POST /identities/device/reprovision`) and records each one acknowledged. `AZIOTD_FAULTS`
delays widen the windows inside identityd's state writes (`identity.state.write`, `.fsync`) and
between its cloud calls (`identity.cloud`). At a random moment after the cycle's first
acknowledged writes the daemon is killed; sometimes it is killed once more during the restart
that follows (while it provisions and reconciles, before it serves), so the kill also lands in
the start's own writes.

Checked after every kill, on the files the crash left (before a start could repair them):
`device_info` is absent, `unprovisioned`, or TOML with exactly `hub_name`,
`local_gateway_hostname` and `device_id` naming the device; `prev_state` parses as TOML; every
module backup parses as a JSON object naming the module its file is named after.

Checked after every restart: no `.tmp` file is left in identityd's homedir (nor keyd's key
store); an acknowledged module creation or update is in the mock hub and its identity is served
with a key handle that signs a module SAS token the hub's telemetry endpoint accepts; an
acknowledged deletion is absent from the hub; the request in flight at the kill may or may not
have taken effect (a creation cut between the hub's create and the keys' update leaves a module
whose keys are not the derived ones: allowed, and the stream updates or deletes it later); the
principal's module `mod1` exists and works; the device identity is served and its handle signs
a device token the hub accepts; the hub holds no module nobody made.

Used by tests/test_identity_crash.py (a bounded run) and bench/identity_crash.py (a long one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import httpx
import tomli

from aziot.actors.files import file_name
from mockcloud.cloud import Cloud
from tests.crash_harness import MIN_WRITES
from tests.daemon import Daemon, ServiceDir, keyd_config
from tests.test_identityd import MODULE_PRINCIPAL, dps_config, token_from_keyd, write_device_key

# Widen the windows inside each state write (between writing, syncing and renaming) and
# between the cloud calls of one operation (hub create, then keys, then hub update).
FAULTS = (
    "identity.state.write=delay=0.004@0.5;identity.state.fsync=delay=0.004@0.5;"
    "identity.cloud=delay=0.003@0.3;store.write=delay=0.002@0.2"
)
DEVICE_ID = "crash-dev"
PRINCIPAL_MODULE = "mod1"  # MODULE_PRINCIPAL's: made by reconciliation, never by the stream
MODULE_IDS = [f"crash-mod-{n}" for n in range(8)]
DEVICE_INFO_KEYS = {"hub_name", "local_gateway_hostname", "device_id"}


class LeftoverTempFiles(AssertionError):
    """Temp files of interrupted writes still in identityd's homedir after a start."""


# What the hub holds for a module: nothing, a module whose identity identityd serves with a key
# that signs tokens the hub accepts ("keyed"), or a module whose keys may not be the derived
# ones ("present": a creation cut between the hub's create and the keys' update).
ABSENT, KEYED, PRESENT = "absent", "keyed", "present"


@attrs.define
class IdentityModel:
    state: dict[str, str] = attrs.field(factory=dict)  # module id -> ABSENT / KEYED / PRESENT
    # The request in flight at the kill: (module id, its state if it took effect).
    pending: list[tuple[str, str]] = attrs.field(factory=list)
    acknowledged: Counter[str] = attrs.field(factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.acknowledged.values())

    def of(self, module_id: str) -> str:
        return self.state.get(module_id, ABSENT)


@attrs.define
class IdentityCycleReport:
    acknowledged: int
    operations: Counter[str]
    violations: list[str]
    leftovers: list[str]  # temp files left after a start (identityd does not sweep them)
    notes: Counter[str]  # what the crash left that is allowed (temp files, stale backups...)
    kills: int


class Hub:
    """The mock hub's telemetry endpoint, reached over one kept-alive TLS connection."""

    def __init__(self, cloud: Cloud) -> None:
        self.cloud = cloud
        context = ssl.create_default_context(cafile=str(cloud.server_ca_pem_path))
        self.client = httpx.Client(verify=context, timeout=10.0)

    def close(self) -> None:
        self.client.close()

    def telemetry(self, path: str, token: str) -> int:
        url = f"https://{self.cloud.hub_hostname}{path}?api-version=2020-03-13"
        return self.client.post(url, headers={"Authorization": token}, content=b"hi").status_code


@attrs.define
class IdentityWorld:
    """keyd + identityd in one aziotd, provisioned by the mock DPS onto the mock hub."""

    daemon: Daemon
    cloud: Cloud
    hub: Hub

    @property
    def home(self) -> Path:
        return self.daemon.services["identityd"].home

    @property
    def keys_dir(self) -> Path:
        return self.daemon.services["keyd"].home / "keys"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self.daemon.request("identityd", method, path, body)

    def log_size(self) -> int:
        return self.daemon.log.stat().st_size if self.daemon.log.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.daemon.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.daemon.process is not None:
            self.daemon.stop()
        self.hub.close()


def start_identity_world(root: Path, cloud: Cloud, faults: str = FAULTS) -> IdentityWorld:
    """Enroll the device with the (running) mock DPS and start aziotd under `root`."""
    enrollment = cloud.dps.add_symmetric_enrollment(DEVICE_ID)
    key_file = write_device_key(root / "secrets", enrollment.primary_key)

    def keyd(service: ServiceDir) -> str:
        return keyd_config(service) + f'[preloaded_keys]\ndevice-key = "file://{key_file}"\n'

    env = {
        "SSL_CERT_FILE": str(cloud.server_ca_pem_path),
        "NO_PROXY": "*",
        "AZIOTD_FAULTS": faults,
        "AZIOT_LOG_LEVEL": "info",
    }
    identityd = dps_config(cloud, DEVICE_ID, MODULE_PRINCIPAL)
    daemon = Daemon(root / "d", {"keyd": keyd, "identityd": identityd}, env=env)
    daemon.start(wait=False)
    daemon.wait_ready(60)
    return IdentityWorld(daemon, cloud, Hub(cloud))


class IdentityStream:
    """Sequential identityd writes against `world`, recorded in `model`, until the daemon dies."""

    def __init__(
        self,
        world: IdentityWorld,
        model: IdentityModel,
        rng: random.Random,
        *,
        reprovision_rate: float = 0.0,
        reprovision_after: int | None = None,
    ) -> None:
        self.world = world
        self.model = model
        self.rng = rng
        # Each step is a reprovisioning with probability `reprovision_rate`; and once
        # `reprovision_after` writes of the model are acknowledged, the next step is one.
        self.reprovision_rate = reprovision_rate
        self.reprovision_after = reprovision_after
        # Set when the aimed reprovisioning is sent, with the daemon's log size just before.
        self.reprovision_sent = threading.Event()
        self.reprovision_offset = 0
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

    def _call(self, method: str, path: str, body: Any, module_id: str | None, after: str) -> Any:
        try:
            return self.world.request(method, path, body)
        except OSError:
            if module_id is not None:
                self.model.pending.append((module_id, after))
            raise

    def _acknowledge(self, module_id: str | None, after: str, op: str) -> None:
        if module_id is not None:
            self.model.state[module_id] = after
        self.model.acknowledged[op] += 1
        self.operations[op] += 1

    def step(self) -> None:
        rng = self.rng
        aimed = self.reprovision_after is not None and self.model.total >= self.reprovision_after
        if aimed:
            self.reprovision_after = None
            self.reprovision_offset = self.world.log_size()
            self.reprovision_sent.set()
        if aimed or rng.random() < self.reprovision_rate:
            self._reprovision()
            return
        module_id = rng.choice(MODULE_IDS)
        current = self.model.of(module_id)
        choice = rng.random()
        if current == ABSENT:
            self._create(module_id)
        elif current == PRESENT:
            self._update(module_id) if choice < 0.6 else self._delete(module_id)
        elif choice < 0.45:
            self._delete(module_id)
        elif choice < 0.65:
            self._update(module_id)
        else:
            self._read(module_id)

    def _create(self, module_id: str) -> None:
        body = {"type": "aziot", "moduleId": module_id}
        reply = self._call("POST", "/identities/modules", body, module_id, PRESENT)
        spec = self._spec(reply, f"create {module_id}")
        if spec.get("moduleId") != module_id or "keyHandle" not in spec.get("auth", {}):
            raise AssertionError(f"create {module_id}: {reply.body!r}")
        self._acknowledge(module_id, KEYED, "create")

    def _update(self, module_id: str) -> None:
        path = f"/identities/modules/{module_id}?type=aziot"
        # In flight, an update of a module with unknown keys may or may not have keyed it.
        reply = self._call("PUT", path, {}, module_id, KEYED)
        self._spec(reply, f"update {module_id}")
        self._acknowledge(module_id, KEYED, "update")

    def _read(self, module_id: str) -> None:
        # Not a change in the hub, but a read the hub answers rewrites the module's backup.
        path = f"/identities/modules/{module_id}?type=aziot"
        reply = self._call("GET", path, None, None, KEYED)
        self._spec(reply, f"read {module_id}")
        self.operations["read"] += 1

    def _delete(self, module_id: str) -> None:
        path = f"/identities/modules/{module_id}?type=aziot"
        reply = self._call("DELETE", path, None, module_id, ABSENT)
        if reply.status != 204:
            raise AssertionError(f"delete {module_id}: {reply.status} {reply.body[:300]!r}")
        self._acknowledge(module_id, ABSENT, "delete")

    def _reprovision(self) -> None:
        reply = self._call("POST", "/identities/device/reprovision", {"type": "aziot"}, None, "")
        if reply.status != 204:
            raise AssertionError(f"reprovision: {reply.status} {reply.body[:300]!r}")
        self._acknowledge(None, "", "reprovision")

    @staticmethod
    def _spec(reply: Any, what: str) -> dict[str, Any]:
        if reply.status != 200:
            raise AssertionError(f"{what}: {reply.status} {reply.body[:300]!r}")
        return reply.json()["spec"]


# -- what the crash left on disk -----------------------------------------------------------------


def temp_files(world: IdentityWorld) -> list[str]:
    """Temp files of atomic writes (`.<random>.tmp`) in identityd's homedir and keyd's store."""
    found = [str(p.relative_to(world.home)) for p in world.home.rglob(".*.tmp")]
    if world.keys_dir.exists():
        found += [f"keyd:{p.name}" for p in world.keys_dir.glob(".*.tmp")]
    return sorted(found)


def check_disk(world: IdentityWorld, known: set[str]) -> tuple[list[str], Counter[str]]:
    """identityd's files as the kill left them: nothing torn. Returns violations and notes
    (`known`: the temp files there before, so that only a kill's new ones are counted)."""
    violations: list[str] = []
    notes: Counter[str] = Counter()
    home = world.home
    info_path = home / "device_info"
    if info_path.exists():
        text = info_path.read_text(errors="replace")
        if text.strip() == "unprovisioned":
            notes["device_info unprovisioned"] += 1
        else:
            try:
                table = tomli.loads(text)
            except tomli.TOMLDecodeError as error:
                table = None
                violations.append(f"device_info is torn ({error}): {text[:120]!r}")
            if table is not None:
                if set(table) != DEVICE_INFO_KEYS:
                    violations.append(f"device_info has keys {sorted(table)}: {text[:120]!r}")
                elif table["device_id"] != DEVICE_ID or table["hub_name"] != (
                    world.cloud.hub_hostname
                ):
                    violations.append(f"device_info names another device: {text[:120]!r}")
    else:
        notes["device_info absent"] += 1
    prev = home / "prev_state"
    if prev.exists():
        try:
            tomli.loads(prev.read_text(errors="replace"))
        except tomli.TOMLDecodeError as error:
            violations.append(f"prev_state is torn ({error})")
    modules = home / "modules"
    for folder in sorted(modules.iterdir()) if modules.is_dir() else []:
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            where = f"modules/{folder.name[:8]}…/{path.name[:24]}…"
            try:
                data = json.loads(path.read_text())
            except ValueError as error:
                violations.append(f"{where}: backup is not JSON ({error}): {path.read_bytes()!r}")
                continue
            if not isinstance(data, dict) or "moduleId" not in data:
                violations.append(f"{where}: backup is not a module: {data!r}")
            elif file_name(str(data["moduleId"]), "")[:-1] != path.name:
                violations.append(f"{where}: backup of another module ({data['moduleId']})")
    if set(temp_files(world)) - known:
        notes["kills that left a new temp file"] += 1
    return violations, notes


# -- what the restart serves ----------------------------------------------------------------------


def module_found(world: IdentityWorld, module_id: str) -> tuple[str, str | None]:
    """What the hub holds for `module_id`, proven through identityd: ABSENT, KEYED (served with
    a handle that signs a token the hub accepts) or PRESENT; and a problem seen on the way."""
    if world.cloud.hub.module(DEVICE_ID, module_id) is None:
        return ABSENT, None
    reply = world.request("GET", f"/identities/modules/{module_id}?type=aziot")
    if reply.status != 200:
        return PRESENT, f"identity not served: {reply.status} {reply.body[:200]!r}"
    spec = reply.json()["spec"]
    audience = f"{spec['hubName']}/devices/{DEVICE_ID}/modules/{module_id}"
    token = token_from_keyd(world.daemon, audience, spec["auth"]["keyHandle"])
    status = world.hub.telemetry(f"/devices/{DEVICE_ID}/modules/{module_id}/messages/events", token)
    if status != 204:
        return PRESENT, f"the hub answered {status} to a token signed with its handle"
    return KEYED, None


def check_served(world: IdentityWorld, model: IdentityModel) -> tuple[list[str], Counter[str]]:
    """After a restart: the acknowledged state of every module, the principal's module and the
    device identity, all working against the hub; the model updated to what was found."""
    violations: list[str] = []
    notes: Counter[str] = Counter()
    pending: dict[str, list[str]] = {}
    for module_id, after in model.pending:
        pending.setdefault(module_id, []).append(after)
    for module_id in MODULE_IDS:
        found, problem = module_found(world, module_id)
        wanted = model.of(module_id)
        allowed = [wanted, *pending.get(module_id, [])]
        ok = any(found == a or (a == PRESENT and found in (KEYED, PRESENT)) for a in allowed)
        if not ok:
            in_flight = f" (or in flight: {', '.join(allowed[1:])})" if allowed[1:] else ""
            violations.append(
                f"{module_id}: the hub holds {found}, acknowledged {wanted}{in_flight}"
                + (f"; {problem}" if problem else "")
            )
        elif found == PRESENT and wanted != PRESENT:
            notes["in-flight creations left unkeyed"] += 1
        model.state[module_id] = found
    model.pending.clear()
    found, problem = module_found(world, PRINCIPAL_MODULE)
    if found != KEYED:
        violations.append(f"principal module {PRINCIPAL_MODULE}: {found}; {problem}")
    violations += check_device(world)
    made = {PRINCIPAL_MODULE, *MODULE_IDS}
    device = world.cloud.hub.device(DEVICE_ID)
    strays = sorted(set(device.modules) - made) if device is not None else []
    if strays:
        violations.append(f"modules nobody made in the hub: {strays}")
    return violations, notes


def check_device(world: IdentityWorld) -> list[str]:
    reply = world.request("GET", "/identities/identity")
    if reply.status != 200:
        return [f"device identity not served: {reply.status} {reply.body[:200]!r}"]
    spec = reply.json()["spec"]
    if spec.get("deviceId") != DEVICE_ID or spec.get("hubName") != world.cloud.hub_hostname:
        return [f"device identity names another device: {spec}"]
    audience = f"{spec['hubName']}/devices/{DEVICE_ID}"
    token = token_from_keyd(world.daemon, audience, spec["auth"]["keyHandle"])
    status = world.hub.telemetry(f"/devices/{DEVICE_ID}/messages/events", token)
    if status != 204:
        return [f"the hub answered {status} to a device token signed with its handle"]
    return []


def stale_backups(world: IdentityWorld) -> int:
    """Module backups of modules the hub no longer holds (a deletion cut between the hub's
    delete and the backup's removal): allowed, counted."""
    count = 0
    modules = world.home / "modules"
    for folder in modules.iterdir() if modules.is_dir() else []:
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            try:
                module_id = json.loads(path.read_text())["moduleId"]
            except (ValueError, KeyError, TypeError):
                continue
            if world.cloud.hub.module(DEVICE_ID, module_id) is None:
                count += 1
    return count


# -- one cycle ------------------------------------------------------------------------------------


def kill(daemon: Daemon) -> None:
    assert daemon.process is not None
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(10)
    daemon.process = None


STARTING = ("using the provisioning backup", "provisioned by DPS as")


def kill_while_starting(world: IdentityWorld, rng: random.Random) -> bool:
    """Start aziotd and SIGKILL it once identityd has provisioned (from the backup or DPS),
    after a random delay: inside the start's reconciliation, or just after. Returns whether the
    kill came before the daemon answered."""
    daemon = world.daemon
    offset = world.log_size()
    daemon.start(wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(line in world.log_since(offset) for line in STARTING):
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.15))
    early = not daemon.answers(daemon.services["identityd"].socket)
    kill(daemon)
    return early


REGISTERED = "Assigned to IoT hub"  # DPS answered: the reprovisioning's reconciliation follows


def aim_at_reprovisioning(world: IdentityWorld, stream: IdentityStream, rng: random.Random) -> str:
    """Wait for the stream's aimed reprovisioning and for a moment inside it: just after it is
    sent (the backups being cleared, the registration sent) or just after DPS assigned the
    device (the reconciliation and its writes, or the acknowledgement). Returns which."""
    deadline = time.monotonic() + 30
    while not stream.reprovision_sent.wait(0.01):
        if time.monotonic() > deadline or stream.failure:
            return "never sent"
    if rng.random() < 0.4:
        time.sleep(rng.uniform(0.0, 0.03))
        return "clearing"
    while REGISTERED not in world.log_since(stream.reprovision_offset):
        if time.monotonic() > deadline:
            return "never registered"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    return "reconciling"


def run_identity_cycle(
    world: IdentityWorld,
    model: IdentityModel,
    rng: random.Random,
    max_wait: float,
    *,
    start_kills: float = 0.25,
    reprovision: bool = False,
    reprovision_rate: float = 0.0,
    register_twice: bool = False,
) -> IdentityCycleReport:
    """Stream identityd writes, SIGKILL aziotd at a random moment, check the files it left,
    (with probability `start_kills` kill it once more during the restart and check again),
    restart, check what it serves. The daemon is left running for the next cycle.

    With `reprovision`, the stream reprovisions after the cycle's first writes and the kill is
    aimed inside that reprovisioning. Every DPS registration waits the original's 5 s before
    its first status poll, so a cycle that reprovisions (or restarts without `device_info`)
    costs 5 to 10 s more: `reprovision_rate` (per request) adds unaimed ones."""
    daemon = world.daemon
    stream = IdentityStream(
        world,
        model,
        rng,
        reprovision_rate=reprovision_rate,
        reprovision_after=model.total + MIN_WRITES if reprovision else None,
    )
    known = set(temp_files(world))
    client = threading.Thread(target=stream.run, name="crash-identity-client")
    client.start()
    notes: Counter[str] = Counter()
    if reprovision:
        notes[f"kills aimed at a reprovisioning ({aim_at_reprovisioning(world, stream, rng)})"] += 1
    else:
        started = model.total
        deadline = time.monotonic() + 30
        while model.total < started + MIN_WRITES and client.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.01, max_wait))
    kill(daemon)
    client.join(30)
    if client.is_alive():
        raise AssertionError("the client thread hung after the kill")
    before = model.total
    violations, disk_notes = check_disk(world, known)
    notes.update(disk_notes)
    violations = [f"after the kill: {v}" for v in violations]
    kills = 1
    # A start without `device_info` registers with DPS (5 s at least): killed during it, the
    # next start registers again. Only with `register_twice`, so bounded runs stay short.
    registers = not (world.home / "device_info").exists()
    if rng.random() < start_kills and (register_twice or not registers):
        left = set(temp_files(world))
        early = kill_while_starting(world, rng)
        kills += 1
        notes["kills during a start" + (" (before serving)" if early else "")] += 1
        more, more_notes = check_disk(world, left)
        violations += [f"after a kill during the start: {v}" for v in more]
        notes.update(more_notes)
    daemon.start(wait=False)
    daemon.wait_ready(60)
    leftovers = temp_files(world)
    served, served_notes = check_served(world, model)
    violations += served
    notes.update(served_notes)
    stale = stale_backups(world)
    if stale:
        notes["stale backups of deleted modules"] += stale
    if stream.failure:
        violations.insert(0, stream.failure)
    return IdentityCycleReport(before, stream.operations, violations, leftovers, notes, kills)


@attrs.define
class RunSummary:
    cycles: int = 0
    kills: int = 0
    operations: Counter[str] = attrs.field(factory=Counter)
    notes: Counter[str] = attrs.field(factory=Counter)
    violations: list[str] = attrs.field(factory=list)
    # Each temp file found after a start, with the cycle it was first seen in (identityd never
    # removes them, so one stays until a reprovisioning clears its folder).
    leftovers: dict[str, int] = attrs.field(factory=dict)

    def add(self, cycle: int, report: IdentityCycleReport) -> None:
        self.cycles += 1
        self.kills += report.kills
        self.operations.update(report.operations)
        self.notes.update(report.notes)
        self.violations += [f"cycle {cycle}: {v}" for v in report.violations]
        for name in report.leftovers:
            self.leftovers.setdefault(name, cycle)

    def leftover_lines(self) -> list[str]:
        return [f"cycle {cycle}: {name}" for name, cycle in self.leftovers.items()]
