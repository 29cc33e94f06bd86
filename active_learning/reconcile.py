"""Reconciliation: make the journal agree with Label Studio, whatever webhooks were lost.

Label Studio sends each webhook once, synchronously, with a 1 s timeout, and forgets it: an event that
arrives while serving is down or slow is gone. This job lists every annotation of a project and feeds
each through :meth:`Journal.apply_annotation`, whose ``(id, updated_at)`` rule makes it exactly-once
against the webhooks that did arrive, so running it again (or concurrently with webhooks) changes nothing.

Deletions cannot be listed, only inferred: an annotation the journal holds as live but the listing did
not return. Before marking it deleted the reconciler asks Label Studio for that one annotation, because
a listing that pages through a changing project can skip rows, and an annotation created after the
listing began arrives by webhook meanwhile; only a 404 is proof. A deletion is final in the journal, so
a wrong one would never be undone; a confirmed one is what Label Studio itself did.

:class:`Reconciler` runs passes on a schedule in the service. While Label Studio cannot be read it backs
off (the wait doubles from ``reconcile_seconds`` up to ``backoff_max_seconds``), logs once when the outage
begins and once when it ends, and reports itself in ``/health`` as the ``label_studio`` dependency.
Webhooks and serving never wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from label_studio_sdk.core.api_error import ApiError

from active_learning.labelstudio import LabelStudioClient, LabelStudioError
from labelloop.journal import Journal, RecordResult
from serving.champion import Backoff, utc_now
from serving.protocol import DependencyHealth

log = logging.getLogger("labelloop.reconcile")


@dataclass(frozen=True)
class ReconcileReport:
    """What one pass did. ``seen`` annotations were listed; every one of them, plus each annotation the
    listing missed but Label Studio still had, ends in exactly one of applied / duplicates / ignored /
    quarantined. ``ignored`` ones were deleted in the journal already (deletion is final)."""

    seen: int
    applied: int
    duplicates: int
    deleted: int
    quarantined: int
    ignored: int


def reconcile(client: LabelStudioClient, project_id: int, journal: Journal) -> ReconcileReport:
    """Apply every annotation of ``project_id`` to the journal and record confirmed deletions.

    Raises :class:`LabelStudioError` when Label Studio cannot be read; what was applied until then is
    kept (each application is its own transaction) and the next pass completes it.
    """
    counts = {"accepted": 0, "duplicate": 0, "ignored": 0, "quarantined": 0}
    listed: set[int] = set()
    seen = 0
    for annotation, task in client.annotations(project_id):
        seen += 1
        counts[journal.apply_annotation(annotation, task).status] += 1
        listed.add(annotation.get("id"))
    deleted = 0
    for annotation_id in sorted(journal.live_annotation_ids(project_id) - listed):
        result = _recheck(client, journal, annotation_id)
        if result is None:
            deleted += journal.mark_deleted(annotation_id, "reconcile").status == "accepted"
        else:
            counts[result.status] += 1
    return ReconcileReport(
        seen=seen, applied=counts["accepted"], duplicates=counts["duplicate"], deleted=deleted,
        quarantined=counts["quarantined"], ignored=counts["ignored"],
    )


def _recheck(client: LabelStudioClient, journal: Journal, annotation_id: int) -> RecordResult | None:
    """Fetch one annotation the listing did not return: None if Label Studio says it is gone (404),
    else the journal's verdict on it (it was created or changed while the listing ran)."""
    try:
        annotation = client.sdk.annotations.get(annotation_id).model_dump(mode="json")
        task = client.sdk.tasks.get(annotation["task"]).model_dump(
            mode="json", exclude={"annotations", "drafts"}
        )
    except ApiError as e:
        if e.status_code == 404:
            return None
        raise LabelStudioError(f"re-reading annotation {annotation_id} failed: HTTP {e.status_code}") from None
    except httpx.HTTPError as e:
        raise LabelStudioError(f"re-reading annotation {annotation_id} failed: {e}") from None
    return journal.apply_annotation(annotation, task)


class Reconciler:
    """Runs ``run_once`` every ``every`` seconds; after a failure the next attempt waits ``every``, then
    twice that, and so on up to ``cap``; the first success goes back to the plain period."""

    def __init__(self, run_once: Callable[[], object], every: float, cap: float, *, what: str):
        self._run_once = run_once
        self.every = every
        self.what = what
        self._backoff = Backoff(every, max(cap, every))
        self.error: str | None = None
        self.error_since: str | None = None
        self.last_success: str | None = None

    def next_wait(self, now: float) -> float:
        return self._backoff.remaining(now) if self._backoff.failing else self.every

    def attempt(self) -> bool:
        """One pass; never raises (Label Studio being down is a state, reported in :meth:`health`)."""
        try:
            self._run_once()
        except Exception as e:
            self._failed(e)
            return False
        if self.error is not None:
            log.warning("reconciliation with %s works again (it failed since %s)", self.what, self.error_since)
        self.error = self.error_since = None
        self.last_success = utc_now()
        self._backoff.succeeded()
        return True

    def _failed(self, error: Exception) -> None:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        detail = f"reconciling with {self.what} failed: {first[:300]}"
        delay = self._backoff.failed(time.monotonic())
        if self.error is None:
            self.error_since = utc_now()
            log.warning("reconciliation failed: %s; retrying in %.0f s, backing off up to %.0f s", detail, delay,
                        self._backoff.cap)
        else:
            log.debug("reconciliation failed again (attempt %d): %s", self._backoff.failures, detail)
        self.error = detail

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (the service's background thread)."""
        while not stop.wait(self.next_wait(time.monotonic())):
            self.attempt()

    def health(self) -> DependencyHealth:
        if self.error is None:
            return DependencyHealth(status="ok")
        return DependencyHealth(status="unavailable", detail=self.error, since=self.error_since,
                                retry_in_s=round(self.next_wait(time.monotonic()), 1))
