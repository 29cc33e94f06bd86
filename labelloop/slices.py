"""Which Label Studio tasks were served for a purpose other than active learning, and why.

Quality measurement needs to know, per task, whether it was a blind audit item (drawn uniformly at
random and shown with no pre-label), a honeypot (a frozen-eval item whose label is known), a second
copy of an item served for agreement (overlap), or an item sent back for adjudication. That knowledge
must stay on our side: a gold label or an "audit" flag stored in the task's data would be visible to
reviewers in Label Studio's Data Manager, and reviewers who know an item is a test treat it differently.

It lives in ``labelloop/`` (the data layer) because three stages read it: serving (no pre-label for an
audit task when Label Studio asks on open), active learning (which writes it, and which keeps honeypots
out of training) and monitoring (which computes the measures). Rows are only ever added; a task has at
most one purpose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Literal

import pandas as pd
import sqlalchemy as sa

from labelloop.store import ID, Store

SliceKind = Literal["audit", "honeypot", "overlap", "adjudication"]
SLICE_KINDS: tuple[SliceKind, ...] = ("audit", "honeypot", "overlap", "adjudication")

METADATA = sa.MetaData()
SLICE_ITEMS = sa.Table(
    "slice_items", METADATA,
    sa.Column("project_id", ID, nullable=False),
    sa.Column("task_id", ID, primary_key=True, autoincrement=False),
    sa.Column("item_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, sa.CheckConstraint("kind IN ('audit', 'honeypot', 'overlap', 'adjudication')"),
              nullable=False),
    sa.Column("gold_label", sa.Text),
    sa.Column("source_task_id", ID),
    sa.Column("disputed_label", sa.Text),
    sa.Column("disputed_annotation_id", ID),
    sa.Column("model_version", sa.Text),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.CheckConstraint("kind != 'honeypot' OR gold_label IS NOT NULL"),
    sa.CheckConstraint("kind NOT IN ('overlap', 'adjudication') OR source_task_id IS NOT NULL"),
    sa.Index("slice_items_project", "project_id", "kind"),
)
# built once: ``/predict`` asks on every request, and building a statement costs more than running it
_KIND_OF = sa.select(SLICE_ITEMS.c.kind).where(SLICE_ITEMS.c.task_id == sa.bindparam("task_id"))
_OF_KIND = sa.select(SLICE_ITEMS.c.task_id).where(SLICE_ITEMS.c.kind == sa.bindparam("kind"),
                                                  SLICE_ITEMS.c.task_id.in_(sa.bindparam("ids", expanding=True)))


@dataclass(frozen=True)
class SliceItem:
    """One served task with a purpose.

    ``gold_label``: the known label of a honeypot. ``source_task_id``: the task an overlap or
    adjudication copy duplicates. ``disputed_label``/``disputed_annotation_id``: for adjudication, the
    label under dispute and the annotation that gave it (it stays in the journal as the audit trail).
    ``model_version``: the champion when the item was served (None for an audit item's missing pre-label
    is not implied: it records which model's accuracy the audit measures)."""

    project_id: int
    task_id: int
    item_id: str
    kind: SliceKind
    gold_label: str | None = None
    source_task_id: int | None = None
    disputed_label: str | None = None
    disputed_annotation_id: int | None = None
    model_version: str | None = None
    created_at: str | None = None


COLUMNS = [f.name for f in fields(SliceItem)]


class SliceStore(Store):
    """An append-only table of :class:`SliceItem` rows (``slices.sqlite``, or the ``slices`` schema of the shared
    PostgreSQL), shared safely between threads, processes and replicas."""

    METADATA = METADATA
    KEY = "slice_items"

    def add(self, items: Iterable[SliceItem]) -> int:
        """Record items; a task already recorded keeps its first purpose. Returns how many were new.

        A row that breaks a rule (a honeypot without its gold label) raises ``sqlalchemy.exc.IntegrityError``
        and nothing of the batch is written."""
        now = datetime.now(UTC).isoformat()
        rows = [{**asdict(item), "created_at": item.created_at or now} for item in items]
        if not rows:
            return 0
        for row in rows:
            if row["kind"] not in SLICE_KINDS:
                raise ValueError(f"unknown slice kind {row['kind']!r}; expected one of {', '.join(SLICE_KINDS)}")
        # only a task already recorded is skipped (a conflict on task_id): a blanket ignore would also drop a
        # row failing a CHECK without a word, and that task's answers would then train
        insert = (self.insert(SLICE_ITEMS).on_conflict_do_nothing(index_elements=["task_id"])
                  .returning(SLICE_ITEMS.c.task_id))
        with self._transaction() as conn:
            return len(conn.execute(insert, rows).all())

    def kind_of(self, task_id: int) -> SliceKind | None:
        """The purpose of a task (Label Studio task ids are unique per server), or None for a plain item."""
        with self._read() as conn:
            return conn.execute(_KIND_OF, {"task_id": task_id}).scalar()

    def of_kind(self, kind: SliceKind, task_ids: Iterable[int]) -> set[int]:
        """Which of ``task_ids`` have this purpose: one query for a whole ``/predict`` request."""
        ids = sorted(set(task_ids))
        if not ids:
            return set()
        with self._read() as conn:
            return set(conn.execute(_OF_KIND, {"kind": kind, "ids": ids}).scalars())

    def task_ids(self, kind: SliceKind, project_id: int | None = None) -> set[int]:
        query = sa.select(SLICE_ITEMS.c.task_id).where(SLICE_ITEMS.c.kind == kind)
        if project_id is not None:
            query = query.where(SLICE_ITEMS.c.project_id == project_id)
        with self._read() as conn:
            return set(conn.execute(query).scalars())

    def frame(self, project_id: int | None = None) -> pd.DataFrame:
        """Every recorded item (optionally of one project), oldest first, with the columns of :class:`SliceItem`."""
        query = sa.select(*(SLICE_ITEMS.c[c] for c in COLUMNS))
        if project_id is not None:
            query = query.where(SLICE_ITEMS.c.project_id == project_id)
        with self._read() as conn:
            rows = conn.execute(query.order_by(SLICE_ITEMS.c.created_at, SLICE_ITEMS.c.task_id)).all()
        return pd.DataFrame([tuple(r) for r in rows], columns=COLUMNS)
