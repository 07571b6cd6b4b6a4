"""`aziotctl check` and `aziotctl check-list` (being written)."""

from __future__ import annotations

import argparse
from typing import Any

from .layout import Layout


def add_arguments(commands: Any) -> None:
    check = commands.add_parser("check", help="check the device's configuration and connectivity")
    check.add_argument("-o", "--output", choices=("text", "json", "json-stream"), default="text")
    check.add_argument("--dont-run", default="", metavar="IDS", help="space-separated check ids")
    check.add_argument("--warnings-as-errors", action="store_true")
    check.add_argument("--ntp-server", default="pool.ntp.org:123")
    check.add_argument("-v", "--verbose", action="store_true")
    check.add_argument("--iothub-hostname", default=None)
    check.add_argument("--proxy-uri", default=None)
    check.add_argument("--expected-aziot-version", default=None)
    check.set_defaults(module="check")
    listing = commands.add_parser("check-list", help="list the checks `check` runs")
    listing.add_argument("-o", "--output", choices=("text", "json"), default="text")
    listing.set_defaults(module="check", listing=True)


def run(args: argparse.Namespace, layout: Layout) -> int:
    raise NotImplementedError
