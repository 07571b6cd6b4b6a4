"""`aziotd`: start every configured service in one process and keep it running.

Signals: TERM/INT stop accepting, let in-flight requests finish (bounded), exit 0; HUP applies
the runtime log level file (`aziotctl system set-log-level` writes it) and reloads each service's
principals from its config files. Once ready, the pid goes to `aziotd.pid` beside the sockets,
which is how `aziotctl system` finds the daemon where there is no systemd.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import trio

from aziot.api.server import UnixServer, bind_unix
from aziot.bus.bus import Bus
from aziot.bus.faults import POINTS, Faults
from aziot.bus.logtext import loggable
from aziot.config.loader import ConfigError

from . import log_levels, systemd
from .log_levels import LogLevels
from .runtime_files import LOG_LEVEL_FILE, PID_FILE, replace_text
from .services import Service, configured_services
from .services.service import DEFAULT_SOCKET_DIR
from .supervise import RestartLimitExceeded, RestartPolicy, supervise
from .version import package_version

log = logging.getLogger("aziotd")

EXIT_CONFIG = 78  # EX_CONFIG: systemd shows it as a configuration problem
EXIT_CRASHED = 70  # EX_SOFTWARE
MAX_LOG_MESSAGE = 4096  # characters of one log message; the rest is counted, not written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aziotd",
        description=(
            "IoT device identity daemon: serves the Keys, Certificates, Identity and TPM "
            "services over Unix sockets, wire-compatible with the Azure IoT Identity Service. "
            "A service starts when its config exists: its config.toml or a *.toml drop-in in "
            "its config.d (what `aziotctl config apply` writes)."
        ),
        epilog=(
            "environment: AZIOT_KEYD_CONFIG (default /etc/aziot/keyd/config.toml), "
            "AZIOT_KEYD_CONFIG_DIR (default /etc/aziot/keyd/config.d), AZIOT_CERTD_CONFIG "
            "(default /etc/aziot/certd/config.toml), AZIOT_CERTD_CONFIG_DIR (default "
            "/etc/aziot/certd/config.d), AZIOT_IDENTITYD_CONFIG (default "
            "/etc/aziot/identityd/config.toml), AZIOT_IDENTITYD_CONFIG_DIR, AZIOT_TPMD_CONFIG, "
            "AZIOT_TPMD_CONFIG_DIR (likewise), AZIOT_SOCKET_DIR "
            "(default /run/aziot), AZIOT_LOG (the original's: a level, or directives such as "
            "aziot=debug or info,aziot_keyd=trace), AZIOT_LOG_LEVEL (same syntax), AZIOTD_FAULTS "
            "(fault injection rules, see --list-fault-points). Log level precedence: --log-level, "
            "then AZIOT_LOG_LEVEL, then AZIOT_LOG, then info. On SIGHUP the level in "
            "<socket dir>/aziotd.log-level (written by `aziotctl system set-log-level`), if that "
            "file exists, replaces it; a restart goes back to the environment's. Once ready the "
            "pid is written to <socket dir>/aziotd.pid, removed at stop."
        ),
    )
    parser.add_argument("--version", action="version", version=f"aziotd {package_version()}")
    parser.add_argument(
        "--list-fault-points",
        action="store_true",
        help="print the fault-injection points and the AZIOTD_FAULTS syntax, then exit",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="error, warn, info, debug, trace, or AZIOT_LOG-style directives; overrides "
        "AZIOT_LOG_LEVEL and AZIOT_LOG",
    )
    return parser.parse_args(argv)


class OneLineFormatter(logging.Formatter):
    """Every message on one line and bounded: callers' ids and paths end up in messages, and a
    `\n` in one must not forge a second log line, nor a megabyte id flood the journal."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = loggable(record.message, MAX_LOG_MESSAGE)
        return super().formatMessage(record)


def setup_logging(levels: LogLevels) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler])
    levels.apply()
    for warning in levels.warnings:
        log.warning("%s", warning)


def socket_dir(environ: dict[str, str]) -> Path:
    """Where the sockets go without [endpoints], and the pid and log level files with them."""
    return Path(environ.get("AZIOT_SOCKET_DIR", DEFAULT_SOCKET_DIR))


def write_pid_file(path: Path) -> bool:
    """Our pid in `path`, atomically: a reader sees the old file or the whole new one."""
    try:
        replace_text(path, f"{os.getpid()}\n")
    except OSError as error:  # aziotctl then cannot find us without systemd; serving goes on
        log.warning("could not write the pid file %s: %s", path, error)
        return False
    return True


def remove_pid_file(path: Path) -> None:
    """Remove `path` if it still names us: a newer aziotd may have replaced it."""
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except (OSError, UnicodeDecodeError):
        pass


def clear_runtime_log_level(path: Path, started: float) -> None:
    """A level file left by an earlier aziotd (older than this process, `started` on the wall
    clock) was meant for that process: at start the environment's level holds. One written
    since, by a `set-log-level` while we started, is kept and applied once signals are heard."""
    try:
        if path.stat().st_mtime >= started:
            return
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove the stale log level file %s: %s", path, error)


def apply_runtime_log_level(path: Path, current: LogLevels) -> LogLevels:
    """The levels in `path` if it exists (applied, with one line old → new), else `current`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return current
    except (OSError, UnicodeDecodeError) as error:
        log.warning(
            "could not read the log level file %s, keeping %s: %s", path, current.text, error
        )
        return current
    new = log_levels.parse(text, str(path))
    for warning in new.warnings:
        log.warning("%s", warning)
    if new == current:
        log.info("log level stays %s", current.text)
        return current
    message = f"log level {current.text} → {new.text} (from {path})"
    # Said at info by whichever of the two levels lets it through.
    if new.level_of(log.name) > logging.INFO:
        log.info("%s", message)
        new.apply(current)
    else:
        new.apply(current)
        log.info("%s", message)
    return new


def print_fault_points() -> None:
    print("Fault points (set AZIOTD_FAULTS='POINT=ACTION[@PROBABILITY][*COUNT];...'):")
    for point, meaning in POINTS.items():
        print(f"  {point:24} {meaning}")
    print("Actions: error, hang, crash, delay=<seconds>. Example:")
    print("  AZIOTD_FAULTS='bus.deliver.keys=crash*1; store.fsync=delay=0.5@0.1'")


async def run_daemon(
    bus: Bus, services: list[Service], faults: Faults, launched: float, levels: LogLevels
) -> None:
    shutdown = trio.Event()
    run_dir = socket_dir(dict(os.environ))
    clear_runtime_log_level(run_dir / LOG_LEVEL_FILE, time.time() - (time.monotonic() - launched))
    activated = systemd.listen_fds()
    for name in systemd.unclaimed(activated, [service.name for service in services]):
        log.warning(
            "systemd passed the socket %r but no configured service serves it: its clients "
            "will wait unanswered; configure that service or disable its .socket unit",
            name,
        )
    policy = RestartPolicy()
    async with trio.open_nursery() as actors:
        for service in services:
            for spec in service.actors:
                await actors.start(supervise, bus, spec.name, spec.start, faults, policy)
        async with trio.open_nursery() as facades:

            async def serve(
                service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                sock = systemd.pick_activated(service.name, activated, len(services))
                origin = "systemd" if sock is not None else str(service.socket)
                if sock is None:
                    sock = bind_unix(service.socket)
                server = UnixServer(service.name, service.app, sock, service.max_connections)
                await facades.start(server.serve, shutdown)
                log.info(
                    "%s: listening on %s (max %d connections per uid)",
                    service.name,
                    origin,
                    service.max_connections,
                )
                task_status.started()

            async def serve_when_ready(service: Service) -> None:
                """Serve once the service is ready; a stop ends the wait (identityd offline
                with no backup may never be ready, and must not hold up the stop)."""
                assert service.ready is not None
                ready = service.ready
                became_ready = False
                async with trio.open_nursery() as waiting:

                    async def wait_ready() -> None:
                        nonlocal became_ready
                        await ready()
                        became_ready = True
                        waiting.cancel_scope.cancel()

                    async def wait_shutdown() -> None:
                        await shutdown.wait()
                        waiting.cancel_scope.cancel()

                    waiting.start_soon(wait_ready)
                    waiting.start_soon(wait_shutdown)
                if became_ready and not shutdown.is_set():
                    await serve(service)

            for service in services:
                if service.ready is None:
                    await facades.start(serve, service)
                else:
                    facades.start_soon(serve_when_ready, service)
            systemd.notify("READY=1")
            log.info(
                "ready in %.0f ms: %s",
                (time.monotonic() - launched) * 1000,
                ", ".join(s.name for s in services),
            )
            pid_file = run_dir / PID_FILE
            write_pid_file(pid_file)
            try:
                await handle_signals(bus, services, shutdown, run_dir / LOG_LEVEL_FILE, levels)
            finally:
                remove_pid_file(pid_file)
        actors.cancel_scope.cancel()
    log.info("stopped")


async def handle_signals(
    bus: Bus,
    services: list[Service],
    shutdown: trio.Event,
    level_file: Path,
    levels: LogLevels,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        if level_file.exists():  # written after our start, its SIGHUP ignored while starting
            levels = apply_runtime_log_level(level_file, levels)
        async for signum in signals:
            if signum == signal.SIGHUP:
                # The level first, so the reload below already logs at the new one.
                levels = apply_runtime_log_level(level_file, levels)
                for service in services:
                    log.debug("SIGHUP: %s reloads its config", service.name)
                    try:
                        await service.reload(bus)
                    except Exception as error:  # keep serving with what we had
                        log.error(
                            "%s: reload failed, keeping the old settings: %s", service.name, error
                        )
                continue
            log.info("%s: stopping", signal.Signals(signum).name)
            systemd.notify("STOPPING=1")
            shutdown.set()
            return


def first_leaf(error: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of one of `kinds` inside (possibly nested) exception groups."""
    if isinstance(error, kinds):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = first_leaf(inner, kinds)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    # Until handle_signals listens, SIGHUP's default would kill aziotd (see entry.py, which
    # does this before the imports); trio puts it back when its receiver closes, so a SIGHUP
    # while draining is ignored too.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    launched = time.monotonic()
    args = parse_args(argv)
    if args.list_fault_points:
        print_fault_points()
        return 0
    levels = log_levels.choose(args.log_level, dict(os.environ))
    setup_logging(levels)
    try:
        faults = Faults.from_spec(os.environ.get("AZIOTD_FAULTS"))
    except ValueError as error:
        log.error("AZIOTD_FAULTS: %s", error)
        return EXIT_CONFIG
    bus = Bus()
    try:
        services = configured_services(bus, faults)
    except ConfigError as error:
        log.error("configuration error: %s", error)
        return EXIT_CONFIG
    if not services:
        log.error(
            "no service is configured: set AZIOT_KEYD_CONFIG to a keyd config file "
            "(default /etc/aziot/keyd/config.toml), and AZIOT_CERTD_CONFIG for certd"
        )
        return EXIT_CONFIG
    try:
        trio.run(run_daemon, bus, services, faults, launched, levels)
    except BaseExceptionGroup as group:
        misconfigured = first_leaf(group, (ConfigError,))
        if misconfigured is not None:
            log.error("configuration error: %s", misconfigured)
            return EXIT_CONFIG
        fatal = first_leaf(group, (RestartLimitExceeded, OSError))
        if fatal is None:
            raise
        log.critical("exiting: %s", fatal)
        return EXIT_CRASHED
    return 0


if __name__ == "__main__":
    sys.exit(main())
