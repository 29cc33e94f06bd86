"""The cap-aware review queue: ``GET /v1/queue/next?reviewer=<email>`` and the page ``GET /queue/next``.

Label Studio's open-source server has one queue per project, the same for every reviewer, so it cannot stop
serving severe items to someone who has seen their daily share. This entry point can: it takes the project's
unlabelled tasks in the order Label Studio's uncertainty sampling would serve them, asks the champion which
ones it confidently predicts as a severe label (the same rule that blurs an item, ``Protection.blurs``), and
for a reviewer at or over ``daily_severe_cap`` today (the exposure ledger) serves the first non-severe task
instead, saying so. When only severe work is left it serves it and says that too, because holding work back
is the team's call, not the queue's.

The limitation, stated where it is enforced: a reviewer who opens Label Studio directly and clicks "Label all
tasks" bypasses this queue and is not capped; what they see is still counted as exposure (the journal and
the ledger count every submitted annotation), so the dashboard shows them over the cap. Two reviewers asking
at the same moment may be sent to the same task (Label Studio locks a task only for its own stream).

Choosing is pure (:func:`pick_next`); the route gathers the inputs: the task source (``app.state.review_queue``,
set by the composition that owns the Label Studio client), the champion's view of the candidates, and the
ledger (``app.state.exposure``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Annotated, Any, Protocol

import anyio
import sqlalchemy.exc
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from labelloop.config import Settings
from labelloop.exposure import ExposureLedger
from labelloop.journal import Journal, JournalUnavailable
from labelloop.policy import Protection, Severity
from serving.batching import Lane, MicroBatcher
from serving.champion import Champion
from serving.protocol import HTML_PAGE_ERRORS, json_errors_on_html
from serving.routes import get_batcher, get_champion, get_journal, get_settings

#: candidates the champion looks at per scoring call: the head of the queue is what gets served, and a reviewer
#: over the cap whose head is all severe gets the next slice looked at, until other work or the end turns up
LOOKAHEAD = 200
CAP_HEADER = "X-Labelloop-Severe-Cap"

#: texts → the champion's (top label, its probability) per text, or None when no champion is served
Scorer = Callable[[list[str]], Awaitable[list[tuple[str, float]] | None]]


class TaskSourceUnavailable(RuntimeError):
    """The task source could not answer (Label Studio down or refusing): the queue answers 503, not 500."""


class TaskSource(Protocol):
    """What the queue needs from Label Studio (``active_learning`` adapts its client to this); a failed call
    raises :class:`TaskSourceUnavailable`."""

    def unlabelled_tasks(self) -> list[dict[str, Any]]: ...  # task_id, item_id, text, score; serving order
    def user_id(self, email: str) -> int | None: ...
    def labeling_url(self, task_id: int) -> str: ...


# --------------------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class Candidate:
    task_id: int
    item_id: str
    severe_reason: str | None = None  # why the item counts as severe (a confident severe prediction)


@dataclass(frozen=True)
class Pick:
    candidate: Candidate | None
    skipped_severe: int  # severe tasks ahead of it, held back because of the cap
    only_severe_left: bool = False


def judged_prediction(labels: Sequence[str], row: Sequence[float], *, multi_label: bool,
                      severe_labels: Sequence[str]) -> tuple[str, float]:
    """The (label, probability) the blur rule (``Protection.blurs``) judges an item by: a single-label model's
    top label; for a multi-label model, whose labels are independent yes/no decisions, its most probable
    severe label, because a confident severe label beside a more probable harmless one (a target group)
    is still a confident severe prediction. Without severe labels, the top label."""
    scores = [float(p) for p in row]
    top = max(range(len(scores)), key=scores.__getitem__)
    severe = [i for i, label in enumerate(labels) if label in severe_labels] if multi_label else []
    chosen = max(severe, key=scores.__getitem__) if severe else top
    return labels[chosen], scores[chosen]


def pick_next(candidates: Sequence[Candidate], *, over_cap: bool) -> Pick:
    """The first candidate (they come in serving order); for a reviewer over the cap, the first non-severe
    one, or the first severe one when no other work exists."""
    if not candidates:
        return Pick(None, 0)
    if not over_cap:
        return Pick(candidates[0], 0)
    for i, candidate in enumerate(candidates):
        if candidate.severe_reason is None:
            return Pick(candidate, i)
    return Pick(candidates[0], 0, only_severe_left=True)


def notice(pick: Pick, *, over_cap: bool, seen: int, cap: int | None) -> str | None:
    """What the reviewer is told: only when the cap changed what they get, or could not."""
    if not over_cap:
        return None
    if pick.only_severe_left:
        return (f"You have seen {seen} severe items today (your daily cap is {cap}), but only severe items are "
                "left in the queue. Take a break or ask your lead before continuing.")
    if pick.candidate is None:
        return None
    return (f"You have reached today's cap of {cap} severe items ({seen} seen), so you are being served "
            "non-severe items" + (f"; {pick.skipped_severe} severe item(s) were passed to others."
                                  if pick.skipped_severe else "."))


# --------------------------------------------------------------------------------------- the route
class QueueNextResponse(BaseModel):
    reviewer: str
    reviewer_id: int = Field(description="the reviewer's Label Studio user id")
    task_id: int | None = Field(description="the task to label next; null when the queue is empty")
    item_id: str | None
    labeling_url: str | None = Field(description="the task in Label Studio's labeling interface")
    severe: bool = Field(description="the task counts as severe (a confident severe prediction)")
    severe_reason: str | None
    severe_seen_today: int
    daily_severe_cap: int | None
    over_cap: bool = Field(description="the reviewer has seen daily_severe_cap severe items today (UTC)")
    skipped_severe: int = Field(description="severe tasks ahead in the queue that were not served because of "
                                            "the cap")
    notice: str | None = Field(description="what the reviewer should be told, when the cap changed the pick")


def get_review_queue(request: Request) -> TaskSource:
    source = getattr(request.app.state, "review_queue", None)
    if source is None:
        raise HTTPException(503, "no Label Studio project is configured (set ls_project_id and ls_api_key)")
    return source


def get_exposure(request: Request) -> ExposureLedger:
    return request.app.state.exposure


def get_scorer(champion: Annotated[Champion, Depends(get_champion)],
               batcher: Annotated[MicroBatcher, Depends(get_batcher)],
               settings: Annotated[Settings, Depends(get_settings)]) -> Scorer:
    """The served champion's prediction per text, as the blur rule judges it (:func:`judged_prediction`)."""
    severe_labels = settings.review_policy.severity.severe_labels

    async def score(texts: list[str]) -> list[tuple[str, float]] | None:
        model = champion.current
        if model is None or not texts:
            return None
        proba = await batcher.predict(model, texts, Lane.API)
        classifier = model.classifier
        return [judged_prediction(classifier.labels, row, multi_label=classifier.multi_label,
                                  severe_labels=severe_labels) for row in proba]

    return score


queue_router = APIRouter(tags=["queue"])


async def _next(reviewer: str, settings: Settings, source: TaskSource, ledger: ExposureLedger, journal: Journal,
                scorer: Scorer) -> QueueNextResponse:
    severity: Severity = settings.review_policy.severity
    protection: Protection = settings.protection_policy

    def gather() -> tuple[int | None, list[dict[str, Any]], int]:
        reviewer_id = source.user_id(reviewer)
        if reviewer_id is None:
            return None, [], 0
        ledger.sync(journal, severity, protection)
        today = datetime.now(UTC).date()
        return reviewer_id, source.unlabelled_tasks(), ledger.day(reviewer_id, today).severe_seen

    try:
        reviewer_id, tasks, seen = await anyio.to_thread.run_sync(gather)
    except TaskSourceUnavailable as e:
        raise HTTPException(503, f"Label Studio cannot be read: {e}") from None
    except (JournalUnavailable, sqlalchemy.exc.OperationalError) as e:  # the shared database is down
        raise HTTPException(503, "the reviewer's exposure cannot be counted, so the daily cap cannot be held: "
                                 f"{type(getattr(e, 'orig', None) or e).__name__}") from None
    if reviewer_id is None:
        raise HTTPException(404, f"no Label Studio account with the email {reviewer!r}")
    cap = protection.daily_severe_cap
    over_cap = cap is not None and seen >= cap
    candidates: list[Candidate] = []
    # under the cap the first task is served whatever it is: score it alone, not a whole lookahead per click
    step = LOOKAHEAD if over_cap else 1
    for start in range(0, len(tasks), step):
        chunk = tasks[start:start + step]
        predicted = await scorer([t["text"] or " " for t in chunk])
        for i, task in enumerate(chunk):
            label, probability = predicted[i] if predicted else (None, None)
            reason = (f"predicted {label} ({probability:.2f})"
                      if protection.blurs(severity, label, probability) else None)
            candidates.append(Candidate(int(task["task_id"]), str(task["item_id"]), reason))
        if not over_cap or any(c.severe_reason is None for c in candidates):
            break
    pick = pick_next(candidates, over_cap=over_cap)
    chosen = pick.candidate
    return QueueNextResponse(
        reviewer=reviewer, reviewer_id=reviewer_id, task_id=chosen.task_id if chosen else None,
        item_id=chosen.item_id if chosen else None,
        labeling_url=source.labeling_url(chosen.task_id) if chosen else None,
        severe=bool(chosen and chosen.severe_reason), severe_reason=chosen.severe_reason if chosen else None,
        severe_seen_today=seen, daily_severe_cap=cap, over_cap=over_cap, skipped_severe=pick.skipped_severe,
        notice=notice(pick, over_cap=over_cap, seen=seen, cap=cap))


ReviewerQuery = Annotated[str, Query(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$",
                                     description="the reviewer's Label Studio email")]
Deps = tuple[Settings, TaskSource, ExposureLedger, Journal, Scorer]


def _deps(settings: Annotated[Settings, Depends(get_settings)],
          source: Annotated[TaskSource, Depends(get_review_queue)],
          ledger: Annotated[ExposureLedger, Depends(get_exposure)], journal: Annotated[Journal, Depends(get_journal)],
          scorer: Annotated[Scorer, Depends(get_scorer)]) -> Deps:
    return settings, source, ledger, journal, scorer


@queue_router.get("/v1/queue/next", response_model=QueueNextResponse, responses={
    404: {"description": "no Label Studio account has this email"},
    503: {"description": "no Label Studio project is configured, or Label Studio cannot be read"}})
async def queue_next(reviewer: ReviewerQuery, response: Response,
                     deps: Annotated[Deps, Depends(_deps)]) -> QueueNextResponse:
    """The task this reviewer should label next, respecting their daily cap of severe items."""
    out = await _next(reviewer, *deps)
    response.headers[CAP_HEADER] = "reached" if out.over_cap else "ok"
    return out


@queue_router.get("/queue/next", response_class=HTMLResponse, responses={
    303: {"description": "straight to the task in Label Studio, when there is nothing to tell the reviewer"},
    **HTML_PAGE_ERRORS, **json_errors_on_html(
        s404="no Label Studio account has this email",
        s503="no Label Studio project is configured, or Label Studio cannot be read")})
async def queue_next_page(reviewer: ReviewerQuery, deps: Annotated[Deps, Depends(_deps)]) -> Response:
    """A reviewer's bookmark: straight to their next task, or a page with the notice and a link to it."""
    out = await _next(reviewer, *deps)
    headers = {CAP_HEADER: "reached" if out.over_cap else "ok"}
    if out.notice is None and out.labeling_url is not None:
        return RedirectResponse(out.labeling_url, status_code=303, headers=headers)
    body = (f'<p class="notice" role="status">{escape(out.notice)}</p>' if out.notice else "") + (
        f'<p><a id="next-task" href="{escape(out.labeling_url)}">Continue to the next task</a></p>'
        if out.labeling_url else '<p class="empty">Nothing left to label in this project.</p>')
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>Next task</title></head>"
                        f"<body><h1>Next task for {escape(out.reviewer)}</h1>{body}</body></html>",
                        headers=headers)
