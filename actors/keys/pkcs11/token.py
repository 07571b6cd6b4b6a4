"""Blocking PKCS#11 token layer for keyd.

One :class:`Pkcs11Library` wraps one PKCS#11 module (``.so``) loaded through python-pkcs11.
It is deliberately single-threaded: python-pkcs11 calls ``C_Initialize`` without OS locking
callbacks, so modules such as SoftHSM are not safe to call from several threads. The keys actor
owns one worker thread and makes every call on it; nothing here starts threads or takes locks.

Keys are addressed the way libaziot-keys addresses them: the key id is the object label
(``CKA_LABEL``) on the token a :class:`Pkcs11Uri` selects. The URI's own ``object`` attribute is
not consulted by the methods; callers pass the label explicitly (``uri.object_label`` for
preloaded keys, the key id otherwise).

Errors (all subclasses of :class:`Pkcs11Error`):

* :class:`InvalidParameter` – the request cannot work (wrong key type, bad usage, unknown
  algorithm, …); keyd answers 400. :class:`KeyNotFound` and :class:`KeyExists` refine it.
* :class:`MechanismMissing` – the token does not offer a mechanism the operation needs; the
  mechanism name (``CKM_…``) is in the message and in ``.mechanism``.
* :class:`Pkcs11Error` itself – anything else the token reports; ``.ckr`` carries the token's
  own return code name (``CKR_…``) so operators see the real cause (lessons.md row 2).

Crash safety. A token is a store like a disk, and SoftHSM's is not atomic: each object is a file
that SoftHSM rewrites in place (``ftruncate`` to 0, then one ``write``) on every attribute change,
and an object being created is rewritten once per default attribute, gets its label, and only then
its key value. A SIGKILL can so leave an empty file (the object is gone: a relabelled key is
lost), a key under its label without its value (found, but every use fails), or, inside
``C_CopyObject``, a duplicate under the source's label. So no write here changes an object that
must survive, and a key only appears under its label complete:

1. *stage*: the new objects are made (generated, imported or copied from a move's source) under a
   pending label that no key id can have (it starts with NUL), with a fresh ``CKA_ID``;
2. *commit*: each staged object is copied to the key's label, public half first, so the copy of
   the private or secret key is the instant the write takes effect (a copy is complete when it
   appears under its new label);
3. *finish*: what the write replaces (the old key, a move's source) is destroyed, then the staged
   objects. Destruction is an ``unlink``: atomic.

:meth:`Pkcs11Library.reconcile` runs when a token is first opened logged in: a staged write whose
commit copy exists is finished, any other is undone, duplicates left by a copy and our keys left
are removed; each repair is logged. (SoftHSM's own skeletons of a creation it had not finished,
objects with its default empty label and id, carry nothing of ours and stay.)

Tokens without ``C_CopyObject`` (tpm2-pkcs11 1.9 answers CKR_FUNCTION_NOT_SUPPORTED; probed once
per library with invalid handles, see :func:`_probe_copy_object`) commit step 2 by setting each
staged object's ``CKA_LABEL`` to the key's label instead, public half first. tpm2-pkcs11 keeps
each object as one SQLite row (attributes and TPM blobs together) and both its INSERT and the
UPDATE behind ``C_SetAttributeValue`` are transactions, so an object appears whole and a relabel
or a destruction is atomic. A kill at any instant of a creation then leaves: nothing of ours
(before or during the generation); a staged pair, or one staged half (the public one inserted
first); the public half under the label and the private one staged; or the private half under
the label (committed). The start-up repair is the one above: no private key with the label and
the write's id means "undo", which destroys the staged objects and any public half already
relabelled; a committed write has nothing staged left.

Replacing a key on such a token (a move ``<id>-temp`` → ``<id>``, the rotation certd and
identityd do on renewal; a secret import over a secret) cannot keep the old key under its label
until the new one is there (two private keys would share the label), so the old key is first
*retired*: relabelled to a retiring label that names the write, its label, a move's source and
the ``CKA_ID`` of the new key (``\\0aziot-retiring\\0<kind>\\0<label>\\0<source>\\0<new id hex>``;
no key id holds NUL). A move, whose source pair is itself the new key (no copy, so no staging):

1. *retire*: the old pair's public half, then its private half, to the retiring label;
2. *commit*: the source's public half, then its private half, to the key's label; the private
   half's relabel is the commit point;
3. *finish*: the retired objects are destroyed, public half first.

The repair decides by what it finds, for each retiring label: a private key under the named
label with the named new id → the write committed → *roll forward*: destroy what is retiring;
none → *roll back*: first the objects under the label with the new id (a move's public half,
relabelled before the kill) go back to the source's label, then the retiring objects back to
the label. The new id, not "some key under the label", is the test, because until step 1 ends
the old private half is itself under the label. Every instant of a move onto ``L`` from ``F``
(old pair O, source pair S with id N, distinct from O's: checked before any write):

* before 1, or during any single relabel or destruction: the state before or after it;
* O's public half retiring, its private under ``L``: no N under ``L`` → roll back; ``L`` works
  meanwhile (a public half is found by id wherever it is);
* O retiring whole, S under ``F``: roll back (``L`` holds no key for that instant; keyd's token
  worker runs one operation at a time, so only a kill can observe it);
* O retiring, S's public half under ``L``, its private under ``F``: roll back, S's public half to
  ``F`` first, then O to ``L``: the old key whole, the source whole under ``F`` for certd's own
  start-up repair to move again or delete;
* O retiring, S under ``L`` (committed): roll forward; also with O's public half already
  destroyed and only its private half retiring;
* nothing retiring: the move finished (or never began).

A roll back or roll forward cut short is taken up by the next start the same way: each of its
steps is one atomic write and leaves a state listed above (a roll back relabels S's public
half first, so no instant has O back under ``L`` with S's half beside it and nothing retiring).
A move onto a free label has nothing to retire; killed between S's two relabels it leaves S's
public half under ``L`` and its private under ``F`` (``F`` still works, ``L`` has no key), and
the repair puts a public half of one of keyd's pairs whose private half is under another
ordinary label back beside it. A secret import stages its key under the pending label as above,
then retires the old secret, then relabels the staged one (the commit): an undo removes the
staged key and the roll back restores the old one; a committed import drops what is retiring.
A move or import that fails with an error is repaired the same way at once. Tokens with
``C_CopyObject`` (SoftHSM) never retire anything: they keep the copy path above.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar, cast

import attrs
import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11x

from aziot.config.pkcs11_uri import Pkcs11Uri

log = logging.getLogger(__name__)

T = TypeVar("T")

KeyPairAlgorithm = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-4096"]
SecretUsage = Literal["derive", "sign", "encrypt"]
RsaPadding = Literal["pkcs1", "none"]
ObjectKind = Literal["key_pair", "secret"]

KEY_PAIR_ALGORITHMS: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-4096")
GCM_TAG_LEN = 16


class Pkcs11Error(Exception):
    """A PKCS#11 operation failed. ``ckr`` is the token's return code name, when there is one."""

    def __init__(self, message: str, *, ckr: str | None = None) -> None:
        super().__init__(message)
        self.ckr = ckr


class InvalidParameter(Pkcs11Error):
    """The request itself is unusable (keyd maps this to 400)."""


class KeyNotFound(InvalidParameter):
    """No key with the requested label (and kind) is on the token."""


class KeyExists(InvalidParameter):
    """A generate call found a key with that label already; it was left untouched."""


class TokenUnavailable(Pkcs11Error):
    """The token cannot be reached at all: library, slot, token label, PIN or session."""


class CreateRefused(Pkcs11Error):
    """The token cannot hold this kind of key (keyd then tries the next location)."""


class MechanismMissing(Pkcs11Error):
    """The token does not support a mechanism the operation needs."""

    def __init__(self, message: str, *, mechanism: str) -> None:
        super().__init__(message)
        self.mechanism = mechanism


@attrs.frozen
class PublicParameters:
    """Public half of a key pair, already in the encodings keyd's ``/parameters`` serves.

    EC: ``curve_oid`` is the DER OID including tag and length (``06 08 2A 86 48 CE 3D 03 01 07``
    for P-256) and ``ec_point`` the compressed SEC1 point. RSA: ``modulus`` and ``exponent`` are
    big-endian without leading zero bytes.
    """

    algorithm: Literal["ECDSA", "RSA"]
    curve_oid: bytes | None = None
    ec_point: bytes | None = None
    modulus: bytes | None = None
    exponent: bytes | None = None

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        """The same key as a ``cryptography`` object (EC only for the curves keyd knows)."""
        if self.algorithm == "RSA":
            assert self.modulus is not None and self.exponent is not None
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(self.exponent, "big"), int.from_bytes(self.modulus, "big")
            )
            return numbers.public_key()
        assert self.curve_oid is not None and self.ec_point is not None
        curve = _CURVES.get(self.curve_oid)
        if curve is None:
            raise InvalidParameter(f"EC curve with OID {self.curve_oid.hex()} is not supported")
        return ec.EllipticCurvePublicKey.from_encoded_point(curve.factory(), self.ec_point)


@attrs.frozen
class _Curve:
    name: str
    field_len: int  # bytes in a field element, and in the group order for these curves
    factory: Callable[[], ec.EllipticCurve]


_P256_OID = bytes.fromhex("06082a8648ce3d030107")
_P384_OID = bytes.fromhex("06052b81040022")
_CURVES: dict[bytes, _Curve] = {
    _P256_OID: _Curve("P-256", 32, ec.SECP256R1),
    _P384_OID: _Curve("P-384", 48, ec.SECP384R1),
    bytes.fromhex("06052b81040023"): _Curve("P-521", 66, ec.SECP521R1),
    bytes.fromhex("06052b8104000a"): _Curve("secp256k1", 32, ec.SECP256K1),
}


@attrs.frozen
class _PairSpec:
    key_type: KeyType
    generator: Mechanism
    modulus_bits: int | None = None
    ec_params: bytes | None = None


_PAIR_SPECS: dict[str, _PairSpec] = {
    "ec-p256": _PairSpec(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, ec_params=_P256_OID),
    "ec-p384": _PairSpec(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, ec_params=_P384_OID),
    "rsa-2048": _PairSpec(KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, modulus_bits=2048),
    "rsa-4096": _PairSpec(KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, modulus_bits=4096),
}

# Errors after which the cached session is probably dead rather than the request wrong: the
# session was closed or logged out under us, or the token went away and may have come back.
_RECONNECT_ERRORS: tuple[type[Exception], ...] = (
    p11x.SessionHandleInvalid,
    p11x.SessionClosed,
    p11x.UserNotLoggedIn,
    p11x.DeviceRemoved,
    p11x.TokenNotPresent,
    # A cached object deleted by another application: search again on a fresh session.
    p11x.ObjectHandleInvalid,
    p11x.KeyHandleInvalid,
)

# What a token answers to a key template it will not make (tpm2-pkcs11 1.9: CKR_GENERAL_ERROR).
_TEMPLATE_REFUSALS: tuple[type[Exception], ...] = (
    p11x.GeneralError,
    p11x.TemplateInconsistent,
    p11x.AttributeValueInvalid,
)

_PIN_ERRORS: tuple[type[Exception], ...] = (
    p11x.PinIncorrect,
    p11x.PinInvalid,
    p11x.PinLenRange,
    p11x.PinLocked,
    p11x.PinExpired,
)

# python-pkcs11 turns each CKR_* code into an exception class but drops the code; the class
# names are the CKR names in CamelCase except for these.
_CKR_NAME_OVERRIDES = {
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
}
# Raised by python-pkcs11 itself, not by the token.
_LIBRARY_SIDE_ERRORS = {
    "PKCS11Error",
    "NoSuchKey",
    "NoSuchToken",
    "MultipleObjectsReturned",
    "MultipleTokensReturned",
}
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def ckr_name(exc: BaseException) -> str | None:
    """The ``CKR_*`` name behind a python-pkcs11 exception, or None if it has none."""
    name = type(exc).__name__
    if name in _CKR_NAME_OVERRIDES:
        return _CKR_NAME_OVERRIDES[name]
    if name in _LIBRARY_SIDE_ERRORS or not isinstance(exc, pkcs11.PKCS11Error):
        return None
    return "CKR_" + _CAMEL_BOUNDARY.sub("_", name).upper()


def mechanism_name(mechanism: int) -> str:
    """``CKM_*`` name of a mechanism number (vendor mechanisms come out as hex)."""
    try:
        # python-pkcs11 prefixes deprecated mechanisms with '_' (e.g. _DES_CBC).
        return "CKM_" + Mechanism(mechanism).name.lstrip("_")
    except ValueError:
        return f"CKM_VENDOR_0x{int(mechanism):08x}"


def _describe_error(exc: BaseException) -> str:
    ckr = ckr_name(exc)
    detail = str(exc)
    if ckr and detail:
        return f"{ckr} ({detail})"
    return ckr or detail or type(exc).__name__


def _minimal_be(value: bytes) -> bytes:
    stripped = value.lstrip(b"\x00")
    return stripped or b"\x00"


def _unwrap_octet_string(value: bytes) -> bytes | None:
    """Content of a DER OCTET STRING spanning all of ``value``, or None if it is not one."""
    if len(value) < 2 or value[0] != 0x04:
        return None
    first = value[1]
    if first < 0x80:
        length, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(value) < 2 + count:
            return None
        length, start = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
    if start + length != len(value):
        return None
    return value[start:]


def _sec1_point(value: bytes, curve: _Curve | None) -> bytes:
    """The SEC1 point inside CKA_EC_POINT.

    PKCS#11 says CKA_EC_POINT is a DER OCTET STRING around the point (SoftHSM does that), but
    some tokens hand out the bare point; a bare uncompressed point of the curve's exact size is
    taken as is so that it is never mistaken for a wrapper.
    """
    if curve is not None and len(value) == 2 * curve.field_len + 1 and value[0] == 0x04:
        return value
    inner = _unwrap_octet_string(value)
    if inner is not None and inner and inner[0] in (0x02, 0x03, 0x04):
        return inner
    if value and value[0] in (0x02, 0x03, 0x04):
        return value
    raise Pkcs11Error(f"CKA_EC_POINT of {len(value)} bytes is not a SEC1 point")


def _compress_point(point: bytes) -> bytes:
    if point[0] in (0x02, 0x03):
        return point
    if point[0] != 0x04 or len(point) % 2 != 1:
        raise Pkcs11Error("CKA_EC_POINT holds a malformed uncompressed point")
    coord_len = (len(point) - 1) // 2
    x, y = point[1 : 1 + coord_len], point[1 + coord_len :]
    return bytes([0x02 | (y[-1] & 1)]) + x


def _key_type(obj: Any) -> KeyType | None:
    try:
        return obj[Attribute.KEY_TYPE]
    except ValueError:
        # A vendor key type python-pkcs11 has no enum member for.
        return None


class _CkGcmParams(ctypes.Structure):
    # CK_GCM_PARAMS as PKCS#11 v2.40 lays it out, which is what python-pkcs11 and SoftHSM use.
    _fields_ = [
        ("iv", ctypes.c_void_p),
        ("iv_len", ctypes.c_ulong),
        ("iv_bits", ctypes.c_ulong),
        ("aad", ctypes.c_void_p),
        ("aad_len", ctypes.c_ulong),
        ("tag_bits", ctypes.c_ulong),
    ]


def _gcm_param(iv: bytes, aad: bytes) -> tuple[Any, Any]:
    """Mechanism parameter for AES-GCM plus whatever must stay alive until the call returns.

    python-pkcs11's GCMParams refuses IVs longer than 12 bytes, but GCM (and OpenSSL, which the
    filesystem keys use) accept any IV length, so longer IVs are passed as a raw CK_GCM_PARAMS.
    """
    if len(iv) <= 12:
        return pkcs11.GCMParams(iv, aad or None, GCM_TAG_LEN * 8), None
    iv_buf = ctypes.create_string_buffer(iv, len(iv))
    aad_buf = ctypes.create_string_buffer(aad, len(aad)) if aad else None
    params = _CkGcmParams(
        ctypes.addressof(iv_buf),
        len(iv),
        len(iv) * 8,
        ctypes.addressof(aad_buf) if aad_buf is not None else None,
        len(aad),
        GCM_TAG_LEN * 8,
    )
    return bytes(params), (iv_buf, aad_buf)


def _secret_kind(usage: Iterable[str]) -> Literal["hmac", "aes"]:
    wanted = set(usage)
    if wanted and wanted <= {"derive", "sign"}:
        return "hmac"
    if wanted == {"encrypt"}:
        return "aes"
    raise InvalidParameter(
        f"key usage {','.join(sorted(wanted)) or '(empty)'} cannot be stored on a PKCS#11 token: "
        "use derive and/or sign (HMAC key) or encrypt alone (AES key)"
    )


@attrs.define
class _SlotState:
    slot_id: int
    token_label: str
    session: Any  # pkcs11.Session; typed loosely because the Cython class has no stub
    mechanisms: frozenset[int] | None  # None: the token would not list them
    logged_in: bool
    # Whether the library implements C_CopyObject: a write then commits by copying its staged
    # objects, else by relabelling them (see the module doc).
    copies: bool = True
    # EC key pairs must be generated with the token's coupled capabilities (TPM: sign=encrypt,
    # verify=decrypt); learnt from the token's refusal of keyd's own template.
    coupled_ec_capabilities: bool = False
    # Found key objects by (class, label): a C_FindObjects per call would cost more than the
    # signature. Dropped on every change we make; a change made by another application shows
    # up as an invalid handle, after which the session is reopened and the search redone.
    objects: dict[tuple[int, str], Any] = attrs.field(factory=dict)
    # Immutable attributes of those objects (key type, curve, modulus) by (handle, attribute).
    attributes: dict[tuple[int, int], Any] = attrs.field(factory=dict)

    def attribute(self, obj: Any, attribute: Attribute) -> Any:
        key = (obj.handle, int(attribute))
        if key not in self.attributes:
            self.attributes[key] = obj[attribute]
        return self.attributes[key]

    def key_type(self, obj: Any) -> KeyType | None:
        try:
            return self.attribute(obj, Attribute.KEY_TYPE)
        except ValueError:
            return None  # a vendor key type python-pkcs11 has no enum member for

    def forget_objects(self) -> None:
        self.objects.clear()
        self.attributes.clear()

    def describe(self) -> str:
        return f"token {self.token_label!r} (slot {self.slot_id})"


class Pkcs11Library:
    """All token work for one PKCS#11 module. Call it from one thread only (see module doc)."""

    def __init__(self, lib_path: str) -> None:
        self._path = lib_path
        try:
            self._lib = pkcs11.lib(lib_path)
        except Exception as exc:  # dlopen failures come as message-only PKCS11Error, others vary
            raise TokenUnavailable(
                f"could not load PKCS#11 library {lib_path!r}: {_describe_error(exc)}",
                ckr=ckr_name(exc),
            ) from exc
        self._sessions: dict[int, _SlotState] = {}
        self._token_slots: dict[str, int] = {}
        self._mechanisms: dict[int, frozenset[int] | None] = {}
        # Rejected PINs by slot: trying one again on every request would lock the token.
        self._rejected_pins: dict[int, tuple[str, str]] = {}
        # Slots whose leftovers of interrupted writes were reconciled (once, at first login).
        self._reconciled: set[int] = set()
        # Whether the module implements C_CopyObject; probed at the first session.
        self._copy_object: bool | None = None
        # Whether objects were destroyed since the module was initialized, on a module without
        # C_CopyObject: tpm2-pkcs11 1.9 then hands a new object the handle of one still there
        # (seen here: a relabel of the new object changed the other one; cf.
        # tpm2-software/tpm2-pkcs11#931), so it is re-initialized before the next creation.
        self._stale_handles = False
        # Slots whose tokens refused keyd's EC template for the TPM's coupled capabilities.
        self._coupled_ec_slots: set[int] = set()
        # Called with a step name between the token writes of one key write; tests stop a
        # write there, as a kill would.
        self.on_step: Callable[[str], None] | None = None
        log.info(
            "loaded PKCS#11 library %s (%s, %s)",
            lib_path,
            self._lib.manufacturer_id,
            self._lib.library_description,
        )

    @property
    def path(self) -> str:
        return self._path

    def close(self) -> None:
        """Close every cached session (logging out); the object stays usable afterwards."""
        for state in list(self._sessions.values()):
            self._forget(state)

    # ----------------------------------------------------------------------------------------
    # Queries

    def mechanisms(self, uri: Pkcs11Uri) -> list[str]:
        """Sorted ``CKM_*`` names the token offers (empty if it would not list them)."""
        state = self._state(uri)
        return sorted(mechanism_name(m) for m in state.mechanisms or ())

    def find_key_pair(self, uri: Pkcs11Uri, label: str) -> bool:
        """Whether a private key labelled ``label`` is on the token."""
        _check_label(label)
        return self._run(
            uri,
            f"looking up key pair {label!r}",
            lambda st: self._find_one(st, ObjectClass.PRIVATE_KEY, label) is not None,
        )

    def find_secret(self, uri: Pkcs11Uri, label: str) -> bool:
        """Whether a secret key labelled ``label`` is on the token."""
        _check_label(label)
        return self._run(
            uri,
            f"looking up secret key {label!r}",
            lambda st: self._find_one(st, ObjectClass.SECRET_KEY, label) is not None,
        )

    def public_parameters(self, uri: Pkcs11Uri, label: str) -> PublicParameters:
        """Public parameters of key pair ``label``; KeyNotFound if it is missing."""
        _check_label(label)
        return self._run(
            uri, f"reading public key {label!r}", lambda st: self._public_parameters(st, label)
        )

    # ----------------------------------------------------------------------------------------
    # Key creation

    def generate_key_pair(
        self, uri: Pkcs11Uri, label: str, algorithms: Iterable[str]
    ) -> KeyPairAlgorithm:
        """Generate a key pair with the first of ``algorithms`` the token manages; return it.

        KeyExists if a private key with that label is already there; InvalidParameter naming
        every algorithm tried (and why it failed) if none worked.
        """
        _check_label(label)
        wanted = list(dict.fromkeys(algorithms))
        if not wanted:
            raise InvalidParameter("no key pair algorithm was requested")
        return self._run(
            uri,
            f"generating key pair {label!r}",
            lambda st: self._generate_key_pair(st, label, wanted),
            mutates=True,
        )

    def generate_secret(self, uri: Pkcs11Uri, label: str, usage: Iterable[str]) -> str:
        """Generate a secret key for ``usage``; return its kind (``hmac-256``/``aes-256``/…).

        derive/sign → 32-byte generic-secret HMAC key; encrypt → AES-256 (AES-128 if the token
        cannot), checked with a test AES-GCM encryption. KeyExists if the label is taken.
        """
        _check_label(label)
        kind = _secret_kind(usage)
        return self._run(
            uri,
            f"generating secret key {label!r}",
            lambda st: self._generate_secret(st, label, kind),
            mutates=True,
        )

    def import_secret(
        self, uri: Pkcs11Uri, label: str, key_bytes: bytes, usage: Iterable[str]
    ) -> str:
        """Store ``key_bytes`` as secret key ``label``, replacing any secret with that label.

        The old key is only deleted once the new one has been created (and, for AES, passed the
        test encryption), so a failed import leaves the previous key in place.
        """
        _check_label(label)
        kind = _secret_kind(usage)
        if not key_bytes:
            raise InvalidParameter("cannot import an empty key")
        if kind == "aes" and len(key_bytes) not in (16, 24, 32):
            raise InvalidParameter(
                f"an AES key must be 16, 24 or 32 bytes long, not {len(key_bytes)}"
            )
        return self._run(
            uri,
            f"importing secret key {label!r}",
            lambda st: self._import_secret(st, label, key_bytes, kind),
            mutates=True,
        )

    # ----------------------------------------------------------------------------------------
    # Key management

    def delete(self, uri: Pkcs11Uri, label: str, kind: ObjectKind) -> int:
        """Delete every object of ``kind`` labelled ``label``; return how many went (0 is fine)."""
        _check_label(label)
        classes = _classes_for(kind)

        def op(st: _SlotState) -> int:
            if kind == "key_pair":
                count = self._destroy_objects(self._pair_objects(st, label))
            else:
                count = self._destroy(st, classes, label)
            log.info("deleted %d %s object(s) labelled %r on %s", count, kind, label, st.describe())
            return count

        return self._run(uri, f"deleting {kind} {label!r}", op, mutates=True)

    def move_key_pair(self, uri: Pkcs11Uri, from_label: str, to_label: str) -> None:
        """Put key pair ``from_label`` under ``to_label``, replacing any ``to_label`` pair (the
        rotation of renewals); crash-safe on tokens with and without C_CopyObject (module doc).

        KeyNotFound (and nothing deleted) if ``from_label`` has no private key.
        """
        _check_label(from_label)
        _check_label(to_label)
        if from_label == to_label:
            raise InvalidParameter("source and destination for move are identical")
        return self._run(
            uri,
            f"moving key pair {from_label!r} to {to_label!r}",
            lambda st: self._move_key_pair(st, from_label, to_label),
            mutates=True,
        )

    def reconcile(self, uri: Pkcs11Uri) -> list[str]:
        """Bring what interrupted writes left on the token to one state each; say what was done.

        Run by itself when the token is first opened with its PIN; callable again (tests).
        """
        return self._run(uri, "reconciling interrupted writes", self._reconcile, mutates=True)

    # ----------------------------------------------------------------------------------------
    # Cryptographic operations

    def sign_ecdsa(self, uri: Pkcs11Uri, label: str, digest: bytes) -> bytes:
        """ECDSA over ``digest`` as given (no hashing); DER ECDSA-Sig-Value."""
        _check_label(label)
        if not digest:
            raise InvalidParameter("ECDSA needs a non-empty digest")
        return self._run(
            uri, f"ECDSA signing with {label!r}", lambda st: self._sign_ecdsa(st, label, digest)
        )

    def hmac_sha256(self, uri: Pkcs11Uri, label: str, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` with secret key ``label`` (32 bytes)."""
        _check_label(label)
        return self._run(
            uri, f"HMAC-SHA256 with {label!r}", lambda st: self._hmac(st, label, message)
        )

    def aes_gcm_encrypt(
        self, uri: Pkcs11Uri, label: str, iv: bytes, aad: bytes, plaintext: bytes
    ) -> bytes:
        """AES-GCM encryption with a 16-byte tag; returns ciphertext || tag."""
        _check_label(label)
        if not iv:
            raise InvalidParameter("AES-GCM needs a non-empty IV")
        return self._run(
            uri,
            f"AES-GCM encryption with {label!r}",
            lambda st: self._aes_gcm(st, label, iv, aad, plaintext, encrypt=True),
        )

    def aes_gcm_decrypt(
        self, uri: Pkcs11Uri, label: str, iv: bytes, aad: bytes, ciphertext_and_tag: bytes
    ) -> bytes:
        """Inverse of :meth:`aes_gcm_encrypt`. A wrong tag surfaces as a token error."""
        _check_label(label)
        if not iv:
            raise InvalidParameter("AES-GCM needs a non-empty IV")
        if len(ciphertext_and_tag) < GCM_TAG_LEN:
            raise InvalidParameter(
                f"AES-GCM ciphertext must include the {GCM_TAG_LEN}-byte tag, "
                f"got {len(ciphertext_and_tag)} bytes"
            )
        return self._run(
            uri,
            f"AES-GCM decryption with {label!r}",
            lambda st: self._aes_gcm(st, label, iv, aad, ciphertext_and_tag, encrypt=False),
        )

    def rsa_private(self, uri: Pkcs11Uri, label: str, data: bytes, padding: RsaPadding) -> bytes:
        """RSA private-key operation (OpenSSL ``RSA_private_encrypt``) on ``data``.

        ``pkcs1``: PKCS#1 v1.5 type-1 padding (CKM_RSA_PKCS); ``none``: raw (CKM_RSA_X_509),
        ``data`` must be exactly the modulus length. Output is always modulus-length. Input
        that does not fit is a plain Pkcs11Error (keyd answers 500 there, like the original).
        """
        _check_label(label)
        if padding not in ("pkcs1", "none"):
            raise InvalidParameter(f"unknown RSA padding {padding!r}")
        return self._run(
            uri,
            f"RSA private operation with {label!r}",
            lambda st: self._rsa_private(st, label, data, padding),
        )

    # ----------------------------------------------------------------------------------------
    # Sessions

    def _run(
        self, uri: Pkcs11Uri, what: str, op: Callable[[_SlotState], T], *, mutates: bool = False
    ) -> T:
        state = self._state(uri)
        if mutates:
            op = _forgetting_objects(op)
        try:
            return op(state)
        except _StaleHandles:
            self._reinitialize()
        except _RECONNECT_ERRORS as exc:
            log.warning(
                "%s on %s failed with %s; reopening the session and retrying once",
                what,
                state.describe(),
                _describe_error(exc),
            )
            self._forget(state)
        except pkcs11.PKCS11Error as exc:
            raise self._token_error(exc, what, state, uri) from exc
        state = self._state(uri)
        try:
            return op(state)
        except _StaleHandles:
            raise Pkcs11Error(f"{what} on {state.describe()} failed: unstable handles") from None
        except pkcs11.PKCS11Error as exc:
            raise self._token_error(exc, what, state, uri) from exc

    def _reinitialize(self) -> None:
        """C_Finalize and C_Initialize the module: it numbers every object afresh."""
        log.info(
            "re-initializing PKCS#11 library %s before creating objects: it reuses the handles "
            "of destroyed objects",
            self._path,
        )
        self.close()
        try:
            self._lib.reinitialize()
        except pkcs11.PKCS11Error as exc:
            raise TokenUnavailable(
                f"could not re-initialize PKCS#11 library {self._path!r}: {_describe_error(exc)}",
                ckr=ckr_name(exc),
            ) from exc
        self._sessions.clear()
        self._token_slots.clear()
        self._stale_handles = False

    def _token_error(
        self, exc: Exception, what: str, state: _SlotState, uri: Pkcs11Uri
    ) -> Pkcs11Error:
        message = f"{what} on {state.describe()} failed: {_describe_error(exc)}"
        if isinstance(exc, p11x.UserNotLoggedIn) and uri.pin is None:
            message += " (the PKCS#11 URI has no pin-value, so keyd did not log in)"
        return Pkcs11Error(message, ckr=ckr_name(exc))

    def _state(self, uri: Pkcs11Uri) -> _SlotState:
        if not self._lib.initialized:
            # Someone finalized the module (python-pkcs11 shares one lib object per path in the
            # process); every handle we hold died with it.
            self._sessions.clear()
            self._token_slots.clear()
            try:
                self._lib.initialize()
            except pkcs11.PKCS11Error as exc:
                raise TokenUnavailable(
                    f"could not initialize PKCS#11 library {self._path!r}: {_describe_error(exc)}",
                    ckr=ckr_name(exc),
                ) from exc
        slot_id = uri.slot_id
        if slot_id is None and uri.token is not None:
            slot_id = self._token_slots.get(uri.token)
        cached = self._sessions.get(slot_id) if slot_id is not None else None
        if cached is not None:
            if cached.logged_in or uri.pin is None:
                return cached
            # Opened earlier through a URI without a PIN; this one can see private objects.
            self._forget(cached)
        return self._open(uri)

    def _forget(self, state: _SlotState) -> None:
        self._sessions.pop(state.slot_id, None)
        for label, slot_id in list(self._token_slots.items()):
            if slot_id == state.slot_id:
                del self._token_slots[label]
        try:
            state.session.close()
        except pkcs11.PKCS11Error as exc:
            # Expected when the session is already gone; that is why we are dropping it.
            log.debug("closing session on %s: %s", state.describe(), _describe_error(exc))

    def _open(self, uri: Pkcs11Uri) -> _SlotState:
        token = self._find_token(uri)
        slot_id = int(token.slot.slot_id)
        cached = self._sessions.get(slot_id)
        if cached is not None:
            if cached.logged_in or uri.pin is None:
                # The same slot, reached through the other spelling (slot-id vs token label).
                self._remember_token_label(uri, slot_id)
                return cached
            self._forget(cached)
        label = token.label
        where = f"token {label!r} (slot {slot_id})"
        rejected = self._rejected_pins.get(slot_id)
        if rejected is not None and uri.pin is not None and rejected[0] == _pin_digest(uri.pin):
            raise TokenUnavailable(
                f"the PIN was rejected for {where} ({rejected[1]}); not trying it again, so "
                "that the token does not lock it: fix pin-value and restart",
                ckr=rejected[1],
            )
        try:
            session = token.open(rw=True, user_pin=uri.pin)
        except _PIN_ERRORS as exc:
            if uri.pin is not None:
                self._rejected_pins[slot_id] = (_pin_digest(uri.pin), ckr_name(exc) or "")
            raise TokenUnavailable(
                f"the PIN was rejected for {where}: {_describe_error(exc)}", ckr=ckr_name(exc)
            ) from exc
        except p11x.UserAlreadyLoggedIn:
            # Login state is per application and token, so another session of this process is
            # already logged in and a fresh session shares that. (The session python-pkcs11
            # opened for the failed login stays open; it has no handle we could close.)
            log.debug("%s is already logged in; opening a session without logging in", where)
            session = self._call_token(lambda: token.open(rw=True), f"opening a session on {where}")
        except pkcs11.PKCS11Error as exc:
            raise TokenUnavailable(
                f"opening a session on {where} failed: {_describe_error(exc)}", ckr=ckr_name(exc)
            ) from exc

        if slot_id not in self._mechanisms:
            self._mechanisms[slot_id] = self._probe_mechanisms(token.slot, where)
        logged_in = uri.pin is not None
        state = _SlotState(
            slot_id,
            label,
            session,
            self._mechanisms[slot_id],
            logged_in,
            copies=self._copies_objects(),
            coupled_ec_capabilities=slot_id in self._coupled_ec_slots,
        )
        self._sessions[slot_id] = state
        self._remember_token_label(uri, slot_id)
        log.info("opened a session on %s (%s)", where, "logged in" if logged_in else "no PIN")
        if logged_in and slot_id not in self._reconciled:
            self._reconciled.add(slot_id)
            try:
                self._reconcile(state)
            except pkcs11.PKCS11Error as exc:
                log.error(
                    "could not reconcile interrupted writes on %s: %s",
                    state.describe(),
                    _describe_error(exc),
                )
        return state

    def _remember_token_label(self, uri: Pkcs11Uri, slot_id: int) -> None:
        if uri.slot_id is None and uri.token is not None:
            self._token_slots[uri.token] = slot_id

    def _call_token(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except pkcs11.PKCS11Error as exc:
            raise TokenUnavailable(
                f"{what} failed: {_describe_error(exc)}", ckr=ckr_name(exc)
            ) from exc

    def _copies_objects(self) -> bool:
        if self._copy_object is None:
            self._copy_object = _probe_copy_object(self._path)
            if not self._copy_object:
                log.info(
                    "PKCS#11 library %s has no C_CopyObject (CKR_FUNCTION_NOT_SUPPORTED): "
                    "key writes on its tokens commit by relabelling, and a write that replaces "
                    "a key (a move, a secret import over a key) retires the old key first",
                    self._path,
                )
        return self._copy_object

    def _probe_mechanisms(self, slot: Any, where: str) -> frozenset[int] | None:
        try:
            found = frozenset(int(m) for m in slot.get_mechanisms())
        except pkcs11.PKCS11Error as exc:
            log.warning(
                "%s would not list its mechanisms (%s); operations will be attempted blindly",
                where,
                _describe_error(exc),
            )
            return None
        log.info(
            "%s supports %d mechanisms: %s",
            where,
            len(found),
            " ".join(sorted(mechanism_name(m) for m in found)),
        )
        return found

    def _find_token(self, uri: Pkcs11Uri) -> Any:
        slots = self._call_token(self._lib.get_slots, f"listing slots of {self._path}")
        if uri.slot_id is not None:
            searched = f"slot-id {uri.slot_id}"
            candidates = [s for s in slots if int(s.slot_id) == uri.slot_id]
            if not candidates:
                raise TokenUnavailable(
                    f"no PKCS#11 slot with {searched} in {self._path}; {self._inventory(slots)}"
                )
            try:
                token = candidates[0].get_token()
            except (p11x.TokenNotPresent, p11x.TokenNotRecognised) as exc:
                raise TokenUnavailable(
                    f"PKCS#11 slot {uri.slot_id} in {self._path} has no usable token "
                    f"({_describe_error(exc)}); {self._inventory(slots)}",
                    ckr=ckr_name(exc),
                ) from exc
            except pkcs11.PKCS11Error as exc:
                raise TokenUnavailable(
                    f"reading the token in slot {uri.slot_id} failed: {_describe_error(exc)}",
                    ckr=ckr_name(exc),
                ) from exc
        else:
            searched = f"token label {uri.token!r}"
            matches = []
            for slot in slots:
                try:
                    candidate = slot.get_token()
                except pkcs11.PKCS11Error:
                    continue  # empty reader slots are normal; _inventory reports them
                if candidate.label == uri.token:
                    matches.append(candidate)
            if not matches:
                raise TokenUnavailable(
                    f"no PKCS#11 token with {searched} in {self._path}; {self._inventory(slots)}"
                )
            if len(matches) > 1:
                log.warning(
                    "%d tokens are labelled %r; using the one in slot %d",
                    len(matches),
                    uri.token,
                    matches[0].slot.slot_id,
                )
            token = matches[0]
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            raise TokenUnavailable(
                f"the PKCS#11 token found by {searched} (slot {token.slot.slot_id}) "
                f"is not initialized; {self._inventory(slots)}"
            )
        return token

    @staticmethod
    def _inventory(slots: list[Any]) -> str:
        if not slots:
            return "the library reports no slots at all"
        entries = []
        for slot in slots:
            try:
                token = slot.get_token()
            except pkcs11.PKCS11Error:
                entries.append(f"slot {slot.slot_id}: no token")
                continue
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                entries.append(f"slot {slot.slot_id}: token {token.label!r}")
            else:
                entries.append(f"slot {slot.slot_id}: uninitialized token")
        return "present: " + ", ".join(entries)

    def _require(self, state: _SlotState, mechanism: Mechanism, what: str) -> None:
        if state.mechanisms is not None and int(mechanism) not in state.mechanisms:
            name = mechanism_name(mechanism)
            raise MechanismMissing(
                f"{state.describe()} does not support {name}, which {what} needs",
                mechanism=name,
            )

    # ----------------------------------------------------------------------------------------
    # Objects

    @staticmethod
    def _find_all(state: _SlotState, cls: ObjectClass, label: str) -> list[Any]:
        return list(state.session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}))

    def _find_one(self, state: _SlotState, cls: ObjectClass, label: str) -> Any | None:
        cached = state.objects.get((int(cls), label))
        if cached is not None:
            return cached
        found = self._find_all(state, cls, label)
        if found:
            state.objects[(int(cls), label)] = found[0]
        if len(found) > 1:
            log.warning(
                "%d %s objects are labelled %r on %s; using the first",
                len(found),
                cls.name,
                label,
                state.describe(),
            )
        return found[0] if found else None

    def _private_key(self, state: _SlotState, label: str) -> Any:
        key = self._find_one(state, ObjectClass.PRIVATE_KEY, label)
        if key is None:
            raise KeyNotFound(f"no key pair labelled {label!r} on {state.describe()}")
        return key

    def _secret_key(self, state: _SlotState, label: str) -> Any:
        key = self._find_one(state, ObjectClass.SECRET_KEY, label)
        if key is None:
            raise KeyNotFound(f"no secret key labelled {label!r} on {state.describe()}")
        return key

    def _public_key(self, state: _SlotState, label: str, private: Any) -> Any | None:
        """The public half of `private`: the one sharing its CKA_ID, wherever an interrupted
        move left its label, else (keys made elsewhere, without an id) one with its label."""
        key_id = bytes(private[Attribute.ID])
        if key_id:
            halves = list(
                state.session.get_objects(
                    {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
                )
            )
            if halves:
                halves.sort(key=lambda obj: obj[Attribute.LABEL] != label)
                return halves[0]
        found = self._find_all(state, ObjectClass.PUBLIC_KEY, label)
        return found[0] if found else None

    def _pair_objects(self, state: _SlotState, label: str) -> list[Any]:
        """Every object of the key pair(s) labelled `label`, for a move or a delete.

        A pair's halves are bound by CKA_ID: a move relabels them one after the other, so a
        kill between the two leaves them under different labels. Their public halves are found
        by id; a public key with this label that another label's private key owns is left alone.
        """
        privates = self._find_all(state, ObjectClass.PRIVATE_KEY, label)
        owned = {bytes(key[Attribute.ID]) for key in privates} - {b""}
        objects = {key.handle: key for key in privates}
        for key_id in owned:
            for half in state.session.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
            ):
                objects[half.handle] = half
        for half in self._find_all(state, ObjectClass.PUBLIC_KEY, label):
            key_id = bytes(half[Attribute.ID])
            if key_id and key_id not in owned and self._has_private(state, key_id):
                continue
            objects[half.handle] = half
        return list(objects.values())

    @staticmethod
    def _has_private(state: _SlotState, key_id: bytes) -> bool:
        query = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
        return any(True for _ in state.session.get_objects(query))

    def _destroy_objects(self, objects: list[Any]) -> int:
        for obj in objects:
            obj.destroy()
            if self._copy_object is False:
                self._stale_handles = True
        return len(objects)

    def _destroy(
        self,
        state: _SlotState,
        classes: Iterable[ObjectClass],
        label: str,
        keep: int | None = None,
    ) -> int:
        count = 0
        for cls in classes:
            for obj in self._find_all(state, cls, label):
                if keep is not None and obj.handle == keep:
                    continue
                self._destroy_objects([obj])
                count += 1
        return count

    def _public_parameters(self, state: _SlotState, label: str) -> PublicParameters:
        private = self._private_key(state, label)
        key_type = _key_type(private)
        public = self._public_key(state, label, private)
        if key_type == KeyType.RSA:
            # Private RSA objects carry the public numbers too, so a token holding only the
            # private half still works.
            source = public if public is not None else private
            modulus, exponent = source[Attribute.MODULUS], source[Attribute.PUBLIC_EXPONENT]
            return PublicParameters(
                "RSA", modulus=_minimal_be(modulus), exponent=_minimal_be(exponent)
            )
        if key_type == KeyType.EC:
            if public is None:
                raise KeyNotFound(
                    f"key pair {label!r} on {state.describe()} has no public key object, "
                    "so its EC point is unknown"
                )
            curve_oid = public[Attribute.EC_PARAMS]
            point = _sec1_point(public[Attribute.EC_POINT], _CURVES.get(curve_oid))
            return PublicParameters("ECDSA", curve_oid=curve_oid, ec_point=_compress_point(point))
        raise InvalidParameter(
            f"key pair {label!r} on {state.describe()} is neither EC nor RSA ({key_type})"
        )

    def _generate_key_pair(
        self, state: _SlotState, label: str, algorithms: list[str]
    ) -> KeyPairAlgorithm:
        if self._find_one(state, ObjectClass.PRIVATE_KEY, label) is not None:
            raise KeyExists(f"key pair {label!r} already exists on {state.describe()}")
        # A public half without its private key is a leftover of an interrupted operation.
        stale = self._destroy_objects(self._pair_objects(state, label))
        if stale:
            log.warning("removed %d orphaned public key(s) labelled %r", stale, label)

        failures: list[str] = []
        for algorithm in algorithms:
            spec = _PAIR_SPECS.get(algorithm)
            if spec is None:
                failures.append(f"{algorithm}: unknown algorithm")
                continue
            if state.mechanisms is not None and int(spec.generator) not in state.mechanisms:
                failures.append(f"{algorithm}: token lacks {mechanism_name(spec.generator)}")
                continue

            def stage(pending: str, key_id: bytes, spec: _PairSpec = spec) -> None:
                self._generate_pair(state, label, pending, key_id, spec)

            try:
                self._write(state, "pair", label, stage)
            except _RECONNECT_ERRORS:
                raise
            except pkcs11.PKCS11Error as exc:
                failures.append(f"{algorithm}: {_describe_error(exc)}")
                continue
            log.info("generated %s key pair %r on %s", algorithm, label, state.describe())
            return cast(KeyPairAlgorithm, algorithm)
        raise InvalidParameter(
            f"could not generate key pair {label!r} on {state.describe()} with any requested "
            f"algorithm: {'; '.join(failures)}"
        )

    def _generate_pair(
        self, state: _SlotState, label: str, pending: str, key_id: bytes, spec: _PairSpec
    ) -> None:
        """Generate the staged pair; an EC template the token refuses is retried once with the
        token's own coupled capabilities (tpm2-pkcs11 makes a TPM key's CKA_ENCRYPT follow
        CKA_SIGN and CKA_VERIFY follow CKA_DECRYPT and refuses a template that says otherwise,
        with CKR_GENERAL_ERROR in 1.9). The private half still has CKA_DECRYPT false."""
        if spec.key_type != KeyType.EC or not state.coupled_ec_capabilities:
            try:
                self._generate_pair_objects(state, pending, key_id, spec)
                return
            except _TEMPLATE_REFUSALS as exc:
                if spec.key_type != KeyType.EC:
                    raise
                log.warning(
                    "%s refused keyd's EC template for %r (%s); generating it again without "
                    "CKA_ENCRYPT and CKA_VERIFY on the public key, which the token then sets "
                    "from the private key's CKA_SIGN and CKA_DECRYPT",
                    state.describe(),
                    label,
                    _describe_error(exc),
                )
        self._generate_pair_objects(state, pending, key_id, spec, coupled=True)
        if not state.coupled_ec_capabilities:
            state.coupled_ec_capabilities = True
            self._coupled_ec_slots.add(state.slot_id)

    @staticmethod
    def _generate_pair_objects(
        state: _SlotState, label: str, key_id: bytes, spec: _PairSpec, *, coupled: bool = False
    ) -> None:
        is_rsa = spec.key_type == KeyType.RSA
        public: dict[Attribute, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: is_rsa,
            Attribute.WRAP: False,
            Attribute.DERIVE: False,
        }
        private: dict[Attribute, Any] = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            # CKM_RSA_X_509 / raw private operations are decrypt-class on some tokens.
            Attribute.DECRYPT: is_rsa,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        if spec.ec_params is not None:
            public[Attribute.EC_PARAMS] = spec.ec_params
        if coupled:
            # Left out of the template altogether (python-pkcs11 would otherwise fill them in
            # from the capabilities).
            public[Attribute.ENCRYPT] = pkcs11.DEFAULT
            public[Attribute.VERIFY] = pkcs11.DEFAULT
        if is_rsa:
            public[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
        state.session.generate_keypair(
            spec.key_type,
            spec.modulus_bits,
            id=key_id,
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            mechanism=spec.generator,
            public_template=public,
            private_template=private,
        )

    @staticmethod
    def _secret_template(
        kind: Literal["hmac", "aes"], label: str, key_id: bytes
    ) -> dict[Attribute, Any]:
        hmac = kind == "hmac"
        return {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET if hmac else KeyType.AES,
            Attribute.LABEL: label,
            Attribute.ID: key_id,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            # Tokens default unspecified capabilities to true (SoftHSM does), so spell out all.
            Attribute.SIGN: hmac,
            Attribute.VERIFY: hmac,
            Attribute.ENCRYPT: not hmac,
            Attribute.DECRYPT: not hmac,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }

    def _generate_secret(self, state: _SlotState, label: str, kind: Literal["hmac", "aes"]) -> str:
        if self._find_one(state, ObjectClass.SECRET_KEY, label) is not None:
            raise KeyExists(f"secret key {label!r} already exists on {state.describe()}")
        if kind == "hmac":
            self._require(state, Mechanism.SHA256_HMAC, "an HMAC key")
            self._require(state, Mechanism.GENERIC_SECRET_KEY_GEN, "generating an HMAC key")

            def stage_hmac(pending: str, key_id: bytes) -> None:
                template = self._secret_template(kind, pending, key_id)
                template[Attribute.VALUE_LEN] = 32
                state.session.generate_key(
                    KeyType.GENERIC_SECRET,
                    256,
                    label=pending,
                    id=key_id,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                    template=template,
                )

            self._write(state, "secret", label, stage_hmac)
            log.info("generated HMAC key %r on %s", label, state.describe())
            return "hmac-256"

        self._require(state, Mechanism.AES_GCM, "an AES key")
        self._require(state, Mechanism.AES_KEY_GEN, "generating an AES key")
        bits = 256

        def stage_aes(pending: str, key_id: bytes) -> None:
            nonlocal bits
            template = self._secret_template(kind, pending, key_id)
            try:
                key = self._generate_aes(state, pending, key_id, template, 256)
            except _RECONNECT_ERRORS:
                raise
            except pkcs11.PKCS11Error as exc:
                log.info(
                    "%s refused an AES-256 key (%s); trying AES-128",
                    state.describe(),
                    _describe_error(exc),
                )
                bits, key = 128, self._generate_aes(state, pending, key_id, template, 128)
            self._check_aes_gcm(state, label, key)

        self._write(state, "secret", label, stage_aes)
        log.info("generated AES-%d key %r on %s", bits, label, state.describe())
        return f"aes-{bits}"

    @staticmethod
    def _generate_aes(
        state: _SlotState, label: str, key_id: bytes, template: dict[Attribute, Any], bits: int
    ) -> Any:
        template = {**template, Attribute.VALUE_LEN: bits // 8}
        return state.session.generate_key(
            KeyType.AES,
            bits,
            label=label,
            id=key_id,
            store=True,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            mechanism=Mechanism.AES_KEY_GEN,
            template=template,
        )

    def _import_secret(
        self, state: _SlotState, label: str, key_bytes: bytes, kind: Literal["hmac", "aes"]
    ) -> str:
        if kind == "hmac":
            self._require(state, Mechanism.SHA256_HMAC, "an HMAC key")
        else:
            self._require(state, Mechanism.AES_GCM, "an AES key")

        def stage(pending: str, key_id: bytes) -> None:
            template = self._secret_template(kind, pending, key_id)
            template[Attribute.VALUE] = key_bytes
            key = state.session.create_object(template)
            if kind == "aes":
                self._check_aes_gcm(state, label, key)

        replaced = self._write(state, "secret", label, stage)
        log.info(
            "imported %s key %r on %s (replaced %d old object(s))",
            kind,
            label,
            state.describe(),
            replaced,
        )
        return f"{kind}-{len(key_bytes) * 8}"

    def _check_aes_gcm(self, state: _SlotState, label: str, key: Any) -> None:
        """Encrypt once with a new AES key; on failure delete it and raise (spec §3.3)."""
        try:
            params, _keepalive = _gcm_param(secrets.token_bytes(12), b"")
            key.encrypt(b"keyd self-test", mechanism=Mechanism.AES_GCM, mechanism_param=params)
        except pkcs11.PKCS11Error as exc:
            try:
                self._destroy_objects([key])
            except pkcs11.PKCS11Error as cleanup:
                log.warning("could not delete AES key %r after failed test: %s", label, cleanup)
            raise CreateRefused(
                f"test AES-GCM encryption with the new key {label!r} on {state.describe()} "
                f"failed, so the key was deleted: {_describe_error(exc)}",
                ckr=ckr_name(exc),
            ) from exc

    def _move_key_pair(self, state: _SlotState, from_label: str, to_label: str) -> None:
        if not state.copies:
            self._move_by_relabel(state, from_label, to_label)
            return
        self._private_key(state, from_label)  # refuse before touching the destination
        sources = self._pair_objects(state, from_label)
        sources.sort(key=lambda obj: obj[Attribute.CLASS] == ObjectClass.PRIVATE_KEY)

        def stage(pending: str, key_id: bytes) -> None:
            for obj in sources:  # the public half first, as in a commit
                obj.copy({Attribute.LABEL: pending, Attribute.ID: key_id})
                self._step("move: staged a copy of a source object")

        replaced = self._write(state, "move", to_label, stage, source=from_label)
        log.info(
            "moved key pair %r to %r on %s (replaced %d object(s))",
            from_label,
            to_label,
            state.describe(),
            replaced,
        )

    def _move_by_relabel(self, state: _SlotState, from_label: str, to_label: str) -> None:
        """The move on a token without C_CopyObject: retire the destination's pair, relabel the
        source's pair onto the destination (private half last: the commit), destroy the retired
        pair. See the module doc for why every instant is safe."""
        self._log_repairs(state, self._settle_retired(state))  # a failed undo's leftovers
        private = self._private_key(state, from_label)  # refuse before touching anything
        new_id = _object_id(private)
        sources = self._pair_objects(state, from_label)
        source_handles = {obj.handle for obj in sources}
        old = [o for o in self._pair_objects(state, to_label) if o.handle not in source_handles]
        cannot = f"{state.describe()} cannot move key pair {from_label!r} to {to_label!r}"
        if not new_id or any(_object_id(obj) != new_id for obj in sources):
            raise Pkcs11Error(
                f"{cannot}: without C_CopyObject the move relabels the pair in place, which "
                "needs both its halves to carry the same non-empty CKA_ID (keyd's own keys do)"
            )
        if any(_object_id(obj) == new_id for obj in old):
            raise Pkcs11Error(
                f"{cannot}: both pairs carry the CKA_ID {new_id.hex()}, so an interrupted move "
                "could not be told apart from a finished one"
            )
        retired: list[Any] = []
        try:
            retired = self._retire(state, "move", to_label, from_label, new_id, old)
            for obj in _public_first(sources):
                obj[Attribute.LABEL] = to_label
                self._step("move: committed a relabel")
        except Exception:
            self._repair_after_failure(state, f"move of key pair {from_label!r} to {to_label!r}")
            raise
        for obj in retired:
            self._destroy_objects([obj])
            self._step("move: destroyed a retired object")
        log.info(
            "moved key pair %r to %r on %s by relabelling (replaced %d object(s))",
            from_label,
            to_label,
            state.describe(),
            len(retired),
        )

    # ----------------------------------------------------------------------------------------
    # Crash-safe writes (see the module doc)

    def _step(self, name: str) -> None:
        if self.on_step is not None:
            self.on_step(name)

    def _write(
        self,
        state: _SlotState,
        kind: _WriteKind,
        label: str,
        stage: Callable[[str, bytes], None],
        *,
        source: str = "",
    ) -> int:
        """Stage with `stage(pending_label, key_id)`, commit, finish; return how many objects
        the write replaced. On an error nothing of the write stays (best effort)."""
        pending = _pending_label(kind, label, source)
        key_id = secrets.token_bytes(16)
        if not state.copies:
            self._log_repairs(state, self._settle_retired(state))  # a failed undo's leftovers
        if self._stale_handles and not state.copies:
            raise _StaleHandles  # _run re-initializes the module and runs the write again
        retired: list[Any] = []
        try:
            stage(pending, key_id)
            self._step(f"{kind}: staged")
            staged = self._find_by(state, label=pending, key_id=key_id)
            if not state.copies:
                old = self._old_objects(state, kind, label)
                retired = self._retire(state, kind, label, source, key_id, old)
            # The private (or secret) key last: its copy (or relabel) is the commit point.
            for obj in _public_first(staged):
                if state.copies:
                    obj.copy({Attribute.LABEL: label})
                    self._step(f"{kind}: committed a copy")
                else:
                    obj[Attribute.LABEL] = label
                    self._step(f"{kind}: committed a relabel")
        except Exception:
            try:
                self._undo(state, pending, label, key_id)
            except pkcs11.PKCS11Error as exc:
                log.warning(
                    "could not undo the failed write of %r: %s (the next start will)",
                    label,
                    _describe_error(exc),
                )
            if not state.copies:
                self._repair_after_failure(state, f"write of {label!r}")
            raise
        for obj in retired:
            self._destroy_objects([obj])
            self._step(f"{kind}: destroyed a retired object")
        return len(retired) + self._finish(state, kind, label, source, pending, key_id)

    def _old_objects(self, state: _SlotState, kind: _WriteKind, label: str) -> list[Any]:
        if kind == "secret":
            return self._find_by(state, label=label, cls=ObjectClass.SECRET_KEY)
        return self._pair_objects(state, label)

    def _retire(
        self,
        state: _SlotState,
        kind: _WriteKind,
        label: str,
        source: str,
        new_id: bytes,
        old: list[Any],
    ) -> list[Any]:
        """Relabel what the write replaces (public half first) to the retiring label that names
        the write: kept whole until the new key has committed (see the module doc)."""
        retiring = _retiring_label(kind, label, source, new_id)
        retired = _public_first(old)
        for obj in retired:
            obj[Attribute.LABEL] = retiring
            self._step(f"{kind}: retired an object of the old key")
        return retired

    def _repair_after_failure(self, state: _SlotState, what: str) -> None:
        """A relabelling write failed half way: bring the token back now, as a start would."""
        try:
            self._log_repairs(
                state, self._settle_retired(state) + self._settle_astray_halves(state)
            )
        except pkcs11.PKCS11Error as exc:
            log.warning(
                "could not undo the failed %s: %s (the next start will)",
                what,
                _describe_error(exc),
            )

    @staticmethod
    def _log_repairs(state: _SlotState, repairs: list[str]) -> None:
        for repair in repairs:
            log.warning("%s: repaired: %s", state.describe(), repair)

    def _settle_retired(self, state: _SlotState) -> list[str]:
        """Each set of retired objects: destroyed if its write committed (the new private or
        secret key is under the label), else relabelled back, with any public half the write
        had already relabelled returned to the move's source."""
        groups: dict[str, list[Any]] = {}
        for obj in self._find_by(state):
            label = obj[Attribute.LABEL]
            if label.startswith(_RETIRING):
                groups.setdefault(label, []).append(obj)
        repairs: list[str] = []
        for retiring, objects in sorted(groups.items()):
            parsed = _parse_retiring(retiring)
            if parsed is None:
                repairs.append(
                    f"left alone {len(objects)} retired object(s) of an unknown write "
                    f"({retiring!r})"
                )
                continue
            kind, label, source, new_id = parsed
            commit_cls = ObjectClass.SECRET_KEY if kind == "secret" else ObjectClass.PRIVATE_KEY
            what = f"{_KIND_NAMES[kind]} {label!r}" + (f" from {source!r}" * (kind == "move"))
            if self._find_by(state, label=label, key_id=new_id, cls=commit_cls):
                self._destroy_objects(_public_first(objects))
                repairs.append(
                    f"finished the interrupted {what}: it had committed "
                    f"({len(objects)} retired object(s) of the old key removed)"
                )
                continue
            returned = 0
            if kind == "move":
                # Halves of the source relabelled before the commit go back first, so that
                # the label holds nothing but the old key once it is back.
                for obj in self._find_by(state, label=label, key_id=new_id):
                    obj[Attribute.LABEL] = source
                    returned += 1
            for obj in _public_first(objects):
                obj[Attribute.LABEL] = label
            repairs.append(
                f"rolled back the interrupted {what}: it had not committed (the old key's "
                f"{len(objects)} object(s) back under {label!r}"
                + (f", {returned} object(s) of the source back under {source!r}" * bool(returned))
                + ")"
            )
        return repairs

    def _settle_astray_halves(self, state: _SlotState) -> list[str]:
        """A public half of one of our pairs under another label than its private half (a
        relabelling move of a pair onto a free label cut short between its two relabels)
        goes back under its private half's label."""
        repairs: list[str] = []
        for public in self._find_by(state, cls=ObjectClass.PUBLIC_KEY):
            label, key_id = public[Attribute.LABEL], _object_id(public)
            if label.startswith("\x00") or len(key_id) != len(_OUR_ID):
                continue
            privates = self._find_by(state, key_id=key_id, cls=ObjectClass.PRIVATE_KEY)
            if len(privates) != 1:
                continue
            owner = privates[0][Attribute.LABEL]
            if owner == label or owner.startswith("\x00"):
                continue
            public[Attribute.LABEL] = owner
            repairs.append(
                f"put the public half of key pair {owner!r} back under its label (an "
                f"interrupted move had left it under {label!r})"
            )
        return repairs

    def _finish(
        self,
        state: _SlotState,
        kind: _WriteKind,
        label: str,
        source: str,
        pending: str,
        key_id: bytes,
    ) -> int:
        """The write is committed: destroy what it replaces, its source, then its staging."""
        if kind == "secret":
            old = self._find_by(state, label=label, cls=ObjectClass.SECRET_KEY)
        else:
            old = self._pair_objects(state, label)
        replaced = self._destroy_objects([o for o in old if _object_id(o) != key_id])
        self._step(f"{kind}: destroyed what it replaces")
        if kind == "move":
            self._destroy_objects(
                [o for o in self._pair_objects(state, source) if _object_id(o) != key_id]
            )
            self._step(f"{kind}: destroyed the source")
        self._destroy_objects(self._find_by(state, label=pending, key_id=key_id))
        return replaced

    def _undo(self, state: _SlotState, pending: str, label: str, key_id: bytes) -> int:
        """The write did not commit: destroy its staging and any public half already copied."""
        return self._destroy_objects(
            self._find_by(state, label=label, key_id=key_id)
            + self._find_by(state, label=pending, key_id=key_id)
        )

    @staticmethod
    def _find_by(
        state: _SlotState,
        *,
        label: str | None = None,
        key_id: bytes | None = None,
        cls: ObjectClass | None = None,
    ) -> list[Any]:
        template: dict[Attribute, Any] = {}
        if label is not None:
            template[Attribute.LABEL] = label
        if key_id is not None:
            template[Attribute.ID] = key_id
        classes = [cls] if cls is not None else list(_KEY_CLASSES)
        found: list[Any] = []
        for each in classes:
            found += state.session.get_objects({**template, Attribute.CLASS: each})
        return found

    def _reconcile(self, state: _SlotState) -> list[str]:
        repairs: list[str] = []
        # 1. Staged writes: finished if their commit copy exists, else undone.
        groups: dict[tuple[str, bytes], int] = {}
        for obj in self._find_by(state):
            label = obj[Attribute.LABEL]
            if label.startswith(_PENDING):
                groups[(label, _object_id(obj))] = groups.get((label, _object_id(obj)), 0) + 1
        for (pending, key_id), count in sorted(groups.items()):
            parsed = _parse_pending(pending)
            if parsed is None:
                self._destroy_objects(self._find_by(state, label=pending, key_id=key_id))
                repairs.append(f"removed {count} staged object(s) of an unknown write")
                continue
            kind, label, source = parsed
            commit_cls = ObjectClass.SECRET_KEY if kind == "secret" else ObjectClass.PRIVATE_KEY
            what = f"{_KIND_NAMES[kind]} {label!r}" + (f" from {source!r}" * (kind == "move"))
            if self._find_by(state, label=label, key_id=key_id, cls=commit_cls):
                replaced = self._finish(state, kind, label, source, pending, key_id)
                repairs.append(
                    f"finished the interrupted {what}: it had committed "
                    f"({replaced} replaced object(s) and the staged copies removed)"
                )
            else:
                removed = self._undo(state, pending, label, key_id)
                repairs.append(
                    f"undid the interrupted {what}: it had not committed "
                    f"({removed} staged object(s) removed, the old key kept)"
                )
        # 2. Old keys a relabelling write retired: dropped if it committed, else put back.
        repairs += self._settle_retired(state)
        # 3. Duplicates a C_CopyObject cut short leaves under the source's own label.
        seen: set[tuple[int, str, bytes]] = set()
        for obj in self._find_by(state):
            key_id = _object_id(obj)
            if len(key_id) != len(_OUR_ID):
                continue  # only ids we made are unique per key; others may be shared on purpose
            identity = (int(obj[Attribute.CLASS]), obj[Attribute.LABEL], key_id)
            if identity in seen:
                self._destroy_objects([obj])
                repairs.append(
                    f"removed a duplicate {ObjectClass(identity[0]).name} {identity[1]!r} "
                    "left by an interrupted copy"
                )
            seen.add(identity)
        # 4. A public half a relabelling move left under the other label.
        if not state.copies:
            repairs += self._settle_astray_halves(state)
        self._log_repairs(state, repairs)
        return repairs

    # ----------------------------------------------------------------------------------------
    # Operations

    def _sign_ecdsa(self, state: _SlotState, label: str, digest: bytes) -> bytes:
        key = self._private_key(state, label)
        if state.key_type(key) != KeyType.EC:
            raise InvalidParameter(f"key pair {label!r} is not an EC key, so it cannot do ECDSA")
        self._require(state, Mechanism.ECDSA, "ECDSA signing")
        curve = _CURVES.get(state.attribute(key, Attribute.EC_PARAMS))
        if curve is not None and len(digest) > curve.field_len:
            # OpenSSL uses the leftmost order-length bits of a longer digest; not every token
            # does, so hand over exactly what OpenSSL would use.
            digest = digest[: curve.field_len]
        raw = self._sign(key, label, digest, Mechanism.ECDSA)
        if not raw or len(raw) % 2:
            raise Pkcs11Error(f"token returned a malformed ECDSA signature ({len(raw)} bytes)")
        half = len(raw) // 2
        r = int.from_bytes(raw[:half], "big")
        s = int.from_bytes(raw[half:], "big")
        return encode_dss_signature(r, s)

    def _hmac(self, state: _SlotState, label: str, message: bytes) -> bytes:
        key = self._secret_key(state, label)
        if state.key_type(key) == KeyType.AES:
            raise InvalidParameter(f"secret key {label!r} is an AES key, not an HMAC key")
        self._require(state, Mechanism.SHA256_HMAC, "HMAC-SHA256")
        return self._sign(key, label, message, Mechanism.SHA256_HMAC)

    def _aes_gcm(
        self,
        state: _SlotState,
        label: str,
        iv: bytes,
        aad: bytes,
        data: bytes,
        *,
        encrypt: bool,
    ) -> bytes:
        key = self._secret_key(state, label)
        if state.key_type(key) != KeyType.AES:
            raise InvalidParameter(f"secret key {label!r} is not an AES key")
        self._require(state, Mechanism.AES_GCM, "AES-GCM")
        params, _keepalive = _gcm_param(iv, aad)
        method = "encrypt" if encrypt else "decrypt"
        operation = getattr(key, method, None)
        if operation is None:
            raise InvalidParameter(f"secret key {label!r} is not allowed to {method}")
        return bytes(operation(data, mechanism=Mechanism.AES_GCM, mechanism_param=params))

    def _rsa_private(
        self, state: _SlotState, label: str, data: bytes, padding: RsaPadding
    ) -> bytes:
        key = self._private_key(state, label)
        if state.key_type(key) != KeyType.RSA:
            raise InvalidParameter(f"key pair {label!r} is not an RSA key")
        modulus_len = len(_minimal_be(state.attribute(key, Attribute.MODULUS)))
        if padding == "pkcs1":
            mechanism = Mechanism.RSA_PKCS
            if len(data) > modulus_len - 11:
                raise Pkcs11Error(
                    f"{len(data)} bytes are too many for PKCS#1 v1.5 padding with a "
                    f"{modulus_len}-byte modulus (at most {modulus_len - 11})"
                )
        else:
            mechanism = Mechanism.RSA_X_509
            if len(data) != modulus_len:
                raise Pkcs11Error(
                    f"unpadded RSA input must be exactly {modulus_len} bytes, not {len(data)}"
                )
        self._require(state, mechanism, "this RSA private-key operation")
        out = self._sign(key, label, data, mechanism)
        # Leading zero bytes are dropped by some tokens; OpenSSL always returns modulus length.
        return out.rjust(modulus_len, b"\x00")

    @staticmethod
    def _sign(key: Any, label: str, data: bytes, mechanism: Mechanism) -> bytes:
        sign = getattr(key, "sign", None)
        if sign is None:
            # python-pkcs11 only gives objects with CKA_SIGN=true a sign method.
            raise InvalidParameter(f"key {label!r} is not allowed to sign (CKA_SIGN is false)")
        return bytes(sign(data, mechanism=mechanism))


def _forgetting_objects(op: Callable[[_SlotState], T]) -> Callable[[_SlotState], T]:
    """`op` changes objects: cached handles are dropped before and after it."""

    def run(state: _SlotState) -> T:
        state.forget_objects()
        try:
            return op(state)
        finally:
            state.forget_objects()

    return run


class _StaleHandles(Exception):
    """A creation must wait for the module's re-initialization (see `_stale_handles`)."""


_WriteKind = Literal["pair", "secret", "move"]
_KIND_NAMES = {"pair": "creation of key pair", "secret": "write of secret key", "move": "move to"}
_KEY_CLASSES = (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY)
# Labels of staged objects. A key id cannot contain NUL (keyd refuses it), so none names one.
_PENDING = "\x00aziot-pending\x00"
_OUR_ID = bytes(16)  # the length of the CKA_ID keyd gives every key it makes


# Labels of the objects a relabelling write replaces until it has committed; they name the
# write and the CKA_ID of its new key (hex), whose presence under the label is the commit.
_RETIRING = "\x00aziot-retiring\x00"


def _public_first(objects: Iterable[Any]) -> list[Any]:
    return sorted(objects, key=lambda obj: obj[Attribute.CLASS] != ObjectClass.PUBLIC_KEY)


def _retiring_label(kind: _WriteKind, label: str, source: str, new_id: bytes) -> str:
    return f"{_RETIRING}{kind}\x00{label}\x00{source}\x00{new_id.hex()}"


def _parse_retiring(retiring: str) -> tuple[_WriteKind, str, str, bytes] | None:
    parts = retiring[len(_RETIRING) :].split("\x00")
    if len(parts) != 4 or parts[0] not in _KIND_NAMES or not parts[1]:
        return None
    try:
        new_id = bytes.fromhex(parts[3])
    except ValueError:
        return None
    if not new_id or (parts[0] == "move") != bool(parts[2]):
        return None
    return cast(_WriteKind, parts[0]), parts[1], parts[2], new_id


def _pending_label(kind: _WriteKind, label: str, source: str) -> str:
    return f"{_PENDING}{kind}\x00{label}\x00{source}"


def _parse_pending(pending: str) -> tuple[_WriteKind, str, str] | None:
    parts = pending[len(_PENDING) :].split("\x00")
    if len(parts) != 3 or parts[0] not in _KIND_NAMES or not parts[1]:
        return None
    return cast(_WriteKind, parts[0]), parts[1], parts[2]


def _object_id(obj: Any) -> bytes:
    try:
        return bytes(obj[Attribute.ID])
    except pkcs11.PKCS11Error:
        return b""


_CKR_FUNCTION_NOT_SUPPORTED = 0x54


def _probe_copy_object(lib_path: str) -> bool:
    """Whether the module at `lib_path` implements C_CopyObject.

    python-pkcs11 does not say, so the module's own C_CopyObject is called with no session and
    no object (both CK_INVALID_HANDLE): nothing can be copied, and a module that has the
    function answers about the handles (SoftHSM: CKR_SESSION_HANDLE_INVALID) while one that
    lacks it answers CKR_FUNCTION_NOT_SUPPORTED (tpm2-pkcs11 1.9). The module is the one
    python-pkcs11 loaded (dlopen of the same path), so it is already initialized.
    """
    try:
        function = ctypes.CDLL(lib_path).C_CopyObject
    except (OSError, AttributeError):
        return True  # not exported by name: assume it is there, as before
    function.restype = ctypes.c_ulong
    function.argtypes = [
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.POINTER(ctypes.c_ulong),
    ]
    new_object = ctypes.c_ulong(0)
    rv = function(0, 0, None, 0, ctypes.byref(new_object))
    return bool(rv != _CKR_FUNCTION_NOT_SUPPORTED)


def _pin_digest(pin: str) -> str:
    """Remember which PIN failed without keeping the PIN itself around."""
    return hashlib.sha256(pin.encode()).hexdigest()


def _check_label(label: str) -> None:
    if not label:
        raise InvalidParameter("a key label must not be empty")
    if "\x00" in label:
        raise InvalidParameter("a key label must not contain NUL")


def _classes_for(kind: ObjectKind) -> list[ObjectClass]:
    if kind == "key_pair":
        return [ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY]
    if kind == "secret":
        return [ObjectClass.SECRET_KEY]
    raise InvalidParameter(f"unknown key kind {kind!r}")
