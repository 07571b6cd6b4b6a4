"""`python -m mockcloud <server> ...`: run a mock cloud server (`est`, or `cloud`: DPS and IoT
Hub sharing one device registry) from a shell, for the demo or for poking at the daemon by hand.
It prints where to reach it and which PEM files to trust, then serves until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from mockcloud import dps as dps_module
from mockcloud.cloud import Cloud
from mockcloud.est import DEFAULT_BASE_PATH, DEFAULT_NOT_AFTER, DEFAULT_NOT_BEFORE, MODES, EstServer
from mockcloud.https import Lifecycle

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
    _add_cloud_parser(servers)
    return parser


_CLOUD_MISBEHAVE_HELP = (
    "SERVICE:MODE[:key=value,...], repeatable. SERVICE is dps or hub. Modes: "
    + ", ".join(dps_module.MODES)
    + " (disabled and switch_hub: dps only). Keys: count (requests affected; default all), "
    "seconds (slow's delay, throttle's Retry-After), status (error, empty_error; default 500). "
    "Example: hub:throttle:count=1,seconds=5"
)
_CLOUD_OPTION_TYPES = {"count": int, "seconds": float, "status": int}


def _add_cloud_parser(servers: Any) -> None:
    cloud = servers.add_parser(
        "cloud",
        help="a DPS and an IoT Hub sharing one device registry",
        description="Run a Device Provisioning Service double and an IoT Hub double on HTTPS, "
        "sharing their devices: DPS assigns devices to the hub localhost:<hub port>. Prints "
        "the endpoints, the server CA, and every enrollment's keys or cert files, then serves "
        "until SIGINT/SIGTERM.",
    )
    cloud.set_defaults(run=_run_cloud)
    cloud.add_argument("--dir", type=Path, required=True, help="where the PEM files go")
    cloud.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    cloud.add_argument("--dps-port", type=int, default=0, help="DPS port (0: any free one)")
    cloud.add_argument("--hub-port", type=int, default=0, help="IoT Hub port (0: any free one)")
    cloud.add_argument(
        "--id-scope", default=dps_module.DEFAULT_ID_SCOPE, help="the DPS ID scope (%(default)s)"
    )
    cloud.add_argument(
        "--assigning-polls",
        type=int,
        default=0,
        help="polls answered 'assigning' before the result (%(default)s)",
    )
    cloud.add_argument(
        "--echo-payload",
        action="store_true",
        help="answer a registration payload as the original's mock-iot-server does",
    )
    cloud.add_argument(
        "--symmetric",
        action="append",
        default=[],
        metavar="REGID[=KEY]",
        help="individual symmetric-key enrollment (key: base64; generated if absent)",
    )
    cloud.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUPID[=KEY]",
        help="symmetric-key enrollment group (device keys are derived from KEY)",
    )
    cloud.add_argument(
        "--x509-group",
        action="append",
        default=[],
        metavar="GROUPID",
        help="X.509 enrollment group with a new CA written to DIR/<GROUPID>-ca.pem",
    )
    cloud.add_argument(
        "--x509-device",
        action="append",
        default=[],
        metavar="GROUPID:REGID",
        help="issue a device cert and key for REGID from an --x509-group's CA under DIR/identities",
    )
    cloud.add_argument(
        "--x509-cert",
        action="append",
        default=[],
        metavar="REGID=PEMFILE",
        help="individual X.509 enrollment for the (first) cert in PEMFILE",
    )
    cloud.add_argument(
        "--tpm",
        action="append",
        default=[],
        metavar="REGID=EK",
        help="individual TPM enrollment; EK is the base64 endorsement key the device sends",
    )
    cloud.add_argument(
        "--disabled",
        action="append",
        default=[],
        metavar="NAME",
        help="mark this enrollment (individual, else group) disabled",
    )
    cloud.add_argument(
        "--misbehave",
        action="append",
        default=[],
        type=_cloud_misbehaviour,
        metavar="SERVICE:MODE",
        help=_CLOUD_MISBEHAVE_HELP,
    )


def _cloud_misbehaviour(text: str) -> tuple[str, str, dict[str, Any]]:
    service, _, rest = text.partition(":")
    mode, _, options_text = rest.partition(":")
    if service not in ("dps", "hub"):
        raise argparse.ArgumentTypeError(f"bad service {service!r}; dps or hub")
    modes = dps_module.MODES if service == "dps" else dps_module.COMMON_MODES
    if mode not in modes:
        raise argparse.ArgumentTypeError(
            f"unknown {service} mode {mode!r}; one of {', '.join(modes)}"
        )
    return service, mode, _options(options_text, _CLOUD_OPTION_TYPES)


def _run_cloud(args: argparse.Namespace) -> int:
    import base64
    import binascii

    from cryptography import x509

    cloud = Cloud(
        args.dir,
        id_scope=args.id_scope,
        host=args.host,
        dps_port=args.dps_port,
        hub_port=args.hub_port,
        assigning_polls=args.assigning_polls,
        payload_reply=dps_module.echo_payload if args.echo_payload else None,
    )
    dps = cloud.dps
    lines: dict[str, str] = {}
    for spec in args.symmetric:
        name, _, key = spec.partition("=")
        e = dps.add_symmetric_enrollment(name, primary_key=key or None)
        lines[f"symmetric[{name}]"] = f"{e.primary_key} {e.secondary_key}"
    for spec in args.group:
        name, _, key = spec.partition("=")
        e = dps.add_symmetric_group(name, primary_key=key or None)
        lines[f"group[{name}]"] = f"{e.primary_key} {e.secondary_key}"
    authorities = {}
    for name in args.x509_group:
        _, authority = dps.add_x509_ca_group(name)
        authorities[name] = authority
        lines[f"x509_group_ca[{name}]"] = str(args.dir / f"{dps_module._stem(name)}-ca.pem")
    for spec in args.x509_device:
        group, sep, regid = spec.partition(":")
        if not sep or group not in authorities:
            raise ValueError(f"--x509-device {spec!r}: GROUPID must name an --x509-group")
        cert, key = dps.issue_device_cert(authorities[group], args.dir / "identities", regid)
        lines[f"x509_identity[{regid}]"] = f"{cert} {key}"
    for spec in args.x509_cert:
        regid, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--x509-cert {spec!r}: use REGID=PEMFILE")
        dps.add_x509_enrollment(regid, x509.load_pem_x509_certificates(Path(path).read_bytes())[0])
    for spec in args.tpm:
        regid, sep, ek = spec.partition("=")
        try:
            ek_bytes = base64.b64decode(ek, validate=True)
        except binascii.Error:
            raise ValueError(f"--tpm {spec!r}: EK must be base64") from None
        dps.add_tpm_enrollment(regid, ek_bytes)
    names = {(e.group, e.name) for e in dps.enrollments}
    for name in args.disabled:
        if (False, name) in names:
            dps.set_enabled(name, False)
        elif (True, name) in names:
            dps.set_enabled(name, False, group=True)
        else:
            raise ValueError(f"--disabled {name!r}: no such enrollment")

    def setup() -> dict[str, object]:
        for service, mode, options in args.misbehave:
            (cloud.dps if service == "dps" else cloud.hub).misbehave(mode, **options)
        header = {
            "dps_url": cloud.dps_url,
            "id_scope": cloud.id_scope,
            "hub_hostname": cloud.hub_hostname,
            "hub_url": cloud.hub.url,
            "server_ca": str(cloud.server_ca_pem_path),
        }
        return {**header, **lines}

    return _serve(cloud, setup, ready=True)


def _misbehaviour(text: str) -> tuple[str, dict[str, Any]]:
    mode, _, rest = text.partition(":")
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    return mode, _options(rest, _OPTION_TYPES)


def _options(text: str, types: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """`key=value,...` as keyword arguments, each value converted by its key's type."""
    options: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise argparse.ArgumentTypeError(
                f"bad option {item!r}; use key=value with key one of {', '.join(types)}"
            )
        try:
            options[key] = types[key](value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"bad value in {item!r}: {error}") from None
    return options


def _serve(server: Lifecycle, setup: Callable[[], Mapping[str, object]], *, ready: bool) -> int:
    """Run `server` until SIGINT or SIGTERM. Once it is up, `setup` applies the misbehaviours
    and returns what to print, one `key: value` line each (then `ready` if asked)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("got %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with server:
        for key, value in setup().items():
            print(f"{key}: {value}", flush=True)
        if ready:
            print("ready", flush=True)
        # A timed wait so the signal handler gets to run promptly on every platform.
        while not stop.wait(0.5):
            pass
    return 0


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

    def setup() -> dict[str, object]:
        for mode, options in args.misbehave:
            server.misbehave(mode, **options)
        lines: dict[str, object] = {
            "url": server.url,
            "server_ca": server.server_ca_pem_path,
            "root_ca": server.root_ca_pem_path,
            "issuing_ca": server.issuing_ca_pem_path,
            "issuing_chain": server.issuing_chain_pem_path,
            "bootstrap_ca": server.bootstrap_ca_pem_path,
        }
        for cn, (cert, key) in zip(args.bootstrap_identity, identities, strict=True):
            lines[f"bootstrap_identity[{cn}]"] = f"{cert} {key}"
        return lines

    return _serve(server, setup, ready=False)


if __name__ == "__main__":
    sys.exit(main())
