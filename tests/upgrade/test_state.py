"""Every allowed transition of the upgrade state machine, and the refusal of the others."""

from __future__ import annotations

import pytest

from elkeid_agent.upgrade.state import (
    TRANSITIONS,
    Event,
    TransitionError,
    UpgradeMachine,
    UpgradeState,
)

S, E = UpgradeState, Event

ALLOWED = [
    (S.IDLE, E.START, S.PROBING),
    (S.IDLE, E.RESUMED, S.SWAPPED),
    (S.IDLE, E.RESTORED, S.QUARANTINED),
    (S.PROBING, E.FAILED, S.IDLE),
    (S.PROBING, E.SWAPPED, S.SWAPPED),
    (S.SWAPPED, E.CONFIRMED, S.CONFIRMED),
    (S.SWAPPED, E.ROLLED_BACK, S.ROLLED_BACK),
    (S.SWAPPED, E.SWAP_FAILED, S.IDLE),
    (S.CONFIRMED, E.START, S.PROBING),
    (S.ROLLED_BACK, E.QUARANTINED, S.QUARANTINED),
    (S.QUARANTINED, E.START, S.PROBING),
]


@pytest.mark.parametrize(("before", "event", "after"), ALLOWED)
def test_allowed_transition(before: UpgradeState, event: Event, after: UpgradeState) -> None:
    machine = UpgradeMachine(before)
    assert machine.can(event)
    assert machine.handle(event) is after
    assert machine.state is after


def test_the_table_is_exactly_the_allowed_list() -> None:
    table = {(s, e, t) for s, moves in TRANSITIONS.items() for e, t in moves.items()}
    assert table == set(ALLOWED)
    assert set(TRANSITIONS) == set(UpgradeState)


DISALLOWED = [
    (s, e) for s in UpgradeState for e in Event if e not in TRANSITIONS[s]
]


@pytest.mark.parametrize(("state", "event"), DISALLOWED)
def test_disallowed_transition_names_state_and_event(state: UpgradeState, event: Event) -> None:
    machine = UpgradeMachine(state)
    assert not machine.can(event)
    with pytest.raises(TransitionError) as info:
        machine.handle(event)
    assert f"'{event.value}'" in str(info.value)
    assert f"'{state.value}'" in str(info.value)
    assert machine.state is state  # a refused event changes nothing


def test_never_two_at_once_and_never_while_unconfirmed() -> None:
    for state in (S.PROBING, S.SWAPPED, S.ROLLED_BACK):
        assert not UpgradeMachine(state).can(E.START)


def test_heartbeat_values() -> None:
    assert [s.value for s in UpgradeState] == [
        "idle", "probing", "swapped", "confirmed", "rolled_back", "quarantined"
    ]
