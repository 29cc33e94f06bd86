"""How good a classifier is, in one report that MLflow, the promotion gate and the CLI all read.

Macro-F1 is the headline number because trust & safety labels are skewed (Davidson: 6 % hate) and
accuracy rewards ignoring the rare harmful class; per-class recall is reported so the gate can refuse a
model that trades hate recall for overall F1; ECE says whether the pre-label scores Label Studio shows
(and uncertainty sampling ranks by) mean what they claim.

A multi-label model (any subset of the labels per item) gets the same per-label keys and macro-F1, plus
micro-F1 and subset accuracy (:class:`MultiLabelEvalReport`); its labels are decided by per-label
thresholds tuned on validation data (:func:`tune_thresholds`), since a rare label's sigmoid seldom
reaches 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from training.classifier import TextClassifier


@dataclass
class EvalReport:
    """A single-label model's scores: one label per item, ``accuracy`` the share of items labelled right,
    ``confusion`` the K x K matrix (rows: true label, columns: predicted label)."""

    labels: tuple[str, ...]
    macro_f1: float
    accuracy: float
    ece: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]

    multi_label: ClassVar[bool] = False

    def metrics(self) -> dict[str, float]:
        """Flat name -> value mapping, the shape ``mlflow.log_metrics`` takes."""
        flat = {"macro_f1": self.macro_f1, "accuracy": self.accuracy, "ece": self.ece}
        for label, scores in self.per_class.items():
            for name in ("precision", "recall", "f1"):
                flat[f"{name}_{label}"] = scores[name]
        return flat

    def to_dict(self) -> dict:
        return asdict(self) | {"labels": list(self.labels), "multi_label": self.multi_label}

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """Either kind of report from :meth:`to_dict` (reports written before multi-label have no
        ``multi_label`` key and are single-label)."""
        kind = MultiLabelEvalReport if d.get("multi_label") else EvalReport
        return kind(**kind._fields_from_dict(d))

    @classmethod
    def _fields_from_dict(cls, d: dict) -> dict:
        return {
            "labels": tuple(d["labels"]),
            "macro_f1": float(d["macro_f1"]),
            "accuracy": float(d["accuracy"]),
            "ece": float(d["ece"]),
            "per_class": {label: {k: float(v) for k, v in scores.items()} for label, scores in d["per_class"].items()},
            "confusion": [[int(c) for c in row] for row in d["confusion"]],
        }

    def headline(self) -> str:
        return f"macro-F1 {self.macro_f1:.4f}   accuracy {self.accuracy:.4f}   ECE {self.ece:.4f}"

    def text(self) -> str:
        """A fixed-width per-class table with the headline numbers underneath."""
        width = max(8, *(len(label) for label in self.labels))
        lines = [f"{'label':<{width}}  precision  recall     f1  support"]
        for label in self.labels:
            s = self.per_class[label]
            lines.append(f"{label:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  "
                         f"{int(s['support']):7d}")
        lines.append(self.headline())
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        """The confusion matrix as a PNG: raw counts beside row-normalised rates (recall on the
        diagonal), since counts alone hide how a rare class fares."""
        plt = _pyplot()
        counts = np.asarray(self.confusion, dtype=float)
        rates = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
        k = len(self.labels)
        fig, axes = plt.subplots(1, 2, figsize=(4.0 + 2.4 * k, 1.6 + 1.2 * k))
        for ax, matrix, title, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                                       (axes[1], rates, "row-normalised", "{:.2f}")):
            ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(matrix.max(), 1e-9))
            ax.set_title(title)
            ax.set_xticks(range(k), self.labels, rotation=30, ha="right")
            ax.set_yticks(range(k), self.labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            for i in range(k):
                for j in range(k):
                    dark = matrix[i, j] > 0.6 * matrix.max()
                    ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center",
                            color="white" if dark else "black")
        fig.suptitle(f"macro-F1 {self.macro_f1:.3f}   accuracy {self.accuracy:.3f}")
        return _save(plt, fig, path)


@dataclass
class MultiLabelEvalReport(EvalReport):
    """A multi-label model's scores. Each label is its own yes/no decision, so ``per_class`` holds each
    label's precision, recall and F1 among its own positives (``support``: items that carry it),
    ``confusion`` is one ``[tn, fp, fn, tp]`` row per label (a K x K matrix means nothing when an item
    carries several labels), ``accuracy`` is subset accuracy (the predicted set is exactly the true
    set, sklearn's ``accuracy_score`` on label sets), and ``ece`` is the calibration error of the
    n x K per-label probabilities."""

    micro_f1: float

    multi_label: ClassVar[bool] = True

    @property
    def subset_accuracy(self) -> float:
        return self.accuracy

    def metrics(self) -> dict[str, float]:
        return super().metrics() | {"micro_f1": self.micro_f1, "subset_accuracy": self.accuracy}

    @classmethod
    def _fields_from_dict(cls, d: dict) -> dict:
        return super()._fields_from_dict(d) | {"micro_f1": float(d["micro_f1"])}

    def headline(self) -> str:
        return (f"macro-F1 {self.macro_f1:.4f}   micro-F1 {self.micro_f1:.4f}   subset accuracy "
                f"{self.accuracy:.4f}   ECE {self.ece:.4f}")

    def plot(self, path: Path) -> Path:
        """Per-label precision, recall and F1 as grouped bars, each label named with its support: a
        label's bars are its own binary decision, and the support says how much to trust them."""
        plt = _pyplot()
        k = len(self.labels)
        fig, ax = plt.subplots(figsize=(6.5, 1.8 + 0.55 * k))
        y = np.arange(k)
        height = 0.26
        for offset, (name, colour) in zip((-height, 0.0, height),
                                          (("precision", "#9ecae1"), ("recall", "#3182bd"), ("f1", "#08519c")),
                                          strict=True):
            values = [self.per_class[label][name] for label in self.labels]
            ax.barh(y + offset, values, height=height, color=colour, label=name)
        ax.set_yticks(y, [f"{label} (n={int(self.per_class[label]['support'])})" for label in self.labels])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=3, fontsize="small", frameon=False)
        ax.set_title(f"macro-F1 {self.macro_f1:.3f}   micro-F1 {self.micro_f1:.3f}   "
                     f"subset accuracy {self.accuracy:.3f}", fontsize="medium")
        return _save(plt, fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expected_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the bin-size-weighted gap between confidence and accuracy over equal-width
    confidence bins (Guo et al. 2017)."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    confidence = proba.max(1)
    correct = (proba.argmax(1) == y_true).astype(np.float64)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def evaluate_proba(proba: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> EvalReport:
    """Score predicted probabilities (rows: texts, columns: ``labels``) against integer label ids."""
    proba = np.asarray(proba)
    y_true = np.asarray(y_true, dtype=int)
    labels = tuple(labels)
    if proba.ndim != 2 or proba.shape != (len(y_true), len(labels)):
        raise ValueError(f"proba has shape {proba.shape}, expected ({len(y_true)}, {len(labels)})")
    if len(y_true) == 0:
        raise ValueError("cannot evaluate on zero examples")
    if y_true.min() < 0 or y_true.max() >= len(labels):
        raise ValueError(f"label ids must lie in 0..{len(labels) - 1}")
    ids = list(range(len(labels)))
    y_pred = proba.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, zero_division=0
    )
    per_class = _per_class(labels, precision, recall, f1, support)
    return EvalReport(
        labels=labels,
        macro_f1=float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        accuracy=float(accuracy_score(y_true, y_pred)),
        ece=expected_calibration_error(proba, y_true),
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    )


def _per_class(labels: Sequence[str], *columns: np.ndarray) -> dict[str, dict[str, float]]:
    """sklearn's precision/recall/F1/support columns as one dict per label: the layout every report keeps."""
    return {label: dict(zip(("precision", "recall", "f1", "support"), (float(c[i]) for c in columns), strict=True))
            for i, label in enumerate(labels)}


def binary_calibration_error(proba: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE of independent per-label probabilities: every (item, label) pair is one prediction, binned by
    its probability, and each bin's mean probability is compared with how often the label was there."""
    p = np.asarray(proba, dtype=np.float64).ravel()
    y = np.asarray(y_true, dtype=np.float64).ravel()
    if len(p) == 0:
        return 0.0
    bins = np.clip(np.ceil(p * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.mean() * abs(y[members].mean() - p[members].mean())
    return float(ece)


def _check_multilabel(proba: np.ndarray, y_true: np.ndarray, labels: tuple[str, ...]) -> None:
    if len(labels) < 2:
        raise ValueError("a multi-label model needs at least two labels")
    if proba.ndim != 2 or proba.shape != y_true.shape or proba.shape[1] != len(labels):
        raise ValueError(f"proba has shape {proba.shape} and the true label sets {y_true.shape}; both must be "
                         f"(n, {len(labels)})")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("multi-label true labels must be a 0/1 matrix (one column per label)")


def evaluate_multilabel(proba: np.ndarray, y_true: np.ndarray, labels: Sequence[str],
                        thresholds: Sequence[float] | np.ndarray) -> MultiLabelEvalReport:
    """Score per-label probabilities against an (n, K) 0/1 matrix of true label sets; a label is
    predicted where its probability reaches its threshold."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true)
    labels = tuple(labels)
    _check_multilabel(proba, y_true, labels)
    if len(y_true) == 0:
        raise ValueError("cannot evaluate on zero examples")
    y_true = y_true.astype(np.int8)
    y_pred = (proba >= np.asarray(thresholds, dtype=np.float64)).astype(np.int8)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    per_class = _per_class(labels, precision, recall, f1, support)
    return MultiLabelEvalReport(
        labels=labels,
        macro_f1=float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        accuracy=float(accuracy_score(y_true, y_pred)),
        ece=binary_calibration_error(proba, y_true),
        per_class=per_class,
        confusion=multilabel_confusion_matrix(y_true, y_pred).reshape(len(labels), 4).tolist(),
        micro_f1=float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
    )


def tune_thresholds(proba: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """Per-label decision thresholds that maximise each label's F1 on held-out data (``proba`` and an
    (n, K) 0/1 ``y_true``). The threshold sits halfway between the lowest score the best cut keeps and
    the next score below it, not on a score itself, so that float noise between two runs of the same
    model cannot flip the decision on the item that set it. A label with no positives keeps 0.5:
    nothing there says where its cut belongs; and the cut is never 0, so a label the model gives
    probability 0 (one it has no training examples of) is never chosen. Among equally good cuts the
    lowest wins (the most recall, which trust & safety cares about)."""
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true)
    if proba.ndim != 2 or proba.shape != y_true.shape:
        raise ValueError(f"proba has shape {proba.shape} but the true label sets {y_true.shape}")
    thresholds = np.full(proba.shape[1], 0.5)
    for k in range(proba.shape[1]):
        if not y_true[:, k].any():
            continue
        precision, recall, cuts = precision_recall_curve(y_true[:, k], proba[:, k])
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
        f1[cuts <= 0] = -1.0  # a cut at 0 would choose the label for every item, even where it has no chance
        if f1.max() < 0:
            continue
        best = int(np.argmax(f1))
        below = cuts[best - 1] if best > 0 else 0.0
        thresholds[k] = (below + cuts[best]) / 2
    return thresholds


def label_matrix(label_sets: Iterable[Iterable[str]], labels: Sequence[str]) -> np.ndarray:
    """Label sets (tuples of names) → an (n, K) 0/1 matrix in ``labels`` order."""
    index = {label: i for i, label in enumerate(labels)}
    rows = list(label_sets)
    out = np.zeros((len(rows), len(index)), dtype=np.int8)
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classifier's labels {list(labels)}")
        out[i, [index[label] for label in row]] = 1
    return out


def score_proba(classifier: TextClassifier, proba: np.ndarray, y_true: np.ndarray) -> EvalReport:
    """Score ``classifier``'s probabilities the way it decides: argmax for a single-label model
    (``y_true`` label ids), its own per-label thresholds for a multi-label one (``y_true`` 0/1 rows)."""
    if classifier.multi_label:
        return evaluate_multilabel(proba, y_true, classifier.labels, classifier.thresholds)
    return evaluate_proba(proba, y_true, classifier.labels)


def true_labels(classifier: TextClassifier, frame_labels: pd.Series) -> np.ndarray:
    """A frame's ``label`` column as ``classifier`` is scored against it: label ids, or a 0/1 matrix of
    label sets for a multi-label model."""
    if classifier.multi_label:
        return label_matrix(frame_labels, classifier.labels)
    index = {label: i for i, label in enumerate(classifier.labels)}
    unknown = sorted(set(frame_labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classifier's labels {list(classifier.labels)}")
    return frame_labels.map(index).to_numpy(dtype=int)


def evaluate(classifier: TextClassifier, frame: pd.DataFrame, batch_size: int = 64,
             progress: Callable[[int], None] | None = None) -> EvalReport:
    """Run ``classifier`` over ``frame`` (columns ``text`` and ``label``: label names, or tuples of them
    for a multi-label model) and score it."""
    y_true = true_labels(classifier, frame["label"])
    proba = classifier.predict_proba(frame["text"].tolist(), batch_size, progress)
    return score_proba(classifier, proba, y_true)


def plot_confusion(report: EvalReport, path: Path) -> Path:
    """Save the report's picture as a PNG: the confusion matrix of a single-label model, per-label bars
    of a multi-label one."""
    return report.plot(path)


def report_text(report: EvalReport) -> str:
    return report.text()
