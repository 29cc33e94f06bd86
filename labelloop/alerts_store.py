"""Alerts with their raised and cleared times, the latest drift report, and how pool items fall into windows.

This lives in the data layer, not in ``monitoring/``, because two stages read it: monitoring writes alerts
and reports, and the active-learning loop reads which windows are drifting to steer part of its next query
batch there. Imports point one way (data → training → serving → active learning → monitoring), so the loop
may read this store but must never import monitoring; a plain file in between would need its own locking
and history, which the database already gives (an SQLite file by default; with ``database_url``, the shared
PostgreSQL, so every replica's loop steers by the same alerts).

Windowing is here for the same reason: the loop and monitoring must put a pool item into the same window.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import sqlalchemy as sa

from labelloop.store import ID, Store

if TYPE_CHECKING:
    from labelloop.config import Settings

WindowKind = Literal["day", "week", "batch"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("day", "week", "batch")

METADATA = sa.MetaData()
ALERTS = sa.Table(
    "alerts", METADATA,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("window_kind", sa.Text),
    sa.Column("window", sa.Text),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("severity", sa.Float, nullable=False, server_default=sa.text("0")),
    sa.Column("details", sa.Text, nullable=False, server_default=sa.text("'{}'")),
    sa.Column("raised_at", sa.Text, nullable=False),
    sa.Column("cleared_at", sa.Text),
    sa.Column("notify_raise", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("notify_clear", sa.Integer, nullable=False, server_default=sa.text("0")),
    # one open episode per key; a cleared one may trip again
    sa.Index("alerts_one_open", "key", unique=True, sqlite_where=sa.text("cleared_at IS NULL"),
             postgresql_where=sa.text("cleared_at IS NULL")),
    sqlite_autoincrement=True,  # ids are never reused, as in the files written before this module
)
DRIFT_REPORTS = sa.Table(
    "drift_reports", METADATA,
    sa.Column("id", ID, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)

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


class AlertStore(Store):
    """``alerts.sqlite`` under ``state_dir``, or the ``alerts`` schema of the shared PostgreSQL; safe to share
    between threads, processes and replicas."""

    METADATA = METADATA
    KEY = "alerts"

    @classmethod
    def existing(cls, settings: Settings) -> AlertStore | None:
        """The store for a reader that must not create one: None while no SQLite file exists yet (drift
        monitoring never ran). A PostgreSQL store is opened as is: its empty tables read as "never ran"."""
        if settings.database_url is None and not alerts_path(settings.state_dir).exists():
            return None
        return cls(settings.database("alerts"))

    def _select(self, *where: sa.ColumnElement[bool], order_by: tuple = (), limit: int | None = None) -> list[Alert]:
        query = sa.select(*(ALERTS.c[c] for c in _COLUMNS)).where(*where).order_by(*order_by).limit(limit)
        with self._read() as conn:
            return [Alert.from_row(r) for r in conn.execute(query).all()]

    # ------------------------------------------------------------------ reading
    def open_alerts(self) -> list[Alert]:
        return self._select(ALERTS.c.cleared_at.is_(None), order_by=(ALERTS.c.raised_at, ALERTS.c.id))

    def history(self, limit: int = 200) -> list[Alert]:
        """Open alerts first, then the most recently raised."""
        return self._select(order_by=(ALERTS.c.cleared_at.is_not(None), ALERTS.c.raised_at.desc(),
                                      ALERTS.c.id.desc()), limit=limit)

    def get(self, alert_id: int) -> Alert | None:
        found = self._select(ALERTS.c.id == alert_id)
        return found[0] if found else None

    def drifted_windows(self, window_kind: str) -> dict[str, float]:
        """Windows (of this kind) with an open drift alert → the alert's severity (higher: stronger drift)."""
        rows = self._select(ALERTS.c.cleared_at.is_(None), ALERTS.c.kind == "drift",
                            ALERTS.c.window_kind == window_kind)
        return {a.window: a.severity for a in rows if a.window is not None}

    def pending_notifications(self) -> list[tuple[Alert, Literal["raised", "cleared"]]]:
        """Transitions not yet delivered to the alert URL, oldest first."""
        rows = self._select(sa.or_(ALERTS.c.notify_raise == 1, ALERTS.c.notify_clear == 1), order_by=(ALERTS.c.id,))
        out: list[tuple[Alert, Literal["raised", "cleared"]]] = []
        for alert in rows:
            if alert.notify_raise:
                out.append((alert, "raised"))
            if alert.notify_clear:
                out.append((alert, "cleared"))
        return out

    def delivering(self) -> AbstractContextManager[bool]:
        """Held while transitions are read and posted: every replica evaluates drift on its own schedule, and
        two that read the same pending transitions at once would both post them."""
        return self.db.exclusive("alert_delivery")

    # ------------------------------------------------------------------ writing
    def raise_alert(self, key: str, kind: str, message: str, *, severity: float = 0.0,
                    window_kind: str | None = None, window: str | None = None,
                    details: dict[str, Any] | None = None, notify: bool = False) -> tuple[Alert, bool]:
        """Open an alert for ``key``, or refresh the open one's message, severity and details.
        Returns the alert and whether it was newly raised."""
        body = json.dumps(details or {}, default=str)
        with self._transaction() as conn:
            open_id = conn.execute(sa.select(ALERTS.c.id).where(ALERTS.c.key == key, ALERTS.c.cleared_at.is_(None))
                                   ).scalar()
            if open_id is not None:
                conn.execute(ALERTS.update().where(ALERTS.c.id == open_id)
                             .values(message=message, severity=severity, details=body))
                alert_id, new = open_id, False
            else:
                alert_id = conn.execute(ALERTS.insert().values(
                    key=key, kind=kind, window_kind=window_kind, window=window, message=message, severity=severity,
                    details=body, raised_at=_now(), notify_raise=int(notify)).returning(ALERTS.c.id)).scalar_one()
                new = True
        return self.get(alert_id), new

    def clear_alert(self, key: str, *, notify: bool = False) -> Alert | None:
        """Clear the open alert for ``key``; None when none was open."""
        with self._transaction() as conn:
            alert_id = conn.execute(
                ALERTS.update().where(ALERTS.c.key == key, ALERTS.c.cleared_at.is_(None))
                .values(cleared_at=_now(), notify_clear=int(notify)).returning(ALERTS.c.id)).scalar()
        return self.get(alert_id) if alert_id is not None else None

    def mark_notified(self, alert_id: int, event: Literal["raised", "cleared"]) -> None:
        column = {"raised": "notify_raise", "cleared": "notify_clear"}[event]
        with self._transaction() as conn:
            conn.execute(ALERTS.update().where(ALERTS.c.id == alert_id).values({column: 0}))

    # ------------------------------------------------------------------ drift reports
    def save_report(self, body: dict[str, Any]) -> None:
        with self._transaction() as conn:
            conn.execute(DRIFT_REPORTS.insert().values(created_at=_now(), body=json.dumps(body, default=str)))

    def latest_report(self) -> dict[str, Any] | None:
        with self._read() as conn:
            body = conn.execute(sa.select(DRIFT_REPORTS.c.body).order_by(DRIFT_REPORTS.c.id.desc()).limit(1)).scalar()
        return json.loads(body) if body is not None else None


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
