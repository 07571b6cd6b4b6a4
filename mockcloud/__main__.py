"""`python -m mockcloud <server> ...`: run a mock cloud server from a shell, for the demo or for
poking at the daemon by hand. It prints where to reach it and which PEM files to trust, then
serves until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from mockcloud.est import DEFAULT_BASE_PATH, DEFAULT_NOT_AFTER, DEFAULT_NOT_BEFORE, MODES, EstServer

log = logging.getLogger("mockcloud")

_MISBEHAVE_HELP = (
    "MODE[:key=value,...], repeatable. Modes: "
    + ", ".join(MODES)
    + ". Keys: count (requests affected; default all), seconds (retry_after's Retry-After, "
    "slow's delay), content_type (wrong_content_type), target (broken_chain: cacerts|enroll). "
    "Example: retry_after:count=2,seconds=5"
)
_OPTION_TYPES = {"count": int, "seconds": float, "content_type": str, "target": str}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.run(args))
    except ValueError as error:
        parser.error(str(error))
    return 2  # not reached: parser.error exits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mockcloud",
        description="Local mock cloud servers for testing the identity daemons.",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    servers = parser.add_subparsers(title="servers", metavar="SERVER", required=True)

    est = servers.add_parser(
        "est",
        help="an RFC 7030 EST server",
        description="Run an RFC 7030 EST server on HTTPS with its own CAs (reused from --dir "
        "if present). Prints the URL and the CA files, then serves until SIGINT/SIGTERM.",
    )
    est.set_defaults(run=_run_est)
    est.add_argument("--dir", type=Path, required=True, help="where the CA PEM files go")
    est.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    est.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    est.add_argument("--username", help="HTTP basic auth username")
    est.add_argument("--password", help="HTTP basic auth password")
    est.add_argument(
        "--auth",
        help="comma-separated methods any one of which lets a client enroll: basic, cert "
        "(a TLS client cert from the bootstrap or issuing CA), or none. Default: basic,cert "
        "with --username, else cert",
    )
    est.add_argument(
        "--require-all", action="store_true", help="every --auth method must succeed, not one"
    )
    est.add_argument("--cacerts-auth", action="store_true", help="require auth for /cacerts too")
    est.add_argument(
        "--base-path", default=DEFAULT_BASE_PATH, help=f"URL path prefix ({DEFAULT_BASE_PATH})"
    )
    est.add_argument(
        "--no-intermediate",
        action="store_true",
        help="issue from a root CA instead of an intermediate under it",
    )
    est.add_argument(
        "--not-before",
        type=float,
        default=DEFAULT_NOT_BEFORE,
        help=f"issued certs' notBefore, seconds from issue ({DEFAULT_NOT_BEFORE})",
    )
    est.add_argument(
        "--not-after",
        type=float,
        default=DEFAULT_NOT_AFTER,
        help=f"issued certs' notAfter, seconds from issue ({DEFAULT_NOT_AFTER})",
    )
    est.add_argument(
        "--bootstrap-identity",
        action="append",
        default=[],
        metavar="CN",
        help="also write a bootstrap client cert and key for CN under DIR/identities (repeatable)",
    )
    est.add_argument(
        "--misbehave",
        action="append",
        default=[],
        type=_misbehaviour,
        metavar="MODE",
        help=_MISBEHAVE_HELP,
    )
    return parser


def _misbehaviour(text: str) -> tuple[str, dict[str, Any]]:
    mode, _, rest = text.partition(":")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _OPTION_TYPES:
            raise argparse.ArgumentTypeError(
                f"bad option {item!r}; use key=value with key one of {', '.join(_OPTION_TYPES)}"
            )
        try:
            options[key] = _OPTION_TYPES[key](value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"bad value in {item!r}: {error}") from None
    return mode, options


def _run_est(args: argparse.Namespace) -> int:
    auth = None
    if args.auth is not None:
        auth = [m.strip() for m in args.auth.split(",") if m.strip() not in ("", "none")]
    server = EstServer(
        args.dir,
        username=args.username,
        password=args.password,
        auth=auth,
        require_all=args.require_all,
        cacerts_auth=args.cacerts_auth,
        host=args.host,
        port=args.port,
        base_path=args.base_path,
        intermediate=not args.no_intermediate,
        not_before=args.not_before,
        not_after=args.not_after,
    )
    identities = [
        server.make_bootstrap_identity(args.dir / "identities", cn)
        for cn in args.bootstrap_identity
    ]
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("got %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with server:
        for mode, options in args.misbehave:
            server.misbehave(mode, **options)
        lines = {
            "url": server.url,
            "server_ca": server.server_ca_pem_path,
            "root_ca": server.root_ca_pem_path,
            "issuing_ca": server.issuing_ca_pem_path,
            "issuing_chain": server.issuing_chain_pem_path,
            "bootstrap_ca": server.bootstrap_ca_pem_path,
        }
        for cn, (cert, key) in zip(args.bootstrap_identity, identities, strict=True):
            lines[f"bootstrap_identity[{cn}]"] = f"{cert} {key}"
        for key, value in lines.items():
            print(f"{key}: {value}", flush=True)
        # A timed wait so the signal handler gets to run promptly on every platform.
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
