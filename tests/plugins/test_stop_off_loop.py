"""A plugin stop never holds the event loop: the cgroup kill (freeze, kill, thaw, wait until
empty: up to ~3 s) and the subreaper sweep (up to 2 s) run in a worker thread, awaited, so the
heartbeat on the loop goes on. The slow kill is made slow on purpose (a sleep before the real
one), as a kernel slow to empty a cgroup would make it."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from plugtools import Harness, install_plugin, local_spec, run, sh_plugin, until
from test_cgroups import escaping, marked

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.plugins import cgroups as cgroupfs
from elkeid_agent.plugins import process, subreaper
from elkeid_agent.plugins.process import Counters, PluginProcess

SLOW = 1.0


def slowed(real: Callable[..., Any]) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(SLOW)
        return real(*args, **kwargs)

    return slow


async def longest_gap(work: asyncio.Task[None]) -> float:
    """The longest the loop went without running a 10 ms ticker while `work` ran."""
    gap, last = 0.0, time.monotonic()
    while not work.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        gap, last = max(gap, now - last), now
    await work
    return gap


@pytest.mark.skipif(not cgroupfs.probe().usable, reason="needs a writable cgroup hierarchy")
def test_a_slow_cgroup_kill_does_not_hold_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroupfs, "kill_cgroup", slowed(cgroupfs.kill_cgroup))
    mark = uuid.uuid4().hex
    exe = escaping(mark)["setsid"]
    install_plugin(tmp_path, "setsid", exe)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("setsid", exe)])
            await until(lambda: len(marked(mark)) >= 3, what="descendants")
            began = time.monotonic()
            gap = await longest_gap(asyncio.create_task(h.sup.sync([])))
            assert time.monotonic() - began >= SLOW  # the slow kill did run
            assert gap < SLOW / 2, f"the loop stood still {gap:.2f} s"
            assert marked(mark) == []

    run(main())


def test_a_slow_subreaper_sweep_does_not_hold_the_loop_even_when_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subreaper, "kill_run", slowed(subreaper.kill_run))
    mark = uuid.uuid4().hex
    # No setsid: this test process is no subreaper (that setting would outlast the test).
    exe = sh_plugin(f"export TEST_MARK={mark}\nsh -c 'while :; do sleep 1; done' &\n"
                    "while :; do sleep 1; done")
    directory = install_plugin(tmp_path, "p", exe)

    async def main() -> None:
        proc = PluginProcess.spawn(
            "p", directory, {"PATH": "/usr/bin:/bin"}, buffer=RecordBuffer(), counters=Counters(),
            max_frame=1 << 20, task_queue=4, tag=f"p.{mark}",
        )
        serving = asyncio.create_task(proc.serve(asyncio.Event()))
        await asyncio.sleep(0)  # serve() runs to its first await: it owns the child now
        await until(lambda: len(marked(mark)) >= 2, what="descendants")
        # Torn down without stop(): the cancel path kills and reaps, off the loop too, and a
        # second cancel while the sweep runs does not leave it behind.
        serving.cancel()
        await asyncio.sleep(0.2)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert proc.returncode == -9  # killed and reaped
        # SIGKILLed: gone once the kernel has run their exits (a loaded host takes a moment).
        await until(lambda: not marked(mark), limit=5, what="every process gone")

    async def measured() -> float:
        return await longest_gap(asyncio.create_task(main()))

    gap = run(measured())
    assert gap < SLOW / 2, f"the loop stood still {gap:.2f} s"


def test_run_to_end_waits_for_its_thread_through_cancels() -> None:
    done: list[float] = []

    def work() -> None:
        time.sleep(0.3)
        done.append(time.monotonic())

    async def main() -> None:
        task = asyncio.create_task(process.run_to_end(work))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done, "the cancel returned before the thread's work was over"

    run(main())


def cgroup_left(cgroup: cgroupfs.PluginCgroup) -> bool:
    return any(os.path.isdir(d) for d in cgroup.directories())


@pytest.mark.skipif(not cgroupfs.probe().usable, reason="needs a writable cgroup hierarchy")
def test_a_cgroup_left_when_its_slot_ends_is_counted_and_swept_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cgroupfs.kill_cgroup
    calls: list[int] = []

    def failing_twice(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) <= 2:  # the stop's kill and the slot's drop: as a kernel refusing them
            raise OSError(16, "Device or resource busy")
        return real(*args, **kwargs)

    monkeypatch.setattr(cgroupfs, "kill_cgroup", failing_twice)
    mark = uuid.uuid4().hex
    # It exits when its task pipe closes (stop), leaving a setsid descendant behind.
    exe = sh_plugin(f"export TEST_MARK={mark}\nsetsid sh -c 'while :; do sleep 1; done' &\n"
                    "cat <&3 >/dev/null")
    install_plugin(tmp_path, "setsid", exe)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("setsid", exe)])
            await until(lambda: len(marked(mark)) >= 3, what="descendants")
            cgroup = h.sup._slots["setsid"].cgroup
            assert cgroup is not None
            await h.sup.sync([])
            assert h.sup.health.counters["plugin_cgroup_leftovers"] == 1
            assert marked(mark), "the setsid descendant outlived its group's kill"
            assert cgroup_left(cgroup)
        # The supervisor's stop swept it: no process, no cgroup left.
        await until(lambda: not marked(mark), limit=5, what="every process gone")
        assert not cgroup_left(cgroup)

    run(main())
