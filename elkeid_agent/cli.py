"""Command line: `run`, `--version`, `ctl ...`, `doctor`."""

from __future__ import annotations

import argparse
import sys

from elkeid_agent.ctl import add_ctl_parser, run_ctl
from elkeid_agent.version import VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elkeid-agent", description="Elkeid host agent (Python edition)"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{run,ctl,doctor}")
    run = sub.add_parser("run", help="run the agent (the default)")
    run.add_argument("--config", help="TOML configuration file")
    add_ctl_parser(sub)
    doctor = sub.add_parser("doctor", help="check config, certificates, server, work dir")
    doctor.add_argument("--config", help="TOML configuration file (as for run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        sys.stdout.write(VERSION + "\n")
        return 0
    if args.command == "ctl":
        return run_ctl(args)
    if args.command == "doctor":
        from elkeid_agent.doctor import run_doctor

        return run_doctor(args.config, sys.stdout)
    from elkeid_agent.app import run_agent

    return run_agent(getattr(args, "config", None))
