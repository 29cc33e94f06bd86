"""``GET /v1/escalations``: what reviewers escalated, delivered or not, within seconds of the annotation.

The outbox (``app.state.escalations``, a :class:`labelloop.escalations.EscalationOutbox`) is synced from the
journal on every request before it is read, so an escalation shows here as soon as its webhook is journaled,
whether or not the delivery worker has run and whether or not the receiver is up. The composition that owns
the outbox (``active_learning.service``) mounts :data:`escalations_router`; it sits behind the backend's
credentials like every other route.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, BeforeValidator, Field

from labelloop.escalations import EscalationOutbox, OutboxEntry
from labelloop.journal import Journal
from serving.routes import get_journal


class EscalationOut(BaseModel):
    id: str = Field(description="the escalation's uid, also the Idempotency-Key of its POST")
    escalation_id: int
    status: Literal["open", "delivered"]
    annotation_id: int
    task_id: int
    project_id: int | None
    item_id: str
    label: Any = Field(description="the annotation's label (a list for a multi-label taxonomy), if usable")
    severity: str | None
    reason: str | None
    annotator: int | None
    text: str | None
    escalated_at: str
    attempts: int
    last_error: str | None
    delivered_at: str | None

    @classmethod
    def of(cls, entry: OutboxEntry) -> EscalationOut:
        body = entry.body
        return cls(id=entry.uid, escalation_id=entry.escalation_id, status=entry.status,
                   annotation_id=body["annotation_id"], task_id=body["task_id"], project_id=body["project_id"],
                   item_id=body["item_id"], label=body["label"], severity=body["severity"], reason=body["reason"],
                   annotator=body["annotator"], text=body["text"], escalated_at=entry.escalated_at,
                   attempts=entry.attempts, last_error=entry.last_error, delivered_at=entry.delivered_at)


class EscalationsResponse(BaseModel):
    open: int = Field(description="escalations not yet delivered, in all")
    delivered: int = Field(description="escalations delivered, in all")
    escalations: list[EscalationOut] = Field(description="newest first, after the filters")


def get_outbox(request: Request) -> EscalationOutbox:
    return request.app.state.escalations


OutboxDep = Annotated[EscalationOutbox, Depends(get_outbox)]
JournalDep = Annotated[Journal, Depends(get_journal)]

escalations_router = APIRouter(prefix="/v1/escalations", tags=["escalations"])


def _iso_8601_only(value: object) -> object:
    """pydantic also reads bare numbers as Unix times; the schema promises ISO-8601, so hold to it."""
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("since must be an ISO-8601 date or date-time, e.g. 2026-11-30T09:00:00Z") from None
    return value


@escalations_router.get("", response_model=EscalationsResponse)
async def list_escalations(
    outbox: OutboxDep, journal: JournalDep,
    status: Annotated[Literal["open", "delivered"] | None, Query(description="only these")] = None,
    since: Annotated[datetime | None, BeforeValidator(_iso_8601_only),
                     Query(description="escalated at or after this time (ISO-8601; UTC if no offset)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EscalationsResponse:
    def read() -> EscalationsResponse:
        outbox.sync(journal)
        entries = outbox.entries(status, since, limit)
        return EscalationsResponse(**outbox.counts(), escalations=[EscalationOut.of(e) for e in entries])

    return await anyio.to_thread.run_sync(read)
