"""The canary state machine and sticky routing, as pure functions."""

from __future__ import annotations

import pytest

from proxy.canary.state import ACTIVE, PAUSED, PROMOTED, ROLLED_BACK, Policy, Stage, evaluate, initial, manual
from proxy.routing import serves_candidate, sticky_key

GATES = ("error_rate", "latency_p50")
POLICY = Policy(tuple(Stage(w, 60.0, 100, GATES) for w in (0.0, 0.05, 1.0)), "rollback")
PASSING = dict.fromkeys(GATES, "pass")


def test_holds_until_duration_and_pairs_then_advances() -> None:
    """A stage advances only after its minimum duration and pairs, with every gate passing."""
    state = initial(POLICY, now=0.0)
    assert evaluate(state, POLICY, PASSING, 500, now=30.0) is None  # too early
    assert evaluate(state, POLICY, PASSING, 50, now=90.0) is None  # too few pairs
    assert evaluate(state, POLICY, {**PASSING, "latency_p50": "inconclusive"}, 500, now=90.0) is None
    step = evaluate(state, POLICY, PASSING, 500, now=90.0)
    assert step is not None and step.action == "advance"
    assert (step.after.stage, step.after.weight, step.after.stage_started) == (1, 0.05, 90.0)
    assert step.after.version == state.version + 1


def test_last_stage_passing_promotes() -> None:
    """Passing the final stage promotes the candidate to all traffic."""
    state = initial(POLICY, 0.0)
    for now in (100.0, 200.0):
        step = evaluate(state, POLICY, PASSING, 500, now)
        assert step is not None
        state = step.after
    final = evaluate(state, POLICY, PASSING, 500, 300.0)
    assert final is not None and final.action == "promoted" and final.after.status == PROMOTED
    assert evaluate(final.after, POLICY, PASSING, 500, 400.0) is None


def test_a_failed_gate_rolls_back_at_once_or_pauses() -> None:
    """A fail needs no minimum duration; it rolls back to weight 0 (or pauses, per on_fail)."""
    state = manual(initial(POLICY, 0.0), POLICY, "promote", 1.0, actor="t", reason="go").after
    failed = {**PASSING, "error_rate": "fail"}
    step = evaluate(state, POLICY, failed, 10, now=2.0, evidence={"pairs": 10})
    assert step is not None and step.after.status == ROLLED_BACK and step.after.weight == 0.0
    assert "error_rate" in step.reason and step.event()["evidence"] == {"pairs": 10}
    pausing = Policy(POLICY.stages, "pause")
    paused = evaluate(state, pausing, failed, 10, now=2.0)
    assert paused is not None and paused.after.status == PAUSED and paused.after.weight == 0.05


def test_manual_actions() -> None:
    """Operators pause, resume (restarting the stage window), set a weight, promote and roll back."""
    state = initial(POLICY, 0.0)
    paused = manual(state, POLICY, "pause", 5.0, actor="ann", reason="investigate").after
    assert paused.status == PAUSED
    assert evaluate(paused, POLICY, PASSING, 500, 100.0) is None
    resumed = manual(paused, POLICY, "resume", 10.0, actor="ann", reason="ok").after
    assert (resumed.status, resumed.stage_started) == (ACTIVE, 10.0)
    weighted = manual(resumed, POLICY, "set-weight", 11.0, actor="ann", reason="try", weight=0.2).after
    assert (weighted.weight, weighted.status) == (0.2, PAUSED)
    event = manual(resumed, POLICY, "rollback", 12.0, actor="bob", reason="bad").event()
    assert (event["actor"], event["reason"], event["to"]["weight"]) == ("bob", "bad", 0.0)
    with pytest.raises(ValueError, match="weight between 0 and 1"):
        manual(resumed, POLICY, "set-weight", 13.0, actor="a", reason="r", weight=1.5)
    rolled = manual(resumed, POLICY, "rollback", 12.0, actor="bob", reason="bad").after
    with pytest.raises(ValueError, match="cannot promote"):
        manual(rolled, POLICY, "promote", 14.0, actor="a", reason="r")


def test_sticky_key_uses_the_first_identity_present() -> None:
    """header, then cookie, then client address, then the request id."""
    keys = ("header:x-user-id", "cookie:sid", "client_ip")
    assert sticky_key(keys, {"x-user-id": "u1"}, {"sid": "s"}, "1.2.3.4", "r") == "header:x-user-id=u1"
    assert sticky_key(keys, {}, {"sid": "s"}, "1.2.3.4", "r") == "cookie:sid=s"
    assert sticky_key(keys, {}, {}, "1.2.3.4", "r") == "client_ip=1.2.3.4"
    assert sticky_key(("header:x-user-id",), {}, {}, "", "r9") == "request_id=r9"


def test_weighted_choice_is_sticky_proportional_and_monotone() -> None:
    """Users keep their arm; about weight × users get the candidate; raising the weight only adds users."""
    users = [f"header:x-user-id=u{i}" for i in range(5000)]
    at = {w: {u for u in users if serves_candidate(u, w)} for w in (0.0, 0.01, 0.05, 0.25, 0.5, 1.0)}
    assert not at[0.0] and at[1.0] == set(users)
    assert 0.22 < len(at[0.25]) / len(users) < 0.28
    weights = sorted(at)
    for low, high in zip(weights, weights[1:], strict=False):
        assert at[low] <= at[high]
