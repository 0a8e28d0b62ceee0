"""The agent's I/O threads: one fixed pool behind every `asyncio.to_thread`, all started at once.

asyncio's default pool starts threads lazily, up to `cpus + 4` (32 on a large host), whenever
calls overlap: the thread count then drifts with load and core count. A fixed pool, started
whole, keeps it constant (the size that the 2-core hosts the tests run on get by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

IO_THREADS = 6


def started_pool(size: int = IO_THREADS) -> ThreadPoolExecutor:
    """A pool with all `size` threads running: each start waits until every thread is in.

    When a thread cannot be started (a tasks limit), the pool goes on with those that were:
    the barrier is broken rather than left to hold them, and the process, for good."""
    pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="io")
    barrier = threading.Barrier(size)
    futures: list[Future[int]] = []
    try:
        for _ in range(size):
            futures.append(pool.submit(barrier.wait))
    except RuntimeError as exc:  # "can't start new thread"; the pool tries again when used
        barrier.abort()
        log.warning("%d of %d I/O threads started: %s", len(futures), size, exc)
    for future in futures:
        with contextlib.suppress(threading.BrokenBarrierError):
            future.result()
    return pool


def use_fixed_pool(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_default_executor(started_pool())
