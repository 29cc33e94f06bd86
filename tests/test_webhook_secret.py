"""The optional webhook secret: a wrong or missing ``X-Labelloop-Webhook-Secret`` gets 401 and nothing is
journaled; ``connect_backend`` makes Label Studio send it, and a real annotation's webhook arrives with it."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy
from serving.app import create_app
from serving.auth import WEBHOOK_SECRET_HEADER
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.test_serving import TABLES, FakeSource, KeywordClassifier, annotation_event
from tests.test_serving_integration import ServerThread

SECRET = "hook-secret-8f2b"
USER, PASSWORD = "label-studio", "backend-pass-123"
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}


@pytest.fixture
def journal(settings: Settings) -> Iterator[Journal]:
    with Journal(settings.journal_path, get_taxonomy("hate_offensive")) as j:
        yield j


def _client(settings: Settings, journal: Journal, **overrides) -> TestClient:
    app = create_app(settings.model_copy(update={"poll_seconds": 0, **overrides}),
                     model_source=FakeSource({1: KeywordClassifier(TABLES[1])}), journal=journal)
    return TestClient(app)


@pytest.mark.parametrize("headers", [{}, {WEBHOOK_SECRET_HEADER: "wrong"}, {WEBHOOK_SECRET_HEADER: ""}],
                         ids=["missing", "wrong", "empty"])
def test_a_webhook_without_the_right_secret_is_refused_and_never_journaled(
        settings: Settings, journal: Journal, headers: dict):
    with _client(settings, journal, webhook_secret=SecretStr(SECRET)) as client:
        before = journal.last_event_id()
        r = client.post("/webhook", json=annotation_event(), headers=headers)
        assert r.status_code == 401
        assert WEBHOOK_SECRET_HEADER in r.json()["detail"] and "labelloop connect" in r.json()["detail"]
        assert SECRET not in r.text
        assert journal.last_event_id() == before and journal.labels().empty


def test_the_right_secret_is_journaled_and_other_routes_do_not_need_it(settings: Settings, journal: Journal):
    with _client(settings, journal, webhook_secret=SecretStr(SECRET)) as client:
        r = client.post("/webhook", json=annotation_event(), headers={WEBHOOK_SECRET_HEADER: SECRET})
        assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
        assert journal.labels()["label"].tolist() == ["hate"]
        assert client.get("/health").status_code == 200
        assert client.post("/v1/predict", json={"texts": ["damn"]}).status_code == 200


def test_the_secret_comes_on_top_of_the_backend_credentials(settings: Settings, journal: Journal):
    with _client(settings, journal, webhook_secret=SecretStr(SECRET), basic_user=USER,
                 basic_password=SecretStr(PASSWORD)) as client:
        only_secret = client.post("/webhook", json=annotation_event(), headers={WEBHOOK_SECRET_HEADER: SECRET})
        only_basic = client.post("/webhook", json=annotation_event(), headers=BASIC)
        assert only_secret.status_code == 401 and only_basic.status_code == 401
        assert journal.labels().empty
        both = client.post("/webhook", json=annotation_event(), headers={**BASIC, WEBHOOK_SECRET_HEADER: SECRET})
        assert both.status_code == 201


def test_without_a_configured_secret_the_webhook_needs_no_header(settings: Settings, journal: Journal):
    with _client(settings, journal) as client:
        assert client.post("/webhook", json=annotation_event()).status_code == 201


@pytest.mark.integration
def test_label_studio_sends_the_secret_that_connect_sets_and_a_request_without_it_is_refused(
        label_studio: RunningLabelStudio, ls_project: int, settings: Settings, journal: Journal):
    backend = settings.model_copy(update={"poll_seconds": 0, "basic_user": USER, "basic_password": SecretStr(PASSWORD),
                                          "webhook_secret": SecretStr(SECRET)})
    app = create_app(backend, model_source=FakeSource({1: KeywordClassifier(TABLES[1])}), journal=journal)
    with ServerThread(app, free_port()) as server:
        (task_id,) = label_studio.client.create_tasks(ls_project, [("it-1", "some text to review")])
        label_studio.client.connect_backend(ls_project, server.url, basic_auth=(USER, PASSWORD),
                                            webhook_secret=SECRET)
        hooks = [h for h in label_studio.sdk.webhooks.list(project=str(ls_project)) if h.project == ls_project]
        assert len(hooks) == 1 and (hooks[0].headers or {}).get(WEBHOOK_SECRET_HEADER) == SECRET

        label_studio.client.create_annotation(task_id, "offensive")
        wait_for(lambda: not journal.labels().empty, "the annotation webhook")
        assert journal.labels()[["task_id", "label"]].values.tolist() == [[task_id, "offensive"]]

        before = journal.last_event_id()
        forged = httpx.post(f"{server.url}/webhook", auth=(USER, PASSWORD),
                            json=annotation_event(annotation_id=999, label="hate", task_id=task_id))
        assert forged.status_code == 401
        assert journal.last_event_id() == before
        assert journal.labels()["label"].tolist() == ["offensive"]
