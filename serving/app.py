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
from serving.auth import AuthMiddleware, BodySizeLimitMiddleware, Credentials
from serving.batching import MicroBatcher
from serving.champion import Champion, ModelSource, RegistryModelSource
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.protocol import ErrorResponse
from serving.quantize import prepare_for_serving
from serving.routes import BACKEND_ROUTERS, EventHandler, ProjectConfigs, SetupHandler
from training.registry import LoadedModel

_PROJECT_CONFIGS_KEPT = 256
_MERGE_BATCHES = 64  # a merged model call holds at most this many batch_size batches
_QUANTIZE_CHECK_TEXTS = 500  # an int8 copy must keep the top label on >= 99 % of these (see quantize.py)

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
    journal = journal or Journal(settings.journal_path, get_taxonomy(settings.taxonomy))
    metrics = ServingMetrics()

    def prepare(loaded: LoadedModel) -> LoadedModel:
        texts = source.check_texts(_QUANTIZE_CHECK_TEXTS) if settings.quantize != "none" else []
        return prepare_for_serving(loaded, settings.quantize, texts)

    champion = Champion(source, prepare=prepare, on_swap=lambda m: metrics.observe_swap(m.ref.label))
    batcher = MicroBatcher(settings.batch_size, settings.batch_size * _MERGE_BATCHES, metrics.observe_batch)

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
            app.state.slices.close()
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
    app.state.settings = settings
    app.state.champion = champion
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.journal = journal
    app.state.model_source = source
    app.state.project_configs = ProjectConfigs(_PROJECT_CONFIGS_KEPT)
    app.state.on_event = on_event
    app.state.on_setup = on_setup
    app.state.slices = SliceStore(settings.slices_path)  # which tasks are blind audit items

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        """422 that names each problem without echoing the (possibly large, possibly sensitive) input."""
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse(status_code=422, content=jsonable_encoder({"detail": errors}))

    for router in (*BACKEND_ROUTERS, *extra_routers):
        app.include_router(router)
    return app
