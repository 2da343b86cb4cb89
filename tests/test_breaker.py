"""The mirror circuit breaker (outlier ejection) and its learned slow threshold, as pure state."""

import pytest

from proxy.breaker import Breaker, SlowThreshold, learned_slow_after, p99


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


def _fed(threshold: SlowThreshold, *seconds: float) -> SlowThreshold:
    for value in seconds:
        threshold.observe(value)
    return threshold


@pytest.mark.parametrize(
    ("recent_p99", "expected"),
    [(0.05, 1.0), (0.5, 2.0), (2.0, 8.0), (10.0, 30.0)],
    ids=["floor", "factor", "factor-above-floor", "ceiling"],
)
def test_the_rule_is_factor_times_p99_between_the_floor_and_slow_after(recent_p99: float, expected: float) -> None:
    """min(slow_after, max(floor, factor x p99)): 4 x p99, at least 1 s, at most 30 s."""
    assert learned_slow_after(30.0, 4.0, 1.0, recent_p99) == expected


def test_p99_is_nearest_rank_and_leaves_out_the_top_percent() -> None:
    """Of 200 answers the two slowest are outliers; of 50 the slowest counts."""
    assert p99([0.1] * 198 + [9.0, 10.0]) == 0.1
    assert p99([0.1] * 197 + [8.0, 9.0, 10.0]) == 8.0
    assert p99([0.1] * 49 + [3.0]) == 3.0


def test_slow_after_applies_until_min_samples_answers_were_seen() -> None:
    """With no history, or too little, a mirror is slow only after slow_after."""
    threshold = SlowThreshold(30.0, factor=4.0, floor=0.1, min_samples=50)
    assert threshold.value == 30.0
    _fed(threshold, *[0.5] * 49)
    assert threshold.value == 30.0 and not threshold.learned
    assert threshold.observe(0.5) is True
    assert threshold.learned and threshold.value == 2.0


def test_the_quantile_is_recomputed_every_few_answers_over_the_last_200() -> None:
    """Answers between two computations wait for the next one; answers older than the last 200 drop out."""
    threshold = _fed(SlowThreshold(60.0, factor=4.0, floor=0.1, min_samples=50, every=10), *[0.5] * 200)
    assert threshold.value == 2.0
    assert [threshold.observe(2.5) for _ in range(10)] == [False] * 9 + [True]
    assert threshold.value == 10.0  # 10 of the last 200 at 2.5 s: above the p99
    _fed(threshold, *[0.25] * 200)
    assert threshold.value == 1.0 and len(threshold.samples) == 200


def test_factor_zero_turns_learning_off() -> None:
    """slow_factor = 0: always slow_after, however many answers."""
    threshold = _fed(SlowThreshold(30.0, factor=0.0), *[0.01] * 300)
    assert threshold.value == 30.0 and not threshold.learned and threshold.samples == []


def test_a_readmitting_answer_slower_than_the_learned_threshold_restarts_the_learning() -> None:
    """A probe that answered beyond the learned value (its latency jumped) brings back slow_after until
    min_samples new answers; one within it (the target had hung, now answers as before) keeps the history."""
    threshold = _fed(SlowThreshold(30.0, factor=4.0, floor=0.1, min_samples=50), *[0.25] * 60)
    assert threshold.value == 1.0
    assert threshold.readmitted(0.3) is False and threshold.value == 1.0
    assert threshold.readmitted(4.0) is True
    assert threshold.value == 30.0 and threshold.samples == []
    _fed(threshold, *[4.0] * 50)
    assert threshold.value == 16.0
