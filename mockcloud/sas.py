"""Shared access signature (SAS) tokens as DPS and IoT Hub use them (provisioning.md §7).

A token is

    SharedAccessSignature sr=<resource>&sig=<signature>&se=<expiry>[&skn=<policy>]

* `sr`: the audience (`<scope>/registrations/<registration id>` for DPS,
  `<hub>/devices/<device>` or `<hub>/devices/<device>/modules/<module>` for IoT Hub),
  lower-cased and percent-encoded. The original encodes only controls, non-ASCII bytes, space and
  `" # < > ? \\` { } =` and leaves `/` and `:` alone; common SDKs send `%2f`. Both verify here.
* `se`: expiry, seconds since the Unix epoch, as a decimal string.
* `sig`: base64 of HMAC-SHA256 over the UTF-8 bytes of `<sr>\\n<se>`, with `sr` exactly as it
  appears in the token (still encoded), keyed with the base64-decoded symmetric key;
  form-urlencoded in the token (`+` → `%2B`, `/` → `%2F`, `=` → `%3D`).
* `skn`: policy name; the original sends `registration` to DPS and nothing to IoT Hub.

Verification (`verify`) checks, in this order: the form, the resource (case-insensitively, after
percent-decoding, equal to the expected audience), the expiry (a token with `se` in the past is
expired; `se` equal to now is still good), and the signature against any of the given keys.
Group enrollments (DPS symmetric key groups) give each device the key
`base64(HMAC-SHA256(base64decode(group key), registration id))` (`derive_device_key`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, unquote_to_bytes

PREFIX = "SharedAccessSignature "
DEFAULT_TTL = 30  # seconds: what the original gives each token

# Bytes the original percent-encodes in `sr` (http_common::PATH_SEGMENT_ENCODE_SET plus `=`);
# controls and non-ASCII bytes are always encoded.
_SR_ENCODE = frozenset(b' "<>`#?{}=')
# application/x-www-form-urlencoded: these stay literal, space becomes '+'.
_FORM_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789*-._")

Reason = Literal["malformed", "resource", "expired", "signature", "policy"]


class SasError(Exception):
    """A token that does not verify. `reason` says which check failed."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


def encode_resource(audience: str) -> str:
    """`sr` as the original computes it: lower-cased, then percent-encoded (uppercase hex)."""
    out = []
    for byte in audience.lower().encode():
        if byte < 0x20 or byte >= 0x7F or byte in _SR_ENCODE:
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def form_urlencode(value: str) -> str:
    """application/x-www-form-urlencoded, as Rust's `url::form_urlencoded` writes it."""
    out = []
    for byte in value.encode():
        if byte in _FORM_SAFE:
            out.append(chr(byte))
        elif byte == 0x20:
            out.append("+")
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def decode_key(key: str | bytes) -> bytes:
    """Key bytes from a base64 text key (as DPS and IoT Hub show keys), or the bytes as given."""
    if isinstance(key, bytes):
        return key
    try:
        return base64.b64decode(key, validate=True)
    except binascii.Error as error:
        raise ValueError(f"not a base64 key: {error}") from None


def signature(key: str | bytes, sr: str, se: str | int) -> str:
    """base64(HMAC-SHA256(key, "<sr>\\n<se>")), with `sr` as it appears in the token."""
    mac = hmac.new(decode_key(key), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def make_token(
    audience: str,
    key: str | bytes,
    *,
    expiry: int | None = None,
    ttl: int = DEFAULT_TTL,
    policy: str | None = None,
    now: float | None = None,
) -> str:
    """A token exactly as the original builds one (parameter order `sr`, `sig`, `se`, `skn`).
    `key` is the base64 text of a key, or its raw bytes. `expiry` defaults to now + `ttl`."""
    if expiry is None:
        expiry = int(time.time() if now is None else now) + ttl
    sr = encode_resource(audience)
    sig = signature(key, sr, expiry)
    token = f"{PREFIX}sr={sr}&sig={form_urlencode(sig)}&se={expiry}"
    if policy is not None:
        token += f"&skn={form_urlencode(policy)}"
    return token


def derive_device_key(group_key: str | bytes, registration_id: str) -> str:
    """A group enrollment member's key: base64(HMAC-SHA256(group key, registration id))."""
    mac = hmac.new(decode_key(group_key), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


@dataclass(frozen=True)
class SasToken:
    sr: str  # as sent, still percent-encoded: what the signature covers
    resource: str  # percent-decoded
    sig: str  # base64, form-decoded
    se: str  # as sent
    expiry: int
    skn: str | None

    @classmethod
    def parse(cls, header: str) -> SasToken:
        """Parse an Authorization header value (or the token alone, without the prefix)."""
        text = header.strip()
        if text.startswith(PREFIX):
            text = text[len(PREFIX) :].strip()
        elif text.lower().startswith(PREFIX.lower()) or " " in text:
            raise SasError("malformed", "not a SharedAccessSignature")
        fields: dict[str, str] = {}
        for part in text.split("&"):
            name, sep, value = part.partition("=")
            if not sep or name in fields:
                raise SasError("malformed", f"bad or repeated token field {name!r}")
            fields[name] = value
        unknown = set(fields) - {"sr", "sig", "se", "skn"}
        if unknown:
            raise SasError("malformed", f"unknown token fields {sorted(unknown)}")
        if not {"sr", "sig", "se"} <= fields.keys():
            raise SasError("malformed", "token needs sr, sig and se")
        se = fields["se"]
        if not se.isdigit():
            raise SasError("malformed", f"se {se!r} is not a number")
        try:
            resource = unquote_to_bytes(fields["sr"]).decode()
        except UnicodeDecodeError:
            raise SasError("malformed", "sr is not UTF-8") from None
        skn = fields.get("skn")
        return cls(
            sr=fields["sr"],
            resource=resource,
            sig=unquote(fields["sig"].replace("+", " ")),
            se=se,
            expiry=int(se),
            skn=None if skn is None else unquote(skn.replace("+", " ")),
        )

    def signed_with(self, key: str | bytes) -> bool:
        expected = signature(key, self.sr, self.se)
        return hmac.compare_digest(expected.encode(), self.sig.encode())


def verify(
    header: str,
    *,
    audience: str,
    keys: Iterable[str | bytes],
    now: float | None = None,
    policy: str | None = None,
) -> SasToken:
    """The parsed token if it is for `audience`, unexpired and signed with one of `keys`;
    otherwise `SasError`. With `policy`, `skn` must equal it (DPS wants `registration`)."""
    token = SasToken.parse(header)
    if token.resource.lower().rstrip("/") != audience.lower().rstrip("/"):
        raise SasError("resource", f"token is for {token.resource!r}, not {audience!r}")
    if policy is not None and token.skn != policy:
        raise SasError("policy", f"token policy {token.skn!r}, expected {policy!r}")
    current = time.time() if now is None else now
    if token.expiry < int(current):
        raise SasError("expired", f"token expired at {token.expiry} (now {int(current)})")
    if not any(token.signed_with(key) for key in keys):
        raise SasError("signature", "signature does not match")
    return token
