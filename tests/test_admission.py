"""Admission control: the pure policy, the batcher's lanes and drops, and the app's 503s.

The model is the deterministic keyword classifier of ``tests.test_serving``, gated so that a test can hold
one call in flight while it fills the queue behind it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.taxonomy import get_taxonomy
from serving.app import create_app
from serving.batching import AdmissionPolicy, ClientDisconnected, Lane, MicroBatcher, Overloaded
from tests.test_serving import NAME, TABLES, FakeSource, KeywordClassifier, _until, predict_body
from training.registry import LoadedModel, ModelRef

API, LS = Lane.API, Lane.LABEL_STUDIO


# ------------------------------------------------------------------------------------------ the policy
def test_policy_admits_within_the_budget_and_refuses_beyond_it():
    policy = AdmissionPolicy({API: 10, LS: 100})
    assert policy.admits(API, queued=6, n_texts=4)
    assert not policy.admits(API, queued=7, n_texts=4)
    assert policy.admits(LS, queued=7, n_texts=4)  # each lane has its own budget


def test_an_empty_lane_admits_a_request_larger_than_its_budget():
    assert AdmissionPolicy({API: 10}).admits(API, queued=0, n_texts=50)
    assert not AdmissionPolicy({API: 10}).admits(API, queued=1, n_texts=50)


def test_a_zero_budget_is_unbounded():
    assert AdmissionPolicy({API: 0}).admits(API, queued=10**6, n_texts=10**3)
    assert AdmissionPolicy().admits(LS, queued=10**6, n_texts=1)


def test_retry_after_is_the_time_to_finish_the_queue_at_least_one_second_and_capped():
    policy = AdmissionPolicy(max_retry_after=30)
    assert policy.retry_after(450, texts_per_second=200.0) == 3
    assert policy.retry_after(10, texts_per_second=200.0) == 1
    assert policy.retry_after(10**6, texts_per_second=1.0) == 30
    assert policy.retry_after(100, texts_per_second=None) == 1  # no call measured yet


# ------------------------------------------------------------------------------------------ the batcher
class Recorder:
    def __init__(self) -> None:
        self.drops: list[str] = []
        self.depth: dict[str, int] = {}

    def observe_batch(self, n_texts: int, seconds: float) -> None:
        pass

    def observe_queue(self, lane: str, texts: int) -> None:
        self.depth[lane] = texts

    def observe_drop(self, lane: str) -> None:
        self.drops.append(lane)


def gated_model() -> tuple[LoadedModel, KeywordClassifier, threading.Event]:
    gate = threading.Event()
    classifier = KeywordClassifier(TABLES[1], gate=gate)
    return LoadedModel(ModelRef(NAME, 1), classifier), classifier, gate


async def _hold_the_model(batcher: MicroBatcher, model: LoadedModel, classifier: KeywordClassifier,
                          lane: Lane = API) -> asyncio.Future:
    first = batcher.submit(model, ["in flight"], lane)
    await _until(classifier.entered.is_set, "the first call to start")
    return first


@pytest.mark.anyio
async def test_the_batcher_refuses_beyond_the_lane_budget_counting_the_call_in_flight():
    model, classifier, gate = gated_model()
    recorder = Recorder()
    batcher = MicroBatcher(4, 64, recorder, AdmissionPolicy({API: 3, LS: 100}))
    try:
        first = await _hold_the_model(batcher, model, classifier)
        second = batcher.submit(model, ["a", "b"], API)
        assert batcher.queued_texts(API) == 3 and recorder.depth["api"] == 3
        with pytest.raises(Overloaded) as refused:
            batcher.submit(model, ["c"], API)
        assert refused.value.lane is API and refused.value.retry_after >= 1
        assert "max_queued_texts = 3" in str(refused.value)
        ls = batcher.submit(model, ["c"], LS)  # Label Studio's lane still has room
        gate.set()
        results = await asyncio.gather(first, second, ls)
        assert [len(r) for r in results] == [1, 2, 1]
        assert batcher.queued_texts() == 0 and recorder.depth == {"api": 0, "label_studio": 0}
        assert batcher.texts_per_second is not None
    finally:
        gate.set()
        await batcher.aclose()


@pytest.mark.anyio
async def test_label_studio_jobs_go_to_the_model_before_earlier_api_jobs():
    model, classifier, gate = gated_model()
    batcher = MicroBatcher(4, 2, Recorder())  # a call holds at most two texts: nothing merges across jobs
    try:
        first = await _hold_the_model(batcher, model, classifier)
        api = [batcher.submit(model, [f"api {i}", f"api {i}b"], API) for i in range(2)]
        ls = batcher.submit(model, ["ls 0", "ls 0b"], LS)
        gate.set()
        await asyncio.gather(first, ls, *api)
    finally:
        gate.set()
        await batcher.aclose()
    assert classifier.calls == [["in flight"], ["ls 0", "ls 0b"], ["api 0", "api 0b"], ["api 1", "api 1b"]]


@pytest.mark.anyio
async def test_on_a_slow_model_calls_stay_short_so_label_studio_overtakes_a_backlog():
    class Slow(KeywordClassifier):
        def predict_proba(self, texts, batch_size=64, progress=None):
            time.sleep(0.2)
            return super().predict_proba(texts, batch_size, progress)

    gate = threading.Event()
    classifier = Slow(TABLES[1], gate=gate)
    model = LoadedModel(ModelRef(NAME, 1), classifier)
    batcher = MicroBatcher(2, 1024, Recorder(), target_call_seconds=0.2)
    try:
        first = await _hold_the_model(batcher, model, classifier)
        await asyncio.sleep(0.5)  # the first call takes >= 0.5 s for one text: the model looks slow
        api = [batcher.submit(model, [f"api {i}", f"api {i}b"], API) for i in range(3)]
        ls = batcher.submit(model, ["ls", "ls b"], LS)
        gate.set()
        await asyncio.gather(first, ls, *api)
        assert batcher.call_limit() >= 2
    finally:
        gate.set()
        await batcher.aclose()
    # without the limit all four jobs would merge into one call of eight texts behind the first
    assert classifier.calls[1] == ["ls", "ls b"] and len(classifier.calls) == 5


@pytest.mark.anyio
async def test_a_cancelled_job_never_reaches_the_model_and_is_counted_as_dropped():
    model, classifier, gate = gated_model()
    recorder = Recorder()
    batcher = MicroBatcher(4, 64, recorder, AdmissionPolicy({API: 10}))
    try:
        first = await _hold_the_model(batcher, model, classifier)
        gone = batcher.submit(model, ["nobody waits for this"] * 5, API)
        kept = batcher.submit(model, ["still wanted"], API)
        assert batcher.queued_texts(API) == 7
        gone.cancel()
        await asyncio.sleep(0)  # done callbacks run on the loop's next turn
        assert batcher.queued_texts(API) == 2  # freed now, not when the worker gets to it
        assert recorder.drops == ["api"]
        gate.set()
        await first
        assert len(await kept) == 1
    finally:
        gate.set()
        await batcher.aclose()
    assert classifier.calls == [["in flight"], ["still wanted"]]


@pytest.mark.anyio
async def test_predict_drops_the_work_of_a_caller_that_disconnects():
    model, classifier, gate = gated_model()
    recorder = Recorder()
    batcher = MicroBatcher(4, 64, recorder)
    hung_up = asyncio.Event()
    try:
        first = await _hold_the_model(batcher, model, classifier)
        waiting = asyncio.create_task(batcher.predict(model, ["hung up"], API, disconnected=hung_up.wait))
        await _until(lambda: batcher.pending_jobs == 1, "the second request to queue")
        hung_up.set()
        with pytest.raises(ClientDisconnected):
            await waiting
        gate.set()
        assert np.asarray(await first).shape == (1, 3)
        await _until(lambda: len(classifier.calls) == 1 and batcher.queued_texts() == 0, "the queue to drain")
    finally:
        gate.set()
        await batcher.aclose()
    assert classifier.calls == [["in flight"]] and recorder.drops == ["api"]


# ------------------------------------------------------------------------------------------ the app
def _samples(metrics_text: str, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(metrics_text)
            for s in f.samples if s.name == name}


@pytest.fixture
def gated_source() -> FakeSource:
    return FakeSource({1: KeywordClassifier(TABLES[1], gate=threading.Event())}, champion=1)


@pytest.fixture
def journal(settings: Settings):
    with Journal(settings.journal_path, get_taxonomy("hate_offensive")) as j:
        yield j


@pytest.mark.anyio
async def test_a_full_queue_answers_503_with_retry_after_while_label_studio_is_still_served(
        settings: Settings, gated_source: FakeSource, journal: Journal):
    app = create_app(settings.model_copy(update={"poll_seconds": 0, "max_queued_texts": 4,
                                                 "max_queued_texts_label_studio": 100}),
                     model_source=gated_source, journal=journal)
    classifier = gated_source.classifiers[1]
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:
        held = asyncio.create_task(client.post("/v1/predict", json={"texts": ["one", "two", "three"]}))
        await _until(classifier.entered.is_set, "the first call to start")
        refused = await client.post("/v1/predict", json={"texts": ["four", "five"]})
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert "max_queued_texts" in refused.json()["detail"]
        fits = asyncio.create_task(client.post("/v1/predict", json={"texts": ["four"]}))
        label_studio = asyncio.create_task(client.post("/predict", json=predict_body(["I hate", "damn"])))
        await _until(lambda: app.state.batcher.pending_jobs == 2, "both requests to queue")
        classifier.gate.set()
        assert (await held).status_code == 200 and (await fits).status_code == 200
        ls = await label_studio
        assert ls.status_code == 200 and [p["score"] for p in ls.json()["results"]] == pytest.approx([0.7, 0.8])
        metrics = (await client.get("/metrics/prometheus")).text
    assert classifier.calls[1][:2] == ["I hate", "damn"]  # Label Studio's lane went first
    assert _samples(metrics, "labelloop_admission_refusals_total") == {(("route", "/v1/predict"),): 1.0}
    depth = _samples(metrics, "labelloop_model_queue_texts")
    assert depth == {(("lane", "api"),): 0.0, (("lane", "label_studio"),): 0.0}


@pytest.mark.anyio
async def test_a_client_that_hangs_up_gets_its_request_dropped_before_the_model(
        settings: Settings, gated_source: FakeSource, journal: Journal):
    """Raw ASGI, because an HTTP client cannot hang up in the middle of a request in process."""
    app = create_app(settings.model_copy(update={"poll_seconds": 0}), model_source=gated_source, journal=journal)
    classifier = gated_source.classifiers[1]
    hang_up = asyncio.Event()
    body = json.dumps({"texts": ["never classified"]}).encode()
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("backend", 80)}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:
        held = asyncio.create_task(client.post("/v1/predict", json={"texts": ["in flight"]}))
        await _until(classifier.entered.is_set, "the first call to start")
        gone = asyncio.create_task(app(scope, receive, send))
        await _until(lambda: app.state.batcher.pending_jobs == 1, "the second request to queue")
        hang_up.set()
        await gone
        classifier.gate.set()
        assert (await held).status_code == 200
        metrics = (await client.get("/metrics/prometheus")).text
    assert classifier.calls == [["in flight"]]
    assert sent[0]["status"] == 499
    assert _samples(metrics, "labelloop_admission_dropped_total") == {(("lane", "api"),): 1.0}


def test_openapi_documents_the_503_and_its_retry_after_on_both_predict_routes(
        settings: Settings, journal: Journal):
    schema = create_app(settings, model_source=FakeSource({1: KeywordClassifier(TABLES[1])}),
                        journal=journal).openapi()
    for path in ("/predict", "/v1/predict"):
        refused = schema["paths"][path]["post"]["responses"]["503"]
        assert refused["headers"]["Retry-After"]["schema"]["type"] == "integer", path
        assert "max_queued_texts" in refused["description"], path


# ------------------------------------------------------------------------------------------ a real server
@pytest.mark.integration
def test_a_flooded_real_server_refuses_quickly_and_keeps_serving_label_studio(settings: Settings, davidson):
    """uvicorn on 127.0.0.1 serving a fast-mode champion trained on real Davidson rows, flooded with
    concurrent /v1/predict: the overflow gets 503 + Retry-After without waiting for the model, Label
    Studio's /predict is answered meanwhile, and the refusals show in the metrics."""
    from labelloop import data
    from labelloop.ls_server import free_port
    from tests.test_serving_integration import ServerThread
    from training.registry import Registry
    from training.train import train_and_register

    backend = settings.model_copy(update={"poll_seconds": 0, "max_queued_texts": 20, "quantize": "none"})
    splits = data.split(davidson, seed=0)
    result = train_and_register(data.stratified_sample(splits.train, 150, seed=0), None, davidson.taxonomy,
                                mode="fast", settings=backend, source="admission-it",
                                eval_frame=data.stratified_sample(splits.validation, 100, seed=0))
    Registry(backend).promote(result.ref.version)
    texts = splits.test["text"].head(400).tolist()
    app = create_app(backend, journal=None)
    with ServerThread(app, free_port()) as server:

        async def flood() -> tuple[list[tuple[int, float, str | None]], httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                async def one(i: int) -> tuple[int, float, str | None]:
                    started = asyncio.get_running_loop().time()
                    r = await client.post("/v1/predict", json={"texts": texts[i * 10: i * 10 + 10]})
                    return r.status_code, asyncio.get_running_loop().time() - started, r.headers.get("retry-after")

                requests = [asyncio.create_task(one(i)) for i in range(40)]
                await asyncio.sleep(0.2)  # the flood is queued or refused by now
                label_studio = await client.post("/predict", json=predict_body(texts[:5]))
                return [await r for r in requests], label_studio

        outcomes, label_studio = asyncio.run(flood())
        metrics = httpx.get(f"{server.url}/metrics/prometheus").text
    refused = [(seconds, retry) for status, seconds, retry in outcomes if status == 503]
    assert {status for status, _, _ in outcomes} <= {200, 503}
    assert refused and len(refused) < len(outcomes)
    assert all(retry is not None and int(retry) >= 1 for _, retry in refused)
    served = sorted(seconds for status, seconds, _ in outcomes if status == 200)
    assert min(seconds for seconds, _ in refused) < served[-1]  # refused before the model was done with the rest
    assert label_studio.status_code == 200 and len(label_studio.json()["results"]) == 5
    assert all(p["result"] for p in label_studio.json()["results"])
    assert _samples(metrics, "labelloop_admission_refusals_total") == {(("route", "/v1/predict"),): len(refused)}
