"""The ceiling baseline: what trio serves with httptools and nothing of ours in between.

A bare accept loop on a Unix socket; per connection, llhttp parses, and each request is answered
in one write: `POST` computes the HMAC-SHA256 that keyd's sign route computes, `GET` answers a
fixed JSON body of a key handle's size. No routing, authorization, bus or handles: the figure
the façade is compared with in bench/keyd_bench.py.

Run: python bench/ceiling_server.py SOCKET_PATH
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import sys

import httptools
import trio

KEY = b"k" * 32
HANDLE = json.dumps({"keyHandle": "sr=" + "A" * 200 + "&sig=" + "B" * 44}).encode()


class _Requests:
    """llhttp's callbacks: completed (method, body) pairs in order."""

    def __init__(self) -> None:
        self.done: list[tuple[bytes, bytes]] = []
        self._body = b""
        self.parser = httptools.HttpRequestParser(self)

    def on_body(self, chunk: bytes) -> None:
        self._body += chunk

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_method(), self._body))
        self._body = b""


def answer(method: bytes, body: bytes) -> bytes:
    if method == b"POST":
        parameters = json.loads(body)["parameters"]  # an ECDSA digest is HMACed too
        message = base64.b64decode(parameters.get("message") or parameters["digest"])
        signature = hmac.new(KEY, message, hashlib.sha256).digest()
        payload = json.dumps({"signature": base64.b64encode(signature).decode()}).encode()
    else:
        payload = HANDLE
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        % len(payload)
        + payload
    )


async def serve_connection(sock: trio.socket.SocketType) -> None:
    requests = _Requests()
    with sock, contextlib.suppress(OSError):  # a client that leaves mid-answer
        while data := await sock.recv(65536):
            requests.parser.feed_data(data)
            if requests.done:
                out = b"".join(answer(method, body) for method, body in requests.done)
                requests.done.clear()
                await _send_all(sock, out)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def main(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(128)
    async with trio.open_nursery() as nursery:
        while True:
            client, _ = await listener.accept()
            nursery.start_soon(serve_connection, client)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
