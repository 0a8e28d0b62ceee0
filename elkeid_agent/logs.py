"""Logging: a rotating, gzipped file in `<work_dir>/log/`, stderr on a terminal, and 1010 records.

Error-level entries go to the server as 1010 records through a token bucket, so a log storm
costs at most `records_per_minute` records; what the bucket refused is counted.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path

from elkeid_agent.config import LogConfig
from elkeid_agent.wire import encode_record

AGENT_LOG = 1010
LOG_NAME = "elkeid-agent.log"


class GzipRotatingFileHandler(RotatingFileHandler):
    """RotatingFileHandler whose rotated files are gzipped (`elkeid-agent.log.1.gz`, ...)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.namer = lambda name: name + ".gz"
        self.rotator = _gzip_rotate


def _gzip_rotate(source: str, dest: str) -> None:
    with open(source, "rb") as src, gzip.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.unlink(source)


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
            "msg": record.getMessage(),
            "source": f"{record.pathname.rsplit('/', 1)[-1]}:{record.lineno}",
            "logger": record.name,
        }
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
        self._emit(encode_record(AGENT_LOG, int(record.created), fields))


def setup_logging(work_dir: Path, config: LogConfig) -> logging.Logger:
    """Configure the root logger with the file (and terminal) handlers; returns it."""
    root = logging.getLogger()
    root.setLevel(config.level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_dir = work_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = GzipRotatingFileHandler(
        log_dir / LOG_NAME, config.file_bytes, config.file_count
    )
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    if sys.stderr.isatty() or os.environ.get("ELKEID_LOG_STDERR"):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)
    return root
