"""A circuit breaker for mirrors (outlier ejection): stop sending to a candidate that cannot be reached
or does not answer in time, probe it later.

Pure state: the dispatcher asks ``allow(now)`` before a mirror and reports each mirror's outcome once.
Gateway failures count (refused, connect/read/total timeout, and "slow": no response headers within
``shadow.slow_after``); an answer, even a 5xx, is worth measuring and resets the count. Each ejection in
a row doubles the pause, up to ``max_cooldown`` (Envoy's base_ejection_time x ejections, capped).

``SlowThreshold`` learns when "slow" starts from the target's own recent answers, so a candidate that
answered in about a second and then hangs is ejected after a few seconds, not after ``slow_after``:
``min(slow_after, max(slow_floor, slow_factor x p99 of the last 200 times to headers))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

FAILURES = frozenset({"connect_error", "connect_timeout", "read_timeout", "timeout", "slow"})

State = Literal["closed", "open", "half_open"]
Change = Literal["opened", "reopened", "closed"]
STATE_VALUES: dict[State, int] = {"closed": 0, "open": 1, "half_open": 2}  # the state gauge's values

SLOW_WINDOW = 200  # the answers the slow threshold is learned from: the most recent ones
SLOW_EVERY = 10  # new answers between two computations of the quantile (a sort of at most 200 floats)


@dataclass(slots=True)
class Breaker:
    """Opens after ``threshold`` consecutive failures for ``cooldown`` seconds (doubled for each ejection
    in a row, at most ``max_cooldown``), then lets one probe through: its success closes the breaker,
    its failure opens it again for a longer pause."""

    threshold: int
    cooldown: float
    max_cooldown: float = 300.0
    failures: int = 0
    ejections: int = 0  # in a row: since the breaker last closed
    opened_at: float | None = None
    probing: bool = False

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        return "half_open" if self.probing else "open"

    @property
    def pause(self) -> float:
        """How long the current ejection lasts before a probe."""
        grown = self.cooldown * 2.0 ** min(max(self.ejections - 1, 0), 32)
        return min(grown, max(self.max_cooldown, self.cooldown))

    def allow(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if self.probing or now - self.opened_at < self.pause:
            return False
        self.probing = True
        return True

    def record(self, error: str | None, now: float) -> Change | None:
        """Account one mirror's outcome (an error class, "slow", or None for an answer); returns the change."""
        if error in FAILURES:
            self.failures += 1
            if self.probing or (self.opened_at is None and self.failures >= self.threshold):
                change: Change = "reopened" if self.opened_at is not None else "opened"
                self.opened_at, self.probing = now, False
                self.ejections += 1
                return change
            return None
        self.failures = 0
        if self.opened_at is not None and self.probing:
            self.opened_at, self.probing, self.ejections = None, False, 0
            return "closed"
        return None


def p99(samples: list[float]) -> float:
    """The nearest-rank 99th percentile: of 200 samples the two largest are left out, of 100 or fewer none."""
    return sorted(samples)[math.ceil(0.99 * len(samples)) - 1]


def learned_slow_after(ceiling: float, factor: float, floor: float, recent_p99: float) -> float:
    """The rule: ``factor`` times the recent p99, at least ``floor``, never more than ``ceiling`` (slow_after)."""
    return min(ceiling, max(floor, factor * recent_p99))


@dataclass(slots=True)
class SlowThreshold:
    """When a mirror still without response headers counts as slow: ``ceiling`` (slow_after) until
    ``min_samples`` answers were seen, then ``learned_slow_after`` over the last ``window`` ones, recomputed
    every ``every`` answers. ``factor`` 0 (or ``ceiling`` 0: no slow threshold at all) turns learning off."""

    ceiling: float
    factor: float = 4.0
    floor: float = 1.0
    min_samples: int = 50
    window: int = SLOW_WINDOW
    every: int = SLOW_EVERY
    value: float = field(init=False)
    samples: list[float] = field(init=False, default_factory=list)
    _next: int = field(init=False, default=0)  # the ring's oldest slot once it is full
    _fresh: int = field(init=False, default=0)  # answers since the value was last computed
    _computed: bool = field(init=False, default=False)  # since the history (re)started

    def __post_init__(self) -> None:
        self.value = self.ceiling

    @property
    def learned(self) -> bool:
        return len(self.samples) >= self.min_samples and self.factor > 0 and self.ceiling > 0

    def observe(self, seconds: float) -> bool:
        """Add one answer's time to headers (O(1); the quantile is sorted out every ``every`` answers);
        returns whether the value was recomputed."""
        if self.factor <= 0 or self.ceiling <= 0:
            return False
        if len(self.samples) < self.window:
            self.samples.append(seconds)
        else:
            self.samples[self._next] = seconds
        self._next = (self._next + 1) % self.window
        self._fresh += 1
        if not self.learned or (self._computed and self._fresh < self.every):
            return False
        self._fresh, self._computed = 0, True
        self.value = learned_slow_after(self.ceiling, self.factor, self.floor, p99(self.samples))
        return True

    def readmitted(self, seconds: float) -> bool:
        """The breaker closed on an answer that took ``seconds`` to send headers. Slower than the learned
        threshold (a probe, which waits up to the ceiling), it says the target's latency has changed: the
        history is forgotten and the threshold is learned again from new answers. Returns whether it was."""
        if not self.learned or seconds <= self.value:
            return False
        self.samples.clear()
        self._next = self._fresh = 0
        self._computed = False
        self.value = self.ceiling
        return True
