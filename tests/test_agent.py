"""The real agent process against the real local center over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from agentproc import AgentProcess, wait_until
from conftest import FIXTURES, AgentConfig

from elkeid_agent.host import read_host_facts
from elkeid_agent.version import PRODUCT, VERSION
from elkeid_center.certs import generate_server_cert, generate_unrelated_certs
from elkeid_center.testing import CenterThread

FAST = {"heartbeat_interval": 0.5, "dial_timeout": 1.0, "backoff_initial": 0.2,
        "backoff_max": 2.0}


def go_heartbeat_keys(data_type: int) -> set[str]:
    for line in (FIXTURES / "go-agent-packageddata.jsonl").read_text().splitlines():
        for record in json.loads(line)["records"]:
            if record["data_type"] == data_type:
                return set(record["fields"])
    raise AssertionError(f"no {data_type} in the fixture")


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_first_heartbeat_on_connect_with_every_field(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config()) as agent:
        # The interval is 60 s: a beat inside 10 s went out when the stream opened. How fast
        # the agent starts is bench/startup.py's figure (4 s here on a loaded 2-core machine).
        beat = center.wait_records(1000, timeout=10)[0]
        missing = go_heartbeat_keys(1000) - set(beat.fields)
        assert not missing
        for value in beat.fields.values():
            assert value not in ("+Inf", "-Inf", "NaN")
        assert beat.fields["state"] == "running"
        assert beat.fields["net_mode"] == "private"
        assert int(beat.fields["pid"]) == agent.pid
        # Our counters ride along as extra fields.
        assert beat.fields["dropped_oversize"] == "0"
        assert agent.stop() == 0


def test_packageddata_header_matches_host_and_go_schema(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config(), env={"SPECIFIED_AGENT_ID": "test-agent-1"}):
        center.wait_records(1000, timeout=10)
        raw, decoded, _ = center.packaged()[0]
    facts = read_host_facts()
    assert decoded.agent_id == "test-agent-1"
    assert decoded.hostname == facts.hostname
    assert decoded.version == VERSION
    assert decoded.product == PRODUCT
    assert list(decoded.intranet_ipv4) == list(facts.ips.intranet_ipv4)
    assert list(decoded.extranet_ipv4) == list(facts.ips.extranet_ipv4)
    assert list(decoded.intranet_ipv6) == list(facts.ips.intranet_ipv6)
    assert list(decoded.extranet_ipv6) == list(facts.ips.extranet_ipv6)
    # Field order as the Go agent writes it: all records first, then ascending header fields.
    assert _field_order(raw) == sorted(_field_order(raw))
    assert center.connections()[0].agent_id == "test-agent-1"


def _field_order(raw: bytes) -> list[int]:
    from elkeid_agent.wire import decode_varint

    order, pos = [], 0
    while pos < len(raw):
        key, pos = decode_varint(raw, pos, len(raw))
        length, pos = decode_varint(raw, pos, len(raw))
        pos += length
        if not order or order[-1] != key >> 3:
            order.append(key >> 3)
    return order


@pytest.mark.parametrize("kind", ["unrelated-ca", "wrong-name"])
def test_server_certificate_is_verified(
    tmp_path: Path, center: CenterThread, agent_config: AgentConfig, kind: str
) -> None:
    if kind == "unrelated-ca":
        other = generate_unrelated_certs(tmp_path / "other")
        cert, key = other.server_cert, other.server_key
    else:
        cert, key = generate_server_cert(center.certs, tmp_path / "wrong")
    with CenterThread(center.certs.directory, server_cert=cert, server_key=key) as impostor:
        impostor.start()
        config = impostor.write_agent_config(tmp_path / "a.toml", tmp_path / "work")
        from agentproc import patch_config

        patch_config(config, transport=FAST)
        with AgentProcess(config) as agent:
            time.sleep(3)
            assert impostor.records() == []
            assert agent.proc is not None
            assert agent.proc.poll() is None
            assert "no AgentCenter reachable" in agent.log()


def test_discovery_ladder_sd_first_then_private_then_public(
    center: CenterThread, tmp_path: Path
) -> None:
    from agentproc import patch_config

    dead = f"127.0.0.1:{free_port()}"
    center.set_sd_backends([("127.0.0.1", free_port()), ("127.0.0.1", center.port)])
    config = center.write_agent_config(
        tmp_path / "sd.toml",
        tmp_path / "sd-work",
        regions={"default": {"service_discovery": center.sd_address, "private": dead}},
    )
    patch_config(config, transport=FAST)
    with AgentProcess(config):
        # Beats queued before the first connection honestly say "unknown".
        assert center.wait_for(lambda: _net_modes(center) - {"unknown"}, 15) == {"sd"}
        assert center.sd_requests()

    center.clear()
    center.set_sd_status(500)
    config = center.write_agent_config(
        tmp_path / "pub.toml",
        tmp_path / "pub-work",
        regions={
            "default": {"service_discovery": center.sd_address, "private": dead,
                        "public": center.address}
        },
    )
    patch_config(config, transport=FAST)
    with AgentProcess(config) as agent:
        assert center.wait_for(lambda: _net_modes(center) - {"unknown"}, 15) == {"public"}
        assert "service discovery failed" in agent.log()


def _net_modes(center: CenterThread) -> set[str]:
    return {r.fields["net_mode"] for r in center.records(1000)}


def test_center_restart_loses_no_agent_record(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config(transport=FAST)) as agent:
        center.wait_records(1000, count=2, timeout=10)
        center.stop()
        down_at = time.time()
        time.sleep(3)  # heartbeats queue in the agent lane meanwhile
        center.restart()
        restarted = time.monotonic()
        center.wait_for(center.open_connections, timeout=10)
        reconnect = time.monotonic() - restarted
        # Backoff is capped at 2 s (+20 % jitter) in this config, plus a dial.
        assert reconnect < 2.4 + 1.5
        beats = center.wait_for(
            lambda: [r for r in center.records(1000) if r.timestamp >= down_at + 2], timeout=10
        )
        assert beats
        stamps = sorted({r.timestamp for r in center.records(1000)})
        # One heartbeat every 0.5 s: every second of the outage is represented.
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert max(gaps) <= 1
        assert agent.stop() == 0


def test_upload_is_byte_identical_and_rate_limited(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    payload = os.urandom(250_000)
    source = tmp_path / "upload.bin"
    source.write_bytes(payload)
    with AgentProcess(agent_config()):
        center.wait_records(1000, timeout=10)
        center.send_task(1050, PRODUCT, {"path": str(source), "buf_size": 100_000}, "up-1")
        time.sleep(0.2)
        # One upload at a time: a second one is refused while the first runs.
        center.send_task(1050, PRODUCT, {"path": str(source), "buf_size": 100_000}, "up-2")
        results = center.wait_for(
            lambda: {r.fields["token"]: r.fields for r in center.records(5100)}
            if len(center.records(5100)) >= 2 else None,
            timeout=15,
        )
    upload = center.uploads["up-1"]
    assert upload.data == payload
    assert upload.chunk_sizes == (100_000, 100_000, 50_000)
    # At most one chunk per second.
    assert upload.chunk_times[-1] - upload.chunk_times[0] >= 1.9
    assert results["up-1"]["status"] == "succeed"
    assert results["up-2"]["status"] == "failed"
    assert "in progress" in results["up-2"]["msg"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"path": "/nonexistent/file", "buf_size": 1000}, "cannot open"),
        ({"path": "__big__", "buf_size": 10}, "over the limit"),
        ({"path": "/tmp", "buf_size": 1000}, "not a regular file"),
        ({"path": "/etc/hostname"}, "buf_size"),
    ],
)
def test_bad_uploads_fail_with_5100(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path, data: dict[str, object],
    reason: str,
) -> None:
    if data.get("path") == "__big__":
        big = tmp_path / "big"
        big.write_bytes(b"x" * 6001)
        data = {**data, "path": str(big)}
    with AgentProcess(agent_config()):
        center.wait_records(1000, timeout=10)
        center.send_task(1050, PRODUCT, data, "bad")
        result = center.wait_records(5100, timeout=10)[0].fields
    assert result["status"] == "failed"
    assert result["token"] == "bad"
    assert reason in result["msg"]


def test_metadata_persists_across_restart_and_unknown_region_refused_or_passed_over(
    center: CenterThread, tmp_path: Path
) -> None:
    from agentproc import patch_config

    config = center.write_agent_config(
        tmp_path / "m.toml",
        tmp_path / "m-work",
        regions={"default": {"private": center.address}, "eu": {"private": center.address}},
    )
    patch_config(config, transport=FAST)
    with AgentProcess(config) as agent:
        center.wait_records(1000, timeout=10)
        center.send_task(1051, PRODUCT, {"region": "mars"}, "m-0")
        center.send_task(1051, PRODUCT, {"idc": "dc-7", "region": "eu"}, "m-1")
        results = center.wait_records(5100, count=2, timeout=10)
        by_token = {r.fields["token"]: r.fields for r in results}
        assert by_token["m-0"]["status"] == "failed"
        assert "mars" in by_token["m-0"]["msg"]
        assert by_token["m-1"]["status"] == "succeed"
        assert agent.stop() == 0
    env_file = (tmp_path / "m-work" / "specified_env").read_text()
    assert "specified_idc=dc-7" in env_file
    center.clear()
    with AgentProcess(config):
        beat = center.wait_records(1000, timeout=10)[0]
        assert (beat.fields["idc"], beat.fields["region"]) == ("dc-7", "eu")

    # A new config without "eu": the persisted region would stop every start (a crash loop no
    # server task could end). The agent runs in the config's region and says why.
    center.clear()
    config = center.write_agent_config(
        tmp_path / "m.toml", tmp_path / "m-work", regions={"default": {"private": center.address}}
    )
    patch_config(config, transport=FAST)
    with AgentProcess(config) as agent:
        beat = center.wait_records(1000, timeout=10)[0]
        assert beat.fields["region"] == "default"
        assert beat.fields["state"] == "abnormal"
        assert "specified_region: 'eu' names no [regions.eu]" in beat.fields["state_detail"]
        # A 1051 with a region replaces the stale one on disk (an idc alone does not).
        center.send_task(1051, PRODUCT, {"idc": "dc-8"}, "m-2")
        center.send_task(1051, PRODUCT, {"region": "default"}, "m-3")
        results = center.wait_records(5100, count=2, timeout=10)
        assert [r.fields["status"] for r in results] == ["succeed", "succeed"]
        assert agent.stop() == 0
    assert "specified_region=default" in (tmp_path / "m-work" / "specified_env").read_text()


def test_shutdown_task_exits_zero_after_reporting(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config()) as agent:
        center.wait_records(1000, timeout=10)
        center.send_task(1060, PRODUCT, "", "bye")
        assert agent.wait(10) == 0
    assert center.records(5100)[0].fields == {"token": "bye", "msg": "shutting down",
                                              "status": "succeed"}


def test_garbage_tasks_get_5100_and_the_stream_stays(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config(transport=FAST)) as agent:
        center.wait_records(1000, timeout=10)
        center.send_task(1050, PRODUCT, "{not json", "g-1")
        center.send_task(1050, PRODUCT, {"path": 7, "buf_size": 1}, "g-2")
        center.send_task(4242, PRODUCT, "", "g-3")
        center.send_task(1, "no-such-plugin", "", "g-4")
        results = {r.fields["token"]: r.fields for r in center.wait_records(5100, 4, 10)}
        assert all(r["status"] == "failed" for r in results.values())
        assert "not JSON" in results["g-1"]["msg"]
        assert "$.path" in results["g-2"]["msg"]
        assert "4242" in results["g-3"]["msg"]
        assert "no such plugin" in results["g-4"]["msg"]
        connections = len(center.connections())
        before = len(center.records(1000))
        center.wait_records(1000, count=before + 2, timeout=10)
        assert len(center.connections()) == connections
        assert agent.stop() == 0


def test_sigterm_orderly_exit_and_sigusr1_dumps_tasks(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config()) as agent:
        center.wait_records(1000, timeout=10)
        agent.signal(signal.SIGUSR1)
        wait_until(lambda: "asyncio tasks" in agent.log(), timeout=5)
        assert "transfer" in agent.log()
        agent.signal(signal.SIGUSR2)
        wait_until(lambda: "malloc_trim" in agent.log(), timeout=5)
        started = time.monotonic()
        assert agent.stop() == 0
        assert time.monotonic() - started < 10


def test_status_file_and_machine_id(center: CenterThread, agent_config: AgentConfig) -> None:
    config = agent_config()
    with AgentProcess(config) as agent:
        center.wait_records(1000, timeout=10)
        status = json.loads(
            wait_until(lambda: (agent.work_dir / "status.json").exists()
                       and (agent.work_dir / "status.json").read_text(), 5)
        )
        assert status["pid"] == agent.pid
        assert status["connected"] is True
        assert status["net_mode"] == "private"
        mode = (agent.work_dir / "machine-id").stat().st_mode & 0o777
        assert mode == 0o600
        assert center.connections()[0].agent_id == (agent.work_dir / "machine-id").read_text()


def test_notify_socket_gets_ready_watchdog_and_stopping(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
        with AgentProcess(agent_config(), env=env) as agent:
            seen = [sock.recv(256).decode()]
            while "WATCHDOG=1" not in seen:
                seen.append(sock.recv(256).decode())
            assert seen[0] == "READY=1"
            agent.signal(signal.SIGTERM)
            while "STOPPING=1" not in seen:
                seen.append(sock.recv(256).decode())
            assert agent.wait(10) == 0
