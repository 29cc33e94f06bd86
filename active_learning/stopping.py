"""When to stop asking reviewers for labels.

Two signals, because either alone misleads:

* **Stabilising predictions** (Bloodgood & Vijay-Shanker 2009): Cohen's kappa between successive
  models' predictions on a fixed set of unlabeled items. Once new labels stop changing what the model
  predicts (kappa above ~0.99 for a few rounds in a row), more labels of the same kind buy little.
  It needs no labeled validation data, so it works from the first round.
* **Learning-curve slope**: the least-squares slope of validation macro-F1 over the last few rounds,
  as macro-F1 gained per 100 labels. It answers the budget question directly ("is the next 100 labels
  worth it?"), but validation F1 is noisy, so it must stay below the floor for several rounds too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score


@dataclass(frozen=True)
class StoppingSignal:
    stop: bool
    kappa: float | None  # agreement with the previous round's predictions (None in the first round)
    est_gain_per_100: float | None  # macro-F1 gained per 100 labels, recent slope (None: too few points)
    reason: str
    stable_rounds: int = 0  # consecutive rounds with kappa above the threshold
    flat_rounds: int = 0  # consecutive rounds with est_gain_per_100 below the floor


def agreement_kappa(previous: np.ndarray | pd.Series, current: np.ndarray | pd.Series) -> float:
    """Cohen's kappa of two prediction vectors. Series are aligned on their index (item ids) so a
    pool that changed between rounds is compared on the items both rounds scored; arrays must be
    aligned already. Identical predictions count as kappa 1 even when kappa is undefined (one class)."""
    if isinstance(previous, pd.Series) and isinstance(current, pd.Series):
        common = previous.index.intersection(current.index)
        previous, current = previous.loc[common].to_numpy(), current.loc[common].to_numpy()
    previous, current = np.asarray(previous), np.asarray(current)
    if previous.shape != current.shape:
        raise ValueError(f"prediction vectors differ in length ({len(previous)} vs {len(current)}); "
                         "pass pandas Series indexed by item id to compare on common items")
    if not len(current):
        raise ValueError("no common items to compare predictions on")
    if np.array_equal(previous, current):
        return 1.0
    return float(cohen_kappa_score(previous, current))


@dataclass
class StoppingMonitor:
    """Feed it once per round; it says whether to stop and why.

    ``kappa_threshold``/``patience``: stop once kappa exceeded the threshold ``patience`` rounds in a
    row. ``min_gain_per_100``/``window``: stop once the slope of the last ``window`` validation scores
    stayed under ``min_gain_per_100`` macro-F1 per 100 labels for ``patience`` rounds in a row.
    """

    kappa_threshold: float = 0.99
    patience: int = 3
    min_gain_per_100: float = 0.002
    window: int = 4
    _previous: np.ndarray | pd.Series | None = field(default=None, init=False, repr=False)
    _curve: list[tuple[int, float]] = field(default_factory=list, init=False, repr=False)
    _stable: int = field(default=0, init=False, repr=False)
    _flat: int = field(default=0, init=False, repr=False)
    history: list[StoppingSignal] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.kappa_threshold <= 1:
            raise ValueError("kappa_threshold must lie in (0, 1]")
        if self.patience < 1 or self.window < 2:
            raise ValueError("patience must be >= 1 and window >= 2")

    def update(self, round: int, pool_predictions: np.ndarray | pd.Series, val_macro_f1: float | None,
               n_labels: int | None = None) -> StoppingSignal:
        """Record round ``round``: the model's predicted labels on the stop set, its validation
        macro-F1 (None if there is no validation set) and the number of labels it was trained on
        (needed for the slope; without it no gain is estimated)."""
        kappa = None if self._previous is None else agreement_kappa(self._previous, pool_predictions)
        self._previous = pool_predictions.copy()
        self._stable = self._stable + 1 if kappa is not None and kappa >= self.kappa_threshold else 0

        gain = None
        if val_macro_f1 is not None and n_labels is not None:
            self._curve.append((int(n_labels), float(val_macro_f1)))
            gain = self._slope_per_100()
        self._flat = self._flat + 1 if gain is not None and gain < self.min_gain_per_100 else 0

        if self._stable >= self.patience:
            stop, reason = True, (f"predictions stable: kappa >= {self.kappa_threshold} for {self._stable} "
                                  f"rounds (last {kappa:.4f})")
        elif self._flat >= self.patience:
            stop, reason = True, (f"learning curve flat: est. gain {gain:+.4f} macro-F1 per 100 labels, "
                                  f"below {self.min_gain_per_100} for {self._flat} rounds")
        else:
            stop = False
            parts = [f"kappa {kappa:.4f}" if kappa is not None else "first round"]
            if gain is not None:
                parts.append(f"est. gain {gain:+.4f} per 100 labels")
            reason = f"round {round}: continue ({', '.join(parts)})"
        signal = StoppingSignal(stop, kappa, gain, reason, self._stable, self._flat)
        self.history.append(signal)
        return signal

    def _slope_per_100(self) -> float | None:
        points = self._curve[-self.window:]
        if len(points) < self.window:
            return None
        x = np.array([p[0] for p in points], dtype=float)
        y = np.array([p[1] for p in points], dtype=float)
        if np.ptp(x) == 0:
            return None
        return float(np.polyfit(x, y, 1)[0] * 100.0)
