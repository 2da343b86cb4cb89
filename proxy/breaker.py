"""A circuit breaker for mirrors: stop dialling a candidate that refuses connections, probe it later.

Pure state: the dispatcher asks ``allow(now)`` before a mirror and reports each outcome. Only
connection failures count (a slow or erroring candidate is still worth measuring).
"""

from __future__ import annotations

from dataclasses import dataclass

CONNECT_ERRORS = frozenset({"connect_error", "connect_timeout"})


@dataclass(slots=True)
class Breaker:
    """Opens after ``threshold`` consecutive connection failures for ``cooldown`` seconds, then lets
    one probe through: its success closes the breaker, its failure opens it again."""

    threshold: int
    cooldown: float
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def allow(self, now: float) -> bool:
        if self.opened_at is None:
            return True
        if self.probing or now - self.opened_at < self.cooldown:
            return False
        self.probing = True
        return True

    def record(self, error: str | None, now: float) -> str | None:
        """Account one mirror's outcome; returns "opened" or "closed" when the state changed."""
        if error in CONNECT_ERRORS:
            self.failures += 1
            if self.probing or (self.opened_at is None and self.failures >= self.threshold):
                was_open = self.opened_at is not None
                self.opened_at, self.probing = now, False
                return None if was_open else "opened"
            return None
        self.failures = 0
        if self.opened_at is not None and self.probing:
            self.opened_at, self.probing = None, False
            return "closed"
        return None
