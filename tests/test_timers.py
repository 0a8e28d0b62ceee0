"""Deadlines that a timer firing early cannot skip, on a busy uvloop event loop."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import uvloop

from elkeid_agent.timers import TIMER_SLACK, Deadline, run_every


def test_deadline_steps_by_interval_and_tolerates_an_early_wake() -> None:
    d = Deadline(1.0, now=100.0)
    assert d.at == 101.0
    assert not d.due(100.9)
    assert d.due(101.0 - TIMER_SLACK / 2)  # a timer 1-2 ms early is on time
    d.advance(101.0 - TIMER_SLACK / 2)
    assert d.at == 102.0  # fixed steps: no drift from the early wake
    d.advance(102.3)  # late by 0.3 s: the next one stays on the grid
    assert d.at == 103.0


def test_deadline_after_a_stall_does_not_burst() -> None:
    d = Deadline(1.0, now=0.0)
    d.advance(5.5)  # the loop was blocked for four intervals
    assert d.at == 6.5
    with pytest.raises(ValueError, match="interval"):
        Deadline(0.0, now=0.0)


async def _busy(stop: asyncio.Event) -> None:
    """A loop that never rests: short slices of CPU, then straight back into the queue."""
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < 0.001:
            pass
        await asyncio.sleep(0)


def test_beats_match_elapsed_time_under_a_busy_uvloop() -> None:
    # Off the beat grid, so that the end does not race a beat that is due at that moment.
    interval, watchdog, duration = 0.2, 0.15, 4.1
    beats: list[float] = []
    ticks: list[float] = []

    async def beat() -> None:
        beats.append(time.monotonic())
        # As send_heartbeat does: a few ms of work on the loop thread.
        started = time.perf_counter()
        while time.perf_counter() - started < 0.003:
            pass

    async def tick() -> None:
        ticks.append(time.monotonic())

    async def main() -> float:
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            busy = [tg.create_task(_busy(stop)) for _ in range(8)]
            started = time.monotonic()
            timer = tg.create_task(run_every([(interval, beat), (watchdog, tick)]))
            await asyncio.sleep(duration)
            elapsed = time.monotonic() - started
            timer.cancel()
            stop.set()
            await asyncio.gather(*busy)
        return elapsed

    elapsed = uvloop.run(main())
    assert abs(len(beats) - elapsed / interval) <= 1, (len(beats), elapsed)
    assert abs(len(ticks) - elapsed / watchdog) <= 1, (len(ticks), elapsed)
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 2 * interval  # never a whole interval skipped
