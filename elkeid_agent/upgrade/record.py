"""The upgrade record and the quarantine list: their shapes, encoding and the start-up
decision (pure: bytes in, bytes and decisions out; `files.py` does the reading and writing).

The record (`<work_dir>/upgrade.json`) is written before the executable is replaced, so the
process that starts from the new executable finds it. It is the only memory shared by the
old and the new process: how many times the new one started without confirming, when the
upgrade began, where the previous executable was saved, and, after a rollback, why.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

import msgspec

RECORD_FILE = "upgrade.json"
QUARANTINE_FILE = "upgrade-quarantine.json"

Method = Literal["file", "dpkg", "rpm"]
Phase = Literal["swapped", "rolled_back"]


class UpgradeRecord(msgspec.Struct, kw_only=True, frozen=True):
    from_version: str
    to_version: str
    started_at: float  # unix time the swap began; the bound is measured from here
    starts_without_confirm: int = 0
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


class CorruptFile(Exception):
    """A record or quarantine file that does not decode."""


def encode_record(record: UpgradeRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_record(raw: bytes) -> UpgradeRecord:
    try:
        return msgspec.json.decode(raw, type=UpgradeRecord)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptFile(f"{RECORD_FILE}: {exc}") from exc


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
) -> Decision:
    """The start-up decision: count this start, roll back after `max_starts` unconfirmed
    starts or once `bound` seconds have passed since the swap."""
    if record is None:
        return Decision(Verdict.NONE, None)
    if record.phase == "swapped" and record.to_version == version:
        starts = record.starts_without_confirm + 1
        counted = msgspec.structs.replace(record, starts_without_confirm=starts)
        elapsed = now - record.started_at
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
