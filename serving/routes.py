"""The backend's routes, as module-level routers whose handlers get shared state through dependencies.

:func:`serving.app.create_app` builds the state once (champion, batcher, metrics, journal, the
per-project config cache, settings) and keeps it on ``app.state``; the dependencies below read it from
there. Keeping handlers out of ``create_app``'s closure lets downstream packages (``active_learning``,
``monitoring``) add routers the same way and reuse these dependencies instead of re-plumbing state.

- :data:`label_studio_router`: Label Studio's ML-backend protocol (``/``, ``/health``, ``/setup``,
  ``/predict``, ``/webhook``, ``/metrics``, ``/versions``).
- :data:`api_router`: ``POST /v1/predict`` for scripts.
- :data:`operations_router`: ``POST /reload``, ``GET /metrics/prometheus``.

Text limits: Label Studio ``/predict`` *truncates* each text to ``max_text_chars`` (the model reads only
the first ``max_length`` tokens anyway, and a pre-label for a long task is more useful than an error);
``/v1/predict`` *refuses* over-long or blank texts with 422, because a script should learn that its
input was not classified as sent.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Protocol

import anyio
import sqlalchemy.exc
from fastapi import APIRouter, Body, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from labelloop.config import Settings
from labelloop.journal import Journal, JournalUnavailable, RecordResult
from labelloop.slices import SliceStore
from labelloop.taxonomy import Taxonomy
from serving.batching import Lane, MicroBatcher
from serving.champion import Champion, ModelSource
from serving.metrics import CONTENT_TYPE, ServingMetrics
from serving.protocol import (
    ChoicesRegion,
    ChoicesValue,
    ConfigBinding,
    DependencyHealth,
    ErrorResponse,
    HealthResponse,
    LabelMismatchError,
    PredictRequest,
    PredictResponse,
    ReloadResponse,
    SetupRequest,
    SetupResponse,
    TaskPrediction,
    V1MultiPrediction,
    V1Prediction,
    V1PredictRequest,
    V1PredictResponse,
    VersionsResponse,
    WebhookResponse,
    WebhookResult,
    bind_config,
    bind_multi_label,
)
from serving.quantize import precision
from training.registry import LoadedModel

log = logging.getLogger("serving.app")

EventHandler = Callable[[dict, RecordResult], None]
#: told the project of every ``/setup``: the composition checks Label Studio's side of the connection there
SetupHandler = Callable[[str | None], None]
_MISMATCH: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "the label config is unusable: not XML, no <Choices> bound to a "
                                                 "<Text>, choices that do not match the model's labels, or no "
                                                 "config known for this project (none sent, no /setup before)"}}
_RETRY_AFTER = {"Retry-After": {"description": "seconds until the queued work is done at the model's current "
                                "rate (admission refusals only)", "schema": {"type": "integer", "minimum": 1}}}
_OVERLOADED = "the model's queue for this route is full (max_queued_texts): retry after Retry-After seconds"
_NO_CHAMPION = ("the registry's champion could not be loaded (MLflow unreachable, or the load failed; `/health` "
                "says why and when it is retried)")


async def _until_disconnected(http: Request) -> None:
    """Returns when the client hangs up. The body has been read by then, so the next ASGI message is the
    disconnect (or the end of the response, when this watcher is cancelled anyway)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class ProjectConfigs:
    """Label configs that ``/setup`` announced, per project id, so a ``/predict`` without one can still
    bind. Bounded (least recently announced dropped first): project ids come from the caller."""

    def __init__(self, kept: int = 256):
        self._kept = kept
        self._configs: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def project_id(project: str | int | None) -> str | None:
        return str(project).split(".", 1)[0] if project not in (None, "") else None

    def remember(self, project: str | int | None, label_config: str) -> None:
        pid = self.project_id(project)
        if pid is None:
            return
        self._configs[pid] = label_config
        self._configs.move_to_end(pid)
        while len(self._configs) > self._kept:
            self._configs.popitem(last=False)

    def get(self, project: str | int | None) -> str | None:
        return self._configs.get(self.project_id(project) or "")


# ------------------------------------------------------------------------------------------ dependencies
def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_champion(request: Request) -> Champion:
    return request.app.state.champion


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


def get_metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


def get_journal(request: Request) -> Journal:
    return request.app.state.journal


def get_model_source(request: Request) -> ModelSource:
    return request.app.state.model_source


def get_project_configs(request: Request) -> ProjectConfigs:
    return request.app.state.project_configs


def get_event_handler(request: Request) -> EventHandler | None:
    return request.app.state.on_event


def get_slices(request: Request) -> SliceStore:
    return request.app.state.slices


def get_setup_handler(request: Request) -> SetupHandler | None:
    return getattr(request.app.state, "on_setup", None)


class HealthReporter(Protocol):
    """A dependency ``/health`` reports on (the registry, the journal, Label Studio's reconciliation)."""

    def health(self) -> DependencyHealth: ...


class JournalHealth:
    """The journal as a dependency: unavailable while it cannot be written (webhooks get 503 meanwhile)."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def health(self) -> DependencyHealth:
        problem = self.journal.write_problem
        if problem is None:
            return DependencyHealth(status="ok")
        return DependencyHealth(status="unavailable", detail=problem, since=self.journal.write_problem_since)


def get_health_reporters(request: Request) -> dict[str, HealthReporter]:
    """``app.state.health_reporters``: the app registers the registry and the journal; a composition adds more."""
    return request.app.state.health_reporters


def get_served_taxonomy(request: Request) -> Taxonomy:
    """The policy this backend serves: the journal's, which the app builds from ``settings.taxonomy``."""
    return request.app.state.journal.taxonomy


SettingsDep = Annotated[Settings, Depends(get_settings)]
ChampionDep = Annotated[Champion, Depends(get_champion)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
MetricsDep = Annotated[ServingMetrics, Depends(get_metrics)]
JournalDep = Annotated[Journal, Depends(get_journal)]
ModelSourceDep = Annotated[ModelSource, Depends(get_model_source)]
ProjectConfigsDep = Annotated[ProjectConfigs, Depends(get_project_configs)]
EventHandlerDep = Annotated[EventHandler | None, Depends(get_event_handler)]
SlicesDep = Annotated[SliceStore, Depends(get_slices)]
SetupHandlerDep = Annotated[SetupHandler | None, Depends(get_setup_handler)]
TaxonomyDep = Annotated[Taxonomy, Depends(get_served_taxonomy)]
HealthReportersDep = Annotated[dict[str, HealthReporter], Depends(get_health_reporters)]


def _bind(label_config: str, model: LoadedModel, taxonomy: Taxonomy) -> ConfigBinding | None:
    try:
        return bind_config(label_config, tuple(model.classifier.labels), model.classifier.multi_label,
                           taxonomy.none_label)
    except LabelMismatchError as e:
        raise HTTPException(422, f"{model.ref.label}: {e}") from None


label_studio_router = APIRouter(tags=["label-studio"])
api_router = APIRouter(tags=["api"])
operations_router = APIRouter(tags=["operations"])


# ------------------------------------------------------------------------------------------ health
def health(champion: ChampionDep, reporters: HealthReportersDep) -> HealthResponse:
    """Always 200 with ``status: UP`` while the process serves (Label Studio reads that); what is degraded
    is in ``champion_error`` and ``dependencies``."""
    model = champion.current  # read once: a swap meanwhile must not mix two versions in one answer
    detail = None if model else (champion.last_error or "no champion in the registry yet: predictions are empty")
    error = champion.last_error
    return HealthResponse(model_class=type(model.classifier).__name__ if model else "none",
                          model_version=model.ref.label if model else None, model_loaded=model is not None,
                          precision=precision(model.classifier) if model else None, detail=detail,
                          serving_path=model.serving if model else None,
                          champion_error=error, retry_in_s=champion.retry_in() if error else None,
                          dependencies={name: reporter.health() for name, reporter in reporters.items()})


label_studio_router.get("/", response_model=HealthResponse)(health)
label_studio_router.get("/health", response_model=HealthResponse)(health)


# ------------------------------------------------------------------------------------------ setup
@label_studio_router.post("/setup", response_model=SetupResponse, responses=_MISMATCH)
async def setup(request: SetupRequest, champion: ChampionDep, configs: ProjectConfigsDep,
                on_setup: SetupHandlerDep, taxonomy: TaxonomyDep) -> SetupResponse:
    """Label Studio calls this before every predict/train and adopts the returned ``model_version``,
    so a moved champion alias makes it re-predict. A config whose choices contradict the model's
    labels is refused here, which Label Studio shows as the backend's error. ``on_setup`` hears of the
    call: connecting in Label Studio's UI ends with a ``/setup``, which is when a webhook without
    credentials has just been made (the handler must not block: Label Studio waits for this answer)."""
    if on_setup is not None:
        on_setup(ProjectConfigs.project_id(request.project))
    model = champion.current
    if request.label_config:
        configs.remember(request.project, request.label_config)
        if model is not None:
            _bind(request.label_config, model, taxonomy)
    return SetupResponse(model_version=champion.label)


# ------------------------------------------------------------------------------------------ predict
@label_studio_router.post("/predict", response_model=PredictResponse, responses={
    **_MISMATCH, 503: {"model": ErrorResponse, "description": f"{_NO_CHAMPION}, {_OVERLOADED}, or the slice "
                                                              "store (which tasks are blind) is unreachable",
                       "headers": _RETRY_AFTER}})
async def predict(request: PredictRequest, http: Request, settings: SettingsDep, champion: ChampionDep,
                  batcher: BatcherDep, configs: ProjectConfigsDep, slices: SlicesDep,
                  taxonomy: TaxonomyDep) -> PredictResponse:
    """One prediction per task, in order. Tasks without text get an empty prediction (score 0);
    no champion yet, or a config without ``<Choices>`` on a ``<Text>``, gives ``results: []``; a champion
    that cannot be loaded (MLflow unreachable, a failed load) gives 503 with the reason. A blind audit
    task (``labelloop.slices``) gets its score but no choice: opening it must not show a suggestion; while
    the slice store cannot be read, 503 rather than a guess (Label Studio stores nothing and asks again).
    A multi-label model pre-selects its whole label set in a ``choice="multiple"`` config."""
    model = champion.current  # read once: the whole request uses this model
    tasks = request.task_list()
    if model is None and champion.last_error is not None and tasks:
        raise HTTPException(503, f"no champion is served: {champion.last_error}")
    if model is None or not tasks:
        return PredictResponse(results=[])
    label_config = request.label_config or configs.get(request.project)
    if not label_config:
        raise HTTPException(422, "no label_config in the request, and /setup sent none for this project")
    binding = _bind(label_config, model, taxonomy)
    if binding is None:
        return PredictResponse(results=[])
    positions, texts = [], []
    for i, task in enumerate(tasks):
        text = task.data.get(binding.value_field)
        if isinstance(text, str) and text.strip():
            positions.append(i)
            texts.append(text[: settings.max_text_chars])
    proba = await batcher.predict(model, texts, Lane.LABEL_STUDIO, disconnected=lambda: _until_disconnected(http))
    decisions = binding.decisions(proba, model.classifier)
    task_ids = [_task_id(task.id) for task in tasks]
    try:
        blind = slices.of_kind("audit", (t for t in task_ids if t is not None))
    except sqlalchemy.exc.OperationalError as e:  # the shared database is down: a guess could unblind an audit
        raise HTTPException(503, "cannot tell which tasks are blind audit items: the slice store is "
                                 f"unreachable ({type(e.orig or e).__name__})") from None
    results = [TaskPrediction(model_version=model.ref.label, score=0.0, result=[]) for _ in tasks]
    for decision, i in zip(decisions, positions, strict=True):
        region = ChoicesRegion(from_name=binding.from_name, to_name=binding.to_name,
                               value=ChoicesValue(choices=list(decision.choices)))
        shown = decision.choices and task_ids[i] not in blind
        results[i] = TaskPrediction(model_version=model.ref.label, score=decision.score,
                                    result=[region] if shown else [])
    return PredictResponse(results=results)


def _task_id(value: int | str | None) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else None


@api_router.post("/v1/predict", response_model=V1PredictResponse,
                 responses={422: {"model": ErrorResponse, "description": "empty list, blank or over-long text"},
                            503: {"model": ErrorResponse, "description": f"no champion model yet, or {_OVERLOADED}",
                                  "headers": _RETRY_AFTER}})
async def predict_v1(request: V1PredictRequest, http: Request, settings: SettingsDep, champion: ChampionDep,
                     batcher: BatcherDep) -> V1PredictResponse:
    """Classify texts with the champion: label, its probability, and every label's probability; for a
    multi-label champion the chosen label set (per-label thresholds), its score and each label's probability."""
    errors = []
    for i, text in enumerate(request.texts):
        if not text.strip():
            errors.append({"type": "string_blank", "loc": ("body", "texts", i), "msg": "text is empty or blank"})
        elif len(text) > settings.max_text_chars:
            errors.append({"type": "string_too_long", "loc": ("body", "texts", i),
                           "msg": f"text has {len(text)} characters; the limit is "
                                  f"{settings.max_text_chars} (max_text_chars)"})
    if errors:
        raise RequestValidationError(errors)
    model = champion.current
    if model is None:
        raise HTTPException(503, champion.last_error or "no champion model in the registry yet")
    proba = await batcher.predict(model, request.texts, Lane.API, disconnected=lambda: _until_disconnected(http))
    labels = model.classifier.labels
    if model.classifier.multi_label:
        decisions = bind_multi_label(labels).decisions(proba, model.classifier)
        return V1PredictResponse(model_version=model.ref.label, multi_label=True, predictions=[
            V1MultiPrediction(labels=list(d.choices), score=d.score,
                              probabilities={label: float(p) for label, p in zip(labels, row, strict=True)})
            for d, row in zip(decisions, proba, strict=True)])
    predictions = [
        V1Prediction(label=labels[int(row.argmax())], score=float(row.max()),
                     probabilities={label: float(p) for label, p in zip(labels, row, strict=True)})
        for row in proba
    ]
    return V1PredictResponse(model_version=model.ref.label, predictions=predictions)


# ------------------------------------------------------------------------------------------ webhook
@label_studio_router.post("/webhook", response_model=WebhookResponse, status_code=201, responses={
    503: {"model": ErrorResponse, "description": "the journal cannot be written (read-only, disk full): the event "
          "was not recorded; the reconciler pulls it from Label Studio once the journal is writable again"}})
async def webhook(payload: Annotated[dict[str, Any], Body()], journal: JournalDep, metrics: MetricsDep,
                  on_event: EventHandlerDep) -> WebhookResponse:
    """Journal the event (durably, before answering), hand it to ``on_event``, answer at once.
    Training never runs here: Label Studio waits at most one second for a webhook. A journal that cannot
    be written gets 503, never 201: no acknowledgement without a durable write."""
    try:
        result: RecordResult = await anyio.to_thread.run_sync(journal.record, payload)
    except JournalUnavailable as e:
        metrics.webhook_events.labels("unavailable").inc()
        raise HTTPException(503, f"{e}; the event was not recorded (the reconciler pulls it from Label Studio "
                                 "once the journal can be written)") from None
    metrics.webhook_events.labels(result.status).inc()
    if on_event is not None:
        try:
            await anyio.to_thread.run_sync(on_event, payload, result)
        except Exception as e:  # the event is journaled; a scheduling failure must not fail the sender
            log.error("on_event failed for journal event %s: %s", result.event_id, type(e).__name__)
    return WebhookResponse(result=WebhookResult(status=result.status, reason=result.reason,
                                                event_id=result.event_id))


# ------------------------------------------------------------------------------------------ operations
@label_studio_router.get("/metrics")
async def metrics_upstream() -> dict[str, Any]:
    """What the upstream ML backend answers here; Prometheus metrics are at /metrics/prometheus."""
    return {}


@operations_router.get("/metrics/prometheus", response_class=Response,
                       responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
async def metrics_prometheus(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)


@label_studio_router.get("/versions", response_model=VersionsResponse,
                         responses={503: {"model": ErrorResponse, "description": "the registry cannot be read"}})
async def versions(source: ModelSourceDep, champion: ChampionDep) -> VersionsResponse:
    def read() -> tuple[list[int], dict[str, int]]:
        return source.versions(), source.aliases()

    try:
        numbers, aliases = await anyio.to_thread.run_sync(read)
    except Exception as e:
        raise HTTPException(503, f"could not read the registry: {type(e).__name__}: {e}") from None
    name = source.model_name
    return VersionsResponse(model_version=champion.label, registered_model=name,
                            versions=[f"{name}:v{v}" for v in numbers],
                            aliases={a: f"{name}:v{v}" for a, v in sorted(aliases.items())})


@operations_router.post("/reload", response_model=ReloadResponse,
                        responses={503: {"model": ErrorResponse, "description": "registry unreadable or load failed"}})
async def reload(champion: ChampionDep) -> ReloadResponse:
    """Check the champion alias now (instead of waiting for the poll) and swap if it moved."""
    result = await champion.refresh()
    if result.failed:
        raise HTTPException(503, result.detail)
    return ReloadResponse(swapped=result.swapped, previous=result.previous, model_version=result.current,
                          detail=result.detail)


#: every router of the backend itself, in the order their paths appear in the OpenAPI schema
BACKEND_ROUTERS = (label_studio_router, api_router, operations_router)
