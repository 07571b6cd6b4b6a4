"""Whether each service answers on its socket (the sockets of `layout`, i.e. $AZIOT_SOCKET_DIR
or /run/aziot under the root)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from aziot.config.identityd import Dps, TpmAttestation

from .context import Context
from .outcome import IGNORED, OK, Outcome, failed

CONNECT_SECONDS = 5.0


def _uses_tpmd(ctx: Context) -> bool:
    config = ctx.identityd or ctx.identityd_prev
    if config is None:
        return True  # cannot tell: try it
    kind = config.provisioning.kind
    return isinstance(kind, Dps) and isinstance(kind.attestation, TpmAttestation)


def _running(service: str) -> Callable[[Context, dict[str, Any]], Outcome]:
    def check(ctx: Context, info: dict[str, Any]) -> Outcome:
        if service == "tpmd" and not _uses_tpmd(ctx):
            return IGNORED
        path = ctx.layout.socket(service)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONNECT_SECONDS)
            try:
                sock.connect(str(path))
            except OSError as error:
                return failed(
                    f"Could not connect to {service} on unix://{path}: {error.strerror or error}"
                )
        ctx.running[service] = True
        return OK

    return check


keyd_running = _running("keyd")
certd_running = _running("certd")
tpmd_running = _running("tpmd")
identityd_running = _running("identityd")
