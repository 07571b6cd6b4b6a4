"""The renewal engine: when to renew a cert, and a trio task that does it on time.

This is the original's `cert-renewal` crate (spec/provisioning.md §16) as a library the certs
actor owns. It keeps the original's policy strings and arithmetic to the second, and differs
where the original loses certs (spec/lessons.md row 4):

* A failed renewal is retried at now + retry period, forever. The original drops a credential
  from auto-renewal on a "fatal" error and when the cert's digest changed since it was added,
  which (§17) also happens after its own failed commit; the device then renews nothing until it
  restarts, and its cert expires. Here a cert that changed on disk (an operator imported a new
  one, or a restart left a finished renewal behind) is simply scheduled from what is now there.
* The schedule is derived from the cert on disk every time a deadline arrives, never from memory
  alone, so a restart rebuilds it: a renewal interrupted before its commit is still due and
  runs again; one interrupted after it finds the new cert and schedules its successor.
* Deadlines carry jitter (see `jittered_deadline`) so a fleet given identical certs by one CA on
  one day does not renew in step and flood the CA at the same second.
* An absent or unreadable cert is looked at again (`NO_CERT_RETRY`), not refused.

The engine writes nothing: the owner's `renew` callback does the whole renewal and its commit.
Time comes from an injectable `Clock`, so the tests drive weeks of schedule in milliseconds.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import heapq
import itertools
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = [
    "DEFAULT_JITTER",
    "DEFAULT_RETRY",
    "DEFAULT_THRESHOLD",
    "NO_CERT_RETRY",
    "NO_CERT_RETRY_MAX",
    "AutoRenew",
    "CertTimes",
    "Clock",
    "Credential",
    "ManualClock",
    "Policy",
    "PolicyKind",
    "ReadCert",
    "RenewCert",
    "RenewalEngine",
    "RenewalError",
    "WallClock",
    "jittered_deadline",
    "parse_policy",
    "renewal_deadline",
    "renewal_times",
    "retry_period",
    "should_renew",
]

log = logging.getLogger(__name__)

# The original parses the number with Rust's `i64::from_str`; anything it cannot hold is refused.
_I64_MAX = 2**63 - 1
# ASCII only: Python's int() would also take "５", "1_0" and surrounding spaces, Rust's does not.
_NUMBER = re.compile(r"\+?[0-9]+")
_FIRST_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)
_ACCEPTED = "expected '<n>%' (n from 1 to 99), '<n>min' or '<n>day' (n a positive integer)"

# Without a readable cert there is no lifetime to take a percentage of; this is how soon to look
# again, and the longest any time policy may make a missing cert wait to be noticed.
NO_CERT_RETRY = 60
NO_CERT_RETRY_MAX = 3600

# How far, as a fraction of the renewal window, jitter may move a deadline either way.
DEFAULT_JITTER = 0.1


# --------------------------------------------------------------------------------------------
# Policy strings


class PolicyKind(enum.Enum):
    PERCENTAGE = "percentage"
    TIME = "time"


def _check_value(instance: Policy, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a renewal policy value is an int, not {value!r}")
    if instance.kind is PolicyKind.PERCENTAGE and not 1 <= value <= 99:
        raise ValueError(f"a lifetime percentage is from 1 to 99, not {value}")
    if instance.kind is PolicyKind.TIME and not 1 <= value <= _I64_MAX:
        raise ValueError(f"a renewal time is a positive number of seconds, not {value}")


@attrs.frozen
class Policy:
    """A threshold or retry setting: a percentage of the cert's lifetime, or a time in seconds.

    `str()` gives the original's serialization: `"n%"`, or `"<d>day"` when the seconds are whole
    days, else `"<m>min"` (truncated, as the original: 90 s prints as "1min").
    """

    kind: PolicyKind
    value: int = attrs.field(validator=_check_value)

    @classmethod
    def percentage(cls, percent: int) -> Policy:
        return cls(PolicyKind.PERCENTAGE, percent)

    @classmethod
    def time(cls, seconds: int) -> Policy:
        return cls(PolicyKind.TIME, seconds)

    @classmethod
    def parse(cls, text: str) -> Policy:
        return parse_policy(text)

    def __str__(self) -> str:
        if self.kind is PolicyKind.PERCENTAGE:
            return f"{self.value}%"
        if self.value % 86400 == 0:
            return f"{self.value // 86400}day"
        return f"{self.value // 60}min"


def parse_policy(text: str) -> Policy:
    """Parse `"<n>%"`, `"<n>min"` or `"<n>day"` exactly as the original's deserializer does.

    The original strips the unit from the end and hands the rest to Rust's integer parser, so
    `"+5min"` and `"05min"` are accepted there and here, while `" 5min"`, `"5 min"`, `"5MIN"`,
    `"days"`, `"0min"`, `"-5min"` and `"100%"` are refused by both. A config that loaded in the
    original must load here, and one it refused must be refused, with the string named.
    """
    if not isinstance(text, str):
        raise TypeError(f"a renewal policy is a string such as '80%', not {text!r}")

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid renewal policy {text!r}: {reason}; {_ACCEPTED}")

    if text.endswith("%"):
        unit, number = "%", text[:-1]
    elif text.endswith(("min", "day")):
        unit, number = text[-3:], text[:-3]
    elif text == "":
        raise bad("it is empty")
    else:
        raise bad("unknown unit")
    if not _NUMBER.fullmatch(number):
        raise bad("no number before the unit" if number == "" else f"{number!r} is not a number")
    value = int(number)
    if value > _I64_MAX:
        raise bad("the number is too large")
    if value <= 0:
        raise bad("the number must be positive")
    if unit == "%":
        if value >= 100:
            raise bad("a lifetime percentage must be less than 100")
        return Policy.percentage(value)
    seconds = value * (60 if unit == "min" else 86400)
    if seconds > _I64_MAX:
        raise bad("the time is too large")
    return Policy.time(seconds)


DEFAULT_THRESHOLD = Policy.percentage(80)
DEFAULT_RETRY = Policy.percentage(4)


@attrs.frozen
class AutoRenew:
    """The original's `AutoRenewConfig`: whether renewal makes a new key, and when it happens.

    Defaults are the original's (`true`, `80%`, `4%`); they apply to EST identity certs when the
    config has no `identity_auto_renew` table. `parse` takes the config's strings.
    """

    rotate_key: bool = True
    threshold: Policy = DEFAULT_THRESHOLD
    retry: Policy = DEFAULT_RETRY

    @classmethod
    def parse(cls, rotate_key: bool, threshold: str, retry: str) -> AutoRenew:
        return cls(rotate_key, parse_policy(threshold), parse_policy(retry))


# --------------------------------------------------------------------------------------------
# Arithmetic (§16): whole seconds since the epoch, integer division truncating toward zero


def _div(a: int, b: int) -> int:
    """Rust's `/` on i64: truncates toward zero, where Python's `//` floors."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_SECOND = datetime.timedelta(seconds=1)


@attrs.frozen
class CertTimes:
    """A cert's validity in whole seconds since the epoch, as the original reads ASN.1 times."""

    not_before: int
    not_after: int

    @property
    def lifetime(self) -> int:
        return self.not_after - self.not_before

    @property
    def valid_order(self) -> bool:
        return self.not_before < self.not_after

    def expired(self, now: int) -> bool:
        # The original's `in_past`: expired at the second of notAfter itself.
        return now >= self.not_after

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertTimes:
        return cls(
            (cert.not_valid_before_utc - _EPOCH) // _SECOND,
            (cert.not_valid_after_utc - _EPOCH) // _SECOND,
        )


def renewal_deadline(times: CertTimes, threshold: Policy) -> int:
    """The threshold as a time: `na − (L − L·p/100)` or `na − t`, before any past-adjustment."""
    if threshold.kind is PolicyKind.PERCENTAGE:
        life = times.lifetime
        return times.not_after - (life - _div(life * threshold.value, 100))
    return times.not_after - threshold.value


def retry_period(times: CertTimes, retry: Policy) -> int:
    """`L·r/100` or `t`, and never under a second, so a failing renewal cannot spin."""
    if retry.kind is PolicyKind.PERCENTAGE:
        period = _div(times.lifetime * retry.value, 100)
    else:
        period = retry.value
    return max(period, 1)


def renewal_times(times: CertTimes, policy: AutoRenew, now: int) -> tuple[int, int]:
    """The original's `renewal_times`: (next renewal, retry period), a past deadline moved to
    now + retry. Like the original it refuses certs that cannot be scheduled (the engine itself
    renews those at once instead of refusing them).
    """
    if not times.valid_order:
        raise ValueError("cert not_before is not before not_after")
    if times.expired(now):
        raise ValueError("cannot calculate initial renewal time for expired cert")
    deadline = renewal_deadline(times, policy.threshold)
    retry = retry_period(times, policy.retry)
    if deadline <= now:
        deadline = now + retry
    return deadline, retry


def should_renew(times: CertTimes, threshold: Policy, now: int) -> bool:
    """The original's `should_renew`: invalid or expired certs always; else past the threshold."""
    if not times.valid_order or times.expired(now):
        return True
    if threshold.kind is PolicyKind.PERCENTAGE:
        return _div((now - times.not_before) * 100, times.lifetime) >= threshold.value
    return times.not_after - now <= threshold.value


def jittered_deadline(
    times: CertTimes, threshold: Policy, fraction: float, jitter: float = DEFAULT_JITTER
) -> int:
    """The renewal deadline moved by `fraction · jitter` (fraction in [−1, 1]) of the renewal
    window, the time from the unjittered deadline to expiry.

    Why the window and not the lifetime: the window is what the policy leaves for renewing and
    retrying, and it is the same quantity for both kinds of threshold (`t` for a time policy,
    `L − L·p/100` for a percentage). Scaling by it, the latest jittered deadline keeps 90 % of
    the window ahead of it and can never reach expiry, whatever the threshold; ±10 % of the
    lifetime would push a `95%` threshold past notAfter. The price is a smaller spread for high
    thresholds, which is what such a policy asks for.

    The result is never before notBefore nor at or after notAfter. A deadline at or before
    notBefore (a time threshold longer than the lifetime) is left as is: that cert is due as soon
    as it exists and there is no window to spread over.
    """
    base = renewal_deadline(times, threshold)
    if not times.valid_order or base <= times.not_before:
        return base
    window = times.not_after - base
    offset = math.trunc(fraction * jitter * window)
    return min(max(base + offset, times.not_before), times.not_after - 1)


# --------------------------------------------------------------------------------------------
# Clocks


class Clock(Protocol):
    """Wall time for the engine. Deadlines are wall times because certs expire in wall time."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep_until(self, wall_time: float) -> None:
        """Return once `now() >= wall_time` (at once if it already is)."""
        ...


@attrs.define
class WallClock:
    """The system clock. It sleeps in chunks of at most `chunk` seconds of trio time and looks
    at the wall clock after each, so a jump (NTP setting the clock at first boot, an operator's
    `date`) moves renewals within a chunk rather than after the whole stale sleep.
    """

    chunk: float = 60.0
    time_fn: Callable[[], float] = time.time

    def now(self) -> float:
        return self.time_fn()

    async def sleep_until(self, wall_time: float) -> None:
        while (remaining := wall_time - self.time_fn()) > 0:
            await trio.sleep(min(remaining, self.chunk))


class ManualClock:
    """A wall clock that moves only when told: `advance` or `set`, which wake every sleeper whose
    time has come. For tests, here and in the owner's, so that weeks pass in no real time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._moved = trio.Event()

    def now(self) -> float:
        return self._now

    def set(self, wall_time: float) -> None:
        # Backwards too: a wall clock may be set back, and the engine must cope.
        self._now = float(wall_time)
        moved, self._moved = self._moved, trio.Event()
        moved.set()

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    async def sleep_until(self, wall_time: float) -> None:
        while self._now < wall_time:
            await self._moved.wait()


# --------------------------------------------------------------------------------------------
# The engine

ReadCert = Callable[[], Awaitable[bytes | None]]
RenewCert = Callable[[bytes, bool], Awaitable[None]]


@attrs.frozen
class Credential:
    """What the owner registers: the ids, the policy, and two callbacks.

    `read()` returns the cert's PEM as it is now on disk, or None when there is none; the first
    cert in it is the one that counts. `renew(current_pem, rotate_key)` does the whole renewal
    and commits it (writes the new cert, moves the new key into place); it returns when the new
    cert is on disk, or raises. The engine re-reads after it, so it needs no return value.
    """

    cert_id: str
    key_id: str
    policy: AutoRenew = attrs.field(validator=attrs.validators.instance_of(AutoRenew))
    read: ReadCert = attrs.field(eq=False)
    renew: RenewCert = attrs.field(eq=False)


class RenewalError(Exception):
    """A cert needed now (expired, or unreadable) could not be renewed."""


class _Unreadable(Exception):
    """The cert is absent or cannot be parsed; the message says which."""


@attrs.define(eq=False)
class _Entry:
    credential: Credential
    # The cert last read, and its jitter draw: the same cert always gets the same deadline, so
    # re-reading it at a wake-up neither advances nor postpones its renewal.
    digest: bytes | None = None
    fraction: float = 0.0
    # The last retry period computed from a real cert: a fallback when the cert goes missing.
    last_retry: int | None = None
    generation: int = 0
    next_check: float | None = None


@attrs.frozen
class _Cert:
    pem: bytes
    times: CertTimes
    changed: bool


def _fmt(t: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return f"{t:.0f}"


def _cause(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RenewalEngine:
    """Schedules renewals of credentials by cert id; run it with `run()` in a nursery.

    A min-heap of (next check, ...) holds at most one live entry per cert id; stale heap entries
    (rescheduled, replaced, removed) are recognized by their generation and skipped. At a check
    the cert is re-read: if it is expired, invalid or past its (jittered) deadline it is renewed,
    otherwise it is scheduled for that deadline. After a renewal the new cert is read and
    scheduled; if it is itself past its deadline the next attempt waits the retry period, as
    the original does, rather than renewing in a loop. A failure of any kind (reading, parsing,
    renewing) schedules another check; nothing ever drops a credential but `remove`.

    Each check runs in its own task so one hung EST server does not delay other certs, and under
    a per-cert-id lock, shared with `renew_now_if_due`, so one credential never has two
    renewals in flight.

    `clock` defaults to the system's `WallClock`; `rng` is the jitter's source (tests pass a
    seeded one); `jitter` is the fraction of the renewal window a deadline may move either way
    (0 gives the original's deadlines exactly). Retries carry no jitter of their own: they
    count from each device's own failed attempt, which the deadlines already spread.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        jitter: float = DEFAULT_JITTER,
    ) -> None:
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter is a fraction of the renewal window below 1, not {jitter}")
        self._clock: Clock = clock if clock is not None else WallClock()
        # A private generator: draws here must not depend on (or disturb) anyone else's.
        self._rng = rng if rng is not None else random.Random()
        self._jitter = jitter
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._order = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._sleep = trio.CancelScope()

    # -- registration ------------------------------------------------------------------------

    def add(self, credential: Credential) -> None:
        """Track a credential; its cert is read and, if due, renewed at the engine's next turn."""
        if credential.cert_id in self._entries:
            raise ValueError(f"cert {credential.cert_id!r} is already tracked for renewal")
        self._track(credential)

    def replace(self, credential: Credential) -> None:
        """Track a credential, replacing any with the same cert id (on a config reload).

        A renewal of the old one already in flight finishes under the lock; the new one is
        checked after it, from whatever that renewal left on disk.
        """
        self._track(credential)

    def remove(self, cert_id: str) -> bool:
        """Stop renewing `cert_id`; a renewal in flight completes but schedules nothing."""
        entry = self._entries.pop(cert_id, None)
        if entry is None:
            return False
        entry.generation += 1
        self._forget_lock(cert_id)
        log.info("cert %s: removed from auto-renewal", cert_id)
        self._wake()
        return True

    def recheck(self, cert_id: str) -> None:
        """Look at `cert_id` again now: for the owner after it imported or deleted that cert
        outside a renewal, since otherwise the engine reads it only at its next deadline.
        Raises KeyError for a cert id not tracked.
        """
        self._schedule(self._entries[cert_id], self._clock.now(), quiet=True)

    def __contains__(self, cert_id: object) -> bool:
        return cert_id in self._entries

    def tracked(self) -> list[str]:
        return sorted(self._entries)

    def next_check(self, cert_id: str) -> float | None:
        """When `cert_id` is next looked at; None while a check of it is in flight.
        Raises KeyError for a cert id not tracked.
        """
        return self._entries[cert_id].next_check

    def _track(self, credential: Credential) -> None:
        old = self._entries.get(credential.cert_id)
        if old is not None:
            old.generation += 1
        entry = _Entry(credential)
        if old is not None and old.credential.policy.threshold == credential.policy.threshold:
            # Same cert, same threshold: keep its jitter draw, so a reload does not reshuffle.
            entry.digest, entry.fraction = old.digest, old.fraction
        self._entries[credential.cert_id] = entry
        log.info(
            "cert %s: %s auto-renewal (key %s, threshold %s, retry %s, rotate key %s)",
            credential.cert_id,
            "replaced in" if old is not None else "added to",
            credential.key_id,
            credential.policy.threshold,
            credential.policy.retry,
            credential.policy.rotate_key,
        )
        self._schedule(entry, self._clock.now(), quiet=True)

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve deadlines until cancelled. Every tracked cert is checked at once on start: the
        schedule lives on disk, not in a previous run's memory.
        """
        if self._nursery is not None:
            raise RuntimeError("the renewal engine is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                now = self._clock.now()
                for entry in list(self._entries.values()):
                    self._schedule(entry, now, quiet=True)
                task_status.started()
                while True:
                    self._start_due(nursery)
                    self._sleep = trio.CancelScope()
                    with self._sleep:
                        if self._heap:
                            await self._clock.sleep_until(self._heap[0][0])
                        else:
                            await trio.sleep_forever()
        finally:
            self._nursery = None

    def _start_due(self, nursery: trio.Nursery) -> None:
        now = self._clock.now()
        while self._heap:
            when, _, cert_id, generation = self._heap[0]
            entry = self._entries.get(cert_id)
            if entry is None or entry.generation != generation:
                heapq.heappop(self._heap)
                continue
            if when > now:
                return
            heapq.heappop(self._heap)
            entry.next_check = None
            nursery.start_soon(self._check, entry, generation, name=f"renew {cert_id}")

    def _wake(self) -> None:
        # Cancelling the sleep makes the loop look at the heap again; harmless when it is busy.
        self._sleep.cancel()

    def _schedule(self, entry: _Entry, when: float, *, quiet: bool = False) -> None:
        cert_id = entry.credential.cert_id
        if self._entries.get(cert_id) is not entry:
            return  # removed or replaced meanwhile: the new entry has its own schedule
        entry.generation += 1
        entry.next_check = when
        heapq.heappush(self._heap, (when, next(self._order), cert_id, entry.generation))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._compact()
        if not quiet:
            log.info("cert %s: next renewal check at %s", cert_id, _fmt(when))
        self._wake()

    def _compact(self) -> None:
        self._heap = [
            item
            for item in self._heap
            if (e := self._entries.get(item[2])) is not None and e.generation == item[3]
        ]
        heapq.heapify(self._heap)

    @contextlib.asynccontextmanager
    async def exclusive(self, cert_id: str) -> AsyncIterator[None]:
        """Hold `cert_id`'s renewal lock: for the owner's own writes of that cert (an import, a
        delete, an issuance), which must neither interleave with a renewal in flight nor be
        overwritten by its commit. Not reentrant: never call the engine for the same id
        inside it."""
        async with self._lock(cert_id):
            try:
                yield
            finally:
                self._forget_lock(cert_id)

    # -- one check ---------------------------------------------------------------------------

    def _lock(self, cert_id: str) -> trio.Lock:
        lock = self._locks.get(cert_id)
        if lock is None:
            lock = self._locks[cert_id] = trio.Lock()
        return lock

    def _forget_lock(self, cert_id: str) -> None:
        # Only an idle lock may go: a renewal in flight (or waiting) for a removed id must still
        # exclude one for the same id added back meanwhile.
        lock = self._locks.get(cert_id)
        if cert_id in self._entries or lock is None:
            return
        stats = lock.statistics()
        if not stats.locked and stats.tasks_waiting == 0:
            del self._locks[cert_id]

    def _now(self) -> int:
        return math.floor(self._clock.now())

    async def _check(self, entry: _Entry, generation: int) -> None:
        cert_id = entry.credential.cert_id
        try:
            async with self._lock(cert_id):
                if self._entries.get(cert_id) is not entry or entry.generation != generation:
                    return  # rescheduled by `renew_now_if_due` or replaced while we waited
                try:
                    await self._check_locked(entry)
                except Exception as exc:
                    # A bug here must not end the engine (and every other cert's renewals) nor
                    # this cert's: say so loudly and look again later.
                    retry = self._no_cert_retry(entry)
                    log.error(
                        "cert %s: renewal check failed (%s); looking again in %d s",
                        cert_id,
                        _cause(exc),
                        retry,
                    )
                    self._schedule(entry, self._now() + retry, quiet=True)
        finally:
            self._forget_lock(cert_id)

    async def _check_locked(self, entry: _Entry) -> None:
        cert_id = entry.credential.cert_id
        try:
            cert = await self._load(entry)
        except _Unreadable as exc:
            retry = self._no_cert_retry(entry)
            log.warning("cert %s: %s; looking again in %d s", cert_id, exc, retry)
            self._schedule(entry, self._now() + retry, quiet=True)
            return
        now = self._now()
        if not self._due(entry, cert.times, now):
            self._schedule(entry, self._deadline(entry, cert.times))
            return
        await self._renew_and_schedule(entry, cert)

    async def _renew_and_schedule(self, entry: _Entry, cert: _Cert) -> Exception | None:
        """Renew and schedule the next check from the outcome; return the failure, if any."""
        cert_id = entry.credential.cert_id
        policy = entry.credential.policy
        retry = self._retry(entry, cert.times)
        now = self._now()
        log.info(
            "cert %s: renewing (%s, expires %s, rotate key %s)",
            cert_id,
            "expired" if cert.times.expired(now) else f"threshold {policy.threshold} reached",
            _fmt(cert.times.not_after),
            policy.rotate_key,
        )
        try:
            await entry.credential.renew(cert.pem, policy.rotate_key)
        except Exception as exc:
            # Any failure is retried: a bug in one renewal path must not silently stop renewals.
            when = self._now() + retry
            log.warning(
                "cert %s: renewal failed (%s); retrying at %s", cert_id, _cause(exc), _fmt(when)
            )
            self._schedule(entry, when, quiet=True)
            return exc
        try:
            new = await self._load(entry, expect_change=True)
        except _Unreadable as exc:
            retry = self._no_cert_retry(entry)
            log.warning("cert %s: renewed, but then %s; looking again in %d s", cert_id, exc, retry)
            self._schedule(entry, self._now() + retry, quiet=True)
            return None
        now = self._now()
        if self._due(entry, new.times, now):
            # The spec's rule for a deadline already past; it also stops a renewal whose issuer
            # caps the lifetime (or that wrote nothing) from renewing again in a tight loop.
            when = now + self._retry(entry, new.times)
            log.warning(
                "cert %s: renewed, but the cert on disk (expires %s) is already due; "
                "next attempt at %s",
                cert_id,
                _fmt(new.times.not_after),
                _fmt(when),
            )
            self._schedule(entry, when, quiet=True)
        else:
            when = self._deadline(entry, new.times)
            log.info(
                "cert %s: renewed, expires %s; next renewal at %s",
                cert_id,
                _fmt(new.times.not_after),
                _fmt(when),
            )
            self._schedule(entry, when, quiet=True)
        return None

    async def _load(self, entry: _Entry, *, expect_change: bool = False) -> _Cert:
        """Read and parse the cert; a different cert than last time gets a new jitter draw."""
        cert_id = entry.credential.cert_id
        try:
            pem = await entry.credential.read()
        except Exception as exc:
            raise _Unreadable(f"cannot read the cert ({_cause(exc)})") from exc
        if pem is None:
            raise _Unreadable("no cert is stored")
        # The first cert is the credential: only its block is parsed, so a damaged chain after it
        # (which cryptography would refuse as a whole) does not stop its renewal.
        block = _FIRST_CERT.search(pem)
        if block is None:
            raise _Unreadable("the stored PEM holds no certificate")
        try:
            cert = x509.load_pem_x509_certificate(block.group(0))
        except Exception as exc:
            raise _Unreadable(f"the stored cert cannot be parsed ({_cause(exc)})") from exc
        times = CertTimes.of(cert)
        # Of the cert alone: a chain rewritten around the same cert is not a new cert.
        digest = cert.fingerprint(hashes.SHA256())
        changed = digest != entry.digest
        if changed:
            if entry.digest is not None and not expect_change:
                # The original drops the credential here; an operator's import is not an error.
                log.info(
                    "cert %s: changed on disk (expires %s); scheduling from the new cert",
                    cert_id,
                    _fmt(times.not_after),
                )
            entry.digest = digest
            entry.fraction = self._rng.uniform(-1.0, 1.0)
        entry.last_retry = self._retry(entry, times)
        return _Cert(pem, times, changed)

    def _due(self, entry: _Entry, times: CertTimes, now: int) -> bool:
        if not times.valid_order or times.expired(now):
            return True
        return now >= self._deadline(entry, times)

    def _deadline(self, entry: _Entry, times: CertTimes) -> int:
        return jittered_deadline(
            times, entry.credential.policy.threshold, entry.fraction, self._jitter
        )

    def _retry(self, entry: _Entry, times: CertTimes) -> int:
        if not times.valid_order:
            # L ≤ 0 would make a percentage retry the 1 s minimum: a busy loop on a broken cert.
            return self._no_cert_retry(entry)
        return retry_period(times, entry.credential.policy.retry)

    def _no_cert_retry(self, entry: _Entry) -> int:
        retry = entry.credential.policy.retry
        if retry.kind is PolicyKind.TIME:
            seconds = retry.value
        elif entry.last_retry is not None:
            seconds = entry.last_retry
        else:
            seconds = NO_CERT_RETRY
        return min(max(seconds, 1), NO_CERT_RETRY_MAX)

    # -- inline renewal on fetch -------------------------------------------------------------

    async def renew_now_if_due(self, cert_id: str) -> bool:
        """Renew `cert_id` now if it is due; return whether it was renewed.

        For callers about to hand out the credential (the original renews inline on fetch). Due
        means what it means to the scheduler (expired, invalid, or past the jittered deadline),
        so fetches do not undo the fleet's spread. A renewal already in flight is waited for,
        after which the cert is normally no longer due. A failed renewal schedules a retry; it
        raises `RenewalError` only when the cert cannot be used as it is (expired, or unreadable),
        otherwise the current cert is still good and the failure is only logged.
        Raises KeyError for a cert id not tracked.
        """
        if cert_id not in self._entries:
            raise KeyError(cert_id)
        try:
            async with self._lock(cert_id):
                entry = self._entries.get(cert_id)
                if entry is None:
                    raise KeyError(cert_id)
                try:
                    cert = await self._load(entry)
                except _Unreadable as exc:
                    raise RenewalError(f"cert {cert_id}: {exc}") from exc
                if not self._due(entry, cert.times, self._now()):
                    if cert.changed:
                        # Imported behind our back: its deadline may be sooner than the old one.
                        self._schedule(entry, self._deadline(entry, cert.times))
                    return False
                failure = await self._renew_and_schedule(entry, cert)
                if failure is None:
                    return True
                if cert.times.expired(self._now()) or not cert.times.valid_order:
                    raise RenewalError(
                        f"cert {cert_id} is expired and could not be renewed: {_cause(failure)}"
                    ) from failure
                return False
        finally:
            self._forget_lock(cert_id)
