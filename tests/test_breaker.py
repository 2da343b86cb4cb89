"""The mirror circuit breaker as a pure state machine."""

from proxy.breaker import Breaker


def test_opens_after_consecutive_connection_failures_only() -> None:
    """Connection failures in a row open it; any other outcome resets the count."""
    breaker = Breaker(threshold=3, cooldown=10.0)
    assert breaker.record("connect_error", 0.0) is None
    assert breaker.record("read_timeout", 0.1) is None  # a slow candidate is still measured
    assert breaker.record("connect_error", 0.2) is None
    assert breaker.record("connect_timeout", 0.3) is None
    assert breaker.record("connect_error", 0.4) == "opened"
    assert breaker.open and not breaker.allow(5.0)


def test_one_probe_after_the_cooldown_decides() -> None:
    """After the cooldown one mirror is let through: success closes, failure reopens for another cooldown."""
    breaker = Breaker(threshold=1, cooldown=10.0)
    assert breaker.record("connect_error", 0.0) == "opened"
    assert breaker.allow(10.5) is True
    assert breaker.allow(10.6) is False  # only one probe at a time
    assert breaker.record("connect_error", 11.0) is None
    assert not breaker.allow(15.0) and breaker.allow(21.5)
    assert breaker.record(None, 22.0) == "closed"
    assert not breaker.open and breaker.allow(22.1)
