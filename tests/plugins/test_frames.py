"""Acceptance: fixture frames written by a real child through a real pipe reach the buffer
verbatim and decode to the fixture's values; the agent's task frames equal the Go agent's."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
import uuid
from pathlib import Path

from plugtools import (
    FIXTURES,
    Harness,
    install_plugin,
    load_jsonl,
    local_spec,
    read_frames,
    run,
    sh_plugin,
    until,
)

from elkeid_agent._proto.bridge_pb2 import Record
from elkeid_agent.buffer import Lane, RecordBuffer
from elkeid_agent.commands import TaskSpec
from elkeid_agent.plugins.process import Counters, PluginProcess
from elkeid_agent.wire import encode_record, record_frame


def _cat_plugin(fixture: str) -> bytes:
    # Write the capture to fd 4, then stay up until the task pipe closes (like the Go library).
    return sh_plugin(f"cat '{FIXTURES / fixture}' >&4\nexec cat <&3 >/dev/null")


def _check_fixture(tmp_path: Path, fixture: str, expect_name: str) -> None:
    raw = (FIXTURES / fixture).read_bytes()
    frames = read_frames(raw)
    expected = load_jsonl(expect_name)
    exe = _cat_plugin(fixture)
    install_plugin(tmp_path, "cat", exe)

    async def main() -> list[bytes]:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("cat", exe)])
            records = await h.wait_records(len(frames))
            await asyncio.sleep(0.2)
            assert len(h.drain()) == len(frames)  # nothing more, nothing less
            info = h.sup.slot_info("cat")
            assert info is not None
            assert info[2].malformed == 0
            return records

    records = run(main())
    assert records == frames  # byte-identical, in order
    for record, want in zip(records, expected, strict=True):
        decoded = Record.FromString(record)
        assert decoded.data_type == want["data_type"]
        assert decoded.timestamp == want["timestamp"]
        assert dict(decoded.data.fields) == want["fields"]
        assert decoded.HasField("data") == (want["payload_len"] is not None)


def test_go_plugin_frames_arrive_verbatim(tmp_path: Path) -> None:
    _check_fixture(tmp_path, "go-plugin-frames.bin", "go-plugin-frames.jsonl")


def test_go_plugin_edge_frames_arrive_verbatim(tmp_path: Path) -> None:
    _check_fixture(tmp_path, "go-plugin-edge-frames.bin", "go-plugin-edge-frames.jsonl")


def test_urgent_pipe_goes_to_the_urgent_lane(tmp_path: Path) -> None:
    raw = (FIXTURES / "go-plugin-edge-frames.bin").read_bytes()
    exe = sh_plugin(
        f'test -n "$ELKEID_PLUGIN_HIGH_PRIORITY_PIPE" || exit 9\n'
        f"cat '{FIXTURES / 'go-plugin-edge-frames.bin'}' >&5\nexec cat <&3 >/dev/null"
    )
    install_plugin(tmp_path, "urgent", exe)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("urgent", exe)])
            await until(lambda: len(h.buffer) >= 18, what="18 urgent records")
            batch = h.buffer.take(8 << 20)
            assert batch.per_lane == (0, 18, 0)
            assert batch.records == read_frames(raw)
            assert Lane.URGENT == 1

    run(main())


def test_task_frames_equal_the_go_agents(tmp_path: Path) -> None:
    # The fixture's `anchor` plugin: copy the task pipe verbatim to a file.
    exe = sh_plugin("exec cat <&3 >task-frames.bin")
    directory = install_plugin(tmp_path, "anchor", exe)
    tasks = [
        TaskSpec(t["data_type"], t["object_name"], t["data"], t["token"])
        for t in load_jsonl("go-agent-task-frames.jsonl")
    ]
    want = (FIXTURES / "go-agent-task-frames.bin").read_bytes()

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("anchor", exe)])
            await until(lambda: (h.sup.slot_info("anchor") or (None, 0, None, None))[3] is not None)
            for task in tasks:
                await h.sup.send_task(task)
            out = directory / "task-frames.bin"
            await until(lambda: out.exists() and out.stat().st_size >= len(want), what="tasks")

    run(main())
    assert (directory / "task-frames.bin").read_bytes() == want


def test_a_big_frame_taken_from_the_buffer_is_not_held_by_the_pipe_reader(
    tmp_path: Path,
) -> None:
    """Once the send loop has taken a frame (and copied it into its message), the plugin's
    pipe reader holds no copy of it while it waits for more: of 8 MiB frames, that copy
    was a fourth beside the message, grpc's and the trail's."""
    size = 6 * 1024 * 1024
    frame = tmp_path / "frame"
    frame.write_bytes(record_frame(encode_record(9999, 0, {"pad": "p" * size})))
    exe = sh_plugin(f"cat '{frame}' >&4\nexec cat <&3 >/dev/null")
    directory = install_plugin(tmp_path, "big", exe)

    async def main() -> int:
        buffer = RecordBuffer()
        proc = PluginProcess.spawn(
            "big", directory, {"PATH": "/usr/bin:/bin"}, buffer=buffer, counters=Counters(),
            max_frame=8 * 1024 * 1024, task_queue=4, tag=f"big.{uuid.uuid4().hex}",
        )
        serving = asyncio.create_task(proc.serve(asyncio.Event()))
        try:
            await until(lambda: len(buffer) == 1, what="the frame queued")
            batch = buffer.take(2 * size)
            assert batch.count == 1
            del batch
            await asyncio.sleep(0.1)  # the reader waits for the pipe meanwhile
            return tracemalloc.get_traced_memory()[0]
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    tracemalloc.start()
    try:
        held = run(main())
    finally:
        tracemalloc.stop()
    assert held < size // 2, f"{held} bytes still allocated"
