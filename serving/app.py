"""The Label Studio ML backend: pre-labels from the registry's champion, batched and hot-swapped.

Routes (all behind the credentials, when configured; see :mod:`serving.auth`):

- Label Studio's ML-backend protocol: ``GET /`` and ``GET /health``, ``POST /setup``, ``POST /predict``,
  ``POST /webhook``, ``GET /metrics`` (upstream's ``{}``), ``GET /versions``.
- Operations: ``POST /reload`` (check the champion alias now), ``GET /metrics/prometheus``.
- ``POST /v1/predict`` for scripts: texts in, label and probabilities out.

Text limits: Label Studio ``/predict`` *truncates* each text to ``max_text_chars`` (the model reads only
the first ``max_length`` tokens anyway, and a pre-label for a long task is more useful than an error);
``/v1/predict`` *refuses* over-long or blank texts with 422, because a script should learn that its
input was not classified as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from labelloop.config import Settings
from labelloop.journal import Journal, RecordResult
from labelloop.taxonomy import get_taxonomy
from serving.auth import AuthMiddleware, BodySizeLimitMiddleware, Credentials
from serving.batching import MicroBatcher
from serving.champion import Champion, ModelSource, RegistryModelSource
from serving.metrics import CONTENT_TYPE, MetricsMiddleware, ServingMetrics
from serving.protocol import (
    ChoicesRegion,
    ChoicesValue,
    ConfigBinding,
    ErrorResponse,
    HealthResponse,
    LabelMismatchError,
    PredictRequest,
    PredictResponse,
    ReloadResponse,
    SetupRequest,
    SetupResponse,
    TaskPrediction,
    V1Prediction,
    V1PredictRequest,
    V1PredictResponse,
    VersionsResponse,
    WebhookResponse,
    WebhookResult,
    bind_config,
)
from serving.quantize import precision, prepare_for_serving
from training.registry import LoadedModel

log = logging.getLogger(__name__)

EventHandler = Callable[[dict, RecordResult], None]
_PROJECT_CONFIGS_KEPT = 256
_MERGE_BATCHES = 64  # a merged model call holds at most this many batch_size batches
_QUANTIZE_CHECK_TEXTS = 500  # an int8 copy must keep the top label on >= 99 % of these (see quantize.py)
_MISMATCH: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "the config's choices do not match the model's labels"}}


def _project_id(project: str | int | None) -> str | None:
    return str(project).split(".", 1)[0] if project not in (None, "") else None


def _bind(label_config: str, model: LoadedModel) -> ConfigBinding | None:
    try:
        return bind_config(label_config, tuple(model.classifier.labels))
    except LabelMismatchError as e:
        raise HTTPException(422, f"{model.ref.label}: {e}") from None


def create_app(
    settings: Settings,
    *,
    model_source: ModelSource | None = None,
    journal: Journal | None = None,
    on_event: EventHandler | None = None,
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """Build the backend. ``model_source`` defaults to the MLflow registry named by ``settings``,
    ``journal`` to the annotation journal under ``settings.state_dir``; ``on_event`` is told about every
    webhook payload after it is journaled (the active-learning loop schedules retraining there)."""
    credentials = Credentials(settings)
    source = model_source or RegistryModelSource(settings)
    owns_journal = journal is None
    journal = journal or Journal(settings.journal_path, get_taxonomy(settings.taxonomy))
    metrics = ServingMetrics()

    def prepare(loaded: LoadedModel) -> LoadedModel:
        texts = source.check_texts(_QUANTIZE_CHECK_TEXTS) if settings.quantize != "none" else []
        return prepare_for_serving(loaded, settings.quantize, texts)

    champion = Champion(source, prepare=prepare, on_swap=lambda m: metrics.observe_swap(m.ref.label))
    batcher = MicroBatcher(settings.batch_size, settings.batch_size * _MERGE_BATCHES, metrics.observe_batch)
    project_configs: OrderedDict[str, str] = OrderedDict()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()  # for threads (retrain jobs) that trigger a refresh
        await champion.refresh()
        poller = None
        if settings.poll_seconds > 0:
            poller = asyncio.create_task(champion.poll_forever(settings.poll_seconds))
        try:
            yield
        finally:
            if poller:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            await batcher.aclose()
            if owns_journal:
                journal.close()

    app = FastAPI(
        title="labelloop ML backend",
        summary="Label Studio ML backend serving the MLflow champion text classifier",
        lifespan=lifespan,
        responses={401: {"model": ErrorResponse, "description": "missing or wrong credentials"},
                   413: {"model": ErrorResponse, "description": "body larger than max_request_bytes"}},
    )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AuthMiddleware, credentials=credentials)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.champion = champion
    app.state.metrics = metrics
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 that names each problem without echoing the (possibly large, possibly sensitive) input."""
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse(status_code=422, content=jsonable_encoder({"detail": errors}))

    def remember_config(project: str | int | None, label_config: str) -> None:
        pid = _project_id(project)
        if pid is None:
            return
        project_configs[pid] = label_config
        project_configs.move_to_end(pid)
        while len(project_configs) > _PROJECT_CONFIGS_KEPT:
            project_configs.popitem(last=False)

    # -------------------------------------------------------------------------------- health
    def health() -> HealthResponse:
        model = champion.current  # read once: a swap meanwhile must not mix two versions in one answer
        detail = None if model else (
            champion.last_error or "no champion in the registry yet: predictions are empty")
        return HealthResponse(model_class=type(model.classifier).__name__ if model else "none",
                              model_version=model.ref.label if model else None, model_loaded=model is not None,
                              precision=precision(model.classifier) if model else None, detail=detail)

    app.get("/", response_model=HealthResponse, tags=["label-studio"])(health)
    app.get("/health", response_model=HealthResponse, tags=["label-studio"])(health)

    # -------------------------------------------------------------------------------- setup
    @app.post("/setup", response_model=SetupResponse, tags=["label-studio"], responses=_MISMATCH)
    async def setup(request: SetupRequest) -> SetupResponse:
        """Label Studio calls this before every predict/train and adopts the returned ``model_version``,
        so a moved champion alias makes it re-predict. A config whose choices contradict the model's
        labels is refused here, which Label Studio shows as the backend's error."""
        model = champion.current
        if request.label_config:
            remember_config(request.project, request.label_config)
            if model is not None:
                _bind(request.label_config, model)
        return SetupResponse(model_version=champion.label)

    # -------------------------------------------------------------------------------- predict
    @app.post("/predict", response_model=PredictResponse, tags=["label-studio"], responses=_MISMATCH)
    async def predict(request: PredictRequest) -> PredictResponse:
        """One prediction per task, in order. Tasks without text get an empty prediction (score 0);
        no champion, or a config without ``<Choices>`` on a ``<Text>``, gives ``results: []``."""
        model = champion.current  # read once: the whole request uses this model
        tasks = request.task_list()
        if model is None or not tasks:
            return PredictResponse(results=[])
        label_config = request.label_config or project_configs.get(_project_id(request.project) or "")
        if not label_config:
            raise HTTPException(422, "no label_config in the request, and /setup sent none for this project")
        binding = _bind(label_config, model)
        if binding is None:
            return PredictResponse(results=[])
        positions, texts = [], []
        for i, task in enumerate(tasks):
            text = task.data.get(binding.value_field)
            if isinstance(text, str) and text.strip():
                positions.append(i)
                texts.append(text[: settings.max_text_chars])
        proba = binding.restrict(await batcher.predict(model, texts))
        results = [TaskPrediction(model_version=model.ref.label, score=0.0, result=[]) for _ in tasks]
        for row, i in zip(proba, positions, strict=True):
            best = int(row.argmax())
            region = ChoicesRegion(from_name=binding.from_name, to_name=binding.to_name,
                                   value=ChoicesValue(choices=[binding.labels[best]]))
            results[i] = TaskPrediction(model_version=model.ref.label, score=float(row[best]),
                                        result=[region])
        return PredictResponse(results=results)

    @app.post("/v1/predict", response_model=V1PredictResponse, tags=["api"],
              responses={422: {"model": ErrorResponse, "description": "empty list, blank or over-long text"},
                         503: {"model": ErrorResponse, "description": "no champion model yet"}})
    async def predict_v1(request: V1PredictRequest) -> V1PredictResponse:
        """Classify texts with the champion: label, its probability, and every label's probability."""
        errors = []
        for i, text in enumerate(request.texts):
            if not text.strip():
                errors.append({"type": "string_blank", "loc": ("body", "texts", i),
                               "msg": "text is empty or blank"})
            elif len(text) > settings.max_text_chars:
                errors.append({"type": "string_too_long", "loc": ("body", "texts", i),
                               "msg": f"text has {len(text)} characters; the limit is "
                                      f"{settings.max_text_chars} (max_text_chars)"})
        if errors:
            raise RequestValidationError(errors)
        model = champion.current
        if model is None:
            raise HTTPException(503, champion.last_error or "no champion model in the registry yet")
        proba = await batcher.predict(model, request.texts)
        labels = model.classifier.labels
        predictions = [
            V1Prediction(label=labels[int(row.argmax())], score=float(row.max()),
                         probabilities={label: float(p) for label, p in zip(labels, row, strict=True)})
            for row in proba
        ]
        return V1PredictResponse(model_version=model.ref.label, predictions=predictions)

    # -------------------------------------------------------------------------------- webhook
    @app.post("/webhook", response_model=WebhookResponse, status_code=201, tags=["label-studio"])
    async def webhook(payload: Annotated[dict[str, Any], Body()]) -> WebhookResponse:
        """Journal the event (durably, before answering), hand it to ``on_event``, answer at once.
        Training never runs here: Label Studio waits at most one second for a webhook."""
        result: RecordResult = await anyio.to_thread.run_sync(journal.record, payload)
        metrics.webhook_events.labels(result.status).inc()
        if on_event is not None:
            try:
                await anyio.to_thread.run_sync(on_event, payload, result)
            except Exception as e:  # the event is journaled; a scheduling failure must not fail the sender
                log.error("on_event failed for journal event %s: %s", result.event_id, type(e).__name__)
        return WebhookResponse(result=WebhookResult(status=result.status, reason=result.reason,
                                                    event_id=result.event_id))

    # -------------------------------------------------------------------------------- operations
    @app.get("/metrics", tags=["label-studio"])
    async def metrics_upstream() -> dict[str, Any]:
        """What the upstream ML backend answers here; Prometheus metrics are at /metrics/prometheus."""
        return {}

    @app.get("/metrics/prometheus", response_class=Response, tags=["operations"],
             responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}})
    async def metrics_prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/versions", response_model=VersionsResponse, tags=["label-studio"],
             responses={503: {"model": ErrorResponse, "description": "the registry cannot be read"}})
    async def versions() -> VersionsResponse:
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

    @app.post("/reload", response_model=ReloadResponse, tags=["operations"],
              responses={503: {"model": ErrorResponse, "description": "registry unreadable or load failed"}})
    async def reload() -> ReloadResponse:
        """Check the champion alias now (instead of waiting for the poll) and swap if it moved."""
        result = await champion.refresh()
        if result.failed:
            raise HTTPException(503, result.detail)
        return ReloadResponse(swapped=result.swapped, previous=result.previous, model_version=result.current,
                              detail=result.detail)

    for router in extra_routers:
        app.include_router(router)
    return app

