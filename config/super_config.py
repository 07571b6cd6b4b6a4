"""The super-config `/etc/aziot/config.toml` that `aziotctl config apply` turns into the four
services' configs (spec/provisioning.md §2).

Read with the original's rules: its defaults, `cloud_timeout_sec >= 70`, `[aziot_max_requests]`
all four or none, `parent_hostname` as another spelling of `local_gateway_hostname`, and the
provisioning shapes it accepts. Unlike the original, which silently ignores keys it does not
know (a misspelt `registraton_id` is only noticed when DPS refuses the device), an unknown key,
a wrong type, a missing field or two settings that exclude each other is refused, in one
message naming the file, the line, the key and what was expected.

On an IoT Edge device the same file is IoT Edge's super-config, a superset that
`iotedge config apply` reads. Its own top-level keys (`IOT_EDGE_KEYS`: those of IoT Edge 1.4
and 1.5, which have the same set) and the original's debug-build-only `[endpoints]`
(`DEBUG_BUILD_KEYS`) are accepted and left alone, whole: not read, not checked (IoT Edge checks
its own), and named in the result (`left_for_iot_edge`, `ignored_debug_only`) so apply can say
so. The rule that keeps misspellings refused: a key is left alone only under its exact name
and only at the top level; any other unknown key, at the top level or inside our sections, is
refused as before, and at the top level the known name it is closest to is suggested
(`hostnmae`: did you mean hostname?; `trust_bundle_certs`: did you mean trust_bundle_cert?).

Key locations come back normalised as the original writes them into keyd's config (`file://`
URLs, PKCS#11 URIs re-encoded); cert locations as `file://` URLs.
"""

from __future__ import annotations

import base64
import binascii
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import tomli

from aziot.actors.certs.renewal import parse_policy

from .certd import AUTH_KEYS, AutoRenew, BasicAuth
from .loader import ConfigError
from .pkcs11_uri import Pkcs11Uri
from .table import Source, Table

DEFAULT_CLOUD_TIMEOUT_SEC = 70
DEFAULT_CLOUD_RETRIES = 1
DEFAULT_MAX_REQUESTS = 10
DEFAULT_TCTI = "device"
DEFAULT_AUTH_KEY_INDEX = 0x00_01_00
MAX_AUTH_KEY_INDEX = 0x7F_FF_FF
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


# --------------------------------------------------------------------------------------------
# Connection strings and base64 (shared with `config mp`)


def decode_base64_key(text: str) -> bytes:
    """Standard base64, padded or not (older releases took unpadded keys), and nothing looser.

    Raises ValueError naming what is wrong (never echoing the key).
    """
    stripped = text.rstrip("=")
    padded = stripped + "=" * (-len(stripped) % 4)
    if padded != text and stripped != text:
        raise ValueError("it is not valid base64 (wrong padding)")
    try:
        value = base64.b64decode(padded, validate=True)
    except binascii.Error:
        raise ValueError("it is not valid base64") from None
    if base64.b64encode(value).decode() != padded:
        # Trailing bits that are not zero: Rust's base64 refuses these, so do we.
        raise ValueError("it is not valid base64 (non-canonical last character)")
    return value


@attrs.frozen
class ConnectionString:
    """`HostName=<hub>;DeviceId=<id>;SharedAccessKey=<base64>`; other parts are ignored."""

    text: str = attrs.field(repr=False)
    iothub_hostname: str
    device_id: str
    key: bytes = attrs.field(repr=False)

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Raises ValueError saying which part is missing or bad (never echoing the key)."""
        parts: dict[str, str] = {}
        for section in text.split(";"):
            name, eq, value = section.partition("=")
            if eq and name in ("HostName", "DeviceId", "SharedAccessKey"):
                parts[name] = value
        for name in ("HostName", "DeviceId", "SharedAccessKey"):
            if name not in parts:
                raise ValueError(
                    f'required part "{name}" is missing '
                    "(expected HostName=<hub>;DeviceId=<id>;SharedAccessKey=<base64>)"
                )
            if not parts[name]:
                raise ValueError(f'part "{name}" is empty')
        try:
            key = decode_base64_key(parts["SharedAccessKey"])
        except ValueError as error:
            raise ValueError(f'"SharedAccessKey" could not be decoded: {error}') from None
        return cls(text, parts["HostName"], parts["DeviceId"], key)


# --------------------------------------------------------------------------------------------
# The model


@attrs.frozen
class InlineKey:
    """A symmetric key given in the super-config (or a connection string): apply writes it out."""

    value: bytes = attrs.field(repr=False)


@attrs.frozen
class PreloadedKey:
    uri: str  # normalised key location


SymmetricKey = InlineKey | PreloadedKey


@attrs.frozen
class CertAndKey:
    """A preloaded cert (a `file://` URL) and its private key's location."""

    cert: str
    pk: str


@attrs.frozen
class EstAuth:
    """EST credentials: basic auth and/or one X.509 identity, either the EST identity itself or
    a bootstrap identity used once to obtain it."""

    basic: BasicAuth | None = None
    identity: CertAndKey | None = None
    bootstrap_identity: CertAndKey | None = None


@attrs.frozen
class IssuanceOptions:
    """A cert certd issues: `method` is "est", "local_ca" or "self_signed"."""

    method: str
    url: str | None = None
    auth: EstAuth | None = None
    expiry_days: int | None = None
    auto_renew: AutoRenew | None = None
    common_name: str | None = None
    subject: dict[str, str] | None = None


X509Identity = IssuanceOptions | CertAndKey


@attrs.frozen
class ManualConnectionString:
    connection_string: ConnectionString


@attrs.frozen
class ManualSas:
    device_id_pk: SymmetricKey


@attrs.frozen
class ManualX509:
    identity: X509Identity


@attrs.frozen
class ManualExplicit:
    iothub_hostname: str
    device_id: str
    authentication: ManualSas | ManualX509


@attrs.frozen
class DpsSymmetricKey:
    registration_id: str
    symmetric_key: SymmetricKey


@attrs.frozen
class DpsX509:
    registration_id: str | None
    identity: X509Identity


@attrs.frozen
class DpsTpm:
    registration_id: str


@attrs.frozen
class Dps:
    global_endpoint: str
    id_scope: str
    attestation: DpsSymmetricKey | DpsX509 | DpsTpm
    payload_uri: str | None = None


@attrs.frozen
class NoProvisioning:
    pass


Provisioning = ManualConnectionString | ManualExplicit | Dps | NoProvisioning


@attrs.frozen
class Est:
    trusted_certs: list[str] = attrs.field(factory=list)
    identity_auto_renew: AutoRenew = attrs.field(factory=AutoRenew)
    auth: EstAuth | None = None
    urls: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class MaxRequests:
    keyd: int = DEFAULT_MAX_REQUESTS
    certd: int = DEFAULT_MAX_REQUESTS
    tpmd: int = DEFAULT_MAX_REQUESTS
    identityd: int = DEFAULT_MAX_REQUESTS


@attrs.frozen
class Tpm:
    tcti: str = DEFAULT_TCTI
    auth_key_index: int = DEFAULT_AUTH_KEY_INDEX
    endorsement: str = attrs.field(default="", repr=False)
    owner: str = attrs.field(default="", repr=False)


@attrs.frozen
class SuperConfig:
    provisioning: Provisioning
    hostname: str | None = None
    local_gateway_hostname: str | None = None
    cloud_timeout_sec: int = DEFAULT_CLOUD_TIMEOUT_SEC
    cloud_retries: int = DEFAULT_CLOUD_RETRIES
    max_requests: MaxRequests = attrs.field(factory=MaxRequests)
    prefer_module_identity_cache: bool = False
    localid_domain: str | None = None
    aziot_keys: dict[str, str] = attrs.field(factory=dict)
    preloaded_keys: dict[str, str] = attrs.field(factory=dict)
    est: Est | None = None
    local_ca: IssuanceOptions | CertAndKey | None = None
    preloaded_certs: dict[str, str | list[str]] = attrs.field(factory=dict)
    tpm: Tpm = attrs.field(factory=Tpm)
    # Top-level keys present but not ours to read, sorted: IoT Edge's, and debug-only ones.
    left_for_iot_edge: tuple[str, ...] = ()
    ignored_debug_only: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Values


def _non_alphanumeric_escaped(text: str) -> str:
    """Percent-encode every byte but ASCII letters and digits, as the original's keyd URIs are."""
    return "".join(
        char if char.isascii() and char.isalnum() else "".join(f"%{b:02X}" for b in char.encode())
        for char in text
    )


def _pkcs11_text(uri: Pkcs11Uri) -> str:
    # The original keeps one slot identifier: slot-id when given, else the token label.
    if uri.slot_id is not None:
        text = f"pkcs11:slot-id={uri.slot_id}"
    else:
        text = f"pkcs11:token={_non_alphanumeric_escaped(uri.token or '')}"
    if uri.object_label is not None:
        text += f";object={_non_alphanumeric_escaped(uri.object_label)}"
    if uri.pin is not None:
        text += f"?pin-value={_non_alphanumeric_escaped(uri.pin)}"
    return text


def _file_url(table: Table, key: str, value: str) -> str:
    """A `file:` URL naming an absolute path, rewritten in the form the original writes."""
    parts = urlsplit(value)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or parts.query:
        raise table.error(key, f'expected a "file:///absolute/path" URL, found {value!r}')
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise table.error(key, f'expected a "file:///absolute/path" URL, found {value!r}')
    return PurePosixPath(path).as_uri()


def key_location(table: Table, key: str, value: str) -> str:
    """A preloaded key's location (`file:///…` or `pkcs11:…`), normalised."""
    scheme = value.partition(":")[0]
    if scheme == "file":
        return _file_url(table, key, value)
    if scheme == "pkcs11":
        try:
            return _pkcs11_text(Pkcs11Uri.parse(value))
        except ValueError as error:
            raise table.error(key, f"invalid PKCS#11 URI: {error}") from None
    raise table.error(key, f'expected a key location "file:///…" or "pkcs11:…", found {value!r}')


def _key(table: Table, key: str) -> str:
    return key_location(table, key, table.required_string(key, "a key location URI"))


def _cert(table: Table, key: str) -> str:
    return _file_url(table, key, table.required_string(key, 'a cert "file:///….pem" URL'))


def _http_url(table: Table, key: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise table.error(key, f'expected an "https://host/…" URL, found {value!r}')
    if parts.scheme == "http":
        print(
            f"Warning: EST server URL {value!r} ({table.name(key)}) is configured with "
            "unencrypted HTTP, which exposes the device to man-in-the-middle attacks; "
            "configure HTTPS for the EST server and update the URL.",
            file=sys.stderr,
        )
    return value


def _symmetric_key(table: Table, key: str) -> SymmetricKey:
    inner = table.required_table(key, '{ value = "<base64>" } or { uri = "…" }')
    if inner.has("value") and inner.has("uri"):
        raise inner.error(None, "set value (the key itself) or uri (where it is), not both")
    if inner.has("uri"):
        uri = _key(inner, "uri")
        inner.refuse_others(("uri",))
        return PreloadedKey(uri)
    value = inner.required_string("value", 'the key in base64, or uri = "…" instead')
    inner.refuse_others(("value", "uri"))
    try:
        return InlineKey(decode_base64_key(value))
    except ValueError as error:
        raise inner.error("value", f"expected a base64 key: {error}") from None


def _pair(table: Table, first: str, second: str) -> CertAndKey | None:
    if table.has(first) != table.has(second):
        given, missing = (first, second) if table.has(first) else (second, first)
        raise table.error(given, f"is set but {table.name(missing)} is not; set both or neither")
    if not table.has(first):
        return None
    return CertAndKey(_cert(table, first), _key(table, second))


def _est_auth(table: Table) -> EstAuth | None:
    """The auth keys of `table` (taken here; the caller refuses the rest)."""
    if table.has("username") != table.has("password"):
        given, missing = (
            ("username", "password") if table.has("username") else ("password", "username")
        )
        raise table.error(given, f"is set but {table.name(missing)} is not; set both or neither")
    basic = None
    if table.has("username"):
        basic = BasicAuth(table.required_string("username"), table.required_string("password"))
    identity = _pair(table, "identity_cert", "identity_pk")
    bootstrap = _pair(table, "bootstrap_identity_cert", "bootstrap_identity_pk")
    if identity is not None and bootstrap is not None:
        raise table.error(
            "bootstrap_identity_cert",
            "set either identity_cert/identity_pk (the EST identity) or "
            "bootstrap_identity_cert/bootstrap_identity_pk (used to obtain it), not both",
        )
    if basic is None and identity is None and bootstrap is None:
        return None
    return EstAuth(basic, identity, bootstrap)


def _auto_renew(table: Table, key: str) -> AutoRenew | None:
    inner = table.table(key)
    if inner is None:
        return None
    rotate_key = inner.required_boolean("rotate_key")
    policies = []
    for name in ("threshold", "retry"):
        text = inner.required_string(name, 'a renewal policy such as "80%", "30min" or "7day"')
        try:
            policies.append(str(parse_policy(text)))
        except ValueError as error:
            raise inner.error(name, str(error)) from None
    inner.refuse_others(("rotate_key", "threshold", "retry"))
    return AutoRenew(rotate_key, policies[0], policies[1])


def _subject(table: Table) -> tuple[str | None, dict[str, str] | None]:
    if table.has("common_name") and table.has("subject"):
        raise table.error("subject", "set common_name or subject, not both")
    common_name = table.string("common_name")
    subject = table.table("subject")
    if subject is None:
        return common_name, None
    for name in subject.data:
        subject.required_string(name, "a string")
    if not subject.data:
        raise subject.error(None, 'is empty: expected names such as { CN = "…", O = "…" }')
    return None, dict(subject.data)


def issuance_options(table: Table) -> IssuanceOptions:
    """A `CertIssuanceOptions` table: how certd issues the cert."""
    method = table.choice("method", ("est", "local_ca", "self_signed"))
    known = ["method", "expiry_days", "auto_renew", "common_name", "subject"]
    url = auth = None
    if method == "est":
        known += ["url", *AUTH_KEYS]
        url_text = table.string("url")
        url = None if url_text is None else _http_url(table, "url", url_text)
        auth = _est_auth(table)
    expiry_days = table.integer("expiry_days", 1, U32_MAX)
    auto_renew = _auto_renew(table, "auto_renew")
    common_name, subject = _subject(table)
    table.refuse_others(known)
    return IssuanceOptions(method, url, auth, expiry_days, auto_renew, common_name, subject)


def _x509_identity(table: Table) -> X509Identity:
    """Issued (`identity_cert` is a table) or preloaded (`identity_cert` + `identity_pk` URLs)."""
    value = table.data.get("identity_cert")
    if isinstance(value, dict):
        if table.has("identity_pk"):
            raise table.error(
                "identity_pk",
                "is set but identity_cert is a table (a cert certd issues, whose key keyd "
                "makes); give identity_cert as a file URL to preload a cert and key instead",
            )
        return issuance_options(table.required_table("identity_cert"))
    if value is None:
        raise table.error(
            "identity_cert",
            'is missing: expected "file:///….pem" (with identity_pk) or a table '
            '{ method = "est" | "local_ca" | "self_signed", … }',
        )
    identity = _pair(table, "identity_cert", "identity_pk")
    assert identity is not None
    return identity


def _manual(table: Table) -> Provisioning:
    if table.has("connection_string"):
        for other in ("iothub_hostname", "device_id", "authentication"):
            if table.has(other):
                raise table.error(other, "cannot be set together with connection_string")
        text = table.required_string("connection_string", "HostName=…;DeviceId=…;SharedAccessKey=…")
        table.refuse_others(("source", "connection_string"))
        try:
            return ManualConnectionString(ConnectionString.parse(text))
        except ValueError as error:
            raise table.error("connection_string", f"invalid connection string: {error}") from None
    hub = table.required_string(
        "iothub_hostname", "the IoT hub's host name (or connection_string instead)"
    )
    device_id = table.required_string("device_id", "the device's id in the hub")
    auth = table.required_table(
        "authentication", '[provisioning.authentication] method = "sas" or "x509"'
    )
    table.refuse_others(("source", "iothub_hostname", "device_id", "authentication"))
    method = auth.choice("method", ("sas", "x509"))
    authentication: ManualSas | ManualX509
    if method == "sas":
        authentication = ManualSas(_symmetric_key(auth, "device_id_pk"))
        auth.refuse_others(("method", "device_id_pk"))
    else:
        authentication = ManualX509(_x509_identity(auth))
        auth.refuse_others(("method", "identity_cert", "identity_pk"))
    return ManualExplicit(hub, device_id, authentication)


def _dps(table: Table) -> Dps:
    endpoint = table.required_string(
        "global_endpoint", "the DPS URL, e.g. https://global.azure-devices-provisioning.net/"
    )
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise table.error("global_endpoint", f'expected an "https://host/" URL, found {endpoint!r}')
    if not parts.path:
        endpoint += "/"  # as the original's URL type writes it
    id_scope = table.required_string("id_scope", "the DPS ID scope")
    payload_uri = None
    payload = table.table("payload")
    if payload is not None:
        payload_uri = _file_url(
            payload, "uri", payload.required_string("uri", 'a "file:///….json" URL')
        )
        payload.refuse_others(("uri",))
    att = table.required_table("attestation", 'method = "symmetric_key", "x509" or "tpm"')
    table.refuse_others(("source", "global_endpoint", "id_scope", "payload", "attestation"))
    method = att.choice("method", ("symmetric_key", "x509", "tpm"))
    attestation: DpsSymmetricKey | DpsX509 | DpsTpm
    if method == "symmetric_key":
        registration_id = att.required_string("registration_id", "the DPS registration id")
        attestation = DpsSymmetricKey(registration_id, _symmetric_key(att, "symmetric_key"))
        att.refuse_others(("method", "registration_id", "symmetric_key"))
    elif method == "x509":
        registration_id = att.string("registration_id")
        attestation = DpsX509(registration_id, _x509_identity(att))
        att.refuse_others(("method", "registration_id", "identity_cert", "identity_pk"))
    else:
        attestation = DpsTpm(att.required_string("registration_id", "the DPS registration id"))
        att.refuse_others(("method", "registration_id"))
    return Dps(endpoint, id_scope, attestation, payload_uri)


def _provisioning(table: Table) -> Provisioning:
    source = table.choice("source", ("manual", "dps", "none"))
    if source == "manual":
        return _manual(table)
    if source == "dps":
        return _dps(table)
    table.refuse_others(("source",))
    return NoProvisioning()


def _est(table: Table) -> Est:
    trusted = [
        _file_url(table, f"trusted_certs[{index}]", uri)
        for index, uri in enumerate(table.strings("trusted_certs") or [])
    ]
    renew = _auto_renew(table, "identity_auto_renew") or AutoRenew()
    auth = None
    auth_table = table.table("auth")
    if auth_table is not None:
        auth = _est_auth(auth_table)
        auth_table.refuse_others(AUTH_KEYS)
        if auth is None:
            raise auth_table.error(
                None, "is empty: expected username/password and/or an identity or bootstrap cert"
            )
    urls: dict[str, str] = {}
    urls_table = table.table("urls")
    if urls_table is not None:
        for name in urls_table.data:
            urls[name] = _http_url(urls_table, name, urls_table.required_string(name, "a URL"))
    table.refuse_others(("trusted_certs", "identity_auto_renew", "auth", "urls"))
    return Est(trusted, renew, auth, urls)


def _local_ca(table: Table) -> IssuanceOptions | CertAndKey:
    value = table.data.get("cert")
    if isinstance(value, dict):
        if table.has("pk"):
            raise table.error("pk", "is set but cert is a table (a CA cert certd issues)")
        cert_table = table.required_table("cert")
        options = issuance_options(cert_table)
        if options.auth is not None:
            # The original drops these: the local CA is enrolled with [cert_issuance.est.auth].
            raise cert_table.error(
                None, "EST credentials are not used here; put them in [cert_issuance.est.auth]"
            )
        table.refuse_others(("cert",))
        return options
    pair = _pair(table, "cert", "pk")
    if pair is None:
        raise table.error(
            "cert", 'is missing: expected "file:///….pem" (with pk) or a table { method = … }'
        )
    table.refuse_others(("cert", "pk"))
    return pair


def _max_requests(table: Table) -> MaxRequests:
    values = {
        name: table.required_integer(name, 1) for name in ("keyd", "certd", "tpmd", "identityd")
    }
    table.refuse_others(("keyd", "certd", "tpmd", "identityd"))
    return MaxRequests(**values)


def _c_string(table: Table, key: str) -> str | None:
    value = table.string(key)
    if value is not None and "\0" in value:
        raise table.error(key, "must not contain a NUL character")
    return value


def _tpm(table: Table) -> Tpm:
    tcti = _c_string(table, "tcti")
    index = table.integer("auth_key_index", 0, MAX_AUTH_KEY_INDEX)
    endorsement = owner = None
    auth = table.table("hierarchy_authorization")
    if auth is not None:
        endorsement, owner = _c_string(auth, "endorsement"), _c_string(auth, "owner")
        auth.refuse_others(("endorsement", "owner"))
    table.refuse_others(("tcti", "auth_key_index", "hierarchy_authorization"))
    return Tpm(
        DEFAULT_TCTI if tcti is None else tcti,
        DEFAULT_AUTH_KEY_INDEX if index is None else index,
        endorsement or "",
        owner or "",
    )


def _preloaded_certs(table: Table) -> dict[str, str | list[str]]:
    certs: dict[str, str | list[str]] = {}
    for name, value in table.data.items():
        if isinstance(value, list):
            ids = table.strings(name)
            assert ids is not None
            certs[name] = ids
        elif isinstance(value, str):
            certs[name] = _file_url(table, name, value)
        else:
            raise table.error(name, 'expected a "file:///….pem" URL or an array of cert ids')
        table.take(name)
    return certs


_TOP_KEYS = (
    "hostname",
    "local_gateway_hostname",
    "parent_hostname",
    "cloud_timeout_sec",
    "cloud_retries",
    "aziot_max_requests",
    "prefer_module_identity_cache",
    "provisioning",
    "localid",
    "aziot_keys",
    "preloaded_keys",
    "cert_issuance",
    "preloaded_certs",
    "tpm",
)

# IoT Edge's super-config keys (Azure/iotedge edgelet/iotedge/src/config/super_config.rs, the
# same in 1.4.x and 1.5.x; `manifest_trust_bundle_cert` only in its content-trust builds).
IOT_EDGE_KEYS = (
    "trust_bundle_cert",
    "allow_elevated_docker_permissions",
    "auto_reprovisioning_mode",
    "imported_master_encryption_key",
    "manifest_trust_bundle_cert",
    "additional_info",
    "iotedge_max_requests",
    "agent",
    "connect",
    "listen",
    "watchdog",
    "edge_ca",
    "moby_runtime",
    "image_garbage_collection",
)

# The original reads these only when built in debug mode; its release builds skip them.
DEBUG_BUILD_KEYS = ("endpoints",)


def parse_super_config(data: dict[str, Any], source: Source) -> SuperConfig:
    top = Table(data, "", source)
    # Unknown top-level keys first: a misspelt `[provisoning]` is then named as such, not
    # reported as `provisioning` missing.
    known = (*_TOP_KEYS, *DEBUG_BUILD_KEYS, *IOT_EDGE_KEYS)
    for key in known:
        top.take(key)
    top.refuse_others(known, suggest=True)
    left_for_iot_edge = tuple(sorted(key for key in IOT_EDGE_KEYS if top.has(key)))
    ignored_debug_only = tuple(sorted(key for key in DEBUG_BUILD_KEYS if top.has(key)))
    hostname = top.string("hostname")
    if top.has("local_gateway_hostname") and top.has("parent_hostname"):
        raise top.error(
            "parent_hostname", "is another name for local_gateway_hostname; set only one"
        )
    gateway = top.string("local_gateway_hostname") or top.string("parent_hostname")
    timeout = top.integer("cloud_timeout_sec", DEFAULT_CLOUD_TIMEOUT_SEC)
    retries = top.integer("cloud_retries", 0, U32_MAX)
    max_requests_table = top.table("aziot_max_requests")
    max_requests = (
        MaxRequests() if max_requests_table is None else _max_requests(max_requests_table)
    )
    prefer_cache = top.boolean("prefer_module_identity_cache")
    provisioning_table = top.required_table("provisioning", 'source = "manual", "dps" or "none"')
    provisioning = _provisioning(provisioning_table)
    if isinstance(provisioning, Dps) and gateway is not None:
        key = "local_gateway_hostname" if top.has("local_gateway_hostname") else "parent_hostname"
        raise top.error(
            key, "DPS provisioning is not supported in nested mode; remove one of the two"
        )
    localid_domain = None
    localid = top.table("localid")
    if localid is not None:
        localid_domain = localid.required_string("domain", "the local identities' domain")
        localid.refuse_others(("domain",))
    aziot_keys = top.string_map("aziot_keys")
    preloaded_keys: dict[str, str] = {}
    keys_table = top.table("preloaded_keys")
    if keys_table is not None:
        for name in keys_table.data:
            preloaded_keys[name] = _key(keys_table, name)
    est = local_ca = None
    issuance = top.table("cert_issuance")
    if issuance is not None:
        est_table = issuance.table("est")
        est = None if est_table is None else _est(est_table)
        ca_table = issuance.table("local_ca")
        local_ca = None if ca_table is None else _local_ca(ca_table)
        issuance.refuse_others(("est", "local_ca"))
    certs_table = top.table("preloaded_certs")
    preloaded_certs = {} if certs_table is None else _preloaded_certs(certs_table)
    tpm_table = top.table("tpm")
    tpm = Tpm() if tpm_table is None else _tpm(tpm_table)
    return SuperConfig(
        provisioning=provisioning,
        hostname=hostname,
        local_gateway_hostname=gateway,
        cloud_timeout_sec=DEFAULT_CLOUD_TIMEOUT_SEC if timeout is None else timeout,
        cloud_retries=DEFAULT_CLOUD_RETRIES if retries is None else retries,
        max_requests=max_requests,
        prefer_module_identity_cache=bool(prefer_cache),
        localid_domain=localid_domain,
        aziot_keys=aziot_keys,
        preloaded_keys=preloaded_keys,
        est=est,
        local_ca=local_ca,
        preloaded_certs=preloaded_certs,
        tpm=tpm,
        left_for_iot_edge=left_for_iot_edge,
        ignored_debug_only=ignored_debug_only,
    )


def parse_super_config_text(text: str, name: str) -> SuperConfig:
    """Parse the super-config `text`; `name` (its path) is what errors call it."""
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as error:
        raise ConfigError(f"{name}: not valid TOML: {error}") from None
    return parse_super_config(data, Source(name, text))


def load_super_config(path: Path) -> SuperConfig:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8") from None
    return parse_super_config_text(text, str(path))
