"""Restoring the previous executable, and the clocks the confirmation bound is measured on.

Shared by the start-up check and the running agent (`manager.py`) and by the upgrade guard
(`guard.py`), which runs from the previous executable before every start of the service and
must stay light: nothing here imports grpc or the run path.
"""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

import msgspec

from elkeid_agent.readcap import SMALL_FILE_BYTES, read_text_capped
from elkeid_agent.upgrade import swap
from elkeid_agent.upgrade.record import BootTime, CorruptFile, Outcome, Quarantine, UpgradeRecord

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: The only files a rollback copies: the previous executable over the executable.
EXECUTABLE = "elkeid-agent"
PREV_EXECUTABLE = "elkeid-agent.prev"


def boot_time() -> BootTime | None:
    """This boot's id and CLOCK_BOOTTIME; None where the kernel does not say (the bound then
    falls back to the wall clock)."""
    try:
        boot_id = read_text_capped(BOOT_ID, SMALL_FILE_BYTES).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return BootTime(boot_id, time.clock_gettime(time.CLOCK_BOOTTIME)) if boot_id else None


def read_quarantine(work_dir: Path) -> Quarantine:
    try:
        return swap.read_quarantine(work_dir)
    except CorruptFile as exc:
        log.error("upgrade: %s; starting a new quarantine list", exc)
        return Quarantine()


def roll_back(
    work_dir: Path, record: UpgradeRecord, reason: str, now: float, quarantine_seconds: float
) -> str:
    """Quarantine `record.to_version`, mark the record rolled back, restore the previous
    executable. In this order, so a kill at any point is finished by the next start (the
    record says "rolled_back" before the executable changes). Returns the message.

    The record's `prev` and `target` are never used as paths: whoever can write
    upgrade.json would make the root guard copy any file over any other. The copy is
    always `<work_dir>/elkeid-agent.prev` over `<work_dir>/elkeid-agent`."""
    until = now + quarantine_seconds
    quarantine = read_quarantine(work_dir).add(record.to_version, until, now)
    swap.write_quarantine(work_dir, quarantine)
    swap.write_record(work_dir, msgspec.structs.replace(record, phase="rolled_back",
                                                        reason=reason))
    target = work_dir / EXECUTABLE
    prev = work_dir / PREV_EXECUTABLE
    if not stat.S_ISREG(prev.lstat().st_mode):  # a symlink would name any file
        raise OSError(f"{prev} is not a regular file")
    swap.copy_atomic(prev, target, swap.executable_mode(target))
    message = rollback_message(record, reason, until)
    write_outcome(work_dir, Outcome(from_version=record.from_version,
                                    to_version=record.to_version, result="rolled_back",
                                    reason=message, at=now))
    return message


def write_outcome(work_dir: Path, outcome: Outcome) -> None:
    """Best effort: the outcome file only informs `ctl status`."""
    try:
        swap.write_outcome(work_dir, outcome)
    except OSError as exc:
        log.warning("upgrade: cannot write the outcome for ctl status: %s", exc)


def rollback_message(record: UpgradeRecord, reason: str, until: float | None) -> str:
    message = f"upgrade from {record.from_version} to {record.to_version} rolled back: {reason}"
    if until is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
        message += f"; {record.to_version} quarantined until {stamp}"
    if record.method != "file":
        message += (f" (the {record.method} database still lists {record.to_version}; "
                    f"the executable is {record.from_version})")
    return message
