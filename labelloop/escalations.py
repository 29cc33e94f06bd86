"""Escalations: a durable outbox between the journal and the team's escalation receiver.

The journal records each escalated annotation in its ``escalations`` table in the same transaction as the
label, before the webhook is acknowledged. This module copies those rows into an outbox of its own
(``escalations.sqlite``, or the ``escalations`` schema of the shared PostgreSQL when ``database_url`` is set)
and POSTs each one to ``settings.escalation_url`` until the receiver answers 2xx:

* **Never lost.** :meth:`EscalationOutbox.sync` copies every journal escalation with an id above the outbox's
  highest (journal ids only grow, in commit order), skipping the rows it already holds, so it can run any number
  of times, from any process or replica: right after each webhook, before each delivery pass, at start. A service
  that dies between acknowledging a webhook and copying its escalation finds it at the next sync.
* **Delivered once.** A row is marked delivered only after a 2xx. Each POST carries the escalation's uid in an
  ``Idempotency-Key`` header (and the body), the same on every attempt, so a receiver that answered but whose
  answer was lost (a crash right after the POST) can drop the second copy. Two delivering processes (every replica
  of ``labelloop serve`` runs a worker) do not both send one escalation: a pass first claims its rows
  (``next_attempt_at`` pushed past the request timeout, inside one write transaction), and right before each POST
  checks that the claim is still its own, so a pass slowed past its claim skips the rows another pass took
  meanwhile. Claims are stamped with each replica's own clock, so replicas' clocks must agree to well within
  ``CLAIM_SECONDS`` (NTP does).
* **Retried with backoff.** A failed attempt (refused, timed out, any non-2xx) schedules the next one
  ``retry_seconds * 2**(attempts-1)`` later, at most ``retry_max_seconds``; it is never given up, because a
  dropped escalation is the one failure this exists to prevent. Training, MLflow and Label Studio play no
  part here, so none of them being down delays an escalation.

:class:`DeliveryWorker` is the thread ``labelloop serve`` runs: it syncs and delivers whenever the webhook
path wakes it, and otherwise when the next retry is due.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import sqlalchemy as sa

from labelloop.journal import Journal
from labelloop.store import ID, Store

log = logging.getLogger("labelloop.escalations")

Status = Literal["open", "delivered"]
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: how long a claimed row stays claimed: longer than one POST may take, so a slow receiver is not sent twice
CLAIM_SECONDS = 60.0
REQUEST_TIMEOUT = 10.0

METADATA = sa.MetaData()
OUTBOX = sa.Table(
    "outbox", METADATA,
    sa.Column("escalation_id", ID, primary_key=True, autoincrement=False),
    sa.Column("uid", sa.Text, nullable=False, unique=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("escalated_at", sa.Text, nullable=False),
    sa.Column("queued_at", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("next_attempt_at", sa.Text, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("delivered_at", sa.Text),
    sa.Index("outbox_due", "delivered_at", "next_attempt_at"),
)

_COLUMNS = ("escalation_id", "uid", "body", "escalated_at", "queued_at", "attempts", "next_attempt_at",
            "last_error", "delivered_at")
_SELECT = sa.select(*(OUTBOX.c[name] for name in _COLUMNS))


def _stamp(moment: datetime) -> str:
    """Fixed-width UTC, so that string order is time order in SQL (as the journal's timestamps)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before the next attempt after ``attempts`` failed ones: doubling from ``base``, at most ``cap``."""
    if attempts < 1:
        return 0.0
    return min(cap, base * 2 ** min(attempts - 1, 60))


def payload(row: dict[str, Any]) -> dict[str, Any]:
    """What the receiver gets for one journal escalation: enough to act without asking labelloop back."""
    return {"event": "escalation", "source": "labelloop", "id": row["uid"],
            "escalation_id": row["escalation_id"], "annotation_id": row["annotation_id"],
            "project_id": row["project_id"], "task_id": row["task_id"], "item_id": row["item_id"],
            "text": row["text"], "label": row["label"], "severity": row["severity"], "reason": row["reason"],
            "annotator": row["annotator"], "escalated_at": row["escalated_at"]}


@dataclass(frozen=True)
class OutboxEntry:
    escalation_id: int
    uid: str
    body: dict[str, Any]
    escalated_at: str
    queued_at: str
    attempts: int
    next_attempt_at: str
    last_error: str | None
    delivered_at: str | None

    @property
    def status(self) -> Status:
        return "open" if self.delivered_at is None else "delivered"

    @classmethod
    def from_row(cls, row: tuple) -> OutboxEntry:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["body"] = json.loads(values["body"])
        return cls(**values)


@dataclass(frozen=True)
class DeliveryReport:
    delivered: int
    failed: int
    pending: int


class EscalationOutbox(Store):
    """The outbox (``escalations.sqlite``, or the ``escalations`` schema of the shared PostgreSQL); safe to
    share between threads, processes and replicas."""

    METADATA = METADATA
    KEY = "outbox"

    # ------------------------------------------------------------------ filling
    def sync(self, journal: Journal, now: datetime | None = None) -> int:
        """Copy the journal's escalations this outbox lacks; returns how many were new. Idempotent."""
        stamp = _stamp(now or _utcnow())
        added = 0
        with self._read() as conn:
            after = conn.execute(sa.select(sa.func.coalesce(sa.func.max(OUTBOX.c.escalation_id), 0))).scalar_one()
        while True:
            rows = journal.escalations(after)
            if not rows:
                return added
            after = rows[-1]["escalation_id"]
            # no conflict target: a row already copied (same id) and a uid seen before are both skipped. New
            # rows are counted by RETURNING: an INSERT's rowcount is not kept by every driver
            insert = self.insert(OUTBOX).on_conflict_do_nothing().returning(OUTBOX.c.escalation_id)
            with self._transaction() as conn:
                for row in rows:
                    added += conn.execute(insert, {
                        "escalation_id": row["escalation_id"], "uid": row["uid"],
                        "body": json.dumps(payload(row), ensure_ascii=False), "escalated_at": row["escalated_at"],
                        "queued_at": stamp, "next_attempt_at": stamp}).first() is not None

    # ------------------------------------------------------------------ reading
    def entries(self, status: Status | None = None, since: datetime | None = None, limit: int = 500
             ) -> list[OutboxEntry]:
        """Newest first; ``since`` compares with the escalation's time (the annotation's ``updated_at``)."""
        query = _SELECT
        if status == "open":
            query = query.where(OUTBOX.c.delivered_at.is_(None))
        elif status == "delivered":
            query = query.where(OUTBOX.c.delivered_at.is_not(None))
        if since is not None:
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
            try:
                bound = _stamp(since)
            except OverflowError:  # within a day of datetime's range: in UTC it falls outside it
                bound = "9999-12-31T23:59:59.999999Z" if since.year > 1 else "0001-01-01T00:00:00.000000Z"
            query = query.where(OUTBOX.c.escalated_at >= bound)
        with self._read() as conn:
            rows = conn.execute(query.order_by(OUTBOX.c.escalation_id.desc()).limit(limit)).all()
        return [OutboxEntry.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as conn:
            total, delivered = conn.execute(
                sa.select(sa.func.count(), sa.func.count(OUTBOX.c.delivered_at))).one()
        return {"open": total - delivered, "delivered": delivered}

    def next_due(self) -> datetime | None:
        """When the earliest undelivered escalation is due (None: nothing to deliver)."""
        with self._read() as conn:
            due = conn.execute(sa.select(sa.func.min(OUTBOX.c.next_attempt_at))
                               .where(OUTBOX.c.delivered_at.is_(None))).scalar()
        return datetime.strptime(due, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) if due else None

    # ------------------------------------------------------------------ delivering
    def claim_due(self, now: datetime, limit: int = 100, claim_seconds: float = CLAIM_SECONDS
                  ) -> list[OutboxEntry]:
        """The undelivered escalations due now, oldest first, claimed for ``claim_seconds`` so that another
        pass (another thread, process or replica) leaves them alone while this one posts them. Each entry's
        ``next_attempt_at`` is the claim's end: :meth:`deliver` checks that it still holds that claim right
        before each POST.

        The claim is a lease rather than a row lock (``FOR UPDATE SKIP LOCKED``) because a row lock lives only
        as long as its transaction, and holding a transaction open across an HTTP POST to a slow receiver
        would pin a connection per escalation; the lease also expires by itself when its holder dies. Select
        and update run in one ``write`` transaction, so two replicas never claim the same row."""
        until = _stamp(now + timedelta(seconds=claim_seconds))
        with self._transaction() as conn:
            rows = conn.execute(
                _SELECT.where(OUTBOX.c.delivered_at.is_(None), OUTBOX.c.next_attempt_at <= _stamp(now))
                .order_by(OUTBOX.c.escalation_id).limit(limit)).all()
            if rows:
                conn.execute(OUTBOX.update().where(OUTBOX.c.escalation_id.in_([r[0] for r in rows]))
                             .values(next_attempt_at=until))
        return [replace(OutboxEntry.from_row(r), next_attempt_at=until) for r in rows]

    def mark_delivered(self, escalation_id: int, now: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(OUTBOX.update()
                         .where(OUTBOX.c.escalation_id == escalation_id, OUTBOX.c.delivered_at.is_(None))
                         .values(delivered_at=_stamp(now), attempts=OUTBOX.c.attempts + 1, last_error=None))

    def mark_failed(self, escalation_id: int, now: datetime, error: str, base: float, cap: float) -> datetime:
        """Count a failed attempt; returns when the escalation is due again."""
        with self._transaction() as conn:
            attempts = (conn.execute(sa.select(OUTBOX.c.attempts).where(OUTBOX.c.escalation_id == escalation_id))
                        .scalar() or 0) + 1
            retry_at = now + timedelta(seconds=backoff_seconds(attempts, base, cap))
            conn.execute(OUTBOX.update()
                         .where(OUTBOX.c.escalation_id == escalation_id, OUTBOX.c.delivered_at.is_(None))
                         .values(attempts=attempts, next_attempt_at=_stamp(retry_at), last_error=error[:500]))
        return retry_at

    def deliver(self, url: str | None, client: httpx.Client, *, retry_seconds: float, retry_max_seconds: float,
                now: Callable[[], datetime] = _utcnow) -> DeliveryReport:
        """POST every due escalation; stops at the first failure (the receiver is likely down): the rest of
        the claim is due again when the failed one is, so a receiver that is down gets one attempt per backoff
        period, not one per open escalation, and they keep their order. Without a URL nothing is sent and
        everything stays open."""
        delivered = failed = 0
        retry_at: datetime | None = None
        if url:
            for entry in self.claim_due(now()):
                if retry_at is not None:  # give back the rest of the claim, due with the failed one
                    self._release(entry, retry_at)
                    continue
                if not self._renew(entry, now()):  # a slow pass outlived its claim, and another took the row
                    continue
                try:
                    response = client.post(url, json=entry.body, headers={IDEMPOTENCY_HEADER: entry.uid})
                    response.raise_for_status()
                except httpx.HTTPError as e:
                    failed += 1
                    retry_at = self.mark_failed(entry.escalation_id, now(), f"{type(e).__name__}: {e}",
                                                retry_seconds, retry_max_seconds)
                    log.warning("escalation %s not delivered to %s (%s); retrying with backoff", entry.uid, url, e)
                    continue
                self.mark_delivered(entry.escalation_id, now())
                delivered += 1
        return DeliveryReport(delivered, failed, self.counts()["open"])

    def _claimed(self, entry: OutboxEntry) -> sa.Update:
        """An UPDATE of ``entry``'s row that matches only while ``entry``'s claim is still the row's."""
        return OUTBOX.update().where(OUTBOX.c.escalation_id == entry.escalation_id, OUTBOX.c.delivered_at.is_(None),
                                     OUTBOX.c.next_attempt_at == entry.next_attempt_at)

    def _release(self, entry: OutboxEntry, due: datetime) -> None:
        with self._transaction() as conn:
            conn.execute(self._claimed(entry).values(next_attempt_at=_stamp(due)))

    def _renew(self, entry: OutboxEntry, now: datetime) -> bool:
        """Whether this pass still holds its claim on ``entry`` (not delivered, not claimed by another pass
        since), extending it for one more POST if so."""
        with self._transaction() as conn:
            return conn.execute(self._claimed(entry).values(
                next_attempt_at=_stamp(now + timedelta(seconds=CLAIM_SECONDS)))).rowcount == 1


class DeliveryWorker:
    """The background thread of ``labelloop serve``: sync from the journal, deliver, sleep until woken (a
    webhook journaled something) or the next retry is due, at most ``idle_seconds``."""

    def __init__(self, outbox: EscalationOutbox, journal: Journal, url: str | None, *, retry_seconds: float,
                 retry_max_seconds: float, idle_seconds: float = 30.0, client: httpx.Client | None = None):
        self.outbox = outbox
        self.journal = journal
        self.url = url
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        self.idle_seconds = idle_seconds
        self._client = client or httpx.Client(timeout=REQUEST_TIMEOUT)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> DeliveryReport:
        self.outbox.sync(self.journal)
        return self.outbox.deliver(self.url, self._client, retry_seconds=self.retry_seconds,
                                   retry_max_seconds=self.retry_max_seconds)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="labelloop-escalations", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception as e:  # a full disk or a locked file: keep the thread, try again later
                log.error("escalation delivery pass failed: %s: %s", type(e).__name__, e)
            self._wake.wait(self._sleep_seconds())

    def _sleep_seconds(self) -> float:
        due = self.outbox.next_due() if self.url else None
        if due is None:
            return self.idle_seconds
        return min(self.idle_seconds, max(0.05, (due - _utcnow()).total_seconds()))

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT + 5)
        self._client.close()
