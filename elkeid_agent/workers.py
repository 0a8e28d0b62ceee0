"""The agent's I/O threads: one fixed pool behind every `asyncio.to_thread`, all started at once.

asyncio's default pool starts threads lazily, up to `cpus + 4` (32 on a large host), whenever
calls overlap: the thread count then drifts with load and core count. A fixed pool, started
whole, keeps it constant (the size that the 2-core hosts the tests run on get by default).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

IO_THREADS = 6


def started_pool(size: int = IO_THREADS) -> ThreadPoolExecutor:
    """A pool with all `size` threads running: each start waits until every thread is in."""
    pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="io")
    barrier = threading.Barrier(size)
    for future in [pool.submit(barrier.wait) for _ in range(size)]:
        future.result()
    return pool


def use_fixed_pool(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_default_executor(started_pool())
