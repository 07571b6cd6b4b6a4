"""The identityd config: `hostname`, `homedir`, the cloud knobs, `[provisioning]`, `[[principal]]`,
`[localid]`, `[endpoints]` (spec/provisioning.md §4.1, spec/api.md §2.3 and §5.5, the original's
aziot-identityd-config with its `Settings::check`).

The original reads the file with serde and ignores every key it does not know, so a misspelt
`registraton_id` or a `connection_string` copied from the super-config is found only when
provisioning fails. Here a key that is unknown, misspelt or of the wrong type stops the start with
the file and the key named, and so do the refusals of `Settings::check` (unique principal names,
`local` needing `[localid]`, local identity options only with `local`, no module or device
identities without provisioning) and the original's runtime refusal of DPS in nested mode.

Key and cert ids (`device_id_pk`, `symmetric_key`, `identity_cert`, `identity_pk`) are ids in keyd
and certd, not key material: the super-config's inline keys and connection strings are turned
into them by `aziotctl config apply`. Renewal policy strings stay strings; the renewal engine
parses them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import attrs

from .certd import AutoRenew
from .loader import ServicePaths, type_name
from .table import Locator, Table, load_merged_source, locator

log = logging.getLogger(__name__)

U32_MAX = 2**32 - 1  # uids and cloud_retries are u32 in the original
DEFAULT_MAX_REQUESTS = 10
DEFAULT_CLOUD_TIMEOUT_SEC = 70
MIN_CLOUD_TIMEOUT_SEC = 70  # the original refuses less: "cloud_timeout_sec must be at least 70"
DEFAULT_CLOUD_RETRIES = 1
ID_TYPES = ("device", "module", "local")
LOCALID_TYPES = ("x509",)
LOCALID_ATTRIBUTES = ("client", "server")
ENDPOINT_SCHEMES = ("unix", "http", "fd")  # what the original's connector accepts
# Keys the original's own sample configs still carry from its previews; serde ignores them and so
# do we (with a warning), so a device whose config has them keeps starting.
LEGACY_TABLES = ("connect", "listen")


@attrs.frozen
class CsrSubject:
    """`"<CN>"` or `{ CN = "…", O = "…", … }`: the common name and the other names.

    Table keys are upper-cased as the original does, and `rest` is sorted by name: the original
    keeps them in a BTreeMap and appends them to the X.509 name in that order, after the CN.
    The original truncates the CN to 64 characters when it builds the name; that is the issuer's
    job, the value here is as written.
    """

    cn: str
    rest: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class ManualSas:
    METHOD: ClassVar[str] = "sas"
    device_id_pk: str  # keyd key id of the device's SAS key


@attrs.frozen
class ManualX509:
    METHOD: ClassVar[str] = "x509"
    identity_cert: str  # certd cert id
    identity_pk: str  # keyd key id
    # When the cert is issued, the original uses CN = device_id whatever is written here, keeping
    # only the other names of a table form.
    csr_subject: CsrSubject | None = None


@attrs.frozen
class Manual:
    SOURCE: ClassVar[str] = "manual"
    iothub_hostname: str
    device_id: str
    authentication: ManualSas | ManualX509


@attrs.frozen
class SymmetricKeyAttestation:
    METHOD: ClassVar[str] = "symmetric_key"
    registration_id: str
    symmetric_key: str  # keyd key id


@attrs.frozen
class X509Attestation:
    METHOD: ClassVar[str] = "x509"
    identity_cert: str
    identity_pk: str
    # Its CN is the registration id; without it the original uses the identity cert's subject.
    registration_id: CsrSubject | None = None
    # All three keys are required when the table is present (the original has no per-key default).
    identity_auto_renew: AutoRenew | None = None


@attrs.frozen
class TpmAttestation:
    METHOD: ClassVar[str] = "tpm"
    registration_id: str


@attrs.frozen
class Payload:
    """`payload = { uri = "file:///…" }`: a JSON file sent with the DPS registration."""

    uri: str

    @property
    def path(self) -> Path:
        return Path(unquote(urlsplit(self.uri).path))


@attrs.frozen
class Dps:
    SOURCE: ClassVar[str] = "dps"
    global_endpoint: str  # http(s) URL, as written (the original's url::Url adds a trailing "/")
    scope_id: str
    attestation: SymmetricKeyAttestation | X509Attestation | TpmAttestation
    payload: Payload | None = None


@attrs.frozen
class NoProvisioning:
    """`source = "none"`: no IoT Hub; local identities only."""

    SOURCE: ClassVar[str] = "none"


@attrs.frozen
class Provisioning:
    kind: Manual | Dps | NoProvisioning
    local_gateway_hostname: str | None = None

    @property
    def source(self) -> str:
        return self.kind.SOURCE


@attrs.frozen
class LocalIdOpts:
    """A principal's `localid = { type = "x509", attributes = "client" | "server" }`."""

    type: str = "x509"
    attributes: str = "client"


@attrs.frozen
class Principal:
    uid: int
    name: str
    # None: the untyped (daemon) principal; otherwise the id types as written, duplicates kept.
    idtype: list[str] | None = None
    localid: LocalIdOpts | None = None


@attrs.frozen
class LocalId:
    domain: str


@attrs.frozen
class Endpoints:
    """Connector URIs (`unix:///…`, `http://…`, `fd://…`); None means the default socket."""

    aziot_certd: str | None = None
    aziot_identityd: str | None = None
    aziot_keyd: str | None = None
    aziot_tpmd: str | None = None


@attrs.frozen
class IdentitydConfig:
    hostname: str
    homedir: Path
    provisioning: Provisioning
    prefer_module_identity_cache: bool = False
    max_requests: int = DEFAULT_MAX_REQUESTS
    cloud_timeout_sec: int = DEFAULT_CLOUD_TIMEOUT_SEC
    cloud_retries: int = DEFAULT_CLOUD_RETRIES
    principal: list[Principal] = attrs.field(factory=list)
    localid: LocalId | None = None
    endpoints: Endpoints = attrs.field(factory=Endpoints)


def _csr_subject(table: Table, key: str) -> CsrSubject | None:
    """A `CsrSubject`: a string (the CN) or a table of names that must hold a CN."""
    value = table.take(key)
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise table.error(key, "is empty: expected the common name")
        return CsrSubject(value)
    if not isinstance(value, dict):
        raise table.error(
            key,
            "expected a common name (a string) or a subject table "
            f'(e.g. {{ CN = "…", O = "…" }}), found {type_name(value)}',
        )
    subject = Table(value, table.name(key), table.source)
    names: dict[str, str] = {}
    for name in subject.data:
        text = subject.string(name)
        assert text is not None
        upper = name.upper()
        if upper in names:
            raise subject.error(name, f"{upper} is given twice (names are not case-sensitive)")
        names[upper] = text
    cn = names.pop("CN", None)
    if cn is None:
        raise table.error(key, "a subject table needs CN (the common name)")
    if not cn:
        raise table.error(key, "CN is empty")
    return CsrSubject(cn, dict(sorted(names.items())))


def _auto_renew(table: Table) -> AutoRenew:
    rotate = table.required_boolean("rotate_key")
    threshold = table.required_string("threshold", 'a renewal policy, e.g. "80%"')
    retry = table.required_string("retry", 'a retry policy, e.g. "4%"')
    table.refuse_others(("rotate_key", "threshold", "retry"))
    return AutoRenew(rotate, threshold, retry)


def _manual(table: Table) -> Manual:
    if table.has("connection_string"):
        raise table.error(
            "connection_string",
            "identityd does not read connection strings; put it in the super-config "
            "(/etc/aziot/config.toml) and run `aziotctl config apply`, which stores the key in "
            "keyd and writes device_id_pk",
        )
    hub = table.required_string("iothub_hostname", "the IoT Hub's host name")
    device_id = table.required_string("device_id", "the device id in the IoT Hub")
    auth = table.required_table("authentication", 'a table with method = "sas" or "x509"')
    method = auth.choice("method", ("sas", "x509"))
    authentication: ManualSas | ManualX509
    if method == "sas":
        authentication = ManualSas(auth.required_string("device_id_pk", "a keyd key id"))
        auth.refuse_others(("method", "device_id_pk"), 'for method = "sas"')
    else:
        authentication = ManualX509(
            auth.required_string("identity_cert", "a certd cert id"),
            auth.required_string("identity_pk", "a keyd key id"),
            _csr_subject(auth, "csr_subject"),
        )
        auth.refuse_others(
            ("method", "identity_cert", "identity_pk", "csr_subject"), 'for method = "x509"'
        )
    table.refuse_others(
        ("source", "local_gateway_hostname", "iothub_hostname", "device_id", "authentication"),
        'for source = "manual"',
    )
    return Manual(hub, device_id, authentication)


def _http_url(table: Table, key: str) -> str:
    value = table.required_string(key, "the DPS endpoint URL")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise table.error(key, f"{value!r} is not an http:// or https:// URL")
    return value


def _payload(table: Table) -> Payload:
    uri = table.required_string("uri", "a file:// URI of a JSON file")
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise table.error(
            "uri", f"{uri!r} is not a file:// URI of a local file (the only kind of payload)"
        )
    table.refuse_others(("uri",))
    return Payload(uri)


def _dps(table: Table) -> Dps:
    if table.has("id_scope"):
        raise table.error(
            "id_scope",
            "identityd's config spells it scope_id (id_scope is the super-config's name)",
        )
    endpoint = _http_url(table, "global_endpoint")
    scope_id = table.required_string("scope_id", "the DPS ID scope")
    payload_table = table.table("payload")
    payload = None if payload_table is None else _payload(payload_table)
    att = table.required_table(
        "attestation", 'a table with method = "symmetric_key", "x509" or "tpm"'
    )
    method = att.choice("method", ("symmetric_key", "x509", "tpm"))
    attestation: SymmetricKeyAttestation | X509Attestation | TpmAttestation
    if method == "symmetric_key":
        attestation = SymmetricKeyAttestation(
            att.required_string("registration_id", "the DPS registration id"),
            att.required_string("symmetric_key", "a keyd key id"),
        )
        att.refuse_others(
            ("method", "registration_id", "symmetric_key"), 'for method = "symmetric_key"'
        )
    elif method == "x509":
        cert = att.required_string("identity_cert", "a certd cert id")
        pk = att.required_string("identity_pk", "a keyd key id")
        registration_id = _csr_subject(att, "registration_id")
        renew = att.table("identity_auto_renew")
        attestation = X509Attestation(
            cert, pk, registration_id, None if renew is None else _auto_renew(renew)
        )
        att.refuse_others(
            ("method", "identity_cert", "identity_pk", "registration_id", "identity_auto_renew"),
            'for method = "x509"',
        )
    else:
        attestation = TpmAttestation(
            att.required_string("registration_id", "the DPS registration id")
        )
        att.refuse_others(("method", "registration_id"), 'for method = "tpm"')
    table.refuse_others(
        (
            "source",
            "local_gateway_hostname",
            "global_endpoint",
            "scope_id",
            "payload",
            "attestation",
        ),
        'for source = "dps"',
    )
    return Dps(endpoint, scope_id, attestation, payload)


def _provisioning(table: Table) -> Provisioning:
    gateway = table.string("local_gateway_hostname")
    if gateway == "":
        raise table.error("local_gateway_hostname", "is empty: expected the gateway's host name")
    source = table.choice("source", ("manual", "dps", "none"))
    kind: Manual | Dps | NoProvisioning
    if source == "manual":
        kind = _manual(table)
    elif source == "dps":
        if gateway is not None:
            # The original accepts this file and then refuses to provision
            # (DpsNotSupportedInNestedMode); aziotctl refuses it at apply time.
            raise table.error(
                "local_gateway_hostname",
                'DPS provisioning is not supported in nested mode; use source = "manual" '
                "behind a gateway",
            )
        kind = _dps(table)
    else:
        kind = NoProvisioning()
        table.refuse_others(("source", "local_gateway_hostname"), 'for source = "none"')
    return Provisioning(kind, gateway)


def _idtype(entry: Table) -> list[str] | None:
    raw = entry.take("idtype")
    if raw is None:
        return None
    expected = f"expected an array of {', '.join(map(repr, ID_TYPES))}"
    if not isinstance(raw, list):
        raise entry.error("idtype", f"{expected}, found {type_name(raw)}")
    for item in raw:
        if item not in ID_TYPES:
            shown = repr(item) if isinstance(item, str) else type_name(item)
            raise entry.error("idtype", f"{expected}, found {shown}")
    return list(raw)


def _principal(entry: Table) -> Principal:
    uid = entry.integer("uid", 0, U32_MAX)
    if uid is None:
        raise entry.error("uid", f"is missing: expected a uid, 0 to {U32_MAX}")
    name = entry.required_string("name", "the module or host process name")
    idtype = _idtype(entry)
    opts_table = entry.table("localid")
    localid = None
    if opts_table is not None:
        kind = opts_table.choice("type", LOCALID_TYPES)
        attributes = opts_table.string("attributes")
        attributes = "client" if attributes is None else attributes
        if attributes not in LOCALID_ATTRIBUTES:
            raise opts_table.error(
                "attributes",
                f"expected one of {', '.join(map(repr, LOCALID_ATTRIBUTES))}, found {attributes!r}",
            )
        opts_table.refuse_others(("type", "attributes"))
        localid = LocalIdOpts(kind, attributes)
    entry.refuse_others(("uid", "name", "idtype", "localid"))
    return Principal(uid, name, idtype, localid)


def _check(source: Locator, config: IdentitydConfig) -> None:
    """The original's `Settings::check`, with both principals of a clash named (and where)."""

    def principal(index: int) -> str:
        return f"principal[{index}] ({source.where(f'principal[{index}]')})"

    seen: dict[str, int] = {}
    by_uid: dict[int, int] = {}
    for index, p in enumerate(config.principal):
        here = f"principal[{index}]"
        if p.name in seen:
            raise source.error(
                f"{here}.name",
                f"duplicate module name {p.name!r} (also {principal(seen[p.name])})",
            )
        seen[p.name] = index
        if p.uid in by_uid:
            # The original keys its principal map by uid, so the later entry silently replaces
            # the earlier one: a caller loses the identity its first entry gave. Refused here.
            raise source.error(
                f"{here}.uid",
                f"uid {p.uid} already has a principal ({principal(by_uid[p.uid])}); "
                "one principal per uid",
            )
        by_uid[p.uid] = index
        if p.idtype is None:
            if p.localid is not None:
                # The original accepts this and ignores the options (only typed principals are
                # checked); an untyped principal has no local identity, so here it is refused.
                raise source.error(
                    f"{here}.localid",
                    "local identity options need idtype to include 'local' "
                    f"(principal {p.name!r} has no idtype)",
                )
            continue
        if "local" in p.idtype:
            if config.localid is None:
                raise source.error(
                    f"{here}.idtype",
                    f"principal {p.name!r} has the 'local' id type, which needs "
                    '[localid] with domain = "…"',
                )
        elif p.localid is not None:
            raise source.error(
                f"{here}.localid",
                f"local identity options specified for non-local identity {p.name!r} "
                "(idtype has no 'local')",
            )
        if config.provisioning.source == "none" and ("module" in p.idtype or "device" in p.idtype):
            raise source.error(
                f"{here}.idtype",
                f"principal {p.name!r}: module or device identity requires "
                'provisioning with IoT Hub (provisioning.source is "none")',
            )


ENDPOINT_KEYS = ("aziot_certd", "aziot_identityd", "aziot_keyd", "aziot_tpmd")


def _endpoints(table: Table) -> Endpoints:
    values = {}
    for key in ENDPOINT_KEYS:
        value = table.string(key)
        if value is not None and urlsplit(value).scheme not in ENDPOINT_SCHEMES:
            raise table.error(key, f"{value!r} is not a unix://, http:// or fd:// connector URI")
        values[key] = value
    table.refuse_others(ENDPOINT_KEYS)
    return Endpoints(**values)


TOP_KEYS = (
    "hostname",
    "homedir",
    "prefer_module_identity_cache",
    "max_requests",
    "cloud_timeout_sec",
    "cloud_retries",
    "provisioning",
    "principal",
    "localid",
    "endpoints",
)


def parse_identityd(data: dict[str, Any], source: str | Locator) -> IdentitydConfig:
    """Parse and check one already-merged table; `source` is the file name errors start with,
    or where each key came from (`table.load_merged_source`)."""
    top = Table(data, "", locator(source))
    hostname = top.required_string("hostname", "the device's host name")
    homedir = top.required_string("homedir", "where identityd keeps its state")
    prefer_cache = top.boolean("prefer_module_identity_cache")
    max_requests = top.integer("max_requests", 1)
    timeout = top.integer("cloud_timeout_sec", MIN_CLOUD_TIMEOUT_SEC)
    retries = top.integer("cloud_retries", 0, U32_MAX)
    provisioning = _provisioning(
        top.required_table("provisioning", 'source = "manual", "dps" or "none"')
    )
    raw_principals = top.take("principal")
    raw_principals = [] if raw_principals is None else raw_principals
    if not isinstance(raw_principals, list):
        raise top.error(
            "principal",
            f"expected an array of tables ([[principal]]), found {type_name(raw_principals)}",
        )
    principals = [
        _principal(Table(raw, f"principal[{index}]", top.source))
        for index, raw in enumerate(raw_principals)
    ]
    localid_table = top.table("localid")
    localid = None
    if localid_table is not None:
        localid = LocalId(localid_table.required_string("domain", "suffix of local id names"))
        localid_table.refuse_others(("domain",))
    endpoints_table = top.table("endpoints")
    endpoints = Endpoints() if endpoints_table is None else _endpoints(endpoints_table)
    for legacy in LEGACY_TABLES:
        if top.table(legacy) is not None:
            log.warning(
                "%s: %s: ignored (a key of old identityd configs)",
                top.source.where(legacy),
                legacy,
            )
    top.refuse_others(TOP_KEYS)
    config = IdentitydConfig(
        hostname=hostname,
        homedir=Path(homedir),
        provisioning=provisioning,
        prefer_module_identity_cache=bool(prefer_cache),
        max_requests=DEFAULT_MAX_REQUESTS if max_requests is None else max_requests,
        cloud_timeout_sec=DEFAULT_CLOUD_TIMEOUT_SEC if timeout is None else timeout,
        cloud_retries=DEFAULT_CLOUD_RETRIES if retries is None else retries,
        principal=principals,
        localid=localid,
        endpoints=endpoints,
    )
    _check(top.source, config)
    return config


def load_identityd(paths: ServicePaths) -> IdentitydConfig:
    """config.toml merged with config.d/*.toml (as `loader.load_merged`), then parsed and checked.

    A refusal names the file (base or drop-in) and line each key came from.
    """
    source = load_merged_source(paths)
    return parse_identityd(source.data, source)
