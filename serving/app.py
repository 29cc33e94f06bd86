"""The Label Studio ML backend: pre-labels from the registry's champion, batched and hot-swapped.

Routes (all behind the credentials, when configured; see :mod:`serving.auth`) live in module-level
routers in :mod:`serving.routes`:

- Label Studio's ML-backend protocol: ``GET /`` and ``GET /health``, ``POST /setup``, ``POST /predict``,
  ``POST /webhook``, ``GET /metrics`` (upstream's ``{}``), ``GET /versions``.
- Operations: ``POST /reload`` (check the champion alias now), ``GET /metrics/prometheus``.
- ``POST /v1/predict`` for scripts: texts in, label and probabilities out.

This module only builds the shared state those routes read from ``app.state`` (their dependencies are
in :mod:`serving.routes`), the middleware and the lifespan; callers add their own routers with
``extra_routers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.slices import SliceStore
from labelloop.taxonomy import get_taxonomy
from serving.auth import AuthMiddleware, BodySizeLimitMiddleware, Credentials, SingleValuedQueryMiddleware
from serving.batching import AdmissionPolicy, ClientDisconnected, Lane, MicroBatcher, Overloaded
from serving.champion import Champion, ModelSource, RegistryModelSource
from serving.db_health import DatabaseHealth
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.protocol import ErrorResponse
from serving.quantize import prepare_for_serving
from serving.routes import BACKEND_ROUTERS, EventHandler, JournalHealth, ProjectConfigs, SetupHandler
from training.registry import LoadedModel

log = logging.getLogger(__name__)

_PROJECT_CONFIGS_KEPT = 256
_FIRST_LOAD_WAIT_SECONDS = 120.0  # start serves once the first champion load ends, or after this long without it
#: a merged model call holds at most this many batch_size batches. Small enough that a call ends soon: the
#: worker picks the next call's jobs between calls, so Label Studio's lane overtakes a flood and work of a
#: client that hung up is dropped only then; merging more buys little once batches are length-sorted.
_MERGE_BATCHES = 8
_QUANTIZE_CHECK_TEXTS = 500  # a faster path must keep the top label on >= 99 % of these (see quantize.py)

__all__ = ["EventHandler", "create_app"]


def create_app(
    settings: Settings,
    *,
    model_source: ModelSource | None = None,
    journal: Journal | None = None,
    on_event: EventHandler | None = None,
    on_setup: SetupHandler | None = None,
    extra_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """Build the backend. ``model_source`` defaults to the MLflow registry named by ``settings``,
    ``journal`` to the annotation journal under ``settings.state_dir``; ``on_event`` is told about every
    webhook payload after it is journaled (the active-learning loop schedules retraining there); ``on_setup``
    hears the project id of every ``/setup`` (the service checks the project's webhook there)."""
    credentials = Credentials(settings)
    source = model_source or RegistryModelSource(settings)
    owns_journal = journal is None
    journal = journal or Journal(settings.database("journal"), get_taxonomy(settings.taxonomy),
                                 policy=settings.review_policy)
    metrics = ServingMetrics()

    def prepare(loaded: LoadedModel) -> LoadedModel:
        """The check texts are only for choosing a faster path: a champion that loaded is served (fp32
        torch) even when they cannot be read, e.g. the registry went down between the load and the check."""
        texts: list[str] = []
        if settings.quantize != "none":
            try:
                texts = source.check_texts(_QUANTIZE_CHECK_TEXTS)
            except Exception as e:
                log.warning("%s: check texts unreadable (%s: %s); serving fp32 torch", loaded.ref.label,
                            type(e).__name__, e)
        return prepare_for_serving(loaded, settings.quantize, texts, cache_dir=settings.cache_dir / "onnx",
                                   device=settings.device, batch_size=settings.batch_size,
                                   call_texts=settings.batch_size * _MERGE_BATCHES)

    champion = Champion(source, prepare=prepare, on_swap=lambda m: metrics.observe_swap(m.ref.label),
                        backoff=(settings.backoff_first_seconds, settings.backoff_max_seconds))
    policy = AdmissionPolicy({Lane.API: settings.max_queued_texts,
                              Lane.LABEL_STUDIO: settings.max_queued_texts_label_studio})
    batcher = MicroBatcher(settings.batch_size, settings.batch_size * _MERGE_BATCHES, metrics, policy)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        app.state.loop = asyncio.get_running_loop()  # for threads (retrain jobs) that trigger a refresh
        # The first load runs in the background task that then polls and retries: an MLflow that is down
        # or hangs must not keep the backend from starting (it serves without a champion and says why).
        poller = champion.start(settings.poll_seconds)
        await champion.wait_first_attempt(_FIRST_LOAD_WAIT_SECONDS)
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await batcher.aclose()
            app.state.slices.close()
            if owns_journal:
                journal.close()

    app = FastAPI(
        title="labelloop ML backend",
        summary="Label Studio ML backend serving the MLflow champion text classifier",
        lifespan=lifespan,
        responses={400: {"model": ErrorResponse, "description": "the body cannot be parsed (not UTF-8 JSON)"},
                   401: {"model": ErrorResponse, "description": "missing or wrong credentials"},
                   413: {"model": ErrorResponse, "description": "body larger than max_request_bytes"}},
    )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(SingleValuedQueryMiddleware)
    app.add_middleware(AuthMiddleware, credentials=credentials)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.settings = settings
    app.state.champion = champion
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.journal = journal
    app.state.model_source = source
    app.state.project_configs = ProjectConfigs(_PROJECT_CONFIGS_KEPT)
    app.state.on_event = on_event
    app.state.on_setup = on_setup
    #: what /health reports on, by name; the service adds label_studio (reconciliation)
    app.state.health_reporters = {"registry": champion, "journal": JournalHealth(journal)}
    if settings.database_url:  # the state replicas share: /health says whether this replica reaches it
        app.state.health_reporters["database"] = DatabaseHealth(settings.database_url)
    app.state.slices = SliceStore(settings.database("slices"))  # which tasks are blind audit items

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 that names each problem without echoing the (possibly large, possibly sensitive) input."""
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse(status_code=422, content=jsonable_encoder({"detail": errors}))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        """503 at once, before any model work: a client told to come back in ``Retry-After`` seconds can
        go elsewhere or wait, instead of timing out on a queue that only grows."""
        route = getattr(request.scope.get("route"), "path", None) or "unmatched"
        metrics.observe_refusal(route)
        return JSONResponse(status_code=503, content={"detail": str(exc)},
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_: Request, exc: ClientDisconnected) -> JSONResponse:
        """Nobody reads this answer; 499 (nginx's "client closed request") keeps such requests apart from
        real errors in the request metrics."""
        return JSONResponse(status_code=499, content={"detail": str(exc)})

    for router in (*BACKEND_ROUTERS, *extra_routers):
        app.include_router(router)
    return app
