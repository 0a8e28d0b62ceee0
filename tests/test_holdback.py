"""HoldBack: plugins held back by the record budget, named in `warnings` without flapping."""

from __future__ import annotations

from elkeid_agent.holdback import CLEAR, SPAN, HoldBack
from elkeid_agent.plugins.process import Counters

MIB = 1024 * 1024


def _feed(hb: HoldBack, start: float, seconds: float, step: float, rate: float,
          waited: dict[str, float], name: str = "flood") -> float:
    """Beats every `step` s for `seconds`, the plugin waiting `rate` of the time; the end."""
    now = start
    while now < start + seconds - 1e-9:
        now += step
        waited[name] = waited.get(name, 0.0) + rate * step
        hb.update(now, waited)
    return now


def test_a_brief_wait_never_shows() -> None:
    hb = HoldBack(16 * MIB)
    waited = {"flood": 0.0}
    now = _feed(hb, 0.0, 5.0, 0.5, 0.0, waited)
    waited["flood"] += 0.9  # one wait of 0.9 s: under MIN_HELD
    now = _feed(hb, now, 10.0, 0.5, 0.0, waited)
    assert hb.warning() == ""


def test_held_back_most_of_the_time_is_named_then_cleared_once_it_drains() -> None:
    hb = HoldBack(16 * MIB)
    waited: dict[str, float] = {}
    now = _feed(hb, 0.0, 1.5, 0.5, 0.9, waited)
    assert hb.warning() == ""  # under SPAN of history: no judgement yet
    now = _feed(hb, now, 1.0, 0.5, 0.9, waited)
    assert hb.warning() == (
        "records: plugin flood held back: the record budget of 16 MiB is full "
        "(records leave slower than plugins write them)"
    )
    # Between the thresholds (10 % of the time) it stays: no flapping.
    now = _feed(hb, now, 10.0, 0.5, 0.10, waited)
    assert hb.held == ["flood"]
    # Drained: gone within SPAN and a beat.
    now = _feed(hb, now, SPAN + 0.5, 0.5, 0.0, waited)
    assert hb.warning() == ""


def test_a_plugin_waiting_a_little_is_not_raised_and_a_quiet_span_clears() -> None:
    hb = HoldBack(16 * MIB)
    waited: dict[str, float] = {}
    _feed(hb, 0.0, 20.0, 0.5, 0.2, waited)  # under RAISE (0.25)
    assert hb.held == []
    assert CLEAR < 0.2


def test_judged_over_the_heartbeat_interval_when_longer() -> None:
    """Heartbeats a minute apart: 20 s of waiting in a minute shows; a minute with 2 s clears."""
    hb = HoldBack(64 * MIB)
    waited = {"flood": 0.0}
    hb.update(0.0, waited)
    waited["flood"] = 20.0
    hb.update(60.0, waited)
    assert hb.warning().startswith("records: plugin flood held back: the record budget of 64 MiB")
    waited["flood"] = 22.0
    hb.update(120.0, waited)
    assert hb.warning() == ""


def test_several_plugins_in_order_and_forgotten_once_gone() -> None:
    hb = HoldBack(16 * MIB)
    waited = {"a": 0.0, "b": 0.0, "quiet": 0.0}
    for now in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        waited["b"] += 0.5
        if now > 2.5:
            waited["a"] += 0.5
        hb.update(now, waited)
        if now == 3.0:
            assert hb.held == ["b"]
    assert hb.held == ["b", "a"]
    assert hb.warning().startswith("records: plugins b, a held back: ")
    del waited["b"]
    hb.update(4.5, waited)
    assert hb.held == ["a"]


def test_counters_that_start_again_are_judged_from_there() -> None:
    hb = HoldBack(16 * MIB)
    waited = {"p": 100.0}
    hb.update(0.0, waited)
    waited["p"] = 0.0
    hb.update(2.5, waited)
    assert hb.held == []


def test_the_wait_under_way_counts() -> None:
    counters = Counters(backpressure_seconds=2.0)
    assert counters.waited(50.0) == 2.0
    counters.waiting_since = 45.0
    assert counters.waited(50.0) == 7.0
