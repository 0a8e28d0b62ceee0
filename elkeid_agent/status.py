"""The agent's status file, `<work_dir>/status.json`, read by `elkeid-agent ctl status`.

The running agent writes it at start (`starting`), on every heartbeat, whenever the connection
comes up or goes down (with the reason), and at stop (`stopped`, with the exit reason). `ctl`
runs in another process (often while the agent is restarting), so the file is replaced
atomically and a missing or unreadable file reads as "no status" rather than an error. A record
that says running is believed only while its pid is alive and is that same process
(`started`, the process's start time, tells a reused pid apart).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from elkeid_agent.fsutil import atomic_write
from elkeid_agent.readcap import CONFIG_FILE_BYTES, read_capped

STATUS_FILE = "status.json"
# Owner read-write, group read (a monitoring group), others nothing: the detail names hosts,
# paths and reasons an unprivileged user of the host has no business reading.
STATUS_MODE = 0o640


class AgentStatus(msgspec.Struct, kw_only=True):
    pid: int
    version: str
    state: str  # starting, running, abnormal (see detail), stopped
    net_mode: str
    connected: bool
    server: str
    last_heartbeat: float  # unix time of the last heartbeat sent, 0 if none yet
    updated: float  # unix time this record was written
    upgrade_state: str = "idle"
    started: float = 0.0  # unix time the process started (as the kernel counts it)
    connected_since: float = 0.0  # unix time the current stream opened, 0 when not connected
    detail: list[str] = msgspec.field(default_factory=list)  # the heartbeat's state_detail
    exit_reason: str = ""  # why the agent stopped (state stopped)
    spool_state: str = "disabled"
    spool_records: int = 0
    spool_bytes: int = 0
    spool_oldest_seconds: float = 0.0
    spool_dropped_records: int = 0
    upgrade_hold: str = ""  # config, ctl, or "" (upgrade/hold.py)
    upgrade_held_version: str = ""  # pushed while held, not installed
    warnings: list[str] = msgspec.field(default_factory=list)  # e.g. a certificate expiring
    plugin_limits: str = ""  # whether per-plugin cgroup limits apply, and why not


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AgentStatus)


def write_status(work_dir: Path, st: AgentStatus) -> None:
    """Replace the status file atomically (readers see the old or the new record).

    Not durable (no fsync): it describes a live process and is rewritten every heartbeat,
    so after a power loss an old or missing copy is as good as the latest. OSError (a full or
    read-only disk) is the caller's to report.
    """
    atomic_write(work_dir / STATUS_FILE, _encoder.encode(st), STATUS_MODE, durable=False)


def read_status(work_dir: Path) -> AgentStatus | None:
    """The last status the agent wrote, or None when there is none or it is unreadable."""
    try:
        return _decoder.decode(read_capped(work_dir / STATUS_FILE, CONFIG_FILE_BYTES))
    except (OSError, msgspec.DecodeError):
        return None
