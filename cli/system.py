"""`aziotctl system …` (being written)."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from .layout import Layout


def add_arguments(commands: Any) -> None:
    system = commands.add_parser("system", help="status, logs, restart, reprovision, log level")
    actions = system.add_subparsers(dest="system_command", metavar="SUBCOMMAND")
    for name, help_text in (
        ("status", "is aziotd running and does each socket answer"),
        ("restart", "restart aziotd"),
        ("stop", "stop aziotd"),
        ("logs", "show aziotd's log (journalctl arguments may follow --)"),
        ("reprovision", "ask the Identity Service to provision the device again"),
    ):
        actions.add_parser(name, help=help_text).set_defaults(module="system")
    level = actions.add_parser("set-log-level", help="change aziotd's log level")
    level.add_argument("level", choices=("error", "warn", "info", "debug", "trace"))
    level.set_defaults(module="system")


def restart_services(layout: Layout, out: TextIO) -> int:
    """After `config apply`: restart aziotd under systemd, else say what to restart."""
    raise NotImplementedError


def run(args: argparse.Namespace, layout: Layout) -> int:
    raise NotImplementedError
