"""Issue 9, Tasks: a bad task ends as a 5100 failure (or a counted, logged drop when it cannot
even be decoded) and nothing else; the agent's own state stays clean.

Every case ends with `rig.survived()`: the same agent PID is alive and a new 1000 arrives.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest
from faultrig import BASE, Rig, case, module_rig

AGENT = "elkeid-agent"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from module_rig(tmp_path_factory.mktemp("fault-tasks"))


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    yield from case(shared)


def test_upload_path_with_nul(rig: Rig) -> None:
    rig.center.send_task(1050, AGENT, {"path": "/etc/hostname\x00x", "buf_size": 1024}, "nul-path")
    assert rig.result("nul-path")["status"] == "failed"
    rig.survived()


def test_upload_of_a_file_that_shrinks_then_a_normal_one(rig: Rig) -> None:
    shrinking = rig.tmp / "shrinking.bin"
    shrinking.write_bytes(os.urandom(4096))
    # 1 KiB chunks at one a second: four chunks, time enough to cut the file after the first.
    rig.center.send_task(1050, AGENT, {"path": str(shrinking), "buf_size": 1024}, "shrinks")
    rig.wait(
        lambda: (u := rig.center.uploads.get("shrinks")) and u.chunk_sizes,
        10,
        "the first chunk of the upload",
    )
    os.truncate(shrinking, 0)
    assert rig.result("shrinks", timeout=15)["status"] == "failed"
    normal = rig.tmp / "normal.bin"
    normal.write_bytes(os.urandom(2000))
    rig.center.send_task(1050, AGENT, {"path": str(normal), "buf_size": 1024}, "after-shrink")
    assert rig.result("after-shrink", timeout=15)["status"] == "succeed"
    assert rig.center.uploads["after-shrink"].data == normal.read_bytes()
    rig.survived()


def test_upload_of_a_named_pipe(rig: Rig) -> None:
    fifo = rig.tmp / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    rig.center.send_task(1050, AGENT, {"path": str(fifo), "buf_size": 1024}, "fifo")
    assert rig.result("fifo")["status"] == "failed"
    rig.survived()


def test_metadata_with_a_carriage_return_is_refused(rig: Rig) -> None:
    since = time.time()
    rig.center.send_task(1051, AGENT, {"idc": "x\rLD_PRELOAD=/tmp/evil.so"}, "idc-cr")
    assert rig.result("idc-cr")["status"] == "failed"
    env_file = rig.work / "specified_env"
    text = env_file.read_text() if env_file.exists() else ""
    assert "\r" not in text
    assert not [ln for ln in text.splitlines() if ln.strip().startswith("LD_PRELOAD")]
    assert "LD_PRELOAD" not in rig.beat_after(since)["idc"]
    rig.survived()


# -- hand-encoded protobuf ---------------------------------------------------------------------

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len(field: int, data: bytes) -> bytes:
    return _key(field, LEN) + _varint(len(data)) + data


def _task_command(task: bytes) -> bytes:
    return _len(2, task)  # Command.task


def test_task_fields_of_the_wrong_wire_type(rig: Rig) -> None:
    before = int(rig.beat_after(time.time() - 1)["command_failures"])
    since = time.time()
    # Every Task field mistyped: data_type as bytes, object_name as a varint, data as
    # fixed64, token as fixed32.
    rig.center.send_raw_command(
        _task_command(
            _len(1, b"1050")
            + _key(2, VARINT) + _varint(5)
            + _key(3, FIXED64) + struct.pack("<q", -1)
            + _key(4, FIXED32) + struct.pack("<i", 7)
        )
    )
    # The token readable, the rest mistyped: a 5100 failure for that token.
    rig.center.send_raw_command(
        _task_command(
            _len(1, b"\x01\x02")
            + _len(2, AGENT.encode())
            + _key(3, VARINT) + _varint(1)
            + _len(4, b"wt-token")
        )
    )
    # data_type beyond int32: protobuf keeps the low 32 bits (1050) and the empty data
    # fails as upload JSON.
    rig.center.send_raw_command(
        _task_command(
            _key(1, VARINT) + _varint(1050 + (1 << 32))
            + _len(2, AGENT.encode())
            + _len(4, b"wt-wide")
        )
    )
    undecodable = [
        _key(2, LEN) + _varint(50) + b"abc",  # the Task overruns the message
        _task_command(_len(2, b"\xff\xfe") + _len(4, b"wt-utf8")),  # object_name not UTF-8
        _key(1, VARINT) + b"\xff" * 10 + b"\x01",  # a varint of eleven bytes
    ]
    for raw in undecodable:
        rig.center.send_raw_command(raw)
    assert rig.result("wt-token")["status"] == "failed"
    assert rig.result("wt-wide")["status"] == "failed"
    rig.wait(
        lambda: [
            b
            for b in rig.beats(since)
            if int(b.fields["command_failures"]) >= before + len(undecodable)
        ],
        10,
        "command_failures counting the undecodable Commands",
    )
    assert not [r for r in rig.center.records(5100) if r.fields.get("token") == "wt-utf8"]
    rig.survived()


def test_a_mistyped_task_field_is_not_the_empty_command(rig: Rig) -> None:
    """`Command.task` sent as a varint decodes (protobuf keeps it as an unknown field) to a
    Command with neither Task nor Configs; it is malformed, not the empty Command, so it must
    not stop the plugins."""
    base_pid = int(
        [r for r in rig.center.records(1001) if r.fields["name"] == BASE][-1].fields["pid"]
    )
    rig.center.send_raw_command(_key(2, VARINT) + _varint(7))
    # The empty Command's effect shows within a second or two; give it three.
    time.sleep(3)
    assert (rig.plugin_root / BASE).is_dir()
    assert os.path.exists(f"/proc/{base_pid}")
    rig.survived()
