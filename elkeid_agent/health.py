"""What has gone wrong in which unit of work, for the heartbeat's state and counters.

A unit of work (one command, one Config entry, one download, one plugin, one upload, one file
write) that fails records a fault under its own key; the agent is `abnormal` while any fault
stands, and `state_detail` names each. The unit clears its key when it next succeeds, so the
agent recovers by itself (a disk that had filled and has space again). Counters only grow.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

#: A reason longer than this is cut: state_detail travels in every heartbeat.
MAX_REASON = 300


class Health:
    def __init__(self) -> None:
        self._faults: dict[str, str] = {}
        self.counters: Counter[str] = Counter()

    def fault(self, unit: str, reason: str, counter: str | None = None) -> None:
        """Record that `unit` failed; log it the first time (or when the reason changes)."""
        reason = reason[:MAX_REASON]
        if self._faults.get(unit) != reason:
            log.error("%s: %s", unit, reason)
        self._faults[unit] = reason
        if counter is not None:
            self.counters[counter] += 1

    def clear(self, unit: str) -> None:
        if self._faults.pop(unit, None) is not None:
            log.info("%s: recovered", unit)

    def count(self, counter: str, n: int = 1) -> None:
        self.counters[counter] += n

    def details(self) -> list[str]:
        return [f"{unit}: {reason}" for unit, reason in self._faults.items()]

    def faulty(self, unit: str) -> bool:
        return unit in self._faults
