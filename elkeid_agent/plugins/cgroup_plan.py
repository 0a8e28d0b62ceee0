"""Plugin cgroups, the pure part: where they are, what to write, how to read what they report.

Nothing here touches a file: the I/O layer (`cgroups.py`) reads /proc/self/cgroup,
/proc/self/mountinfo and the cgroup files, and hands their text to these functions.

Layout. Each plugin gets `<agent's cgroup>/<group>/<plugin name>` in every hierarchy used:
on cgroup v1 the memory, cpu, cpuacct, pids and freezer hierarchies (any of them may be
missing or combined, as `cpu,cpuacct` on CentOS 7), on v2 the one unified hierarchy. `<group>`
is `plugins.cgroup_name`, so that several agents sharing one cgroup (tests) keep apart and the
orphan sweep at start finds exactly the previous run's plugin cgroups.

Placement. The plugin's first process (the spawn trampoline, a POSIX shell) writes its own pid
into each `cgroup.procs` before it execs the plugin (see `trampoline_argv`): nothing the plugin
runs ever executes outside its cgroup, and a failed write ends the start.

Stop (`kill_plan`): v2 with `cgroup.kill` (Linux 5.14) kills the whole cgroup in one write;
otherwise the cgroup is frozen (v1 freezer, v2 `cgroup.freeze`) so nothing forks meanwhile,
every member is sent SIGKILL, and it is thawed so the signals are delivered; without a freezer
the members are signalled over and over until none is left.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The cgroup v1 controllers a plugin cgroup uses: limits (memory, cpu, pids), the CPU time
#: figure (cpuacct) and the stop procedure (freezer).
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
#: Which controllers must be there for each limit, by version.
LIMIT_CONTROLLERS = ("memory", "cpu", "pids")
#: CFS period for a CPU quota: the kernel default, 100 ms.
CPU_PERIOD_US = 100_000
#: A quota below 1 ms per period is refused by the kernel.
MIN_QUOTA_US = 1000
#: Names of the cgroup directories the agent makes (a plugin name obeys the same rule).
NAME_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
#: Limit files a kernel may lack (swap accounting off, no swap): their absence is no fault.
OPTIONAL_FILES = frozenset({"memory.memsw.limit_in_bytes", "memory.swap.max"})
#: The exit status of the trampoline when it could not join the plugin's cgroup.
JOIN_FAILED = 125


class Version(enum.Enum):
    V1 = 1
    V2 = 2


@dataclass(frozen=True)
class Limits:
    """One plugin's limits; 0 means none for that resource."""

    memory_bytes: int = 0
    cpu_percent: float = 0.0  # of one core
    cpu_weight: int = 0  # v2 cpu.weight scale (1..10000, kernel default 100)
    pids: int = 0


@dataclass(frozen=True)
class Mount:
    mount_point: str
    root: str  # the part of the hierarchy mounted there (not "/" inside a cgroup namespace)
    fstype: str
    options: frozenset[str]  # super options: the controllers of a v1 hierarchy


@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy and the agent's cgroup in it, as a directory path."""

    controllers: frozenset[str]  # empty for v2
    agent_dir: str


@dataclass(frozen=True)
class Layout:
    version: Version
    hierarchies: tuple[Hierarchy, ...]

    def by_controller(self, controller: str) -> Hierarchy | None:
        for h in self.hierarchies:
            if controller in h.controllers:
                return h
        return None


# -- parsing ----------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts of /proc/self/mountinfo."""
    out = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(rest[2].split(","))
        out.append(Mount(_unescape(fields[4]), _unescape(fields[3]), rest[0], options))
    return out


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; the v2 entry ("0::/path") under ""."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for controller in controllers.split(","):
            if controller:
                out[controller] = path
    return out


def _join(mount: Mount, path: str) -> str | None:
    """The directory of `path` (as /proc/self/cgroup names it) under `mount`, or None when
    the mount does not show it (a cgroup namespace or bind mount of another subtree)."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    rel = path[len(root) :].strip("/")
    if ".." in rel.split("/") or " (deleted)" in rel:
        return None
    return mount.mount_point.rstrip("/") + ("/" + rel if rel else "")


def plan_layout(proc_cgroup: str, mountinfo: str, v1: bool = True) -> Layout | str:
    """Which hierarchies the plugin cgroups go in, or why none can be used.

    v1 wins when any v1 hierarchy of ours is mounted (a hybrid host keeps its controllers
    there; its cgroup2 mount has none of them); `v1=False` asks for the v2 hierarchy alone (a
    hybrid host whose v1 controllers cannot be written: membership and kill without limits)."""
    membership = parse_proc_cgroup(proc_cgroup)
    mounts = parse_mountinfo(mountinfo)
    hierarchies: list[Hierarchy] = []
    seen: set[str] = set()
    for mount in mounts:
        if mount.fstype != "cgroup" or not v1:
            continue
        ours = frozenset(c for c in V1_CONTROLLERS if c in mount.options)
        taken = {c for h in hierarchies for c in h.controllers}
        if not ours or mount.mount_point in seen or ours & taken:
            continue
        path = membership.get(next(iter(sorted(ours))))
        directory = _join(mount, path) if path is not None else None
        if directory is not None:
            hierarchies.append(Hierarchy(ours, directory))
            seen.add(mount.mount_point)
    if hierarchies:
        return Layout(Version.V1, tuple(hierarchies))
    path = membership.get("")
    for mount in mounts:
        if mount.fstype == "cgroup2" and path is not None:
            directory = _join(mount, path)
            if directory is not None:
                return Layout(Version.V2, (Hierarchy(frozenset(), directory),))
    if path is None and not membership:
        return "this kernel shows no cgroup membership (/proc/self/cgroup)"
    return "no cgroup hierarchy of this process is mounted"


def parse_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.events, memory.oom_control, cpu.stat, memory.stat)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def parse_procs(text: str) -> list[int]:
    return [int(line) for line in text.split() if line.isdigit()]


# -- what to write ----------------------------------------------------------------------------


def plugin_dirs(layout: Layout, group: str, name: str) -> list[str]:
    """The plugin's cgroup directory in each hierarchy."""
    return [f"{h.agent_dir}/{group}/{name}" for h in layout.hierarchies]


def limit_writes(
    layout: Layout, limits: Limits, available: Iterable[str]
) -> list[tuple[str, str, str]]:
    """(controller, file, value) to write in a plugin cgroup, for the controllers `available`.

    Swap is closed (v2 memory.swap.max, v1 memory.memsw.limit_in_bytes, written after the
    memory limit it must not be below), so the limit is a limit and not a slow swap storm;
    v1 has memsw only with swap accounting on (OPTIONAL_FILES). On v2 the OOM killer takes
    the whole cgroup (memory.oom.group)."""
    have = set(available)
    out: list[tuple[str, str, str]] = []
    quota = 0
    if limits.cpu_percent > 0:
        quota = max(MIN_QUOTA_US, round(CPU_PERIOD_US * limits.cpu_percent / 100))
    if layout.version is Version.V1:
        if "memory" in have and limits.memory_bytes:
            out.append(("memory", "memory.limit_in_bytes", str(limits.memory_bytes)))
            out.append(("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes)))
        if "cpu" in have and limits.cpu_weight:
            # v1 shares: 1024 is the default, as 100 is cpu.weight's.
            shares = max(2, limits.cpu_weight * 1024 // 100)
            out.append(("cpu", "cpu.shares", str(shares)))
        if "cpu" in have and quota:
            out.append(("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)))
            out.append(("cpu", "cpu.cfs_quota_us", str(quota)))
        if "pids" in have and limits.pids:
            out.append(("pids", "pids.max", str(limits.pids)))
        return out
    if "memory" in have:
        if limits.memory_bytes:
            out.append(("memory", "memory.max", str(limits.memory_bytes)))
            out.append(("memory", "memory.swap.max", "0"))
        out.append(("memory", "memory.oom.group", "1"))
    if "cpu" in have and limits.cpu_weight:
        out.append(("cpu", "cpu.weight", str(limits.cpu_weight)))
    if "cpu" in have and quota:
        out.append(("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"))
    if "pids" in have and limits.pids:
        out.append(("pids", "pids.max", str(limits.pids)))
    return out


def trampoline_argv(
    shell: str, name: str, directory: str, executable: str, procs_files: Iterable[str]
) -> list[str]:
    """The spawn's argv: a POSIX shell that joins the cgroups, changes directory and execs.

    posix_spawn can neither chdir (Python 3.11..3.13) nor place the child in a cgroup, so the
    child does both itself: it writes its own pid ($$, which stays the plugin's pid through
    exec) into each cgroup.procs first, and exits JOIN_FAILED when one write fails."""
    script = (
        'd=$1 e=$2; shift 2; for p; do echo $$ >"$p" || exit '
        f'{JOIN_FAILED}; done; cd "$d" && exec "$e"'
    )
    return [shell, "-c", script, name, directory, executable, *procs_files]


# -- the stop procedure -----------------------------------------------------------------------


class KillStep(enum.Enum):
    CGROUP_KILL = "cgroup.kill"  # v2, one write kills every member
    FREEZE = "freeze"
    SIGNAL_ALL = "signal each member"
    THAW = "thaw"
    SIGNAL_UNTIL_EMPTY = "signal members until none is left"


def kill_plan(version: Version, has_kill_file: bool, has_freezer: bool) -> list[KillStep]:
    if version is Version.V2 and has_kill_file:
        return [KillStep.CGROUP_KILL]
    if has_freezer:
        return [KillStep.FREEZE, KillStep.SIGNAL_ALL, KillStep.THAW, KillStep.SIGNAL_UNTIL_EMPTY]
    return [KillStep.SIGNAL_UNTIL_EMPTY]


def freeze_values(version: Version) -> tuple[str, str, str]:
    """(file, frozen value, thawed value) of the freezer."""
    if version is Version.V1:
        return "freezer.state", "FROZEN", "THAWED"
    return "cgroup.freeze", "1", "0"


def is_frozen(version: Version, text: str) -> bool:
    """Whether the freeze is complete, from freezer.state (v1) or cgroup.events (v2)."""
    if version is Version.V1:
        return text.strip() == "FROZEN"
    return parse_keyed(text).get("frozen") == 1


# -- what a plugin cgroup reports -------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Cumulative figures of one plugin cgroup; None where the controller is missing."""

    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    memory_limit: int | None = None
    oom_kills: int | None = None
    throttled_periods: int | None = None
    throttled_seconds: float | None = None
    procs: int | None = None


_UNLIMITED = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX


def _limit(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return 0
    try:
        value = int(text)
    except ValueError:
        return None
    return 0 if value >= _UNLIMITED else value


def usage_from(version: Version, files: Mapping[str, str]) -> Usage:
    """Usage from the text of the files read (file name -> text; unreadable ones absent)."""
    procs = len(parse_procs(files["cgroup.procs"])) if "cgroup.procs" in files else None
    cpu_stat = parse_keyed(files.get("cpu.stat", ""))
    throttled_periods = cpu_stat.get("nr_throttled")
    if version is Version.V1:
        acct = files.get("cpuacct.usage", "").strip()
        memory = files.get("memory.usage_in_bytes", "").strip()
        oom = parse_keyed(files.get("memory.oom_control", ""))
        stat = parse_keyed(files.get("memory.stat", ""))
        throttled_ns = cpu_stat.get("throttled_time")
        return Usage(
            cpu_seconds=int(acct) / 1e9 if acct.isdigit() else None,
            # RSS as the plugin's own processes see it: page cache (its log files) left out.
            memory_bytes=stat.get("total_rss", stat.get("rss")) if stat else (
                int(memory) if memory.isdigit() else None
            ),
            memory_limit=_limit(files.get("memory.limit_in_bytes")),
            oom_kills=oom.get("oom_kill"),
            throttled_periods=throttled_periods,
            throttled_seconds=throttled_ns / 1e9 if throttled_ns is not None else None,
            procs=procs,
        )
    events = parse_keyed(files.get("memory.events", ""))
    stat = parse_keyed(files.get("memory.stat", ""))
    usage_usec = cpu_stat.get("usage_usec")
    throttled_usec = cpu_stat.get("throttled_usec")
    return Usage(
        cpu_seconds=usage_usec / 1e6 if usage_usec is not None else None,
        memory_bytes=stat.get("anon") if stat else None,
        memory_limit=_limit(files.get("memory.max")),
        oom_kills=events.get("oom_kill") if "memory.events" in files else None,
        throttled_periods=throttled_periods,
        throttled_seconds=throttled_usec / 1e6 if throttled_usec is not None else None,
        procs=procs,
    )


def stat_files(version: Version) -> dict[str, str]:
    """{file: controller} read for `usage_from`; "" is any hierarchy (membership)."""
    if version is Version.V1:
        return {
            "cgroup.procs": "",
            "cpuacct.usage": "cpuacct",
            "cpu.stat": "cpu",
            "memory.usage_in_bytes": "memory",
            "memory.stat": "memory",
            "memory.limit_in_bytes": "memory",
            "memory.oom_control": "memory",
        }
    return {
        "cgroup.procs": "",
        "cpu.stat": "",
        "memory.events": "memory",
        "memory.stat": "memory",
        "memory.max": "memory",
    }
