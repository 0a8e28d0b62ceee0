"""One plugin child process: spawn, record pipes in, task pipe out, exit detection, stop.

Theory of operation. `PluginProcess.spawn` starts the child with `os.posix_spawn` (never fork:
uvloop's fork trips gRPC's fork handlers, and vfork-style spawn copies nothing). `serve()` then
owns the child until it is gone, in one TaskGroup of three tasks:

* the pump reads fd 5 (urgent) before fd 4 on non-blocking pipes through `loop.add_reader`,
  feeds each pipe's `FrameDecoder` and awaits `RecordBuffer.put_many`; while that await waits
  (the buffer is full) nothing is read, so the child's writes block: backpressure, no drops.
  `FrameTooLarge` leaves the pump, the TaskGroup aborts, the child is killed: a stream whose
  framing is lost cannot be resynchronised.
* the task writer drains a bounded queue into fd 3, one frame at a time, all of it.
* the exit watcher (see `_wait_exit`) notices the child's exit without pidfd on old kernels.

Its stderr is a pipe a thread of its own copies into `<name>.stderr`, under a cap
(`plugins/stderr.py`); the thread ends at the pipe's EOF, or soon after the run ends.

Stop (PROTOCOL 5): close the task pipe, keep reading records for a moment so what the
plugin flushes on the way out is not lost, close the record pipes, wait for the exit up to
10 s in all, then SIGKILL the process group and every process of the plugin's cgroup (or, as
the fallback without one, its tagged descendants: `subreaper`), and reap. The cgroup kill and
the subreaper sweep poll for up to ~3 s: they run in a worker thread (`run_to_end`), so the
loop, and the heartbeat on it, goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from elkeid_agent.buffer import Lane, RecordBuffer
from elkeid_agent.errors import TaskFailed
from elkeid_agent.plugins import subreaper
from elkeid_agent.plugins.cgroup_plan import JOIN_FAILED, trampoline_argv
from elkeid_agent.plugins.cgroups import PluginCgroup
from elkeid_agent.plugins.stderr import StderrCopier, StderrStats
from elkeid_agent.wire import FrameDecoder, FrameTooLarge

log = logging.getLogger(__name__)

T = TypeVar("T")

#: One read from a record pipe; the libraries write up to 512 KiB at a time.
READ_CHUNK = 256 * 1024
#: Pipe capacity asked for the record pipes (the unprivileged maximum by default): a plugin
#: flushing its 512 KiB buffer then needs two wake-ups of the agent, not eight.
PIPE_SIZE = 1024 * 1024
#: Exit polling when pidfd is not available (Linux < 5.3): the interval while the child
#: still holds its record pipes, and the fast start once both reached EOF (a likely exit).
POLL_INTERVAL = 1.0
FAST_POLL = 0.01
#: Stop: how long records are still read after the task pipe was closed, then the total wait.
#: Task bytes queued for one plugin (besides the one being written): a task may be 10 MiB,
#: and a plugin that stops reading must not make the agent hold `task_queue` of them.
MAX_QUEUED_TASK_BYTES = 16 * 1024 * 1024
STOP_DRAIN = 1.0
STOP_GRACE = 10.0
#: After the child exited (and its group was killed), how long to wait for the record pipes'
#: EOF so everything it wrote reaches the buffer.
EXIT_DRAIN = 5.0
#: posix_spawn has no chdir (Python 3.11..3.13; glibc's addchdir_np is not exposed and
#: absent from CentOS 7's glibc 2.17) and cannot place the child in a cgroup, and chdir in the
#: agent would race its other threads (gRPC, the executor). So the child starts as a short
#: POSIX shell script (`cgroup_plan.trampoline_argv`) that joins the plugin's cgroups, changes
#: directory and execs the plugin: every supported host has /bin/sh, the plugin gets the
#: shell's pid (so pid, process group and /proc/<pid>/exe are the plugin's after exec), and
#: fds 0-5 pass through the exec untouched.
SHELL = "/bin/sh"
HIGH_PRIORITY_ENV = "ELKEID_PLUGIN_HIGH_PRIORITY_PIPE"
#: Child fds must not be moved onto each other by the spawn's dup2 sequence: keep sources here.
_MIN_SOURCE_FD = 10
#: Python ignores SIGPIPE and SIGXFSZ for itself; ignored dispositions survive exec, so reset
#: them or a plugin would never die of a broken pipe.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)

#: `<name>.stderr` is kept under this many bytes (`[plugins] stderr_max_bytes`).
DEFAULT_STDERR_BYTES = 4 * 1024 * 1024
#: Tests set this False to exercise the polling path that old kernels take.
USE_PIDFD = hasattr(os, "pidfd_open")


@dataclass
class Counters:
    """What one plugin slot has seen, accumulated over its restarts."""

    rx_frames: int = 0
    rx_bytes: int = 0
    malformed: int = 0
    too_large: int = 0
    tx_tasks: int = 0
    tx_bytes: int = 0
    backpressure_seconds: float = 0.0
    #: When the wait for the record budget under way began (monotonic; 0: not waiting).
    waiting_since: float = 0.0
    stderr: StderrStats = field(default_factory=StderrStats)

    def waited(self, now: float) -> float:
        """Seconds spent waiting for the record budget so far, the wait under way included."""
        return self.backpressure_seconds + (now - self.waiting_since if self.waiting_since else 0)


@dataclass(frozen=True)
class Outcome:
    """How a run ended: `reason` is for people (logs, heartbeat state_detail)."""

    reason: str
    run_seconds: float


#: Bytes read from the end of a plugin's stderr file, and the longest last line quoted.
STDERR_TAIL = 4096
STDERR_QUOTE = 200


def _describe(status: int, in_cgroup: bool = False) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by signal {-code}"
    if in_cgroup and code == JOIN_FAILED:
        return f"exited with code {code}: could not join its cgroup (see its stderr file)"
    return f"exited with code {code}"


def _high_fd(fd: int) -> int:
    """Move `fd` to a number >= _MIN_SOURCE_FD (close-on-exec), closing the original."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _MIN_SOURCE_FD)
    os.close(fd)
    return new


def _inheritable_fds() -> list[int]:
    """Open fds without close-on-exec (listed from /proc/self/fd, Linux)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # the directory listdir read from, closed by now
        if not flags & fcntl.FD_CLOEXEC:
            out.append(fd)
    return out


def _pipe() -> tuple[int, int]:
    # O_CLOEXEC: the agent's ends must never leak into any child; the spawn's dup2 onto
    # 3/4/5 yields fds without the flag, which is exactly what the child keeps.
    r, w = os.pipe2(os.O_CLOEXEC)
    return _high_fd(r), _high_fd(w)


@dataclass
class _Pipe:
    fd: int
    lane: Lane
    decoder: FrameDecoder


def stderr_path(directory: Path, name: str) -> Path:
    """Where a plugin's stderr goes: `plugin/<name>/<name>.stderr`."""
    return directory / f"{name}.stderr"


def stderr_last_line(path: Path) -> str | None:
    """The last non-empty line of a plugin's stderr file, cut, for its failure line.

    Reads only the file's tail, never blocks (the plugin may have left a FIFO there) and
    follows no symlink; None when there is no such line or the file cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size if stat.S_ISREG(os.fstat(fd).st_mode) else -1
        data = os.pread(fd, STDERR_TAIL, max(size - STDERR_TAIL, 0)) if size > 0 else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    last = next((line for line in reversed(lines) if line), None)
    if last is None or len(last) <= STDERR_QUOTE:
        return last
    return last[: STDERR_QUOTE - 3] + "..."


def exit_with_stderr(reason: str, path: Path) -> str:
    """A run's end, pointing at the stderr file that usually holds its cause."""
    last = stderr_last_line(path)
    if last is None:
        return f"{reason}; nothing on stderr ({path})"
    return f"{reason}; stderr {path} ends {last!r}"


def _open_stderr(path: Path) -> int:
    """The plugin's stderr file, a new one each run: whatever is at the path is unlinked
    first. The last run's copier may still drain a pipe a stray process holds; it writes to
    the old file, never into this one. The directory is the plugin's: whatever it left at
    the path (a FIFO, which a blocking open() would wait on with the event loop) goes too."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # O_RDWR: keeping the newest part under the cap reads it back (plugins/stderr.py).
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o600)


@dataclass
class PluginProcess:
    name: str
    pid: int
    buffer: RecordBuffer
    counters: Counters
    task_fd: int
    pipes: list[_Pipe]
    tasks: asyncio.Queue[bytes]
    started: float = field(default_factory=time.monotonic)
    returncode: int | None = None
    _exit_status: int | None = None
    _eof: asyncio.Event = field(default_factory=asyncio.Event)
    _pidfd: int | None = None
    _queued_bytes: int = 0
    _stderr: StderrCopier | None = None
    #: Where every process of this run is: its cgroup, or (the fallback) the environment tag
    #: its descendants inherit while the agent is their subreaper.
    cgroup: PluginCgroup | None = None
    tag: str | None = None

    @classmethod
    def spawn(
        cls,
        name: str,
        directory: Path,
        env: Mapping[str, str],
        *,
        buffer: RecordBuffer,
        counters: Counters,
        max_frame: int,
        task_queue: int,
        stderr_max_bytes: int = DEFAULT_STDERR_BYTES,
        on_stderr_truncate: Callable[[], None] | None = None,
        cgroup: PluginCgroup | None = None,
        tag: str | None = None,
    ) -> PluginProcess:
        """Start `<directory>/<name>` with the pipe layout of PROTOCOL section 5, in `cgroup`
        (joined before the plugin executes) or, without one, tagged with `tag`.

        Raises OSError when the child cannot be started; no fd is left open then.
        """
        if tag is not None:
            env = {**env, subreaper.TAG_ENV: tag}
        procs_files = cgroup.procs_files() if cgroup is not None else []
        opened: list[int] = []
        try:
            task_r, task_w = _pipe()
            opened += (task_r, task_w)
            rec_r, rec_w = _pipe()
            opened += (rec_r, rec_w)
            urg_r, urg_w = _pipe()
            opened += (urg_r, urg_w)
            for fd in (rec_r, urg_r):
                with contextlib.suppress(OSError):  # a smaller pipe only costs wake-ups
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            err_r, stderr = _pipe()
            opened += (err_r, stderr)
            devnull = _high_fd(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
            opened.append(devnull)
            err_file = _high_fd(_open_stderr(stderr_path(directory, name)))
            opened.append(err_file)
            # What a plugin writes to stderr may be sensitive; a file left by an older agent
            # keeps its mode through O_TRUNC, so set it.
            os.fchmod(err_file, 0o600)
            copier = StderrCopier(
                name, err_r, err_file, stderr_max_bytes, counters.stderr, on_stderr_truncate
            )
            # Every fd the agent opens is close-on-exec (Python's default since PEP 446, and
            # gRPC's), but fds it inherited without the flag would pass on: close those in
            # the child, so it holds exactly fds 0-5.
            actions: list[tuple[int, ...]] = [
                (os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 5
            ]
            actions += [
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
                (os.POSIX_SPAWN_DUP2, task_r, 3),
                (os.POSIX_SPAWN_DUP2, rec_w, 4),
                (os.POSIX_SPAWN_DUP2, urg_w, 5),
            ]
            argv = trampoline_argv(SHELL, name, str(directory), str(directory / name), procs_files)
            pid = os.posix_spawn(
                SHELL,
                argv,
                env,
                file_actions=actions,
                setpgroup=0,
                setsigmask=(),
                setsigdef=_RESET_SIGNALS,
            )
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        for fd in (task_r, rec_w, urg_w, devnull, stderr):
            os.close(fd)
        try:
            # From here the copier's thread owns err_r and err_file, and closes them.
            copier.start()
        except RuntimeError as exc:  # no thread to be had (the host's limit): no plugin
            for fd in (err_r, err_file, task_w, rec_r, urg_r):
                os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise OSError(errno.EAGAIN, f"cannot start its stderr thread: {exc}") from exc
        for fd in (task_w, rec_r, urg_r):
            os.set_blocking(fd, False)
        pipes = [
            _Pipe(urg_r, Lane.URGENT, FrameDecoder(max_frame)),
            _Pipe(rec_r, Lane.PLUGIN, FrameDecoder(max_frame)),
        ]
        proc = cls(name, pid, buffer, counters, task_w, pipes, asyncio.Queue(task_queue))
        proc._stderr = copier
        proc.cgroup, proc.tag = cgroup, tag
        if USE_PIDFD:
            try:
                proc._pidfd = os.pidfd_open(pid)
            except OSError as exc:  # ENOSYS on kernels before 5.3: poll instead
                log.debug("pidfd_open: %s; polling for %s's exit", exc, name)
        return proc

    # -- tasks ----------------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a task frame; TaskFailed when the plugin is gone or its queue is full."""
        if self.task_fd < 0 or self.returncode is not None:
            raise TaskFailed(f"plugin {self.name} is not running")
        if self._queued_bytes and self._queued_bytes + len(frame) > MAX_QUEUED_TASK_BYTES:
            raise TaskFailed(
                f"task queue of plugin {self.name} is full ({self._queued_bytes} bytes)"
            )
        try:
            self.tasks.put_nowait(frame)
        except asyncio.QueueFull:
            raise TaskFailed(
                f"task queue of plugin {self.name} is full ({self.tasks.maxsize})"
            ) from None
        self._queued_bytes += len(frame)

    async def _write_tasks(self) -> None:
        while True:
            frame = await self.tasks.get()
            self._queued_bytes -= len(frame)
            view = memoryview(frame)
            while view:
                try:
                    written = os.write(self.task_fd, view)
                except BlockingIOError:
                    await _wait_fd(self.task_fd, writable=True)
                    continue
                except BrokenPipeError:
                    # The plugin closed fd 3: it takes no more tasks. Later sends fail.
                    log.warning("plugin %s closed its task pipe", self.name)
                    self._close_task_pipe()
                    return
                view = view[written:]
            self.counters.tx_tasks += 1
            self.counters.tx_bytes += len(frame)

    def _close_task_pipe(self) -> None:
        if self.task_fd >= 0:
            os.close(self.task_fd)
            self.task_fd = -1

    # -- records --------------------------------------------------------------------------------

    async def _pump(self) -> None:
        """Move frames from the record pipes into the buffer until both reach EOF."""
        keys = [id(pipe.decoder) for pipe in self.pipes]
        try:
            await self._pump_pipes()
        finally:
            # The half-read frames of a pump that ended are gone: out of the memory budget.
            for key in keys:
                self.buffer.partial(key, 0)

    async def _pump_pipes(self) -> None:
        counters = self.counters
        buffer = self.buffer
        pipes = self.pipes
        while pipes:
            more = False
            for pipe in list(pipes):  # urgent first
                while True:
                    try:
                        data = os.read(pipe.fd, READ_CHUNK)
                    except BlockingIOError:
                        break
                    if not data:
                        pipes.remove(pipe)
                        os.close(pipe.fd)
                        break
                    counters.rx_bytes += len(data)
                    decoder = pipe.decoder
                    malformed = decoder.malformed
                    try:
                        frames = decoder.feed(data)
                    except FrameTooLarge as exc:
                        # The frames before the bad length are good: deliver them, then
                        # let the stream's end propagate.
                        counters.malformed += decoder.malformed - malformed
                        counters.rx_frames += len(exc.frames)
                        if exc.frames:
                            await buffer.put_many(exc.frames, pipe.lane)
                        raise
                    counters.malformed += decoder.malformed - malformed
                    # A frame written in many reads is held until whole: part of the budget.
                    buffer.partial(id(decoder), decoder.pending)
                    if frames:
                        counters.rx_frames += len(frames)
                        began = counters.waiting_since = time.monotonic()
                        try:
                            await buffer.put_many(frames, pipe.lane)
                        finally:
                            counters.waiting_since = 0.0
                        counters.backpressure_seconds += time.monotonic() - began
                    elif decoder.pending:
                        began = counters.waiting_since = time.monotonic()
                        try:
                            await buffer.wait_room()
                        finally:
                            counters.waiting_since = 0.0
                        counters.backpressure_seconds += time.monotonic() - began
                    # Queued (or none): kept through the wait for the pipe, this reference
                    # would hold a frame of 8 MiB a fourth time, beside the message the send
                    # loop copies it into, grpc's copy and the trail.
                    del frames
                    if len(data) < READ_CHUNK:
                        break  # most likely drained: skip the EAGAIN read
                    if pipe.lane is Lane.PLUGIN:
                        more = True  # one chunk, then look at the urgent pipe again
                        break
            if pipes and not more:
                await _wait_fds([p.fd for p in pipes])
        self._eof.set()

    def _close_record_pipes(self) -> None:
        for pipe in self.pipes:
            os.close(pipe.fd)
        self.pipes.clear()

    # -- exit -----------------------------------------------------------------------------------

    def _poll_exit(self) -> bool:
        """True once the child has exited; it stays a zombie (not reaped) until `_reap`.

        Not reaping keeps its pid, which is the process group id, from being reused while
        we still signal the group.
        """
        if self._exit_status is not None:
            return True
        result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return result is not None

    async def _wait_exit(self) -> None:
        """Wait for the child's exit, without reaping it.

        With pidfd (Linux >= 5.3) the loop is woken by the kernel. Without it, waitid(WNOHANG)
        is polled: every POLL_INTERVAL (a few microseconds of CPU per second), and from
        FAST_POLL growing back once both record pipes reached EOF, which a plugin's exit
        causes. We never use SIGCHLD: the loop's own child handling (uvloop's libuv, the
        asyncio child watcher of the self-upgrade's dpkg/rpm) shares it, and waitpid(-1)
        would steal their children's statuses.
        """
        if self._pidfd is not None:
            while not self._poll_exit():
                await _wait_fds([self._pidfd])
            return
        interval = FAST_POLL
        while not self._poll_exit():
            if self._eof.is_set():
                await asyncio.sleep(interval)
                interval = min(interval * 2, POLL_INTERVAL)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_INTERVAL):
                        await self._eof.wait()

    async def _kill_all(self) -> None:
        """SIGKILL every process of this run: its group at once, then its cgroup or tagged
        descendants (a `setsid` or double-forked daemon leaves the group) in a worker thread."""
        self._kill_pgrp()
        if self.cgroup is not None or self.tag is not None:
            await run_to_end(self._kill_descendants)

    def _kill_descendants(self) -> None:
        """The cgroup kill or the subreaper sweep: bounded (~3 s), blocking (a worker's)."""
        if self.cgroup is not None:
            try:
                self.cgroup.kill()
            except OSError as exc:
                log.warning("plugin %s: cannot kill its cgroup: %s", self.name, exc)
        elif self.tag is not None:
            subreaper.kill_run(self.pid, self.tag)

    def _kill_pgrp(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the whole group is already gone
        except PermissionError:
            # EPERM on killpg only happens for a group with no member we may signal
            # (for example a member became setuid); the leader is still ours.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _reap(self) -> int:
        """Collect the exited child's status (it must have exited)."""
        if self._exit_status is None:
            _, status = os.waitpid(self.pid, 0)
            self._exit_status = status
            self.returncode = os.waitstatus_to_exitcode(status)
        return self._exit_status

    # -- the whole life -------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> Outcome:
        """Run until the child is gone; `stop` set asks for the orderly stop."""
        reason: str | None = None
        stopped = False
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    pump = tg.create_task(self._pump(), name=f"{self.name}-pump")
                    writer = tg.create_task(self._write_tasks(), name=f"{self.name}-tasks")
                    exited = tg.create_task(self._wait_exit(), name=f"{self.name}-exit")
                    stopping = tg.create_task(stop.wait(), name=f"{self.name}-stop")
                    await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
                    writer.cancel()
                    if not exited.done():
                        stopped = True
                        await self._stop_child(pump, exited)
                    stopping.cancel()
                    # Members left behind by the leader would hold the pipes and duplicate
                    # the next run's work.
                    await self._kill_all()
                    await asyncio.wait((pump,), timeout=EXIT_DRAIN)
                    pump.cancel()
            except* FrameTooLarge as group:
                self.counters.too_large += 1
                reason = f"record stream broken ({group.exceptions[0]}); restarted"
                await self._kill_all()
                await self._wait_exit()
            status = self._reap()
        finally:
            await self._release()
        if reason is None:
            reason = "stopped" if stopped else _describe(status, self.cgroup is not None)
        return Outcome(reason, time.monotonic() - self.started)

    async def _stop_child(self, pump: asyncio.Task[None], exited: asyncio.Task[None]) -> None:
        self._close_task_pipe()
        await asyncio.wait((exited,), timeout=STOP_DRAIN)
        if exited.done():
            return
        pump.cancel()
        await asyncio.wait((pump,))
        self._close_record_pipes()
        await asyncio.wait((exited,), timeout=STOP_GRACE - STOP_DRAIN)
        if not exited.done():
            log.warning("plugin %s did not exit within %g s; killing it", self.name, STOP_GRACE)
            await self._kill_all()
            await exited

    async def _release(self) -> None:
        """Free every fd, and never leave a child behind, even when cancelled (again)."""
        try:
            if self._exit_status is None:
                # Cancelled (the supervisor itself is being torn down without stop()).
                await self._kill_all()
        finally:
            if self._exit_status is None:
                # The group was SIGKILLed before the first await: the blocking wait is short.
                self._reap()
            self._free()

    def _free(self) -> None:
        self._close_task_pipe()
        self._close_record_pipes()
        if self._stderr is not None:
            # It ends at the pipe's EOF, or soon after this if a stray process still holds
            # the pipe (one that left the plugin's process group).
            self._stderr.stop()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


async def run_to_end(fn: Callable[[], T]) -> T:
    """`fn()` (blocking, bounded in time) in a worker thread, so the loop goes on; awaited to
    its end even through a cancel, which is raised after: a thread cannot be stopped, and what
    it does (ending a plugin's processes) must be over before its owner goes on or ends."""
    loop = asyncio.get_running_loop()
    try:
        future = loop.run_in_executor(None, fn)
    except RuntimeError:  # the executor is shut down (the loop is closing): here, then
        return fn()
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((future,))
        if not future.cancelled() and future.exception() is not None:
            log.warning("%s failed while cancelled", fn, exc_info=future.exception())
        raise


async def _wait_fds(fds: list[int], *, writable: bool = False) -> None:
    """Wait until any of `fds` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add = loop.add_writer if writable else loop.add_reader
    remove = loop.remove_writer if writable else loop.remove_reader
    for fd in fds:
        add(fd, wake)
    try:
        await ready
    finally:
        for fd in fds:
            remove(fd)


async def _wait_fd(fd: int, *, writable: bool) -> None:
    await _wait_fds([fd], writable=writable)
