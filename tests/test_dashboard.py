"""The dashboard's own numbers (overview, model history, throughput) on hand-built tables with known
answers; the page's empty states; every figure on the page against the JSON API; authentication; and
``labelloop report`` writing one self-contained file or JSON, refusing bad input with exit code 2."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from rich.console import Console
from typer.testing import CliRunner

from labelloop import cli, cli_errors
from labelloop.config import Settings, get_settings
from labelloop.journal import ANNOTATION_COLUMNS
from monitoring import report as report_module
from monitoring.app import monitoring_routers
from monitoring.dashboard import adjudication_states, fmt, plotly_js, render
from monitoring.label_errors import LabelIssue
from monitoring.overview import (
    label_counts,
    promoted_at,
    stopping_state,
    throughput,
    version_row,
)
from serving.app import create_app
from tests.fakes import EmptyRegistry
from training.registry import GateDecision, VersionInfo

NOW = datetime(2026, 3, 11, 15, 30, tzinfo=UTC)  # a Wednesday: the week began on Monday 2026-03-09
AUTH = ("pm", "dash-pass-42")


def annotations(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A journal ``annotations()`` frame: every column present, the given values filled in."""
    defaults = {"project_id": 1, "text": "some text", "cancelled": False, "ground_truth": False, "problem": None,
                "source": "webhook", "lead_time": None, "prediction_id": None, "suggested_label": None,
                "suggested_model_version": None, "updated_at": None, "created_at": None, "annotator": 1}
    frame = pd.DataFrame([{**defaults, "annotation_id": i + 1, "task_id": 100 + i, "id": f"item-{i}", **row}
                          for i, row in enumerate(rows)], columns=ANNOTATION_COLUMNS)
    return frame.astype({"lead_time": "float64"})


# ------------------------------------------------------------------------------------------ overview
def test_label_counts_today_this_week_and_per_day() -> None:
    frame = annotations([
        {"label": "hate", "created_at": "2026-03-11T09:00:00Z"},  # today
        {"label": "neither", "created_at": "2026-03-11T00:00:00Z"},  # today, first second
        {"label": "hate", "created_at": "2026-03-10T23:59:59Z"},  # yesterday, this week
        {"label": "offensive", "created_at": "2026-03-09T00:00:01Z"},  # Monday, this week
        {"label": "offensive", "created_at": "2026-03-08T23:00:00Z"},  # Sunday: last week
        {"label": None, "cancelled": True, "created_at": "2026-03-11T10:00:00Z"},  # skipped: not a label
        {"label": None, "problem": "label outside taxonomy", "created_at": "2026-03-11T10:00:00Z"},
        {"label": "hate", "created_at": None, "updated_at": "2026-03-11T12:00:00Z"},  # no creation time
        {"label": "hate", "created_at": "2026-02-01T12:00:00Z"},  # outside the charted days
    ])
    today, week, total, per_day = label_counts(frame, NOW, days=14)
    assert (today, week, total) == (3, 5, 7)
    assert len(per_day) == 14 and per_day[-1].day == "2026-03-11" and per_day[0].day == "2026-02-26"
    assert {d.day: d.labels for d in per_day if d.labels} == {"2026-03-11": 3, "2026-03-10": 1, "2026-03-09": 1,
                                                               "2026-03-08": 1}


def test_label_counts_of_an_empty_journal_are_zero() -> None:
    today, week, total, per_day = label_counts(annotations([]), NOW)
    assert (today, week, total) == (0, 0, 0) and all(d.labels == 0 for d in per_day)


def test_stopping_state_is_the_newest_signal_a_retrain_computed() -> None:
    results = [("2026-03-11T10:00:00", {"labels": 300, "stopping": None}),  # a round that trained nothing
               ("2026-03-11T09:00:00", {"stopping": {"stop": True, "kappa": 0.995, "est_gain_per_100": 0.001,
                                                     "reason": "predictions stable", "stable_rounds": 3}}),
               ("2026-03-10T09:00:00", {"stopping": {"stop": False, "reason": "round 1: continue"}})]
    state = stopping_state(results)
    assert state.stop and state.kappa == 0.995 and state.stable_rounds == 3 and state.as_of == "2026-03-11T09:00:00"
    assert stopping_state([(None, None), ("x", {"stopping": None})]) is None


def decision(at: str, action: str, promoted: bool, before: int | None, after: int | None) -> GateDecision:
    return GateDecision(action, promoted, after if promoted else before, before, after, "reason", at=at)


def test_promoted_at_follows_promotions_refusals_and_rollbacks() -> None:
    history = [decision("2026-03-01T00:00:00", "promote", True, None, 1),
               decision("2026-03-02T00:00:00", "promote", True, 1, 2),
               decision("2026-03-03T00:00:00", "promote", False, 2, 2),  # refused v3: v2 stays, not re-promoted
               decision("2026-03-04T00:00:00", "rollback", True, 2, 1)]
    assert promoted_at(history, 2) == "2026-03-02T00:00:00"
    assert promoted_at(history, 1) == "2026-03-04T00:00:00"  # the rollback made v1 champion again
    assert promoted_at(history, 3) is None


def test_version_row_reads_the_metrics_of_the_eval_set_it_was_registered_against() -> None:
    tags = {"eval_set": "ev1", "model_kind": "embedding_head", "eval.ev1.macro_f1": "0.700000",
            "eval.ev1.accuracy": "0.800000", "eval.ev1.recall_hate": "0.400000", "eval.ev1.f1_hate": "0.450000",
            "eval.ev2.macro_f1": "0.100000"}  # judged later on another frozen set: not this row's numbers
    info = VersionInfo(3, ["champion"], "run-3", datetime(2026, 3, 1, tzinfo=UTC), tags)
    row = version_row(info, "labelloop-x", ("hate", "neither"), "http://mlflow/#/experiments/1/runs/run-3")
    assert row.label == "labelloop-x:v3" and row.macro_f1 == 0.7 and row.accuracy == 0.8
    assert row.per_class["hate"].recall == 0.4 and row.per_class["hate"].f1 == 0.45
    assert row.per_class["neither"].f1 is None and row.run_url.endswith("/runs/run-3")


# ------------------------------------------------------------------------------------------ throughput
def test_throughput_is_labels_per_active_hour_and_median_lead_time_per_annotator() -> None:
    frame = annotations([
        {"label": "hate", "annotator": 1, "created_at": "2026-03-11T09:05:00Z", "lead_time": 10.0},
        {"label": "hate", "annotator": 1, "created_at": "2026-03-11T09:35:00Z", "lead_time": 20.0},
        {"label": "neither", "annotator": 1, "created_at": "2026-03-11T09:50:00Z", "lead_time": 60.0},
        {"label": "hate", "annotator": 1, "created_at": "2026-03-11T14:10:00Z", "lead_time": None},
        {"label": "offensive", "annotator": 2, "created_at": "2026-03-10T08:00:00Z", "lead_time": 5.0},
        {"label": None, "cancelled": True, "annotator": 2, "created_at": "2026-03-11T08:00:00Z", "lead_time": 99.0},
        {"label": "hate", "annotator": 2, "created_at": "2026-02-20T08:00:00Z", "lead_time": 1.0},  # too old
    ])
    t = throughput(frame, NOW, days=7)
    by = {a.annotator: a for a in t.annotators}
    assert set(by) == {"user 1", "user 2"}
    assert (by["user 1"].labels, by["user 1"].active_hours, by["user 1"].labels_per_hour) == (4, 2, 2.0)
    assert by["user 1"].median_seconds == 20.0 and by["user 1"].timed_labels == 3
    assert (by["user 2"].labels, by["user 2"].median_seconds) == (1, 5.0)
    assert t.median_seconds == 15.0  # over 10, 20, 60, 5
    assert [(h.hour[:13], h.annotator, h.labels) for h in t.hourly] == [
        ("2026-03-10T08", "user 2", 1), ("2026-03-11T09", "user 1", 3), ("2026-03-11T14", "user 1", 1)]
    assert t.note is None


def test_throughput_says_what_is_missing() -> None:
    assert throughput(annotations([]), NOW).note == "no labels in the last 7 days"
    untimed = throughput(annotations([{"label": "hate", "created_at": "2026-03-11T09:00:00Z"}]), NOW)
    assert untimed.median_seconds is None and "lead_time" in untimed.note


# ------------------------------------------------------------------------------------------ label errors
def test_adjudication_state_of_each_likely_label_error() -> None:
    issues = [LabelIssue(rank=i + 1, task_id=t, item_id=f"i{t}", annotation_id=t, label="hate",
                         model_label="neither", quality=0.1, text="t") for i, t in enumerate((10, 11, 12))]
    slices = pd.DataFrame({"kind": ["adjudication", "adjudication", "honeypot"], "task_id": [50, 51, 52],
                           "source_task_id": [10, 11, None]})
    done = annotations([{"task_id": 50, "label": "neither", "updated_at": "2026-03-11T09:00:00Z"}])
    rows = adjudication_states(issues, slices, done, lambda t: f"http://ls/projects/1/data?task={t}")
    assert [r.adjudication for r in rows] == ["adjudicated: neither", "waiting for a second reviewer",
                                              "not sent for adjudication"]
    assert rows[0].adjudication_task_url == "http://ls/projects/1/data?task=50"
    assert rows[2].adjudication_task_id is None and rows[2].task_url.endswith("task=12")


def test_a_confirmed_label_still_ranked_suspicious_shows_as_adjudicated() -> None:
    """After adjudication the item's training label comes from the adjudication copy, so a label the second
    reviewer confirmed ranks again under the copy's task id: it was shown as never sent."""
    issue = LabelIssue(rank=1, task_id=50, item_id="i10", annotation_id=7, label="hate", model_label="neither",
                       quality=0.1, text="t")
    slices = pd.DataFrame({"kind": ["adjudication"], "task_id": [50], "source_task_id": [10]})
    done = annotations([{"task_id": 50, "label": "hate", "updated_at": "2026-03-11T09:00:00Z"}])
    [row] = adjudication_states([issue], slices, done, lambda t: f"http://ls/projects/1/data?task={t}")
    assert row.adjudication == "adjudicated: hate" and row.adjudication_task_id == 50


# ------------------------------------------------------------------------------------------ the page
class PageFacts(HTMLParser):
    """What a reader sees that can be checked: figures with their API source, charts, empty sentences."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict[str, str]] = []
        self.charts: list[str] = []
        self.empty_charts: list[str] = []
        self.scripts: list[str] = []
        self._figure: dict[str, str] | None = None
        self._in_empty = False
        self.empty_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if "data-source" in a:
            self._figure = {**a, "text": ""}
        if "data-chart" in a:
            (self.charts if a.get("class") == "chart" else self.empty_charts).append(a["data-chart"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        self._in_empty = tag == "p" and a.get("class") == "empty"

    def handle_data(self, data: str) -> None:
        if self._figure is not None:
            self._figure["text"] += data
        if self._in_empty:
            self.empty_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._figure is not None and tag in ("div", "td"):
            self.figures.append(self._figure)
            self._figure = None
        self._in_empty = False


def facts(html: str) -> PageFacts:
    parser = PageFacts()
    parser.feed(html)
    return parser


def resolve(document: Any, path: str) -> Any:
    """The value at a dotted JSON path; None when a parent is null (an absent champion has no label)."""
    for part in path.split("."):
        if document is None:
            return None
        document = document[int(part)] if isinstance(document, list) else document[part]
    return document


@pytest.fixture
def dash_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"basic_user": AUTH[0], "basic_password": SecretStr(AUTH[1]),
                                       "poll_seconds": 0, "ls_project_id": 7, "ls_url": "http://ls.example:8080"})


def webhook(annotation_id: int, task_id: int, label: str | None, annotator: int, created_at: str,
            lead_time: float | None = 12.5, cancelled: bool = False) -> dict:
    """An ANNOTATION_CREATED payload shaped like Label Studio 1.23's webhook."""
    result = [] if label is None else [{"id": "r1", "from_name": "label", "to_name": "text", "type": "choices",
                                        "origin": "manual", "value": {"choices": [label]}}]
    annotation = {"id": annotation_id, "result": result, "task": task_id, "project": 7, "completed_by": annotator,
                  "updated_by": annotator, "was_cancelled": cancelled, "ground_truth": False, "lead_time": lead_time,
                  "created_at": created_at, "updated_at": created_at, "draft_created_at": None, "result_count": 1,
                  "unique_id": f"u-{annotation_id}", "import_id": None, "last_action": None, "bulk_created": False,
                  "parent_prediction": None, "parent_annotation": None, "last_created_by": None}
    task = {"id": task_id, "data": {"text": f"text of task {task_id}", "item_id": f"item-{task_id}"}, "meta": {},
            "created_at": created_at, "updated_at": created_at, "is_labeled": True, "overlap": 1, "project": 7,
            "total_annotations": 1, "cancelled_annotations": 0, "total_predictions": 0, "inner_id": task_id}
    return {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task,
            "project": {"id": 7, "title": "review", "label_config": "<View/>"}}


def test_dashboard_is_behind_auth_and_every_figure_equals_the_api(dash_settings: Settings) -> None:
    app = create_app(dash_settings, model_source=EmptyRegistry(), extra_routers=monitoring_routers())
    now = datetime.now(UTC)
    stamp = now.isoformat().replace("+00:00", "Z")
    with TestClient(app) as client:
        for path in ("/dashboard", "/static/plotly.min.js", "/v1/monitoring/overview", "/v1/monitoring/model",
                     "/v1/monitoring/throughput"):
            assert client.get(path).status_code == 401, path
        payloads = [webhook(1, 101, "hate", 3, stamp, 20.0), webhook(2, 102, "neither", 3, stamp, 40.0),
                    webhook(3, 103, "offensive", 4, stamp, 8.0), webhook(4, 104, None, 4, stamp, cancelled=True)]
        for p in payloads:
            assert client.post("/webhook", json=p, auth=AUTH).status_code == 201

        page = client.get("/dashboard", auth=AUTH)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        seen = facts(page.text)
        assert seen.scripts == ["/static/plotly.min.js"]  # served by the backend: no CDN
        script = client.get("/static/plotly.min.js", auth=AUTH)
        assert script.status_code == 200 and "plotly.js" in script.text[:2000]

        overview = client.get("/v1/monitoring/overview", auth=AUTH).json()
        assert (overview["labels_today"], overview["labels_this_week"], overview["labels_total"]) == (3, 3, 3)
        assert overview["champion"] is None and "no champion" in overview["champion_note"]
        assert "not imported" in overview["backlog_note"] or "no pool" in overview["backlog_note"]
        throughput_json = client.get("/v1/monitoring/throughput", auth=AUTH).json()
        assert [(a["annotator"], a["labels"], a["median_seconds"]) for a in throughput_json["annotators"]] == [
            ("user 3", 2, 30.0), ("user 4", 1, 8.0)]

        sources: dict[str, Any] = {}
        checked = 0
        for figure in seen.figures:
            source = figure["data-source"]
            if source not in sources:
                sources[source] = client.get(source, auth=AUTH).json()
            expected = resolve(sources[source], figure["data-path"])
            assert json.loads(figure["data-value"]) == expected, figure
            if "data-kind" in figure:
                assert figure["text"].strip() == fmt(expected, figure["data-kind"]), figure
            checked += 1
        assert checked >= 5 and {"/v1/monitoring/overview", "/v1/monitoring/throughput"} <= set(sources)
        assert {"labels-per-day", "labels-per-hour"} <= set(seen.charts)


def test_a_fresh_install_renders_a_sentence_for_each_missing_piece(dash_settings: Settings) -> None:
    app = create_app(dash_settings.model_copy(update={"ls_project_id": None}), model_source=EmptyRegistry(),
                     extra_routers=monitoring_routers())
    with TestClient(app) as client:
        page = client.get("/dashboard", auth=AUTH)
    assert page.status_code == 200
    seen = facts(page.text)
    assert seen.charts == []  # nothing to draw: no empty axes anywhere
    text = " ".join(seen.empty_text)
    for sentence in ("no labels yet", "no model version registered", "drift monitoring has not run yet",
                     "no annotations in the journal yet", "no labels in the last 7 days"):
        assert sentence in text, sentence
    for section in ("overview", "label-accuracy", "label-errors", "model", "drift", "throughput"):
        assert f'<section id="{section}">' in page.text


def test_report_is_one_self_contained_file(dash_settings: Settings, tmp_path: Path) -> None:
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy
    from monitoring.dashboard import collect
    from monitoring.overview import MonitoringContext

    with Journal(dash_settings.journal_path, get_taxonomy(dash_settings.taxonomy)) as journal:
        journal.record(webhook(1, 101, "hate", 3, datetime.now(UTC).isoformat()))
        context = MonitoringContext(dash_settings, journal)
        html = render(collect(context), inline_plotly=True)
        context.close()
    seen = facts(html)
    assert seen.scripts == [] and plotly_js()[:500] in html  # inlined: no external script at all
    assert "labels-per-day" in seen.charts


# ------------------------------------------------------------------------------------------ the CLI
@pytest.fixture
def cli_env(tmp_path: Path, embedding_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LABELLOOP_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(embedding_cache_dir))
    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "no-such-labelloop.toml"))
    monkeypatch.setattr(report_module, "console", Console(width=220))
    monkeypatch.setattr(cli_errors, "err", Console(stderr=True, soft_wrap=True))
    monkeypatch.setattr(cli, "console", Console(width=220))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def test_report_command_writes_html_and_json_and_refuses_bad_input(cli_env: Settings, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "weekly" / "report.html"
    result = runner.invoke(cli.app, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<script src=" not in html and "Plotly.newPlot" not in html  # fresh install: sentences, no charts
    assert "no labels yet" in html and len(html) > 1_000_000  # plotly.js inlined

    as_json = tmp_path / "report.json"
    assert runner.invoke(cli.app, ["report", "--json", "--out", str(as_json)]).exit_code == 0
    data = json.loads(as_json.read_text())
    assert data["overview"]["labels_total"] == 0 and data["model"]["versions"] == []

    for args, message in ((["report", "--out", str(tmp_path)], "is a directory"),
                          (["report", "--taxonomy", "nope"], "unknown taxonomy"),
                          (["report", "--mlflow-url", "ftp://x"], "must be an http")):
        bad = runner.invoke(cli.app, args)
        assert bad.exit_code == 2 and "error:" in bad.output and message in bad.output, bad.output
    assert not (tmp_path / ".report.html.tmp").exists()


def test_instrument_exports_open_alerts_next_to_the_serving_metrics(dash_settings: Settings) -> None:
    from labelloop.alerts_store import AlertStore, alerts_path
    from monitoring.app import instrument

    app = create_app(dash_settings, model_source=EmptyRegistry(), extra_routers=monitoring_routers())
    store = instrument(app)
    try:
        with TestClient(app) as client:
            before = client.get("/metrics/prometheus", auth=AUTH).text
            with AlertStore(alerts_path(dash_settings.state_dir)) as writer:
                writer.raise_alert("drift:batch:ethos", "drift", "window ethos drifts", window_kind="batch",
                                   window="ethos")
            after = client.get("/metrics/prometheus", auth=AUTH).text
            overview = client.get("/v1/monitoring/overview", auth=AUTH).json()
    finally:
        store.close()
    assert 'labelloop_alert_active{key="drift:batch:ethos"' not in before
    assert 'labelloop_alert_active{key="drift:batch:ethos",kind="drift",window="ethos"} 1.0' in after
    assert [a["key"] for a in overview["open_alerts"]] == ["drift:batch:ethos"] and overview["alerts_note"] is None


class UnreadableRegistry:
    """A tracking server that is down: every read fails."""

    name = "labelloop-test"

    def __getattr__(self, name: str):
        def fail(*args: Any, **kwargs: Any):
            raise ConnectionError("tracking server at http://mlflow:5000 refused the connection")

        return fail


def test_an_unreadable_registry_leaves_the_labels_on_the_page(dash_settings: Settings) -> None:
    from monitoring.overview import MonitoringContext

    app = create_app(dash_settings, model_source=EmptyRegistry(), extra_routers=monitoring_routers())
    with TestClient(app) as client:
        assert client.post("/webhook", json=webhook(1, 101, "hate", 3, datetime.now(UTC).isoformat()),
                           auth=AUTH).status_code == 201
        context = app.state.monitoring = MonitoringContext(dash_settings, app.state.journal)
        context.__dict__["registry"] = UnreadableRegistry()
        model = client.get("/v1/monitoring/model", auth=AUTH)
        overview = client.get("/v1/monitoring/overview", auth=AUTH)
        page = client.get("/dashboard", auth=AUTH)
    assert model.status_code == 503 and "refused the connection" in model.json()["detail"]
    assert overview.status_code == 200 and overview.json()["labels_today"] == 1
    assert "could not be read" in overview.json()["champion_note"]
    assert page.status_code == 200 and "the model registry could not be read" in page.text


def test_one_page_load_reads_the_quality_table_once_and_still_equals_the_api(dash_settings: Settings,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The page built the label-quality report and three breakdowns of it from four separate journal reads
    (each also predicting the audit items); one load now reads once, and its figures are the API's. The
    label-error pass (an out-of-fold fit) reruns only when the training labels changed."""
    from monitoring.quality_context import QualityContext

    calls: list[str] = []
    real_table, real_issues = QualityContext.table, QualityContext.label_issues
    monkeypatch.setattr(QualityContext, "table", lambda self, with_model=True: (calls.append("table"),
                                                                               real_table(self, with_model))[1])
    monkeypatch.setattr(QualityContext, "label_issues", lambda self, top_k=None: (calls.append("issues"),
                                                                                 real_issues(self, top_k))[1])
    app = create_app(dash_settings, model_source=EmptyRegistry(), extra_routers=monitoring_routers())
    stamp = datetime.now(UTC).isoformat()
    with TestClient(app) as client:
        for i, label in enumerate(["hate", "neither", "offensive", "neither"]):
            assert client.post("/webhook", json=webhook(i + 1, 101 + i, label, 3 + i % 2, stamp),
                               auth=AUTH).status_code == 201
        page = client.get("/dashboard", auth=AUTH)
        assert page.status_code == 200
        assert calls.count("table") == 1 and calls.count("issues") == 1, calls
        quality = client.get("/v1/quality", auth=AUTH).json()
        calls.clear()
        assert client.get("/dashboard", auth=AUTH).status_code == 200
        assert calls == ["table"]  # no new label: the label-error pass is not fitted again
        assert client.post("/webhook", json=webhook(9, 109, "hate", 3, stamp), auth=AUTH).status_code == 201
        assert client.get("/dashboard", auth=AUTH).status_code == 200
        assert calls == ["table", "table", "issues"]  # a new label: fitted again
    figures = [f for f in facts(page.text).figures if f["data-source"] == "/v1/quality"]
    assert len(figures) >= 5
    for figure in figures:
        assert json.loads(figure["data-value"]) == resolve(quality, figure["data-path"]), figure


def test_the_overview_backlog_closes_the_slice_store_it_opens(settings: Settings, monkeypatch) -> None:
    """Every overview and dashboard load counts the backlog through a loop, which opens a SQLite slice
    store; one left open per request leaks a connection per page load."""
    import active_learning.loop as loop_module
    from labelloop.journal import Journal
    from labelloop.slices import SliceStore
    from labelloop.taxonomy import get_taxonomy
    from monitoring.overview import MonitoringContext, _backlog

    opened: list[SliceStore] = []

    class Tracked(SliceStore):
        def __init__(self, path):
            super().__init__(path)
            self.closed = False
            opened.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(loop_module, "SliceStore", Tracked)
    settings = settings.model_copy(update={"ls_project_id": 5})
    pool_path = settings.state_dir / "pools" / "project-5.parquet"
    pool_path.parent.mkdir(parents=True)
    pd.DataFrame({"item_id": ["a", "b"], "text": ["one", "two"], "task_id": [7, 8]}).to_parquet(pool_path)
    with Journal(settings.journal_path, get_taxonomy(settings.taxonomy)) as journal:
        context = MonitoringContext(settings, journal)
        assert _backlog(context) == (2, None)
        assert _backlog(context.__class__(settings.model_copy(update={"ls_project_id": 6}), journal))[0] is None
    assert len(opened) == 2 and all(store.closed for store in opened)


# ------------------------------------------------------------------------------------------ reviewer protection
def test_protection_counts_today_and_seven_days_per_reviewer_against_the_cap() -> None:
    from labelloop.exposure import DayExposure
    from monitoring.overview import protection

    now = datetime(2026, 3, 11, 15, tzinfo=UTC)
    daily = [DayExposure(3, "2026-03-11", 4, 1), DayExposure(3, "2026-03-09", 5, 0),
             DayExposure(4, "2026-03-11", 1, 2), DayExposure(4, "2026-02-20", 9, 9)]  # outside the 7 days
    panel = protection(daily, now, 4, masking=True, escalations={"open": 2, "delivered": 5})
    assert [(r.reviewer, r.severe_today, r.severe_7d, r.reveals_today, r.reveals_7d, r.over_cap, r.days_over_cap_7d)
            for r in panel.reviewers] == [("user 3", 4, 9, 1, 1, True, 2), ("user 4", 1, 1, 2, 2, False, 0)]
    assert (panel.escalations_open, panel.escalations_delivered) == (2, 5)
    assert protection([], now, None, masking=False, escalations={}).note is not None


def test_the_protection_panel_equals_its_api(dash_settings: Settings) -> None:
    from labelloop.policy import Protection, Severity
    from monitoring.dashboard import PROTECTION_API

    guarded = dash_settings.model_copy(update={"severity": Severity(severe_labels=("hate",)),
                                               "protection": Protection(daily_severe_cap=1)})
    app = create_app(guarded, model_source=EmptyRegistry(), extra_routers=monitoring_routers())
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    revealed = webhook(2, 102, "neither", 4, stamp)
    revealed["annotation"]["result"].append({"id": "r2", "from_name": "reveal", "to_name": "text", "type": "choices",
                                             "value": {"choices": ["Show original"]}})
    with TestClient(app) as client:
        assert client.get(PROTECTION_API).status_code == 401
        for p in (webhook(1, 101, "hate", 3, stamp), revealed):
            assert client.post("/webhook", json=p, auth=AUTH).status_code == 201
        body = client.get(PROTECTION_API, auth=AUTH).json()
        assert [(r["reviewer"], r["severe_today"], r["reveals_today"], r["over_cap"]) for r in body["reviewers"]] == [
            ("user 3", 1, 0, True), ("user 4", 0, 1, False)]
        seen = facts(client.get("/dashboard", auth=AUTH).text)
        shown = [f for f in seen.figures if f["data-source"] == PROTECTION_API]
        assert len(shown) >= 6
        for figure in shown:
            assert json.loads(figure["data-value"]) == resolve(body, figure["data-path"]), figure


def test_likely_label_errors_show_the_lexicon_masked_text(settings: Settings) -> None:
    """The dashboard's label-error table showed the original text, the one place a term the lexicon masks in
    Label Studio's default view still reached a reader unmasked."""
    from types import SimpleNamespace

    from monitoring.dashboard import collect_label_errors, label_errors_section

    issue = LabelIssue(rank=1, task_id=10, item_id="i10", annotation_id=1, label="hate", model_label="neither",
                       quality=0.1, text="you are a bitch &amp; a liar")
    quality = SimpleNamespace(label_issues=lambda: SimpleNamespace(issues=[issue], n_labelled=40, note=None))
    context = SimpleNamespace(settings=settings, project_id=7, task_url=lambda t: f"http://ls/data?task={t}",
                              slice_store=SimpleNamespace(frame=lambda project_id: pd.DataFrame(
                                  columns=["kind", "task_id", "source_task_id"])),
                              journal=SimpleNamespace(annotations=lambda project_id: annotations([])))
    errors = collect_label_errors(context, quality)
    [row] = errors.rows
    assert "bitch" not in row.issue.text and row.issue.text.endswith("&amp; a liar")
    assert row.issue.text == settings.protection_policy.mask_text(issue.text)
    section = label_errors_section(SimpleNamespace(label_errors=errors, label_errors_note=None))
    assert "bitch" not in repr(section)
