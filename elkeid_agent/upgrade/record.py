"""The upgrade record and the quarantine list: their shapes, encoding and the start-up
decision (pure: bytes in, bytes and decisions out; `files.py` does the reading and writing).

The record (`<work_dir>/upgrade.json`) is written before the executable is replaced, so the
process that starts from the new executable finds it. It is the only memory shared by the
old and the new process: how many times the new one started without confirming, when the
upgrade began, where the previous executable was saved, and, after a rollback, why. The
upgrade guard (`guard.py`, run from the previous executable before every start) counts the
starts too, in fields of its own, so a new version that dies before its Python code runs is
still counted.

Time since the swap: within one boot, CLOCK_BOOTTIME (monotonic, counts suspend), so an NTP
step of the wall clock cannot roll back a good version; across a reboot (another boot id)
the wall clock, the only clock both boots share.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import msgspec

RECORD_FILE = "upgrade.json"
QUARANTINE_FILE = "upgrade-quarantine.json"
#: The last upgrade's outcome, kept for `ctl status` (the record is gone by then).
OUTCOME_FILE = "upgrade-last.json"

Method = Literal["file", "dpkg", "rpm"]
Phase = Literal["swapped", "rolled_back"]


class UpgradeRecord(msgspec.Struct, kw_only=True, frozen=True):
    from_version: str
    to_version: str
    started_at: float  # unix time the swap began; the bound is measured from here
    starts_without_confirm: int = 0
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id at the swap ("": unknown)
    started_boottime: float = 0.0  # CLOCK_BOOTTIME at the swap, valid within boot_id
    guard_starts: int = 0  # starts counted by the upgrade guard (outside the new version)
    guard_invocation: str = ""  # the service start the guard counted last (systemd's id)
    # For people only: what was swapped. Never used as paths (rollback.roll_back copies
    # between the fixed names in the work dir), as this file may not be trusted.
    target: str  # the executable the service manager starts
    prev: str  # the saved previous executable
    method: Method = "file"
    phase: Phase = "swapped"
    reason: str = ""  # why it was rolled back (phase rolled_back)


class Quarantine(msgspec.Struct, frozen=True):
    """Versions not to try again before the unix time they map to."""

    versions: dict[str, float] = msgspec.field(default_factory=dict)

    def until(self, version: str, now: float) -> float | None:
        until = self.versions.get(version)
        return until if until is not None and until > now else None

    def add(self, version: str, until: float, now: float) -> Quarantine:
        kept = {v: t for v, t in self.versions.items() if t > now}
        kept[version] = until
        return Quarantine(kept)


@dataclass(frozen=True)
class BootTime:
    """CLOCK_BOOTTIME seconds, meaningful only within the boot named by boot_id."""

    boot_id: str
    seconds: float


def elapsed_since_swap(record: UpgradeRecord, now: float, boot: BootTime | None) -> float:
    """Seconds since the swap: monotonic within the swap's boot, wall clock across boots."""
    if boot is not None and record.boot_id and record.boot_id == boot.boot_id:
        return boot.seconds - record.started_boottime
    return now - record.started_at


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    """How the last upgrade ended: which version runs, which was rolled back and why."""

    from_version: str
    to_version: str
    result: Literal["confirmed", "rolled_back"]
    reason: str = ""
    at: float  # unix time


class CorruptFile(Exception):
    """A record or quarantine file that does not decode."""


def encode_record(record: UpgradeRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_record(raw: bytes) -> UpgradeRecord:
    try:
        return msgspec.json.decode(raw, type=UpgradeRecord)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptFile(f"{RECORD_FILE}: {exc}") from exc


def encode_outcome(outcome: Outcome) -> bytes:
    return msgspec.json.encode(outcome)


def decode_outcome(raw: bytes) -> Outcome:
    try:
        return msgspec.json.decode(raw, type=Outcome)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptFile(f"{OUTCOME_FILE}: {exc}") from exc


def encode_quarantine(q: Quarantine) -> bytes:
    return msgspec.json.encode(q)


def decode_quarantine(raw: bytes) -> Quarantine:
    try:
        return msgspec.json.decode(raw, type=Quarantine)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptFile(f"{QUARANTINE_FILE}: {exc}") from exc


class Verdict(enum.Enum):
    """What a starting process does about the record it found."""

    NONE = "none"  # no record: nothing pending
    AWAIT_CONFIRM = "await_confirm"  # we are the new version, within the limits
    ROLL_BACK = "roll_back"  # we are the new version and out of chances: restore, exit
    REPORT_ROLLBACK = "report_rollback"  # we are the old version, back after a rollback
    NOT_TAKEN = "not_taken"  # we are the old version: the swap never happened
    STALE = "stale"  # a record naming neither our version: left over, dropped


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    record: UpgradeRecord | None  # the record to keep (None: remove it)
    reason: str = ""


def decide_at_start(
    record: UpgradeRecord | None,
    version: str,
    now: float,
    *,
    bound: float,
    max_starts: int,
    boot: BootTime | None = None,
) -> Decision:
    """The start-up decision: count this start, roll back after `max_starts` unconfirmed
    starts or once `bound` seconds have passed since the swap."""
    if record is None:
        return Decision(Verdict.NONE, None)
    if record.phase == "swapped" and record.to_version == version:
        starts = record.starts_without_confirm + 1
        counted = msgspec.structs.replace(record, starts_without_confirm=starts)
        elapsed = elapsed_since_swap(record, now, boot)
        if starts > max_starts:
            why = f"{version} started {starts - 1} times without reaching the server"
            return Decision(Verdict.ROLL_BACK, counted, why)
        if elapsed > bound:
            why = f"{version} did not reach the server within {bound:g} s"
            return Decision(Verdict.ROLL_BACK, counted, why)
        return Decision(Verdict.AWAIT_CONFIRM, counted)
    if record.phase == "rolled_back" and record.to_version == version:
        # Killed after deciding to roll back but before the old executable was back in
        # place: finish the job.
        return Decision(Verdict.ROLL_BACK, record, record.reason)
    if record.from_version == version:
        if record.phase == "rolled_back":
            return Decision(Verdict.REPORT_ROLLBACK, None, record.reason)
        why = f"the upgrade to {record.to_version} did not take effect"
        return Decision(Verdict.NOT_TAKEN, None, why)
    why = f"upgrade record from {record.from_version} to {record.to_version} names neither"
    return Decision(Verdict.STALE, None, f"{why} this version ({version})")


def decide_guard(
    record: UpgradeRecord | None,
    now: float,
    *,
    bound: float,
    max_starts: int,
    boot: BootTime | None = None,
    invocation: str = "",
) -> Decision:
    """The upgrade guard's decision before a start of the service (it runs from the previous
    executable, whatever the new one is): count this start in the record, and roll back
    once the new version has had `max_starts` unconfirmed starts or `bound` has passed.

    `invocation` names the start (systemd's INVOCATION_ID): a start already counted (the
    guard ran twice for one start) is not counted again. Any record that is not a pending
    swap is the agent's own business (NONE)."""
    if record is None or record.phase != "swapped":
        return Decision(Verdict.NONE, record)
    if invocation and invocation == record.guard_invocation:
        return Decision(Verdict.NONE, record)
    starts = record.guard_starts + 1
    counted = msgspec.structs.replace(record, guard_starts=starts, guard_invocation=invocation)
    if starts > max_starts:
        why = (f"{record.to_version} started {starts - 1} times without reaching the server "
               f"(counted by the upgrade guard)")
        return Decision(Verdict.ROLL_BACK, counted, why)
    if elapsed_since_swap(record, now, boot) > bound:
        why = f"{record.to_version} did not reach the server within {bound:g} s"
        return Decision(Verdict.ROLL_BACK, counted, why)
    return Decision(Verdict.AWAIT_CONFIRM, counted)
