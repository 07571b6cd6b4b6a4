"""Every check with the original's id, description and section, in the original's order: later
checks use what earlier ones found (configs, running services, certs and keys read)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from . import certificates, configs, connectivity, host, keys, services
from .context import Context
from .outcome import Outcome

CheckFunction = Callable[[Context, dict[str, Any]], Outcome]

CONFIGURATION = "Configuration checks"
CONNECTIVITY = "Connectivity checks"


@attrs.frozen
class Check:
    id: str
    description: str
    section: str
    run: CheckFunction = attrs.field(eq=False, repr=False)


def _section(name: str, rows: list[tuple[str, str, CheckFunction]]) -> list[Check]:
    return [Check(check_id, description, name, run) for check_id, description, run in rows]


CHECKS: tuple[Check, ...] = (
    *_section(
        CONFIGURATION,
        [
            (
                "keyd-config-well-formed",
                "keyd configuration is well-formed",
                configs.keyd_config_well_formed,
            ),
            (
                "certd-config-well-formed",
                "certd configuration is well-formed",
                configs.certd_config_well_formed,
            ),
            (
                "tpmd-config-well-formed",
                "tpmd configuration is well-formed",
                configs.tpmd_config_well_formed,
            ),
            (
                "identityd-config-well-formed",
                "identityd configuration is well-formed",
                configs.identityd_config_well_formed,
            ),
            (
                "configs-up-to-date",
                "daemon configurations up-to-date with config.toml",
                configs.configs_up_to_date,
            ),
            ("hostname", "identityd config toml file specifies a valid hostname", configs.hostname),
            ("aziot-version", "aziot-identity-service package is up-to-date", host.aziot_version),
            ("host-local-time", "host time is close to reference time", host.host_local_time),
            (
                "identity-certificate-expiry",
                "production readiness: identity certificates expiry",
                certificates.identity_certificate_expiry,
            ),
            (
                "est-identity-and-bootstrap-certificate-expiry",
                "production readiness: EST identity and bootstrap certificates expiry",
                certificates.est_identity_and_bootstrap_certificate_expiry,
            ),
            (
                "local-ca-certificate-expiry",
                "production readiness: Local CA certificates expiry",
                certificates.local_ca_certificate_expiry,
            ),
            ("certs-preloaded", "preloaded certificates are valid", certificates.certs_preloaded),
            ("keyd-running", "keyd is running", services.keyd_running),
            ("certd-running", "certd is running", services.certd_running),
            ("tpmd-running", "tpmd is running", services.tpmd_running),
            ("identityd-running", "identityd is running", services.identityd_running),
            (
                "certs-read",
                "read all preloaded certificates from the Certificates Service",
                certificates.certs_read,
            ),
            (
                "key-pairs-read",
                "read all preloaded key pairs from the Keys Service",
                keys.key_pairs_read,
            ),
            (
                "est-server-https",
                "check all EST server URLs utilize HTTPS",
                certificates.est_server_https,
            ),
            (
                "certs-match-private-keys",
                "ensure all preloaded certificates match preloaded private keys with the same ID",
                keys.certs_match_private_keys,
            ),
        ],
    ),
    *_section(
        CONNECTIVITY,
        [
            (
                "host-connect-iothub-amqp",
                "host can connect to and perform TLS handshake with iothub AMQP port",
                connectivity.host_connect_iothub_amqp,
            ),
            (
                "host-connect-iothub-https",
                "host can connect to and perform TLS handshake with iothub HTTPS / WebSockets port",
                connectivity.host_connect_iothub_https,
            ),
            (
                "host-connect-iothub-mqtt",
                "host can connect to and perform TLS handshake with iothub MQTT port",
                connectivity.host_connect_iothub_mqtt,
            ),
            (
                "host-connect-dps-endpoint",
                "host can connect to and perform TLS handshake with DPS endpoint",
                connectivity.host_connect_dps_endpoint,
            ),
        ],
    ),
)

SECTIONS: tuple[str, ...] = (CONFIGURATION, CONNECTIVITY)


def by_section() -> list[tuple[str, list[Check]]]:
    return [(name, [c for c in CHECKS if c.section == name]) for name in SECTIONS]
