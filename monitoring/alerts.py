"""Alerts from drift reports: raised and cleared with their times persisted, exported to Prometheus, POSTed.

What trips an alert is pure policy (:func:`alert_decisions`, thresholds from the settings); the store
(``labelloop.alerts_store``) keeps every raised/cleared episode; :func:`deliver` POSTs each transition as
JSON to ``settings.alert_url``. A transition is marked delivered only after the receiver answered 2xx, so
a receiver that is down loses nothing: the next evaluation retries, oldest first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from labelloop.alerts_store import Alert, AlertStore

log = logging.getLogger("labelloop.alerts")


@dataclass(frozen=True)
class AlertDecision:
    """One alert key that an evaluation looked at: raise it (``active``) or clear it."""

    key: str
    kind: Literal["drift", "accuracy"]
    window_kind: str
    window: str
    active: bool
    message: str
    severity: float
    details: dict[str, Any]


def alert_decisions(report: dict[str, Any], accuracy_drop: float) -> list[AlertDecision]:
    """Alerts for each *tested* window of a drift report (untested small windows neither raise nor clear).

    ``drift``: any drift test below the report's p-value threshold. ``accuracy``: the label-free accuracy
    estimate (average calibrated confidence) more than ``accuracy_drop`` below the reference accuracy."""
    kind, decisions = report["window_kind"], []
    reference_accuracy = report.get("reference_accuracy")
    for w in report["windows"]:
        if not w["evaluated"]:
            continue
        window = w["window"]
        failing = {t["name"]: t["p_value"] for t in w["tests"] if t["p_value"] < report["p_value"]}
        decisions.append(AlertDecision(
            f"drift:{kind}:{window}", "drift", kind, window, w["drifted"],
            f"window {window} ({w['n_items']} items) drifts from {report['reference']}: {w['reason']}",
            w["severity"], {"failing_tests": failing, "champion": report["champion"], "n_items": w["n_items"]}))
        estimate = (w.get("estimated_accuracy") or {}).get("average_confidence")
        if reference_accuracy is not None and estimate is not None:
            drop = reference_accuracy - estimate
            decisions.append(AlertDecision(
                f"accuracy:{kind}:{window}", "accuracy", kind, window, drop > accuracy_drop,
                f"window {window}: estimated accuracy {estimate:.3f} vs {reference_accuracy:.3f} on the reference "
                f"(drop {drop:+.3f}, threshold {accuracy_drop})", max(drop, 0.0),
                {"estimated_accuracy": estimate, "reference_accuracy": reference_accuracy,
                 "audit": w.get("audit"), "champion": report["champion"]}))
    return decisions


@dataclass
class Transitions:
    raised: list[Alert]
    cleared: list[Alert]
    delivered: int
    undelivered: int


def apply_decisions(store: AlertStore, decisions: Iterable[AlertDecision], *, notify: bool) -> tuple[list, list]:
    """Raise or clear each decision's alert. ``notify``: queue the transitions for the alert URL."""
    raised, cleared = [], []
    for d in decisions:
        if d.active:
            alert, new = store.raise_alert(d.key, d.kind, d.message, severity=d.severity, window_kind=d.window_kind,
                                           window=d.window, details=d.details, notify=notify)
            if new:
                raised.append(alert)
        else:
            alert = store.clear_alert(d.key, notify=notify)
            if alert is not None:
                cleared.append(alert)
    return raised, cleared


def payload(alert: Alert, event: Literal["raised", "cleared"]) -> dict[str, Any]:
    return {"event": event, "source": "labelloop", "id": alert.id, "key": alert.key, "kind": alert.kind,
            "window_kind": alert.window_kind, "window": alert.window, "message": alert.message,
            "severity": alert.severity, "raised_at": alert.raised_at, "cleared_at": alert.cleared_at,
            "details": alert.details}


def deliver(store: AlertStore, url: str | None, client: httpx.Client | None = None) -> tuple[int, int]:
    """POST every undelivered transition to ``url``; returns (delivered, still pending). Stops at the first
    failure so that a receiver sees each alert's events in order. One replica at a time: the next one reads
    what is still pending once the first is done, so a transition is posted once, not once per replica."""
    if not url:
        return 0, len(store.pending_notifications())
    with store.delivering():
        pending = store.pending_notifications()
        if not pending:
            return 0, 0
        own = client is None
        client = client or httpx.Client(timeout=10.0)
        delivered = 0
        try:
            for alert, event in pending:
                try:
                    response = client.post(url, json=payload(alert, event))
                    response.raise_for_status()
                except httpx.HTTPError as e:
                    log.warning("alert %s (%s) not delivered to %s: %s; retrying at the next evaluation",
                                alert.key, event, url, e)
                    break
                store.mark_notified(alert.id, event)
                delivered += 1
        finally:
            if own:
                client.close()
        return delivered, len(pending) - delivered


def stale_keys(open_alerts: Iterable[Alert], report: dict[str, Any]) -> list[str]:
    """Open alerts about windows the report no longer has (``drift_window`` changed, or the pool was
    re-imported): nothing will ever re-test them, so left alone they would stay open for good, count on the
    overview and keep steering the queue. A window that is in the report but too small to test keeps its
    alert as it is."""
    current = {(report["window_kind"], w["window"]) for w in report["windows"]}
    return [a.key for a in open_alerts
            if a.kind in ("drift", "accuracy") and (a.window_kind, a.window) not in current]


def evaluate_alerts(store: AlertStore, report: dict[str, Any], *, accuracy_drop: float, alert_url: str | None,
                    client: httpx.Client | None = None) -> Transitions:
    """The whole step after a drift evaluation: decide, persist, deliver (and retry earlier failures)."""
    raised, cleared = apply_decisions(store, alert_decisions(report, accuracy_drop), notify=bool(alert_url))
    for key in stale_keys(store.open_alerts(), report):
        alert = store.clear_alert(key, notify=bool(alert_url))
        if alert is not None:
            cleared.append(alert)
    delivered, undelivered = deliver(store, alert_url, client)
    return Transitions(raised, cleared, delivered, undelivered)


class AlertCollector(Collector):
    """Prometheus view of the store, read at scrape time: ``labelloop_alert_active{key,kind,window}`` is 1 for
    every open alert, ``labelloop_alerts_open{kind}`` counts them. Add it to any registry with
    :func:`register_alert_metrics` (the serving app's included)."""

    def __init__(self, store: AlertStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        open_alerts = self.store.open_alerts()
        active = GaugeMetricFamily("labelloop_alert_active", "1 while the alert is raised",
                                   labels=["key", "kind", "window"])
        counts: dict[str, int] = {"drift": 0, "accuracy": 0}
        for alert in open_alerts:
            active.add_metric([alert.key, alert.kind, alert.window or ""], 1.0)
            counts[alert.kind] = counts.get(alert.kind, 0) + 1
        yield active
        total = GaugeMetricFamily("labelloop_alerts_open", "open alerts by kind", labels=["kind"])
        for kind, n in sorted(counts.items()):
            total.add_metric([kind], float(n))
        yield total


def register_alert_metrics(registry: CollectorRegistry, store: AlertStore) -> AlertCollector:
    collector = AlertCollector(store)
    registry.register(collector)
    return collector
