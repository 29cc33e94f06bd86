"""Exposure accounting: how many severe items each reviewer saw per day, and how many masked texts they revealed.

Reviewing harmful content has a human cost that adds up per person and per day, so the unit here is
(reviewer, task): a reviewer who saw a severe item counts it once, however many times they updated their
annotation, and a reveal ("show original") counts once per item. Whether an item is severe is the policy's
call (:func:`labelloop.policy.severe_reason`: annotated severity at or above ``severe_from``, a severe label,
or a confident severe prediction). The day is the UTC day the annotation was first submitted.

Fed from the journal: :meth:`ExposureLedger.sync` reads the annotations changed since its cursor (a journal
event id) and inserts with ``INSERT OR IGNORE`` on (reviewer, task), advancing the cursor in the same
transaction, so a webhook delivered twice, a reconcile pass and the webhook meeting the same annotation, or a
sync repeated after a crash never count twice. The serving app syncs after every webhook; the queue reads
:meth:`ExposureLedger.over_cap`, the dashboard :meth:`ExposureLedger.per_reviewer` and
:meth:`ExposureLedger.daily`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from labelloop.journal import Journal
from labelloop.policy import Protection, Severity, severe_reason
from labelloop.sqlite_store import SQLiteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS severe_seen (
    reviewer      INTEGER NOT NULL,
    task_id       INTEGER NOT NULL,
    day           TEXT    NOT NULL,
    annotation_id INTEGER NOT NULL,
    reason        TEXT    NOT NULL,
    PRIMARY KEY (reviewer, task_id)
);
CREATE INDEX IF NOT EXISTS severe_seen_day ON severe_seen (reviewer, day);
CREATE TABLE IF NOT EXISTS reveals (
    reviewer      INTEGER NOT NULL,
    task_id       INTEGER NOT NULL,
    day           TEXT    NOT NULL,
    annotation_id INTEGER NOT NULL,
    PRIMARY KEY (reviewer, task_id)
);
CREATE INDEX IF NOT EXISTS reveals_day ON reveals (reviewer, day);
CREATE TABLE IF NOT EXISTS cursor (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

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


class ExposureLedger(SQLiteStore):
    """The exposure file; safe to share between threads and processes."""

    SCHEMA = _SCHEMA

    # ------------------------------------------------------------------ feeding
    def record(self, rows: Iterable[dict[str, Any]], severity: Severity, protection: Protection,
               predictions: Predictions | None = None, *, cursor: int | None = None) -> tuple[int, int]:
        """Count each row (a :meth:`Journal.review_marks_since` row) once; returns (new severe items, new
        reveals). ``cursor``, when given, is stored in the same transaction."""
        predictions = predictions or {}
        seen = revealed = 0
        with self._transaction() as conn:
            for row in rows:
                reviewer, day = row.get("annotator"), day_of(row.get("created_at") or row.get("updated_at"))
                if reviewer is None or day is None:
                    continue  # not attributable to anyone
                predicted = predictions.get(row["task_id"], (None, None))
                reason = severe_reason(severity, protection, severity=row.get("severity"), label=row.get("label"),
                                       predicted_label=predicted[0], predicted_probability=predicted[1])
                key = (reviewer, row["task_id"], day, row["annotation_id"])
                if reason is not None:
                    seen += conn.execute("INSERT OR IGNORE INTO severe_seen (reviewer, task_id, day, annotation_id, "
                                         "reason) VALUES (?, ?, ?, ?, ?)", (*key, reason)).rowcount
                if row.get("revealed"):
                    revealed += conn.execute("INSERT OR IGNORE INTO reveals (reviewer, task_id, day, annotation_id) "
                                             "VALUES (?, ?, ?, ?)", key).rowcount
            if cursor is not None:
                conn.execute("INSERT INTO cursor (name, value) VALUES ('journal', ?) "
                             "ON CONFLICT (name) DO UPDATE SET value = MAX(value, excluded.value)", (cursor,))
        return seen, revealed

    def sync(self, journal: Journal, severity: Severity, protection: Protection,
             predictions: Predictions | None = None) -> tuple[int, int]:
        """Count what the journal holds past this ledger's cursor; idempotent."""
        rows = journal.review_marks_since(self.cursor())  # whole events only, so the cursor never splits one
        if not rows:
            return 0, 0
        return self.record(rows, severity, protection, predictions, cursor=rows[-1]["event_id"])

    def cursor(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT value FROM cursor WHERE name = 'journal'").fetchone()
        return row[0] if row else 0

    # ------------------------------------------------------------------ reading
    def day(self, reviewer: int, day: str | date) -> DayExposure:
        day = day.isoformat() if isinstance(day, date) else day
        with self._lock:
            seen = self._conn.execute("SELECT COUNT(*) FROM severe_seen WHERE reviewer = ? AND day = ?",
                                      (reviewer, day)).fetchone()[0]
            reveals = self._conn.execute("SELECT COUNT(*) FROM reveals WHERE reviewer = ? AND day = ?",
                                         (reviewer, day)).fetchone()[0]
        return DayExposure(reviewer, day, seen, reveals)

    def over_cap(self, reviewer: int, day: str | date, cap: int | None) -> bool:
        """Whether the reviewer has seen ``cap`` severe items that day (never, without a cap)."""
        return cap is not None and self.day(reviewer, day).severe_seen >= cap

    def daily(self, since: str | date | None = None, until: str | date | None = None) -> list[DayExposure]:
        """Every (reviewer, day) with any severe item or reveal in ``[since, until]``, by reviewer then day."""
        lo = since.isoformat() if isinstance(since, date) else (since or "0000-00-00")
        hi = until.isoformat() if isinstance(until, date) else (until or "9999-99-99")
        with self._lock:
            rows = self._conn.execute(
                "SELECT reviewer, day, SUM(seen), SUM(revealed) FROM ("
                " SELECT reviewer, day, 1 AS seen, 0 AS revealed FROM severe_seen WHERE day BETWEEN ? AND ?"
                " UNION ALL"
                " SELECT reviewer, day, 0, 1 FROM reveals WHERE day BETWEEN ? AND ?"
                ") GROUP BY reviewer, day ORDER BY reviewer, day", (lo, hi, lo, hi)).fetchall()
        return [DayExposure(*row) for row in rows]

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
