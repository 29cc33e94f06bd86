"""Exposure accounting: how many severe items each reviewer saw per day, and how many masked texts they revealed.

Reviewing harmful content has a human cost that adds up per person and per day, so the unit here is
(reviewer, task): a reviewer who saw a severe item counts it once, however many times they updated their
annotation, and a reveal ("show original") counts once per item. Whether an item is severe is the policy's
call (:func:`labelloop.policy.severe_reason`: annotated severity at or above ``severe_from``, a severe label,
or a confident severe prediction). The day is the UTC day the annotation was first submitted.

Fed from the journal: :meth:`ExposureLedger.sync` reads the annotations changed since its cursor (a journal event
id) and inserts with ``ON CONFLICT DO NOTHING`` on (reviewer, task), advancing the cursor in the same transaction,
so a webhook delivered twice, a reconcile pass and the webhook meeting the same annotation, a sync repeated after
a crash, or two replicas syncing the same events at once never count twice. The serving app syncs after every
webhook; the queue reads :meth:`ExposureLedger.over_cap`, the dashboard :meth:`ExposureLedger.per_reviewer` and
:meth:`ExposureLedger.daily`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

import sqlalchemy as sa

from labelloop.journal import Journal
from labelloop.policy import Protection, Severity, severe_reason
from labelloop.store import ID, Store, greatest

METADATA = sa.MetaData()
SEVERE_SEEN = sa.Table(
    "severe_seen", METADATA,
    sa.Column("reviewer", ID, primary_key=True, autoincrement=False),
    sa.Column("task_id", ID, primary_key=True, autoincrement=False),
    sa.Column("day", sa.Text, nullable=False),
    sa.Column("annotation_id", ID, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("severe_seen_day", "reviewer", "day"),
)
REVEALS = sa.Table(
    "reveals", METADATA,
    sa.Column("reviewer", ID, primary_key=True, autoincrement=False),
    sa.Column("task_id", ID, primary_key=True, autoincrement=False),
    sa.Column("day", sa.Text, nullable=False),
    sa.Column("annotation_id", ID, nullable=False),
    sa.Index("reveals_day", "reviewer", "day"),
)
CURSOR = sa.Table(
    "cursor", METADATA,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", ID, nullable=False),
)
# built once, both counts in one statement: the reviewer queue asks on every task it serves
_DAY = sa.select(*(sa.select(sa.func.count()).select_from(table)
                   .where(table.c.reviewer == sa.bindparam("reviewer"), table.c.day == sa.bindparam("day"))
                   .scalar_subquery() for table in (SEVERE_SEEN, REVEALS)))

#: task id → (predicted label, its probability): the model's view, for the "confident severe prediction" rule
Predictions = Mapping[int, tuple[str, float]]


@dataclass(frozen=True)
class DayExposure:
    reviewer: int
    day: str
    severe_seen: int
    reveals: int


@dataclass(frozen=True)
class ReviewerExposure:
    """One reviewer over the period asked for: what a PM needs to see who carries the load."""

    reviewer: int
    days_active: int  # days with any severe item or reveal
    severe_seen: int
    reveals: int
    max_severe_in_a_day: int
    days_over_cap: int


def day_of(timestamp: str | None) -> str | None:
    """The UTC day of a journal timestamp (fixed-width UTC ISO-8601)."""
    return timestamp[:10] if isinstance(timestamp, str) and len(timestamp) >= 10 else None


class ExposureLedger(Store):
    """The exposure ledger (``exposure.sqlite``, or the ``exposure`` schema of the shared PostgreSQL); safe to
    share between threads, processes and replicas. Every replica's queue reads the same counts, so the daily
    cap counts what a reviewer saw through any of them."""

    METADATA = METADATA
    KEY = "ledger"

    # ------------------------------------------------------------------ feeding
    def record(self, rows: Iterable[dict[str, Any]], severity: Severity, protection: Protection,
               predictions: Predictions | None = None, *, cursor: int | None = None) -> tuple[int, int]:
        """Count each row (a :meth:`Journal.review_marks_since` row) once; returns (new severe items, new
        reveals). ``cursor``, when given, is stored in the same transaction and never moves back (two
        replicas syncing at once may finish in either order)."""
        predictions = predictions or {}
        seen = revealed = 0
        # a row is new when RETURNING gives it back (an INSERT's rowcount is not kept by every driver)
        see, reveal = (self.insert(table).on_conflict_do_nothing(index_elements=["reviewer", "task_id"])
                       .returning(table.c.task_id) for table in (SEVERE_SEEN, REVEALS))
        with self._transaction() as conn:
            for row in rows:
                reviewer, day = row.get("annotator"), day_of(row.get("created_at") or row.get("updated_at"))
                if reviewer is None or day is None:
                    continue  # not attributable to anyone
                predicted = predictions.get(row["task_id"], (None, None))
                reason = severe_reason(severity, protection, severity=row.get("severity"), label=row.get("label"),
                                       predicted_label=predicted[0], predicted_probability=predicted[1])
                key = {"reviewer": reviewer, "task_id": row["task_id"], "day": day,
                       "annotation_id": row["annotation_id"]}
                if reason is not None:
                    seen += conn.execute(see, {**key, "reason": reason}).first() is not None
                if row.get("revealed"):
                    revealed += conn.execute(reveal, key).first() is not None
            if cursor is not None:
                upsert = self.insert(CURSOR).values(name="journal", value=cursor)
                conn.execute(upsert.on_conflict_do_update(
                    index_elements=["name"], set_={"value": greatest(CURSOR.c.value, upsert.excluded.value)}))
        return seen, revealed

    def sync(self, journal: Journal, severity: Severity, protection: Protection,
             predictions: Predictions | None = None) -> tuple[int, int]:
        """Count what the journal holds past this ledger's cursor; idempotent."""
        rows = journal.review_marks_since(self.cursor())  # whole events only, so the cursor never splits one
        if not rows:
            return 0, 0
        return self.record(rows, severity, protection, predictions, cursor=rows[-1]["event_id"])

    def cursor(self) -> int:
        with self._read() as conn:
            value = conn.execute(sa.select(CURSOR.c.value).where(CURSOR.c.name == "journal")).scalar()
        return value or 0

    # ------------------------------------------------------------------ reading
    def day(self, reviewer: int, day: str | date) -> DayExposure:
        day = day.isoformat() if isinstance(day, date) else day
        with self._read() as conn:
            seen, reveals = conn.execute(_DAY, {"reviewer": reviewer, "day": day}).one()
        return DayExposure(reviewer, day, seen, reveals)

    def over_cap(self, reviewer: int, day: str | date, cap: int | None) -> bool:
        """Whether the reviewer has seen ``cap`` severe items that day (never, without a cap)."""
        return cap is not None and self.day(reviewer, day).severe_seen >= cap

    def daily(self, since: str | date | None = None, until: str | date | None = None) -> list[DayExposure]:
        """Every (reviewer, day) with any severe item or reveal in ``[since, until]``, by reviewer then day."""
        lo = since.isoformat() if isinstance(since, date) else (since or "0000-00-00")
        hi = until.isoformat() if isinstance(until, date) else (until or "9999-99-99")
        marks = sa.union_all(*(
            sa.select(table.c.reviewer, table.c.day, sa.literal_column(is_seen).label("seen"),
                      sa.literal_column(is_reveal).label("revealed")).where(table.c.day.between(lo, hi))
            for table, is_seen, is_reveal in ((SEVERE_SEEN, "1", "0"), (REVEALS, "0", "1")))).subquery()
        with self._read() as conn:
            rows = conn.execute(
                sa.select(marks.c.reviewer, marks.c.day, sa.func.sum(marks.c.seen), sa.func.sum(marks.c.revealed))
                .group_by(marks.c.reviewer, marks.c.day).order_by(marks.c.reviewer, marks.c.day)).all()
        return [DayExposure(reviewer, day, int(seen), int(reveals)) for reviewer, day, seen, reveals in rows]

    def per_reviewer(self, since: str | date | None = None, until: str | date | None = None,
                     cap: int | None = None) -> list[ReviewerExposure]:
        """Aggregates per reviewer over ``[since, until]`` (the dashboard's table); ``days_over_cap`` counts
        days at or over ``cap`` (0 without one)."""
        by_reviewer: dict[int, list[DayExposure]] = {}
        for row in self.daily(since, until):
            by_reviewer.setdefault(row.reviewer, []).append(row)
        return [ReviewerExposure(
            reviewer=reviewer, days_active=len(days), severe_seen=sum(d.severe_seen for d in days),
            reveals=sum(d.reveals for d in days), max_severe_in_a_day=max(d.severe_seen for d in days),
            days_over_cap=sum(cap is not None and d.severe_seen >= cap for d in days))
            for reviewer, days in sorted(by_reviewer.items())]
