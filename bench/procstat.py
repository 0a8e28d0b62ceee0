"""CPU and memory of an agent's processes, for the benchmarks.

A frozen agent runs as launcher parents (staticx, the PyInstaller bootloader) plus the Python
child; a venv agent is one process. Plugins are the agent's children too, but their cost is not
the agent's: the caller says which descendants are plugins.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

#: The plugin cgroup group of this bench's agents. Every agent kills whatever is in its
#: group's plugin cgroups at start and stop (a previous run's orphans); under the default group
#: a bench's agents and those of any other bench run on the host (same cgroup) killed each
#: other's plugins: a plugin stopped mid-window, its `sent` never written.
PLUGIN_CGROUP = f"elkeid-bench-{os.getpid()}"


def start_sink(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start a bench's sink AgentCenter child, which prints `PORT n` once it listens; the
    child and its address."""
    sink = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    line = sink.stdout.readline()
    if not line.startswith("PORT "):
        sink.kill()
        raise SystemExit(f"sink did not start: {line!r}")
    return sink, f"127.0.0.1:{int(line.split()[1])}"


def agent_group(pid: int, is_plugin: Callable[[list[str]], bool]) -> list[Any]:
    """The agent's processes: `pid` and its descendants whose command line is not a plugin's."""
    import psutil

    me = psutil.Process(pid)
    group = [me]
    for child in me.children(recursive=True):
        try:
            if not is_plugin(child.cmdline()):
                group.append(child)
        except psutil.Error:
            continue
    return group


def _total(group: list[Any], measure: Callable[[Any], float]) -> float:
    """`measure` summed over the group's processes (one that has ended counts nothing)."""
    import psutil

    total = 0.0
    for proc in group:
        try:
            total += measure(proc)
        except psutil.Error:
            continue
    return total


def cpu_seconds(group: list[Any]) -> float:
    return _total(group, lambda p: sum(p.cpu_times()[:2]))  # user + system


def rss_bytes(group: list[Any]) -> int:
    return int(_total(group, lambda p: p.memory_info().rss))


def private_bytes(group: list[Any]) -> int:
    """Resident memory no other process maps (USS): RSS less the shared library pages that
    other processes on the machine (the bench's own among them) keep resident too."""
    return int(_total(group, lambda p: p.memory_full_info().uss))
