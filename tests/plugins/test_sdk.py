"""The Python plugin SDK against the Go library's fixture frames, with injected files."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from plugtools import (
    FIXTURES,
    Harness,
    install_plugin,
    load_jsonl,
    local_spec,
    py_plugin,
    read_frames,
    run,
    until,
)

from elkeid_agent._proto.bridge_pb2 import Record
from elkeid_agent.commands import TaskSpec
from elkeid_plugin_sdk import Client, decode_task, encode_record
from elkeid_plugin_sdk.client import WRITE_BUFFER_BYTES


class Sink(io.RawIOBase):
    """A record file that remembers each write() separately."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return len(data)


def _edge_records() -> list[dict[str, object]]:
    return load_jsonl("go-plugin-edge-frames.jsonl")


def test_frames_match_the_go_library() -> None:
    frames = read_frames((FIXTURES / "go-plugin-edge-frames.bin").read_bytes())
    sink = Sink()
    client = Client(sink, io.BytesIO(), flush_interval=None)
    for want in _edge_records():
        fields = want["fields"] if want["payload_len"] is not None else None
        assert isinstance(fields, dict | None)
        client.send_record(int(want["data_type"]), fields, timestamp=int(want["timestamp"]))  # type: ignore[call-overload]
    client.flush()
    ours = read_frames(b"".join(sink.writes))
    assert len(ours) == len(frames) == 18
    for index, (mine, go) in enumerate(zip(ours, frames, strict=True)):
        want = _edge_records()[index]
        if len(want["fields"]) <= 1:  # type: ignore[arg-type]
            assert mine == go, want["label"]
        else:  # Go's map order is random: compare decoded
            a, b = Record.FromString(mine), Record.FromString(go)
            assert (a.data_type, a.timestamp, dict(a.data.fields)) == (
                b.data_type,
                b.timestamp,
                dict(b.data.fields),
            )


def test_multi_field_frames_decode_like_the_go_librarys() -> None:
    for want, go in zip(
        load_jsonl("go-plugin-frames.jsonl"),
        read_frames((FIXTURES / "go-plugin-frames.bin").read_bytes()),
        strict=True,
    ):
        mine = encode_record(want["data_type"], want["timestamp"], want["fields"])
        assert len(mine) == len(go)
        assert Record.FromString(mine) == Record.FromString(go)


def test_tasks_decode_from_the_go_agents_frames() -> None:
    raw = (FIXTURES / "go-agent-task-frames.bin").read_bytes()
    client = Client(Sink(), io.BytesIO(raw), flush_interval=None)
    for want in load_jsonl("go-agent-task-frames.jsonl"):
        task = client.receive_task()
        assert (task.data_type, task.object_name, task.data, task.token) == (
            want["data_type"],
            want["object_name"],
            want["data"],
            want["token"],
        )
    with pytest.raises(EOFError):
        client.receive_task()
    assert decode_task(b"").data_type == 0


def test_buffering_flush_interval_and_high_priority() -> None:
    sink, urgent = Sink(), Sink()
    client = Client(sink, io.BytesIO(), urgent, flush_interval=0.2)
    client.send_record(1, {"a": "b"}, timestamp=5)
    assert sink.writes == []  # buffered
    client.send_record(2, {"u": "1"}, timestamp=5, high_priority=True)
    assert len(urgent.writes) == 1  # at once, on its own pipe
    deadline = time.monotonic() + 2
    while not sink.writes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert read_frames(sink.writes[0]) == [encode_record(1, 5, {"a": "b"})]
    # A full 512 KiB buffer is written out before it would overflow.
    record = {"x": "y" * 1000}
    for _ in range(WRITE_BUFFER_BYTES // 1000 + 10):
        client.send_record(3, record, timestamp=5)
    assert any(len(w) > WRITE_BUFFER_BYTES - 2000 for w in sink.writes)
    assert all(len(w) <= WRITE_BUFFER_BYTES for w in sink.writes)
    client.close()


def test_broken_pipe_surfaces_on_the_next_send() -> None:
    r, w = os.pipe()
    os.close(r)
    client = Client(os.fdopen(w, "wb", buffering=0), io.BytesIO(), flush_interval=None)
    client.send_record(1, {"a": "b"})
    with pytest.raises(BrokenPipeError):
        client.flush()
    with pytest.raises(BrokenPipeError):
        client.send_record(1, {"a": "b"})


def test_demo_plugin_through_the_supervisor(tmp_path: Path) -> None:
    """The SDK on real pipes: the demo's ticks arrive, and a task gets an urgent reply."""
    exe = py_plugin("sdk_demo", DEMO_INTERVAL="0.1")
    install_plugin(tmp_path, "demo", exe)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("demo", exe)])
            await h.wait_records(3)
            await h.sup.send_task(TaskSpec(42, "demo", '{"q": 1}', "tok-9"))

            def replied() -> bool:
                return any(Record.FromString(r).data_type == 5998 for r in h.drain())

            await until(replied, what="the demo's reply")
            reply = next(
                Record.FromString(r) for r in h.records if Record.FromString(r).data_type == 5998
            )
            assert dict(reply.data.fields) == {
                "token": "tok-9",
                "data_type": "42",
                "data": '{"q": 1}',
            }

    run(main())
