"""Talking to the service manager: sd_notify, watchdog pacing, and the diagnostic signals."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import io
import logging
import os
import socket
from collections.abc import Collection, Mapping

log = logging.getLogger(__name__)


def sd_notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False when there is no service manager to tell."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", message, exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str], own_pids: Collection[int]) -> float | None:
    """Half the watchdog period systemd asked for (WATCHDOG_USEC), or None without one.

    systemd names the main pid in WATCHDOG_PID; under a onefile or staticx launcher that is
    the launcher, an ancestor of this process, so any pid of the agent's own chain counts.
    """
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and not (pid.isdigit() and int(pid) in own_pids)):
        return None
    return int(usec) / 2_000_000


def dump_tasks() -> None:
    """SIGUSR1: every asyncio task's stack into the log, for a hung agent."""
    out = io.StringIO()
    tasks = asyncio.all_tasks()
    for task in tasks:
        out.write(f"--- {task.get_name()} ({task.get_coro()!r})\n")
        # Task.print_stack fails on frames without a line number (seen under uvloop).
        for frame in task.get_stack():
            code = frame.f_code
            out.write(f"  {code.co_filename}:{frame.f_lineno or 0} in {code.co_name}\n")
    log.warning("SIGUSR1: %d asyncio tasks\n%s", len(tasks), out.getvalue())


def release_memory() -> None:
    """SIGUSR2: collect garbage and give freed heap back to the OS."""
    collected = gc.collect()
    # By soname, not find_library: that runs ldconfig or gcc, in the bundle's environment.
    try:
        trimmed = bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        trimmed = False
    log.warning("SIGUSR2: gc collected %d objects, malloc_trim released=%s", collected, trimmed)
