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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

from labelloop.slices import COLUMNS as SLICE_COLUMNS
from monitoring.quality_stats import (
    DEFAULT_MIN_N,
    Estimate,
    Proportion,
    finite,
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


class ModelScores(BaseModel):
    """The model's accuracy, macro-F1 and per-class recall against reviewers' labels on one sample."""

    sample: str
    unbiased: bool
    n: int
    accuracy: Proportion
    macro_f1: Estimate
    recall: dict[str, Proportion]
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


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in TABLE_COLUMNS})


def breakdown_key(table: pd.DataFrame, by: Breakdown, class_column: str) -> pd.Series:
    """The grouping key of each row for a breakdown; ``class_column`` says which label is "the class"
    for this measure (the suggestion for acceptance, the gold label for accuracy, the truth for the audit)."""
    if by == "annotator":
        return table["annotator"].map(lambda a: "unknown" if pd.isna(a) else str(int(a)))
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
               min_n: int = DEFAULT_MIN_N) -> Acceptance:
    """Suggestion acceptance and the model-vs-reviewer confusion matrix (per model version too).
    Adjudication annotations are in neither the share nor the count without a suggestion."""
    table = table[table["kind"] != "adjudication"]
    suggested = model_suggested(table)
    accepted = suggested["label"] == suggested["suggested_label"]
    by_version = {
        str(version): confusion(g["suggested_label"], g["label"], labels)
        for version, g in suggested.groupby(suggested["suggested_model_version"].fillna("unknown"), sort=True)
    }
    return Acceptance(
        overall=proportion(int(accepted.sum()), len(suggested), min_n),
        without_suggestion=int(no_suggestion(table).sum()),
        suggestion_unknown=int((table["suggested_label"].isna() & table["prediction_id"].notna()).sum()),
        by=by,
        groups=grouped(accepted, breakdown_key(suggested, by, "suggested_label"), min_n) if by else [],
        confusion=confusion(suggested["suggested_label"], suggested["label"], labels),
        confusion_by_version=by_version,
    )


def gold_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Annotations on items with a known answer, except the ground-truth annotations that define it."""
    return table[table["gold"].notna() & ~table["ground_truth"].astype(bool)]


def gold_accuracy(table: pd.DataFrame, by: Breakdown | None = None, min_n: int = DEFAULT_MIN_N) -> GoldAccuracy:
    """Reviewer accuracy against gold, overall, per annotator and per (gold) class."""
    rows = gold_rows(table)
    correct = rows["label"] == rows["gold"]
    return GoldAccuracy(
        overall=proportion(int(correct.sum()), len(rows), min_n),
        by=by,
        groups=grouped(correct, breakdown_key(rows, by, "gold"), min_n) if by else [],
        per_annotator=grouped(correct, breakdown_key(rows, "annotator", "gold"), min_n),
        per_class=grouped(correct, breakdown_key(rows, "class", "gold"), min_n),
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
          min_n: int = DEFAULT_MIN_N) -> AuditReport:
    """The champion's scores on the blind audit items (unbiased) and on actively selected ones (biased).

    Audit items are drawn uniformly from the pool and shown without a pre-label, so the reviewers' labels
    there estimate accuracy on live traffic. Actively selected items are the ones the model was least sure
    of, and reviewers saw its pre-label: numbers there are shown for contrast only.
    """
    audited = item_truth(table[(table["kind"] == "audit") & table["model_label"].notna()])
    active = item_truth(table[(table["kind"] == "active") & table["suggested_label"].notna()])
    audit_scores = model_scores(audited.get("label", pd.Series(dtype=str)),
                                audited.get("model_label", pd.Series(dtype=str)), labels,
                                sample="blind audit (uniform random, no pre-label)", unbiased=True, min_n=min_n)
    active_scores = model_scores(active.get("label", pd.Series(dtype=str)),
                                 active.get("suggested_label", pd.Series(dtype=str)), labels,
                                 sample="actively selected labels (BIASED: uncertain items, pre-label shown)",
                                 unbiased=False, min_n=min_n)
    groups: list[Group] = []
    if by and not audited.empty:
        groups = grouped(audited["label"] == audited["model_label"], breakdown_key(audited, by, "label"), min_n)
    unscored = int(((table["kind"] == "audit") & table["model_label"].isna()).sum())
    note = (f"{unscored} audit label(s) not scored: the model version that served them could not be loaded"
            if unscored else None)
    return AuditReport(audit=audit_scores, active=active_scores, by=by, groups=groups,
                       unscored_audit_labels=unscored, note=note)


def automation_bias(table: pd.DataFrame, min_n: int = DEFAULT_MIN_N) -> AutomationBias:
    table = table[table["kind"] != "adjudication"]
    shown = model_suggested(table)
    blind = table[no_suggestion(table) & table["model_label"].notna()]
    gold = gold_rows(table)
    gold_shown, gold_blind = gold[gold["suggested_label"].notna()], gold[no_suggestion(gold)]
    return AutomationBias(
        agreement_with_suggestion=proportion(int((shown["label"] == shown["suggested_label"]).sum()), len(shown),
                                             min_n),
        agreement_without_suggestion=proportion(int((blind["label"] == blind["model_label"]).sum()), len(blind),
                                                min_n),
        gold_accuracy_with_suggestion=proportion(int((gold_shown["label"] == gold_shown["gold"]).sum()),
                                                 len(gold_shown), min_n),
        gold_accuracy_without_suggestion=proportion(int((gold_blind["label"] == gold_blind["gold"]).sum()),
                                                    len(gold_blind), min_n),
        median_seconds_with_suggestion=_median(shown["lead_time"], min_n),
        median_seconds_without_suggestion=_median(table[no_suggestion(table)]["lead_time"], min_n),
    )


def _median(values: pd.Series, min_n: int) -> float | None:
    known = pd.to_numeric(values, errors="coerce").dropna()
    return finite(known.median()) if len(known) >= max(min_n, 1) else None


def attach_gold(annotations: pd.DataFrame, slices: pd.DataFrame) -> pd.DataFrame:
    """Add ``kind``, ``gold`` and ``model_version`` to journal annotations (``id`` renamed ``item_id``).

    Gold is a honeypot's known label, else the label of a ground-truth annotation on the same task (Label
    Studio's flag); when several ground-truth annotations disagree the task has no gold.
    """
    table = annotations.rename(columns={"id": "item_id"}).copy()
    table = table[table["label"].notna()]
    if slices.empty:
        table["kind"], table["gold"], table["model_version"] = "active", None, None
    else:
        meta = slices.reindex(columns=SLICE_COLUMNS).drop_duplicates("task_id").set_index("task_id")
        table["kind"] = table["task_id"].map(meta["kind"]).fillna("active")
        table["gold"] = table["task_id"].map(meta["gold_label"].where(meta["kind"] == "honeypot"))
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
