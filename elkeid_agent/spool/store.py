"""The spool on disk: the one owner of its files, around the sans-IO `spool.core`.

Layout: `<work_dir>/spool/NNNNNNNNNNNNNNNN.seg` segment files, appended only, each entry framed
and checked by `spool.format`; `checkpoint` names the first entry not yet delivered. A new
process scans every segment once, in bounded chunks (intact entries are kept, damage is
counted), and appends to a fresh one.

The policy (index, trail, bounds, drops, checkpoint position) is `SpoolCore`'s; this module
does the file work it asks for, every call in a worker thread (`SpoolFiles`, replaceable by a
fault-injecting one in tests), and reports the outcome back. Only the writer task (`run`,
then `close`) writes; `read` only reads, from memory or with pread.

Failure. An OSError from the disk (full, read-only, I/O error), free space below
`min_free_bytes` or a spool directory that is not a plain directory puts the spool in
`degraded`: it takes nothing more (the memory buffer's backpressure applies again), keeps and
still sends what it holds, reports the Health fault `spool`, and every `RETRY_SECONDS` tries a
real write; only a write that succeeds clears the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from elkeid_agent.buffer import Batch
from elkeid_agent.config import SpoolConfig
from elkeid_agent.fsutil import atomic_write, fsync_dir
from elkeid_agent.health import Health
from elkeid_agent.spool import format as fmt
from elkeid_agent.spool.core import (
    AGENT_LANE,
    DropOp,
    Entry,
    ReadBatch,
    Refuse,
    RollOp,
    SpoolCore,
    SpoolStats,
    WriteOp,
)
from elkeid_agent.wire import MAX_MESSAGE_BYTES

__all__ = ["AGENT_LANE", "MESSAGE_BYTES", "TRAIL_BYTES", "ReadBatch", "Spool", "SpoolState",
           "SpoolStats"]

T = TypeVar("T")

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
CHECKPOINT_FILE = "checkpoint"
PROBE_FILE = ".probe"
#: Records per message sent from the spool, at most (unless one entry is larger). Small, so
#: that what a server can hold written but unread (its flow-control windows and the socket
#: buffers, which are bytes, not messages) spans several messages the trail keeps.
MESSAGE_BYTES = 1024 * 1024
#: Bytes of the messages written last that are kept to be sent again if the stream ends
#: abnormally or the process dies (the checkpoint stays before them).
TRAIL_BYTES = MAX_MESSAGE_BYTES - MESSAGE_BYTES
#: How long a degraded spool waits before trying the disk again.
RETRY_SECONDS = 5.0
#: Bytes accepted but not yet on disk; above this the spool takes no more until the writer
#: catches up (the buffer's backpressure holds the rest).
MAX_UNWRITTEN = 16 * 1024 * 1024
#: Buffers per `writev` (Linux's IOV_MAX).
IOV_MAX = 1024
#: `close` gives up after this long, whatever the disk does (an exit must end).
CLOSE_SECONDS = 8.0
HEALTH_UNIT = "spool"


class SpoolState(StrEnum):
    DISABLED = "disabled"
    EMPTY = "empty"
    HOLDING = "holding"
    DEGRADED = "degraded"


def segment_bytes_for(max_bytes: int) -> int:
    """Segments small enough that dropping the oldest one frees a sixteenth of the bound."""
    return max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 16))


class NotOurs(OSError):
    """A path where the spool expects its own directory or file is something else."""


class SpoolFiles:
    """The file operations, blocking (run in worker threads). Never follows a symlink and
    never opens anything but a regular file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def check_dir(self, create: bool) -> None:
        try:
            st = os.lstat(self.directory)
        except FileNotFoundError:
            if not create:
                raise
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode):
            raise NotOurs(errno.ENOTDIR, "not a plain directory (a symlink or a file)",
                          str(self.directory))

    def listing(self) -> list[str]:
        return os.listdir(self.directory)

    def is_regular(self, name: str) -> bool:
        return stat.S_ISREG(os.lstat(self.directory / name).st_mode)

    def remove_stale(self, name: str) -> None:
        if self.is_regular(name):
            os.unlink(self.directory / name)

    def open_read(self, name: str) -> int:
        try:
            fd = os.open(self.directory / name,
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotOurs(errno.ELOOP, "a symlink", name) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotOurs(errno.EINVAL, "not a regular file", name)
        return fd

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pread(self, fd: int, pos: int, n: int) -> bytes:
        return os.pread(fd, n, pos)

    def read_checkpoint(self) -> bytes | None:
        try:
            fd = self.open_read(CHECKPOINT_FILE)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, fmt.CHECKPOINT_BYTES + 1, 0)
        finally:
            os.close(fd)

    def open_segment(self, old_fd: int, seg: int) -> int:
        if old_fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(old_fd)
            os.close(old_fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(self.directory / fmt.segment_name(seg), flags, 0o600)

    def append(self, fd: int, blobs: list[bytes], start: int) -> None:
        """`blobs` in order, gathered by the kernel (`writev`): never joined in memory."""
        views = [memoryview(b) for b in blobs if b]
        first = 0
        try:
            while first < len(views):
                written = os.writev(fd, views[first : first + IOV_MAX])
                if written <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                while first < len(views) and written >= len(views[first]):
                    written -= len(views[first])
                    first += 1
                if written:
                    views[first] = views[first][written:]
        except OSError:
            # Leave no torn entry behind if the disk lets us; the scan would count it anyway.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    def pread_all(self, wanted: list[tuple[int, int, int]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        fds: dict[int, int] = {}
        try:
            for seg, offset, size in wanted:
                try:
                    if seg not in fds:
                        fds[seg] = self.open_read(fmt.segment_name(seg))
                    out.append(os.pread(fds[seg], size, offset))
                except OSError as exc:
                    log.warning("spool: cannot read segment %d: %s", seg, exc)
                    out.append(None)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def unlink_segment(self, seg: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / fmt.segment_name(seg))

    def cut_segment(self, seg: int, length: int) -> None:
        """Truncate a segment found at start to `length` bytes (after its last intact entry)."""
        fd = os.open(self.directory / fmt.segment_name(seg),
                     os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotOurs(errno.EINVAL, "not a regular file", fmt.segment_name(seg))
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def write_checkpoint(self, position: tuple[int, int, tuple[int, int]]) -> None:
        atomic_write(self.directory / CHECKPOINT_FILE, fmt.encode_checkpoint(*position),
                     durable=False)

    def probe(self) -> None:
        """A real write (a degraded spool clears its fault only after one succeeds)."""
        atomic_write(self.directory / PROBE_FILE, b"probe", durable=True)
        os.unlink(self.directory / PROBE_FILE)

    def fsync(self, fd: int) -> None:
        if fd >= 0:
            os.fsync(fd)
        fsync_dir(self.directory)

    def close(self, fd: int) -> None:
        os.close(fd)

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize


class Spool:
    def __init__(self, work_dir: Path, config: SpoolConfig, health: Health,
                 files: SpoolFiles | None = None) -> None:
        self.directory = Path(work_dir) / SPOOL_DIR
        self.config = config
        self.health = health
        self.files = files or SpoolFiles(self.directory)
        self.segment_bytes = segment_bytes_for(config.max_bytes)
        self.core = SpoolCore(
            config.max_bytes, config.min_free_bytes, self.segment_bytes,
            min(MAX_UNWRITTEN, max(config.max_bytes // 4, 1)), TRAIL_BYTES, MESSAGE_BYTES,
        )
        #: Whether the stream is up (set by the transfer loop): connected, no bound drops.
        self.connected: Callable[[], bool] = lambda: False
        self._fd = -1
        self._dirty = False  # written since the last fsync
        self._last_sync = time.monotonic()
        self._degraded_since = 0.0
        self._wake = asyncio.Event()
        self._stop = False
        self._stopped = asyncio.Event()
        # The writer's file work runs in threads, one at a time and in order, even when a
        # cancelled coroutine left its thread running (a crash path: the group failed).
        self._disk = threading.Lock()
        self._inflight: asyncio.Future[None] | None = None
        self._checkpoint_refused = False
        self.state = SpoolState.DISABLED if not config.enabled else SpoolState.EMPTY
        #: Names of the segments found damaged at start, and whether the scan's bound cut it.
        self._damaged: list[str] = []
        self._over_budget = False
        #: What the start found damaged and dropped, for the heartbeat's `warnings` for the
        #: process's life ("" if nothing): records were lost, yet nothing is left to repair.
        self.damage_warning = ""

    @property
    def stats(self) -> SpoolStats:
        return self.core.stats

    # -- start ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Find what a previous process left: every intact entry after the checkpoint."""
        if not self.config.enabled:
            return
        try:
            refused = await asyncio.to_thread(self._load)
        except OSError as exc:
            self._degrade(f"cannot open {self.directory}: {exc}")
            return
        if refused:
            # Left alone; the spool goes on with its own files.
            self.health.fault("spool files", f"not spool files, left alone: {', '.join(refused)}",
                              "spool_failures")
        s = self.stats
        if s.corrupt_entries:
            names = self._damaged[:3] + (
                [f"{len(self._damaged) - 3} more"] if len(self._damaged) > 3 else [])
            # No "; " inside: the heartbeat joins its warnings with it.
            beyond = (f" (segments past the first {2 * self.config.max_bytes} bytes, twice "
                      "max_bytes, not read)" if self._over_budget else "")
            self.damage_warning = (
                f"spool: damaged data dropped at start: {s.corrupt_entries} regions, "
                f"{s.corrupt_bytes} bytes, in {', '.join(names)}{beyond}"
            )
            log.warning("%s", self.damage_warning)
        if self.core.records:
            log.info("spool: %d records in %d entries to send first", self.core.records,
                     len(self.core.index))
        self._set_state()

    def _load(self) -> list[str]:
        self.files.check_dir(create=True)
        refused: list[str] = []
        names = self.files.listing()
        for name in names:
            if name.startswith(".") and name.endswith(".new"):
                try:
                    self.files.remove_stale(name)
                except OSError as exc:
                    log.warning("spool: cannot remove %s: %s", name, exc)
        try:
            raw = self.files.read_checkpoint()
        except NotOurs:
            refused.append(CHECKPOINT_FILE)
            self._checkpoint_refused = True  # left alone: never replaced by a rename either
            raw = None
        checkpoint = fmt.decode_checkpoint(raw) if raw is not None else None
        ids = sorted(i for i in (fmt.segment_id(n) for n in names) if i is not None)
        found: list[Entry] = []
        sizes: dict[int, int] = {}
        # New segments sort after everything here and after the checkpoint's: a lower id would
        # read as delivered at the next start.
        next_segment = max([*ids, checkpoint[0] if checkpoint else 0]) + 1
        # Start-up scans at most twice the size bound: whatever the files hold, the index
        # stays bounded (and the scan itself reads in chunks); the rest counts as damage.
        budget = 2 * self.config.max_bytes
        for seg in ids:
            name = fmt.segment_name(seg)
            try:
                fd = self.files.open_read(name)
            except NotOurs:
                refused.append(name)
                continue
            except OSError as exc:
                # One unreadable file is damage like any other: counted, the rest kept.
                log.error("spool: cannot read %s: %s", name, exc)
                self.stats.corrupt_entries += 1
                self._damaged.append(name)
                continue
            try:
                if checkpoint is not None and seg < checkpoint[0]:
                    self.files.unlink_segment(seg)  # delivered before the last exit
                    continue
                size = self.files.size(fd)
                scanned = min(size, budget)
                budget -= scanned
                result = fmt.scan_reader(functools.partial(self.files.pread, fd), scanned)
            except OSError as exc:
                log.error("spool: cannot read %s: %s", name, exc)
                self.stats.corrupt_entries += 1
                self._damaged.append(name)
                continue
            finally:
                self.files.close(fd)
            start = checkpoint[1] if checkpoint is not None and seg == checkpoint[0] else 0
            self.stats.corrupt_entries += result.corrupt + int(size > scanned)
            damaged = result.corrupt_bytes + size - scanned
            self.stats.corrupt_bytes += damaged
            if damaged:
                self._damaged.append(name)
            self._over_budget |= size > scanned
            # Scanned from the start (the offset is trusted as a position, not as a boundary
            # to parse from); what lies before the checkpoint was delivered.
            kept = [h for h in result.entries if h.offset >= start]
            found.extend(Entry(h.lane, h.count, h.time, h.size, seg, h.offset) for h in kept)
            end = result.entries[-1].end if result.entries else 0
            left = self._trim(seg, size, end if kept else 0)
            if left is not None:
                sizes[seg] = left
        self.core.load(found, sizes, next_segment,
                       checkpoint.sent_end if checkpoint is not None else (0, 0))
        return refused

    def _trim(self, seg: int, size: int, end: int) -> int | None:
        """The size left on disk of segment `seg` found at start, whose intact entries still
        to send end at `end` (0: none): deleted if nothing (None), else cut after its last
        intact entry. What goes was counted as damage already (or delivered); left there it would
        count against `max_bytes` and be scanned again at every start (a 1.5 GiB segment of
        garbage, issue 18). A failure keeps the file as it is."""
        if end and end >= size:
            return size
        try:
            if not end:
                self.files.unlink_segment(seg)
                return None
            self.files.cut_segment(seg, end)
        except OSError as exc:
            log.warning("spool: cannot remove the damage in %s: %s", fmt.segment_name(seg), exc)
            return size
        return end

    # -- gauges ---------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        return self.core.records

    @property
    def held_bytes(self) -> int:
        return self.core.held_bytes

    @property
    def accepting(self) -> bool:
        """Whether the spool takes chunks now (enabled, healthy, writer keeping up)."""
        return (
            self.state not in (SpoolState.DISABLED, SpoolState.DEGRADED)
            and self.core.unwritten_bytes < self.core.max_unwritten
        )

    @property
    def room(self) -> int:
        """Bytes the spool takes before its size bound makes it drop its oldest records."""
        return self.core.room

    def oldest_seconds(self) -> float:
        oldest = self.core.oldest_time()
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    def disk_bytes(self) -> int:
        return self.core.disk_bytes

    def counters(self) -> dict[str, int | float]:
        s = self.stats
        return {
            "spool_bytes": self.core.held_bytes,
            "spool_records": self.core.records,
            "spool_oldest_seconds": round(self.oldest_seconds(), 1),
            "spool_dropped_records": s.dropped_records,
            "spool_dropped_bytes": s.dropped_bytes,
            "spool_corrupt_entries": s.corrupt_entries,
            "spool_written_bytes": s.written_bytes,
            "spool_resent_records": s.resent_records,
            "spool_dropped_resent_records": s.dropped_resent_records,
        }

    def _set_state(self) -> None:
        if self.state in (SpoolState.DISABLED, SpoolState.DEGRADED):
            return
        self.state = SpoolState.HOLDING if self.core.records else SpoolState.EMPTY

    # -- taking chunks --------------------------------------------------------------------------

    def append(self, lane: int, count: int, spliced: bytes) -> None:
        """Queue one run of spliced records of one lane behind everything held."""
        self.core.append(lane, count, spliced)
        self._set_state()
        self._wake.set()

    def prepend(self, batch: Batch, resent: bool) -> None:
        """A message from memory to send again, before everything held: its write failed, or
        (`resent`) it was written on a stream that ended unconfirmed."""
        for lane, (data, n) in reversed(batch.chunks):
            self.core.prepend(lane, n, data, resent)
        self._set_state()
        self._wake.set()

    # -- giving them back -----------------------------------------------------------------------

    async def read(self, max_bytes: int) -> ReadBatch:
        """Head entries whose records fit `max_bytes` and MESSAGE_BYTES (one entry at least);
        damaged ones are dropped and counted. `commit` or `unread` it."""
        while True:
            taken = self.core.read(max_bytes)
            if not taken:
                return ReadBatch()
            entries = [e for e, _ in taken]
            wanted = [(e.segment, e.offset, e.size) for e, d in taken if d is None]
            try:
                blobs = await asyncio.to_thread(self.files.pread_all, wanted) if wanted else []
            except BaseException:
                self.core.unread(entries)
                raise
            on_disk = iter(blobs)
            raws = [d if d is not None else next(on_disk) for _, d in taken]
            batch = self.core.fetched(entries, raws)
            self._set_state()
            if batch.entries:
                return batch

    def unread(self, batch: ReadBatch) -> None:
        """The batch's message was not written: its entries stay at the head."""
        self.core.unread(batch)

    def commit(self, batch: ReadBatch) -> None:
        """The batch's message was written to the stream: its entries join the trail."""
        self.core.sent(batch)
        self._set_state()
        self._wake.set()

    def unsend(self, batch: ReadBatch) -> int:
        """The stream a committed batch went to ended abnormally: send it again."""
        n = self.core.unsend(batch)
        self._set_state()
        self._wake.set()
        return n

    def confirm(self) -> None:
        """The server ended the stream after our half-close: it read every message."""
        self.core.confirm()
        self._wake.set()

    # -- the writer -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the disk: write what waits, checkpoint, fsync each interval, retry when degraded."""
        if self.state is SpoolState.DISABLED:
            return
        try:
            await self._writer_loop()
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """End `run` between two rounds (orderly exit; `close` then finishes the work)."""
        self._stop = True
        self._wake.set()
        if self.state is not SpoolState.DISABLED:
            await self._stopped.wait()

    async def _writer_loop(self) -> None:
        while not self._stop:
            if self.state is SpoolState.DEGRADED:
                timeout: float | None = max(
                    0.0, RETRY_SECONDS - (time.monotonic() - self._degraded_since)
                )
            elif self._dirty:
                timeout = self.config.fsync_interval
            elif self.core.unwritten:
                timeout = RETRY_SECONDS  # waiting for room (connected at the bound)
            else:
                timeout = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            await self.round()

    async def round(self) -> None:
        """One round of the writer: a step, or a retry when degraded and due."""
        if self.state is SpoolState.DEGRADED:
            if time.monotonic() - self._degraded_since >= RETRY_SECONDS:
                await self._recover()
            return
        try:
            await self.step()
        except OSError as exc:
            self._degrade(f"disk: {exc}")

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        def locked() -> T:
            with self._disk:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def step(self) -> None:
        """One round of the writer: write what waits, delete what was delivered, move the
        checkpoint, fsync when due."""
        await self._write_pending()
        for seg in self.core.releasable():
            await self._io(self.files.unlink_segment, seg)
        # A checkpoint path that is not ours (a symlink or other) is left alone: never
        # replaced by a rename; a crash then sends what is on disk again.
        if self.core.checkpoint_due and not self._checkpoint_refused:
            self.core.checkpoint_due = False
            try:
                await self._io(self.files.write_checkpoint, self.core.checkpoint_position())
            except BaseException:
                self.core.checkpoint_due = True
                raise
        if self._dirty and time.monotonic() - self._last_sync >= self.config.fsync_interval:
            await self.sync()

    async def sync(self) -> None:
        await self._io(self.files.fsync, self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()
        self.stats.fsyncs += 1

    async def _write_pending(self) -> None:
        while self.core.unwritten:
            free = await self._io(self.files.free_bytes)
            plan = self.core.plan_write(free, self.connected())
            if plan is None:
                return
            if isinstance(plan, Refuse):
                raise OSError(errno.ENOSPC, plan.reason)
            if isinstance(plan, RollOp):
                await self._roll(plan)
            elif isinstance(plan, DropOp):
                await self._drop(plan)
            else:
                await self._write(plan)

    async def _roll(self, plan: RollOp) -> None:
        old_fd, self._fd = self._fd, -1
        try:
            self._fd = await self._io(self.files.open_segment, old_fd, plan.segment)
        except FileExistsError:
            self.core.roll_failed(plan.segment)  # a file this process does not know
            return
        except BaseException:
            self.core.roll_failed(plan.segment)
            raise
        self.core.rolled(plan.segment)

    async def _drop(self, plan: DropOp) -> None:
        wanted = [(e.segment, e.offset, e.size) for e in plan.keep]
        blobs = await self._io(self.files.pread_all, wanted) if wanted else []
        kept = self.core.dropped(plan, blobs)
        log.warning("spool: size bound reached, oldest segment dropped (%d agent records kept; "
                    "%d dropped in all)", kept, self.stats.dropped_records)
        await self._io(self.files.unlink_segment, plan.segment)

    async def _write(self, op: WriteOp) -> None:
        """One append. Cancelled meanwhile (the agent's task group failing), the thread goes
        on: its outcome is still reported when it ends (`_inflight`, awaited by `close`), so
        the entries are neither lost nor written twice."""
        self._inflight = asyncio.ensure_future(
            self._io(self.files.append, self._fd, op.blobs, op.start))
        self._inflight.add_done_callback(functools.partial(self._write_ended, op))
        await asyncio.shield(self._inflight)

    def _write_ended(self, op: WriteOp, done: asyncio.Future[None]) -> None:
        self._inflight = None
        if done.cancelled() or done.exception() is not None:
            self.core.write_failed(op)
        else:
            self.core.written(op)
            self._dirty = True
        self._wake.set()

    # -- failure and recovery -------------------------------------------------------------------

    def _degrade(self, reason: str) -> None:
        if self.state is not SpoolState.DEGRADED:
            log.error("spool: %s; keeping records in memory only", reason)
        self.state = SpoolState.DEGRADED
        self._degraded_since = time.monotonic()
        self.health.fault(HEALTH_UNIT, reason, "spool_failures")
        self.core.abandon_segment()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.files.close(self._fd)
        self._fd = -1

    async def _recover(self) -> None:
        try:
            await self._io(self.files.check_dir, True)
            await self._io(self.files.probe)
            await self.step()
            await self.sync()
        except OSError as exc:
            self._degrade(f"disk: {exc}")
            return
        self.state = SpoolState.EMPTY
        self._set_state()
        self.health.clear(HEALTH_UNIT)

    # -- closing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Write everything held to disk, durably (orderly exit); ends within CLOSE_SECONDS
        whatever the disk does."""
        if self.state is SpoolState.DISABLED:
            return
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                if self._inflight is not None:
                    await asyncio.wait([self._inflight])
                await self._io(self.files.check_dir, False)
                self.core.checkpoint_due = True
                await self.step()
                await self.sync()
        except (OSError, TimeoutError) as exc:
            self._degrade(f"disk at exit: {exc or 'no answer'}")
            log.error("spool: %d records could not be kept", len(self.core.unwritten))
        finally:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    self.files.close(self._fd)
                self._fd = -1
