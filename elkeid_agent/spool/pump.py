"""Moving chunks from the memory buffer to the spool, and the order they leave in.

The rule, kept by this module and the send loop together: everything in the spool is older
than every plugin chunk in memory. The spooler only ever moves the oldest chunks of memory to
the spool's tail, and the send loop, while the spool holds anything, sends the agent lane
from memory (its records keep their priority, as in memory) and then the spool, and touches
the plugin lanes in memory only once the spool is empty.

When it moves: whenever the stream is down (everything, every lane, so that a crash loses
only the last moments), or when the plugin lanes in memory pass the high-water mark while
connected (the oldest plugin chunks, down to the low-water mark, and never past the spool's
size bound: the server is taking records, only slower than they come, so the plugins wait,
as without a spool, rather than the spool dropping records the server would still receive).
Connected and keeping up, it moves nothing: no disk writes in steady state, and no wake-ups
either: it sleeps until the transfer loop says the link is down or the buffer says the
high-water mark is passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from elkeid_agent.buffer import ALL_LANES, Batch, Lane, RecordBuffer
from elkeid_agent.spool.format import MAX_PAYLOAD
from elkeid_agent.spool.store import Spool

#: How often the spooler looks at the buffer while disconnected or moving. Chunks younger than
#: this are what a SIGKILL during an outage can lose besides the pipes.
MOVE_INTERVAL = 0.1
#: While connected the spooler sleeps until the link goes down or the plugin lanes pass the
#: high-water mark: a wake-up once a second measurably cost CPU on a connected agent
#: (docs/spool.md). It still looks this often, in case it was not told.
CONNECTED_INTERVAL = 30.0
#: While connected but the spool takes nothing (degraded, or its writer behind).
REFUSING_INTERVAL = 1.0
#: An entry is read back whole into a message: runs of chunks are cut at about this size.
ENTRY_BYTES = 1024 * 1024
#: Beyond a take's records, the headers of the entries it becomes (and rounding).
ROOM_MARGIN = 64 * 1024
HIGH_WATER = 0.5
LOW_WATER = 0.25
PLUGIN_LANES = (Lane.URGENT, Lane.PLUGIN)


def lanes_to_move(
    connected: bool, plugin_bytes: int, max_bytes: int, moving: bool
) -> tuple[Lane, ...]:
    """Pure: which lanes to move now (none, the plugin lanes, or all of them).

    `moving` says whether the previous round moved for the high-water mark, so that once
    started it goes on down to the low-water mark (hysteresis).
    """
    if not connected:
        return ALL_LANES
    mark = LOW_WATER if moving else HIGH_WATER
    if plugin_bytes > max_bytes * mark:
        return PLUGIN_LANES
    return ()


def store_batch(spool: Spool, batch: Batch) -> None:
    """Append a batch to the spool, one entry per run of chunks of one lane (≤ 1 MiB, or a
    segment if smaller, unless a single chunk is larger)."""
    run: list[bytes] = []
    count = size = 0
    lane: Lane | None = None
    cut = min(ENTRY_BYTES, spool.segment_bytes)
    for chunk_lane, (data, n) in batch.chunks:
        if lane is not None and (chunk_lane != lane or size + len(data) > cut):
            spool.append(lane, count, b"".join(run))
            run, count, size = [], 0, 0
        lane = chunk_lane
        run.append(data)
        count += n
        size += len(data)
    if lane is not None:
        spool.append(lane, count, b"".join(run))


def move(spool: Spool, buffer: RecordBuffer, lanes: tuple[Lane, ...], until_bytes: int) -> int:
    """Move the oldest chunks of `lanes` until the plugin lanes hold at most `until_bytes`
    (everything, for 0) or the spool stops accepting; the records moved."""
    moved = 0
    while spool.accepting:
        if lanes == PLUGIN_LANES and (
            # Connected: only while a whole take fits within the size bound (a smaller take
            # would split chunks and drop records larger than it).
            buffer.plugin_bytes <= until_bytes or spool.room < MAX_PAYLOAD + ROOM_MARGIN
        ):
            break
        # Taken by the message's measure (a single record may be that large); cut below.
        batch = buffer.take(MAX_PAYLOAD, lanes)
        if not batch.chunks:
            break
        store_batch(spool, batch)
        moved += batch.count
    return moved


def spill_all(spool: Spool, buffer: RecordBuffer) -> int:
    """Everything in memory to the spool (orderly exit, whatever the writer's backlog);
    the records moved. `Spool.close` then writes it all."""
    moved = 0
    while True:
        batch = buffer.take(MAX_PAYLOAD)
        if not batch.chunks:
            return moved
        store_batch(spool, batch)
        moved += batch.count


async def run_spooler(
    spool: Spool, buffer: RecordBuffer, connected: Callable[[], bool], link_down: asyncio.Event
) -> None:
    """Move chunks as `lanes_to_move` says. `link_down` only wakes the spooler: the transfer
    loop sets it whenever the stream ends or a connection attempt fails, the buffer when its
    plugin lanes pass the high-water mark."""
    moving = False
    while True:
        link_down.clear()
        if moving or not connected():
            await asyncio.sleep(MOVE_INTERVAL)
        elif not spool.accepting:
            await asyncio.sleep(REFUSING_INTERVAL)
        else:
            await _until_needed(buffer, link_down)
        if not spool.accepting or not len(buffer):
            moving = False
            continue
        lanes = lanes_to_move(connected(), buffer.plugin_bytes, buffer.max_bytes, moving)
        moving = lanes == PLUGIN_LANES
        if lanes:
            move(spool, buffer, lanes, int(buffer.max_bytes * LOW_WATER))


async def _until_needed(buffer: RecordBuffer, link_down: asyncio.Event) -> None:
    """Until the link goes down, the plugin lanes pass the high-water mark, or
    CONNECTED_INTERVAL has passed: both set the one event waited on here."""
    buffer.watch(link_down, int(buffer.max_bytes * HIGH_WATER) + 1, plugin_lanes=True)
    try:
        async with asyncio.timeout(CONNECTED_INTERVAL):
            await link_down.wait()
    except TimeoutError:
        pass
    finally:
        buffer.unwatch(link_down)
