"""The upgrade record's encoding and the start-up decision, as a table."""

from __future__ import annotations

import pytest

from elkeid_agent.upgrade.record import (
    CorruptFile,
    Quarantine,
    UpgradeRecord,
    Verdict,
    decide_at_start,
    decode_quarantine,
    decode_record,
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
