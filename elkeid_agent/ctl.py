"""`elkeid-agent ctl ...`: the Go package's `elkeidctl`, inside the agent's executable.

Service operations go through systemctl (the unit is what keeps the agent's limits,
restart policy and unpack directory); `status` adds what only the agent knows, from the
status file it rewrites on every heartbeat. Every external command runs with
`child_env()`: systemctl is the host's, not the bundle's.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from elkeid_agent import specified_env
from elkeid_agent.childenv import child_env
from elkeid_agent.runtime_dir import UNPACK_PREFIXES, clean_stale_unpack_dirs
from elkeid_agent.status import read_status

SERVICE = "elkeid-agent.service"
DEFAULT_WORK_DIR = Path("/etc/elkeid")
# Directories `cleanup` empties; machine-id, specified_env and the certs stay.
CLEANUP_DIRS = ("plugin", "log", "tmp")
# A status record older than this means the agent is not heartbeating (it writes one
# every 60 s heartbeat).
STALE_AFTER_S = 180.0

_SIMPLE = {
    "start": "start the service",
    "stop": "stop the service (plugins stop with it)",
    "restart": "restart the service",
    "enable": "start the service at boot",
    "disable": "do not start the service at boot",
}


def add_ctl_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ctl` and its subcommands to the top-level parser's subparsers."""
    ctl = subparsers.add_parser("ctl", help="control the installed agent service")
    ctl.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help=f"the agent's working directory (default {DEFAULT_WORK_DIR})",
    )
    sub = ctl.add_subparsers(dest="ctl_command", metavar="{set,status,cleanup,...}")
    sub.required = True
    set_p = sub.add_parser(
        "set", help="set the IDC, region or agent id (takes effect at the next start)"
    )
    set_p.add_argument("--idc", help="specified_idc (empty string removes it)")
    set_p.add_argument("--region", help="specified_region (empty string removes it)")
    set_p.add_argument("--id", dest="agent_id", help="agent id (empty string removes it)")
    for name, text in _SIMPLE.items():
        sub.add_parser(name, help=text)
    sub.add_parser("status", help="service state, pid, version, connection, last heartbeat")
    sub.add_parser(
        "cleanup", help="remove plugins, logs and temporary files (service must be stopped)"
    )


def run_ctl(args: argparse.Namespace) -> int:
    """Run the parsed `ctl` subcommand; return the process exit code."""
    work_dir: Path = args.work_dir
    cmd: str = args.ctl_command
    if cmd == "set":
        return _set(work_dir, idc=args.idc, region=args.region, agent_id=args.agent_id)
    if cmd == "status":
        return _status(work_dir)
    if cmd == "cleanup":
        return _cleanup(work_dir)
    return _systemctl(cmd, SERVICE)


# --- set -------------------------------------------------------------------------


def _set(work_dir: Path, *, idc: str | None, region: str | None, agent_id: str | None) -> int:
    values: dict[str, str] = {}
    if idc is not None:
        values["specified_idc"] = idc
    if region is not None:
        values["specified_region"] = region
    if agent_id is not None:
        # The agent reads SPECIFIED_AGENT_ID; Elkeid's Go tools write specified_id.
        values["SPECIFIED_AGENT_ID"] = agent_id
        values["specified_id"] = agent_id
    if not values:
        sys.stderr.write("ctl set: give at least one of --idc, --region, --id\n")
        return 2
    try:
        path = specified_env.write(work_dir, values)
    except ValueError as exc:
        sys.stderr.write(f"ctl set: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {path}; run `elkeid-agent ctl restart` to apply\n")
    return 0


# --- systemd ---------------------------------------------------------------------


def _systemd_running() -> bool:
    # sd_booted(): systemd is PID 1 of this root only if this directory exists.
    return Path("/run/systemd/system").is_dir()


def _systemctl(verb: str, unit: str) -> int:
    if not _systemd_running():
        sys.stderr.write(f"ctl {verb}: systemd is not running here\n")
        return 1
    return subprocess.run(["systemctl", verb, unit], env=child_env(), check=False).returncode


def _service_props(unit: str) -> dict[str, str]:
    """ActiveState, SubState, MainPID, UnitFileState of the unit, empty without systemd."""
    if not _systemd_running() or shutil.which("systemctl") is None:
        return {}
    out = subprocess.run(
        [
            "systemctl",
            "show",
            unit,
            "--property=ActiveState,SubState,MainPID,UnitFileState",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    props: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        props[key] = value
    return props


def _fmt_time(ts: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))
    return f"{stamp} ({now - ts:.0f} s ago)"


def _status(work_dir: Path) -> int:
    """Print the service and agent state; exit 0 when the service runs, 3 when not."""
    props = _service_props(SERVICE)
    running = props.get("ActiveState") == "active"
    if props:
        state = f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})"
        print(f"service: {state}, {props.get('UnitFileState') or 'unknown'}")
        print(f"pid: {props.get('MainPID', '0')}")
    else:
        print("service: unknown (systemd is not running)")
    st = read_status(work_dir)
    if st is None:
        print("agent: no status yet")
        return 0 if running else 3
    now = time.time()
    stale = now - st.updated > STALE_AFTER_S
    print(f"agent pid: {st.pid}")
    print(f"version: {st.version}")
    print(f"state: {st.state}{' (stale record)' if stale else ''}")
    conn = "connected" if st.connected else "disconnected"
    print(f"connection: {conn} {st.server or '-'} ({st.net_mode or '-'})")
    beat = _fmt_time(st.last_heartbeat, now) if st.last_heartbeat else "never"
    print(f"last heartbeat: {beat}")
    print(f"upgrade: {st.upgrade_state}")
    print(
        f"spool: {st.spool_state}, {st.spool_records} records, {st.spool_bytes} bytes, "
        f"oldest {st.spool_oldest_seconds:.0f} s, {st.spool_dropped_records} dropped"
    )
    print(f"updated: {_fmt_time(st.updated, now)}")
    return 0 if running else 3


# --- cleanup ---------------------------------------------------------------------


def _cleanup(work_dir: Path) -> int:
    if _service_props(SERVICE).get("ActiveState") in ("active", "activating", "reloading"):
        sys.stderr.write("ctl cleanup: the service is running; `ctl stop` it first\n")
        return 1
    failed = False
    for name in CLEANUP_DIRS:
        base = work_dir / name
        if not base.is_dir():
            continue
        for entry in base.iterdir():
            # This very process may run from an unpack dir under tmp/: those go only
            # when no process uses them.
            if name == "tmp" and entry.name.startswith(UNPACK_PREFIXES):
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as exc:
                sys.stderr.write(f"ctl cleanup: {entry}: {exc}\n")
                failed = True
        if name == "tmp":
            clean_stale_unpack_dirs(base)
    print(f"cleaned {', '.join(CLEANUP_DIRS)} under {work_dir}")
    return 1 if failed else 0
