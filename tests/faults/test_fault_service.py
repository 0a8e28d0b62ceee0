"""Issue 9, the service manager's side: what systemd hands the agent stays with the agent, and a
notify socket nobody reads cannot stop it. Each case runs its own agent (its environment is
the subject).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultrig import BASE, BASE_EXE, Rig, sh_plugin

SERVICE_PREFIXES = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")


@pytest.fixture
def drained_socket(tmp_path: Path) -> Iterator[str]:
    """A notify socket that is read (so the agent is never blocked by it)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                sock.recv(4096)
            except TimeoutError:
                continue

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    sock.close()


def test_plugins_do_not_inherit_service_manager_variables(
    tmp_path: Path, drained_socket: str
) -> None:
    env = {
        "NOTIFY_SOCKET": drained_socket,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "LISTEN_FDS": "1",
        "LISTEN_PID": str(os.getpid()),
        "LISTEN_FDNAMES": "agent",
    }
    with Rig(tmp_path / "rig", env=env) as rig:
        since = time.time()
        dump = sh_plugin("env >env.txt\nexec cat <&3 >/dev/null")
        rig.center.send_configs([rig.publish(BASE, BASE_EXE), rig.publish("envdump", dump)])
        rig.plugin_beat_after(since, "envdump")
        out = rig.plugin_root / "envdump" / "env.txt"
        rig.wait(lambda: out.exists() and out.stat().st_size, 10, "the plugin's env.txt")
        names = {line.split("=", 1)[0] for line in out.read_text().splitlines() if "=" in line}
        assert "PYTHONPATH" in names  # the dump does show what the agent passes on
        leaked = sorted(n for n in names if n.startswith(SERVICE_PREFIXES))
        assert not leaked, f"plugins inherited {leaked}"
        rig.survived()


def test_a_notify_socket_nobody_reads(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        # A watchdog every 0.4 s: the agent notifies every 0.2 s, and the socket's queue
        # (net.unix.max_dgram_qlen datagrams) is full within a few seconds.
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        with Rig(tmp_path / "rig", env=env) as rig:
            qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
            time.sleep(min(qlen * 0.2 + 2.0, 10.0))
            since = time.time()
            rig.beat_after(since, timeout=10)
            rig.beat_after(time.time(), timeout=10)
            # The queue did fill: the case tested what it means to.
            sock.setblocking(False)
            pending = 0
            while True:
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
                pending += 1
            assert pending >= qlen
            rig.survived()
