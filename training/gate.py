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

Multi-label taxonomies use the same rule on (n, K) 0/1 label sets: each label is a yes/no decision
with its own recall and F1, macro-F1 is their mean (as in ``training.evaluate``), and a label of
prevalence ``p`` has the same chance-level F1 ``2p / (1 + p)`` (predicting it for every item).

Resampling only ever changes how many eval items fall into each distinct outcome — a (true label,
champion's label, challenger's label) cell, or a (true set, champion's set, challenger's set) row for
multi-label — and every statistic here is a function of those counts; so one multinomial draw over
the outcomes per resample is the same bootstrap as resampling item indices, at a cost that grows with
the number of distinct outcomes, not of eval items.
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


def _as_label_sets(matrix: np.ndarray, n: int, k: int, what: str) -> np.ndarray:
    """An (n, K) 0/1 matrix of label sets, checked."""
    matrix = np.asarray(matrix)
    if matrix.shape != (n, k):
        raise ValueError(f"{what} has shape {matrix.shape}; expected ({n}, {k}) 0/1 label sets")
    if not np.isin(matrix, (0, 1)).all():
        raise ValueError(f"{what}: multi-label decisions must be 0/1 (threshold the probabilities first)")
    return matrix.astype(np.int8)


@dataclass(frozen=True)
class _Outcomes:
    """The eval set compressed to its distinct per-item outcomes: ``counts[u]`` items had outcome ``u``,
    which adds ``tally[u]`` to the five per-label counts every statistic is built from: support, items
    the champion / challenger predicted the label for, and the champion's / challenger's hits."""

    counts: np.ndarray  # (U,)
    tally: np.ndarray  # (U, 5, K)


def _single_label_outcomes(y_true: np.ndarray, champion: np.ndarray, challenger: np.ndarray, k: int) -> _Outcomes:
    """Outcomes are the ``K**3`` (true label, champion's label, challenger's label) cells."""
    n = len(y_true)
    a = _as_label_ids(champion, n, k, "champion predictions")
    b = _as_label_ids(challenger, n, k, "challenger predictions")
    if n and (y_true.min() < 0 or y_true.max() >= k):
        raise ValueError(f"true label ids must lie in 0..{k - 1}")
    counts = np.bincount((y_true * k + a) * k + b, minlength=k**3)
    t, c1, c2 = (np.eye(k)[i] for i in np.unravel_index(np.arange(k**3), (k, k, k)))
    return _Outcomes(counts, np.stack([t, c1, c2, t * c1, t * c2], axis=1))


def _multi_label_outcomes(y_true: np.ndarray, champion: np.ndarray, challenger: np.ndarray, k: int) -> _Outcomes:
    """Outcomes are the distinct (true set, champion's set, challenger's set) rows that occur: at most
    one per item, and far fewer in practice since most items carry no label and get none."""
    n = len(y_true)
    y = _as_label_sets(y_true, n, k, "true label sets")
    a = _as_label_sets(champion, n, k, "champion predictions")
    b = _as_label_sets(challenger, n, k, "challenger predictions")
    rows, counts = np.unique(np.concatenate([y, a, b], axis=1), axis=0, return_counts=True)
    y, a, b = np.split(rows.astype(np.float64), 3, axis=1)
    return _Outcomes(counts, np.stack([y, a, b, y * a, y * b], axis=1))


def _scores(tally: np.ndarray, n: int, model: int) -> dict[str, np.ndarray]:
    """Per-label recall and F1, macro-F1 and each label's chance-level F1 of model 0 (champion) or 1
    (challenger) from summed tallies (``[..., 5, K]``). Zero divisions give 0, as in
    ``training.evaluate`` (sklearn's ``zero_division=0``), so the full-sample numbers match the
    registry's cached metrics."""
    support = tally[..., 0, :]
    predicted = tally[..., 1 + model, :]
    tp = tally[..., 3 + model, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    share = support / n
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
    :func:`_scores` (resampled arrays have a leading resample axis).

    Single-label: ``y_true`` holds label ids and each model's predictions are label ids or class
    probabilities. Multi-label: ``y_true`` is an (n, K) 0/1 matrix of label sets and so is each
    model's decisions."""
    k = n_classes
    y_true = np.asarray(y_true)
    n = len(y_true)
    if n == 0:
        raise ValueError("the gate needs a non-empty evaluation set")
    if y_true.ndim == 2:
        outcomes = _multi_label_outcomes(y_true, champion, challenger, k)
    else:
        outcomes = _single_label_outcomes(y_true.astype(np.int64), champion, challenger, k)
    tally = outcomes.tally.reshape(len(outcomes.counts), -1)
    rng = np.random.default_rng(policy.seed)
    draws = rng.multinomial(n, outcomes.counts / n, size=policy.n_bootstrap)
    full = (outcomes.counts @ tally).reshape(5, k)
    resampled = (draws @ tally).reshape(-1, 5, k)
    return (_scores(full, n, 0), _scores(full, n, 1), _scores(resampled, n, 0), _scores(resampled, n, 1))


def macro_f1_gain(y_true: np.ndarray, baseline: np.ndarray, candidate: np.ndarray, n_classes: int,
                  policy: GatePolicy) -> Interval:
    """Macro-F1 of ``candidate`` minus that of ``baseline``, with its paired bootstrap interval."""
    base, cand, base_rs, cand_rs = paired_bootstrap(y_true, baseline, candidate, n_classes, policy)
    return _interval(cand["macro_f1"] - base["macro_f1"], cand_rs["macro_f1"] - base_rs["macro_f1"],
                     policy.confidence)


def judge(y_true: np.ndarray, champion: np.ndarray, challenger: np.ndarray, labels: Sequence[str],
          policy: GatePolicy) -> GateVerdict:
    """Decide whether ``challenger`` replaces ``champion`` (see the module docstring for the rule).

    ``y_true`` holds label ids into ``labels``, and each model's predictions are label ids or a
    probability matrix (rows: eval items in the same order, columns: ``labels``); or, for a multi-label
    taxonomy, ``y_true`` and both models' decisions are (n, K) 0/1 label-set matrices.
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
