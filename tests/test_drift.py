"""Drift statistics on constructed data, alerts (persistence, Prometheus, POST with retry), the drift mix of
the query batch, timestamped pool imports, the JSON API and the CLI."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from active_learning.drift_mix import drift_batch, mix_drifted
from active_learning.loop import ActiveLearningLoop
from labelloop.alerts_store import AlertStore, alerts_path, window_ids
from labelloop.journal import Journal
from labelloop.slices import SliceItem, SliceStore
from labelloop.taxonomy import FROM_NAME, TO_NAME, get_taxonomy, label_config_xml
from monitoring import drift_api
from monitoring.alerts import alert_decisions, deliver, evaluate_alerts, register_alert_metrics
from monitoring.drift import (
    Calibration,
    DriftConfig,
    Sample,
    confidence_drift,
    evaluate_window,
    mmd_test,
    novelty_test,
    prediction_drift,
)
from tests.local_http import LocalHTTPServer
from tests.test_escalations import store_db  # noqa: F401 (a fixture)

ALPHA = 0.01
DIM = 24


# ------------------------------------------------------------------------------------------------
# Constructed data: "topics" are directions in embedding space; a platform is a mixture of topics
# ------------------------------------------------------------------------------------------------


def topic_embeddings(rng: np.random.Generator, n: int, centres: np.ndarray, spread: float = 0.6) -> np.ndarray:
    return centres[rng.integers(len(centres), size=n)] + spread * rng.normal(size=(n, DIM))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def topics(rng) -> tuple[np.ndarray, np.ndarray]:
    """Reference topics and one new topic that the reference never shows."""
    centres = rng.normal(size=(9, DIM))
    return centres[:8], centres[8:]


def test_prediction_drift_detects_a_class_shift_and_not_sampling_noise(rng):
    ref = rng.choice(3, size=2000, p=[0.06, 0.77, 0.17])
    same = rng.choice(3, size=500, p=[0.06, 0.77, 0.17])
    shifted = rng.choice(3, size=500, p=[0.06, 0.60, 0.34])
    assert prediction_drift(ref, same, 3).p_value > ALPHA
    result = prediction_drift(ref, shifted, 3)
    assert result.p_value < ALPHA
    assert result.statistic > prediction_drift(ref, same, 3).statistic  # Jensen-Shannon distance grows


def test_prediction_drift_with_a_single_predicted_class_is_no_drift():
    assert prediction_drift(np.zeros(100, int), np.zeros(60, int), 3).p_value == 1.0


def test_confidence_drift_detects_lower_confidence():
    rng = np.random.default_rng(0)
    ref = rng.beta(8, 2, size=2000)
    assert confidence_drift(ref, rng.beta(8, 2, size=500)).p_value > ALPHA
    result = confidence_drift(ref, rng.beta(5, 3, size=500))
    assert result.p_value < ALPHA and result.detail["current_mean"] < result.detail["reference_mean"]


def test_mmd_detects_a_moved_distribution_and_not_a_resample(rng, topics):
    centres, new = topics
    ref = topic_embeddings(rng, 600, centres)
    assert mmd_test(ref, topic_embeddings(rng, 200, centres), permutations=100, rng=rng).p_value > ALPHA
    moved = topic_embeddings(rng, 200, np.vstack([centres[:4], new]))  # half the topics gone, one new
    result = mmd_test(ref, moved, permutations=100, rng=rng)
    assert result.p_value < ALPHA
    assert result.statistic > result.detail["null_mean"]


def test_novelty_detects_a_ten_percent_mix_of_new_content(rng, topics):
    centres, new = topics
    ref = topic_embeddings(rng, 1000, centres)
    same = novelty_test(ref, topic_embeddings(rng, 500, centres), neighbours=5, quantile=0.95)
    assert same.p_value > ALPHA
    mixed = np.vstack([topic_embeddings(rng, 450, centres), topic_embeddings(rng, 50, new)])
    result = novelty_test(ref, mixed, neighbours=5, quantile=0.95)
    assert result.p_value < ALPHA
    assert result.statistic > same.statistic + 0.05  # the new topic's items are the novel ones


def test_no_shift_rarely_alarms_over_many_windows(rng, topics):
    """Same-distribution windows: the any-test rule stays near its nominal rate (4 tests × 1%)."""
    centres, _ = topics
    ref_emb = topic_embeddings(rng, 400, centres)
    ref = Sample(ref_emb, _proba_from(ref_emb, centres))
    config = DriftConfig(p_value=ALPHA, min_items=50, permutations=100)
    alarms = 0
    for seed in range(20):
        r = np.random.default_rng(100 + seed)
        emb = topic_embeddings(r, 150, centres)
        report = evaluate_window(f"w{seed}", ref, Sample(emb, _proba_from(emb, centres)), ["a", "b", "c"], config, None)
        alarms += report.drifted
    assert alarms <= 2


def _proba_from(embeddings: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """A fixed 'model': softmax over similarity to three topic groups."""
    logits = np.stack([embeddings @ centres[i::3].mean(0) for i in range(3)], 1)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_calibration_corrects_an_overconfident_model_and_estimates_accuracy():
    rng = np.random.default_rng(0)

    def overconfident(n):
        true_p = rng.dirichlet([1.5, 1.5, 1.5], size=n)
        labels = np.array([rng.choice(3, p=p) for p in true_p])
        sharp = true_p ** 3
        return sharp / sharp.sum(1, keepdims=True), labels

    proba, labels = overconfident(3000)
    calibration = Calibration.fit(proba, labels)
    assert calibration.temperature > 1.5  # softened
    new_proba, new_labels = overconfident(2000)
    truth = float(np.mean(new_proba.argmax(1) == new_labels))
    estimate = calibration.estimate(new_proba)
    assert abs(estimate["average_confidence"] - truth) < 0.03
    assert abs(estimate["atc"] - truth) < 0.03
    assert new_proba.max(1).mean() - truth > 0.1  # uncalibrated confidence would be far off


def test_small_windows_are_described_but_not_tested(rng, topics):
    centres, new = topics
    emb = topic_embeddings(rng, 300, centres)
    ref = Sample(emb, _proba_from(emb, centres))
    small = topic_embeddings(rng, 20, new)
    report = evaluate_window("tiny", ref, Sample(small, _proba_from(small, centres)), ["a", "b", "c"],
                             DriftConfig(min_items=50, permutations=50), None)
    assert not report.evaluated and not report.drifted and report.tests == []
    assert report.n_items == 20 and "fewer than 50" in report.reason
    assert abs(sum(report.predicted_share.values()) - 1) < 1e-6


def test_a_large_window_is_tested_on_a_capped_sample(rng, topics, monkeypatch):
    """The MMD kernel is (reference + window)²: an uncapped window of a whole day's import needs gigabytes."""
    import monitoring.drift as drift_module

    centres, _ = topics
    emb = topic_embeddings(rng, 300, centres)
    ref = Sample(emb, _proba_from(emb, centres))
    big = topic_embeddings(rng, 900, centres)
    seen: list[int] = []
    real_compare = drift_module.compare
    monkeypatch.setattr(drift_module, "compare", lambda r, c, *a: seen.append(len(c)) or real_compare(r, c, *a))
    report = evaluate_window("big", ref, Sample(big, _proba_from(big, centres)), ["a", "b", "c"],
                             DriftConfig(min_items=50, permutations=20, max_reference=250), None)
    assert seen == [250]
    assert report.evaluated and report.n_items == 900  # the window is still described in full
    assert abs(sum(report.predicted_share.values()) - 1) < 1e-6


def test_only_the_alarm_tests_set_the_smallest_p_value_and_severity():
    """The page draws ``min_p_value`` against the alarm line and the queue orders drifted windows by
    ``severity``: a reported-only test must move neither, or a window that raised no alert looks alarming."""
    from monitoring.drift import TestResult, WindowDrift

    window = WindowDrift("w", 500, None, None, True, False,
                         [TestResult("prediction", 0.3, 1e-9), TestResult("embedding_mmd", 0.01, 0.4),
                          TestResult("embedding_novelty", 0.05, 0.2), TestResult("confidence", 0.2, 1e-12)],
                         {}, 0.8, None)
    assert window.min_p_value == 0.2
    assert window.severity == pytest.approx(-np.log10(0.2))


# ------------------------------------------------------------------------------------------------
# Alerts
# ------------------------------------------------------------------------------------------------


def _report(windows: dict[str, bool], *, estimate: float = 0.8, evaluated: bool = True) -> dict:
    return {
        "window_kind": "batch", "reference": "frozen evaluation set", "reference_accuracy": 0.8, "champion": "v3",
        "p_value": ALPHA,
        "windows": [{"window": w, "n_items": 500, "evaluated": evaluated, "drifted": drifted, "severity": 5.0 if drifted
                     else 0.5, "reason": "embedding_novelty below p=0.01" if drifted else "",
                     "tests": [{"name": "embedding_novelty", "p_value": 1e-5 if drifted else 0.3}],
                     "estimated_accuracy": {"average_confidence": estimate, "atc": estimate}, "audit": None}
                    for w, drifted in windows.items()],
    }


class Receiver(BaseHTTPRequestHandler):
    """Records JSON bodies; answers ``status`` (a class attribute tests flip to simulate an outage)."""

    received: list[dict] = []
    status = 200
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            if type(self).status == 200:
                type(self).received.append(body)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.received, Receiver.status = [], 200
    server = LocalHTTPServer(Receiver)
    yield server
    server.close()


def test_alert_is_raised_then_cleared_with_times_persisted(store_db):  # noqa: F811 (the fixture imported above)
    with AlertStore(store_db("alerts")) as store:
        t = evaluate_alerts(store, _report({"b1": False, "b2": True}), accuracy_drop=0.1, alert_url=None)
        assert [a.key for a in t.raised] == ["drift:batch:b2"] and t.cleared == []
        again = evaluate_alerts(store, _report({"b2": True}), accuracy_drop=0.1, alert_url=None)
        assert again.raised == []  # still the same open episode
    with AlertStore(store_db("alerts")) as store:  # reopened: the state survived
        (open_alert,) = store.open_alerts()
        assert open_alert.window == "b2" and open_alert.raised_at and open_alert.cleared_at is None
        assert store.drifted_windows("batch") == {"b2": 5.0}
        t = evaluate_alerts(store, _report({"b2": False}), accuracy_drop=0.1, alert_url=None)
        assert [a.key for a in t.cleared] == ["drift:batch:b2"]
    with AlertStore(store_db("alerts")) as store:
        assert store.open_alerts() == [] and store.drifted_windows("batch") == {}
        (episode,) = store.history()
        assert episode.cleared_at >= episode.raised_at
        evaluate_alerts(store, _report({"b2": True}), accuracy_drop=0.1, alert_url=None)
        assert len(store.history()) == 2  # a new episode, the old one kept


def test_untested_windows_neither_raise_nor_clear(store_db):  # noqa: F811
    with AlertStore(store_db("alerts")) as store:
        evaluate_alerts(store, _report({"b1": True}), accuracy_drop=0.1, alert_url=None)
        evaluate_alerts(store, _report({"b1": False}, evaluated=False), accuracy_drop=0.1, alert_url=None)
        assert [a.window for a in store.open_alerts()] == ["b1"]


def test_alerts_about_windows_the_report_no_longer_has_are_cleared(store_db):  # noqa: F811
    with AlertStore(store_db("alerts")) as store:
        evaluate_alerts(store, _report({"b1": True, "b2": True}, estimate=0.6), accuracy_drop=0.1, alert_url=None)
        assert len(store.open_alerts()) == 4  # drift and accuracy, two windows
        t = evaluate_alerts(store, _report({"b2": True}, estimate=0.6), accuracy_drop=0.1, alert_url=None)
        assert sorted(a.key for a in t.cleared) == ["accuracy:batch:b1", "drift:batch:b1"]
        day_report = {**_report({"2026-11-30": False}), "window_kind": "day"}  # drift_window changed
        evaluate_alerts(store, day_report, accuracy_drop=0.1, alert_url=None)
        assert store.open_alerts() == [] and store.drifted_windows("batch") == {}


def test_accuracy_alert_when_the_estimate_drops_past_the_threshold():
    decisions = {d.key: d for d in alert_decisions(_report({"b1": False}, estimate=0.65), accuracy_drop=0.1)}
    assert decisions["accuracy:batch:b1"].active and not decisions["drift:batch:b1"].active
    decisions = {d.key: d for d in alert_decisions(_report({"b1": False}, estimate=0.75), accuracy_drop=0.1)}
    assert not decisions["accuracy:batch:b1"].active


def test_alerts_are_posted_and_a_failed_post_is_retried_at_the_next_evaluation(store_db, receiver):  # noqa: F811
    url = receiver.base_url + "/hook"
    with AlertStore(store_db("alerts")) as store:
        Receiver.status = 503
        t = evaluate_alerts(store, _report({"b1": True}), accuracy_drop=0.1, alert_url=url)
        assert t.delivered == 0 and t.undelivered == 1 and Receiver.received == []
        assert [a.window for a in store.open_alerts()] == ["b1"]  # the alert itself is not lost
        Receiver.status = 200
        t = evaluate_alerts(store, _report({"b1": False}), accuracy_drop=0.1, alert_url=url)
        assert t.delivered == 2 and t.undelivered == 0
        assert [(b["event"], b["key"]) for b in Receiver.received] == [("raised", "drift:batch:b1"),
                                                                      ("cleared", "drift:batch:b1")]
        assert Receiver.received[1]["cleared_at"] and Receiver.received[0]["details"]["champion"] == "v3"
        assert deliver(store, url) == (0, 0)  # nothing sent twice


def test_two_replicas_delivering_alerts_at_once_post_each_transition_once(store_db):  # noqa: F811
    """Every replica runs its own drift schedule on the shared alert store; two that deliver at the same
    moment (a slow receiver keeps both inside) must not both post the same transition."""
    import time

    posts: list[tuple[str, str]] = []

    class SlowReceiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(0.3)
            posts.append((body["event"], body["key"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = LocalHTTPServer(SlowReceiver)
    try:
        with AlertStore(store_db("alerts")) as a, AlertStore(store_db("alerts")) as b:
            a.raise_alert("drift:batch:b1", "drift", "b1 drifted", window_kind="batch", window="b1", notify=True)
            start = threading.Barrier(2)
            results: dict[str, tuple[int, int]] = {}

            def deliver_from(name: str, store: AlertStore) -> None:
                start.wait()
                results[name] = deliver(store, server.base_url + "/hook")

            threads = [threading.Thread(target=deliver_from, args=item) for item in (("a", a), ("b", b))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert sorted(results.values()) == [(0, 0), (1, 0)]
            assert a.pending_notifications() == []
    finally:
        server.close()
    assert posts == [("raised", "drift:batch:b1")]


def test_unreachable_alert_url_keeps_the_transition_pending(tmp_path):
    with AlertStore(alerts_path(tmp_path)) as store:
        t = evaluate_alerts(store, _report({"b1": True}), accuracy_drop=0.1, alert_url="http://127.0.0.1:9/x")
        assert t.undelivered == 1 and len(store.pending_notifications()) == 1


def test_prometheus_gauge_follows_the_store(tmp_path):
    with AlertStore(alerts_path(tmp_path)) as store:
        registry = CollectorRegistry()
        register_alert_metrics(registry, store)
        evaluate_alerts(store, _report({"b1": True, "b2": False}), accuracy_drop=0.1, alert_url=None)
        text = generate_latest(registry).decode()
        assert 'labelloop_alert_active{key="drift:batch:b1",kind="drift",window="b1"} 1.0' in text
        assert 'labelloop_alerts_open{kind="drift"} 1.0' in text
        evaluate_alerts(store, _report({"b1": False}), accuracy_drop=0.1, alert_url=None)
        text = generate_latest(registry).decode()
        assert "drift:batch:b1" not in text and 'labelloop_alerts_open{kind="drift"} 0.0' in text


# ------------------------------------------------------------------------------------------------
# Drift leads to action
# ------------------------------------------------------------------------------------------------


def test_mix_replaces_the_least_informative_picks_with_drifted_items():
    windows = np.array(["old"] * 10 + ["new"] * 5 + ["other"] * 5)
    scores = np.arange(20, dtype=float)[::-1].copy()  # item 0 most informative
    batch = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    mixed = mix_drifted(batch, windows, {"new": 3.0}, scores, 0.3)
    assert len(mixed) == 10 and len(set(mixed)) == 10
    assert mixed.tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12]  # new's most informative items replace 7, 8, 9


def test_mix_counts_drifted_items_already_picked_and_spreads_over_windows():
    windows = np.array(["a"] * 5 + ["b"] * 5 + ["c"] * 10)
    scores = np.linspace(1, 0, 20)
    assert mix_drifted(np.array([0, 1, 10, 11]), windows, {"a": 1.0}, scores, 0.5).tolist() == [0, 1, 10, 11]
    mixed = mix_drifted(np.array([10, 11, 12, 13]), windows, {"a": 9.0, "b": 2.0}, scores, 0.5)
    assert sorted(mixed[2:].tolist()) == [0, 5]  # one from each drifted window, the most severe first
    assert mixed[2] == 0


def test_mix_without_drift_or_share_is_unchanged_and_short_windows_give_what_they_have():
    windows, scores, batch = np.array(["a"] * 8 + ["b"] * 2), np.ones(10), np.arange(6)
    assert mix_drifted(batch, windows, {}, scores, 0.5).tolist() == batch.tolist()
    assert mix_drifted(batch, windows, {"b": 1.0}, scores, 0.0).tolist() == batch.tolist()
    mixed = mix_drifted(batch, windows, {"b": 1.0}, scores, 0.9)
    assert mixed.tolist() == [0, 1, 2, 3, 8, 9]


def test_drift_batch_reads_open_alerts_from_the_store(settings):
    unlabeled = pd.DataFrame({"created_at": pd.to_datetime(["2026-01-01"] * 6 + ["2026-03-01"] * 4, utc=True),
                              "batch_id": ["b1"] * 6 + ["b2"] * 4})
    settings = settings.model_copy(update={"drift_window": "batch", "drift_query_share": 0.5})
    batch, scores = np.arange(4), np.linspace(1, 0, 10)
    assert drift_batch(batch, scores, unlabeled, settings).tolist() == [0, 1, 2, 3]  # no store yet
    with AlertStore(alerts_path(settings.state_dir)) as store:
        store.raise_alert("drift:batch:b2", "drift", "b2 drifts", severity=4, window_kind="batch", window="b2")
        store.raise_alert("drift:day:2026-01-01", "drift", "other kind", window_kind="day", window="2026-01-01")
    # b2's best items replace the two least informative picks and move right behind the head, ahead of
    # the end where the loop cuts places for the quality slices
    assert drift_batch(batch, scores, unlabeled, settings).tolist() == [0, 6, 7, 1]


# ------------------------------------------------------------------------------------------------
# Timestamped pool imports
# ------------------------------------------------------------------------------------------------


class FakeTasks:
    """Label Studio's task import, idempotent by item id."""

    def __init__(self) -> None:
        self.tasks: dict[str, int] = {}
        self.calls = 0

    def import_tasks(self, project_id: int, items: pd.DataFrame) -> dict[str, int]:
        self.calls += 1
        for item_id in items["id"].astype(str):
            self.tasks.setdefault(item_id, 1000 + len(self.tasks))
        return {i: self.tasks[i] for i in items["id"].astype(str)}


@pytest.fixture
def loop(settings):
    journal = Journal(settings.journal_path, get_taxonomy(settings.taxonomy))
    yield ActiveLearningLoop(settings, FakeTasks(), 5, journal)
    journal.close()


def test_pool_imports_append_batches_with_timestamps(loop):
    first = pd.DataFrame({"id": ["a", "b"], "text": ["one", "two"]})
    before = pd.Timestamp.now(tz="UTC")
    loop.import_pool(first)
    second = pd.DataFrame({"id": ["b", "c", "d"], "text": ["two", "three", "four"],
                           "created_at": ["2026-01-05T10:00:00Z", "2026-01-12 08:30", None]})
    loop.import_pool(second, batch_id="ethos-import")
    pool = loop.pool().set_index("item_id")
    assert list(pool.index) == ["a", "b", "c", "d"]
    assert pool.loc["b", "batch_id"] == pool.loc["a", "batch_id"] != "ethos-import"  # b keeps its first import
    assert pool.loc["c", "batch_id"] == "ethos-import"
    assert pool.loc["a", "created_at"] >= before  # no source time: the import time
    assert pool.loc["c", "created_at"] == pd.Timestamp("2026-01-12T08:30:00Z")
    assert pool.loc["d", "created_at"] >= before  # a missing value also falls back to the import time
    days = window_ids(pool.reset_index(), "day")
    assert days.iloc[2] == "2026-01-12" and days.iloc[3] == before.strftime("%Y-%m-%d")
    assert window_ids(pool.reset_index(), "week").iloc[2] == "2026-W03"
    assert set(window_ids(pool.reset_index(), "batch")) == {pool.loc["a", "batch_id"], "ethos-import"}


def test_a_bad_created_at_imports_nothing(loop):
    bad = pd.DataFrame({"id": ["a"], "text": ["one"], "created_at": ["not a date"]})
    with pytest.raises(ValueError, match="created_at"):
        loop.import_pool(bad)
    assert loop.client.calls == 0 and not loop.pool_path.exists()


def test_a_numeric_created_at_is_refused_not_read_as_1970(loop):
    """Epoch seconds parsed by pandas are nanoseconds: every item would land in the window 1970-01-01."""
    numbers = pd.DataFrame({"id": ["a", "b"], "text": ["one", "two"], "created_at": [1700000000, 1700003600]})
    with pytest.raises(ValueError, match="2 item.*created_at.*not a date/time"):
        loop.import_pool(numbers)
    assert loop.client.calls == 0 and not loop.pool_path.exists()


def test_a_pool_from_before_timestamps_reads_as_one_legacy_batch(loop):
    loop.pool_path.parent.mkdir(parents=True)
    pd.DataFrame({"item_id": ["a"], "text": ["one"], "task_id": [7]}).to_parquet(loop.pool_path)
    pool = loop.pool()
    assert pool["batch_id"].tolist() == ["legacy"] and pool["created_at"].notna().all()
    loop.import_pool(pd.DataFrame({"id": ["z"], "text": ["new"]}))
    assert loop.pool()["batch_id"].nunique() == 2


def test_created_at_survives_loading_a_file(tmp_path):
    from labelloop import data

    path = tmp_path / "pool.csv"
    pd.DataFrame({"text": ["x", "y"], "created_at": ["2026-02-01", "2026-02-02"]}).to_csv(path, index=False)
    assert data.load_unlabeled(str(path))["created_at"].tolist() == ["2026-02-01", "2026-02-02"]


# ------------------------------------------------------------------------------------------------
# JSON API and CLI
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def api(settings):
    app = FastAPI()
    app.include_router(drift_api.router)
    app.dependency_overrides[drift_api.monitoring_settings] = lambda: settings
    with TestClient(app) as client:
        yield client


def test_api_empty_state_then_report_and_alerts(api, settings):
    body = api.get("/v1/monitoring/drift").json()
    assert body["available"] is False and "labelloop drift" in body["message"]
    assert api.get("/v1/monitoring/alerts").json() == {"open": 0, "alerts": []}
    report = {**_report({"b1": True}), "evaluated_at": "2026-11-30T08:00:00+00:00", "project_id": 5,
              "reference_items": 100, "min_items": 50, "labels": ["hate", "offensive", "neither"]}
    for w in report["windows"]:
        w.update(first_item_at=None, last_item_at=None, min_p_value=1e-5, predicted_share={"hate": 1.0},
                 mean_confidence=float("nan"), tests=[{**t, "statistic": 0.2} for t in w["tests"]])
    with AlertStore(alerts_path(settings.state_dir)) as store:
        store.save_report(report)
        evaluate_alerts(store, report, accuracy_drop=0.1, alert_url=None)
    body = api.get("/v1/monitoring/drift").json()
    assert body["available"] and body["windows"][0]["drifted"] and body["windows"][0]["mean_confidence"] is None
    alerts = api.get("/v1/monitoring/alerts", params={"open_only": True}).json()
    assert alerts["open"] == 1 and alerts["alerts"][0]["key"] == "drift:batch:b1"


def test_api_evaluate_without_a_champion_is_a_409(api):
    response = api.post("/v1/monitoring/drift/evaluate", json={})
    assert response.status_code == 409 and "champion" in response.json()["detail"]
    assert api.post("/v1/monitoring/drift/evaluate", json={"project_id": "x"}).status_code == 422


def test_cli_without_a_champion_prints_one_error_line(settings, monkeypatch):
    from labelloop import cli
    from monitoring import drift_cli

    monkeypatch.setattr(drift_cli, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.app, ["drift"])
    assert result.exit_code == 2 and "error:" in result.output and "champion" in result.output
    result = CliRunner().invoke(cli.app, ["drift", "--window", "month"])
    assert result.exit_code == 2 and "drift_window" in result.output
    assert CliRunner().invoke(cli.app, ["drift", "alerts"]).exit_code == 0


def _annotation(task_id: int, text: str, label: str, annotation_id: int) -> dict:
    """A reviewer's submit as Label Studio's webhook delivers it."""
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": annotation_id, "task": task_id, "project": 5, "completed_by": 1,
                           "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                       "value": {"choices": [label]}}],
                           "was_cancelled": False, "ground_truth": False, "lead_time": 3.0,
                           "created_at": "2026-01-01T10:00:00Z", "updated_at": "2026-01-01T10:00:00Z"},
            "task": {"id": task_id, "data": {"text": text}, "project": 5},
            "project": {"id": 5, "label_config": label_config_xml(get_taxonomy("hate_offensive"))}}


class QueueFake(FakeTasks):
    """Enough of Label Studio for ``push_queue``: task import, slice tasks, predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.pushed: list = []

    def create_tasks(self, project_id, items):
        return [5000 + i for i, _ in enumerate(items)]

    def import_predictions(self, project_id, predictions, **_):
        self.pushed.extend(predictions)
        return len(predictions)

    def set_model_version(self, project_id, model_version):
        self.model_version = model_version


def test_push_queue_draws_its_share_from_a_drifted_window(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    from labelloop.config import Settings
    from tests.test_strategies import FakeEncoder
    from training.classifier import EmbeddingHeadClassifier
    from training.registry import LoadedModel, ModelRef

    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", query_batch=6, queue_size=20,
                        honeypot_rate=0, overlap_rate=0, audit_rate=0, drift_window="batch", drift_query_share=0.5)
    taxonomy = get_taxonomy(settings.taxonomy)
    encoder = FakeEncoder()
    head = LogisticRegression().fit(encoder.embed([f"train {i}" for i in range(40)]), np.arange(40) % 3)
    loaded = LoadedModel(ModelRef(settings.registered_model_name, 1),
                         EmbeddingHeadClassifier(encoder, head, taxonomy.labels))
    with Journal(settings.journal_path, taxonomy) as journal:
        loop = ActiveLearningLoop(settings, QueueFake(), 1, journal)
        loop.import_pool(pd.DataFrame({"id": [f"old{i}" for i in range(40)],
                                       "text": [f"old text {'x' * i}" for i in range(40)]}), batch_id="old")
        loop.import_pool(pd.DataFrame({"id": [f"new{i}" for i in range(10)],
                                       "text": [f"new text {'y' * i}" for i in range(10)]}), batch_id="new")
        new_tasks = set(loop.pool().query("batch_id == 'new'")["task_id"])
        before = set(loop.push_queue(loaded).queued_task_ids)
        assert len(before & new_tasks) < 3  # the strategy alone does not pick the new batch
        with AlertStore(alerts_path(settings.state_dir)) as store:
            store.raise_alert("drift:batch:new", "drift", "new drifts", severity=3, window_kind="batch", window="new")
        after = loop.push_queue(loaded).queued_task_ids
    assert len(after) == 6 and len(set(after) & new_tasks) == 3


def test_drift_end_to_end_on_real_texts_flags_the_other_platform_batch(settings, davidson_small, monkeypatch):
    """A fast-mode champion on Davidson; the pool holds a Davidson batch and an SMS batch. `labelloop drift`
    flags the SMS batch only, stores the report, raises its alert; the API serves both."""
    from labelloop import cli, data
    from monitoring import drift_cli
    from training.registry import Registry
    from training.train import train_and_register

    frame = davidson_small.frame.sample(frac=1.0, random_state=1).reset_index(drop=True)
    train, evaluation, pool_rows = frame.iloc[:300], frame.iloc[300:450], frame.iloc[450:600]
    settings = settings.model_copy(update={"drift_window": "batch", "drift_permutations": 100})
    result = train_and_register(train, None, davidson_small.taxonomy, mode="fast", settings=settings,
                                source="davidson-small", eval_frame=evaluation)
    Registry(settings).promote(result.ref.version, force=True)
    sms = data.load("sms_spam", settings=settings).frame.sample(100, random_state=0)
    with Journal(settings.journal_path, davidson_small.taxonomy) as journal:
        loop = ActiveLearningLoop(settings, FakeTasks(), 5, journal)
        loop.import_pool(pool_rows[["id", "text"]], batch_id="davidson")
        loop.import_pool(sms[["id", "text"]], batch_id="sms")
        audited = loop.pool().query("batch_id == 'davidson'").head(20)
        truth = dict(zip(pool_rows["id"], pool_rows["label"], strict=True))
        for n, (task_id, item_id, text) in enumerate(audited[["task_id", "item_id", "text"]].itertuples(index=False)):
            journal.record(_annotation(task_id, text, truth[item_id], annotation_id=n + 1))
    with SliceStore(settings.slices_path) as slices:
        slices.add(SliceItem(5, int(t), str(i), "audit", model_version=result.ref.label)
                   for t, i in zip(audited["task_id"], audited["item_id"], strict=True))

    monkeypatch.setattr(drift_cli, "get_settings", lambda: settings)
    run = CliRunner().invoke(cli.app, ["drift", "--project", "5"])
    assert run.exit_code == 0, run.output
    assert "raised drift:batch:sms" in run.output and "drift:batch:davidson" not in run.output
    with AlertStore(alerts_path(settings.state_dir)) as store:
        report = store.latest_report()
        assert store.drifted_windows("batch").keys() == {"sms"}
    windows = {w["window"]: w for w in report["windows"]}
    assert windows["sms"]["drifted"] and not windows["davidson"]["drifted"]
    assert windows["sms"]["n_items"] == 100 and windows["davidson"]["n_items"] == 150
    assert report["reference_items"] == 150 and 0 < report["reference_accuracy"] <= 1
    assert {t["name"] for t in windows["sms"]["tests"]} == {"prediction", "embedding_mmd", "embedding_novelty",
                                                            "confidence"}
    audit = windows["davidson"]["audit"]  # the blind-audit accuracy, next to the label-free estimate
    assert audit["n"] == 20 and 0 <= audit["low"] <= audit["accuracy"] <= audit["high"] <= 1
    assert audit["model_versions"] == [result.ref.label] and windows["sms"]["audit"] is None
    assert windows["davidson"]["estimated_accuracy"]["average_confidence"] > 0

    app = FastAPI()
    app.include_router(drift_api.router)
    app.dependency_overrides[drift_api.monitoring_settings] = lambda: settings
    with TestClient(app) as client:
        body = client.get("/v1/monitoring/drift").json()
        assert body["champion"] == result.ref.label and [w["window"] for w in body["windows"]] == ["davidson", "sms"]
        assert client.get("/v1/monitoring/alerts").json()["open"] >= 1

    # a chosen window as the reference: no labels there, so no accuracy estimate
    run = CliRunner().invoke(cli.app, ["drift", "--project", "5", "--reference", "window:davidson", "--json"])
    assert run.exit_code == 0, run.output
    with AlertStore(alerts_path(settings.state_dir)) as store:
        report = store.latest_report()
    windows = {w["window"]: w for w in report["windows"]}
    assert report["reference"].startswith("window davidson") and windows["sms"]["drifted"]
    assert report["reference_accuracy"] is None and windows["sms"]["estimated_accuracy"] is None
    run = CliRunner().invoke(cli.app, ["drift", "--project", "5", "--reference", "window:nope"])
    assert run.exit_code == 2 and "no pool items in that window" in run.output


@pytest.mark.integration
def test_loop_import_appends_timestamped_batches_to_a_real_project(settings, label_studio, ls_project, tmp_path,
                                                                   monkeypatch):
    from pydantic import SecretStr

    from labelloop import cli

    settings = settings.model_copy(update={"ls_url": label_studio.url, "ls_api_key": SecretStr(label_studio.api_key),
                                           "ls_project_id": ls_project})
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    first = tmp_path / "forum.csv"
    pd.DataFrame({"text": ["first post", "second post", "third post"],
                  "created_at": ["2026-03-01T09:00:00Z", "2026-03-02T09:00:00Z", "2026-03-09T09:00:00Z"]}
                 ).to_csv(first, index=False)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["loop", "import", "--append", "--dataset", str(first)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.app, ["loop", "import", "--append", "--dataset", "sms_spam", "--limit", "4"])
    assert result.exit_code == 0 and "4 tasks appended" in result.output, result.output
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["x"], "created_at": ["yesterday-ish"]}).to_csv(bad, index=False)
    result = runner.invoke(cli.app, ["loop", "import", "--append", "--dataset", str(bad)])
    assert result.exit_code == 2 and "error:" in result.output and "created_at" in result.output

    with Journal(settings.journal_path, get_taxonomy(settings.taxonomy)) as journal:
        pool = ActiveLearningLoop(settings, None, ls_project, journal).pool()
    assert len(pool) == 7 and pool["batch_id"].nunique() == 2
    forum = pool[pool["text"].str.endswith("post")]
    assert window_ids(forum, "day").tolist() == ["2026-03-01", "2026-03-02", "2026-03-09"]
    assert window_ids(forum, "week").tolist() == ["2026-W09", "2026-W10", "2026-W11"]  # ISO weeks start Monday
    tasks = label_studio.client.sdk.tasks.list(project=ls_project)
    assert {t.id for t in tasks} == set(pool["task_id"])  # the bad file imported nothing


def test_reading_the_pool_for_drift_closes_the_slice_store_it_opens(settings, monkeypatch):
    """The scheduled evaluation reads the pool through a loop, which opens a SQLite slice store: one
    left open per evaluation is a connection leaked every period of ``labelloop serve``."""
    import active_learning.loop as loop_module
    from monitoring.drift import DriftMonitor

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
    pool_path = settings.state_dir / "pools" / "project-5.parquet"
    pool_path.parent.mkdir(parents=True)
    pd.DataFrame({"item_id": ["a"], "text": ["one"], "task_id": [7]}).to_parquet(pool_path)
    assert DriftMonitor(settings, 5).pool()["item_id"].tolist() == ["a"]
    assert opened and all(store.closed for store in opened)


def test_a_reference_window_smaller_than_the_minimum_is_refused_with_the_count(settings):
    """A one-item reference window used to crash the novelty test with sklearn's own message; a handful of
    items would give tests of nothing. The API turns this ValueError into a 409."""
    from monitoring.drift import DriftMonitor

    small = settings.model_copy(update={"drift_reference": "window:old"})
    pool = pd.DataFrame({"item_id": ["a", "b"], "text": ["one", "two"], "task_id": [1, 2]})
    with pytest.raises(ValueError, match=r"1 item\(s\) in that window, fewer than drift_min_items=50"):
        DriftMonitor(small, 5).reference(pool, pd.Series(["old", "new"]))


def test_push_queue_keeps_the_drift_share_when_slices_take_places(tmp_path, monkeypatch):
    """The drifted picks are appended to the batch's end, and the slices' places are cut from that end:
    without care, audit items silently ate the drift share."""
    from sklearn.linear_model import LogisticRegression

    from labelloop.config import Settings
    from tests.test_strategies import FakeEncoder
    from training.classifier import EmbeddingHeadClassifier
    from training.registry import LoadedModel, ModelRef

    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", query_batch=10, queue_size=20,
                        honeypot_rate=0, overlap_rate=0, audit_rate=0.3, drift_window="batch", drift_query_share=0.3)
    taxonomy = get_taxonomy(settings.taxonomy)
    encoder = FakeEncoder()
    head = LogisticRegression().fit(encoder.embed([f"train {i}" for i in range(40)]), np.arange(40) % 3)
    loaded = LoadedModel(ModelRef(settings.registered_model_name, 1),
                         EmbeddingHeadClassifier(encoder, head, taxonomy.labels))
    with Journal(settings.journal_path, taxonomy) as journal:
        loop = ActiveLearningLoop(settings, QueueFake(), 1, journal)
        loop.import_pool(pd.DataFrame({"id": [f"old{i}" for i in range(200)],
                                       "text": [f"old text {'x' * i}" for i in range(200)]}), batch_id="old")
        loop.import_pool(pd.DataFrame({"id": [f"new{i}" for i in range(10)],
                                       "text": [f"new text {'y' * i}" for i in range(10)]}), batch_id="new")
        new_tasks = set(loop.pool().query("batch_id == 'new'")["task_id"])
        with AlertStore(alerts_path(settings.state_dir)) as store:
            store.raise_alert("drift:batch:new", "drift", "new drifts", severity=3, window_kind="batch", window="new")
        result = loop.push_queue(loaded)
        audited = loop.slices.task_ids("audit", 1)
    assert result.slices["audit"] == 3 and not audited & new_tasks  # the audit drew from the old batch only
    assert len(result.queued_task_ids) == 7 and len(set(result.queued_task_ids) & new_tasks) == 3


def test_a_malformed_alert_url_fails_when_settings_load():
    from pydantic import ValidationError

    from labelloop.config import Settings

    for bad in ("hooks.example.com/alerts", "ftp://example.com/x", "http://"):
        with pytest.raises(ValidationError, match="alert_url"):
            Settings(alert_url=bad)
    assert Settings(alert_url=" https://hooks.example.com/a ").alert_url == "https://hooks.example.com/a"
    assert Settings(alert_url="").alert_url is None
