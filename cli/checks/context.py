"""What one `aziotctl check` run knows: its options, and what earlier checks found."""

from __future__ import annotations

from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from aziot.config.certd import CertdConfig
from aziot.config.identityd import IdentitydConfig
from aziot.config.keyd import KeydConfig
from aziot.config.tpmd import TpmdConfig

from ..layout import Layout
from .outcome import Skip


@attrs.frozen
class Options:
    ntp_server: str = "pool.ntp.org:123"
    verbose: bool = False
    iothub_hostname: str | None = None
    proxy_uri: str | None = None
    expected_aziot_version: str | None = None


@attrs.define
class Context:
    layout: Layout
    options: Options = attrs.field(factory=Options)
    # Filled by the *-config-well-formed checks; None when a config could not be read.
    keyd: KeydConfig | None = None
    certd: CertdConfig | None = None
    tpmd: TpmdConfig | None = None
    identityd: IdentitydConfig | None = None
    identityd_prev: IdentitydConfig | None = None
    # Filled by the *-running checks.
    running: dict[str, bool] = attrs.field(factory=dict)
    # Filled by certs-read and key-pairs-read, compared by certs-match-private-keys.
    certs: dict[str, x509.Certificate] = attrs.field(factory=dict)
    public_keys: dict[str, PublicKeyTypes] = attrs.field(factory=dict)
    cache: dict[str, Any] = attrs.field(factory=dict)

    def need_keyd(self) -> KeydConfig:
        if self.keyd is None:
            raise Skip
        return self.keyd

    def need_certd(self) -> CertdConfig:
        if self.certd is None:
            raise Skip
        return self.certd

    def need_identityd(self) -> IdentitydConfig:
        if self.identityd is None:
            raise Skip
        return self.identityd
