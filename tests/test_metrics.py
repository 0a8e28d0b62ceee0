"""The node_exporter textfile (issue 22, point 6), read back with Prometheus's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, patch_config, wait_until
from prometheus_client.parser import text_string_to_metric_families

from elkeid_agent.heartbeat_ring import RING_FILE, read_ring
from elkeid_agent.metrics import Sample, render
from elkeid_center.testing import CenterThread


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_render_parses_with_types_help_and_labels() -> None:
    counters = {"tx_records": 7, "tx_bytes": 900, "connects": 3, "buffer_bytes": 12,
                "dropped_oversize": 2, "spool_dropped_records": 5}
    plugins = [{"name": 'we"ird\\', "state": "running", "restarts": 4, "malformed_frames": 1,
                "too_large_frames": 0}]
    text = render(counters, Sample(version="1.9.0.0", connected=True, upgrade_held=False,
                                   rss_bytes=1 << 20, cpu_seconds=1.5, heartbeat_time=1e9,
                                   plugins=plugins))
    parsed = list(text_string_to_metric_families(text))
    by_name = {f.name: f for f in parsed}
    assert all(f.documentation for f in parsed)  # every family has its HELP
    assert all(f.name.startswith("elkeid_agent_") for f in parsed)
    assert by_name["elkeid_agent_records_sent"].type == "counter"
    assert by_name["elkeid_agent_records_sent"].samples[0].value == 7
    assert by_name["elkeid_agent_reconnects"].samples[0].value == 2
    assert by_name["elkeid_agent_buffer_bytes"].type == "gauge"
    dropped = {s.labels["reason"]: s.value for s in by_name["elkeid_agent_records_dropped"].samples}
    assert dropped["oversize"] == 2
    assert dropped["spool_bound"] == 5
    restarts = by_name["elkeid_agent_plugin_restarts"].samples[0]
    assert restarts.labels == {"plugin": 'we"ird\\'}
    assert restarts.value == 4
    assert by_name["elkeid_agent_resident_memory_bytes"].samples[0].value == 1 << 20
    assert by_name["elkeid_agent_cpu_seconds"].samples[0].value == pytest.approx(1.5)


def test_agent_writes_the_textfile_and_the_ring_each_heartbeat(tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "elkeid_agent.prom"
    prom.parent.mkdir()
    with CenterThread(tmp_path / "certs") as center:
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            transport={"heartbeat_interval": 0.3}, metrics={"textfile": str(prom)},
        )
        with AgentProcess(config) as agent:
            center.wait_records(1000, count=3, timeout=20)

            def sent() -> float:
                if not prom.exists():
                    return 0.0
                metric = families(prom.read_text()).get("elkeid_agent_records_sent")
                return metric.samples[0].value if metric else 0.0

            wait_until(sent, 20)
            parsed = families(prom.read_text())
            assert parsed["elkeid_agent_connected"].samples[0].value == 1
            assert parsed["elkeid_agent_resident_memory_bytes"].samples[0].value > 1 << 20
            assert prom.stat().st_mode & 0o777 == 0o644
            assert [p.name for p in prom.parent.iterdir()] == [prom.name]
            ring = read_ring(agent.work_dir, 1 << 20)
            assert 1 <= len(ring) <= 10
            assert ring[-1]["fields"]["state"] in ("running", "abnormal")
            assert (agent.work_dir / RING_FILE).stat().st_mode & 0o777 == 0o600
            agent.stop()


def test_no_textfile_by_default(tmp_path: Path) -> None:
    with CenterThread(tmp_path / "certs") as center:
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            transport={"heartbeat_interval": 0.3},
        )
        with AgentProcess(config) as agent:
            wait_until((agent.work_dir / RING_FILE).exists, 20)
            agent.stop()
    assert not list(tmp_path.rglob("*.prom"))


def test_unwritable_textfile_is_a_fault_not_the_end(tmp_path: Path) -> None:
    prom = tmp_path / "missing-dir" / "elkeid_agent.prom"
    with CenterThread(tmp_path / "certs") as center:
        config = patch_config(
            center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"),
            transport={"heartbeat_interval": 0.3}, metrics={"textfile": str(prom)},
        )
        with AgentProcess(config) as agent:

            def faulted() -> list[str]:
                return [r.fields["state_detail"] for r in center.records(1000)
                        if "metrics file: cannot write" in r.fields.get("state_detail", "")]

            detail = wait_until(faulted, 20)[-1]
            assert "ENOENT" in detail
            prom.parent.mkdir()
            wait_until(prom.exists, 20)  # retried at each beat; the fault then clears
            assert agent.proc is not None
            assert agent.proc.poll() is None
            agent.stop()
