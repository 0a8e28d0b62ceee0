"""The self-upgrade: the `Upgrader` the Dispatcher calls, and the start-up check.

Two entry points, two processes:

* `check_pending_upgrade(work_dir)` runs first thing in every agent start, before the event
  loop. It finds the upgrade record, counts this start, and when the new version is out of
  chances (more than `max_unconfirmed_starts` starts, or `confirm_bound` seconds since the
  swap) it restores the previous executable, quarantines the version and tells the caller to
  exit, so the service manager starts the old one again. (A new version that dies before
  this check runs is counted by the upgrade guard instead, `guard.py`.)
* `UpgradeManager` lives in the running agent. `consider()` (from the Dispatcher) only
  records the wish; `run()` (a task of the agent's TaskGroup) does the work one attempt at a
  time: download and verify into `<work_dir>/tmp`, check its signature against the pinned
  keys (docs/signing.md; refused in `enforce` before anything of it runs), extract the
  candidate, probe it with
  `--version` and then `selftest` (its whole run path against the live config), swap, ask
  the agent to exit. In the new process it also waits for `confirm()`
  (the first heartbeat went out on a stream) and rolls back when the bound passes first.
  The download keeps the plugins' time budget (`progress.Rule`), and an entry that changes
  while its artifact is still downloading ends that download at once (a newer set
  supersedes the older); once downloaded, an attempt runs to its end.

Every state change goes through `state.UpgradeMachine`; the heartbeat reports `state` and
`last_error`, and a failure also marks the agent abnormal through `errors["upgrade"]`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from elkeid_agent.childenv import child_env
from elkeid_agent.commands import ConfigSpec, task_result
from elkeid_agent.config import UpgradeConfig
from elkeid_agent.download import DownloadError, download_verified, sha256_file
from elkeid_agent.fsutil import remove_tree
from elkeid_agent.health import Health
from elkeid_agent.progress import Progress, Rule
from elkeid_agent.signing.check import REFUSED_COUNTER, WARNED_COUNTER, Verifier, strip
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.artifact import (
    ArtifactKind,
    BadArtifact,
    extract_candidate,
)
from elkeid_agent.upgrade.hold import hold_source
from elkeid_agent.upgrade.probe import (
    ELF_HEAD_BYTES,
    architecture_verdict,
    probe_verdict,
    run_bounded,
    selftest_verdict,
)
from elkeid_agent.upgrade.record import (
    CorruptFile,
    Method,
    Outcome,
    UpgradeRecord,
    Verdict,
    decide_at_start,
    elapsed_since_swap,
)
from elkeid_agent.upgrade.rollback import (
    boot_time,
    read_quarantine,
    roll_back,
    rollback_message,
    write_outcome,
)
from elkeid_agent.upgrade.settings import UpgradeSettings, with_overrides
from elkeid_agent.upgrade.state import Event, UpgradeMachine, UpgradeState
from elkeid_agent.version import VERSION

log = logging.getLogger(__name__)

EXECUTABLE = "elkeid-agent"
PREV_SUFFIX = ".prev"
#: Each attempt works in `<work_dir>/tmp/upgrade-XXXXXX`, removed when it ends.
ATTEMPT_PREFIX = "upgrade-"
#: The token of the 5100 records reporting an upgrade's outcome (no task asked for it).
RESULT_TOKEN = "upgrade"
#: The key in the agent's `errors` (the heartbeat's state_detail).
ERROR_KEY = "upgrade"
#: `dpkg -S` / `rpm -qf` answer in well under a second; a stuck database lock should not
#: hold the upgrade for long.
OWNER_QUERY_TIMEOUT = 30.0
#: The running program (the frozen executable, or the Python interpreter from source): the
#: architecture a candidate must have.
OWN_EXECUTABLE = Path("/proc/self/exe")
#: Test-only (docs/upgrade.md): "1" in the agent's environment skips the selftest probe, so
#: the tests can swap in a candidate that only the upgrade guard can catch.
SKIP_SELFTEST_ENV = "ELKEID_TEST_SKIP_SELFTEST"


DEFAULT_SETTINGS = UpgradeSettings()


def settings_from(config: UpgradeConfig) -> UpgradeSettings:
    """The built-in settings with the operator's overrides applied."""
    return with_overrides(DEFAULT_SETTINGS, config)


@dataclass(frozen=True)
class StartupResult:
    """What `check_pending_upgrade` found and did."""

    exit: bool  # the previous executable is back in place: exit so it is started
    state: UpgradeState
    error: str = ""  # for the heartbeat: why the last upgrade failed or was rolled back
    record: UpgradeRecord | None = None  # pending: this process must confirm it


class UpgradeFailed(Exception):
    """One step of an attempt failed; the message is the reason reported, `counter` the
    heartbeat counter of a breached cap."""

    def __init__(self, reason: str, counter: str | None = None) -> None:
        super().__init__(reason)
        self.counter = counter


class Superseded(Exception):
    """A newer entry came while the attempt's artifact was downloading."""


def _target(work_dir: Path) -> Path:
    return work_dir / EXECUTABLE


def check_pending_upgrade(
    work_dir: Path,
    version: str = VERSION,
    settings: UpgradeSettings | None = None,
    now: float | None = None,
) -> StartupResult:
    """The start-up check; call it before anything else starts. Blocking, fast."""
    settings = settings or DEFAULT_SETTINGS
    now = time.time() if now is None else now
    # No attempt runs before this process starts one: any attempt directory (a download
    # of up to max_artifact_bytes) is a leftover of a killed process.
    for stale in (work_dir / "tmp").glob(ATTEMPT_PREFIX + "*"):
        remove_tree(stale, ignore_errors=True)
    try:
        record = swap.read_record(work_dir)
    except CorruptFile as exc:
        log.error("upgrade: %s; removed", exc)
        swap.remove_record(work_dir)
        return StartupResult(False, UpgradeState.IDLE, f"corrupt upgrade record: {exc}")
    decision = decide_at_start(record, version, now, bound=settings.confirm_bound,
                               max_starts=settings.max_unconfirmed_starts, boot=boot_time())
    verdict, kept = decision.verdict, decision.record
    if verdict is Verdict.NONE:
        return StartupResult(False, UpgradeState.IDLE)
    if verdict is Verdict.AWAIT_CONFIRM:
        assert kept is not None
        swap.write_record(work_dir, kept)
        log.info("upgrade from %s to %s: start %d of %d, confirming once connected",
                 kept.from_version, version, kept.starts_without_confirm,
                 settings.max_unconfirmed_starts)
        return StartupResult(False, UpgradeState.SWAPPED, record=kept)
    if verdict is Verdict.ROLL_BACK:
        assert kept is not None
        try:
            message = roll_back(work_dir, kept, decision.reason, now,
                                settings.quarantine_seconds)
        except OSError as exc:
            # No way back (the saved executable is gone): running on beats exiting forever.
            swap.remove_record(work_dir)
            error = f"upgrade to {version} not confirmed, and rollback failed: {exc}"
            log.critical("%s", error)
            return StartupResult(False, UpgradeState.IDLE, error)
        log.error("%s; exiting so that %s starts", message, kept.from_version)
        return StartupResult(True, UpgradeState.ROLLED_BACK, message)
    swap.remove_record(work_dir)
    if verdict is Verdict.REPORT_ROLLBACK:
        assert record is not None
        until = read_quarantine(work_dir).until(record.to_version, now)
        message = rollback_message(record, decision.reason, until)
        log.error("back on %s: %s", version, message)
        state = UpgradeState.QUARANTINED if until else UpgradeState.IDLE
        return StartupResult(False, state, message)
    if verdict is Verdict.NOT_TAKEN:
        log.error("upgrade: %s", decision.reason)
        return StartupResult(False, UpgradeState.IDLE, decision.reason)
    log.warning("upgrade: %s", decision.reason)
    return StartupResult(False, UpgradeState.IDLE)


class UpgradeManager:
    """The agent's Upgrader (commands.Upgrader) and the keeper of the upgrade state."""

    def __init__(
        self,
        work_dir: Path,
        *,
        emit: Callable[[bytes], None],
        errors: MutableMapping[str, str],
        request_exit: Callable[[], None],
        startup: StartupResult,
        env: Mapping[str, str],
        settings: UpgradeSettings | None = None,
        version: str = VERSION,
        ssl_context: ssl.SSLContext | None = None,
        config_path: str | None = None,
        verifier: Verifier | None = None,
        count: Callable[[str], None] | None = None,
        download_rule: Rule | None = None,
        health: Health | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.verifier = verifier or Verifier()
        self._count = count or (lambda _counter: None)
        self.config_path = config_path  # the live config the selftest probe reads
        self.target = _target(work_dir)
        self.emit = emit
        self.errors = errors
        self.request_exit = request_exit
        self.env = env
        self.settings = settings or DEFAULT_SETTINGS
        self.version = version
        self.ssl_context = ssl_context
        self.machine = UpgradeMachine()
        self.last_error = ""
        self._record: UpgradeRecord | None = None  # ours to confirm
        self._pending: ConfigSpec | None = None
        self._held: ConfigSpec | None = None  # pushed while held; tried once released
        self._wake = asyncio.Event()
        self._retry_at: dict[tuple[str, str], float] = {}
        self._said: set[str] = set()  # refusals already logged (log once)
        self.download_rule = download_rule or Rule()
        self.health = health if health is not None else Health()
        #: The attempt under way and, while its artifact downloads, the scope that ends it.
        self._attempting: ConfigSpec | None = None
        self._download_scope: asyncio.Timeout | None = None
        self._progress: Progress | None = None
        if startup.state is UpgradeState.SWAPPED:
            self.machine.handle(Event.RESUMED)
            self._record = startup.record
        elif startup.state is UpgradeState.QUARANTINED:
            self.machine.handle(Event.RESTORED)
        if startup.error:
            self._set_error(startup.error)
            self.emit(task_result(RESULT_TOKEN, False, startup.error))

    # -- what the agent reads -------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.machine.state.value

    @property
    def hold(self) -> str:
        """Why upgrades are held: `config`, `ctl`, or "" when they are not."""
        return hold_source(self.work_dir, self.settings.hold)

    @property
    def held_version(self) -> str:
        """The version the server pushed and the hold keeps out, "" when none."""
        return self._held.version if self._held is not None else ""

    def recheck_hold(self) -> None:
        """Each heartbeat: a version kept out by a hold since lifted is tried now."""
        if self._held is not None and not self.hold:
            log.info("upgrade hold released: %s pushed while held is considered",
                     self._held.version)
            self._pending, self._held = self._held, None
            self._wake.set()

    def _keep_out(self, config: ConfigSpec) -> bool:
        source = self.hold
        if not source:
            return False
        self._held = config
        how = "upgrade.hold in the config" if source == "config" else "`ctl hold`"
        self._say_once(f"held/{config.version}/{source}",
                       f"upgrade to {config.version} held by {how}; {self.version} keeps running")
        return True

    def _set_error(self, message: str) -> None:
        self.last_error = message
        self.errors[ERROR_KEY] = message

    def _clear_error(self) -> None:
        self.last_error = ""
        self.errors.pop(ERROR_KEY, None)

    def waiting(self) -> list[str]:
        """The artifact's slow URL while its download is behind the minimum (state_detail)."""
        progress, config = self._progress, self._attempting
        if progress is None or config is None:
            return []
        waiting = progress.waiting(time.monotonic())
        if waiting is None:
            return []
        return [f"upgrade to {config.version}: waiting for {waiting}, "
                f"under {progress.rule.describe()}"]

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)

    # -- Upgrader ---------------------------------------------------------------------------------

    async def consider(self, config: ConfigSpec) -> None:
        """Note the wish; `run()` acts on it. Never blocks the Dispatcher."""
        if config != self._attempting:
            self._end_download()
        if not config.version or config.version == self.version:
            # The server wants what runs: any earlier failure is no longer news.
            self._pending = self._held = None
            if self.machine.state is not UpgradeState.SWAPPED:
                self._clear_error()
            return
        if self._keep_out(config):
            self._pending = None  # an older wish not yet taken: the newer entry replaces it
            return
        self._held = None
        refusal = self._refusal(config)
        if refusal is not None:
            self._say_once(*refusal)
            self._pending = None  # as when held: the older wish is not wanted any more
            return
        self._pending = config
        self._wake.set()

    async def withdraw(self) -> None:
        """No entry for the agent in the newest set: the wish not yet tried is dropped and a
        download under way ends (an attempt past its download runs to its end); a version
        kept out by a hold is no longer wanted either."""
        self._pending = self._held = None
        self._end_download()

    def _end_download(self) -> None:
        """A newer set changed or removed the entry whose artifact downloads: end it now."""
        scope = self._download_scope
        if scope is not None and not scope.expired():
            scope.reschedule(asyncio.get_running_loop().time())

    def _refusal(self, config: ConfigSpec) -> tuple[str, str] | None:
        """Why `config` is not tried now: (a key for logging it once, the message); None:
        try it."""
        if self.machine.state is UpgradeState.SWAPPED:
            return (f"unconfirmed/{config.version}",
                    f"upgrade to {config.version} ignored: an upgrade is not confirmed yet")
        now = time.time()
        until = read_quarantine(self.work_dir).until(config.version, now)
        if until is not None:
            return (f"quarantined/{config.version}",
                    f"upgrade to {config.version} ignored: quarantined for another "
                    f"{until - now:.0f} s after a rollback")
        retry = self._retry_at.get((config.version, config.sha256))
        if retry is not None and retry > time.monotonic():
            return (f"failed/{config.version}/{config.sha256}",
                    f"upgrade to {config.version} failed recently; retried in "
                    f"{retry - time.monotonic():.0f} s at the earliest")
        return None

    def confirm(self) -> None:
        """The new version reached the server (a stream carried its first heartbeat)."""
        record = self._record
        if self.machine.state is not UpgradeState.SWAPPED or record is None:
            return
        swap.remove_record(self.work_dir)
        self._record = None
        self.machine.handle(Event.CONFIRMED)
        self._clear_error()
        message = f"upgraded from {record.from_version} to {self.version}: confirmed"
        log.info("%s", message)
        write_outcome(self.work_dir, Outcome(from_version=record.from_version,
                                             to_version=self.version, result="confirmed",
                                             at=time.time()))
        self.emit(task_result(RESULT_TOKEN, True, message))

    # -- the worker -------------------------------------------------------------------------------

    async def run(self) -> None:
        """One attempt at a time; the confirmation bound while ours is unconfirmed."""
        while True:
            try:
                async with asyncio.timeout(self._bound_left()):
                    await self._wake.wait()
            except TimeoutError:
                self._bound_passed()
                continue
            self._wake.clear()
            config, self._pending = self._pending, None
            if config is None or self._keep_out(config):
                continue
            refusal = self._refusal(config)
            if refusal is not None:
                self._say_once(*refusal)
                continue
            await self._attempt(config)

    def _bound_left(self) -> float | None:
        if self._record is None or self.machine.state is not UpgradeState.SWAPPED:
            return None
        elapsed = elapsed_since_swap(self._record, time.time(), boot_time())
        return max(0.0, self.settings.confirm_bound - elapsed)

    def _bound_passed(self) -> None:
        record = self._record
        if record is None or self.machine.state is not UpgradeState.SWAPPED:
            return
        reason = f"{self.version} did not reach the server within {self.settings.confirm_bound:g} s"
        self._record = None
        try:
            message = roll_back(self.work_dir, record, reason, time.time(),
                                self.settings.quarantine_seconds)
        except OSError as exc:
            swap.remove_record(self.work_dir)
            self.machine.handle(Event.CONFIRMED)
            self._set_error(f"{reason}, and rollback failed: {exc}; keeping {self.version}")
            log.critical("%s", self.last_error)
            return
        self.machine.handle(Event.ROLLED_BACK)
        self.machine.handle(Event.QUARANTINED)
        self._set_error(message)
        log.error("%s; exiting so that %s starts", message, record.from_version)
        self.request_exit()

    async def _attempt(self, config: ConfigSpec) -> None:
        self.machine.handle(Event.START)
        self._clear_error()
        log.info("upgrade from %s to %s: starting", self.version, config.version)
        attempt_dir: Path | None = None
        self._attempting = config
        try:
            tmp = self.work_dir / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            attempt_dir = Path(tempfile.mkdtemp(prefix=ATTEMPT_PREFIX, dir=tmp))
            await self._fetch_probe_swap(config, attempt_dir)
        except UpgradeFailed as exc:
            if exc.counter is not None:
                self._count(exc.counter)
            self._failed(config, str(exc))
        except Superseded:
            # Not a failure of this version: no error, no retry delay, no 5100.
            self.machine.handle(Event.FAILED)
            log.info("upgrade to %s: download ended, a newer entry came", config.version)
        except Exception as exc:  # the boundary of one attempt (a full or read-only disk)
            log.exception("upgrade to %s failed", config.version)
            self._failed(config, repr(exc))
        finally:
            self._attempting = None
            if attempt_dir is not None:
                await _remove_attempt(attempt_dir)

    def _abandoned(self, reason: str) -> None:
        log.error("upgrade: download abandoned: %s", reason)
        self.health.count("downloads_abandoned")

    def _failed(self, config: ConfigSpec, reason: str) -> None:
        event = Event.SWAP_FAILED if self.machine.state is UpgradeState.SWAPPED else Event.FAILED
        self.machine.handle(event)
        self._retry_at[(config.version, config.sha256)] = (
            time.monotonic() + self.settings.retry_after
        )
        message = f"upgrade from {self.version} to {config.version} failed: {reason}"
        self._set_error(message)
        log.error("%s", message)
        self.emit(task_result(RESULT_TOKEN, False, message))

    async def _fetch_probe_swap(self, config: ConfigSpec, attempt_dir: Path) -> None:
        s = self.settings
        progress = self._progress = Progress(self.download_rule, on_abandon=self._abandoned)
        scope = self._download_scope = asyncio.timeout(None)
        try:
            async with scope:
                artifact = await download_verified(
                    config.download_urls, config.sha256, attempt_dir,
                    max_bytes=s.max_artifact_bytes, timeout=s.download_timeout,
                    ssl_context=self.ssl_context, progress=progress,
                )
        except DownloadError as exc:
            raise UpgradeFailed(f"download: {exc}") from exc
        except TimeoutError:
            if scope.expired():
                raise Superseded from None
            raise
        finally:
            self._download_scope = None
            self._progress = None
        await self._check_signature(config, artifact)
        candidate = attempt_dir / EXECUTABLE
        kind = await asyncio.to_thread(_extract, artifact, candidate, s.max_candidate_bytes)
        foreign = await asyncio.to_thread(_foreign_architecture, candidate)
        if foreign is not None:
            raise UpgradeFailed(f"probe: {foreign}")
        log.info("upgrade to %s: %s artifact verified, probing %s --version",
                 config.version, kind, candidate)
        result = await run_bounded(
            [str(candidate), "--version"], child_env(self.env),
            timeout=s.probe_timeout, output=attempt_dir / "probe.out",
        )
        reason = probe_verdict(result, config.version, s.probe_timeout)
        if reason is not None:
            raise UpgradeFailed(f"probe: {reason}")
        await self._selftest(candidate, config.version, attempt_dir)
        if kind in (ArtifactKind.DEB, ArtifactKind.RPM) and await self._owned_by(kind):
            await self._package_swap(config, kind, artifact, attempt_dir)
        else:
            await self._file_swap(config, candidate)

    async def _check_signature(self, config: ConfigSpec, artifact: Path) -> None:
        """The artifact's signature, before anything of it is unpacked or run; its block is
        cut off, so a package or archive ends where dpkg, rpm and gzip expect."""
        try:
            verdict = await asyncio.to_thread(self.verifier.check, artifact, EXECUTABLE,
                                              config.version, self.version)
        except OSError as exc:
            raise UpgradeFailed(f"signature: cannot read {artifact}: {exc}") from exc
        if verdict.refuse:
            self._count(REFUSED_COUNTER)
            raise UpgradeFailed(f"signature: {verdict.problem}; refused (signing policy "
                                "enforce)")
        if verdict.problem is not None:
            self._count(WARNED_COUNTER)
            log.warning("upgrade to %s: signature: %s; used anyway (signing policy warn)",
                        config.version, verdict.problem)
        try:
            await asyncio.to_thread(strip, artifact, verdict)
        except OSError as exc:
            raise UpgradeFailed(f"signature: cannot cut the block off {artifact}: {exc}") from exc

    async def _selftest(self, candidate: Path, version: str, attempt_dir: Path) -> None:
        """The deep probe: the candidate walks its whole run path against the live config."""
        if self.env.get(SKIP_SELFTEST_ENV) == "1":
            log.warning("upgrade to %s: selftest probe skipped (%s=1, test-only)",
                        version, SKIP_SELFTEST_ENV)
            return
        argv = [str(candidate), "selftest"]
        if self.config_path is not None:
            argv += ["--config", self.config_path]
        log.info("upgrade to %s: probing %s", version, " ".join(argv))
        timeout = self.settings.probe_timeout
        result = await run_bounded(argv, child_env(self.env), timeout=timeout,
                                   output=attempt_dir / "selftest.out")
        reason = selftest_verdict(result, version, timeout)
        if reason is not None:
            raise UpgradeFailed(f"probe: {reason}")

    async def _owned_by(self, kind: ArtifactKind) -> bool:
        """True if the package manager of `kind` installed the executable."""
        tool, flag = swap.OWNER_QUERY[kind]
        path = swap.find_tool(tool, self.env)
        if path is None:
            return False
        with tempfile.NamedTemporaryFile(dir=self.work_dir / "tmp") as out:
            result = await run_bounded([path, flag, str(self.target)], child_env(self.env),
                                       timeout=OWNER_QUERY_TIMEOUT, output=Path(out.name))
        return result.returncode == 0

    def _new_record(self, config: ConfigSpec, method: Method) -> UpgradeRecord:
        boot = boot_time()
        return UpgradeRecord(
            from_version=self.version, to_version=config.version, started_at=time.time(),
            boot_id=boot.boot_id if boot else "", started_boottime=boot.seconds if boot else 0.0,
            target=str(self.target), prev=str(self._prev()), method=method,
        )

    def _prev(self) -> Path:
        return self.target.with_name(EXECUTABLE + PREV_SUFFIX)

    def _save_current(self) -> None:
        try:
            swap.copy_atomic(self.target, self._prev(), swap.executable_mode(self.target))
        except OSError as exc:
            raise UpgradeFailed(f"cannot save the running executable {self.target}: {exc}") from exc

    async def _file_swap(self, config: ConfigSpec, candidate: Path) -> None:
        # Order matters for a kill at any instant: the old executable is saved and the
        # record written before the target changes, so the new process always finds both.
        await asyncio.to_thread(self._save_current)
        record = self._new_record(config, "file")
        try:
            await asyncio.to_thread(swap.write_record, self.work_dir, record)
            await asyncio.to_thread(swap.copy_atomic, candidate, self.target,
                                    swap.executable_mode(self.target))
        except OSError as exc:
            swap.remove_record(self.work_dir)
            raise UpgradeFailed(f"cannot replace {self.target}: {exc}") from exc
        self._swapped(record)

    async def _package_swap(self, config: ConfigSpec, kind: ArtifactKind, artifact: Path,
                            attempt_dir: Path) -> None:
        await asyncio.to_thread(self._save_current)
        method: Method = "dpkg" if kind is ArtifactKind.DEB else "rpm"
        # The package manager wants a proper suffix; the download is a temporary file. (Not
        # the version in the name: it comes from the server and may hold a "/".)
        package = attempt_dir / f"candidate.{kind.value}"
        await asyncio.to_thread(artifact.rename, package)
        unit = f"elkeid-agent-upgrade-{int(time.time())}"
        argv = swap.install_argv(kind, package, self.env, unit)
        if argv is None:
            raise UpgradeFailed(f"{method} is not installed")
        record = self._new_record(config, method)
        await asyncio.to_thread(swap.write_record, self.work_dir, record)
        self.machine.handle(Event.SWAPPED)
        self._record = None  # the new process confirms it, not us
        log.info("upgrade to %s: running %s", config.version, " ".join(argv))
        result = await run_bounded(argv, child_env(self.env), timeout=self.settings.package_timeout,
                                   output=attempt_dir / "install.out", survive_cancel=True)
        unchanged = await asyncio.to_thread(_same_file, self.target, self._prev())
        if result.returncode != 0 and unchanged:
            swap.remove_record(self.work_dir)
            raise UpgradeFailed(
                f"{' '.join(argv[-2:])} failed ({result.exec_error or result.returncode}): "
                f"{result.output.strip()[-500:]}"
            )
        if result.returncode != 0:
            log.warning("%s reported a failure but replaced the executable: %s",
                        method, result.output.strip()[-500:])
        self._announce_swap(record)

    def _swapped(self, record: UpgradeRecord) -> None:
        self.machine.handle(Event.SWAPPED)
        self._announce_swap(record)

    def _announce_swap(self, record: UpgradeRecord) -> None:
        log.info("upgrade from %s to %s: %s swapped (%s); exiting so that it starts",
                 record.from_version, record.to_version, record.target, record.method)
        self.request_exit()


async def _remove_attempt(attempt_dir: Path) -> None:
    """Remove an attempt's directory in a worker thread; when cancelled (the agent stops
    just then), here at once: a cancel before the worker started the job drops it."""
    try:
        await asyncio.to_thread(remove_tree, attempt_dir, ignore_errors=True)
    except asyncio.CancelledError:
        remove_tree(attempt_dir, ignore_errors=True)
        raise


def _extract(artifact: Path, candidate: Path, max_bytes: int) -> ArtifactKind:
    try:
        with artifact.open("rb") as src, candidate.open("xb") as out:
            kind = extract_candidate(src, out, max_bytes=max_bytes)
    except BadArtifact as exc:
        raise UpgradeFailed(f"artifact: {exc}", exc.counter) from exc
    candidate.chmod(0o700)
    return kind


def _foreign_architecture(candidate: Path) -> str | None:
    with candidate.open("rb") as theirs, OWN_EXECUTABLE.open("rb") as ours:
        return architecture_verdict(theirs.read(ELF_HEAD_BYTES), ours.read(ELF_HEAD_BYTES))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return sha256_file(a) == sha256_file(b)
    except OSError:
        return False
