"""Error texts every service answers with, as the original words them (spec/api.md §3.2, §4.1,
§5.3): clients and scripts match on them, so each is written once."""

from __future__ import annotations

from aziot.bus.errors import BusError, ErrorKind

# libaziot-keys' INVALID_PARAMETER, shown without its cause (keyd's 400 for a missing key too).
GENERIC_INVALID = "a parameter has an invalid value"
# A 500 never carries its cause; that goes to the log.
INTERNAL_ERROR = "internal error"


def invalid_parameter_text(name: str, cause: str) -> str:
    """The original's `InvalidParameter(name, cause)`, with its literal newline."""
    return f'parameter "{name}" has an invalid value\ncaused by: {cause}'


def invalid_parameter(name: str, cause: str, code: str = "") -> BusError:
    return BusError(ErrorKind.INVALID, invalid_parameter_text(name, cause), code)
