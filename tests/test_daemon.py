"""The daemon as a whole: authorization by uid, supervision, signals, systemd, throttling."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aziot.supervisor import systemd
from tests import rawhttp
from tests.daemon import KEYD_VERSION, Keyd

NOBODY = 65534


def as_uid(uid: int, sock_path: str, method: str, path: str, body=None) -> tuple[int, dict]:
    """Send one request from a forked child that has dropped to `uid` (no groups but its own)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only syscalls and os._exit, nothing that needs the parent's threads
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            target = path if "api-version=" in path else f"{path}?api-version={KEYD_VERSION}"
            reply = rawhttp.request(sock_path, method, target, body)
            payload = json.dumps([reply.status, reply.json() if reply.body else {}])
        except BaseException as error:  # report, never return into pytest
            payload = json.dumps([-1, {"message": repr(error)}])
        os.write(write_end, payload.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    status, reply = json.loads(b"".join(chunks))
    assert status != -1, reply["message"]
    return status, reply


def open_socket_to(uid_group: int, keyd: Keyd) -> None:
    os.chown(keyd.socket, 0, uid_group)


def test_principals_decide_which_ids_a_uid_may_name(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd")
    (keyd.config_dir / "50-nobody.toml").write_text(
        f'[[principal]]\nuid = {NOBODY}\nkeys = ["allowed*"]\n'
    )
    (keyd.config_dir / "60-nobody-more.toml").write_text(
        f'[[principal]]\nuid = {NOBODY}\nkeys = ["mod?"]\n'
    )
    keyd.start()
    try:
        open_socket_to(NOBODY, keyd)
        root_handle = keyd.call("POST", "/keypair", {"keyId": "device-id"}).json()["keyHandle"]
        status, reply = as_uid(NOBODY, keyd.socket, "POST", "/keypair", {"keyId": "allowed-1"})
        assert status == 200 and reply["keyHandle"].startswith("sr=")
        status, _ = as_uid(NOBODY, keyd.socket, "POST", "/key", {"keyId": "mod1", "usage": "sign"})
        assert status == 200  # from the second config.d file: arrays concatenate
        before = keyd.snapshot()
        for method, path, body, key_id in [
            ("POST", "/keypair", {"keyId": "other"}, "other"),
            ("POST", "/key", {"keyId": "mod12", "usage": "sign"}, "mod12"),
            ("GET", "/keypair/device-id", None, "device-id"),
            ("POST", "/keypair/other", {"from": "allowed-1"}, "other"),
        ]:
            status, reply = as_uid(NOBODY, keyd.socket, method, path, body)
            assert status == 401, (path, reply)
            assert reply == {
                "message": f"user {NOBODY} is not authorized to access the key {key_id}"
            }
        assert keyd.snapshot() == before
        # A handle is a capability: no uid check on handle operations.
        status, reply = as_uid(
            NOBODY, keyd.socket, "POST", "/parameters/algorithm", {"keyHandle": root_handle}
        )
        assert (status, reply) == (200, {"value": "ECDSA"})
    finally:
        keyd.stop()


def test_sighup_reloads_principals(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd").start()
    try:
        open_socket_to(NOBODY, keyd)
        assert as_uid(NOBODY, keyd.socket, "POST", "/keypair", {"keyId": "late"})[0] == 401
        (keyd.config_dir / "late.toml").write_text(
            f'[[principal]]\nuid = {NOBODY}\nkeys = ["late"]\n'
        )
        keyd.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while as_uid(NOBODY, keyd.socket, "POST", "/keypair", {"keyId": "late"})[0] != 200:
            assert time.monotonic() < deadline, keyd.logs()
            time.sleep(0.05)
        # A broken config on reload keeps the old principals and the daemon running.
        (keyd.config_dir / "late.toml").write_text("this is not toml")
        keyd.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert keyd.process.poll() is None
        assert as_uid(NOBODY, keyd.socket, "GET", "/keypair/late")[0] == 200
        assert "reload failed, keeping the old settings" in keyd.logs()
    finally:
        keyd.stop()


def test_a_crashed_keys_actor_is_restarted(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd", env={"AZIOTD_FAULTS": "bus.deliver.keys=crash*1"}).start()
    try:
        reply = keyd.call("POST", "/keypair", {"keyId": "k"})
        assert reply.status == 503
        assert reply.message == "keys restarted while serving this request"
        reply = keyd.call("POST", "/keypair", {"keyId": "k"})
        assert reply.status == 200
        assert "actor keys crashed" in keyd.logs()
    finally:
        keyd.stop()


def test_a_failed_disk_write_is_a_500_that_changes_nothing(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd").start()
    keyd.stop()  # the handle-validation key now exists: the first write below is the import
    keyd.env["AZIOTD_FAULTS"] = "store.write=error*1"
    keyd.start()
    try:
        before = keyd.snapshot()
        body = {"keyId": "sym", "usage": "sign", "keyBytes": "AAECAwQFBgcICQoLDA0ODw=="}
        reply = keyd.call("POST", "/key", body)
        assert (reply.status, reply.message) == (500, "internal error")
        assert keyd.snapshot() == before  # no key, no temp file
        reply = keyd.call("POST", "/key", body)
        assert reply.status == 200
        stored = keyd.keys_dir.glob("sym-*.key")
        assert [p.read_bytes() for p in stored] == [bytes(range(16))]
        assert "injected fault at store.write" in keyd.logs()
    finally:
        keyd.stop()


def test_past_the_restart_limit_the_daemon_exits_nonzero(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd", env={"AZIOTD_FAULTS": "bus.deliver.keys=crash"}).start()
    for _ in range(10):
        try:
            keyd.call("GET", "/key/k")
        except OSError:
            break
        if keyd.process.poll() is not None:
            break
    assert keyd.process.wait(10) == 70
    assert "exiting: actor keys crashed 6 times within 60 s (limit 5)" in keyd.logs()
    keyd.process = None


def test_sigterm_finishes_in_flight_requests_then_exits_zero(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd", env={"AZIOTD_FAULTS": "bus.deliver.keys=delay=1.0*1"}).start()
    replies = []
    slow = threading.Thread(
        target=lambda: replies.append(keyd.call("POST", "/keypair", {"keyId": "slow"}))
    )
    slow.start()
    time.sleep(0.3)
    code = keyd.stop(signal.SIGTERM)
    slow.join()
    assert code == 0
    assert replies[0].status == 200
    with pytest.raises(OSError):
        rawhttp.request(keyd.socket, "GET", "/key/slow")


def test_per_uid_connection_limit(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd", extra_config="").start()
    keyd.stop()
    keyd.config.write_text(
        keyd.config.read_text().replace("[aziot_keys]", "max_requests = 3\n[aziot_keys]")
    )
    keyd.start()
    try:
        open_socket_to(NOBODY, keyd)
        time.sleep(0.3)  # the readiness probe's connection must be gone from the count
        held = [rawhttp.connect(keyd.socket) for _ in range(3)]
        for sock in held:  # each is served: the limit counts connections, not requests
            sock.sendall(rawhttp.build("GET", f"/key/x?api-version={KEYD_VERSION}"))
            assert rawhttp.read_reply(sock).status == 400
        extra = rawhttp.connect(keyd.socket)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # may close first
            extra.sendall(rawhttp.build("GET", f"/key/x?api-version={KEYD_VERSION}"))
        with contextlib.suppress(
            ConnectionResetError
        ):  # closed without an answer, as the original does
            assert extra.recv(1024) == b""
        extra.close()
        # Another uid is not affected.
        assert as_uid(NOBODY, keyd.socket, "GET", "/key/x")[0] == 401  # served, not dropped
        held.pop().close()
        deadline = time.monotonic() + 5  # the slot frees once the server has seen the close
        while True:
            try:
                assert keyd.call("GET", "/key/x").status == 400
                break
            except ConnectionResetError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert "Max simultaneous connections reached for user 0" in keyd.logs()
        for sock in held:
            sock.close()
    finally:
        keyd.stop()


def test_ready_notification_reaches_systemd(world_dir: Path) -> None:
    notify_path = world_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        keyd = Keyd(world_dir / "keyd", env={"NOTIFY_SOCKET": str(notify_path)}).start(wait=False)
        try:
            assert notify.recv(1024) == b"READY=1"
            assert keyd.call("GET", "/key/x").status == 400  # ready means it answers
            keyd.process.send_signal(signal.SIGTERM)
            assert notify.recv(1024) == b"STOPPING=1"
        finally:
            keyd.stop()


def test_socket_activation_serves_the_inherited_socket(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd")
    activated_path = world_dir / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(activated_path))
    listener.listen(16)
    fd = listener.fileno()
    script = 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=aziot-keyd.socket exec "$0" -m aziot.supervisor.main'
    process = subprocess.Popen(
        ["sh", "-c", script, sys.executable],
        env=keyd.environ(),
        preexec_fn=lambda: os.dup2(fd, 3),
        pass_fds=[3],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=keyd.log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    listener.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = rawhttp.request(
                    str(activated_path),
                    "POST",
                    f"/keypair?api-version={KEYD_VERSION}",
                    {"keyId": "k"},
                )
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, keyd.logs()
                time.sleep(0.05)
        assert reply.status == 200
        assert not Path(keyd.socket).exists()  # it did not bind a socket of its own
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


def test_an_activated_socket_no_service_serves_is_named() -> None:
    one, two = socket.socketpair(socket.AF_UNIX)
    with one, two:
        activated = [("keyd", one), ("tpmd", two)]
        assert systemd.unclaimed(activated, ["keyd", "certd"]) == ["tpmd"]
        assert systemd.unclaimed(activated, ["keyd", "tpmd"]) == []
        # One socket, one service: systemd's default name may be anything.
        assert systemd.unclaimed([("x.socket", one)], ["keyd"]) == []


def test_no_config_exits_with_a_clear_error(world_dir: Path) -> None:
    env = dict(os.environ, AZIOT_KEYD_CONFIG=str(world_dir / "missing.toml"))
    result = subprocess.run(
        [sys.executable, "-m", "aziot.supervisor.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 78
    assert "no service is configured" in result.stderr


def test_unknown_aziot_keys_name_is_refused_at_start(world_dir: Path) -> None:
    keyd = Keyd(world_dir / "keyd", extra_config='pkcs11_bogus = "x"\n')
    keyd.start(wait=False)
    assert keyd.process.wait(30) == 78
    assert "unknown [aziot_keys] names pkcs11_bogus" in keyd.logs()
    keyd.process = None
