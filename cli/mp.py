"""`aziotctl config mp`: write a super-config that provisions manually with a connection string
(spec/provisioning.md §5.2). It does not apply it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import tomli_w

from aziot.config.super_config import ConnectionString

from .layout import Layout


def super_config_text(connection_string: str) -> str:
    """The super-config: manual provisioning with `connection_string`, everything else default."""
    return tomli_w.dumps(
        {"provisioning": {"source": "manual", "connection_string": connection_string}}
    )


def write_new(path: Path, content: bytes, force: bool) -> None:
    """Write `content` to `path` (0600, the caller's), refusing an existing file unless `force`.

    The file is written beside its final name and renamed, so a failure leaves the old one.
    """
    if not force and path.exists():
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        if force:
            os.replace(temp, path)
        else:
            # A file that appeared meanwhile is not overwritten: link fails if the name exists.
            os.link(temp, path)
            temp.unlink()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace, layout: Layout) -> int:
    path = Path(args.out_config_file) if args.out_config_file else layout.super_config
    try:
        ConnectionString.parse(args.connection_string)
    except ValueError as error:
        print(f"error: invalid connection string: {error}", file=sys.stderr)
        return 1
    try:
        write_new(path, super_config_text(args.connection_string).encode(), args.force)
    except FileExistsError:
        print(
            f"error: {path} already exists; the device has already been configured.\n\n"
            "To have that configuration take effect, run:\n\n"
            f"    sudo aziotctl config apply -c '{path}'\n\n"
            "To replace it with this connection string, run the command again with --force.",
            file=sys.stderr,
        )
        return 1
    except OSError as error:
        print(f"error: could not write {path}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"The configuration has been written to {path}")
    print("To apply it to the services, run:")
    print()
    print(f"    sudo aziotctl config apply -c '{path}'")
    return 0
