"""Through the whole agent: input that used to crash-loop a fleet is contained, and an empty
Command removes every plugin, as the Go agent does."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agentproc import AgentProcess, wait_until
from conftest import AgentConfig
from plugtools import alive, sh_plugin, sha

from elkeid_agent._proto import grpc_pb2
from elkeid_agent.version import PRODUCT
from elkeid_center.testing import CenterThread

FAST = {"heartbeat_interval": 0.5, "dial_timeout": 1.0, "backoff_initial": 0.2, "backoff_max": 2.0}
SERVE = sh_plugin("exec cat <&3 >/dev/null")


def _publish(center: CenterThread, files: Path, name: str, exe: bytes) -> dict[str, object]:
    files.mkdir(parents=True, exist_ok=True)
    (files / name).write_bytes(exe)
    return {"name": name, "version": "1.0.0", "sha256": sha(exe),
            "download_urls": [center.file_url(name)]}


def _plugin_pid(center: CenterThread, name: str) -> int:
    beats = center.wait_for(
        lambda: [r for r in center.records(1001) if r.fields["name"] == name], timeout=20
    )
    return int(beats[-1].fields["pid"])


def test_an_empty_command_stops_and_removes_every_plugin(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    center.set_configs([_publish(center, tmp_path / "files", "last", SERVE)])
    with AgentProcess(agent_config(transport=FAST)) as agent:
        pid = _plugin_pid(center, "last")
        directory = agent.work_dir / "plugin" / "last"
        assert directory.is_dir()
        # The operator removed the host's last plugin: the server sends an empty Command.
        center.set_configs(None)
        began = time.monotonic()
        assert center.send_command(grpc_pb2.Command()) == 1
        wait_until(lambda: not alive(pid) and not directory.exists(), timeout=15)
        assert time.monotonic() - began < 15
        assert agent.stop() == 0


def test_a_malformed_push_leaves_the_agent_and_the_healthy_plugin_running(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    """Each of these used to end the agent; the server would push them again after the
    restart, so every host of a fleet crash-looped."""
    healthy = _publish(center, tmp_path / "files", "healthy", SERVE)
    center.set_configs([healthy])
    with AgentProcess(agent_config(transport=FAST)) as agent:
        pid = _plugin_pid(center, "healthy")
        connections = len(center.connections())
        bad_set = [
            {**healthy, "version": "2.0.0", "download_urls": ["http://127.0.0.1:99999/p"]},
            {**healthy, "name": "ipv6", "download_urls": ["http://[::1/p"]},
            {**healthy, "name": "nul", "detail": "A=1\x00B=2"},
        ]
        center.set_configs(bad_set)
        center.send_configs(bad_set)
        center.send_task(1050, PRODUCT, {"path": "/etc/pass\x00wd", "buf_size": 1000}, "t-nul")
        center.send_task(1051, PRODUCT, {"idc": "x\rLD_PRELOAD=/tmp/evil.so"}, "t-idc")
        results = {r.fields["token"]: r.fields for r in center.wait_records(5100, 2, 10)}
        assert results["t-nul"]["status"] == "failed"
        assert "NUL" in results["t-nul"]["msg"]
        assert results["t-idc"]["status"] == "failed"
        assert "$.idc" in results["t-idc"]["msg"]

        def abnormal() -> dict[str, str] | None:
            beats = center.records(1000)
            last = beats[-1].fields if beats else None
            return last if last and "config entries" in last["state_detail"] else None

        fields = center.wait_for(abnormal, timeout=20)
        assert fields["state"] == "abnormal"
        detail = " ".join(json.loads(fields["state_detail"]))
        assert "3 refused" in detail
        assert "download_urls[0]" in detail
        assert int(fields["config_entries_refused"]) >= 3
        # Still the same agent on the same stream, and the healthy plugin was left as it was.
        assert agent.pid == int(fields["pid"])
        assert len(center.connections()) == connections
        assert alive(pid)
        assert _plugin_pid(center, "healthy") == pid
        assert (agent.work_dir / "plugin" / "healthy" / "healthy").read_bytes() == SERVE
        assert "LD_PRELOAD" not in (
            (agent.work_dir / "specified_env").read_text()
            if (agent.work_dir / "specified_env").exists() else ""
        )
        assert agent.stop() == 0
