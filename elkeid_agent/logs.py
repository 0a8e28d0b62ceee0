"""Logging: a rotating, gzipped file in `<work_dir>/log/`, stderr, and 1010 records.

Error-level entries go to the server as 1010 records through a token bucket, so a log storm
costs at most `records_per_minute` records; what the bucket refused is counted.

The file never ends the agent: a line that cannot be written (full or read-only disk, missing
directory) goes to stderr instead and is counted, and the file is reopened for the next line;
`LogFileHandler.error` names the path and errno until a write succeeds again. Rotated files
are gzipped by a thread the handler owns and stops in `close()`, off the event loop.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import select
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

from elkeid_agent.config import LogConfig
from elkeid_agent.fsutil import describe_error
from elkeid_agent.redact import redact
from elkeid_agent.wire import encode_record

AGENT_LOG = 1010
LOG_NAME = "elkeid-agent.log"
#: The log holds what status.json holds: owner and group only.
LOG_MODE = 0o640
#: C0 controls but tab, and DEL, as visible escapes (`\n`, `\x1b`).
CONTROL_ESCAPES = {
    code: ("\\n" if code == 10 else "\\r" if code == 13 else f"\\x{code:02x}")
    for code in (*range(32), 127)
    if code != 9
}
#: The same but for the line feeds that separate a traceback's lines.
_TRACEBACK_ESCAPES = {code: text for code, text in CONTROL_ESCAPES.items() if code != 10}
#: The file being compressed; its name is fixed, so a leftover of a killed agent is found.
ROTATING_SUFFIX = ".rotating"
# Writes of at most this size to a pipe are atomic; a longer fallback line is cut.
_PIPE_BUF = select.PIPE_BUF
#: The live file never grows past this many times `max_bytes`, rotation or not.
HARD_CAP_FACTOR = 2


class LogFileHandler(logging.Handler):
    """Appends to `path`, rotates at `max_bytes`, keeps `backups` gzipped files; never raises.

    Rotation renames the file to `<name>.rotating` (one rename, on the logging thread) and
    starts a fresh one; the compressor thread shifts `<name>.N.gz` and gzips it into
    `<name>.1.gz`. While a compression is still running the next rotation waits.
    """

    def __init__(
        self, path: Path, max_bytes: int, backups: int, fallback: TextIO | None = None
    ) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.fallback = fallback
        #: What the last failed write said (path and errno), None once a write succeeds.
        self.error: str | None = None
        self.failed_writes = 0
        self.stderr_dropped = 0
        #: Lines kept out of the file because it reached HARD_CAP_FACTOR x max_bytes while
        #: no rotation could be made (they go to stderr instead).
        self.over_cap = 0
        self._fd: int | None = None
        self._size = 0
        self._lost = 0  # lines not written since the last successful write
        self._torn = False  # a line was cut off: the next write starts on a new line
        self._rotation_held = False  # a rename failed: tried again after the next retry()
        self._closed = False
        self._compressor = _Compressor(path, backups)
        if self._compressor.pending.exists():  # a killed agent's unfinished rotation
            self._compressor.request()

    @property
    def rotation_failures(self) -> int:
        return self._compressor.failures

    # -- logging.Handler --------------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # noqa: BLE001 - logging's contract: report through handleError
            self.handleError(record)
            return
        if not self._write(data):
            self._to_fallback(data)

    def close(self) -> None:
        # Not under self.lock: the compressor thread may be logging (and so waiting for it).
        self._compressor.close()
        self.acquire()
        try:
            self._closed = True
            self._close_fd()
        finally:
            self.release()
        super().close()

    # -- recovery -----------------------------------------------------------------------------

    def retry(self) -> None:
        """After failures, try the file once more (the disk may have room again); and reopen
        a file that was deleted under the open descriptor (its lines would go nowhere).

        Called on each heartbeat, so the file recovers, and `error` clears, even when nothing
        else is logged; the line written says how much was lost.
        """
        self.acquire()
        try:
            self._rotation_held = False
            if self._fd is not None and self._unlinked(self._fd):
                self._close_fd()
            if self.error is not None and not self._closed:
                self._write(b"")
        finally:
            self.release()

    @staticmethod
    def _unlinked(fd: int) -> bool:
        try:
            return os.fstat(fd).st_nlink == 0
        except OSError:
            return True

    # -- internals ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        if self._closed:
            return False
        line = 1 if data else 0  # b"" is retry()'s probe, not a line
        if self._fd is not None and self._size + len(data) > HARD_CAP_FACTOR * self.max_bytes:
            self._rotate()
            if self._fd is not None:
                # No rotation could be made (a rename refused, a compression still running):
                # the file stops growing here rather than fill the disk the spool shares.
                self.over_cap += line
                return False
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # O_NONBLOCK: no effect on a regular file; a FIFO put at the path (ENXIO
                # without a reader) must not hold the event loop's thread in open().
                self._fd = os.open(
                    self.path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK,
                    LOG_MODE,
                )
                st = os.fstat(self._fd)
                # A file left by an older version was world-readable; it holds what
                # status.json (0640) holds. Narrowed only (a stricter mode stays), and at best:
                # a file of another owner or a filesystem refusing chmod still takes the log.
                narrowed = st.st_mode & LOG_MODE
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o7777 != narrowed:
                    with contextlib.suppress(OSError):
                        os.fchmod(self._fd, narrowed)
                self._size = st.st_size
            if self._lost or self._torn:
                data = self._recovery_note() + data
            self._write_all(self._fd, data)
        except OSError as exc:
            self.failed_writes += line
            self._lost += line
            # The path that failed: the file, or its directory when that cannot be made.
            self.error = describe_error(Path(exc.filename or self.path), exc)
            self._close_fd()
            return False
        self.error = None
        self._lost = 0
        if self._size >= self.max_bytes:
            self._rotate()
        return True

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(fd, view)
            except OSError:
                self._torn = self._torn or len(view) < len(data)
                raise
            self._size += written
            view = view[written:]
        self._torn = False

    def _recovery_note(self) -> bytes:
        note = logging.makeLogRecord({
            "name": __name__,
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": f"log file writable again; {self._lost} lines were not written to it",
        })
        return (b"\n" if self._torn else b"") + (self.format(note) + "\n").encode()

    def _rotate(self) -> None:
        compressor = self._compressor
        if self._rotation_held or compressor.busy() or compressor.pending.exists():
            return  # the previous rotation is still being compressed, or could not be made
        try:
            os.rename(self.path, compressor.pending)  # the open descriptor follows the file
        except OSError:
            # Counted, not logged: logging here would come straight back to this handler.
            # The file stays open and takes lines (a read-only bind over it leaves it writable).
            compressor.failures += 1
            self._rotation_held = True
            return
        self._close_fd()  # all of it is in `pending`: the next line opens a fresh file
        compressor.request()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _to_fallback(self, data: bytes) -> None:
        """The line to stderr, unless that would block (a pipe nobody reads)."""
        if self.fallback is None:
            return
        try:
            fd = self.fallback.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if not poller.poll(0):
                self.stderr_dropped += 1
                return
            os.write(fd, data[:_PIPE_BUF])
        except (OSError, ValueError):
            self.stderr_dropped += 1


class _Compressor:
    """The handler's own thread: gzips `<name>.rotating` into `<name>.1.gz` after shifting."""

    def __init__(self, path: Path, backups: int) -> None:
        self.path = path
        self.backups = backups
        self.pending = path.with_name(path.name + ROTATING_SUFFIX)
        self.failures = 0
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        return not self._idle.is_set()

    def request(self) -> None:
        if self._stopping:
            return
        self._idle.clear()
        if self._thread is None:
            # Daemon only as a safety net: close() stops and joins it at shutdown.
            self._thread = threading.Thread(target=self._run, name="log-rotate", daemon=True)
            self._thread.start()
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self.pending.exists():
                try:
                    self._compress()
                except OSError as exc:
                    # Full or read-only: drop the rotated lines rather than keep filling the disk.
                    with contextlib.suppress(OSError):
                        self.pending.unlink()
                    self.failures += 1
                    # This thread is not the handler's caller: the line cannot recurse here.
                    logging.getLogger(__name__).warning(
                        "log rotation failed: %s", describe_error(self.path, exc)
                    )
            self._idle.set()
            if self._stopping:
                return

    def _gz(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}.gz")

    def _compress(self) -> None:
        if self.backups < 1:
            self.pending.unlink()
            return
        for index in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._gz(index), self._gz(index + 1))
        staged = self._gz(1).with_name(self._gz(1).name + ".new")
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, LOG_MODE)
            with (
                open(self.pending, "rb") as src,
                open(fd, "wb") as raw,
                gzip.GzipFile(fileobj=raw, mode="wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            os.replace(staged, self._gz(1))
        except BaseException:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise
        self.pending.unlink()


class RedactingFormatter(logging.Formatter):
    """Every line, traceback included, with URL credentials masked (redact.py).

    Control characters in a message are escaped: text from the server or a plugin (a version,
    a name, an error) cannot start a line of its own that reads as the agent's. Only the
    records that ask for it (`extra={"verbatim": True}`: the SIGUSR1 dump) keep theirs.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not getattr(record, "verbatim", False):
            record.message = record.message.translate(CONTROL_ESCAPES)
        return super().formatMessage(record)

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        # An exception's text is anyone's (a server's field name, a plugin's error): every
        # line is indented, so none starts at the margin where records start.
        text = super().formatException(ei).translate(_TRACEBACK_ESCAPES)
        return "\n".join("  " + line for line in text.split("\n"))

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info:
            record.exc_text = None  # another handler's formatter may have cached its own
        return redact(super().format(record))


class RecordHandler(logging.Handler):
    """Turns error-level entries into 1010 records, rate-limited by a token bucket."""

    def __init__(self, emit: Callable[[bytes], None], per_minute: int) -> None:
        super().__init__(logging.ERROR)
        self._emit = emit
        self._capacity = float(max(per_minute, 1))
        self._tokens = self._capacity
        self._rate = self._capacity / 60.0
        self._last = time.monotonic()
        self.suppressed = 0

    def emit(self, record: logging.LogRecord) -> None:
        # A handler must never raise into the code that logged (a TaskGroup task, say).
        try:
            self._send(record)
        except Exception:  # noqa: BLE001 - logging's contract: report through handleError
            self.handleError(record)

    def _send(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        fields = {
            "level": record.levelname.lower(),
            "msg": redact(record.getMessage()),
            "source": f"{record.pathname.rsplit('/', 1)[-1]}:{record.lineno}",
            "logger": record.name,
        }
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = redact(repr(record.exc_info[1]))
        self._emit(encode_record(AGENT_LOG, int(record.created), fields))


def setup_logging(work_dir: Path, config: LogConfig) -> LogFileHandler:
    """Configure the root logger with the file (and terminal) handlers; returns the file's.

    Never raises for the file: a work dir that cannot hold it (read-only, full, missing)
    leaves stderr as the only log, and the handler's `error` says why.
    """
    root = logging.getLogger()
    root.setLevel(config.level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, LogFileHandler):
            handler.close()
    fmt = RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_terminal = sys.stderr.isatty() or bool(os.environ.get("ELKEID_LOG_STDERR"))
    # Lines the file could not take go to stderr, unless every line already does.
    file_handler = LogFileHandler(
        work_dir / "log" / LOG_NAME,
        config.file_bytes,
        config.file_count,
        fallback=None if to_terminal else sys.stderr,
    )
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if to_terminal:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)
    return file_handler
