"""Prometheus metrics of one serving app, in a registry of its own (several apps in one test process
must not share counters). Exposed as Prometheus text at ``GET /metrics/prometheus``; ``GET /metrics``
keeps the upstream ML backend's answer (``{}``) because Label Studio may call it."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("labelloop_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("labelloop_http_request_seconds", "HTTP request latency by route template",
                                 ["method", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("labelloop_inference_batch_texts",
                                    "texts per model call (merged requests)", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.inference_seconds = Histogram("labelloop_inference_seconds", "seconds per model call",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        self.texts = Counter("labelloop_texts_predicted", "texts run through the model", registry=r)
        self.model_info = Gauge("labelloop_model_info", "1 for the model version being served",
                                ["model_version"], registry=r)
        self.model_loaded = Gauge("labelloop_model_loaded", "1 when a champion is loaded", registry=r)
        self.swaps = Counter("labelloop_model_swaps", "champion swaps since start (first load included)",
                             registry=r)
        self.webhook_events = Counter("labelloop_webhook_events", "webhook payloads by journal outcome",
                                      ["status"], registry=r)
        self.queue_texts = Gauge("labelloop_model_queue_texts", "texts admitted and not yet answered (waiting "
                                 "or in the running model call), by admission lane", ["lane"], registry=r)
        self.refusals = Counter("labelloop_admission_refusals", "requests refused with 503 because their lane's "
                                "queue was full, by route template", ["route"], registry=r)
        self.dropped = Counter("labelloop_admission_dropped", "requests dropped before reaching the model "
                               "because the client disconnected, by admission lane", ["lane"], registry=r)

    def observe_batch(self, n_texts: int, seconds: float) -> None:
        self.batch_size.observe(n_texts)
        self.inference_seconds.observe(seconds)
        self.texts.inc(n_texts)

    def observe_queue(self, lane: str, texts: int) -> None:
        self.queue_texts.labels(lane=lane).set(texts)

    def observe_drop(self, lane: str) -> None:
        self.dropped.labels(lane=lane).inc()

    def observe_refusal(self, route: str) -> None:
        self.refusals.labels(route=route).inc()

    def observe_swap(self, model_version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model_version=model_version).set(1)
        self.model_loaded.set(1)
        self.swaps.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its *route template* (bounded label values), including
    requests rejected by the auth and size-limit middlewares inside it."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
