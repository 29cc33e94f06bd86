"""The statistical building blocks of the label-quality measures, and the JSON shapes they produce.

Every number PMs see is a proportion or a score estimated from a sample, often a small one (one
annotator's honeypots this week, the audit items of one model version). A bare point estimate invites
over-reading, so each proportion carries a Wilson 95 % interval (well-behaved at 0 %, 100 % and small n,
unlike the normal approximation), and a sample too small to say anything is reported as
"not enough data (n=...)" with the count instead of a number. Nothing here ever yields NaN: JSON has no
NaN, and a dashboard that plots one silently draws nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel
from scipy.stats import binomtest

#: Below this many observations a proportion, a score or an agreement coefficient is not reported.
DEFAULT_MIN_N = 10
CONFIDENCE = 0.95

Window = str  # "day" | "week"
WINDOW_FREQ = {"day": "D", "week": "W-MON"}


def not_enough(n: int, min_n: int, what: str = "") -> str:
    suffix = f" {what}" if what else ""
    return f"not enough data (n={n}{suffix}; need {min_n})"


class Proportion(BaseModel):
    """``k`` of ``n``, with a Wilson 95 % interval; ``value`` is None (and ``note`` says why) when n < min_n."""

    k: int
    n: int
    value: float | None = None
    low: float | None = None
    high: float | None = None
    note: str | None = None


class Estimate(BaseModel):
    """A score that is not a simple proportion (macro-F1, alpha, kappa), with an interval when one exists."""

    n: int
    value: float | None = None
    low: float | None = None
    high: float | None = None
    note: str | None = None


def proportion(k: int, n: int, min_n: int = DEFAULT_MIN_N) -> Proportion:
    """Wilson 95 % interval for k successes in n trials; no number below ``min_n``."""
    k, n = int(k), int(n)
    if n < max(min_n, 1):
        return Proportion(k=k, n=n, note=not_enough(n, min_n))
    ci = binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Proportion(k=k, n=n, value=k / n, low=float(ci.low), high=float(ci.high))


def finite(value: float | None) -> float | None:
    """None for NaN/inf, so that JSON never carries them."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _f1_from_codes(truth: np.ndarray, predicted: np.ndarray, k: int) -> float:
    """Macro-F1 of integer-coded labels over the classes present in either (absent classes would score 0
    and drag the mean down for reasons unrelated to the model). Plain numpy: the bootstrap calls it
    a thousand times per interval."""
    tp = np.bincount(truth[truth == predicted], minlength=k)
    support = np.bincount(truth, minlength=k)
    guessed = np.bincount(predicted, minlength=k)
    present = (support + guessed) > 0
    f1 = np.divide(2 * tp, support + guessed, out=np.zeros(k), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def _codes(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    index = {c: i for i, c in enumerate(labels)}
    extra = {v for v in (*truth, *predicted) if v not in index}
    for v in sorted(map(str, extra)):
        index[v] = len(index)
    return (np.array([index[v] for v in truth], dtype=int), np.array([index[v] for v in predicted], dtype=int),
            len(index))


def macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Macro-F1 over the classes present in the truth or the predictions."""
    t, p, k = _codes(list(truth), list(predicted), labels)
    return _f1_from_codes(t, p, k)


def bootstrap_ci(truth: np.ndarray, predicted: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                 *, rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of ``statistic(truth, predicted)``, resampling items."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    values = np.empty(rounds)
    for r in range(rounds):
        idx = rng.integers(0, n, n)
        values[r] = statistic(truth[idx], predicted[idx])
    alpha = (1 - CONFIDENCE) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def macro_f1_estimate(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str],
                      min_n: int = DEFAULT_MIN_N, rounds: int = 1000, seed: int = 0) -> Estimate:
    n = len(truth)
    if n < max(min_n, 1):
        return Estimate(n=n, note=not_enough(n, min_n))
    t, p, k = _codes(list(truth), list(predicted), labels)
    low, high = bootstrap_ci(t, p, lambda a, b: _f1_from_codes(a, b, k), rounds=rounds, seed=seed)
    return Estimate(n=n, value=_f1_from_codes(t, p, k), low=low, high=high)


def window_start(timestamps: pd.Series, window: Window) -> pd.Series:
    """The start of the day or ISO week (Monday) each timestamp falls in, as ``YYYY-MM-DD``."""
    if window not in WINDOW_FREQ:
        raise ValueError(f"window must be one of {sorted(WINDOW_FREQ)}, not {window!r}")
    moments = pd.to_datetime(timestamps, utc=True, errors="coerce", format="ISO8601")
    starts = moments.dt.floor("D") if window == "day" else (
        moments.dt.floor("D") - pd.to_timedelta(moments.dt.weekday, unit="D"))
    return starts.dt.strftime("%Y-%m-%d").fillna("unknown")


def _set_f1(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Macro-F1 over the labels present in the truth or the predictions, and micro-F1, of (n, K) 0/1 label-set
    matrices. Plain numpy, for the same reason as :func:`_f1_from_codes`."""
    t, p = truth.astype(bool), predicted.astype(bool)
    tp = (t & p).sum(axis=0)
    support_plus_guessed = t.sum(axis=0) + p.sum(axis=0)
    present = support_plus_guessed > 0
    f1 = np.divide(2 * tp, support_plus_guessed, out=np.zeros(t.shape[1]), where=present)
    macro = float(f1[present].mean()) if present.any() else 0.0
    total = support_plus_guessed.sum()
    micro = float(2 * tp.sum() / total) if total else 0.0
    return macro, micro


def label_set_f1_estimates(truth: np.ndarray, predicted: np.ndarray, min_n: int = DEFAULT_MIN_N,
                           rounds: int = 1000, seed: int = 0) -> tuple[Estimate, Estimate]:
    """Macro- and micro-F1 of multi-label predictions, each with a percentile bootstrap interval over items.
    Macro-F1 averages per-label F1 over the labels present (as the single-label macro-F1 does over classes),
    so every harm counts alike; micro-F1 pools every (item, label) decision, so frequent labels dominate."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    n = len(truth)
    if n < max(min_n, 1):
        return Estimate(n=n, note=not_enough(n, min_n)), Estimate(n=n, note=not_enough(n, min_n))
    macro, micro = _set_f1(truth, predicted)
    rng = np.random.default_rng(seed)
    values = np.empty((rounds, 2))
    for r in range(rounds):
        idx = rng.integers(0, n, n)
        values[r] = _set_f1(truth[idx], predicted[idx])
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, alpha, axis=0), np.quantile(values, 1 - alpha, axis=0)
    return (Estimate(n=n, value=macro, low=float(low[0]), high=float(high[0])),
            Estimate(n=n, value=micro, low=float(low[1]), high=float(high[1])))
