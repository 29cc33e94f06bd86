"""The labels a retrain (and `labelloop loop export`) learns from: one label per item, never a test item.

The journal keeps one row per Label Studio annotation and :meth:`labelloop.journal.Journal.labels` votes
per *task*. The quality slices make task and item differ, so training must not read that directly:

* a **honeypot** task carries a frozen-evaluation item; training on it would leak the gate's test set
  into the model, so its annotations never count here (they only measure the reviewer);
* an **overlap** copy is a second task for the same item, served to measure agreement; per task, the
  item would appear twice in the training set (the same text with two weights, or with two different
  labels), so all of an item's annotations are voted on together;
* an **adjudication** task asks another reviewer to settle a likely label error; its outcome replaces
  whatever the item's ordinary tasks say. The original annotation stays in the journal as the audit
  trail, and because this is derived from the journal's current state on every call, a re-delivered
  webhook (a journal duplicate) cannot apply the adjudication twice.

Audit items are ordinary pool items that happened to be shown without a pre-label: their labels are
honest labels and train like any other.

The vote follows the journal's rules, per item instead of per task: ground-truth annotations, when an
item has any, are the only ones considered; otherwise the majority wins, and a tie goes to the label
whose latest annotation is the most recent. For a multi-label taxonomy the label is a set (a tuple of
names in taxonomy order, ``()`` for none of these) and each label is voted on by itself: it is in the
item's set when strictly more than half of the considered annotations select it.
"""

from __future__ import annotations

import pandas as pd

from labelloop.journal import LABEL_COLUMNS, Journal, vote
from labelloop.slices import COLUMNS as SLICE_COLUMNS
from labelloop.slices import SliceStore
from labelloop.taxonomy import Taxonomy


def derive_training_labels(annotations: pd.DataFrame, slices: pd.DataFrame,
                           taxonomy: Taxonomy | None = None) -> pd.DataFrame:
    """Training labels from the journal's annotations (``Journal.annotations()``) and the slice records
    (``SliceStore.frame()``), with the columns of ``Journal.labels()``; ``n_annotations`` counts every
    usable annotation of the item that took part (honeypot answers excluded)."""
    usable = annotations[annotations["label"].notna()]
    if usable.empty:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    kinds = slices.set_index("task_id")["kind"] if len(slices) else pd.Series(dtype=object)
    kind = usable["task_id"].map(kinds)
    usable = usable[kind != "honeypot"]
    kind = kind[kind != "honeypot"]
    if usable.empty:
        return pd.DataFrame(columns=LABEL_COLUMNS)
    adjudicated = vote(usable[kind == "adjudication"], "id", taxonomy)
    ordinary = vote(usable[kind != "adjudication"], "id", taxonomy)
    chosen = pd.concat([adjudicated, ordinary[~ordinary["id"].isin(adjudicated["id"])]])
    counts = usable.groupby("id").size().rename("n_annotations")
    chosen = chosen.join(counts, on="id").sort_values(["task_id", "id"])
    return chosen[LABEL_COLUMNS].reset_index(drop=True)


def training_labels(journal: Journal, slices: SliceStore, project_id: int | None = None) -> pd.DataFrame:
    """:func:`derive_training_labels` over the journal and the slice store as they are now."""
    frame = slices.frame(project_id) if project_id is not None else slices.frame()
    return derive_training_labels(journal.annotations(project_id), frame.reindex(columns=SLICE_COLUMNS),
                                  journal.taxonomy)
