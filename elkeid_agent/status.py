"""The agent's status file, `<work_dir>/status.json`, read by `elkeid-agent ctl status`.

The running agent rewrites it on every heartbeat; `ctl` runs in another process (often
while the agent is restarting), so the file is replaced atomically and a missing or
unreadable file reads as "no status" rather than an error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec

STATUS_FILE = "status.json"


class AgentStatus(msgspec.Struct, kw_only=True):
    pid: int
    version: str
    state: str
    net_mode: str
    connected: bool
    server: str
    last_heartbeat: float  # unix time of the last heartbeat sent, 0 if none yet
    updated: float  # unix time this record was written
    upgrade_state: str = "idle"
    spool_state: str = "disabled"
    spool_records: int = 0
    spool_bytes: int = 0
    spool_oldest_seconds: float = 0.0
    spool_dropped_records: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AgentStatus)


def write_status(work_dir: Path, st: AgentStatus) -> None:
    """Replace the status file atomically (readers see the old or the new record)."""
    fd, tmp = tempfile.mkstemp(prefix=".status.", suffix=".tmp", dir=work_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_encoder.encode(st))
        os.chmod(tmp, 0o644)
        os.replace(tmp, work_dir / STATUS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(work_dir: Path) -> AgentStatus | None:
    """The last status the agent wrote, or None when there is none or it is unreadable."""
    try:
        return _decoder.decode((work_dir / STATUS_FILE).read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
