"""A request head read by the rules of the original's parser (hyper on httparse).

llhttp, our fast parser, is stricter than httparse in a few places a client can reach: it
refuses methods it does not know (`get`, `FOO`), bare LF line ends, and a Content-Length beside
`Transfer-Encoding: chunked`. For such a request the connection falls back to this module, so
that it gets the answer the original gives, not a bare 400. Only the head is read here; the
connection frames the body (see `Http1Connection`).
"""

from __future__ import annotations

import re

import attrs

MAX_HEAD = 64 * 1024  # hyper's buffer is larger; no request of any service comes close
MAX_HEADERS = 100  # httparse's limit in hyper

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")


class HeadError(Exception):
    """The head is not HTTP/1.x as httparse reads it: answered with a bare 400."""


class HeadTooLarge(HeadError):
    """The head is larger than MAX_HEAD or has more than MAX_HEADERS: answered with 431."""


@attrs.frozen
class Head:
    method: str
    target: bytes
    minor_version: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in order


def parse_head(data: bytes) -> Head | None:
    """The head at the start of `data`, or None while it is incomplete."""
    start = 0
    while data.startswith((b"\r\n", b"\n"), start):  # httparse skips empty lines before a request
        start += 2 if data.startswith(b"\r\n", start) else 1
    end, _ = head_end(data, start)
    if end < 0:
        if len(data) > MAX_HEAD:
            raise HeadTooLarge("request head too large")
        return None
    if end > MAX_HEAD:
        raise HeadTooLarge("request head too large")
    lines = [line.removesuffix(b"\r") for line in data[start:end].split(b"\n")]
    found = _REQUEST_LINE.fullmatch(lines[0])
    if found is None:
        raise HeadError("invalid request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadTooLarge("too many headers")
    headers = []
    for line in lines[1:]:
        header = _HEADER.fullmatch(line)
        if header is None:
            raise HeadError("invalid header")
        headers.append((header[1].lower(), header[2]))
    _check_framing(headers)
    method, target, minor = found.groups()
    return Head(method.decode("ascii"), target, int(minor), headers)


def head_end(data: bytes, start: int) -> tuple[int, int]:
    """Where the head's last line ends, and the length of the blank line after it."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start)
    mixed = data.find(b"\n\r\n", start)
    candidates = [(i, n) for i, n in ((crlf, 4), (lf, 2), (mixed, 3)) if i >= 0]
    return min(candidates) if candidates else (-1, 0)


def _check_framing(headers: list[tuple[bytes, bytes]]) -> None:
    """hyper's rules: Transfer-Encoding wins over Content-Length and must end in chunked;
    repeated Content-Lengths must agree."""
    encodings = [value for name, value in headers if name == b"transfer-encoding"]
    if encodings:
        last = b",".join(encodings).split(b",")[-1].strip().lower()
        if last != b"chunked":
            raise HeadError("transfer-encoding does not end in chunked")
        return
    lengths = {value for name, value in headers if name == b"content-length"}
    if len(lengths) > 1 or not all(value.isdigit() for value in lengths):
        raise HeadError("invalid content-length")
