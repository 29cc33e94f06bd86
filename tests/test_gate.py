"""The promotion gate's policy (training/gate.py) on synthetic eval sets shaped like Davidson's: pure
numpy, no MLflow, so `make test-unit` runs it."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from training.evaluate import evaluate_proba
from training.gate import GatePolicy, judge, macro_f1_gain

LABELS = ("hate", "offensive", "neither")
HATE, OFFENSIVE, NEITHER = range(3)
N = 5000
INTERVAL = re.compile(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]")


@pytest.fixture(scope="module")
def y_true() -> np.ndarray:
    """Davidson's class shares on the frozen test split: about 6 % hate, 77 % offensive, 17 % neither."""
    return np.random.default_rng(0).choice(3, size=N, p=[0.06, 0.77, 0.17])


def model(y: np.ndarray, recall: tuple[float, float, float], seed: int) -> np.ndarray:
    """Predictions that get each class right at the given rate and otherwise pick another class."""
    rng = np.random.default_rng(seed)
    right = rng.random(len(y)) < np.asarray(recall)[y]
    other = (y + rng.integers(1, 3, size=len(y))) % 3
    return np.where(right, y, other)


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    return evaluate_proba(np.eye(3)[pred], y, LABELS).macro_f1


def check(verdict, label: str):
    return next(c for c in verdict.classes if c.label == label)


def test_a_big_gain_over_a_majority_class_champion_is_promoted_despite_its_recall_drop(y_true):
    """The 0.29 champion that says "offensive" for nearly everything must not block a much better model
    through the one recall it gets for free."""
    rng = np.random.default_rng(1)
    champion = np.where(rng.random(N) < 0.98, OFFENSIVE, rng.integers(0, 3, size=N))
    challenger = model(y_true, (0.5, 0.90, 0.8), seed=2)
    assert macro_f1(y_true, champion) < 0.32

    verdict = judge(y_true, champion, challenger, LABELS, GatePolicy(max_recall_drop=0.05))

    offensive = check(verdict, "offensive")
    assert offensive.recall_delta.high < -0.05  # a significant drop beyond the allowance...
    assert not offensive.guarded  # ...on a class the champion does no better than "always offensive"
    assert offensive.champion_f1_over_chance.low <= 0
    assert verdict.promoted, verdict.reason
    assert verdict.macro_f1_gain.low > 0.25
    assert re.search(r"recall not guarded for [^;]*'offensive'", verdict.reason)


def test_noise_is_refused_because_the_interval_includes_zero(y_true):
    """Two near-identical models: the challenger fixes some of the champion's errors and makes as many
    new ones, one net item better, a macro-F1 gain well under 0.001."""
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    wrong = np.flatnonzero((champion != y_true) & (y_true == OFFENSIVE) & (champion == NEITHER))
    right = np.flatnonzero((champion == y_true) & (y_true == OFFENSIVE))
    challenger = champion.copy()
    challenger[wrong[:61]] = OFFENSIVE
    challenger[right[:60]] = NEITHER

    verdict = judge(y_true, champion, challenger, LABELS, GatePolicy())

    assert 0 < verdict.macro_f1_gain.estimate < 0.001
    assert verdict.macro_f1_gain.low < 0 < verdict.macro_f1_gain.high
    assert not verdict.promoted
    assert "lower bound must exceed +0.0000" in verdict.reason


def test_identical_models_are_refused(y_true):
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    verdict = judge(y_true, champion, champion.copy(), LABELS, GatePolicy(min_gain=0.0))
    assert not verdict.promoted
    assert (verdict.macro_f1_gain.low, verdict.macro_f1_gain.high) == (0.0, 0.0)


def test_a_significant_recall_drop_on_a_class_the_champion_detects_is_refused(y_true):
    champion = model(y_true, (0.60, 0.90, 0.80), seed=4)
    challenger = model(y_true, (0.40, 0.97, 0.95), seed=5)  # better overall, much worse on hate

    verdict = judge(y_true, champion, challenger, LABELS, GatePolicy(max_recall_drop=0.05))

    hate = check(verdict, "hate")
    assert hate.guarded and hate.champion_f1_over_chance.low > 0
    assert hate.recall_delta.high < -0.05
    assert verdict.macro_f1_gain.low > 0  # the refusal is the recall rule's, not the gain rule's
    assert not verdict.promoted
    assert verdict.reason.startswith("recall of 'hate' changes by -0.")

    # the same drop is allowed when the allowance covers it
    lenient = judge(y_true, champion, challenger, LABELS, GatePolicy(max_recall_drop=0.5))
    assert lenient.promoted, lenient.reason


def test_a_recall_drop_that_may_be_noise_does_not_block(y_true):
    champion = model(y_true, (0.60, 0.90, 0.80), seed=4)
    challenger = model(y_true, (0.56, 0.95, 0.90), seed=6)  # hate recall a little lower: within noise
    verdict = judge(y_true, champion, challenger, LABELS, GatePolicy(max_recall_drop=0.05))
    hate = check(verdict, "hate")
    assert hate.guarded and hate.recall_delta.estimate < 0 and hate.recall_delta.high > -0.05
    assert verdict.promoted, verdict.reason


def test_min_gain_applies_to_the_lower_bound(y_true):
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    challenger = model(y_true, (0.50, 0.93, 0.78), seed=7)
    gain = judge(y_true, champion, challenger, LABELS, GatePolicy()).macro_f1_gain
    assert gain.low > 0
    between = GatePolicy(min_gain=(gain.low + gain.estimate) / 2)  # below the estimate, above the bound
    verdict = judge(y_true, champion, challenger, LABELS, between)
    assert not verdict.promoted and "lower bound must exceed" in verdict.reason


def test_reasons_carry_intervals_and_numbers_match_the_evaluation_report(y_true):
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    challenger = model(y_true, (0.55, 0.93, 0.85), seed=8)
    verdict = judge(y_true, champion, challenger, LABELS, GatePolicy())
    assert verdict.promoted
    assert verdict.reason.startswith("macro-F1 +0.")
    assert INTERVAL.search(verdict.reason), verdict.reason
    assert f"{macro_f1(y_true, challenger):.4f} vs champion {macro_f1(y_true, champion):.4f}" in verdict.reason
    assert verdict.macro_f1_gain.estimate == pytest.approx(macro_f1(y_true, challenger) - macro_f1(y_true, champion))
    gain = verdict.macro_f1_gain
    assert gain.low < gain.estimate < gain.high

    refused = judge(y_true, challenger, champion, LABELS, GatePolicy())
    assert not refused.promoted and INTERVAL.search(refused.reason), refused.reason


def test_the_verdict_is_deterministic_for_a_seed(y_true):
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    challenger = model(y_true, (0.50, 0.93, 0.78), seed=7)
    first = judge(y_true, champion, challenger, LABELS, GatePolicy(seed=11))
    assert judge(y_true, champion, challenger, LABELS, GatePolicy(seed=11)) == first
    other = judge(y_true, champion, challenger, LABELS, GatePolicy(seed=12))
    assert other.macro_f1_gain.estimate == first.macro_f1_gain.estimate
    assert other.macro_f1_gain != first.macro_f1_gain  # the resamples, and so the bounds, differ


def test_probabilities_and_label_ids_give_the_same_verdict(y_true):
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    challenger = model(y_true, (0.50, 0.93, 0.78), seed=7)
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=N) * 0.5
    proba[np.arange(N), challenger] += 0.5
    assert judge(y_true, champion, proba, LABELS, GatePolicy()) == judge(
        y_true, champion, challenger, LABELS, GatePolicy())


def test_macro_f1_gain_over_a_baseline(y_true):
    majority = np.full(N, OFFENSIVE)
    good = model(y_true, (0.45, 0.92, 0.75), seed=3)
    assert macro_f1_gain(y_true, majority, good, 3, GatePolicy()).low > 0.2
    collapsed = np.where(np.random.default_rng(9).random(N) < 0.995, OFFENSIVE, NEITHER)
    gain = macro_f1_gain(y_true, majority, collapsed, 3, GatePolicy())
    assert gain.low <= 0


def test_thousands_of_items_and_a_thousand_resamples_take_well_under_a_second(y_true):
    champion = model(y_true, (0.45, 0.92, 0.75), seed=3)
    challenger = model(y_true, (0.50, 0.93, 0.78), seed=7)
    started = time.perf_counter()
    judge(y_true, champion, challenger, LABELS, GatePolicy(n_bootstrap=1000))
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("kwargs", [{"confidence": 1.0}, {"confidence": 0.3}, {"n_bootstrap": 10},
                                    {"max_recall_drop": -0.1}])
def test_bad_policies_are_rejected(kwargs):
    with pytest.raises(ValueError):
        GatePolicy(**kwargs)


def test_bad_predictions_are_rejected(y_true):
    good = model(y_true, (0.45, 0.92, 0.75), seed=3)
    with pytest.raises(ValueError, match="shape"):
        judge(y_true, good[:-1], good, LABELS, GatePolicy())
    with pytest.raises(ValueError, match="label ids"):
        judge(y_true, good, np.full(N, 3), LABELS, GatePolicy())
    with pytest.raises(ValueError, match="non-empty"):
        judge(np.array([], dtype=int), np.array([], dtype=int), np.array([], dtype=int), LABELS, GatePolicy())


# ------------------------------------------------------------------------------------------------
# Multi-label: (n, K) 0/1 label sets, one yes/no decision per label
# ------------------------------------------------------------------------------------------------

ML_LABELS = ("violence", "gender", "race", "religion")
ML_N = 3000


@pytest.fixture(scope="module")
def y_sets() -> np.ndarray:
    """Label sets with ETHOS-like prevalences (a third violence, a fifth or less for each target)."""
    rng = np.random.default_rng(21)
    return (rng.random((ML_N, 4)) < np.array([0.33, 0.2, 0.18, 0.17])).astype(np.int8)


def ml_model(y: np.ndarray, recall: tuple[float, ...], false_positive: float, seed: int) -> np.ndarray:
    """Decisions that find each label's positives at the given rate and add false positives at
    ``false_positive`` among its negatives."""
    rng = np.random.default_rng(seed)
    draw = rng.random(y.shape)
    return np.where(y == 1, draw < np.asarray(recall), draw < false_positive).astype(np.int8)


def ml_macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    from training.evaluate import evaluate_multilabel

    return evaluate_multilabel(pred.astype(float), y, ML_LABELS, np.full(4, 0.5)).macro_f1


def test_multilabel_big_gain_is_promoted_and_numbers_match_the_evaluation(y_sets):
    champion = ml_model(y_sets, (0.5, 0.5, 0.5, 0.5), 0.10, seed=1)
    challenger = ml_model(y_sets, (0.85, 0.85, 0.85, 0.85), 0.05, seed=2)

    verdict = judge(y_sets, champion, challenger, ML_LABELS, GatePolicy())

    assert verdict.promoted, verdict.reason
    assert verdict.macro_f1_gain.low > 0.2
    assert verdict.macro_f1_gain.estimate == pytest.approx(ml_macro_f1(y_sets, challenger)
                                                           - ml_macro_f1(y_sets, champion))
    assert f"over {ML_N} eval items" in verdict.reason
    assert [c.label for c in verdict.classes] == list(ML_LABELS)
    assert all(c.guarded for c in verdict.classes)


def test_multilabel_recall_drop_on_a_label_the_champion_is_good_at_is_refused(y_sets):
    """The challenger is much better on three labels (a clear macro-F1 gain) but loses a third of
    the champion's 'race' recall."""
    champion = ml_model(y_sets, (0.5, 0.5, 0.9, 0.5), 0.08, seed=3)
    challenger = ml_model(y_sets, (0.9, 0.9, 0.6, 0.9), 0.04, seed=4)

    verdict = judge(y_sets, champion, challenger, ML_LABELS, GatePolicy(max_recall_drop=0.05))

    race = check(verdict, "race")
    assert race.guarded and race.recall_delta.high < -0.05
    assert verdict.macro_f1_gain.low > 0  # refused by the recall rule, not the gain rule
    assert not verdict.promoted
    assert verdict.reason.startswith("recall of 'race' changes by -0.")
    assert judge(y_sets, champion, challenger, ML_LABELS, GatePolicy(max_recall_drop=0.5)).promoted


def test_multilabel_noise_is_refused(y_sets):
    """On each label the challenger finds 30 positives the champion missed and misses 29 it found:
    one net item better per label."""
    champion = ml_model(y_sets, (0.7, 0.6, 0.6, 0.6), 0.06, seed=5)
    challenger = champion.copy()
    for k in range(len(ML_LABELS)):
        missed = np.flatnonzero((y_sets[:, k] == 1) & (champion[:, k] == 0))
        found = np.flatnonzero((y_sets[:, k] == 1) & (champion[:, k] == 1))
        challenger[missed[:30], k] = 1
        challenger[found[:29], k] = 0

    verdict = judge(y_sets, champion, challenger, ML_LABELS, GatePolicy())

    assert 0 < verdict.macro_f1_gain.estimate < 0.005
    assert verdict.macro_f1_gain.low < 0 < verdict.macro_f1_gain.high
    assert not verdict.promoted and "lower bound must exceed" in verdict.reason


def test_multilabel_recall_of_a_label_the_champion_predicts_everywhere_is_not_guarded(y_sets):
    """'always violence' is chance level on violence: losing that recall must not block a better model."""
    champion = ml_model(y_sets, (1.0, 0.5, 0.5, 0.5), 0.08, seed=7)
    champion[:, 0] = 1
    challenger = ml_model(y_sets, (0.7, 0.9, 0.9, 0.9), 0.04, seed=8)

    verdict = judge(y_sets, champion, challenger, ML_LABELS, GatePolicy())

    violence = check(verdict, "violence")
    assert not violence.guarded and violence.recall_delta.high < -0.05
    assert violence.champion_f1_over_chance.estimate == pytest.approx(0.0, abs=1e-12)
    assert verdict.promoted, verdict.reason
    assert "recall not guarded for 'violence'" in verdict.reason


def test_multilabel_gain_over_the_empty_set_baseline(y_sets):
    empty = np.zeros_like(y_sets)
    good = ml_model(y_sets, (0.8, 0.8, 0.8, 0.8), 0.05, seed=9)
    assert macro_f1_gain(y_sets, empty, good, 4, GatePolicy()).low > 0.5
    assert macro_f1_gain(y_sets, empty, empty.copy(), 4, GatePolicy()).estimate == 0.0


def test_multilabel_bad_decisions_are_rejected(y_sets):
    good = ml_model(y_sets, (0.8, 0.8, 0.8, 0.8), 0.05, seed=9)
    with pytest.raises(ValueError, match="shape"):
        judge(y_sets, good[:, :3], good, ML_LABELS, GatePolicy())
    with pytest.raises(ValueError, match="0/1"):
        judge(y_sets, good, good * 0.7, ML_LABELS, GatePolicy())


def test_multilabel_gate_is_fast_on_thousands_of_items(y_sets):
    champion = ml_model(y_sets, (0.5, 0.5, 0.5, 0.5), 0.10, seed=1)
    challenger = ml_model(y_sets, (0.6, 0.6, 0.6, 0.6), 0.08, seed=2)
    started = time.perf_counter()
    judge(y_sets, champion, challenger, ML_LABELS, GatePolicy(n_bootstrap=1000))
    assert time.perf_counter() - started < 1.0
