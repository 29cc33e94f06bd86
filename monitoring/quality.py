"""Label-accuracy measures PMs can trust: pure functions over one table of annotations.

The table (:meth:`monitoring.quality_context.QualityContext.table` builds it from the journal and the slice
store) has one row per usable annotation with the columns

``annotation_id, task_id, item_id, text, label, annotator, updated_at, ground_truth, lead_time,
suggested_label, suggested_model_version, kind, gold, model_version, model_label, prediction_id``

where ``kind`` is the task's purpose (``active`` for the ordinary queue, or ``audit`` / ``honeypot`` /
``overlap`` / ``adjudication`` from the slice store), ``gold`` the known right answer when there is one
(a honeypot's label, or the label a reviewer marked as Label Studio ground truth on that task), and
``model_label`` the champion's prediction for an audit item (the audit shows none, so it is computed
afterwards). Functions here never read files or servers, so each is unit-tested on hand-built tables.

Every measure can be broken down by ``annotator``, ``class``, ``version``, ``day`` or ``week``
(:data:`BREAKDOWNS`).

For a multi-label taxonomy a label cell is a tuple of label names; :class:`LabelKind` says how each measure
reads it (exact-set match, per-label views beside it), so the measures themselves are written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from labelloop.journal import label_cell
from labelloop.slices import COLUMNS as SLICE_COLUMNS
from labelloop.taxonomy import Taxonomy
from monitoring import agreement as agreement_
from monitoring import label_errors
from monitoring.quality_stats import (
    DEFAULT_MIN_N,
    Estimate,
    Proportion,
    finite,
    label_set_f1_estimates,
    macro_f1_estimate,
    not_enough,
    proportion,
    window_start,
)

Breakdown = Literal["annotator", "class", "version", "day", "week"]
BREAKDOWNS: tuple[Breakdown, ...] = ("annotator", "class", "version", "day", "week")

TABLE_COLUMNS = [
    "annotation_id", "task_id", "item_id", "text", "label", "annotator", "updated_at", "ground_truth",
    "lead_time", "suggested_label", "suggested_model_version", "kind", "gold", "model_version", "model_label",
    "prediction_id",
]


class Group(BaseModel):
    """One slice of a breakdown: its key (an annotator id, a class, a model version, a window start)."""

    key: str
    value: Proportion


class ConfusionMatrix(BaseModel):
    """``counts[row][col]``: how often the model suggested ``row`` and the reviewer chose ``col``."""

    labels: list[str]
    counts: list[list[int]]
    n: int


class Acceptance(BaseModel):
    """Suggestion acceptance: the share of annotations whose label equals the pre-label the annotator saw.

    ``without_suggestion`` counts annotations made with no pre-label (audit items, items opened before a
    prediction existed); they are not in ``overall``. ``suggestion_unknown`` counts annotations that started
    from a pre-label whose label is not known yet (a webhook names it by id only; the reconciler reads it),
    or not in the taxonomy: they are in neither."""

    overall: Proportion
    without_suggestion: int
    suggestion_unknown: int = 0
    by: Breakdown | None = None
    groups: list[Group] = []
    confusion: ConfusionMatrix
    confusion_by_version: dict[str, ConfusionMatrix] = {}


class GoldAccuracy(BaseModel):
    """Reviewer accuracy on items whose answer is known (honeypots and Label Studio ground truth)."""

    overall: Proportion
    by: Breakdown | None = None
    groups: list[Group] = []
    per_annotator: list[Group] = []
    per_class: list[Group] = []
    #: multi-label only (exact-set match is ``overall``): per label, how often the reviewer's yes/no for it
    #: matches gold, and of the gold items carrying it, the share the reviewer gave it
    per_label_accuracy: dict[str, Proportion] = {}
    per_label_recall: dict[str, Proportion] = {}


class ModelScores(BaseModel):
    """The model's accuracy, macro-F1 and per-class recall against reviewers' labels on one sample."""

    sample: str
    unbiased: bool
    n: int
    accuracy: Proportion
    macro_f1: Estimate
    recall: dict[str, Proportion]
    #: multi-label only: F1 pooled over every (item, label) decision
    micro_f1: Estimate | None = None
    note: str | None = None


class AuditReport(BaseModel):
    """The champion on the blind audit slice, next to the same numbers on actively selected labels."""

    audit: ModelScores
    active: ModelScores
    by: Breakdown | None = None
    groups: list[Group] = []
    unscored_audit_labels: int = 0
    note: str | None = None


class AutomationBias(BaseModel):
    """Whether showing a pre-label pulls reviewers toward the model.

    ``agreement_*``: how often the reviewer's label equals the model's, with the model's pre-label shown
    and without it (audit items, compared with the champion's prediction afterwards). ``gold_accuracy_*``:
    reviewer accuracy against known answers in both conditions. A large gap in agreement with no matching
    gain in gold accuracy means reviewers follow the model rather than check it. ``median_seconds_*``: Label
    Studio's lead time per label in both conditions (None without enough labels); accepting in a fraction of
    the time it takes to label blind is the same warning."""

    agreement_with_suggestion: Proportion
    agreement_without_suggestion: Proportion
    gold_accuracy_with_suggestion: Proportion
    gold_accuracy_without_suggestion: Proportion
    median_seconds_with_suggestion: float | None = None
    median_seconds_without_suggestion: float | None = None


# --- label kinds ----------------------------------------------------------------------------------------


class LabelKind(ABC):
    """How one kind of taxonomy's labels are compared, grouped and scored, so each measure is written once.

    A single-label cell is a class name; a multi-label cell is a tuple of label names (``()``: none of
    these). Every "is this label right" question (gold accuracy, acceptance of a pre-label, agreement with
    the model, the audit's accuracy) is an exact match: for a label set, the whole set, because a reviewer
    who keeps a wrong label or drops a right one made a mistake a PM must see. Per-label views sit beside
    it where a set hides which harm is confused (gold per label, agreement per label, F1 per label)."""

    multi = False

    def __init__(self, labels: Sequence[str]):
        self.labels = tuple(labels)

    @abstractmethod
    def same(self, a: pd.Series, b: pd.Series) -> pd.Series:
        """Row by row, whether two label columns hold the same answer (False where either is missing)."""

    @abstractmethod
    def key(self, cell: Any) -> str:
        """A label as a breakdown key and as shown to people."""

    @abstractmethod
    def in_taxonomy(self, cell: Any) -> bool:
        """Whether a label uses only the taxonomy's labels (a journal kept across a taxonomy change holds
        others, which no model-based measure can score)."""

    @abstractmethod
    def confusion(self, suggested: pd.Series, final: pd.Series) -> ConfusionMatrix: ...

    @abstractmethod
    def scores(self, truth: pd.Series, predicted: pd.Series, *, sample: str, unbiased: bool,
               min_n: int = DEFAULT_MIN_N, seed: int = 0) -> ModelScores: ...

    @abstractmethod
    def item_truth(self, rows: pd.DataFrame) -> pd.DataFrame:
        """One row per task carrying the reviewers' label, for scoring the model."""

    def per_label_gold(self, rows: pd.DataFrame, min_n: int) -> tuple[dict[str, Proportion], dict[str, Proportion]]:
        """Per-label accuracy and recall against gold; a class-level breakdown covers single labels."""
        return {}, {}

    @abstractmethod
    def agreement(self, labels: pd.DataFrame, min_n: int) -> agreement_.Agreement: ...

    crowdlab_unavailable: str | None = None

    @abstractmethod
    def targets(self, labels: pd.Series) -> np.ndarray:
        """Training targets for out-of-fold probabilities: class ids, or an (n, K) 0/1 matrix."""

    @abstractmethod
    def varied(self, y: np.ndarray) -> bool:
        """Whether the targets leave anything to learn (two classes; a label both present and absent)."""

    @abstractmethod
    def out_of_fold(self, embeddings: np.ndarray, y: np.ndarray, *, seed: int,
                    class_weight: str | None = None) -> np.ndarray: ...

    @abstractmethod
    def rank_issues(self, frame: pd.DataFrame, pred_probs: np.ndarray, top_k: int) -> list[label_errors.LabelIssue]:
        ...


class SingleLabel(LabelKind):
    """One class per item: the measures as they always were."""

    def same(self, a: pd.Series, b: pd.Series) -> pd.Series:
        return a == b

    def key(self, cell: Any) -> str:
        return "none" if _missing(cell) else str(cell)

    def in_taxonomy(self, cell: Any) -> bool:
        return cell in self.labels

    def confusion(self, suggested: pd.Series, final: pd.Series) -> ConfusionMatrix:
        return confusion(suggested, final, self.labels)

    def scores(self, truth: pd.Series, predicted: pd.Series, *, sample: str, unbiased: bool,
               min_n: int = DEFAULT_MIN_N, seed: int = 0) -> ModelScores:
        return model_scores(truth, predicted, self.labels, sample=sample, unbiased=unbiased, min_n=min_n, seed=seed)

    def item_truth(self, rows: pd.DataFrame) -> pd.DataFrame:
        return item_truth(rows)

    def agreement(self, labels: pd.DataFrame, min_n: int) -> agreement_.Agreement:
        return agreement_.agreement(labels, self.labels, min_n)

    def targets(self, labels: pd.Series) -> np.ndarray:
        return labels.map({c: i for i, c in enumerate(self.labels)}).to_numpy(dtype=int)

    def varied(self, y: np.ndarray) -> bool:
        return len(np.unique(y)) >= 2

    def out_of_fold(self, embeddings: np.ndarray, y: np.ndarray, *, seed: int,
                    class_weight: str | None = None) -> np.ndarray:
        return label_errors.out_of_fold_proba(embeddings, y, len(self.labels), seed=seed, class_weight=class_weight)

    def rank_issues(self, frame: pd.DataFrame, pred_probs: np.ndarray, top_k: int) -> list[label_errors.LabelIssue]:
        return label_errors.rank_issues(frame, pred_probs, self.labels, top_k)


class LabelSet(LabelKind):
    """Any subset of the labels per item (a multi-label taxonomy).

    Exact-set match for every accuracy; the model's macro-F1 averages per-label F1 (micro-F1 beside it) and
    its recall is per label; the reviewers' label of an item is the majority per label (strictly more than
    half of its annotations select it, as the journal votes); the confusion matrix counts, for each
    annotation, every (suggested label, chosen label) pair, with the empty set as ``none``. Agreement is
    Krippendorff's alpha per label on its yes/no answers, their mean, and exact-set pairwise agreement."""

    multi = True
    crowdlab_unavailable = (
        "CROWDLAB is not available for multi-label taxonomies: cleanlab's multi-annotator functions "
        "(cleanlab.multiannotator) take one class per annotator per item. Agreement per label and exact-set "
        "pairwise agreement cover reviewer consistency.")

    def __init__(self, taxonomy: Taxonomy):
        super().__init__(taxonomy.labels)
        self.none = taxonomy.none_label or "none"

    def same(self, a: pd.Series, b: pd.Series) -> pd.Series:
        return pd.Series([_is_set(x) and _is_set(y) and frozenset(x) == frozenset(y)
                          for x, y in zip(a, b, strict=True)], index=a.index, dtype=bool)

    def key(self, cell: Any) -> str:
        if not _is_set(cell):
            return "unknown"
        chosen = set(cell)
        names = [label for label in self.labels if label in chosen] + sorted(chosen - set(self.labels))
        return "+".join(names) or self.none

    def in_taxonomy(self, cell: Any) -> bool:
        return _is_set(cell) and set(cell) <= set(self.labels)

    def matrix(self, cells: pd.Series | Sequence) -> np.ndarray:
        """(n, K) 0/1 in taxonomy order; names outside the taxonomy count as no label."""
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.zeros((len(cells), len(self.labels)), dtype=np.int8)
        for row, cell in enumerate(cells):
            for name in cell if _is_set(cell) else ():
                if name in index:
                    out[row, index[name]] = 1
        return out

    def confusion(self, suggested: pd.Series, final: pd.Series) -> ConfusionMatrix:
        names = [*self.labels, self.none]
        index = {c: i for i, c in enumerate(names)}
        counts = np.zeros((len(names), len(names)), dtype=int)
        for s, f in zip(suggested, final, strict=True):
            if not (self.in_taxonomy(s) and self.in_taxonomy(f)):
                continue
            for a in (s or (self.none,)):
                for b in (f or (self.none,)):
                    counts[index[a], index[b]] += 1
        return ConfusionMatrix(labels=names, counts=counts.tolist(), n=int(counts.sum()))

    def scores(self, truth: pd.Series, predicted: pd.Series, *, sample: str, unbiased: bool,
               min_n: int = DEFAULT_MIN_N, seed: int = 0) -> ModelScores:
        truth, predicted = list(truth), list(predicted)
        n = len(truth)
        t, p = self.matrix(truth), self.matrix(predicted)
        hits = int(self.same(pd.Series(truth, dtype=object), pd.Series(predicted, dtype=object)).sum()) if n else 0
        recall = {label: proportion(int((t[:, j] & p[:, j]).sum()), int(t[:, j].sum()), min_n)
                  for j, label in enumerate(self.labels)}
        macro, micro = label_set_f1_estimates(t, p, min_n=min_n, seed=seed)
        return ModelScores(sample=sample, unbiased=unbiased, n=n, accuracy=proportion(hits, n, min_n),
                           macro_f1=macro, micro_f1=micro, recall=recall,
                           note=None if n >= min_n else not_enough(n, min_n))

    def item_truth(self, rows: pd.DataFrame) -> pd.DataFrame:
        if rows.empty:
            return rows
        share = pd.DataFrame(self.matrix(rows["label"]), index=rows.index).groupby(rows["task_id"].to_numpy()).mean()
        voted = {task: tuple(label for label, s in zip(self.labels, row, strict=True) if s > 0.5)
                 for task, row in zip(share.index, share.to_numpy(), strict=True)}
        latest = rows.sort_values("updated_at").drop_duplicates("task_id", keep="last").copy()
        latest["label"] = [voted[t] for t in latest["task_id"]]
        return latest

    def per_label_gold(self, rows: pd.DataFrame, min_n: int) -> tuple[dict[str, Proportion], dict[str, Proportion]]:
        """Per label: accuracy (the reviewer's yes/no for that label matches gold's) and recall (of the gold
        items carrying it, the share the reviewer gave it too)."""
        given, gold = self.matrix(rows["label"]), self.matrix(rows["gold"])
        accuracy = {label: proportion(int((given[:, j] == gold[:, j]).sum()), len(rows), min_n)
                    for j, label in enumerate(self.labels)}
        recall = {label: proportion(int((given[:, j] & gold[:, j]).sum()), int(gold[:, j].sum()), min_n)
                  for j, label in enumerate(self.labels)}
        return accuracy, recall

    def agreement(self, labels: pd.DataFrame, min_n: int) -> agreement_.Agreement:
        return agreement_.label_set_agreement(labels, self.labels, min_n)

    def targets(self, labels: pd.Series) -> np.ndarray:
        return self.matrix(labels)

    def varied(self, y: np.ndarray) -> bool:
        return bool(len(y) and (y.any(axis=0) & ~y.all(axis=0)).any())

    def out_of_fold(self, embeddings: np.ndarray, y: np.ndarray, *, seed: int,
                    class_weight: str | None = None) -> np.ndarray:
        return label_errors.label_set_out_of_fold_proba(embeddings, y, seed=seed, class_weight=class_weight)

    def rank_issues(self, frame: pd.DataFrame, pred_probs: np.ndarray, top_k: int) -> list[label_errors.LabelIssue]:
        return label_errors.rank_label_set_issues(frame, self.matrix(frame["label"]), pred_probs, self.labels, top_k)


def label_kind(taxonomy: Taxonomy) -> LabelKind:
    return LabelSet(taxonomy) if taxonomy.multi else SingleLabel(taxonomy.labels)


def _is_set(cell: Any) -> bool:
    return isinstance(cell, tuple | list | set | frozenset)


def _missing(cell: Any) -> bool:
    return not _is_set(cell) and pd.isna(cell)


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})


def breakdown_key(table: pd.DataFrame, by: Breakdown, class_column: str, kind: LabelKind | None = None) -> pd.Series:
    """The grouping key of each row for a breakdown; ``class_column`` says which label is "the class"
    for this measure (the suggestion for acceptance, the gold label for accuracy, the truth for the audit).
    For a label set the class is the whole set (``hate+threat``)."""
    if by == "annotator":
        return table["annotator"].map(lambda a: "unknown" if pd.isna(a) else str(int(a)))
    if by == "class" and kind is not None:
        return table[class_column].map(kind.key).astype(str)
    if by == "class":
        return table[class_column].astype(object).where(table[class_column].notna(), "none").astype(str)
    if by == "version":
        version = table["suggested_model_version"].where(table["suggested_model_version"].notna(),
                                                         table["model_version"])
        return version.astype(object).where(version.notna(), "unknown").astype(str)
    if by in ("day", "week"):
        return window_start(table["updated_at"], by)
    raise ValueError(f"unknown breakdown {by!r}; expected one of {', '.join(BREAKDOWNS)}")


def grouped(success: pd.Series, keys: pd.Series, min_n: int) -> list[Group]:
    """A proportion per key, keys sorted (so days and weeks come out in time order)."""
    frame = pd.DataFrame({"ok": success.astype(bool).to_numpy(), "key": keys.astype(str).to_numpy()})
    return [Group(key=key, value=proportion(int(g["ok"].sum()), len(g), min_n))
            for key, g in frame.groupby("key", sort=True)]


def confusion(suggested: pd.Series, final: pd.Series, labels: Sequence[str]) -> ConfusionMatrix:
    index = {c: i for i, c in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    for s, f in zip(suggested, final, strict=True):
        if s in index and f in index:
            counts[index[s], index[f]] += 1
    return ConfusionMatrix(labels=list(labels), counts=counts.tolist(), n=int(counts.sum()))


def no_suggestion(table: pd.DataFrame) -> pd.Series:
    """Rows made with no pre-label at all. A ``prediction_id`` without a ``suggested_label`` means one was
    shown but its label is not known yet: such a row is not blind."""
    return table["suggested_label"].isna() & table["prediction_id"].isna()


def model_suggested(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose pre-label came from the model. An adjudication task is pre-labelled with the *disputed
    human* label, so it says nothing about how reviewers treat the model's suggestions."""
    return table[table["suggested_label"].notna() & (table["kind"] != "adjudication")]


def acceptance(table: pd.DataFrame, labels: Sequence[str], by: Breakdown | None = None,
               min_n: int = DEFAULT_MIN_N, kind: LabelKind | None = None) -> Acceptance:
    """Suggestion acceptance and the model-vs-reviewer confusion matrix (per model version too).
    Adjudication annotations are in neither the share nor the count without a suggestion. A label set is
    accepted when the reviewer keeps exactly the pre-selected set."""
    kind = kind or SingleLabel(labels)
    table = table[table["kind"] != "adjudication"]
    suggested = model_suggested(table)
    accepted = kind.same(suggested["label"], suggested["suggested_label"])
    by_version = {
        str(version): kind.confusion(g["suggested_label"], g["label"])
        for version, g in suggested.groupby(suggested["suggested_model_version"].fillna("unknown"), sort=True)
    }
    return Acceptance(
        overall=proportion(int(accepted.sum()), len(suggested), min_n),
        without_suggestion=int(no_suggestion(table).sum()),
        suggestion_unknown=int((table["suggested_label"].isna() & table["prediction_id"].notna()).sum()),
        by=by,
        groups=grouped(accepted, breakdown_key(suggested, by, "suggested_label", kind), min_n) if by else [],
        confusion=kind.confusion(suggested["suggested_label"], suggested["label"]),
        confusion_by_version=by_version,
    )


def gold_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Annotations on items with a known answer, except the ground-truth annotations that define it."""
    return table[table["gold"].notna() & ~table["ground_truth"].astype(bool)]


def gold_accuracy(table: pd.DataFrame, by: Breakdown | None = None, min_n: int = DEFAULT_MIN_N,
                  kind: LabelKind | None = None) -> GoldAccuracy:
    """Reviewer accuracy against gold, overall, per annotator and per (gold) class. For label sets a label
    is correct only when the whole set matches gold; per-label accuracy and recall show which label is
    missed."""
    kind = kind or SingleLabel(())
    rows = gold_rows(table)
    correct = kind.same(rows["label"], rows["gold"])
    per_label_accuracy, per_label_recall = kind.per_label_gold(rows, min_n)
    return GoldAccuracy(
        overall=proportion(int(correct.sum()), len(rows), min_n),
        by=by,
        groups=grouped(correct, breakdown_key(rows, by, "gold", kind), min_n) if by else [],
        per_annotator=grouped(correct, breakdown_key(rows, "annotator", "gold", kind), min_n),
        per_class=grouped(correct, breakdown_key(rows, "class", "gold", kind), min_n),
        per_label_accuracy=per_label_accuracy,
        per_label_recall=per_label_recall,
    )


def model_scores(truth: pd.Series, predicted: pd.Series, labels: Sequence[str], *, sample: str, unbiased: bool,
                 min_n: int = DEFAULT_MIN_N, seed: int = 0) -> ModelScores:
    """Accuracy (Wilson), macro-F1 (bootstrap) and per-class recall (Wilson) of predictions vs truth."""
    truth, predicted = truth.astype(str).tolist(), predicted.astype(str).tolist()
    n = len(truth)
    hits = sum(t == p for t, p in zip(truth, predicted, strict=True))
    recall = {}
    for label in labels:
        of_class = [p for t, p in zip(truth, predicted, strict=True) if t == label]
        recall[label] = proportion(sum(p == label for p in of_class), len(of_class), min_n)
    return ModelScores(sample=sample, unbiased=unbiased, n=n, accuracy=proportion(hits, n, min_n),
                       macro_f1=macro_f1_estimate(truth, predicted, labels, min_n=min_n, seed=seed), recall=recall,
                       note=None if n >= min_n else not_enough(n, min_n))


def item_truth(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per task: the reviewers' label (the majority; the latest on a tie), for scoring the model."""
    if rows.empty:
        return rows
    votes = rows.groupby(["task_id", "label"], as_index=False).agg(n=("annotation_id", "size"),
                                                                  latest=("updated_at", "max"))
    winner = votes.sort_values(["task_id", "n", "latest"], ascending=[True, False, False]).drop_duplicates("task_id")
    first = rows.sort_values("updated_at").drop_duplicates("task_id", keep="last").drop(columns="label")
    return first.merge(winner[["task_id", "label"]], on="task_id")


def audit(table: pd.DataFrame, labels: Sequence[str], by: Breakdown | None = None,
          min_n: int = DEFAULT_MIN_N, kind: LabelKind | None = None) -> AuditReport:
    """The champion's scores on the blind audit items (unbiased) and on actively selected ones (biased).

    Audit items are drawn uniformly from the pool and shown without a pre-label, so the reviewers' labels
    there estimate accuracy on live traffic. Actively selected items are the ones the model was least sure
    of, and reviewers saw its pre-label: numbers there are shown for contrast only. For label sets the
    accuracy is exact-set match (Wilson interval), macro- and micro-F1 are over labels and recall is per
    label (:class:`LabelSet`).
    """
    kind = kind or SingleLabel(labels)
    audited = kind.item_truth(table[(table["kind"] == "audit") & table["model_label"].notna()])
    active = kind.item_truth(table[(table["kind"] == "active") & table["suggested_label"].notna()])
    audit_scores = kind.scores(audited.get("label", pd.Series(dtype=str)),
                               audited.get("model_label", pd.Series(dtype=str)),
                               sample="blind audit (uniform random, no pre-label)", unbiased=True, min_n=min_n)
    active_scores = kind.scores(active.get("label", pd.Series(dtype=str)),
                                active.get("suggested_label", pd.Series(dtype=str)),
                                sample="actively selected labels (BIASED: uncertain items, pre-label shown)",
                                unbiased=False, min_n=min_n)
    groups: list[Group] = []
    if by and not audited.empty:
        groups = grouped(kind.same(audited["label"], audited["model_label"]),
                         breakdown_key(audited, by, "label", kind), min_n)
    unscored = int(((table["kind"] == "audit") & table["model_label"].isna()).sum())
    note = (f"{unscored} audit label(s) not scored: the model version that served them could not be loaded"
            if unscored else None)
    return AuditReport(audit=audit_scores, active=active_scores, by=by, groups=groups,
                       unscored_audit_labels=unscored, note=note)


def automation_bias(table: pd.DataFrame, min_n: int = DEFAULT_MIN_N, kind: LabelKind | None = None) -> AutomationBias:
    """Agreement with the model and gold accuracy with and without a pre-label; label sets match exactly."""
    kind = kind or SingleLabel(())
    table = table[table["kind"] != "adjudication"]
    shown = model_suggested(table)
    blind = table[no_suggestion(table) & table["model_label"].notna()]
    gold = gold_rows(table)
    gold_shown, gold_blind = gold[gold["suggested_label"].notna()], gold[no_suggestion(gold)]
    return AutomationBias(
        agreement_with_suggestion=proportion(int(kind.same(shown["label"], shown["suggested_label"]).sum()),
                                             len(shown), min_n),
        agreement_without_suggestion=proportion(int(kind.same(blind["label"], blind["model_label"]).sum()),
                                                len(blind), min_n),
        gold_accuracy_with_suggestion=proportion(int(kind.same(gold_shown["label"], gold_shown["gold"]).sum()),
                                                 len(gold_shown), min_n),
        gold_accuracy_without_suggestion=proportion(int(kind.same(gold_blind["label"], gold_blind["gold"]).sum()),
                                                    len(gold_blind), min_n),
        median_seconds_with_suggestion=_median(shown["lead_time"], min_n),
        median_seconds_without_suggestion=_median(table[no_suggestion(table)]["lead_time"], min_n),
    )


def _median(values: pd.Series, min_n: int) -> float | None:
    known = pd.to_numeric(values, errors="coerce").dropna()
    return finite(known.median()) if len(known) >= max(min_n, 1) else None


def attach_gold(annotations: pd.DataFrame, slices: pd.DataFrame, taxonomy: Taxonomy | None = None) -> pd.DataFrame:
    """Add ``kind``, ``gold`` and ``model_version`` to journal annotations (``id`` renamed ``item_id``).

    Gold is a honeypot's known label, else the label of a ground-truth annotation on the same task (Label
    Studio's flag); when several ground-truth annotations disagree the task has no gold. The slice store
    keeps a honeypot's gold as the journal stores labels (a label set as its JSON list): with the
    ``taxonomy`` it becomes the same cell as the journal's labels (a tuple), so the two compare.
    """
    table = annotations.rename(columns={"id": "item_id"}).copy()
    table = table[table["label"].notna()]
    if slices.empty:
        table["kind"], table["gold"], table["model_version"] = "active", None, None
    else:
        meta = slices.reindex(columns=SLICE_COLUMNS).drop_duplicates("task_id").set_index("task_id")
        table["kind"] = table["task_id"].map(meta["kind"]).fillna("active")
        gold = meta["gold_label"].where(meta["kind"] == "honeypot")
        if taxonomy is not None:
            gold = gold.map(lambda stored: label_cell(taxonomy, stored), na_action="ignore")
        table["gold"] = table["task_id"].map(gold)
        table["model_version"] = table["task_id"].map(meta["model_version"])
    truth = table[table["ground_truth"].astype(bool)].groupby("task_id")["label"].agg(
        lambda s: s.iloc[0] if s.nunique() == 1 else None)
    from_flag = table["task_id"].map(truth)
    table["gold"] = table["gold"].where(table["gold"].notna(), from_flag)
    table["gold"] = table["gold"].astype(object).where(table["gold"].notna(), None)
    if "model_label" not in table:
        table["model_label"] = None
    for column in TABLE_COLUMNS:
        if column not in table:
            table[column] = None
    return table[TABLE_COLUMNS].reset_index(drop=True)
