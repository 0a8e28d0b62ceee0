"""The agent process: wires the parts under one TaskGroup; startup and orderly shutdown.

Task ownership (all children of `Agent.run`'s TaskGroup):
  transfer   TransferLoop.run: discover, stream, reconnect
  heartbeat  every interval (and on each new stream, via TransferLoop.on_open), watchdog
             ticks in turn; owns the work dir's usage walk (a worker thread, once a minute)
  uploads    Uploader.run: one 1050 at a time
  configs    Dispatcher.run_configs: each Config set in a task, the newest supersedes
  plugins    PluginSupervisor.run (its own TaskGroup per plugin)
  upgrade    UpgradeManager.run: one self-upgrade attempt at a time; the confirmation bound
  spool      Spool.run: the spool's disk writer (segments, checkpoint, fsync, bounds)
  spooler    spool.pump.run_spooler: memory chunks to the spool while disconnected or full
  shutdown   waits for SIGTERM/SIGINT/1060, stops plugins first, flushes, then ends the group;
             what is still in memory then goes to the spool, durably, before the process ends
  trim       once, when start-up is over: gives start-up-only memory back (memory.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import msgspec
import psutil

from elkeid_agent import heartbeat as hb
from elkeid_agent import metrics, specified_env
from elkeid_agent.buffer import RecordBuffer
from elkeid_agent.commands import ConfigSpec, Dispatcher, MetadataRequest, UploadRequest
from elkeid_agent.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    ignored_region,
    load_run_config,
    work_dir_hint,
)
from elkeid_agent.errors import TaskFailed
from elkeid_agent.fsutil import describe_error
from elkeid_agent.health import Health
from elkeid_agent.heartbeat_ring import RING_FILE, HeartbeatRing, write_ring
from elkeid_agent.holdback import HoldBack
from elkeid_agent.host import HostFacts, read_host_facts
from elkeid_agent.identity import ID_FILE_UNIT, load_agent_id, save_agent_id
from elkeid_agent.logs import LogFileHandler, RecordHandler, setup_logging
from elkeid_agent.memory import limit_arenas, trim_after_start, trim_heap
from elkeid_agent.plugins import lastset
from elkeid_agent.plugins.supervisor import PluginSupervisor
from elkeid_agent.redact import redact
from elkeid_agent.runtime_dir import clean_stale_unpack_dirs
from elkeid_agent.service import Notifier, dump_tasks, release_memory, watchdog_interval
from elkeid_agent.signing.check import verifier_from
from elkeid_agent.spool.pump import run_spooler, spill_all
from elkeid_agent.spool.store import Spool, SpoolState
from elkeid_agent.status import STATUS_FILE, AgentStatus, write_status
from elkeid_agent.timers import Job, run_every
from elkeid_agent.transport.stream import TransferLoop
from elkeid_agent.transport.tls import TlsError, TlsMaterial
from elkeid_agent.transport.upload import Uploader
from elkeid_agent.upgrade.manager import (
    StartupResult,
    UpgradeManager,
    check_pending_upgrade,
    settings_from,
)
from elkeid_agent.upgrade.state import UpgradeState
from elkeid_agent.version import PRODUCT, VERSION
from elkeid_agent.wire import Header, encode_record
from elkeid_agent.workers import use_fixed_pool

log = logging.getLogger(__name__)

AGENT_HEARTBEAT = 1000
# How long shutdown waits for queued records (the 1060 result among them) to leave.
FLUSH_ON_EXIT_SECONDS = 3.0
TRIM_AFTER_SECONDS = 10.0
# How long shutdown waits for the server to end the half-closed stream (it has then read
# every message written).
FINISH_STREAM_SECONDS = 2.0
# sysexits EX_TEMPFAIL: the start-up check restored the previous executable; the service
# manager's restart runs it.
EX_ROLLED_BACK = 75
WORK_SUBDIRS = ("plugin", "log", "tmp")
# Health units of the agent's own files; each fault names the path and the errno.
STATUS_UNIT = "status file"
LOG_UNIT = "log file"
WORK_DIR_UNIT = "work dir"
SPECIFIED_ENV_UNIT = "specified_env file"
REGION_UNIT = "specified_region"
FACTS_UNIT = "host facts"
RING_UNIT = "heartbeat ring"
# How long a heartbeat waits for its ring or metrics file write.
BEAT_FILE_SECONDS = 10.0
# How long a heartbeat waits for the host facts before it goes out with the last ones.
FACTS_SECONDS = 5.0
METRICS_UNIT = "metrics file"


class _Stop(Exception):
    """Raised by the shutdown task to end the TaskGroup once everything is stopped."""


class Agent:
    def __init__(
        self,
        config: Config,
        tls: TlsMaterial,
        env: dict[str, str],
        startup: StartupResult | None = None,
        log_file: LogFileHandler | None = None,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self.work_dir = config.work_path
        self.env = env
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.buffer = RecordBuffer(config.buffer.max_bytes, config.buffer.agent_lane_bytes)
        self.stopping = asyncio.Event()
        self.health = Health()
        self.log_file = log_file
        self.notifier = Notifier(env, self.health)
        make_work_dirs(self.work_dir, self.health)  # first: it makes the work dir itself
        stale = ignored_region(config, env)
        if stale:
            self.health.fault(REGION_UNIT, f"{stale!r} names no [regions.{stale}] in the "
                              f"config: region {config.region!r} used")
        self.agent_id = load_agent_id(Path("/"), self.work_dir, env, self.health)
        self.facts = read_host_facts()
        self._header = self._encode_header(self.facts)
        self.errors: dict[str, str] = {}
        self.plugins = PluginSupervisor(
            self.work_dir, self.buffer, config.plugins, health=self.health
        )
        verifier = verifier_from(config.signing)
        self.plugins.verifier = verifier
        log.info("signing policy %s, %d pinned key(s)", verifier.policy, len(verifier.keys))
        self.upgrader = UpgradeManager(
            self.work_dir,
            emit=self.emit,
            errors=self.errors,
            request_exit=lambda: self.request_stop("restart for a self-upgrade"),
            startup=startup or StartupResult(False, UpgradeState.IDLE),
            env=env,
            settings=settings_from(config.upgrade),
            config_path=config_path,
            verifier=verifier,
            count=self.health.count,
            download_rule=self.plugins.download_rule,
            health=self.health,
        )
        self.dispatcher = Dispatcher(
            self, self.plugins, self.upgrader, self.emit, health=self.health
        )
        self.dispatcher.on_applied = self._save_plugin_configs
        self.spool = Spool(self.work_dir, config.spool, self.health)
        spool = self.spool
        # The spool's queue of bytes not yet on disk is memory too: one budget with the
        # buffer (what `room` leaves out of its bound besides the files). Its writer joins
        # that queue into one write, a copy the budget cannot see: a quarter of it at most.
        spool.core.max_unwritten = min(spool.core.max_unwritten, config.buffer.max_bytes // 4)
        self.buffer.count_also(lambda: spool.config.max_bytes - spool.disk_bytes() - spool.room)
        # Set when the stream ends or a connection attempt fails: wakes the spooler.
        self._link_down = asyncio.Event()
        self._status_due: AgentStatus | None = None
        self._status_wake = asyncio.Event()
        self._trimmed_after = 0
        self.transfer = TransferLoop(
            config, tls, self.buffer, self.header, self.dispatcher.handle, self.send_heartbeat,
            on_down=self._on_link_down,
            spool=self.spool if config.spool.enabled else None,
        )
        self.uploader = Uploader(lambda: self.transfer.channel, self.emit, health=self.health)
        self.record_handler = RecordHandler(self.emit, config.log.records_per_minute)
        self._own_processes = hb.agent_processes()
        self._sampler = hb.ProcessGroupSampler(self._own_processes)
        self._cpu = hb.CpuUsageSampler()
        self._usage = hb.DirUsage(self.work_dir, "plugin", health=self.health)
        self.holdback = HoldBack(self.buffer.max_bytes)
        self._facts_read: asyncio.Future[HostFacts] | None = None
        self._last_tick = time.monotonic()
        self._last_stats = (0, 0, 0, 0)
        self._last_beat: tuple[dict[str, str], int] | None = None
        self._ring = HeartbeatRing()
        self._file_writes: dict[str, asyncio.Future[None]] = {}
        self.last_heartbeat = 0.0
        self.exit_reason = ""
        self._started = psutil.Process().create_time()
        # A plugin's start, exit or restart shows in `ctl status` at once, not a heartbeat later.
        self.plugins.on_state = self._write_status

    # -- records --------------------------------------------------------------------------------

    def emit(self, record: bytes) -> None:
        """Queue one of the agent's own records, from any thread."""
        if threading.get_ident() == self._loop_thread:
            self.buffer.put_agent(record)
        else:
            self.loop.call_soon_threadsafe(self.buffer.put_agent, record)

    def header(self) -> bytes:
        return self._header

    def _encode_header(self, facts: HostFacts) -> bytes:
        ips = facts.ips
        return Header(
            agent_id=self.agent_id,
            intranet_ipv4=ips.intranet_ipv4,
            extranet_ipv4=ips.extranet_ipv4,
            intranet_ipv6=ips.intranet_ipv6,
            extranet_ipv6=ips.extranet_ipv6,
            hostname=facts.hostname,
            version=VERSION,
            product=PRODUCT,
        ).encode()

    def state_detail(self) -> list[str]:
        link = self.transfer.state
        connection = [] if link.connected else [f"connection: {e}" for e in link.dial_errors]
        tls = [f"tls: {self.transfer.tls_problem}"] if self.transfer.tls_problem else []
        return [
            redact(d) for d in (
                *connection, *tls, *self.errors.values(), *self.upgrader.waiting(),
                *self.health.details(), *self.plugins.errors(),
            )
        ]

    def warnings(self) -> list[str]:
        """What needs attention soon without being a fault (state stays running)."""
        expiry = self.transfer.tls.expiry_warning(datetime.datetime.now(datetime.UTC))
        return [
            w for w in (expiry, self.plugins.limits_warning, self.spool.damage_warning,
                        self.holdback.warning()) if w
        ]

    def counters(self) -> dict[str, int | float]:
        b = self.buffer.snapshot()
        t = self.transfer.state.stats
        return {
            "buffer_records": b.queued_records,
            "buffer_bytes": b.queued_bytes,
            "buffer_max_bytes": self.buffer.max_bytes,
            "dropped_agent_overflow": b.dropped_agent_overflow,
            "dropped_oversize": b.dropped_oversize,
            "backpressure_waits": b.backpressure_waits,
            "backpressure_seconds": round(b.backpressure_seconds, 3),
            "in_flight_bytes": b.in_flight_bytes,
            "partial_frame_bytes": b.partial_bytes,
            "trail_bytes": b.sent_kept_bytes,
            "peak_budget_bytes": b.peak_budget_bytes,
            "tx_records": t.tx_records,
            "tx_bytes": t.tx_bytes,
            "connects": t.connects,
            "connect_failures": t.connect_failures,
            "write_failures": t.write_failures,
            "log_records_suppressed": self.record_handler.suppressed,
            "command_failures": self.dispatcher.failures,
            "uploads_completed": self.uploader.completed,
            "uploads_failed": self.uploader.failed,
            # Everything the agent holds under its work dir (plugins, spool, logs), as of the
            # last walk; `du` leaves the plugins out, as the Go agent's does.
            "work_dir_bytes": self._usage.total,
            **self.spool.counters(),
            **self.health.counters,
        }

    def send_heartbeat(self) -> None:
        """One heartbeat, a unit of failure: a failing build is logged and counted, and the
        next one is tried on time (the loop, and the stream's announcement, go on)."""
        try:
            self._queue_heartbeat()
        except Exception as exc:  # the boundary of one heartbeat
            log.error("heartbeat not sent", exc_info=exc)
            self.health.fault("heartbeat", f"heartbeat not sent: {exc!r}", "heartbeat_errors")
        else:
            self.health.clear("heartbeat")

    def _queue_heartbeat(self) -> None:
        """Queue a 1000 record (and the plugins' 1001s) and refresh the status file.

        Reads nothing slow: host facts and the directory usage are refreshed off the loop
        (`_beat`, `DirUsage`). Retries the agent's own files that had failed, so their faults
        clear by themselves once the disk takes writes again.
        """
        self._check_own_files()
        now = time.monotonic()
        self.holdback.update(now, self.plugins.waited(now))
        elapsed = max(now - self._last_tick, 1e-9)
        stats = self.transfer.state.stats
        if self.transfer.state.connected and stats.tx_messages:
            # A stream is open and has carried this process's first heartbeat.
            self.upgrader.confirm()
        self.upgrader.recheck_hold()
        current = (stats.tx_bytes, stats.tx_records, stats.rx_bytes, stats.rx_commands)
        tx_bytes, tx_records, rx_bytes, rx_commands = (
            c - p for c, p in zip(current, self._last_stats, strict=True)
        )
        self._last_tick, self._last_stats = now, current
        facts = self.facts
        self.last_heartbeat = time.time()
        self._write_status()
        detail = self.state_detail()
        process = self._sampler.sample()
        fields = hb.build_agent_heartbeat(
            facts=facts,
            process=process,
            stats=hb.host_stats(self._cpu),
            state="abnormal" if detail else "running",
            state_detail=detail,
            idc=self.config.idc,
            region=self.config.region,
            net_mode=str(self.transfer.state.net_mode),
            rx_speed=rx_bytes / elapsed,
            tx_speed=tx_bytes / elapsed,
            rx_tps=rx_commands / elapsed,
            tx_tps=tx_records / elapsed,
            du=self._usage.bytes,
            ngr=len(asyncio.all_tasks()) + threading.active_count(),
            extra=self.counters(),
        )
        fields["upgrade_state"] = self.upgrader.state
        fields["upgrade_error"] = self.upgrader.last_error
        warnings = self.warnings()
        fields["warnings"] = "; ".join(warnings)
        not_after = self.transfer.tls.not_after
        fields["tls_cert_not_after"] = str(int(not_after.timestamp())) if not_after else ""
        fields["upgrade_hold"] = self.upgrader.hold
        fields["upgrade_held_version"] = self.upgrader.held_version
        fields["spool_state"] = str(self.spool.state)
        fields = {key: redact(value) for key, value in fields.items()}
        self._last_beat = (fields, process.rss)
        timestamp = int(time.time())
        self.buffer.put_agent(encode_record(AGENT_HEARTBEAT, timestamp, fields))
        for record in self.plugins.heartbeats():
            self.buffer.put_agent(record)

    def _on_link_down(self) -> None:
        self._link_down.set()
        self._write_status()
        connects = self.transfer.state.stats.connects
        if connects != self._trimmed_after:
            # Once per stream, not per failed dial: the stream's buffers were just freed.
            self._trimmed_after = connects
            trim_heap()

    def _write_status(self) -> None:
        """Queue status.json's refresh (each heartbeat, link up/down): the status is taken now,
        on the loop; `_status_writer` writes the latest one in a thread."""
        self._status_due = self._status()
        self._status_wake.set()

    async def _status_writer(self) -> None:
        """The one writer of status.json while the agent runs (file I/O off the loop)."""
        while True:
            await self._status_wake.wait()
            self._status_wake.clear()
            status, self._status_due = self._status_due, None
            if status is not None:
                await self._store_status(status)

    async def _store_status(self, status: AgentStatus) -> None:
        try:
            await asyncio.to_thread(write_status, self.work_dir, status)
        except OSError as exc:
            reason = "cannot write: " + describe_error(self.work_dir / STATUS_FILE, exc)
            self.health.fault(STATUS_UNIT, reason, "status_write_failures")
        else:
            self.health.clear(STATUS_UNIT)

    def _status(self, state: str = "") -> AgentStatus:
        link = self.transfer.state
        # The file's own fault is left out: the state it records holds once it is written.
        own = f"{STATUS_UNIT}: "
        detail = [d for d in self.state_detail() if not d.startswith(own)]
        return AgentStatus(
            pid=os.getpid(),
            version=VERSION,
            state=state or ("abnormal" if detail else "running"),
            net_mode=str(link.net_mode),
            connected=link.connected,
            server=link.server,
            last_heartbeat=self.last_heartbeat,
            updated=time.time(),
            upgrade_state=self.upgrader.state,
            upgrade_hold=self.upgrader.hold,
            upgrade_held_version=self.upgrader.held_version,
            warnings=self.warnings(),
            started=self._started,
            connected_since=link.connected_since if link.connected else 0.0,
            detail=detail,
            exit_reason=redact(self.exit_reason),
            spool_state=str(self.spool.state),
            spool_records=self.spool.records,
            spool_bytes=self.spool.held_bytes,
            spool_oldest_seconds=round(self.spool.oldest_seconds(), 1),
            spool_dropped_records=self.spool.stats.dropped_records,
            plugin_limits=self.plugins.limits_state,
        )

    def _check_own_files(self) -> None:
        """Faults of the log file, the work dir and the machine-id, retried each heartbeat."""
        log_file = self.log_file
        if log_file is not None:
            # First: a file deleted under its descriptor is closed here, so the next line
            # (the one below, if the work dir went) makes it again.
            log_file.retry()
        faulty = self.health.faulty(WORK_DIR_UNIT) or self.health.faulty(STATUS_UNIT)
        # A work dir removed under the agent: the log handler makes `log/` again at its next
        # line, and status.json may then be written with no fault seen; `plugin/` and `tmp/`
        # must not wait for one (three stats a beat).
        # os.path.isdir: False on any error, where Path.is_dir raises some (EACCES).
        missing = [sub for sub in WORK_SUBDIRS if not os.path.isdir(self.work_dir / sub)]
        if missing and not faulty:
            log.warning("work dir: %s missing: made again", ", ".join(missing))
            self.health.count("work_dirs_remade")
        if missing or faulty:
            make_work_dirs(self.work_dir, self.health)
        if self.health.faulty(ID_FILE_UNIT):
            save_agent_id(Path("/"), self.work_dir, self.agent_id, self.health)
        if log_file is None:
            return
        for counter, value in (
            ("log_write_failures", log_file.failed_writes),
            ("log_rotation_failures", log_file.rotation_failures),
            ("log_stderr_dropped", log_file.stderr_dropped),
            ("log_lines_over_cap", log_file.over_cap),
        ):
            self.health.count(counter, value - self.health.counters[counter])
        if log_file.error is not None:
            self.health.fault(LOG_UNIT, "cannot write: " + log_file.error)
        else:
            self.health.clear(LOG_UNIT)

    def request_stop(self, reason: str) -> None:
        """Begin the orderly shutdown; the first reason is the one status.json keeps."""
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.stopping.set()

    async def _save_plugin_configs(self, configs: Sequence[ConfigSpec]) -> None:
        try:
            await asyncio.to_thread(lastset.save, self.work_dir, configs)
        except OSError as exc:
            self.health.fault("plugin-configs", f"cannot persist the plugin set: {exc}")
        else:
            self.health.clear("plugin-configs")

    # -- the agent's own tasks (commands.AgentTasks) ---------------------------------------------

    async def upload(self, token: str, request: UploadRequest) -> None:
        await self.uploader.upload(token, request)

    async def set_metadata(self, request: MetadataRequest) -> None:
        values: dict[str, str] = {}
        if request.region is not None:
            if request.region not in self.config.regions:
                raise TaskFailed(f"unknown region {request.region!r}: no servers configured")
            values["specified_region"] = request.region
        if request.idc is not None:
            values["specified_idc"] = request.idc
        if not values:
            raise TaskFailed("neither idc nor region given")
        try:
            # Durable (fsync): off the loop, where a slow disk cannot stall everything else.
            await asyncio.to_thread(specified_env.write, self.work_dir, values)
        except ValueError as exc:
            raise TaskFailed(f"cannot persist metadata: {exc}") from exc
        except OSError as exc:
            reason = "cannot write: " + describe_error(self.work_dir / specified_env.FILE_NAME, exc)
            self.health.fault(SPECIFIED_ENV_UNIT, reason)
            raise TaskFailed(f"cannot persist metadata: {reason}") from exc
        self.health.clear(SPECIFIED_ENV_UNIT)
        if request.region is not None:
            self.health.clear(REGION_UNIT)  # the stale one is replaced on disk
        self.config = msgspec.structs.replace(
            self.config,
            idc=request.idc if request.idc is not None else self.config.idc,
            region=request.region if request.region is not None else self.config.region,
        )
        self.transfer.config = self.config
        log.info("metadata set: idc=%s region=%s", self.config.idc, self.config.region)

    async def shutdown(self) -> None:
        log.info("shutdown requested by the server")
        self.request_stop("shutdown task (1060) from the server")

    # -- life -----------------------------------------------------------------------------------

    async def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        self.loop.add_signal_handler(signal.SIGUSR2, release_memory)
        logging.getLogger().addHandler(self.record_handler)
        await self.spool.open()
        self.dispatcher.offline_configs = lastset.load(self.work_dir)
        await self._store_status(self._status("starting"))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.transfer.run(), name="transfer")
                tg.create_task(self._heartbeat_loop(), name="heartbeat")
                tg.create_task(self.uploader.run(), name="uploads")
                tg.create_task(self.dispatcher.run_configs(), name="configs")
                tg.create_task(self.plugins.run(), name="plugins")
                tg.create_task(self.upgrader.run(), name="upgrade")
                if self.config.spool.enabled:
                    tg.create_task(self.spool.run(), name="spool")
                    tg.create_task(
                        run_spooler(self.spool, self.buffer,
                                    lambda: self.transfer.state.connected, self._link_down),
                        name="spooler",
                    )
                tg.create_task(self._shutdown_when_asked(), name="shutdown")
                tg.create_task(self._trim_when_settled(), name="trim")
                tg.create_task(self._status_writer(), name="status")
                self.notifier.send("READY=1")
                log.info("elkeid-agent %s started, id %s", VERSION, self.agent_id)
        except* _Stop:
            pass
        finally:
            try:
                await self._keep_unsent()
            except Exception:  # the boundary of the last unit: the exit below must still happen
                log.exception("records still in memory not spooled")
            logging.getLogger().removeHandler(self.record_handler)
            self.exit_reason = self.exit_reason or "ended by an error (see the log)"
            await self._store_status(self._status("stopped"))
            self.notifier.close()
        log.info("elkeid-agent stopped: %s", self.exit_reason)

    async def _heartbeat_loop(self) -> None:
        interval = self.config.transport.heartbeat_interval
        watchdog = watchdog_interval(self.env, {p.pid for p in self._own_processes})
        jobs: list[tuple[float, Job]] = [(interval, self._beat)]
        if watchdog:
            jobs.append((watchdog, self._watchdog_tick))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._usage.run(), name="dir usage")
            await run_every(jobs)

    async def _beat(self) -> None:
        # Host facts walk /sys, /proc and the interfaces (~3 ms idle, more under load). Part of
        # the heartbeat's unit: when they cannot be read (psutil needs an fd for the interfaces)
        # the beat goes out with the last facts.
        # Waited for FACTS_SECONDS at most, one read at a time: the worker threads are a fixed
        # few (workers.py) that calls stuck on a hung filesystem can all hold.
        pending = self._facts_read
        if pending is None:
            pending = self._facts_read = self.loop.run_in_executor(None, read_host_facts)
        await asyncio.wait({pending}, timeout=FACTS_SECONDS)
        if not pending.done():
            self.health.fault(FACTS_UNIT, f"not read within {FACTS_SECONDS:g} s (every worker "
                              "thread busy?)", "host_facts_errors")
        else:
            self._facts_read = None
            try:
                facts = pending.result()
            except Exception as exc:  # noqa: BLE001 - the boundary of one heartbeat
                self.health.fault(FACTS_UNIT, f"cannot read: {exc!r}", "host_facts_errors")
            else:
                self.health.clear(FACTS_UNIT)
                if facts != self.facts:
                    self.facts = facts
                    self._header = self._encode_header(facts)
        self.send_heartbeat()
        await self._write_beat_files()

    async def _write_beat_files(self) -> None:
        """The heartbeat ring (for diagnostics) and the metrics textfile, each a unit of
        failure of its own (a fault and a counter, never the beat). Written in a worker thread
        and waited for at most BEAT_FILE_SECONDS: a write stuck on a hung filesystem holds up
        neither the heartbeat loop nor, by piling up, the thread pool (one at a time per file).
        """
        beat, self._last_beat = self._last_beat, None
        if beat is None:  # this beat was not built
            return
        fields, rss = beat
        for unit, counter, path in (
            (RING_UNIT, "heartbeat_ring_failures", self.work_dir / RING_FILE),
            (METRICS_UNIT, "metrics_write_failures", Path(self.config.metrics.textfile)),
        ):
            if unit == METRICS_UNIT and not self.config.metrics.textfile:
                continue
            pending = self._file_writes.get(unit)
            if pending is not None and not pending.done():
                self.health.fault(unit, f"{path}: the last write has not returned "
                                  "(hung filesystem?)", counter)
                continue
            try:
                write = self._beat_file(unit, fields, rss)
                future = self.loop.run_in_executor(None, write)
                self._file_writes[unit] = future
                await asyncio.wait({future}, timeout=BEAT_FILE_SECONDS)
                if not future.done():
                    self.health.fault(unit, f"{path}: write not done within "
                                      f"{BEAT_FILE_SECONDS:g} s (hung filesystem?)", counter)
                    continue
                future.result()
            except OSError as exc:
                self.health.fault(unit, "cannot write: " + describe_error(path, exc), counter)
            except Exception as exc:  # the boundary of one file write
                log.error("%s not written", unit, exc_info=exc)
                self.health.fault(unit, f"not written: {exc!r}", counter)
            else:
                self.health.clear(unit)

    def _beat_file(self, unit: str, fields: dict[str, str], rss: int) -> Callable[[], None]:
        """What the worker thread writes for `unit`, built here on the loop."""
        plugins = self.plugins.states()
        if unit == RING_UNIT:
            self._ring.add(self.last_heartbeat, fields, plugins)
            return partial(write_ring, self.work_dir, self._ring.encode())
        sample = metrics.Sample(
            version=VERSION, connected=self.transfer.state.connected,
            upgrade_held=bool(self.upgrader.hold), rss_bytes=rss,
            cpu_seconds=time.process_time(), heartbeat_time=self.last_heartbeat,
            plugins=plugins,
        )
        text = metrics.render(self.counters(), sample)
        return partial(metrics.write_textfile, Path(self.config.metrics.textfile), text)

    async def _watchdog_tick(self) -> None:
        self.notifier.send("WATCHDOG=1")

    async def _trim_when_settled(self) -> None:
        # By then the first stream has opened and carried a heartbeat: start-up is over.
        await asyncio.sleep(TRIM_AFTER_SECONDS)
        trim_after_start()

    async def _shutdown_when_asked(self) -> None:
        await self.stopping.wait()
        self.notifier.send("STOPPING=1")
        log.info("stopping: plugins first")
        await self.plugins.stop()
        if self.transfer.state.connected:
            try:
                async with asyncio.timeout(FLUSH_ON_EXIT_SECONDS):
                    await self.buffer.wait_empty()
            except TimeoutError:
                log.warning("stopping with %d records unsent", len(self.buffer))
        await self.transfer.finish(FINISH_STREAM_SECONDS)
        await self.spool.stop()
        raise _Stop

    async def _keep_unsent(self) -> None:
        """What is still in memory goes to the spool, durably; the next process sends it first."""
        if self.spool.state is SpoolState.DISABLED:
            return
        moved = spill_all(self.spool, self.buffer)
        await self.spool.close()
        if moved or self.spool.records:
            log.info("spooled %d records at exit (%d held)", moved, self.spool.records)


def run_agent(config_path: str | None) -> int:
    limit_arenas()
    try:
        config, env = load_run_config(config_path, os.environ)
        tls = TlsMaterial.load(config.tls)
    except (ConfigError, TlsError) as exc:
        sys.stderr.write(f"elkeid-agent: configuration error: {exc}\n")
        # A new version that refuses the config it inherited counts as a failed start.
        hint = work_dir_hint(config_path)
        with contextlib.suppress(OSError):
            if hint.is_dir() and check_pending_upgrade(hint).exit:
                return EX_ROLLED_BACK
        return EX_CONFIG
    work_dir = config.work_path
    # Never raises: a work dir that cannot hold the log leaves stderr (the Agent reports it,
    # and makes the work dir's subdirectories, or reports why it cannot).
    log_file = setup_logging(work_dir, config.log)
    try:
        try:
            startup = check_pending_upgrade(work_dir, settings=settings_from(config.upgrade))
        except OSError as exc:
            # The work dir refuses the upgrade record (read-only, full): this start goes
            # uncounted by us (the unit's upgrade guard still counts it), the agent runs on.
            log.error("upgrade start-up check failed: %s", exc)
            startup = StartupResult(False, UpgradeState.IDLE, f"start-up check failed: {exc}")
        if startup.exit:
            return EX_ROLLED_BACK
        clean_stale_unpack_dirs(work_dir / "tmp")
        import uvloop

        async def main() -> None:
            use_fixed_pool(asyncio.get_running_loop())
            await Agent(config, tls, env, startup, log_file, config_path).run()

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    finally:
        # Stops the log's compressor thread: nothing of ours outlives the agent.
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    return 0


def make_work_dirs(work_dir: Path, health: Health) -> bool:
    """`plugin/`, `log/`, `tmp/`; a read-only or full work dir is a fault, not the end.

    Without them the agent still connects and heartbeats: the log goes to stderr, plugins and
    upgrades fail as units of work, and the fault says why until the directories can be made.
    """
    for sub in WORK_SUBDIRS:
        path = work_dir / sub
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            health.fault(WORK_DIR_UNIT, "cannot create: " + describe_error(path, exc))
            return False
    health.clear(WORK_DIR_UNIT)
    return True
