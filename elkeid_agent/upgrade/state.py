"""The self-upgrade's state machine (pure: no I/O, no clock).

Rules, after h11's `_state.py`: everything that changes the upgrade's state goes through
`UpgradeMachine.handle`; the allowed moves are the `TRANSITIONS` table and nothing else; a
move the table does not allow raises `TransitionError` naming the state and the event, so
a bug shows up as an error instead of a silently wrong heartbeat.

Theory of operation. One process sees at most these states:

    IDLE -- START --> PROBING -- FAILED --> IDLE                  (no swap; error kept)
                      PROBING -- SWAPPED --> SWAPPED              (target replaced, exiting)
    IDLE -- RESUMED --> SWAPPED                                   (the new version's first runs)
    SWAPPED -- CONFIRMED --> CONFIRMED                            (stream open, heartbeat sent)
    SWAPPED -- ROLLED_BACK --> ROLLED_BACK -- QUARANTINED --> QUARANTINED
    IDLE -- RESTORED --> QUARANTINED                              (the old version, back again)
    SWAPPED -- SWAP_FAILED --> IDLE                               (the package manager left
                                                                   the old executable in place)

A new version can be tried from IDLE, CONFIRMED and QUARANTINED (a version other than the
quarantined one); never from PROBING (one at a time) nor from SWAPPED (unconfirmed).
"""

from __future__ import annotations

import enum


class UpgradeState(enum.StrEnum):
    IDLE = "idle"
    PROBING = "probing"
    SWAPPED = "swapped"
    CONFIRMED = "confirmed"
    ROLLED_BACK = "rolled_back"
    QUARANTINED = "quarantined"


class Event(enum.StrEnum):
    START = "start"
    FAILED = "failed"
    SWAPPED = "swapped"
    SWAP_FAILED = "swap_failed"
    RESUMED = "resumed"
    CONFIRMED = "confirmed"
    ROLLED_BACK = "rolled_back"
    QUARANTINED = "quarantined"
    RESTORED = "restored"


S, E = UpgradeState, Event

TRANSITIONS: dict[UpgradeState, dict[Event, UpgradeState]] = {
    S.IDLE: {E.START: S.PROBING, E.RESUMED: S.SWAPPED, E.RESTORED: S.QUARANTINED},
    S.PROBING: {E.FAILED: S.IDLE, E.SWAPPED: S.SWAPPED},
    S.SWAPPED: {E.CONFIRMED: S.CONFIRMED, E.ROLLED_BACK: S.ROLLED_BACK, E.SWAP_FAILED: S.IDLE},
    S.CONFIRMED: {E.START: S.PROBING},
    S.ROLLED_BACK: {E.QUARANTINED: S.QUARANTINED},
    S.QUARANTINED: {E.START: S.PROBING},
}


class TransitionError(Exception):
    """An event the current state does not allow (a bug in the caller)."""

    def __init__(self, state: UpgradeState, event: Event) -> None:
        super().__init__(f"upgrade: event {event.value!r} is not allowed in state {state.value!r}")
        self.state = state
        self.event = event


class UpgradeMachine:
    """Holds the state; `handle` is the one place it changes."""

    def __init__(self, state: UpgradeState = UpgradeState.IDLE) -> None:
        self._state = state

    @property
    def state(self) -> UpgradeState:
        return self._state

    def can(self, event: Event) -> bool:
        return event in TRANSITIONS[self._state]

    def handle(self, event: Event) -> UpgradeState:
        try:
            self._state = TRANSITIONS[self._state][event]
        except KeyError:
            raise TransitionError(self._state, event) from None
        return self._state
