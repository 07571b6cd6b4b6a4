"""The TPM worker's protocol: tpmd's three operations (spec/api.md §6).

This module imports nothing of tpm2-pytss: identityd's client of tpmd can use it whether or
not a TPM is configured.
"""

from __future__ import annotations

import attrs

from aziot.bus.protocol import Nothing, Operation, Protocol


@attrs.frozen
class TpmKeys:
    """Marshalled TPM2B_PUBLIC structures of the endorsement and storage root keys."""

    endorsement_key: bytes
    storage_root_key: bytes


@attrs.frozen
class ImportAuthKey:
    """The five marshalled TPM2B structures DPS sends as `authenticationKey` (decoded)."""

    key: bytes


@attrs.frozen
class SignWithAuthKey:
    data: bytes


@attrs.frozen
class Digest:
    """HMAC-SHA256 of the data with the auth key, computed inside the TPM."""

    digest: bytes


class Tpm(Protocol):
    actor = "tpm"
    get_tpm_keys = Operation(Nothing, TpmKeys)
    import_auth_key = Operation(ImportAuthKey, Nothing)
    sign_with_auth_key = Operation(SignWithAuthKey, Digest)
