"""`elkeid-agent ctl status` tells the truth about a real agent process: starting and why it
cannot connect, connected, stopped with its exit reason right after SIGTERM, dead after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from agentproc import REPO, AgentProcess, wait_until
from conftest import AgentConfig

from elkeid_agent.ctl import format_report, is_agent_process, status_report
from elkeid_agent.status import AgentStatus
from elkeid_center.testing import CenterThread


def ctl_status(config: Path, *extra: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "elkeid_agent", "ctl", "status", "--config", str(config), *extra],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    code, out = ctl_status(config, "--json")
    report: dict[str, Any] = json.loads(out)
    return code, report


def test_status_through_a_life(center: CenterThread, agent_config: AgentConfig) -> None:
    config = agent_config()
    code, report = status_json(config)
    assert (code, report["state"]) == (3, "unknown")
    with AgentProcess(config) as agent:
        center.wait_connected(timeout=20)
        code, report = wait_until(
            lambda: (r := status_json(config))[1].get("connected") and r, 20
        )
        assert code == 0
        assert report["pid"] == agent.pid
        assert report["state"] == "running"
        assert report["server"] == center.address
        assert report["net_mode"] == "private"
        code, text = ctl_status(config)
        assert code == 0
        assert f"agent pid: {agent.pid}\n" in text
        assert "state: running\n" in text
        assert f"connection: connected {center.address} (private) since" in text
        agent.signal(signal.SIGTERM)
        assert agent.wait(20) == 0
        code, report = status_json(config)
        assert code == 3
        assert report["state"] == "stopped"
        assert report["exit_reason"] == "SIGTERM"
        assert report["connected"] is False
        code, text = ctl_status(config)
        assert "state: stopped\n" in text
        assert "exit reason: SIGTERM\n" in text
        assert "connection: disconnected\n" in text


def test_status_of_an_agent_that_cannot_connect(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    config = agent_config()
    center.stop()
    started = time.monotonic()
    with AgentProcess(config) as agent:
        code, report = wait_until(
            lambda: (r := status_json(config))[1].get("state") == "abnormal" and r, 20
        )
        # Within seconds, not after the first 60 s heartbeat.
        assert time.monotonic() - started < 20
        assert code == 1  # running, degraded
        assert report["state"] == "abnormal"
        assert report["connected"] is False
        assert any("connection refused by 127.0.0.1" in d for d in report["detail"])
        code, text = ctl_status(config)
        assert "connection: disconnected" in text
        assert "detail: connection: dial " in text
        agent.stop()


def test_status_after_sigkill_says_dead(center: CenterThread, agent_config: AgentConfig) -> None:
    config = agent_config()
    with AgentProcess(config) as agent:
        center.wait_connected(timeout=20)
        wait_until(lambda: status_json(config)[1].get("connected"), 20)
        agent.signal(signal.SIGKILL)
        agent.wait(10)
        code, report = status_json(config)
        assert code == 3
        assert report["state"] == "dead"
        assert report["connected"] is False
        assert f"process {agent.pid} is gone" in report["exit_reason"]


def record(**over: Any) -> AgentStatus:
    base: dict[str, Any] = dict(
        pid=os.getpid(), version="1.9", state="running", net_mode="private", connected=True,
        server="10.0.0.1:6751", last_heartbeat=100.0, updated=100.0, started=0.0,
        connected_since=90.0,
    )
    return AgentStatus(**{**base, **over})


def test_pid_checks() -> None:
    me = psutil.Process()
    assert is_agent_process(me.pid, 0.0) is False  # pytest is not the agent
    assert is_agent_process(me.pid, me.create_time()) is True
    # The same pid started at another time is another process.
    assert is_agent_process(me.pid, me.create_time() - 60) is False
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert is_agent_process(child.pid, 0.0) is False
    finally:
        child.kill()
        child.wait()
    assert is_agent_process(child.pid, psutil.Process().create_time()) is False


def test_report_is_stable(tmp_path: Path) -> None:
    now = 150.0
    report = status_report(tmp_path, record(), True, {}, now)
    assert list(report) == [
        "work_dir", "service", "state", "running", "stale", "pid", "version", "connected",
        "server", "net_mode", "connected_since", "last_heartbeat", "updated", "upgrade_state",
        "detail", "exit_reason", "spool", "plugin_limits",
    ]
    text = format_report(report, now)
    assert text.splitlines()[:4] == [
        "service: unknown (systemd is not running)",
        f"agent pid: {os.getpid()}",
        "version: 1.9",
        "state: running",
    ]
    props = {"ActiveState": "active", "SubState": "running", "UnitFileState": "enabled",
             "MainPID": "41"}
    text = format_report(status_report(tmp_path, record(), True, props, now), now)
    assert text.splitlines()[:2] == ["service: active (running), enabled", "pid: 41"]
    # A live agent silent for long is flagged, not believed blindly.
    stale = status_report(tmp_path, record(), True, {}, 100.0 + 1000)
    assert any("no status update for 1000 s" in d for d in stale["detail"])
    assert "state: running (stale record)" in format_report(stale, 1100.0)
    # A record claiming running whose process is gone is dead, not connected.
    dead = status_report(tmp_path, record(), False, {}, now)
    assert (dead["state"], dead["connected"], dead["running"]) == ("dead", False, False)
