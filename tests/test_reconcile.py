"""Reconciliation against a real Label Studio 1.23 server: annotations whose webhooks never arrived land in
the journal exactly once, confirmed deletions are recorded, and webhooks plus reconciliation never count a
label twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from label_studio_sdk.core.api_error import ApiError

from active_learning.labelstudio import choice_result
from active_learning.reconcile import ReconcileReport, reconcile
from labelloop.config import Settings
from labelloop.data import LabeledData
from labelloop.journal import Journal
from labelloop.taxonomy import get_taxonomy
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.local_http import LocalHTTPServer

TAXONOMY = get_taxonomy("hate_offensive")


@pytest.fixture
def journal(tmp_path: Path, state_backend: str | None) -> Iterator[Journal]:
    with Journal(Settings(state_dir=tmp_path, database_url=state_backend).database("journal"), TAXONOMY) as j:
        yield j


def _items(data: LabeledData, n: int) -> pd.DataFrame:
    return data.frame.iloc[:n][["id", "text"]].reset_index(drop=True)


def _labels(journal: Journal, project_id: int) -> dict[str, str]:
    frame = journal.labels(project_id)
    return dict(zip(frame["id"], frame["label"], strict=True))


class WebhookReceiver:
    """What serving's ``POST /webhook`` does (journal, then acknowledge), and a switch to lose events."""

    def __init__(self, journal: Journal):
        self.down = False
        self.lost: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if receiver.down:
                    receiver.lost.append(payload.get("action"))
                    self.send_response(503)
                else:
                    journal.record(payload)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = LocalHTTPServer(Handler)
        self.url = f"{self._server.base_url}/webhook"

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def receiver(journal: Journal) -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(journal)
    try:
        yield r
    finally:
        r.close()


@pytest.mark.integration
def test_reconcile_pulls_unseen_annotations_once_and_follows_updates_and_deletions(
    label_studio: RunningLabelStudio, ls_project: int, davidson_small: LabeledData, journal: Journal
) -> None:
    client = label_studio.client
    items = _items(davidson_small, 4)
    tasks = client.import_tasks(ls_project, items)
    ids = list(items["id"])
    made = {
        ids[0]: client.create_annotation(tasks[ids[0]], "hate"),
        ids[1]: client.create_annotation(tasks[ids[1]], "offensive"),
        ids[2]: client.create_annotation(tasks[ids[2]], "neither", was_cancelled=True),
    }

    first = reconcile(client, ls_project, journal)
    assert first == ReconcileReport(seen=3, applied=3, duplicates=0, deleted=0, quarantined=0, ignored=0)
    assert _labels(journal, ls_project) == {ids[0]: "hate", ids[1]: "offensive"}
    texts = journal.labels(ls_project).set_index("id")["text"].to_dict()
    assert texts == dict(zip(items["id"][:2], items["text"][:2], strict=True))
    assert set(journal.annotations(ls_project)["source"]) == {"reconcile"}

    mark = journal.last_event_id()
    again = reconcile(client, ls_project, journal)
    assert again == ReconcileReport(seen=3, applied=0, duplicates=3, deleted=0, quarantined=0, ignored=0)
    assert journal.last_event_id() == mark and journal.new_label_count(mark) == 0

    label_studio.sdk.annotations.delete(made[ids[1]]["id"])
    label_studio.sdk.annotations.update(made[ids[0]]["id"], result=choice_result("neither"))
    third = reconcile(client, ls_project, journal)
    assert third == ReconcileReport(seen=2, applied=1, duplicates=1, deleted=1, quarantined=0, ignored=0)
    assert _labels(journal, ls_project) == {ids[0]: "neither"}
    assert journal.new_label_count(mark) == 1
    assert journal.live_annotation_ids(ls_project) == {made[ids[0]]["id"], made[ids[2]]["id"]}


@pytest.mark.integration
def test_webhooks_and_reconciliation_together_count_every_label_once(
    label_studio: RunningLabelStudio,
    ls_project: int,
    davidson_small: LabeledData,
    journal: Journal,
    receiver: WebhookReceiver,
) -> None:
    client, sdk = label_studio.client, label_studio.sdk
    sdk.webhooks.create(project=ls_project, url=receiver.url, send_payload=True, send_for_all_actions=True)
    items = _items(davidson_small, 5)
    tasks = client.import_tasks(ls_project, items)
    ids = list(items["id"])

    delivered = [client.create_annotation(tasks[ids[0]], "hate"), client.create_annotation(tasks[ids[1]], "offensive")]
    wait_for(lambda: _labels(journal, ls_project) == {ids[0]: "hate", ids[1]: "offensive"}, "two webhooks")
    stats = journal.stats()
    assert stats["accepted"] == 2 and stats["ignored"] >= 1  # TASKS_CREATED is journaled, not applied

    receiver.down = True  # serving is down: these events are lost for good
    client.create_annotation(tasks[ids[2]], "hate")
    client.create_annotation(tasks[ids[3]], "neither", was_cancelled=True)
    sdk.annotations.update(delivered[0]["id"], result=choice_result("neither"))
    sdk.annotations.delete(delivered[1]["id"])
    wait_for(lambda: receiver.lost == ["ANNOTATION_CREATED", "ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                       "ANNOTATIONS_DELETED"], "four refused webhooks")
    receiver.down = False
    assert _labels(journal, ls_project) == {ids[0]: "hate", ids[1]: "offensive"}  # stale

    report = reconcile(client, ls_project, journal)
    assert report == ReconcileReport(seen=3, applied=3, duplicates=0, deleted=1, quarantined=0, ignored=0)
    assert _labels(journal, ls_project) == {ids[0]: "neither", ids[2]: "hate"}

    # A webhook and a later pass see the same version: the listing's timestamps match the webhook's.
    mark = journal.last_event_id()
    latest = client.create_annotation(tasks[ids[4]], "offensive")
    assert journal.new_label_count(mark) == 1
    report = reconcile(client, ls_project, journal)
    assert report == ReconcileReport(seen=4, applied=0, duplicates=4, deleted=0, quarantined=0, ignored=0)
    sdk.annotations.update(latest["id"], result=choice_result("hate"))
    assert reconcile(client, ls_project, journal).applied == 0
    assert _labels(journal, ls_project) == {ids[0]: "neither", ids[2]: "hate", ids[4]: "hate"}
    assert journal.new_label_count(mark) == 1
    assert journal.stats()["quarantine"] == 0


@pytest.mark.integration
def test_an_annotation_label_studio_never_had_is_confirmed_gone_and_marked_deleted(
    label_studio: RunningLabelStudio, ls_project: int, journal: Journal
) -> None:
    ghost = {"id": 2_000_000_000, "task": 1_999_999_999, "project": ls_project, "result": choice_result("hate"),
             "updated_at": "2025-01-01T00:00:00Z", "was_cancelled": False}
    journal.apply_annotation(ghost, {"id": 1_999_999_999, "data": {"text": "gone"}, "project": ls_project})
    assert len(journal.labels(ls_project)) == 1
    report = reconcile(label_studio.client, ls_project, journal)
    assert report == ReconcileReport(seen=0, applied=0, duplicates=0, deleted=1, quarantined=0, ignored=0)
    assert journal.labels(ls_project).empty


# --- unit: a listing that pages past a row must not turn into a deletion ------------------------------
class _Model:
    def __init__(self, data: dict[str, Any]):
        self.data = data

    def model_dump(self, mode: str, exclude: set[str] | None = None) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in (exclude or set())}


class _Endpoint:
    def __init__(self, rows: dict[int, dict[str, Any]]):
        self.rows = rows

    def get(self, id: int) -> _Model:
        if id not in self.rows:
            raise ApiError(status_code=404, headers={}, body={"detail": "Not found."})
        return _Model(self.rows[id])


class _SkippingClient:
    """Label Studio holding ``annotations``, whose listing leaves out the ids in ``skipped``."""

    def __init__(self, annotations: list[dict[str, Any]], tasks: dict[int, dict[str, Any]], skipped: set[int]):
        self.listing = [(a, tasks[a["task"]]) for a in annotations if a["id"] not in skipped]
        self.sdk = type("Sdk", (), {})()
        self.sdk.annotations = _Endpoint({a["id"]: a for a in annotations})
        self.sdk.tasks = _Endpoint({i: {**t, "annotations": [], "predictions": []} for i, t in tasks.items()})

    def annotations(self, project_id: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        yield from self.listing


def _ls_annotation(ann_id: int, task_id: int, label: str, updated_at: str) -> dict[str, Any]:
    return {"id": ann_id, "task": task_id, "project": 3, "result": choice_result(label), "completed_by": 1,
            "was_cancelled": False, "ground_truth": False, "updated_at": updated_at}


def test_annotations_missing_from_the_listing_are_rechecked_not_deleted(journal: Journal) -> None:
    tasks = {t: {"id": t, "data": {"text": f"text {t}"}, "project": 3} for t in (10, 11, 12)}
    stored = [_ls_annotation(1, 10, "hate", "2025-01-01T00:00:00Z"),
              _ls_annotation(2, 11, "offensive", "2025-01-01T00:00:00Z"),
              _ls_annotation(3, 12, "neither", "2025-01-01T00:00:00Z")]
    for annotation in stored:
        journal.apply_annotation(annotation, tasks[annotation["task"]], source="webhook")
    changed = _ls_annotation(2, 11, "hate", "2025-01-02T00:00:00Z")  # updated while the listing ran
    client = _SkippingClient([stored[0], changed], tasks, skipped={1, 2})  # 3 is really gone
    report = reconcile(client, 3, journal)  # type: ignore[arg-type]
    assert report == ReconcileReport(seen=0, applied=1, duplicates=1, deleted=1, quarantined=0, ignored=0)
    labels = journal.labels(3).set_index("task_id")["label"].to_dict()
    assert labels == {10: "hate", 11: "hate"}


def test_a_rechecked_annotation_keeps_the_pre_label_it_started_from(journal: Journal) -> None:
    """The re-read task must keep its ``predictions``: they are where the journal reads which label the
    annotator was shown (``parent_prediction`` is only an id)."""
    prediction = {"id": 5, "model_version": "labelloop-hate-offensive:v2", "result": choice_result("offensive")}
    task = {"id": 10, "data": {"text": "text 10"}, "project": 3}
    annotation = {**_ls_annotation(1, 10, "hate", "2025-01-01T00:00:00Z"), "parent_prediction": 5}
    client = _SkippingClient([annotation], {10: task}, skipped={1})
    client.sdk.tasks = _Endpoint({10: {**task, "annotations": [], "predictions": [prediction]}})
    journal.apply_annotation(annotation, task, source="webhook")  # the webhook's task has no predictions
    reconcile(client, 3, journal)  # type: ignore[arg-type]
    row = journal.annotations(3).iloc[0]
    assert (row["suggested_label"], row["suggested_model_version"]) == ("offensive", "labelloop-hate-offensive:v2")
