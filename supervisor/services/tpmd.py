"""tpmd, the TPM Service: its config, its actor (the TPM worker), its routes.

tpm2-pytss is imported only when tpmd is configured (the worker's module imports it), so a
device without a TPM does not load tss2 at all. The worker's library thread is made once and
kept across restarts of the actor: a second ESAPI context on the same TPM is what the one
thread avoids. tpmd has nothing to reload: a changed config takes a restart, as the original.
"""

from __future__ import annotations

import logging
from typing import Any

from aziot.api.tpmd import TpmdApi
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.config.loader import ServicePaths
from aziot.config.tpmd import load_tpmd

from .service import ActorSpec, Service, socket_path

log = logging.getLogger(__name__)


def tpmd(paths: ServicePaths, bus: Bus, faults: Faults, environ: dict[str, str]) -> Service:
    config = load_tpmd(paths)
    threads: list[Any] = []  # the one library thread, kept across worker restarts

    async def start_tpm() -> Any:
        from aziot.actors.tpm.device import TpmSettings
        from aziot.actors.tpm.worker import TpmThread, TpmWorker

        if not threads:
            settings = TpmSettings(
                tcti=config.tcti,
                auth_key_handle=config.auth_key_handle,
                endorsement_auth=config.hierarchy_authorization.endorsement,
                owner_auth=config.hierarchy_authorization.owner,
            )
            threads.append(TpmThread(settings, faults))
        return TpmWorker(threads[0])

    async def reload(bus: Bus) -> None:
        log.info("tpmd: nothing to reload; a changed tpmd config takes effect at restart")

    return Service(
        name="tpmd",
        paths=paths,
        socket=socket_path("tpmd", config.endpoints.aziot_tpmd, environ),
        max_connections=config.max_requests,
        actors=[ActorSpec("tpm", start_tpm)],
        app=TpmdApi(bus).app(),
        reload=reload,
    )
