"""The whole loop against a real Label Studio and a real MLflow store: pre-labels, the queue, exactly-once
labels across a service restart, retrain → gate → promotion, and pre-labels from the new champion."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import SecretStr

from active_learning.service import Service
from labelloop import data
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.test_serving_integration import ServerThread
from training.registry import CHAMPION, Registry
from training.train import train_and_register

pytestmark = pytest.mark.integration
TAXONOMY = get_taxonomy("hate_offensive")


@pytest.fixture
def loop_settings(settings, label_studio: RunningLabelStudio, ls_project: int):
    return settings.model_copy(update={
        "ls_url": label_studio.url, "ls_api_key": SecretStr(label_studio.api_key), "ls_project_id": ls_project,
        "port": free_port(), "basic_user": "ls", "basic_password": SecretStr("loop-pass-42"),
        "poll_seconds": 0, "reconcile_seconds": 0, "retrain_every": 1000, "query_batch": 10, "queue_size": 40,
        # this test is about the loop's plumbing; the gate's judgement is tested in test_registry
        "gate_min_gain": -1.0, "gate_max_recall_drop": 1.0,
        # the quality slices (audit, honeypots, overlap) have their own test: tests/test_slices_integration.py
        "audit_rate": 0.0, "honeypot_rate": 0.0, "overlap_rate": 0.0})


def margins(proba: np.ndarray) -> np.ndarray:
    top2 = np.sort(proba, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def test_the_loop_turns_against_real_label_studio(loop_settings, label_studio: RunningLabelStudio,
                                                  ls_project: int, davidson):
    splits = data.split(davidson, seed=3)
    pool = data.stratified_sample(splits.train, 120, seed=3)
    gold = dict(zip(pool["id"], pool["label"], strict=True))
    seed_rows = data.stratified_sample(splits.validation, 150, seed=3)
    first = train_and_register(seed_rows, None, TAXONOMY, mode="fast", settings=loop_settings, source="seed",
                               eval_frame=data.stratified_sample(splits.test, 150, seed=3))
    registry = Registry(loop_settings)
    assert registry.promote().promoted
    client = label_studio.client
    auth = ("ls", "loop-pass-42")

    service = Service(loop_settings)
    service.loop.import_pool(pool[["id", "text"]])
    client.use_uncertainty_sampling(ls_project)
    with ServerThread(service.app, loop_settings.port) as server:
        client.connect_backend(ls_project, server.url, basic_auth=auth)

        # pre-labels appear, and the queue's head is the item the champion is least sure about
        queue = service.loop.push_queue(service.loop.champion())
        assert queue.model_version == first.ref.label and queue.pushed == 40
        stored = [p for p in client.predictions(ls_project) if p["model_version"] == first.ref.label]
        assert len(stored) == 40 and all(p["result"][0]["value"]["choices"][0] in TAXONOMY.labels for p in stored)
        unlabeled = service.loop.unlabeled()
        proba = service.loop.champion().classifier.predict_proba(unlabeled["text"].tolist())
        most_uncertain = int(unlabeled["task_id"].iat[int(np.argmin(margins(proba)))])
        head = client.next_task(ls_project)
        assert head["id"] == queue.queued_task_ids[0] == most_uncertain

        # annotations made through the API reach the journal once, through the webhook
        labeled = [head]
        client.create_annotation(head["id"], gold[head["data"]["item_id"]])
        for _ in range(3):
            task = client.next_task(ls_project)
            client.create_annotation(task["id"], gold[task["data"]["item_id"]])
            labeled.append(task)
        wait_for(lambda: len(service.journal.labels(ls_project)) == 4, "four annotation webhooks")
        service.close()

    # one more label while our service is down: its webhook fails, reconciliation after restart finds it
    down = client.next_task(ls_project)
    client.create_annotation(down["id"], gold[down["data"]["item_id"]])
    other = next(i for i, label in gold.items() if label != gold[down["data"]["item_id"]]
                 and i not in {t["data"]["item_id"] for t in labeled})
    client.create_annotation(client.task_ids(ls_project)[other], gold[other])

    restarted = Service(loop_settings)
    with ServerThread(restarted.app, loop_settings.port) as server:
        report = restarted.reconcile_once()
        assert report["applied"] == 2 and report["duplicates"] == 4
        assert restarted.reconcile_once()["applied"] == 0
        labels = restarted.journal.labels(ls_project)
        assert len(labels) == 6 and labels["task_id"].is_unique

        # a retrain job registers a challenger, the gate promotes it, serving swaps, the queue follows
        job = restarted.runner.wait(restarted.runner.submit("test").id, timeout=600)
        assert job.state == "done", job.error
        new = registry.alias_version(CHAMPION)
        assert new == first.ref.version + 1 and job.result["promoted"]
        new_label = f"{registry.name}:v{new}"
        wait_for(lambda: restarted.app.state.champion.label == new_label, "serving to swap")
        assert any(p["model_version"] == new_label for p in client.predictions(ls_project))

        # and the ML backend's own pre-labels (Label Studio asking /predict) carry the new version
        rest = [t for t in client.task_ids(ls_project).values()
                if t not in {p["task"] for p in client.predictions(ls_project)}][:3]
        client.retrieve_predictions(ls_project, rest)
        fresh = [p for p in client.predictions(ls_project) if p["task"] in rest]
        assert fresh and {p["model_version"] for p in fresh} == {new_label}
        restarted.close()
