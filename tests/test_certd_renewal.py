"""Renewal end to end: certs issued by certd with an `auto_renew` policy are issued again before
they expire, by their own method, with a rotated key moved into place in keyd; a renewal cut
short by a crash is finished at the next start.

The policy `threshold = "1440min"` on a 1-day cert makes it due as soon as it is issued, so
renewal happens within a second of issuance in real time, and then waits its retry period
(4% of a day), which keeps each test to one renewal.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.certd_world import KeydEcKey, certs_of, make_csr, openssl_verify, start_certd
from tests.daemon import Daemon

CONFIG = """
not_before_margin_secs = 0
[cert_issuance]
local_ca = { cert = "local-ca", pk = "local-ca" }
local-ca = { method = "self_signed", expiry_days = 30, common_name = "Renewal CA" }

[cert_issuance.rotated]
method = "local_ca"
expiry_days = 1
auto_renew = { rotate_key = true, threshold = "1440min", retry = "4%" }

[cert_issuance.same-key]
method = "local_ca"
expiry_days = 1
auto_renew = { rotate_key = false, threshold = "1440min", retry = "4%" }

[cert_issuance.not-renewed]
method = "local_ca"
expiry_days = 1
"""


@pytest.fixture
def daemon(world_dir: Path) -> Iterator[Daemon]:
    daemon = start_certd(world_dir / "d", CONFIG)
    yield daemon
    if daemon.process is not None:
        daemon.stop()


def issue_ca(daemon: Daemon) -> x509.Certificate:
    bc = x509.BasicConstraints(ca=True, path_length=None)
    csr, _ = make_csr("ca", key=KeydEcKey(daemon, "local-ca"), extensions=[(bc, True)])
    reply = daemon.request("certd", "POST", "/certificates", {"certId": "local-ca", "csr": csr})
    assert reply.status == 201, reply.body
    return certs_of(reply.json()["pem"])[0]


def issue(daemon: Daemon, cert_id: str) -> x509.Certificate:
    csr, _ = make_csr(cert_id, key=KeydEcKey(daemon, cert_id))
    reply = daemon.request("certd", "POST", "/certificates", {"certId": cert_id, "csr": csr})
    assert reply.status == 201, reply.body
    return certs_of(reply.json()["pem"])[0]


def current(daemon: Daemon, cert_id: str) -> x509.Certificate:
    reply = daemon.request("certd", "GET", f"/certificates/{cert_id}")
    assert reply.status == 200, reply.body
    return certs_of(reply.json()["pem"])[0]


def keyd_public(daemon: Daemon, key_id: str) -> ec.EllipticCurvePublicKey | None:
    reply = daemon.request("keyd", "GET", f"/keypair/{key_id}")
    if reply.status != 200:
        return None
    handle = reply.json()["keyHandle"]
    point = daemon.request("keyd", "POST", "/parameters/ec-point", {"keyHandle": handle})
    return ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), base64.b64decode(point.json()["value"])
    )


def wait_for(condition, what: str, timeout: float = 15.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_due_cert_is_renewed_with_a_rotated_key(daemon: Daemon, world_dir: Path) -> None:
    ca = issue_ca(daemon)
    first = issue(daemon, "rotated")
    wait_for(lambda: current(daemon, "rotated") != first, "the renewal of 'rotated'")
    renewed = current(daemon, "rotated")
    assert renewed.subject == first.subject
    assert renewed.public_key() != first.public_key()
    # The new key is keyd's `rotated` now, and the temporary id is gone.
    assert keyd_public(daemon, "rotated") == renewed.public_key()
    assert keyd_public(daemon, "rotated-temp") is None
    renewed.verify_directly_issued_by(ca)
    root = world_dir / "ca.pem"
    root.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    assert "leaf.pem: OK" in openssl_verify(root, [renewed, ca], world_dir / "v")
    assert "renewed cert rotated by local_ca (key rotated)" in daemon.logs()


def test_renewal_without_rotation_keeps_the_key(daemon: Daemon) -> None:
    issue_ca(daemon)
    first = issue(daemon, "same-key")
    wait_for(lambda: current(daemon, "same-key") != first, "the renewal of 'same-key'")
    renewed = current(daemon, "same-key")
    assert renewed.public_key() == first.public_key() == keyd_public(daemon, "same-key")
    assert renewed.serial_number != first.serial_number


def test_certs_without_a_policy_are_left_alone(daemon: Daemon) -> None:
    issue_ca(daemon)
    first = issue(daemon, "not-renewed")
    issue(daemon, "same-key")  # something that does renew, to know the engine has run
    wait_for(lambda: "renewed cert same-key" in daemon.logs(), "a renewal")
    assert current(daemon, "not-renewed") == first


def test_a_failed_renewal_is_retried_and_a_restart_finishes_it(world_dir: Path) -> None:
    # The CA's key is taken away after issuance: renewals fail until it is back.
    daemon = start_certd(world_dir / "d", CONFIG)
    try:
        issue_ca(daemon)
        # A cert for keyd's key `same-key`, issued under an id that is not renewed...
        csr, _ = make_csr("same-key", key=KeydEcKey(daemon, "same-key"))
        reply = daemon.request(
            "certd", "POST", "/certificates", {"certId": "not-renewed", "csr": csr}
        )
        assert reply.status == 201, reply.body
        first = certs_of(reply.json()["pem"])[0]
        # ...then the CA's key goes, and the cert is imported under the renewed id.
        keys = daemon.services["keyd"].home / "keys"
        ca_key_file = next(keys.glob("localca-*.key"))
        saved = ca_key_file.read_bytes()
        ca_key_file.unlink()
        pem = reply.json()["pem"]
        assert daemon.request("certd", "PUT", "/certificates/same-key", {"pem": pem}).status == 201
        wait_for(lambda: "cert same-key: renewal failed" in daemon.logs(), "a failed renewal")
        line = next(x for x in daemon.logs().splitlines() if "cert same-key: renewal failed" in x)
        assert "retrying at" in line and "local CA's key" in line
        assert current(daemon, "same-key") == first  # the old cert stays
        assert "same-key: removed from auto-renewal" not in daemon.logs()
        # The key is back; a restart rebuilds the schedule from the certs on disk and renews.
        ca_key_file.write_bytes(saved)
        daemon.restart()
        wait_for(lambda: current(daemon, "same-key") != first, "the renewal after restart")
    finally:
        daemon.stop()


def test_a_crash_between_cert_write_and_key_move_is_finished_at_start(world_dir: Path) -> None:
    daemon = start_certd(world_dir / "d", CONFIG.replace("1440min", "60min"))
    try:
        ca = issue_ca(daemon)
        first = issue(daemon, "rotated")
        # The state a kill leaves between the two commit steps: the new cert is on disk for a
        # key that is still under `rotated-temp`.
        temp_key = KeydEcKey(daemon, "rotated-temp")
        csr, _ = make_csr("rotated", key=temp_key)
        handle = daemon.request("keyd", "GET", "/keypair/local-ca").json()["keyHandle"]
        reply = daemon.request(
            "certd",
            "POST",
            "/certificates",
            {
                "certId": "rotated-new",
                "csr": csr,
                "issuer": {"certId": "local-ca", "privateKeyHandle": handle},
            },
        )
        assert reply.status == 201, reply.body
        assert (
            daemon.request("certd", "PUT", "/certificates/rotated", {"pem": reply.json()["pem"]})
        ).status == 201
        daemon.restart()
        wait_for(lambda: keyd_public(daemon, "rotated-temp") is None, "the repair")
        now = current(daemon, "rotated")
        assert now.public_key() == temp_key.public_key() == keyd_public(daemon, "rotated")
        assert now.public_key() != first.public_key()
        now.verify_directly_issued_by(ca)
        assert "repaired: finished the interrupted key rotation of rotated" in daemon.logs()
    finally:
        daemon.stop()
