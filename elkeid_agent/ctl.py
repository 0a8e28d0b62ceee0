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
from elkeid_agent.fsutil import remove_tree
from elkeid_agent.procscan import AgentProc, agents_of, describe_pid, running_agents
from elkeid_agent.runtime_dir import UNPACK_PREFIXES, clean_stale_unpack_dirs
from elkeid_agent.status import STATUS_FILE, AgentStatus, read_status

SERVICE = "elkeid-agent.service"
DEFAULT_WORK_DIR = Path("/etc/elkeid")
# Directories `cleanup` empties; machine-id, specified_env and the certs stay.
CLEANUP_DIRS = ("plugin", "log", "tmp")
# A live agent whose record is older than this is not heartbeating (it writes one every
# 60 s heartbeat).
STALE_AFTER_S = 180.0
# An agent writes its status file within its first second; longer without one is a fault.
STARTING_GRACE_S = 30.0
# Exit codes of `ctl status`, for monitoring (README, Operations): ok, degraded, down (LSB's
# "not running"); a --config that cannot be read is a usage error.
EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_USAGE = 2
EXIT_DOWN = 3
# How the agent's command line begins: the executable `elkeid-agent`, or `-m elkeid_agent`.
AGENT_MARK = "elkeid"

_SIMPLE = {
    "start": "start the service",
    "stop": "stop the service (plugins stop with it)",
    "restart": "restart the service",
    "enable": "start the service at boot",
    "disable": "do not start the service at boot",
}


def _add_location(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """`--config` (and `--work-dir`) before or after the subcommand, as for `run`."""
    # After the subcommand, SUPPRESS keeps an absent option from hiding the one given before.
    parser.add_argument(
        "--config",
        default=None if top else argparse.SUPPRESS,
        help="read the work dir from this config, as run does",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR if top else argparse.SUPPRESS,
        help=f"the agent's working directory (default {DEFAULT_WORK_DIR})",
    )


def add_ctl_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ctl` and its subcommands to the top-level parser's subparsers."""
    ctl = subparsers.add_parser("ctl", help="control the installed agent service")
    _add_location(ctl, top=True)
    sub = ctl.add_subparsers(dest="ctl_command", metavar="{set,status,cleanup,...}")
    sub.required = True
    set_p = sub.add_parser(
        "set", help="set the IDC, region or agent id (takes effect at the next start)"
    )
    set_p.add_argument("--idc", help="specified_idc (empty string removes it)")
    set_p.add_argument("--region", help="specified_region (empty string removes it)")
    set_p.add_argument("--id", dest="agent_id", help="agent id (empty string removes it)")
    _add_location(set_p, top=False)
    for name, text in _SIMPLE.items():
        sub.add_parser(name, help=text)
    status = sub.add_parser(
        "status", help="whether the agent runs, its connection, why it stopped"
    )
    _add_location(status, top=False)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    cleanup = sub.add_parser(
        "cleanup", help="remove plugins, logs and temporary files (the agent must be stopped)"
    )
    _add_location(cleanup, top=False)
    hold = sub.add_parser(
        "hold", help="keep the running agent version whatever the server pushes (no restart)"
    )
    _add_location(hold, top=False)
    hold.add_argument("--reason", default="", help="why, for whoever reads ctl status")
    release = sub.add_parser("release", help="lift `ctl hold`: upgrades pushed are applied")
    _add_location(release, top=False)


def run_ctl(args: argparse.Namespace) -> int:
    """Run the parsed `ctl` subcommand; return the process exit code."""
    cmd: str = args.ctl_command
    if cmd in _SIMPLE:
        return _systemctl(cmd, SERVICE)
    work_dir = _work_dir(args)
    if work_dir is None:
        return EXIT_USAGE
    if cmd == "set":
        return _set(work_dir, idc=args.idc, region=args.region, agent_id=args.agent_id)
    if cmd == "status":
        return _status(work_dir, args.json)
    if cmd == "cleanup":
        return _cleanup(work_dir)
    if cmd in ("hold", "release"):
        return _hold(work_dir, cmd == "hold", getattr(args, "reason", ""))
    raise AssertionError(cmd)


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
        now_is = describe_pid(st.pid)
        report["exit_reason"] = (
            f"process {st.pid} is gone; its last record said {st.state}"
            if now_is == "no process"
            else f"the agent's process {st.pid} is gone (its last record said {st.state}); "
            f"pid {st.pid} is now another program: {now_is}"
        )
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


def exit_code(report: dict[str, Any]) -> int:
    """ok: running, connected, nothing wrong; degraded: running but abnormal, disconnected,
    starting or silent; down: not running."""
    if not report["running"]:
        return EXIT_DOWN
    healthy = report["state"] == "running" and report["connected"] and not report["stale"]
    return EXIT_OK if healthy else EXIT_DEGRADED


def _owner(work_dir: Path) -> int | None:
    try:
        return work_dir.stat().st_uid
    except OSError:
        return None


def _unrecorded_agent(work_dir: Path) -> AgentProc | None:
    """A running agent of `work_dir` that its status file does not describe.

    Only a process of the work dir's owner counts: any user may start a process whose
    command line looks like the agent's.
    """
    owner = _owner(work_dir)
    found = [
        a for a in agents_of(work_dir, running_agents())
        if a.work_dir is not None and (owner is None or a.uid == owner)
    ]
    return found[0] if found else None


def _status_file_problem(work_dir: Path, st: AgentStatus | None, started: float) -> str | None:
    """Why the status file does not describe the running agent; None when nothing is known
    to stop it from doing so (the agent has not written it yet)."""
    path = work_dir / STATUS_FILE
    try:
        if os.statvfs(work_dir).f_flag & os.ST_RDONLY:
            return f"{work_dir} is on a read-only filesystem: the agent cannot write {path}"
    except OSError:
        return None  # the agent makes its work dir as it starts
    if st is None or st.updated < started:
        return None  # none yet, or a previous run's
    return f"{path} was written by process {st.pid}, not by this one"


def _address(ip: str, port: int) -> str:
    """`ip:port` as the config writes it (an IPv4 peer of a dual-stack socket is IPv4)."""
    import ipaddress

    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def process_report(
    work_dir: Path,
    agent: AgentProc,
    st: AgentStatus | None,
    props: dict[str, str],
    now: float,
) -> dict[str, Any]:
    """What the kernel tells of an agent whose status file says nothing true about it."""
    import psutil

    report = status_report(work_dir, None, False, props, now)
    problem = _status_file_problem(work_dir, st, agent.started)
    age = now - agent.started
    starting = problem is None and age < STARTING_GRACE_S
    if problem is None:
        problem = (f"none yet, {age:.0f} s after the process started" if starting
                   else f"{work_dir / STATUS_FILE} is missing or unreadable")
    try:
        links = [
            c for c in psutil.Process(agent.pid).net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr
        ]
    except psutil.Error:
        links = []
    # The gRPC stream is the agent's one lasting TCP connection.
    server = _address(links[0].raddr.ip, links[0].raddr.port) if links else ""
    report.update(
        state="starting" if starting else "abnormal",
        running=True,
        stale=False,
        pid=agent.pid,
        version="unknown",
        connected=bool(links),
        server=server,
        net_mode="unknown",
        connected_since=0.0,
        last_heartbeat=0.0,
        updated=0.0,
        upgrade_state="unknown",
        detail=[f"status file: {problem}; this report comes from process {agent.pid} itself"],
        exit_reason="",
        spool={"state": "unknown", "records": 0, "bytes": 0, "oldest_seconds": 0.0,
               "dropped_records": 0},
    )
    return report


def _status(work_dir: Path, as_json: bool) -> int:
    """Print the agent's state; exit as `exit_code` says."""
    st = read_status(work_dir)
    alive = st is not None and is_agent_process(st.pid, st.started)
    now = time.time()
    props = _service_props(SERVICE)
    agent = None if alive else _unrecorded_agent(work_dir)
    if agent is not None:
        report = process_report(work_dir, agent, st, props, now)
    else:
        report = status_report(work_dir, st, alive, props, now)
    # Here, not at the top: `--version` imports this module and must stay lean.
    from elkeid_agent.upgrade.report import upgrade_lines

    report["upgrade_history"] = upgrade_lines(work_dir, now)
    report.update(hold_and_warnings(work_dir, st if report.get("running") else None))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(format_report(report, now) + format_hold_and_warnings(report))
    return exit_code(report)


def _work_dir(args: argparse.Namespace) -> Path | None:
    """`--config` names the work dir as `run` reads it; else `--work-dir`.

    None (after saying why) when the config given cannot be read at all: a mistyped path
    must not turn into a report on the default work dir.
    """
    from elkeid_agent.config import ConfigError, load_run_config, work_dir_hint

    config_path: str | None = getattr(args, "config", None)
    if config_path is None:
        work_dir: Path = args.work_dir
        return work_dir
    if not os.path.isfile(config_path) or not os.access(config_path, os.R_OK):
        why = "no such file" if not os.path.exists(config_path) else "not a readable file"
        sys.stderr.write(f"ctl: --config {config_path}: {why}\n")
        return None
    try:
        config, _ = load_run_config(config_path, os.environ)
    except ConfigError as exc:
        hint = work_dir_hint(config_path)
        sys.stderr.write(f"ctl: the agent refuses this config ({exc}); using its work_dir {hint}\n")
        return hint
    return config.work_path


# --- cleanup ---------------------------------------------------------------------


def _cleanup(work_dir: Path) -> int:
    if _service_props(SERVICE).get("ActiveState") in ("active", "activating", "reloading"):
        sys.stderr.write("ctl cleanup: the service is running; `ctl stop` it first\n")
        return 1
    # Run by hand or by another supervisor, an agent is just as much in use of its files.
    running = agents_of(work_dir, running_agents())
    if running:
        pids = ", ".join(str(a.pid) for a in running)
        sys.stderr.write(f"ctl cleanup: an agent process uses {work_dir} or may "
                         f"(pid {pids}); stop it first\n")
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
                    remove_tree(entry)
                else:
                    entry.unlink()
            except OSError as exc:
                sys.stderr.write(f"ctl cleanup: {entry}: {exc}\n")
                failed = True
        if name == "tmp":
            clean_stale_unpack_dirs(base)
    print(f"cleaned {', '.join(CLEANUP_DIRS)} under {work_dir}")
    return 1 if failed else 0


# --- upgrade hold, warnings ----------------------------------------------------------


def _hold(work_dir: Path, hold: bool, reason: str) -> int:
    from elkeid_agent.upgrade.hold import clear_hold, set_hold

    try:
        if hold:
            path = set_hold(work_dir, reason)
            sys.stdout.write(f"upgrades held ({path}); the running agent keeps its version\n")
        elif clear_hold(work_dir):
            sys.stdout.write("upgrade hold released: the running agent applies the next push\n")
        else:
            sys.stdout.write(f"no `ctl hold` in {work_dir} (upgrade.hold in a config stays)\n")
    except OSError as exc:
        sys.stderr.write(f"ctl {'hold' if hold else 'release'}: {exc}\n")
        return 1
    return 0


def hold_and_warnings(work_dir: Path, live: AgentStatus | None) -> dict[str, Any]:
    """The upgrade hold (what the live agent says, else the `ctl hold` file alone) and the
    live agent's warnings (a certificate close to its end)."""
    from elkeid_agent.upgrade.hold import hold_source, read_hold

    record = read_hold(work_dir)
    # The config's hold as the live agent reports it; the `ctl` one from the file itself, so
    # a hold or release just made shows before the agent's next heartbeat.
    configured = live is not None and live.upgrade_hold == "config"
    source = hold_source(work_dir, configured)
    return {
        "upgrade_hold": source,
        "upgrade_hold_reason": record.reason if record is not None else "",
        "upgrade_held_version": live.upgrade_held_version if live is not None else "",
        "warnings": list(live.warnings) if live is not None else [],
    }


def format_hold_and_warnings(report: dict[str, Any]) -> str:
    lines = []
    source = report.get("upgrade_hold")
    if source:
        how = "upgrade.hold in the config" if source == "config" else "`ctl hold`"
        held = report.get("upgrade_held_version")
        lines.append(f"upgrade hold: by {how}" + (f", {held} pushed and held" if held else "")
                     + (f" ({report['upgrade_hold_reason']})"
                        if report.get("upgrade_hold_reason") else ""))
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "".join(line + "\n" for line in lines)
