"""Alerts with their raised and cleared times, the latest drift report, and how pool items fall into windows.

This lives in the data layer, not in ``monitoring/``, because two stages read it: monitoring writes alerts
and reports, and the active-learning loop reads which windows are drifting to steer part of its next query
batch there. Imports point one way (data → training → serving → active learning → monitoring), so the loop
may read this store but must never import monitoring; a plain file in between would need its own locking
and history, which SQLite already gives (WAL, one writer at a time, readers in other processes).

Windowing is here for the same reason: the loop and monitoring must put a pool item into the same window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from labelloop.sqlite_store import SQLiteStore

WindowKind = Literal["day", "week", "batch"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("day", "week", "batch")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    key           TEXT NOT NULL,
    kind          TEXT NOT NULL,
    window_kind   TEXT,
    window        TEXT,
    message       TEXT NOT NULL,
    severity      REAL NOT NULL DEFAULT 0,
    details       TEXT NOT NULL DEFAULT '{}',
    raised_at     TEXT NOT NULL,
    cleared_at    TEXT,
    notify_raise  INTEGER NOT NULL DEFAULT 0,
    notify_clear  INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open ON alerts (key) WHERE cleared_at IS NULL;
CREATE TABLE IF NOT EXISTS drift_reports (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    body       TEXT NOT NULL
);
"""

_COLUMNS = ("id", "key", "kind", "window_kind", "window", "message", "severity", "details", "raised_at",
            "cleared_at", "notify_raise", "notify_clear")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def alerts_path(state_dir: Path) -> Path:
    return state_dir / "alerts.sqlite"


@dataclass(frozen=True)
class Alert:
    """One alert episode: raised once, cleared at most once. A key that trips again opens a new episode,
    so the history keeps every raised/cleared pair."""

    id: int
    key: str
    kind: str
    window_kind: str | None
    window: str | None
    message: str
    severity: float
    details: dict[str, Any]
    raised_at: str
    cleared_at: str | None
    notify_raise: bool
    notify_clear: bool

    @property
    def open(self) -> bool:
        return self.cleared_at is None

    @classmethod
    def from_row(cls, row: tuple) -> Alert:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["details"] = json.loads(values["details"])
        values["notify_raise"], values["notify_clear"] = bool(values["notify_raise"]), bool(values["notify_clear"])
        return cls(**values)


class AlertStore(SQLiteStore):
    """SQLite under ``state_dir``; safe to share between threads and processes."""

    SCHEMA = _SCHEMA

    def _select(self, where: str = "", params: tuple = ()) -> list[Alert]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM alerts {where}"
        with self._lock:
            return [Alert.from_row(r) for r in self._conn.execute(sql, params).fetchall()]

    # ------------------------------------------------------------------ reading
    def open_alerts(self) -> list[Alert]:
        return self._select("WHERE cleared_at IS NULL ORDER BY raised_at, id")

    def history(self, limit: int = 200) -> list[Alert]:
        """Open alerts first, then the most recently raised."""
        return self._select("ORDER BY cleared_at IS NOT NULL, raised_at DESC, id DESC LIMIT ?", (limit,))

    def get(self, alert_id: int) -> Alert | None:
        found = self._select("WHERE id = ?", (alert_id,))
        return found[0] if found else None

    def drifted_windows(self, window_kind: str) -> dict[str, float]:
        """Windows (of this kind) with an open drift alert → the alert's severity (higher: stronger drift)."""
        rows = self._select("WHERE cleared_at IS NULL AND kind = 'drift' AND window_kind = ?", (window_kind,))
        return {a.window: a.severity for a in rows if a.window is not None}

    def pending_notifications(self) -> list[tuple[Alert, Literal["raised", "cleared"]]]:
        """Transitions not yet delivered to the alert URL, oldest first."""
        rows = self._select("WHERE notify_raise = 1 OR notify_clear = 1 ORDER BY id")
        out: list[tuple[Alert, Literal["raised", "cleared"]]] = []
        for alert in rows:
            if alert.notify_raise:
                out.append((alert, "raised"))
            if alert.notify_clear:
                out.append((alert, "cleared"))
        return out

    # ------------------------------------------------------------------ writing
    def raise_alert(self, key: str, kind: str, message: str, *, severity: float = 0.0,
                    window_kind: str | None = None, window: str | None = None,
                    details: dict[str, Any] | None = None, notify: bool = False) -> tuple[Alert, bool]:
        """Open an alert for ``key``, or refresh the open one's message, severity and details.
        Returns the alert and whether it was newly raised."""
        body = json.dumps(details or {}, default=str)
        with self._transaction() as conn:
            row = conn.execute("SELECT id FROM alerts WHERE key = ? AND cleared_at IS NULL", (key,)).fetchone()
            if row:
                conn.execute("UPDATE alerts SET message = ?, severity = ?, details = ? WHERE id = ?",
                             (message, severity, body, row[0]))
                alert_id, new = row[0], False
            else:
                cur = conn.execute(
                    "INSERT INTO alerts (key, kind, window_kind, window, message, severity, details, raised_at,"
                    " notify_raise) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, kind, window_kind, window, message, severity, body, _now(), int(notify)))
                alert_id, new = cur.lastrowid, True
        return self.get(alert_id), new

    def clear_alert(self, key: str, *, notify: bool = False) -> Alert | None:
        """Clear the open alert for ``key``; None when none was open."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE alerts SET cleared_at = ?, notify_clear = ? WHERE key = ? AND cleared_at IS NULL "
                "RETURNING id", (_now(), int(notify), key))
            row = cur.fetchone()
        return self.get(row[0]) if row else None

    def mark_notified(self, alert_id: int, event: Literal["raised", "cleared"]) -> None:
        column = {"raised": "notify_raise", "cleared": "notify_clear"}[event]
        with self._lock:
            self._conn.execute(f"UPDATE alerts SET {column} = 0 WHERE id = ?", (alert_id,))

    # ------------------------------------------------------------------ drift reports
    def save_report(self, body: dict[str, Any]) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO drift_reports (created_at, body) VALUES (?, ?)",
                               (_now(), json.dumps(body, default=str)))

    def latest_report(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT body FROM drift_reports ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None


def window_ids(pool: pd.DataFrame, kind: WindowKind) -> pd.Series:
    """The window of each pool item: its UTC day (``2026-11-30``), ISO week (``2026-W48``) or import batch.

    ``created_at`` is the item's own time when the source had one, else its import time (see
    ``ActiveLearningLoop.import_pool``)."""
    if kind == "batch":
        return pool["batch_id"].astype(str)
    if kind not in WINDOW_KINDS:
        raise ValueError(f"unknown window kind {kind!r}; expected one of {', '.join(WINDOW_KINDS)}")
    created = pd.to_datetime(pool["created_at"], utc=True)
    if kind == "day":
        return created.dt.strftime("%Y-%m-%d")
    iso = created.dt.isocalendar()
    return iso["year"].astype(str) + "-W" + iso["week"].astype(str).str.zfill(2)
