"""Host checks: the installed version is the expected one, and the clock agrees with NTP."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import httpx

from aziot.supervisor.version import package_version

from .context import Context
from .network import Timeout, bounded, split_host_port
from .outcome import IGNORED, OK, Outcome, failed, warning

LATEST_VERSIONS_URL = "https://aka.ms/azure-iotedge-latest-versions"
# There may be no internet (or no DNS) on a device: a few seconds, then a warning.
VERSION_FETCH_SECONDS = 5.0
NTP_SECONDS = 3.0
MAX_CLOCK_OFFSET_SECONDS = 10
NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01


def _latest_versions(proxy: str | None) -> Any:
    with httpx.Client(
        follow_redirects=True, timeout=VERSION_FETCH_SECONDS, proxy=proxy or None
    ) as client:
        response = client.get(LATEST_VERSIONS_URL)
        response.raise_for_status()
        return response.json()


def _same_minor(latest: Any, actual: str) -> str | None:
    major_minor = actual.split(".")[:2]
    for channel in latest.get("channels", []):
        for product in channel.get("products", []):
            if product.get("id") != "aziot-edge":
                continue
            for component in product.get("components", []):
                version = component.get("version", "")
                if (
                    component.get("name") == "aziot-identity-service"
                    and version.split(".")[:2] == major_minor
                ):
                    return str(version)
    return None


def aziot_version(ctx: Context, info: dict[str, Any]) -> Outcome:
    actual = package_version()
    expected = ctx.options.expected_aziot_version
    if expected is None:
        if ctx.need_identityd().provisioning.local_gateway_hostname is not None:
            # A nested device may not reach aka.ms at all; without an expected version there is
            # nothing to compare with.
            return IGNORED
        try:
            latest = bounded(
                VERSION_FETCH_SECONDS + 1, lambda: _latest_versions(ctx.options.proxy_uri)
            )
        except (Timeout, httpx.HTTPError, OSError, ValueError) as error:
            return warning(
                f"Could not fetch the latest versions from {LATEST_VERSIONS_URL}: {error}",
                "Pass --expected-aziot-version to compare with a known version instead.",
            )
        if not isinstance(latest, dict):
            return failed(f"{LATEST_VERSIONS_URL} did not return a JSON object")
        found = _same_minor(latest, actual)
        if found is None:
            major_minor = ".".join(actual.split(".")[:2])
            return warning(
                f"could not find aziot-identity-service version {major_minor}.x in list of "
                f"supported products at {LATEST_VERSIONS_URL}"
            )
        expected = found
    info["expected_version"] = expected
    info["actual_version"] = actual
    if expected != actual:
        return warning(
            f"Installed aziot-identity-service package has version {actual} but {expected} is "
            "the latest stable version available.\n"
            "Please see https://aka.ms/aziot-update-runtime for update instructions."
        )
    return OK


def _ntp_time(value: bytes) -> float:
    seconds, fraction = struct.unpack("!II", value)
    return seconds - NTP_EPOCH_OFFSET + fraction / 2**32


def sntp_offset(server: str, seconds: float = NTP_SECONDS) -> float:
    """The local clock's offset from `server` ("host:port"), in seconds (positive: we are
    behind). Raises OSError, Timeout or ValueError."""
    host, port = split_host_port(server, 123)

    def query() -> float:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(address[0], socket.SOCK_DGRAM) as sock:
            sock.settimeout(seconds)
            sock.connect(address[4])
            # LI 0, version 3, mode 3 (client); the rest zero.
            request = b"\x1b" + bytes(47)
            sent = time.time()
            sock.send(request)
            reply = sock.recv(512)
            received = time.time()
        if len(reply) < 48:
            raise ValueError(f"short SNTP reply ({len(reply)} bytes)")
        if reply[0] & 0x07 not in (4, 5):
            raise ValueError("SNTP reply is not in server mode")
        server_received = _ntp_time(reply[32:40])
        server_sent = _ntp_time(reply[40:48])
        return ((server_received - sent) + (server_sent - received)) / 2

    return bounded(seconds + 1, query)


def host_local_time(ctx: Context, info: dict[str, Any]) -> Outcome:
    try:
        offset = sntp_offset(ctx.options.ntp_server)
    except (OSError, Timeout) as error:
        return warning(f"Could not query NTP server {ctx.options.ntp_server}: {error}")
    except ValueError as error:
        return failed(f"Could not query NTP server {ctx.options.ntp_server}: {error}")
    info["offset"] = int(abs(offset))
    if abs(offset) >= MAX_CLOCK_OFFSET_SECONDS:
        return warning(
            "Time on the device is out of sync with the NTP server. This may cause problems "
            "connecting to IoT Hub.\n"
            "Please ensure time on device is accurate, for example by installing an NTP daemon.",
            f"the local clock is off by {offset:+.1f} s",
        )
    return OK
