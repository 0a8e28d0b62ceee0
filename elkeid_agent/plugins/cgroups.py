"""Plugin cgroups, the I/O part: find the agent's cgroups, make one per plugin, kill, read.

What to write and how to read it is decided in `cgroup_plan` (pure); this module only reads
and writes the files. Every function raises OSError narrowly; the supervisor decides what a
failure means (see `Cgroups.describe` for the one line that says whether limits apply).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from elkeid_agent.heartbeat import agent_processes
from elkeid_agent.plugins import cgroup_plan as plan
from elkeid_agent.plugins.cgroup_plan import Hierarchy, KillStep, Layout, Limits, Usage, Version

log = logging.getLogger(__name__)

#: The leaf a v2 agent moves its own processes to, so that its cgroup may hand controllers
#: to the plugin cgroups (v2 allows controllers below a cgroup only when it has no process).
AGENT_LEAF = "agent"
#: Bounds of the stop procedure: the freeze, and the wait for the cgroup to be empty.
FREEZE_WAIT = 1.0
EMPTY_WAIT = 2.0
#: How long a cgroup that cannot be removed yet (EBUSY: a member still exiting) is retried.
REMOVE_WAIT = 1.0
_POLL = 0.002


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: str, value: str) -> None:
    # One write(2) per value: cgroup files act on each write, and buffered text I/O could split.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _members(directory: str) -> list[int]:
    try:
        return plan.parse_procs(_read(f"{directory}/cgroup.procs"))
    except FileNotFoundError:
        return []


def _subtree(directory: str) -> list[str]:
    """`directory` and the cgroups below it, deepest first (a root plugin may make its own:
    v1's cgroup.procs lists a cgroup's direct members only)."""
    out = []
    for parent, children, _ in os.walk(directory):
        out += [os.path.join(parent, c) for c in children]
    return [*sorted(out, key=lambda d: -d.count("/")), directory]


def _all_members(directory: str) -> list[int]:
    return [pid for d in _subtree(directory) for pid in _members(d)]


def _signal_all(pids: Iterable[int]) -> int:
    sent = 0
    for pid in pids:
        # EPERM: a member we may not signal (another user namespace's); the rest go on.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            sent += 1
    return sent


def kill_cgroup(version: Version, dirs: dict[str, str], use_kill_file: bool = True) -> int:
    """SIGKILL every process in one plugin cgroup (`dirs`: controller or "" -> directory)
    by `cgroup_plan.kill_plan`; returns the number of signals sent (cgroup.kill: members seen).
    Waits up to EMPTY_WAIT for the members to be gone. `use_kill_file` False takes the path
    of kernels before 5.14 (tests)."""
    main = dirs.get("freezer") or next(iter(dirs.values()))
    has_kill = use_kill_file and version is Version.V2 and os.path.exists(f"{main}/cgroup.kill")
    if version is Version.V1:
        freezer = dirs.get("freezer")
    else:  # cgroup.freeze: Linux 5.2
        freezer = main if os.path.exists(f"{main}/cgroup.freeze") else None
    sent = 0
    frozen = False
    try:
        for step in plan.kill_plan(version, has_kill, freezer is not None):
            if step is KillStep.CGROUP_KILL:
                sent += len(_all_members(main))
                _write(f"{main}/cgroup.kill", "1")
            elif step is KillStep.FREEZE and freezer is not None:
                frozen = True
                _freeze(version, freezer)
            elif step is KillStep.SIGNAL_ALL:
                sent += _signal_all(_all_members(main))
            elif step is KillStep.THAW and freezer is not None:
                frozen = False
                _thaw(version, freezer)
            elif step is KillStep.SIGNAL_UNTIL_EMPTY:
                sent += _signal_until_empty(list(dirs.values()))
    finally:
        if frozen and freezer is not None:
            # A failure between freeze and thaw must not leave the plugin frozen for good.
            with contextlib.suppress(OSError):
                _thaw(version, freezer)
    deadline = time.monotonic() + EMPTY_WAIT
    while any(_all_members(d) for d in dirs.values()) and time.monotonic() < deadline:
        time.sleep(_POLL)
    return sent


def _freeze(version: Version, directory: str) -> None:
    name, frozen, _ = plan.freeze_values(version)
    _write(f"{directory}/{name}", frozen)
    events = "freezer.state" if version is Version.V1 else "cgroup.events"
    state_file = f"{directory}/{events}"
    deadline = time.monotonic() + FREEZE_WAIT
    while not plan.is_frozen(version, _read(state_file)) and time.monotonic() < deadline:
        time.sleep(_POLL)


def _thaw(version: Version, directory: str) -> None:
    name, _, thawed = plan.freeze_values(version)
    _write(f"{directory}/{name}", thawed)


def _signal_until_empty(directories: list[str]) -> int:
    sent = 0
    deadline = time.monotonic() + EMPTY_WAIT
    while time.monotonic() < deadline:
        pids = {pid for d in directories for pid in _all_members(d)}
        if not pids:
            break
        sent += _signal_all(pids)
        time.sleep(_POLL)
    return sent


@dataclass
class PluginCgroup:
    """One plugin's cgroup, the same name in each hierarchy used."""

    name: str
    version: Version
    #: controller (v1; "" on v2) -> directory; a combined v1 hierarchy appears once per
    #: controller it carries.
    dirs: dict[str, str]

    def directories(self) -> list[str]:
        return sorted(set(self.dirs.values()))

    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.directories()]

    def members(self) -> set[int]:
        return {pid for d in self.directories() for pid in _all_members(d)}

    def kill(self, use_kill_file: bool = True) -> int:
        return kill_cgroup(self.version, self.dirs, use_kill_file)

    def usage(self) -> Usage:
        files: dict[str, str] = {}
        for name, controller in plan.stat_files(self.version).items():
            if self.version is Version.V1 and controller:
                directory = self.dirs.get(controller)
            else:
                directory = self.directories()[0]
            if directory is None:
                continue
            with contextlib.suppress(OSError):
                files[name] = _read(f"{directory}/{name}")
        return plan.usage_from(self.version, files)

    def remove(self, quiet: bool = False) -> bool:
        """Remove the (empty) cgroup; False when a directory stays (busy or gone wrong)."""
        ok = True
        for directory in self.directories():
            for path in _subtree(directory):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if not quiet:
                        log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                    ok = False
        return ok

    def drop(self) -> bool:
        """Kill what is left in the cgroup and remove it, again until REMOVE_WAIT while it is
        busy; False (logged) when it stays: the group's sweep at stop or the next start ends
        it. Blocking, up to ~4 s: a worker thread's."""
        deadline = time.monotonic() + REMOVE_WAIT
        while True:
            if self.members():
                self.kill()
            last = time.monotonic() >= deadline
            if self.remove(quiet=not last):
                return True
            if last:
                return False
            time.sleep(0.02)


@dataclass
class Cgroups:
    """The agent's plugin cgroups: where they go, which limits apply, and why not."""

    group: str
    layout: Layout | None = None
    #: The limit controllers plugin cgroups get (memory, cpu, pids).
    controllers: frozenset[str] = frozenset()
    #: Why plugins are not in cgroups, or why some limit is missing ("" when all apply).
    reason: str = ""
    #: Limit files that could not be written at the last create (plugin -> message).
    write_errors: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.layout is not None

    def describe(self) -> str:
        """One line for the log, state_detail, `ctl status` and `doctor`."""
        if self.layout is None:
            return f"plugin limits not in effect: {self.reason}"
        version = f"cgroup v{self.layout.version.value}"
        if self.controllers >= set(plan.LIMIT_CONTROLLERS) and not self.reason:
            return f"plugin limits in effect ({version}: memory, cpu, pids)"
        have = ", ".join(sorted(self.controllers)) or "none"
        why = f": {self.reason}" if self.reason else ""
        return f"plugin limits partly in effect ({version}, controllers: {have}){why}"

    def _group_dirs(self) -> dict[str, str]:
        assert self.layout is not None
        out: dict[str, str] = {}
        for h in self.layout.hierarchies:
            directory = f"{h.agent_dir}/{self.group}"
            for controller in h.controllers or frozenset({""}):
                out[controller] = directory
        return out

    def plugin(self, name: str) -> PluginCgroup:
        """The plugin's cgroup (not created)."""
        assert self.layout is not None
        return PluginCgroup(
            name,
            self.layout.version,
            {c: f"{d}/{name}" for c, d in self._group_dirs().items()},
        )

    def create(self, name: str, limits: Limits) -> PluginCgroup:
        """Make (or reuse) the plugin's cgroup and write its limits.

        OSError when a directory cannot be made; a limit that cannot be written is logged and
        kept in `write_errors` (the plugin runs, without that limit)."""
        cgroup = self.plugin(name)
        for directory in cgroup.directories():
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o755)
        assert self.layout is not None
        failures = []
        for controller, filename, value in plan.limit_writes(self.layout, limits, self.controllers):
            directory = cgroup.dirs.get(controller) or cgroup.directories()[0]
            try:
                _write(f"{directory}/{filename}", value)
            except FileNotFoundError:
                if filename not in plan.OPTIONAL_FILES:
                    failures.append(f"{filename}: missing")
            except OSError as exc:
                failures.append(f"{filename}={value}: {exc.strerror}")
        if failures:
            message = "; ".join(failures)
            if self.write_errors.get(name) != message:
                log.warning("plugin %s: limits not written: %s", name, message)
            self.write_errors[name] = message
        else:
            self.write_errors.pop(name, None)
        return cgroup

    def remove_group(self) -> None:
        """Remove the group's directories once its plugin cgroups are gone (at stop)."""
        if self.layout is None:
            return
        for directory in set(self._group_dirs().values()):
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    def leftovers(self) -> list[PluginCgroup]:
        """Plugin cgroups found under the group (the previous run's, at start)."""
        if self.layout is None:
            return []
        names: set[str] = set()
        for directory in set(self._group_dirs().values()):
            with contextlib.suppress(OSError):
                names.update(
                    e.name
                    for e in os.scandir(directory)
                    if e.is_dir(follow_symlinks=False) and plan.NAME_RE.fullmatch(e.name)
                )
        return [self.plugin(n) for n in sorted(names)]


def sweep(cgroups: Cgroups) -> list[int]:
    """Kill every process left in the group's plugin cgroups, and remove them; returns the pids
    that were there."""
    found: list[int] = []
    for cgroup in cgroups.leftovers():
        pids = sorted(cgroup.members())
        if pids:
            cgroup.kill()
            found += pids
            log.warning(
                "killed %d processes left in cgroup %s: %s",
                len(pids), cgroup.name, pids[:20],
            )
        cgroup.remove()
    return found


@dataclass(frozen=True)
class Probe:
    usable: bool
    line: str


def probe(proc_root: Path = Path("/proc")) -> Probe:
    """Whether this process could put plugins in cgroups, and which limits, without changing
    anything (for `doctor`, which runs outside the agent's cgroup)."""
    try:
        layout = plan.plan_layout(
            (proc_root / "self/cgroup").read_text(), (proc_root / "self/mountinfo").read_text()
        )
    except OSError as exc:
        return Probe(False, f"cannot read this process's cgroups: {exc.strerror}")
    if isinstance(layout, str):
        return Probe(False, layout)
    writable = [h for h in layout.hierarchies if os.access(h.agent_dir, os.W_OK)]
    if not writable:
        return Probe(False, f"no write access to {layout.hierarchies[0].agent_dir}")
    version = f"cgroup v{layout.version.value}"
    if layout.version is Version.V1:
        have = {c for h in writable for c in h.controllers} & set(plan.LIMIT_CONTROLLERS)
    else:
        try:
            offered = set(_read(f"{writable[0].agent_dir}/cgroup.controllers").split())
        except OSError:
            offered = set()
        have = offered & set(plan.LIMIT_CONTROLLERS)
    missing = [c for c in plan.LIMIT_CONTROLLERS if c not in have]
    if missing:
        return Probe(True, f"{version}, without {', '.join(missing)}")
    return Probe(True, f"{version}: memory, cpu, pids")


def discover(group: str, proc_root: Path = Path("/proc")) -> Cgroups:
    """Find the agent's cgroups and make `<agent cgroup>/<group>` in each usable hierarchy.

    On a hybrid host whose v1 controllers cannot be written (a container that mounts them
    read-only, as systemd-nspawn does), the v2 hierarchy still places and kills plugins."""
    out = Cgroups(group)
    try:
        texts = (proc_root / "self/cgroup").read_text(), (proc_root / "self/mountinfo").read_text()
    except OSError as exc:
        out.reason = f"cannot read this process's cgroups: {exc.strerror}"
        return out
    layout = plan.plan_layout(*texts)
    if isinstance(layout, str):
        out.reason = layout
        return out
    if layout.version is Version.V2:
        return _discover_v2(out, layout)
    out = _discover_v1(out, layout)
    if out.usable:
        return out
    v2 = plan.plan_layout(*texts, v1=False)
    if isinstance(v2, str):
        return out
    hybrid = _discover_v2(Cgroups(group), v2)
    if not hybrid.usable:
        return out
    hybrid.reason = "; ".join(r for r in (out.reason, hybrid.reason) if r)
    return hybrid


def _discover_v1(out: Cgroups, layout: Layout) -> Cgroups:
    group = out.group
    usable: list[Hierarchy] = []
    problems: list[str] = []
    for h in layout.hierarchies:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(f"{h.agent_dir}/{group}", 0o755)
        except OSError as exc:
            where = ",".join(sorted(h.controllers))
            problems.append(f"{where}: cannot create {h.agent_dir}/{group}: {exc.strerror}")
            continue
        usable.append(h)
    if not usable:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        out.reason = f"no cgroup v1 hierarchy writable ({problems[0]}{more})"
        return out
    out.layout = Layout(Version.V1, tuple(usable))
    have = {c for h in usable for c in h.controllers}
    out.controllers = frozenset(have & set(plan.LIMIT_CONTROLLERS))
    missing = [c for c in plan.LIMIT_CONTROLLERS if c not in have]
    if missing:
        problems.insert(0, "no " + ", ".join(missing) + " hierarchy")
    out.reason = "; ".join(problems)
    return out


def _discover_v2(out: Cgroups, layout: Layout) -> Cgroups:
    agent_dir = layout.hierarchies[0].agent_dir
    group_dir = f"{agent_dir}/{out.group}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(group_dir, 0o755)
    except OSError as exc:
        out.reason = f"cannot create {group_dir}: {exc.strerror}"
        return out
    out.layout = layout
    try:
        offered = set(_read(f"{agent_dir}/cgroup.controllers").split())
    except OSError as exc:
        out.reason = f"cannot read {agent_dir}/cgroup.controllers: {exc.strerror}"
        return out
    wanted = [c for c in plan.LIMIT_CONTROLLERS if c in offered]
    enabled: list[str] = []
    problems = []
    if len(wanted) < len(plan.LIMIT_CONTROLLERS):
        missing = [c for c in plan.LIMIT_CONTROLLERS if c not in offered]
        problems.append(f"controllers not delegated to {agent_dir}: {', '.join(missing)}")
    if wanted:
        try:
            _enable(agent_dir, wanted)
            _enable(group_dir, wanted)
            enabled = wanted
        except OSError as exc:
            problems.append(f"cannot enable {', '.join(wanted)} below {agent_dir}: {exc.strerror}")
    out.controllers = frozenset(enabled)
    out.reason = "; ".join(problems)
    return out


def _enable(directory: str, controllers: list[str]) -> None:
    """Enable `controllers` for the children of `directory`; when its own processes are in
    the way (EBUSY, v2's no-internal-process rule) and they are all this agent's (under
    systemd with Delegate=yes), move them into the AGENT_LEAF child first."""
    value = " ".join("+" + c for c in controllers)
    try:
        _write(f"{directory}/cgroup.subtree_control", value)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    ours = set(_agent_pids())
    present = set(_members(directory))
    if not present <= ours:
        raise OSError(errno.EBUSY, "its cgroup holds processes other than the agent's")
    leaf = f"{directory}/{AGENT_LEAF}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    for pid in sorted(present):
        with contextlib.suppress(ProcessLookupError):
            _write(f"{leaf}/cgroup.procs", str(pid))
    _write(f"{directory}/cgroup.subtree_control", value)


def _agent_pids() -> list[int]:
    """This process and its same-program ancestors (staticx, PyInstaller's bootloader)."""
    return [p.pid for p in agent_processes()]
