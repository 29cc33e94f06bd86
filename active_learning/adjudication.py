"""Sending likely label errors back to Label Studio for another reviewer to settle.

The candidates come from label-error detection (``monitoring``, downstream of this package, so they
arrive as plain rows: an ``annotation_id`` and, optionally, the disputed ``label``). Each becomes a new
task with the item's text and ``item_id``, pre-labelled with the disputed label so the adjudicator sees
what is in question, and queued ahead of every active-learning item. The adjudicated label supersedes
the original in training (:mod:`active_learning.training_labels`); the original annotation stays in the
journal untouched, as the audit trail.

Sending is idempotent: an annotation already sent (by ``disputed_annotation_id``) or an item that already
waits for adjudication is skipped, so running the command twice sends nothing twice.

In a multi-label project the disputed label is a label set: the adjudication task pre-selects the whole set
(the taxonomy's none label for the empty set), the slice store keeps it as the journal stores labels (its
JSON list), and the adjudicator's answer, a set, supersedes the original set as a whole.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from active_learning.labelstudio import LabelStudioClient
from active_learning.slices_push import ADJUDICATION_FLOOR, Suggested
from labelloop.journal import Journal, label_cell, label_text
from labelloop.slices import SliceItem, SliceStore
from labelloop.taxonomy import Taxonomy


class CandidateError(ValueError):
    """Candidates that cannot be adjudicated as given (unknown annotation, wrong shape); nothing was sent."""


@dataclass
class AdjudicationResult:
    sent: list[SliceItem] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # annotation id -> why it was not sent


class Disputed(ABC):
    """How one kind of taxonomy reads, checks, stores and shows a disputed label."""

    @abstractmethod
    def read(self, value: Any) -> Any:
        """A candidate's label as a frame cell (None: not given)."""

    @abstractmethod
    def unknown(self, cell: Any) -> list[str]:
        """The names in a label that the taxonomy does not have."""

    @abstractmethod
    def stored(self, cell: Any) -> str:
        """As the slice store keeps it."""

    @abstractmethod
    def shown(self, cell: Any) -> str | tuple[str, ...]:
        """What the adjudication task pre-selects."""


class DisputedLabel(Disputed):
    def __init__(self, labels: Iterable[str]):
        self.labels = list(labels)

    def read(self, value: Any) -> Any:
        return None if value is None else str(value)

    def unknown(self, cell: Any) -> list[str]:
        return [] if cell in self.labels else [str(cell)]

    def stored(self, cell: Any) -> str:
        return str(cell)

    def shown(self, cell: Any) -> str:
        return str(cell)


class DisputedLabelSet(Disputed):
    """A label set: given as a list or tuple of names (as :class:`monitoring.label_errors.LabelIssue` carries
    it) or as the journal's JSON text; the none label alone means the empty set."""

    def __init__(self, taxonomy: Taxonomy):
        self.taxonomy = taxonomy

    def read(self, value: Any) -> Any:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return None
        if isinstance(value, str):
            value = [] if value == self.taxonomy.none_label else (
                label_cell(self.taxonomy, value) if value.startswith("[") else [value])
        if not isinstance(value, list | tuple | set | frozenset):
            return (str(value),)
        chosen = {str(v) for v in value} - {self.taxonomy.none_label}
        return (*(label for label in self.taxonomy.labels if label in chosen),
                *sorted(chosen - set(self.taxonomy.labels)))

    def unknown(self, cell: Any) -> list[str]:
        return [name for name in cell if name not in self.taxonomy.labels]

    def stored(self, cell: Any) -> str:
        return label_text(self.taxonomy, cell)

    def shown(self, cell: Any) -> tuple[str, ...]:
        none = (self.taxonomy.none_label,) if self.taxonomy.none_label else ()
        return tuple(cell) or none


def disputed_kind(taxonomy: Taxonomy) -> Disputed:
    return DisputedLabelSet(taxonomy) if taxonomy.multi else DisputedLabel(taxonomy.labels)


def _missing(cell: Any) -> bool:
    return cell is None or (isinstance(cell, float) and pd.isna(cell))


def _candidate_frame(candidates: pd.DataFrame | Iterable[Mapping | object], kind: Disputed) -> pd.DataFrame:
    """``annotation_id`` plus ``disputed_label`` (None: the annotation's own label), from a frame, dicts or
    objects with those attributes (``monitoring.label_errors.LabelIssue`` has ``annotation_id`` and
    ``label``)."""
    if isinstance(candidates, pd.DataFrame):
        rows = candidates.to_dict("records")
    else:
        rows = [c if isinstance(c, Mapping) else (c.model_dump() if hasattr(c, "model_dump") else vars(c))
                for c in candidates]
    out = []
    for n, row in enumerate(rows):
        raw = row.get("annotation_id")
        if isinstance(raw, bool) or not isinstance(raw, int | float | str) or not str(raw).strip().isdigit():
            raise CandidateError(f"candidate {n} has no valid annotation_id (got {raw!r})")
        label = row.get("disputed_label", row.get("label"))
        out.append({"annotation_id": int(raw), "disputed_label": kind.read(label)})
    return pd.DataFrame(out, columns=["annotation_id", "disputed_label"])


def plan_adjudication(candidates: pd.DataFrame | Iterable, annotations: pd.DataFrame, slices: pd.DataFrame,
                      labels: Iterable[str], taxonomy: Taxonomy | None = None) -> tuple[pd.DataFrame, dict[int, str]]:
    """Which candidates to send (rows with ``annotation_id, disputed_label, task_id, id, text``) and why
    the others are skipped. Raises :class:`CandidateError` for an unknown annotation or label: a typo
    must not silently send nothing. With a multi-label ``taxonomy`` a disputed label is a set (a tuple in
    the returned rows), and any name outside the taxonomy is refused."""
    kind = disputed_kind(taxonomy) if taxonomy is not None else DisputedLabel(labels)
    frame = _candidate_frame(candidates, kind).drop_duplicates("annotation_id")
    known = annotations.set_index("annotation_id")
    unknown = sorted(set(frame["annotation_id"]) - set(known.index))
    if unknown:
        raise CandidateError(f"annotation(s) {unknown[:10]} are not in the journal for this project")
    frame = frame.join(known[["task_id", "id", "text", "label"]], on="annotation_id")
    frame["disputed_label"] = [label if _missing(disputed) else disputed
                               for disputed, label in zip(frame["disputed_label"], frame["label"], strict=True)]
    bad = sorted({name for disputed in frame["disputed_label"] if not _missing(disputed)
                  for name in kind.unknown(disputed)})
    if bad:
        raise CandidateError(f"disputed label(s) {bad} are not in the taxonomy")
    kinds = slices.set_index("task_id")["kind"] if len(slices) else pd.Series(dtype=object)
    sent_before = set(slices.loc[slices["kind"] == "adjudication", "disputed_annotation_id"].dropna().astype(int))
    waiting = set(slices.loc[slices["kind"] == "adjudication", "item_id"]) - set(
        annotations.loc[annotations["task_id"].isin(slices.loc[slices["kind"] == "adjudication", "task_id"]), "id"])
    skipped: dict[int, str] = {}
    keep = []
    for row in frame.itertuples(index=False):
        reason = None
        if row.annotation_id in sent_before:
            reason = "already sent for adjudication"
        elif kinds.get(row.task_id) == "honeypot":
            reason = "a honeypot answer: measured against gold, never trained on"
        elif _missing(row.disputed_label) or pd.isna(row.text):  # the join turns a missing label into NaN
            reason = "the annotation carries no usable label"
        elif row.id in waiting:
            reason = f"item {row.id} already waits for adjudication"
        if reason:
            skipped[row.annotation_id] = reason
        else:
            keep.append(row._asdict())
            waiting.add(row.id)
    return pd.DataFrame(keep, columns=[*frame.columns]), skipped


def front_scores(n: int, after: float | None) -> list[float]:
    """``n`` unique priorities ahead of the active-learning queue (< 0) and behind adjudications already
    waiting (> ``after``), so they are served first come, first served."""
    low = ADJUDICATION_FLOOR if after is None else after
    return [low + (0.0 - low) * (i + 1) / (n + 1) for i in range(n)]


def send_for_adjudication(client: LabelStudioClient, project_id: int, journal: Journal, store: SliceStore,
                          candidates: pd.DataFrame | Iterable, model_version: str, labels: Iterable[str]
                          ) -> AdjudicationResult:
    """Create one adjudication task per new candidate, pre-labelled with the disputed label under
    ``model_version`` (the project's current one, so uncertainty sampling serves it first), and record it."""
    slices = store.frame(project_id)
    kind = disputed_kind(journal.taxonomy)
    send, skipped = plan_adjudication(candidates, journal.annotations(project_id), slices, labels, journal.taxonomy)
    if send.empty:
        return AdjudicationResult([], skipped)
    waiting = set(slices.loc[slices["kind"] == "adjudication", "task_id"])
    earlier = [p["score"] for p in client.predictions(project_id)
               if p["task"] in waiting and p["model_version"] == model_version and p["score"] is not None]
    task_ids = client.create_tasks(project_id, list(zip(send["id"], send["text"], strict=True)))
    items = [SliceItem(project_id=project_id, task_id=int(t), item_id=str(r.id), kind="adjudication",
                       source_task_id=int(r.task_id), disputed_label=kind.stored(r.disputed_label),
                       disputed_annotation_id=int(r.annotation_id), model_version=model_version)
             for t, r in zip(task_ids, send.itertuples(index=False), strict=True)]
    store.add(items)
    scores = front_scores(len(items), max(earlier) if earlier else None)
    shown = [Suggested(i.task_id, kind.shown(r.disputed_label))
             for i, r in zip(items, send.itertuples(index=False), strict=True)]
    client.import_predictions(project_id, [entry.prediction(s, model_version)
                                           for entry, s in zip(shown, scores, strict=True)])
    return AdjudicationResult(items, skipped)
