"""The divergence gate on sampled text: seeded simulations of whole experiments, and its edge cases.

A small stochastic "model" answers questions: each question has facts, each fact three phrasings, words
have synonyms, some facts are optional, sentences swap places and a greeting or closing may come. Two
samples for one question are paraphrases; an answer to another question is a materially different answer.
Pairs are scored once with the real ``similarity.score`` into a pool; experiments resample the pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest

from proxy.comparator.divergence import (
    DivergenceRule,
    dense,
    evaluate,
    shift_test,
    tail_counts,
    tail_test,
)
from proxy.comparator.measures import Tolerance
from proxy.comparator.shapes import Output
from proxy.comparator.similarity import IDENTICAL, bucket, bucket_value, score

TOL = Tolerance()
RULE = DivergenceRule()
PAIRS = 2_000  # candidate pairs per simulated experiment
EXPERIMENTS = 200

NOUNS = [
    ("account", "profile"), ("password", "passphrase"), ("invoice", "bill"), ("order", "purchase"),
    ("settings", "preferences"), ("email", "message"), ("report", "summary"), ("subscription", "plan"),
    ("file", "document"), ("payment", "charge"), ("address", "location"), ("refund", "reimbursement"),
    ("team", "group"), ("project", "workspace"), ("API key", "access token"), ("device", "phone"),
    ("server", "host"), ("database", "data store"), ("request", "query"), ("member", "user"),
    ("dashboard", "overview"), ("backup", "snapshot"), ("calendar", "schedule"), ("contract", "agreement"),
    ("shipment", "delivery"), ("license", "seat"), ("webhook", "callback"), ("cluster", "node pool"),
    ("folder",), ("printer",), ("router",), ("certificate",), ("domain",), ("mailbox",), ("warehouse",),
    ("supplier",), ("catalog",), ("coupon",), ("voucher",), ("ticket",), ("playlist",), ("recipe",),
    ("vaccine",), ("mortgage",), ("pension",), ("visa",), ("passport",), ("flight",), ("reservation",),
    ("thermostat",), ("battery",), ("firmware",), ("spreadsheet",), ("pipeline",), ("container",),
    ("migration",), ("index",), ("cache",), ("bucket",), ("firewall",), ("tenant",),
]  # fmt: skip
VERBS = [
    ("open", "go to"), ("reset", "restore"), ("cancel", "stop"), ("download", "export"), ("update", "change"),
    ("delete", "remove"), ("create", "add"), ("check", "verify"), ("send", "submit"), ("enable", "turn on"),
    ("rename", "relabel"), ("share",), ("archive",), ("restart", "reboot"), ("upload", "import"), ("renew",),
    ("transfer",), ("schedule",), ("approve",), ("merge",), ("rotate",), ("scan",), ("pair",), ("calibrate",),
    ("refill",), ("book",), ("print",), ("sync",), ("encrypt",), ("compress",),
]  # fmt: skip
ADJECTIVES = [
    ("new", "fresh"), ("current", "existing"), ("main", "primary"), ("monthly", "recurring"), ("old", "previous"),
    ("shared", "common"), ("secure", "safe"), ("default", "standard"), ("expired",), ("locked",), ("pending",),
    ("frozen",), ("overdue",), ("private",), ("public",), ("temporary",),
]  # fmt: skip
FACTS = [
    ("To {v} your {n}, {w} the {m} page.", "{W} the {m} page to {v} your {n}.",
     "You can {v} your {n} from the {m} page."),
    ("Select the {a} {n} and click {V}.", "Pick the {a} {n}, then click {V}.", "Choose the {a} {n} and press {V}."),
    ("A confirmation {m} will be sent to you.", "You will receive a confirmation {m}.",
     "We send you a {m} to confirm."),
    ("This usually takes a few minutes.", "It normally takes a couple of minutes.",
     "Expect this to take a few minutes."),
    ("If the {n} is {a}, you need to {v} it first.", "You must {v} the {n} first when it is {a}.",
     "{A} {n}s have to be {v}-ed first."),
    ("Only admins can {v} the {m}.", "The {m} can only be {v}-ed by an admin.",
     "You need admin rights to {v} the {m}."),
    ("Your {a} {n} stays available until then.", "Until then the {a} {n} remains available.",
     "The {a} {n} is still usable meanwhile."),
    ("You can also {v} the {n} with the {m} endpoint.", "The {m} endpoint lets you {v} the {n} too.",
     "Alternatively, call the {m} endpoint to {v} the {n}."),
    ("Note that a {a} {n} cannot be {v}-ed later.", "Keep in mind you cannot {v} a {a} {n} afterwards.",
     "Be aware: {a} {n}s cannot be {v}-ed afterwards."),
    ("Contact support if the {n} does not appear.", "If you do not see the {n}, reach out to support.",
     "Reach support when the {n} is missing."),
    ("The {n} limit is {k} per {m}.", "Each {m} allows up to {k} {n}s.", "You can have at most {k} {n}s per {m}."),
    ("Changes to the {n} apply to the whole {m}.", "The whole {m} is affected by changes to the {n}.",
     "Any {n} change applies across the {m}."),
    ("{V} the {a} {m} before you {w} the {n}.", "Before you {w} the {n}, {v} the {a} {m}.",
     "First {v} the {a} {m}, then {w} the {n}."),
    ("The {n} and the {m} are {w}-ed every {k} hours.", "Every {k} hours the {n} and the {m} get {w}-ed.",
     "We {w} the {n} and {m} each {k} hours."),
    ("Billing for the {a} {n} starts on day {k}.", "The {a} {n} is billed from day {k}.",
     "From day {k} on, the {a} {n} is charged."),
    ("Use the {m} tab to {v} a {n} for {k} people.", "{V} a {n} for {k} people in the {m} tab.",
     "The {m} tab lets you {v} a {n} for {k} people."),
    ("A {a} {n} blocks the {m} until you {v} it.", "The {m} stays blocked while the {n} is {a}; {v} it to unblock.",
     "{V} the {a} {n}, or the {m} remains blocked."),
    ("The {n} is stored in the {m} for {k} days.", "We keep the {n} in the {m} for {k} days.",
     "For {k} days, the {n} remains in the {m}."),
]  # fmt: skip
OPENERS = ("Sure!", "Of course.", "Good question.", "Here is how.")
CLOSERS = ("Let me know if you have other questions.", "I hope this helps.", "Feel free to ask if anything is unclear.")


class SampledModel:
    """Answers to ``questions`` questions, sampled at temperature > 0: two answers to one are paraphrases."""

    def __init__(self, rng: np.random.Generator, questions: int = 40, synonym_rate: float = 0.3) -> None:
        self.rng, self.synonym_rate = rng, synonym_rate
        self.questions = [self._question() for _ in range(questions)]

    def _question(self) -> list[tuple[int, dict[str, int]]]:
        facts = self.rng.choice(len(FACTS), size=int(self.rng.integers(5, 8)), replace=False)
        sizes = {"n": len(NOUNS), "m": len(NOUNS), "v": len(VERBS), "w": len(VERBS), "a": len(ADJECTIVES)}
        slots = [{key: int(self.rng.integers(size)) for key, size in sizes.items()} for _ in facts]
        return [
            (int(fact), slot | {"k": int(self.rng.integers(2, 50))}) for fact, slot in zip(facts, slots, strict=True)
        ]

    def answer(self, question: int) -> str:
        rng, parts = self.rng, []
        for position, (fact, slots) in enumerate(self.questions[question]):
            if position >= 3 and rng.random() < 0.2:  # a fact the sample leaves out
                continue
            words = {key: self._word(key, index) for key, index in slots.items()}
            words |= {key.upper(): word.capitalize() for key, word in words.items()}
            parts.append(FACTS[fact][int(rng.integers(3))].format(**words))
        if len(parts) > 3 and rng.random() < 0.5:
            i = int(rng.integers(1, len(parts) - 1))
            parts[i], parts[i + 1] = parts[i + 1], parts[i]
        if rng.random() < 0.3:
            parts.insert(0, OPENERS[int(rng.integers(len(OPENERS)))])
        if rng.random() < 0.3:
            parts.append(CLOSERS[int(rng.integers(len(CLOSERS)))])
        return " ".join(parts)

    def _word(self, key: str, index: int) -> str:
        if key == "k":
            return str(index)
        group = {"n": NOUNS, "m": NOUNS, "v": VERBS, "w": VERBS, "a": ADJECTIVES}[key][index]
        return group[-1] if self.rng.random() < self.synonym_rate else group[0]

    def scored_pairs(self, n: int, *, different: bool) -> np.ndarray:
        """Buckets of n scored pairs: two samples for one question, or answers to two different questions."""
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            question = int(self.rng.integers(len(self.questions)))
            other = (question + 1 + int(self.rng.integers(len(self.questions) - 1))) % len(self.questions)
            a, b = self.answer(question), self.answer(other if different else question)
            value = score(Output("chat", text=a), Output("chat", text=b), TOL)
            out[i] = bucket(value if value is not None else 0.0)
        return out


@dataclass(frozen=True)
class Pool:
    """Scored pairs to resample: paraphrases (A/A, and a candidate equal to the incumbent), different answers."""

    paraphrase: np.ndarray
    different: np.ndarray


@functools.cache
def pool() -> Pool:
    model = SampledModel(np.random.default_rng(20240611))
    return Pool(model.scored_pairs(5_000, different=False), model.scored_pairs(2_000, different=True))


def histogram(buckets: np.ndarray) -> dict[int, float]:
    counts = np.bincount(buckets, minlength=IDENTICAL + 1)
    return {int(i): float(counts[i]) for i in np.flatnonzero(counts)}


def operating_characteristics(
    *,
    different_share: float,
    noise_rate: float,
    incumbent_different_share: float = 0.0,
    experiments: int = EXPERIMENTS,
    pairs: int = PAIRS,
    rule: DivergenceRule = RULE,
    seed: int = 1,
) -> dict[str, float]:
    """Shares of fail / pass / inconclusive over simulated experiments of ``pairs`` candidate pairs.

    The candidate answers another question on ``different_share`` of prompts; the incumbent itself does on
    ``incumbent_different_share`` (in its A/A pairs and against the candidate); A/A pairs are sampled on
    ``noise_rate`` of the requests.
    """
    rng, scored = np.random.default_rng(seed), pool()
    outcomes = {"fail": 0, "pass": 0, "inconclusive": 0}
    base = incumbent_different_share
    for _ in range(experiments):
        k = rng.binomial(pairs, different_share + base * (1 - different_share))
        cand = np.concatenate((rng.choice(scored.paraphrase, pairs - k), rng.choice(scored.different, k)))
        n_aa = rng.binomial(pairs, noise_rate)
        k_aa = rng.binomial(n_aa, base)
        aa = np.concatenate((rng.choice(scored.paraphrase, n_aa - k_aa), rng.choice(scored.different, k_aa)))
        outcomes[evaluate(histogram(cand), histogram(aa), rule).outcome] += 1
    shares = {name: count / experiments for name, count in outcomes.items()}
    print(
        f"{experiments} experiments of {pairs} pairs, A/A at {noise_rate:.0%} (~{pairs * noise_rate:.0f} pairs), "
        f"candidate different on {different_share:.0%}, incumbent on {base:.0%}: {shares}"
    )
    return shares


def test_sampled_text_scores_separate_paraphrases_from_different_answers() -> None:
    """The simulated model is realistic for the gate: paraphrases and different answers overlap a little."""
    scored = pool()
    paraphrase, different = bucket_value_of(scored.paraphrase), bucket_value_of(scored.different)
    assert np.mean(paraphrase == 1.0) < 0.01  # two samples are almost never identical
    low = np.quantile(paraphrase, 0.01)
    assert 0.005 < np.mean(different >= low) < 0.05 and np.median(different) < np.median(paraphrase) - 0.2


def bucket_value_of(buckets: np.ndarray) -> np.ndarray:
    return np.asarray([bucket_value(int(b)) for b in buckets])


@pytest.mark.parametrize("noise_rate", [0.05, 0.10])
def test_a_candidate_equal_to_the_sampled_incumbent_rarely_fails(noise_rate: float) -> None:
    """A/A: the candidate is the incumbent, sampled; over 200 experiments it fails at most 5% of them."""
    assert operating_characteristics(different_share=0.0, noise_rate=noise_rate)["fail"] <= 0.05


def test_a_candidate_answering_another_question_on_a_tenth_of_prompts_fails() -> None:
    """10% materially different answers under sampling fail 90% of 2,000-pair experiments (A/A at 10%)."""
    assert operating_characteristics(different_share=0.10, noise_rate=0.10)["fail"] >= 0.90
    operating_characteristics(different_share=0.10, noise_rate=0.05)  # printed: fewer A/A pairs, less power


def test_an_incumbent_that_disagrees_with_itself_does_not_let_a_worse_candidate_pass() -> None:
    """When the incumbent gives a different answer on 2% of prompts, the 10% candidate still never passes."""
    shares = operating_characteristics(different_share=0.10, noise_rate=0.10, incumbent_different_share=0.02)
    assert shares["pass"] <= 0.05 and shares["fail"] >= 0.4


def test_a_deterministic_incumbent_reduces_the_gate_to_the_exact_match_rate() -> None:
    """A/A all identical: t is 1.0, p_a is 0 and p_c is the share of answers that are not identical."""
    rng = np.random.default_rng(3)
    model = SampledModel(rng)
    answers = [model.answer(q % 40) for q in range(2_000)]
    changed = rng.random(2_000) < 0.12
    candidate = [model.answer(q % 40) if c else a for q, (a, c) in enumerate(zip(answers, changed, strict=True))]
    scores = [
        score(Output("chat", text=a), Output("chat", text=c), TOL) for a, c in zip(answers, candidate, strict=True)
    ]
    cand = histogram(np.asarray([bucket(s or 0.0) for s in scores]))
    aa = {IDENTICAL: 100.0}
    k_c, n_c, k_a, _, t = tail_counts(cand, aa, 0.05)
    assert (t, k_a, n_c) == (1.0, 0, 2_000) and k_c == int(changed.sum())
    result = evaluate(cand, aa, RULE)
    assert result.estimate == pytest.approx(changed.mean()) and result.outcome == "fail"
    assert result.details["identical_share_candidate"] == pytest.approx(1 - changed.mean())
    few = {IDENTICAL: 1_960.0, 150: 40.0}  # 2% not identical: within 5 pp of an incumbent that never changes
    assert evaluate(few, aa, RULE).outcome == "pass"


def test_a_garbage_candidate_fails_every_test() -> None:
    """A candidate whose every answer is different fails both tails and the shift."""
    rng = np.random.default_rng(4)
    cand = histogram(rng.choice(pool().different, 500))
    aa = histogram(rng.choice(pool().paraphrase, 100))
    result = evaluate(cand, aa, RULE)
    assert result.outcome == "fail" and result.p_value is not None and result.p_value < 1e-6
    assert [t["outcome"] for t in result.details["tails"]] == ["fail", "fail"]
    assert result.details["shift_outcome"] == "fail"


def test_too_few_noise_pairs_is_inconclusive_with_the_reason() -> None:
    """Below min_noise_pairs the gate says how many A/A pairs it has and how many more pairs to wait for."""
    rng = np.random.default_rng(5)
    cand = histogram(rng.choice(pool().different, 1_000))
    result = evaluate(cand, histogram(rng.choice(pool().paraphrase, 20)), RULE)
    assert result.outcome == "inconclusive" and "20 A/A pairs (minimum 50)" in result.rule
    assert result.need_more_pairs == 1_500  # 30 more A/A pairs at one per 50 candidate pairs
    none = evaluate(cand, {}, RULE)
    assert none.outcome == "inconclusive" and "compare.noise_sample_rate" in none.rule


def test_the_shift_is_the_median_of_pairwise_differences() -> None:
    """Hodges-Lehmann from bucket counts equals the brute-force median over every (candidate, A/A) pair."""
    rng = np.random.default_rng(6)
    cand, aa = rng.choice(pool().different, 301), rng.choice(pool().paraphrase, 77)
    brute = np.median(np.subtract.outer(bucket_value_of(cand), bucket_value_of(aa)))
    result = shift_test(dense(histogram(cand)), dense(histogram(aa)), 0.05, 0.025)
    assert result.estimate == pytest.approx(brute, abs=1e-9)
    assert result.interval[0] <= result.estimate <= result.interval[1]


def test_a_broad_drift_fails_the_shift_test() -> None:
    """Every answer a little less similar (no different answers) moves the HL shift past its margin."""
    rng = np.random.default_rng(7)
    aa = rng.choice(pool().paraphrase, 200)
    cand = np.clip(rng.choice(pool().paraphrase, 2_000) - 24, 0, IDENTICAL - 1)  # 0.12 lower
    result = evaluate(histogram(cand), histogram(aa), RULE)
    assert result.details["shift_outcome"] == "fail" and result.outcome == "fail"
    assert result.details["shift"] == pytest.approx(-0.12, abs=0.01)


def test_histograms_merge_by_addition() -> None:
    """Windows summed as float counters give the verdict of the pooled pairs."""
    rng = np.random.default_rng(8)
    cand, aa = rng.choice(pool().paraphrase, 1_000), rng.choice(pool().paraphrase, 100)
    halves = [histogram(cand[:400]), histogram(cand[400:])]
    merged = {b: halves[0].get(b, 0.0) + halves[1].get(b, 0.0) for b in halves[0].keys() | halves[1].keys()}
    assert evaluate(merged, histogram(aa), RULE) == evaluate(histogram(cand), histogram(aa), RULE)


def test_tail_bounds_hold_with_heavy_ties() -> None:
    """Scores on three values only: each bound of the excess errs no more often than its share of alpha."""
    rng = np.random.default_rng(9)
    values, probabilities = np.array([50, 100, 150]), np.array([0.02, 0.06, 0.92])
    errors = np.zeros(2)
    for _ in range(400):
        cand = histogram(rng.choice(values, 2_000, p=probabilities))
        aa = histogram(rng.choice(values, 200, p=probabilities))
        k_c, n_c, k_a, n_a, _ = tail_counts(cand, aa, 0.05)
        low, high = tail_test(k_c, n_c, k_a, n_a, 0.0, 0.05 / 3).interval
        errors += (low > 0.0, high < 0.0)  # the same distribution: the true excess is 0
    assert np.all(errors / 400 <= 0.035)  # 1.67% allowed, with room for 400 draws
