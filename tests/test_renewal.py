"""The renewal engine (actors/certs/renewal.py): the original's policy strings and arithmetic
(spec/provisioning.md §16, with its worked examples), our jitter, and the scheduler driven by a
manual wall clock over real certificates made with `cryptography`.

Engine tests advance a `ManualClock` and then wait until every task is blocked, so "not renewed
yet" is a fact about the schedule and not about how long a test happened to wait.
"""

from __future__ import annotations

import datetime
import logging
import random
from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aziot.actors.certs import renewal
from aziot.actors.certs.renewal import (
    AutoRenew,
    CertTimes,
    Credential,
    ManualClock,
    Policy,
    PolicyKind,
    RenewalEngine,
    RenewalError,
    WallClock,
    jittered_deadline,
    parse_policy,
    renewal_deadline,
    renewal_times,
    retry_period,
    should_renew,
)

T0 = 1_700_000_000  # 2023-11-14: certs around it encode as UTCTime, as real ones do
DAY = 86400
LIFETIME = 100 * DAY

settle = trio.testing.wait_all_tasks_blocked


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(key: ec.EllipticCurvePrivateKey, nb: int, na: int, cn: str = "device") -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(nb, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(na, datetime.UTC))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@attrs.define
class Store:
    """The owner's side: certs on "disk" by id, and a renew that writes a fresh cert.

    `fail[id]` failures are raised before a renewal succeeds; `gate[id]` holds renewals of that
    id until set; `issued_lifetime` is what the "CA" gives a renewed cert.
    """

    clock: ManualClock
    key: ec.EllipticCurvePrivateKey
    pems: dict[str, bytes | None] = attrs.field(factory=dict)
    calls: list[tuple[str, bool, float]] = attrs.field(factory=list)
    fail: dict[str, int] = attrs.field(factory=dict)
    gate: dict[str, trio.Event] = attrs.field(factory=dict)
    issued_lifetime: int = LIFETIME
    active: int = 0
    max_active: int = 0

    def put(self, cert_id: str, nb: int, na: int) -> bytes:
        pem = make_cert(self.key, nb, na, cert_id)
        self.pems[cert_id] = pem
        return pem

    def credential(self, cert_id: str, policy: AutoRenew | None = None) -> Credential:
        async def read() -> bytes | None:
            await trio.lowlevel.checkpoint()
            return self.pems.get(cert_id)

        async def renew(current_pem: bytes, rotate: bool) -> None:
            assert current_pem == self.pems[cert_id]
            self.calls.append((cert_id, rotate, self.clock.now()))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                if cert_id in self.gate:
                    await self.gate[cert_id].wait()
                await trio.lowlevel.checkpoint()
                if self.fail.get(cert_id, 0) > 0:
                    self.fail[cert_id] -= 1
                    raise ConnectionError("EST server answered 503")
                now = int(self.clock.now())
                self.put(cert_id, now, now + self.issued_lifetime)
            finally:
                self.active -= 1

        return Credential(cert_id, f"{cert_id}-key", policy or AutoRenew(), read, renew)

    def renewed(self, cert_id: str) -> int:
        return sum(1 for call in self.calls if call[0] == cert_id)


@attrs.define
class Rig:
    clock: ManualClock
    engine: RenewalEngine
    store: Store

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await settle()

    async def at(self, wall_time: float) -> None:
        self.clock.set(wall_time)
        await settle()


@pytest.fixture
async def rig(nursery: trio.Nursery, key: ec.EllipticCurvePrivateKey) -> Rig:
    clock = ManualClock(T0)
    # No jitter here: these tests check the original's deadlines to the second.
    engine = RenewalEngine(clock=clock, rng=random.Random(7), jitter=0.0)
    await nursery.start(engine.run)
    return Rig(clock, engine, Store(clock, key))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger=renewal.__name__):
        yield caplog


# --------------------------------------------------------------------------------------------
# Policy strings


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("1%", PolicyKind.PERCENTAGE, 1),
        ("80%", PolicyKind.PERCENTAGE, 80),
        ("99%", PolicyKind.PERCENTAGE, 99),
        ("5min", PolicyKind.TIME, 300),
        ("100min", PolicyKind.TIME, 6000),
        ("1day", PolicyKind.TIME, DAY),
        ("10day", PolicyKind.TIME, 10 * DAY),
        # Rust's i64 parser takes a plus sign and leading zeros; configs using them load there.
        ("+5min", PolicyKind.TIME, 300),
        ("05min", PolicyKind.TIME, 300),
        ("007%", PolicyKind.PERCENTAGE, 7),
    ],
)
def test_policy_parses_the_originals_strings(text: str, kind: PolicyKind, value: int) -> None:
    assert parse_policy(text) == Policy(kind, value)
    assert Policy.parse(text) == Policy(kind, value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "days",
        "day",
        "min",
        "%",
        "100%",
        "101%",
        "0%",
        "0min",
        "0day",
        "-5min",
        "-1%",
        " 5min",
        "5 min",
        "5min ",
        "5MIN",
        "5Min",
        "5mins",
        "5d",
        "1year",
        "5",
        "a%",
        "5.5%",
        "1e3min",
        "1_0min",
        "\uff15min",  # a fullwidth digit: Python's int() takes it, Rust's does not
        "++5min",
        "99999999999999999999min",  # beyond i64, where the original's parser stops
        "106751991167301day",  # fits i64, its seconds do not
    ],
)
def test_policy_refuses_anything_else_and_says_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_policy(text)
    message = str(info.value)
    assert repr(text) in message
    assert "'<n>%'" in message and "'<n>min'" in message and "'<n>day'" in message


def test_policy_refuses_a_non_string() -> None:
    with pytest.raises(TypeError):
        parse_policy(80)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        (Policy.percentage(80), "80%"),
        (Policy.percentage(89), "89%"),
        (Policy.time(2 * 60), "2min"),
        (Policy.time(86460), "1441min"),
        (Policy.time(3 * DAY), "3day"),
        (Policy.time(90), "1min"),  # the original truncates to minutes
    ],
)
def test_policy_serializes_as_the_original(policy: Policy, text: str) -> None:
    assert str(policy) == text


@pytest.mark.parametrize("text", ["1%", "99%", "1min", "59min", "60min", "1440min", "7day"])
def test_parsed_policies_round_trip(text: str) -> None:
    policy = parse_policy(text)
    assert parse_policy(str(policy)) == policy


@pytest.mark.parametrize(
    "make",
    [
        lambda: Policy.percentage(0),
        lambda: Policy.percentage(100),
        lambda: Policy.time(0),
        lambda: Policy.time(-60),
    ],
)
def test_policy_values_are_checked_when_built_directly(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


def test_auto_renew_defaults_are_the_originals() -> None:
    policy = AutoRenew()
    assert policy.rotate_key is True
    assert str(policy.threshold) == "80%"
    assert str(policy.retry) == "4%"
    assert AutoRenew.parse(False, "2day", "30min") == AutoRenew(
        False, Policy.time(2 * DAY), Policy.time(1800)
    )
    with pytest.raises(ValueError, match="'days'"):
        AutoRenew.parse(True, "days", "4%")


# --------------------------------------------------------------------------------------------
# Arithmetic (§16), with the spec's and the original's worked examples


def pct(n: int) -> Policy:
    return Policy.percentage(n)


def test_spec_example_lifetime_100_past_deadline() -> None:
    # Lifetime 100 s, 50 %/4 %, 60 s elapsed: the deadline is past, so now + 4; retry 4.
    times = CertTimes(-60, 40)
    assert renewal_times(times, AutoRenew(True, pct(50), pct(4)), now=0) == (4, 4)


def test_spec_example_ten_second_cert() -> None:
    times = CertTimes(-5, 5)
    assert renewal_times(times, AutoRenew(True, pct(60), pct(20)), now=0) == (1, 2)
    # 4 % of 10 s truncates to 0 and is clamped to the 1 s minimum.
    assert renewal_times(times, AutoRenew(True, pct(80), pct(4)), now=0) == (3, 1)
    assert renewal_times(times, AutoRenew(True, Policy.time(1), Policy.time(1)), now=0) == (4, 1)


def test_original_reset_example() -> None:
    policy = AutoRenew()
    assert renewal_times(CertTimes(-50, 50), policy, now=0) == (30, 4)
    assert renewal_times(CertTimes(-20, 180), policy, now=0) == (140, 8)


def test_renewal_times_refuses_what_cannot_be_scheduled() -> None:
    with pytest.raises(ValueError, match="not_before"):
        renewal_times(CertTimes(5, 1), AutoRenew(), now=0)
    with pytest.raises(ValueError, match="expired"):
        renewal_times(CertTimes(-10, -5), AutoRenew(True, pct(50), pct(4)), now=0)
    # Expired at the very second of notAfter, as the original's `in_past`.
    with pytest.raises(ValueError, match="expired"):
        renewal_times(CertTimes(-10, 0), AutoRenew(), now=0)


def test_deadline_and_retry_truncate() -> None:
    times = CertTimes(0, 999)
    # 999·80/100 = 799.2 → 799; deadline = 999 − (999 − 799) = 799.
    assert renewal_deadline(times, pct(80)) == 799
    assert renewal_deadline(times, Policy.time(60)) == 939
    assert retry_period(times, pct(4)) == 39  # 39.96 truncated
    assert retry_period(times, Policy.time(300)) == 300
    assert retry_period(CertTimes(0, 10), pct(1)) == 1  # 0.1 → 0 → the 1 s minimum


def test_division_truncates_toward_zero_as_rust() -> None:
    assert renewal._div(-7, 2) == -3
    assert renewal._div(7, -2) == -3
    assert renewal._div(7, 2) == 3
    assert renewal._div(-100, 300) == 0


@pytest.mark.parametrize(
    ("nb", "na", "now"),
    [(-5, -1, -3), (-2, 2, 0), (1, 5, 3)],  # negative, mixed and positive timestamps
)
def test_should_renew_as_the_original(nb: int, na: int, now: int) -> None:
    times = CertTimes(nb, na)
    assert should_renew(times, pct(40), now)
    assert should_renew(times, pct(50), now)
    assert not should_renew(times, pct(60), now)
    assert not should_renew(times, Policy.time(1), now)
    assert should_renew(times, Policy.time(3), now)


def test_should_renew_invalid_expired_and_not_yet_valid() -> None:
    assert should_renew(CertTimes(5, 1), pct(99), now=0)
    assert should_renew(CertTimes(1, 5), pct(99), now=6)
    assert should_renew(CertTimes(1, 5), pct(99), now=5)
    # A cert from the future (device clock behind): not due.
    assert not should_renew(CertTimes(100, 200), pct(1), now=50)


def test_cert_times_are_read_from_a_real_cert(key: ec.EllipticCurvePrivateKey) -> None:
    cert = x509.load_pem_x509_certificate(make_cert(key, T0 - 5, T0 + LIFETIME))
    assert CertTimes.of(cert) == CertTimes(T0 - 5, T0 + LIFETIME)


# --------------------------------------------------------------------------------------------
# Jitter


def test_jitter_moves_within_a_tenth_of_the_window() -> None:
    times = CertTimes(0, 1000)
    base = renewal_deadline(times, pct(80))  # 800; the window is 200
    assert jittered_deadline(times, pct(80), 0.0) == base
    assert jittered_deadline(times, pct(80), 1.0) == base + 20
    assert jittered_deadline(times, pct(80), -1.0) == base - 20
    # A time threshold: the window is the threshold itself.
    assert jittered_deadline(times, Policy.time(100), -1.0) == 890


def test_jitter_never_reaches_expiry_nor_precedes_not_before() -> None:
    times = CertTimes(0, 1000)
    assert jittered_deadline(times, pct(99), 1.0) < times.not_after
    assert jittered_deadline(times, pct(1), -1.0) >= times.not_before
    # A threshold longer than the lifetime: due from birth, nothing to spread.
    assert jittered_deadline(times, Policy.time(5000), 1.0) == renewal_deadline(
        times, Policy.time(5000)
    )
    # A window too short to move at all stays put.
    assert jittered_deadline(CertTimes(0, 10), pct(80), 1.0) == 8


def test_a_fleet_of_identical_certs_spreads_over_the_window() -> None:
    times = CertTimes(T0, T0 + LIFETIME)
    base = renewal_deadline(times, pct(80))
    window = times.not_after - base
    rng = random.Random(2024)
    deadlines = [jittered_deadline(times, pct(80), rng.uniform(-1, 1)) for _ in range(1000)]
    assert all(base - window // 10 <= d <= base + window // 10 for d in deadlines)
    assert_spread(deadlines, base - window // 10, base + window // 10)


def assert_spread(deadlines: list[float], low: float, high: float) -> None:
    """Roughly uniform: every tenth of the range holds some of the fleet, none holds a crowd."""
    assert len(set(deadlines)) > 990
    bins = [0] * 10
    for d in deadlines:
        bins[min(int((d - low) * 10 / (high - low)), 9)] += 1
    assert min(bins) > 60 and max(bins) < 140, bins


async def test_engine_spreads_a_fleet_and_keeps_each_deadline(
    nursery: trio.Nursery, key: ec.EllipticCurvePrivateKey
) -> None:
    clock = ManualClock(T0 + DAY)
    engine = RenewalEngine(clock=clock, rng=random.Random(11))
    store = Store(clock, key)
    pem = store.put("template", T0, T0 + LIFETIME)
    ids = [f"device-{i}" for i in range(1000)]
    for cert_id in ids:
        store.pems[cert_id] = pem
        engine.add(store.credential(cert_id))
    await nursery.start(engine.run)
    await settle()
    times = CertTimes(T0, T0 + LIFETIME)
    base = renewal_deadline(times, pct(80))
    window = times.not_after - base
    deadlines = [engine.next_check(cert_id) for cert_id in ids]
    assert all(d is not None for d in deadlines)
    checks = [d for d in deadlines if d is not None]
    assert all(base - window // 10 <= d <= base + window // 10 for d in checks)
    assert all(times.not_before <= d < times.not_after for d in checks)
    assert_spread(checks, base - window // 10, base + window // 10)

    # Renewals arrive spread out too: halfway into the spread about half the fleet has renewed.
    await_until = base
    clock.set(await_until)
    await settle()
    assert 400 < len(store.calls) < 600
    assert all(call[2] == await_until for call in store.calls)


async def test_a_recheck_of_the_same_cert_keeps_its_jittered_deadline(
    nursery: trio.Nursery, key: ec.EllipticCurvePrivateKey
) -> None:
    clock = ManualClock(T0)
    engine = RenewalEngine(clock=clock, rng=random.Random(3))
    store = Store(clock, key)
    store.put("c", T0, T0 + LIFETIME)
    engine.add(store.credential("c"))
    await nursery.start(engine.run)
    await settle()
    first = engine.next_check("c")
    # A reload replaces the credential: the same cert is re-read, the draw is kept.
    engine.replace(store.credential("c"))
    await settle()
    assert engine.next_check("c") == first


async def test_an_expired_cert_renews_at_once_even_with_jitter(
    nursery: trio.Nursery, key: ec.EllipticCurvePrivateKey
) -> None:
    clock = ManualClock(T0)
    engine = RenewalEngine(clock=clock, rng=random.Random(5))
    store = Store(clock, key)
    store.put("old", T0 - LIFETIME, T0 - 1)
    engine.add(store.credential("old"))
    await nursery.start(engine.run)
    await settle()
    assert store.calls == [("old", True, T0)]


# --------------------------------------------------------------------------------------------
# The engine


async def test_threshold_reached_renews_once_with_the_policys_rotate_flag(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    # 85 % of its life gone: past an 80 % threshold.
    store.put("id", T0 - 85 * DAY, T0 + 15 * DAY)
    engine.add(store.credential("id", AutoRenew(rotate_key=False)))
    await settle()
    assert store.calls == [("id", False, T0)]
    # Scheduled from the new cert: 80 % of its 100 days.
    assert engine.next_check("id") == T0 + 80 * DAY
    await rig.advance(10 * DAY)
    assert store.renewed("id") == 1


async def test_not_due_waits_for_the_deadline_to_the_second(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    deadline = T0 + 80 * DAY
    assert engine.next_check("id") == deadline
    assert store.calls == []
    await rig.at(deadline - 1)
    assert store.calls == []
    await rig.at(deadline)
    assert store.calls == [("id", True, deadline)]
    assert engine.next_check("id") == deadline + 80 * DAY


async def test_expired_renews_at_once(rig: Rig) -> None:
    rig.store.put("id", T0 - LIFETIME, T0 - DAY)
    rig.engine.add(rig.store.credential("id"))
    await settle()
    assert rig.store.calls == [("id", True, T0)]


async def test_not_yet_valid_cert_is_scheduled_not_renewed(rig: Rig) -> None:
    # A device clock behind its CA's: the cert starts tomorrow; renewing would not help.
    rig.store.put("id", T0 + DAY, T0 + DAY + LIFETIME)
    rig.engine.add(rig.store.credential("id"))
    await settle()
    assert rig.store.calls == []
    assert rig.engine.next_check("id") == T0 + DAY + 80 * DAY


async def test_failures_are_retried_every_retry_period_and_never_dropped(
    rig: Rig, logs: pytest.LogCaptureFixture
) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    store.fail["id"] = 3
    engine.add(store.credential("id"))
    await settle()
    deadline = T0 + 80 * DAY
    retry = 4 * DAY  # 4 % of 100 days
    await rig.at(deadline)
    assert store.renewed("id") == 1
    assert engine.next_check("id") == deadline + retry
    assert "id" in engine
    failure_lines = [r.getMessage() for r in logs.records if "renewal failed" in r.getMessage()]
    assert len(failure_lines) == 1
    assert "cert id:" in failure_lines[0] and "EST server answered 503" in failure_lines[0]
    assert "ConnectionError" in failure_lines[0]

    await rig.at(deadline + retry - 1)
    assert store.renewed("id") == 1
    await rig.at(deadline + retry)
    assert store.renewed("id") == 2
    await rig.at(deadline + 2 * retry)
    assert store.renewed("id") == 3
    assert "id" in engine
    # The fourth attempt succeeds, 92 days into a 100-day cert.
    await rig.at(deadline + 3 * retry)
    assert store.renewed("id") == 4
    assert engine.next_check("id") == deadline + 3 * retry + 80 * DAY
    assert "id" in engine


async def test_failures_past_expiry_keep_retrying(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0 - 50, T0 + 50)  # 100 s, 4 % → retry every 4 s
    store.fail["id"] = 30
    engine.add(store.credential("id"))
    await settle()
    for _ in range(40):
        await rig.advance(4)
    # The first attempt at the first step past 80 % (T0 + 32), then every 4 s: 30 failures,
    # then a success.
    assert store.renewed("id") == 31
    assert "id" in engine
    assert store.pems["id"] is not None
    assert CertTimes.of(x509.load_pem_x509_certificate(store.pems["id"])).not_after > T0 + 100


async def test_a_renewed_cert_already_due_waits_the_retry_period(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0 - 90 * DAY, T0 + 10 * DAY)
    # The "CA" caps what it issues at 10 s, inside the 20-day threshold: due from birth.
    store.issued_lifetime = 10
    engine.add(store.credential("id", AutoRenew(True, Policy.time(20 * DAY), Policy.time(300))))
    await settle()
    assert store.renewed("id") == 1
    assert engine.next_check("id") == T0 + 300
    await rig.advance(299)
    assert store.renewed("id") == 1
    await rig.advance(1)
    assert store.renewed("id") == 2


async def test_a_cert_replaced_on_disk_is_scheduled_from_the_new_one(
    rig: Rig, logs: pytest.LogCaptureFixture
) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    assert engine.next_check("id") == T0 + 80 * DAY
    # An operator imports a longer-lived cert before the old one's deadline.
    await rig.at(T0 + 50 * DAY)
    store.put("id", T0 + 50 * DAY, T0 + 250 * DAY)
    await rig.at(T0 + 80 * DAY)
    assert store.calls == []
    assert engine.next_check("id") == T0 + 50 * DAY + 160 * DAY
    assert any("changed on disk" in r.getMessage() for r in logs.records)
    await rig.at(T0 + 210 * DAY)
    assert store.calls == [("id", True, T0 + 210 * DAY)]


async def test_remove_stops_renewals(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("a", T0, T0 + LIFETIME)
    store.put("b", T0, T0 + LIFETIME)
    engine.add(store.credential("a"))
    engine.add(store.credential("b"))
    await settle()
    assert engine.remove("a") is True
    assert engine.remove("a") is False
    assert engine.tracked() == ["b"]
    await rig.at(T0 + 300 * DAY)
    assert [call[0] for call in store.calls] == ["b"]
    with pytest.raises(KeyError):
        await engine.renew_now_if_due("a")


async def test_remove_during_a_renewal_schedules_nothing_after_it(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0 - LIFETIME, T0 - 1)
    store.gate["id"] = trio.Event()
    engine.add(store.credential("id"))
    await settle()
    assert store.active == 1
    engine.remove("id")
    store.gate["id"].set()
    await settle()
    store.put("id", T0 - LIFETIME, T0 - 1)
    await rig.advance(300 * DAY)
    assert store.renewed("id") == 1
    assert "id" not in engine


async def test_many_credentials_renew_in_deadline_order(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    lifetimes = {"e": 50, "b": 20, "d": 40, "a": 10, "c": 30}
    for cert_id, days in lifetimes.items():
        store.put(cert_id, T0, T0 + days * DAY)
        engine.add(store.credential(cert_id))
    await settle()
    for _ in range(50):
        await rig.advance(DAY)
    first_renewals: list[str] = []
    for cert_id, _, _ in store.calls:
        if cert_id not in first_renewals:
            first_renewals.append(cert_id)
    assert first_renewals == ["a", "b", "c", "d", "e"]
    # Each at its own 80 %: 8, 16, 24, 32 and 40 days.
    firsts = {cert_id: when for cert_id, _, when in reversed(store.calls)}
    assert firsts == {k: T0 + v * DAY * 8 // 10 for k, v in lifetimes.items()}


async def test_adding_an_earlier_deadline_wakes_the_sleeping_engine(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("late", T0, T0 + LIFETIME)
    engine.add(store.credential("late"))
    await settle()
    store.put("soon", T0, T0 + 100)
    engine.add(store.credential("soon"))
    await settle()
    await rig.at(T0 + 80)
    assert store.calls == [("soon", True, T0 + 80)]


async def test_replace_applies_the_new_policy(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    with pytest.raises(ValueError, match="already tracked"):
        engine.add(store.credential("id"))
    engine.replace(store.credential("id", AutoRenew(False, Policy.time(10 * DAY), pct(4))))
    await settle()
    assert engine.next_check("id") == T0 + 90 * DAY
    await rig.at(T0 + 90 * DAY)
    assert store.calls == [("id", False, T0 + 90 * DAY)]


@pytest.mark.parametrize(
    ("problem", "cause"),
    [("absent", "no cert is stored"), ("garbage", "holds no certificate"), ("raises", "EIO")],
)
async def test_an_unusable_cert_is_looked_at_again(
    rig: Rig, logs: pytest.LogCaptureFixture, problem: str, cause: str
) -> None:
    store, engine = rig.store, rig.engine
    credential = store.credential("id")
    if problem == "garbage":
        store.pems["id"] = b"not a pem\n"
    elif problem == "raises":

        async def read() -> bytes | None:
            if store.pems.get("id") is None:
                raise OSError("EIO")
            return store.pems["id"]

        credential = attrs.evolve(credential, read=read)
    engine.add(credential)
    await settle()
    assert engine.next_check("id") == T0 + renewal.NO_CERT_RETRY
    assert any(cause in r.getMessage() and "cert id:" in r.getMessage() for r in logs.records)
    assert store.calls == []
    store.put("id", T0, T0 + LIFETIME)
    await rig.advance(renewal.NO_CERT_RETRY)
    assert engine.next_check("id") == T0 + 80 * DAY
    assert store.calls == []


async def test_a_missing_cert_follows_a_time_retry_within_bounds(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    engine.add(store.credential("five", AutoRenew(True, pct(80), Policy.time(300))))
    engine.add(store.credential("week", AutoRenew(True, pct(80), Policy.time(7 * DAY))))
    await settle()
    assert engine.next_check("five") == T0 + 300
    assert engine.next_check("week") == T0 + renewal.NO_CERT_RETRY_MAX


async def test_the_first_cert_of_a_chain_counts_even_if_the_rest_is_damaged(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    leaf = make_cert(store.key, T0, T0 + LIFETIME, "leaf")
    ca = make_cert(store.key, T0 - LIFETIME, T0 + 10 * LIFETIME, "ca")
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    store.pems["id"] = leaf + ca + broken
    engine.add(store.credential("id"))
    await settle()
    assert engine.next_check("id") == T0 + 80 * DAY


async def test_a_restart_finishes_an_interrupted_renewal(
    nursery: trio.Nursery, key: ec.EllipticCurvePrivateKey
) -> None:
    clock = ManualClock(T0)
    store = Store(clock, key)
    store.put("id", T0 - 85 * DAY, T0 + 15 * DAY)
    store.gate["id"] = trio.Event()
    first = RenewalEngine(clock=clock, jitter=0.0)
    first.add(store.credential("id"))
    async with trio.open_nursery() as daemon:
        daemon.start_soon(first.run)
        await settle()
        assert store.active == 1
        # The daemon dies mid-renewal: nothing was committed.
        daemon.cancel_scope.cancel()
    assert store.active == 0
    del store.gate["id"]

    second = RenewalEngine(clock=clock, jitter=0.0)
    second.add(store.credential("id"))
    await nursery.start(second.run)
    await settle()
    assert store.renewed("id") == 2  # the interrupted one, and the finished one
    assert second.next_check("id") == T0 + 80 * DAY


async def test_a_stopped_engine_rechecks_everything_when_run_again(
    nursery: trio.Nursery, key: ec.EllipticCurvePrivateKey
) -> None:
    clock = ManualClock(T0)
    store = Store(clock, key)
    store.put("id", T0, T0 + LIFETIME)
    engine = RenewalEngine(clock=clock, jitter=0.0)
    engine.add(store.credential("id"))
    async with trio.open_nursery() as inner:
        await inner.start(engine.run)
        await settle()
        inner.cancel_scope.cancel()
    # While stopped the renewed cert appears on disk (another run of the daemon renewed it).
    store.put("id", T0 + DAY, T0 + DAY + LIFETIME)
    await nursery.start(engine.run)
    await settle()
    assert engine.next_check("id") == T0 + DAY + 80 * DAY
    with pytest.raises(RuntimeError, match="already running"):
        await engine.run()


async def test_no_two_renewals_of_one_credential_run_at_once(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0 - LIFETIME, T0 - 1)
    store.gate["id"] = trio.Event()
    engine.add(store.credential("id"))
    await settle()
    assert store.active == 1
    results: list[bool] = []

    async def fetch() -> None:
        results.append(await engine.renew_now_if_due("id"))

    async with trio.open_nursery() as callers:
        for _ in range(3):
            callers.start_soon(fetch)
        engine.replace(store.credential("id"))
        await settle()
        assert store.active == 1
        store.gate["id"].set()
    await settle()
    # The scheduled renewal did the work; the fetches waited for it and found a fresh cert.
    assert store.max_active == 1
    assert store.renewed("id") == 1
    assert results == [False, False, False]


async def test_renew_now_if_due(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    assert await engine.renew_now_if_due("id") is False
    # Past the threshold, fetched before the engine's own check gets there.
    store.put("id", T0 - 81 * DAY, T0 + 19 * DAY)
    assert await engine.renew_now_if_due("id") is True
    assert store.calls == [("id", True, T0)]
    assert engine.next_check("id") == T0 + 80 * DAY
    with pytest.raises(KeyError):
        await engine.renew_now_if_due("unknown")


async def test_renew_now_if_due_failures(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("due", T0 - 81 * DAY, T0 + 19 * DAY)
    store.put("expired", T0 - LIFETIME, T0 - 1)
    # The engine's own attempts (at once, both being due) use up the first failure of each.
    engine.add(store.credential("due"))
    engine.add(store.credential("expired"))
    store.fail["due"] = 2
    store.fail["expired"] = 2
    await settle()
    assert store.renewed("due") == 1 and store.renewed("expired") == 1

    # Still valid: the failure is logged, the current cert stays usable, a retry is scheduled.
    assert await engine.renew_now_if_due("due") is False
    assert engine.next_check("due") == T0 + 4 * DAY
    with pytest.raises(RenewalError, match="expired and could not be renewed.*503"):
        await engine.renew_now_if_due("expired")
    assert "expired" in engine
    assert await engine.renew_now_if_due("expired") is True

    del store.pems["due"]
    with pytest.raises(RenewalError, match="no cert is stored"):
        await engine.renew_now_if_due("due")
    assert "due" in engine


async def test_a_wall_clock_jump_forward_is_noticed_at_once_by_the_manual_clock(
    rig: Rig,
) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    # NTP sets the clock a year forward: the cert is expired; the engine renews at once.
    await rig.at(T0 + 365 * DAY)
    assert store.calls == [("id", True, T0 + 365 * DAY)]


async def test_wall_clock_sleep_notices_a_jump_within_a_chunk(
    mock_clock: trio.testing.MockClock,
) -> None:
    wall = [float(T0)]
    clock = WallClock(chunk=60.0, time_fn=lambda: wall[0])
    woke: list[float] = []

    async def sleeper() -> None:
        await clock.sleep_until(T0 + 30 * DAY)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        await settle()
        start = trio.current_time()
        wall[0] = T0 + 31 * DAY  # the jump
        mock_clock.jump(59)
        await settle()
        assert woke == []
        mock_clock.jump(1)
        await settle()
        assert woke == [start + 60]


async def test_engine_on_the_wall_clock_notices_a_jump(
    mock_clock: trio.testing.MockClock, key: ec.EllipticCurvePrivateKey
) -> None:
    wall = [float(T0)]
    clock = WallClock(chunk=60.0, time_fn=lambda: wall[0])
    store = Store(ManualClock(T0), key)  # its clock only stamps the renewed cert
    store.put("id", T0, T0 + LIFETIME)
    engine = RenewalEngine(clock=clock, jitter=0.0)
    engine.add(store.credential("id"))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await settle()
        assert store.calls == []
        wall[0] = T0 + 81 * DAY
        mock_clock.jump(60)
        await settle()
        assert store.renewed("id") == 1
        nursery.cancel_scope.cancel()


def test_real_wall_clock_reads_the_system_time() -> None:
    import time

    assert abs(WallClock().now() - time.time()) < 5


def test_engine_refuses_a_jitter_of_a_whole_window() -> None:
    with pytest.raises(ValueError):
        RenewalEngine(jitter=1.0)


async def test_recheck_after_an_import_follows_a_sooner_deadline(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    # The owner imports a cert that expires in 10 days, long before the old deadline.
    store.put("id", T0, T0 + 10 * DAY)
    engine.recheck("id")
    await settle()
    assert engine.next_check("id") == T0 + 8 * DAY
    with pytest.raises(KeyError):
        engine.recheck("unknown")


async def test_a_fetch_that_finds_a_changed_cert_reschedules_it(rig: Rig) -> None:
    store, engine = rig.store, rig.engine
    store.put("id", T0, T0 + LIFETIME)
    engine.add(store.credential("id"))
    await settle()
    store.put("id", T0, T0 + 10 * DAY)
    assert await engine.renew_now_if_due("id") is False
    assert engine.next_check("id") == T0 + 8 * DAY


async def test_a_broken_callback_neither_stops_the_engine_nor_drops_the_cert(
    rig: Rig, logs: pytest.LogCaptureFixture
) -> None:
    store, engine = rig.store, rig.engine

    async def read() -> bytes | None:
        return "a str, not bytes"  # type: ignore[return-value]

    engine.add(attrs.evolve(store.credential("broken"), read=read))
    store.put("fine", T0, T0 + 100)
    engine.add(store.credential("fine"))
    await settle()
    assert engine.next_check("broken") == T0 + renewal.NO_CERT_RETRY
    assert any(
        "cert broken: renewal check failed (TypeError" in r.getMessage() for r in logs.records
    )
    await rig.at(T0 + 80)
    assert store.calls == [("fine", True, T0 + 80)]
    assert "broken" in engine
