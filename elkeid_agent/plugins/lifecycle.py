"""The plugin lifecycle: states, the events that move between them, and nothing else.

Rules (after h11's `_state.py`): everything that changes a plugin's state goes through
`Lifecycle.fire`, and the only allowed moves are the rows of `TRANSITIONS`; any other
move raises `LifecycleError` naming the state and the event, because it is a bug in the
supervisor, not a condition to handle.

Theory of operation. A plugin slot is created by a sync once its files are installed, so it
begins STARTING. A successful spawn makes it RUNNING; the child exiting (on its own, or
killed because its record stream broke) makes it BACKING_OFF, and the backoff delay
elapsing makes it STARTING again. A failed spawn goes straight to BACKING_OFF. A stop request
from any live state makes it STOPPING, and the reaped child makes it STOPPED, which is final.

The backoff policy is pure too: `backoff_delay` gives the wait before restart n.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

#: Restart delays grow from 1 s, doubling, to 5 min ...
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 300.0
#: ... and start again from 1 s once a run lasted this long.
HEALTHY_RESET = 600.0


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Event(enum.Enum):
    SPAWNED = "spawned"
    SPAWN_FAILED = "spawn_failed"
    EXITED = "exited"
    BACKOFF_ELAPSED = "backoff_elapsed"
    STOP = "stop"
    REAPED = "reaped"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTING, Event.SPAWNED): State.RUNNING,
    (State.STARTING, Event.SPAWN_FAILED): State.BACKING_OFF,
    (State.STARTING, Event.STOP): State.STOPPING,
    (State.RUNNING, Event.EXITED): State.BACKING_OFF,
    (State.RUNNING, Event.STOP): State.STOPPING,
    (State.BACKING_OFF, Event.BACKOFF_ELAPSED): State.STARTING,
    (State.BACKING_OFF, Event.STOP): State.STOPPING,
    (State.STOPPING, Event.REAPED): State.STOPPED,
}


class LifecycleError(RuntimeError):
    """A transition the table does not allow."""


@dataclass
class Lifecycle:
    """One plugin's state; `on_change` is told of every actual change."""

    state: State = State.STARTING
    on_change: Callable[[State, State], None] | None = field(default=None, repr=False)

    def fire(self, event: Event) -> State:
        try:
            new = TRANSITIONS[self.state, event]
        except KeyError:
            raise LifecycleError(
                f"event {event.name} not allowed in state {self.state.name}"
            ) from None
        old, self.state = self.state, new
        if old is not new and self.on_change is not None:
            self.on_change(old, new)
        return new

    @property
    def live(self) -> bool:
        """True while the slot may still run its plugin (it has not been told to stop)."""
        return self.state not in (State.STOPPING, State.STOPPED)


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the restart following `failures` consecutive failed runs (>= 1)."""
    if failures <= 1:
        return BACKOFF_INITIAL
    # Cap the exponent first: 2**failures for a long crash loop would be a huge float.
    return min(BACKOFF_INITIAL * float(1 << min(failures - 1, 16)), BACKOFF_MAX)


def failures_after_run(failures: int, run_seconds: float) -> int:
    """Consecutive failures counted after a run that ended: a healthy run resets the count."""
    return 1 if run_seconds >= HEALTHY_RESET else failures + 1
