"""The `aziotd` console script: SIGHUP is ignored before anything is imported.

systemd knows aziotd's pid from its fork, and `aziotctl system set-log-level` (or
`systemctl reload`) may send SIGHUP at once; its default action would kill the daemon while
Python still imports trio, and systemd counts a death by SIGHUP as a clean exit, not restarted.
Once aziotd listens for signals, SIGHUP applies the log level and reloads the configs.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from .main import main as run  # noqa: PLC0415 (after the signal: the import takes time)

    return run()


if __name__ == "__main__":
    sys.exit(main())
