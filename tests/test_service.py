"""sd_notify datagrams and the watchdog pacing rule, over a real unix socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from elkeid_agent.service import sd_notify, watchdog_interval


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


def test_sd_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": path})
        assert sock.recv(64) == b"READY=1"
    assert not sd_notify("READY=1", {})
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
