"""The spool's state and policy, sans-IO: operations in, actions out, no awaits.

`SpoolCore` holds the index (the entries held, oldest first), the trail (entries written to a
stream and not yet known to be read), the bytes waiting for the disk, the segment sizes, the
bounds, the drop policy and the checkpoint position. It never touches a file: the owner
(`spool/store.py`) asks it what to do next (`plan_write`), does the file work in a thread and
reports the outcome (`written`, `write_failed`, `dropped`). Every operation
runs to completion on the event loop, so no decision is taken on a list that changed meanwhile.

An entry's life: HELD (in the index) -> SENDING (read for a message) -> TRAILED (the message
was written) -> gone, once the trail passes it or the server confirms. A stream that ends
abnormally puts trailed entries back at the head (`unsend`): what the server may not have read
is sent again. An entry keeps its bytes in memory until they are on disk, whatever its state.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from elkeid_agent.spool import format as fmt

AGENT_LANE = 0


class EntryState(Enum):
    HELD = 1
    SENDING = 2
    TRAILED = 3
    GONE = 4


@dataclass(slots=True, eq=False)
class Entry:
    lane: int
    count: int
    time: int
    size: int  # encoded bytes, header included
    segment: int = -1  # -1 while the bytes wait in memory
    offset: int = 0
    data: bytes | None = None  # the encoded entry, until it is on disk
    state: EntryState = EntryState.HELD
    dropped: bool = False  # counted as dropped (undone if its message was written after all)
    resent: bool = False  # written once on a stream that ended: perhaps delivered already


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
    resent_records: int = 0
    #: Dropped records that had been written to a stream (one that ended, or while the drop
    #: was under way): each may or may not have reached the server, so they are not in
    #: `dropped_records`.
    dropped_resent_records: int = 0


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


@dataclass(frozen=True)
class WriteOp:
    """Append `entries` (their bytes, in order) to segment `segment` at `start`."""

    segment: int
    start: int
    entries: list[Entry]

    @property
    def blobs(self) -> list[bytes]:
        """The entries' bytes, to be written as they are (not joined: a copy the memory
        budget does not count)."""
        return [e.data for e in self.entries if e.data is not None]


@dataclass(frozen=True)
class RollOp:
    """Open segment `segment` (a new file) for appending; close the previous one."""

    segment: int


@dataclass(frozen=True)
class DropOp:
    """Delete segment `segment` once the agent records `keep` were read back from it."""

    segment: int
    keep: list[Entry]


@dataclass(frozen=True)
class Refuse:
    """No room that may be made: the spool takes nothing until the owner retries."""

    reason: str


#: The owner waits: connected at the size bound (the drain will free room), or nothing to do.
Wait = None
Plan = WriteOp | RollOp | DropOp | Refuse | None


class SpoolCore:
    def __init__(self, max_bytes: int, min_free_bytes: int, segment_bytes: int,
                 max_unwritten: int, trail_bytes: int, message_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.segment_bytes = segment_bytes
        self.max_unwritten = max_unwritten
        self.trail_bytes = trail_bytes
        self.message_bytes = message_bytes
        self.stats = SpoolStats()
        self.index: deque[Entry] = deque()
        # Batches written to a stream, oldest first, TRAIL_BYTES at most (the newest always).
        self.trail: deque[list[Entry]] = deque()
        self._trail_size = 0
        self.unwritten: deque[Entry] = deque()
        self.unwritten_bytes = 0
        self.records = 0  # of the entries held (HELD and SENDING)
        self.held_bytes = 0
        self.segments: dict[int, int] = {}  # id -> bytes, oldest first
        self.active = -1  # the segment appended to; -1: open a new one first
        self.next_segment = 1
        self.writing: WriteOp | None = None
        self.checkpoint_due = False

    # -- start ------------------------------------------------------------------------------

    def load(self, found: Iterable[Entry], segments: dict[int, int], next_segment: int,
             sent_end: tuple[int, int] = (0, 0)) -> None:
        """What a previous process left; entries before `sent_end` were written to a stream
        then (perhaps delivered: a drop counts them apart)."""
        for entry in found:
            entry.resent = (entry.segment, entry.offset) < sent_end
            self.index.append(entry)
            self.records += entry.count
            self.held_bytes += entry.size
        self.segments.update(sorted(segments.items()))
        self.next_segment = max(self.next_segment, next_segment)

    # -- gauges -----------------------------------------------------------------------------

    @property
    def disk_bytes(self) -> int:
        return sum(self.segments.values())

    @property
    def room(self) -> int:
        return self.max_bytes - self.disk_bytes - self.unwritten_bytes

    def oldest_time(self) -> int | None:
        return self.index[0].time if self.index else None

    # -- taking records ---------------------------------------------------------------------

    def append(self, lane: int, count: int, spliced: bytes, now: int | None = None) -> Entry:
        """Queue one run of spliced records behind everything held."""
        stamp = int(time.time()) if now is None else now
        data = fmt.encode_entry(lane, count, stamp, spliced)
        entry = Entry(lane, count, stamp, len(data), data=data)
        self.index.append(entry)
        self._hold(entry)
        return entry

    def prepend(self, lane: int, count: int, spliced: bytes, resent: bool,
                now: int | None = None) -> Entry:
        """Queue records older than everything held (a message from memory whose write
        failed, or `resent`: written on a stream that ended): they go first."""
        stamp = int(time.time()) if now is None else now
        data = fmt.encode_entry(lane, count, stamp, spliced)
        entry = Entry(lane, count, stamp, len(data), data=data, resent=resent)
        self.index.appendleft(entry)
        self._hold(entry)
        return entry

    def _hold(self, entry: Entry) -> None:
        self.unwritten.append(entry)
        self.unwritten_bytes += entry.size
        self.records += entry.count
        self.held_bytes += entry.size

    # -- giving them back -------------------------------------------------------------------

    def read(self, max_bytes: int) -> list[tuple[Entry, bytes | None]]:
        """Head entries for one message (one at least), now SENDING, each with its bytes when
        they are still in memory (else the owner reads them at `segment`, `offset`)."""
        max_bytes = min(max_bytes, self.message_bytes)
        out: list[tuple[Entry, bytes | None]] = []
        size = 0
        for entry in self.index:
            if entry.state is not EntryState.HELD:
                if entry.state is EntryState.SENDING:
                    break  # another read is out: one message at a time
                continue
            payload = entry.size - fmt.HEADER_BYTES
            if out and size + payload > max_bytes:
                break
            entry.state = EntryState.SENDING
            out.append((entry, entry.data))
            size += payload
        return out

    def fetched(self, entries: list[Entry], raws: list[bytes | None]) -> ReadBatch:
        """The bytes of a read: damaged entries are dropped and counted; entries dropped at the
        bound meanwhile are left out (already counted)."""
        batch = ReadBatch()
        for entry, raw in zip(entries, raws, strict=True):
            if entry.state is not EntryState.SENDING:
                continue
            decoded = fmt.decode_entry(raw) if raw is not None else None
            if decoded is None:
                self.stats.corrupt_entries += 1
                self._remove(entry)
                continue
            batch.entries.append(entry)
            batch.payloads.append(decoded[1])
        self.stats.read_bytes += sum(len(p) for p in batch.payloads)
        return batch

    def unread(self, batch: ReadBatch | list[Entry]) -> None:
        """The message was not written: its entries are held again, still at the head."""
        for entry in batch.entries if isinstance(batch, ReadBatch) else batch:
            if entry.state is EntryState.SENDING:
                entry.state = EntryState.HELD

    def sent(self, batch: ReadBatch) -> None:
        """The message was written to the stream: its entries move to the trail."""
        trailed: list[Entry] = []
        for entry in batch.entries:
            if entry.dropped and not entry.resent:
                # Dropped at the bound while on its way, and written all the same: it may
                # have arrived, so it is counted with the records nobody knows about.
                self.stats.dropped_records -= entry.count
                self.stats.dropped_bytes -= entry.size
                self.stats.dropped_resent_records += entry.count
            entry.dropped = False
            if entry.state is EntryState.SENDING:
                self._release_held(entry)
                entry.state = EntryState.TRAILED
                trailed.append(entry)
        self._pop_head()
        if trailed:
            self.trail.append(trailed)
            self._trail_size += sum(e.size for e in trailed)
        while len(self.trail) > 1 and self._trail_size > self.trail_bytes:
            for entry in self.trail.popleft():
                self._trail_size -= entry.size
                if entry.state is EntryState.TRAILED:
                    self._discard(entry)
        self.checkpoint_due = True

    def unsend(self, batch: ReadBatch) -> int:
        """The stream this batch was written to ended abnormally: what of it the trail still
        holds goes back to the head, to be sent again. The records put back."""
        back = [e for e in batch.entries if e.state is EntryState.TRAILED]
        if not back:
            return 0
        ids = {id(e) for e in back}
        trail: deque[list[Entry]] = deque()
        for entries in self.trail:
            rest = [e for e in entries if id(e) not in ids]
            if rest:
                trail.append(rest)
        self.trail = trail
        self._trail_size = sum(e.size for entries in trail for e in entries)
        for entry in reversed(back):
            entry.state = EntryState.HELD
            entry.resent = True
            self.index.appendleft(entry)
            self.records += entry.count
            self.held_bytes += entry.size
        n = sum(e.count for e in back)
        self.stats.resent_records += n
        self.checkpoint_due = True
        return n

    def confirm(self) -> None:
        """The server read every message written (it ended the stream after our half-close)."""
        for entries in self.trail:
            for entry in entries:
                if entry.state is EntryState.TRAILED:
                    self._discard(entry)
        self.trail.clear()
        self._trail_size = 0
        self.checkpoint_due = True

    def _release_held(self, entry: Entry) -> None:
        self.records -= entry.count
        self.held_bytes -= entry.size

    def _remove(self, entry: Entry) -> None:
        """A held entry leaves the spool for good (damaged, dropped)."""
        if entry.state in (EntryState.HELD, EntryState.SENDING):
            self._release_held(entry)
        self._discard(entry)
        self._pop_head()

    def _discard(self, entry: Entry) -> None:
        entry.state = EntryState.GONE
        entry.data = None
        self.checkpoint_due = True

    def _pop_head(self) -> None:
        while self.index and self.index[0].state in (EntryState.GONE, EntryState.TRAILED):
            self.index.popleft()
        if any(e.state in (EntryState.GONE, EntryState.TRAILED) for e in self.index):
            # An entry left from the middle (a drop or damage): compact.
            self.index = deque(e for e in self.index
                               if e.state in (EntryState.HELD, EntryState.SENDING))

    # -- the disk ---------------------------------------------------------------------------

    def _pending(self) -> list[Entry]:
        """The unwritten entries still wanted, oldest first (the rest leave the queue)."""
        while self.unwritten and self.unwritten[0].state is EntryState.GONE:
            self.unwritten_bytes -= self.unwritten.popleft().size
        if any(e.state is EntryState.GONE for e in self.unwritten):
            kept = deque(e for e in self.unwritten if e.state is not EntryState.GONE)
            self.unwritten_bytes = sum(e.size for e in kept)
            self.unwritten = kept
        return list(self.unwritten)

    def plan_write(self, free_bytes: int, connected: bool) -> Plan:
        """The next step towards writing what waits: a write, a roll, a drop, a refusal, or
        nothing (nothing waits, or connected at the size bound: the drain frees room)."""
        if self.writing is not None:
            return Wait
        pending = self._pending()
        if not pending:
            return Wait
        for entry in pending:
            if entry.size > self.max_bytes // 2 and entry.state is EntryState.HELD:
                # Larger than the spool can ever hold beside anything else: dropped, counted.
                self._count_dropped(entry)
                self._remove(entry)
                return self.plan_write(free_bytes, connected)
        batch: list[Entry] = []
        size = 0
        for entry in pending:
            if batch and size + entry.size > self.segment_bytes:
                break
            batch.append(entry)
            size += entry.size
        if free_bytes - size < self.min_free_bytes:
            # Never deletes what it holds for a shortfall it may not have caused.
            return Refuse(f"free space below min_free_bytes ({free_bytes} bytes free)")
        if self.disk_bytes + size > self.max_bytes:
            if connected:
                return Wait
            drop = self._plan_drop()
            if drop is not None:
                return drop
            return Refuse(f"no room for {size} bytes within max_bytes")
        if self.active < 0 or self.segments.get(self.active, 0) >= self.segment_bytes:
            seg = self.next_segment
            self.next_segment += 1
            return RollOp(seg)
        op = WriteOp(self.active, self.segments[self.active], batch)
        self.writing = op
        return op

    def rolled(self, segment: int) -> None:
        self.active = segment
        self.segments[segment] = 0

    def roll_failed(self, segment: int) -> None:
        """The open failed; a file of that name (one this process does not know) is skipped."""
        self.active = -1
        self.next_segment = max(self.next_segment, segment + 1)

    def written(self, op: WriteOp) -> None:
        offset = op.start
        for entry in op.entries:
            entry.segment, entry.offset = op.segment, offset
            entry.data = None
            offset += entry.size
        self.segments[op.segment] = offset
        self.stats.written_bytes += offset - op.start
        self.stats.written_entries += len(op.entries)
        done = {id(e) for e in op.entries}
        self.unwritten = deque(e for e in self.unwritten if id(e) not in done)
        self.unwritten_bytes = sum(e.size for e in self.unwritten)
        self.writing = None
        self.checkpoint_due = True

    def write_failed(self, op: WriteOp) -> None:
        """The write failed (the owner truncated what it could): the entries keep their bytes
        and the segment takes no more appends."""
        self.writing = None
        self.active = -1

    def _plan_drop(self) -> DropOp | None:
        """The oldest segment goes: its plugin records counted as dropped at once, its agent
        records read back and written again at the tail (unless it holds nothing else)."""
        candidates = [s for s in self.segments if s != self.active]
        if not candidates:
            if self.active >= 0 and self.segments.get(self.active):
                self.active = -1  # roll first: the full active segment becomes the oldest
                return self._plan_drop()
            return None
        seg = min(candidates)
        held = [e for e in self.index if e.segment == seg]
        keep = [e for e in held if e.lane == AGENT_LANE and e.state is EntryState.HELD]
        if len(keep) == len(held):
            keep = []
        dropped = 0
        for entry in held:
            if entry in keep:
                self._release_held(entry)
                entry.state = EntryState.GONE  # re-appended by `dropped`
                continue
            self._count_dropped(entry)
            dropped += entry.count
            self._remove(entry)
        for entries in self.trail:
            for entry in entries:
                if entry.segment == seg and entry.state is EntryState.TRAILED:
                    entry.state = EntryState.GONE  # can no longer be sent again
        self._pop_head()
        del self.segments[seg]
        self.checkpoint_due = True
        return DropOp(seg, keep)

    def dropped(self, op: DropOp, raws: list[bytes | None]) -> int:
        """The agent records of a dropped segment, read back: written again at the tail."""
        for entry, raw in zip(op.keep, raws, strict=True):
            decoded = fmt.decode_entry(raw) if raw is not None else None
            if decoded is None:
                self._count_dropped(entry)
            else:
                self.append(entry.lane, entry.count, decoded[1], now=entry.time).resent = (
                    entry.resent)
        return sum(e.count for e in op.keep)

    def _count_dropped(self, entry: Entry) -> None:
        entry.dropped = True
        if entry.resent:
            self.stats.dropped_resent_records += entry.count
            return
        self.stats.dropped_records += entry.count
        self.stats.dropped_bytes += entry.size

    def releasable(self) -> list[int]:
        """Segments nothing held or trailed needs any more (deleted by the owner)."""
        needed = {e.segment for e in self.index if e.segment >= 0}
        needed.update(e.segment for entries in self.trail for e in entries
                      if e.state is EntryState.TRAILED and e.segment >= 0)
        if self.writing is not None:
            needed.add(self.writing.segment)
        low = min(needed, default=None)
        done = [s for s in self.segments if s != self.active and (low is None or s < low)]
        for seg in done:
            del self.segments[seg]
        return done

    def checkpoint_position(self) -> tuple[int, int, tuple[int, int]]:
        """The first position on disk still needed (held or trailed entries, or the end of
        what was written; entries before it were delivered), and the end of the entries on
        disk that were written to a stream (trailed, on their way, or sent again): a
        process that starts from this checkpoint counts a drop of those apart."""
        positions = [(e.segment, e.offset) for e in self.index if e.segment >= 0]
        trailed = [e for entries in self.trail for e in entries
                   if e.state is EntryState.TRAILED and e.segment >= 0]
        positions += [(e.segment, e.offset) for e in trailed]
        sent = [e for e in self.index
                if e.segment >= 0 and (e.resent or e.state is EntryState.SENDING)] + trailed
        if positions:
            first = min(positions)
        elif self.active >= 0:
            first = (self.active, self.segments.get(self.active, 0))
        else:
            # No segment open: every file there is was delivered, and new ones sort after this.
            first = (self.next_segment, 0)
        end = max(((e.segment, e.offset + e.size) for e in sent), default=first)
        return first[0], first[1], end

    def abandon_segment(self) -> None:
        """A disk error: the next write starts a new segment."""
        self.active = -1
