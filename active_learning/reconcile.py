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
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from label_studio_sdk.core.api_error import ApiError

from active_learning.labelstudio import LabelStudioClient, LabelStudioError
from labelloop.journal import Journal, RecordResult


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
