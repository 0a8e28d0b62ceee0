"""Center restarts leave nothing behind: channels, calls, tasks, fds and threads stay flat.

The RSS curve under churn is bench/churn.py's job (a timed, noisy figure); these tests count
the things whose growth would be a leak, over 15 restarts of a real center.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import os
import signal
import time
from pathlib import Path

import psutil
from agentproc import AgentProcess, patch_config, wait_until
from conftest import AgentConfig

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.config import load_config
from elkeid_agent.transport.stream import TransferLoop
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_center.testing import CenterThread

RESTARTS = 15
# The first streams still grow one-time state (grpc's pollers, lazily created executors).
WARMUP = 3
FAST = {"heartbeat_interval": 0.5, "dial_timeout": 2.0, "backoff_initial": 0.2,
        "backoff_max": 0.5}
# grpc.aio's Python and Cython objects of one channel and its call, and our tasks.
WATCHED = (
    "Channel", "AioChannel", "StreamStreamCall", "_AioCall", "StreamStreamMultiCallable",
    "Task", "ExceptionGroup", "AioRpcError", "StreamClosed",
)


def live_objects() -> dict[str, int]:
    gc.collect()
    counts = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return {name: counts[name] for name in WATCHED}


def test_transfer_loop_keeps_no_channel_or_call_across_restarts(
    center: CenterThread, tmp_path: Path
) -> None:
    config_path = patch_config(
        center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"), transport=FAST
    )
    config = load_config(str(config_path), env={})
    samples: list[dict[str, int]] = []

    async def churn() -> None:
        buffer = RecordBuffer(config.buffer.max_bytes, config.buffer.agent_lane_bytes)
        loop = TransferLoop(
            config, TlsMaterial.load(config.tls), buffer, lambda: b"",
            lambda raw: asyncio.sleep(0), lambda: buffer.put_agent(b"\x08\xe8\x07"),
        )
        async with asyncio.TaskGroup() as tg:
            runner = tg.create_task(loop.run())
            for n in range(RESTARTS + 1):
                await asyncio.to_thread(
                    wait_until, lambda n=n: loop.state.stats.connects > n, 20
                )
                await asyncio.to_thread(center.wait_connected)
                samples.append(live_objects())
                await asyncio.to_thread(center.restart)
            runner.cancel()

    asyncio.run(churn())
    assert len(center.connections()) == RESTARTS + 1
    assert samples[-1] == samples[WARMUP], (samples[WARMUP], samples[-1])
    assert samples[-1]["Channel"] <= 1


# grpc's event engine pool: its lifeguard adds workers while work waits and retires idle ones,
# so their number follows the machine's load. A leaked channel or call shows in the fds and in
# the live objects above.
GRPC_POOL_THREAD = "event_engine"


def _own_threads(pid: int) -> int:
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            names.append(Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
    return len([name for name in names if name != GRPC_POOL_THREAD])


def _agent_counts(pid: int) -> tuple[int, int]:
    """The fds and threads that stay: the least of a few samples.

    Some fds are open only for a moment (the heartbeat reading /proc, a dial racing the
    last one, a spool read); a sample can catch one. A leaked fd is in every sample.
    """
    proc = psutil.Process(pid)
    samples = []
    for _ in range(5):
        samples.append((proc.num_fds(), _own_threads(pid)))
        time.sleep(0.1)
    return min(fds for fds, _ in samples), min(threads for _, threads in samples)


def _dumped_tasks(log: str, dumps: int) -> list[str] | None:
    """The task names of the log's n-th SIGUSR1 dump, once all of it is written."""
    found = log.split("SIGUSR1: ")[1:]
    if len(found) <= dumps:
        return None
    count, *lines = found[dumps].splitlines() or [""]
    # The dump's lines are its tasks ("--- name (coro)") and their frames ("  file:line").
    dump = itertools.takewhile(lambda line: line.startswith(("--- ", "  ")), lines)
    tasks = [line.split()[1] for line in dump if line.startswith("--- ")]
    return tasks if count.split()[:1] == [str(len(tasks))] else None


def _task_count(agent: AgentProcess, dumps: int) -> int:
    """Tasks in the agent's n-th SIGUSR1 dump, but for the one-shot "trim" of start-up."""
    agent.signal(signal.SIGUSR1)
    tasks = wait_until(lambda: _dumped_tasks(agent.log(), dumps), timeout=10)
    return len([name for name in tasks if name != "trim"])


def test_agent_fds_threads_and_tasks_flat_across_restarts(
    center: CenterThread, agent_config: AgentConfig
) -> None:
    with AgentProcess(agent_config(transport=FAST)) as agent:
        samples: list[tuple[int, int, int]] = []
        for n in range(RESTARTS + 1):
            # A new stream, its first heartbeat through: the reconnect path has run.
            wait_until(lambda n=n: len(center.connections()) > n, timeout=20)
            center.wait_connected(timeout=20)
            samples.append((*_agent_counts(agent.pid), _task_count(agent, n)))
            center.restart()
        fds, threads, tasks = zip(*samples[WARMUP:], strict=True)
        assert max(fds) == min(fds), samples
        assert max(threads) == min(threads), samples
        assert max(tasks) == min(tasks), samples
        assert agent.stop() == 0
