"""HTTP/1.1 on one client connection: requests read in order, each answered in one write.

The connection's own task does everything: it finds the end of a request head in its buffer,
has llhttp (httptools) split and check it, hands the request to the service, and writes the
answer. No task, ASGI dict or event object per request. A head llhttp refuses is read again by
`head_parser` with the original's (httparse's) rules, so that such a request gets the
original's answer. Bodies are framed here: by Content-Length, or chunked.

Why the head is cut out before llhttp sees it: llhttp would run on into the body and the next
pipelined request, and httptools does not say where it stopped. Cutting heads ourselves keeps
every byte's owner known, so pipelining, a body left unread and a fallback parse are exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

import httptools
import trio

from .head_parser import MAX_HEAD, Head, HeadError, HeadTooLarge, head_end, parse_head

log = logging.getLogger(__name__)

RECV_SIZE = 65536
IDLE_TIMEOUT = 30.0  # a keep-alive connection must start and finish its next head within this
DRAIN_LIMIT = 1 << 20  # an unread body up to this size is skipped to keep the connection


class BodyError(Exception):
    """The request body could not be read; `status` says how the service answers it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One request's head, its caller, and its body still on the connection."""

    __slots__ = ("method", "target", "headers", "uid", "pid", "_connection")

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        uid: int,
        pid: int,
        connection: Http1Connection,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # names lower-cased
        self.uid = uid
        self.pid = pid
        self._connection = connection

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read_body(self, limit: int, timeout: float) -> bytes:
        """The whole body. BodyError(413) past `limit` bytes, 408 when it has not all come
        within `timeout` seconds, 400 if the client closed before sending it all."""
        return await self._connection.read_body(limit, timeout)


class Response:
    __slots__ = ("status", "body", "content_type")

    def __init__(self, status: int, body: bytes = b"", content_type: bytes | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type


Responder = Callable[[Request], Awaitable[Response]]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, _reason(code)) for code in range(100, 600)}


class _Clock:
    """The Date header, formatted once a second."""

    __slots__ = ("_second", "_header")

    def __init__(self) -> None:
        self._second = -1
        self._header = b""

    def date_header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        return self._header


CLOCK = _Clock()


def encode_response(response: Response, *, head_only: bool, close: bool) -> bytes:
    """Status line, headers and body as hyper writes them, in one buffer."""
    parts = [_STATUS_LINES[response.status]]
    if response.status != 204 and response.status >= 200:
        if response.content_type is not None:
            parts.append(b"content-type: " + response.content_type + b"\r\n")
        parts.append(b"content-length: %d\r\n" % len(response.body))
    parts.append(CLOCK.date_header())
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(response.body)
    return b"".join(parts)


def bare_error(status: int) -> bytes:
    """The answer to a request that cannot be read: no body, and the connection closes."""
    return (
        _STATUS_LINES[status]
        + b"content-length: 0\r\nconnection: close\r\n"
        + CLOCK.date_header()
        + b"\r\n"
    )


class _HeadParts:
    """llhttp's callbacks for one head."""

    __slots__ = ("url", "headers")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, piece: bytes) -> None:
        self.url += piece

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))


class _Closed(Exception):
    """The client closed the connection (or it must close): stop serving it."""


class Http1Connection:
    """Serves one accepted socket until the client leaves, an error closes it, or shutdown."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        respond: Responder,
        uid: int,
        pid: int,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._respond = respond
        self.uid = uid
        self.pid = pid
        self._idle_timeout = idle_timeout
        self._buffer = bytearray()
        # Since when a head is awaited (None while a request is served): the server's reaper
        # closes the connection past its idle timeout, so no timer is set per request.
        self.waiting_since: float | None = time.monotonic()
        self._eof = False
        # Framing of the request being served: bytes of body still to come, or chunked.
        self._remaining = 0
        self._chunked = False
        self._expect_continue = False
        self._reading = False  # inside read_body: if it never returned, the framing is lost
        self.idle = True  # waiting for a request: shutdown may close it at once
        self.sending = False  # inside a write: a client that stops reading can hold it
        self.stopping = False  # finish the request in hand, then close

    async def serve(self) -> None:
        try:
            while not self.stopping:
                if not await self._serve_one():
                    break
        except _Closed:
            pass
        except OSError as error:  # the client went away mid-write or mid-read
            log.debug("connection uid=%d pid=%d: %s", self.uid, self.pid, error)
        finally:
            self._sock.close()

    # -- reading -----------------------------------------------------------------------------

    async def _receive(self) -> bool:
        """Append what the client sends next to the buffer; False at end of stream."""
        if self._eof:
            return False
        data = await self._sock.recv(RECV_SIZE)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def _read_head(self) -> tuple[bytes, int] | None:
        """The next head's bytes and the size of the blank line ending it; None when the
        client closed or idled out between requests."""
        buffer = self._buffer
        while True:
            start = 0
            while buffer.startswith((b"\r\n", b"\n"), start):
                start += 2 if buffer[start] == 13 else 1
            if start:
                del buffer[:start]
            end, blank = head_end(buffer, 0)
            if end > MAX_HEAD:
                await self._send_and_close(bare_error(431))
            if end >= 0:
                self.idle = False
                self.waiting_since = None
                return bytes(buffer[:end]), blank
            if len(buffer) > MAX_HEAD:
                await self._send_and_close(bare_error(431))
            if self.stopping and not buffer:
                return None
            self.idle = not buffer
            if not await self._receive():
                if buffer:
                    await self._send_and_close(bare_error(400))
                return None

    async def _serve_one(self) -> bool:
        found = await self._read_head()
        if found is None:
            return False
        raw, blank = found
        try:
            request, keep_alive, head_only = self._parse(raw)
        except _BadHead as bad:
            await self._send_and_close(bare_error(bad.status))
        del self._buffer[: len(raw) + blank]
        try:
            response = await self._respond(request)
        except _BadBody:
            await self._send_and_close(bare_error(400))
        unread = self._remaining or self._chunked
        close = (
            not keep_alive
            or self.stopping
            or self._reading  # the service gave up on the body half-way (a timeout)
            or self._remaining > DRAIN_LIMIT
        )
        self.sending = True
        await self._send_all(encode_response(response, head_only=head_only, close=close))
        self.sending = False
        self.idle = True
        self.waiting_since = time.monotonic()
        if close:
            return False
        return not unread or await self._drain()

    def _parse(self, raw: bytes) -> tuple[Request, bool, bool]:
        """Split a head: llhttp first, httparse's rules where llhttp refuses it."""
        parts = _HeadParts()
        parser = httptools.HttpRequestParser(parts)
        try:
            parser.feed_data(raw + b"\r\n\r\n")
        except httptools.HttpParserUpgrade:
            pass  # Upgrade or CONNECT: the head is read all the same, and we stay on HTTP/1.1
        except httptools.HttpParserError:
            head = _parse_by_httparse_rules(raw)
            return self._request(head.method, head.target, head.headers, head.minor_version)
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _BadHead(400)
        method = parser.get_method().decode("ascii")
        return self._request(method, parts.url, parts.headers, int(version[2]))

    def _request(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], minor: int
    ) -> tuple[Request, bool, bool]:
        self._frame(headers)
        request = Request(method, target, headers, self.uid, self.pid, self)
        return request, _keep_alive(minor, headers), method == "HEAD"

    def _frame(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Body framing from a head that llhttp or httparse's rules accepted."""
        self._chunked = False
        self._remaining = 0
        self._expect_continue = False
        lengths = []
        for name, value in headers:
            if name == b"transfer-encoding":
                self._chunked = True  # both parsers refuse a coding list not ending in chunked
            elif name == b"content-length":
                lengths.append(value)
            elif name == b"expect":
                self._expect_continue = value.lower() == b"100-continue"
        if not self._chunked and lengths:
            self._remaining = int(lengths[0])

    # -- bodies ------------------------------------------------------------------------------

    async def read_body(self, limit: int, timeout: float) -> bytes:
        if not self._chunked and self._remaining <= min(limit, len(self._buffer)):
            return self._take(self._remaining)  # all here already: no timer, no wait
        self._reading = True
        with trio.move_on_after(timeout) as timer:
            body = await self._read_body(limit)
        if timer.cancelled_caught:
            raise BodyError(408, "deadline has elapsed")
        self._reading = False
        return body

    def _take(self, size: int) -> bytes:
        body = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._remaining = 0
        return body

    async def _read_body(self, limit: int) -> bytes:
        if self._expect_continue and not self._buffer and (self._remaining or self._chunked):
            self._expect_continue = False
            await self._send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self._chunked:
            return await self._read_chunked(limit)
        if self._remaining > limit:
            raise BodyError(413, "request body too large")
        while len(self._buffer) < self._remaining:
            if not await self._receive():
                raise BodyError(400, "error reading request body: connection closed")
        return self._take(self._remaining)

    async def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            line = await self._read_line()
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadBody from None
            if not size_text or size < 0:
                raise _BadBody
            if size == 0:
                while await self._read_line():  # trailers, up to the blank line
                    pass
                self._chunked = False
                return bytes(body)
            if len(body) + size > limit:
                raise BodyError(413, "request body too large")
            while len(self._buffer) < size + 2:
                if not await self._receive():
                    raise BodyError(400, "error reading request body: connection closed")
            if self._buffer[size : size + 2] != b"\r\n":
                raise _BadBody
            body += self._buffer[:size]
            del self._buffer[: size + 2]

    async def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > MAX_HEAD:
                raise _BadBody
            if not await self._receive():
                raise BodyError(400, "error reading request body: connection closed")

    async def _drain(self) -> bool:
        """Skip a body the service did not read, so the next request can be served; False
        when that fails (too large, malformed, or the client stopped sending)."""
        try:
            await self.read_body(DRAIN_LIMIT, self._idle_timeout)
        except (BodyError, _BadBody):
            return False
        return True

    # -- writing -----------------------------------------------------------------------------

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._sock.send(view)
            view = view[sent:]

    async def _send_and_close(self, data: bytes) -> None:
        self.sending = True
        await self._send_all(data)
        raise _Closed


class _BadHead(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _BadBody(Exception):
    """Chunked framing that cannot be read: the connection answers a bare 400 and closes."""


def _parse_by_httparse_rules(raw: bytes) -> Head:
    try:
        head = parse_head(raw + b"\r\n\r\n")
    except HeadTooLarge:
        raise _BadHead(431) from None
    except HeadError:
        raise _BadHead(400) from None
    assert head is not None  # complete: the blank line is there
    return head


def _keep_alive(minor_version: int, headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if b"close" in tokens:
                return False
            if b"keep-alive" in tokens:
                return True
    return minor_version == 1
