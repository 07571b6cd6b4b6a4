"""DPS and IoT Hub together, sharing one device registry, one server CA and one TLS client
trust store: what identityd's tests and the demo run.

    with Cloud(tmp_path / "cloud", assigning_polls=1) as cloud:
        enrollment = cloud.dps.add_symmetric_enrollment("my-device")
        # identityd: global_endpoint = cloud.dps_url, scope_id = cloud.id_scope,
        #            trust cloud.server_ca_pem_path
        ...
        cloud.hub.device("my-device")        # assigned by DPS, with the enrollment's keys
        cloud.hub.misbehave("throttle", count=1, seconds=5)

The hub's names are `localhost:<hub port>` (what DPS assigns) and `127.0.0.1:<hub port>` (where
the `switch_hub` misbehaviour moves a re-provisioned device); both reach the same server, which
keeps their devices apart. The DPS and the Hub listen on separate ports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from mockcloud.dps import DEFAULT_ID_SCOPE, DpsServer, TpmBlob, plain_auth_key
from mockcloud.https import Lifecycle
from mockcloud.hub import HubServer, Registry
from mockcloud.service import SeenRequest, TrustStore


class Cloud(Lifecycle):
    """A `DpsServer` (`dps`) assigning devices to a `HubServer` (`hub`). Files go in
    `directory`: `server-ca.pem` (the TLS trust anchor for both), the servers' certs, and any
    CA a `dps.add_x509_ca_group` makes."""

    def __init__(
        self,
        directory: Path | str,
        *,
        id_scope: str = DEFAULT_ID_SCOPE,
        host: str = "127.0.0.1",
        dps_port: int = 0,
        hub_port: int = 0,
        hub_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        assigning_polls: int = 0,
        payload_reply: Callable[[Any, str], Any] | None = None,
        tpm_blob: TpmBlob = plain_auth_key,
    ) -> None:
        self.directory = Path(directory)
        self.registry = Registry()
        self.trust = TrustStore()
        self.hub = HubServer(
            self.directory,
            host=host,
            port=hub_port,
            hub_hosts=hub_hosts,
            registry=self.registry,
            trust=self.trust,
        )
        self.dps = DpsServer(
            self.directory,
            id_scope=id_scope,
            host=host,
            port=dps_port,
            hubs=lambda: self.hub.hostnames,
            registry=self.registry,
            trust=self.trust,
            assigning_polls=assigning_polls,
            payload_reply=payload_reply,
            tpm_blob=tpm_blob,
        )
        self.server_ca_pem_path = self.dps.server_ca_pem_path

    def start(self) -> Self:
        self.hub.start()
        try:
            self.dps.start()
        except BaseException:
            self.hub.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.dps.stop()
        finally:
            self.hub.stop()

    @property
    def id_scope(self) -> str:
        return self.dps.id_scope

    @property
    def dps_url(self) -> str:
        """DPS `global_endpoint`."""
        return self.dps.url

    @property
    def hub_hostname(self) -> str:
        return self.hub.hostname

    @property
    def requests(self) -> list[SeenRequest]:
        """DPS requests, then Hub requests (each list oldest first)."""
        return self.dps.requests + self.hub.requests

    def behave(self) -> None:
        """Both servers stop every misbehaviour."""
        self.dps.behave()
        self.hub.behave()
