"""msgpack encoding of bus envelopes.

Messages are encoded even between actors in one process: no object is shared, and a service can
later move to its own process with the same bytes on a socket. Bytes stay msgpack `bin`.
"""

from __future__ import annotations

from typing import Any

import msgpack

_packer_options = {"use_bin_type": True}
_unpacker_options = {"raw": False, "strict_map_key": False}


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, **_packer_options)


def decode(data: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(data, **_unpacker_options)
    if not isinstance(message, dict):
        raise ValueError(f"a bus message must be a map, got {type(message).__name__}")
    return message
