"""Shared access signature (SAS) tokens for DPS and IoT Hub, built exactly as the original does
(spec/provisioning.md §7). Pure functions: the HMAC is the caller's `sign`, computed by keyd
through a key handle or by the TPM with the key DPS delivered.

    sr    = percent_encode(lowercase(audience))       # '/' and ':' stay literal
    se    = now + 30                                  # seconds since the epoch
    sig   = base64(sign(utf8(sr + "\\n" + se)))
    token = "SharedAccessSignature sr=<sr>&sig=<form(sig)>&se=<se>[&skn=<form(policy)>]"

Audiences: `<scope_id>/registrations/<registration_id>` (DPS, policy `registration`) and
`<iothub_hostname>/devices/<device_id>` (IoT Hub, no policy; the hub's name even when requests
go to a gateway).
"""

from __future__ import annotations

import base64
from collections.abc import Callable

PREFIX = "SharedAccessSignature "
TOKEN_LIFETIME = 30  # seconds: what the original gives every token
DPS_POLICY = "registration"

# sign(data) -> HMAC-SHA256(key, data), the raw 32 bytes. Synchronous; a cloud client calls it
# from its worker thread (reach keyd or the TPM with `trio.from_thread.run`).
Sign = Callable[[bytes], bytes]

# The original's set (http_common::PATH_SEGMENT_ENCODE_SET plus '='): C0 controls and DEL, space
# and `" # < > ? \` { } =`; bytes of non-ASCII characters are always encoded. '%' is not in it.
_ENCODE = frozenset(b' "#<>?`{}=')
_PATH_ENCODE = _ENCODE - {ord("=")}
# application/x-www-form-urlencoded leaves these literal and writes space as '+'.
_FORM_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789*-._")


def percent_encode(text: str) -> str:
    """`text` percent-encoded with the SAS set (uppercase hex, case of the rest kept). Also how
    the Hub client writes device and module ids into URL paths."""
    return _encode(text, _ENCODE)


def path_encode(text: str) -> str:
    """`text` percent-encoded with the URL path set (the SAS set without `=`): what the
    original's `Url::set_path` does to a DPS path. `/` and `%` stay literal."""
    return _encode(text, _PATH_ENCODE)


def _encode(text: str, encoded: frozenset[int]) -> str:
    out = []
    for byte in text.encode():
        if byte < 0x20 or byte >= 0x7F or byte in encoded:
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def resource_uri(audience: str) -> str:
    """The token's `sr`: the audience lower-cased, then percent-encoded."""
    return percent_encode(audience.lower())


def form_urlencode(value: str) -> str:
    """application/x-www-form-urlencoded, as Rust's `url::form_urlencoded` writes a value."""
    out = []
    for byte in value.encode():
        if byte in _FORM_SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def expiry_after(now: float, lifetime: int = TOKEN_LIFETIME) -> int:
    """`se` for a token made at `now` (seconds since the epoch): whole seconds, plus 30."""
    return int(now) + lifetime


def string_to_sign(audience: str, expiry: int) -> bytes:
    """The bytes `sign` is given: `<sr>\\n<se>` in UTF-8."""
    return f"{resource_uri(audience)}\n{expiry}".encode()


def sas_token(audience: str, expiry: int, sign: Sign, *, policy: str | None = None) -> str:
    """The Authorization header value for `audience`, valid until `expiry` (seconds since the
    epoch; see `expiry_after`), signed by `sign`. `policy` is `"registration"` for DPS, None
    for IoT Hub. Parameter order is the original's: `sr`, `sig`, `se`, `skn`."""
    sr = resource_uri(audience)
    se = str(int(expiry))
    mac = sign(f"{sr}\n{se}".encode())
    if not isinstance(mac, bytes | bytearray) or not mac:
        raise ValueError("sign returned no signature bytes")
    sig = base64.b64encode(bytes(mac)).decode("ascii")
    token = f"{PREFIX}sr={sr}&sig={form_urlencode(sig)}&se={se}"
    if policy is not None:
        token += f"&skn={form_urlencode(policy)}"
    return token


def dps_audience(scope_id: str, registration_id: str) -> str:
    return f"{scope_id}/registrations/{registration_id}"


def hub_audience(iothub_hostname: str, device_id: str, module_id: str | None = None) -> str:
    """A device's audience; with `module_id`, a module's (what a module signs telemetry with)."""
    audience = f"{iothub_hostname}/devices/{device_id}"
    return audience if module_id is None else f"{audience}/modules/{module_id}"


def hmac_sign(key: bytes) -> Sign:
    """A `sign` computing HMAC-SHA256 with `key` in this process (tests, tools)."""
    import hashlib
    import hmac

    def sign(data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.sha256).digest()

    return sign
