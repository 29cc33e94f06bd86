"""JSON endpoints for drift and alerts, under ``/v1/monitoring`` (the dashboard's data).

``router`` is module-level; the app that mounts it provides the settings through the
:func:`monitoring_settings` dependency: ``app.state.settings`` when set, else the process settings (tests
and apps with their own settings override it with ``app.dependency_overrides``).

``GET /drift`` returns the latest stored evaluation (evaluating loads the champion and embeds the pool, too
slow for a page load); ``POST /drift/evaluate`` runs one now.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, field_validator

from labelloop.alerts_store import Alert, AlertStore
from labelloop.config import Settings, get_settings


def monitoring_settings(request: Request) -> Settings:
    return getattr(request.app.state, "settings", None) or get_settings()


def alert_store(settings: Annotated[Settings, Depends(monitoring_settings)]) -> Iterator[AlertStore]:
    with AlertStore(settings.database("alerts")) as store:
        yield store


class DriftTest(BaseModel):
    name: str
    statistic: float
    p_value: float
    detail: dict[str, Any] = {}


class AuditAccuracy(BaseModel):
    """``k`` of ``n`` blind-audit items where the reviewers' label equals the label of the model that served
    them, with a Wilson 95% interval (only windows with at least the quality measures' minimum n have one)."""

    accuracy: float
    k: int
    n: int
    low: float
    high: float
    model_versions: list[str] = []


class WindowReport(BaseModel):
    window: str
    n_items: int
    first_item_at: str | None
    last_item_at: str | None
    evaluated: bool
    drifted: bool
    reason: str
    min_p_value: float
    severity: float
    tests: list[DriftTest]
    predicted_share: dict[str, float]
    mean_confidence: float | None
    estimated_accuracy: dict[str, float] | None = Field(
        None, description="label-free accuracy estimates: average calibrated confidence (AC) and ATC")
    audit: AuditAccuracy | None = Field(None, description="blind-audit accuracy of the champion in this window")

    @field_validator("mean_confidence", mode="before")
    @classmethod
    def _nan_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v


class DriftReport(BaseModel):
    available: bool
    message: str = ""
    evaluated_at: str | None = None
    project_id: int | None = None
    champion: str | None = None
    window_kind: str | None = None
    reference: str | None = None
    reference_items: int | None = None
    reference_accuracy: float | None = None
    p_value: float | None = None
    min_items: int | None = None
    labels: list[str] = []
    windows: list[WindowReport] = []


class EvaluateRequest(BaseModel):
    project_id: int | None = Field(None, ge=1, description="default: settings.ls_project_id")


class AlertOut(BaseModel):
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
    open: bool

    @classmethod
    def of(cls, alert: Alert) -> AlertOut:
        return cls(id=alert.id, key=alert.key, kind=alert.kind, window_kind=alert.window_kind, window=alert.window,
                   message=alert.message, severity=alert.severity, details=alert.details, raised_at=alert.raised_at,
                   cleared_at=alert.cleared_at, open=alert.open)


class AlertList(BaseModel):
    open: int
    alerts: list[AlertOut]


NO_REPORT = ("no drift evaluation yet: run `labelloop drift` (or POST /v1/monitoring/drift/evaluate) once a "
             "champion exists and the pool is imported")

router = APIRouter(prefix="/v1/monitoring", tags=["monitoring"])


@router.get("/drift", response_model=DriftReport)
def latest_drift(store: Annotated[AlertStore, Depends(alert_store)]) -> DriftReport:
    """The latest drift evaluation, per window; ``available: false`` with a message before the first one."""
    report = store.latest_report()
    return DriftReport(available=True, **report) if report else DriftReport(available=False, message=NO_REPORT)


@router.post("/drift/evaluate", response_model=DriftReport,
             responses={409: {"description": "nothing to evaluate yet (no champion, pool or reference)"}})
async def evaluate_drift(settings: Annotated[Settings, Depends(monitoring_settings)],
                         body: EvaluateRequest | None = None) -> DriftReport:
    """Evaluate every window now, store the report, raise/clear alerts and POST them to ``alert_url``."""
    from monitoring.drift import run_drift_evaluation

    project_id = body.project_id if body else None
    try:
        report, _ = await run_in_threadpool(run_drift_evaluation, settings, project_id)
    except (ValueError, FileNotFoundError) as e:
        raise HTTPException(409, str(e)) from None
    return DriftReport(available=True, **report)


@router.get("/alerts", response_model=AlertList)
def list_alerts(store: Annotated[AlertStore, Depends(alert_store)],
                open_only: Annotated[bool, Query(description="only alerts still raised")] = False,
                limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> AlertList:
    """Alerts with their raised and cleared times, open ones first."""
    open_alerts = store.open_alerts()
    alerts = open_alerts[:limit] if open_only else store.history(limit)
    return AlertList(open=len(open_alerts), alerts=[AlertOut.of(a) for a in alerts])
