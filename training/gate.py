"""The promotion gate's policy: should a challenger replace the champion, judged on the frozen eval set?

Pure: label ids in, a verdict out; the registry does the I/O (loading models, caching predictions,
recording history). Point estimates with fixed thresholds failed both ways: a macro-F1 "gain" far
smaller than the eval set can resolve was promoted, while a large gain over a champion that predicted
the majority class for nearly everything was refused because that class's recall fell. So every number
the rule looks at comes with a paired bootstrap interval, and the per-class rule only protects classes
the champion actually detects.

The rule, at confidence level ``c`` (two-sided percentile intervals from the same resamples of the
eval items, both models scored on each resample):

1. **Gain.** Promote only if the lower bound of the macro-F1 gain (challenger − champion) is greater
   than ``min_gain``. A gain whose interval reaches down to ``min_gain`` is not distinguishable from
   no gain, and is refused.
2. **Protected classes.** A class is *guarded* when the champion detects it better than chance: the
   lower bound of (champion's F1 on the class − ``2p / (1 + p)``) is above 0, where ``p`` is the class's
   share of the (resampled) eval items. ``2p / (1 + p)`` is the F1 of predicting the class for every
   item, the best F1 any predictor that ignores the text can reach on it. A champion that says
   "offensive" for everything gets exactly that F1 on "offensive", so its recall there is not a skill
   the challenger can lose.
3. **Recall.** Refuse if, for a guarded class, the lower bound of the recall drop (champion −
   challenger) exceeds ``max_recall_drop``: the class loses more than is allowed, and the loss is not
   noise. An unguarded class's recall is reported but never blocks.

Resampling only ever changes how many eval items fall into each (true label, champion's label,
challenger's label) cell, and every statistic here is a function of those cell counts; so one
multinomial draw over the ``K**3`` cells per resample is the same bootstrap as resampling item indices,
at a cost that does not grow with the number of eval items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GatePolicy:
    min_gain: float = 0.0
    max_recall_drop: float = 0.05
    confidence: float = 0.95
    n_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must lie in [0.5, 1), not {self.confidence}")
        if self.n_bootstrap < 100:
            raise ValueError(f"n_bootstrap must be at least 100, not {self.n_bootstrap}")
        if not 0 <= self.max_recall_drop <= 1:
            raise ValueError(f"max_recall_drop must lie in [0, 1], not {self.max_recall_drop}")


@dataclass(frozen=True)
class Interval:
    """A statistic on the full eval set with its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


@dataclass(frozen=True)
class ClassCheck:
    label: str
    recall_delta: Interval  # challenger − champion
    f1_delta: Interval  # challenger − champion
    champion_f1_over_chance: Interval  # champion's F1 − 2p/(1+p)
    guarded: bool


@dataclass(frozen=True)
class GateVerdict:
    promoted: bool
    reason: str
    macro_f1_gain: Interval
    classes: tuple[ClassCheck, ...]
    policy: GatePolicy


def _as_label_ids(predictions: np.ndarray, n: int, k: int, what: str) -> np.ndarray:
    """Label ids from either label ids (1-D) or class probabilities (2-D, argmax)."""
    predictions = np.asarray(predictions)
    ids = predictions.argmax(1) if predictions.ndim == 2 else predictions
    if ids.shape != (n,):
        raise ValueError(f"{what} has shape {predictions.shape}; expected ({n},) label ids or ({n}, {k}) "
                         "probabilities")
    ids = ids.astype(np.int64, copy=False)
    if n and (ids.min() < 0 or ids.max() >= k):
        raise ValueError(f"{what}: label ids must lie in 0..{k - 1}")
    return ids


def _scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class recall and F1, macro-F1 and each class's chance-level F1 from confusion matrices
    (``[..., true, predicted]``). Zero divisions give 0, as in ``training.evaluate`` (sklearn's
    ``zero_division=0``), so the full-sample numbers match the registry's cached metrics."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    support = confusion.sum(-1).astype(np.float64)
    predicted = confusion.sum(-2).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        share = support / support.sum(-1, keepdims=True)
    return {"recall": recall, "f1": f1, "macro_f1": f1.mean(-1), "chance_f1": 2 * share / (1 + share)}


def _interval(observed: np.ndarray | float, resampled: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail], axis=0)
    return Interval(float(observed), float(low), float(high))


def paired_bootstrap(y_true: np.ndarray, champion: np.ndarray, challenger: np.ndarray, n_classes: int,
                     policy: GatePolicy) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                  dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores of both models on the full eval set and on ``policy.n_bootstrap`` paired resamples of it:
    ``(champion_full, challenger_full, champion_resampled, challenger_resampled)``, each as returned by
    :func:`_scores` (resampled arrays have a leading resample axis)."""
    k = n_classes
    y_true = np.asarray(y_true, dtype=np.int64)
    n = len(y_true)
    if n == 0:
        raise ValueError("the gate needs a non-empty evaluation set")
    a = _as_label_ids(champion, n, k, "champion predictions")
    b = _as_label_ids(challenger, n, k, "challenger predictions")
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"true label ids must lie in 0..{k - 1}")
    observed = np.bincount((y_true * k + a) * k + b, minlength=k**3)
    rng = np.random.default_rng(policy.seed)
    draws = rng.multinomial(n, observed / n, size=policy.n_bootstrap).reshape(-1, k, k, k)
    cells = observed.reshape(k, k, k)
    return (_scores(cells.sum(2)), _scores(cells.sum(1)), _scores(draws.sum(3)), _scores(draws.sum(2)))


def macro_f1_gain(y_true: np.ndarray, baseline: np.ndarray, candidate: np.ndarray, n_classes: int,
                  policy: GatePolicy) -> Interval:
    """Macro-F1 of ``candidate`` minus that of ``baseline``, with its paired bootstrap interval."""
    base, cand, base_rs, cand_rs = paired_bootstrap(y_true, baseline, candidate, n_classes, policy)
    return _interval(cand["macro_f1"] - base["macro_f1"], cand_rs["macro_f1"] - base_rs["macro_f1"],
                     policy.confidence)


def judge(y_true: np.ndarray, champion: np.ndarray, challenger: np.ndarray, labels: Sequence[str],
          policy: GatePolicy) -> GateVerdict:
    """Decide whether ``challenger`` replaces ``champion`` (see the module docstring for the rule).

    ``y_true`` holds label ids into ``labels``; each model's predictions are label ids or a probability
    matrix (rows: eval items in the same order, columns: ``labels``).
    """
    labels = tuple(labels)
    champ, chall, champ_rs, chall_rs = paired_bootstrap(y_true, champion, challenger, len(labels), policy)
    conf = policy.confidence
    gain = _interval(chall["macro_f1"] - champ["macro_f1"], chall_rs["macro_f1"] - champ_rs["macro_f1"], conf)
    recall_d = chall_rs["recall"] - champ_rs["recall"]
    f1_d = chall_rs["f1"] - champ_rs["f1"]
    skill = champ_rs["f1"] - champ_rs["chance_f1"]
    classes = []
    for i, label in enumerate(labels):
        over_chance = _interval(champ["f1"][i] - champ["chance_f1"][i], skill[:, i], conf)
        classes.append(ClassCheck(
            label=label,
            recall_delta=_interval(chall["recall"][i] - champ["recall"][i], recall_d[:, i], conf),
            f1_delta=_interval(chall["f1"][i] - champ["f1"][i], f1_d[:, i], conf),
            champion_f1_over_chance=over_chance,
            guarded=over_chance.low > 0,
        ))
    pct = f"{conf:.0%}"
    headline = (f"macro-F1 {gain} ({chall['macro_f1']:.4f} vs champion {champ['macro_f1']:.4f}, "
                f"{pct} paired bootstrap over {len(np.asarray(y_true))} eval items)")
    if gain.low <= policy.min_gain:
        return GateVerdict(False, f"{headline}: the interval's lower bound must exceed {policy.min_gain:+.4f}",
                           gain, tuple(classes), policy)
    # a drop beyond the allowance means the challenger's recall delta stays below -max_recall_drop
    dropped = [c for c in classes if c.guarded and -c.recall_delta.high > policy.max_recall_drop]
    if dropped:
        worst = min(dropped, key=lambda c: c.recall_delta.high)
        return GateVerdict(False, (
            f"recall of {worst.label!r} changes by {worst.recall_delta}, a drop of more than "
            f"{policy.max_recall_drop:.4f} allowed on a class the champion detects better than chance "
            f"(its F1 beats always-{worst.label!r} by {worst.champion_f1_over_chance}), despite {headline}"),
            gain, tuple(classes), policy)
    unguarded = [c.label for c in classes if not c.guarded]
    note = (f"; recall not guarded for {', '.join(map(repr, unguarded))} (champion no better than chance there)"
            if unguarded else "")
    return GateVerdict(True, f"{headline} clears {policy.min_gain:+.4f}{note}", gain, tuple(classes), policy)
