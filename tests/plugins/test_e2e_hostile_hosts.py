"""Through the whole agent: hostile download hosts end their plugin's install, never the agent.

Before issue 9's fix a 200 kB chunk-size line raised LimitOverrunError out of the agent and a
body without length was read whole into memory; here the agent must stay up, report each
failure in its heartbeat, run the good plugin, and keep its memory bounded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from agentproc import AgentProcess
from conftest import AgentConfig
from plugtools import sh_plugin, sha

from elkeid_center.testing import CenterThread

FAST = {"heartbeat_interval": 0.5, "dial_timeout": 1.0, "backoff_initial": 0.2, "backoff_max": 2.0}
MiB = 1024 * 1024

RESPONSES = {
    "/chunky": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 200_000,
    "/negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "/endless": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
}


@contextlib.contextmanager
def hostile_host() -> Iterator[int]:
    """Answers each path of RESPONSES; /endless then streams zeros until the client leaves."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            path = conn.recv(65536).split(b" ", 2)[1].decode()
            conn.sendall(RESPONSES[path])
            if path == "/endless":
                block = b"\0" * MiB
                while True:
                    conn.sendall(block)
            else:
                time.sleep(5)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_hostile_download_hosts_leave_the_agent_running(
    center: CenterThread, agent_config: AgentConfig, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    good = sh_plugin("exec cat <&3 >/dev/null")
    (files / "good").write_bytes(good)
    with hostile_host() as port:
        configs: list[dict[str, object]] = [
            {"name": "good", "version": "1", "sha256": sha(good),
             "download_urls": [center.file_url("good")]},
        ]
        for path in RESPONSES:
            configs.append({"name": path[1:], "version": "1", "sha256": "ab" * 32,
                            "download_urls": [f"http://127.0.0.1:{port}{path}"]})
        center.set_configs(configs)
        config = agent_config(transport=FAST, plugins={"download_max_bytes": 64 * MiB})
        with AgentProcess(config) as agent:

            def reported() -> list[str] | None:
                beats = center.records(1000)
                if not beats or not center.records(1001):
                    return None
                detail: list[str] = json.loads(beats[-1].fields["state_detail"])
                text = " ".join(detail)
                return detail if all(p[1:] in text for p in RESPONSES) else None

            process = psutil.Process(agent.pid)
            detail = center.wait_for(reported, timeout=60)
            text = " ".join(detail)
            assert "chunk-size line longer than 65536 bytes" in text
            assert "Content-Length" in text
            assert "more than 67108864 bytes" in text
            assert {r.fields["name"] for r in center.records(1001)} == {"good"}
            assert process.is_running()
            # The 64 MiB of /endless went to disk, not into the agent: its peak RSS (VmHWM)
            # stays near an idle agent's.
            status = Path(f"/proc/{agent.pid}/status").read_text()
            peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
            print(f"agent peak RSS {peak / MiB:.1f} MiB")
            assert peak < 120 * MiB
            assert agent.stop() == 0
        assert not list((agent.work_dir / "plugin").glob("*/.download-*"))
