"""Renewal of the device identity cert (DPS X.509 with `identity_auto_renew`, spec
provisioning.md §17), on the certs actor's renewal engine.

The new cert is issued through certd as `<cert>-temp` for a new key `<key>-temp` (or the same
key without rotation), and becomes the device's only once DPS has registered the device with
it: then it is imported as `<cert>` and the key moved over `<key>`. Where the original forgets
the device before registering again (a failed registration leaves it with no device until a
restart), here a failure changes nothing: the old cert and key keep serving, and the engine
tries again at the retry period. A crash between the import and the key move is finished at
the next start, as certd does for its own rotations.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from cryptography import x509

from aziot.actors.certs.messages import Certs, CreateCert, DeleteCert, ImportCert
from aziot.actors.keys.messages import (
    CreateKeyPair,
    DeleteKeyPair,
    Keys,
    LoadKeyPair,
    MoveKeyPair,
)
from aziot.actors.remote_private_key import keys_private_op, public_key_of, remote_private_key
from aziot.bus.errors import BusError
from aziot.bus.protocol import Client

log = logging.getLogger(__name__)

TEMP = "-temp"


async def finish_rotation(keys: Client, cert_pem: bytes, key_id: str) -> None:
    """A `<key>-temp` whose public key is the cert's: the crash came between the cert import
    and the key move, so move it now; one that is not: an unfinished renewal, removed."""
    try:
        temp = await keys.call(Keys.load_key_pair, LoadKeyPair(key_id + TEMP))
    except BusError:
        return
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    if leaf.public_key() == await public_key_of(keys, temp.handle):
        await keys.call(Keys.move_key_pair, MoveKeyPair(key_id + TEMP, key_id))
        log.info("repaired: finished the interrupted rotation of the device identity key")
    else:
        await keys.call(Keys.delete_key_pair, DeleteKeyPair(temp.handle))
        log.info("repaired: removed %s left by an unfinished renewal", key_id + TEMP)


async def renew_device_identity(
    keys: Client,
    certs: Client,
    cert_id: str,
    key_id: str,
    current: bytes,
    rotate: bool,
    register: Callable[[bytes, str], Awaitable[Any]],
    csr_for: Callable[[x509.Name, Any], str],
) -> None:
    """Issue, register with DPS, then commit. `register(chain, key handle)` provisions with the
    new credentials and returns once the device is registered (or raises)."""
    subject = x509.load_pem_x509_certificates(current)[0].subject
    new_key = key_id + TEMP if rotate else key_id
    if rotate:
        try:
            stale = await keys.call(Keys.load_key_pair, LoadKeyPair(new_key))
            await keys.call(Keys.delete_key_pair, DeleteKeyPair(stale.handle))
        except BusError:
            pass
        handle = (
            await keys.call(Keys.create_key_pair, CreateKeyPair(new_key, "rsa-2048:*"))
        ).handle
    else:
        handle = (await keys.call(Keys.load_key_pair, LoadKeyPair(new_key))).handle
    public = await public_key_of(keys, handle)
    csr = await trio.to_thread.run_sync(
        csr_for, subject, remote_private_key(public, keys_private_op(keys, handle))
    )
    issued = await certs.call(Certs.create_cert, CreateCert(cert_id + TEMP, csr), timeout=120.0)
    try:
        await certs.call(Certs.delete_cert, DeleteCert(cert_id + TEMP))
    except BusError as error:
        log.warning("could not delete %s: %s", cert_id + TEMP, error.message)
    chain = issued.pem.encode()
    await register(chain, handle)  # the commit point: DPS knows the device by its new cert
    await certs.call(Certs.import_cert, ImportCert(cert_id, issued.pem))
    if rotate:
        await keys.call(Keys.move_key_pair, MoveKeyPair(new_key, key_id))
    log.info(
        "renewed the device identity cert %s (key %s)", cert_id, "rotated" if rotate else "kept"
    )
