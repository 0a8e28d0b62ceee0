"""Issue 19's findings 1-12, one test each (finding 0 end to end: test_spool_resend.py).

Real files in tmp_path where the finding is about files; the fault-injecting `MemFiles` where a
disk must refuse writes on cue.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from spoolfakes import MemFiles

from elkeid_agent.buffer import Batch, Lane, RecordBuffer
from elkeid_agent.config import SpoolConfig
from elkeid_agent.health import Health
from elkeid_agent.spool import format as fmt
from elkeid_agent.spool.core import SpoolCore
from elkeid_agent.spool.store import (
    CHECKPOINT_FILE,
    RETRY_SECONDS,
    TRAIL_BYTES,
    Spool,
    SpoolState,
)
from elkeid_agent.transport.discovery import Backoff
from elkeid_agent.transport.stream import delay_after_stream
from elkeid_agent.wire import encode_record, splice_records, unsplice

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _records(start: int, n: int, size: int = 1000) -> bytes:
    return splice_records([b"%010d" % i + b"x" * (size - 10) for i in range(start, start + n)],
                          b"")


def _config(**kw: Any) -> SpoolConfig:
    return SpoolConfig(**{"max_bytes": 1024 * 1024, "min_free_bytes": 0, **kw})


async def _drain(spool: Spool) -> list[int]:
    out: list[int] = []
    while True:
        batch = await spool.read(8 << 20)
        if not batch.entries:
            return out
        out += [int(r[:10]) for r in unsplice(batch.spliced)]
        spool.commit(batch)


def _reopened(tmp_path: Path, **kw: Any) -> list[int]:
    async def go() -> list[int]:
        spool = Spool(tmp_path, _config(**kw), Health())
        await spool.open()
        got = await _drain(spool)
        spool.confirm()
        await spool.close()
        return got

    return run(go())


def test_1_a_drop_racing_a_commit_forgets_nothing_twice(tmp_path: Path) -> None:
    """Disconnected at the size bound, the writer drops the oldest segment (reading its agent
    records back first) while a batch from that segment is being written to the stream: the
    commit lands at some point of the drop (swept over the writer's first milliseconds).
    Counters stay true."""

    async def once(k: int) -> tuple[int, int, int, int]:
        work = tmp_path / str(k)
        spool = Spool(work, _config(), Health())
        await spool.open()
        for i in range(0, 1020, 60):  # 17 entries of ~60 KB: the bound is near
            spool.append(Lane.AGENT if i % 120 == 0 else Lane.PLUGIN, 60, _records(i, 60))
            await spool.step()
        batch = await spool.read(1)  # the agent entry at the head of the oldest segment
        spool.append(Lane.PLUGIN, 60, _records(1020, 60))
        writer = asyncio.ensure_future(spool.step())  # drops the segment `batch` came from
        await asyncio.sleep(k * 0.0002)
        spool.commit(batch)  # the message was written meanwhile
        await writer
        records, dropped = spool.records, spool.stats.dropped_records
        rest = await _drain(spool)
        delivered = [int(r[:10]) for r in unsplice(batch.spliced)] + rest
        await spool.close()
        return records, len(rest), dropped, 1080 - len(set(delivered))

    for k in range(40):
        records, held, dropped, missing = run(once(k))
        assert records == held, (k, records, held)
        assert dropped == missing, (k, dropped, missing)
        assert dropped > 0


def test_2_a_writer_cancelled_mid_write_lets_close_end_and_keeps_the_records(
    tmp_path: Path,
) -> None:
    async def once(k: int) -> float:
        work = tmp_path / str(k)
        spool = Spool(work, _config(max_bytes=64 * 1024 * 1024), Health())
        await spool.open()
        for i in range(0, 8000, 1000):
            spool.append(Lane.PLUGIN, 1000, _records(i, 1000))
        writer = asyncio.ensure_future(spool.run())
        for _ in range(k):
            await asyncio.sleep(0)
        writer.cancel()  # the agent's task group failed
        await asyncio.gather(writer, return_exceptions=True)
        started = time.monotonic()
        await asyncio.wait_for(spool.close(), 10)
        return time.monotonic() - started

    for k in range(0, 8, 2):
        assert run(once(k)) < 10
        assert sorted(set(_reopened(tmp_path / str(k), max_bytes=64 * 1024 * 1024))) == list(
            range(8000))


def test_3_a_free_space_shortfall_never_deletes_what_the_spool_holds(tmp_path: Path) -> None:
    async def fill() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for i in range(0, 600, 100):
            spool.append(Lane.PLUGIN, 100, _records(i, 100))
            await spool.step()
        await spool.close()

    run(fill())
    before = sorted(p.name for p in (tmp_path / "spool").glob("*.seg"))
    st = os.statvfs(tmp_path)
    short = st.f_bavail * st.f_frsize + 1024**3  # another process took the space

    async def more() -> tuple[SpoolState, int]:
        spool = Spool(tmp_path, _config(min_free_bytes=short), Health())
        await spool.open()
        spool.append(Lane.PLUGIN, 100, _records(600, 100))
        await spool.round()
        state, dropped = spool.state, spool.stats.dropped_records
        await spool.close()
        return state, dropped

    state, dropped = run(more())
    assert state is SpoolState.DEGRADED
    assert dropped == 0
    assert set(before) <= {p.name for p in (tmp_path / "spool").glob("*.seg")}
    assert sorted(set(_reopened(tmp_path))) == list(range(600))


def test_4_no_spool_file_io_on_the_event_loop(tmp_path: Path) -> None:
    """commit() and confirm() used to write the checkpoint on the event loop."""
    opened_on_loop: list[str] = []
    watching = threading.Event()
    loop_thread = threading.get_ident()

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if (watching.is_set() and event == "open" and threading.get_ident() == loop_thread
                and str(tmp_path) in str(args[0])):
            opened_on_loop.append(str(args[0]))

    sys.addaudithook(hook)

    async def go() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for i in range(0, 300, 100):
            spool.append(Lane.PLUGIN, 100, _records(i, 100))
        await spool.step()
        watching.set()
        try:
            while batch := await spool.read(150_000):
                if not batch.entries:
                    break
                spool.commit(batch)
            spool.confirm()
            await spool.step()
        finally:
            watching.clear()
        await spool.close()

    run(go())
    assert opened_on_loop == []


def test_5_a_failed_live_write_goes_before_newer_spooled_records(tmp_path: Path) -> None:
    """A message from memory whose write fails after the spooler moved newer records to the
    spool is sent before them, not after."""
    from elkeid_agent.transport.stream import TransferLoop

    async def go() -> list[int]:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        buffer = RecordBuffer()
        loop = TransferLoop.__new__(TransferLoop)
        loop.spool, loop.buffer = spool, buffer
        failed = Batch([(Lane.PLUGIN, (_records(0, 10), 10))])
        spool.append(Lane.PLUGIN, 10, _records(10, 10))  # moved while the write was out
        loop._requeue(failed, resent=False)
        got = await _drain(spool)
        await spool.close()
        return got

    assert run(go()) == list(range(20))


def test_6_start_up_memory_is_bounded_whatever_the_segments_hold(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    good = fmt.encode_entry(2, 5, 1, _records(0, 5))
    # A header that claims 0x7FFFFFFF bytes, then a 256 MiB sparse tail of zeros.
    bogus = bytearray(fmt.encode_entry(2, 1, 1, b"z"))
    bogus[10:14] = (0x7FFFFFFF).to_bytes(4, "little")
    with (spool_dir / fmt.segment_name(1)).open("wb") as out:
        out.write(good + bytes(bogus))
        out.truncate(256 * 1024 * 1024)
    (spool_dir / fmt.segment_name(2)).write_bytes(fmt.encode_entry(2, 5, 1, _records(5, 5)))
    tracemalloc.start()
    try:
        got = _reopened(tmp_path, max_bytes=256 * 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == list(range(10))
    assert peak < 24 * 1024 * 1024, f"start-up peak {peak / 2**20:.0f} MiB"


def test_6_damage_found_at_start_leaves_the_disk_and_is_named(tmp_path: Path) -> None:
    """A segment whose tail is damage is cut after its last intact entry; one with nothing
    intact, or beyond the scan's bound, is deleted: the next start neither scans the garbage
    again nor counts it against max_bytes. The start's warning names what was dropped."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    entries = [fmt.encode_entry(2, 5, 1, _records(i, 5)) for i in (0, 5, 10)]
    size = len(entries[0])
    (spool_dir / fmt.segment_name(1)).write_bytes(entries[0] + b"\xe5garbage")
    (spool_dir / fmt.segment_name(2)).write_bytes(b"\x00" * 1000)
    with (spool_dir / fmt.segment_name(3)).open("wb") as out:
        out.write(entries[1])
        out.truncate(3 * 1024 * 1024)  # sparse, past the scan's bound (twice max_bytes)
    (spool_dir / fmt.segment_name(4)).write_bytes(entries[2])
    (spool_dir / fmt.segment_name(5)).write_bytes(b"")

    async def opened() -> Spool:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        return spool

    spool = run(opened())
    assert (spool_dir / fmt.segment_name(1)).stat().st_size == size
    assert not (spool_dir / fmt.segment_name(2)).exists()  # nothing intact in it
    assert (spool_dir / fmt.segment_name(3)).stat().st_size == size
    assert not (spool_dir / fmt.segment_name(4)).exists()  # not read: beyond the bound
    assert not (spool_dir / fmt.segment_name(5)).exists()  # empty
    assert spool.disk_bytes() == 2 * size
    assert spool.records == 10
    assert spool.stats.corrupt_bytes == 8 + 1000 + 3 * 1024 * 1024 - size + size
    warning = spool.damage_warning
    assert warning.startswith("spool: damaged data dropped at start: 5 regions, ")
    names = ", ".join(fmt.segment_name(i) for i in (1, 2, 3))
    assert warning.endswith(
        f"in {names}, 1 more (segments past the first 2097152 bytes, twice max_bytes, not read)")
    again = run(opened())
    assert again.stats.corrupt_entries == 0
    assert again.damage_warning == ""
    assert _reopened(tmp_path) == list(range(10))


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_6_a_non_regular_segment_is_refused_with_a_fault_and_left_alone(
    tmp_path: Path, kind: str
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / fmt.segment_name(1)).write_bytes(fmt.encode_entry(2, 5, 1, _records(0, 5)))
    odd = spool_dir / fmt.segment_name(2)
    outside = tmp_path / "outside.seg"
    outside.write_bytes(fmt.encode_entry(2, 5, 1, _records(100, 5)))
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "symlink":
        os.symlink(outside, odd)
    else:
        odd.mkdir()
    health = Health()

    async def go() -> list[int]:
        spool = Spool(tmp_path, _config(), health)
        await asyncio.wait_for(spool.open(), 10)
        got = await _drain(spool)
        spool.confirm()
        await spool.step()
        await spool.close()
        return got

    try:
        assert run(go()) == list(range(5))
    finally:
        if kind == "fifo":  # never leave a reader blocked on it (the old code's hang)
            fd = os.open(odd, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(odd) else -1
            if fd >= 0:
                os.close(fd)
    assert health.faulty("spool files")
    assert os.path.lexists(odd)
    assert outside.read_bytes() == fmt.encode_entry(2, 5, 1, _records(100, 5))


def test_6_a_checkpoint_that_is_a_symlink_is_refused_and_never_replaced(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / fmt.segment_name(1)).write_bytes(fmt.encode_entry(2, 5, 1, _records(0, 5)))
    outside = tmp_path / "outside"
    outside.write_bytes(fmt.encode_checkpoint(1, 0))
    os.symlink(outside, spool_dir / "checkpoint")
    health = Health()

    async def go() -> list[int]:
        spool = Spool(tmp_path, _config(), health)
        await spool.open()
        got = await _drain(spool)
        spool.append(Lane.PLUGIN, 5, _records(5, 5))
        await spool.step()  # a commit and a write: the checkpoint would move
        await spool.close()
        return got

    assert run(go()) == list(range(5))
    assert health.faulty("spool files")
    assert (spool_dir / "checkpoint").is_symlink()
    assert outside.read_bytes() == fmt.encode_checkpoint(1, 0)


def _has_reader(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def test_7_a_spool_directory_that_is_a_symlink_is_refused_and_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / ".stale.new").write_bytes(b"someone's file")
    (target / "0000000000000009.seg").write_bytes(b"not ours")
    work = tmp_path / "work"
    work.mkdir()
    (work / "spool").symlink_to(target)
    health = Health()

    async def go() -> SpoolState:
        spool = Spool(work, _config(), health)
        await spool.open()
        spool.append(Lane.PLUGIN, 10, _records(0, 10))
        await spool.round()
        await spool.close()
        return spool.state

    assert run(go()) is SpoolState.DEGRADED
    assert health.faulty("spool")
    assert sorted(p.name for p in target.iterdir()) == [".stale.new", "0000000000000009.seg"]


def test_8_a_degraded_spool_clears_its_fault_only_after_a_write_succeeds() -> None:
    files = MemFiles()
    health = Health()

    async def go() -> list[bool]:
        spool = Spool(Path("/nonexistent"), _config(), health, files)
        await spool.open()
        spool.append(Lane.PLUGIN, 10, _records(0, 10))
        files.fail_next("enospc")
        await spool.round()
        assert spool.state is SpoolState.DEGRADED
        # The records leave from memory meanwhile: nothing waits for the disk any more.
        spool.commit(await spool.read(1 << 20))
        spool.confirm()
        faulty = []
        for _ in range(3):  # the disk still refuses
            files.fail_next("enospc")
            spool._degraded_since -= RETRY_SECONDS
            await spool.round()
            faulty.append(health.faulty("spool"))
        spool._degraded_since -= RETRY_SECONDS
        await spool.round()  # now it takes the write
        faulty.append(health.faulty("spool"))
        return faulty

    assert run(go()) == [True, True, True, False]


def test_9_an_end_of_stream_before_our_half_close_is_no_confirmation(tmp_path: Path) -> None:
    """Finishing, but before `done_writing()`: a server that ends the stream then did not
    answer our half-close, and may not have read everything. The trail must be kept."""
    from elkeid_agent.config import Config, RegionConfig, TlsConfig, TransportConfig
    from elkeid_agent.transport.stream import TransferLoop
    from elkeid_agent.transport.tls import TlsMaterial
    from elkeid_center.testing import CenterThread

    async def go(center: CenterThread) -> tuple[int, int]:
        certs = center.certs
        config = Config(
            work_dir=str(tmp_path),
            tls=TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert),
                          key=str(certs.client_key)),
            transport=TransportConfig(compression="none", send_interval=30.0,
                                      backoff_initial=30.0),
            regions={"default": RegionConfig(private=center.address)},
        )
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        for i in range(0, 300, 100):
            records = [encode_record(9999, 1, {"seq": str(j)}) for j in range(i, i + 100)]
            spool.append(Lane.PLUGIN, 100, splice_records(records, b""))
        buffer = RecordBuffer()
        loop = TransferLoop(config, TlsMaterial.load(config.tls), buffer, lambda: b"",
                            _ignore, lambda: None, spool=spool)
        task = asyncio.create_task(loop.run())
        try:
            while spool.records or loop.state.stats.tx_records < 300:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            # Finishing, but the send loop has not half-closed yet (it waits for records).
            loop._finishing = True
            await asyncio.to_thread(center.end)
            while loop.state.connected:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return spool.records, getattr(spool.stats, "resent_records", 0)

    with CenterThread(tmp_path / "certs") as center:
        records, resent = run(go(center))
    assert records == 300  # all three messages are to be sent again
    assert resent == 300


async def _ignore(raw: bytes) -> None:
    return None


def test_10_commits_from_memory_keep_the_trail(tmp_path: Path) -> None:
    """One entry larger than the trail, then a batch sent from memory: after a crash the batch
    from memory is sent again (it used to add an empty trail entry that emptied the trail)."""

    async def go() -> None:
        spool = Spool(tmp_path, _config(max_bytes=64 * 1024 * 1024), Health())
        await spool.open()
        spool.append(Lane.PLUGIN, 1, splice_records([b"%010d" % 0 + b"b" * TRAIL_BYTES], b""))
        await spool.step()
        spool.commit(await spool.read(16 << 20))
        spool.append(Lane.PLUGIN, 5, _records(1, 5))
        spool.commit(await spool.read(16 << 20))  # sent before it reached the disk
        await spool.step()  # then the process dies (no close)

    run(go())
    assert set(range(1, 6)) <= set(_reopened(tmp_path, max_bytes=64 * 1024 * 1024))


def test_11_with_no_segment_open_the_checkpoint_sorts_after_every_file() -> None:
    core = SpoolCore(1 << 20, 0, 64 * 1024, 1 << 18, TRAIL_BYTES, 1 << 20)
    core.load([], {3: 1000, 4: 1000}, next_segment=5)
    assert core.active == -1
    assert core.checkpoint_position()[:2] == (5, 0)


def test_11_a_restart_after_everything_was_delivered_sends_nothing_again(tmp_path: Path) -> None:
    async def first() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        spool.append(Lane.PLUGIN, 100, _records(0, 100))
        await spool.close()

    async def deliver_then_die() -> None:
        spool = Spool(tmp_path, _config(), Health())
        await spool.open()
        await _drain(spool)
        spool.confirm()
        (tmp_path / "spool" / fmt.segment_name(1)).chmod(0o400)
        await spool.step()  # checkpoint written; then SIGKILL

    run(first())
    run(deliver_then_die())
    ck = fmt.decode_checkpoint((tmp_path / "spool" / CHECKPOINT_FILE).read_bytes())
    assert ck is not None
    assert ck[0] > 1
    assert _reopened(tmp_path) == []


def test_12_reconnects_within_seconds_of_a_flapping_servers_return() -> None:
    """Simulated clock: a server up 8 s, down 2 s, for 100 cycles; the agent dials when its
    backoff says. Measured: the delay from each return to the reconnect, and dials per down
    window. A server that ends every stream at once is not hammered."""
    up, down = 8.0, 2.0

    def server_up(t: float) -> bool:
        return t % (up + down) < up

    def simulate(rule: Any) -> tuple[float, int, float]:
        backoff = Backoff(1.0, 1.6, 120.0, 0.2, random.Random(7))
        t, lags, dials, windows = 0.0, [], 0, 0
        while t < 100 * (up + down):
            dials += 1
            if server_up(t):
                back = t - (t % (up + down))  # when this up-window began
                lags.append(t - back)
                end = back + up  # the stream lives until the server goes down
                t = end + rule(backoff, end - (t if t > back else back))
                windows += 1
            else:
                t += backoff.next()
        return max(lags[1:]), dials, sum(lags[1:]) / len(lags[1:])

    def old_rule(backoff: Backoff, lived: float) -> float:
        if lived >= 30.0:
            backoff.reset()
        return backoff.next()

    worst_new, _, mean_new = simulate(delay_after_stream)
    worst_old, _, mean_old = simulate(old_rule)
    print(f"reconnect after a return: new worst {worst_new:.1f} s mean {mean_new:.1f} s; "
          f"old worst {worst_old:.1f} s mean {mean_old:.1f} s")
    assert worst_new < 5.0
    assert worst_old > 5.0

    # A server that takes each connection and ends the stream at once: delays keep growing.
    backoff = Backoff(1.0, 1.6, 120.0, 0.0)
    delays = [delay_after_stream(backoff, 0.05) for _ in range(12)]
    assert delays[-1] >= 60.0
    assert sum(delays) > 200.0
