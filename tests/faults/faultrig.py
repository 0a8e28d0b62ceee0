"""The fault suite's rig: one real agent process against a local center over mutual TLS, the
hostile download host beside it, and the checks every case ends with (same PID, still
heartbeating).

A module shares one `Rig` (agent start-up is the slow part); the per-case fixture puts it back
to a baseline first: the agent is restarted if an earlier case killed it, and a Configs set of
one small plugin (`base`) replaces whatever an earlier case left.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from agentproc import AgentProcess, patch_config
from conftest import _remove_cgroup_groups
from hostile import Hostile

from elkeid_center.testing import CenterThread, DecodedRecord

T = TypeVar("T")

FAST = {
    "heartbeat_interval": 0.5,
    "dial_timeout": 1.0,
    "backoff_initial": 0.2,
    "backoff_max": 1.0,
}
BASE = "base"
BASE_EXE = b"#!/bin/sh\nexec cat <&3 >/dev/null\n"
MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
#: A healthy plugin: a record of TICKER_TYPE (its `seq` counting up) every 0.1 s until its
#: task pipe closes; its records arriving show the agent still forwards.
TICKER_TYPE = 9997
TICKER = f"""#!{sys.executable}
import os, struct, sys, threading, time
sys.path.insert(0, {str(REPO)!r})
from elkeid_plugin_sdk.client import encode_record
out = os.fdopen(4, "wb", buffering=0)
stop = threading.Event()
def tasks():
    while os.read(3, 65536):
        pass
    stop.set()
threading.Thread(target=tasks, daemon=True).start()
seq = 0
while not stop.wait(0.1):
    record = encode_record({TICKER_TYPE}, int(time.time()), {{"seq": str(seq)}})
    out.write(struct.pack("<I", len(record)) + record)
    seq += 1
""".encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sh_plugin(body: str) -> bytes:
    return f"#!/bin/sh\n{body}\n".encode()


class AgentDied(AssertionError):
    pass


class LoggedAgent(AgentProcess):
    """An AgentProcess whose stderr goes to a file: a pipe nobody reads would block an agent
    that writes much to stderr (tracebacks on a full disk), which is not the fault under test."""

    def __init__(self, config: Path, stderr: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(config, env)
        self.stderr_path = stderr
        self.stderr_offset = 0

    def start(self) -> LoggedAgent:
        with self.stderr_path.open("ab") as err:
            self.stderr_offset = err.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "elkeid_agent", "run", "--config", str(self.config)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        return self

    def stderr_text(self) -> str:
        """What this start of the agent wrote to stderr."""
        try:
            with self.stderr_path.open("rb") as fh:
                fh.seek(self.stderr_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


def rss_bytes(pid: int, *, tree: bool = True) -> int:
    """VmRSS of `pid` and, with `tree`, all its descendants (0 for processes already gone).

    `tree=False` is the agent's own budget (issue 18: agent processes only, its plugins have
    their own); the default counts everything the agent started."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            if not tree:
                continue
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total


class RssSampler:
    """Samples rss_bytes(pid, tree=tree) every `interval` s in a thread; `peak` is the highest
    seen. `tree=False` is issue 18's budget: the agent's process, not its plugins."""

    def __init__(self, pid: int, *, tree: bool = True, interval: float = 0.02) -> None:
        self.pid = pid
        self.tree = tree
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid, tree=self.tree))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Rig:
    """A center, its file server directory, a hostile host and one agent process."""

    def __init__(
        self,
        tmp: Path,
        *,
        env: dict[str, str] | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.tmp = tmp
        self.files = tmp / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.center = CenterThread(tmp / "certs", files_dir=self.files)
        self.center.start()
        self.hostile = Hostile()
        self.config = self.center.write_agent_config(
            tmp / "agent.toml", work_dir if work_dir is not None else tmp / "work"
        )
        # Plugin cgroups of its own (as conftest's agent_config): an agent sweeps its group at
        # start, and test runs may overlap on one host.
        self.cgroup_name = f"elkeid-test-{uuid.uuid4().hex[:12]}"
        patch_config(self.config, transport=FAST, plugins={"cgroup_name": self.cgroup_name})
        self.env = dict(env or {})
        self.work = Path(tomllib.loads(self.config.read_text())["work_dir"])
        self.agent: LoggedAgent | None = None
        self.pid = 0

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.agent = LoggedAgent(self.config, self.tmp / "agent.stderr", self.env).start()
        self.pid = self.agent.pid
        self.beat_after(time.time() - 60, timeout=20)

    def ensure_running(self) -> None:
        if self.agent is None or self.agent.proc is None or self.agent.proc.poll() is not None:
            self.start()

    def close(self) -> None:
        self.hostile.close()
        if self.agent is not None:
            # stop() kills after the timeout; how long shutdown takes is not this suite's subject.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.stop(timeout=5)
            self.agent.__exit__()
        self.center.close()
        _remove_cgroup_groups([self.cgroup_name])

    def __enter__(self) -> Rig:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def plugin_root(self) -> Path:
        return self.work / "plugin"

    # -- waiting -------------------------------------------------------------------------------

    def check_alive(self) -> None:
        assert self.agent is not None
        assert self.agent.proc is not None
        code = self.agent.proc.poll()
        if code is not None:
            raise AgentDied(f"the agent (pid {self.pid}) exited with {code}: {self.death()}")

    def death(self) -> str:
        """The exception lines of the agent's last traceback, from its stderr."""
        assert self.agent is not None
        lines = self.agent.stderr_text().splitlines()
        errors = [ln.strip(" |") for ln in lines if re.search(r"\w(Error|Exception)\b", ln)]
        return " / ".join(dict.fromkeys(errors[-4:])) or "\n".join(lines[-10:])

    def wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Poll `predicate` until truthy; fail at once if the agent dies meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self.check_alive()
            if time.monotonic() >= deadline:
                raise AssertionError(f"within {timeout} s: {what}")
            time.sleep(0.05)

    def beats(self, since: float) -> list[DecodedRecord]:
        """1000s of this agent process received after `since` (time.time())."""
        return [
            r
            for r in self.center.records(1000)
            if r.recv_time > since and r.fields.get("pid") == str(self.pid)
        ]

    def beat_after(self, since: float, timeout: float = 10.0) -> dict[str, str]:
        return self.wait(
            lambda: (b := self.beats(since)) and b[-1].fields,
            timeout,
            f"a heartbeat from pid {self.pid}",
        )

    def survived(self) -> None:
        """The case's common assertion: the same process lives and a new 1000 arrives."""
        self.check_alive()
        self.beat_after(time.time(), timeout=10)
        self.check_alive()

    def detail_after(self, since: float, needle: str, timeout: float = 20.0) -> dict[str, str]:
        """The first heartbeat after `since` whose state_detail mentions `needle`."""

        def found() -> dict[str, str] | None:
            for beat in self.beats(since):
                if needle in beat.fields.get("state_detail", ""):
                    return beat.fields
            return None

        return self.wait(found, timeout, f"a heartbeat whose state_detail names {needle!r}")

    def refused(self, since: float, name: str, timeout: float = 20.0) -> dict[str, str]:
        """Plugin `name` is reported in state_detail (state abnormal) and never ran.
        Fails as soon as it runs, rather than at the timeout."""

        def outcome() -> tuple[str, dict[str, str]] | None:
            ran = [r for r in self.center.records(1001) if r.fields.get("name") == name]
            if ran:
                return "ran", ran[0].fields
            for beat in self.beats(since):
                if name in beat.fields.get("state_detail", ""):
                    return "reported", beat.fields
            return None

        verdict, fields = self.wait(outcome, timeout, f"plugin {name} refused and reported")
        assert verdict == "reported", f"plugin {name} was started"
        assert fields["state"] == "abnormal"
        return fields

    def plugin_beat_after(self, since: float, name: str, timeout: float = 20.0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            for r in self.center.records(1001):
                if r.recv_time > since and r.fields.get("name") == name:
                    return r.fields
            return None

        return self.wait(found, timeout, f"a 1001 from plugin {name}")

    def result(self, token: str, timeout: float = 10.0) -> dict[str, str]:
        """The 5100 carrying `token`."""

        def found() -> dict[str, str] | None:
            for r in self.center.records(5100):
                if r.fields.get("token") == token:
                    return r.fields
            return None

        return self.wait(found, timeout, f"a 5100 with token {token!r}")

    def plugin_dirs(self) -> set[str]:
        try:
            return {p.name for p in self.plugin_root.iterdir() if p.is_dir()}
        except OSError:
            return set()

    # -- configs -------------------------------------------------------------------------------

    def publish(self, name: str, exe: bytes, version: str = "1") -> dict[str, Any]:
        """A Config whose executable the center's file server holds."""
        (self.files / name).write_bytes(exe)
        return {
            "name": name,
            "version": version,
            "sha256": sha(exe),
            "download_urls": [self.center.file_url(name)],
        }

    def reset(self, timeout: float = 30.0) -> None:
        """Back to the baseline: the agent runs, and only plugin `base` is installed."""
        self.hostile.release()
        self.ensure_running()
        since = time.time()
        self.center.send_configs([self.publish(BASE, BASE_EXE)])
        self.wait(
            lambda: self.plugin_dirs() == {BASE},
            timeout,
            f"plugin dirs = {{base}} (now {sorted(self.plugin_dirs())[:5]})",
        )
        self.plugin_beat_after(since, BASE, timeout)


def module_rig(tmp: Path, **kwargs: Any) -> Iterator[Rig]:
    with Rig(tmp, **kwargs) as rig:
        yield rig


def case(rig: Rig) -> Iterator[Rig]:
    """Per-case setup: baseline restored, hostile routes cleared."""
    rig.hostile.routes.clear()
    rig.reset()
    yield rig
    rig.hostile.release()
