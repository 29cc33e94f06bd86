"""The ML backend against a real Label Studio server and a real MLflow SQLite store (temp dirs, 127.0.0.1).

Label Studio connects with HTTP Basic credentials, pulls pre-labels from the registry's champion through
the Data Manager's "retrieve predictions" action, follows the champion to a new version without a
restart, and delivers annotation webhooks into the journal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from labelloop import data
from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy
from serving.app import create_app
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from training.registry import Registry
from training.train import TrainResult, train_and_register

pytestmark = pytest.mark.integration

TAXONOMY = get_taxonomy("hate_offensive")
USER, PASSWORD = "label-studio", "backend-pass-123"


class ServerThread:
    """Our app under uvicorn, in a thread, on a free 127.0.0.1 port; stopped on exit."""

    def __init__(self, app: FastAPI, port: int):
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="labelloop-backend", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "the backend to start")
        assert self.thread.is_alive(), "the backend thread died while starting"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the backend did not stop"


@pytest.fixture
def backend_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "taxonomy": TAXONOMY.name, "basic_user": USER, "basic_password": SecretStr(PASSWORD),
        "poll_seconds": 1.0, "host": "127.0.0.1", "port": free_port()})


@pytest.fixture
def splits(davidson: data.LabeledData) -> data.Splits:
    return data.split(davidson, seed=0)


def train(settings: Settings, splits: data.Splits, rows: int, seed: int) -> TrainResult:
    """A fast-mode model (frozen MiniLM + logistic regression) on a small slice of real Davidson."""
    return train_and_register(data.stratified_sample(splits.train, rows, seed=seed), None, TAXONOMY,
                              mode="fast", settings=settings, source=f"serving-it-{seed}",
                              eval_frame=data.stratified_sample(splits.validation, 200, seed=0))


def predictions_of(label_studio: RunningLabelStudio, project: int, version: str) -> list[dict]:
    return [p for p in label_studio.client.predictions(project) if p["model_version"] == version]


@pytest.fixture
def backend(backend_settings: Settings) -> Iterator[tuple[ServerThread, Journal]]:
    with Journal(backend_settings.journal_path, TAXONOMY) as journal:
        app = create_app(backend_settings, journal=journal)
        with ServerThread(app, backend_settings.port) as server:
            yield server, journal


def test_label_studio_pre_labels_from_the_champion_and_follows_promotions(
        label_studio: RunningLabelStudio, ls_project: int, backend_settings: Settings, splits: data.Splits,
        backend: tuple[ServerThread, Journal]):
    server, journal = backend
    registry = Registry(backend_settings)
    auth = httpx.BasicAuth(USER, PASSWORD)
    assert httpx.get(f"{server.url}/health").status_code == 401
    assert httpx.get(f"{server.url}/health", auth=auth).json()["model_loaded"] is False

    first = train(backend_settings, splits, rows=300, seed=1)
    assert registry.promote(first.ref.version).promoted
    wait_for(lambda: httpx.get(f"{server.url}/health", auth=auth).json()["model_version"] == first.ref.label,
             "the poll to load the first champion")

    items = splits.test.sample(20, random_state=3)[["id", "text"]].reset_index(drop=True)
    task_ids = label_studio.client.import_tasks(ls_project, items)
    label_studio.client.connect_backend(ls_project, server.url, basic_auth=(USER, PASSWORD))
    label_studio.client.retrieve_predictions(ls_project)
    wait_for(lambda: len(predictions_of(label_studio, ls_project, first.ref.label)) == 20,
             f"20 predictions of {first.ref.label}")
    v1 = predictions_of(label_studio, ls_project, first.ref.label)

    expected = registry.load(first.ref.version).classifier.predict_proba(items["text"].tolist())
    by_task = {task_ids[str(item_id)]: row for item_id, row in zip(items["id"], expected, strict=True)}
    for p in v1:
        (region,) = p["result"]
        assert region["from_name"] == "label" and region["to_name"] == "text" and region["type"] == "choices"
        row = by_task[p["task"]]
        assert region["value"]["choices"] == [TAXONOMY.labels[int(row.argmax())]]
        assert p["score"] == pytest.approx(float(row.max()), abs=1e-5)

    second = train(backend_settings, splits, rows=500, seed=2)
    assert registry.promote(second.ref.version, force=True).promoted
    reload = httpx.post(f"{server.url}/reload", auth=auth).json()  # the poll may have swapped already
    assert reload["model_version"] == second.ref.label
    label_studio.client.retrieve_predictions(ls_project)
    wait_for(lambda: len(predictions_of(label_studio, ls_project, second.ref.label)) == 20,
             f"20 predictions of {second.ref.label}")
    v2 = predictions_of(label_studio, ls_project, second.ref.label)
    assert {p["task"] for p in v2} == set(task_ids.values())
    assert second.ref.label.endswith(":v2") and first.ref.label.endswith(":v1")

    # a reviewer's annotation reaches the journal through Label Studio's webhook (with basic auth)
    task_id = next(iter(task_ids.values()))
    label_studio.client.create_annotation(task_id, "offensive")
    wait_for(lambda: not journal.labels().empty, "the annotation webhook")
    assert journal.labels()[["task_id", "label"]].values.tolist() == [[task_id, "offensive"]]

    # everything Label Studio sent was answered without a server error
    metrics = httpx.get(f"{server.url}/metrics/prometheus", auth=auth).text
    calls = [s for f in text_string_to_metric_families(metrics) if f.name == "labelloop_http_requests"
             for s in f.samples if s.name == "labelloop_http_requests_total"]
    by_route = {(s.labels["route"], s.labels["status"]): s.value for s in calls}
    assert not [k for k in by_route if k[1].startswith("5")], by_route
    for route in ("/health", "/setup", "/predict", "/webhook"):
        assert by_route.get((route, "200" if route != "/webhook" else "201"), 0) > 0, by_route
