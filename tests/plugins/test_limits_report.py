"""`ctl status` and `doctor` say whether plugin limits apply, and why not (issue 20)."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec

from elkeid_agent.config import Config, PluginsConfig
from elkeid_agent.ctl import format_report, status_report
from elkeid_agent.doctor import Verdict, check_plugin_limits
from elkeid_agent.plugins import cgroups
from elkeid_agent.status import AgentStatus, write_status

LINE = "plugin limits not in effect: no write access; stop tracks each plugin's descendants"


def _status(work: Path, state: str = "running") -> AgentStatus:
    now = time.time()
    st = AgentStatus(
        pid=1234, version="1", state=state, net_mode="private", connected=False, server="",
        last_heartbeat=0.0, updated=now, plugin_limits=LINE,
    )
    write_status(work, st)
    return st


def test_ctl_status_prints_the_agents_line(tmp_path: Path) -> None:
    now = time.time()
    report = status_report(tmp_path, _status(tmp_path), True, {}, now)
    assert report["plugin_limits"] == LINE
    assert LINE + "\n" in format_report(report, now)


def test_doctor_reports_the_running_agent_else_what_this_process_could_do(tmp_path: Path) -> None:
    config = Config(work_dir=str(tmp_path))
    found = cgroups.probe()
    can = "can" if found.usable else "cannot"
    assert check_plugin_limits(config).detail == (
        f"plugin limits {can} apply: {found.line} (checked from this process)"
    )
    _status(tmp_path)
    check = check_plugin_limits(config)
    assert check.verdict is Verdict.WARN
    assert check.detail == f"{LINE} (agent pid 1234)"
    _status(tmp_path, state="stopped")
    assert "checked from this process" in check_plugin_limits(config).detail
    off = msgspec.structs.replace(config, plugins=PluginsConfig(cgroups=False))
    assert check_plugin_limits(off).detail == "off (plugins.cgroups = false)"
