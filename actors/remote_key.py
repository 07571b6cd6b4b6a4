"""Mutual TLS from a stdlib `ssl.SSLContext` whose private key stays in the Keys Service.

EST (certd), DPS and IoT Hub (identityd) authenticate with a client certificate whose key lives
in keyd: a file, a PKCS#11 token or a TPM, reachable only through a key handle. The original
installs an OpenSSL engine that forwards each private-key operation to keyd. `client_context`
does the same inside an ordinary `ssl.SSLContext`, so httpx (and anything else taking an
`SSLContext`) works unchanged and the TLS client never holds a key, a PKCS#11 module or a PIN.

How (spec/tls-client-keys.md, option "our own ctypes"): the certificate's public key is decoded
by OpenSSL into a legacy `EC_KEY` / `RSA` whose method table has our sign callback
(`EC_KEY_METHOD` sign, `RSA_METHOD` priv_enc); wrapped in an `EVP_PKEY`, it is installed with
`SSL_CTX_use_PrivateKey` on the context's own `SSL_CTX`. OpenSSL 3.0 treats a key with a
non-default method as "foreign" and signs it through the legacy path, so every handshake
signature reaches the callback: ECDSA with the digest, RSA PKCS#1 v1.5 with the DigestInfo, and
RSA-PSS as a full block OpenSSL has already EMSA-PSS encoded (RSA_NO_PADDING). These are the
operations the original's engine asks keyd for, so keyd needs nothing new.

Why this and not the `sslcontext` PyPI package (an OpenSSL 3 provider via ctypes): it is an
alpha from one author, and a provider is registered process-wide, where this touches only the
`SSL_CTX` it is given. The price is reliance on deprecated-but-present OpenSSL 3 APIs and on
CPython's `PySSLContext` layout (`SSL_CTX *` right after the object header), which is checked
against `SSL_CTX_get_options` before anything is written.

Lifetime and threads: the method tables, ex_data indexes and callbacks are created once per
process and never freed (immutable handles). Each key's ex_data holds the address of its
`_RemoteKey`, which the `SSLContext` keeps alive as an attribute: OpenSSL signs only inside a
call on an `SSLSocket`/`SSLObject` (handshake, renegotiation, post-handshake auth), and each of
those holds its context, so the signer outlives every call into it; freeing a key calls none of
our code.
Keeping the reference on the Python side (not a native one) leaves a cycle through a
`private_op` that refers back to its client visible to the garbage collector. Handshakes run
with the GIL released; a callback takes it (ctypes does) and `private_op` may block its thread,
so several threads may handshake at once, with one context or many.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

logger = logging.getLogger(__name__)

# private_op(algorithm, data) -> result; synchronous, may block its thread:
#   "ECDSA"          data = the digest; returns a DER ECDSA signature          (keyd /sign)
#   "RSA-PKCS1"      data = a DigestInfo; returns the PKCS#1 v1.5 type-1 op    (keyd /encrypt)
#   "RSA-NO-PADDING" data = a modulus-size block (EMSA-PSS); returns the raw op (keyd /encrypt)
PrivateOp = Callable[[str, bytes], bytes]

# From OpenSSL's headers (stable ABI values).
_CRYPTO_EX_INDEX_EC_KEY = 8
_CRYPTO_EX_INDEX_RSA = 9
_RSA_PKCS1_PADDING = 1
_RSA_NO_PADDING = 3
_SSL_CTRL_CHAIN_CERT = 89

_RSA_ALGORITHMS = {_RSA_PKCS1_PADDING: "RSA-PKCS1", _RSA_NO_PADDING: "RSA-NO-PADDING"}

_P = ctypes.c_void_p
_EC_SIGN = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _P, ctypes.POINTER(ctypes.c_uint), _P, _P, _P
)
_RSA_PRIV = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _P, _P, _P, ctypes.c_int)

# Name of the attribute through which a context keeps its signer alive.
_KEEPER = "_aziot_remote_key"


def client_context(
    chain_pem: bytes | None,
    private_op: PrivateOp | None,
    trusted_pems: Sequence[bytes] = (),
) -> ssl.SSLContext:
    """A TLS client context that verifies servers and, given a chain, presents its first cert.

    `chain_pem` is the client certificate, then any intermediates to send with it; `private_op`
    makes every signature for that certificate's public key (see `PrivateOp`). Trust is
    OpenSSL's default verify paths (so `SSL_CERT_FILE`/`SSL_CERT_DIR` apply) plus
    `trusted_pems`. Hostname checking and certificate verification stay on.

    `private_op` runs synchronously in the thread doing the handshake, once per full handshake.
    Under trio, make the TLS calls in a worker thread (`trio.to_thread.run_sync` around a sync
    `httpx.Client`) and let `private_op` reach the Keys Service with `trio.from_thread.run`:
    called on the loop's own thread it would stall the loop, or deadlock if it waited on it.
    It may be called from several threads at once when the context is shared.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    for pem in trusted_pems:
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
    if chain_pem is None:
        return ctx
    if private_op is None:
        raise ValueError("a client certificate chain needs a private_op to sign for it")
    chain = x509.load_pem_x509_certificates(chain_pem)
    signer = _RemoteKey(chain[0], private_op)
    _install(ctx, chain, signer)
    setattr(ctx, _KEEPER, signer)
    return ctx


class _RemoteKey:
    """The Python side of one installed key: its private_op and the public key it signs for."""

    def __init__(self, cert: x509.Certificate, private_op: PrivateOp):
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise ValueError(f"client certificate key {type(public).__name__} is not EC or RSA")
        self.public = public
        self.private_op = private_op
        self.label = cert.subject.rfc4514_string()
        self.spki = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def _call(self, algorithm: str, data: bytes) -> bytes:
        # Timed at debug level: a slow Keys Service (a TPM RSA sign takes ~200 ms) shows here.
        started = time.perf_counter()
        result = self.private_op(algorithm, data)
        elapsed = (time.perf_counter() - started) * 1000
        logger.debug("%s for %s by private_op in %.1f ms", algorithm, self.label, elapsed)
        return result

    def sign_ecdsa(self, digest: bytes, limit: int) -> bytes:
        signature = bytes(self._call("ECDSA", digest))
        # Parsing rejects what is not a DER ECDSA-Sig-Value before OpenSSL sends it.
        utils.decode_dss_signature(signature)
        if len(signature) > limit:
            raise ValueError(f"ECDSA signature of {len(signature)} bytes exceeds {limit}")
        return signature

    def rsa_private(self, algorithm: str, data: bytes) -> bytes:
        assert isinstance(self.public, rsa.RSAPublicKey)
        numbers = self.public.public_numbers()
        size = (numbers.n.bit_length() + 7) // 8
        if algorithm == "RSA-PKCS1":
            if len(data) > size - 11:
                raise ValueError(f"{len(data)} bytes do not fit PKCS#1 type 1 in {size}")
            expected = b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data
        else:
            if len(data) != size:
                raise ValueError(f"RSA-NO-PADDING input of {len(data)} bytes, modulus {size}")
            expected = data
        result = bytes(self._call(algorithm, data))
        value = int.from_bytes(result, "big")
        # A faulty RSA-CRT result would disclose the key's factors to the peer (Boneh, DeMillo,
        # Lipton): check it with the public exponent, cheap for e = 65537, before it is sent.
        if value >= numbers.n or pow(value, numbers.e, numbers.n) != int.from_bytes(expected):
            raise ValueError(f"{algorithm} result does not verify with the certificate's key")
        return value.to_bytes(size, "big")


def _install(ctx: ssl.SSLContext, chain: Sequence[x509.Certificate], signer: _RemoteKey) -> None:
    """Put the chain and a key that signs through `signer` into `ctx`'s SSL_CTX."""
    lib = _openssl()
    ssl_ctx = _ssl_ctx_pointer(ctx, lib)
    lib.ERR_clear_error()
    owned: list[tuple[Callable[[Any], None], int]] = []
    try:
        certs = [_take(owned, lib.X509_free, _d2i(lib.d2i_X509, _der(cert))) for cert in chain]
        key = _take(owned, lib.EVP_PKEY_free, _make_pkey(lib, signer))
        _check(lib, lib.SSL_CTX_use_certificate(ssl_ctx, certs[0]), "SSL_CTX_use_certificate")
        # OpenSSL refuses a key whose public half does not match the certificate.
        _check(lib, lib.SSL_CTX_use_PrivateKey(ssl_ctx, key), "SSL_CTX_use_PrivateKey")
        for cert in certs[1:]:
            # add1: the SSL_CTX takes its own reference, ours is released below.
            added = lib.SSL_CTX_ctrl(ssl_ctx, _SSL_CTRL_CHAIN_CERT, 1, cert)
            _check(lib, added, "SSL_CTX_add1_chain_cert")
    finally:
        for free, pointer in reversed(owned):
            free(pointer)
        lib.ERR_clear_error()


def _make_pkey(lib: _OpenSSL, signer: _RemoteKey) -> int:
    """An EVP_PKEY holding the public key with our method, its ex_data pointing to `signer`."""
    owned: list[tuple[Callable[[Any], None], int]] = []
    try:
        if isinstance(signer.public, ec.EllipticCurvePublicKey):
            key = _take(owned, lib.EC_KEY_free, _d2i(lib.d2i_EC_PUBKEY, signer.spki))
            # The method must be set before the key goes into the EVP_PKEY: that is when
            # OpenSSL marks it foreign, so that it is not copied into the default provider.
            _check(lib, lib.EC_KEY_set_method(key, lib.ec_method), "EC_KEY_set_method")
            _check(lib, lib.EC_KEY_set_ex_data(key, lib.ec_index, id(signer)), "ex_data")
            assign = lib.EVP_PKEY_set1_EC_KEY
        else:
            key = _take(owned, lib.RSA_free, _d2i(lib.d2i_RSA_PUBKEY, signer.spki))
            _check(lib, lib.RSA_set_method(key, lib.rsa_method), "RSA_set_method")
            _check(lib, lib.RSA_set_ex_data(key, lib.rsa_index, id(signer)), "ex_data")
            assign = lib.EVP_PKEY_set1_RSA
        pkey = _check(lib, lib.EVP_PKEY_new(), "EVP_PKEY_new")
        if not assign(pkey, key):  # set1: pkey takes a reference, ours is released below
            lib.EVP_PKEY_free(pkey)
            _check(lib, 0, "EVP_PKEY_set1")
        return pkey
    finally:
        for free, pointer in owned:
            free(pointer)


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: _OpenSSL) -> int:
    """The `SSL_CTX *` inside `ctx`, proven by reading its options through OpenSSL.

    CPython's `PySSLContext` starts with `SSL_CTX *ctx` right after the object header. That is
    an implementation detail, so the pointer is trusted only if OpenSSL reports the same
    options as Python, before and after flipping one (server-only, so harmless here).
    """
    head = object.__basicsize__
    if sys.implementation.name != "cpython" or (
        ssl._ssl._SSLContext.__basicsize__ < head + ctypes.sizeof(ctypes.c_void_p)  # type: ignore[attr-defined]
    ):
        raise RuntimeError("remote TLS keys need CPython's ssl module")
    pointer = ctypes.c_void_p.from_address(id(ctx) + head).value
    probe = ssl.OP_CIPHER_SERVER_PREFERENCE
    seen = []
    if pointer:
        for _ in range(2):
            seen.append(lib.SSL_CTX_get_options(pointer) == int(ctx.options))
            ctx.options ^= probe
    if seen != [True, True]:
        raise RuntimeError("cannot find the SSL_CTX of this ssl.SSLContext (CPython layout?)")
    return pointer


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _d2i(function: Callable[..., int | None], der: bytes) -> int:
    """Decode DER with one of OpenSSL's d2i_* functions; 0 when it fails."""
    buffer = ctypes.create_string_buffer(der, len(der))
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))
    return function(None, ctypes.byref(cursor), len(der)) or 0


def _take(owned: list[tuple[Callable[[Any], None], int]], free: Any, pointer: int) -> int:
    """Remember `pointer` to be freed later, or fail if OpenSSL returned NULL."""
    if not pointer:
        raise ssl.SSLError(f"OpenSSL could not decode a key or certificate: {_errors(_openssl())}")
    owned.append((free, pointer))
    return pointer


def _check(lib: _OpenSSL, result: int | None, what: str) -> int:
    if not result or result <= 0:
        raise ssl.SSLError(f"{what} failed: {_errors(lib)}")
    return result


def _errors(lib: _OpenSSL) -> str:
    """OpenSSL's error queue for this thread, as text, emptying it."""
    texts = []
    buffer = ctypes.create_string_buffer(256)
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buffer, len(buffer))
        texts.append(buffer.value.decode(errors="replace"))
    return "; ".join(texts) or "no OpenSSL error"


def _signer(pointer: int | None) -> _RemoteKey:
    """The `_RemoteKey` whose address a key's ex_data holds (kept alive by its context)."""
    if not pointer:
        raise RuntimeError("key has no signer attached")
    return ctypes.cast(pointer, ctypes.py_object).value  # type: ignore[no-any-return]


# The callbacks run on OpenSSL's stack inside a handshake: nothing may escape them. Any failure
# is logged here and reported to OpenSSL as a failed signature, so the handshake ends with an
# SSLError in the calling thread instead of an unraisable exception or a crash.


def _ec_sign(
    _type: int, digest: int, length: int, out: int, out_length: Any, _kinv: int, _r: int, key: int
) -> int:
    signer = None
    try:
        lib = _openssl()
        signer = _signer(lib.EC_KEY_get_ex_data(key, lib.ec_index))
        signature = signer.sign_ecdsa(ctypes.string_at(digest, length), lib.ECDSA_size(key))
        ctypes.memmove(out, signature, len(signature))
        out_length[0] = len(signature)
        return 1
    except BaseException:
        logger.exception("remote ECDSA signature failed for %s", signer and signer.label)
        return 0


def _rsa_priv_enc(length: int, source: int, out: int, key: int, padding: int) -> int:
    signer = None
    try:
        lib = _openssl()
        signer = _signer(lib.RSA_get_ex_data(key, lib.rsa_index))
        algorithm = _RSA_ALGORITHMS.get(padding)
        if algorithm is None:
            raise ValueError(f"RSA padding mode {padding} is not supported by the Keys Service")
        result = signer.rsa_private(algorithm, ctypes.string_at(source, length))
        ctypes.memmove(out, result, len(result))
        return len(result)
    except BaseException:
        logger.exception("remote RSA private operation failed for %s", signer and signer.label)
        return -1


def _rsa_priv_dec(_length: int, _source: int, _out: int, _key: int, _padding: int) -> int:
    # A TLS client never decrypts with its certificate key; without this the default method
    # would try and fail on the missing private exponent less clearly.
    logger.error("RSA decryption requested from a remote TLS client key; refused")
    return -1


class _OpenSSL:
    """The libssl/libcrypto that `_ssl` is linked to, with typed functions and our methods."""

    def __init__(self) -> None:
        lib = _load_ssl_libraries()

        def bind(name: str, restype: Any, *argtypes: Any) -> Any:
            # A prototype of our own, so no one else's argtypes on the shared CDLL matter.
            try:
                return ctypes.CFUNCTYPE(restype, *argtypes)((name, lib))
            except AttributeError:
                raise RuntimeError(
                    f"{name} is missing from {ssl.OPENSSL_VERSION} (built without deprecated APIs?)"
                ) from None

        i, u64, ul, long_ = ctypes.c_int, ctypes.c_uint64, ctypes.c_ulong, ctypes.c_long
        self.ERR_clear_error = bind("ERR_clear_error", None)
        self.ERR_get_error = bind("ERR_get_error", ul)
        self.ERR_error_string_n = bind(
            "ERR_error_string_n", None, ul, ctypes.c_char_p, ctypes.c_size_t
        )
        self.SSL_CTX_get_options = bind("SSL_CTX_get_options", u64, _P)
        self.SSL_CTX_use_certificate = bind("SSL_CTX_use_certificate", i, _P, _P)
        self.SSL_CTX_use_PrivateKey = bind("SSL_CTX_use_PrivateKey", i, _P, _P)
        self.SSL_CTX_ctrl = bind("SSL_CTX_ctrl", long_, _P, i, long_, _P)
        self.d2i_X509 = bind("d2i_X509", _P, _P, _P, long_)
        self.X509_free = bind("X509_free", None, _P)
        self.d2i_EC_PUBKEY = bind("d2i_EC_PUBKEY", _P, _P, _P, long_)
        self.d2i_RSA_PUBKEY = bind("d2i_RSA_PUBKEY", _P, _P, _P, long_)
        self.EVP_PKEY_new = bind("EVP_PKEY_new", _P)
        self.EVP_PKEY_free = bind("EVP_PKEY_free", None, _P)
        self.EVP_PKEY_set1_EC_KEY = bind("EVP_PKEY_set1_EC_KEY", i, _P, _P)
        self.EVP_PKEY_set1_RSA = bind("EVP_PKEY_set1_RSA", i, _P, _P)
        self.EC_KEY_free = bind("EC_KEY_free", None, _P)
        self.EC_KEY_set_method = bind("EC_KEY_set_method", i, _P, _P)
        self.EC_KEY_set_ex_data = bind("EC_KEY_set_ex_data", i, _P, i, _P)
        self.EC_KEY_get_ex_data = bind("EC_KEY_get_ex_data", _P, _P, i)
        self.ECDSA_size = bind("ECDSA_size", i, _P)
        self.RSA_free = bind("RSA_free", None, _P)
        self.RSA_set_method = bind("RSA_set_method", i, _P, _P)
        self.RSA_set_ex_data = bind("RSA_set_ex_data", i, _P, i, _P)
        self.RSA_get_ex_data = bind("RSA_get_ex_data", _P, _P, i)
        new_index = bind("CRYPTO_get_ex_new_index", i, i, long_, _P, _P, _P, _P)

        self.ec_index = new_index(_CRYPTO_EX_INDEX_EC_KEY, 0, None, None, None, None)
        self.rsa_index = new_index(_CRYPTO_EX_INDEX_RSA, 0, None, None, None, None)
        if self.ec_index < 0 or self.rsa_index < 0:
            raise RuntimeError(f"CRYPTO_get_ex_new_index failed: {_errors(self)}")

        self.callbacks = (_EC_SIGN(_ec_sign), _RSA_PRIV(_rsa_priv_enc), _RSA_PRIV(_rsa_priv_dec))
        for callback in self.callbacks:
            # Immortal: a key may still be freed or, in a daemon thread, used while the
            # interpreter tears modules down; its trampolines must not go away first.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(callback))
        ec_sign, rsa_enc, rsa_dec = self.callbacks

        # Copies of OpenSSL's own methods with only the private-key operations replaced: the
        # public ones (verify, encrypt) stay native. Never freed: keys point at them.
        self.ec_method = bind("EC_KEY_METHOD_new", _P, _P)(bind("EC_KEY_OpenSSL", _P)())
        if not self.ec_method:
            raise RuntimeError(f"EC_KEY_METHOD_new failed: {_errors(self)}")
        # No sign_setup/sign_sig: nothing but ECDSA_sign may use this key; the others fail.
        set_sign = bind("EC_KEY_METHOD_set_sign", None, _P, _EC_SIGN, _P, _P)
        set_sign(self.ec_method, ec_sign, None, None)
        self.rsa_method = bind("RSA_meth_dup", _P, _P)(bind("RSA_PKCS1_OpenSSL", _P)())
        if not self.rsa_method:
            raise RuntimeError(f"RSA_meth_dup failed: {_errors(self)}")
        set_name = bind("RSA_meth_set1_name", i, _P, ctypes.c_char_p)
        ok = set_name(self.rsa_method, b"aziot remote key")
        ok &= bind("RSA_meth_set_priv_enc", i, _P, _RSA_PRIV)(self.rsa_method, rsa_enc)
        ok &= bind("RSA_meth_set_priv_dec", i, _P, _RSA_PRIV)(self.rsa_method, rsa_dec)
        if not ok:
            raise RuntimeError(f"RSA_meth_set_* failed: {_errors(self)}")


@functools.cache
def _openssl() -> _OpenSSL:
    """Built once per process: only immutable library handles, methods and callbacks."""
    return _OpenSSL()


def _load_ssl_libraries() -> ctypes.CDLL:
    """A handle whose symbols resolve in the very libssl/libcrypto that `ssl` uses.

    `cryptography` carries its own OpenSSL, and a system may hold several: a key object from
    one libcrypto must never reach another. dlsym on the `_ssl` extension's own handle searches
    its dependencies, which are exactly the libraries it was linked to; failing that (an `_ssl`
    built into the interpreter), the libraries already mapped into the process.
    """
    candidates: list[str] = []
    module_file = getattr(ssl._ssl, "__file__", None)  # type: ignore[attr-defined]
    if module_file:
        candidates.append(module_file)
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "/libssl.so" in line}
        candidates.extend(sorted(mapped))
    except OSError:
        pass
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            version = ctypes.CFUNCTYPE(ctypes.c_ulong)(("OpenSSL_version_num", lib))()
        except (OSError, AttributeError):
            continue
        if version == ssl.OPENSSL_VERSION_NUMBER:
            return lib
    raise RuntimeError(f"cannot find the libssl of the ssl module ({ssl.OPENSSL_VERSION})")
