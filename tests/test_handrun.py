"""`make center`'s hint to run the agent by hand works as printed, from a shell that is not a
terminal: the agent logs to stderr and the demo plugin's records reach the center. The center
takes its port from the command line and moves to a free one when that port is taken."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def running(cmd: list[str], **kw: object) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """A process whose merged output lines are collected as they come."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                            **kw)  # type: ignore[call-overload]
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join()


def wait_line(lines: list[str], pred: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if pred(line):
                return line
        time.sleep(0.1)
    raise AssertionError(f"no such line within {timeout} s in:\n{''.join(lines)}")


def test_hand_run_hint_works_as_printed_and_a_taken_port_is_moved(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ELKEID_LOG_STDERR"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        center_cmd = [
            sys.executable, "-m", "elkeid_center", "serve", "--dir", str(tmp_path / "center"),
            "--port", str(port), "--files", str(REPO / "examples" / "files"),
            "--configs", str(REPO / "examples" / "plugins.json"),
        ]
        with running(center_cmd, env={**env, "PYTHONPATH": str(REPO)}) as (_, out):
            hint = wait_line(out, lambda s: s.startswith("  PATH="), 30).strip()
            text = "".join(out)
            assert f"port {port} is taken" in text
            assert f"on 127.0.0.1:{port}\n" not in text
            with running(["bash", "-c", hint], env=env) as (_, agent_out):
                wait_line(out, lambda s: "demo tick" in s, 60)
                wait_line(agent_out, lambda s: "elkeid-agent" in s and "started" in s, 10)
