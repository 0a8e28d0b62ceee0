"""Where cgroups cannot be used: the agent as child subreaper, so stop still means every process.

With PR_SET_CHILD_SUBREAPER (Linux 3.4) a process whose parent dies is re-parented to the
agent instead of init: a plugin's `setsid` grandchild or double-forked daemon stays in the
agent's process tree. Each plugin run gets a tag in its environment (`TAG_ENV`, inherited by
whatever it starts); stop then kills the plugin's descendants and every process re-parented to
the agent that carries the run's tag (`to_kill`, pure), over and over until none is left, and
reaps those that became the agent's children.

The gap: a descendant that clears its environment and is re-parented to the agent is not
recognised. Plugin cgroups have no such gap; this is the fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
TAG_ENV = "ELKEID_PLUGIN_RUN"
#: The whole sweep is bounded: a process that forks faster than it is killed cannot hold stop.
SWEEP_LIMIT = 2.0


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    tag: str | None  # the TAG_ENV value of its environment at exec
    zombie: bool = False


def to_kill(procs: Iterable[Proc], root: int, agent: int, tag: str) -> set[int]:
    """The pids of one plugin run: `root` (the plugin) and its descendants, the processes
    re-parented to `agent` that carry `tag`, and their descendants."""
    children: dict[int, list[int]] = {}
    seeds = {root}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
        if p.ppid == agent and p.tag == tag:
            seeds.add(p.pid)
    out: set[int] = set()
    pending = list(seeds)
    while pending:
        pid = pending.pop()
        if pid in out:
            continue
        out.add(pid)
        pending += children.get(pid, [])
    return out


def parse_environ_tag(data: bytes) -> str | None:
    prefix = TAG_ENV.encode() + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def enable() -> str:
    """Make this process a child subreaper; "" on success, else why not."""
    try:
        # By soname, not find_library: that runs ldconfig or gcc, in the bundle's environment.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError as exc:
        return f"PR_SET_CHILD_SUBREAPER: no libc: {exc}"
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return f"PR_SET_CHILD_SUBREAPER: {os.strerror(ctypes.get_errno())}"
    return ""


def _state_ppid(stat: str) -> tuple[str, int]:
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def scan(proc_root: Path = Path("/proc")) -> list[Proc]:
    """Every process with its parent and (for the agent's own children) tag."""
    agent = os.getpid()
    out = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = _state_ppid((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        tag = None
        if ppid == agent:
            with contextlib.suppress(OSError):
                tag = parse_environ_tag((entry / "environ").read_bytes())
        out.append(Proc(int(entry.name), ppid, tag, state == "Z"))
    return out


def kill_run(root: int, tag: str) -> int:
    """SIGKILL every process of one plugin run (`root` itself excepted: it is the caller's
    child, reaped by its owner); reaps the adopted ones. Returns the number killed."""
    agent = os.getpid()
    killed: set[int] = set()
    deadline = time.monotonic() + SWEEP_LIMIT
    while time.monotonic() < deadline:
        procs = scan()
        ours = to_kill(procs, root, agent, tag) - {root}
        targets = {p.pid for p in procs if p.pid in ours and not p.zombie}
        adopted = {p.pid for p in procs if p.ppid == agent and p.pid in ours}
        for pid in targets:
            # EPERM: a descendant we may not signal (it ran a setuid program); the rest go on.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed |= targets
        for pid in adopted:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # SIGKILLed or a zombie: the wait is short
        if not targets:
            break
        time.sleep(0.005)
    return len(killed)
