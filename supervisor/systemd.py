"""The two pieces of systemd a daemon needs: readiness and socket activation, without libsystemd."""

from __future__ import annotations

import fcntl
import logging
import os
import socket

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as error:
            log.warning("could not notify systemd at %s: %s", environ["NOTIFY_SOCKET"], error)
            return False
    return True


def listen_fds(environ: dict[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed us, as (name, socket); empty unless they are for this pid.

    Like `sd_listen_fds(1)`, the variables are removed so that children do not inherit them.
    """
    environ = os.environ if environ is None else environ
    try:
        if int(environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(variable, None)
    sockets = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX:
            log.warning("ignoring inherited fd %d: not a Unix socket", fd)
            sock.detach()
            continue
        sockets.append((names[index] if index < len(names) else "", sock))
    return sockets


def pick_activated(
    service: str, activated: list[tuple[str, socket.socket]], running: int
) -> socket.socket | None:
    """The inherited socket for `service`: matched by name (e.g. "aziot-keyd.socket"), or the
    only one when systemd passed exactly one and this process runs exactly one service."""
    for name, sock in activated:
        if service in name:
            return sock
    if len(activated) == 1 and running == 1:
        return activated[0][1]
    return None


def unclaimed(activated: list[tuple[str, socket.socket]], services: list[str]) -> list[str]:
    """Names of the inherited sockets no configured service takes. systemd keeps listening on
    them, so their clients wait unanswered: worth a warning at start."""
    if len(activated) == 1 and len(services) == 1:
        return []
    return [name for name, _ in activated if not any(service in name for service in services)]
