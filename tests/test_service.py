"""sd_notify datagrams and the watchdog pacing rule, over a real unix socket."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from elkeid_agent.health import Health
from elkeid_agent.service import Notifier, watchdog_interval


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
