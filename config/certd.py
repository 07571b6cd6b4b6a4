"""The certd config: `homedir_path`, `max_requests`, `[cert_issuance]`, `[preloaded_certs]`,
`[[principal]]`, `[endpoints]` (spec/provisioning.md §4.3, the original's aziot-certd-config).

The original reads `[cert_issuance]` with serde's `flatten`, which ignores every key it does not
know and turns a half-written auth table (a `username` without its `password`) into "no auth",
found out only when the first EST enrollment fails. Here a key that is unknown, misspelt, of the
wrong type or half of a pair stops the start with the file and the key named: a device that is
misconfigured should say so when it is installed, not weeks later at its first renewal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from .loader import ServicePaths, type_name
from .table import Locator, Table, load_merged_source, locator

log = logging.getLogger(__name__)

METHODS = ("self_signed", "local_ca", "est")
U32_MAX = 2**32 - 1  # the original reads uids and expiry_days as u32
DEFAULT_NOT_BEFORE_MARGIN = 300  # seconds; a device clock a few minutes slow still accepts


@attrs.frozen
class CertKey:
    """A cert id in this service's store and the id of its key pair in keyd."""

    cert: str
    pk: str


@attrs.frozen
class BasicAuth:
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class EstAuth:
    """Basic auth and/or a TLS client identity; the bootstrap identity obtains the identity."""

    basic: BasicAuth | None = None
    identity: CertKey | None = None
    bootstrap_identity: CertKey | None = None


@attrs.frozen
class AutoRenew:
    """The EST identity cert's renewal policy, as strings the renewal engine parses."""

    rotate_key: bool = True
    threshold: str = "80%"
    retry: str = "4%"


@attrs.frozen
class Est:
    trusted_certs: list[str] = attrs.field(factory=list)
    auth: EstAuth | None = None
    identity_auto_renew: AutoRenew = attrs.field(factory=AutoRenew)
    urls: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class IssuanceOptions:
    """`[cert_issuance.<certId>]`: how certd issues that cert when no issuer is given."""

    method: str
    expiry_days: int | None = None
    common_name: str | None = None
    subject: dict[str, str] | None = None
    url: str | None = None  # est only
    auth: EstAuth | None = None  # est only
    # Ours (the original renews only EST identity certs): renew this cert too, by its method,
    # with the CSR signed by keyd key `key` (default: the cert id, as aziotctl names them).
    auto_renew: AutoRenew | None = None
    key: str | None = None


@attrs.frozen
class Principal:
    uid: int
    certs: list[str] = attrs.field(factory=list)


@attrs.frozen
class Endpoints:
    aziot_certd: str | None = None
    aziot_keyd: str | None = None


@attrs.frozen
class CertdConfig:
    homedir: Path
    max_requests: int = 10
    est: Est | None = None
    local_ca: CertKey | None = None
    certs: dict[str, IssuanceOptions] = attrs.field(factory=dict)
    preloaded_certs: dict[str, str | list[str]] = attrs.field(factory=dict)
    principal: list[Principal] = attrs.field(factory=list)
    endpoints: Endpoints = attrs.field(factory=Endpoints)
    # Ours: how far back locally issued certs date their notBefore (clock skew, lessons.md 14).
    not_before_margin_secs: int = DEFAULT_NOT_BEFORE_MARGIN


def _pair(table: Table, first: str, second: str) -> tuple[str, str] | None:
    """Two keys that only mean something together: both, or neither."""
    a, b = table.string(first), table.string(second)
    if (a is None) != (b is None):
        given, missing = (first, second) if b is None else (second, first)
        raise table.error(given, f"is set but {table.name(missing)} is not; set both or neither")
    return None if a is None or b is None else (a, b)


def _auth(table: Table) -> EstAuth | None:
    basic = _pair(table, "username", "password")
    identity = _pair(table, "identity_cert", "identity_pk")
    bootstrap = _pair(table, "bootstrap_identity_cert", "bootstrap_identity_pk")
    if bootstrap is not None and identity is None:
        raise table.error(
            "bootstrap_identity_cert",
            f"is set but {table.name('identity_cert')} is not: the bootstrap identity is only "
            "used to obtain the EST identity cert, whose ids identity_cert and identity_pk name",
        )
    if basic is None and identity is None:
        return None
    return EstAuth(
        basic=BasicAuth(*basic) if basic else None,
        identity=CertKey(*identity) if identity else None,
        bootstrap_identity=CertKey(*bootstrap) if bootstrap else None,
    )


def _url(table: Table, key: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise table.error(key, f"{value!r} is not an http:// or https:// URL")
    if parts.scheme == "http":
        log.warning(
            "%s: EST server URL %s is unencrypted HTTP, which exposes the device to "
            "man-in-the-middle attacks; configure HTTPS on the EST server",
            table.name(key),
            value,
        )
    return value


AUTH_KEYS = (
    "username",
    "password",
    "identity_cert",
    "identity_pk",
    "bootstrap_identity_cert",
    "bootstrap_identity_pk",
)


OPTION_KEYS = ("method", "expiry_days", "common_name", "subject", "auto_renew", "key")


def _est(table: Table) -> Est:
    trusted = table.strings("trusted_certs") or []
    auth = _auth(table)
    renew = table.table("identity_auto_renew")
    auto_renew = AutoRenew() if renew is None else _auto_renew(renew)
    urls: dict[str, str] = {}
    url_table = table.table("urls")
    if url_table is not None:
        for cert_id in url_table.data:
            value = url_table.string(cert_id)
            assert value is not None
            urls[cert_id] = _url(url_table, cert_id, value)
    table.refuse_others(("trusted_certs", *AUTH_KEYS, "identity_auto_renew", "urls"))
    return Est(trusted, auth, auto_renew, urls)


def _auto_renew(renew: Table) -> AutoRenew:
    # In the original all three keys are required once the table is present. An empty policy
    # is not refused here: the policy parser names it as the invalid policy it is.
    values = {}
    for key, example in (("threshold", "80%"), ("retry", "4%")):
        value = renew.string(key)
        if value is None:
            raise renew.error(key, f'is missing: expected a policy, e.g. "{example}"')
        values[key] = value
    rotate = renew.required_boolean("rotate_key")
    renew.refuse_others(("rotate_key", "threshold", "retry"))
    return AutoRenew(rotate, values["threshold"], values["retry"])


def _cert_key(table: Table) -> CertKey:
    pair = _pair(table, "cert", "pk")
    if pair is None:
        raise table.error(None, "needs cert (a cert id) and pk (a key id)")
    table.refuse_others(("cert", "pk"))
    return CertKey(*pair)


def _options(table: Table) -> IssuanceOptions:
    method = table.string("method")
    if method not in METHODS:
        found = "nothing" if method is None else repr(method)
        raise table.error(
            "method",
            f"expected one of {', '.join(METHODS)}, found {found} "
            '(each entry is a table, e.g. { method = "local_ca" })',
        )
    expiry = table.integer("expiry_days", high=U32_MAX)
    if expiry is not None and expiry <= 0:
        raise table.error("expiry_days", "expiry_days must be greater than 0")
    common_name = table.string("common_name")
    subject_table = table.table("subject")
    subject = None
    if subject_table is not None:
        subject = {}
        for name in subject_table.data:
            value = subject_table.string(name)
            assert value is not None
            subject[name] = value
    if common_name is not None and subject is not None:
        raise table.error(None, "set common_name or subject, not both")
    renew_table = table.table("auto_renew")
    auto_renew = None if renew_table is None else _auto_renew(renew_table)
    key = table.string("key")
    url = auth = None
    known: tuple[str, ...] = (
        "method",
        "expiry_days",
        "common_name",
        "subject",
        "auto_renew",
        "key",
    )
    if method == "est":
        raw_url = table.string("url")
        url = None if raw_url is None else _url(table, "url", raw_url)
        auth = _auth(table)
        known += ("url", *AUTH_KEYS)
    table.refuse_others(known, f'for method = "{method}"')
    return IssuanceOptions(method, expiry, common_name, subject, url, auth, auto_renew, key)


def _preloaded(table: Table) -> dict[str, str | list[str]]:
    preloaded: dict[str, str | list[str]] = {}
    for cert_id, value in table.data.items():
        if isinstance(value, str):
            if urlsplit(value).scheme != "file":
                raise table.error(
                    cert_id, f"{value!r} is not a file:// URI (the only kind of preloaded cert)"
                )
            preloaded[cert_id] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            preloaded[cert_id] = list(value)
        else:
            raise table.error(
                cert_id,
                f"expected a file:// URI or an array of cert ids, found {type_name(value)}",
            )
    return preloaded


def _principal(entry: Table) -> Principal:
    uid = entry.integer("uid")
    if uid is None or not 0 <= uid <= U32_MAX:
        raise entry.error("uid", f"expected a uid (an integer 0 to {U32_MAX})")
    patterns = entry.strings("certs")
    if patterns is None:
        raise entry.error("certs", "is missing: expected an array of cert id patterns")
    entry.refuse_others(("uid", "certs"))
    return Principal(uid, patterns)


def parse_certd(data: dict[str, Any], source: str | Locator) -> CertdConfig:
    """Parse one already-merged table; `source` is the file name errors start with, or where
    each key came from (`table.load_merged_source`)."""
    top = Table(data, "", locator(source))
    homedir = top.string("homedir_path")
    if homedir is None:
        raise top.error("homedir_path", "is missing (certd keeps its certs under it)")
    max_requests = top.integer("max_requests", 1)
    margin = top.integer("not_before_margin_secs", 0)
    est = local_ca = None
    certs: dict[str, IssuanceOptions] = {}
    issuance = top.table("cert_issuance")
    if issuance is not None:
        for key in issuance.data:
            sub = issuance.table(key)
            assert sub is not None
            if key == "est":
                est = _est(sub)
            elif key == "local_ca":
                local_ca = _cert_key(sub)
            else:
                certs[key] = _options(sub)
    preloaded_table = top.table("preloaded_certs")
    preloaded = {} if preloaded_table is None else _preloaded(preloaded_table)
    raw_principals = top.take("principal")
    raw_principals = [] if raw_principals is None else raw_principals
    if not isinstance(raw_principals, list):
        raise top.error("principal", "expected an array of tables ([[principal]])")
    principals = [
        _principal(Table(raw, f"principal[{index}]", top.source))
        for index, raw in enumerate(raw_principals)
    ]
    endpoints = Endpoints()
    endpoint_table = top.table("endpoints")
    if endpoint_table is not None:
        endpoints = Endpoints(
            endpoint_table.string("aziot_certd"), endpoint_table.string("aziot_keyd")
        )
        endpoint_table.refuse_others(("aziot_certd", "aziot_keyd"))
    top.refuse_others(
        (
            "homedir_path",
            "max_requests",
            "cert_issuance",
            "preloaded_certs",
            "principal",
            "endpoints",
            "not_before_margin_secs",
        )
    )
    return CertdConfig(
        homedir=Path(homedir),
        max_requests=10 if max_requests is None else max_requests,
        est=est,
        local_ca=local_ca,
        certs=certs,
        preloaded_certs=preloaded,
        principal=principals,
        endpoints=endpoints,
        not_before_margin_secs=DEFAULT_NOT_BEFORE_MARGIN if margin is None else margin,
    )


def load_certd(paths: ServicePaths) -> CertdConfig:
    """config.toml merged with config.d/*.toml; a refusal names the file and line of the key."""
    source = load_merged_source(paths)
    return parse_certd(source.data, source)
