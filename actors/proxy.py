"""The HTTPS proxy of calls leaving the device (DPS, IoT Hub, EST), read as the original reads it.

http-common's `get_proxy_uri`: `HTTPS_PROXY`, else `https_proxy`, for every call: no `NO_PROXY`,
and `HTTP_PROXY` / `ALL_PROXY` do not count (every such call is HTTPS). Credentials in its URL
become Basic proxy authorization; an `https://` proxy is reached with the caller's TLS
settings, client certificate included. httpx's own environment handling (`trust_env`) must be
off wherever this is used: it would honour `NO_PROXY`, prefer `https_proxy` to `HTTPS_PROXY`
and read `~/.netrc`, none of which the original does.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import httpx

# Where the proxy is read from, first set (non-empty) first.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy")
PROXY_SCHEMES = ("http", "https")


class UnusableProxy(ValueError):
    """The variable's value is no proxy URL; the message names it (password masked)."""


def masked(url: str) -> str:
    """`url` with the password in its user info shown as `******` (as the original logs it)."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not (sep and at and colon):
        return url
    return f"{scheme}://{user}:******@{host}{slash}{path}"


def proxy_from_env(environ: Mapping[str, str]) -> str | None:
    """The proxy URL, or None. An empty variable counts as unset (the original would refuse to
    start). A value that cannot be used raises `UnusableProxy`."""
    for name in PROXY_VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            continue
        problem = None
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as error:
            problem = str(error)
        else:
            if url.scheme not in PROXY_SCHEMES:
                problem = "a proxy URL starts with http:// or https://"
            elif not url.host:
                problem = "it names no host"
        if problem is not None:
            raise UnusableProxy(f"{name}={masked(value)!r} is not a usable proxy URL: {problem}")
        return value
    return None


def httpx_proxy(url: str, context: ssl.SSLContext) -> httpx.Proxy:
    """The proxy for an httpx client whose calls use `context`."""
    tls_to_proxy = context if url.lower().startswith("https:") else None
    return httpx.Proxy(url, ssl_context=tls_to_proxy)
