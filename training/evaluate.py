"""How good a classifier is, in one report that MLflow, the promotion gate and the CLI all read.

Macro-F1 is the headline number because trust & safety labels are skewed (Davidson: 6 % hate) and
accuracy rewards ignoring the rare harmful class; per-class recall is reported so the gate can refuse a
model that trades hate recall for overall F1; ECE says whether the pre-label scores Label Studio shows
(and uncertainty sampling ranks by) mean what they claim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from training.classifier import TextClassifier


@dataclass
class EvalReport:
    labels: tuple[str, ...]
    macro_f1: float
    accuracy: float
    ece: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true label, columns: predicted label

    def metrics(self) -> dict[str, float]:
        """Flat name -> value mapping, the shape ``mlflow.log_metrics`` takes."""
        flat = {"macro_f1": self.macro_f1, "accuracy": self.accuracy, "ece": self.ece}
        for label, scores in self.per_class.items():
            for name in ("precision", "recall", "f1"):
                flat[f"{name}_{label}"] = scores[name]
        return flat

    def to_dict(self) -> dict:
        return asdict(self) | {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        return cls(
            labels=tuple(d["labels"]),
            macro_f1=float(d["macro_f1"]),
            accuracy=float(d["accuracy"]),
            ece=float(d["ece"]),
            per_class={label: {k: float(v) for k, v in scores.items()}
                       for label, scores in d["per_class"].items()},
            confusion=[[int(c) for c in row] for row in d["confusion"]],
        )


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
    per_class = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": float(support[i])}
        for i, label in enumerate(labels)
    }
    return EvalReport(
        labels=labels,
        macro_f1=float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        accuracy=float(accuracy_score(y_true, y_pred)),
        ece=expected_calibration_error(proba, y_true),
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    )


def evaluate(classifier: TextClassifier, frame: pd.DataFrame, batch_size: int = 64,
             progress: Callable[[int], None] | None = None) -> EvalReport:
    """Run ``classifier`` over ``frame`` (columns ``text`` and ``label``, labels by name) and score it."""
    index = {label: i for i, label in enumerate(classifier.labels)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classifier's labels {list(classifier.labels)}")
    y_true = frame["label"].map(index).to_numpy(dtype=int)
    proba = classifier.predict_proba(frame["text"].tolist(), batch_size, progress)
    return evaluate_proba(proba, y_true, classifier.labels)


def plot_confusion(report: EvalReport, path: Path) -> Path:
    """Save the confusion matrix as a PNG: raw counts beside row-normalised rates (recall on the
    diagonal), since counts alone hide how a rare class fares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(report.confusion, dtype=float)
    rates = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    k = len(report.labels)
    fig, axes = plt.subplots(1, 2, figsize=(4.0 + 2.4 * k, 1.6 + 1.2 * k))
    for ax, matrix, title, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                                   (axes[1], rates, "row-normalised", "{:.2f}")):
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(matrix.max(), 1e-9))
        ax.set_title(title)
        ax.set_xticks(range(k), report.labels, rotation=30, ha="right")
        ax.set_yticks(range(k), report.labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(k):
            for j in range(k):
                dark = matrix[i, j] > 0.6 * matrix.max()
                ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center",
                        color="white" if dark else "black")
    fig.suptitle(f"macro-F1 {report.macro_f1:.3f}   accuracy {report.accuracy:.3f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_text(report: EvalReport) -> str:
    """A fixed-width per-class table with the headline numbers underneath."""
    width = max(8, *(len(label) for label in report.labels))
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for label in report.labels:
        s = report.per_class[label]
        lines.append(f"{label:<{width}}  {s['precision']:9.3f}  {s['recall']:6.3f}  {s['f1']:5.3f}  "
                     f"{int(s['support']):7d}")
    lines.append(f"macro-F1 {report.macro_f1:.4f}   accuracy {report.accuracy:.4f}   ECE {report.ece:.4f}")
    return "\n".join(lines)
