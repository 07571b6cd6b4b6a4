"""HTTP/1.1 over a service's Unix socket, for aziotctl's commands (`system`, `check`).

One request, one connection: aziotctl asks a handful of questions, so nothing is pooled. Any
HTTP answer is a `Reply`, whatever its status; only "no answer at all" (no socket, refused,
closed without a reply, timed out) is a `UdsError`, whose text names the socket and the cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import httpx

DEFAULT_TIMEOUT = 10.0


class UdsError(Exception):
    """No HTTP answer came from the socket."""

    def __init__(self, socket: Path | str, cause: str):
        super().__init__(f"{socket}: {cause}")
        self.socket = Path(socket)
        self.cause = cause


@attrs.frozen
class Reply:
    status: int
    body: bytes
    content_type: str = ""

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.body)

    @property
    def message(self) -> str:
        """What the service said: its error body's `message`, else the body as text."""
        try:
            data = self.json()
        except ValueError:
            return self.body.decode("utf-8", "replace").strip()
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            return data["message"]
        return self.body.decode("utf-8", "replace").strip()


def request(
    socket: Path | str,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Reply:
    """`method path` (with its query, e.g. `?api-version=...`) on `socket`; `body` goes as JSON."""
    headers = {}
    content = None
    if body is not None:
        content = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    transport = httpx.HTTPTransport(uds=str(socket))
    try:
        with httpx.Client(transport=transport, timeout=timeout) as client:
            response = client.request(
                method, f"http://localhost{path}", content=content, headers=headers
            )
    except httpx.TimeoutException:
        raise UdsError(socket, f"no answer within {timeout:g} s") from None
    except httpx.ConnectError as error:
        raise UdsError(socket, f"cannot connect: {_cause(error)}") from None
    except httpx.RemoteProtocolError as error:
        raise UdsError(socket, f"closed the connection without an answer ({error})") from None
    except httpx.HTTPError as error:
        raise UdsError(socket, _cause(error)) from None
    return Reply(response.status_code, response.content, response.headers.get("content-type", ""))


def _cause(error: BaseException) -> str:
    """The OS error under httpx's wrappers (`[Errno 2] No such file or directory`)."""
    inner: BaseException | None = error
    while inner is not None:
        if isinstance(inner, OSError):
            return inner.strerror or str(inner)
        inner = inner.__cause__ or inner.__context__
    return str(error) or type(error).__name__
