"""The request policy DPS and IoT Hub calls share (spec/provisioning.md §6), as a small
synchronous client over `httpx.Client`, meant to run in a worker thread.

Why synchronous: a TLS client certificate whose key is in keyd signs inside the handshake
(spec/tls-client-keys.md), and that signature is a request to the trio loop, so the HTTP call
must not run on the loop. A trio actor does

    assignment = await trio.to_thread.run_sync(dps.register, sign)

and `sign` / the `SSLContext`'s private_op reach keyd with `trio.from_thread.run`.

Policy, per request, as the original's `http_common::HttpRequest`:

* a per-attempt timeout covering connect, request, answer and body (the DPS status poll passes
  30 s, everything else `cloud_timeout_sec`);
* 429 → sleep 60+U(0,10), 120+U(0,20), 180+U(0,30), 300+U(0,30) s for attempts 1–4 and retry; a
  429 on attempt 5 is an error. Independent of `retries`, but the attempt counter is shared
  with transport retries (a 429 after one transport retry waits 120 s);
* a transport error or timeout → error if the attempt number exceeds `retries`, else sleep 3 s
  and retry;
* any other status is returned as it is: not retried here.

Beyond the original: the Authorization header can be a function called for every attempt, so a
request retried after a 60 s throttle carries a fresh SAS token instead of the expired one.

Errors are `CloudError`. `network` is true exactly where the original's error kind is
`NotConnected` or `TimedOut`, which identityd treats as "offline" (it answers from its backups):
no connection (refused, unreachable, DNS, a proxy that cannot be reached, and, as in the
original, a failed TLS handshake) and timeouts. The Hub client adds its own 500 / `networkError`
rule (§9).

No headers are sent beyond Host, Content-Length, `Content-Type: application/json` for a body
and the caller's (no User-Agent, Accept or Accept-Encoding; no cookies kept; no redirects
followed).

The proxy is the original's, as `aziot.actors.proxy` reads it.
"""

from __future__ import annotations

import email.utils
import http
import http.cookiejar
import json
import logging
import os
import random as _random
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
import httpx

from aziot.actors import proxy
from aziot.actors.proxy import masked

log = logging.getLogger(__name__)

CONTENT_TYPE_JSON = "application/json"
DEFAULT_TIMEOUT = 30.0  # seconds: the original's default per attempt (and the DPS poll's)
TRANSPORT_RETRY_SLEEP = 3.0  # seconds between attempts after a transport error
# 429 backoff for attempts 1-4: (base, maximum jitter) in seconds; a 5th 429 is an error.
THROTTLE_BACKOFF: tuple[tuple[float, float], ...] = ((60, 10), (120, 20), (180, 30), (300, 30))
SHOWN_BODY = 200  # characters of an unexpected body quoted in an error

Headers = Mapping[str, str]
# Headers for one attempt: called before every attempt (a fresh SAS token each time).
HeaderSource = Headers | Callable[[], Headers]


class CloudError(Exception):
    """A DPS or IoT Hub request failed. `str(error)` is `message`: the service's own message
    text when it sent one (what the original shows as the cause), else what went wrong.

    `status`: the HTTP status of the answer, if there was one. `network`: the failure is the
    network's (no connection, a timeout, or a Hub/gateway saying so): identityd may carry on
    offline. `code`: the service's numeric error code (DPS `errorCode`), when sent.
    `throttled`: gave up after a 429 (the 5th, or the first for a client that does not wait
    them out), `retry_after` its Retry-After in seconds if it gave one. `url`: the request's
    URL, for logs."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        network: bool = False,
        code: int | None = None,
        throttled: bool = False,
        retry_after: float | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.network = network
        self.code = code
        self.throttled = throttled
        self.retry_after = retry_after
        self.url = url

    def __repr__(self) -> str:
        return (
            f"CloudError({self.message!r}, status={self.status}, network={self.network}, "
            f"code={self.code})"
        )


@attrs.frozen
class CloudResponse:
    status: int
    headers: httpx.Headers
    body: bytes  # empty when the body was not read
    url: str

    @property
    def status_text(self) -> str:
        return status_text(self.status)


def status_text(status: int) -> str:
    """`404 Not Found`, as the original (hyper's StatusCode) prints a status."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def shown(body: bytes) -> str:
    text = " ".join(body[:SHOWN_BODY].decode("utf-8", "replace").split())
    more = f" … ({len(body)} bytes)" if len(body) > SHOWN_BODY else ""
    return repr(text) + more


def throttle_delay(attempt: int, random: Callable[[], float]) -> float | None:
    """Seconds to sleep after a 429 on `attempt` (1-based); None: give up."""
    if not 1 <= attempt <= len(THROTTLE_BACKOFF):
        return None
    base, jitter = THROTTLE_BACKOFF[attempt - 1]
    return base + jitter * random()


MAX_RETRY_AFTER = 3600.0  # seconds: a longer Retry-After is taken as this


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a 429's `Retry-After` asks for (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER)


def proxy_from_env(environ: Mapping[str, str]) -> str | None:
    """`proxy.proxy_from_env`, its refusal a `CloudError` (the original refuses to start
    identityd on an unusable proxy)."""
    try:
        return proxy.proxy_from_env(environ)
    except proxy.UnusableProxy as error:
        raise CloudError(str(error)) from None


class _Timeout(Exception):
    """The attempt's deadline passed while the body was still arriving."""


class CloudClient:
    """One connection pool for one TLS identity. `context` is the caller's: trust (OpenSSL
    defaults plus extra roots) and, for X.509 credentials, the client certificate with its key
    (`aziot.actors.remote_key.client_context`). A new identity cert needs a new client.

    `sleep` (also the DPS poll's), `random` (in [0, 1): the throttle jitter), `clock`
    (monotonic: attempt deadlines) and `now` (seconds since the epoch: SAS token expiry) are
    injectable for tests; `transport` replaces httpx's (tests only, and then no proxy is
    used). `environ`: where the proxy is read from (`proxy_from_env`), `os.environ` by default.
    A proxy URL that cannot be used raises `CloudError`. `wait_throttled=False`: a 429 is a
    `CloudError` at once (`throttled`, with its `retry_after`) instead of a minute's sleep, for
    a caller that has something better to do (a module read with a backup)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
        environ: Mapping[str, str] | None = None,
        wait_throttled: bool = True,
    ) -> None:
        self._wait_throttled = wait_throttled
        self.proxy = (
            None if transport else proxy_from_env(os.environ if environ is None else environ)
        )
        self.sleep = sleep
        self.now = now
        self._random = random
        self._clock = clock
        no_cookies = http.cookiejar.CookieJar(
            policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        )
        through = None
        if self.proxy is not None:
            log.debug("cloud calls go through the HTTPS proxy %s", masked(self.proxy))
            through = proxy.httpx_proxy(self.proxy, context)
        self._http = httpx.Client(
            verify=context,
            proxy=through,
            trust_env=False,
            follow_redirects=False,
            cookies=no_cookies,
            transport=transport,
        )
        for name in ("user-agent", "accept", "accept-encoding", "connection"):
            del self._http.headers[name]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        has_body: bool = False,
        headers: HeaderSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
        read_body: bool = True,
    ) -> CloudResponse:
        """One request under the policy. `body` is sent as JSON when `has_body` (so JSON `null`
        can be sent). `retries`: transport retries (`cloud_retries`; 0 for DPS polls).
        `read_body=False` leaves the answer's body unread (a DELETE's)."""
        content = None
        if has_body:
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        attempt = 1
        while True:
            attempt_headers = dict(headers() if callable(headers) else headers or {})
            if content is not None:
                attempt_headers["content-type"] = CONTENT_TYPE_JSON
            error: CloudError | None = None
            try:
                response = self._attempt(method, url, content, attempt_headers, timeout, read_body)
            except CloudError as failed:
                error = failed
            else:
                if response.status != 429:
                    return response
            if error is None:
                delay = throttle_delay(attempt, self._random)
                # Beyond the original, which ignores it: never back before the service's
                # Retry-After (plus up to 10% jitter, so a fleet does not come back in step).
                asked = retry_after(response.headers.get("retry-after"), self.now())
                if delay is not None and asked is not None:
                    delay = max(delay, asked * (1 + 0.1 * self._random()))
                if not self._wait_throttled:
                    raise CloudError(
                        "429: Too many requests",
                        status=429,
                        throttled=True,
                        retry_after=asked,
                        url=url,
                    )
                if delay is None:
                    log.warning(
                        "%s %s throttled (attempt %d of %d); giving up",
                        method,
                        url,
                        attempt,
                        len(THROTTLE_BACKOFF) + 1,
                    )
                    raise CloudError("429: Too many requests", status=429, throttled=True, url=url)
                log.warning(
                    "%s %s throttled (attempt %d of %d); sleeping %.0f s",
                    method,
                    url,
                    attempt,
                    len(THROTTLE_BACKOFF) + 1,
                    delay,
                )
                self.sleep(delay)
            else:
                log.warning(
                    "%s %s failed (attempt %d of %d): %s",
                    method,
                    url,
                    attempt,
                    retries + 1,
                    error,
                )
                if attempt > retries:
                    raise error
                self.sleep(TRANSPORT_RETRY_SLEEP)
            attempt += 1

    def _attempt(
        self,
        method: str,
        url: str,
        content: bytes | None,
        headers: dict[str, str],
        timeout: float,
        read_body: bool,
    ) -> CloudResponse:
        deadline = self._clock() + timeout
        request = self._http.build_request(
            method, url, content=content, headers=headers, timeout=httpx.Timeout(timeout)
        )
        try:
            response = self._http.send(request, stream=True)
            try:
                body = b""
                if read_body:
                    chunks = []
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                        if self._clock() > deadline:
                            raise _Timeout
                    body = b"".join(chunks)
                if self._clock() > deadline:
                    raise _Timeout
            finally:
                response.close()
        except (_Timeout, httpx.TimeoutException) as error:
            detail = "" if isinstance(error, _Timeout) else f" ({type(error).__name__})"
            raise CloudError(
                f"{url} did not answer within {timeout:g} s{detail}", network=True, url=url
            ) from None
        except httpx.ProxyError as error:
            raise CloudError(
                f"cannot connect to {url} through the proxy {masked(self.proxy or '')}: {error}",
                network=True,
                url=url,
            ) from None
        except httpx.ConnectError as error:
            cause = error.__cause__ or error.__context__
            through = f" through the proxy {masked(self.proxy)}" if self.proxy else ""
            if isinstance(cause, ssl.SSLError) or "SSL" in str(error):
                message = f"TLS handshake with {url}{through} failed: {error}"
            else:
                message = f"cannot connect to {url}{through}: {error}"
            raise CloudError(message, network=True, url=url) from None
        except httpx.HTTPError as error:
            raise CloudError(
                f"{method} {url} failed: {type(error).__name__}: {error}", url=url
            ) from None
        return CloudResponse(response.status_code, response.headers, body, url)


def check_json(response: CloudResponse) -> None:
    """A present Content-Type must contain `application/json` (case-insensitive); a missing
    one is accepted, as some servers send JSON without it."""
    content_type = response.headers.get("content-type")
    if content_type is not None and CONTENT_TYPE_JSON not in content_type.lower():
        raise CloudError(
            f"invalid Content-Type; expected JSON (the {response.status_text} answer from "
            f"{response.url} has {content_type!r}: {shown(response.body)})",
            status=response.status,
            url=response.url,
        )


# Turns a 4xx/5xx answer's parsed JSON body into the service's error (or raises CloudError
# itself when the body is not the service's error shape).
ServiceError = Callable[[Any, CloudResponse], CloudError]


def invalid_data(response: CloudResponse, what: str) -> CloudError:
    return CloudError(
        f"invalid {what} in the {response.status_text} answer from {response.url}: "
        f"{shown(response.body)}",
        status=response.status,
        url=response.url,
    )


def parse(response: CloudResponse, expected: Collection[int], service_error: ServiceError) -> Any:
    """The original's `parse`: an expected status → its JSON body; a 4xx/5xx → "HTTP error
    <status>" when the body is empty, else the service's error from the body (a body that is
    not the service's error shape is invalid data); any other status → "Expected one of".
    Call `check_json` first."""
    if response.status in expected:
        try:
            return json.loads(response.body)
        except ValueError:
            raise invalid_data(response, "JSON") from None
    if 400 <= response.status < 600:
        if not response.body:
            raise CloudError(
                f"HTTP error {response.status_text}", status=response.status, url=response.url
            )
        try:
            document = json.loads(response.body)
        except ValueError:
            raise invalid_data(response, "JSON error body") from None
        raise service_error(document, response)
    raise CloudError(
        f"Expected one of {sorted(expected)}, got {response.status_text}",
        status=response.status,
        url=response.url,
    )


def text_field(document: Any, *names: str) -> str | None:
    """The first of `names` present in `document` (a dict) as a string; None if none is."""
    if isinstance(document, dict):
        for name in names:
            value = document.get(name)
            if isinstance(value, str):
                return value
    return None
