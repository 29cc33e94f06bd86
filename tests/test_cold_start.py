"""A new project gets a cold start from a plain round (issue 8, item 6).

With no model yet, a round (``labelloop loop round``, or the service's retrain job) puts diverse items
(k-means over the encoder's embeddings) at the front of the queue: review priorities with an empty
result, so reviewers see no pre-label. The queue is not pushed again while its items wait; once a
champion exists the normal path ranks the pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import SecretStr
from rich.console import Console
from typer.testing import CliRunner

from active_learning.labelstudio import PriorityIn
from active_learning.loop import ActiveLearningLoop, QueueResult, next_cold_start_version
from active_learning.service import Service
from labelloop import cli
from labelloop.config import Settings, get_settings
from labelloop.journal import Journal
from labelloop.taxonomy import get_taxonomy, label_config_xml
from tests.label_studio_fixtures import RunningLabelStudio, wait_for

TAXONOMY = get_taxonomy("hate_offensive")
PROJECT = 7
NOT_ENOUGH = "not enough labels: need two classes"


def test_each_cold_start_queue_gets_a_version_numbered_after_the_projects_earlier_ones():
    assert next_cold_start_version([]) == "cold-start-1"
    assert next_cold_start_version(["labelloop-hate-offensive:v3", "cold-start-1", "cold-start-4",
                                    "cold-start-x"]) == "cold-start-5"


def test_a_priority_carries_no_pre_label():
    assert PriorityIn(task_id=3, score=0.01, model_version="cold-start-1").to_ls() == {
        "task": 3, "model_version": "cold-start-1", "score": 0.01, "result": []}


class FakeLabelStudio:
    """What a round asks of Label Studio, kept in memory: tasks, predictions, the project's model_version."""

    def __init__(self) -> None:
        self.stored: list[dict[str, Any]] = []
        self.model_version: str | None = None
        self.sdk = SimpleNamespace(projects=SimpleNamespace(
            get=lambda project_id: SimpleNamespace(model_version=self.model_version)))

    def import_tasks(self, project_id: int, items: pd.DataFrame) -> dict[str, int]:
        return {str(item_id): 1000 + n for n, item_id in enumerate(items["id"])}

    def model_versions(self, project_id: int) -> dict[str, int]:
        return pd.Series([p["model_version"] for p in self.stored], dtype=object).value_counts().to_dict()

    def import_predictions(self, project_id: int, predictions: list[PriorityIn]) -> int:
        have = {(p["task"], p["model_version"]) for p in self.stored}
        new = [p.to_ls() for p in predictions if (p.task_id, p.model_version) not in have]
        self.stored += new
        return len(new)

    def set_model_version(self, project_id: int, model_version: str) -> None:
        self.model_version = model_version

    def predictions(self, project_id: int) -> list[dict[str, Any]]:
        return list(self.stored)


def label(journal: Journal, task_ids: list[int], label: str, first_id: int) -> None:
    for n, task_id in enumerate(task_ids):
        journal.record({
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": first_id + n, "task": task_id, "project": PROJECT, "completed_by": 1,
                           "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                       "value": {"choices": [label]}}],
                           "was_cancelled": False, "ground_truth": False, "lead_time": 2.0,
                           "created_at": "2026-01-01T10:00:00Z", "updated_at": "2026-01-01T10:00:00Z"},
            "task": {"id": task_id, "data": {"text": f"reviewed text {task_id}"}, "project": PROJECT},
            "project": {"id": PROJECT, "label_config": label_config_xml(TAXONOMY)},
        })


@pytest.fixture
def cold_loop(settings: Settings, davidson_small) -> Iterator[tuple[ActiveLearningLoop, FakeLabelStudio, dict]]:
    fake = FakeLabelStudio()
    champion: dict[str, Any] = {"loaded": None}
    with Journal(settings.journal_path, TAXONOMY) as journal:
        loop = ActiveLearningLoop(settings.model_copy(update={"query_batch": 5}), fake, PROJECT, journal,
                                  champion=lambda: champion["loaded"])
        loop.import_pool(davidson_small.frame[["id", "text"]].head(40))
        yield loop, fake, champion


def test_rounds_without_a_model_push_one_cold_start_queue_at_a_time_then_the_champion_takes_over(cold_loop):
    loop, fake, champion = cold_loop

    first = loop.run_round()
    assert first.gate_reason == NOT_ENOUGH and first.champion is None
    assert first.cold_start == "cold start: pushed 5 diverse items (cold-start-1)"
    assert first.queue.strategy == "cold_start" and first.queue.pushed == 5
    queued = first.queue.queued_task_ids
    assert len(set(queued)) == 5 and set(queued) <= set(loop.pool()["task_id"])
    assert fake.model_version == "cold-start-1"
    assert [p["task"] for p in fake.stored] == queued and all(p["result"] == [] for p in fake.stored)
    scores = [p["score"] for p in fake.stored]
    assert scores == sorted(scores) and len(set(scores)) == 5 and max(scores) < 1 / len(TAXONOMY.labels)

    # nothing new is pushed while the queue's items wait, even when some were labeled
    label(loop.journal, queued[:2], "neither", first_id=1)
    again = loop.run_round()
    assert again.queue is None and again.cold_start == "cold start: 3 diverse items of cold-start-1 are still queued"
    assert len(fake.stored) == 5

    # used up, and one class is still not enough for a model: the next queue, of other items
    label(loop.journal, queued[2:], "neither", first_id=3)
    refill = loop.run_round()
    assert refill.gate_reason == NOT_ENOUGH
    assert refill.cold_start == "cold start: pushed 5 diverse items (cold-start-2)"
    assert fake.model_version == "cold-start-2" and not set(refill.queue.queued_task_ids) & set(queued)

    # a champion exists: the normal path ranks the pool, no cold start
    ranked = QueueResult("labelloop-hate-offensive:v1", "margin", 30, [1001], 1, 0.1)

    def push_queue(loaded, progress=None):
        loop.pool_predictions = pd.Series(np.zeros(30, dtype=int))
        return ranked

    loop.push_queue = push_queue
    champion["loaded"] = SimpleNamespace(ref=SimpleNamespace(label="labelloop-hate-offensive:v1"))
    taken_over = loop.run_round()
    assert taken_over.cold_start is None and taken_over.queue is ranked
    assert taken_over.champion == "labelloop-hate-offensive:v1"


def test_a_round_without_a_pool_says_so_and_pushes_nothing(settings: Settings):
    fake = FakeLabelStudio()
    with Journal(settings.journal_path, TAXONOMY) as journal:
        result = ActiveLearningLoop(settings, fake, PROJECT, journal, champion=lambda: None).run_round()
    assert result.queue is None and "no pool imported for project 7" in result.cold_start
    assert fake.stored == []


@pytest.mark.integration
def test_loop_round_on_a_fresh_project_pushes_the_cold_start_queue_that_next_serves(
        tmp_path: Path, embedding_cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
        label_studio: RunningLabelStudio, ls_project: int, davidson_small):
    env = {"MLRUNS_DIR": tmp_path / "mlruns", "STATE_DIR": tmp_path / "var", "CACHE_DIR": embedding_cache_dir,
           "CONFIG": tmp_path / "no-such.toml", "LS_URL": label_studio.url, "LS_API_KEY": label_studio.api_key,
           "LS_PROJECT_ID": ls_project, "QUERY_BATCH": 8, "RECONCILE_SECONDS": 0}
    for name, value in env.items():
        monkeypatch.setenv(f"LABELLOOP_{name}", str(value))
    monkeypatch.setattr(cli, "console", Console(width=250))
    get_settings.cache_clear()
    settings = get_settings()
    client = label_studio.client
    client.use_uncertainty_sampling(ls_project)
    with Journal(settings.journal_path, TAXONOMY) as journal:
        ActiveLearningLoop(settings, client, ls_project, journal).import_pool(davidson_small.frame[["id", "text"]]
                                                                              .head(30))

    result = CliRunner().invoke(cli.app, ["loop", "round"])
    assert result.exit_code == 0, result.output
    assert "cold start: pushed 8 diverse items (cold-start-1)" in result.output
    stored = client.predictions(ls_project)
    assert len(stored) == 8 and {p["model_version"] for p in stored} == {"cold-start-1"}
    assert all(p["result"] == [] for p in stored)  # nothing for the labeling screen to pre-select
    assert label_studio.sdk.projects.get(ls_project).model_version == "cold-start-1"
    head = min(stored, key=lambda p: p["score"])["task"]
    served = client.next_task(ls_project)
    assert served["id"] == head and served["id"] in {p["task"] for p in stored}

    # the service, starting with no champion, runs the same round as a retrain job: the queue is still
    # waiting, so nothing is pushed again
    service = Service(settings.model_copy(update={"basic_user": "ls", "basic_password": SecretStr("pw-123456")}))
    try:
        service.start_background()
        wait_for(lambda: [j.state for j in service.runner.list(limit=5)] == ["done"], "the round at start")
        (job,) = service.runner.list(limit=5)
        assert job.reason == "no champion yet: cold-start queue"
        assert job.result["cold_start"] == "cold start: 8 diverse items of cold-start-1 are still queued"
    finally:
        service.close()
    assert len(client.predictions(ls_project)) == 8
    get_settings.cache_clear()
