"""Likely label errors in the labelled set, found with confident learning (cleanlab).

A label is suspicious when a model that never saw it disagrees with it confidently. "Never saw it" is
the point: a head trained on all labels memorises its own errors, so the probabilities are out-of-fold,
from the same frozen-encoder + logistic head that fast mode trains (``training/fast.py``), refit on each
fold in well under a second once embeddings are cached.

Multi-label (label sets): one logistic regression per label gives out-of-fold sigmoid probabilities
(:func:`label_set_out_of_fold_proba`), and cleanlab's multi-label confident learning
(``find_label_issues(..., multi_label=True)`` and ``cleanlab.multilabel_classification``'s quality score)
flags a set with a label that should not be there or a missing one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from pydantic import BaseModel
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier

from training.fast import fit_head

DEFAULT_FOLDS = 5


class LabelIssue(BaseModel):
    """One labelled task whose label looks wrong; ``quality`` is cleanlab's label quality score (lower is
    more suspicious), ``model_label`` the out-of-fold model's choice. In a multi-label project both labels
    are lists of label names in taxonomy order (``[]``: none of these; the model's are those it gives
    probability 0.5 or more)."""

    rank: int
    task_id: int
    item_id: str
    annotation_id: int
    label: str | list[str]
    model_label: str | list[str]
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


def label_set_out_of_fold_proba(embeddings: np.ndarray, y: np.ndarray, *, folds: int = DEFAULT_FOLDS,
                                seed: int = 0, class_weight: str | None = None) -> np.ndarray:
    """Per-label probabilities of an (n, K) 0/1 ``y`` for every row, from one logistic regression per label
    fit on the other folds (plain k-fold: there is no stratification for label sets). Unweighted, for the
    reason :func:`out_of_fold_proba` gives; a label absent (or always present) in a training fold gets a
    constant probability there."""
    y = np.asarray(y, dtype=int)
    k = int(max(2, min(folds, len(y))))
    proba = np.zeros(y.shape, dtype=float)
    head = OneVsRestClassifier(LogisticRegression(class_weight=class_weight, max_iter=2000, random_state=seed))
    for train, test in KFold(n_splits=k, shuffle=True, random_state=seed).split(embeddings):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Label not k is present in all training examples"
            proba[test] = head.fit(embeddings[train], y[train]).predict_proba(embeddings[test])
    return proba


def rank_label_set_issues(frame: pd.DataFrame, y: np.ndarray, pred_probs: np.ndarray, classes: Sequence[str],
                          top_k: int) -> list[LabelIssue]:
    """The ``top_k`` label sets cleanlab flags (multi-label confident learning), lowest label quality first.
    ``frame`` as for :func:`rank_issues`, ``y`` its (n, K) 0/1 label sets, ``pred_probs`` per-label
    out-of-fold probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores

    if frame.empty or top_k <= 0:
        return []
    y = np.asarray(y, dtype=int)
    given = [list(np.flatnonzero(row)) for row in y]
    p = np.clip(np.asarray(pred_probs, dtype=float), 0.0, 1.0)
    quality = get_label_quality_scores(given, p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flagged = find_label_issues(labels=given, pred_probs=p, multi_label=True, n_jobs=1)
    chosen = [int(i) for i in np.lexsort((quality, ~flagged)) if flagged[i]][:top_k]
    rows = frame.reset_index(drop=True)
    return [
        LabelIssue(rank=rank, task_id=int(rows.at[i, "task_id"]), item_id=str(rows.at[i, "id"]),
                   annotation_id=int(rows.at[i, "annotation_id"]),
                   label=[c for c, on in zip(classes, y[i], strict=True) if on],
                   model_label=[c for c, q in zip(classes, p[i], strict=True) if q >= 0.5],
                   quality=float(quality[i]), text=str(rows.at[i, "text"]))
        for rank, i in enumerate(chosen, start=1)
    ]


def shown_label(label: str | Sequence[str]) -> str:
    """A label as people read it: the class name, or a label set joined with ``+`` (``none`` when empty)."""
    return label if isinstance(label, str) else "+".join(label) or "none"
