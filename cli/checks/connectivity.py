"""Connectivity checks: a TLS handshake with the IoT Hub's AMQP, HTTPS and MQTT ports and with
the DPS endpoint, bounded by identityd's cloud_timeout_sec; HTTPS and DPS go through
--proxy-uri when it is given, as the services' own HTTPS calls would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli

from aziot.config.identityd import Dps, Manual, NoProvisioning

from .context import Context
from .network import Timeout, tls_handshake
from .outcome import IGNORED, OK, Outcome, failed, warning

NESTED_HINT = (
    "Make sure the parent device is reachable using 'curl https://parenthostname'. Make sure "
    "the trust bundle has been added to the trusted store: "
    "sudo cp <path>/azure-iot-test-only.root.ca.cert.pem "
    "/usr/local/share/ca-certificates/azure-iot-test-only.root.ca.cert.pem.crt && "
    "sudo update-ca-certificates"
)


def _hub_hostname(ctx: Context) -> tuple[str, bool] | Outcome:
    """(host, nested) to connect to, or the outcome when there is none."""
    if ctx.options.iothub_hostname:
        return ctx.options.iothub_hostname, False
    config = ctx.need_identityd()
    gateway = config.provisioning.local_gateway_hostname
    kind = config.provisioning.kind
    if isinstance(kind, Manual):
        return (gateway or kind.iothub_hostname), gateway is not None
    if isinstance(kind, NoProvisioning) or gateway is not None:
        return IGNORED  # nothing to reach, or nested DPS (not supported here, as the original)
    previous = ctx.identityd_prev
    if previous is not None and isinstance(previous.provisioning.kind, Manual):
        return previous.provisioning.kind.iothub_hostname, False
    assigned = _assigned_hub(config.homedir / "device_info")
    if assigned is not None:
        return assigned, False
    return warning(
        "Could not retrieve iothub_hostname from provisioning file.\n"
        "Please specify the backing IoT Hub name using --iothub-hostname switch if you have "
        "that information.\n"
        "Since no hostname is provided, all hub connectivity tests will be skipped."
    )


def _assigned_hub(path: Path) -> str | None:
    """The hub DPS assigned, from identityd's backup of its last provisioning (the original
    looks only at a manual prev_state, so after DPS it never knows the hub)."""
    try:
        with path.open("rb") as file:
            hub = tomli.load(file).get("hub_name")
    except (OSError, tomli.TOMLDecodeError):
        return None
    return hub if isinstance(hub, str) and hub else None


def _split_port(host: str, port: int) -> tuple[str, int] | None:
    """`host:port` names the one port a hub (a test hub, a gateway) serves: the HTTPS check
    uses it, the AMQP and MQTT checks have nothing to reach."""
    name, colon, explicit = host.rpartition(":")
    if not colon or not explicit.isdigit():
        return host, port
    return (name, int(explicit)) if port == 443 else None


def _handshake(host: str, port: int, proxy: str | None, seconds: float) -> Outcome | None:
    try:
        tls_handshake(host, port, proxy, seconds)
    except Timeout:
        return failed(
            f"Failed to do TLS Handshake, Connection Attempt Timed out in {seconds:g} Seconds",
            f"{host}:{port}" + (f" through proxy {proxy}" if proxy else ""),
        )
    except (OSError, ValueError) as error:
        return failed(
            f"Could not connect to {host}:{port} : could not complete TLS handshake"
            + (f" through proxy {proxy}" if proxy else ""),
            str(error),
        )
    return None


def _hub(port: int) -> Callable[[Context, dict[str, Any]], Outcome]:
    def check(ctx: Context, info: dict[str, Any]) -> Outcome:
        info["port_number"] = port
        found = _hub_hostname(ctx)
        if isinstance(found, Outcome):
            return found
        host, nested = found
        info["iothub_hostname"] = host
        target = _split_port(host, port)
        if target is None:
            return IGNORED
        host, target_port = target
        info["port_number"] = target_port
        proxy = ctx.options.proxy_uri if port == 443 else None
        info["proxy"] = proxy
        seconds = ctx.need_identityd().cloud_timeout_sec
        outcome = _handshake(host, target_port, proxy, seconds)
        if outcome is None:
            return OK
        if nested:
            return failed(outcome.message, *outcome.causes, NESTED_HINT)
        return outcome

    return check


host_connect_iothub_amqp = _hub(5671)
host_connect_iothub_https = _hub(443)
host_connect_iothub_mqtt = _hub(8883)


def host_connect_dps_endpoint(ctx: Context, info: dict[str, Any]) -> Outcome:
    config = ctx.need_identityd()
    kind = config.provisioning.kind
    if not isinstance(kind, Dps):
        return IGNORED
    info["dps_endpoint"] = kind.global_endpoint
    url = urlsplit(kind.global_endpoint)
    if not url.hostname:
        return failed("URL specified in provisioning.global_endpoint does not have a host")
    info["dps_hostname"] = url.hostname
    info["proxy"] = ctx.options.proxy_uri
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome = _handshake(url.hostname, port, ctx.options.proxy_uri, config.cloud_timeout_sec)
    return outcome or OK
