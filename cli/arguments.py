"""`aziotctl`'s command line, every command's options, without importing the commands: a
command's module (`apply`, `mp`, `check`, `system`) is imported only to run it, so `--help`,
`--version` and a usage error cost nothing of what `check` loads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from aziot.supervisor.version import package_version

DEFAULT_SUPER_CONFIG = "/etc/aziot/config.toml"
LEVELS = ("error", "warn", "info", "debug", "trace")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aziotctl",
        description="Configure, check and drive the IoT device identity services (aziotd).",
    )
    parser.add_argument("--version", action="version", version=f"aziotctl {package_version()}")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="a device tree under DIR instead of /: every path read or written, and every "
        "path written into the configs, is under DIR (tests, the demo; not for staging an "
        "image, whose configs must name / paths); systemd is left alone",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="apply the device's config file")
    config_commands = config.add_subparsers(
        dest="config_command", metavar="SUBCOMMAND", required=True
    )
    apply = config_commands.add_parser(
        "apply",
        help="turn /etc/aziot/config.toml into each service's config and restart the services",
    )
    apply.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="PATH",
        help=f"the super-config to apply (default {DEFAULT_SUPER_CONFIG})",
    )
    apply.set_defaults(module="apply")
    mp = config_commands.add_parser(
        "mp",
        help="write a super-config for manual provisioning with a connection string",
    )
    mp.add_argument(
        "-c",
        "--connection-string",
        required=True,
        metavar="CONNECTION_STRING",
        help="HostName=<hub>;DeviceId=<id>;SharedAccessKey=<base64>",
    )
    mp.add_argument(
        "-o",
        "--out-config-file",
        default=None,
        metavar="PATH",
        help=f"where to write it (default {DEFAULT_SUPER_CONFIG})",
    )
    mp.add_argument("-f", "--force", action="store_true", help="overwrite an existing file")
    mp.set_defaults(module="mp")

    _check(commands)
    _system(commands)
    return parser


def _check(commands: Any) -> None:
    check = commands.add_parser("check", help="check for common config and deployment issues")
    check.add_argument(
        "-o",
        "--output",
        choices=("text", "json", "json-stream"),
        default="text",
        help="json and json-stream add host information (OS, memory, disks)",
    )
    check.add_argument(
        "--dont-run",
        action="append",
        default=[],
        metavar="DONT_RUN",
        help="space-separated check ids not to run (see `aziotctl check-list`)",
    )
    check.add_argument(
        "--warnings-as-errors",
        action="store_true",
        help="treat warnings as errors (and exit 1 on them)",
    )
    check.add_argument(
        "--ntp-server",
        default="pool.ntp.org:123",
        metavar="NTP_SERVER",
        help="the NTP server host:port to compare the local time with",
    )
    check.add_argument("-v", "--verbose", action="store_true", help="show causes and skips")
    check.add_argument(
        "--iothub-hostname",
        default=None,
        metavar="IOTHUB_HOSTNAME",
        help="the IoT Hub to test connecting to (default: the manual provisioning's hub)",
    )
    check.add_argument(
        "--proxy-uri",
        default=None,
        metavar="PROXY_URI",
        help="the HTTP proxy (http://host:port) the device uses to reach DPS and IoT Hub",
    )
    check.add_argument(
        "--expected-aziot-version",
        default=None,
        metavar="VERSION",
        help="compare the installed version with this one instead of fetching the latest",
    )
    check.set_defaults(module="check", listing=False)
    listing = commands.add_parser("check-list", help="list the checks that `check` runs")
    listing.add_argument("-o", "--output", choices=("text", "json"), default="text")
    listing.set_defaults(module="check", listing=True)


def _system(commands: Any) -> None:
    system = commands.add_parser("system", help="status, logs, restart, reprovision, log level")
    actions = system.add_subparsers(dest="system_command", metavar="SUBCOMMAND", required=True)
    for name, help_text in (
        ("status", "is aziotd running and does each socket answer"),
        ("restart", "restart aziotd"),
        ("stop", "stop aziotd"),
        ("reprovision", "ask the Identity Service to provision the device again"),
    ):
        actions.add_parser(name, help=help_text).set_defaults(module="system")
    logs = actions.add_parser("logs", help="show aziotd's log (journalctl arguments may follow --)")
    logs.add_argument(
        "journalctl_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="passed to journalctl instead of the default -e --no-pager",
    )
    logs.set_defaults(module="system")
    level = actions.add_parser("set-log-level", help="change aziotd's log level")
    level.add_argument("level", choices=LEVELS)
    level.set_defaults(module="system")
