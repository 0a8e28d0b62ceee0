"""`elkeid-agent ctl ...`: the Go package's `elkeidctl`, inside the agent's executable.

Service operations go through systemctl (the unit is what keeps the agent's limits,
restart policy and unpack directory); `status` adds what only the agent knows, from the
status file it writes at start, on each heartbeat and link change, and at stop, and believes
a running record only while its process is alive. Every external command runs with
`child_env()`: systemctl is the host's, not the bundle's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from elkeid_agent import specified_env
from elkeid_agent.childenv import child_env
from elkeid_agent.runtime_dir import UNPACK_PREFIXES, clean_stale_unpack_dirs
from elkeid_agent.status import STATUS_FILE, AgentStatus, read_status

SERVICE = "elkeid-agent.service"
DEFAULT_WORK_DIR = Path("/etc/elkeid")
# Directories `cleanup` empties; machine-id, specified_env and the certs stay.
CLEANUP_DIRS = ("plugin", "log", "tmp")
# A live agent whose record is older than this is not heartbeating (it writes one every
# 60 s heartbeat).
STALE_AFTER_S = 180.0
# How the agent's command line begins: the executable `elkeid-agent`, or `-m elkeid_agent`.
AGENT_MARK = "elkeid"

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
    status = sub.add_parser(
        "status", help="whether the agent runs, its connection, why it stopped"
    )
    status.add_argument("--config", help="read the work dir from this config, as run does")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser(
        "cleanup", help="remove plugins, logs and temporary files (service must be stopped)"
    )


def run_ctl(args: argparse.Namespace) -> int:
    """Run the parsed `ctl` subcommand; return the process exit code."""
    work_dir = _work_dir(args)
    cmd: str = args.ctl_command
    if cmd == "set":
        return _set(work_dir, idc=args.idc, region=args.region, agent_id=args.agent_id)
    if cmd == "status":
        return _status(work_dir, args.json)
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
    if not ts:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))
    return f"{stamp} ({now - ts:.0f} s ago)"


def is_agent_process(pid: int, started: float) -> bool:
    """Whether `pid` is alive and is the agent that wrote the record (not a reused pid).

    The process's start time, recorded by the agent, identifies it whatever launchers
    (staticx, PyInstaller) made its command line look like; a record without it falls back
    on the command line: `/etc/elkeid/elkeid-agent ...` or `python -m elkeid_agent ...`.
    """
    import psutil  # here: `--version` builds this module's parser and must stay lean

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started:
            return abs(proc.create_time() - started) < 1.0
        cmdline = proc.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; whose it is cannot be read without privileges
    return any(Path(part).name.startswith(AGENT_MARK) for part in cmdline[:3])


def status_report(
    work_dir: Path, st: AgentStatus | None, alive: bool, props: dict[str, str], now: float
) -> dict[str, Any]:
    """What `ctl status` says, as stable keys (the --json output; text prints the same)."""
    report: dict[str, Any] = {"work_dir": str(work_dir)}
    if props:
        report["service"] = (
            f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')}), "
            f"{props.get('UnitFileState') or 'unknown'}"
        )
        report["service_pid"] = int(props.get("MainPID") or 0)
    else:
        report["service"] = "unknown (systemd is not running)"
    if st is None:
        report.update(state="unknown", running=False,
                      detail=[f"no {STATUS_FILE} in {work_dir}: the agent never started here"])
        return report
    if st.state == "stopped":
        state = "stopped"
    elif not alive:
        # Killed (SIGKILL, OOM, power) before it could say so.
        state = "dead"
    else:
        state = st.state
    running = alive and state != "stopped"
    connected = running and st.connected
    stale = running and now - st.updated > STALE_AFTER_S
    report.update(
        state=state,
        running=running,
        stale=stale,
        pid=st.pid,
        version=st.version,
        connected=connected,
        server=st.server,
        net_mode=st.net_mode,
        connected_since=st.connected_since if connected else 0.0,
        last_heartbeat=st.last_heartbeat,
        updated=st.updated,
        upgrade_state=st.upgrade_state,
        detail=list(st.detail),
        exit_reason=st.exit_reason,
        spool={
            "state": st.spool_state,
            "records": st.spool_records,
            "bytes": st.spool_bytes,
            "oldest_seconds": st.spool_oldest_seconds,
            "dropped_records": st.spool_dropped_records,
        },
    )
    report["plugin_limits"] = st.plugin_limits
    if state == "dead":
        report["exit_reason"] = f"process {st.pid} is gone; its last record said {st.state}"
    elif stale:
        report["detail"] = [*st.detail, f"no status update for {now - st.updated:.0f} s: hung?"]
    return report


def format_report(report: dict[str, Any], now: float) -> str:
    lines = [f"service: {report['service']}"]
    if "service_pid" in report:
        lines.append(f"pid: {report['service_pid']}")
    if "pid" not in report:
        lines += [f"agent: no status yet ({d})" for d in report["detail"]]
        lines += report.get("upgrade_history", [])
        return "\n".join(lines) + "\n"
    state = report["state"] + (" (stale record)" if report["stale"] else "")
    lines += [
        f"agent pid: {report['pid']}",
        f"version: {report['version']}",
        f"state: {state}",
    ]
    if report["state"] in ("stopped", "dead"):
        lines.append(f"exit reason: {report['exit_reason'] or 'unknown'}")
    if report["connected"]:
        since = _fmt_time(report["connected_since"], now)
        lines.append(
            f"connection: connected {report['server']} ({report['net_mode']}) since {since}"
        )
    else:
        lines.append("connection: disconnected")
    lines += [f"detail: {d}" for d in report["detail"]]
    lines += [
        f"last heartbeat: {_fmt_time(report['last_heartbeat'], now)}",
        f"upgrade: {report['upgrade_state']}",
        *report.get("upgrade_history", []),
        "spool: {state}, {records} records, {bytes} bytes, oldest {oldest_seconds:.0f} s, "
        "{dropped_records} dropped".format(**report["spool"]),
        *([report["plugin_limits"]] if report.get("plugin_limits") else []),
        f"updated: {_fmt_time(report['updated'], now)}",
        f"work dir: {report['work_dir']}",
    ]
    return "\n".join(lines) + "\n"


def _status(work_dir: Path, as_json: bool) -> int:
    """Print the agent's state; exit 0 while the agent runs, 3 when it does not (LSB)."""
    st = read_status(work_dir)
    alive = st is not None and is_agent_process(st.pid, st.started)
    now = time.time()
    report = status_report(work_dir, st, alive, _service_props(SERVICE), now)
    # Here, not at the top: `--version` imports this module and must stay lean.
    from elkeid_agent.upgrade.report import upgrade_lines

    report["upgrade_history"] = upgrade_lines(work_dir, now)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report, now))
    return 0 if report["running"] else 3


def _work_dir(args: argparse.Namespace) -> Path:
    """`--config` names the work dir as `run` reads it; else `--work-dir`."""
    from elkeid_agent.config import ConfigError, load_run_config, work_dir_hint

    config_path: str | None = getattr(args, "config", None)
    if config_path is None:
        work_dir: Path = args.work_dir
        return work_dir
    try:
        config, _ = load_run_config(config_path, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"ctl: {exc}; reading work_dir from it leniently\n")
        return work_dir_hint(config_path)
    return config.work_path


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
