"""The mirror circuit breaker (outlier ejection) as a pure state machine."""

from proxy.breaker import Breaker


def test_opens_after_consecutive_gateway_failures_only() -> None:
    """Refusals, timeouts and slow answers in a row open it; an answer (even an error status) resets the count."""
    breaker = Breaker(threshold=3, cooldown=10.0)
    assert breaker.record("connect_error", 0.0) is None
    assert breaker.record(None, 0.1) is None  # an answer: still worth measuring
    assert breaker.record("read_timeout", 0.2) is None
    assert breaker.record("slow", 0.3) is None
    assert breaker.record("disconnected", 0.35) is None  # not a gateway failure: resets
    assert breaker.record("timeout", 0.4) is None
    assert breaker.record("connect_timeout", 0.5) is None
    assert breaker.record("slow", 0.6) == "opened"
    assert breaker.open and breaker.state == "open" and not breaker.allow(5.0)


def test_occasional_failures_below_the_threshold_never_open_it() -> None:
    """A failure every other mirror keeps the breaker closed however long it goes on."""
    breaker = Breaker(threshold=2, cooldown=1.0)
    for i in range(100):
        assert breaker.record("read_timeout" if i % 2 else None, float(i)) is None
    assert breaker.state == "closed"


def test_one_probe_after_the_cooldown_decides() -> None:
    """After the cooldown one mirror is let through: success closes, failure reopens for a longer pause."""
    breaker = Breaker(threshold=1, cooldown=10.0)
    assert breaker.record("connect_error", 0.0) == "opened"
    assert breaker.allow(10.5) is True and breaker.state == "half_open"
    assert breaker.allow(10.6) is False  # only one probe at a time
    assert breaker.record("slow", 11.0) == "reopened"
    assert breaker.pause == 20.0
    assert not breaker.allow(30.0) and breaker.allow(31.5)
    assert breaker.record(None, 32.0) == "closed"
    assert breaker.state == "closed" and breaker.allow(32.1)
    assert breaker.ejections == 0 and breaker.pause == 10.0


def test_the_pause_doubles_per_ejection_in_a_row_up_to_the_maximum() -> None:
    """Base, 2x, 4x ... the cooldown, never more than max_cooldown."""
    breaker = Breaker(threshold=1, cooldown=1.0, max_cooldown=5.0)
    pauses = []
    t = 0.0
    breaker.record("read_timeout", t)
    for _ in range(5):
        pauses.append(breaker.pause)
        t += breaker.pause
        assert breaker.allow(t)
        breaker.record("read_timeout", t)
    assert pauses == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert breaker.ejections == 6
