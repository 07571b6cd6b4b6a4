"""`aziotctl`: the command-line tool. It starts small: the version."""

from __future__ import annotations

import argparse
import sys

from aziot.supervisor.version import package_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aziotctl", description="Manage the IoT device identity services on this device."
    )
    parser.add_argument("--version", action="version", version=f"aziotctl {package_version()}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
