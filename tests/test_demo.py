"""`labelloop demo --short` run as a user would, non-interactively, against the session's real Label
Studio; afterwards Label Studio holds the project, pre-labels and the simulated reviews, MLflow the champion,
and every section of the PM dashboard has data: two reviewers, gold answers, overlap, audit, a drift alert."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from labelloop.config import Settings
from labelloop.demo import PROJECT_TITLE, _finish_round, shown_suggestion, simulated_answer, steps_for
from labelloop.journal import Journal
from labelloop.ls_server import free_port
from labelloop.slices import SliceStore
from labelloop.taxonomy import get_taxonomy
from monitoring.app import monitoring_routers
from serving.app import create_app
from tests.fakes import EmptyRegistry
from tests.label_studio_fixtures import RunningLabelStudio
from tests.test_dashboard import facts
from training.registry import CHAMPION, Registry

AUTH = ("pm", "demo-dash-42")

pytestmark = pytest.mark.integration


def test_short_demo_turns_the_loop_and_a_second_run_reuses_it(settings, label_studio: RunningLabelStudio):
    env = {**os.environ, "LABELLOOP_MLRUNS_DIR": str(settings.mlruns_dir),
           "LABELLOOP_STATE_DIR": str(settings.state_dir),
           "LABELLOOP_CACHE_DIR": str(settings.cache_dir), "LABELLOOP_LS_API_KEY": label_studio.api_key}

    def demo() -> None:
        run = subprocess.run(
            [sys.executable, "-m", "labelloop.cli", "demo", "--short", "--label-studio-url", label_studio.url,
             "--backend-port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "labelloop is up" in run.stdout
        # masked texts shown, and one escalation reached the demo's local receiver exactly once
        assert "masking: " in run.stdout and run.stdout.count("  POST key=") == 1, run.stdout[-3000:]

    def projects() -> list[int]:
        return [p.id for p in label_studio.sdk.projects.list(title=PROJECT_TITLE) if p.title == PROJECT_TITLE]

    def pool_items(project: int) -> set[str]:
        """The project's item ids, less the honeypots the loop mixed in from the frozen evaluation set."""
        with SliceStore(settings.slices_path) as store:
            honeypots = set(store.frame(project).query("kind == 'honeypot'")["item_id"])
        return set(label_studio.client.task_ids(project)) - honeypots

    def annotations(project: int) -> pd.DataFrame:
        with Journal(settings.journal_path, get_taxonomy("hate_offensive")) as journal:
            return journal.annotations(project)

    demo()
    assert len(projects()) == 1
    project = projects()[0]
    try:
        client = label_studio.client
        pool = pd.read_parquet(settings.state_dir / "pools" / f"project-{project}.parquet")
        davidson = pool[pool["item_id"].str.startswith("davidson-")]
        other = pool[pool["item_id"].str.startswith("ethos-")]
        assert 290 <= len(davidson) <= 310 and len(other) == 150 and len(davidson) + len(other) == len(pool)
        assert other["batch_id"].nunique() == 1 and not set(other["batch_id"]) & set(davidson["batch_id"])
        assert pool_items(project) == set(pool["item_id"])
        # 30 cold-start labels + one round of 30, + the settled adjudications (at most 5)
        first = sum(1 for _ in client.annotations(project))
        assert 61 <= first <= 66  # the rounds' labels and the one escalated annotation
        dashboard_is_fed(settings, project, str(other["batch_id"].iloc[0]), annotations(project))
        registry = Registry(settings.model_copy(update={"taxonomy": "hate_offensive"}))
        champion = registry.alias_version(CHAMPION)
        assert champion is not None
        versions = {p["model_version"] for p in client.predictions(project)}
        assert f"{registry.name}:v{champion}" in versions
        assert not (settings.state_dir / "demo" / "pids.json").exists()  # it cleaned up after itself

        demo()  # reuses the project, its pool and the champion: no cold start, one more round
        assert projects() == [project]
        assert pool_items(project) == set(pool["item_id"])
        assert 31 <= sum(1 for _ in client.annotations(project)) - first <= 36
        assert registry.alias_version(CHAMPION) is not None
    finally:
        label_studio.sdk.projects.delete(project)


def dashboard_is_fed(settings: Settings, project: int, drift_batch: str, journal: pd.DataFrame) -> None:
    """Every section of the dashboard has something from the demo's reviewers, read back through the same
    JSON API and page a PM opens."""
    reviewers = set(journal["annotator"].dropna().astype(int))
    assert len(reviewers) == 2  # the two reviewer accounts did all the labelling, not the admin
    with SliceStore(settings.slices_path) as store:
        slices = store.frame(project)
    copies = slices[slices["kind"] == "overlap"]
    assert len(copies) >= 2 and (slices["kind"] == "honeypot").sum() >= 2 and (slices["kind"] == "audit").sum() >= 2
    by_task = journal.groupby("task_id")["annotator"].first()
    pairs = [(by_task.get(c), by_task.get(s)) for c, s in zip(copies["task_id"], copies["source_task_id"], strict=True)]
    assert any(a is not None and b is not None and a != b for a, b in pairs)  # a second reviewer on an overlap item
    assert journal["lead_time"].notna().all() and journal["lead_time"].nunique() > 10  # realistic, not one constant

    app = create_app(settings.model_copy(update={"ls_project_id": project, "taxonomy": "hate_offensive",
                                                 "basic_user": AUTH[0], "basic_password": SecretStr(AUTH[1])}),
                     model_source=EmptyRegistry(), extra_routers=monitoring_routers())
    with TestClient(app) as api:
        quality = api.get("/v1/quality", auth=AUTH).json()
        alerts = api.get("/v1/monitoring/alerts", auth=AUTH).json()
        throughput = api.get("/v1/monitoring/throughput", auth=AUTH).json()
        page = api.get("/dashboard", auth=AUTH)
    assert quality["n_annotators"] == 2
    assert sum(g["value"]["n"] for g in quality["gold"]["per_annotator"]) >= 2  # honeypots answered
    assert quality["agreement"]["n_items"] >= 1 and quality["audit"]["audit"]["n"] >= 1
    assert quality["acceptance"]["overall"]["n"] >= 10  # labels made with a pre-label shown
    assert any(a["kind"] == "drift" and a["window"] == drift_batch and a["open"] for a in alerts["alerts"])
    assert len(throughput["annotators"]) == 2 and throughput["median_seconds"] is not None
    assert page.status_code == 200
    drawn = set(facts(page.text).charts)
    assert {"labels-per-day", "drift-p-values", "drift-predicted-share", "labels-per-hour",
            "model-versions"} <= drawn, drawn


def test_simulated_reviewers_slip_to_a_neighbouring_class_or_take_the_suggestion():
    labels = ("hate", "offensive", "neither")
    rng = np.random.default_rng(0)
    right = [simulated_answer("hate", labels, None, 0.75, rng) for _ in range(2000)]
    assert 0.72 < right.count("hate") / 2000 < 0.78 and set(right) == {"hate", "offensive"}  # never "neither"
    copied = [simulated_answer("neither", labels, "offensive", 0.0, rng) for _ in range(50)]
    assert set(copied) == {"offensive"}  # a wrong pre-label is what a tired reviewer accepts
    assert simulated_answer(None, labels, "hate", 0.9, rng) == "hate"  # an item without gold: the suggestion
    assert simulated_answer(None, labels, None, 1, rng) == "neither"


def test_the_suggestion_shown_is_the_current_versions_choice_and_audit_items_show_none():
    def prediction(pid: int, version: str, choice: str | None) -> dict:
        result = [{"value": {"choices": [choice]}}] if choice else []
        return {"id": pid, "model_version": version, "result": result}

    task = {"predictions": [prediction(1, "m:v1", "hate"), prediction(2, "m:v2", "neither")]}
    assert shown_suggestion(task, "m:v2") == (2, "neither") and shown_suggestion(task, "m:v3") == (None, None)
    assert shown_suggestion({"predictions": [prediction(3, "m:v2", None)]}, "m:v2") == (None, None)


class FinishedJobs:
    """The little of a service `_finish_round` uses: one retrain job, already done, whose gate refused."""

    GATE = "macro-F1 gain +0.0004 [-0.0031, +0.0040]: the lower bound does not clear gate_min_gain 0.0"

    def __init__(self):
        job = SimpleNamespace(id="job-1", created_at="2026-01-01T00:00:01", state="done", error=None, result={
            "labels": 130, "trained_version": "labelloop-hate-offensive:v2", "macro_f1": 0.6123, "promoted": False,
            "gate_reason": self.GATE, "champion": "labelloop-hate-offensive:v1",
            "queue": {"queued_task_ids": [1203, 1204, 1205, 1206]}})
        self.runner = SimpleNamespace(list=lambda limit: [job], submit=lambda reason: job,
                                      wait=lambda job_id, timeout: job)

    def reconcile_once(self) -> dict:
        return {"applied": 0}


def test_without_a_terminal_steps_are_timestamped_lines_as_they_happen_and_the_table_keeps_its_width():
    """`make demo` under CI or nohup was silent for minutes, then printed its table squeezed to 80 columns."""
    out = io.StringIO()
    steps = steps_for(Console(file=out))  # a file is no terminal, like a pipe or nohup's log
    steps.heartbeat_seconds = 0.05
    with steps.step("loading davidson"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ loading davidson …\n", out.getvalue())
        time.sleep(0.3)
    beats = [line for line in out.getvalue().splitlines() if "still running after" in line]
    assert beats and all(line.endswith(": loading davidson") for line in beats)
    steps.heartbeat_seconds = 60
    table = Table(title="active-learning rounds")
    for col in ("round", "labels", "trained", "macro-F1 (frozen eval)", "gate", "champion", "queue head"):
        table.add_column(col)
    _finish_round(FinishedJobs(), table, "1", "2026-01-01T00:00:00", steps)
    steps.print_table(table)

    lines = out.getvalue().splitlines()
    stamped = [line for line in lines if re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line)]
    messages = [line[21:] for line in stamped if "still running" not in line]
    assert messages[0] == "loading davidson …" and re.fullmatch(r"done in \d+\.\d s: loading davidson", messages[1])
    assert messages[2].startswith("round 1: retraining") and messages[3].startswith("done in")
    assert messages[4].startswith("round: 1; labels: 130;") and f"gate: refused: {FinishedJobs.GATE};" in messages[4]
    assert "[yellow]" not in messages[4]  # no markup in a log
    assert [line[:20] for line in stamped] == sorted(line[:20] for line in stamped)
    assert all(not line.startswith(tuple("┏┃┡│└")) for line in lines[: len(stamped)])  # lines came before the table
    row = next(line for line in lines if line.startswith("│ 1 "))
    assert len(row) > 80 and "labelloop-hate-offensive:v2" in row and "1203, 1204, 1205" in row
    assert FinishedJobs.GATE[:50] in row  # the gate's reason on one line, not wrapped into a narrow column
