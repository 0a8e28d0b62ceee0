"""Heartbeat field maps against the Go agent's capture, and the samplers on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from elkeid_agent.fsutil import remove_tree
from elkeid_agent.health import Health
from elkeid_agent.heartbeat import (
    MAX_WALK_DEPTH,
    WALK_CAP_COUNTER,
    CpuUsageSampler,
    DirUsage,
    ProcessGroupSampler,
    ProcSample,
    agent_processes,
    build_agent_heartbeat,
    build_plugin_heartbeat,
    dir_usage,
    fmt_float,
    host_stats,
    walk_usage,
)
from elkeid_agent.host import HostFacts, IpLists, Platform, read_host_facts

GO = Path(__file__).parent / "data" / "go-heartbeat"
GO_AGENT = json.loads((GO / "agent-1000.json").read_text())["fields"]
GO_PLUGIN = json.loads((GO / "plugin-1001.json").read_text())["fields"]
MIB = 1 << 20

FLOAT8 = re.compile(r"-?\d+\.\d{8}")
FLOAT2 = re.compile(r"\d+\.\d{2}")
INTEGER = re.compile(r"-?\d+")


def value_class(value: str) -> str:
    """How a heartbeat value is formatted, so ours can be compared with Go's."""
    for name, pattern in (("float8", FLOAT8), ("float2", FLOAT2), ("int", INTEGER)):
        if pattern.fullmatch(value):
            return name
    return "text"


# ---------------------------------------------------------------------------------------
# fmt_float


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, "0.00000000"),
        (1.5, "1.50000000"),
        (1 / 3, "0.33333333"),
        (0.123456789, "0.12345679"),
        (2112.73334957, "2112.73334957"),
        (1e12, "1000000000000.00000000"),
        (-0.5, "-0.50000000"),
        (math.inf, "0.00000000"),
        (-math.inf, "0.00000000"),
        (math.nan, "0.00000000"),
    ],
)
def test_fmt_float(x: float, expected: str) -> None:
    assert fmt_float(x) == expected


# ---------------------------------------------------------------------------------------
# Real processes

BURN_AND_WRITE = r"""
import os, sys, time
path, size = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()                          # wait until the test took its baseline
end = time.process_time() + 0.8
while time.process_time() < end:              # ~0.8 s of CPU
    pass
with open(path, "wb") as f:
    for _ in range(size // 65536):
        f.write(b"x" * 65536)
    f.flush()
    os.fsync(f.fileno())                      # make it storage I/O: write_bytes counts it
print("done", flush=True)
time.sleep(60)
"""


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", BURN_AND_WRITE, str(tmp_path / "out.bin"), str(4 * MIB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    yield proc
    proc.kill()
    proc.wait()


def go(worker: subprocess.Popen[str]) -> None:
    assert worker.stdin is not None
    assert worker.stdout is not None
    worker.stdin.write("go\n")
    worker.stdin.flush()
    assert worker.stdout.readline() == "done\n"


def test_sampler_sees_cpu_and_writes_between_ticks(worker: subprocess.Popen[str]) -> None:
    sampler = ProcessGroupSampler([psutil.Process(worker.pid)])
    sampler.sample()
    started = time.monotonic()
    go(worker)
    busy = sampler.sample()
    elapsed = time.monotonic() - started
    assert busy.pid == worker.pid
    assert busy.start_time == int(psutil.Process(worker.pid).create_time())
    assert busy.cpu > 0.3
    assert busy.cpu <= 1.5  # one thread: about one core at most
    assert busy.write_speed * elapsed >= 3 * MIB
    assert busy.rss > MIB
    assert busy.nfd >= 3

    time.sleep(0.3)
    idle = sampler.sample()
    assert idle.cpu < 0.2  # the rates cover only the last interval
    assert idle.write_speed == 0.0


def test_first_sample_measures_since_the_process_started(
    worker: subprocess.Popen[str],
) -> None:
    go(worker)
    first = ProcessGroupSampler([psutil.Process(worker.pid)]).sample()
    assert first.cpu > 0.0
    assert first.write_speed > 0.0


def test_sampler_sums_a_group_and_skips_vanished_processes(
    worker: subprocess.Popen[str],
) -> None:
    me = psutil.Process()
    alone = ProcessGroupSampler([me]).sample()
    sampler = ProcessGroupSampler([me, psutil.Process(worker.pid)])
    both = sampler.sample()
    assert both.pid == me.pid
    assert both.start_time == int(me.create_time())
    assert both.nfd > alone.nfd
    assert both.rss > alone.rss

    worker.kill()
    worker.wait()
    after = sampler.sample()  # must not raise
    assert after.pid == me.pid
    assert after.nfd == ProcessGroupSampler([me]).sample().nfd


def test_sampler_of_a_dead_main_process_reports_zeros(worker: subprocess.Popen[str]) -> None:
    sampler = ProcessGroupSampler([psutil.Process(worker.pid)])
    worker.kill()
    worker.wait()
    assert sampler.sample() == ProcSample(
        pid=worker.pid, start_time=0, cpu=0.0, rss=0, read_speed=0.0, write_speed=0.0, nfd=0
    )


def test_sampler_needs_a_process() -> None:
    with pytest.raises(ValueError, match="no process"):
        ProcessGroupSampler([])


FORKED_GROUP = r"""
import json, os
from elkeid_agent.heartbeat import agent_processes
child = os.fork()
if child == 0:
    print(json.dumps([p.pid for p in agent_processes()]), flush=True)
    os._exit(0)
os.waitpid(child, 0)
print(json.dumps([os.getpid(), child, [p.pid for p in agent_processes()]]), flush=True)
"""


def test_agent_processes_walks_up_parents_with_the_same_command_line() -> None:
    # A fork has the parent's command line, as a PyInstaller bootloader and its child do.
    out = subprocess.run(
        [sys.executable, "-c", FORKED_GROUP], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    child_view = json.loads(out[0])
    parent, child, parent_view = json.loads(out[1])
    assert child_view == [child, parent]
    assert parent_view == [parent]


def test_agent_processes_in_this_test_is_just_this_process() -> None:
    assert [p.pid for p in agent_processes()] == [os.getpid()]


# ---------------------------------------------------------------------------------------
# Directory usage


def test_dir_usage_skips_every_directory_named_like_the_exclusion(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    (tmp_path / "log/agent.log").write_bytes(b"x" * 1000)
    (tmp_path / "machine-id").write_bytes(b"x" * 36)
    (tmp_path / "plugin/collector").mkdir(parents=True)
    (tmp_path / "plugin/collector/collector").write_bytes(b"x" * 50_000)
    (tmp_path / "log/plugin").mkdir()  # Go's Walk skips a "plugin" dir at any depth
    (tmp_path / "log/plugin/x").write_bytes(b"x" * 7)
    (tmp_path / "big").write_bytes(b"x" * 10_000)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp/link").symlink_to(tmp_path / "big")  # counts as the link itself
    (tmp_path / "tmp/dirlink").symlink_to(tmp_path / "log")  # not followed
    links = len(str(tmp_path / "big")) + len(str(tmp_path / "log"))
    assert dir_usage(tmp_path, "plugin") == 1000 + 36 + 10_000 + links
    assert dir_usage(tmp_path) == 1000 + 36 + 50_000 + 7 + 10_000 + links
    assert dir_usage(tmp_path / "missing") == 0


def test_dir_usage_is_cached_and_refreshed_off_the_loop(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin/p").write_bytes(b"x" * 5000)
    usage = DirUsage(tmp_path, "plugin", max_age=0.3)
    seen: list[tuple[float, int]] = []

    async def main() -> None:
        walker = asyncio.create_task(usage.run())
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            seen.append((time.monotonic() - started, usage.bytes))
            if usage.bytes == 100:
                (tmp_path / "b").write_bytes(b"x" * 20)  # seen only at the next walk
            await asyncio.sleep(0.01)
        walker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await walker

    asyncio.run(main())
    values = [v for _, v in seen]
    assert values[0] == 0  # nothing walked yet: the heartbeat does not wait for the walk
    assert 100 in values
    assert values[-1] == 120
    first_120 = next(t for t, v in seen if v == 120)
    assert first_120 >= 0.25  # not re-walked before max_age


def _deep_tree(root: Path, depth: int) -> None:
    """`depth` nested directories under `root`, one 1-byte file at the bottom (made with
    relative paths, as a plugin could)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"x")
        os.close(leaf)
    finally:
        os.close(fd)


def test_dir_usage_of_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    # A plugin (or anything with write access to the work dir) can nest directories deeper
    # than Python's recursion limit: the walk must not raise RecursionError (which ended the
    # heartbeat task group, and so the agent). It stops at its depth cap and says so.
    depth = sys.getrecursionlimit() + 100
    _deep_tree(tmp_path, depth)
    (tmp_path / "top").write_bytes(b"x" * 10)
    try:
        walk = walk_usage(tmp_path)
        assert walk.included == 10
        assert f"deeper than {MAX_WALK_DEPTH} levels, not counted" in walk.stopped
    finally:
        # pytest removes old temporary trees with shutil.rmtree, which recurses: this one
        # made a later session's clean-up fail with RecursionError.
        remove_tree(tmp_path / "d")


def test_a_walk_counts_to_its_caps_and_names_them(tmp_path: Path) -> None:
    _deep_tree(tmp_path, MAX_WALK_DEPTH - 1)
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "p").write_bytes(b"x" * 5)
    try:
        walk = walk_usage(tmp_path, "plugin")
        assert (walk.included, walk.excluded, walk.stopped) == (1, 5, "")
        assert walk.total == 6
        flat = tmp_path / "plugin"
        for i in range(20):
            (flat / f"f{i}").write_bytes(b"y")
        capped = walk_usage(flat, max_entries=10)
        assert capped.included <= 10
        assert "more than 10 entries, the rest not counted" in capped.stopped
    finally:
        remove_tree(tmp_path / "d")


def test_a_capped_walk_is_a_named_fault_and_a_counter(tmp_path: Path) -> None:
    health = Health()
    _deep_tree(tmp_path, MAX_WALK_DEPTH + 5)
    usage = DirUsage(tmp_path, max_age=60, health=health)

    async def main() -> None:
        walker = asyncio.create_task(usage.run())
        while not health.faulty(DirUsage.UNIT):  # noqa: ASYNC110 - Health has no event
            await asyncio.sleep(0.01)
        walker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await walker

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        remove_tree(tmp_path / "d")
    assert any("deeper than" in d for d in health.details())
    assert health.counters[WALK_CAP_COUNTER] == 1


# ---------------------------------------------------------------------------------------
# Host load


def test_host_stats_formats(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/loadavg").write_text("0.72 0.49 0.7 7/112 25329\n")
    stats = host_stats(CpuUsageSampler(), tmp_path)
    assert {k: stats[k] for k in ("load_1", "load_5", "load_15")} == {
        "load_1": "0.72",
        "load_5": "0.49",
        "load_15": "0.70",
    }
    assert (stats["running_procs"], stats["total_procs"]) == ("7", "112")
    assert int(stats["nproc"]) == len(os.sched_getaffinity(0))
    assert int(stats["total_mem"]) == psutil.virtual_memory().total
    for key in ("cpu_usage", "mem_usage"):
        assert FLOAT8.fullmatch(stats[key])
        assert 0.0 <= float(stats[key]) <= 1.0


def test_cpu_usage_sees_a_busy_core() -> None:
    sampler = CpuUsageSampler()
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
    busy = sampler.usage()
    # At least this process's share of all CPUs was busy.
    assert 0.8 / (psutil.cpu_count() or 1) <= busy + 0.05
    assert busy <= 1.0


# ---------------------------------------------------------------------------------------
# Field maps

FACTS = HostFacts(
    hostname="vm",
    kernel_version="6.18.44-fc-v657",
    arch="x86_64",
    platform=Platform("debian", "debian", "12.11"),
    ips=IpLists(extranet_ipv4=("192.0.2.2",), intranet_ipv6=("fd00::2",)),
    host_serial="",
    host_id="",
    host_model="",
    host_vendor="",
    dns="10.255.255.53",
    gateway="192.0.2.1",
    cpu_name="Intel(R) Xeon(R) Processor",
    boot_time=1795703741,
)
PROCESS = ProcSample(
    pid=25329,
    start_time=1795706198,
    cpu=0.00166664,
    rss=15233024,
    read_speed=0.0,
    write_speed=43826.43568230,
    nfd=13,
)
STATS = {
    "nproc": "2",
    "total_mem": "25325268992",
    "load_1": "0.96",
    "load_5": "0.60",
    "load_15": "0.72",
    "running_procs": "3",
    "total_procs": "125",
    "cpu_usage": "0.49665608",
    "mem_usage": "0.01088045",
}


def agent_heartbeat(**overrides: object) -> dict[str, str]:
    args: dict[str, object] = {
        "facts": FACTS,
        "process": PROCESS,
        "stats": STATS,
        "state": "running",
        "state_detail": [],
        "idc": "default",
        "region": "default",
        "net_mode": "private",
        "rx_speed": 13.81644879,
        "tx_speed": 2112.73334957,
        "rx_tps": 0.13333123,
        "tx_tps": 6.71656075,
        "du": 5804,
        "ngr": 22,
        **overrides,
    }
    return build_agent_heartbeat(**args)  # type: ignore[arg-type]


def test_agent_heartbeat_reproduces_the_go_capture() -> None:
    # Built from the captured values, it equals the Go agent's record field for field.
    assert agent_heartbeat() == GO_AGENT


def test_plugin_heartbeat_reproduces_the_go_capture() -> None:
    fields = build_plugin_heartbeat(
        name="anchor",
        version="1.0.0",
        process=ProcSample(
            pid=25353, start_time=1795706200, cpu=0.0, rss=1355776,
            read_speed=0.0, write_speed=69.42372881, nfd=5,
        ),
        du=670,
        rx_speed=7.79574868,
        tx_speed=0.0,
        rx_tps=0.08492101,
        tx_tps=0.0,
    )
    assert fields == GO_PLUGIN


def test_state_detail_is_compact_json() -> None:
    detail = agent_heartbeat(state="abnormal", state_detail=["plugin x exited", "ü"])
    assert detail["state_detail"] == '["plugin x exited","ü"]'
    assert detail["state"] == "abnormal"


def test_non_finite_inputs_never_reach_the_wire() -> None:
    fields = agent_heartbeat(
        rx_speed=math.inf,
        tx_speed=math.nan,
        process=ProcSample(
            pid=1, start_time=0, cpu=math.nan, rss=0,
            read_speed=math.inf, write_speed=-math.inf, nfd=0,
        ),
        extra={"weird": math.inf},
    )
    for value in fields.values():
        assert not re.search(r"inf|nan", value, re.IGNORECASE)
    assert fields["read_speed"] == fields["weird"] == "0.00000000"


def test_extra_counters_are_merged_as_strings_and_never_override() -> None:
    fields = agent_heartbeat(extra={"dropped_frames": 3, "buffer_fill": 0.25, "pid": 7})
    assert fields["dropped_frames"] == "3"
    assert fields["buffer_fill"] == "0.25000000"
    assert fields["pid"] == str(PROCESS.pid)
    assert set(fields) == set(GO_AGENT) | {"dropped_frames", "buffer_fill"}


def test_live_heartbeat_has_every_go_key_in_go_formats() -> None:
    # Everything measured for real on this host.
    sampler = ProcessGroupSampler(agent_processes())
    cpu = CpuUsageSampler()
    sampler.sample()
    fields = agent_heartbeat(
        facts=read_host_facts(),
        process=sampler.sample(),
        stats=host_stats(cpu),
        du=dir_usage(Path(__file__).parent, "plugin"),
        ngr=3,
    )
    assert set(fields) == set(GO_AGENT)
    mismatched = {
        key: (GO_AGENT[key], fields[key])
        for key in GO_AGENT
        if value_class(GO_AGENT[key]) != "text"
        and value_class(fields[key]) != value_class(GO_AGENT[key])
    }
    assert mismatched == {}
    assert fields["pid"] == str(os.getpid())



LAUNCHED_GROUP = r"""
import json, os, subprocess, sys
from elkeid_agent.heartbeat import agent_processes
if "LAUNCHED" not in os.environ:
    # Like staticx's launcher: the same arguments, the child's argv[0] another path.
    import psutil
    argv = ["/unpacked/elkeid-agent", *psutil.Process().cmdline()[1:]]
    # With a made-up argv[0] Python cannot find its venv: hand it the path.
    env = {**os.environ, "LAUNCHED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(argv, executable=sys.executable, env=env, check=True)
else:
    print(json.dumps([os.getpid(), os.getppid(), [p.pid for p in agent_processes()]]))
"""


def test_agent_processes_include_a_launcher_with_another_argv0() -> None:
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHED_GROUP, "run", "--config", "x.toml"],
        capture_output=True, text=True, check=True,
    ).stdout
    child, launcher, group = json.loads(out)
    assert group == [child, launcher]
