"""The original hands ids to libaziot-keys as C strings: what that conversion refuses."""

from __future__ import annotations

from aziot.actors.texts import invalid_parameter


def check_nul(name: str, text: str) -> None:
    """Rust's CString::new refuses NUL; its error counts the position in UTF-8 bytes."""
    position = text.find("\0")
    if position >= 0:
        offset = len(text[:position].encode("utf-8", "surrogatepass"))
        raise invalid_parameter(name, f"nul byte found in provided data at position: {offset}")
