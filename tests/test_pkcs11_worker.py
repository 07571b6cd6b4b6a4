"""The PKCS#11 worker actor on the bus: one thread, deadlines, token errors kept readable."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from aziot.actors.keys.pkcs11.protocol import (
    GenerateKeyPair,
    Mechanisms,
    Pkcs11,
    PublicParametersOf,
    SignEcdsa,
)
from aziot.actors.keys.pkcs11.worker import Pkcs11Worker, TokenThread
from aziot.bus.actor import serve_actor
from aziot.bus.bus import Bus
from aziot.bus.errors import BusError, ErrorKind
from aziot.bus.faults import Faults
from aziot.bus.protocol import Caller, Client
from tests.softhsm import SOFTHSM_LIB, make_softhsm_token, softhsm_available

pytestmark = pytest.mark.skipif(not softhsm_available(), reason="softhsm2 is not installed")


@pytest.fixture
def token(tmp_path: Path):
    return make_softhsm_token(tmp_path, label="worker-test")


async def run_worker(bus: Bus, faults: Faults, nursery: trio.Nursery) -> Pkcs11Worker:
    worker = Pkcs11Worker(TokenThread(SOFTHSM_LIB, faults))
    await nursery.start(serve_actor, bus, "pkcs11", worker, bus.open_mailbox("pkcs11"), faults)
    return worker


async def test_worker_generates_and_signs_on_one_thread(token) -> None:
    bus = Bus()
    async with trio.open_nursery() as nursery:
        worker = await run_worker(bus, Faults(), nursery)
        uri = token.uri()
        pkcs11 = Client(bus, Pkcs11, Caller(service="test"))
        used = await pkcs11.call(
            Pkcs11.generate_key_pair, GenerateKeyPair(uri, "device-id", ["ec-p256"])
        )
        assert used.value == "ec-p256"
        params = await pkcs11.call(Pkcs11.public_parameters, PublicParametersOf(uri, "device-id"))
        assert params.value.ec_point is not None
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), params.value.ec_point)
        digest = hashlib.sha256(b"hello").digest()

        async def sign_and_verify() -> None:
            signature = await pkcs11.call(Pkcs11.sign_ecdsa, SignEcdsa(uri, "device-id", digest))
            public.verify(signature.value, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

        async with trio.open_nursery() as callers:  # many callers, still one library thread
            for _ in range(32):
                callers.start_soon(sign_and_verify)
        assert sum(t.name == "pkcs11-worker" for t in threading.enumerate()) >= 1
        with pytest.raises(BusError) as caught:
            await pkcs11.call(Pkcs11.sign_ecdsa, SignEcdsa(uri, "absent", digest))
        assert caught.value.kind is ErrorKind.NOT_FOUND
        with pytest.raises(BusError) as caught:  # only declared operations reach the library
            await bus.request("pkcs11", "close", {"uri": uri})
        assert caught.value.kind is ErrorKind.INVALID
        worker.stop()
        nursery.cancel_scope.cancel()


async def test_a_hung_token_gives_timeout_and_the_loop_keeps_running(token) -> None:
    bus = Bus()
    faults = Faults.from_spec("pkcs11.call=hang*1")
    async with trio.open_nursery() as nursery:
        worker = await run_worker(bus, faults, nursery)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.01)

        nursery.start_soon(ticker)
        with pytest.raises(BusError) as caught:
            await Client(bus, Pkcs11, Caller(service="test")).call(
                Pkcs11.mechanisms, Mechanisms(token.uri()), timeout=0.5
            )
        assert caught.value.kind is ErrorKind.TIMEOUT
        assert ticks >= 20  # the trio loop was never blocked by the hung call
        worker.stop()
        nursery.cancel_scope.cancel()


async def test_a_bad_library_and_a_wrong_pin_are_clear(token) -> None:
    bus = Bus()
    async with trio.open_nursery() as nursery:
        broken = Pkcs11Worker(TokenThread("/nonexistent/libnothing.so", Faults()))
        await nursery.start(
            serve_actor, bus, "broken", broken, bus.open_mailbox("broken"), Faults()
        )
        with pytest.raises(BusError) as caught:
            await bus.request("broken", "mechanisms", {"uri": token.uri()})  # untyped: same wire
        assert "/nonexistent/libnothing.so" in caught.value.message
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        await run_worker(bus, Faults(), nursery)
        wrong = token.uri().replace("pin-value=1234", "pin-value=9999")
        with pytest.raises(BusError) as caught:
            await Client(bus, Pkcs11, Caller(service="test")).call(
                Pkcs11.mechanisms, Mechanisms(wrong)
            )
        assert "PIN was rejected" in caught.value.message and "9999" not in caught.value.message
        assert (caught.value.kind, caught.value.code) == (ErrorKind.UNAVAILABLE, "TokenUnavailable")
        nursery.cancel_scope.cancel()
