"""RecordBuffer: the one queue between record producers and the transfer stream.

Rules:
* Bounded by bytes, not by count: records range from a few bytes to megabytes.
* Three lanes, taken in order: the agent's own records (1000/1001/1010/5100), plugin urgent records
  (fd 5), plugin records (fd 4). The agent lane has its own budget, so plugin data can never push
  the agent's own records out, and it never blocks its producers (log handlers, heartbeats): when
  it overflows its oldest records go, counted.
* One memory budget (`max_bytes`, `[buffer] max_bytes`) covers the record bytes the agent holds
  outside the agent lane: the plugin lanes' queued chunks, the messages being written
  (`hold`: the send loop's message and grpc's copy of it), the messages written and kept to
  be sent again if the stream ends (`hold_sent`: the transfer loop's trail), the frames plugins
  are half-way through writing (`partial`) and whatever else the owner counts in
  (`count_also`: the spool's queue of bytes not yet on disk). Plugin producers wait when it
  is spent (their readers stop reading the pipe, and the plugin's own writes then block):
  backpressure instead of drops. Every wait is counted (`backpressure_waits`,
  `backpressure_seconds`).
* A batch whose write failed goes back to the front, so records queued while disconnected leave
  oldest first after reconnecting.
* `take` can be limited to some lanes: with a spool backlog the send loop takes the agent lane
  alone, and the spooler moves the oldest chunks of any lane to disk.

No sockets here: only asyncio.Event for waiting, so tests drive it without any I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from elkeid_agent.wire import Frames, splice_records, unsplice

#: The memory budget for plugin records (see the module doc). The frozen agent must stay under
#: 100 MiB RSS whatever plugins and the server do: about 30 MiB of that (50 under `python -m`)
#: is the agent at rest; the rest is this budget, grpc's copy of the message being taken
#: (up to 8 MiB: what is queued was counted once, the write counts it twice) and the copies it
#: cannot see (a big frame cut out of the pipe's bytes, the spool's own copies, glibc's free
#: memory). Peak RSS with 60 frames of 8 MiB and with 15 s floods against a slow (120,000
#: records/s) and a fast server: 86, 95, 95 MiB under `python -m` (199-214, 180, 184 before);
#: 92, 100, 109 MiB frozen, whose launchers count too (bench/record_memory.py). With the
#: trail counted and 2 MiB messages from memory: 97.5, 81.9, 85.0 MiB frozen (98.2, 108.3,
#: 117.5 before, in the same session).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_AGENT_LANE_BYTES = 4 * 1024 * 1024

#: A queued chunk: PackagedData field-1 entries for `count` records, spliced once.
Chunk = tuple[bytes, int]


class Lane(IntEnum):
    AGENT = 0
    URGENT = 1
    PLUGIN = 2


ALL_LANES = (Lane.AGENT, Lane.URGENT, Lane.PLUGIN)


@dataclass
class Batch:
    """Chunks taken for one message, in lane order."""

    chunks: list[tuple[Lane, Chunk]]

    @property
    def spliced(self) -> bytes:
        """The message's field-1 bytes (append the header for a PackagedData)."""
        return b"".join(data for _, (data, _n) in self.chunks)

    def message(self, header: bytes) -> bytes:
        """The PackagedData: the chunks and the header joined in one copy.

        The chunks then point into the message (memoryviews), so that while it is written
        their bytes are not held a second time; `RecordBuffer.requeue` copies them back out
        if the write fails.
        """
        message = b"".join([*(data for _, (data, _n) in self.chunks), header])
        view = memoryview(message)
        pos = 0
        chunks: list[tuple[Lane, Chunk]] = []
        for lane, (data, n) in self.chunks:
            chunks.append((lane, (view[pos : pos + len(data)], n)))  # type: ignore[arg-type]
            pos += len(data)
        self.chunks = chunks
        return message

    @property
    def count(self) -> int:
        return sum(n for _, (_data, n) in self.chunks)

    @property
    def per_lane(self) -> tuple[int, int, int]:
        counts = [0, 0, 0]
        for lane, (_data, n) in self.chunks:
            counts[lane] += n
        return counts[0], counts[1], counts[2]

    @property
    def records(self) -> list[bytes]:
        return unsplice(self.spliced)


@dataclass
class BufferStats:
    """Counters reported in the heartbeat (all monotonic except the gauges)."""

    queued_records: int = 0
    queued_bytes: int = 0
    dropped_agent_overflow: int = 0
    dropped_oversize: int = 0
    backpressure_waits: int = 0
    backpressure_seconds: float = 0.0
    #: Gauges: bytes of messages being written (with grpc's copy), of messages written and
    #: kept to be sent again, and of half-read frames.
    in_flight_bytes: int = 0
    sent_kept_bytes: int = 0
    partial_bytes: int = 0
    #: The most the budget ever had spent (queued, in flight, partial, counted in), bytes.
    peak_budget_bytes: int = 0


class RecordBuffer:
    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        agent_lane_bytes: int = DEFAULT_AGENT_LANE_BYTES,
    ) -> None:
        self.max_bytes = max_bytes
        self.agent_lane_bytes = agent_lane_bytes
        self._lanes: tuple[deque[Chunk], deque[Chunk], deque[Chunk]] = (deque(), deque(), deque())
        self._lane_bytes = [0, 0, 0]
        self._records = 0
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()
        # Events to set when a byte level is reached (see `watch`): event -> (mark, plugin
        # lanes only). The spooler's high-water mark and the send loop's full message.
        self._watches: dict[asyncio.Event, tuple[int, bool]] = {}
        self._filled = asyncio.Event()
        self._in_flight = 0
        self._sent = 0
        self._partial: dict[int, int] = {}
        self._partial_total = 0
        self._also: Callable[[], int] = _nothing
        self.stats = BufferStats()

    # -- producers ------------------------------------------------------------------------------

    def put_agent(self, record: bytes) -> None:
        """Queue one of the agent's own records; never blocks, evicts the lane's oldest if full."""
        data = splice_records((record,), b"")
        lane = self._lanes[Lane.AGENT]
        while lane and self._lane_bytes[Lane.AGENT] + len(data) > self.agent_lane_bytes:
            old, count = lane.popleft()
            self._lane_bytes[Lane.AGENT] -= len(old)
            self._records -= count
            self.stats.dropped_agent_overflow += count
        self._append(Lane.AGENT, (data, 1))

    async def put_many(self, records: Sequence[bytes], lane: Lane = Lane.PLUGIN) -> None:
        """Queue plugin records, waiting while the memory budget is spent.

        A batch is admitted whole once there is room for it, or at once into an empty buffer
        (a batch larger than the budget must not wait forever). `Frames` from the decoder come
        spliced already; other sequences are spliced here.
        """
        if not records:
            return
        data = records.spliced if isinstance(records, Frames) else splice_records(records, b"")
        await self._wait_admits(len(data))
        self._append(lane, (data, len(records)))
        self._note_peak()

    async def wait_room(self) -> None:
        """Until the budget has room (or nothing is queued or in flight): a reader half-way
        through a long frame waits here before it reads more of it."""
        await self._wait_admits(0)

    async def _wait_admits(self, size: int) -> None:
        if self._admits(size):
            return
        self.stats.backpressure_waits += 1
        started = time.monotonic()
        try:
            while not self._admits(size):
                self._space.clear()
                await self._space.wait()
        finally:
            self.stats.backpressure_seconds += time.monotonic() - started

    def _admits(self, size: int) -> bool:
        """Room in the budget for `size` more bytes, or nothing queued or in flight: a batch
        larger than the budget must not wait forever, and half-read frames (which complete
        only if their readers go on), the trail (which shrinks only when more is sent) or
        the spool's queue alone never hold a batch back."""
        plugin = self._plugin_bytes()
        if not plugin and not self._in_flight:
            return True
        return self._spent(plugin + size) <= self.max_bytes

    def _spent(self, plugin: int) -> int:
        """Record bytes in memory now, with `plugin` bytes in the plugin lanes."""
        return plugin + self._in_flight + self._sent + self._partial_total + self._also()

    def _note_peak(self) -> None:
        spent = self._spent(self._plugin_bytes())
        self.stats.peak_budget_bytes = max(self.stats.peak_budget_bytes, spent)

    def _update_space(self) -> None:
        plugin = self._plugin_bytes()
        if (not plugin and not self._in_flight) or self._spent(plugin) < self.max_bytes:
            self._space.set()

    # -- other holders of record bytes ------------------------------------------------------------

    def hold(self, size: int) -> None:
        """`size` bytes of records taken from the buffer are still in memory (a message being
        written): they count against the budget until `release`."""
        self._in_flight += size
        self._note_peak()

    def release(self, size: int) -> None:
        self._in_flight -= size
        self._update_space()

    def hold_sent(self, size: int) -> None:
        """`size` bytes of messages already written are kept (to be sent again if the stream
        ends abnormally): they count against the budget until `release_sent`, but never hold
        back a producer when nothing is queued or being written."""
        self._sent += size
        self._note_peak()

    def release_sent(self, size: int) -> None:
        self._sent -= size
        self._update_space()

    def partial(self, key: int, size: int) -> None:
        """The bytes of half-read frames producer `key` holds now (0 when it stops)."""
        before = self._partial.pop(key, 0)
        if size:
            self._partial[key] = size
        self._partial_total += size - before
        if size < before:
            self._update_space()

    def count_also(self, spent: Callable[[], int]) -> None:
        """Count `spent()` bytes against the budget too (the spool's queue not yet on disk);
        call `recheck` when it falls."""
        self._also = spent

    def recheck(self) -> None:
        """Wake waiting producers if what `count_also` counts has fallen."""
        self._update_space()

    def _append(self, lane: Lane, chunk: Chunk) -> None:
        self._lanes[lane].append(chunk)
        self._lane_bytes[lane] += len(chunk[0])
        self._records += chunk[1]
        self._nonempty.set()
        self._empty.clear()
        for event, (mark, plugin_lanes) in self._watches.items():
            if self._level(plugin_lanes) >= mark:
                event.set()

    def _plugin_bytes(self) -> int:
        return self._lane_bytes[Lane.URGENT] + self._lane_bytes[Lane.PLUGIN]

    def _level(self, plugin_lanes: bool) -> int:
        return self._plugin_bytes() if plugin_lanes else self.queued_bytes

    @property
    def plugin_bytes(self) -> int:
        """Bytes queued in the lanes that share `max_bytes` (the spool's high-water mark)."""
        return self._plugin_bytes()

    def lane_bytes(self, lane: Lane) -> int:
        return self._lane_bytes[lane]

    # -- the consumer ---------------------------------------------------------------------------

    async def wait_nonempty(self) -> None:
        await self._nonempty.wait()

    def wake(self) -> None:
        """End the current `wait_nonempty` or `wait_filled` even without records (an orderly
        exit)."""
        self._nonempty.set()
        self._filled.set()

    async def wait_filled(self, mark: int, timeout: float) -> None:  # noqa: ASYNC109
        """Until `mark` bytes are queued (a full message's worth), `wake`, or `timeout` s.
        One waiter at a time (the send loop).

        The send loop's pause between rounds: records gather into fewer, larger messages at
        steady rates, and a flood is not held back (a fixed pause let the buffer fill to the
        spool's high-water mark, so a connected agent spooled and read back every record).
        """
        if self.queued_bytes >= mark:
            return
        self.watch(self._filled, mark)
        try:
            # Set already if `wake` came between two waits: that wake is not lost.
            async with asyncio.timeout(timeout):
                await self._filled.wait()
        except TimeoutError:
            pass
        finally:
            self.unwatch(self._filled)
            self._filled.clear()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def watch(self, event: asyncio.Event, mark: int, *, plugin_lanes: bool = False) -> None:
        """Set `event` once all lanes (or the plugin lanes) hold at least `mark` bytes, now or
        at any append until `unwatch`: an event the caller already waits on, rather than a
        task of its own (the spooler waits on one event for this and for the link)."""
        self._watches[event] = (mark, plugin_lanes)
        if self._level(plugin_lanes) >= mark:
            event.set()

    def unwatch(self, event: asyncio.Event) -> None:
        self._watches.pop(event, None)

    def take(
        self, max_bytes: int, lanes: Sequence[Lane] = ALL_LANES, *, record_max: int = 0
    ) -> Batch:
        """Oldest chunks first, agent lane first, whose spliced size fits in `max_bytes`.

        A chunk too large for a whole message is split by record; a single record larger than
        `max_bytes` is taken alone if it fits `record_max`, else dropped and counted (the
        caller sizes them so that none should be).
        """
        whole = max(record_max, max_bytes)
        while True:
            taken: list[tuple[Lane, Chunk]] = []
            budget = max_bytes
            split = False
            for lane_id in lanes:
                lane = self._lanes[lane_id]
                while lane and (len(lane[0][0]) <= budget or (
                        not taken and lane[0][1] == 1 and len(lane[0][0]) <= whole)):
                    chunk = lane.popleft()
                    taken.append((lane_id, chunk))
                    budget -= len(chunk[0])
                    self._lane_bytes[lane_id] -= len(chunk[0])
                    self._records -= chunk[1]
                if lane and not taken:
                    # A loop, not a recursion: every round drops or splits off one record.
                    self._split_head(lane_id, max_bytes, whole)
                    split = True
                    break
                if lane:
                    break
            if not split:
                self._after_take()
                return Batch(taken)

    def _split_head(self, lane_id: Lane, max_bytes: int, record_max: int) -> None:
        """Split the head chunk of a lane so that its first part fits in a message (its
        first record alone, if that is larger but fits `record_max`)."""
        lane = self._lanes[lane_id]
        data, count = lane.popleft()
        self._lane_bytes[lane_id] -= len(data)
        self._records -= count
        records = unsplice(data)
        head: list[bytes] = []
        size = 0
        while records:
            entry = len(splice_records(records[:1], b""))
            if size + entry > max_bytes:
                break
            head.append(records.pop(0))
            size += entry
        if not head and len(splice_records(records[:1], b"")) <= record_max:
            head.append(records.pop(0))
        elif not head:
            records.pop(0)
            self.stats.dropped_oversize += 1
        for part in (records, head):
            if part:
                spliced = splice_records(part, b"")
                lane.appendleft((spliced, len(part)))
                self._lane_bytes[lane_id] += len(spliced)
                self._records += len(part)
        self._after_take()

    def requeue(self, batch: Batch) -> None:
        """Put a batch whose delivery failed back at the head of its lanes, order kept."""
        for lane, (data, count) in reversed(batch.chunks):
            # Out of the failed message (see `Batch.message`): a copy, so it can be freed.
            chunk = (data if isinstance(data, bytes) else bytes(data), count)
            self._lanes[lane].appendleft(chunk)
            self._lane_bytes[lane] += len(chunk[0])
            self._records += chunk[1]
        if batch.chunks:
            self._nonempty.set()
            self._empty.clear()

    def _after_take(self) -> None:
        if not any(self._lanes):
            self._nonempty.clear()
            self._empty.set()
        self._update_space()

    # -- gauges ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._records

    @property
    def queued_bytes(self) -> int:
        return sum(self._lane_bytes)

    def snapshot(self) -> BufferStats:
        self.stats.queued_records = len(self)
        self.stats.queued_bytes = self.queued_bytes
        self.stats.in_flight_bytes = self._in_flight
        self.stats.sent_kept_bytes = self._sent
        self.stats.partial_bytes = self._partial_total
        return self.stats


def _nothing() -> int:
    return 0

