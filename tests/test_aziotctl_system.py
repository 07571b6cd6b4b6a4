"""`aziotctl system …` without systemd, against a real aziotd: status asks each socket, stop
sends SIGTERM and waits, set-log-level changes the running daemon's level through the runtime
file and SIGHUP, reprovision goes to identityd and on to mockcloud's DPS. Also aziotd's side:
the pid file, AZIOT_LOG as the original's units write it, and the systemd drop-in writer (as a
function on a temp dir: systemd itself is not faked).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aziot.cli import uds
from aziot.cli.layout import Layout
from aziot.cli.system import restart_services, status_row, write_log_level_dropin
from aziot.supervisor.log_levels import parse
from mockcloud.cloud import Cloud
from tests.daemon import MINIMAL_CONFIGS, Daemon
from tests.test_identityd import dps_config, start

REPO = Path(__file__).resolve().parent.parent
# tpmd's worker retries its absent swtpm, and a request wakes it: each retry after the first logs
# "the TPM still cannot be used" at debug (aziot.actors.tpm.worker), the first at error.
TPM_DEBUG = "tpmd: the TPM still cannot be used"
TPM_ERROR = "tpmd: the TPM cannot be used"


def aziotctl(
    daemon: Daemon, *args: str, root: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command line, with the daemon's socket dir as aziotd itself reads it."""
    env = dict(os.environ, AZIOT_SOCKET_DIR=str(daemon.socket_dir))
    command = [sys.executable, "-m", "aziot.cli.main", "--root", str(root or daemon.root)]
    return subprocess.run(
        [*command, "system", *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=60
    )


def all_services(root: Path, **env: str) -> Daemon:
    # The harness defaults to AZIOT_LOG_LEVEL=debug; empty is unset, so AZIOT_LOG decides.
    return Daemon(root, MINIMAL_CONFIGS, env={"AZIOT_LOG_LEVEL": "", **env})


@pytest.fixture
def daemon(world_dir: Path) -> Iterator[Daemon]:
    daemon = all_services(world_dir / "d").start()
    yield daemon
    if daemon.process is not None:
        daemon.stop()


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def tpm_debug_lines(daemon: Daemon) -> int:
    return daemon.logs().count(TPM_DEBUG)


def poke_tpmd(daemon: Daemon) -> None:
    """A request for the TPM: tpmd wakes its worker, which tries the absent swtpm again."""
    assert daemon.request("tpmd", "GET", "/get_tpm_keys").status == 500


def pid_file(daemon: Daemon) -> Path:
    return daemon.socket_dir / "aziotd.pid"


def test_pid_file_written_when_ready_and_removed_at_stop(daemon: Daemon) -> None:
    assert daemon.process is not None
    pid = daemon.process.pid
    assert wait_for(pid_file(daemon).exists)
    assert pid_file(daemon).read_text() == f"{pid}\n"
    assert oct(pid_file(daemon).stat().st_mode & 0o777) == "0o644"
    assert daemon.stop() == 0
    assert not pid_file(daemon).exists()


def test_a_pid_file_naming_another_process_is_left_alone(daemon: Daemon) -> None:
    assert wait_for(pid_file(daemon).exists)
    pid_file(daemon).write_text("1\n")  # as if a newer aziotd had taken over
    assert daemon.stop() == 0
    assert pid_file(daemon).read_text() == "1\n"


def test_status_while_running_and_after_stop(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert wait_for(pid_file(daemon).exists)
    result = aziotctl(daemon, "status")
    assert result.returncode == 0, result.stderr
    assert f"aziotd: running (pid {daemon.process.pid})" in result.stdout
    for service in ("keyd", "certd", "tpmd"):
        assert re.search(rf"^    {service} +answering$", result.stdout, re.M), result.stdout
    assert re.search(r"^    identityd +answering; provisioning: none$", result.stdout, re.M)

    daemon.stop()
    result = aziotctl(daemon, "status")
    assert result.returncode == 1
    assert f"not running (no pid file at {pid_file(daemon)})" in result.stdout
    assert result.stderr.strip().startswith("aziotd is not running")
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_sees_through_a_stale_pid_file(daemon: Daemon) -> None:
    assert wait_for(pid_file(daemon).exists)
    daemon.stop()
    # A pid that is not aziotd: this very test process.
    pid_file(daemon).write_text(f"{os.getpid()}\n")
    result = aziotctl(daemon, "status")
    assert result.returncode == 1
    assert f"names pid {os.getpid()}, which is not a running aziotd" in result.stdout


def test_status_names_a_socket_that_does_not_answer(daemon: Daemon) -> None:
    assert wait_for(pid_file(daemon).exists)
    certd = daemon.socket_dir / "certd.sock"
    certd.unlink()
    certd.write_text("")  # a file where the socket was: connecting is refused
    result = aziotctl(daemon, "status")
    assert result.returncode == 1
    assert re.search(r"^    certd +not answering: cannot connect", result.stdout, re.M)
    assert re.search(r"^    keyd +answering$", result.stdout, re.M)
    assert "certd not answering" in result.stderr


def test_stop_sends_sigterm_and_waits(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert wait_for(pid_file(daemon).exists)
    result = aziotctl(daemon, "stop")
    assert result.returncode == 0, result.stderr
    assert f"Stopping aziotd (pid {daemon.process.pid})...Stopped!" in result.stdout
    assert daemon.process.wait(5) == 0  # a clean exit: SIGTERM, not a kill
    assert "SIGTERM: stopping" in daemon.logs()
    assert not pid_file(daemon).exists()
    again = aziotctl(daemon, "stop")
    assert again.returncode == 0
    assert "aziotd is not running" in again.stdout


def test_restart_and_logs_say_what_to_do_without_systemd(daemon: Daemon) -> None:
    assert wait_for(pid_file(daemon).exists)
    restart = aziotctl(daemon, "restart")
    assert restart.returncode == 1
    assert "must be restarted by whatever started it" in restart.stderr
    assert daemon.process is not None and daemon.process.poll() is None  # left running
    logs = aziotctl(daemon, "logs", "--", "-n", "5")
    assert logs.returncode == 1
    assert "aziotd logs to its stderr" in logs.stderr


def test_set_log_level_applies_at_once_and_back(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert wait_for(pid_file(daemon).exists)
    assert wait_for(lambda: TPM_ERROR in daemon.logs())
    poke_tpmd(daemon)
    time.sleep(0.5)
    assert tpm_debug_lines(daemon) == 0  # info: the retries are quiet

    result = aziotctl(daemon, "set-log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert f"aziotd (pid {daemon.process.pid}) applies it now" in result.stdout
    assert wait_for(lambda: "log level info → debug" in daemon.logs())
    poke_tpmd(daemon)
    assert wait_for(lambda: tpm_debug_lines(daemon) > 0)
    assert "SIGHUP: keyd reloads its config" in daemon.logs()

    result = aziotctl(daemon, "set-log-level", "info")
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: "log level debug → info" in daemon.logs())
    time.sleep(0.3)  # a retry already under way may still log
    quiet = tpm_debug_lines(daemon)
    poke_tpmd(daemon)
    time.sleep(1.0)
    assert tpm_debug_lines(daemon) == quiet
    assert daemon.process.poll() is None  # never restarted
    assert daemon.logs().count("ready in") == 1


def test_set_log_level_needs_a_running_daemon(daemon: Daemon) -> None:
    daemon.stop()
    result = aziotctl(daemon, "set-log-level", "debug")
    assert result.returncode == 1
    assert "aziotd is not running" in result.stderr
    assert "AZIOT_LOG=debug" in result.stderr
    assert not (daemon.socket_dir / "aziotd.log-level").exists()


def test_a_stale_runtime_level_file_is_not_applied_by_the_next_daemon(world_dir: Path) -> None:
    daemon = all_services(world_dir / "d")
    daemon.socket_dir.mkdir(parents=True)
    (daemon.socket_dir / "aziotd.log-level").write_text("debug\n")
    daemon.start()
    try:
        assert not (daemon.socket_dir / "aziotd.log-level").exists()
        assert daemon.process is not None
        daemon.process.send_signal(1)  # SIGHUP: nothing to apply, the level stays info
        assert wait_for(lambda: "reloaded identityd's settings" in daemon.logs())
        poke_tpmd(daemon)
        time.sleep(0.5)
        assert tpm_debug_lines(daemon) == 0
    finally:
        daemon.stop()


def test_aziot_log_as_the_units_write_it(world_dir: Path) -> None:
    debug = all_services(world_dir / "debug", AZIOT_LOG="aziot=debug").start()
    try:
        poke_tpmd(debug)
        assert wait_for(lambda: tpm_debug_lines(debug) > 0)
    finally:
        debug.stop()

    quiet = all_services(world_dir / "quiet", AZIOT_LOG="ERROR").start()
    try:
        assert wait_for(lambda: TPM_ERROR in quiet.logs())
        poke_tpmd(quiet)
        time.sleep(0.5)
    finally:
        quiet.stop()
    logs = quiet.logs()
    assert "[INFO]" not in logs and "ready in" not in logs
    assert tpm_debug_lines(quiet) == 0


def test_log_level_precedence_and_unmappable_targets(world_dir: Path) -> None:
    # AZIOT_LOG_LEVEL beats AZIOT_LOG; a target of no crate of ours is a warning, not a failure.
    daemon = all_services(
        world_dir / "d", AZIOT_LOG="debug", AZIOT_LOG_LEVEL="info,hyper=trace,aziot_tpmd=loud"
    ).start()
    try:
        poke_tpmd(daemon)
        time.sleep(0.5)
    finally:
        daemon.stop()
    logs = daemon.logs()
    assert "AZIOT_LOG_LEVEL: no logger of aziotd matches target 'hyper'; ignored" in logs
    assert "AZIOT_LOG_LEVEL: unknown level 'loud' in 'aziot_tpmd=loud'" in logs
    assert "ready in" in logs
    assert tpm_debug_lines(daemon) == 0


def test_parse_maps_the_original_targets() -> None:
    levels = parse("warn,aziot_keyd=debug,aziotd=error")
    assert levels.level_of("aziot.actors.keys.store") == 10
    assert levels.level_of("aziot.actors.certs.actor") == 30
    assert levels.level_of("aziotd") == 40
    assert parse("aziot=trace").level_of("aziot.api.http1") == 10
    assert parse("DEBUG") == parse(" debug ")  # the original writes Rust's upper-case names


def test_reprovision_through_identityd(world_dir: Path) -> None:
    with Cloud(world_dir / "cloud") as cloud:
        enrollment = cloud.dps.add_symmetric_enrollment("dev-ctl")
        daemon = start(world_dir, cloud, dps_config(cloud, "dev-ctl"), enrollment.primary_key)
        try:
            provisioned = daemon.logs().count("provisioned by DPS as dev-ctl")
            assert provisioned == 1
            registrations = len([r for r in cloud.dps.requests if r.method == "PUT"])
            result = aziotctl(daemon, "reprovision")
            assert result.returncode == 0, result.stderr
            assert result.stdout == "Successfully reprovisioned with IoT Hub.\n"
            assert len([r for r in cloud.dps.requests if r.method == "PUT"]) == registrations + 1
            assert wait_for(lambda: daemon.logs().count("provisioned by DPS as dev-ctl") == 2)
        finally:
            daemon.stop()
        result = aziotctl(daemon, "reprovision")
        assert result.returncode == 1
        assert result.stderr.startswith("Failed to reprovision: ")
        assert "identityd.sock" in result.stderr


def test_log_level_dropin_as_the_original_writes_it(tmp_path: Path) -> None:
    # An alias's drop-in left by the original is read by systemd for aziotd.service too.
    old = tmp_path / "aziot-keyd.service.d" / "log-level.conf"
    old.parent.mkdir()
    old.write_text("[Service]\nEnvironment=AZIOT_LOG=INFO")
    written = write_log_level_dropin(tmp_path, "debug")
    ours = tmp_path / "aziotd.service.d" / "log-level.conf"
    assert written == [ours, old]
    for path in written:
        assert path.read_text() == "[Service]\nEnvironment=AZIOT_LOG=DEBUG\n"
        assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not (tmp_path / "aziot-certd.service.d").exists()
    assert sorted(p.name for p in ours.parent.iterdir()) == ["log-level.conf"]  # no temp left


def test_restart_services_under_root_says_what_to_restart(tmp_path: Path) -> None:
    layout = Layout(tmp_path, environ={})
    out = io.StringIO()
    assert restart_services(layout, out) == 0
    text = out.getvalue()
    assert f"Configs written under {tmp_path}" in text
    assert "Restart aziotd" in text and "aziotd.service" in text
    assert "is running" not in text


def test_restart_services_names_a_running_aziotd(daemon: Daemon) -> None:
    assert daemon.process is not None
    assert wait_for(pid_file(daemon).exists)
    layout = Layout(daemon.root, environ={"AZIOT_SOCKET_DIR": str(daemon.socket_dir)})
    out = io.StringIO()
    assert restart_services(layout, out) == 0
    assert f"aziotd is running (pid {daemon.process.pid}" in out.getvalue()
    assert "must be restarted to pick up the new configs" in out.getvalue()


def test_uds_client_replies_and_errors(daemon: Daemon, tmp_path: Path) -> None:
    reply = uds.request(daemon.socket_dir / "keyd.sock", "GET", "/nothing")
    assert reply.status == 400
    assert reply.message == "api-version not specified"
    with pytest.raises(uds.UdsError) as error:
        uds.request(tmp_path / "absent.sock", "GET", "/")
    assert "cannot connect: No such file or directory" in str(error.value)
    assert str(tmp_path / "absent.sock") in str(error.value)


def test_status_rows_as_the_original_shows_them() -> None:
    assert status_row("active", "active") == "Running"
    assert status_row("inactive", "active") == "Ready"  # socket activation waits for a caller
    assert status_row("active", "inactive") == "Down - socket error"
    assert status_row("inactive", "failed") == "Down - socket error"
    assert status_row("failed", "active") == "Down - failed"


@pytest.mark.parametrize(
    "command",
    [
        [str(Path(sys.executable).parent / "aziotd")],
        [sys.executable, "-m", "aziot.supervisor.main"],
    ],
    ids=["console-script", "module"],
)
def test_sighup_while_starting_does_not_kill_aziotd(world_dir: Path, command: list[str]) -> None:
    """systemd knows the pid from the fork: `set-log-level` may signal while Python still
    imports, and a death by SIGHUP is a clean exit that systemd does not restart."""
    if not Path(command[0]).exists():
        pytest.skip("no console script in this environment")
    # A slow start (the handle-validation key's fsync delayed) widens the window.
    daemon = Daemon(
        world_dir / "d",
        {"keyd": MINIMAL_CONFIGS["keyd"]},
        env={"AZIOTD_FAULTS": "store.fsync=delay=1*1", "AZIOT_LOG_LEVEL": ""},
        command=command,
    )
    daemon.start(wait=False)
    assert daemon.process is not None
    level_file = daemon.socket_dir / "aziotd.log-level"
    # From its first log line on (the interpreter's own start, before any of our code runs,
    # cannot be covered: aziotctl signals only an active unit or a pid file's process).
    assert wait_for(lambda: daemon.logs() != "")
    sent = 0
    while "ready in" not in daemon.logs() and daemon.process.poll() is None and sent < 500:
        if not level_file.exists() and sent > 5:
            level_file.parent.mkdir(parents=True, exist_ok=True)
            level_file.write_text("debug\n")  # set-log-level during the start
        daemon.process.send_signal(signal.SIGHUP)
        sent += 1
        time.sleep(0.01)
    try:
        assert daemon.process.poll() is None, f"killed by SIGHUP {sent}:\n{daemon.logs()}"
        daemon.wait_ready()
        assert sent > 10
        # The level written while it started is applied once it listens, not lost.
        assert wait_for(lambda: "log level info → debug" in daemon.logs()), daemon.logs()
    finally:
        assert daemon.stop() == 0
