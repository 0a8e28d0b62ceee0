"""sd_notify datagrams and the watchdog pacing rule, over a real unix socket."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from agentproc import AgentProcess
from conftest import AgentConfig

from elkeid_agent.health import Health
from elkeid_agent.service import Notifier, watchdog_interval
from elkeid_center.testing import CenterThread


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "180000000"}, 90.0),
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "100"}, 90.0),  # our own pid
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "7"}, 90.0),  # the onefile launcher
        ({"WATCHDOG_USEC": "180000000", "WATCHDOG_PID": "999"}, None),  # someone else's
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, own_pids={100, 7}) == expected


def test_notifier_sends_one_datagram(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    health = Health()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path}, health)
        assert notifier.send("READY=1")
        assert sock.recv(64) == b"READY=1"
        notifier.close()
    assert not Notifier({}, health).send("READY=1")
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}, health)
    assert not gone.send("READY=1")
    assert not gone.send("WATCHDOG=1")
    assert health.counters["notify_failures"] == 2
    assert health.counters["notify_dropped"] == 0


def test_notify_socket_nobody_reads_never_blocks(tmp_path: Path) -> None:
    """The kernel queues a few datagrams; after that each send is dropped and counted."""
    path = str(tmp_path / "notify")
    health = Health()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path}, health)
        started = time.monotonic()
        sent = [notifier.send("WATCHDOG=1") for _ in range(1000)]
        assert time.monotonic() - started < 1.0  # a blocking send would hang here forever
        queued = sum(sent)
        assert 1 <= queued < 1000
        assert health.counters["notify_dropped"] == 1000 - queued
        # Once the manager reads again, messages get through.
        sock.recv(64)
        assert notifier.send("STOPPING=1")
        notifier.close()


def test_agent_heartbeats_with_a_notify_socket_nobody_reads(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    """A service manager that stopped reading must not freeze the agent's event loop."""
    path = str(tmp_path / "notify.sock")
    fast = {"heartbeat_interval": 0.3, "dial_timeout": 1.0, "backoff_initial": 0.2}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)  # and never read: the kernel's queue fills after a few datagrams
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}  # a tick every 50 ms
        with AgentProcess(agent_config(transport=fast), env=env) as agent:
            center.wait_records(1000, timeout=10)
            time.sleep(2)  # ~40 watchdog ticks: far more than the queue holds
            before = len(center.records(1000))
            beats = center.wait_records(1000, count=before + 3, timeout=10)
            last = dict(beats[-1].fields)
            assert int(last["notify_dropped"]) > 0
            assert last["state"] == "running"
            assert agent.stop() == 0
