"""Whether the record budget holds plugins back: a line for the heartbeat's `warnings`.

Plugin readers wait when the memory budget for records (`[buffer] max_bytes`) is spent
(buffer.py): backpressure instead of drops, every wait counted (`backpressure_waits`,
`backpressure_seconds`, and each plugin's `backpressure_seconds` in its 1001). A wait of a
moment is the design at work; a plugin held back much of the time means records leave slower
than it writes them (a server that reads slowly, a flood, an outage with the spool full or
off), which an operator should see by name.

A warning, not a fault (the state stays `running`), as for missing plugin limits: no record is
lost and nothing on this host is broken; the remedy is the server's capacity or the plugin's
rate. A slow server would otherwise turn every agent it serves `abnormal` at once and hide the
ones that are.

Sans-IO: `update` is fed, at each heartbeat, the seconds each plugin has waited so far (the
wait under way included), and judges each plugin over the last `SPAN` seconds at least (the
heartbeat interval when longer, so the judgement does not depend on how often it is asked):
held back once it waited `RAISE` of that span and `MIN_HELD` s or more, no longer once it
waited less than `CLEAR` of it. In between the state stays, so a plugin that waits now and
then near a threshold does not flap, and a wait under `MIN_HELD` s never shows.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping

log = logging.getLogger(__name__)

SPAN = 2.0
RAISE = 0.25
MIN_HELD = 1.0
CLEAR = 0.05


class HoldBack:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        #: Per plugin: (when, seconds waited so far), oldest first; the first is the newest
        #: sample at least SPAN old once there is one.
        self._samples: dict[str, deque[tuple[float, float]]] = {}
        #: Plugins held back now, in the order they were found so (a dict as an ordered set).
        self._held: dict[str, None] = {}

    def update(self, now: float, waited: Mapping[str, float]) -> None:
        """Judge each plugin at monotonic time `now`, given the seconds it has waited so far;
        a plugin no longer in `waited` (stopped, removed) is forgotten."""
        for name in [n for n in self._samples if n not in waited]:
            del self._samples[name]
            self._held.pop(name, None)
        for name, total in waited.items():
            samples = self._samples.setdefault(name, deque())
            if samples and total < samples[-1][1]:
                samples.clear()  # counters started again: judge from here
            samples.append((now, total))
            while len(samples) > 2 and samples[1][0] <= now - SPAN:
                samples.popleft()
            since, base = samples[0]
            span = now - since
            if span < SPAN:
                continue
            held = total - base
            if held >= max(MIN_HELD, RAISE * span):
                if name not in self._held:
                    self._held[name] = None
                    log.warning("records: plugin %s held back %.1f s of the last %.1f s: %s",
                                name, held, span, self._why())
            elif held < CLEAR * span and name in self._held:
                del self._held[name]
                log.info("records: plugin %s no longer held back", name)

    @property
    def held(self) -> list[str]:
        return list(self._held)

    def warning(self) -> str:
        """The line for `warnings` while any plugin is held back, else ""."""
        if not self._held:
            return ""
        names = ", ".join(self._held)
        which = f"plugins {names}" if len(self._held) > 1 else f"plugin {names}"
        return f"records: {which} held back: {self._why()}"

    def _why(self) -> str:
        return (f"the record budget of {self.budget_bytes / 2**20:g} MiB is full "
                "(records leave slower than plugins write them)")
