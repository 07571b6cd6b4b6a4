"""aziotd's log levels from `AZIOT_LOG`-style text, as the original's units and `aziotctl system
set-log-level` write it: a bare level (`info`), or env_logger directives (`aziot=debug`,
`info,aziot_keyd=trace`).

The original's targets are its crates; each maps to the loggers of ours that do that crate's
work. env_logger matches a directive's name as a prefix of the target, so `aziot` covers every
`aziot_*` crate and `aziotd`: here it sets the `aziot` and `aziotd` loggers. Our own logger names
(`aziot.actors.keys`) are accepted as they are. What cannot be mapped is a warning, never a
failure: a typo in a unit file must not keep the daemon from starting.
"""

from __future__ import annotations

import logging

import attrs

LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,  # Python has nothing finer
}

DEFAULT_LEVEL = logging.INFO  # the original's filter before AZIOT_LOG is parsed

# The original's crates (its log targets) and the loggers doing their work here.
TARGETS: dict[str, tuple[str, ...]] = {
    "aziotd": ("aziotd", "aziot.supervisor", "aziot.bus"),
    "aziot_keyd": ("aziot.actors.keys", "aziot.supervisor.services.keyd", "aziot.config.keyd"),
    "aziot_keys": ("aziot.actors.keys",),
    "aziot_certd": ("aziot.actors.certs", "aziot.supervisor.services.certd", "aziot.config.certd"),
    "aziot_identityd": (
        "aziot.actors.identity",
        "aziot.supervisor.services.identityd",
        "aziot.config.identityd",
    ),
    "aziot_cloud_client_async": ("aziot.actors.identity.cloud", "aziot.actors.identity.dps"),
    "aziot_tpmd": ("aziot.actors.tpm", "aziot.supervisor.services.tpmd", "aziot.config.tpmd"),
    "cert_renewal": ("aziot.actors.certs.renewal", "aziot.actors.identity.renewal"),
    "http_common": ("aziot.api",),
    "config_common": ("aziot.config",),
    "pkcs11": ("aziot.actors.keys.pkcs11",),
}


@attrs.frozen
class LogLevels:
    """A default level and per-logger levels, with the text they came from."""

    text: str = attrs.field(eq=False)  # equal levels from differently spelled text are equal
    default: int = DEFAULT_LEVEL
    loggers: tuple[tuple[str, int], ...] = ()
    warnings: tuple[str, ...] = attrs.field(default=(), eq=False)

    def level_of(self, name: str) -> int:
        """The level a logger called `name` gets: its nearest configured ancestor's."""
        best, level = -1, self.default
        for logger, value in self.loggers:
            if (name == logger or name.startswith(logger + ".")) and len(logger) > best:
                best, level = len(logger), value
        return level

    def apply(self, previous: LogLevels | None = None) -> None:
        """Set the levels on the logging tree, undoing what `previous` set and this does not."""
        if previous is not None:
            for name, _ in previous.loggers:
                logging.getLogger(name).setLevel(logging.NOTSET)
        logging.getLogger().setLevel(self.default)
        for name, level in self.loggers:
            logging.getLogger(name).setLevel(level)


def loggers_for(target: str) -> tuple[str, ...]:
    """Our loggers an env_logger directive named `target` covers (empty: none)."""
    if target.startswith("aziot."):
        return (target,)
    if "aziot".startswith(target):  # `aziot` (or shorter) is a prefix of every crate of ours
        return ("aziot", "aziotd")
    found: list[str] = []
    for crate, names in TARGETS.items():
        if crate.startswith(target):
            found.extend(name for name in names if name not in found)
    return tuple(found)


def parse(text: str, source: str = "AZIOT_LOG") -> LogLevels:
    """`text` as env_logger reads it; what it cannot use becomes a warning naming `source`."""
    spec = text.strip()
    directives, _, regex = spec.partition("/")
    warnings: list[str] = []
    if regex:
        warnings.append(f"{source}: the message filter '/{regex}' is not supported; ignored")
    default = DEFAULT_LEVEL
    named: list[tuple[str, int]] = []
    for part in directives.split(","):
        part = part.strip()
        if not part:
            continue
        name, equals, level_text = part.partition("=")
        name, level_text = name.strip(), level_text.strip()
        if not name:
            warnings.append(f"{source}: {part!r} names no target; ignored")
            continue
        if not equals:
            if name.lower() in LEVELS:  # a bare level is the default for everything
                default = LEVELS[name.lower()]
                continue
            named.append((name, logging.DEBUG))  # env_logger: a bare target logs everything
            continue
        if level_text.lower() not in LEVELS:
            warnings.append(
                f"{source}: unknown level {level_text!r} in {part!r} "
                f"(use {', '.join(k for k in LEVELS if k != 'warning')}); ignored"
            )
            continue
        named.append((name, LEVELS[level_text.lower()]))
    loggers: dict[str, int] = {}
    # The longer name is the more specific directive in env_logger: it wins where two meet.
    for name, level in sorted(named, key=lambda item: len(item[0])):
        targets = loggers_for(name)
        if not targets:
            warnings.append(f"{source}: no logger of aziotd matches target {name!r}; ignored")
        for logger in targets:
            loggers[logger] = level
    return LogLevels(spec, default, tuple(loggers.items()), tuple(warnings))


def choose(cli: str | None, environ: dict[str, str]) -> LogLevels:
    """--log-level, else AZIOT_LOG_LEVEL, else AZIOT_LOG, else info; an empty one is unset."""
    for source, value in (
        ("--log-level", cli),
        ("AZIOT_LOG_LEVEL", environ.get("AZIOT_LOG_LEVEL")),
        ("AZIOT_LOG", environ.get("AZIOT_LOG")),
    ):
        if value and value.strip():
            return parse(value, source)
    return LogLevels("info")
