"""The installed distribution's version, for `aziotd --version` and `aziotctl --version`.

A module of its own so that the CLI can print it without importing the daemon.
"""

from __future__ import annotations

DISTRIBUTION = "aziot-py"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # 30 ms: only when asked

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
