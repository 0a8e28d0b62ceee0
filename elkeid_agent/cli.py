"""Command line: `run`, `--version`, `ctl ...`, `doctor`, and the self-upgrade's `selftest`
(the deep probe of a candidate) and `upgrade-guard` (run before each start of the service)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from elkeid_agent.version import VERSION

if TYPE_CHECKING:
    import argparse


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from elkeid_agent.ctl import add_ctl_parser

    parser = argparse.ArgumentParser(
        prog="elkeid-agent", description="Elkeid host agent (Python edition)"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(
        dest="command", metavar="{run,ctl,doctor,diagnostics,selftest,upgrade-guard}"
    )
    run = sub.add_parser("run", help="run the agent (the default)")
    run.add_argument("--config", help="TOML configuration file")
    add_ctl_parser(sub)
    doctor = sub.add_parser("doctor", help="check config, certificates, server, work dir")
    doctor.add_argument("--config", help="TOML configuration file (as for run)")
    diagnostics = sub.add_parser(
        "diagnostics", help="write one bounded tar.gz for a support case, secrets removed"
    )
    diagnostics.add_argument("--config", help="TOML configuration file (as for run)")
    diagnostics.add_argument("--output", help="the tar.gz to write (default: in this directory)")
    selftest = sub.add_parser(
        "selftest", help="load everything `run` needs, without side effects; print one JSON line"
    )
    selftest.add_argument("--config", help="TOML configuration file")
    guard = sub.add_parser(
        "upgrade-guard",
        help="before a start: count an unconfirmed upgrade's starts, roll back when out of them",
    )
    guard.add_argument("--config", help="TOML configuration file")
    return parser


def main(argv: list[str] | None = None) -> int:
    # The upgrade's first gate and every start-up measure run exactly this: answer before
    # the subcommands' modules load (ctl alone pulls msgspec, logging, subprocess, pathlib:
    # ~80 ms of imports, more in the frozen executable).
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        sys.stdout.write(VERSION + "\n")
        return 0
    args = build_parser().parse_args(argv)
    if args.version:
        sys.stdout.write(VERSION + "\n")
        return 0
    if args.command == "ctl":
        from elkeid_agent.ctl import run_ctl

        return run_ctl(args)
    # Imported only for their command: --version and ctl stay light.
    if args.command == "doctor":
        from elkeid_agent.doctor import run_doctor

        return run_doctor(args.config, sys.stdout)
    if args.command == "diagnostics":
        from elkeid_agent.diagnostics import run_diagnostics

        return run_diagnostics(args.config, args.output)
    if args.command == "selftest":
        from elkeid_agent.upgrade.selftest import run_selftest

        return run_selftest(args.config, os.environ)
    if args.command == "upgrade-guard":
        from elkeid_agent.upgrade.guard import run_guard

        return run_guard(args.config, os.environ)
    from elkeid_agent.app import run_agent

    return run_agent(getattr(args, "config", None))
