"""Cancelling the transfer loop ends it, however its stream is ending at that moment.

The agent's exit cancels `TransferLoop.run`. Python 3.11's TaskGroup, when a stream's loop
failed during the group's exit, left the run task's `cancelling()` raised for good, and
raised the stream's end in place of a cancel that came at the same moment: `run` took it for
one more ended stream and connected again, so the exit never ended (seen once in CI: the
churn test hung 300 s after its last restart).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from agentproc import patch_config, wait_until

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.config import Config, load_config
from elkeid_agent.transport.stream import StreamClosed, TransferLoop
from elkeid_agent.transport.tls import TlsMaterial
from elkeid_center.testing import CenterThread

FAST = {"heartbeat_interval": 0.5, "dial_timeout": 2.0, "backoff_initial": 0.2,
        "backoff_max": 0.5}
ENDS = 3


def _config(center: CenterThread, tmp_path: Path) -> Config:
    path = patch_config(
        center.write_agent_config(tmp_path / "agent.toml", tmp_path / "work"), transport=FAST
    )
    return load_config(str(path), env={})


def _loop(
    config: Config,
    on_command: Callable[[bytes], Awaitable[None]] | None = None,
    on_down: Callable[[], None] | None = None,
) -> TransferLoop:
    buffer = RecordBuffer(config.buffer.max_bytes, config.buffer.agent_lane_bytes)

    async def ignore(raw: bytes) -> None:
        return None

    return TransferLoop(
        config, TlsMaterial.load(config.tls), buffer, lambda: b"",
        on_command or ignore, lambda: buffer.put_agent(b"\x08\xe8\x07"),
        on_down or (lambda: None),
    )


def test_ended_streams_leave_the_run_task_uncancelled(
    center: CenterThread, tmp_path: Path
) -> None:
    """Each stream the server ends leaves `cancelling()` at 0, as a later cancel needs."""
    seen: list[int] = []

    def on_down() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(task.cancelling())

    async def churn() -> None:
        loop = _loop(_config(center, tmp_path), on_down=on_down)
        runner = asyncio.create_task(loop.run())
        for n in range(ENDS):
            await asyncio.to_thread(wait_until, lambda n=n: loop.state.stats.connects > n, 20)
            await asyncio.to_thread(center.wait_connected)
            await asyncio.to_thread(center.restart)
        await asyncio.to_thread(wait_until, lambda: len(seen) >= ENDS, 20)
        runner.cancel()
        done, _ = await asyncio.wait([runner], timeout=10)
        assert done, "the transfer loop outlived its cancel"

    asyncio.run(churn())
    assert seen[:ENDS] == [0] * ENDS, seen


@pytest.mark.parametrize("first", ["cancel", "end"])
def test_a_cancel_as_the_stream_ends_ends_the_loop(
    center: CenterThread, tmp_path: Path, first: str
) -> None:
    """The cancel and the stream's end come together, in either order: the loop ends,
    cancelled."""
    runner: asyncio.Task[None] | None = None
    commands = 0

    async def on_command(raw: bytes) -> None:
        nonlocal commands
        commands += 1
        assert runner is not None
        if first == "cancel":
            runner.cancel()
        else:
            # After the group has seen the receive loop fail and begun to abort.
            loop = asyncio.get_running_loop()
            cancel = runner.cancel
            loop.call_soon(lambda: loop.call_soon(cancel))
        raise StreamClosed("the stream ends as the agent exits")

    async def exit_during_an_end() -> None:
        nonlocal runner
        loop = _loop(_config(center, tmp_path), on_command=on_command)
        runner = asyncio.create_task(loop.run())
        # One stream ended by an error first: its group is what left the count raised.
        await asyncio.to_thread(wait_until, lambda: loop.state.stats.connects > 0, 20)
        await asyncio.to_thread(center.wait_connected)
        await asyncio.to_thread(center.restart)
        await asyncio.to_thread(wait_until, lambda: loop.state.stats.connects > 1, 20)
        await asyncio.to_thread(center.wait_connected)
        await asyncio.to_thread(center.send_raw_command, b"")
        done, _ = await asyncio.wait([runner], timeout=10)
        assert done, "the transfer loop outlived its cancel and connected again"
        assert runner.cancelled()
        assert loop.state.stats.connects == 2, loop.state.stats.connects

    asyncio.run(exit_during_an_end())
    assert commands == 1
