"""RecordBuffer: the one queue between record producers and the transfer stream.

Rules:
* Bounded by bytes, not by count: records range from a few bytes to megabytes.
* Three lanes, taken in order: the agent's own records (1000/1001/1010/5100), plugin urgent records
  (fd 5), plugin records (fd 4). The agent lane has its own budget, so plugin data can never push
  the agent's own records out, and it never blocks its producers (log handlers, heartbeats): when
  it overflows its oldest records go, counted.
* Plugin producers wait when the plugin budget is full (their readers stop reading the pipe, and
  the plugin's own writes then block): backpressure instead of drops.
* A batch whose write failed goes back to the front, so records queued while disconnected leave
  oldest first after reconnecting.

No sockets here: only asyncio.Event for waiting, so tests drive it without any I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from elkeid_agent.wire import spliced_size

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_AGENT_LANE_BYTES = 4 * 1024 * 1024


class Lane(IntEnum):
    AGENT = 0
    URGENT = 1
    PLUGIN = 2


@dataclass
class Batch:
    """Records taken for one message, in lane order, and how many came from each lane."""

    records: list[bytes]
    per_lane: tuple[int, int, int]


@dataclass
class BufferStats:
    """Counters reported in the heartbeat (all monotonic except the gauges)."""

    queued_records: int = 0
    queued_bytes: int = 0
    dropped_agent_overflow: int = 0
    dropped_oversize: int = 0
    backpressure_waits: int = 0
    backpressure_seconds: float = 0.0


class RecordBuffer:
    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        agent_lane_bytes: int = DEFAULT_AGENT_LANE_BYTES,
        max_record_bytes: int | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.agent_lane_bytes = agent_lane_bytes
        self.max_record_bytes = max_record_bytes
        self._lanes: tuple[deque[bytes], deque[bytes], deque[bytes]] = (deque(), deque(), deque())
        self._lane_bytes = [0, 0, 0]
        self._nonempty = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.stats = BufferStats()

    # -- producers ------------------------------------------------------------------------------

    def put_agent(self, record: bytes) -> None:
        """Queue one of the agent's own records; never blocks, evicts the lane's oldest if full."""
        if not self._admissible(record):
            return
        lane, size = self._lanes[Lane.AGENT], spliced_size(record)
        while lane and self._lane_bytes[Lane.AGENT] + size > self.agent_lane_bytes:
            self._lane_bytes[Lane.AGENT] -= spliced_size(lane.popleft())
            self.stats.dropped_agent_overflow += 1
        lane.append(record)
        self._lane_bytes[Lane.AGENT] += size
        self._nonempty.set()
        self._empty.clear()

    async def put_many(self, records: list[bytes], lane: Lane = Lane.PLUGIN) -> None:
        """Queue plugin records, waiting while the plugin budget is full.

        A batch is admitted whole once there is room for it, or at once into an empty buffer
        (a batch larger than the budget must not wait forever).
        """
        records = [r for r in records if self._admissible(r)]
        if not records:
            return
        size = sum(map(spliced_size, records))
        if self._plugin_bytes() and self._plugin_bytes() + size > self.max_bytes:
            self.stats.backpressure_waits += 1
            started = time.monotonic()
            while self._plugin_bytes() and self._plugin_bytes() + size > self.max_bytes:
                self._space.clear()
                await self._space.wait()
            self.stats.backpressure_seconds += time.monotonic() - started
        self._lanes[lane].extend(records)
        self._lane_bytes[lane] += size
        self._nonempty.set()
        self._empty.clear()

    def _admissible(self, record: bytes) -> bool:
        if self.max_record_bytes is not None and len(record) > self.max_record_bytes:
            self.stats.dropped_oversize += 1
            return False
        return True

    def _plugin_bytes(self) -> int:
        return self._lane_bytes[Lane.URGENT] + self._lane_bytes[Lane.PLUGIN]

    # -- the consumer ---------------------------------------------------------------------------

    async def wait_nonempty(self) -> None:
        await self._nonempty.wait()

    def take(self, max_bytes: int) -> Batch:
        """Oldest records first, agent lane first, whose spliced size fits in `max_bytes`.

        A record that alone exceeds max_bytes is dropped and counted; the caller sizes
        max_bytes so that every admissible record fits.
        """
        out: list[bytes] = []
        per_lane = [0, 0, 0]
        budget = max_bytes
        for index, lane in enumerate(self._lanes):
            taken = 0
            while lane:
                size = spliced_size(lane[0])
                if size > budget:
                    if not out and size > max_bytes:
                        lane.popleft()
                        taken += size
                        self.stats.dropped_oversize += 1
                        continue
                    break
                out.append(lane.popleft())
                taken += size
                budget -= size
            self._lane_bytes[index] -= taken
            per_lane[index] = len(out) - sum(per_lane)
            if budget <= 0 or (lane and out):
                break
        self._after_take()
        return Batch(out, (per_lane[0], per_lane[1], per_lane[2]))

    def requeue(self, batch: Batch) -> None:
        """Put a batch whose delivery failed back at the head of its lanes, order kept."""
        start = 0
        for index, count in enumerate(batch.per_lane):
            records = batch.records[start : start + count]
            start += count
            self._lanes[index].extendleft(reversed(records))
            self._lane_bytes[index] += sum(map(spliced_size, records))
        if batch.records:
            self._nonempty.set()
            self._empty.clear()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def _after_take(self) -> None:
        if not any(self._lanes):
            self._nonempty.clear()
            self._empty.set()
        if self._plugin_bytes() < self.max_bytes:
            self._space.set()

    # -- gauges ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(map(len, self._lanes))

    @property
    def queued_bytes(self) -> int:
        return sum(self._lane_bytes)

    def snapshot(self) -> BufferStats:
        self.stats.queued_records = len(self)
        self.stats.queued_bytes = self.queued_bytes
        return self.stats
