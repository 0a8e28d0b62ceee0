"""The time budget of a download, pure: minimum progress per URL, one deadline per entry.

A download host that sends a byte a second would otherwise hold a Config entry for the whole
per-URL timeout, on each of its URLs. The rule: every `window` seconds at least `min_bytes`
must arrive, counted from the start of the request (so a host that never answers, or sends
only a head, is abandoned too); a URL that falls short is abandoned and the next one tried.
Over all URLs, an entry has one deadline.

`Watch` follows one URL's request with the monotonic times the I/O layer gives it; `Progress`
is what the caller owns for one entry: the rule, the URL being fetched now (for state_detail)
and the abandonments (for the heartbeat's counter and the log).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    """At least `min_bytes` every `window` seconds; the whole entry within `deadline` s."""

    min_bytes: int = 64 * 1024
    window: float = 60.0
    deadline: float = 1800.0

    def __post_init__(self) -> None:
        if self.min_bytes < 1 or self.window <= 0 or self.deadline <= 0:
            raise ValueError(f"a download rule needs positive values, not {self}")

    def describe(self) -> str:
        return f"{_size(self.min_bytes)} in {self.window:g} s"


@dataclass
class Watch:
    """One URL's request against the rule."""

    url: str
    rule: Rule
    started: float
    total: int = 0
    window_start: float = 0.0
    window_bytes: int = 0

    def __post_init__(self) -> None:
        self.window_start = self.started

    @property
    def due(self) -> float:
        """When the current window ends: the minimum must have arrived by then."""
        return self.window_start + self.rule.window

    def feed(self, n: int, now: float) -> bool:
        """Count `n` bytes arrived at `now`; True when that completed a window (a new one
        starts now, so `due` moved)."""
        self.total += n
        self.window_bytes += n
        if self.window_bytes < self.rule.min_bytes:
            return False
        self.window_start = now
        self.window_bytes = 0
        return True

    def behind(self, now: float) -> bool:
        """Slower than the rule's pace, a quarter of a window or more into the current one:
        what makes an entry worth naming while it waits (a download at a normal speed never
        is, the moment of a connect hardly)."""
        elapsed = now - self.window_start
        if elapsed < self.rule.window / 4:
            return False
        return self.window_bytes < self.rule.min_bytes * elapsed / self.rule.window

    def describe(self, now: float) -> str:
        return f"{self.url} ({_size(self.total)} in {now - self.started:.0f} s)"

    def shortfall(self, now: float) -> str:
        """Why the URL was abandoned, for people."""
        return (f"under the minimum progress of {self.rule.describe()}: "
                f"{_size(self.total)} in {now - self.started:.0f} s")


@dataclass
class Progress:
    """One entry's download: the rule, the current URL's watch, what was abandoned."""

    rule: Rule = field(default_factory=Rule)
    watch: Watch | None = None
    abandoned: list[str] = field(default_factory=list)
    #: Told of each abandonment as it happens (the heartbeat's counter, the log).
    on_abandon: Callable[[str], None] | None = None

    def abandon(self, reason: str) -> None:
        self.abandoned.append(reason)
        if self.on_abandon is not None:
            self.on_abandon(reason)

    def waiting(self, now: float) -> str | None:
        """The slow URL and how far it got, while the current one is behind; else None."""
        watch = self.watch
        if watch is None or not watch.behind(now):
            return None
        return watch.describe(now)


def _size(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"
