"""`aziotctl check` and `aziotctl check-list`: the original's checks, ids and output formats.

`check` runs every check of `checks.registry` in order and reports each as text (the
original's √ / ‼ / × lines), one JSON document, or a stream of JSON lines. Unlike the original,
which always exits 0, it exits 1 when a check failed or was fatal (or, with
--warnings-as-errors, warned).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, TextIO

import attrs

from .checks.context import Context, Options
from .checks.host_info import additional_info
from .checks.outcome import IGNORED, SKIPPED, CheckFailed, Outcome, Skip, failed
from .checks.registry import Check, by_section
from .layout import Layout

log = logging.getLogger(__name__)

# JSON names of the results; a failed check is an "error" there, as in the original.
JSON_RESULT = {
    "ok": "ok",
    "warning": "warning",
    "ignored": "ignored",
    "skipped": "skipped",
    "failed": "error",
    "fatal": "fatal",
}


def run(args: argparse.Namespace, layout: Layout) -> int:
    if getattr(args, "listing", False):
        print_list(args.output, sys.stdout)
        return 0
    options = Options(
        ntp_server=args.ntp_server,
        verbose=args.verbose,
        iothub_hostname=args.iothub_hostname,
        proxy_uri=args.proxy_uri,
        expected_aziot_version=args.expected_aziot_version,
    )
    dont_run = {check_id for value in args.dont_run for check_id in value.split()}
    report = Report(args.output, args.verbose, args.warnings_as_errors, sys.stdout)
    ctx = Context(layout, options)
    try:
        run_checks(ctx, dont_run, report)
        report.finish(additional_info(ctx.identityd))
    except BrokenPipeError:
        # The reader (`| head`) left; nothing more can be said, and the interpreter must not
        # fail again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return report.exit_code()


def run_one(check: Check, ctx: Context, info: dict[str, Any]) -> Outcome:
    try:
        return check.run(ctx, info)
    except Skip:
        return SKIPPED
    except CheckFailed as error:
        return error.outcome()
    except Exception as error:  # one broken check must not hide the others' results
        log.debug("check %s raised", check.id, exc_info=True)
        return failed(f"internal error in check {check.id}: {error!r}")


def run_checks(ctx: Context, dont_run: set[str], report: Report) -> None:
    for section, checks in by_section():
        report.section(section)
        for check in checks:
            info: dict[str, Any] = {}
            outcome = IGNORED if check.id in dont_run else run_one(check, ctx, info)
            report.check(check, outcome, info)
            if outcome.kind == "fatal":
                return
        report.end_section()


def _colours(stream: TextIO) -> dict[str, str]:
    if stream.isatty() and "NO_COLOR" not in os.environ:
        return {"green": "\x1b[32m", "yellow": "\x1b[33m", "red": "\x1b[31m", "end": "\x1b[0m"}
    return {"green": "", "yellow": "", "red": "", "end": ""}


@attrs.define
class Report:
    output: str
    verbose: bool
    warnings_as_errors: bool
    stream: TextIO
    counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(JSON_RESULT, 0))
    checks: dict[str, Any] = attrs.field(factory=dict)

    def _text(self, line: str = "", colour: str = "") -> None:
        if self.output == "text":
            c = _colours(self.stream)
            self.stream.write(f"{c[colour]}{line}{c['end']}\n" if colour else f"{line}\n")

    def _json_line(self, value: dict[str, Any]) -> None:
        # One object per line (the original writes them back to back), so each line parses.
        self.stream.write(json.dumps(value) + "\n")
        self.stream.flush()

    def section(self, name: str) -> None:
        self._text(name)
        self._text("-" * len(name))
        if self.output == "json-stream":
            self._json_line({"kind": "section", "name": name})

    def end_section(self) -> None:
        self._text()

    def _lines(self, outcome: Outcome, colour: str) -> None:
        for line in outcome.message.splitlines():
            self._text(f"    {line}", colour)
        if self.verbose:
            for cause in outcome.causes:
                for i, line in enumerate(cause.splitlines()):
                    prefix = "        caused by: " if i == 0 else " " * 19
                    self._text(f"{prefix}{line}", colour)

    def check(self, check: Check, outcome: Outcome, info: dict[str, Any]) -> None:
        kind = outcome.kind
        if kind == "warning" and self.warnings_as_errors:
            kind = "failed"
        self.counts[kind] += 1
        name = check.description
        if kind == "ok":
            self._text(f"\u221a {name} - OK", "green")
        elif kind == "warning":
            self._text(f"\u203c {name} - Warning", "yellow")
            self._lines(outcome, "yellow")
        elif kind == "skipped" and self.verbose:
            self._text(f"\u203c {name} - Warning", "yellow")
            self._text("    skipping because of previous failures", "yellow")
        elif kind in ("failed", "fatal"):
            self._text(f"\u00d7 {name} - Error", "red")
            self._lines(outcome, "red")
        result: dict[str, Any] = {"result": JSON_RESULT[kind]}
        if kind in ("warning", "failed", "fatal"):
            result["details"] = outcome.details
        serialized = {"result": result, "additional_info": info}
        if self.output == "json":
            self.checks[check.id] = serialized
        elif self.output == "json-stream":
            self._json_line(
                {"kind": "check", "id": check.id, "description": check.description, **serialized}
            )

    def finish(self, top_info: dict[str, Any]) -> None:
        counts = self.counts
        hint = "" if self.verbose else " Re-run with --verbose for more details."
        self._text(f"{counts['ok']} check(s) succeeded.", "green")
        if counts["warning"]:
            self._text(f"{counts['warning']} check(s) raised warnings.{hint}", "yellow")
        errors = counts["failed"] + counts["fatal"]
        if errors:
            self._text(f"{errors} check(s) raised errors.{hint}", "red")
        if counts["skipped"]:
            self._text(
                f"{counts['skipped']} check(s) were skipped due to errors from other checks.{hint}",
                "yellow",
            )
        if self.output == "json-stream":
            self._json_line({"kind": "additional_info", **top_info})
        elif self.output == "json":
            document = {"additional_info": top_info, "checks": dict(sorted(self.checks.items()))}
            self.stream.write(json.dumps(document) + "\n")
        self.stream.flush()

    def exit_code(self) -> int:
        return 1 if self.counts["failed"] or self.counts["fatal"] else 0


def print_list(output: str, stream: TextIO) -> None:
    sections = by_section()
    if output == "json":
        listing = {
            name: [{"id": c.id, "description": c.description} for c in checks]
            for name, checks in sorted(sections)
        }
        stream.write(json.dumps(listing) + "\n")
        return
    section_width = max(len(name) for name, _ in sections) + 1
    id_width = max(len(c.id) for _, checks in sections for c in checks) + 1
    stream.write(f"{'CATEGORY':<{section_width}}{'ID':<{id_width}}DESCRIPTION\n\n")
    for name, checks in sections:
        for c in checks:
            stream.write(f"{name:<{section_width}}{c.id:<{id_width}}{c.description}\n")
        stream.write("\n")
