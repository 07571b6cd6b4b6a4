"""The TPM through tpm2-pytss's ESAPI: what tpmd asks of it, on the TPM worker's one thread.

`TpmDevice` is the library context of the worker's `LibraryThread`. It is built without touching
the TPM: `open()` (run by the worker, again after every loss) connects through the TCTI string
exactly as the original hands it to tss2 (`device`, `device:/dev/tpmrm0`, `swtpm:path=...`,
`swtpm:host=...,port=...`, `tabrmd`, or empty to let the loader probe), sets the hierarchy
passwords, flushes transient objects left by an earlier process, and makes sure the endorsement
key (0x81010001) and storage root key (0x81000001) exist, creating them from the default RSA
templates (TCG EK profile template L-1, TCG provisioning guidance SRK) and persisting them when
absent, as the original does.

Two kinds of failure leave here. `TpmUnavailable`: the TPM cannot be used at all right now (no
device, swtpm gone, a connection that broke); the context is dropped and the worker opens it
again with backoff. `TpmFailure`: one command failed (a bad blob, no auth key yet); the context
stays usable. Both carry the exact cause for the log; clients only ever see `internal error`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TSS2_RC,
)
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_RSA_PARMS,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ENDORSEMENT_KEY = 0x81_01_00_01
STORAGE_ROOT_KEY = 0x81_00_00_01

# PolicySecret(TPM_RH_ENDORSEMENT): the EK can only be used under a policy session that proved
# knowledge of the endorsement hierarchy's password (TCG EK Credential Profile, B.3.2).
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")


def _aes128_cfb() -> TPMT_SYM_DEF_OBJECT:
    return TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )


def _rsa_storage_template(attributes: int, policy: bytes) -> TPM2B_PUBLIC:
    """An RSA-2048 restricted decryption key with AES-128-CFB for its children, a 256-byte
    all-zero unique field: what the original's EK_RSA_TEMPLATE and SRK_RSA_TEMPLATE say."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            authPolicy=policy,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=_aes128_cfb(),
                    scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
                    keyBits=2048,
                    exponent=0,
                )
            ),
            unique=TPMU_PUBLIC_ID(rsa=b"\0" * 256),
        )
    )


_PRIMARY = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)


def ek_template() -> TPM2B_PUBLIC:
    return _rsa_storage_template(_PRIMARY | TPMA_OBJECT.ADMINWITHPOLICY, EK_POLICY)


def srk_template() -> TPM2B_PUBLIC:
    return _rsa_storage_template(_PRIMARY | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA, b"")


class TpmUnavailable(Exception):
    """The TPM cannot be used now; the context is gone and must be opened again."""


class TpmFailure(Exception):
    """One TPM command failed; the context is still usable."""


DEFAULT_DEVICES = ("/dev/tpmrm0", "/dev/tpm0")  # what tss2's "device" TCTI tries, in order


def missing_device(tcti: str) -> str | None:
    """For a `device` TCTI whose device file is absent, what is missing; else None."""
    name, _, config = tcti.partition(":")
    if name != "device":
        return None
    paths = (config,) if config else DEFAULT_DEVICES
    if any(os.path.exists(path) for path in paths):
        return None
    return " and ".join(paths) + (" do not exist" if len(paths) > 1 else " does not exist")


@attrs.frozen
class TpmSettings:
    tcti: str
    auth_key_handle: int
    endorsement_auth: str = attrs.field(default="", repr=False)
    owner_auth: str = attrs.field(default="", repr=False)


# Layers of a TSS2 return code after which the connection, not the command, is in doubt.
_CONTEXT_LAYERS = frozenset(
    {
        int(TSS2_RC.TCTI_RC_LAYER),
        int(TSS2_RC.SYS_RC_LAYER),
        int(TSS2_RC.ESAPI_RC_LAYER),
        int(TSS2_RC.RESMGR_RC_LAYER),
    }
)
_AUTH_ERRORS = frozenset({int(TPM2_RC.BAD_AUTH), int(TPM2_RC.AUTH_FAIL)})


def _layer(error: TSS2_Exception) -> int:
    return int(error.rc) & int(TSS2_RC.RC_LAYER_MASK)


def _tpm_error(error: TSS2_Exception) -> int:
    return int(error.error)


class TpmDevice:
    """One ESAPI context on one TPM, opened by `open()`; use only from its library thread."""

    def __init__(self, settings: TpmSettings) -> None:
        self.settings = settings
        self._esapi: ESAPI | None = None
        self._ek: Any = None
        self._srk: Any = None
        self._auth_key: Any = None
        self._stale_auth_key: str | None = None  # why the object at the auth key handle is unusable

    # -- opening -------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._esapi is not None

    def open(self) -> str:
        """(Re)connect and make sure EK and SRK exist; returns what was done, for the log."""
        self.close()
        tcti = self.settings.tcti
        missing = missing_device(tcti)
        if missing:
            # Said here rather than by tss2, which writes five lines to stderr at each retry:
            # a device without a TPM still has tpmd configured by `config apply`.
            raise TpmUnavailable(f"TCTI {tcti!r}: no TPM device: {missing}")
        try:
            esapi = ESAPI(tcti or None)
        except TSS2_Exception as error:
            raise TpmUnavailable(
                f"cannot open the TPM through TCTI {tcti!r} (device missing, swtpm not "
                f"running, or the TPM busy with another process): {error}"
            ) from None
        except Exception as error:  # the loader's own refusals (bad TCTI string)
            raise TpmUnavailable(f"cannot open the TPM through TCTI {tcti!r}: {error}") from None
        self._esapi = esapi
        try:
            done = self._prepare(esapi)
        except BaseException:
            self.close()
            raise
        return done

    def _prepare(self, esapi: ESAPI) -> str:
        with self._translated("setting the hierarchy passwords"):
            esapi.tr_set_auth(ESYS_TR.ENDORSEMENT, self.settings.endorsement_auth.encode())
            esapi.tr_set_auth(ESYS_TR.OWNER, self.settings.owner_auth.encode())
        flushed = self._flush_transients(esapi)
        persistent = self._handles(esapi, TPM2_HC.PERSISTENT_FIRST, TPM2_HC.PERSISTENT_LAST)
        done = [f"flushed {flushed} stale transient object(s)"] if flushed else []
        self._ek, created = self._ensure_primary(
            esapi, persistent, ENDORSEMENT_KEY, "endorsement", ek_template()
        )
        done += ["created and persisted the endorsement key"] * created
        self._srk, created = self._ensure_primary(
            esapi, persistent, STORAGE_ROOT_KEY, "owner", srk_template()
        )
        done += ["created and persisted the storage root key"] * created
        handle = self.settings.auth_key_handle
        self._auth_key = self._stale_auth_key = None
        if handle in persistent:
            with self._translated(f"reading the auth key at {handle:#x}"):
                tr = esapi.tr_from_tpmpublic(handle)
                public, _, _ = esapi.read_public(tr)
            kind = int(public.publicArea.type)
            if kind == int(TPM2_ALG.KEYEDHASH):
                self._auth_key = tr
            else:
                # Left by another program or an older install (iotedge #6638): it cannot HMAC,
                # so signing fails until an import replaces it, as the original's import does.
                self._stale_auth_key = (
                    f"{handle:#x} holds an {str(TPM2_ALG(kind)).upper()} key, not an HMAC auth key"
                )
                log.warning(
                    "tpm: the auth key handle %s; the next auth key import replaces it (if "
                    "another program needs it, move it: `tpm2_evictcontrol -C o -c %#x`)",
                    self._stale_auth_key,
                    handle,
                )
        state = "present" if self._auth_key else self._stale_auth_key or "not imported"
        done.append(f"auth key at {handle:#x}: {state}")
        return "; ".join(done)

    def close(self) -> None:
        esapi, self._esapi = self._esapi, None
        self._ek = self._srk = self._auth_key = None
        if esapi is not None:
            with contextlib.suppress(Exception):
                esapi.close()

    def _handles(self, esapi: ESAPI, first: int, last: int) -> list[int]:
        handles: list[int] = []
        start = int(first)
        more = True
        while more:
            with self._translated("listing handles"):
                more, data = esapi.get_capability(TPM2_CAP.HANDLES, start, 64)
            found = [int(h) for h in data.data.handles]
            handles += [h for h in found if h <= int(last)]
            if not found or found[-1] >= int(last):
                break
            start = found[-1] + 1
        return handles

    def _flush_transients(self, esapi: ESAPI) -> int:
        """Objects a crashed earlier process left loaded (without a resource manager they stay
        and use up the TPM's few object slots)."""
        count = 0
        for handle in self._handles(esapi, TPM2_HC.TRANSIENT_FIRST, TPM2_HC.TRANSIENT_LAST):
            with self._translated(f"flushing transient object {handle:#x}"):
                esapi.flush_context(esapi.tr_from_tpmpublic(handle))
            count += 1
        return count

    def _ensure_primary(
        self, esapi: ESAPI, persistent: list[int], handle: int, hierarchy: str, template: Any
    ) -> tuple[Any, bool]:
        name = "endorsement key" if hierarchy == "endorsement" else "storage root key"
        article = "an" if hierarchy == "endorsement" else "a"
        if handle in persistent:
            with self._translated(f"reading the {name} at {handle:#x}"):
                tr = esapi.tr_from_tpmpublic(handle)
                public, _, _ = esapi.read_public(tr)
            attributes = int(public.publicArea.objectAttributes)
            wanted = int(TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
            if attributes & wanted != wanted or attributes & int(TPMA_OBJECT.SIGN_ENCRYPT):
                raise TpmFailure(
                    f"persistent handle {handle:#x} holds a key that is not {article} {name} "
                    f"(it is not a restricted decryption key: attributes {attributes:#x}); tpmd "
                    "does not replace it: if it is not needed, evict it with `tpm2_evictcontrol "
                    f"-C o -c {handle:#x}` (and `-P` with the owner password, if one is set); "
                    "tpmd then takes the handle by itself"
                )
            return tr, False
        log.warning("tpm: no %s at %#x; creating one from the default RSA template", name, handle)
        primary = ESYS_TR.ENDORSEMENT if hierarchy == "endorsement" else ESYS_TR.OWNER
        with self._translated(f"creating the {name}", hierarchy):
            transient, _, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, primary_handle=primary
            )
        try:
            with self._translated(f"persisting the {name} at {handle:#x}", "owner"):
                tr = esapi.evict_control(ESYS_TR.OWNER, transient, handle)
        finally:
            with contextlib.suppress(TSS2_Exception):
                esapi.flush_context(transient)
        return tr, True

    @contextlib.contextmanager
    def _translated(self, what: str, hierarchy: str | None = None) -> Iterator[None]:
        """TSS2 errors as `TpmUnavailable` (the connection) or `TpmFailure` (the command), with
        what was being done and, for a refused password, which hierarchy's it was."""
        try:
            yield
        except TSS2_Exception as error:
            if _layer(error) in _CONTEXT_LAYERS:
                self.close()
                raise TpmUnavailable(f"{what}: the TPM connection failed: {error}") from None
            if hierarchy is not None and _tpm_error(error) in _AUTH_ERRORS:
                raise TpmFailure(
                    f"{what}: the TPM refused the {hierarchy} hierarchy's authorization "
                    f"(check [hierarchy_authorization] {hierarchy} in the tpmd config): {error}"
                ) from None
            if _tpm_error(error) == int(TPM2_RC.LOCKOUT):
                raise TpmFailure(
                    f"{what}: the TPM is in dictionary-attack lockout: {error}"
                ) from None
            raise TpmFailure(f"{what}: {error}") from None

    def _context(self) -> ESAPI:
        if self._esapi is None:
            raise TpmUnavailable("the TPM is not open")
        return self._esapi

    # -- operations ----------------------------------------------------------------------------

    def get_tpm_keys(self) -> tuple[bytes, bytes]:
        """The marshalled TPM2B_PUBLIC of the EK and of the SRK."""
        esapi = self._context()
        with self._translated("reading the endorsement key"):
            ek, _, _ = esapi.read_public(self._ek)
        with self._translated("reading the storage root key"):
            srk, _, _ = esapi.read_public(self._srk)
        return bytes(ek.marshal()), bytes(srk.marshal())

    def sign_with_auth_key(self, data: bytes) -> bytes:
        esapi = self._context()
        if self._auth_key is None:
            at = self._stale_auth_key or f"none at {self.settings.auth_key_handle:#x}"
            raise TpmFailure(f"no auth key has been imported ({at})")
        if len(data) > 1024:  # TPM2_HMAC takes one TPM2B_MAX_BUFFER; more needs a sequence
            return self._hmac_sequence(esapi, data)
        with self._translated("signing with the auth key"):
            digest = esapi.hmac(self._auth_key, data, TPM2_ALG.SHA256)
        return bytes(digest)

    def _hmac_sequence(self, esapi: ESAPI, data: bytes) -> bytes:
        chunks = [data[at : at + 1024] for at in range(0, len(data), 1024)]
        with self._translated("signing with the auth key"):
            sequence = esapi.hmac_start(self._auth_key, b"", TPM2_ALG.SHA256)
            try:
                for chunk in chunks[:-1]:
                    esapi.sequence_update(sequence, chunk)
                digest, _ = esapi.sequence_complete(sequence, chunks[-1], ESYS_TR.NULL)
            except TSS2_Exception:
                with contextlib.suppress(TSS2_Exception):
                    esapi.flush_context(sequence)
                raise
        return bytes(digest)

    def import_auth_key(self, blob: bytes) -> None:
        """ActivateCredential, Import under the SRK, Load, then persist at the auth key handle.

        Unlike the original, which evicts the old key before it unwraps the new one, the old
        key stays until the new one is loaded: a blob that fails anywhere before that leaves the
        device signing with the key it had."""
        esapi = self._context()
        credential, secret, duplicate, seed, public = parse_auth_key_blob(blob)
        inner = self._activate(esapi, credential, secret)
        with self._translated("importing the auth key under the storage root key"):
            private = esapi.import_(
                self._srk, TPM2B_DATA(inner), public, duplicate, seed, _aes128_cfb()
            )
        with self._translated("loading the auth key"):
            loaded = esapi.load(self._srk, private, public)
        try:
            self._replace_auth_key(esapi, loaded)
        finally:
            with contextlib.suppress(TSS2_Exception):
                esapi.flush_context(loaded)

    def _activate(self, esapi: ESAPI, credential: Any, secret: Any) -> bytes:
        """The inner wrapping key, from the credential DPS made for this TPM's EK and SRK."""
        with self._translated("starting the endorsement key's policy session"):
            session = esapi.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(
                    algorithm=TPM2_ALG.AES,
                    keyBits=TPMU_SYM_KEY_BITS(aes=128),
                    mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                ),
                TPM2_ALG.SHA256,
            )
        try:
            with self._translated("PolicySecret on the endorsement hierarchy", "endorsement"):
                esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            with self._translated("activating the credential"):
                inner = esapi.activate_credential(
                    self._srk,
                    self._ek,
                    credential,
                    secret,
                    session1=ESYS_TR.PASSWORD,
                    session2=session,
                )
        finally:
            if self._esapi is not None:
                with contextlib.suppress(TSS2_Exception):
                    esapi.flush_context(session)
        return bytes(inner)

    def _replace_auth_key(self, esapi: ESAPI, loaded: Any) -> None:
        handle = self.settings.auth_key_handle
        persistent = self._handles(esapi, handle, handle)
        if handle in persistent:
            old = self._auth_key
            with self._translated(f"reading the previous auth key at {handle:#x}"):
                old = old if old is not None else esapi.tr_from_tpmpublic(handle)
            with self._translated(f"evicting the previous auth key at {handle:#x}", "owner"):
                esapi.evict_control(ESYS_TR.OWNER, old, handle)
            self._auth_key = self._stale_auth_key = None
        with self._translated(f"persisting the auth key at {handle:#x}", "owner"):
            self._auth_key = esapi.evict_control(ESYS_TR.OWNER, loaded, handle)


def parse_auth_key_blob(blob: bytes) -> tuple[Any, Any, Any, Any, Any]:
    """The five marshalled TPM2B structures of DPS's `authenticationKey`, in order: credential
    blob, encrypted secret, duplicate, seed, public. Bytes after them are ignored, as the
    original ignores them."""
    kinds: list[tuple[str, Callable[[bytes], tuple[Any, int]]]] = [
        ("credential blob (TPM2B_ID_OBJECT)", TPM2B_ID_OBJECT.unmarshal),
        ("encrypted secret (TPM2B_ENCRYPTED_SECRET)", TPM2B_ENCRYPTED_SECRET.unmarshal),
        ("duplicate (TPM2B_PRIVATE)", TPM2B_PRIVATE.unmarshal),
        ("seed (TPM2B_ENCRYPTED_SECRET)", TPM2B_ENCRYPTED_SECRET.unmarshal),
        ("public area (TPM2B_PUBLIC)", TPM2B_PUBLIC.unmarshal),
    ]
    parts = []
    at = 0
    for what, unmarshal in kinds:
        try:
            value, used = unmarshal(blob[at:])
        except Exception as error:
            raise TpmFailure(
                f"the auth key blob is malformed: its {what} at byte {at} of {len(blob)}: {error}"
            ) from None
        parts.append(value)
        at += used
    return parts[0], parts[1], parts[2], parts[3], parts[4]
