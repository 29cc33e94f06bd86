"""The PM dashboard in a real Chromium (Playwright), against a real Label Studio, a real MLflow store and a
real journal fed by Label Studio's own webhooks.

Checks that the page loads behind the backend's authentication with no console errors, that every chart
draws a non-empty SVG, that every figure shown equals what the JSON API returns, that the report file
(`labelloop report`) draws the same charts from ``file://`` without a single request elsewhere, and that a
fresh install renders a sentence for each missing piece instead of empty axes. The populated page's screenshot is saved
under the test's temp dir, and also to ``$LABELLOOP_DASHBOARD_SCREENSHOT`` when that is set. The README's
``docs/dashboard.png`` is a screenshot of a full ``make demo`` instead, where every section has data.

Chromium is Debian's (``/usr/bin/chromium``), which ``make test`` installs with apt-get when it can; the
Playwright package drives it, no ``playwright install`` download.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from active_learning.service import Service
from labelloop import data
from labelloop.config import Settings
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy
from monitoring.app import monitoring_routers
from monitoring.dashboard import collect, fmt, render
from monitoring.drift import run_drift_evaluation
from monitoring.overview import MonitoringContext
from serving.app import create_app
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.test_dashboard import resolve
from tests.test_serving_integration import ServerThread
from training.registry import Registry
from training.train import train_and_register

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
TAXONOMY = get_taxonomy("hate_offensive")
AUTH = ("pm", "browser-pass-42")

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium with apt-get when run as root; "
                "elsewhere run `apt-get install chromium` first", allow_module_level=True)

#: every chart's drawn marks: the bars, lines and markers of its traces that cover an area (a zero bar does not)
CHARTS_JS = """() => Array.from(document.querySelectorAll('.chart')).map(c => {
  const svg = c.querySelector('svg.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const marks = Array.from(c.querySelectorAll('.cartesianlayer .trace path'))
    .filter(p => { const b = p.getBBox(); return b.width > 0 && b.height > 0; });
  return {key: c.dataset.chart, width: box.width, height: box.height, marks: marks.length};
})"""
FIGURES_JS = """() => Array.from(document.querySelectorAll('[data-source]')).map(e => ({
  source: e.dataset.source, path: e.dataset.path, kind: e.dataset.kind || null, value: e.dataset.value,
  text: e.textContent.trim()}))"""


def browse(url: str, credentials: tuple[str, str] | None, screenshot: Path | None = None) -> dict[str, Any]:
    """Open ``url`` in Chromium; what a reader sees, and every console error or uncaught exception."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 1360, "height": 900},
                http_credentials={"username": credentials[0], "password": credentials[1]} if credentials else None)
            if credentials is None and url.startswith("http"):  # a load would stop at the login prompt: ask plainly
                return {"status": context.request.get(url).status, "errors": errors}
            page = context.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            if url.startswith("file:"):  # a report file must need nothing from anywhere
                page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else errors.append(
                    f"request to {r.url}"))
            response = page.goto(url, wait_until="load")  # "networkidle" can come while the page still parses
            seen: dict[str, Any] = {"status": response.status if url.startswith("http") else 200, "errors": errors}
            if response.status != 200:
                return seen
            page.wait_for_function("() => document.readyState === 'complete' && Array.from("
                                   "document.querySelectorAll('.chart')).every(c => c.querySelector('svg.main-svg'))",
                                   timeout=30_000)
            seen.update(charts=page.evaluate(CHARTS_JS), figures=page.evaluate(FIGURES_JS),
                        empty=page.locator(".empty").all_inner_texts(),
                        sections=page.locator("section").evaluate_all("s => s.map(x => x.id)"))
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return seen
        finally:
            browser.close()


@pytest.fixture
def dash_settings(settings: Settings, label_studio: RunningLabelStudio, ls_project: int) -> Settings:
    return settings.model_copy(update={
        "ls_url": label_studio.url, "ls_api_key": SecretStr(label_studio.api_key), "ls_project_id": ls_project,
        "port": free_port(), "basic_user": AUTH[0], "basic_password": SecretStr(AUTH[1]), "poll_seconds": 0,
        "reconcile_seconds": 0, "retrain_every": 10_000, "query_batch": 10, "queue_size": 40,
        "audit_rate": 0.0, "honeypot_rate": 0.0, "overlap_rate": 0.0,
        "drift_window": "batch", "drift_min_items": 20, "drift_permutations": 50, "label_error_top_k": 5})


def test_the_dashboard_in_chromium_shows_what_the_api_returns(dash_settings: Settings, label_studio: RunningLabelStudio,
                                                              ls_project: int, davidson, tmp_path: Path):
    splits = data.split(davidson, seed=5)
    train_and_register(data.stratified_sample(splits.validation, 150, seed=5), None, TAXONOMY, mode="fast",
                       settings=dash_settings, source="seed",
                       eval_frame=data.stratified_sample(splits.test, 150, seed=5))
    assert Registry(dash_settings).promote().promoted
    pool = data.stratified_sample(splits.train, 40, seed=5)
    gold = dict(zip(pool["id"].astype(str), pool["label"], strict=True))
    other = data.load_unlabeled("ethos", settings=dash_settings).sample(30, random_state=5)  # another platform

    service = Service(dash_settings, extra_routers=monitoring_routers(mlflow_url="http://127.0.0.1:5000"))
    service.loop.import_pool(pool[["id", "text"]], batch_id="davidson")
    service.loop.import_pool(other[["id", "text"]], batch_id="ethos")
    pool_size = len(service.loop.pool())
    client = label_studio.client
    with ServerThread(service.app, dash_settings.port) as server:
        client.connect_backend(ls_project, server.url, basic_auth=AUTH)
        tasks = client.task_ids(ls_project)
        labelled = list(gold)[:24]
        for i, item in enumerate(labelled):  # a reviewer who gets every sixth one wrong, at varying speed
            label = gold[item] if i % 6 else next(x for x in TAXONOMY.labels if x != gold[item])
            client.create_annotation(tasks[item], label, lead_time=3.0 + i)
        wait_for(lambda: len(service.journal.labels(ls_project)) == len(labelled), "the annotation webhooks")
        job = service.runner.wait(service.runner.submit("dashboard test").id, timeout=600)  # gate decision 2
        assert job is not None and job.state == "done", job and job.error
        run_drift_evaluation(dash_settings)

        assert browse(f"{server.url}/dashboard", None)["status"] == 401
        shot = tmp_path / "dashboard.png"
        seen = browse(f"{server.url}/dashboard", AUTH, shot)
        with httpx.Client(base_url=server.url, auth=AUTH, timeout=120) as api:
            sources = {source: api.get(source).json() for source in {f["source"] for f in seen["figures"]}
                       | {"/v1/monitoring/throughput"}}
        report = tmp_path / "report.html"  # what `labelloop report` writes, from the same state
        context = MonitoringContext(dash_settings, service.journal)
        report.write_text(render(collect(context), inline_plotly=True))
        context.close()
        service.close()
    offline = browse(report.as_uri(), None)
    assert offline["errors"] == [] and {c["key"] for c in offline["charts"]} == {c["key"] for c in seen["charts"]}
    assert all(c["marks"] > 0 for c in offline["charts"])

    assert seen["status"] == 200 and seen["errors"] == []
    assert seen["sections"] == ["overview", "label-accuracy", "label-errors", "model", "drift", "throughput",
                                "protection"]
    charts = {c["key"]: c for c in seen["charts"]}
    (tmp_path / "seen.json").write_text(json.dumps({"seen": seen, "sources": sources}, indent=1, default=str))
    for key in ("labels-per-day", "model-versions", "drift-p-values", "drift-predicted-share", "labels-per-hour"):
        assert key in charts, (key, sorted(charts), seen["empty"])
    for chart in seen["charts"]:
        assert chart["width"] > 100 and chart["height"] > 100 and chart["marks"] > 0, chart

    assert {"/v1/monitoring/overview", "/v1/monitoring/model", "/v1/monitoring/throughput", "/v1/quality",
            "/v1/monitoring/drift"} <= set(sources)
    for figure in seen["figures"]:
        expected = resolve(sources[figure["source"]], figure["path"])
        assert _same(expected, _json(figure["value"])), figure
        if figure["kind"]:
            assert figure["text"] == fmt(expected, figure["kind"]), figure
    overview = sources["/v1/monitoring/overview"]
    assert overview["labels_today"] == len(labelled) and overview["backlog"] == pool_size - len(labelled)
    assert overview["open_alerts"] and overview["open_alerts"][0]["window"] == "ethos"  # the other platform drifts
    assert overview["champion"]["label"].endswith(":v1")
    assert len(sources["/v1/monitoring/model"]["decisions"]) == 2
    assert shot.stat().st_size > 50_000
    if target := os.environ.get("LABELLOOP_DASHBOARD_SCREENSHOT"):
        shutil.copy(shot, target)


def test_a_fresh_install_renders_its_empty_states_in_chromium(settings: Settings):
    fresh = settings.model_copy(update={"basic_user": AUTH[0], "basic_password": SecretStr(AUTH[1]),
                                        "poll_seconds": 0, "port": free_port()})
    app = create_app(fresh, extra_routers=monitoring_routers())
    with ServerThread(app, fresh.port) as server:
        seen = browse(f"{server.url}/dashboard", AUTH)
    assert seen["status"] == 200 and seen["errors"] == []
    assert seen["charts"] == []
    text = " ".join(seen["empty"])
    for sentence in ("no labels yet", "no annotations in the journal yet", "no model version registered",
                     "drift monitoring has not run yet", "no labels in the last 7 days",
                     "no reviewer saw a severe item"):
        assert sentence in text, (sentence, seen["empty"])


def _json(raw: str) -> Any:
    return json.loads(raw)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-9
    return a == b
