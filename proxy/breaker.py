"""A circuit breaker for mirrors (outlier ejection): stop sending to a candidate that cannot be reached
or does not answer in time, probe it later.

Pure state: the dispatcher asks ``allow(now)`` before a mirror and reports each mirror's outcome once.
Gateway failures count (refused, connect/read/total timeout, and "slow": no response headers within
``shadow.slow_after``); an answer, even a 5xx, is worth measuring and resets the count. Each ejection in
a row doubles the pause, up to ``max_cooldown`` (Envoy's base_ejection_time x ejections, capped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FAILURES = frozenset({"connect_error", "connect_timeout", "read_timeout", "timeout", "slow"})

State = Literal["closed", "open", "half_open"]
Change = Literal["opened", "reopened", "closed"]
STATE_VALUES: dict[State, int] = {"closed": 0, "open": 1, "half_open": 2}  # the state gauge's values


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
