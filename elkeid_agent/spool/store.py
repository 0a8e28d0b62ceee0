"""The spool on disk: segment files under `<work_dir>/spool/`, an index in memory, one writer.

Layout: `NNNNNNNNNNNNNNNN.seg` segment files, appended only, each entry framed and checked by
`spool.format`; `checkpoint` names the first entry not yet delivered. A new process scans
every segment once (intact entries are kept, damage is counted), and appends to a fresh one.

Threads and the event loop. The index (a deque of `Entry`, oldest first) lives on the event
loop and changes only there: `append` adds at the tail at once (the bytes wait in memory),
`read`/`commit` take from the head. The writer task (`run`) moves waiting bytes to disk,
writes the checkpoint, fsyncs and enforces the bounds; every file operation it does runs in
a worker thread, so a slow or failing disk never stalls the loop. An entry whose bytes are
still in memory is read from memory, so a batch can be delivered before it reaches the disk.

Failure. An OSError from the disk (full, read-only, I/O error) or free space below
`min_free_bytes` puts the spool in `degraded`: it takes nothing more (the memory buffer's
backpressure applies again, as without a spool), keeps what it holds, reports the Health
fault `spool`, and retries every `RETRY_SECONDS` until a write succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from elkeid_agent.config import SpoolConfig
from elkeid_agent.fsutil import atomic_write, fsync_dir
from elkeid_agent.health import Health
from elkeid_agent.spool import format as fmt
from elkeid_agent.wire import MAX_MESSAGE_BYTES

T = TypeVar("T")

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
CHECKPOINT_FILE = "checkpoint"
#: Records per message sent from the spool, at most (unless one entry is larger). Small, so
#: that what a server can hold written but unread (its flow-control windows and the socket
#: buffers, which are bytes, not messages) spans several messages the checkpoint trails by.
MESSAGE_BYTES = 1024 * 1024
#: Bytes of the messages written last that the checkpoint stays behind (see `commit`). With
#: the message being written when the process dies, at most one full message's worth
#: (MAX_MESSAGE_BYTES) is sent twice after a crash.
TRAIL_BYTES = MAX_MESSAGE_BYTES - MESSAGE_BYTES
AGENT_LANE = 0
#: How long a degraded spool waits before trying the disk again.
RETRY_SECONDS = 5.0
#: Bytes accepted but not yet on disk; above this the spool takes no more until the writer
#: catches up (the buffer's backpressure holds the rest).
MAX_UNWRITTEN = 16 * 1024 * 1024
HEALTH_UNIT = "spool"


class SpoolState(StrEnum):
    DISABLED = "disabled"
    EMPTY = "empty"
    HOLDING = "holding"
    DEGRADED = "degraded"


def segment_bytes_for(max_bytes: int) -> int:
    """Segments small enough that dropping the oldest one frees a sixteenth of the bound."""
    return max(64 * 1024, min(16 * 1024 * 1024, max_bytes // 16))


@dataclass(slots=True, eq=False)
class Entry:
    lane: int
    count: int
    time: int
    size: int  # encoded bytes, header included
    segment: int = -1  # -1 while the bytes wait in memory
    offset: int = 0
    data: bytes | None = None  # the encoded entry, until it is on disk
    gone: bool = False  # delivered or dropped
    dropped: bool = False  # counted as dropped (undone if it was delivered after all)


@dataclass
class SpoolStats:
    dropped_records: int = 0
    dropped_bytes: int = 0
    corrupt_entries: int = 0
    corrupt_bytes: int = 0
    written_bytes: int = 0
    written_entries: int = 0
    read_bytes: int = 0
    fsyncs: int = 0


@dataclass
class ReadBatch:
    """Head entries read for one message: their spliced records, oldest first."""

    entries: list[Entry] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)

    @property
    def spliced(self) -> bytes:
        return b"".join(self.payloads)

    @property
    def count(self) -> int:
        return sum(e.count for e in self.entries)


class Spool:
    def __init__(self, work_dir: Path, config: SpoolConfig, health: Health) -> None:
        self.directory = Path(work_dir) / SPOOL_DIR
        self.config = config
        self.health = health
        self.segment_bytes = segment_bytes_for(config.max_bytes)
        self.max_unwritten = min(MAX_UNWRITTEN, max(config.max_bytes // 4, 1))
        self.stats = SpoolStats()
        self._index: deque[Entry] = deque()
        # The batches written last (TRAIL_BYTES at most): forgotten, but the checkpoint stays
        # before them until more was written after them or the server ended the stream.
        self._recent: deque[list[Entry]] = deque()
        self._recent_bytes = 0
        self._unconfirmed: list[Entry] = []
        self._unwritten: list[Entry] = []
        self._unwritten_bytes = 0
        self._records = 0
        self._bytes = 0  # encoded bytes of the entries held
        self._segments: dict[int, int] = {}  # id -> file size, oldest first
        self._active = -1  # the segment appended to; -1: start a new one
        self._fd = -1
        self._next_segment = 1
        self._dirty = False  # written since the last fsync
        self._checkpoint_due = False
        self._last_sync = time.monotonic()
        self._degraded_since = 0.0
        self._wake = asyncio.Event()
        self._stop = False
        self._stopped = asyncio.Event()
        # File work runs in threads; one at a time, in the order it was asked for, even when
        # a cancelled coroutine left its thread running (a crash path: the group failed).
        self._disk = threading.Lock()
        self.state = SpoolState.DISABLED if not config.enabled else SpoolState.EMPTY

    # -- start ----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Find what a previous process left: every intact entry after the checkpoint."""
        if not self.config.enabled:
            return
        try:
            found, corrupt, corrupt_bytes = await asyncio.to_thread(self._load)
        except OSError as exc:
            self._degrade(f"cannot open {self.directory}: {exc}")
            return
        for entry in found:
            self._index.append(entry)
            self._records += entry.count
            self._bytes += entry.size
        self.stats.corrupt_entries += corrupt
        self.stats.corrupt_bytes += corrupt_bytes
        if corrupt:
            log.warning("spool: %d damaged regions (%d bytes) dropped", corrupt, corrupt_bytes)
        if found:
            log.info("spool: %d records in %d entries to send first", self._records, len(found))
        self._set_state()

    def _load(self) -> tuple[list[Entry], int, int]:
        self._mkdir()
        for stale in self.directory.glob(".*.new"):
            stale.unlink(missing_ok=True)
        checkpoint = self._read_checkpoint()
        ids = sorted(
            i for i in (fmt.segment_id(p.name) for p in self.directory.iterdir()) if i is not None
        )
        found: list[Entry] = []
        corrupt = corrupt_bytes = 0
        # New segments sort after everything here and after the checkpoint's: a lower id would
        # read as delivered at the next start.
        self._next_segment = max([*ids, checkpoint[0] if checkpoint else 0]) + 1
        for seg in ids:
            path = self.directory / fmt.segment_name(seg)
            if checkpoint is not None and seg < checkpoint[0]:
                path.unlink(missing_ok=True)  # delivered before the last exit
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                # One unreadable file is damage like any other: counted, the rest kept.
                log.error("spool: cannot read %s: %s", path.name, exc)
                corrupt += 1
                continue
            start = checkpoint[1] if checkpoint is not None and seg == checkpoint[0] else 0
            # Scanned from the start (the offset is trusted as a position, not as a boundary
            # to parse from); what lies before the checkpoint was delivered.
            result = fmt.scan(data, 0)
            corrupt += result.corrupt
            corrupt_bytes += result.corrupt_bytes
            for head in result.entries:
                if head.offset >= start:
                    found.append(Entry(head.lane, head.count, head.time, head.size, seg,
                                       head.offset))
            self._segments[seg] = len(data)
        return found, corrupt, corrupt_bytes

    def _mkdir(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _read_checkpoint(self) -> tuple[int, int] | None:
        try:
            return fmt.decode_checkpoint((self.directory / CHECKPOINT_FILE).read_bytes())
        except FileNotFoundError:
            return None

    # -- gauges ---------------------------------------------------------------------------------

    @property
    def records(self) -> int:
        return self._records

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def accepting(self) -> bool:
        """Whether the spool takes chunks now (enabled, healthy, writer keeping up)."""
        return (
            self.state not in (SpoolState.DISABLED, SpoolState.DEGRADED)
            and self._unwritten_bytes < self.max_unwritten
        )

    @property
    def room(self) -> int:
        """Bytes the spool takes before its size bound makes it drop its oldest records."""
        return self.config.max_bytes - self.disk_bytes() - self._unwritten_bytes

    def oldest_seconds(self) -> float:
        return max(0.0, time.time() - self._index[0].time) if self._index else 0.0

    def disk_bytes(self) -> int:
        return sum(self._segments.values())

    def counters(self) -> dict[str, int | float]:
        s = self.stats
        return {
            "spool_bytes": self._bytes,
            "spool_records": self._records,
            "spool_oldest_seconds": round(self.oldest_seconds(), 1),
            "spool_dropped_records": s.dropped_records,
            "spool_dropped_bytes": s.dropped_bytes,
            "spool_corrupt_entries": s.corrupt_entries,
            "spool_written_bytes": s.written_bytes,
        }

    def _set_state(self) -> None:
        if self.state in (SpoolState.DISABLED, SpoolState.DEGRADED):
            return
        self.state = SpoolState.HOLDING if self._index else SpoolState.EMPTY

    # -- taking chunks --------------------------------------------------------------------------

    def append(self, lane: int, count: int, spliced: bytes) -> None:
        """Queue one run of spliced records of one lane behind everything held."""
        now = int(time.time())
        data = fmt.encode_entry(lane, count, now, spliced)
        entry = Entry(lane, count, now, len(data), data=data)
        self._index.append(entry)
        self._unwritten.append(entry)
        self._unwritten_bytes += entry.size
        self._records += count
        self._bytes += entry.size
        self._set_state()
        self._wake.set()

    # -- giving them back -----------------------------------------------------------------------

    async def read(self, max_bytes: int) -> ReadBatch:
        """Head entries whose records fit `max_bytes` and MESSAGE_BYTES (one entry at least);
        damaged ones are dropped and counted."""
        max_bytes = min(max_bytes, MESSAGE_BYTES)
        while True:
            batch = ReadBatch()
            size = 0
            for entry in self._index:
                if entry.gone:
                    continue
                payload = entry.size - fmt.HEADER_BYTES
                if batch.entries and size + payload > max_bytes:
                    break
                batch.entries.append(entry)
                size += payload
            if not batch.entries:
                return batch
            # The writer may move an entry to disk meanwhile: use the bytes seen now.
            held = [e.data for e in batch.entries]
            wanted = [(e.segment, e.offset, e.size) for e, d in zip(batch.entries, held,
                                                                      strict=True) if d is None]
            blobs = await self._io(self._pread_all, wanted) if wanted else []
            on_disk = iter(blobs)
            bad: list[Entry] = []
            for entry, data in zip(batch.entries, held, strict=True):
                raw = data if data is not None else next(on_disk)
                decoded = fmt.decode_entry(raw) if raw is not None else None
                if decoded is None or entry.gone:
                    bad.append(entry)
                else:
                    batch.payloads.append(decoded[1])
            if not bad:
                self.stats.read_bytes += size
                return batch
            for entry in bad:
                if not entry.gone:
                    self.stats.corrupt_entries += 1
                    log.warning("spool: entry at %s:%d unreadable, dropped", entry.segment,
                                entry.offset)
                    self._forget(entry)

    def _pread_all(self, wanted: list[tuple[int, int, int]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        fds: dict[int, int] = {}
        try:
            for seg, offset, size in wanted:
                try:
                    if seg not in fds:
                        fds[seg] = os.open(self.directory / fmt.segment_name(seg),
                                           os.O_RDONLY | os.O_CLOEXEC)
                    out.append(os.pread(fds[seg], size, offset))
                except OSError as exc:
                    log.warning("spool: cannot read segment %d: %s", seg, exc)
                    out.append(None)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def commit(self, batch: ReadBatch) -> None:
        """The batch was written to the stream: forget its entries, move the checkpoint.

        The protocol has no acknowledgements, and a written message may still wait unread in
        the server's buffers when this process dies. So the checkpoint trails by the messages
        written last, TRAIL_BYTES of them: after a crash they are sent again (duplicates) rather
        than lost. `confirm` ends the wait when the server has provably read them.
        """
        trailed = [e for e in batch.entries if e.segment >= 0]
        self._recent.append(trailed)
        self._recent_bytes += sum(e.size for e in trailed)
        # The newest message always stays: one entry may alone be larger than TRAIL_BYTES.
        while len(self._recent) > 1 and self._recent_bytes > TRAIL_BYTES:
            self._recent_bytes -= sum(e.size for e in self._recent.popleft())
        self._unconfirmed = [e for entries in self._recent for e in entries]
        for entry in batch.entries:
            if entry.dropped:
                # Dropped at the bound while on its way, and delivered all the same.
                entry.dropped = False
                self.stats.dropped_records -= entry.count
                self.stats.dropped_bytes -= entry.size
            elif not entry.gone:
                self._forget(entry)
        self._checkpoint_due = True
        self._checkpoint_now()
        self._wake.set()

    def _checkpoint_now(self) -> None:
        """Write the checkpoint at once when the disk is free (a few µs to the page cache).

        Left to the writer, it could lag a message or more behind on a busy host, and a SIGKILL
        then would send those messages again. When the writer holds the disk it writes the
        checkpoint itself next; the loop never waits for it.
        """
        if self.state is SpoolState.DEGRADED or not self._disk.acquire(blocking=False):
            return
        try:
            self._write_checkpoint(self._checkpoint_position())
            self._checkpoint_due = False
        except OSError as exc:
            self._degrade(f"disk: {exc}")
        finally:
            self._disk.release()

    def confirm(self) -> None:
        """The server ended the stream after our half-close: it read every message."""
        self._recent.clear()
        self._recent_bytes = 0
        self._unconfirmed = []
        self._checkpoint_due = True
        self._wake.set()

    def _forget(self, entry: Entry) -> None:
        entry.gone = True
        entry.data = None
        self._records -= entry.count
        self._bytes -= entry.size
        while self._index and self._index[0].gone:
            self._index.popleft()
        self._set_state()

    # -- the writer -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the disk: write what waits, checkpoint, fsync each interval, retry when degraded."""
        if self.state is SpoolState.DISABLED:
            return
        interval = self.config.fsync_interval
        try:
            await self._writer_loop(interval)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """End `run` between two rounds (orderly exit; `close` then finishes the work)."""
        self._stop = True
        self._wake.set()
        if self.state is not SpoolState.DISABLED:
            await self._stopped.wait()

    async def _writer_loop(self, interval: float) -> None:
        while not self._stop:
            if self.state is SpoolState.DEGRADED:
                timeout: float | None = max(
                    0.0, RETRY_SECONDS - (time.monotonic() - self._degraded_since)
                )
            else:
                timeout = interval if self._dirty else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            if self.state is SpoolState.DEGRADED:
                if time.monotonic() - self._degraded_since >= RETRY_SECONDS:
                    await self._recover()
                continue
            try:
                await self.step()
            except OSError as exc:
                self._degrade(f"disk: {exc}")

    async def step(self) -> None:
        """One round of the writer (also called directly when closing)."""
        await self._write_unwritten()
        await self._release_delivered()
        if self._checkpoint_due:
            self._checkpoint_due = False
            position = self._checkpoint_position()
            await self._io(self._write_checkpoint, position)
        if self._dirty and time.monotonic() - self._last_sync >= self.config.fsync_interval:
            await self.sync()

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        def locked() -> T:
            with self._disk:
                return fn(*args)

        return await asyncio.to_thread(locked)

    async def sync(self) -> None:
        fd = self._fd
        await self._io(self._fsync, fd)
        self._dirty = False
        self._last_sync = time.monotonic()
        self.stats.fsyncs += 1

    def _fsync(self, fd: int) -> None:
        if fd >= 0:
            os.fsync(fd)
        fsync_dir(self.directory)

    async def _write_unwritten(self) -> None:
        """Move the bytes waiting in memory to disk, a segment's worth at a time."""
        while True:
            self._unwritten = [e for e in self._unwritten if not e.gone]
            self._unwritten_bytes = sum(e.size for e in self._unwritten)
            if not self._unwritten:
                return
            too_big = [e for e in self._unwritten if e.size > self.config.max_bytes // 2]
            for entry in too_big:
                # Larger than the spool can ever hold beside anything else: dropped, counted.
                self._forget(entry)
                self._count_dropped(entry)
            if too_big:
                continue
            pending: list[Entry] = []
            size = 0
            for entry in self._unwritten:
                if pending and size + entry.size > self.segment_bytes:
                    break
                pending.append(entry)
                size += entry.size
            await self._make_room(size)
            if self._active < 0 or self._segments.get(self._active, 0) >= self.segment_bytes:
                await self._roll()
            # An entry sent from memory and forgotten during those awaits has no bytes left:
            # leave it out, or every entry after it would get a wrong offset.
            pending = [e for e in pending if e.data is not None]
            if not pending:
                continue
            seg = self._active
            start = self._segments[seg]
            blob = b"".join(e.data for e in pending if e.data is not None)
            self._segments[seg] = start + len(blob)
            try:
                await self._io(self._append_blob, self._fd, blob, start)
            except OSError:
                self._segments[seg] = start
                raise
            finally:
                # Also when cancelled: the thread goes on writing, so never write these twice.
                if self._segments[seg] != start:
                    offset = start
                    for entry in pending:
                        entry.segment, entry.offset, entry.data = seg, offset, None
                        offset += entry.size
            self.stats.written_bytes += len(blob)
            self.stats.written_entries += len(pending)
            written = {id(e) for e in pending}
            self._unwritten = [e for e in self._unwritten if id(e) not in written]
            self._dirty = True

    def _append_blob(self, fd: int, blob: bytes, start: int) -> None:
        view = memoryview(blob)
        try:
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[written:]
        except OSError:
            # Leave no torn entry behind if the disk lets us; the scan would count it anyway.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise

    async def _roll(self) -> None:
        """Close the active segment and start the next one."""
        old_fd, seg = self._fd, self._next_segment
        self._fd, self._active = -1, -1
        while True:
            self._next_segment = seg + 1
            try:
                self._fd = await self._io(self._open_segment, old_fd, seg)
                break
            except FileExistsError:
                old_fd = -1  # closed by the first attempt
                seg += 1  # a file this process does not know (it could not list them all)
        self._active = seg
        self._segments[seg] = 0

    def _open_segment(self, old_fd: int, seg: int) -> int:
        if old_fd >= 0:
            os.fsync(old_fd)
            os.close(old_fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        return os.open(self.directory / fmt.segment_name(seg), flags, 0o600)

    async def _make_room(self, incoming: int) -> None:
        """Drop the oldest segments until `incoming` bytes fit both bounds."""
        while True:
            over = self.disk_bytes() + incoming - self.config.max_bytes
            free = await self._io(_free_bytes, self.directory)
            short = self.config.min_free_bytes + incoming - free
            if over <= 0 and short <= 0:
                return
            if not await self._drop_oldest():
                reason = "size bound" if over > 0 else "free space below min_free_bytes"
                raise OSError(errno.ENOSPC, f"no room for {incoming} bytes ({reason})")

    async def _drop_oldest(self) -> bool:
        """Delete the oldest segment; its plugin records are counted as dropped, the agent's
        own records are written again at the tail (unless the segment holds nothing else)."""
        candidates = [s for s in self._segments if s != self._active]
        if not candidates:
            if self._active < 0 or not self._segments.get(self._active):
                return False
            await self._roll()
            return await self._drop_oldest()
        seg = min(candidates)
        held = [e for e in self._index if e.segment == seg and not e.gone]
        keep = [e for e in held if e.lane == AGENT_LANE]
        if len(keep) == len(held):
            keep = []
        blobs = await self._io(
            self._pread_all, [(e.segment, e.offset, e.size) for e in keep]
        ) if keep else []
        for entry in held:
            self._forget(entry)
            if entry not in keep:
                self._count_dropped(entry)
        dropped = sum(e.count for e in held if e not in keep)
        if dropped:
            log.warning("spool: size bound reached, %d oldest records dropped", dropped)
        del self._segments[seg]
        await self._io((self.directory / fmt.segment_name(seg)).unlink, True)
        for entry, blob in zip(keep, blobs, strict=True):
            decoded = fmt.decode_entry(blob) if blob is not None else None
            if decoded is not None:
                self.append(entry.lane, entry.count, decoded[1])
        return True

    def _count_dropped(self, entry: Entry) -> None:
        entry.dropped = True
        self.stats.dropped_records += entry.count
        self.stats.dropped_bytes += entry.size

    async def _release_delivered(self) -> None:
        """Delete the segments before the oldest entry still held on disk."""
        needed = next((e.segment for e in self._index if not e.gone and e.segment >= 0), None)
        if self._unconfirmed:
            needed = self._unconfirmed[0].segment
        done = [s for s in self._segments if s != self._active and (needed is None or s < needed)]
        for seg in done:
            del self._segments[seg]
            await self._io((self.directory / fmt.segment_name(seg)).unlink, True)

    def _checkpoint_position(self) -> tuple[int, int]:
        for entry in self._unconfirmed:
            if entry.segment in self._segments:
                return entry.segment, entry.offset
        for entry in self._index:
            if not entry.gone and entry.segment >= 0:
                return entry.segment, entry.offset
        # Everything on disk was delivered: the position is the active segment's end.
        return max(self._active, 0), self._segments.get(self._active, 0)

    def _write_checkpoint(self, position: tuple[int, int]) -> None:
        atomic_write(self.directory / CHECKPOINT_FILE, fmt.encode_checkpoint(*position),
                     durable=False)

    # -- failure and recovery -------------------------------------------------------------------

    def _degrade(self, reason: str) -> None:
        if self.state is not SpoolState.DEGRADED:
            log.error("spool: %s; keeping records in memory only", reason)
        self.state = SpoolState.DEGRADED
        self._degraded_since = time.monotonic()
        self.health.fault(HEALTH_UNIT, reason, "spool_failures")
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1
        self._active = -1  # never append after a failed write: a new segment next time

    async def _recover(self) -> None:
        try:
            await self._io(self._mkdir)
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
        """Write everything held to disk, durably (orderly exit)."""
        if self.state is SpoolState.DISABLED:
            return
        try:
            if self.state is SpoolState.DEGRADED:
                self.state = SpoolState.EMPTY
                self._set_state()
            self._checkpoint_due = True
            await self.step()
            await self.sync()
        except OSError as exc:
            self._degrade(f"disk at exit: {exc}")
            log.error("spool: %d records could not be kept", len(self._unwritten))
        finally:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
