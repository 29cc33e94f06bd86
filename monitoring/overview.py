"""The dashboard's own numbers: the overview, the model's history and reviewer throughput.

Each measure is a pure function of tables (the journal's annotations, the registry's versions and gate
history, the retrain jobs' results), so it can be tested on hand-built frames; the ``collect_*``
functions do the reading, and :data:`router` serves them as JSON under ``/v1/monitoring/``. The
dashboard page and ``labelloop report`` show exactly what these endpoints return.

Time is UTC throughout: "today" starts at 00:00 UTC and "this week" on Monday 00:00 UTC (ISO weeks),
because reviewers in several time zones feed one journal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any

import pandas as pd
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from labelloop.alerts_store import AlertStore
from labelloop.config import Settings
from labelloop.escalations import EscalationOutbox
from labelloop.exposure import DayExposure, ExposureLedger
from labelloop.journal import Journal
from labelloop.slices import SliceStore
from labelloop.taxonomy import get_taxonomy
from monitoring.drift_api import AlertOut
from monitoring.quality_context import QualityContext
from training.registry import CHAMPION, GateDecision, Registry, VersionInfo

log = logging.getLogger(__name__)

#: the metrics shown per class and version, as the registry names them (``<metric>_<label>``)
CLASS_METRICS = ("precision", "recall", "f1")
DAYS_CHARTED = 14


# ------------------------------------------------------------------------------------------ context
@dataclass
class MonitoringContext:
    """Where the monitoring measures read from, built once per process (served app or CLI report).

    ``mlflow_url`` is the MLflow UI that run links point to: by default the tracking server when it is
    one (``http(s)://``); a local SQLite store has no UI of its own, so the caller names the one it
    started (the demo does). ``now`` is the clock, replaceable in tests."""

    settings: Settings
    journal: Journal
    mlflow_url: str | None = None
    slices: SliceStore | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    #: audit predictions per (model version, text), kept across requests: a version never changes
    quality_predictions: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        uri = self.settings.resolved_tracking_uri
        if self.mlflow_url is None and uri.startswith(("http://", "https://")):
            self.mlflow_url = uri
        if self.mlflow_url:
            self.mlflow_url = self.mlflow_url.rstrip("/")

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.settings)

    @cached_property
    def slice_store(self) -> SliceStore:
        return self.slices if self.slices is not None else SliceStore(self.settings.database("slices"))

    def quality(self) -> QualityContext:
        """The label-quality measures over the same journal, slice store and project."""
        return QualityContext(settings=self.settings, journal=self.journal, slices=self.slice_store,
                              taxonomy=get_taxonomy(self.settings.taxonomy), project_id=self.project_id,
                              prediction_cache=self.quality_predictions)

    def close(self) -> None:
        """Close what this context opened itself (a slice store it was not given)."""
        if self.slices is None and "slice_store" in self.__dict__:
            self.slice_store.close()

    @property
    def project_id(self) -> int | None:
        return self.settings.ls_project_id

    def task_url(self, task_id: int) -> str | None:
        """The task in Label Studio's Data Manager, opened on the labeling panel."""
        if self.project_id is None:
            return None
        return f"{self.settings.ls_url.rstrip('/')}/projects/{self.project_id}/data?task={task_id}"

    def run_url(self, experiment_id: str | None, run_id: str | None) -> str | None:
        if not (self.mlflow_url and experiment_id and run_id):
            return None
        return f"{self.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}"


def get_context(request: Request) -> MonitoringContext:
    """The app's monitoring context: the one :func:`monitoring.app.monitoring_routers` bound, else one
    built (once) from the backend's own state: settings, journal, and the slice store when it has one."""
    state = request.app.state
    context = getattr(state, "monitoring", None)
    if context is None:
        context = state.monitoring = MonitoringContext(state.settings, state.journal,
                                                       slices=getattr(state, "slices", None))
    return context


ContextDep = Annotated[MonitoringContext, Depends(get_context)]


# ------------------------------------------------------------------------------------------ shapes
class DayCount(BaseModel):
    day: str = Field(description="UTC date, YYYY-MM-DD")
    labels: int


class StoppingState(BaseModel):
    """The last retrain's stopping signal (see ``active_learning/stopping.py``)."""

    stop: bool
    reason: str
    kappa: float | None = None
    est_gain_per_100: float | None = Field(None, description="macro-F1 gained per 100 more labels, recent slope")
    stable_rounds: int = 0
    flat_rounds: int = 0
    as_of: str | None = Field(None, description="when the retrain that computed it finished")


class ChampionInfo(BaseModel):
    version: int
    label: str = Field(description='"<registered model>:v<N>", as Label Studio shows it')
    promoted_at: str | None = None
    macro_f1: float | None = None
    run_id: str | None = None
    run_url: str | None = None


class Overview(BaseModel):
    generated_at: str
    labels_today: int
    labels_this_week: int
    labels_total: int
    labels_per_day: list[DayCount] = Field(description=f"the last {DAYS_CHARTED} days, oldest first")
    backlog: int | None = Field(None, description="pool items no reviewer has annotated yet")
    backlog_note: str | None = None
    stopping: StoppingState | None = None
    stopping_note: str | None = None
    champion: ChampionInfo | None = None
    champion_note: str | None = None
    open_alerts: list[AlertOut] = Field(default_factory=list)
    alerts_note: str | None = Field(None, description="why no alerts are listed: drift monitoring never ran")


class ClassMetrics(BaseModel):
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None


class VersionRow(BaseModel):
    version: int
    label: str
    aliases: list[str]
    created_at: str
    eval_set: str | None = None
    macro_f1: float | None = None
    accuracy: float | None = None
    ece: float | None = None
    per_class: dict[str, ClassMetrics] = Field(default_factory=dict)
    model_kind: str | None = None
    run_id: str | None = None
    run_url: str | None = None


class GateRow(BaseModel):
    at: str
    action: str
    promoted: bool
    candidate: int | None
    champion_before: int | None
    champion_after: int | None
    reason: str
    eval_set: str | None = None


class ModelSection(BaseModel):
    registered_model: str
    champion: int | None = None
    versions: list[VersionRow] = Field(description="oldest first")
    decisions: list[GateRow] = Field(description="every gate decision and rollback, newest first")
    note: str | None = Field(None, description="why the lists are empty, when they are")
    readable: bool = Field(True, description="false when the registry could not be read (the note says why)")


class AnnotatorThroughput(BaseModel):
    annotator: str
    labels: int
    active_hours: int = Field(description="clock hours in which this annotator labelled at least once")
    labels_per_hour: float = Field(description="labels per active hour")
    median_seconds: float | None = Field(None, description="median Label Studio lead_time per item")
    timed_labels: int = Field(0, description="labels that carry a lead_time")


class HourCount(BaseModel):
    hour: str = Field(description="UTC hour, ISO 8601")
    annotator: str
    labels: int


class ReviewerProtection(BaseModel):
    reviewer: str
    severe_today: int = Field(description="severe items this reviewer saw today (UTC)")
    severe_7d: int = Field(description="severe items seen over the last 7 days, today included")
    reveals_today: int = Field(description="masked texts revealed today (\"show original\")")
    reveals_7d: int
    over_cap: bool = Field(description="at or over the daily cap of severe items today")
    days_over_cap_7d: int


class Protection(BaseModel):
    """Reviewer protection, per reviewer (from the exposure ledger) and the escalations outbox."""

    daily_severe_cap: int | None
    masking: bool = Field(description="whether texts are lexicon-masked by default")
    reviewers: list[ReviewerProtection] = Field(description="most severe items today first")
    escalations_open: int = Field(description="escalations not yet delivered to the configured URL")
    escalations_delivered: int
    note: str | None = None


class Throughput(BaseModel):
    since: str
    days: int
    annotators: list[AnnotatorThroughput]
    hourly: list[HourCount] = Field(description="labels per clock hour per annotator, oldest first")
    median_seconds: float | None = Field(None, description="median lead_time over every timed label")
    note: str | None = None


# ------------------------------------------------------------------------------------------ policy
def _utc(value: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def labelled_events(annotations: pd.DataFrame) -> pd.DataFrame:
    """The annotations that are labels (not skipped, not unusable), with ``at`` (UTC) = when the
    annotator made them, falling back to the last update when Label Studio sent no creation time."""
    labelled = annotations[annotations["label"].notna()].copy()
    when = labelled["created_at"].where(labelled["created_at"].notna(), labelled["updated_at"])
    labelled["at"] = pd.to_datetime(when, utc=True, errors="coerce", format="ISO8601")
    return labelled[labelled["at"].notna()]


def annotator_name(value: Any) -> str:
    return "unknown" if pd.isna(value) else f"user {int(value)}"


def label_counts(annotations: pd.DataFrame, now: datetime, days: int = DAYS_CHARTED
                 ) -> tuple[int, int, int, list[DayCount]]:
    """``(today, this week, total, per day for the last `days` days)`` of labels made."""
    events = labelled_events(annotations)
    now_ts = _utc(now)
    today = now_ts.normalize()
    week = today - pd.Timedelta(days=today.weekday())
    first = today - pd.Timedelta(days=days - 1)
    per_day = events.loc[events["at"] >= first, "at"].dt.normalize().value_counts()
    series = [DayCount(day=d.strftime("%Y-%m-%d"), labels=int(per_day.get(d, 0)))
              for d in pd.date_range(first, today, freq="D")]
    return (int((events["at"] >= today).sum()), int((events["at"] >= week).sum()), len(events), series)


def stopping_state(job_results: Sequence[tuple[str | None, dict | None]]) -> StoppingState | None:
    """The newest stopping signal among finished retrain jobs, given newest first as
    ``(finished_at, result)``; a round that trained nothing carries none and is passed over."""
    for finished_at, result in job_results:
        signal = (result or {}).get("stopping")
        if signal:
            return StoppingState(stop=bool(signal.get("stop")), reason=str(signal.get("reason", "")),
                                 kappa=signal.get("kappa"), est_gain_per_100=signal.get("est_gain_per_100"),
                                 stable_rounds=int(signal.get("stable_rounds", 0)),
                                 flat_rounds=int(signal.get("flat_rounds", 0)), as_of=finished_at)
    return None


def promoted_at(history: Sequence[GateDecision | GateRow], version: int) -> str | None:
    """When ``version`` last became champion (a passed promotion or a rollback onto it)."""
    moves = [d.at for d in history if d.promoted and d.champion_after == version and d.champion_before != version]
    return max(moves) if moves else None


def version_row(info: VersionInfo, name: str, labels: Sequence[str], run_url: str | None) -> VersionRow:
    """A version's metrics on the frozen evaluation set it was registered against (its ``eval_set`` tag)."""
    eval_set = info.tags.get("eval_set")
    per_class = {label: ClassMetrics(**{m: info.metric(eval_set, f"{m}_{label}") for m in CLASS_METRICS})
                 for label in labels}
    return VersionRow(version=info.version, label=f"{name}:v{info.version}", aliases=info.aliases,
                      created_at=info.created.isoformat(timespec="seconds"), eval_set=eval_set,
                      macro_f1=info.metric(eval_set, "macro_f1"), accuracy=info.metric(eval_set, "accuracy"),
                      ece=info.metric(eval_set, "ece"), per_class=per_class, model_kind=info.tags.get("model_kind"),
                      run_id=info.run_id, run_url=run_url)


def gate_rows(history: Sequence[GateDecision]) -> list[GateRow]:
    return [GateRow(at=d.at, action=d.action, promoted=d.promoted, candidate=d.candidate,
                    champion_before=d.champion_before, champion_after=d.champion_after, reason=d.reason,
                    eval_set=d.eval_set)
            for d in sorted(history, key=lambda d: d.at, reverse=True)]


def throughput(annotations: pd.DataFrame, now: datetime, days: int = 7) -> Throughput:
    """Labels per active hour and median ``lead_time`` per annotator over the last ``days`` days.

    The rate divides by the clock hours in which the annotator labelled at all, so a reviewer who
    works two hours a day is not reported as slow for the other twenty-two; the median time per item
    comes from Label Studio's ``lead_time`` (seconds the annotation was open), not from timestamps.
    """
    since = _utc(now) - pd.Timedelta(days=days)
    events = labelled_events(annotations)
    events = events[events["at"] >= since].assign(annotator=lambda f: f["annotator"].map(annotator_name),
                                                  hour=lambda f: f["at"].dt.floor("h"))
    timed = events["lead_time"].dropna()
    if events.empty:
        return Throughput(since=since.isoformat(), days=days, annotators=[], hourly=[],
                          note=f"no labels in the last {days} days")
    rows = []
    for name, group in events.groupby("annotator", sort=True):
        hours = group["hour"].nunique()
        lead = group["lead_time"].dropna()
        rows.append(AnnotatorThroughput(annotator=name, labels=len(group), active_hours=int(hours),
                                        labels_per_hour=round(len(group) / hours, 2),
                                        median_seconds=float(lead.median()) if len(lead) else None,
                                        timed_labels=len(lead)))
    hourly = events.groupby(["hour", "annotator"]).size().reset_index(name="labels").sort_values(["hour", "annotator"])
    return Throughput(
        since=since.isoformat(), days=days, annotators=rows,
        hourly=[HourCount(hour=h.isoformat(), annotator=a, labels=int(n))
                for h, a, n in hourly.itertuples(index=False)],
        median_seconds=float(timed.median()) if len(timed) else None,
        note=None if len(timed) else "no label carries Label Studio's lead_time, so no time per item")


# ------------------------------------------------------------------------------------------ reading
def _backlog(context: MonitoringContext) -> tuple[int | None, str | None]:
    from active_learning.loop import ActiveLearningLoop

    if context.project_id is None:
        return None, "no Label Studio project is configured (ls_project_id), so there is no pool to count"
    loop = ActiveLearningLoop(context.settings, None, context.project_id, context.journal)
    try:  # the loop opens its own slice store: close it, this runs on every page load
        if not loop.pool_path.exists():
            return None, f"no pool imported for project {context.project_id} yet (labelloop loop import)"
        return len(loop.unlabeled()), None
    finally:
        loop.slices.close()


def _job_results(context: MonitoringContext) -> list[tuple[str | None, dict | None]]:
    from active_learning.jobs import JobRunner

    if context.settings.database_url is None and not (context.settings.state_dir / "jobs.sqlite").exists():
        return []  # no service has run here yet: do not create its store from a page load
    runner = JobRunner(context.settings.database("jobs"), run_jobs=False)
    try:
        return [(job.finished_at, job.result) for job in runner.list(state="done", limit=50)]
    finally:
        runner.close()


def _open_alerts(context: MonitoringContext) -> tuple[list[AlertOut], str | None]:
    never = "drift monitoring has not run yet, so no alerts are evaluated (labelloop drift)"
    store = AlertStore.existing(context.settings)
    if store is None:
        return [], never
    with store:
        if store.latest_report() is None and not store.history(1):
            return [], never
        return [AlertOut.of(a) for a in store.open_alerts()], None


def _experiment_ids(context: MonitoringContext, run_ids: Sequence[str]) -> dict[str, str]:
    ids = {}
    for run_id in run_ids:
        try:
            ids[run_id] = context.registry.client.get_run(run_id).info.experiment_id
        except Exception as e:  # a deleted run keeps its version: show the version without a link
            log.debug("run %s unreadable: %s", run_id, e)
    return ids


def collect_model(context: MonitoringContext) -> ModelSection:
    registry = context.registry
    versions, history = registry.versions(), registry.history()
    champion = registry.alias_version(CHAMPION)
    labels = _taxonomy_labels(context)
    experiments = _experiment_ids(context, [v.run_id for v in versions if v.run_id]) if context.mlflow_url else {}
    rows = [version_row(v, registry.name, labels,
                        context.run_url(experiments.get(v.run_id or ""), v.run_id)) for v in versions]
    note = None if rows else f"no model version registered under {registry.name!r} yet: train one (labelloop train)"
    return ModelSection(registered_model=registry.name, champion=champion, versions=rows,
                        decisions=gate_rows(history), note=note)


def _taxonomy_labels(context: MonitoringContext) -> tuple[str, ...]:
    return tuple(get_taxonomy(context.settings.taxonomy).labels)


def model_or_note(context: MonitoringContext) -> ModelSection:
    """The model section, or an empty one that says why the registry could not be read: the overview and
    the page must still show the labels when the tracking server is down."""
    try:
        return collect_model(context)
    except Exception as e:
        log.warning("monitoring: registry unreadable: %s", e)
        return ModelSection(registered_model=context.settings.registered_model_name, versions=[], decisions=[],
                            note=f"the model registry could not be read: {type(e).__name__}: {e}", readable=False)


def champion_info(model: ModelSection) -> ChampionInfo | None:
    row = next((v for v in model.versions if v.version == model.champion), None)
    if row is None:
        return None
    return ChampionInfo(version=row.version, label=row.label, promoted_at=promoted_at(model.decisions, row.version),
                        macro_f1=row.macro_f1, run_id=row.run_id, run_url=row.run_url)


def collect_overview(context: MonitoringContext, model: ModelSection | None = None) -> Overview:
    now = context.now()
    today, week, total, per_day = label_counts(context.journal.annotations(context.project_id), now)
    backlog, backlog_note = _backlog(context)
    stopping = stopping_state(_job_results(context))
    model = model or model_or_note(context)
    champion = champion_info(model)
    open_alerts, alerts_note = _open_alerts(context)
    return Overview(
        generated_at=_utc(now).isoformat(timespec="seconds"), labels_today=today, labels_this_week=week,
        labels_total=total, labels_per_day=per_day, backlog=backlog, backlog_note=backlog_note, stopping=stopping,
        stopping_note=None if stopping else "no retrain has computed a stopping signal yet: it needs two rounds "
                                            "with a champion",
        champion=champion,
        champion_note=None if champion else model.note if not model.readable else
        "no champion yet: the first model that passes the gate becomes one",
        open_alerts=open_alerts,
        alerts_note=alerts_note)


def protection(daily: Sequence[DayExposure], now: datetime, cap: int | None, *, masking: bool,
               escalations: dict[str, int]) -> Protection:
    """Per reviewer: severe items and reveals today and over the last 7 days (UTC days), and the cap."""
    today = _utc(now).date()
    week = {(today - pd.Timedelta(days=d)).isoformat() for d in range(7)}
    rows: dict[int, dict[str, int]] = {}
    for d in daily:
        if d.day not in week:
            continue
        row = rows.setdefault(d.reviewer, {"severe_today": 0, "severe_7d": 0, "reveals_today": 0, "reveals_7d": 0,
                                           "days_over_cap_7d": 0})
        row["severe_7d"] += d.severe_seen
        row["reveals_7d"] += d.reveals
        row["days_over_cap_7d"] += int(cap is not None and d.severe_seen >= cap)
        if d.day == today.isoformat():
            row["severe_today"], row["reveals_today"] = d.severe_seen, d.reveals
    reviewers = [ReviewerProtection(reviewer=annotator_name(r), over_cap=cap is not None and v["severe_today"] >= cap,
                                    **v) for r, v in rows.items()]
    reviewers.sort(key=lambda r: (-r.severe_today, -r.severe_7d, r.reviewer))
    return Protection(daily_severe_cap=cap, masking=masking, reviewers=reviewers,
                      escalations_open=escalations.get("open", 0),
                      escalations_delivered=escalations.get("delivered", 0),
                      note=None if reviewers else "no reviewer saw a severe item or revealed a masked text in the "
                                                  "last 7 days")


def collect_protection(context: MonitoringContext) -> Protection:
    """Brings the ledger and the outbox up to date with the journal first (both idempotent), so the panel
    is current even where no service is running (``labelloop report``)."""
    settings = context.settings
    guard = settings.protection_policy
    since = (_utc(context.now()) - pd.Timedelta(days=6)).date()
    with (ExposureLedger(settings.database("exposure")) as ledger,
          EscalationOutbox(settings.database("escalations")) as outbox):
        ledger.sync(context.journal, settings.review_policy.severity, guard)
        outbox.sync(context.journal)
        return protection(ledger.daily(since=since), context.now(), guard.daily_severe_cap,
                          masking=guard.lexicon is not None, escalations=outbox.counts())


def collect_throughput(context: MonitoringContext, days: int = 7) -> Throughput:
    return throughput(context.journal.annotations(context.project_id), context.now(), days)


# ------------------------------------------------------------------------------------------ routes
router = APIRouter(prefix="/v1/monitoring", tags=["monitoring"])


@router.get("/overview", response_model=Overview)
def get_overview(context: ContextDep) -> Overview:
    """Labels today and this week, backlog, the stopping signal, the champion, open alerts."""
    return collect_overview(context)


@router.get("/model", response_model=ModelSection,
            responses={503: {"description": "the model registry (MLflow) cannot be read"}})
def get_model(context: ContextDep) -> ModelSection:
    """Every version with its metrics on the frozen evaluation set, and every gate decision."""
    try:
        return collect_model(context)
    except Exception as e:
        raise HTTPException(503, f"the model registry could not be read: {type(e).__name__}: {e}") from None


@router.get("/protection", response_model=Protection)
def get_protection(context: ContextDep) -> Protection:
    """Per reviewer: severe items seen and reveals today and over 7 days, the daily cap; escalations."""
    return collect_protection(context)


@router.get("/throughput", response_model=Throughput)
def get_throughput(context: ContextDep, days: Annotated[int, Query(ge=1, le=366)] = 7) -> Throughput:
    """Labels per active hour and median time per item, per annotator."""
    return collect_throughput(context, days)


