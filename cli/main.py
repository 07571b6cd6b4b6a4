"""`aziotctl`: configure the device from one file, check it, and drive the daemon.

Each command lives in its own module (`apply`, `mp`, `check`, `system`) with a `run(args,
layout) -> int`; `arguments` declares the command line. Unlike the original, which always
exits 0, a failure exits non-zero.
"""

from __future__ import annotations

import importlib
import sys

from . import arguments
from .layout import Layout


def main(argv: list[str] | None = None) -> int:
    args = arguments.parser().parse_args(argv)
    layout = Layout(args.root)
    handler = importlib.import_module(f"{__package__}.{args.module}")
    return handler.run(args, layout)


if __name__ == "__main__":
    sys.exit(main())
