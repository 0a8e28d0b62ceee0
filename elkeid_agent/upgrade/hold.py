"""The upgrade hold: while held, the running agent version stays whatever the server pushes.

Two sources, either one holds: `upgrade.hold = true` in the config (fixed for the process),
and the file `<work_dir>/upgrade-hold` that `elkeid-agent ctl hold` writes and `ctl release`
removes. The running agent looks for the file whenever the server pushes a version and at each
heartbeat while a pushed version waits, so a hold or a release needs no restart. The file's
content (when and why it was set) is for the operator; its existence is the hold.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import msgspec

from elkeid_agent.fsutil import atomic_write

HOLD_FILE = "upgrade-hold"
MAX_REASON = 200


class HoldRecord(msgspec.Struct, kw_only=True):
    since: float = 0.0
    reason: str = ""


def hold_source(work_dir: Path, configured: bool) -> str:
    """`config`, `ctl` or "" (not held); config wins: `ctl release` cannot lift it."""
    if configured:
        return "config"
    try:
        return "ctl" if (work_dir / HOLD_FILE).exists() else ""
    except OSError:
        return ""


def read_hold(work_dir: Path) -> HoldRecord | None:
    """The `ctl hold` record; a file that exists but does not parse still holds."""
    path = work_dir / HOLD_FILE
    try:
        data = path.read_bytes()
    except OSError:
        return None
    with contextlib.suppress(msgspec.DecodeError):
        return msgspec.json.decode(data, type=HoldRecord)
    return HoldRecord()


def set_hold(work_dir: Path, reason: str, now: float | None = None) -> Path:
    path = work_dir / HOLD_FILE
    record = HoldRecord(since=time.time() if now is None else now, reason=reason[:MAX_REASON])
    atomic_write(path, msgspec.json.encode(record), 0o644)
    return path


def clear_hold(work_dir: Path) -> bool:
    """Remove the `ctl hold`; False when there was none."""
    try:
        (work_dir / HOLD_FILE).unlink()
    except FileNotFoundError:
        return False
    return True
