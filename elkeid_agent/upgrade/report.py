"""What `ctl status` says about the self-upgrade, read from the work dir's files directly
(so it shows while the agent is down or crash-looping): a pending upgrade and its start
count, how the last upgrade ended (which version was rolled back to which, and why) and
what is quarantined. Reading only; light (no grpc, no run path)."""

from __future__ import annotations

import time
from pathlib import Path

from elkeid_agent.readcap import CONFIG_FILE_BYTES, read_capped
from elkeid_agent.upgrade.record import (
    OUTCOME_FILE,
    QUARANTINE_FILE,
    RECORD_FILE,
    CorruptFile,
    decode_outcome,
    decode_quarantine,
    decode_record,
)


def _read(work_dir: Path, name: str) -> bytes | None:
    try:
        return read_capped(work_dir / name, CONFIG_FILE_BYTES)
    except OSError:
        return None


def _when(ts: float, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))
    return f"{stamp} ({now - ts:.0f} s ago)"


def upgrade_lines(work_dir: Path, now: float) -> list[str]:
    """Lines for `ctl status`; none when no upgrade left a trace."""
    try:
        raw = _read(work_dir, RECORD_FILE)
        record = decode_record(raw) if raw is not None else None
        raw = _read(work_dir, OUTCOME_FILE)
        outcome = decode_outcome(raw) if raw is not None else None
        raw = _read(work_dir, QUARANTINE_FILE)
        quarantine = decode_quarantine(raw).versions if raw is not None else {}
    except CorruptFile as exc:
        return [f"upgrade files: {exc}"]
    lines = []
    if record is not None and record.phase == "swapped":
        starts = max(record.starts_without_confirm, record.guard_starts)
        lines.append(f"upgrade pending: {record.from_version} -> {record.to_version} "
                     f"({record.method}), {starts} start(s) without confirmation")
    elif record is not None:
        lines.append(f"upgrade rolling back: {record.from_version} <- {record.to_version}: "
                     f"{record.reason}")
    if outcome is not None and outcome.result == "confirmed":
        lines.append(f"last upgrade: {outcome.from_version} -> {outcome.to_version} confirmed "
                     f"{_when(outcome.at, now)}")
    elif outcome is not None:
        lines.append(f"last upgrade: {outcome.to_version} rolled back to "
                     f"{outcome.from_version} {_when(outcome.at, now)}: {outcome.reason}")
    for version, until in sorted(quarantine.items()):
        if until > now:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(until))
            lines.append(f"quarantined: {version} until {stamp}")
    return lines
