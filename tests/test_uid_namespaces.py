"""Who keyd thinks is calling when callers (or keyd) live in user namespaces (lessons row 10).

SO_PEERCRED gives the uid of the connecting process as the daemon's own user namespace sees it:
a container's "root" is the host uid its namespace maps 0 to, and a uid the daemon's namespace
does not map at all becomes the kernel's overflow uid. These tests build such callers with the
real tools (`setpriv`, `unshare`) around a stdlib-only client, against a real aziotd, and check
what keyd authorizes. Each client also reports who it believes it is, so the gap is on record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.daemon import KEYD_VERSION, Keyd

CALLER = 4242  # a host uid with no account: only principals give it anything
OTHER = 4343
OVERFLOW = int(Path("/proc/sys/kernel/overflowuid").read_text())

# Each caller's keys; uid 0's entry shows that a principal does not narrow root in keyd.
PRINCIPALS = (
    f'[[principal]]\nuid = {CALLER}\nkeys = ["ns-*"]\n'
    f'[[principal]]\nuid = {OVERFLOW}\nkeys = ["overflow-*"]\n'
    '[[principal]]\nuid = 0\nkeys = ["only-this"]\n'
)


def as_host_uid(uid: int) -> list[str]:
    """Run as `uid` on the host, primary group CALLER (the socket's group), no other groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={CALLER}", "--clear-groups"]


# As a container runtime sets a rootless container up: its root is host uid CALLER.
NAMESPACE_ROOT = [*as_host_uid(CALLER), "unshare", "--user", "--map-root-user"]
# A namespace with no uid map: the process sees itself as the overflow uid.
NAMESPACE_UNMAPPED = [*as_host_uid(CALLER), "unshare", "--user"]
# Host root in a namespace that shows it uid CALLER: still root to anyone outside.
HOST_ROOT_LOOKING_UNPRIVILEGED = [
    "unshare",
    "--user",
    f"--map-user={CALLER}",
    f"--map-group={CALLER}",
]

# The client runs in another process under another uid, so it needs nothing but the stdlib.
# argv: socket, method, target, body (JSON), and optionally a uid to become after connecting.
CLIENT = r"""
import json, os, socket, sys

path, method, target, body = sys.argv[1:5]
drop_to = int(sys.argv[5]) if len(sys.argv) > 5 else None
view = {"uid": os.getuid(), "uid_map": open("/proc/self/uid_map").read().split()}
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
except OSError as error:
    print(json.dumps({**view, "connect_error": error.errno}))
    sys.exit(0)
if drop_to is not None:
    os.setgroups([])
    os.setgid(drop_to)
    os.setuid(drop_to)
    view["uid"] = os.getuid()
payload = body.encode()
head = (
    f"{method} {target} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n"
    f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
)
sock.sendall(head.encode() + payload)
data = b""
while chunk := sock.recv(65536):
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
lines = head.decode().split("\r\n")
length = next(
    int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
)
status = int(lines[0].split()[1])
reply = json.loads(rest[:length]) if length else None
print(json.dumps({**view, "status": status, "reply": reply}))
"""


@attrs.frozen
class Client:
    """Starts the client with an interpreter that an unprivileged uid in a namespace may run."""

    python: str

    def call(
        self,
        prefix: list[str],
        socket_path: str,
        method: str,
        path: str,
        body: Any = None,
        drop_to: int | None = None,
    ) -> dict[str, Any]:
        """One request from a client started under `prefix`: what it saw of itself, and the
        answer."""
        target = f"{path}?api-version={KEYD_VERSION}"
        payload = "" if body is None else json.dumps(body)
        argv = [*prefix, self.python, "-I", "-S", "-c", CLIENT, socket_path, method, target]
        argv.append(payload)
        if drop_to is not None:
            argv.append(str(drop_to))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))


def refusal(uid: int, key_id: str) -> dict[str, str]:
    return {"message": f"user {uid} is not authorized to access the key {key_id}"}


@pytest.fixture(scope="module")
def client() -> Client:
    """Skip unless an unprivileged uid may make a user namespace, map itself in it and run a
    Python there (this interpreter may live under a home only root can enter)."""
    errors = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        probe = [*NAMESPACE_ROOT, python, "-I", "-S", "-c", "pass"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError as error:
            pytest.skip(f"no {error.filename} here")
        if done.returncode == 0:
            return Client(python)
        errors.append(done.stderr.strip())
    pytest.skip(f"an unprivileged uid cannot run Python in a user namespace here: {errors}")


def start_keyd(root: Path, command_prefix: list[str] | None = None) -> Keyd:
    keyd = Keyd(root)
    if command_prefix is not None:
        keyd.command = [*command_prefix, *keyd.command]
    (keyd.config_dir / "50-callers.toml").write_text(PRINCIPALS)
    try:
        keyd.start()
    except Exception:
        if keyd.process is not None:
            keyd.stop(signal.SIGKILL)
        raise
    # bound by aziotd itself (no systemd): its own user and group, mode 0660
    status = os.stat(keyd.socket)
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (0, 0, 0o660)
    os.chown(keyd.socket, 0, CALLER)  # mode 0660: the callers' group may connect
    return keyd


@pytest.fixture
def keyd(world_dir: Path) -> Iterator[Keyd]:
    daemon = start_keyd(world_dir / "keyd")
    yield daemon
    if daemon.process is not None:
        daemon.stop(signal.SIGKILL)


def test_root_of_a_user_namespace_is_its_host_uid(keyd: Keyd, client: Client) -> None:
    """A rootless container's root: uid 0 to itself, host uid 4242 to keyd, never root."""
    before = keyd.snapshot()
    answer = client.call(NAMESPACE_ROOT, keyd.socket, "POST", "/keypair", {"keyId": "device-id"})
    assert answer["uid"] == 0 and answer["uid_map"] == ["0", str(CALLER), "1"]
    assert (answer["status"], answer["reply"]) == (401, refusal(CALLER, "device-id"))
    assert keyd.snapshot() == before  # refused: nothing stored
    answer = client.call(NAMESPACE_ROOT, keyd.socket, "POST", "/keypair", {"keyId": "ns-module"})
    assert answer["status"] == 200 and answer["reply"]["keyHandle"].startswith("sr=")
    assert len(keyd.snapshot()) == len(before) + 1


def test_a_caller_unmapped_in_its_own_namespace_is_still_its_host_uid(
    keyd: Keyd, client: Client
) -> None:
    """Without a uid map the caller sees itself as the overflow uid; keyd still sees 4242."""
    answer = client.call(
        NAMESPACE_UNMAPPED, keyd.socket, "POST", "/key", {"keyId": "ns-sym", "usage": "sign"}
    )
    assert answer["uid"] == OVERFLOW and answer["uid_map"] == []
    assert answer["status"] == 200
    answer = client.call(
        NAMESPACE_UNMAPPED, keyd.socket, "POST", "/key", {"keyId": "overflow-1", "usage": "sign"}
    )
    assert (answer["status"], answer["reply"]) == (401, refusal(CALLER, "overflow-1"))


def test_host_root_is_root_whatever_its_namespace_shows(keyd: Keyd, client: Client) -> None:
    """uid 0 on the host may name any key id, even with a principal of its own (keyd, as the
    original); inside a namespace that shows it as 4242 it is still host root."""
    assert keyd.call("POST", "/keypair", {"keyId": "device-id"}).status == 200
    answer = client.call(HOST_ROOT_LOOKING_UNPRIVILEGED, keyd.socket, "GET", "/keypair/device-id")
    assert answer["uid"] == CALLER and answer["uid_map"] == [str(CALLER), "0", "1"]
    assert answer["status"] == 200 and answer["reply"]["keyHandle"].startswith("sr=")


def test_the_uid_is_the_one_at_connect_time(keyd: Keyd, client: Client) -> None:
    """A connection opened by root stays root's after the process drops to 4242 (or hands the
    socket on): SO_PEERCRED is the connector's credentials when it connected."""
    answer = client.call(
        [], keyd.socket, "POST", "/keypair", {"keyId": "device-id"}, drop_to=CALLER
    )
    assert answer["uid"] == CALLER
    assert answer["status"] == 200


def test_socket_permissions_decide_who_may_connect_at_all(keyd: Keyd, client: Client) -> None:
    """A principal does not open the socket: without the socket's group, 4242 (namespace root
    or not) cannot connect."""
    os.chown(keyd.socket, 0, 0)
    assert oct(os.stat(keyd.socket).st_mode & 0o777) == "0o660"
    for prefix in (NAMESPACE_ROOT, as_host_uid(CALLER)):
        answer = client.call(prefix, keyd.socket, "POST", "/keypair", {"keyId": "ns-x"})
        assert answer.get("connect_error") == 13, answer  # EACCES
    assert keyd.call("POST", "/keypair", {"keyId": "ns-x"}).status == 200


def test_a_daemon_in_a_user_namespace_sees_unmapped_callers_as_the_overflow_uid(
    world_dir: Path, client: Client
) -> None:
    """keyd in a namespace that maps only root: every other host uid reaches it as 65534, so
    all of them share the principal written for 65534, and none gets its own."""
    keyd = start_keyd(world_dir / "keyd", ["unshare", "--user", "--map-root-user"])
    try:
        assert keyd.process is not None
        uid_map = Path(f"/proc/{keyd.process.pid}/uid_map").read_text().split()
        assert uid_map == ["0", "0", "1"]
        for uid in (CALLER, OTHER):
            answer = client.call(
                as_host_uid(uid), keyd.socket, "POST", "/keypair", {"keyId": "ns-a"}
            )
            assert (answer["status"], answer["reply"]) == (401, refusal(OVERFLOW, "ns-a"))
            key_id = f"overflow-{uid}"
            answer = client.call(
                as_host_uid(uid), keyd.socket, "POST", "/keypair", {"keyId": key_id}
            )
            assert answer["status"] == 200, answer
        # root is mapped (0 -> 0), so the host's root is still root
        assert keyd.call("POST", "/keypair", {"keyId": "device-id"}).status == 200
    finally:
        keyd.stop(signal.SIGKILL)
