"""PKCS#11 URIs (the RFC 7512 subset keyd understands, api.md §3.5).

Only four attributes matter: the path attributes ``object`` (object label), ``slot-id`` and
``token`` (token label), and the query attribute ``pin-value``. Everything else an RFC 7512 URI
may carry (``id``, ``manufacturer``, ``pin-source``, ``module-path``…) is accepted and ignored,
as the original does, so that URIs written for other tools keep working in our config.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_to_bytes

import attrs

_SCHEME = "pkcs11:"

# Characters left unescaped when rendering a value back into a URI: RFC 7512 "pchar" minus the
# separators we split on, so that parse(render(x)) == x.
_SAFE_CHARS = "-._~!$'()*+,:@"


def _decode(name: str, raw: str) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"PKCS#11 URI attribute {name!r} is not valid UTF-8 after percent-decoding"
        ) from exc


def _split_attribute(component: str, separator_name: str) -> tuple[str, str]:
    name, eq, raw = component.partition("=")
    if not eq:
        raise ValueError(
            f"PKCS#11 URI {separator_name} attribute {name!r} has no '=': "
            "attributes must look like name=value"
        )
    return name, raw


@attrs.frozen
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI.

    ``slot_id`` wins over ``token`` when both are given (the token label is kept only for
    messages). The PIN is excluded from ``repr`` so that a URI can be logged safely.
    """

    slot_id: int | None
    token: str | None
    object_label: str | None
    pin: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse ``text``; raise ``ValueError`` (never echoing the PIN) if it is unusable."""
        if text[: len(_SCHEME)].lower() != _SCHEME:
            raise ValueError("a PKCS#11 URI must start with 'pkcs11:'")
        rest = text[len(_SCHEME) :]
        path, _, query = rest.partition("?")

        slot_id: int | None = None
        token: str | None = None
        object_label: str | None = None
        pin: str | None = None

        # RFC 7512 forbids repeating an attribute; like the original we do not police that and
        # simply let the last occurrence win.
        for component in path.split(";"):
            if not component:
                continue
            name, raw = _split_attribute(component, "path")
            if name == "object":
                object_label = _decode(name, raw)
            elif name == "token":
                token = _decode(name, raw)
            elif name == "slot-id":
                value = _decode(name, raw)
                if not value.isascii() or not value.isdigit():
                    raise ValueError(
                        f"PKCS#11 URI attribute 'slot-id' must be a decimal number, got {value!r}"
                    )
                slot_id = int(value)

        for component in query.split("&"):
            if not component:
                continue
            name, raw = _split_attribute(component, "query")
            if name == "pin-value":
                pin = _decode(name, raw)

        if slot_id is None and token is None:
            raise ValueError(
                "a PKCS#11 URI must name a slot ('slot-id=<number>') or a token ('token=<label>')"
            )
        return cls(slot_id=slot_id, token=token, object_label=object_label, pin=pin)

    def with_object(self, label: str) -> Pkcs11Uri:
        """The same slot/token and PIN, addressing the object labelled ``label``."""
        return attrs.evolve(self, object_label=label)

    def redacted(self) -> str:
        """Render the URI for logs and error messages, with the PIN masked."""
        return self._render(pin_placeholder="***")

    def to_text(self) -> str:
        """Render the URI including the PIN (for handing to other processes, not for logs)."""
        return self._render(pin_placeholder=None)

    def _render(self, pin_placeholder: str | None) -> str:
        parts: list[str] = []
        if self.slot_id is not None:
            parts.append(f"slot-id={self.slot_id}")
        if self.token is not None:
            parts.append(f"token={quote(self.token, safe=_SAFE_CHARS)}")
        if self.object_label is not None:
            parts.append(f"object={quote(self.object_label, safe=_SAFE_CHARS)}")
        text = _SCHEME + ";".join(parts)
        if self.pin is not None:
            shown = (
                pin_placeholder
                if pin_placeholder is not None
                else quote(self.pin, safe=_SAFE_CHARS)
            )
            text += f"?pin-value={shown}"
        return text

    def __str__(self) -> str:
        return self.redacted()
