"""The canary's state machine: pure transitions from (state, evidence, time) to the next state.

    shadow (weight 0) -> stage 1 -> ... -> stage N (weight 1.0) -> promoted
    any active status -> rolled_back (weight 0) on a failed gate (or paused, per canary.on_fail)
    any active status -> paused (weight kept) by an operator; resume returns to where it was
Nothing here touches Redis or the clock: the controller passes both in and persists what comes out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

ACTIVE = "active"
PAUSED = "paused"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of the rollout: the candidate's share of users and what it must show to move on."""

    weight: float
    min_duration: float
    min_pairs: int
    gates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    stages: tuple[Stage, ...]
    on_fail: str  # "rollback" | "pause"


@dataclass(frozen=True, slots=True)
class CanaryState:
    """Everything every replica and the controller agree on; stored as one JSON value."""

    status: str = ACTIVE
    stage: int = 0
    weight: float = 0.0
    stage_started: float = 0.0
    updated: float = 0.0
    version: int = 0
    reason: str = "initial"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanaryState:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True, slots=True)
class Transition:
    """A state change and why it happened, as written to the events stream."""

    before: CanaryState
    after: CanaryState
    action: str
    reason: str
    actor: str
    evidence: dict[str, Any] | None = None

    def event(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "actor": self.actor,
            "from": {"status": self.before.status, "stage": self.before.stage, "weight": self.before.weight},
            "to": {"status": self.after.status, "stage": self.after.stage, "weight": self.after.weight},
            "evidence": self.evidence,
        }


def initial(policy: Policy, now: float) -> CanaryState:
    return CanaryState(ACTIVE, 0, policy.stages[0].weight, now, now, 0, "initial")


def _move(state: CanaryState, now: float, reason: str, **changes: Any) -> CanaryState:
    return replace(state, updated=now, version=state.version + 1, reason=reason, **changes)


def _to_stage(state: CanaryState, policy: Policy, index: int, now: float, reason: str) -> CanaryState:
    return _move(state, now, reason, status=ACTIVE, stage=index, weight=policy.stages[index].weight, stage_started=now)


def evaluate(
    state: CanaryState,
    policy: Policy,
    gates: dict[str, str],
    pairs: int,
    now: float,
    evidence: dict[str, Any] | None = None,
) -> Transition | None:
    """The automatic decision for the current stage given its gate outcomes over its own window.

    A failed gate rolls back (or pauses) at once; advancing needs the stage's minimum duration, its
    minimum pairs and every one of its gates passing; anything else holds.
    """
    if state.status != ACTIVE:
        return None
    stage = policy.stages[state.stage]
    watched = {name: gates.get(name, "inconclusive") for name in stage.gates}
    failed = sorted(name for name, outcome in watched.items() if outcome == "fail")
    if failed:
        reason = f"stage {state.stage} gate(s) failed: {', '.join(failed)}"
        if policy.on_fail == "pause":
            return Transition(state, _move(state, now, reason, status=PAUSED), "pause", reason, "controller", evidence)
        after = _move(state, now, reason, status=ROLLED_BACK, weight=0.0)
        return Transition(state, after, "rollback", reason, "controller", evidence)
    if now - state.stage_started < stage.min_duration or pairs < stage.min_pairs:
        return None
    if any(outcome != "pass" for outcome in watched.values()):
        return None
    reason = f"stage {state.stage} passed {', '.join(sorted(watched)) or 'no gates'} with {pairs} pairs"
    if state.stage + 1 >= len(policy.stages):
        after = _move(state, now, reason, status=PROMOTED, weight=1.0)
        return Transition(state, after, "promoted", reason, "controller", evidence)
    return Transition(
        state, _to_stage(state, policy, state.stage + 1, now, reason), "advance", reason, "controller", evidence
    )


def manual(
    state: CanaryState, policy: Policy, action: str, now: float, *, actor: str, reason: str, weight: float | None = None
) -> Transition:
    """An operator's action; raises ValueError when it makes no sense in the current state."""
    if action == "promote":
        if state.status in (PROMOTED, ROLLED_BACK):
            raise ValueError(f"cannot promote: the canary is {state.status}")
        nxt = state.stage + 1
        after = (
            _move(state, now, reason, status=PROMOTED, weight=1.0)
            if nxt >= len(policy.stages)
            else _to_stage(state, policy, nxt, now, reason)
        )
    elif action == "rollback":
        after = _move(state, now, reason, status=ROLLED_BACK, weight=0.0)
    elif action == "pause":
        if state.status != ACTIVE:
            raise ValueError(f"cannot pause: the canary is {state.status}")
        after = _move(state, now, reason, status=PAUSED)
    elif action == "resume":
        if state.status not in (PAUSED, ROLLED_BACK):
            raise ValueError(f"cannot resume: the canary is {state.status}")
        # Resuming restarts the current stage's window, so its evidence is fresh.
        after = _to_stage(state, policy, state.stage, now, reason)
    elif action == "set-weight":
        if weight is None or not 0.0 <= weight <= 1.0:
            raise ValueError("set-weight needs a weight between 0 and 1")
        after = _move(state, now, reason, weight=weight, status=PAUSED if state.status == ACTIVE else state.status)
    elif action == "reset":
        after = _move(initial(policy, now), now, reason)
        after = replace(after, version=state.version + 1)
    else:
        raise ValueError(f"unknown action {action!r}")
    return Transition(state, after, action, reason, actor)
