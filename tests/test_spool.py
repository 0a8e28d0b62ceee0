"""The spool: its byte format (pure, property-tested), the store on real files, the pump rule."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elkeid_agent.buffer import ALL_LANES, Lane, RecordBuffer
from elkeid_agent.config import SpoolConfig
from elkeid_agent.health import Health
from elkeid_agent.spool import format as fmt
from elkeid_agent.spool.pump import (
    LOW_WATER,
    PLUGIN_LANES,
    lanes_to_move,
    move,
    run_spooler,
    spill_all,
)
from elkeid_agent.spool.store import (
    IOV_MAX,
    MESSAGE_BYTES,
    RETRY_SECONDS,
    TRAIL_BYTES,
    Spool,
    SpoolFiles,
    SpoolState,
)
from elkeid_agent.wire import splice_records, unsplice

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8)


def _segment(items: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """Entries for `items` and each one's (start, end) in the segment."""
    out = b""
    spans = []
    for i, payload in enumerate(items):
        entry = fmt.encode_entry(i % 3, i + 1, 1_700_000_000 + i, payload)
        spans.append((len(out), len(out) + len(entry)))
        out += entry
    return out, spans


def _payloads(data: bytes, result: fmt.ScanResult) -> list[bytes]:
    return [data[h.offset + fmt.HEADER_BYTES : h.end] for h in result.entries]


# -- format ------------------------------------------------------------------------------------


@given(payloads)
def test_scan_returns_every_entry_in_order(items: list[bytes]) -> None:
    data, _ = _segment(items)
    result = fmt.scan(data)
    assert _payloads(data, result) == items
    expected = [(i % 3, i + 1) for i in range(len(items))]
    assert [(h.lane, h.count) for h in result.entries] == expected
    assert result.corrupt == 0


@given(payloads, st.data())
def test_truncation_keeps_every_whole_entry_and_counts_the_torn_one(
    items: list[bytes], data: st.DataObject
) -> None:
    blob, spans = _segment(items)
    cut = data.draw(st.integers(0, len(blob)))
    result = fmt.scan(blob[:cut])
    whole = [p for p, (_s, end) in zip(items, spans, strict=True) if end <= cut]
    assert _payloads(blob, result) == whole
    assert result.corrupt == (0 if cut in {0, *(end for _s, end in spans)} else 1)


@given(payloads, st.data())
def test_a_flipped_bit_costs_only_its_own_entry(items: list[bytes], data: st.DataObject) -> None:
    blob, spans = _segment(items)
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << bit
    result = fmt.scan(bytes(damaged))
    hit = next(i for i, (s, e) in enumerate(spans) if s <= pos < e)
    assert _payloads(bytes(damaged), result) == items[:hit] + items[hit + 1 :]
    assert result.corrupt == 1


def test_zero_length_and_zero_filled_segments() -> None:
    assert fmt.scan(b"") == fmt.ScanResult([], 0, 0)
    good = fmt.encode_entry(2, 1, 5, b"x")
    result = fmt.scan(b"\0" * 100 + good + b"\0" * 7)
    assert len(result.entries) == 1
    assert result.corrupt == 2
    assert result.corrupt_bytes == 107


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 35), st.integers(0, 7))
def test_checkpoint_round_trip_and_damage(seg: int, off: int, pos: int, bit: int) -> None:
    raw = fmt.encode_checkpoint(seg, off, (off, seg))
    assert fmt.decode_checkpoint(raw) == (seg, off, (off, seg))
    bad = bytearray(raw)
    bad[pos] ^= 1 << bit
    assert fmt.decode_checkpoint(bytes(bad)) is None
    assert fmt.decode_checkpoint(raw[:-1]) is None


# -- store -------------------------------------------------------------------------------------


def _config(**kw: Any) -> SpoolConfig:
    return SpoolConfig(**{"min_free_bytes": 0, "max_bytes": 64 << 20, **kw})


#: The spliced size of `_records(_, 10)`: one entry's worth, for reads of exactly one entry.
_ENTRY_PAYLOAD = 10 * 102


def _records(start: int, n: int, size: int = 100) -> bytes:
    return splice_records([b"%010d" % i + b"r" * (size - 10) for i in range(start, start + n)], b"")


async def _drain(spool: Spool) -> list[bytes]:
    """Read and commit everything, then confirm (as when the server ends the stream)."""
    out = []
    while spool.records:
        batch = await spool.read(8 << 20)
        out += unsplice(batch.spliced)
        spool.commit(batch)
    spool.confirm()
    await spool.step()
    return out


def test_entries_survive_a_restart_and_leave_once(tmp_path: Path) -> None:
    async def first() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for i in range(10):
            spool.append(Lane.PLUGIN, 10, _records(i * 10, 10))
        await spool.step()
        # Half delivered before the exit: only the rest comes back.
        batch = await spool.read(5 * 1050)
        assert batch.count == 50
        spool.commit(batch)
        spool.confirm()
        await spool.close()

    async def second() -> list[bytes]:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        assert spool.records == 50
        assert spool.state is SpoolState.HOLDING
        got = await _drain(spool)
        await spool.close()
        return got

    run(first())
    got = run(second())
    assert [int(r[:10]) for r in got] == list(range(50, 100))
    assert _reopen(tmp_path) == ([], 0)
    assert [p.name for p in (tmp_path / "spool").glob("*.seg")] == []


def test_unwritten_entries_are_readable_before_they_reach_the_disk(tmp_path: Path) -> None:
    async def go() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        spool.append(Lane.PLUGIN, 3, _records(0, 3))
        assert [int(r[:10]) for r in await _drain(spool)] == [0, 1, 2]
        assert spool.stats.written_bytes == 0
        await spool.close()

    run(go())


def test_bound_drops_oldest_plugin_records_counted_exactly_and_keeps_agent_records(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        spool = Spool(tmp_path, _config(max_bytes=1 << 20), Health())
        await spool.open()
        spool.append(Lane.AGENT, 1, _records(-1, 1))
        appended = 0
        for i in range(400):  # ~4 MiB into a 1 MiB spool
            spool.append(Lane.PLUGIN, 100, _records(i * 100, 100))
            appended += 100
            if i % 20 == 0:
                await spool.step()
        await spool.close()
        assert spool.disk_bytes() <= 1 << 20
        got = await _drain(spool)
        seqs = [int(r[:10]) for r in got]
        assert -1 in seqs
        plugin = [s for s in seqs if s >= 0]
        assert plugin == sorted(plugin)
        assert plugin[-1] == appended - 1
        assert spool.stats.dropped_records == appended - len(plugin)
        assert spool.stats.dropped_records > 0

    run(go())


def _fill(tmp_path: Path, n: int) -> None:
    async def go() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for i in range(n):
            spool.append(Lane.PLUGIN, 10, _records(i * 10, 10))
        await spool.close()

    run(go())


def _reopen(tmp_path: Path) -> tuple[list[int], int]:
    async def go() -> tuple[list[int], int]:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        got = await _drain(spool)
        await spool.close()
        return [int(r[:10]) for r in got], spool.stats.corrupt_entries

    return run(go())


def _segment_file(tmp_path: Path) -> Path:
    (seg,) = (tmp_path / "spool").glob("*.seg")
    return seg


def test_a_torn_tail_is_counted_and_the_rest_kept(tmp_path: Path) -> None:
    _fill(tmp_path, 5)
    seg = _segment_file(tmp_path)
    os.truncate(seg, seg.stat().st_size - 7)
    assert _reopen(tmp_path) == (list(range(40)), 1)


def test_a_flipped_bit_drops_one_entry(tmp_path: Path) -> None:
    _fill(tmp_path, 5)
    seg = _segment_file(tmp_path)
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the third entry's payload
    seg.write_bytes(bytes(data))
    assert _reopen(tmp_path) == ([*range(20), *range(30, 50)], 1)


def test_zero_length_segment_and_garbage_checkpoint(tmp_path: Path) -> None:
    _fill(tmp_path, 2)
    (tmp_path / "spool" / fmt.segment_name(999)).write_bytes(b"")
    (tmp_path / "spool" / "checkpoint").write_bytes(b"garbage")
    assert _reopen(tmp_path) == (list(range(20)), 0)


def test_a_failing_disk_degrades_to_memory_and_recovers(tmp_path: Path) -> None:
    async def until(cond: Any, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not cond():
            assert time.monotonic() < deadline, "condition not met"
            await asyncio.sleep(0.02)

    async def go() -> None:
        health = Health()
        spool = Spool(tmp_path, _config(fsync_interval=0.05), health)
        await spool.open()
        writer = asyncio.create_task(spool.run())
        directory = tmp_path / "spool"
        directory.rmdir()
        directory.write_bytes(b"not a directory")  # every file operation now fails
        spool.append(Lane.PLUGIN, 10, _records(0, 10))
        await until(lambda: spool.state is SpoolState.DEGRADED, 5)
        assert not spool.accepting
        assert health.faulty("spool")
        # What it held stays in memory and is delivered from there.
        batch = await spool.read(1 << 20)
        spool.commit(batch)
        assert [int(r[:10]) for r in unsplice(batch.spliced)] == list(range(10))
        directory.unlink()
        await until(lambda: spool.state is SpoolState.EMPTY, 5 + RETRY_SECONDS)
        assert spool.accepting
        assert not health.faulty("spool")
        spool.append(Lane.PLUGIN, 10, _records(10, 10))
        await until(lambda: spool.stats.written_entries == 1, 5)
        await spool.stop()
        await writer
        await spool.close()

    run(go())


# -- pump ----------------------------------------------------------------------------------------


def test_when_to_move() -> None:
    assert lanes_to_move(False, 0, 100, False) == ALL_LANES
    assert lanes_to_move(True, 50, 100, False) == ()  # connected, keeping up: no disk
    assert lanes_to_move(True, 51, 100, False) == PLUGIN_LANES
    assert lanes_to_move(True, 30, 100, True) == PLUGIN_LANES
    assert lanes_to_move(True, 25, 100, True) == ()


def test_spill_all_keeps_lane_order(tmp_path: Path) -> None:
    async def go() -> list[bytes]:
        buffer = RecordBuffer()
        await buffer.put_many([b"p1", b"p2"])
        buffer.put_agent(b"a1")
        await buffer.put_many([b"u1"], Lane.URGENT)
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        assert spill_all(spool, buffer) == 4
        assert not len(buffer)
        await spool.close()
        reopened = Spool(tmp_path, _config(), Health())
        await reopened.open()
        return await _drain(reopened)

    assert run(go()) == [b"a1", b"u1", b"p1", b"p2"]


def test_the_spooler_sleeps_while_connected_until_told_or_above_high_water(
    tmp_path: Path,
) -> None:
    """Connected and keeping up it neither moves nor looks (no wake-ups); past the high-water
    mark it moves at once, down to the low-water mark; told the link is down, everything."""

    async def go() -> None:
        buffer = RecordBuffer(max_bytes=100_000)
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        link = {"up": True}
        down = asyncio.Event()
        looks = 0

        def connected() -> bool:
            nonlocal looks
            looks += 1
            return link["up"]

        async with asyncio.TaskGroup() as tg:
            spooler = tg.create_task(run_spooler(spool, buffer, connected, down))
            await buffer.put_many([b"x" * 1000] * 40)  # 40 % of the buffer
            await asyncio.sleep(0.5)
            assert spool.records == 0
            assert looks == 1  # asked once before going to sleep; not since
            await buffer.put_many([b"x" * 1000] * 20)  # 60 %: past the high-water mark
            await asyncio.sleep(0.3)
            assert buffer.plugin_bytes <= 100_000 * LOW_WATER
            assert spool.records > 0
            link["up"] = False
            down.set()
            await asyncio.sleep(0.3)
            assert not len(buffer)
            spooler.cancel()
        await spool.close()

    run(go())


# -- settings and the persisted plugin set --------------------------------------------------------


def test_spool_settings_are_checked_by_name(tmp_path: Path) -> None:
    from elkeid_agent.config import ConfigError, load_config

    path = tmp_path / "agent.toml"
    path.write_text("[spool]\nfsync_interval = 0\n")
    with pytest.raises(ConfigError, match="key spool: fsync_interval must be between"):
        load_config(path, {}, product=tmp_path / "none.toml")


def test_last_plugin_set_round_trip_without_urls(tmp_path: Path) -> None:
    from elkeid_agent.commands import ConfigSpec
    from elkeid_agent.plugins import lastset

    spec = ConfigSpec(name="p", version="2", sha256="ab" * 32, download_urls=("http://x/p",))
    lastset.save(tmp_path, [spec])
    assert lastset.load(tmp_path) == [ConfigSpec(name="p", version="2", sha256="ab" * 32)]
    (tmp_path / lastset.LAST_SET_FILE).write_bytes(b"{not json")
    assert lastset.load(tmp_path) == []


def test_a_record_larger_than_an_entry_is_spooled_whole(tmp_path: Path) -> None:
    big = b"b" * (3 * 1024 * 1024)

    async def go() -> list[bytes]:
        buffer = RecordBuffer()
        await buffer.put_many([b"small"])
        await buffer.put_many([big])
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        assert move(spool, buffer, ALL_LANES, 0) == 2
        assert buffer.stats.dropped_oversize == 0
        await spool.close()
        reopened = Spool(tmp_path, _config(), Health())
        await reopened.open()
        return await _drain(reopened)

    assert run(go()) == [b"small", big]


def test_new_segments_sort_after_the_checkpoint(tmp_path: Path) -> None:
    """A checkpoint naming a later segment than any on disk, then a SIGKILL before the next
    checkpoint: new segments must not take a lower id, which the next start would read as
    delivered."""
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "checkpoint").write_bytes(fmt.encode_checkpoint(7, 123))

    async def killed_after_writing() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        spool.append(Lane.PLUGIN, 10, _records(0, 10))
        await spool.step()  # on disk; no close, no checkpoint

    run(killed_after_writing())
    assert _reopen(tmp_path) == (list(range(10)), 0)


def test_the_last_messages_are_sent_again_unless_confirmed(tmp_path: Path) -> None:
    """No acknowledgements: the messages written last, TRAIL_BYTES of them, may be unread when
    the process dies. Messages from the spool hold MESSAGE_BYTES at most."""
    per_entry = 1000
    entry_bytes = fmt.HEADER_BYTES + len(_records(0, per_entry, 1000))
    assert MESSAGE_BYTES < 2 * entry_bytes <= 2 * MESSAGE_BYTES
    sent, total = 10, 12

    async def send_then_exit() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for i in range(total):
            spool.append(Lane.PLUGIN, per_entry, _records(i * per_entry, per_entry, 1000))
        await spool.step()
        for _ in range(sent):
            batch = await spool.read(8 << 20)
            assert batch.count == per_entry  # one entry per message: MESSAGE_BYTES
            spool.commit(batch)
        await spool.close()

    run(send_then_exit())
    trailed = TRAIL_BYTES // entry_bytes
    assert 0 < trailed < sent
    first = (sent - trailed) * per_entry
    assert _reopen(tmp_path) == (list(range(first, total * per_entry)), 0)


def test_a_directory_named_as_a_segment_is_refused_and_left_alone(tmp_path: Path) -> None:
    _fill(tmp_path, 1)
    (tmp_path / "spool" / fmt.segment_name(5)).mkdir()
    assert _reopen(tmp_path) == (list(range(10)), 0)
    assert (tmp_path / "spool" / fmt.segment_name(5)).is_dir()


def test_connected_the_spool_never_drops_it_leaves_the_records_in_memory(tmp_path: Path) -> None:
    """Above high water while connected, chunks go to the spool only while it has room: the
    rest stays in memory (the plugins wait) instead of the bound dropping the oldest."""
    chunk = [b"r" * 1000] * 1000  # ~1 MiB per chunk

    async def go() -> tuple[int, int, int]:
        buffer = RecordBuffer(max_bytes=64 * 1024 * 1024)
        for _ in range(40):
            await buffer.put_many(chunk)
        spool = Spool(tmp_path, _config(max_bytes=20 * 1024 * 1024), Health())
        await spool.open()
        moved = move(spool, buffer, PLUGIN_LANES, 0)
        await spool.close()
        return moved, len(buffer), spool.stats.dropped_records + buffer.stats.dropped_oversize

    moved, left, dropped = run(go())
    assert dropped == 0
    assert 0 < moved < 40_000
    assert moved + left == 40_000


def test_an_entry_sent_while_the_writer_waits_does_not_shift_the_others(tmp_path: Path) -> None:
    """The writer awaits (room, a new segment) between choosing entries and writing them; an
    entry sent from memory meanwhile must not move the offsets of the ones written after it."""

    async def go() -> tuple[list[bytes], int]:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for start in (0, 10, 20):
            spool.append(Lane.PLUGIN, 10, _records(start, 10))
        writer = asyncio.ensure_future(spool.step())
        await asyncio.sleep(0)  # the writer is now waiting for its first disk call
        first = await spool.read(_ENTRY_PAYLOAD)
        assert len(first.entries) == 1
        spool.commit(first)
        await writer
        rest = await _drain(spool)
        await spool.close()
        return unsplice(first.spliced) + rest, spool.stats.corrupt_entries

    records, corrupt = run(go())
    assert corrupt == 0
    assert records == unsplice(_records(0, 30))


def test_a_message_larger_than_the_trail_is_still_sent_again_after_a_crash(
    tmp_path: Path,
) -> None:
    """One entry may alone be larger than TRAIL_BYTES: the newest message always stays behind
    the checkpoint until the server confirms it."""
    big = [b"b" * (TRAIL_BYTES + 1024)]

    async def go() -> list[bytes]:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        spool.append(Lane.PLUGIN, 1, splice_records(big, b""))
        await spool.step()
        batch = await spool.read(16 << 20)
        assert len(batch.entries) == 1
        spool.commit(batch)  # written to the stream; then the process dies (no close)
        await spool.step()
        reopened = Spool(tmp_path, _config(), Health())
        await reopened.open()
        return await _drain(reopened)

    assert run(go()) == big


def test_an_append_writes_its_entries_in_order_without_joining_them(tmp_path: Path) -> None:
    # More buffers than one writev takes, some empty, of sizes that straddle the cuts.
    blobs = [bytes([i % 251]) * (i % 7) for i in range(2 * IOV_MAX + 3)]
    files = SpoolFiles(tmp_path)
    fd = files.open_segment(-1, 1)
    try:
        files.append(fd, blobs[:5], 0)
        files.append(fd, blobs[5:], 0)
    finally:
        os.close(fd)
    assert (tmp_path / fmt.segment_name(1)).read_bytes() == b"".join(blobs)
