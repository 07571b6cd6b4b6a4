"""The certs actor's protocol: its requests, their replies, one declaration per operation.

PEM travels as text, exactly the bytes the caller gave or the store holds (an import is kept
as-is, as the original keeps it). Who asks travels in the bus envelope.
"""

from __future__ import annotations

import attrs

from aziot.bus.protocol import Nothing, Operation, Protocol


@attrs.frozen
class Issuer:
    cert_id: str
    key_handle: str


@attrs.frozen
class CreateCert:
    cert_id: str
    csr: str  # PEM
    issuer: Issuer | None = None


@attrs.frozen
class ImportCert:
    cert_id: str
    pem: str


@attrs.frozen
class GetCert:
    cert_id: str


@attrs.frozen
class DeleteCert:
    cert_id: str


@attrs.frozen
class Reload:
    """Read the config files again: issuance, preloaded certs, principals, renewals."""


@attrs.frozen
class Pem:
    pem: str


class Certs(Protocol):
    """The certs actor's operations; `CertsActor` has a method of each name."""

    actor = "certs"
    create_cert = Operation(CreateCert, Pem)
    import_cert = Operation(ImportCert, Pem)
    get_cert = Operation(GetCert, Pem)
    delete_cert = Operation(DeleteCert, Nothing)
    reload = Operation(Reload, Nothing)
