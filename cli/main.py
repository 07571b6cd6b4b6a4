"""`aziotctl`: configure the device from one file, check it, and drive the daemon.

Each subcommand lives in its own module (`apply`, `mp`, `check`, `system`) with a `run(args,
layout) -> int`; this module only parses the command line. Unlike the original, which always
exits 0, a failure exits non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from aziot.supervisor.version import package_version

from .layout import Layout

DEFAULT_SUPER_CONFIG = "/etc/aziot/config.toml"


def _parser() -> argparse.ArgumentParser:
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
        help="treat DIR as / for every path read or written (staging an image, tests); "
        "systemd is then left alone",
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

    from . import check, system  # noqa: PLC0415 (they add their own options)

    check.add_arguments(commands)
    system.add_arguments(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    layout = Layout(args.root)
    handler = importlib.import_module(f"{__package__}.{args.module}")
    return handler.run(args, layout)


if __name__ == "__main__":
    sys.exit(main())
