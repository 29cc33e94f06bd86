"""LabelStudioServer lifecycle and LabelStudioClient against a real Label Studio 1.23 server.

The central claim proved here: with uncertainty sampling, ``/api/projects/<id>/next/`` serves the task whose
prediction of the project's current model_version has the lowest score, and follows a new model_version.
"""

from __future__ import annotations

import base64
import json
import stat
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from active_learning.labelstudio import (
    InvalidPredictionError,
    LabelStudioClient,
    LabelStudioError,
    PredictionIn,
    choice_result,
)
from labelloop.data import LabeledData
from labelloop.ls_server import CREDENTIALS_FILE, LabelStudioServer, LabelStudioServerError, free_port
from labelloop.taxonomy import FROM_NAME, TO_NAME, LabelConfigError, get_taxonomy, parse_label_config
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.local_http import LocalHTTPServer

HATE_OFFENSIVE = get_taxonomy("hate_offensive")


# --- LabelStudioServer, without starting it ---------------------------------------------------------
def test_credentials_are_generated_once_private_and_reused(tmp_path: Path) -> None:
    first = LabelStudioServer(base_dir=tmp_path / "ls").credentials()
    path = tmp_path / "ls" / CREDENTIALS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = LabelStudioServer(base_dir=tmp_path / "ls", port=9999).credentials()
    assert again == first
    other = LabelStudioServer(base_dir=tmp_path / "other").credentials()
    assert other.token != first.token and other.password != first.password
    assert other.secret_key != first.secret_key
    assert len(first.token) >= 30 and len(first.password) >= 18


def test_environment_carries_the_stored_secrets_and_local_backend_settings(tmp_path: Path) -> None:
    server = LabelStudioServer(base_dir=tmp_path / "ls")
    env = server.environment()
    creds = server.credentials()
    assert env["LABEL_STUDIO_USER_TOKEN"] == creds.token == server.api_key
    assert env["SECRET_KEY"] == creds.secret_key
    assert env["LABEL_STUDIO_BASE_DATA_DIR"] == str((tmp_path / "ls").resolve())
    assert env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert env["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"


def test_credentials_of_another_user_or_corrupt_file_are_refused(tmp_path: Path) -> None:
    LabelStudioServer(base_dir=tmp_path, username="a@example.org").credentials()
    with pytest.raises(LabelStudioServerError, match="belongs to user"):
        LabelStudioServer(base_dir=tmp_path, username="b@example.org").credentials()
    (tmp_path / CREDENTIALS_FILE).write_text("{not json")
    with pytest.raises(LabelStudioServerError, match="unreadable"):
        LabelStudioServer(base_dir=tmp_path).credentials()


def test_start_without_label_studio_installed_says_how_to_install(tmp_path: Path) -> None:
    server = LabelStudioServer(base_dir=tmp_path, venv=tmp_path / "no-venv")
    with pytest.raises(LabelStudioServerError, match="make install"):
        server.start(timeout=5)
    assert server.pid is None


def test_prediction_input_is_validated() -> None:
    ok = PredictionIn(task_id=3, label="hate", score=0.25, model_version="m:v1")
    assert ok.to_ls() == {"task": 3, "model_version": "m:v1", "score": 0.25, "result": choice_result("hate")}
    for bad in (
        {"task_id": 3, "label": "hate", "score": float("nan"), "model_version": "m:v1"},
        {"task_id": 3, "label": "", "score": 0.1, "model_version": "m:v1"},
        {"task_id": 0, "label": "hate", "score": 0.1, "model_version": "m:v1"},
        {"task_id": 3, "label": "hate", "score": 0.1, "model_version": ""},
        {"task_id": 3, "label": "hate", "score": 0.1, "model_version": "m", "extra": 1},
    ):
        with pytest.raises(ValidationError):
            PredictionIn(**bad)


def test_unreachable_server_is_a_clear_error() -> None:
    client = LabelStudioClient(f"http://127.0.0.1:{free_port()}", "not-a-real-token")
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio"):
        client.ensure_project("x", HATE_OFFENSIVE)


# --- against the real server ------------------------------------------------------------------------
def _rows(data: LabeledData, n: int, offset: int = 0) -> pd.DataFrame:
    return data.frame.iloc[offset : offset + n][["id", "text"]].reset_index(drop=True)


def _predictions(task_ids: list[int], scores: list[float], version: str) -> list[PredictionIn]:
    labels = HATE_OFFENSIVE.labels
    return [
        PredictionIn(task_id=t, label=labels[i % len(labels)], score=s, model_version=version)
        for i, (t, s) in enumerate(zip(task_ids, scores, strict=True))
    ]


def _task_count(ls: RunningLabelStudio, project_id: int) -> int:
    return len(list(ls.sdk.tasks.list(project=project_id, fields="task_only")))


@pytest.mark.integration
def test_the_session_server_is_healthy_and_runs_as_its_own_process(label_studio: RunningLabelStudio) -> None:
    assert label_studio.server.is_up()
    assert label_studio.server.pid is not None
    assert label_studio.url == label_studio.client.url
    whoami = label_studio.sdk.users.whoami()
    assert whoami.email == label_studio.server.username


@pytest.mark.integration
def test_ensure_project_is_idempotent_and_checks_labels(label_studio: RunningLabelStudio) -> None:
    client = label_studio.client
    title = f"labelloop-{uuid.uuid4().hex[:8]}"
    project_id = client.ensure_project(title, HATE_OFFENSIVE, description="test")
    try:
        assert client.ensure_project(title, HATE_OFFENSIVE) == project_id
        same_title = [p.id for p in label_studio.sdk.projects.list(title=title) if p.title == title]
        assert same_title == [project_id]
        control = parse_label_config(label_studio.sdk.projects.get(project_id).label_config)
        assert control.labels == HATE_OFFENSIVE.labels
        assert (control.from_name, control.to_name) == (FROM_NAME, TO_NAME)
        with pytest.raises(LabelConfigError, match="has choices"):
            client.ensure_project(title, get_taxonomy("spam"))
    finally:
        label_studio.sdk.projects.delete(project_id)


@pytest.mark.integration
def test_import_tasks_is_idempotent(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData
) -> None:
    client = label_studio.client
    first = _rows(davidson_small, 30)
    mapping = client.import_tasks(ls_project, first, chunk_size=7)
    assert list(mapping) == list(first["id"])
    assert len(set(mapping.values())) == 30

    both = _rows(davidson_small, 40)  # the same 30 again, plus 10 new ones
    mapping2 = client.import_tasks(ls_project, both)
    assert {k: mapping2[k] for k in mapping} == mapping
    assert _task_count(label_studio, ls_project) == 40
    assert client.task_ids(ls_project) == mapping2

    texts = dict(zip(both["id"], both["text"], strict=True))
    some = label_studio.sdk.tasks.get(mapping2[both["id"][35]])
    # text_masked: what reviewers see by default; this client has no lexicon, so it is the text itself
    assert some.data == {"text": texts[both["id"][35]], "text_masked": texts[both["id"][35]],
                         "item_id": both["id"][35]}


@pytest.mark.integration
def test_import_tasks_rejects_bad_items_before_writing(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData
) -> None:
    client = label_studio.client
    rows = _rows(davidson_small, 5)
    with pytest.raises(ValueError, match="duplicate item ids"):
        client.import_tasks(ls_project, pd.concat([rows, rows.iloc[:1]]))
    blank = rows.copy()
    blank.loc[3, "text"] = "   "
    with pytest.raises(ValueError, match="no text"):
        client.import_tasks(ls_project, blank)
    with pytest.raises(ValueError, match="column"):
        client.import_tasks(ls_project, rows[["id"]])
    assert _task_count(label_studio, ls_project) == 0


@pytest.mark.integration
def test_predictions_round_trip_without_duplicates(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData
) -> None:
    client = label_studio.client
    task_ids = list(client.import_tasks(ls_project, _rows(davidson_small, 6)).values())
    pushed = _predictions(task_ids, [0.61, 0.12, 0.93, 0.47, 0.05, 0.78], "labelloop:v1")
    assert client.import_predictions(ls_project, pushed, chunk_size=4) == 6

    stored = {p["task"]: p for p in client.predictions(ls_project)}
    assert set(stored) == set(task_ids)
    for p in pushed:
        got = stored[p.task_id]
        assert got["model_version"] == "labelloop:v1"
        assert got["score"] == pytest.approx(p.score)
        assert got["result"] == choice_result(p.label)

    assert client.import_predictions(ls_project, pushed) == 0  # same version again: nothing added
    assert len(client.predictions(ls_project)) == 6


@pytest.mark.integration
def test_bad_predictions_are_refused_and_nothing_is_written(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData
) -> None:
    client = label_studio.client
    task_ids = list(client.import_tasks(ls_project, _rows(davidson_small, 3)).values())
    good = _predictions(task_ids, [0.1, 0.2, 0.3], "v1")
    unknown_label = PredictionIn(task_id=task_ids[0], label="spam", score=0.5, model_version="v1")
    unknown_task = PredictionIn(task_id=max(task_ids) + 10_000, label="hate", score=0.5, model_version="v1")
    wrong_control = PredictionIn(task_id=task_ids[0], label="hate", score=0.5, model_version="v1", from_name="x")
    with pytest.raises(InvalidPredictionError, match="'spam'"):
        client.import_predictions(ls_project, [*good, unknown_label], chunk_size=1)
    with pytest.raises(InvalidPredictionError, match="not in project"):
        client.import_predictions(ls_project, [*good, unknown_task], chunk_size=1)
    with pytest.raises(InvalidPredictionError, match="targets x->text"):
        client.import_predictions(ls_project, [*good, wrong_control], chunk_size=1)
    assert client.predictions(ls_project) == []
    with pytest.raises(LabelStudioError, match="Model version doesn't exist"):
        client.set_model_version(ls_project, "v1")


@pytest.mark.integration
def test_uncertainty_sampling_serves_lowest_current_score_first(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData
) -> None:
    client = label_studio.client
    task_ids = list(client.import_tasks(ls_project, _rows(davidson_small, 8)).values())
    client.use_uncertainty_sampling(ls_project)

    # v1 priorities: lowest on the 6th task, then the 3rd; the first task (what "sequential" would serve)
    # is in the middle. An older version with even lower scores on other tasks must not count.
    v1 = [0.50, 0.80, 0.20, 0.70, 0.60, 0.10, 0.90, 0.40]
    client.import_predictions(ls_project, _predictions(task_ids, v1, "m:v1"))
    old = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08]
    client.import_predictions(ls_project, _predictions(task_ids[:2] + task_ids[6:], old[:4], "m:v0"))
    client.set_model_version(ls_project, "m:v1")
    project = label_studio.sdk.projects.get(ls_project)
    assert (project.sampling, project.model_version) == ("Uncertainty sampling", "m:v1")

    first = client.next_task(ls_project)
    assert first is not None and first["id"] == task_ids[5]
    assert [p["model_version"] for p in first["predictions"]] == ["m:v1"]  # the pre-label shown
    client.create_annotation(first["id"], "hate")

    second = client.next_task(ls_project)
    assert second is not None and second["id"] == task_ids[2]
    client.create_annotation(second["id"], "neither")

    # A retrained model re-ranks the rest: the last task is now the most informative.
    v2 = [0.30, 0.50, 0.99, 0.40, 0.35, 0.99, 0.05, 0.20]
    client.import_predictions(ls_project, _predictions(task_ids, v2, "m:v2"))
    client.set_model_version(ls_project, "m:v2")
    third = client.next_task(ls_project)
    assert third is not None and third["id"] == task_ids[6]
    client.create_annotation(third["id"], "offensive")
    fourth = client.next_task(ls_project)
    assert fourth is not None and fourth["id"] == task_ids[7]

    # The Data Manager's "Prediction score" column shows the current version's score, sortable.
    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    listed = label_studio.sdk.tasks.list(project=ls_project, fields="task_only", query=query)
    scores = {t.id: t.predictions_score for t in listed}
    assert scores[task_ids[0]] == pytest.approx(0.30)
    assert [t.id for t in label_studio.sdk.tasks.list(project=ls_project, query=query)][:3] == [
        task_ids[6],
        task_ids[7],
        task_ids[0],
    ]


@pytest.mark.integration
def test_next_task_is_none_when_everything_is_labelled(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData
) -> None:
    client = label_studio.client
    (task_id,) = client.import_tasks(ls_project, _rows(davidson_small, 1)).values()
    client.create_annotation(task_id, "neither")
    assert client.next_task(ls_project) is None


@pytest.mark.integration
def test_annotations_round_trip(label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData) -> None:
    client = label_studio.client
    rows = _rows(davidson_small, 4)
    mapping = client.import_tasks(ls_project, rows)
    labelled = client.create_annotation(mapping[rows["id"][1]], "offensive", lead_time=2.5)
    skipped = client.create_annotation(mapping[rows["id"][3]], "neither", was_cancelled=True)

    pairs = list(client.annotations(ls_project))
    by_id = {a["id"]: (a, t) for a, t in pairs}
    assert set(by_id) == {labelled["id"], skipped["id"]}
    annotation, task = by_id[labelled["id"]]
    assert annotation["result"] == choice_result("offensive")
    assert annotation["task"] == task["id"] == mapping[rows["id"][1]]
    assert task["data"] == {"text": rows["text"][1], "text_masked": rows["text"][1], "item_id": rows["id"][1]}
    assert annotation["was_cancelled"] is False
    assert by_id[skipped["id"]][0]["was_cancelled"] is True


# --- ML backend connection: a stand-in for the serving process ---------------------------------------
class FakeBackend:
    """The ML backend protocol as Label Studio uses it, behind basic auth; it records what it receives."""

    MODEL_VERSION = "fake:v7"

    def __init__(self, user: str, password: str):
        self.expected_auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.webhooks: list[dict[str, Any]] = []
        self.predicted_task_ids: list[int] = []
        self.refused = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == backend.expected_auth:
                    return True
                backend.refused += 1
                self._reply(401, {"error": "unauthorized"})
                return False

            def do_GET(self) -> None:
                if self._authorized():
                    self._reply(200, {"status": "UP", "model_class": "FakeBackend"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not self._authorized():
                    return
                if self.path == "/setup":
                    self._reply(200, {"model_version": FakeBackend.MODEL_VERSION})
                elif self.path == "/predict":
                    tasks = body["tasks"]
                    backend.predicted_task_ids += [t["id"] for t in tasks]
                    one = {"model_version": FakeBackend.MODEL_VERSION, "score": 0.42}
                    results = [{**one, "result": choice_result("hate")} for _ in tasks]
                    self._reply(200, {"results": results})
                elif self.path == "/webhook":
                    backend.webhooks.append(body)
                    self._reply(200, {"status": "ok"})
                else:
                    self._reply(404, {"error": self.path})

        self._server = LocalHTTPServer(Handler)
        self.url = self._server.base_url

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def fake_backend() -> Iterator[FakeBackend]:
    backend = FakeBackend("ls", "s3cret")
    try:
        yield backend
    finally:
        backend.close()


@pytest.mark.integration
def test_connect_backend_once_events_arrive_once_and_predictions_are_retrieved(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData, fake_backend: FakeBackend
) -> None:
    client = label_studio.client
    rows = _rows(davidson_small, 3)
    mapping = client.import_tasks(ls_project, rows)
    with pytest.raises(LabelStudioError, match="no ML backend"):
        client.retrieve_predictions(ls_project)

    backend_id = client.connect_backend(ls_project, fake_backend.url, basic_auth=("ls", "s3cret"))
    # a stale second registration of the same hook (e.g. made by hand) would deliver every event twice
    label_studio.sdk.webhooks.create(
        project=ls_project, url=f"{fake_backend.url}/webhook", send_payload=True, send_for_all_actions=True
    )
    again = client.connect_backend(ls_project, fake_backend.url + "/", basic_auth=("ls", "s3cret"))
    assert again == backend_id
    assert [b.id for b in label_studio.sdk.ml.list(project=ls_project)] == [backend_id]
    hooks = [h for h in label_studio.sdk.webhooks.list(project=str(ls_project)) if h.project == ls_project]
    assert [h.url for h in hooks] == [f"{fake_backend.url}/webhook"]

    annotation = client.create_annotation(mapping[rows["id"][0]], "hate")

    def created() -> list[int]:
        return [e["annotation"]["id"] for e in fake_backend.webhooks if e.get("action") == "ANNOTATION_CREATED"]

    wait_for(lambda: created() == [annotation["id"]], "the annotation webhook")
    assert fake_backend.refused == 0

    client.retrieve_predictions(ls_project, task_ids=[mapping[rows["id"][1]]])
    assert fake_backend.predicted_task_ids == [mapping[rows["id"][1]]]
    stored = client.predictions(ls_project)
    assert [(p["task"], p["model_version"], p["score"]) for p in stored] == [
        (mapping[rows["id"][1]], FakeBackend.MODEL_VERSION, pytest.approx(0.42))
    ]
