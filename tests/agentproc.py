"""Run the real agent as a child process for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class AgentProcess:
    """`python -m elkeid_agent run --config PATH`, with its work dir and log at hand."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.work_dir = Path(tomllib.loads(config.read_text())["work_dir"])
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elkeid_agent", "run", "--config", str(self.config)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        path = self.work_dir / "log" / "elkeid-agent.log"
        return path.read_text() if path.exists() else ""

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


def patch_config(path: Path, **sections: dict[str, Any]) -> Path:
    """Merge keys into an agent TOML config (tests tune intervals this way)."""
    data = tomllib.loads(path.read_text())
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(dump_toml(data))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML for the agent config's shape: scalars, then tables, nested as deep as needed."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            if any(not isinstance(v, dict) for v in value.values()) or not value:
                lines.append(f"\n[{name}]")
            lines.append(dump_toml(value, name + "."))
    return "\n".join(line for line in lines if line)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")
