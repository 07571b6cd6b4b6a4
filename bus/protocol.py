"""Typed operations: one declaration per operation gives its encoding, dispatch and client.

An actor's protocol is a class of `Operation` attributes, each naming its request and reply
types (attrs classes):

    class Keys(Protocol):
        actor = "keys"
        sign = Operation(Sign, Signature)

A caller writes `await client.call(Keys.sign, Sign(...))` and gets a `Signature` back; the
actor serves it with its method of the same name, `async def sign(self, request, caller)`. So a
request is followed from its route to its handler by name, and "go to definition" on
`Keys.sign` shows both types. Requests and replies cross the bus as msgpack maps (cattrs
unstructures them; bytes stay bytes), and `dispatcher()` checks at start that the actor has a
handler for every operation.

Who is asking (`Caller`) travels in the envelope beside the message, set by whoever sends it
(the façade from SO_PEERCRED, or the calling service), never in a payload a sender fills in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, TypeVar

import attrs
import cattrs
import cattrs.strategies

from .bus import Bus
from .errors import BusError, ErrorKind

Req = TypeVar("Req")
Rep = TypeVar("Rep")

converter = cattrs.Converter(forbid_extra_keys=True)  # a stray field is a sender bug
# msgpack keeps bytes and str apart, so a union of the two needs no tag.
cattrs.strategies.configure_union_passthrough(bytes | str | int | float | bool | None, converter)


@attrs.frozen
class Caller:
    """A uid for requests from a client socket; a service name for requests between actors."""

    uid: int | None = None
    service: str | None = None

    def to_wire(self) -> list[Any]:
        return [self.uid, self.service]

    @classmethod
    def from_wire(cls, wire: list[Any] | None) -> Caller:
        if not wire:
            return cls()
        uid, service = wire
        return cls(uid, service)

    def __str__(self) -> str:
        return f"uid {self.uid}" if self.uid is not None else f"service {self.service}"


@attrs.frozen
class Nothing:
    """The reply of an operation that returns no data."""


NOTHING = Nothing()


@attrs.define
class Operation(Generic[Req, Rep]):
    request: type[Req]
    reply: type[Rep]
    name: str = ""  # set from the attribute name by Protocol
    # cattrs' hooks for the two types, looked up at first use: its per-call dispatch costs
    # as much as the conversion itself, four times a request, and building them all at import
    # would add tens of milliseconds to the daemon's start.
    _hooks: tuple[Any, Any, Any, Any] | None = attrs.field(init=False, default=None)

    def _hook(self, which: int) -> Any:
        if self._hooks is None:
            self._hooks = (
                converter.get_unstructure_hook(self.request),
                converter.get_structure_hook(self.request),
                converter.get_unstructure_hook(self.reply),
                converter.get_structure_hook(self.reply),
            )
        return self._hooks[which]

    def encode(self, request: Req) -> dict[str, Any]:
        return self._hook(0)(request)

    def decode(self, args: dict[str, Any]) -> Req:
        return self._hook(1)(args, self.request)

    def encode_reply(self, reply: Rep) -> Any:
        return self._hook(2)(reply)

    def decode_reply(self, wire: Any) -> Rep:
        return self._hook(3)(wire, self.reply)


class Protocol:
    """A class whose `Operation` attributes are one actor's operations."""

    actor: ClassVar[str]
    operations: ClassVar[dict[str, Operation[Any, Any]]]

    def __init_subclass__(cls) -> None:
        cls.operations = {}
        for name, value in vars(cls).items():
            if isinstance(value, Operation):
                value.name = name
                cls.operations[name] = value


Handler = Callable[[Any, Caller], Awaitable[Any]]


class Client:
    """Calls one actor's operations; as `caller` unless a call names another (the façade
    names each request's uid)."""

    def __init__(self, bus: Bus, protocol: type[Protocol], caller: Caller) -> None:
        self._bus = bus
        self._actor = protocol.actor
        self._caller = caller.to_wire()

    async def call(
        self,
        operation: Operation[Req, Rep],
        request: Req,
        *,
        caller: Caller | None = None,
        timeout: float | None = None,
    ) -> Rep:
        wire = await self._bus.request(
            self._actor,
            operation.name,
            operation.encode(request),
            caller=self._caller if caller is None else caller.to_wire(),
            timeout=timeout,
        )
        return operation.decode_reply(wire)


def dispatcher(protocol: type[Protocol], actor: object) -> Callable[..., Awaitable[Any]]:
    """`handle(op, args, caller)` for the bus loop: decode, call the actor's method of the
    operation's name, encode its reply. Refuses at start an actor missing a handler."""
    table: dict[str, tuple[Operation[Any, Any], Handler]] = {}
    for name, operation in protocol.operations.items():
        method = getattr(actor, name, None)
        if method is None:
            raise TypeError(f"{type(actor).__name__} has no handler for {protocol.__name__}.{name}")
        table[name] = (operation, method)

    async def handle(op: str, args: dict[str, Any], caller: list[Any] | None) -> Any:
        entry = table.get(op)
        if entry is None:
            raise BusError(ErrorKind.INVALID, f"unknown operation {op!r}")
        operation, method = entry
        try:
            request = operation.decode(args)
        except Exception as error:
            raise BusError(ErrorKind.INVALID, f"malformed {op} request: {error}") from None
        return operation.encode_reply(await method(request, Caller.from_wire(caller)))

    return handle
