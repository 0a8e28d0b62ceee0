"""Talking to the service manager: sd_notify, watchdog pacing, and the diagnostic signals."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import socket
from collections.abc import Collection, Mapping

from elkeid_agent.health import Health
from elkeid_agent.memory import trim_heap

log = logging.getLogger(__name__)


class Notifier:
    """$NOTIFY_SOCKET: one datagram per message, never blocking the event loop.

    A service manager that does not read its socket (the kernel queues only a few datagrams)
    must not freeze the agent: the socket is non-blocking, and a message that finds the queue
    full is dropped and counted (`notify_dropped`); the next watchdog tick is another chance.
    Other failures (the socket is gone) are counted as `notify_failures`, logged once per errno.
    """

    def __init__(self, env: Mapping[str, str], health: Health) -> None:
        path = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._health = health
        self._sock: socket.socket | None = None
        self._logged: set[int] = set()

    def send(self, message: str) -> bool:
        """True when the datagram was queued; False without a manager or when dropped."""
        if not self._address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message.encode(), self._address)
        except BlockingIOError:
            self._health.count("notify_dropped")
            return False
        except OSError as exc:
            self._health.count("notify_failures")
            if (key := exc.errno or 0) not in self._logged:
                self._logged.add(key)
                log.warning("sd_notify %s failed: %s", message, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


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
    log.warning(
        "SIGUSR1: %d asyncio tasks\n%s", len(tasks), out.getvalue(), extra={"verbatim": True}
    )


def release_memory() -> None:
    """SIGUSR2: collect garbage and give freed heap back to the OS."""
    collected = gc.collect()
    trimmed = trim_heap()
    log.warning("SIGUSR2: gc collected %d objects, malloc_trim released=%s", collected, trimmed)
