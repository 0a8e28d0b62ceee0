"""The upgrade record's encoding, the start-up and guard decisions as tables, and the
clock the confirmation bound is measured on."""

from __future__ import annotations

import pytest

from elkeid_agent.upgrade.record import (
    BootTime,
    CorruptFile,
    Outcome,
    Quarantine,
    UpgradeRecord,
    Verdict,
    decide_at_start,
    decide_guard,
    decode_outcome,
    decode_quarantine,
    decode_record,
    elapsed_since_swap,
    encode_outcome,
    encode_quarantine,
    encode_record,
)

T0 = 1_000_000.0
BOUND = 600.0


def rec(**kw: object) -> UpgradeRecord:
    base: dict[str, object] = dict(from_version="A", to_version="B", started_at=T0,
                                   target="/w/elkeid-agent", prev="/w/elkeid-agent.prev")
    base.update(kw)
    return UpgradeRecord(**base)  # type: ignore[arg-type]


def test_record_round_trip_and_corruption() -> None:
    r = rec(starts_without_confirm=2, method="dpkg", phase="rolled_back", reason="why")
    assert decode_record(encode_record(r)) == r
    for bad in (b"", b"{", b'{"from_version": 1}', b'{"from_version":"A"}'):
        with pytest.raises(CorruptFile):
            decode_record(bad)


def test_quarantine_until_add_and_prune() -> None:
    q = Quarantine().add("B", T0 + 100, T0)
    assert q.until("B", T0) == T0 + 100
    assert q.until("B", T0 + 100) is None  # expired
    assert q.until("C", T0) is None
    q2 = q.add("C", T0 + 500, T0 + 200)  # B has expired by then: pruned
    assert q2.versions == {"C": T0 + 500}
    assert decode_quarantine(encode_quarantine(q2)) == q2
    with pytest.raises(CorruptFile):
        decode_quarantine(b"[1,2]")


@pytest.mark.parametrize(
    ("record", "version", "now", "verdict", "starts", "reason"),
    [
        (None, "A", T0, Verdict.NONE, None, ""),
        # The new version's starts: counted, fine up to 3.
        (rec(), "B", T0 + 1, Verdict.AWAIT_CONFIRM, 1, ""),
        (rec(starts_without_confirm=2), "B", T0 + 1, Verdict.AWAIT_CONFIRM, 3, ""),
        # The fourth start without a confirmation: crash loop.
        (rec(starts_without_confirm=3), "B", T0 + 1, Verdict.ROLL_BACK, 4, "started 3 times"),
        # The bound passed.
        (rec(), "B", T0 + BOUND + 1, Verdict.ROLL_BACK, 1, "within 600 s"),
        (rec(), "B", T0 + BOUND, Verdict.AWAIT_CONFIRM, 1, ""),
        # Killed between deciding to roll back and restoring: roll back again.
        (rec(phase="rolled_back", reason="r"), "B", T0 + 1, Verdict.ROLL_BACK, 0, "r"),
        # The old version again.
        (rec(phase="rolled_back", reason="r"), "A", T0 + 1, Verdict.REPORT_ROLLBACK, None, "r"),
        (rec(), "A", T0 + 1, Verdict.NOT_TAKEN, None, "did not take effect"),
        # Neither.
        (rec(), "C", T0 + 1, Verdict.STALE, None, "names neither"),
    ],
)
def test_start_up_decision(
    record: UpgradeRecord | None, version: str, now: float, verdict: Verdict,
    starts: int | None, reason: str,
) -> None:
    decision = decide_at_start(record, version, now, bound=BOUND, max_starts=3)
    assert decision.verdict is verdict
    if starts is None:
        assert decision.record is None
    else:
        assert decision.record is not None
        assert decision.record.starts_without_confirm == starts
    assert reason in decision.reason


BOOT = BootTime("boot-1", 5_000.0)


@pytest.mark.parametrize(
    ("record", "now", "boot", "elapsed"),
    [
        # Same boot: CLOCK_BOOTTIME, whatever the wall clock did (an NTP step of a day).
        (rec(boot_id="boot-1", started_boottime=4_900.0), T0 + 86_400, BOOT, 100.0),
        (rec(boot_id="boot-1", started_boottime=4_900.0), T0 - 86_400, BOOT, 100.0),
        # Another boot, or a record without a boot id (older version): the wall clock.
        (rec(boot_id="boot-0", started_boottime=4_900.0), T0 + 30, BOOT, 30.0),
        (rec(), T0 + 30, BOOT, 30.0),
        (rec(boot_id="boot-1", started_boottime=4_900.0), T0 + 30, None, 30.0),
    ],
)
def test_elapsed_since_swap_is_monotonic_within_a_boot(
    record: UpgradeRecord, now: float, boot: BootTime | None, elapsed: float
) -> None:
    assert elapsed_since_swap(record, now, boot) == elapsed


def test_a_wall_clock_step_does_not_roll_back_within_the_boot() -> None:
    record = rec(boot_id="boot-1", started_boottime=4_900.0)
    stepped = T0 + 10 * BOUND  # the wall clock jumped forward; only 100 s really passed
    decision = decide_at_start(record, "B", stepped, bound=BOUND, max_starts=3, boot=BOOT)
    assert decision.verdict is Verdict.AWAIT_CONFIRM
    later = BootTime("boot-1", 4_900.0 + BOUND + 1)
    decision = decide_at_start(record, "B", T0, bound=BOUND, max_starts=3, boot=later)
    assert decision.verdict is Verdict.ROLL_BACK
    assert "within 600 s" in decision.reason


@pytest.mark.parametrize(
    ("record", "invocation", "verdict", "guard_starts", "reason"),
    [
        (None, "i1", Verdict.NONE, None, ""),
        (rec(), "i1", Verdict.AWAIT_CONFIRM, 1, ""),
        (rec(guard_starts=2, guard_invocation="i2"), "i3", Verdict.AWAIT_CONFIRM, 3, ""),
        (rec(guard_starts=3, guard_invocation="i3"), "i4", Verdict.ROLL_BACK, 4,
         "B started 3 times without reaching the server (counted by the upgrade guard)"),
        # The same systemd start seen twice: not counted again.
        (rec(guard_starts=1, guard_invocation="i1"), "i1", Verdict.NONE, 1, ""),
        # Without an invocation id (another supervisor) every run counts.
        (rec(guard_starts=1), "", Verdict.AWAIT_CONFIRM, 2, ""),
        # Past the bound.
        (rec(started_at=T0 - BOUND - 1), "i1", Verdict.ROLL_BACK, 1, "within 600 s"),
        # Not a pending swap: the agent's own start-up check deals with it.
        (rec(phase="rolled_back", reason="r"), "i1", Verdict.NONE, 0, ""),
    ],
)
def test_guard_decision(
    record: UpgradeRecord | None, invocation: str, verdict: Verdict, guard_starts: int | None,
    reason: str,
) -> None:
    decision = decide_guard(record, T0, bound=BOUND, max_starts=3, invocation=invocation)
    assert decision.verdict is verdict
    if guard_starts is None:
        assert decision.record is None
    else:
        assert decision.record is not None
        assert decision.record.guard_starts == guard_starts
        assert decision.record.starts_without_confirm == 0  # the agent's own count is apart
    assert reason in decision.reason


def test_outcome_round_trip_and_corruption() -> None:
    outcome = Outcome(from_version="A", to_version="B", result="rolled_back", reason="r", at=T0)
    assert decode_outcome(encode_outcome(outcome)) == outcome
    with pytest.raises(CorruptFile, match=r"upgrade-last\.json"):
        decode_outcome(b'{"result": "maybe"}')
