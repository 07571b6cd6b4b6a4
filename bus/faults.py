"""Fault injection: make a named point fail, hang, slow down or crash its actor, on purpose.

Operators and tests rehearse failures with the `AZIOTD_FAULTS` environment variable, e.g.

    AZIOTD_FAULTS="bus.deliver.keys=crash*1; store.write=delay=0.5@0.2"

Each rule is `POINT=ACTION[@PROBABILITY][*COUNT]`, rules separated by `;` or `,`. ACTION is
`error`, `hang`, `crash` or `delay=<seconds>`. PROBABILITY (0..1, default 1) is the chance that a
pass through the point fires; COUNT caps how many times it fires. With no rules, `hit` returns at
once: the default costs one truth test per point.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time

import attrs
import trio

from .errors import BusError, ErrorKind

log = logging.getLogger(__name__)

# Every point the daemon passes through, with what failing there rehearses.
POINTS: dict[str, str] = {
    "bus.deliver.<actor>": "a request reaching an actor (keys, pkcs11, ...)",
    "store.read": "reading a key file from disk",
    "store.write": "writing a key file (before the atomic rename)",
    "store.fsync": "fsync of a key file or its directory",
    "pkcs11.call": "any call into the PKCS#11 library, on the worker thread",
    "certs.store.read": "reading a cert file from disk",
    "certs.store.write": "writing a cert file (before the atomic rename)",
    "certs.store.fsync": "fsync of a cert file",
    "est.request": "each enrollment with an EST server (before it is sent)",
    "identity.state.write": "writing identityd's device_info, prev_state or a module backup",
    "identity.state.fsync": "fsync of one of identityd's state files",
    "identity.cloud": "each DPS or IoT Hub call (before it is sent)",
    "tpm.call": "any call into the TPM (ESAPI), on the TPM worker thread",
}


class Action(enum.StrEnum):
    ERROR = "error"
    HANG = "hang"
    CRASH = "crash"
    DELAY = "delay"


class InjectedCrash(Exception):
    """Raised at a `crash` point: the actor it happens in dies and is restarted."""


@attrs.define
class Rule:
    point: str
    action: Action
    delay: float = 0.0
    probability: float = 1.0
    remaining: int | None = None


def parse_rules(spec: str) -> list[Rule]:
    rules = []
    for raw in spec.replace(",", ";").split(";"):
        entry = raw.strip()
        if not entry:
            continue
        point, sep, rest = entry.partition("=")
        if not sep or not point.strip():
            raise ValueError(f"fault rule {entry!r}: expected POINT=ACTION")
        remaining = None
        if "*" in rest:
            rest, _, count = rest.rpartition("*")
            remaining = _parse_number(entry, "count", count, int)
        probability = 1.0
        if "@" in rest:
            rest, _, prob = rest.rpartition("@")
            probability = _parse_number(entry, "probability", prob, float)
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"fault rule {entry!r}: probability must be within 0..1")
        action_name, _, arg = rest.strip().partition("=")
        try:
            action = Action(action_name.strip())
        except ValueError:
            names = ", ".join(a.value for a in Action)
            raise ValueError(f"fault rule {entry!r}: unknown action; use one of {names}") from None
        delay = _parse_number(entry, "delay", arg, float) if action is Action.DELAY else 0.0
        rules.append(Rule(point.strip(), action, delay, probability, remaining))
    return rules


def _parse_number(entry: str, what: str, text: str, kind: type) -> float:
    try:
        return kind(text.strip())
    except ValueError:
        raise ValueError(f"fault rule {entry!r}: bad {what} {text.strip()!r}") from None


class Faults:
    """The active fault rules of one daemon; shared by its actors, consulted at each point."""

    def __init__(self, rules: list[Rule] | None = None, seed: int | None = None) -> None:
        self._rules = {rule.point: rule for rule in rules or []}
        self._random = random.Random(seed)
        # Worker threads pass through points too; the lock keeps counts exact.
        self._lock = threading.Lock()
        for rule in self._rules.values():
            log.warning("fault injection armed: %s=%s", rule.point, rule.action.value)

    @classmethod
    def from_spec(cls, spec: str | None) -> Faults:
        return cls(parse_rules(spec) if spec else [])

    def __bool__(self) -> bool:
        return bool(self._rules)

    def _fire(self, point: str) -> Rule | None:
        rule = self._rules.get(point)
        if rule is None:
            return None
        with self._lock:
            if rule.remaining == 0:
                return None
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                return None
            if rule.remaining is not None:
                rule.remaining -= 1
        log.warning("fault injected at %s: %s", point, rule.action.value)
        return rule

    async def hit(self, point: str) -> None:
        """Pass through `point` on the trio loop."""
        if not self._rules:
            return
        rule = self._fire(point)
        if rule is None:
            return
        if rule.action is Action.DELAY:
            await trio.sleep(rule.delay)
        elif rule.action is Action.HANG:
            await trio.sleep_forever()
        else:
            _raise(rule)

    def hit_blocking(self, point: str) -> None:
        """Pass through `point` on a worker thread."""
        if not self._rules:
            return
        rule = self._fire(point)
        if rule is None:
            return
        if rule.action is Action.DELAY:
            time.sleep(rule.delay)
        elif rule.action is Action.HANG:
            threading.Event().wait()
        else:
            _raise(rule)


def _raise(rule: Rule) -> None:
    if rule.action is Action.CRASH:
        raise InjectedCrash(f"injected crash at {rule.point}")
    raise BusError(ErrorKind.INTERNAL, f"injected fault at {rule.point}")
