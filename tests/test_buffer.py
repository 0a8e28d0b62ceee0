"""RecordBuffer: lanes, byte bounds, backpressure, drops and requeue (no I/O: asyncio.run)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elkeid_agent.buffer import Batch, Lane, RecordBuffer
from elkeid_agent.wire import splice_records, spliced_size


def rec(tag: str, size: int = 0) -> bytes:
    """A distinguishable record of at least `size` bytes (contents never parsed here)."""
    body = tag.encode()
    return body + b"." * max(0, size - len(body))


def test_lane_order_agent_urgent_plugin_oldest_first() -> None:
    async def main() -> Batch:
        buf = RecordBuffer()
        await buf.put_many([rec("p1"), rec("p2")], Lane.PLUGIN)
        buf.put_agent(rec("a1"))
        await buf.put_many([rec("u1")], Lane.URGENT)
        await buf.put_many([rec("p3")])  # PLUGIN is the default lane
        buf.put_agent(rec("a2"))
        await buf.put_many([rec("u2")], Lane.URGENT)
        assert len(buf) == 7
        return buf.take(1 << 20)

    batch = asyncio.run(main())
    assert batch.records == [rec(t) for t in ("a1", "a2", "u1", "u2", "p1", "p2", "p3")]
    assert batch.per_lane == (2, 2, 3)


def test_take_respects_budget_and_keeps_order_across_takes() -> None:
    async def main() -> list[Batch]:
        buf = RecordBuffer()
        await buf.put_many([rec(f"p{i}", 100) for i in range(10)])
        buf.put_agent(rec("a0", 100))
        batches = []
        while len(buf):
            batches.append(buf.take(350))
        return batches

    batches = asyncio.run(main())
    flat = [r for b in batches for r in b.records]
    assert flat == [rec("a0", 100)] + [rec(f"p{i}", 100) for i in range(10)]
    for b in batches:
        assert sum(map(spliced_size, b.records)) <= 350
        assert len(splice_records(b.records, b"")) <= 350
        assert sum(b.per_lane) == len(b.records)
    # The agent record goes alone: the plugin chunk (one put, spliced once) is split only when
    # it cannot fit a message by itself, never to fill the leftover room of a batch.
    assert [len(b.records) for b in batches] == [1, 3, 3, 3, 1]


@st.composite
def lane_records(draw: st.DrawFn) -> list[tuple[Lane, bytes]]:
    sizes = draw(st.lists(st.integers(0, 3000), max_size=60))
    lanes = draw(st.lists(st.sampled_from(list(Lane)), min_size=len(sizes), max_size=len(sizes)))
    pairs = zip(lanes, sizes, strict=True)
    return [(lane, rec(f"{i}:", size)) for i, (lane, size) in enumerate(pairs)]


@settings(max_examples=200, deadline=None)
@given(items=lane_records(), budget=st.integers(1, 8000))
def test_take_never_exceeds_max_bytes(items: list[tuple[Lane, bytes]], budget: int) -> None:
    async def main() -> tuple[list[Batch], RecordBuffer]:
        buf = RecordBuffer(max_bytes=1 << 30, agent_lane_bytes=1 << 30)
        for lane, record in items:
            if lane is Lane.AGENT:
                buf.put_agent(record)
            else:
                await buf.put_many([record], lane)
        batches = []
        while len(buf):
            batches.append(buf.take(budget))
        return batches, buf

    batches, buf = asyncio.run(main())
    lane_of = {r: lane for lane, r in items}
    for batch in batches:
        assert sum(map(spliced_size, batch.records)) <= budget
        assert len(splice_records(batch.records, b"")) <= budget
        # Within a batch: lane order, and the per-lane counts describe the records.
        lanes = [lane for lane, n in zip(Lane, batch.per_lane, strict=True) for _ in range(n)]
        assert lanes == [lane_of[r] for r in batch.records]
    # Every record that fits a message arrives, per lane oldest first; the rest are counted.
    delivered = [r for b in batches for r in b.records]
    fits = [(lane, r) for lane, r in items if spliced_size(r) <= budget]
    for lane in Lane:
        want = [r for ln, r in fits if ln is lane]
        assert [r for r in delivered if r in set(want)] == want
    assert sorted(delivered) == sorted(r for _, r in fits)
    assert buf.stats.dropped_oversize == len(items) - len(fits)
    assert buf.queued_bytes == 0
    assert len(buf) == 0


def test_put_many_blocks_when_full_and_resumes_after_take() -> None:
    size = spliced_size(rec("x", 100))

    async def main() -> None:
        buf = RecordBuffer(max_bytes=10 * size)
        await buf.put_many([rec(f"a{i}", 100) for i in range(10)])
        assert buf.queued_bytes == 10 * size
        assert buf.stats.backpressure_waits == 0
        blocked = asyncio.create_task(buf.put_many([rec("late", 100)]))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # waiting, not dropping
        assert len(buf) == 10
        assert buf.stats.backpressure_waits == 1
        batch = buf.take(3 * size)
        assert len(batch.records) == 3
        await asyncio.wait_for(blocked, 1.0)
        assert len(buf) == 8
        assert buf.stats.backpressure_seconds >= 0.04
        rest = buf.take(1 << 20).records
        assert rest[-1] == rec("late", 100)
        assert buf.snapshot().dropped_oversize == 0
        assert buf.stats.dropped_agent_overflow == 0

    asyncio.run(main())


def test_agent_records_never_wait_for_plugin_space() -> None:
    async def main() -> None:
        buf = RecordBuffer(max_bytes=1000, agent_lane_bytes=1000)
        await buf.put_many([rec("p", 990)])
        blocked = asyncio.create_task(buf.put_many([rec("q", 100)]))
        await asyncio.sleep(0.01)
        buf.put_agent(rec("a", 500))  # plugin budget full: the agent lane is separate
        assert not blocked.done()
        batch = buf.take(600)
        assert batch.records == [rec("a", 500)]
        assert not blocked.done()
        blocked.cancel()

    asyncio.run(main())


def test_oversize_batch_into_empty_buffer_is_admitted() -> None:
    async def main() -> int:
        buf = RecordBuffer(max_bytes=100)
        await asyncio.wait_for(buf.put_many([rec("big", 500)]), 1.0)
        return len(buf)

    assert asyncio.run(main()) == 1


def test_agent_lane_overflow_evicts_oldest_and_counts() -> None:
    size = spliced_size(rec("a", 100))

    async def main() -> None:
        buf = RecordBuffer(agent_lane_bytes=3 * size)
        for i in range(5):
            buf.put_agent(rec(f"a{i}", 100))
        assert buf.stats.dropped_agent_overflow == 2
        assert buf.take(1 << 20).records == [rec(f"a{i}", 100) for i in (2, 3, 4)]

    asyncio.run(main())


def test_plugin_data_cannot_push_agent_records_out() -> None:
    size = spliced_size(rec("p", 100))

    async def main() -> None:
        buf = RecordBuffer(max_bytes=5 * size, agent_lane_bytes=1000)
        buf.put_agent(rec("hb", 200))
        # The plugin budget is its own: five records fit beside the agent's.
        await asyncio.wait_for(buf.put_many([rec(f"p{i}", 100) for i in range(5)]), 1.0)
        blocked = asyncio.create_task(buf.put_many([rec("p5", 100)]))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert buf.stats.dropped_agent_overflow == 0
        assert buf.take(1 << 20).records[0] == rec("hb", 200)
        await asyncio.wait_for(blocked, 1.0)

    asyncio.run(main())


def test_record_larger_than_take_budget_is_dropped_and_counted() -> None:
    async def main() -> RecordBuffer:
        buf = RecordBuffer()
        await buf.put_many([rec("huge", 1000), rec("small", 10)])
        first = buf.take(500)
        assert first.records == [rec("small", 10)]
        assert len(buf) == 0
        return buf

    buf = asyncio.run(main())
    assert buf.stats.dropped_oversize == 1
    assert buf.queued_bytes == 0


def test_requeue_puts_batch_back_at_the_head_in_order() -> None:
    async def main() -> None:
        buf = RecordBuffer()
        buf.put_agent(rec("a1"))
        await buf.put_many([rec("u1")], Lane.URGENT)
        await buf.put_many([rec("p1"), rec("p2")])
        before = buf.queued_bytes
        batch = buf.take(1 << 20)
        assert buf.queued_bytes == 0
        buf.put_agent(rec("a2"))  # queued while the failed write was in flight
        await buf.put_many([rec("p3")])
        buf.requeue(batch)
        assert buf.queued_bytes == before + spliced_size(rec("a2")) + spliced_size(rec("p3"))
        again = buf.take(1 << 20)
        assert again.records == [rec(t) for t in ("a1", "a2", "u1", "p1", "p2", "p3")]
        assert again.per_lane == (2, 1, 3)

    asyncio.run(main())


def test_requeue_wakes_the_consumer() -> None:
    async def main() -> None:
        buf = RecordBuffer()
        await buf.put_many([rec("p1")])
        batch = buf.take(1 << 20)
        waiter = asyncio.create_task(buf.wait_nonempty())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        buf.requeue(batch)
        await asyncio.wait_for(waiter, 1.0)

    asyncio.run(main())


def test_wait_empty() -> None:
    async def main() -> None:
        buf = RecordBuffer()
        await asyncio.wait_for(buf.wait_empty(), 1.0)  # empty at start
        buf.put_agent(rec("a"))
        await buf.put_many([rec("p")])
        waiter = asyncio.create_task(buf.wait_empty())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        buf.take(spliced_size(rec("a")))  # only the agent record fits
        await asyncio.sleep(0.01)
        assert not waiter.done()
        buf.take(1 << 20)
        await asyncio.wait_for(waiter, 1.0)

    asyncio.run(main())


def test_wait_nonempty_blocks_until_a_record_arrives() -> None:
    async def main() -> None:
        buf = RecordBuffer()
        waiter = asyncio.create_task(buf.wait_nonempty())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        buf.put_agent(rec("a"))
        await asyncio.wait_for(waiter, 1.0)
        buf.take(1 << 20)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(buf.wait_nonempty(), 0.05)

    asyncio.run(main())


def test_snapshot_gauges() -> None:
    async def main() -> RecordBuffer:
        buf = RecordBuffer()
        buf.put_agent(rec("a", 50))
        await buf.put_many([rec("p", 60), rec("q", 70)])
        return buf

    snap = asyncio.run(main()).snapshot()
    assert snap.queued_records == 3
    sizes = (("a", 50), ("p", 60), ("q", 70))
    assert snap.queued_bytes == sum(spliced_size(rec(t, n)) for t, n in sizes)


def test_a_take_smaller_than_every_record_drops_them_counted_without_recursing() -> None:
    """Each record larger than the take is dropped and counted, one round each: 2,000 of them
    once ended the agent with a RecursionError (one recursion per record)."""
    buf = RecordBuffer()
    asyncio.run(buf.put_many([b"r" * 300] * 2000))
    batch = buf.take(100)
    assert batch.chunks == []
    assert buf.stats.dropped_oversize == 2000
    assert len(buf) == 0


def test_wait_filled_ends_at_the_mark_on_wake_or_at_the_timeout() -> None:
    async def main() -> None:
        buf = RecordBuffer()
        started = asyncio.get_running_loop().time()
        await buf.wait_filled(1000, 0.05)  # nothing queued: the timeout ends it
        assert asyncio.get_running_loop().time() - started >= 0.05

        waiter = asyncio.create_task(buf.wait_filled(1000, 30))
        await buf.put_many([rec("p", 400)])
        await asyncio.sleep(0.01)
        assert not waiter.done()  # below the mark
        buf.put_agent(rec("a", 700))  # every lane counts
        await asyncio.wait_for(waiter, 1.0)

        await buf.wait_filled(1000, 30)  # already there: at once
        buf.take(1 << 20)
        waiter = asyncio.create_task(buf.wait_filled(1000, 30))
        await asyncio.sleep(0.01)
        buf.wake()
        await asyncio.wait_for(waiter, 1.0)

        buf.wake()  # between two waits (the send loop was sending): the next one ends at once
        await asyncio.wait_for(buf.wait_filled(1000, 30), 1.0)
        waiter = asyncio.create_task(buf.wait_filled(1000, 30))  # and only that one
        await asyncio.sleep(0.01)
        assert not waiter.done()
        waiter.cancel()

    asyncio.run(main())


# -- the one memory budget (issue 18) -------------------------------------------------------------


async def _blocked(coro: asyncio.Future[None] | asyncio.Task[None]) -> bool:
    await asyncio.sleep(0.05)
    return not coro.done()


def test_bytes_in_flight_count_against_the_budget() -> None:
    size = spliced_size(rec("x", 100))

    async def main() -> None:
        buf = RecordBuffer(max_bytes=10 * size)
        await buf.put_many([rec(f"a{i}", 100) for i in range(4)])
        buf.hold(6 * size)  # a message and grpc's copy of it
        late = asyncio.create_task(buf.put_many([rec("late", 100)]))
        assert await _blocked(late)
        assert buf.snapshot().in_flight_bytes == 6 * size
        buf.release(6 * size)
        await asyncio.wait_for(late, 1.0)
        assert len(buf) == 5
        assert buf.stats.backpressure_waits == 1
        assert buf.stats.peak_budget_bytes == 10 * size

    asyncio.run(main())


def test_half_read_frames_count_but_never_hold_back_an_empty_buffer() -> None:
    size = spliced_size(rec("x", 100))

    async def main() -> None:
        buf = RecordBuffer(max_bytes=10 * size)
        buf.partial(1, 20 * size)
        # Nothing queued or in flight: admitted (frames complete only if readers go on).
        await asyncio.wait_for(buf.put_many([rec("a", 100)]), 1.0)
        waiting = asyncio.create_task(buf.wait_room())
        late = asyncio.create_task(buf.put_many([rec("late", 100)]))
        assert await _blocked(waiting)
        assert await _blocked(late)
        assert buf.snapshot().partial_bytes == 20 * size
        buf.partial(1, 0)  # the reader stopped: its bytes are gone
        await asyncio.wait_for(asyncio.gather(waiting, late), 1.0)
        assert buf.snapshot().partial_bytes == 0

    asyncio.run(main())


def test_what_the_owner_counts_in_holds_producers_until_recheck() -> None:
    size = spliced_size(rec("x", 100))
    spool_queue = [9 * size]

    async def main() -> None:
        buf = RecordBuffer(max_bytes=10 * size)
        buf.count_also(lambda: spool_queue[0])
        await buf.put_many([rec("a", 100)])
        late = asyncio.create_task(buf.put_many([rec("late", 100)]))
        assert await _blocked(late)
        spool_queue[0] = 0
        buf.recheck()
        await asyncio.wait_for(late, 1.0)

    asyncio.run(main())


def test_a_message_s_chunks_point_into_it_and_a_failed_one_requeues_bytes() -> None:
    async def main() -> None:
        buf = RecordBuffer()
        buf.put_agent(rec("a1"))
        await buf.put_many([rec("p1", 50), rec("p2", 50)])
        await buf.put_many([rec("u1")], Lane.URGENT)
        batch = buf.take(1 << 20)
        message = batch.message(b"HEADER")
        assert message == splice_records([rec("a1"), rec("u1"), rec("p1", 50), rec("p2", 50)],
                                         b"HEADER")
        assert all(isinstance(data, memoryview) for _, (data, _n) in batch.chunks)
        buf.requeue(batch)
        del message, batch
        again = buf.take(1 << 20)
        assert all(type(data) is bytes for _, (data, _n) in again.chunks)
        assert again.records == [rec("a1"), rec("u1"), rec("p1", 50), rec("p2", 50)]
        assert again.per_lane == (1, 1, 2)

    asyncio.run(main())


def test_messages_kept_to_resend_count_but_never_hold_back_an_empty_buffer() -> None:
    size = spliced_size(rec("x", 100))

    async def main() -> None:
        buf = RecordBuffer(max_bytes=10 * size)
        buf.hold_sent(8 * size)  # the trail: it shrinks only when more is sent
        # Nothing queued or being written: admitted, however large the trail.
        await asyncio.wait_for(buf.put_many([rec(f"a{i}", 100) for i in range(3)]), 1.0)
        assert buf.snapshot().sent_kept_bytes == 8 * size
        assert buf.stats.peak_budget_bytes == 11 * size
        late = asyncio.create_task(buf.put_many([rec("late", 100)]))
        assert await _blocked(late)
        buf.release_sent(8 * size)
        await asyncio.wait_for(late, 1.0)
        assert buf.snapshot().sent_kept_bytes == 0

    asyncio.run(main())


def test_a_record_larger_than_the_take_goes_alone_up_to_record_max() -> None:
    async def main() -> tuple[list[list[int]], int]:
        buf = RecordBuffer(max_bytes=64 << 20)
        await buf.put_many([rec("a", 100), rec("big", 5000), rec("c", 100)])
        await buf.put_many([rec("huge", 9000)])
        out = []
        while len(buf):
            out.append([len(r) for r in buf.take(1000, record_max=8000).records])
        return out, buf.stats.dropped_oversize

    sizes, dropped = asyncio.run(main())
    assert sizes == [[100], [5000], [100], []]  # the last take dropped the 9000-byte one
    assert dropped == 1
