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

from labelloop.sqlite_store import SQLiteStore

SliceKind = Literal["audit", "honeypot", "overlap", "adjudication"]
SLICE_KINDS: tuple[SliceKind, ...] = ("audit", "honeypot", "overlap", "adjudication")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slice_items (
    project_id             INTEGER NOT NULL,
    task_id                INTEGER NOT NULL,
    item_id                TEXT    NOT NULL,
    kind                   TEXT    NOT NULL CHECK (kind IN ('audit', 'honeypot', 'overlap', 'adjudication')),
    gold_label             TEXT,
    source_task_id         INTEGER,
    disputed_label         TEXT,
    disputed_annotation_id INTEGER,
    model_version          TEXT,
    created_at             TEXT    NOT NULL,
    PRIMARY KEY (task_id),
    CHECK (kind != 'honeypot' OR gold_label IS NOT NULL),
    CHECK (kind NOT IN ('overlap', 'adjudication') OR source_task_id IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS slice_items_project ON slice_items (project_id, kind);
"""


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


class SliceStore(SQLiteStore):
    """An append-only SQLite table of :class:`SliceItem` rows, shared safely between threads and processes."""

    SCHEMA = _SCHEMA

    def add(self, items: Iterable[SliceItem]) -> int:
        """Record items; a task already recorded keeps its first purpose. Returns how many were new."""
        now = datetime.now(UTC).isoformat()
        rows = [{**asdict(item), "created_at": item.created_at or now} for item in items]
        if not rows:
            return 0
        for row in rows:
            if row["kind"] not in SLICE_KINDS:
                raise ValueError(f"unknown slice kind {row['kind']!r}; expected one of {', '.join(SLICE_KINDS)}")
        # only a task already recorded is skipped: OR IGNORE would also drop a row failing a CHECK (a
        # honeypot without its gold label) without a word, and that task's answers would then train
        sql = (f"INSERT INTO slice_items ({', '.join(COLUMNS)}) "
               f"VALUES ({', '.join(':' + c for c in COLUMNS)}) ON CONFLICT (task_id) DO NOTHING")
        with self._transaction() as conn:
            before = conn.total_changes
            conn.executemany(sql, rows)
            added = conn.total_changes - before
        return added

    def kind_of(self, task_id: int) -> SliceKind | None:
        """The purpose of a task (Label Studio task ids are unique per server), or None for a plain item."""
        with self._lock:
            row = self._conn.execute("SELECT kind FROM slice_items WHERE task_id = ?", (task_id,)).fetchone()
        return row[0] if row else None

    def of_kind(self, kind: SliceKind, task_ids: Iterable[int]) -> set[int]:
        """Which of ``task_ids`` have this purpose: one query for a whole ``/predict`` request."""
        ids = sorted(set(task_ids))
        if not ids:
            return set()
        marks = ", ".join("?" * len(ids))
        with self._lock:
            rows = self._conn.execute(f"SELECT task_id FROM slice_items WHERE kind = ? AND task_id IN ({marks})",
                                      [kind, *ids]).fetchall()
        return {r[0] for r in rows}

    def task_ids(self, kind: SliceKind, project_id: int | None = None) -> set[int]:
        sql, params = "SELECT task_id FROM slice_items WHERE kind = ?", [kind]
        if project_id is not None:
            sql += " AND project_id = ?"
            params.append(project_id)
        with self._lock:
            return {r[0] for r in self._conn.execute(sql, params).fetchall()}

    def frame(self, project_id: int | None = None) -> pd.DataFrame:
        """Every recorded item (optionally of one project), oldest first, with the columns of :class:`SliceItem`."""
        sql, params = f"SELECT {', '.join(COLUMNS)} FROM slice_items", ()
        if project_id is not None:
            sql, params = sql + " WHERE project_id = ?", (project_id,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_at, task_id", params).fetchall()
        return pd.DataFrame([tuple(r) for r in rows], columns=COLUMNS)
