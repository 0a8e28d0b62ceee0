"""A plugin's `<name>.stderr`, capped: the newest part is kept, the truncations counted.

The Go agent gives the plugin the file itself as fd 2, so a plugin that writes 1 GiB to its
stderr puts 1 GiB on the disk the spool and the logs share. Here fd 2 is a pipe, and a thread
of the plugin's own copies it into the file. When the file would pass its cap, its newest
half is moved to the front (behind a line saying how much was dropped) and the file cut
there: the file never holds more than the cap, and what the plugin wrote last is always in it.

The thread owns the pipe's read end and the file: it alone closes them, when the pipe reaches
EOF (the plugin's whole group is gone) or soon after `stop()`, so no fd is closed under it.
It blocks on nothing but the disk and `poll` with a short timeout. A write that fails (a full
disk) drops that chunk, counted, as the plugin's own write to a full disk would have failed.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

#: One read from the pipe, and one step of moving the kept part.
CHUNK = 256 * 1024
#: The smallest cap `[plugins] stderr_max_bytes` accepts: room for the kept half and the line.
MIN_CAP = 64 * 1024
#: How often the thread looks at its stop flag while the pipe is quiet.
POLL_MS = 500
#: Reads per wake-up at most (16 MiB at the largest reads), so a stop is seen under a flood.
MAX_READS = 64


@dataclass
class StderrStats:
    """What was dropped to keep the file under its cap (read by the loop, written here)."""

    truncations: int = 0
    dropped_bytes: int = 0
    write_failures: int = 0


class CappedFile:
    """The file side: appends that keep the file within `cap` bytes (blocking; the thread's)."""

    def __init__(self, fd: int, cap: int, stats: StderrStats) -> None:
        if cap < MIN_CAP:
            raise ValueError(f"stderr cap {cap} is under {MIN_CAP} bytes")
        self.fd = fd
        self.cap = cap
        self.stats = stats
        self.size = os.fstat(fd).st_size
        self.dropped = 0  # bytes dropped from this file (the line at its front says so)
        self.note = 0  # the length of that line

    def append(self, data: bytes) -> None:
        if self.size + len(data) > self.cap:
            self._keep_newest(len(data))
        os.pwrite(self.fd, data, self.size)
        self.size += len(data)

    def _keep_newest(self, incoming: int) -> None:
        """Move the newest bytes to the front so that `incoming` more fit under the cap."""
        keep = max(0, min(self.size - self.note, self.cap // 2 - incoming))
        dropped = self.size - self.note - keep
        self.dropped += dropped
        note = b"[elkeid-agent: %d older bytes of this file dropped]\n" % self.dropped
        # Forward, a chunk at a time: the destination is always behind the source (the cap is
        # at least MIN_CAP, far more than the note), so nothing is overwritten before it is read.
        src, dst = self.size - keep, len(note)
        left = keep
        while left > 0:
            block = os.pread(self.fd, min(left, CHUNK), src)
            if not block:
                break
            os.pwrite(self.fd, block, dst)
            src += len(block)
            dst += len(block)
            left -= len(block)
        os.pwrite(self.fd, note, 0)
        os.ftruncate(self.fd, dst)
        self.size = dst
        self.note = len(note)
        self.stats.truncations += 1
        self.stats.dropped_bytes += dropped


class StderrCopier:
    """The thread that moves a plugin's stderr pipe into its capped file."""

    def __init__(
        self,
        name: str,
        pipe_fd: int,
        file_fd: int,
        cap: int,
        stats: StderrStats,
        on_truncate: Callable[[], None] | None = None,
    ) -> None:
        self.pipe_fd = pipe_fd
        self.file = CappedFile(file_fd, cap, stats)
        # At most a quarter of the cap per read: the kept half and one read always fit.
        self.read_size = min(CHUNK, cap // 4)
        self.stats = stats
        self.on_truncate = on_truncate
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"{name}-stderr", daemon=True)

    def start(self) -> None:
        os.set_blocking(self.pipe_fd, False)
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to end: at the pipe's EOF, or within POLL_MS of this."""
        self._stop.set()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.pipe_fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(POLL_MS) and not self._drain():
                    return
            # Stopped: what the plugin wrote before it was stopped, then no more (a process
            # that left the plugin's group may hold the pipe and write on for ever).
            self._drain()
        finally:
            os.close(self.pipe_fd)
            os.close(self.file.fd)

    def _drain(self) -> bool:
        """Copy what the pipe holds now (MAX_READS reads at most); False at its EOF."""
        for _ in range(MAX_READS):
            try:
                data = os.read(self.pipe_fd, self.read_size)
            except BlockingIOError:
                return True
            if not data:
                return False
            before = self.stats.truncations
            try:
                self.file.append(data)
            except OSError:
                self.stats.write_failures += 1
                self.stats.dropped_bytes += len(data)
                with contextlib.suppress(OSError):
                    self.file.size = os.fstat(self.file.fd).st_size
            if self.stats.truncations != before and self.on_truncate is not None:
                self.on_truncate()
        return True
