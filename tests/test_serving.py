"""The ML backend in process: Label Studio protocol shapes, label-config binding, bad input, auth,
size limits, webhooks into a real journal, hot swaps under concurrent load, metrics.

Most tests serve a deterministic keyword classifier through a fake model source, so every expected
label and score is known exactly; one test serves a real embedding-head classifier trained on Davidson.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from labelloop.config import Settings
from labelloop.journal import Journal, RecordResult
from labelloop.taxonomy import get_taxonomy, label_config_xml
from serving.app import create_app
from serving.auth import AuthConfigError
from training.classifier import TextClassifier
from training.registry import LoadedModel, ModelRef

TAXONOMY = get_taxonomy("hate_offensive")
LABELS = TAXONOMY.labels  # hate, offensive, neither
CONFIG = label_config_xml(TAXONOMY)
NAME = "labelloop-test"

# per version: probabilities for texts containing "hate", containing "damn", and anything else
TABLES = {
    1: {"hate": (0.7, 0.2, 0.1), "damn": (0.1, 0.8, 0.1), "other": (0.1, 0.3, 0.6)},
    2: {"hate": (0.9, 0.05, 0.05), "damn": (0.05, 0.9, 0.05), "other": (0.02, 0.08, 0.9)},
    3: {"hate": (0.6, 0.3, 0.1), "damn": (0.2, 0.7, 0.1), "other": (0.2, 0.2, 0.6)},
}


def custom_config(labels: tuple[str, ...], from_name: str = "verdict", to_name: str = "tweet",
                  field: str = "content") -> str:
    choices = "".join(f'<Choice value="{label}"/>' for label in labels)
    return (f'<View><Header value="Review"/><Text name="{to_name}" value="${field}"/>'
            f'<Choices name="{from_name}" toName="{to_name}" choice="single">{choices}</Choices></View>')


class KeywordClassifier(TextClassifier):
    """Deterministic stand-in: fixed probabilities per keyword; records every call. With ``gate`` set,
    each call waits for it, so a test can hold a batch in flight."""

    kind = "keyword"

    def __init__(self, table: dict[str, tuple[float, float, float]], gate: threading.Event | None = None):
        self.table = table
        self.labels = LABELS
        self.max_length = 64
        self.gate = gate
        self.calls: list[list[str]] = []
        self.entered = threading.Event()

    def row(self, text: str) -> tuple[float, float, float]:
        lower = text.lower()
        return self.table["hate" if "hate" in lower else "damn" if "damn" in lower else "other"]

    def predict_proba(self, texts, batch_size=64, progress=None) -> np.ndarray:
        self.calls.append(list(texts))
        self.entered.set()
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("test gate never opened")
        return np.array([self.row(t) for t in texts], dtype=np.float32)

    def embed(self, texts, batch_size=64, progress=None) -> np.ndarray:
        return np.zeros((len(texts), 2), dtype=np.float32)

    def _save_weights(self, path: Path) -> dict:
        return {}


class FakeSource:
    """A registry with versions held in memory; ``champion`` is the alias, moved by tests."""

    model_name = NAME

    def __init__(self, classifiers: dict[int, TextClassifier], champion: int | None = 1,
                 check_texts: list[str] | None = None):
        self.classifiers = classifiers
        self.champion = champion
        self.texts = check_texts or []
        self.loads: list[int] = []

    def current_version(self) -> int | None:
        return self.champion

    def load(self, version: int) -> LoadedModel:
        self.loads.append(version)
        if version not in self.classifiers:
            raise FileNotFoundError(f"artifact of v{version} is missing")
        return LoadedModel(ModelRef(NAME, version), self.classifiers[version])

    def aliases(self) -> dict[str, int]:
        return {"champion": self.champion, "challenger": max(self.classifiers)} if self.champion else {}

    def versions(self) -> list[int]:
        return sorted(self.classifiers)

    def check_texts(self, limit: int) -> list[str]:
        return self.texts[:limit]


@pytest.fixture
def base_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"poll_seconds": 0})


@pytest.fixture
def journal(base_settings: Settings) -> Iterator[Journal]:
    with Journal(base_settings.journal_path, TAXONOMY) as j:
        yield j


@pytest.fixture
def source() -> FakeSource:
    return FakeSource({v: KeywordClassifier(t) for v, t in TABLES.items()}, champion=1)


@pytest.fixture
def make_client(base_settings: Settings, journal: Journal) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(source: FakeSource, on_event=None, **overrides: Any) -> TestClient:
        app = create_app(base_settings.model_copy(update=overrides), model_source=source, journal=journal,
                         on_event=on_event)
        client = TestClient(app)
        client.__enter__()  # runs the lifespan: first champion load
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, source: FakeSource) -> TestClient:
    return make_client(source)


def ls_task(task_id: int, text: Any, field: str = "text") -> dict:
    """A task the way Label Studio 1.23 serialises it into /predict."""
    return {"id": task_id, "data": {field: text}, "meta": {}, "annotations": [], "predictions": [],
            "project": 3, "inner_id": task_id, "created_at": "2025-03-01T10:00:00Z", "is_labeled": False}


def predict_body(texts: list[Any], config: str = CONFIG, field: str = "text") -> dict:
    return {"tasks": [ls_task(i + 1, t, field) for i, t in enumerate(texts)], "project": "3.1740000000",
            "label_config": config, "params": {"login": None, "password": None, "context": None}}


def choice(prediction: dict) -> str:
    return prediction["result"][0]["value"]["choices"][0]


# ------------------------------------------------------------------------------------------------
# Label Studio protocol
# ------------------------------------------------------------------------------------------------


def test_health_and_root_report_the_served_champion(client: TestClient):
    for path in ("/", "/health"):
        r = client.get(path)
        assert r.status_code == 200
        assert r.json() == {"status": "UP", "model_class": "KeywordClassifier",
                            "model_version": f"{NAME}:v1", "model_loaded": True, "precision": "fp32",
                            "serving_path": {"chosen": "torch-fp32", "check_texts": 0, "min_agreement": 0.99,
                                             "confidence": 0.95, "batchings": [],
                                             "reason": "settings.quantize is none: fp32 torch, nothing tried",
                                             "speeds_from": None, "candidates": []},
                            "detail": None, "champion_error": None, "retry_in_s": None,
                            "dependencies": {name: {"status": "ok", "detail": None, "since": None, "retry_in_s": None,
                                                    "url": None}
                                             for name in ("registry", "journal")}}


def test_setup_returns_the_champion_version(client: TestClient):
    r = client.post("/setup", json={"project": "3.1740000000", "schema": CONFIG, "hostname": "http://ls",
                                    "access_token": "x", "extra_params": None})
    assert r.status_code == 200
    assert r.json() == {"model_version": f"{NAME}:v1"}


def test_an_oversized_label_config_is_refused_not_cached(client: TestClient):
    huge = CONFIG.replace("</View>", "<!--" + "x" * 300_000 + "--></View>")
    for path, body in (("/setup", {"project": "3.1", "schema": huge}), ("/predict", {**predict_body(["x"]),
                                                                                   "label_config": huge})):
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text[:300])
        assert r.json()["detail"][0]["type"] == "string_too_long", (path, r.text[:300])
    assert client.post("/setup", json={"project": "3.1", "schema": CONFIG}).status_code == 200


def test_predict_answers_every_task_in_order_with_the_configs_names(client: TestClient):
    texts = ["nothing to see", "I hate you all", "damn this", "have a nice day"]
    r = client.post("/predict", json=predict_body(texts))
    assert r.status_code == 200
    results = r.json()["results"]
    assert [choice(p) for p in results] == ["neither", "hate", "offensive", "neither"]
    assert [p["score"] for p in results] == pytest.approx([0.6, 0.7, 0.8, 0.6])
    for p in results:
        assert p["model_version"] == f"{NAME}:v1"
        assert p["result"] == [{"from_name": "label", "to_name": "text", "type": "choices",
                                "value": {"choices": [choice(p)]}}]


def test_names_and_text_field_come_from_the_label_config(client: TestClient):
    config = custom_config(LABELS)
    r = client.post("/predict", json=predict_body(["I hate them"], config=config, field="content"))
    assert r.status_code == 200
    (p,) = r.json()["results"]
    assert p["result"] == [{"from_name": "verdict", "to_name": "tweet", "type": "choices",
                            "value": {"choices": ["hate"]}}]


def test_config_with_a_subset_of_labels_gets_renormalised_predictions(client: TestClient):
    r = client.post("/predict", json=predict_body(["hello", "damn"], config=custom_config(("hate", "neither"),
                                                                                      field="text")))
    assert r.status_code == 200
    other, damn = r.json()["results"]
    assert choice(other) == "neither" and other["score"] == pytest.approx(0.6 / 0.7)
    assert choice(damn) in {"hate", "neither"}  # offensive is not offered by this project
    assert damn["score"] == pytest.approx(0.5)


def test_config_with_extra_labels_is_accepted(client: TestClient):
    config = custom_config((*LABELS, "spam"), field="text")
    assert client.post("/setup", json={"project": "3.1", "schema": config}).status_code == 200
    r = client.post("/predict", json=predict_body(["damn"], config=config))
    assert choice(r.json()["results"][0]) == "offensive"


@pytest.mark.parametrize("labels", [("ham", "spam"), ("hate", "spam")])
def test_config_whose_labels_the_model_does_not_know_is_a_clear_4xx(client: TestClient, labels):
    config = custom_config(labels, field="text")
    setup = client.post("/setup", json={"project": "3.1", "schema": config})
    predict = client.post("/predict", json=predict_body(["hi"], config=config))
    for r in (setup, predict):
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert "spam" in detail and "offensive" in detail and f"{NAME}:v1" in detail


def test_predict_without_label_config_uses_the_one_from_setup(client: TestClient):
    body = predict_body(["I hate it"], config=custom_config(LABELS, from_name="x", to_name="y", field="text"))
    setup = client.post("/setup", json={"project": body["project"], "schema": body["label_config"]})
    assert setup.status_code == 200
    del body["label_config"]
    r = client.post("/predict", json=body)
    assert r.status_code == 200
    assert r.json()["results"][0]["result"][0]["from_name"] == "x"
    unknown = client.post("/predict", json={**body, "project": "99.1"})
    assert unknown.status_code == 422 and "label_config" in unknown.json()["detail"]


def test_upstream_degenerate_payloads_get_2xx(client: TestClient):
    """The payloads label-studio-ml-backend's own tests/test_api.py sends."""
    assert client.get("/metrics").status_code == 200 and client.get("/metrics").json() == {}
    r = client.post("/predict", json={"tasks": {"id": 1}, "label_config": "<View></View>",
                                      "project": "1.1000000000", "params": {"context": {}}})
    assert r.status_code == 200 and r.json() == {"results": []}
    r = client.post("/setup", json={"project": "1.1000000000", "schema": "<View></View>", "extra_params": {}})
    assert r.status_code == 200 and r.json() == {"model_version": f"{NAME}:v1"}
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED",
                                      "project": {"id": 1, "label_config": "<View></View>"}})
    assert r.status_code == 201 and r.json()["status"] == "ok"
    assert r.json()["result"]["status"] == "quarantined"


def test_tasks_without_usable_text_get_empty_predictions_in_place(client: TestClient):
    body = predict_body(["I hate this", "", "   ", None, 42, "damn"])
    body["tasks"].append({"id": 99})  # no data at all
    body["tasks"].append({"id": 100, "data": {"other_field": "hate"}})
    r = client.post("/predict", json=body)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 8
    assert [bool(p["result"]) for p in results] == [True, False, False, False, False, True, False, False]
    for p in results:
        assert p["model_version"] == f"{NAME}:v1"
        if not p["result"]:
            assert p["score"] == 0
    assert choice(results[0]) == "hate" and choice(results[5]) == "offensive"


def test_single_task_sent_as_a_dict_is_answered(client: TestClient):
    body = predict_body(["damn"])
    body["tasks"] = body["tasks"][0]
    r = client.post("/predict", json=body)
    assert r.status_code == 200 and [choice(p) for p in r.json()["results"]] == ["offensive"]


@pytest.mark.parametrize("body", [{}, {"tasks": []}, {"tasks": None, "label_config": CONFIG}])
def test_predict_with_no_tasks_answers_empty(client: TestClient, body):
    r = client.post("/predict", json=body)
    assert r.status_code == 200 and r.json() == {"results": []}


def test_long_texts_are_truncated_for_label_studio(make_client, source: FakeSource):
    client = make_client(source, max_text_chars=40)
    long_text = "damn " + "x" * 1_000_000
    r = client.post("/predict", json=predict_body([long_text]))
    assert r.status_code == 200 and choice(r.json()["results"][0]) == "offensive"
    assert source.classifiers[1].calls[-1] == [long_text[:40]]


# ------------------------------------------------------------------------------------------------
# /v1/predict and /versions
# ------------------------------------------------------------------------------------------------


def test_v1_predict_returns_labels_and_probabilities(client: TestClient):
    r = client.post("/v1/predict", json={"texts": ["damn it", "I hate it", "fine"]})
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == f"{NAME}:v1"
    assert [p["label"] for p in body["predictions"]] == ["offensive", "hate", "neither"]
    first = body["predictions"][0]
    assert first["probabilities"] == pytest.approx(dict(zip(LABELS, TABLES[1]["damn"], strict=True)))
    assert first["score"] == pytest.approx(0.8)


def test_openapi_documents_the_schemas(client: TestClient):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("V1PredictRequest", "V1PredictResponse", "PredictRequest", "PredictResponse",
                 "SetupResponse", "HealthResponse", "VersionsResponse", "ReloadResponse", "WebhookResponse"):
        assert name in schemas
    assert "/v1/predict" in spec["paths"] and "/metrics/prometheus" in spec["paths"]


def test_versions_lists_registry_versions_and_aliases(client: TestClient):
    r = client.get("/versions")
    assert r.status_code == 200
    assert r.json() == {"model_version": f"{NAME}:v1", "registered_model": NAME,
                        "versions": [f"{NAME}:v1", f"{NAME}:v2", f"{NAME}:v3"],
                        "aliases": {"challenger": f"{NAME}:v3", "champion": f"{NAME}:v1"}}


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

BAD_V1 = [
    pytest.param(b'{"texts": ["a", ', "application/json", 422, id="malformed-json"),
    pytest.param(b'{"texts": "just one string"}', "application/json", 422, id="texts-not-a-list"),
    pytest.param(b'{"texts": [1, 2]}', "application/json", 422, id="texts-not-strings"),
    pytest.param(b'{"texts": [["nested"]]}', "application/json", 422, id="texts-nested"),
    pytest.param(b'{"texts": []}', "application/json", 422, id="empty-list"),
    pytest.param(b'{"texts": [""]}', "application/json", 422, id="empty-string"),
    pytest.param(b'{"texts": ["ok", "  \\n "]}', "application/json", 422, id="blank-string"),
    pytest.param(b'{"text": ["wrong key"]}', "application/json", 422, id="wrong-field"),
    pytest.param(b'{"texts": ["a"], "extra": 1}', "application/json", 422, id="extra-field"),
    pytest.param(b'["a", "b"]', "application/json", 422, id="array-body"),
    pytest.param(b'{"texts": ["caf\xe9 \xff\xfe"]}', "application/json", 400, id="non-utf8"),
    pytest.param(b"", "application/json", 422, id="empty-body"),
    pytest.param(b"texts=a", "application/x-www-form-urlencoded", 422, id="form-body"),
]


@pytest.mark.parametrize(("content", "content_type", "status"), BAD_V1)
def test_v1_bad_input_is_a_4xx_and_the_server_keeps_serving(client: TestClient, content, content_type,
                                                            status):
    r = client.post("/v1/predict", content=content, headers={"content-type": content_type})
    assert r.status_code == status
    assert r.json()["detail"]
    ok = client.post("/v1/predict", json={"texts": ["damn"]})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "offensive"


def test_v1_over_long_text_is_refused_without_echoing_it(make_client, source: FakeSource):
    client = make_client(source, max_text_chars=1000)
    huge = "y" * 1_000_000
    r = client.post("/v1/predict", json={"texts": ["fine", huge]})
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "texts", 1] and error["type"] == "string_too_long"
    assert "1000" in error["msg"]
    assert len(r.content) < 1000  # the text is not sent back
    assert source.classifiers[1].calls == []  # nothing reached the model


@pytest.mark.parametrize("body", [
    pytest.param({"tasks": [1, 2], "label_config": CONFIG}, id="tasks-not-objects"),
    pytest.param({"tasks": "abc", "label_config": CONFIG}, id="tasks-a-string"),
    pytest.param({"tasks": [{"id": 1, "data": "text"}], "label_config": CONFIG}, id="data-not-object"),
    pytest.param({"tasks": [{"id": 1}], "label_config": 5}, id="config-not-string"),
    pytest.param({"tasks": [{"id": 1, "data": {"text": "hi"}}], "label_config": "<View><Text"},
                 id="config-bad-xml"),
])
def test_ls_predict_bad_input_is_a_4xx(client: TestClient, body):
    r = client.post("/predict", json=body)
    assert r.status_code == 422 and r.json()["detail"]


def test_malformed_json_everywhere_is_a_4xx(client: TestClient):
    for path in ("/predict", "/setup", "/webhook", "/v1/predict"):
        r = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422, path
    assert client.get("/health").status_code == 200


def test_webhook_wants_a_json_object(client: TestClient, journal: Journal):
    before = journal.last_event_id()
    assert client.post("/webhook", json=[{"action": "ANNOTATION_CREATED"}]).status_code == 422
    assert journal.last_event_id() == before


# ------------------------------------------------------------------------------------------------
# webhook → journal → on_event
# ------------------------------------------------------------------------------------------------


def annotation_event(annotation_id: int = 5, label: str = "hate", task_id: int = 11) -> dict:
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": annotation_id, "task": task_id, "project": 3, "completed_by": 1,
                       "result": [{"id": "r", "from_name": "label", "to_name": "text", "type": "choices",
                                   "origin": "manual", "value": {"choices": [label]}}],
                       "was_cancelled": False, "ground_truth": False, "lead_time": 3.1,
                       "created_at": "2025-03-01T10:00:00Z", "updated_at": "2025-03-01T10:00:00Z"},
        "task": {"id": task_id, "data": {"text": "some reviewed text"}, "project": 3},
        "project": {"id": 3, "title": "review", "label_config": CONFIG},
    }


def test_webhook_journals_before_answering_then_calls_on_event(make_client, source: FakeSource,
                                                               journal: Journal):
    seen: list[tuple[dict, RecordResult, list[str]]] = []

    def on_event(payload: dict, result: RecordResult) -> None:
        seen.append((payload, result, journal.labels()["label"].tolist()))

    client = make_client(source, on_event=on_event)
    payload = annotation_event()
    r = client.post("/webhook", json=payload)
    assert r.status_code == 201
    assert r.json()["status"] == "ok"
    assert r.json()["result"]["status"] == "accepted" and r.json()["result"]["event_id"] >= 1
    (got_payload, got_result, labels_at_callback) = seen[0]
    assert got_payload == payload and got_result.status == "accepted"
    assert labels_at_callback == ["hate"]  # durable before on_event ran
    again = client.post("/webhook", json=payload)
    assert again.status_code == 201 and again.json()["result"]["status"] == "duplicate"
    training = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    assert training.status_code == 201 and training.json()["result"]["status"] == "ignored"
    assert [s[1].status for s in seen] == ["accepted", "duplicate", "ignored"]


def test_webhook_survives_a_failing_on_event(make_client, source: FakeSource, journal: Journal):
    def on_event(payload: dict, result: RecordResult) -> None:
        raise RuntimeError("scheduler down")

    client = make_client(source, on_event=on_event)
    r = client.post("/webhook", json=annotation_event(annotation_id=8, label="neither"))
    assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
    assert journal.labels()["label"].tolist() == ["neither"]


# ------------------------------------------------------------------------------------------------
# auth and size limits
# ------------------------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(("config", "headers", "status"), [
    pytest.param({}, {}, 200, id="open-when-unconfigured"),
    pytest.param({"basic": True}, {}, 401, id="basic-missing"),
    pytest.param({"basic": True}, basic("ls", "s3cret"), 200, id="basic-ok"),
    pytest.param({"basic": True}, basic("ls", "wrong"), 401, id="basic-wrong-password"),
    pytest.param({"basic": True}, basic("other", "s3cret"), 401, id="basic-wrong-user"),
    pytest.param({"basic": True}, {"Authorization": "Basic !!notbase64"}, 401, id="basic-garbage"),
    pytest.param({"basic": True}, {"Authorization": "Bearer tok-123"}, 401, id="bearer-not-configured"),
    pytest.param({"token": True}, {"Authorization": "Bearer tok-123"}, 200, id="bearer-ok"),
    pytest.param({"token": True}, {"Authorization": "Bearer tok-124"}, 401, id="bearer-wrong"),
    pytest.param({"token": True}, basic("ls", "s3cret"), 401, id="basic-not-configured"),
    pytest.param({"basic": True, "token": True}, basic("ls", "s3cret"), 200, id="both-basic"),
    pytest.param({"basic": True, "token": True}, {"Authorization": "bearer tok-123"}, 200, id="both-bearer"),
    pytest.param({"basic": True, "token": True}, {"Authorization": "Token tok-123"}, 401, id="other-scheme"),
])
def test_auth(make_client, source: FakeSource, config, headers, status):
    overrides: dict[str, Any] = {}
    if config.get("basic"):
        overrides |= {"basic_user": "ls", "basic_password": SecretStr("s3cret")}
    if config.get("token"):
        overrides["api_token"] = SecretStr("tok-123")
    client = make_client(source, **overrides)
    calls = [("GET", "/health", None), ("POST", "/predict", predict_body(["damn"])),
             ("POST", "/v1/predict", {"texts": ["x"]}), ("GET", "/metrics/prometheus", None),
             ("GET", "/openapi.json", None)]
    for method, path, body in calls:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == status, path
        if status == 401:
            challenges = r.headers.get_list("www-authenticate")
            assert challenges and all(c.startswith(("Basic", "Bearer")) for c in challenges)
            assert ("Basic" in challenges[0]) == bool(config.get("basic"))


def test_half_configured_basic_auth_is_refused(base_settings: Settings, source: FakeSource, journal: Journal):
    with pytest.raises(AuthConfigError):
        create_app(base_settings.model_copy(update={"basic_user": "ls"}), model_source=source,
                   journal=journal)


def test_oversized_bodies_get_413(make_client, source: FakeSource):
    client = make_client(source, max_request_bytes=10_000)
    big = {"texts": ["a" * 20_000]}
    r = client.post("/v1/predict", json=big)
    assert r.status_code == 413 and "10000" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
        yield b'{"texts": ["'
        for _ in range(50):
            yield b"b" * 1000
        yield b'"]}'

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes" in r.json()["detail"]
    lying = client.post("/predict", content=b"{}", headers={"content-type": "application/json",
                                                            "content-length": "999999999"})
    assert lying.status_code == 413
    assert source.classifiers[1].calls == []
    assert client.post("/v1/predict", json={"texts": ["damn"]}).status_code == 200


# ------------------------------------------------------------------------------------------------
# champion loading and hot swaps
# ------------------------------------------------------------------------------------------------


def test_an_audit_task_is_scored_without_a_choice_and_the_slice_store_closes_with_the_app(
        base_settings: Settings, source: FakeSource, journal: Journal):
    """A blind audit item must open with nothing pre-selected; the app's own SliceStore (its database
    connections) is closed when the app shuts down, as the journal it owns is."""
    from labelloop.slices import SliceItem, SliceStore
    from labelloop.store import StoreClosed

    with SliceStore(base_settings.slices_path) as store:
        store.add([SliceItem(project_id=3, task_id=2, item_id="i2", kind="audit")])
    app = create_app(base_settings, model_source=source, journal=journal)
    with TestClient(app) as client:
        results = client.post("/predict", json=predict_body(["I hate it", "I hate it"])).json()["results"]
        assert choice(results[0]) == "hate"
        assert results[1]["result"] == [] and results[1]["score"] == pytest.approx(0.7)
    with pytest.raises(StoreClosed):
        app.state.slices.kind_of(2)


def test_no_champion_yet(make_client, journal: Journal):
    client = make_client(FakeSource({1: KeywordClassifier(TABLES[1])}, champion=None))
    health = client.get("/health").json()
    assert health["model_loaded"] is False and health["model_version"] is None
    assert "no champion" in health["detail"]
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).json() == {"model_version": None}
    r = client.post("/predict", json=predict_body(["hate"]))
    assert r.status_code == 200 and r.json() == {"results": []}
    r = client.post("/v1/predict", json={"texts": ["hate"]})
    assert r.status_code == 503 and "champion" in r.json()["detail"]
    r = client.post("/reload")
    assert r.status_code == 200 and r.json()["swapped"] is False


def test_reload_swaps_to_the_new_champion_and_keeps_serving_on_a_bad_version(client: TestClient,
                                                                             source: FakeSource):
    assert client.post("/reload").json()["swapped"] is False
    source.champion = 2
    r = client.post("/reload")
    assert r.status_code == 200
    assert r.json() == {"swapped": True, "previous": f"{NAME}:v1", "model_version": f"{NAME}:v2",
                        "detail": f"now serving {NAME}:v2"}
    setup = client.post("/setup", json={"schema": CONFIG, "project": "3.1"})
    assert setup.json()["model_version"] == f"{NAME}:v2"
    predicted = client.post("/predict", json=predict_body(["x"])).json()["results"][0]
    assert predicted["score"] == pytest.approx(0.9)
    source.champion = 7  # registered but its artifact is gone
    r = client.post("/reload")
    assert r.status_code == 503 and "v7" in r.json()["detail"]
    assert client.get("/health").json()["model_version"] == f"{NAME}:v2"
    assert client.post("/v1/predict", json={"texts": ["x"]}).json()["model_version"] == f"{NAME}:v2"


def test_background_poll_follows_the_alias(make_client, source: FakeSource):
    client = make_client(source, poll_seconds=0.02)
    source.champion = 3
    deadline = time.monotonic() + 20
    while client.get("/health").json()["model_version"] != f"{NAME}:v3":
        assert time.monotonic() < deadline, "poll never swapped to v3"
        time.sleep(0.02)
    assert source.loads.count(3) == 1  # loaded once, not on every poll
    time.sleep(0.1)
    assert source.loads.count(3) == 1


def test_poll_does_not_reload_a_broken_version_on_every_tick(make_client, source: FakeSource):
    client = make_client(source, poll_seconds=0.02)
    source.champion = 7  # registered but its artifact is gone
    deadline = time.monotonic() + 20
    while 7 not in source.loads:
        assert time.monotonic() < deadline, "poll never tried v7"
        time.sleep(0.02)
    time.sleep(0.2)  # ~10 more ticks
    assert source.loads.count(7) == 1
    assert client.get("/health").json()["model_version"] == f"{NAME}:v1"
    assert client.post("/reload").status_code == 503 and source.loads.count(7) == 2  # an explicit reload retries
    source.champion = 2  # the alias moves on: the poll follows it
    while client.get("/health").json()["model_version"] != f"{NAME}:v2":
        assert time.monotonic() < deadline, "poll never swapped to v2"
        time.sleep(0.02)


async def _post(client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response:
    return await client.post(path, json=body)


@pytest.fixture
def gated_source() -> FakeSource:
    return FakeSource({1: KeywordClassifier(TABLES[1], gate=threading.Event()),
                       2: KeywordClassifier(TABLES[2])})


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def _app(settings: Settings, source: FakeSource, journal: Journal) -> FastAPI:
    return create_app(settings, model_source=source, journal=journal)


@pytest.mark.anyio
async def test_requests_in_flight_finish_on_the_model_they_started_with(
        base_settings: Settings, gated_source: FakeSource, journal: Journal):
    app = _app(base_settings, gated_source, journal)
    v1 = gated_source.classifiers[1]
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:
        old = asyncio.create_task(_post(client, "/predict", predict_body(["hello", "I hate"])))
        await _until(v1.entered.is_set, "the v1 batch to start")
        gated_source.champion = 2
        reload = await client.post("/reload")
        assert reload.json()["swapped"] is True  # the swap does not wait for the batch in flight
        new = asyncio.create_task(_post(client, "/predict", predict_body(["hello", "I hate"])))
        await _until(lambda: app.state.batcher.pending_jobs == 1, "the v2 request to queue")
        v1.gate.set()
        old_r, new_r = await old, await new
    assert {p["model_version"] for p in old_r.json()["results"]} == {f"{NAME}:v1"}
    assert [p["score"] for p in old_r.json()["results"]] == pytest.approx([0.6, 0.7])
    assert {p["model_version"] for p in new_r.json()["results"]} == {f"{NAME}:v2"}
    assert [p["score"] for p in new_r.json()["results"]] == pytest.approx([0.9, 0.9])


@pytest.mark.anyio
async def test_concurrent_requests_are_merged_into_one_model_call(base_settings: Settings,
                                                                 gated_source: FakeSource, journal: Journal):
    app = _app(base_settings, gated_source, journal)
    v1 = gated_source.classifiers[1]
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:
        first = asyncio.create_task(_post(client, "/v1/predict", {"texts": ["first"]}))
        await _until(v1.entered.is_set, "the first call to start")
        rest = [asyncio.create_task(_post(client, "/v1/predict", {"texts": [f"damn {i}", f"hate {i}"]}))
                for i in range(4)]
        await _until(lambda: app.state.batcher.pending_jobs == 4, "four requests to queue")
        v1.gate.set()
        responses = [await first] + [await t for t in rest]
    assert [len(c) for c in v1.calls] == [1, 8]
    for i, r in enumerate(responses[1:]):
        assert [p["label"] for p in r.json()["predictions"]] == ["offensive", "hate"], i


@pytest.mark.anyio
async def test_hot_swaps_under_concurrent_load_never_mix_versions(base_settings: Settings, journal: Journal):
    source = FakeSource({v: KeywordClassifier(t) for v, t in TABLES.items()}, champion=1)
    app = _app(base_settings, source, journal)
    texts = ["hello", "I hate", "damn", "more text", "hate again"]
    expected = {v: [max(KeywordClassifier(t).row(x)) for x in texts] for v, t in TABLES.items()}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:

        async def one(i: int) -> httpx.Response:
            if i % 2:
                return await _post(client, "/v1/predict", {"texts": texts})
            return await _post(client, "/predict", predict_body(texts))

        swaps, in_flight = 0, []
        for wave, version in enumerate([None, 2, 3, 1, 2, 3, 1, 2]):
            if version is not None:  # swap while earlier waves are still queued or running
                source.champion = version
                swaps += (await client.post("/reload")).json()["swapped"]
            in_flight += [asyncio.create_task(one(i)) for i in range(15)]
            if wave == 0:
                await _until(lambda: source.classifiers[1].calls, "the first wave to reach v1")
            await asyncio.sleep(0.001)
        responses = await asyncio.gather(*in_flight)
    assert swaps == 7
    seen = set()
    for r in responses:
        assert r.status_code == 200
        body = r.json()
        if "results" in body:
            versions = {p["model_version"] for p in body["results"]}
            assert len(versions) == 1
            version = int(versions.pop().rsplit(":v", 1)[1])
            assert [p["score"] for p in body["results"]] == pytest.approx(expected[version])
        else:
            version = int(body["model_version"].rsplit(":v", 1)[1])
            assert [p["score"] for p in body["predictions"]] == pytest.approx(expected[version])
        seen.add(version)
    assert seen >= {1, 2}  # the first wave ran on v1, the last one (after the final swap) on v2


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_metrics(make_client, source: FakeSource):
    client = make_client(source)
    other = make_client(FakeSource({1: KeywordClassifier(TABLES[1])}))  # a second app: own registry
    client.post("/predict", json=predict_body(["a", "hate", ""]))
    client.post("/v1/predict", json={"texts": ["x"]})
    client.post("/v1/predict", json={"texts": []})
    source.champion = 2
    client.post("/reload")
    r = client.get("/metrics/prometheus")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)
    post = ("method", "POST")
    assert s[("labelloop_http_requests_total", (post, ("route", "/predict"), ("status", "200")))] == 1
    assert s[("labelloop_http_requests_total", (post, ("route", "/v1/predict"), ("status", "422")))] == 1
    assert s[("labelloop_http_request_seconds_count", (post, ("route", "/v1/predict")))] == 2
    assert s[("labelloop_texts_predicted_total", ())] == 3
    assert s[("labelloop_inference_batch_texts_count", ())] == 2
    assert s[("labelloop_inference_batch_texts_sum", ())] == 3
    assert s[("labelloop_model_swaps_total", ())] == 2
    assert s[("labelloop_model_info", (("model_version", f"{NAME}:v2"),))] == 1
    assert ("labelloop_model_info", (("model_version", f"{NAME}:v1"),)) not in s
    assert s[("labelloop_model_loaded", ())] == 1
    other_samples = _samples(other.get("/metrics/prometheus").text)
    assert other_samples[("labelloop_texts_predicted_total", ())] == 0


# ------------------------------------------------------------------------------------------------
# a real model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_classifier(davidson_small):
    """A real embedding-head classifier (frozen MiniLM + logistic regression) on 150 Davidson rows."""
    from sklearn.linear_model import LogisticRegression

    from training.classifier import EmbeddingHeadClassifier, load_encoder

    frame = davidson_small.frame.groupby("label", group_keys=False).head(50)
    encoder = load_encoder("all-MiniLM-L6-v2", 64)
    head = LogisticRegression(max_iter=500).fit(encoder.embed(frame["text"].tolist()),
                                                davidson_small.label_ids(frame))
    return EmbeddingHeadClassifier(encoder, head, TAXONOMY.labels)


@pytest.mark.parametrize("quantize", ["none"])
def test_real_embedding_head_served_end_to_end_in_fp32(make_client, real_classifier, davidson_small, quantize):
    """A fast-mode model served as loaded: exactly its own probabilities, through both routes (whether a
    faster path keeps its labels is the guard's business: tests/test_fast_path.py)."""
    texts = davidson_small.frame["text"].tail(12).tolist()
    source = FakeSource({4: real_classifier}, champion=4, check_texts=texts)
    client = make_client(source, quantize=quantize)
    assert client.get("/health").json()["precision"] == "fp32"
    ls = client.post("/predict", json=predict_body(texts)).json()["results"]
    v1 = client.post("/v1/predict", json={"texts": texts}).json()
    proba = np.array([[p["probabilities"][label] for label in LABELS] for p in v1["predictions"]])
    np.testing.assert_allclose(proba, real_classifier.predict_proba(texts), atol=1e-6)
    assert [choice(p) for p in ls] == [LABELS[i] for i in proba.argmax(1)]
    assert [p["score"] for p in ls] == pytest.approx(proba.max(1).tolist(), abs=1e-6)


@pytest.fixture(scope="module")
def decisive_finetuned():
    """A real MiniLM sequence classifier whose head always says "hate" (zero weights, bias 5): fp32 and
    int8 must agree on every text, so the int8 path is taken deterministically."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.classifier import FineTunedClassifier, resolve_model_path

    path = resolve_model_path("all-MiniLM-L6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    return FineTunedClassifier(model, AutoTokenizer.from_pretrained(path), LABELS, 64)


def test_finetuned_champion_is_served_int8_when_it_agrees_with_fp32(make_client, decisive_finetuned,
                                                                     davidson_small):
    texts = davidson_small.frame["text"].head(20).tolist()
    # int8's labels can move with the batch, so the guard vouches for it only from 299 agreeing texts on
    # (short ones: the check runs them in merged calls and one at a time)
    check = [f"check {i}" for i in range(300)]
    client = make_client(FakeSource({5: decisive_finetuned}, champion=5, check_texts=check), quantize="int8")
    deadline = time.monotonic() + 600  # a busy machine can take longer than the app's first-load wait
    while client.get("/health").json()["precision"] is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get("/health").json()["precision"] == "int8"
    body = client.post("/v1/predict", json={"texts": texts[:3]}).json()
    assert [p["label"] for p in body["predictions"]] == ["hate"] * 3
    assert body["predictions"][0]["score"] == pytest.approx(np.exp(5) / (np.exp(5) + 2), abs=1e-3)
    assert type(decisive_finetuned.model.bert.encoder.layer[0].attention.self.query).__name__ == "Linear"
    fp32 = make_client(FakeSource({5: decisive_finetuned}, champion=5, check_texts=texts), quantize="none")
    assert fp32.get("/health").json()["precision"] == "fp32"


@pytest.mark.parametrize("check_texts", [pytest.param([], id="nothing-to-check-against"),
                                         pytest.param(["some text"] * 4, id="disagrees")])
def test_int8_copy_that_cannot_be_verified_is_not_served(make_client, decisive_finetuned, monkeypatch,
                                                         check_texts):
    import dataclasses

    import serving.quantize

    measured = serving.quantize.measure

    def int8_disagrees(options, *args, **kwargs):
        trials, built = measured(options, *args, **kwargs)
        return [dataclasses.replace(t, agreement=0.98) if t.path == "torch-int8" else t for t in trials], built

    monkeypatch.setattr(serving.quantize, "measure", int8_disagrees)
    client = make_client(FakeSource({5: decisive_finetuned}, champion=5, check_texts=check_texts),
                         quantize="int8")
    health = client.get("/health").json()
    assert health["model_version"] == f"{NAME}:v5" and health["precision"] == "fp32"


# ------------------------------------------------------------------------------------------------
# The schema says what the server accepts (found by schemathesis; see tests/test_api_fuzz.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route, body", [("/setup", {"project": False, "schema": CONFIG}),
                                         ("/predict", {"project": True, "tasks": []}),
                                         ("/predict", {"tasks": {"id": False, "data": {"text": "x"}}})])
def test_a_bool_is_no_project_or_task_id(client: TestClient, route: str, body: dict):
    assert client.post(route, json=body).status_code == 422


def test_a_query_parameter_given_twice_is_refused(client: TestClient):
    response = client.get("/health?verbose=1&verbose=2")
    assert response.status_code == 400
    assert "verbose" in response.json()["detail"]
    assert client.get("/health?verbose=1").status_code == 200


def test_the_schema_says_v1_texts_must_not_be_blank(client: TestClient):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["V1PredictRequest"]
    assert schema["properties"]["texts"]["items"]["pattern"] == r"\S"


def test_an_unparseable_body_is_a_documented_400(client: TestClient):
    response = client.post("/webhook", content=b"\xff\xfe[", headers={"content-type": "application/json"})
    assert response.status_code == 400
    documented = client.get("/openapi.json").json()["paths"]["/webhook"]["post"]["responses"]
    assert "400" in documented
