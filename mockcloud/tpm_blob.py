"""The `authenticationKey` DPS sends a TPM device: an HMAC key only that TPM can take in.

`make_auth_key_blob(ek, srk, key)` wraps a 32-byte HMAC-SHA256 key for the TPM whose marshalled
endorsement key and storage root key (TPM2B_PUBLIC, as tpmd's `get_tpm_keys` gives them) are
`ek` and `srk`, in the layout tpmd unwraps (provisioning.md §8.4): five marshalled structures,

1. TPM2B_ID_OBJECT and 2. TPM2B_ENCRYPTED_SECRET: MakeCredential for the EK, bound to the SRK's
   name, protecting a fresh AES-128 inner wrapping key (ActivateCredential gives it back);
3. TPM2B_PRIVATE: the duplicate of a keyed-hash HMAC-SHA256 object whose secret is `key`,
   inner-wrapped with that AES-128-CFB key and outer-wrapped for the SRK;
4. TPM2B_ENCRYPTED_SECRET: the outer wrapper's seed, encrypted to the SRK;
5. TPM2B_PUBLIC: that object's public area.

After Import under the SRK, the TPM's HMAC-SHA256 with the object equals `hmac.new(key, ·,
sha256)`. `tpm_blob` is the same as a `mockcloud.dps.TpmBlob` for `DpsServer(tpm_blob=...)`.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPMS_KEYEDHASH_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_SENSITIVE,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SCHEME_KEYEDHASH,
    TPMU_SENSITIVE_COMPOSITE,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import make_credential, wrap

if TYPE_CHECKING:
    from mockcloud.dps import TpmChallenge


def hmac_key_public(key: bytes, seed: bytes) -> TPM2B_PUBLIC:
    """The public area of a keyed-hash HMAC-SHA256 object holding `key` (unique = its
    obfuscated digest, SHA-256(seed || key), as TPM2_Create computes it)."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT,
            parameters=TPMU_PUBLIC_PARMS(
                keyedHashDetail=TPMS_KEYEDHASH_PARMS(
                    scheme=TPMT_KEYEDHASH_SCHEME(
                        scheme=TPM2_ALG.HMAC,
                        details=TPMU_SCHEME_KEYEDHASH(
                            hmac=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)
                        ),
                    )
                )
            ),
            unique=TPMU_PUBLIC_ID(keyedHash=hashlib.sha256(seed + key).digest()),
        )
    )


def make_auth_key_blob(
    ek_public_marshalled: bytes, srk_public_marshalled: bytes, hmac_key: bytes
) -> bytes:
    ek, _ = TPM2B_PUBLIC.unmarshal(ek_public_marshalled)
    srk, _ = TPM2B_PUBLIC.unmarshal(srk_public_marshalled)
    seed = os.urandom(32)
    public = hmac_key_public(hmac_key, seed)
    sensitive = TPM2B_SENSITIVE(
        sensitiveArea=TPMT_SENSITIVE(
            sensitiveType=TPM2_ALG.KEYEDHASH,
            seedValue=seed,
            sensitive=TPMU_SENSITIVE_COMPOSITE(bits=hmac_key),
        )
    )
    aes128_cfb = TPMT_SYM_DEF_OBJECT(
        algorithm=TPM2_ALG.AES,
        keyBits=TPMU_SYM_KEY_BITS(aes=128),
        mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
    )
    inner_key, duplicate, encrypted_seed = wrap(
        srk.publicArea, public, sensitive, symdef=aes128_cfb
    )
    credential, secret = make_credential(ek, bytes(inner_key), srk.get_name())
    return b"".join(
        bytes(part.marshal()) for part in (credential, secret, duplicate, encrypted_seed, public)
    )


def tpm_blob(challenge: TpmChallenge) -> bytes:
    """`make_auth_key_blob` as DPS calls it (a `mockcloud.dps.TpmBlob`)."""
    return make_auth_key_blob(
        challenge.endorsement_key, challenge.storage_root_key, challenge.auth_key
    )
