"""The façade's HTTP/1.1 connection, in process: a real UnixServer on a temp socket, a service
whose routes answer without a bus, and raw bytes from a trio client."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from aziot.api.head_parser import HeadError, HeadTooLarge, parse_head
from aziot.api.http import Request, Response, ServiceApp, encode_json, encode_large_json, route
from aziot.api.server import _PEERCRED, UnixServer, bind_unix, peer_credentials

BIG = 3 * 1024 * 1024  # well past a Unix socket's send buffer


async def echo(request: Request) -> Response:
    return Response(200, {"params": list(request.params), "uid": request.uid})


async def big(request: Request) -> Response:
    return Response(200, {"blob": "x" * BIG})


async def slow(request: Request) -> Response:
    await trio.sleep(0.5)
    return Response(200, {"slow": True})


async def body(request: Request) -> Response:
    return Response(200, {"body": request.body()})


APP = ServiceApp(
    "test",
    ["1"],
    [
        route("/echo/([^/]+)", GET=echo),
        route("/big", GET=big),
        route("/slow", GET=slow),
        route("/body", POST=body),
    ],
)


class Served:
    def __init__(self, path: Path, shutdown: trio.Event) -> None:
        self.path = path
        self.shutdown = shutdown

    async def connect(self) -> trio.SocketStream:
        return await trio.open_unix_socket(str(self.path))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    path = tmp_path / "run" / "test.sock"
    shutdown = trio.Event()
    server = UnixServer("test", APP, bind_unix(path), max_connections=50, idle_timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, shutdown)
        yield Served(path, shutdown)
        shutdown.set()


async def read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes, bytes]:
    """(status, head, body) of the next response; leftovers stay in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, f"closed mid-head: {bytes(buffer)!r}"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(buffer) < end + 4 + length:
        chunk = await stream.receive_some(65536)
        assert chunk, "closed mid-body"
        buffer += chunk
    payload = bytes(buffer[end + 4 : end + 4 + length])
    del buffer[: end + 4 + length]
    return int(head[9:12]), head, payload


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path}?api-version=1 HTTP/1.1\r\n{extra}\r\n".encode()


async def closed(stream: trio.SocketStream) -> bool:
    with trio.fail_after(5):
        try:
            return await stream.receive_some(1) == b""
        except trio.BrokenResourceError:
            return True


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(b"".join(get(f"/echo/{n}") for n in range(50)))
    buffer = bytearray()
    for n in range(50):
        status, _, payload = await read_response(stream, buffer)
        assert status == 200
        assert json.loads(payload)["params"] == [str(n)]
    assert not buffer


async def test_a_client_sending_one_byte_at_a_time_is_served(served: Served) -> None:
    body_bytes = b'{"a": [1, 2, 3]}'
    wire = (
        get("/echo/first")
        + b"POST /body?api-version=1 HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % len(body_bytes)
        + body_bytes
        + b"POST /body?api-version=1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        + b'4\r\n{"b"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
    )
    stream = await served.connect()
    for index in range(len(wire)):
        await stream.send_all(wire[index : index + 1])
        await trio.sleep(0)
    buffer = bytearray()
    assert json.loads((await read_response(stream, buffer))[2])["params"] == ["first"]
    assert json.loads((await read_response(stream, buffer))[2]) == {"body": {"a": [1, 2, 3]}}
    assert json.loads((await read_response(stream, buffer))[2]) == {"body": {"b": 1}}


async def test_a_response_larger_than_the_socket_buffer_arrives_whole(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(get("/big") + get("/echo/after"))
    buffer = bytearray()
    status, head, payload = await read_response(stream, buffer)
    assert status == 200
    assert len(json.loads(payload)["blob"]) == BIG
    assert json.loads((await read_response(stream, buffer))[2])["params"] == ["after"]


async def test_the_head_comes_in_the_first_read(served: Served) -> None:
    """The original's synchronous key client reads the head with a single recv."""
    stream = await served.connect()
    await stream.send_all(get("/echo/x"))
    first = await stream.receive_some(65536)
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\n\r\n" in first


async def test_idle_keep_alive_connections_are_closed(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(get("/echo/x"))
    assert (await read_response(stream, bytearray()))[0] == 200
    started = trio.current_time()
    assert await closed(stream)
    assert 0.4 < trio.current_time() - started < 3


async def test_a_head_never_finished_is_closed_after_the_idle_timeout(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(b"GET /echo/x?api-version=1 HTTP/1.1\r\nx-slow: ")
    assert await closed(stream)


async def test_shutdown_finishes_in_flight_requests_and_closes_idle_ones(served: Served) -> None:
    busy = await served.connect()
    idle = await served.connect()
    await idle.send_all(get("/echo/idle"))
    assert (await read_response(idle, bytearray()))[0] == 200
    await busy.send_all(get("/slow"))
    await trio.sleep(0.1)
    served.shutdown.set()
    assert await closed(idle)  # at once, not after its idle timeout
    status, head, payload = await read_response(busy, bytearray())
    assert status == 200 and json.loads(payload) == {"slow": True}
    assert b"connection: close" in head
    assert await closed(busy)
    with pytest.raises(OSError):
        await served.connect()


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"get /echo/x?api-version=1 HTTP/1.1\r\n\r\n", 400),  # methods are case-sensitive
        (b"FOO /echo/x?api-version=1 HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo/x?api-version=1 HTTP/1.1\n\n", 200),  # bare LF, as httparse takes it
        (b"GET /nothing?api-version=1 HTTP/1.1\r\n\r\n", 404),
        (b"GET /echo/x HTTP/1.1\r\n\r\n", 400),
    ],
)
async def test_what_llhttp_refuses_gets_the_originals_answer(
    served: Served, wire: bytes, status: int
) -> None:
    stream = await served.connect()
    await stream.send_all(wire)
    got, head, _ = await read_response(stream, bytearray())
    assert got == status, head


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET /echo/x?api-version=1 HTTP/2.0\r\n\r\n", 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
        (b"GET /echo/x y?api-version=1 HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo/x?api-version=1 HTTP/1.1\r\nx : y\r\n\r\n", 400),
        (b"POST /body?api-version=1 HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 400),
        (b"GET /echo/x?api-version=1 HTTP/1.1\r\nx: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
)
async def test_unreadable_heads_get_a_bare_error_and_the_connection_closes(
    served: Served, wire: bytes, status: int
) -> None:
    stream = await served.connect()
    await stream.send_all(wire)
    got, head, payload = await read_response(stream, bytearray())
    assert (got, payload) == (status, b"")
    assert b"connection: close" in head
    assert await closed(stream)


async def test_transfer_encoding_wins_over_content_length(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(
        b"POST /body?api-version=1 HTTP/1.1\r\ncontent-length: 99\r\n"
        b"transfer-encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n" + get("/echo/next")
    )
    buffer = bytearray()
    assert json.loads((await read_response(stream, buffer))[2]) == {"body": []}
    assert json.loads((await read_response(stream, buffer))[2])["params"] == ["next"]


async def test_an_unread_body_is_skipped_and_the_next_request_served(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(
        b"GET /echo/a?api-version=1 HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello" + get("/echo/b")
    )
    buffer = bytearray()
    assert json.loads((await read_response(stream, buffer))[2])["params"] == ["a"]
    assert json.loads((await read_response(stream, buffer))[2])["params"] == ["b"]


async def test_peer_uid_reaches_the_route(served: Served) -> None:
    stream = await served.connect()
    await stream.send_all(get("/echo/x"))
    assert json.loads((await read_response(stream, bytearray()))[2])["uid"] == os.getuid()


def test_head_parser_follows_httparse() -> None:
    head = parse_head(b"\r\nget /a?b HTTP/1.0\nHost: x\nX-Y:  z \n\nBODY")
    assert head is not None
    assert (head.method, head.target, head.minor_version) == ("get", b"/a?b", 0)
    assert head.headers == [(b"host", b"x"), (b"x-y", b"z")]
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n") is None  # incomplete
    for bad in (
        b"GET / HTTP/1.2\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
    ):
        with pytest.raises(HeadError):
            parse_head(bad)
    with pytest.raises(HeadTooLarge):
        parse_head(b"GET / HTTP/1.1\r\n" + b"x: y\r\n" * 101 + b"\r\n")


def test_peer_credentials_read_a_uid_above_2_31_as_unsigned() -> None:
    """struct ucred's uid is unsigned; reading it signed refused uids >= 2^31 (issue 11.5)."""
    raw = _PEERCRED.pack(1234, 2**31 + 5, 2**32 - 2)
    assert _PEERCRED.unpack(raw) == (1234, 2**31 + 5, 2**32 - 2)
    assert _PEERCRED.size == 12
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert peer_credentials(left)[0] == os.getuid()


@pytest.mark.parametrize(
    ("wire", "status", "message"),
    [
        # api-version first, before the route is even looked at
        (b"GET /nothing HTTP/1.1\r\n\r\n", 400, "api-version not specified"),
        (b"GET /nothing?api-version=2 HTTP/1.1\r\n\r\n", 400, 'invalid api-version "2"'),
        # then the route
        (b"GET /nothing?api-version=1 HTTP/1.1\r\n\r\n", 404, "not found"),
        # then the method, but a body that is not JSON wins over a wrong method
        (b"PATCH /body?api-version=1 HTTP/1.1\r\n\r\n", 400, "method not allowed"),
        (
            b"DELETE /body?api-version=1 HTTP/1.1\r\ncontent-length: 1\r\n\r\n{",
            422,
            "EOF while parsing an object at line 1 column 1",  # as serde_json: at the last byte
        ),
        (
            b"DELETE /body?api-version=1 HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            400,
            "method not allowed",
        ),
        # then the body rules
        (b"POST /body?api-version=1 HTTP/1.1\r\n\r\n", 400, "missing request body"),
        (
            b"PUT /body?api-version=1 HTTP/1.1\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n{}",
            415,
            "request body must be application/json",
        ),
        (
            b"POST /body?api-version=1 HTTP/1.1\r\ncontent-length: 2000000\r\n\r\n",
            413,
            "request body too large",
        ),
        (
            b"POST /body?api-version=1 HTTP/1.1\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n{}",
            400,
            "missing request body",  # a non-JSON body is no body, as in the original
        ),
    ],
)
async def test_the_framework_rules_apply_in_the_originals_order(
    served: Served, wire: bytes, status: int, message: str
) -> None:
    stream = await served.connect()
    await stream.send_all(wire)
    got, head, payload = await read_response(stream, bytearray())
    assert (got, json.loads(payload)) == (status, {"message": message}), head
    assert b"content-type: application/json\r\n" in head


@pytest.mark.parametrize("size", [5, 16 << 10, (16 << 10) + 1, 100_003])
def test_a_large_answer_encoded_in_slices_is_the_same_json(size: int) -> None:
    """Every character JSON escapes, at every offset of the slices' seams."""
    pattern = 'ab"\\\n\x00\x1f\u00e9\u2028\U0001f600 /'
    text = (pattern * (size // len(pattern) + 1))[:size]
    body = {"keyHandle": text, "n": 5, 'é"': "short", "list": [1, "a"]}
    assert encode_large_json(body) == encode_json(body)
    assert json.loads(encode_large_json(body)) == body
