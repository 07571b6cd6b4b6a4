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

from .loader import ConfigError, ServicePaths, load_merged, type_name

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


class _Table:
    """A TOML table being read: every key taken is remembered, so the rest can be refused."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a table, found {type_name(data)}")
        self.data = data
        self.where = where
        self._taken: set[str] = set()

    def _get(self, key: str, kinds: tuple[type, ...], expected: str) -> Any:
        self._taken.add(key)
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.name(key)}: expected {expected}, found a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.name(key)}: expected {expected}, found {type_name(value)}")
        return value

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def string(self, key: str) -> str | None:
        value: str | None = self._get(key, (str,), "a string")
        return value

    def integer(self, key: str) -> int | None:
        value: int | None = self._get(key, (int,), "an integer")
        return value

    def boolean(self, key: str) -> bool | None:
        value: bool | None = self._get(key, (bool,), "true or false")
        return value

    def table(self, key: str) -> _Table | None:
        value = self._get(key, (dict,), "a table")
        return None if value is None else _Table(value, self.name(key))

    def strings(self, key: str) -> list[str] | None:
        value = self._get(key, (list,), "an array of strings")
        if value is None:
            return None
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self.name(key)}: expected an array of strings, found {type_name(item)}"
                )
        return list(value)

    def take(self, key: str) -> None:
        self._taken.add(key)

    def refuse_others(self, known: str) -> None:
        unknown = sorted(set(self.data) - self._taken)
        if unknown:
            names = ", ".join(self.name(k) for k in unknown)
            raise ConfigError(f"unknown key {names}; {known}")


def _pair(table: _Table, first: str, second: str) -> tuple[str, str] | None:
    """Two keys that only mean something together: both, or neither."""
    a, b = table.string(first), table.string(second)
    if (a is None) != (b is None):
        given, missing = (first, second) if b is None else (second, first)
        raise ConfigError(
            f"{table.name(given)} is set but {table.name(missing)} is not; set both or neither"
        )
    return None if a is None or b is None else (a, b)


def _auth(table: _Table) -> EstAuth | None:
    basic = _pair(table, "username", "password")
    identity = _pair(table, "identity_cert", "identity_pk")
    bootstrap = _pair(table, "bootstrap_identity_cert", "bootstrap_identity_pk")
    if bootstrap is not None and identity is None:
        raise ConfigError(
            f"{table.name('bootstrap_identity_cert')} is set but {table.name('identity_cert')} "
            "is not: the bootstrap identity is only used to obtain the EST identity cert, "
            "whose ids identity_cert and identity_pk name"
        )
    if basic is None and identity is None:
        return None
    return EstAuth(
        basic=BasicAuth(*basic) if basic else None,
        identity=CertKey(*identity) if identity else None,
        bootstrap_identity=CertKey(*bootstrap) if bootstrap else None,
    )


def _url(value: str, where: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(f"{where}: {value!r} is not an http:// or https:// URL")
    if parts.scheme == "http":
        log.warning(
            "%s: EST server URL %s is unencrypted HTTP, which exposes the device to "
            "man-in-the-middle attacks; configure HTTPS on the EST server",
            where,
            value,
        )
    return value


def _est(table: _Table) -> Est:
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
            urls[cert_id] = _url(value, url_table.name(cert_id))
    table.refuse_others(
        "known: trusted_certs, username, password, identity_cert, identity_pk, "
        "bootstrap_identity_cert, bootstrap_identity_pk, identity_auto_renew, urls"
    )
    return Est(trusted, auth, auto_renew, urls)


def _auto_renew(renew: _Table) -> AutoRenew:
    # In the original all three keys are required once the table is present.
    values = {}
    for key in ("threshold", "retry"):
        value = renew.string(key)
        if value is None:
            raise ConfigError(f"{renew.name(key)} is missing")
        values[key] = value
    rotate = renew.boolean("rotate_key")
    if rotate is None:
        raise ConfigError(f"{renew.name('rotate_key')} is missing")
    renew.refuse_others("known: rotate_key, threshold, retry")
    return AutoRenew(rotate, values["threshold"], values["retry"])


def _cert_key(table: _Table) -> CertKey:
    pair = _pair(table, "cert", "pk")
    if pair is None:
        raise ConfigError(f"{table.where}: needs cert (a cert id) and pk (a key id)")
    table.refuse_others("known: cert, pk")
    return CertKey(*pair)


def _options(table: _Table) -> IssuanceOptions:
    method = table.string("method")
    if method not in METHODS:
        found = "nothing" if method is None else repr(method)
        raise ConfigError(
            f"{table.name('method')}: expected one of {', '.join(METHODS)}, found {found} "
            '(each entry is a table, e.g. { method = "local_ca" })'
        )
    expiry = table.integer("expiry_days")
    if expiry is not None and expiry <= 0:
        raise ConfigError(f"{table.name('expiry_days')}: expiry_days must be greater than 0")
    if expiry is not None and expiry > U32_MAX:
        raise ConfigError(f"{table.name('expiry_days')}: {expiry} is more than {U32_MAX}")
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
        raise ConfigError(f"{table.where}: set common_name or subject, not both")
    renew_table = table.table("auto_renew")
    auto_renew = None if renew_table is None else _auto_renew(renew_table)
    key = table.string("key")
    url = auth = None
    known = "method, expiry_days, common_name, subject, auto_renew, key"
    if method == "est":
        raw_url = table.string("url")
        url = None if raw_url is None else _url(raw_url, table.name("url"))
        auth = _auth(table)
        known += ", url, username, password, identity_cert, identity_pk, bootstrap_identity_cert, "
        known += "bootstrap_identity_pk"
    table.refuse_others(f"known for method {method}: {known}")
    return IssuanceOptions(method, expiry, common_name, subject, url, auth, auto_renew, key)


def _preloaded(table: _Table) -> dict[str, str | list[str]]:
    preloaded: dict[str, str | list[str]] = {}
    for cert_id, value in table.data.items():
        where = table.name(cert_id)
        if isinstance(value, str):
            if urlsplit(value).scheme != "file":
                raise ConfigError(
                    f"{where}: {value!r} is not a file:// URI (the only kind of preloaded cert)"
                )
            preloaded[cert_id] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            preloaded[cert_id] = list(value)
        else:
            raise ConfigError(
                f"{where}: expected a file:// URI or an array of cert ids, found {type_name(value)}"
            )
    return preloaded


def parse_certd(data: dict[str, Any], source: str) -> CertdConfig:
    try:
        return _parse(data)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _parse(data: dict[str, Any]) -> CertdConfig:
    top = _Table(data, "")
    homedir = top.string("homedir_path")
    if homedir is None:
        raise ConfigError("homedir_path is missing (certd keeps its certs under it)")
    max_requests = top.integer("max_requests")
    if max_requests is not None and max_requests < 1:
        raise ConfigError("max_requests must be at least 1")
    margin = top.integer("not_before_margin_secs")
    if margin is not None and margin < 0:
        raise ConfigError("not_before_margin_secs must not be negative")
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
    principals = []
    top.take("principal")
    raw_principals = data.get("principal", [])
    if not isinstance(raw_principals, list):
        raise ConfigError("principal: expected an array of tables ([[principal]])")
    for index, raw in enumerate(raw_principals):
        entry = _Table(raw, f"principal[{index}]")
        uid = entry.integer("uid")
        if uid is None or not 0 <= uid <= U32_MAX:
            raise ConfigError(f"{entry.name('uid')}: expected a uid (an integer 0 to {U32_MAX})")
        patterns = entry.strings("certs")
        if patterns is None:
            raise ConfigError(f"{entry.name('certs')} is missing")
        entry.refuse_others("known: uid, certs")
        principals.append(Principal(uid, patterns))
    endpoints = Endpoints()
    endpoint_table = top.table("endpoints")
    if endpoint_table is not None:
        endpoints = Endpoints(
            endpoint_table.string("aziot_certd"), endpoint_table.string("aziot_keyd")
        )
        endpoint_table.refuse_others("known: aziot_certd, aziot_keyd")
    top.refuse_others(
        "known: homedir_path, max_requests, cert_issuance, preloaded_certs, principal, "
        "endpoints, not_before_margin_secs"
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
    return parse_certd(load_merged(paths), f"{paths.config_file} (+ {paths.config_dir}/*.toml)")
