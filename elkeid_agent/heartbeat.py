"""Field maps of the agent heartbeat (data_type 1000) and plugin heartbeats (1001).

The builders are pure: they take samples and counters and return ``dict[str, str]`` with
every field the Go agent sends (PROTOCOL section 2). Sampling lives in small classes that
keep the previous reading, so a rate is always "since the last tick".

Floats are ``%.8f`` like Go's ``strconv.FormatFloat(x, 'f', 8, 64)``, except that a
non-finite value becomes zero: the Go agent once sent "+Inf" when no time had elapsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import msgspec
import psutil

from elkeid_agent.health import Health
from elkeid_agent.host import ROOT, HostFacts, under_root
from elkeid_agent.readcap import SMALL_FILE_BYTES, read_text_capped

AGENT_HEARTBEAT = 1000
PLUGIN_HEARTBEAT = 1001

Counter = int | float


def fmt_float(x: float) -> str:
    """Go's ``%.8f`` heartbeat format; non-finite values become ``0.00000000``."""
    return f"{x:.8f}" if math.isfinite(x) else f"{0.0:.8f}"


def _fmt_counter(value: Counter) -> str:
    return fmt_float(value) if isinstance(value, float) else str(value)


def _rate(delta: float, elapsed: float) -> float:
    return delta / elapsed if elapsed > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Processes


class ProcSample(msgspec.Struct, frozen=True):
    """One tick's resource use of a process group (an agent or a plugin)."""

    pid: int  # of the main process
    start_time: int  # unix seconds, of the main process
    cpu: float  # fraction of one core, summed over the group
    rss: int  # bytes
    read_speed: float  # bytes/s
    write_speed: float  # bytes/s
    nfd: int


class _Reading(msgspec.Struct, frozen=True):
    at: float  # time.monotonic()
    cpu_seconds: float
    read_bytes: int
    write_bytes: int


class ProcessGroupSampler:
    """Samples a fixed set of processes; rates cover the time since the previous sample.

    The first sample measures from each process's start (as the Go agent does for I/O),
    so it is meaningful even right after startup. Processes that are gone or cannot be
    read are left out of the sums; the main process is the first one given.
    """

    def __init__(self, processes: Sequence[psutil.Process]) -> None:
        if not processes:
            raise ValueError("no process to sample")
        self._processes = list(processes)
        self._last: dict[int, _Reading] = {}

    @property
    def pid(self) -> int:
        return self._processes[0].pid

    def _baseline(self, proc: psutil.Process, now: float) -> _Reading:
        since_start = max(0.0, time.time() - proc.create_time())
        return _Reading(now - since_start, 0.0, 0, 0)

    def sample(self) -> ProcSample:
        cpu = 0.0
        rss = nfd = 0
        read_speed = write_speed = 0.0
        start_time = 0
        for index, proc in enumerate(self._processes):
            try:
                with proc.oneshot():
                    now = time.monotonic()
                    last = self._last.get(proc.pid)
                    if last is None:
                        last = self._baseline(proc, now)
                    times = proc.cpu_times()
                    cpu_seconds = times.user + times.system
                    io = proc.io_counters()
                    rss += proc.memory_info().rss
                    nfd += proc.num_fds()
                    if index == 0:
                        start_time = int(proc.create_time())
            except psutil.Error:
                continue
            elapsed = now - last.at
            # max(0, ...): a counter never legitimately goes back; don't report negatives.
            cpu += _rate(max(0.0, cpu_seconds - last.cpu_seconds), elapsed)
            read_speed += _rate(max(0, io.read_bytes - last.read_bytes), elapsed)
            write_speed += _rate(max(0, io.write_bytes - last.write_bytes), elapsed)
            self._last[proc.pid] = _Reading(now, cpu_seconds, io.read_bytes, io.write_bytes)
        return ProcSample(
            pid=self.pid,
            start_time=start_time,
            cpu=cpu,
            rss=rss,
            read_speed=read_speed,
            write_speed=write_speed,
            nfd=nfd,
        )


def agent_processes() -> list[psutil.Process]:
    """This process first, then the ancestors that are the same program.

    A PyInstaller onefile runs as a bootloader parent plus a Python child with the same
    command line; staticx adds a launcher above them whose argv[0] is the installed path while
    theirs is the unpacked copy. So an ancestor is ours when its arguments after argv[0] equal
    ours (the whole command line when we have no arguments, or any shell would match).
    """
    me = psutil.Process()
    group = [me]
    try:
        cmdline = me.cmdline()
        parent = me.parent()
        while parent is not None and parent.pid > 1 and _same_program(parent.cmdline(), cmdline):
            group.append(parent)
            parent = parent.parent()
    except psutil.Error:
        pass  # an ancestor exited or is unreadable: the group ends there
    return group


def _same_program(theirs: list[str], ours: list[str]) -> bool:
    return theirs == ours or (len(ours) > 1 and theirs[1:] == ours[1:])


#: A walk goes this many directories deep at most, and looks at this many entries at most:
#: anyone who can write under a walked directory (a plugin in its own) decides its shape, and
#: the walk's time and memory must not be theirs to decide. Deeper or further is left out,
#: and the walk says so (`DirWalk.stopped`).
MAX_WALK_DEPTH = 128
MAX_WALK_ENTRIES = 2_000_000
#: Heartbeat counter of walks that stopped at a cap.
WALK_CAP_COUNTER = "dir_walk_capped"


class DirWalk(msgspec.Struct, frozen=True):
    """What one walk found: bytes outside and inside the excluded subdirectories."""

    included: int
    excluded: int
    stopped: str = ""  # why the walk stopped short of the whole tree, "" when it did not

    @property
    def total(self) -> int:
        return self.included + self.excluded


def walk_usage(
    directory: Path,
    exclude: str = "",
    *,
    max_depth: int = MAX_WALK_DEPTH,
    max_entries: int = MAX_WALK_ENTRIES,
) -> DirWalk:
    """Bytes of the files under ``directory``; those under any subdirectory named ``exclude``
    counted apart.

    Like the Go agent's GetDirSize: symlinks count as themselves and are not followed,
    unreadable entries are skipped. Depth first over a stack of open directory iterators, so
    memory grows with the depth (capped, and so are the fds it holds), not with how many
    directories one level holds; no recursion.
    """
    sums = [0, 0]  # included, excluded
    seen = 0
    stopped = ""
    stack: list[tuple[Iterator[os.DirEntry[str]], int, int]] = []

    def enter(path: str, level: int, bucket: int) -> None:
        nonlocal stopped
        if level > max_depth:
            stopped = stopped or f"{directory}: deeper than {max_depth} levels, not counted"
            return
        with contextlib.suppress(OSError):  # unreadable: skipped, as in Go
            stack.append((os.scandir(path), level, bucket))

    enter(os.fspath(directory), 0, 0)
    try:
        while stack:
            entries, level, bucket = stack[-1]
            try:
                entry = next(entries, None)
            except OSError:  # the directory went bad while being read: the rest is skipped
                entry = None
            if entry is None:
                stack.pop()
                entries.close()  # type: ignore[attr-defined]
                continue
            seen += 1
            if seen > max_entries:
                stopped = f"{directory}: more than {max_entries} entries, the rest not counted"
                break
            try:
                if entry.is_dir(follow_symlinks=False):
                    inner = 1 if bucket or (exclude and entry.name == exclude) else 0
                    enter(entry.path, level + 1, inner)
                else:
                    sums[bucket] += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    finally:
        for entries, _, _ in stack:
            entries.close()  # type: ignore[attr-defined]
    return DirWalk(sums[0], sums[1], stopped)


def dir_usage(directory: Path, exclude: str = "") -> int:
    """Bytes of the files under ``directory``, skipping every subdirectory named ``exclude``."""
    return walk_usage(directory, exclude).included


class DirUsage:
    """`walk_usage` of one directory as of its last walk, for a heartbeat that must not wait.

    `run` walks it in a worker thread, then again every `max_age` seconds: a large directory
    (plugin data, logs) costs the event loop nothing, and the disk at most one walk a minute.
    A walk that stops at a cap is the fault `disk usage` (and `dir_walk_capped`) until one
    does not.
    """

    UNIT = "disk usage"

    def __init__(
        self,
        directory: Path,
        exclude: str = "",
        max_age: float = 60.0,
        health: Health | None = None,
    ) -> None:
        self.directory = directory
        self.exclude = exclude
        self.max_age = max_age
        self.health = health
        #: Bytes outside the excluded subdirectories at the last walk; 0 until one ends.
        self.bytes = 0
        #: Bytes of everything under the directory at the last walk.
        self.total = 0

    async def run(self) -> None:
        while True:
            walk = await asyncio.to_thread(walk_usage, self.directory, self.exclude)
            self.bytes, self.total = walk.included, walk.total
            if self.health is not None:
                if walk.stopped:
                    self.health.fault(self.UNIT, walk.stopped, WALK_CAP_COUNTER)
                else:
                    self.health.clear(self.UNIT)
            await asyncio.sleep(self.max_age)


# ---------------------------------------------------------------------------------------
# Host load


class CpuUsageSampler:
    """Host CPU busy fraction since the previous call, like gopsutil ``cpu.Percent(0)``.

    Its own state rather than psutil.cpu_percent's module-global one, which any other
    caller would reset.
    """

    def __init__(self) -> None:
        self._last = psutil.cpu_times()

    @staticmethod
    def _busy_total(t: psutil._pslinux.scputimes) -> tuple[float, float]:
        # gopsutil's Total() leaves guest time out: the kernel already counts it in user.
        total = (
            t.user + t.nice + t.system + t.idle + t.iowait + t.irq + t.softirq + t.steal
        )
        return total - t.idle - t.iowait, total

    def usage(self) -> float:
        now = psutil.cpu_times()
        busy0, total0 = self._busy_total(self._last)
        busy1, total1 = self._busy_total(now)
        self._last = now
        if total1 <= total0:
            return 0.0
        return min(1.0, max(0.0, (busy1 - busy0) / (total1 - total0)))


def _loadavg(root: Path) -> dict[str, str]:
    """load_1/5/15 and running/total procs from /proc/loadavg, as the Go agent reads it."""
    try:
        fields = read_text_capped(under_root(root, "/proc/loadavg"), SMALL_FILE_BYTES).split()
        loads = [f"{float(v):.2f}" for v in fields[:3]]
        running, total = fields[3].split("/")
    except (OSError, ValueError, IndexError):  # ValueError: also text that is not UTF-8
        return {}
    return {
        "load_1": loads[0],
        "load_5": loads[1],
        "load_15": loads[2],
        "running_procs": running,
        "total_procs": total,
    }


def host_stats(cpu: CpuUsageSampler, root: Path = ROOT) -> dict[str, str]:
    """nproc, total_mem, load_*, running/total procs, cpu_usage and mem_usage.

    The load and procs fields are left out when /proc/loadavg is unreadable, as in Go.
    """
    mem = psutil.virtual_memory()
    return {
        # Go's runtime.NumCPU counts the CPUs this process may run on.
        "nproc": str(len(os.sched_getaffinity(0))),
        "total_mem": str(mem.total),
        **_loadavg(root),
        "cpu_usage": fmt_float(cpu.usage()),
        "mem_usage": fmt_float(_rate(mem.total - mem.available, mem.total)),
    }


# ---------------------------------------------------------------------------------------
# Field maps


def _process_fields(sample: ProcSample) -> dict[str, str]:
    return {
        "cpu": fmt_float(sample.cpu),
        "rss": str(sample.rss),
        "read_speed": fmt_float(sample.read_speed),
        "write_speed": fmt_float(sample.write_speed),
        "pid": str(sample.pid),
        "nfd": str(sample.nfd),
        "start_time": str(sample.start_time),
    }


def _with_extra(fields: dict[str, str], extra: Mapping[str, Counter]) -> dict[str, str]:
    """Extra counters as strings; a standard field keeps its value on a name clash."""
    return {**{k: _fmt_counter(v) for k, v in extra.items()}, **fields}


def build_agent_heartbeat(
    *,
    facts: HostFacts,
    process: ProcSample,
    stats: Mapping[str, str],
    state: str,
    state_detail: Sequence[str],
    idc: str,
    region: str,
    net_mode: str,
    rx_speed: float,
    tx_speed: float,
    rx_tps: float,
    tx_tps: float,
    du: int,
    ngr: int,
    extra: Mapping[str, Counter] | None = None,
) -> dict[str, str]:
    """The 1000 record's fields. ``stats`` is :func:`host_stats`; ``du`` is
    ``dir_usage(work_dir, "plugin")``; ``ngr`` a concurrency figure (tasks + threads)."""
    fields = {
        "kernel_version": facts.kernel_version,
        "arch": facts.arch,
        "platform": facts.platform.platform,
        "platform_family": facts.platform.platform_family,
        "platform_version": facts.platform.platform_version,
        "state": state,
        "state_detail": json.dumps(list(state_detail), separators=(",", ":"), ensure_ascii=False),
        "idc": idc,
        "region": region,
        "net_mode": net_mode,
        "rx_speed": fmt_float(rx_speed),
        "tx_speed": fmt_float(tx_speed),
        **_process_fields(process),
        "tx_tps": fmt_float(tx_tps),
        "rx_tps": fmt_float(rx_tps),
        "du": str(du),
        "ngr": str(ngr),
        **stats,
        "host_serial": facts.host_serial,
        "host_id": facts.host_id,
        "host_model": facts.host_model,
        "host_vendor": facts.host_vendor,
        "dns": facts.dns,
        "gateway": facts.gateway,
        "cpu_name": facts.cpu_name,
        "boot_time": str(facts.boot_time),
    }
    return _with_extra(fields, extra or {})


def build_plugin_heartbeat(
    *,
    name: str,
    version: str,
    process: ProcSample,
    du: int,
    rx_speed: float,
    tx_speed: float,
    rx_tps: float,
    tx_tps: float,
    extra: Mapping[str, Counter] | None = None,
) -> dict[str, str]:
    """The 1001 record's fields for one running plugin; ``du`` is its directory's size."""
    fields = {
        "name": name,
        "pversion": version,
        **_process_fields(process),
        "du": str(du),
        "rx_tps": fmt_float(rx_tps),
        "tx_tps": fmt_float(tx_tps),
        "rx_speed": fmt_float(rx_speed),
        "tx_speed": fmt_float(tx_speed),
    }
    return _with_extra(fields, extra or {})
