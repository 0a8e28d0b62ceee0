"""Through the whole agent: plugins downloaded from the local center's file server, their
frames delivered over mutual TLS, tasks written to their pipes, heartbeats, and shutdown."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from agentproc import AgentProcess, wait_until
from conftest import AgentConfig
from plugtools import FIXTURES, alive, load_jsonl, pids_in_group, read_frames, sh_plugin, sha

from elkeid_agent._proto import grpc_pb2
from elkeid_center.testing import CenterThread

FAST = {"heartbeat_interval": 0.5, "dial_timeout": 1.0, "backoff_initial": 0.2, "backoff_max": 2.0}
AGENT_TYPES = {1000, 1001, 1010, 5100}


def _publish(
    center: CenterThread, files: Path, name: str, exe: bytes, **extra: str
) -> dict[str, object]:
    files.mkdir(parents=True, exist_ok=True)
    (files / name).write_bytes(exe)
    return {
        "name": name,
        "version": "1.0.0",
        "sha256": sha(exe),
        "download_urls": [center.file_url(name)],
        **extra,
    }


def _cat(fixture: str) -> bytes:
    return sh_plugin(f"cat '{FIXTURES / fixture}' >&4\nexec cat <&3 >/dev/null")


def test_fixture_frames_reach_the_center(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    configs = [
        _publish(center, files, "frames", _cat("go-plugin-frames.bin")),
        _publish(center, files, "edge", _cat("go-plugin-edge-frames.bin")),
    ]
    center.set_configs(configs)
    expected = load_jsonl("go-plugin-frames.jsonl") + load_jsonl("go-plugin-edge-frames.jsonl")
    raw = read_frames((FIXTURES / "go-plugin-frames.bin").read_bytes()) + read_frames(
        (FIXTURES / "go-plugin-edge-frames.bin").read_bytes()
    )
    with AgentProcess(agent_config(transport=FAST)) as agent:
        center.wait_for(
            lambda: (
                len([r for r in center.records() if r.data_type not in AGENT_TYPES])
                >= len(expected)
            ),
            timeout=20,
        )
        time.sleep(0.5)
        got = [r for r in center.records() if r.data_type not in AGENT_TYPES]
        assert agent.stop() == 0
    # Two plugins interleave: compare per plugin, each in its own order.
    frames_got = [r for r in got if r.data_type == 9999 and "seq" in r.fields]
    edge_got = [r for r in got if not (r.data_type == 9999 and "seq" in r.fields)]
    assert len(frames_got) + len(edge_got) == len(expected)
    for record, want, frame in zip(frames_got + edge_got, expected, raw, strict=True):
        assert (record.data_type, record.timestamp, record.fields) == (
            want["data_type"],
            want["timestamp"],
            want["fields"],
        )
        assert record.payload_ok
        # Spliced verbatim: the payload bytes are the plugin's own.
        assert record.raw == grpc_pb2.EncodedRecord.FromString(frame).data
    assert center.decode_errors == 0


def test_tasks_heartbeats_and_sigterm(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    anchor = sh_plugin("exec cat <&3 >task-frames.bin")
    stubborn = sh_plugin("trap '' TERM PIPE\nwhile :; do sleep 1; done")
    center.set_configs(
        [_publish(center, files, "anchor", anchor), _publish(center, files, "stubborn", stubborn)]
    )
    config = agent_config(transport=FAST)
    with AgentProcess(config) as agent:
        work = agent.work_dir
        beats = center.wait_for(
            lambda: (
                {r.fields["name"]: r.fields for r in center.records(1001)}.keys()
                >= {"anchor", "stubborn"}
                and {r.fields["name"]: r.fields for r in center.records(1001)}
            ),
            timeout=20,
        )
        for fields in beats.values():
            for key in (
                "name",
                "pversion",
                "cpu",
                "rss",
                "read_speed",
                "write_speed",
                "pid",
                "nfd",
                "start_time",
                "du",
                "rx_tps",
                "tx_tps",
                "rx_speed",
                "tx_speed",
                "restarts",
                "malformed_frames",
                "backpressure_seconds",
            ):
                assert key in fields, key
            assert fields["pversion"] == "1.0.0"
        for t in load_jsonl("go-agent-task-frames.jsonl"):
            center.send_task(t["data_type"], t["object_name"], t["data"], t["token"])
        want = (FIXTURES / "go-agent-task-frames.bin").read_bytes()
        out = work / "plugin" / "anchor" / "task-frames.bin"
        wait_until(lambda: out.exists() and out.stat().st_size >= len(want), timeout=10)
        assert out.read_bytes() == want
        # A task for an unknown plugin comes back as a 5100 with its token.
        center.send_task(1, "nope", "", "tok-x")
        result = center.wait_records(5100, timeout=10)[-1].fields
        assert (result["token"], result["status"]) == ("tok-x", "failed")
        groups = [p for b in beats.values() for p in pids_in_group(int(b["pid"]))]
        assert groups
        began = time.monotonic()
        agent.signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        assert time.monotonic() - began < 12
        assert not any(alive(p) for p in groups)


def test_a_sigkilled_agent_leaves_plugins_the_next_one_reaps(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    orphan = sh_plugin("trap '' PIPE TERM\nwhile :; do sleep 1; done")
    center.set_configs([_publish(center, tmp_path / "files", "orphan", orphan)])
    config = agent_config(transport=FAST)
    with AgentProcess(config) as agent:
        beat = center.wait_for(lambda: center.records(1001), timeout=20)[-1]
        pgid = int(beat.fields["pid"])
        agent.signal(signal.SIGKILL)
        agent.wait(5)
    time.sleep(0.5)
    assert alive(pgid)  # the Go agent's issue 10: the plugin outlives its agent
    with AgentProcess(config) as agent:
        wait_until(lambda: not pids_in_group(pgid), timeout=10)
        # and the new agent runs its own copy
        center.wait_for(
            lambda: [r for r in center.records(1001) if int(r.fields["pid"]) != pgid],
            timeout=20,
        )
        assert agent.stop() == 0


def test_a_failed_sync_makes_the_agent_abnormal_until_a_good_one(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    good = _publish(center, tmp_path / "files", "fine", sh_plugin("exec cat <&3 >/dev/null"))
    bad = {**good, "name": "broken", "sha256": "00" * 32}
    center.set_configs([good, bad])
    with AgentProcess(agent_config(transport=FAST)) as agent:

        def abnormal() -> dict[str, str] | None:
            beats = center.records(1000)
            return beats[-1].fields if beats and beats[-1].fields["state"] == "abnormal" else None

        fields = center.wait_for(abnormal, timeout=20)
        assert "plugin broken" in fields["state_detail"]
        assert "sha256" in fields["state_detail"]
        center.send_configs([good])

        def running() -> bool:
            beats = center.records(1000)
            return bool(beats) and beats[-1].fields["state"] == "running"

        center.wait_for(running, timeout=20)
        assert agent.stop() == 0
