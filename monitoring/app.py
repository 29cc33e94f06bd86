"""Every monitoring router, ready to mount on the backend: the dashboard, ``/v1/monitoring`` (overview,
model, throughput, drift, alerts) and ``/v1/quality``.

The composition points (``labelloop serve``, the demo) pass :func:`monitoring_routers` to the service's
``extra_routers``, so the routes sit behind the backend's authentication, and call :func:`instrument`
on the built app so that Prometheus scrapes the alert gauges next to the serving metrics. Nothing
upstream imports this module.
"""

from __future__ import annotations

import logging
import threading

from fastapi import APIRouter, Depends, FastAPI, Request

from labelloop.alerts_store import AlertStore
from monitoring import dashboard, drift_api, overview, quality_api
from monitoring.alerts import register_alert_metrics
from monitoring.drift import run_drift_evaluation
from monitoring.overview import MonitoringContext

log = logging.getLogger("labelloop.monitoring")


def monitoring_routers(mlflow_url: str | None = None) -> list[APIRouter]:
    """The routers, bound to a :class:`MonitoringContext` over the app's own settings and journal.

    ``mlflow_url``: the MLflow UI that the model section links runs to (by default the tracking server
    when it is an ``http(s)`` one; a SQLite store has no UI unless someone started one)."""

    def bind(request: Request) -> None:
        state = request.app.state
        if getattr(state, "monitoring", None) is None:
            state.monitoring = MonitoringContext(state.settings, state.journal, mlflow_url=mlflow_url,
                                                 slices=getattr(state, "slices", None))

    router = APIRouter(dependencies=[Depends(bind)])
    for child in (dashboard.router, overview.router, drift_api.router, quality_api.router):
        router.include_router(child)
    return [router]


def instrument(app: FastAPI) -> AlertStore:
    """Export the open alerts as Prometheus gauges on the app's ``/metrics/prometheus``. The store stays
    open for the app's life (the collector reads it at each scrape); the caller closes it at shutdown."""
    store = AlertStore(app.state.settings.database("alerts"))
    register_alert_metrics(app.state.metrics.registry, store)
    return store


class DriftSchedule:
    """Evaluates drift every ``drift_every_seconds`` in a background thread of ``labelloop serve``.

    Alerts exist to reach people who are not looking, so they cannot wait for someone to run
    ``labelloop drift``. A failed evaluation (no champion yet, no pool, MLflow down) is logged and
    retried at the next period; it never stops serving."""

    def __init__(self, settings):
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> bool:
        try:
            run_drift_evaluation(self.settings)
        except Exception as e:  # noqa: BLE001 - logged and retried next period: monitoring must not stop serving
            log.warning("drift evaluation failed, retrying in %.0f s: %s", self.settings.drift_every_seconds, e)
            return False
        return True

    def start(self) -> None:
        if self.settings.drift_every_seconds <= 0 or self.settings.ls_project_id is None:
            return
        self._thread = threading.Thread(target=self._forever, name="labelloop-drift", daemon=True)
        self._thread.start()

    def _forever(self) -> None:
        while not self._stop.wait(self.settings.drift_every_seconds):
            self.run_once()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
