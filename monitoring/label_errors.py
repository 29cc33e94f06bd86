"""Likely label errors in the labelled set, found with confident learning (cleanlab).

A label is suspicious when a model that never saw it disagrees with it confidently. "Never saw it" is
the point: a head trained on all labels memorises its own errors, so the probabilities are out-of-fold,
from the same frozen-encoder + logistic head that fast mode trains (``training/fast.py``), refit on each
fold in well under a second once embeddings are cached.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel
from sklearn.model_selection import StratifiedKFold

from training.fast import fit_head

DEFAULT_FOLDS = 5


class LabelIssue(BaseModel):
    """One labelled task whose label looks wrong; ``quality`` is cleanlab's label quality score (lower is
    more suspicious), ``model_label`` the out-of-fold model's choice."""

    rank: int
    task_id: int
    item_id: str
    annotation_id: int
    label: str
    model_label: str
    quality: float
    text: str


def out_of_fold_proba(embeddings: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = DEFAULT_FOLDS,
                      seed: int = 0, class_weight: str | None = None) -> np.ndarray:
    """Class probabilities for every row from a head fit on the other folds (columns = class ids).

    Folds are stratified; the number of folds shrinks to the size of the rarest class (at least 2), so a
    class with few labels still appears in most training folds. A class absent from a training fold gets
    probability 0 there.

    The head is fit *without* class weights, unlike fast mode's classifier: confident learning compares each
    label with probabilities that must reflect the classes' real frequencies, and "balanced" weights inflate
    the rare class, which makes every majority-class label look doubtful (the benchmark compares both:
    ``bench/results/label_quality.md``).
    """
    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=n_classes)
    present = counts[counts > 0]
    if len(present) < 2:
        raise ValueError("out-of-fold probabilities need labels of at least two classes")
    k = int(max(2, min(folds, present.min())))
    if present.min() < 2:
        k = 2
    proba = np.zeros((len(y), n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class with one example triggers StratifiedKFold's warning
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(embeddings, y))
    for train, test in splits:
        if len(np.unique(y[train])) < 2:
            proba[test] = counts / counts.sum()
            continue
        head = fit_head(embeddings[train], y[train], seed=seed, class_weight=class_weight)
        proba[np.ix_(test, head.classes_)] = head.predict_proba(embeddings[test])
    return proba


def issue_ranking(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confident learning over given labels (class ids) and out-of-fold probabilities.

    Returns ``(order, flagged, quality)``: every row index, most suspicious first (cleanlab's flagged
    issues first, ranked by normalized margin, then the rest by label quality), the boolean mask of flagged
    rows, and the per-row label quality score.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=int)
    pred_probs = _normalised(pred_probs)
    quality = get_label_quality_scores(labels, pred_probs, method="normalized_margin")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate", n_jobs=1)
    order = np.lexsort((quality, ~flagged))
    return order, flagged, quality


def self_confidence_ranking(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """The plain baseline: rows ordered by the probability the model gives their own label, lowest first."""
    labels = np.asarray(labels, dtype=int)
    return np.argsort(pred_probs[np.arange(len(labels)), labels], kind="stable")


def rank_issues(frame: pd.DataFrame, pred_probs: np.ndarray, classes: Sequence[str], top_k: int) -> list[LabelIssue]:
    """The ``top_k`` flagged label issues of ``frame`` (columns ``task_id, id, annotation_id, label, text``,
    one row per labelled task, rows aligned with ``pred_probs``)."""
    if frame.empty or top_k <= 0:
        return []
    codes = {c: i for i, c in enumerate(classes)}
    y = frame["label"].map(codes).to_numpy(dtype=int)
    order, flagged, quality = issue_ranking(y, pred_probs)
    chosen = [i for i in order if flagged[i]][:top_k]
    model = np.asarray(pred_probs).argmax(axis=1)
    rows = frame.reset_index(drop=True)
    return [
        LabelIssue(rank=rank, task_id=int(rows.at[i, "task_id"]), item_id=str(rows.at[i, "id"]),
                   annotation_id=int(rows.at[i, "annotation_id"]), label=str(rows.at[i, "label"]),
                   model_label=classes[int(model[i])], quality=float(quality[i]), text=str(rows.at[i, "text"]))
        for rank, i in enumerate(chosen, start=1)
    ]


def _normalised(pred_probs: np.ndarray) -> np.ndarray:
    """Rows that sum to 1 (cleanlab asserts it); an all-zero row becomes uniform."""
    p = np.asarray(pred_probs, dtype=float)
    sums = p.sum(axis=1, keepdims=True)
    return np.where(sums > 0, p / np.where(sums > 0, sums, 1), 1.0 / p.shape[1])
