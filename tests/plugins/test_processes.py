"""Acceptance at the process level: crash loops, broken streams, backpressure, stop, orphans."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from plugtools import (
    BIN,
    REPO,
    Harness,
    alive,
    install_plugin,
    local_spec,
    pids_in_group,
    py_plugin,
    run,
    sh_plugin,
    unique_cgroup_name,
    until,
)

from elkeid_agent._proto.bridge_pb2 import Record
from elkeid_agent.commands import TaskSpec
from elkeid_agent.config import PluginsConfig
from elkeid_agent.errors import TaskFailed
from elkeid_agent.plugins import lifecycle, process
from elkeid_agent.plugins.lifecycle import State
from elkeid_agent.wire import encode_record, record_frame

STREAM = sh_plugin(
    "i=0\nwhile :; do printf '\\003\\000\\000\\000\\010\\347\\007' >&4; sleep 0.05; done"
)


@pytest.fixture(params=[True, False], ids=["pidfd", "polling"])
def pidfd(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with pidfd exit detection and with the polling that old kernels get."""
    monkeypatch.setattr(process, "USE_PIDFD", request.param)
    return bool(request.param)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "BACKOFF_INITIAL", 0.1)


def _starts(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()] if path.exists() else []


def test_crash_loop_backs_off_while_others_stream(
    tmp_path: Path, pidfd: bool, fast_backoff: None
) -> None:
    crash = sh_plugin("date +%s.%N >> starts\nexit 1")
    crash_dir = install_plugin(tmp_path, "crash", crash)
    install_plugin(tmp_path, "stream", STREAM)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("crash", crash), local_spec("stream", STREAM)])
            await until(lambda: len(_starts(crash_dir / "starts")) >= 5, limit=15, what="5 starts")
            before = len(h.drain())
            await asyncio.sleep(0.5)
            assert len(h.drain()) > before + 3  # the other plugin keeps streaming
            info = h.sup.slot_info("crash")
            assert info is not None
            assert info[1] >= 4
            # Down (backing off) or just up again: either way its failure and stderr file.
            [line] = [e for e in h.sup.errors() if "crash" in e]
            assert "exited with code 1; nothing on stderr" in line, line
            assert str(crash_dir / "crash.stderr") in line

    run(main())
    starts = _starts(crash_dir / "starts")[:5]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 0.1, 0.2, 0.4, 0.8 s: each gap at least its delay, and growing
    for gap, delay in zip(gaps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert gap >= delay * 0.95, gaps
    assert gaps[3] > gaps[0] + 0.4, gaps  # growing (loose: a busy machine delays spawns)


def test_backoff_policy() -> None:
    assert [lifecycle.backoff_delay(n) for n in range(1, 11)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        300,
    ]
    assert lifecycle.backoff_delay(10**6) == 300
    assert lifecycle.failures_after_run(7, 599) == 8
    assert lifecycle.failures_after_run(7, 600) == 1  # 10 min healthy resets the backoff


def test_lifecycle_table() -> None:
    lc = lifecycle.Lifecycle()
    seen: list[tuple[State, State]] = []
    lc.on_change = lambda a, b: seen.append((a, b))
    for event in (
        lifecycle.Event.SPAWNED,
        lifecycle.Event.EXITED,
        lifecycle.Event.BACKOFF_ELAPSED,
        lifecycle.Event.SPAWN_FAILED,
        lifecycle.Event.STOP,
        lifecycle.Event.REAPED,
    ):
        lc.fire(event)
    assert [b for _, b in seen] == [
        State.RUNNING,
        State.BACKING_OFF,
        State.STARTING,
        State.BACKING_OFF,
        State.STOPPING,
        State.STOPPED,
    ]
    with pytest.raises(lifecycle.LifecycleError, match="SPAWNED not allowed in state STOPPED"):
        lc.fire(lifecycle.Event.SPAWNED)


def test_garbage_and_a_4_gib_length_restart_the_plugin(tmp_path: Path, pidfd: bool) -> None:
    good = record_frame(encode_record(7, 1, {"k": "v"}))
    bad = b"\x05\x00\x00\x00\xff\xff\xff\xff\xff"  # a frame that is not a Record
    (tmp_path / "good.bin").write_bytes(good + bad + good)
    (tmp_path / "huge.bin").write_bytes(b"\xff\xff\xff\xff" + os.urandom(4096))
    (tmp_path / "noise.bin").write_bytes(b"\xf0\xff\xff\x7f" + os.urandom(65536))
    exe = sh_plugin(
        f"cat '{tmp_path}/good.bin' >&4\n"
        f"if [ -e once ]; then exec cat <&3 >/dev/null; fi\n"
        f"touch once; cat '{tmp_path}/huge.bin' >&4; exec cat <&3 >/dev/null"
    )
    noise = sh_plugin(f"cat '{tmp_path}/noise.bin' >&4; exec cat <&3 >/dev/null")
    install_plugin(tmp_path, "garbage", exe)
    install_plugin(tmp_path, "noise", noise)
    install_plugin(tmp_path, "stream", STREAM)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync(
                [
                    local_spec("garbage", exe),
                    local_spec("noise", noise),
                    local_spec("stream", STREAM),
                ]
            )

            def restarted() -> bool:
                info = h.sup.slot_info("garbage")
                return info is not None and info[0] is State.RUNNING and info[1] == 1

            await until(restarted, limit=10, what="a restart after the 4 GiB length")

            def sevens() -> list[bytes]:
                return [r for r in h.drain() if Record.FromString(r).data_type == 7]

            await until(lambda: len(sevens()) == 4, what="both runs' good frames")
            info = h.sup.slot_info("garbage")
            assert info is not None
            counters = info[2]
            assert counters.too_large == 1
            assert counters.malformed == 2  # one per run of good.bin
            noise_info = h.sup.slot_info("noise")
            assert noise_info is not None
            await until(lambda: h.sup.slot_info("noise")[2].too_large >= 1)  # type: ignore[index]
            # the agent did not stall: the streaming plugin still gets through
            before = len(h.drain())
            await asyncio.sleep(0.5)
            assert len(h.drain()) > before + 3
            assert len(sevens()) == 4  # two good frames per run, the garbage dropped
            beats = {Record.FromString(b).data.fields["name"]: b for b in h.sup.heartbeats()}
            fields = Record.FromString(beats["garbage"]).data.fields
            assert fields["too_large_frames"] == "1"
            assert fields["malformed_frames"] == "2"
            assert fields["restarts"] == "1"

    run(main())


def test_frames_before_a_bad_length_in_the_same_read_are_delivered(tmp_path: Path) -> None:
    good = record_frame(encode_record(7, 1, {"k": "v"}))
    (tmp_path / "mixed.bin").write_bytes(good * 3 + b"\xff\xff\xff\xff")
    exe = sh_plugin(f"cat '{tmp_path}/mixed.bin' >&4; exec cat <&3 >/dev/null")
    install_plugin(tmp_path, "mixed", exe)

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("mixed", exe)])
            await until(lambda: h.sup.slot_info("mixed")[2].too_large == 1)  # type: ignore[index]
            assert h.drain()[:3] == [good[4:]] * 3

    run(main())


def test_backpressure_stops_reading_and_loses_nothing(tmp_path: Path) -> None:
    n = 20000
    exe = py_plugin("flood", COUNT=str(n))
    install_plugin(tmp_path, "flood", exe)

    async def main() -> None:
        # A 256 KiB buffer: the plugin's 6 MB can only get through as the consumer drains.
        async with Harness(tmp_path, max_bytes=256 * 1024) as h:
            await h.sup.sync([local_spec("flood", exe)])
            await asyncio.sleep(1.0)
            assert h.buffer.queued_bytes <= 256 * 1024
            seqs: list[int] = []
            deadline = time.monotonic() + 30
            while len(seqs) < n and time.monotonic() < deadline:
                batch = h.buffer.take(64 * 1024)
                seqs += [int(Record.FromString(r).data.fields["seq"]) for r in batch.records]
                await asyncio.sleep(0.001)
            assert seqs == list(range(n))
            info = h.sup.slot_info("flood")
            assert info is not None
            assert info[2].backpressure_seconds > 0.5

    run(main())


def test_tasks_fail_for_unknown_dead_and_full(tmp_path: Path, fast_backoff: None) -> None:
    stuck = sh_plugin("exec sleep 1000")  # never reads fd 3
    dead = sh_plugin("exit 0")
    install_plugin(tmp_path, "stuck", stuck)
    install_plugin(tmp_path, "dead", dead)

    async def main() -> None:
        async with Harness(tmp_path, config=PluginsConfig(task_queue=4)) as h:
            await h.sup.sync([local_spec("stuck", stuck), local_spec("dead", dead)])
            with pytest.raises(TaskFailed, match="no such plugin: nope"):
                await h.sup.send_task(TaskSpec(1, "nope", "", "t"))
            await until(lambda: h.sup.slot_info("dead")[0] is State.BACKING_OFF)  # type: ignore[index]
            with pytest.raises(TaskFailed, match="not running"):
                await h.sup.send_task(TaskSpec(1, "dead", "", "t"))
            await until(lambda: h.sup.slot_info("stuck")[3] is not None)  # type: ignore[index]
            big = "x" * (1 << 20)  # a pipe holds 64 KiB: the writer blocks on the first task
            for _ in range(4 + 1):  # the writer holds one, the queue four
                await h.sup.send_task(TaskSpec(1, "stuck", big, "t"))
                await asyncio.sleep(0.05)
            with pytest.raises(TaskFailed, match="full"):
                await h.sup.send_task(TaskSpec(1, "stuck", big, "t"))

    run(main())


def test_stop_closes_pipes_then_kills_the_group_within_10_s(tmp_path: Path) -> None:
    polite = sh_plugin("exec cat <&3 >/dev/null")
    # Ignores the closed pipes and SIGTERM, and has a child in its group.
    stubborn = sh_plugin("trap '' TERM PIPE\nsleep 1000 &\nwhile :; do sleep 1; done")
    install_plugin(tmp_path, "polite", polite)
    install_plugin(tmp_path, "stubborn", stubborn)

    async def main() -> tuple[float, list[int]]:
        h = Harness(tmp_path)
        async with h:
            await h.sup.sync([local_spec("polite", polite), local_spec("stubborn", stubborn)])
            await until(lambda: all(h.sup.slot_info(n)[3] for n in ("polite", "stubborn")))  # type: ignore[index]
            pgid = h.sup.slot_info("stubborn")[3]  # type: ignore[index]
            assert pgid is not None
            await until(lambda: len(pids_in_group(pgid)) >= 2, what="the stubborn child")
            group = pids_in_group(pgid)
            began = time.monotonic()
        return time.monotonic() - began, group

    took, group = run(main())
    assert 9.5 < took < 11.5
    assert not any(alive(p) for p in group)


def test_polite_plugins_stop_fast(tmp_path: Path) -> None:
    polite = py_plugin("sdk_demo", DEMO_INTERVAL="0.05")
    install_plugin(tmp_path, "demo", polite)

    async def main() -> float:
        h = Harness(tmp_path)
        async with h:
            await h.sup.sync([local_spec("demo", polite)])
            await h.wait_records(2)
            began = time.monotonic()
        return time.monotonic() - began

    assert run(main()) < 2.0


def _supervisor_process(
    work: Path, *names: str, cgroup: str = ""
) -> tuple[subprocess.Popen[str], list[int]]:
    env = {"PYTHONPATH": str(REPO), "ELKEID_TEST_CGROUP": cgroup or unique_cgroup_name()}
    proc = subprocess.Popen(
        [sys.executable, str(BIN / "run_supervisor.py"), str(work), *names],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("limits ")
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], line
    return proc, [int(p) for p in line[1:]]


def test_sigkilled_supervisor_leaves_plugins_that_the_next_one_reaps(tmp_path: Path) -> None:
    # Survives its agent: ignores the broken pipes and never reads them.
    orphan = sh_plugin("trap '' PIPE\nsleep 1000 &\nwhile :; do sleep 1; done")
    install_plugin(tmp_path, "orphan", orphan)
    group = unique_cgroup_name()
    proc, (pgid,) = _supervisor_process(tmp_path, "orphan", cgroup=group)
    time.sleep(0.3)
    assert len(pids_in_group(pgid)) >= 2  # the leader and its `sleep 1000`
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert alive(pgid)  # the Go agent's issue 10: orphans stay
    assert len(pids_in_group(pgid)) >= 2

    async def main() -> None:
        async with Harness(tmp_path, PluginsConfig(cgroup_name=group)) as h:
            await until(h.sup._ready.is_set)
            await until(lambda: not pids_in_group(pgid), limit=5, what="orphans reaped")

    run(main())


def test_sigterm_stops_every_plugin_within_10_s(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    for name in names:
        install_plugin(tmp_path, name, sh_plugin("exec cat <&3 >/dev/null"))
    install_plugin(tmp_path, "d", sh_plugin("trap '' TERM PIPE\nwhile :; do sleep 1; done"))
    proc, pgids = _supervisor_process(tmp_path, *names, "d")
    groups = [p for g in pgids for p in pids_in_group(g)]
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - began < 11.5
    assert not any(alive(p) for p in groups)


def test_what_a_plugin_inherits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The agent's own environment as a frozen bundle would leave it.
    monkeypatch.setenv("_MEIPASS2", "/tmp/_MEI123")
    monkeypatch.setenv("_PYI_APPLICATION_HOME_DIR", "/tmp/_MEI123")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/tmp/_MEI123")
    monkeypatch.setenv("LD_LIBRARY_PATH_ORIG", "/opt/host/lib")
    monkeypatch.setenv("DETAIL", "from the agent's environment")
    # A plain Python script: the shell wrapper of py_plugin would add its own fds.
    exe = f"#!{sys.executable}\n".encode() + (BIN / "introspect.py").read_bytes()
    directory = install_plugin(tmp_path, "intro", exe)
    # grep's own status: a waiting dash blocks every signal for itself.
    signals = sh_plugin("exec grep -E '^Sig(Ign|Blk)' /proc/self/status > sig.txt")
    sig_dir = install_plugin(tmp_path, "sig", signals)
    stray = os.open(os.devnull, os.O_RDONLY)  # an agent fd (close-on-exec like all of them)
    os.set_inheritable(stray, True)  # ... unless inherited from whoever started the agent

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("intro", exe), local_spec("sig", signals)])
            out = directory / "introspect.json"
            await until(lambda: out.exists() and out.stat().st_size > 0, what="introspection")
            sig = sig_dir / "sig.txt"
            await until(lambda: sig.exists() and sig.stat().st_size > 0, what="signals")

    try:
        run(main())
    finally:
        os.close(stray)
    info = json.loads((directory / "introspect.json").read_text())
    fds = info["fds"]
    assert sorted(fds, key=int) == ["0", "1", "2", "3", "4", "5"]
    assert fds["0"] == fds["1"] == "/dev/null"
    # stderr: a pipe the agent copies into `intro.stderr`, under its cap (plugins/stderr.py).
    assert all(fds[n].startswith("pipe:") for n in "2345")
    assert info["cwd"] == str(directory)
    assert info["pgid"] == info["pid"]
    sig = dict(line.split(":") for line in (sig_dir / "sig.txt").read_text().splitlines())
    assert int(sig["SigBlk"], 16) == 0
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not int(sig["SigIgn"], 16) & (1 << (signum - 1))
    env = info["env"]
    assert env["ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"] == "1"
    assert "DETAIL" not in env  # the config has none
    assert env["LD_LIBRARY_PATH"] == "/opt/host/lib"
    assert not any(k.startswith(("_MEI", "_PYI")) for k in env)


def test_plugin_heartbeat_rates(tmp_path: Path) -> None:
    install_plugin(tmp_path, "stream", STREAM)

    async def main() -> dict[str, str]:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("stream", STREAM, version="3.1")])
            await h.wait_records(5)
            h.sup.heartbeats()
            await asyncio.sleep(1.0)
            (beat,) = h.sup.heartbeats()
            record = Record.FromString(beat)
            assert record.data_type == 1001
            return dict(record.data.fields)

    fields = run(main())
    assert fields["name"] == "stream"
    assert fields["pversion"] == "3.1"
    assert 8 < float(fields["rx_tps"]) < 25  # one 7-byte frame every 50 ms
    assert 56 < float(fields["rx_speed"]) < 200
    assert fields["tx_tps"] == "0.00000000"
    assert int(fields["nfd"]) >= 6
    assert fields["restarts"] == "0"


def test_plugin_heartbeat_does_not_walk_the_plugin_directory_on_the_loop(tmp_path: Path) -> None:
    # A plugin's directory holds whatever the plugin writes (caches, spools, logs): the 1001's
    # `du` must come from a walk in a worker thread, never from one on the event loop at each
    # heartbeat, which stalled every pipe and the stream for as long as the walk took.
    directory = install_plugin(tmp_path, "stream", STREAM)
    spool = directory / "spool"
    spool.mkdir()
    for i in range(40_000):
        (spool / str(i)).write_bytes(b"")

    async def main() -> tuple[float, dict[str, str]]:
        async with Harness(tmp_path) as h:
            h.sup.usage_max_age = 0.3
            await h.sup.sync([local_spec("stream", STREAM)])
            await h.wait_records(2)
            started = time.monotonic()
            h.sup.heartbeats()
            took = time.monotonic() - started
            (spool / "big").write_bytes(b"x" * 1000)
            await until(
                lambda: int(
                    Record.FromString(h.sup.heartbeats()[0]).data.fields["du"]
                ) >= 1000,
                limit=15, what="du refreshed off the loop",
            )
            return took, dict(Record.FromString(h.sup.heartbeats()[0]).data.fields)

    took, fields = run(main())
    assert took < 0.02, f"heartbeats() held the loop {took:.3f} s"
    assert int(fields["du"]) >= 1000


def test_a_fifo_a_plugin_puts_at_its_stderr_path_does_not_hold_the_loop(
    tmp_path: Path, fast_backoff: None
) -> None:
    # The plugin's directory is the plugin's: at its restart the agent opened <name>.stderr
    # for writing, and a FIFO there (no reader) blocked that open, on the event loop, forever.
    body = (
        "if [ ! -e ran ]; then touch ran; rm -f fifo.stderr; mkfifo fifo.stderr; exit 1; fi\n"
        "while :; do printf '\\003\\000\\000\\000\\010\\347\\007' >&4; sleep 0.05; done"
    )
    exe = sh_plugin(f"cd '{tmp_path}/plugin/fifo' || exit 3\n{body}")
    directory = install_plugin(tmp_path, "fifo", exe)
    fifo = directory / "fifo.stderr"
    rescued = threading.Event()

    def rescue() -> None:
        # If the loop is stuck in open(), give it a reader so the test can end and say so.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if (directory / "records-flowed").exists():
                return
        if fifo.exists():
            rescued.set()
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    helper = threading.Thread(target=rescue, daemon=True)
    helper.start()

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("fifo", exe)])
            await h.wait_records(3, limit=20)
            (directory / "records-flowed").touch()
            assert fifo.is_file()  # replaced by a regular file for the new run

    run(main())
    helper.join()
    assert not rescued.is_set(), "the agent's open() of the stderr FIFO blocked the loop"


def test_a_plugin_that_does_not_read_holds_a_bounded_number_of_task_bytes(
    tmp_path: Path,
) -> None:
    # The queue was bounded in tasks only (64) and a task may be 10 MiB (the gRPC limit): one
    # plugin that stops reading fd 3 held 640 MiB of the server's tasks in the agent.
    stuck = sh_plugin("exec sleep 1000")  # never reads fd 3
    install_plugin(tmp_path, "stuck", stuck)
    big = "x" * (4 << 20)

    async def main() -> int:
        async with Harness(tmp_path) as h:
            await h.sup.sync([local_spec("stuck", stuck)])
            await until(lambda: h.sup.slot_info("stuck")[3] is not None)  # type: ignore[index]
            accepted = 0

            async def send_until_full() -> None:
                nonlocal accepted
                for _ in range(70):
                    await h.sup.send_task(TaskSpec(1, "stuck", big, "t"))
                    accepted += 1
                    await asyncio.sleep(0.01)

            with pytest.raises(TaskFailed, match="full"):
                await send_until_full()
            return accepted

    accepted = run(main())
    # The writer holds one task, the queue what fits in MAX_QUEUED_TASK_BYTES.
    assert accepted <= process.MAX_QUEUED_TASK_BYTES // (4 << 20) + 2, accepted
