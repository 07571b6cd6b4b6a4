"""`aziotctl system …`: status, stop, restart, logs, set-log-level, reprovision.

Under systemd it drives the units as the original does, with ours: one `aziotd.service` (aliased
as the original's four service names) and four sockets. Without systemd (a container, or a
`--root` layout) it finds aziotd through the pid file aziotd writes beside its sockets and asks
each socket directly; what only a process manager can do (restart, logs) is said, not faked.
`set-log-level` takes effect at once in both modes: aziotd re-reads `aziotd.log-level` in its
socket dir on SIGHUP (the original needs a restart).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from aziot.supervisor.runtime_files import LOG_LEVEL_FILE, replace_text

from . import uds
from .arguments import LEVELS
from .layout import Layout

SERVICE_UNIT = "aziotd.service"
# In the original's order: its `restart` starts the first, identityd, last.
SERVICES = ("identityd", "keyd", "certd", "tpmd")
SOCKET_UNITS = {name: f"aziot-{name}.socket" for name in SERVICES}
ALIASES = tuple(f"aziot-{name}.service" for name in SERVICES)
SYSTEMD_RUN_DIR = Path("/run/systemd/system")

STOP_TIMEOUT = 30.0  # aziotd drains in-flight requests for 10 s at most
PROBE_TIMEOUT = 5.0
REPROVISION_TIMEOUT = 120.0  # DPS registration with its polling, then the hub
REPROVISION_PATH = "/identities/device/reprovision?api-version=2021-12-01"

# A request per service that needs no authorization and changes nothing: its api-version is
# accepted, so an unknown path gets 404 (spec/api.md §1.3); identityd's provisioning route is
# open to anyone and says how the device provisions.
PROBES = {
    "identityd": ("/identities/provisioning?api-version=2021-12-01", 200),
    "keyd": ("/?api-version=2021-05-01", 404),
    "certd": ("/?api-version=2020-09-01", 404),
    "tpmd": ("/?api-version=2020-09-01", 404),
}


class Failure(Exception):
    """What failed and what to do, as the one line aziotctl prints before exiting 1."""


def under_systemd(layout: Layout) -> bool:
    """systemd runs this machine and the layout is the machine's own."""
    return SYSTEMD_RUN_DIR.is_dir() and not layout.rooted


def run(args: argparse.Namespace, layout: Layout) -> int:
    command, out = args.system_command, sys.stdout
    systemd = under_systemd(layout)
    try:
        if command == "reprovision":
            return reprovision(layout, out)
        if command == "set-log-level":
            return set_log_level(layout, args.level, systemd, out)
        if command == "logs":
            return systemd_logs(args.journalctl_args, out) if systemd else logs_without_systemd()
        if command == "restart":
            return systemd_restart(out) if systemd else restart_without_systemd(layout)
        if command == "stop":
            return systemd_stop(out) if systemd else stop(layout, out)
        return systemd_status(out) if systemd else status(layout, out)
    except Failure as failure:
        out.flush()
        print(failure, file=sys.stderr)
        return 1


def restart_services(layout: Layout, out: TextIO) -> int:
    """After `config apply`: restart aziotd under systemd, else say what to restart."""
    if under_systemd(layout):
        try:
            return systemd_restart(out)
        except Failure as failure:
            out.flush()
            print(failure, file=sys.stderr)
            return 1
    if layout.rooted:
        print(
            f"Configs written under {layout.root}; systemd is left alone with --root. Restart "
            f"aziotd there ({SERVICE_UNIT}, or however it is run) to pick up the new configs.",
            file=out,
        )
    else:
        print(
            "No systemd here: restart aziotd (the one process serving keyd, certd, identityd "
            "and tpmd) the way it was started, to pick up the new configs.",
            file=out,
        )
    pid, _ = find_aziotd(layout)
    if pid is not None:
        print(
            f"aziotd is running (pid {pid}, per {layout.pid_file}): it must be restarted to "
            "pick up the new configs.",
            file=out,
        )
    return 0


# -- finding aziotd without systemd ------------------------------------------------------------


def is_aziotd(pid: int) -> bool:
    """Whether `pid` is a live aziotd (a zombie has an empty command line, so it is not)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:  # hidepid: it exists; trust the pid file
        return True
    return any(
        Path(arg.decode(errors="replace")).name == "aziotd" or arg == b"aziot.supervisor.main"
        for arg in argv
    )


def find_aziotd(layout: Layout) -> tuple[int | None, str]:
    """aziotd's pid per its pid file, or None and why not."""
    path = layout.pid_file
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None, f"no pid file at {path}"
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read {path}: {error}"
    if not text.isdecimal():
        return None, f"{path} holds {text[:40]!r}, not a pid"
    pid = int(text)
    if not is_aziotd(pid):
        return None, f"{path} names pid {pid}, which is not a running aziotd (stale pid file)"
    return pid, ""


def send(pid: int, signum: signal.Signals) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise Failure(f"aziotd (pid {pid}) exited before it got {signum.name}") from None
    except PermissionError:
        raise Failure(
            f"not allowed to send {signum.name} to aziotd (pid {pid}); run as root (sudo)"
        ) from None


def write_atomically(path: Path, text: str) -> None:
    """`text` in `path` (mode 0644) through a temp file: a reader never sees half of it."""
    try:
        replace_text(path, text)
    except OSError as error:
        hint = "; run as root (sudo)" if isinstance(error, PermissionError) else ""
        raise Failure(f"cannot write {path}: {error.strerror or error}{hint}") from None


# -- without systemd ---------------------------------------------------------------------------


def probe(socket: Path, service: str) -> tuple[bool, str]:
    """Whether `socket` answers HTTP, and what to show for it."""
    path, expected = PROBES[service]
    try:
        reply = uds.request(socket, "GET", path, timeout=PROBE_TIMEOUT)
    except uds.UdsError as error:
        return False, f"not answering: {error.cause}"
    if reply.status != expected:
        return True, f"answering (HTTP {reply.status}: {reply.message})"
    if service == "identityd":
        try:
            provisioning = reply.json()
            source = provisioning.get("source", "?")
            auth = provisioning.get("auth")
        except (ValueError, AttributeError):
            return True, "answering"
        return True, f"answering; provisioning: {source}" + (f" ({auth})" if auth else "")
    return True, "answering"


def status(layout: Layout, out: TextIO) -> int:
    pid, why_not = find_aziotd(layout)
    if pid is None:
        print(f"aziotd: not running ({why_not})", file=out)
        raise Failure(
            "aziotd is not running; start it (see README, 'Running it for real') and check "
            "its log on its stderr"
        )
    print(f"aziotd: running (pid {pid})", file=out)
    print(f"Sockets in {layout.socket_dir}:", file=out)
    silent = []
    present = 0
    for service in SERVICES:
        socket = layout.socket(service)
        if not socket.exists():
            print(f"    {service:12}no socket (not configured, or not ready yet)", file=out)
            continue
        present += 1
        answering, shown = probe(socket, service)
        print(f"    {service:12}{shown}", file=out)
        if not answering:
            silent.append(service)
    print("Use 'aziotctl check' to diagnose connectivity and configuration issues.", file=out)
    if silent:
        raise Failure(f"{', '.join(silent)} not answering on {layout.socket_dir}; see aziotd's log")
    if not present:
        raise Failure(f"aziotd serves no socket in {layout.socket_dir}; see aziotd's log")
    return 0


def stop(layout: Layout, out: TextIO) -> int:
    pid, why_not = find_aziotd(layout)
    if pid is None:
        print(f"aziotd is not running ({why_not}).", file=out)
        return 0
    print(f"Stopping aziotd (pid {pid})...", end="", file=out, flush=True)
    send(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while is_aziotd(pid):
        if time.monotonic() > deadline:
            print(file=out)
            raise Failure(
                f"aziotd (pid {pid}) is still running {STOP_TIMEOUT:g} s after SIGTERM; "
                "see its log, or end it with SIGKILL"
            )
        time.sleep(0.05)
    print("Stopped!", file=out)
    return 0


def restart_without_systemd(layout: Layout) -> int:
    pid, _ = find_aziotd(layout)
    running = f" (it runs now as pid {pid})" if pid is not None else ""
    raise Failure(
        f"No systemd here: aziotd{running} must be restarted by whatever started it "
        "(the container's entrypoint or process manager); 'aziotctl system stop' stops it"
    )


def logs_without_systemd() -> int:
    raise Failure(
        "No systemd journal here: aziotd logs to its stderr, so read it where whatever "
        "started aziotd keeps it (e.g. 'docker logs <container>')"
    )


# -- under systemd -----------------------------------------------------------------------------


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise Failure("systemctl is not installed, though /run/systemd/system exists") from None


def show_command_error(result: subprocess.CompletedProcess[str]) -> None:
    print("systemctl exited with non-zero status code.", file=sys.stderr)
    print(f"stdout:\n=======\n{result.stdout}stderr:\n=======\n{result.stderr}", file=sys.stderr)


def systemctl_each(verb: str, units: list[str], out: TextIO) -> list[str]:
    """`systemctl <verb> <unit>` for each unit in turn, as the original prints it; the failed."""
    failed = []
    doing, done = {"start": ("Starting", "Started!"), "stop": ("Stopping", "Stopped!")}[verb]
    for unit in units:
        print(f"{doing} {unit}...", end="", file=out, flush=True)
        result = systemctl(verb, unit)
        if result.returncode == 0:
            print(done, file=out)
        else:
            print(file=out, flush=True)
            show_command_error(result)
            failed.append(unit)
    return failed


def systemd_stop(out: TextIO) -> int:
    if systemctl_each("stop", [SERVICE_UNIT], out):
        raise Failure(f"could not stop {SERVICE_UNIT}; see 'journalctl -u {SERVICE_UNIT}'")
    return 0


def systemd_restart(out: TextIO) -> int:
    failed = systemctl_each("stop", [SERVICE_UNIT], out)
    failed += systemctl_each("start", [*SOCKET_UNITS.values(), SERVICE_UNIT], out)
    if failed:
        raise Failure(f"could not restart {', '.join(failed)}; see 'aziotctl system status'")
    return 0


def unit_state(unit: str) -> str:
    """`active`, `inactive`, or what else systemctl said."""
    result = systemctl("is-active", unit)
    state = result.stdout.strip()
    if state in ("active", "inactive"):
        return state
    return f"{state} {result.stderr.strip()}".strip()


def journal_tail(unit: str, out: TextIO) -> None:
    out.flush()
    try:
        subprocess.run(["journalctl", "-u", unit, "--no-pager", "-e", "-n", "10"], check=False)
    except FileNotFoundError:
        print("(journalctl is not installed)", file=out)
    print(file=out)


def status_row(service: str, socket: str) -> str:
    """The original's table entry for one service: aziotd's unit state with that service's
    socket's. A socket that is down is shown even while aziotd waits for its first connection
    (the original shows `Ready` then, though nothing can connect)."""
    if service not in ("active", "inactive"):
        return f"Down - {service}"
    if socket != "active":
        return "Down - socket error"
    return "Running" if service == "active" else "Ready"  # inactive: socket-activated


def systemd_status(out: TextIO) -> int:
    service = unit_state(SERVICE_UNIT)
    sockets = {name: unit_state(unit) for name, unit in SOCKET_UNITS.items()}
    print("System services:", file=out)
    down = []
    for name in SERVICES:
        shown = status_row(service, sockets[name])
        if shown.startswith("Down"):
            down.append(f"aziot-{name}")
        print(f"    {'aziot-' + name:24}{shown}", file=out)
    print(file=out)
    if service not in ("active", "inactive"):
        print(f"{SERVICE_UNIT}: Down - {service}: Printing the last 10 log lines.", file=out)
        journal_tail(SERVICE_UNIT, out)
    for name, state in sockets.items():
        if state != "active":
            shown = "Down - inactive" if state == "inactive" else f"Down - {state}"
            print(f"{SOCKET_UNITS[name]}: {shown}: Printing the last 10 log lines.", file=out)
            journal_tail(SOCKET_UNITS[name], out)
    print("Use 'aziotctl system logs' to check for non-fatal errors.", file=out)
    print("Use 'aziotctl check' to diagnose connectivity and configuration issues.", file=out)
    if down:
        raise Failure(f"{', '.join(down)} down; see the log lines above")
    return 0


def systemd_logs(extra: list[str], out: TextIO) -> int:
    if extra[:1] == ["--"]:
        extra = extra[1:]
    out.flush()
    try:
        return subprocess.run(
            ["journalctl", "-u", SERVICE_UNIT, *(extra or ["-e", "--no-pager"])], check=False
        ).returncode
    except FileNotFoundError:
        raise Failure("journalctl is not installed") from None


def systemd_main_pid() -> tuple[int | None, str]:
    """aziotd's pid and its unit's ActiveState (`active`, `activating`, ...)."""
    result = systemctl("show", "--property", "MainPID", "--property", "ActiveState", SERVICE_UNIT)
    fields = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    text = fields.get("MainPID", "")
    pid = int(text) if result.returncode == 0 and text.isdecimal() and text != "0" else None
    return pid, fields.get("ActiveState", "")


def write_log_level_dropin(units_dir: Path, level: str) -> list[Path]:
    """`[Service]` + `Environment=AZIOT_LOG=<LEVEL>` for aziotd.service, as the original writes
    it for each of its services (the level upper-cased, as Rust's log::Level prints it). A
    drop-in the original left under one of the aliased names is rewritten too: systemd reads an
    alias's drop-ins for the unit, and an old level there must not contradict the new one."""
    text = f"[Service]\nEnvironment=AZIOT_LOG={level.upper()}\n"
    paths = [units_dir / f"{SERVICE_UNIT}.d" / "log-level.conf"]
    paths += [
        path
        for path in (units_dir / f"{alias}.d" / "log-level.conf" for alias in ALIASES)
        if path.exists()
    ]
    for path in paths:
        write_atomically(path, text)
    return paths


def apply_log_level_now(layout: Layout, pid: int, level: str) -> Path:
    """The runtime level file, then SIGHUP: aziotd reads it and logs old → new."""
    path = layout.socket_dir / LOG_LEVEL_FILE
    write_atomically(path, f"{level}\n")
    send(pid, signal.SIGHUP)
    return path


def set_log_level(layout: Layout, level: str, systemd: bool, out: TextIO) -> int:
    if level not in LEVELS:
        raise Failure(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    if systemd:
        write_log_level_dropin(layout.systemd_units, level)
        result = systemctl("daemon-reload")
        if result.returncode != 0:
            show_command_error(result)
            raise Failure("systemctl daemon-reload failed; the drop-in applies at the next boot")
        pid, state = systemd_main_pid()
        if pid is not None and state == "activating":
            # Still starting (maybe still importing, when a signal would kill it): the file
            # alone, which aziotd applies as soon as it listens for signals.
            write_atomically(layout.socket_dir / LOG_LEVEL_FILE, f"{level}\n")
            print(
                f"Set log level to {level.upper()} for all services; aziotd (pid {pid}) is "
                "starting and applies it once started.",
                file=out,
            )
            return 0
        if pid is None:
            print(
                f"Set log level to {level.upper()} for all services; aziotd applies it when it "
                "next starts.",
                file=out,
            )
            return 0
        apply_log_level_now(layout, pid, level)
        print(
            f"Set log level to {level.upper()} for all services; aziotd (pid {pid}) applies it "
            "now, no restart needed.",
            file=out,
        )
        return 0
    pid, why_not = find_aziotd(layout)
    if pid is None:
        raise Failure(
            f"aziotd is not running ({why_not}); to start it at this level set "
            f"AZIOT_LOG={level} in its environment"
        )
    path = apply_log_level_now(layout, pid, level)
    print(
        f"Set log level to {level} through {path}; aziotd (pid {pid}) applies it now. It lasts "
        f"until aziotd restarts: to keep it, set AZIOT_LOG={level} in aziotd's environment.",
        file=out,
    )
    return 0


# -- both --------------------------------------------------------------------------------------


def reprovision(layout: Layout, out: TextIO) -> int:
    socket = layout.socket("identityd")
    try:
        reply = uds.request(
            socket, "POST", REPROVISION_PATH, {"type": "aziot"}, timeout=REPROVISION_TIMEOUT
        )
    except uds.UdsError as error:
        raise Failure(
            f"Failed to reprovision: {error}; is aziotd running with identityd? "
            "See 'aziotctl system status'"
        ) from None
    if reply.status != 204:
        raise Failure(f"Failed to reprovision: HTTP {reply.status}: {reply.message}")
    print("Successfully reprovisioned with IoT Hub.", file=out)
    return 0
