"""The plugin supervisor: desired-state sync, one slot per plugin, restarts, orphan reaping.

Ownership. `run()` owns one TaskGroup; every plugin slot is a task in it, and each slot owns
its child through `PluginProcess.serve` (itself a TaskGroup of pump, task writer and exit
watcher). Nothing is started outside these groups: cancelling `run()` tears every plugin
down (SIGKILL and reap), and `stop()` is the orderly way (pipes closed, 10 s, SIGKILL).

Sync. A Configs command is the whole desired set. `plan_sync` (pure) compares it with the
slots, the installs in flight and the directories on disk; `sync` carries the plan out: under
a lock (held for seconds, never for a download) it cancels the installs the set changed or
removed, removes what the set removed, and starts one install task per new or changed entry
(in the supervisor's TaskGroup); then it waits for the set's installs outside the lock. A
newer sync supersedes it at once: the older one returns, the installs of entries the newer
set leaves unchanged go on, the others are cancelled. So a slow download holds only its own
entry, and the newest set is in effect within seconds. An install downloads and verifies
while the old version still runs (so a bad artifact leaves it running), then takes the lock
to stop the old version and swap the files in, which no cancel interrupts. A failure of one
plugin (a bad URL, a download error, a spawn error, any exception) is recorded and the others
go on; the recorded failures are the agent's abnormal reasons until the next sync replaces
them, and an entry whose download is behind the minimum progress is named with its URL while
it waits. The names in `hold` (entries the dispatcher refused) are neither removed nor
started: a bad push leaves a healthy plugin as it is.

Slots. A slot runs its plugin until told to stop, restarting it after every exit with the
backoff of `lifecycle.backoff_delay`; its state changes only through its `Lifecycle`. A slot is
the unit of failure of one plugin: an exception in its spawn or its serving ends that run (and
is retried after the backoff), never the supervisor's TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import msgspec
import psutil

from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.childenv import child_env
from elkeid_agent.commands import NAME_RE, ConfigSpec, TaskSpec
from elkeid_agent.config import PluginsConfig
from elkeid_agent.download import DownloadError, UnsafeArchive
from elkeid_agent.errors import TaskFailed
from elkeid_agent.fsutil import remove_tree
from elkeid_agent.health import MAX_REASON, Health
from elkeid_agent.heartbeat import (
    PLUGIN_HEARTBEAT,
    WALK_CAP_COUNTER,
    DirWalk,
    ProcessGroupSampler,
    ProcSample,
    build_plugin_heartbeat,
    walk_usage,
)
from elkeid_agent.http import host_ssl_context
from elkeid_agent.plugins import cgroups as cgroupfs
from elkeid_agent.plugins import install, orphans, subreaper
from elkeid_agent.plugins.cgroup_plan import Limits, Usage
from elkeid_agent.plugins.lifecycle import (
    Event,
    Lifecycle,
    State,
    backoff_delay,
    failures_after_run,
)
from elkeid_agent.plugins.process import (
    HIGH_PRIORITY_ENV,
    Counters,
    Outcome,
    PluginProcess,
    exit_with_stderr,
    run_to_end,
    stderr_path,
)
from elkeid_agent.progress import Progress, Rule
from elkeid_agent.signing.check import REFUSED_COUNTER, WARNED_COUNTER, Verifier
from elkeid_agent.wire import encode_record, task_frame

log = logging.getLogger(__name__)

PLUGIN_DIR = "plugin"


@dataclass(frozen=True)
class SyncPlan:
    """What a sync does: names to stop and delete, configs to (re)start, names left alone,
    installs in flight to cancel and to let go on."""

    remove: tuple[str, ...]
    start: tuple[ConfigSpec, ...]
    keep: tuple[str, ...]
    rejected: tuple[str, ...]  # reasons, one per refused entry
    cancel: tuple[str, ...] = ()
    going_on: tuple[str, ...] = ()


def plan_sync(
    running: Mapping[str, str],
    installed: Iterable[str],
    desired: Sequence[ConfigSpec],
    hold: Collection[str] = (),
    installing: Mapping[str, ConfigSpec] | None = None,
) -> SyncPlan:
    """Pure: from running {name: version}, plugin dirs on disk, the installs in flight
    {name: the entry being installed} and the desired set, the plan.

    An install in flight whose entry the set leaves exactly as it was goes on (it is not
    started again); one whose entry changed in any field, was removed, or was refused this
    time (a name in `hold`) is cancelled: the newest set is the one in effect. Plugins named
    in `hold` and not in the desired set are left alone (not removed)."""
    installing = installing or {}
    rejected: list[str] = []
    wanted: dict[str, ConfigSpec] = {}
    for spec in desired:
        if not install.valid_name(spec.name):
            pattern = NAME_RE.pattern
            rejected.append(f"plugin name {spec.name!r} refused: must match {pattern}")
        elif spec.name in wanted:
            rejected.append(f"plugin {spec.name}: listed twice, the first entry is used")
        else:
            wanted[spec.name] = spec
    going_on = tuple(sorted(n for n, s in installing.items() if wanted.get(n) == s))
    cancel = tuple(sorted(n for n in installing if n not in going_on))
    present = set(running) | set(installed)
    remove = tuple(sorted(n for n in present if n not in wanted and n not in hold))
    start = tuple(
        s for n, s in wanted.items() if n not in going_on and running.get(n) != s.version
    )
    keep = tuple(
        n for n, s in wanted.items() if n not in going_on and running.get(n) == s.version
    )
    return SyncPlan(remove, start, keep, tuple(rejected), cancel, going_on)


#: A plugin that failed is reported until its new run has lasted this long (its restarts
#: come at 1 s, 2 s, 4 s, ...: a crash loop is never shown as simply running).
FLAP_WINDOW = 60.0

_EXPECTED = (install.InstallError, DownloadError, UnsafeArchive, OSError)


def _reason(exc: Exception) -> str:
    """The failure of one plugin for people; a defect (not an expected failure) is logged whole."""
    if not isinstance(exc, _EXPECTED):
        log.error("plugin sync step failed", exc_info=exc)
        return repr(exc)
    return str(exc)


def _cut(reason: str) -> str:
    # Each is a line of state_detail in every heartbeat: cut as Health cuts its reasons
    # (a DownloadError quotes all its URLs, up to 16 of 4 KiB each).
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def _usage_of(directories: Mapping[str, Path]) -> dict[str, DirWalk]:
    return {name: walk_usage(path) for name, path in directories.items()}


@dataclass
class _Slot:
    """One plugin the supervisor keeps running, across restarts."""

    spec: ConfigSpec
    directory: Path
    counters: Counters = field(default_factory=Counters)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    process: PluginProcess | None = None
    task: asyncio.Task[None] | None = None
    restarts: int = 0
    failures: int = 0
    last_exit: str = ""
    sampler: ProcessGroupSampler | None = None
    #: (when, counters) the next heartbeat's rates start from; reset at each spawn.
    rate_base: tuple[float, Counters] = (0.0, Counters())
    #: The plugin's cgroup (made at its first spawn, removed when the slot ends), and
    #: (when, CPU seconds) of its previous heartbeat reading.
    cgroup: cgroupfs.PluginCgroup | None = None
    cpu_base: tuple[float, float] | None = None

    def request_stop(self) -> None:
        if self.lifecycle.live:
            self.lifecycle.fire(Event.STOP)
        self.stop_requested.set()


@dataclass
class _Install:
    """One entry's install in flight: download, verify, unpack, then swap in and start."""

    spec: ConfigSpec
    progress: Progress
    task: asyncio.Task[None] | None = None
    #: Stopping the old version and swapping the files in: not to be cancelled.
    committing: bool = False


class PluginSupervisor:
    """Implements commands.PluginHost; the lead's app wires run()/stop() into its TaskGroup."""

    def __init__(
        self,
        work_dir: Path,
        buffer: RecordBuffer,
        config: PluginsConfig,
        on_state: Callable[[], None] | None = None,
        health: Health | None = None,
    ) -> None:
        self.root = Path(work_dir) / PLUGIN_DIR
        self.health = health if health is not None else Health()
        self.buffer = buffer
        self.config = config
        self.on_state = on_state
        self._slots: dict[str, _Slot] = {}
        self._installs: dict[str, _Install] = {}
        self._sync_errors: list[str] = []
        #: The last failure of each entry whose install failed since the last sync.
        self._entry_errors: dict[str, str] = {}
        #: Done when a newer sync has begun: the older one stops waiting for its installs.
        self._superseded: asyncio.Future[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._closing = False
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The TLS context for HTTPS downloads: the host's CA store unless replaced.
        self.ssl_context_factory: Callable[[], ssl.SSLContext] = host_ssl_context
        self.download_timeout = 600.0
        #: Checks each download's signature (docs/signing.md); the policy says what a
        #: problem does.
        self.verifier = Verifier()
        self.download_rule = Rule(config.download_min_bytes, config.download_min_seconds,
                                  config.download_deadline)
        #: Seconds between walks of the plugin directories for the 1001s' `du`.
        self.usage_max_age = 60.0
        #: Bytes under each plugin's directory at the last walk (a worker thread's).
        self._usage: dict[str, int] = {}
        #: Where plugin cgroups go (None: not used), and the line saying whether limits apply.
        self.cgroups: cgroupfs.Cgroups | None = None
        self.limits_state = "plugin limits: not set up yet"
        #: The limits line while they are missing or partial, else "".
        self.limits_warning = ""

    # -- running --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Reap orphans of a previous agent, then own the plugin slots until stop() or cancel."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # A read-only or full work dir (the agent reports it): no plugin can be installed,
            # and the agent runs on without.
            log.error("cannot create %s: %s", self.root, exc)
        self._setup_containment()
        try:
            # A walk of /proc (one per process on a busy host): off the loop, as the sweep.
            killed = await run_to_end(partial(orphans.reap, self.root / orphans.PGIDS_FILE))
            if self.cgroups is not None:
                killed += await run_to_end(partial(cgroupfs.sweep, self.cgroups))
        except Exception as exc:  # the boundary of the reaping: what it reads is from disk
            log.error("orphan plugin processes not reaped", exc_info=exc)
            self.health.fault("orphans", f"not reaped: {exc!r}", "orphan_reap_errors")
            killed = []
        if killed:
            log.warning("killed %d plugin processes left by a previous agent", len(killed))
        self._loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            usage = tg.create_task(self._walk_usage(), name="plugin dir usage")
            self._ready.set()
            try:
                await self._stopped.wait()
            finally:
                self._tg = None
                usage.cancel()

    def _setup_containment(self) -> None:
        """Plugin cgroups when they can be used; else the agent becomes the child subreaper.
        Said once in the log; limits that are missing stay a warning (the heartbeat's
        `warnings`, `ctl status`, doctor), not a fault: a host that cannot give them (a
        container, an old kernel) is how it is, and "abnormal" must mean something to fix."""
        if self.config.cgroups:
            found = cgroupfs.discover(self.config.cgroup_name)
            self.cgroups = found if found.usable else None
            note = found.describe()
            complete = found.usable and not found.reason
        else:
            note, complete = "plugin limits not in effect: plugins.cgroups is false", True
        if self.cgroups is None:
            why = subreaper.enable()
            note += (
                f"; {why}: a daemonized descendant may outlive its plugin"
                if why
                else "; stop tracks each plugin's descendants as child subreaper"
            )
        self.limits_state = note
        if complete:
            log.info("%s", note)
        else:
            self.limits_warning = note
            log.warning("%s", note)

    async def stop(self) -> None:
        """Stop every plugin (at most ~10 s, in parallel); later syncs and tasks are refused."""
        self._closing = True
        self._supersede()
        installs = [job.task for job in self._installs.values() if job.task is not None]
        for job in self._installs.values():
            if job.task is not None and not job.committing:
                job.task.cancel()
        if installs:
            await asyncio.wait(installs)
        slots = list(self._slots.values())
        for slot in slots:
            slot.request_stop()
        tasks = [s.task for s in slots if s.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        self._slots.clear()
        self._save_groups()
        if self.cgroups is not None:
            # A plugin cgroup that could not be removed when its slot ended (counted then).
            with contextlib.suppress(OSError):
                await run_to_end(partial(cgroupfs.sweep, self.cgroups))
            self.cgroups.remove_group()
        self._stopped.set()

    # -- PluginHost -----------------------------------------------------------------------------

    async def send_task(self, task: TaskSpec) -> None:
        slot = self._slots.get(task.object_name)
        if slot is None:
            raise TaskFailed(f"no such plugin: {task.object_name}")
        if slot.process is None:
            raise TaskFailed(f"plugin {task.object_name} is not running ({slot.last_exit})")
        slot.process.send(task_frame(task.data_type, task.object_name, task.data, task.token))

    async def sync(self, configs: Sequence[ConfigSpec], hold: Collection[str] = ()) -> None:
        """Apply the desired set; return once its installs have ended, or at once when a
        newer sync supersedes it (that one then owns every entry)."""
        superseded = self._supersede()
        async with self._sync_lock:
            await self._ready.wait()
            if self._closing or superseded.done():
                return
            await self._forget_stopped()
            running = {name: slot.spec.version for name, slot in self._slots.items()}
            installing = {name: job.spec for name, job in self._installs.items()}
            plan = plan_sync(running, self._installed(), configs, hold, installing)
            await self._cancel_installs(plan.cancel)
            errors = list(plan.rejected)
            # All told at once: each may take its 10 s to stop, and the newer set waits.
            for name in plan.remove:
                if (slot := self._slots.get(name)) is not None:
                    slot.request_stop()
            for name in plan.remove:
                try:
                    await self._remove(name)
                except Exception as exc:  # noqa: BLE001 - the boundary of one plugin's removal
                    errors.append(f"plugin {name}: cannot remove: {_reason(exc)}")
            self._entry_errors.clear()
            for spec in plan.start:
                try:
                    self._launch(spec)
                except install.InstallError as exc:
                    errors.append(f"plugin {spec.name}: {exc}")
            for reason in errors:
                log.error("sync: %s", reason)
            if errors:
                self.health.count("plugin_sync_failures", len(errors))
            self._sync_errors = [_cut(e) for e in errors]
            self._notify()
            pending = {job.task for job in self._installs.values() if job.task is not None}
        while pending and not superseded.done():
            await asyncio.wait([*pending, superseded], return_when=asyncio.FIRST_COMPLETED)
            pending = {task for task in pending if not task.done()}

    def _supersede(self) -> asyncio.Future[None]:
        """End the wait of the sync before this one; the future a newer one will end."""
        if self._superseded is not None and not self._superseded.done():
            self._superseded.set_result(None)
        self._superseded = asyncio.get_running_loop().create_future()
        return self._superseded

    # -- state for the heartbeat ----------------------------------------------------------------

    def errors(self) -> list[str]:
        """Why the agent is abnormal: failed sync items, plugins not running."""
        out = [*self._sync_errors, *self._entry_errors.values()]
        now = time.monotonic()
        for name, job in self._installs.items():
            waiting = job.progress.waiting(now)
            if waiting is not None:
                out.append(_cut(f"plugin {name} {job.spec.version}: waiting for {waiting}, "
                                f"under {job.progress.rule.describe()}"))
        for name, slot in self._slots.items():
            proc = slot.process
            if (
                slot.lifecycle.state is State.RUNNING
                and slot.failures
                and proc is not None
                and now - proc.started < FLAP_WINDOW
            ):
                # Up again, but for so short a time that it is not yet a recovery.
                out.append(f"plugin {name} restarted {slot.restarts} times; "
                           f"its last run {slot.last_exit}")
            elif slot.lifecycle.live and slot.lifecycle.state is not State.RUNNING:
                out.append(f"plugin {name} is down ({slot.last_exit or 'starting'})")
            elif not slot.lifecycle.live and not slot.stop_requested.is_set():
                # Its slot ended on a defect; the next sync starts it afresh.
                out.append(f"plugin {name} is down ({slot.last_exit})")
        return out

    def waited(self, now: float) -> dict[str, float]:
        """Seconds each running plugin has waited for the record budget so far (`HoldBack`)."""
        return {name: slot.counters.waited(now)
                for name, slot in self._slots.items() if slot.process is not None}

    def heartbeats(self) -> list[bytes]:
        """One encoded 1001 Record per running plugin, rates since the previous call."""
        now = time.monotonic()
        out = []
        for name, slot in self._slots.items():
            proc = slot.process
            if proc is None:
                continue
            if slot.sampler is None or slot.sampler.pid != proc.pid:
                try:
                    slot.sampler = ProcessGroupSampler([psutil.Process(proc.pid)])
                except psutil.Error:
                    continue
            c = slot.counters
            since, base = slot.rate_base
            elapsed = max(now - since, 1e-9)
            sample = slot.sampler.sample()
            cgroup_extra: dict[str, int | float] = {}
            if slot.cgroup is not None:
                sample, cgroup_extra = self._cgroup_figures(slot, sample, now)
            fields = build_plugin_heartbeat(
                name=name,
                version=slot.spec.version,
                process=sample,
                du=self._usage.get(name, 0),
                rx_speed=(c.rx_bytes - base.rx_bytes) / elapsed,
                tx_speed=(c.tx_bytes - base.tx_bytes) / elapsed,
                rx_tps=(c.rx_frames - base.rx_frames) / elapsed,
                tx_tps=(c.tx_tasks - base.tx_tasks) / elapsed,
                extra={
                    "restarts": slot.restarts,
                    "malformed_frames": c.malformed,
                    "too_large_frames": c.too_large,
                    "backpressure_seconds": c.backpressure_seconds,
                    "task_queue": proc.tasks.qsize(),
                    "stderr_truncations": c.stderr.truncations,
                    "stderr_dropped_bytes": c.stderr.dropped_bytes,
                    "stderr_write_failures": c.stderr.write_failures,
                    **cgroup_extra,
                },
            )
            slot.rate_base = (now, replace(c))
            out.append(encode_record(PLUGIN_HEARTBEAT, int(time.time()), fields))
        return out

    def states(self) -> list[dict[str, str | int]]:
        """Each plugin's state and counters (metrics, the heartbeat ring, diagnostics)."""
        return [
            {
                "name": name,
                "version": slot.spec.version,
                "state": str(slot.lifecycle.state.value),
                "pid": slot.process.pid if slot.process is not None else 0,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                "rx_frames": slot.counters.rx_frames,
                "malformed_frames": slot.counters.malformed,
                "too_large_frames": slot.counters.too_large,
            }
            for name, slot in self._slots.items()
        ]

    def _cgroup_figures(
        self, slot: _Slot, sample: ProcSample, now: float
    ) -> tuple[ProcSample, dict[str, int | float]]:
        """CPU, memory and process figures from the plugin's cgroup (the whole plugin, its
        descendants included), with its OOM kills and CPU throttling."""
        assert slot.cgroup is not None
        try:
            usage = slot.cgroup.usage()
        except OSError:  # the cgroup is gone (removed by hand): the process figures stand
            return sample, {}
        if usage.cpu_seconds is not None:
            if slot.cpu_base is not None and now > slot.cpu_base[0]:
                was, seconds = slot.cpu_base
                cpu = max(0.0, usage.cpu_seconds - seconds) / (now - was)
                sample = msgspec.structs.replace(sample, cpu=cpu)
            slot.cpu_base = (now, usage.cpu_seconds)
        if usage.memory_bytes is not None:
            sample = msgspec.structs.replace(sample, rss=usage.memory_bytes)
        return sample, _usage_fields(usage)

    def slot_info(self, name: str) -> tuple[State, int, Counters, int | None] | None:
        """(state, restarts, counters, pid) of a plugin, for status displays and tests."""
        slot = self._slots.get(name)
        if slot is None:
            return None
        pid = slot.process.pid if slot.process is not None else None
        return slot.lifecycle.state, slot.restarts, slot.counters, pid

    async def _walk_usage(self) -> None:
        """Refresh `_usage` in a worker thread: a plugin's directory holds whatever it writes,
        and walking it on the loop at each heartbeat stalled every pipe meanwhile."""
        while True:
            directories = {name: slot.directory for name, slot in self._slots.items()}
            walks = await asyncio.to_thread(_usage_of, directories)
            self._usage = {name: walk.total for name, walk in walks.items()}
            stopped = [walk.stopped for walk in walks.values() if walk.stopped]
            if stopped:
                self.health.fault("plugin disk usage", "; ".join(stopped), WALK_CAP_COUNTER)
            else:
                self.health.clear("plugin disk usage")
            await asyncio.sleep(self.usage_max_age)

    # -- sync steps -----------------------------------------------------------------------------

    def _installed(self) -> list[str]:
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return [p.name for p in entries if p.is_dir() and install.valid_name(p.name)]

    async def _forget_stopped(self) -> None:
        """Drop slots told to stop by a sync that was cancelled before it could finish."""
        for name, slot in list(self._slots.items()):
            if not slot.lifecycle.live:
                await self._stop_slot(slot)
                del self._slots[name]

    async def _remove(self, name: str) -> None:
        slot = self._slots.get(name)
        if slot is not None:
            await self._stop_slot(slot)
            del self._slots[name]
        directory = self.root / name
        if directory.exists():
            await asyncio.to_thread(remove_tree, directory)
        log.info("plugin %s removed", name)

    def _launch(self, spec: ConfigSpec) -> None:
        if self._tg is None:
            raise install.InstallError("the supervisor is not running")
        progress = Progress(self.download_rule, on_abandon=partial(self._abandoned, spec.name))
        job = _Install(spec, progress)
        self._installs[spec.name] = job
        job.task = self._tg.create_task(self._install(job), name=f"install-{spec.name}")

    def _abandoned(self, name: str, reason: str) -> None:
        log.error("plugin %s: download abandoned: %s", name, reason)
        self.health.count("downloads_abandoned")
        self._notify()

    async def _cancel_installs(self, names: Iterable[str]) -> None:
        """Cancel installs a newer set changed or removed, and wait until they have ended
        (their partial files removed) before anything else touches their directories."""
        jobs = [self._installs.pop(name) for name in names]
        tasks = [job.task for job in jobs if job.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for job in jobs:
            log.info("plugin %s: install of %s cancelled, a newer set changed or removed it",
                     job.spec.name, job.spec.version)

    async def _install(self, job: _Install) -> None:
        """One entry's install: the unit of failure of one Config entry."""
        spec = job.spec
        try:
            await self._install_and_start(job)
        except Exception as exc:  # noqa: BLE001 - the boundary of one entry
            reason = f"plugin {spec.name}: {_reason(exc)}"
            log.error("sync: %s", reason)
            self.health.count("plugin_sync_failures")
            if isinstance(exc, UnsafeArchive) and exc.counter is not None:
                self.health.count(exc.counter)
            if isinstance(exc, install.SignatureRefused):
                self.health.count(REFUSED_COUNTER)
            self._entry_errors[spec.name] = _cut(reason)
        finally:
            if self._installs.get(spec.name) is job:
                del self._installs[spec.name]
            self._notify()

    async def _install_and_start(self, job: _Install) -> None:
        spec = job.spec
        directory = self.root / spec.name
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        await asyncio.to_thread(install.clean_leftovers, directory)
        # Built per install, so a host CA store updated meanwhile is seen; in a thread, as
        # reading and parsing the bundle takes tens of milliseconds.
        https = any(u.startswith("https:") for u in spec.download_urls)
        context = await asyncio.to_thread(self.ssl_context_factory) if https else None
        staged = await install.prepare(
            directory,
            spec,
            max_bytes=self.config.download_max_bytes,
            ssl_context=context,
            timeout=self.download_timeout,
            verifier=self.verifier,
            progress=job.progress,
        )
        if staged is not None and staged.signature_warning is not None:
            self.health.count(WARNED_COUNTER)
        try:
            # Under the sync lock: a sync never sees a plugin half swapped.
            async with self._sync_lock:
                job.committing = True
                old = self._slots.get(spec.name)
                if old is not None:
                    await self._stop_slot(old)
                    del self._slots[spec.name]
                if self._closing:
                    return
                if staged is not None:
                    # Renames and, for an archive replacing a directory, rmtree: off the loop,
                    # and to its end even when cancelled (the agent torn down), or `discard`
                    # below would remove the staged files while the thread still moves them.
                    await run_to_end(partial(install.commit, staged, spec.name))
                    staged = None
                self._start_slot(spec, directory)
        finally:
            if staged is not None:
                await asyncio.to_thread(install.discard, staged)
        log.info("plugin %s %s started", spec.name, spec.version)

    def _start_slot(self, spec: ConfigSpec, directory: Path) -> None:
        if self._tg is None:
            raise install.InstallError("the supervisor is not running")
        slot = _Slot(spec, directory)
        slot.lifecycle.on_change = lambda old, new: self._on_change(spec.name, old, new)
        self._slots[spec.name] = slot
        slot.task = self._tg.create_task(self._run_slot(slot), name=f"plugin-{spec.name}")

    async def _stop_slot(self, slot: _Slot) -> None:
        slot.request_stop()
        if slot.task is not None:
            await asyncio.wait((slot.task,))

    # -- one slot's life ------------------------------------------------------------------------

    async def _run_slot(self, slot: _Slot) -> None:
        name = slot.spec.name
        lifecycle = slot.lifecycle
        try:
            await self._serve_slot(slot)
        except Exception as exc:  # the boundary of one plugin: its defect ends only its slot
            slot.last_exit = f"supervision failed: {exc!r}"
            log.exception("plugin %s: supervision failed", name)
            self.health.count("plugin_errors")
        finally:
            try:
                if slot.cgroup is not None:
                    await self._drop_cgroup(slot.cgroup)
                    slot.cgroup = None
            finally:
                if lifecycle.live:
                    lifecycle.fire(Event.STOP)
                lifecycle.fire(Event.REAPED)

    async def _serve_slot(self, slot: _Slot) -> None:
        """Spawn, serve, back off, restart, until the slot is told to stop."""
        name = slot.spec.name
        extra = {HIGH_PRIORITY_ENV: "1"}
        if slot.spec.detail:
            extra["DETAIL"] = slot.spec.detail
        env = child_env(extra=extra)
        if not slot.spec.detail:
            env.pop("DETAIL", None)  # the agent's own environment must not speak for the config
        lifecycle = slot.lifecycle
        while lifecycle.live:
            oom_before = 0
            try:
                tag = None
                if self.cgroups is not None:
                    memory, cpu, weight, pids = self.config.limits_of(name)
                    limits = Limits(memory, cpu, weight, pids)
                    slot.cgroup = self.cgroups.create(name, limits)
                    oom_before = slot.cgroup.usage().oom_kills or 0
                else:
                    tag = f"{name}.{secrets.token_hex(8)}"
                process = PluginProcess.spawn(
                    name,
                    slot.directory,
                    env,
                    buffer=self.buffer,
                    counters=slot.counters,
                    max_frame=self.config.max_frame_bytes,
                    task_queue=self.config.task_queue,
                    stderr_max_bytes=self.config.stderr_max_bytes,
                    on_stderr_truncate=self._stderr_truncated,
                    cgroup=slot.cgroup,
                    tag=tag,
                )
            except Exception as exc:  # noqa: BLE001 - one spawn (OSError, ValueError: NUL)
                slot.last_exit = f"cannot start: {exc}"
                log.error("plugin %s: %s", name, slot.last_exit)
                self.health.count("plugin_spawn_failures")
                slot.failures = failures_after_run(slot.failures, 0.0)
                lifecycle.fire(Event.SPAWN_FAILED)
            else:
                slot.process = process
                slot.rate_base = (process.started, replace(slot.counters))
                self._save_groups()
                lifecycle.fire(Event.SPAWNED)
                try:
                    outcome = await process.serve(slot.stop_requested)
                except Exception as exc:  # one run: serve() has killed and reaped the child
                    log.exception("plugin %s: serving failed", name)
                    self.health.count("plugin_errors")
                    ran = time.monotonic() - process.started
                    outcome = Outcome(f"serving failed: {exc!r}", ran)
                finally:
                    slot.process = None
                    self._save_groups()
                if not lifecycle.live:
                    break
                if slot.cgroup is not None:
                    outcome = self._oom_outcome(slot.cgroup, outcome, oom_before)
                slot.last_exit = exit_with_stderr(
                    outcome.reason, stderr_path(slot.directory, name)
                )
                slot.failures = failures_after_run(slot.failures, outcome.run_seconds)
                log.error("plugin %s %s", name, outcome.reason)
                lifecycle.fire(Event.EXITED)
            delay = backoff_delay(slot.failures)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await slot.stop_requested.wait()
            if not lifecycle.live:
                break
            slot.restarts += 1
            lifecycle.fire(Event.BACKOFF_ELAPSED)

    def _stderr_truncated(self) -> None:
        """Called from a plugin's stderr thread: counted on the loop's thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
                loop.call_soon_threadsafe(self.health.count, "plugin_stderr_truncations")

    def _oom_outcome(
        self, cgroup: cgroupfs.PluginCgroup, outcome: Outcome, before: int
    ) -> Outcome:
        """The run's outcome, saying so when the OOM killer ended it at its memory limit."""
        try:
            usage = cgroup.usage()
        except OSError:
            return outcome
        if usage.oom_kills is None or usage.oom_kills <= before:
            return outcome
        self.health.count("plugin_oom_kills", usage.oom_kills - before)
        limit = f" of {usage.memory_limit} bytes" if usage.memory_limit else ""
        return replace(
            outcome, reason=f"{outcome.reason} by the OOM killer at its memory limit{limit}"
        )

    async def _drop_cgroup(self, cgroup: cgroupfs.PluginCgroup) -> None:
        """Kill what may be left in a slot's cgroup, and remove it, off the loop (a leftover
        is counted, and swept at stop or the next start)."""
        try:
            removed = await run_to_end(cgroup.drop)
        except OSError as exc:
            log.warning("plugin %s: cgroup not removed: %s", cgroup.name, exc)
            removed = False
        if not removed:
            self.health.count("plugin_cgroup_leftovers")

    def _on_change(self, name: str, old: State, new: State) -> None:
        log.debug("plugin %s: %s -> %s", name, old.value, new.value)
        self._notify()

    def _notify(self) -> None:
        if self.on_state is not None:
            self.on_state()

    def _save_groups(self) -> None:
        records = []
        for slot in self._slots.values():
            if slot.process is not None:
                record = orphans.record_for(slot.process.pid, slot.directory)
                if record is not None:
                    records.append(record)
        orphans.save(self.root / orphans.PGIDS_FILE, records, self.health)


def _usage_fields(usage: Usage) -> dict[str, int | float]:
    """The 1001's extra fields from a plugin cgroup (the ones it has)."""
    named: dict[str, int | float | None] = {
        "oom_kills": usage.oom_kills,
        "cpu_throttled_periods": usage.throttled_periods,
        "cpu_throttled_seconds": usage.throttled_seconds,
        "procs": usage.procs,
        "memory_limit": usage.memory_limit,
    }
    return {k: v for k, v in named.items() if v is not None}
