"""The identity actor's cloud calls, each in a worker thread: DPS registration and the hub's
module identities over the synchronous clients of `dps` and `hub`.

A request signed with a keyd key asks keyd from the worker thread (`trio.from_thread.run`), so
the trio loop stays free to answer it. Failures become `CloudFailed` with the service's name,
its message as the cause, and whether the cloud could not be reached (offline operation).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from aziot.actors.remote_key import PrivateOp, client_context
from aziot.bus.faults import Faults

from .cloud import CloudClient, CloudError
from .dps import NO_PAYLOAD, DpsClient
from .hub import HubClient, Module, sas_authentication
from .state import DeviceInfo

T = TypeVar("T")
Sign = Callable[[bytes], bytes]


@attrs.frozen
class Credentials:
    """How the device proves itself to DPS and the hub: SAS tokens signed by `sign` (keyd's
    HMAC with its key), or a TLS client cert (`chain`, PEM) whose key signs by `private_op`."""

    sign: Sign | None = None
    chain: bytes | None = None
    private_op: PrivateOp | None = None


class CloudFailed(Exception):
    """A DPS or hub request failed; `network` when the cloud could not be reached;
    `throttled` (with its Retry-After, if any) when it answered 429."""

    def __init__(
        self,
        service: str,
        cause: str,
        network: bool,
        status: int | None = None,
        *,
        throttled: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(cause)
        self.service = service
        self.cause = cause
        self.network = network
        self.status = status
        self.throttled = throttled
        self.retry_after = retry_after


def read_payload(provisioning: Any) -> Any:
    """The configured payload file's JSON (None when it holds `null`), or `NO_PAYLOAD`."""
    payload = getattr(provisioning.kind, "payload", None)
    if payload is None:
        return NO_PAYLOAD
    return json.loads(payload.path.read_text(encoding="utf-8"))


class Cloud:
    """What the identity actor asks of DPS and the hub."""

    def __init__(
        self,
        config: Any,
        faults: Faults,
    ) -> None:
        self.config = config
        self._faults = faults
        self._threads = trio.CapacityLimiter(4)

    async def _run(
        self,
        service: str,
        work: Callable[[CloudClient], T],
        creds: Credentials,
        *,
        wait_throttled: bool = True,
    ) -> T:
        def call() -> T:
            context = client_context(creds.chain, creds.private_op, ())
            with CloudClient(context, wait_throttled=wait_throttled) as client:
                return work(client)

        await self._faults.hit("identity.cloud")
        try:
            return await trio.to_thread.run_sync(call, limiter=self._threads)
        except CloudError as error:
            raise CloudFailed(
                service,
                error.message,
                error.network,
                error.status,
                throttled=error.throttled,
                retry_after=error.retry_after,
            ) from None

    # -- DPS ---------------------------------------------------------------------------------

    def _dps(self, client: CloudClient, registration_id: str) -> DpsClient:
        dps = self.config.provisioning.kind
        return DpsClient(
            client,
            scope_id=dps.scope_id,
            registration_id=registration_id,
            endpoint=dps.global_endpoint,
            timeout=self.config.cloud_timeout_sec,
            retries=self.config.cloud_retries,
        )

    async def register(
        self, creds: Credentials, registration_id: str
    ) -> tuple[DeviceInfo, bytes | None]:
        """The assignment, and the TPM auth key DPS sent with it, if any."""
        payload = await trio.to_thread.run_sync(read_payload, self.config.provisioning)

        def work(client: CloudClient) -> tuple[DeviceInfo, bytes | None]:
            registration = self._dps(client, registration_id)
            assigned = registration.register(creds.sign, payload=payload)
            # DPS never assigns a nested device: its gateway is the hub itself.
            info = DeviceInfo(assigned.assigned_hub, assigned.assigned_hub, assigned.device_id)
            return info, assigned.authentication_key

        return await self._run("DPS", work, creds)

    async def tpm_challenge(
        self, registration_id: str, endorsement_key: bytes, storage_root_key: bytes
    ) -> bytes:
        """TPM attestation's first step: DPS answers the EK and SRK with an auth key blob
        only this TPM can import (spec/provisioning.md §8.4)."""
        payload = await trio.to_thread.run_sync(read_payload, self.config.provisioning)

        def work(client: CloudClient) -> bytes:
            registration = self._dps(client, registration_id)
            return registration.tpm_challenge(endorsement_key, storage_root_key, payload=payload)

        return await self._run("DPS", work, Credentials())

    # -- the hub -----------------------------------------------------------------------------

    def _hub(self, client: CloudClient, device: DeviceInfo, creds: Credentials) -> HubClient:
        return HubClient(
            client,
            iothub_hostname=device.hub_name,
            device_id=device.device_id,
            sign=creds.sign,
            local_gateway_hostname=device.local_gateway_hostname,
            timeout=self.config.cloud_timeout_sec,
            retries=self.config.cloud_retries,
        )

    async def list_modules(self, device: DeviceInfo, creds: Credentials) -> list[dict[str, Any]]:
        def work(client: CloudClient) -> list[dict[str, Any]]:
            return [m.to_json() for m in self._hub(client, device, creds).list_modules()]

        return await self._run("Hub", work, creds)

    async def get_module(
        self,
        device: DeviceInfo,
        module_id: str,
        creds: Credentials,
        *,
        wait_throttled: bool = True,
    ) -> dict[str, Any]:
        """The hub's module; with `wait_throttled=False` a 429 fails at once (`throttled`)."""

        def work(client: CloudClient) -> dict[str, Any]:
            return self._hub(client, device, creds).get_module(module_id).to_json()

        return await self._run("Hub", work, creds, wait_throttled=wait_throttled)

    async def create_module(
        self, device: DeviceInfo, module_id: str, creds: Credentials
    ) -> dict[str, Any]:
        def work(client: CloudClient) -> dict[str, Any]:
            return self._hub(client, device, creds).create_module(module_id).to_json()

        return await self._run("Hub", work, creds)

    async def update_module(
        self,
        device: DeviceInfo,
        module: dict[str, Any],
        primary: bytes,
        secondary: bytes,
        creds: Credentials,
    ) -> dict[str, Any]:
        current = Module.from_json(module)

        def work(client: CloudClient) -> dict[str, Any]:
            hub = self._hub(client, device, creds)
            authentication = sas_authentication(primary, secondary)
            return hub.update_module(current.module_id, authentication).to_json()

        return await self._run("Hub", work, creds)

    async def delete_module(self, device: DeviceInfo, module_id: str, creds: Credentials) -> None:
        def work(client: CloudClient) -> None:
            self._hub(client, device, creds).delete_module(module_id)

        await self._run("Hub", work, creds)
