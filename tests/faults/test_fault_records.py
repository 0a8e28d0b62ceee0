"""Issue 18, the record path: whatever a plugin writes and however slowly the server reads,
the agent process stays within its memory (peak VmRSS sampled, at or under 100 MiB under
`python -m`), keeps its PID and its heartbeats, and loses no record: producers wait.

Each case ends with `rig.survived()`, and the budget's waits are counted in the heartbeat.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultrig import BASE, BASE_EXE, MIB, Rig, RssSampler, case

RSS_LIMIT = 100 * MIB
#: plugins.max_frame_bytes' default: the largest frame a plugin may write.
MAX_FRAME = 8 * 1024 * 1024 - 64 * 1024 - 16
FLOOD_TYPE = 9999

# `big N`: N Records of the largest frame size, as fast as the pipe takes them; `flood S PATH`:
# 300-byte Records in 512 KiB writes for S seconds, then how many to PATH. Then it waits for
# the task pipe to close.
PLUGIN = r"""
import os, sys, time
def varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
def field(key, data):
    return bytes((key,)) + varint(len(data)) + data
def record(pad):
    entry = field(0x0A, field(0x0A, b"pad") + field(0x12, b"p" * pad))
    return b"\x08" + varint(RECORD_TYPE) + field(0x1A, field(0x0A, entry))
def frame(size):
    pad = size - 32
    while len(record(pad)) != size:
        pad += size - len(record(pad))
    body = record(pad)
    return len(body).to_bytes(4, "little") + body
out = os.fdopen(4, "wb", buffering=0)
mode, arg = sys.argv[1], float(sys.argv[2])
if mode == "big":
    data = frame(MAX_FRAME)
    for _ in range(int(arg)):
        out.write(data)
else:
    one = frame(300)
    chunk = one * (512 * 1024 // len(one))
    ends = time.monotonic() + arg
    sent = 0
    while time.monotonic() < ends:
        out.write(chunk)
        sent += len(chunk) // len(one)
    with open(sys.argv[3] + ".tmp", "w") as f:
        f.write(str(sent))
    os.rename(sys.argv[3] + ".tmp", sys.argv[3])
os.read(3, 1)
""".replace("RECORD_TYPE", str(FLOOD_TYPE)).replace("MAX_FRAME", str(MAX_FRAME))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("fault-records"))
    # A flood's records are decoded and counted, not kept in the test process.
    rig.center.count_only([FLOOD_TYPE])
    with rig:
        yield rig


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    try:
        yield from case(shared)
    finally:
        shared.center.set_read_rate(None)


def _start(rig: Rig, name: str, mode: str, arg: float, out: Path | None = None) -> float:
    script = rig.tmp / f"{name}.py"
    script.write_text(PLUGIN)
    exe = f"#!/bin/sh\nexec '{sys.executable}' '{script}' {mode} {arg:g} '{out}'\n".encode()
    since = time.time()
    rig.center.send_configs([rig.publish(BASE, BASE_EXE), rig.publish(name, exe)])
    return since


def _counter(beat: dict[str, str], key: str) -> int:
    return int(float(beat.get(key, "0")))


def _held(name: str) -> str:
    return f"records: plugin {name} held back: the record budget of 16 MiB is full"


def _named_held_back(rig: Rig, since: float, name: str) -> dict[str, str]:
    """A heartbeat since `since` names `name` held back in `warnings` (a warning, not a fault:
    the caller checks that state_detail does not)."""
    beats = [b.fields for b in rig.beats(since) if _held(name) in b.fields.get("warnings", "")]
    assert beats, f"no heartbeat named {name} held back"
    return beats[0]


def _no_longer_held_back(rig: Rig, name: str) -> dict[str, str]:
    """The budget drained: a heartbeat made from now on no longer names `name` (within SPAN,
    2 s, and a beat)."""
    after = time.time()
    return rig.wait(
        lambda: [b for b in rig.beats(after) if _held(name) not in b.fields["warnings"]],
        10,
        f"a heartbeat no longer naming {name} held back",
    )[0].fields


def test_sixty_frames_of_the_largest_size(rig: Rig) -> None:
    # A center reading 15 records/s holds the plugin back about 4 s, long enough to be named
    # (holdback.py: 1 s at least); at full speed the 60 frames leave within 2 s, unnamed.
    rig.center.set_read_rate(15)
    before = rig.beat_after(time.time() - 1)
    with RssSampler(rig.pid, tree=False, interval=0.01) as rss:
        since = _start(rig, "bigframes", "big", 60)
        rig.wait(lambda: rig.center.counted(FLOOD_TYPE) >= 60, 90, "60 big records delivered")
    assert rig.center.counted(FLOOD_TYPE) == 60
    print(f"60 frames of the largest size: agent peak RSS {rss.peak / MIB:.1f} MiB")
    assert rss.samples > 50
    assert rss.peak <= RSS_LIMIT, f"peak RSS {rss.peak / MIB:.1f} MiB"
    # The plugin had to wait for the budget: named while it lasted, counted, not dropped.
    assert _held("bigframes") not in _named_held_back(rig, since, "bigframes")["state_detail"]
    beat = _no_longer_held_back(rig, "bigframes")
    assert _counter(beat, "backpressure_waits") > _counter(before, "backpressure_waits")
    assert _counter(beat, "dropped_oversize") == 0
    assert len(rig.beats(since)) >= 3
    rig.plugin_beat_after(since, BASE)
    rig.survived()


def test_a_flood_against_a_slow_center(rig: Rig) -> None:
    rig.center.set_read_rate(20_000)
    before = rig.beat_after(time.time() - 1)
    counted = rig.center.counted(FLOOD_TYPE)
    sent_file = rig.tmp / "flood.sent"
    sent_file.unlink(missing_ok=True)
    with RssSampler(rig.pid, tree=False, interval=0.01) as rss:
        since = _start(rig, "flood", "flood", 6, sent_file)
        rig.wait(sent_file.exists, 40, "the flood's end")
        ended = time.time()
        arrived = len(rig.beats(since))
    print(f"a flood against a slow center: agent peak RSS {rss.peak / MIB:.1f} MiB")
    assert rss.peak <= RSS_LIMIT, f"peak RSS {rss.peak / MIB:.1f} MiB"
    beat = rig.beat_after(time.time())
    assert _counter(beat, "backpressure_waits") > _counter(before, "backpressure_waits")
    # The budget's bound (buffer.py): max_bytes, grpc's copy of one message (8 MiB and its
    # header), one pipe read (256 KiB and the frame it ends in the middle of).
    slack = 8 * MIB + 256 * 1024 + 64 * 1024
    assert _counter(beat, "peak_budget_bytes") <= _counter(beat, "buffer_max_bytes") + slack
    # Nothing is lost: once the center reads at full speed, every record written arrives.
    rig.center.set_read_rate(None)
    sent = int(sent_file.read_text())
    rig.wait(lambda: rig.center.counted(FLOOD_TYPE) - counted >= sent, 60, f"{sent} records")
    assert rig.center.counted(FLOOD_TYPE) - counted == sent
    # The agent kept beating through the flood (by each beat's own timestamp, every 0.5 s).
    # Their arrival is the center's to bound, not asserted here: each beat leaves in the
    # first message after the write in progress (the agent lane first), but ahead of it are
    # that write, which waits for the center's HTTP/2 window, and the window's bytes, read
    # at the center's pace: 1.4-2.1 s late at 20,000 records/s, 8.4 s at 5,000, more on a
    # loaded machine (the center is a thread of this process).
    made = [b for b in rig.beats(since) if int(since) <= b.timestamp <= int(ended)]
    assert len(made) >= 3, f"{len(made)} beats made during the flood, {arrived} arrived in it"
    # Named while it lasted (a warning, not a fault), gone once drained.
    assert _held("flood") not in _named_held_back(rig, since, "flood")["state_detail"]
    _no_longer_held_back(rig, "flood")
    rig.survived()

