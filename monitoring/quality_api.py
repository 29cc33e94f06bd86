"""``/v1/quality``: the label-quality measures as JSON, for the dashboard and for anyone's scripts.

The router is mounted by the composition point (``labelloop serve`` passes it to ``create_app`` with
the other monitoring routers), so it inherits the service's authentication. Its one dependency builds a
:class:`~monitoring.quality_context.QualityContext` from what the app keeps on ``app.state`` (settings,
and the journal and slice store when the service has them open); a bare app needs only
``app.state.settings``. Handlers are plain functions: the measures are CPU work and run in FastAPI's
thread pool, off the event loop that answers Label Studio's webhooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.slices import SliceStore
from labelloop.taxonomy import get_taxonomy
from monitoring.agreement import Agreement, Crowdlab
from monitoring.label_errors import LabelIssue
from monitoring.quality import Acceptance, AuditReport, AutomationBias, Breakdown, GoldAccuracy
from monitoring.quality_context import LabelIssues, QualityContext, QualityReport

MAX_TOP_K = 1000


def quality_context(request: Request,
                    project_id: Annotated[int | None, Query(ge=1, le=2**63 - 1,  # SQLite's INTEGER range
                                                            description="default: the configured project")]
                    = None) -> Iterator[QualityContext]:
    """The context for one request; the journal and slice store are the app's own when it has them."""
    state = request.app.state
    settings: Settings = state.settings
    taxonomy = get_taxonomy(settings.taxonomy)
    with ExitStack() as stack:
        journal = (getattr(state, "journal", None)
                   or stack.enter_context(Journal(settings.database("journal"), taxonomy)))
        slices = getattr(state, "slices", None) or stack.enter_context(SliceStore(settings.database("slices")))
        if getattr(state, "quality_predictions", None) is None:  # audit predictions, kept across requests
            state.quality_predictions = {}
        yield QualityContext(settings=settings, journal=journal, slices=slices, taxonomy=taxonomy,
                             project_id=project_id if project_id is not None else settings.ls_project_id,
                             prediction_cache=state.quality_predictions)


ContextDep = Annotated[QualityContext, Depends(quality_context)]
ByQuery = Annotated[Breakdown | None, Query(description="break each measure down by this key")]
TopKQuery = Annotated[int | None, Query(ge=0, le=MAX_TOP_K, description="default: label_error_top_k")]

router = APIRouter(prefix="/v1/quality", tags=["quality"])


@router.get("", response_model=QualityReport, summary="every measure at once")
def report(ctx: ContextDep, by: ByQuery = None) -> QualityReport:
    return ctx.report(by)


@router.get("/acceptance", response_model=Acceptance)
def acceptance(ctx: ContextDep, by: ByQuery = None) -> Acceptance:
    return ctx.acceptance(by)


@router.get("/gold", response_model=GoldAccuracy)
def gold(ctx: ContextDep, by: ByQuery = None) -> GoldAccuracy:
    return ctx.gold(by)


@router.get("/agreement", response_model=Agreement)
def agreement(ctx: ContextDep) -> Agreement:
    return ctx.agreement()


@router.get("/audit", response_model=AuditReport)
def audit(ctx: ContextDep, by: ByQuery = None) -> AuditReport:
    return ctx.audit(by)


@router.get("/automation-bias", response_model=AutomationBias)
def automation_bias(ctx: ContextDep) -> AutomationBias:
    return ctx.automation_bias()


@router.get("/crowdlab", response_model=Crowdlab, summary="consensus labels and annotator quality (CROWDLAB)")
def crowdlab(ctx: ContextDep) -> Crowdlab:
    return ctx.crowdlab()


@router.get("/label-issues", response_model=LabelIssues, summary="likely label errors, most suspicious first")
def label_issues(ctx: ContextDep, top_k: TopKQuery = None) -> LabelIssues:
    return ctx.label_issues(top_k)


@router.get("/adjudication-candidates", response_model=list[LabelIssue],
            summary="likely label errors not yet sent for adjudication")
def adjudication_candidates(ctx: ContextDep, top_k: TopKQuery = None) -> list[LabelIssue]:
    return ctx.adjudication_candidates(top_k)
