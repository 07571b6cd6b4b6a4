"""Configuration checks: each service's config parses, the applied configs are newer than the
super-config, and identityd's hostname fits the machine."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aziot.config.certd import load_certd
from aziot.config.identityd import load_identityd, parse_identityd
from aziot.config.keyd import load_keyd
from aziot.config.loader import ConfigError, ServicePaths, read_toml
from aziot.config.tpmd import load_tpmd

from ..layout import SERVICES
from .context import Context
from .outcome import OK, Outcome, failed, fatal, warning

LOADERS: dict[str, Callable[[ServicePaths], Any]] = {
    "keyd": load_keyd,
    "certd": load_certd,
    "tpmd": load_tpmd,
    "identityd": load_identityd,
}


def _unreadable_file(paths: ServicePaths) -> str | None:
    """The first config file (or config.d) the current user may not read, if any. The loaders
    report that as a parse error; here it is fatal, as in the original: nothing else can be
    checked without root."""
    candidates = [paths.config_file]
    try:
        candidates += sorted(p for p in paths.config_dir.iterdir() if p.suffix == ".toml")
    except FileNotFoundError:
        pass
    except PermissionError:
        return str(paths.config_dir)
    for path in candidates:
        try:
            with open(path, "rb"):
                pass
        except PermissionError:
            return str(path)
        except OSError:
            continue
    return None


def _well_formed(service: str) -> Callable[[Context, dict[str, Any]], Outcome]:
    def check(ctx: Context, info: dict[str, Any]) -> Outcome:
        layout = ctx.layout
        paths = ServicePaths(service, layout.config_file(service), layout.config_dir(service))
        blocked = _unreadable_file(paths)
        if blocked is not None:
            return fatal(
                "Could not open file. You might need to run this command as root.",
                f"error in file {blocked}",
                f"permission denied for uid {os.geteuid()}",
            )
        try:
            config = LOADERS[service](paths)
        except ConfigError as error:
            return failed(str(error))
        setattr(ctx, service, config)
        if service == "identityd":
            ctx.identityd_prev = _previous_identityd(config.homedir / "prev_state")
        return OK

    return check


def _previous_identityd(path: Path) -> Any:
    """The last identityd settings provisioned with, as the original and ours keep them
    (an older file of ours held principals only and does not parse: then None)."""
    try:
        return parse_identityd(read_toml(path), str(path))
    except (OSError, ConfigError):
        return None


keyd_config_well_formed = _well_formed("keyd")
certd_config_well_formed = _well_formed("certd")
tpmd_config_well_formed = _well_formed("tpmd")
identityd_config_well_formed = _well_formed("identityd")


def configs_up_to_date(ctx: Context, info: dict[str, Any]) -> Outcome:
    layout = ctx.layout
    super_config = layout.super_config
    if not super_config.exists():
        return Outcome("ignored")
    try:
        super_mtime = super_config.stat().st_mtime_ns
    except OSError as error:
        return failed(f"could not stat {super_config}: {error.strerror}")
    for service in SERVICES:
        applied = layout.applied_config(service)
        try:
            applied_mtime = applied.stat().st_mtime_ns
        except FileNotFoundError:
            return warning(f"{applied} does not exist.\nDid you run 'aziotctl config apply'?")
        except OSError as error:
            return failed(f"could not stat {applied}: {error.strerror}")
        if super_mtime > applied_mtime:
            return warning(
                f"{super_config} was modified after {service}'s config\n"
                f"You must run 'aziotctl config apply' to update {service}'s config "
                "with the latest config.toml"
            )
    return OK


def is_rfc_1035_valid(name: str) -> bool:
    if not 1 <= len(name) <= 255:
        return False
    for label in name.split("."):
        if not 1 <= len(label) <= 63 or not label.isascii():
            return False
        if not label[0].isalpha() or not label[-1].isalnum():
            return False
        if any(not (c.isalnum() or c == "-") for c in label):
            return False
    return True


def hostname(ctx: Context, info: dict[str, Any]) -> Outcome:
    config_hostname = ctx.need_identityd().hostname
    info["config_hostname"] = config_hostname
    try:
        ipaddress.ip_address(config_hostname)
    except ValueError:
        pass
    else:
        info["machine_hostname"] = config_hostname
        return OK
    machine = socket.gethostname()
    info["machine_hostname"] = machine
    configured, actual = config_hostname.lower(), machine.lower()
    if configured != actual and not configured.startswith(f"{actual}."):
        return failed(
            f"identityd config has hostname {configured} but device reports hostname {actual}.\n"
            "Hostname in identityd config must either be identical to the device hostname or "
            "be a fully-qualified domain name that has the device hostname as the first "
            "component."
        )
    if not is_rfc_1035_valid(config_hostname):
        return warning(
            f"identityd config has hostname {config_hostname} which does not comply with "
            "RFC 1035.\n\n"
            "- Hostname must be between 1 and 255 octets inclusive.\n"
            '- Each label in the hostname (component separated by ".") must be between 1 and '
            "63 octets inclusive.\n"
            "- Each label must start with an ASCII alphabet character (a-z, A-Z), end with an "
            "ASCII alphanumeric character (a-z, A-Z, 0-9), and must contain only ASCII "
            'alphanumeric characters or hyphens (a-z, A-Z, 0-9, "-").\n\n'
            "Not complying with RFC 1035 may cause errors during the TLS handshake with modules "
            "and downstream devices."
        )
    if len(config_hostname) > 64:
        return warning(
            f"identityd config hostname {config_hostname} is too long to be used as a "
            "certificate issuer"
        )
    return OK
