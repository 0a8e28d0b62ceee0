"""Periodic jobs on fixed deadlines that a timer firing early can never skip.

uvloop computes `asyncio.sleep` deadlines from its cached loop time, which lags the real clock
by however long the current loop iteration has run: on a busy loop a timer wakes a little
before the requested moment. A job that slept `interval` and then checked
`monotonic() >= deadline` found itself a millisecond early and waited a whole extra interval
(a busy-loop reproduction lost 4 to 14 beats of 20). Here each job has a deadline on the
monotonic clock; the loop sleeps for what remains until the earliest one, and a wake within
`TIMER_SLACK` of a deadline counts as on time (a wake earlier than that just sleeps the rest).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

#: How early a wake may be and still run its job: well above uvloop's 1 ms timer
#: granularity, far below any interval the agent uses.
TIMER_SLACK = 0.005

Job = Callable[[], Awaitable[object]]


class Deadline:
    """The next moment a job with period `interval` is due (pure; times are monotonic)."""

    def __init__(self, interval: float, now: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.interval = interval
        self.at = now + interval

    def due(self, now: float) -> bool:
        return now + TIMER_SLACK >= self.at

    def advance(self, now: float) -> None:
        """The job ran: its next deadline, one interval on from the last one.

        Fixed steps keep the count of runs equal to the elapsed time over the interval. After
        a stall longer than an interval the missed runs are not made up in a burst.
        """
        self.at += self.interval
        if self.at <= now:
            self.at = now + self.interval


async def run_every(jobs: Sequence[tuple[float, Job]]) -> None:
    """Run each `(interval, job)` every interval from now until cancelled; jobs run in turn."""
    now = time.monotonic()
    schedule = [(Deadline(interval, now), job) for interval, job in jobs]
    if not schedule:
        raise ValueError("no job to run")
    while True:
        earliest = min(deadline.at for deadline, _ in schedule)
        await asyncio.sleep(max(0.0, earliest - time.monotonic()))
        for deadline, job in schedule:
            now = time.monotonic()
            if deadline.due(now):
                deadline.advance(now)
                await job()
