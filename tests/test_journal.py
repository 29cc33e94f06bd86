"""The annotation journal on a real SQLite file and a real PostgreSQL: exactly-once, ordering, deletion,
quarantine, restarts, threads and a second writing process. The tests of the exactly-once rules run on both
engines (``state_backend``); what only a SQLite file has (WAL, ``user_version`` migrations) and the label-set
encoding run on SQLite alone."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from labelloop.config import Settings
from labelloop.journal import SCHEMA_VERSION, Journal, JournalError, RecordResult
from labelloop.taxonomy import Taxonomy, get_taxonomy

TAXONOMY = get_taxonomy("hate_offensive")
PROJECT = 7


def ts(minute: int) -> str:
    return f"2025-03-01T10:{minute:02d}:00.123456Z"


def result(*labels: str) -> list[dict]:
    return [{"id": "r1", "from_name": "label", "to_name": "text", "type": "choices", "origin": "manual",
             "value": {"choices": list(labels)}}]


def annotation(ann_id: int = 1, task_id: int = 10, label: str | None = "hate", minute: int = 0, *,
               cancelled: bool = False, ground_truth: bool = False, annotator: int = 1,
               result_: list | None = None) -> dict:
    """An annotation shaped like Label Studio 1.23's AnnotationWebhookSerializer output."""
    return {
        "id": ann_id, "result": result_ if result_ is not None else ([] if label is None else result(label)),
        "task": task_id, "project": PROJECT, "completed_by": annotator, "updated_by": annotator,
        "was_cancelled": cancelled, "ground_truth": ground_truth, "lead_time": 4.2,
        "created_at": ts(0), "updated_at": ts(minute), "draft_created_at": None, "result_count": 1,
        "unique_id": f"u-{ann_id}-{minute}", "import_id": None, "last_action": None, "bulk_created": False,
        "parent_prediction": None, "parent_annotation": None, "last_created_by": None,
    }


def task(task_id: int = 10, text: Any = "you people are awful", item_id: str | None = None) -> dict:
    data: dict[str, Any] = {} if text is None else {"text": text}
    if item_id is not None:
        data["item_id"] = item_id
    return {"id": task_id, "data": data, "meta": {}, "created_at": ts(0), "updated_at": ts(0),
            "is_labeled": True, "overlap": 1, "project": PROJECT, "total_annotations": 1,
            "cancelled_annotations": 0, "total_predictions": 0, "inner_id": task_id}


def event(action: str = "ANNOTATION_CREATED", ann: dict | None = None, tsk: dict | None = None) -> dict:
    ann = annotation() if ann is None else ann
    tsk = task(ann["task"]) if tsk is None else tsk
    return {"action": action, "annotation": ann, "task": tsk,
            "project": {"id": PROJECT, "title": "review", "label_config": "<View/>"}}


def deleted(*ann_ids: int) -> dict:
    return {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ann_ids],
            "project": {"id": PROJECT}}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite"


def open_journal(path: Path, backend: str | None) -> Journal:
    """The journal as the service opens it: the SQLite file at ``path`` or, with a URL, its PostgreSQL schema."""
    return Journal(Settings(state_dir=path.parent, database_url=backend).database("journal"), TAXONOMY)


@pytest.fixture
def journal(path: Path, state_backend: str | None):
    with open_journal(path, state_backend) as j:
        yield j


def label_map(journal: Journal) -> dict[int, str]:
    frame = journal.labels()
    return dict(zip(frame["task_id"], frame["label"], strict=True))


def test_file_is_wal_and_schema_versioned(path: Path) -> None:
    Journal(path, TAXONOMY).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


def test_created_annotation_is_accepted_and_becomes_a_label(journal: Journal) -> None:
    res = journal.record(event(tsk=task(item_id="davidson-42")))
    assert res == RecordResult("accepted", None, 1)
    labels = journal.labels()
    assert labels[["id", "text", "label", "task_id", "annotation_id", "annotator"]].to_dict("records") == [
        {"id": "davidson-42", "text": "you people are awful", "label": "hate", "task_id": 10,
         "annotation_id": 1, "annotator": 1}
    ]
    assert labels.loc[0, "updated_at"] == "2025-03-01T10:00:00.123456Z"
    assert labels.loc[0, "project_id"] == PROJECT


def test_item_id_defaults_to_task_id_and_text_field_is_configurable(path: Path) -> None:
    with Journal(path, TAXONOMY, text_field="message") as journal:
        tsk = {"id": 55, "data": {"message": "buy now"}, "project": PROJECT}
        assert journal.record(event(ann=annotation(task_id=55), tsk=tsk)).status == "accepted"
        assert journal.labels()["id"].tolist() == ["ls-55"]
        other = journal.record(event(ann=annotation(ann_id=2, task_id=56), tsk=task(56)))
        assert other.status == "quarantined"
        assert "data['message']" in other.reason


def test_same_payload_again_is_a_duplicate_and_not_counted_twice(journal: Journal) -> None:
    payload = event()
    first = journal.record(payload)
    second = journal.record(payload)
    assert first.status == "accepted"
    assert second.status == "duplicate" and second.event_id == first.event_id + 1
    assert len(journal.labels()) == 1
    assert journal.new_label_count(0) == 1
    assert journal.stats() == {"accepted": 1, "duplicate": 1, "ignored": 0, "quarantined": 0,
                               "events": 2, "quarantine": 0, "live_labels": 1}


def test_newer_update_changes_the_label_older_one_does_not(journal: Journal) -> None:
    journal.record(event())
    newer = journal.record(event("ANNOTATION_UPDATED", annotation(label="offensive", minute=5)))
    assert newer.status == "accepted"
    assert label_map(journal) == {10: "offensive"}
    older = journal.record(event("ANNOTATION_UPDATED", annotation(label="neither", minute=3)))
    assert older.status == "duplicate" and "older" in older.reason
    assert label_map(journal) == {10: "offensive"}
    assert journal.labels().loc[0, "updated_at"] == ts(5).replace(".123456Z", ".123456Z")


def test_timestamps_compare_as_instants_not_strings(journal: Journal) -> None:
    ann = annotation(label="hate")
    ann["updated_at"] = "2025-03-01T12:00:00+02:00"  # 10:00 UTC
    journal.record(event(ann=ann))
    later = annotation(label="offensive")
    later["updated_at"] = "2025-03-01T10:30:00Z"  # sorts before "12:00" as a string, but is later
    assert journal.record(event("ANNOTATION_UPDATED", later)).status == "accepted"
    assert label_map(journal) == {10: "offensive"}


def test_delete_removes_the_label_and_is_final(journal: Journal) -> None:
    journal.record(event())
    journal.record(event(ann=annotation(ann_id=2, task_id=11), tsk=task(11)))
    res = journal.record(deleted(1))
    assert res.status == "accepted"
    assert label_map(journal) == {11: "hate"}
    assert journal.record(deleted(1)).status == "duplicate"
    stale = journal.record(event("ANNOTATION_UPDATED", annotation(label="offensive", minute=9)))
    assert stale.status == "ignored" and "deleted" in stale.reason
    assert label_map(journal) == {11: "hate"}
    assert 1 not in set(journal.annotations()["annotation_id"])


def test_delete_of_an_unseen_annotation_leaves_a_tombstone(journal: Journal) -> None:
    assert journal.record(deleted(99)).reason.endswith("tombstone recorded")
    late = journal.apply_annotation(annotation(ann_id=99), task())
    assert late.status == "ignored"
    assert journal.labels().empty


def test_deleting_tasks_or_the_project_removes_their_annotations(journal: Journal) -> None:
    for ann_id, task_id in ((1, 10), (2, 10), (3, 11), (4, 12)):
        journal.record(event(ann=annotation(ann_id=ann_id, task_id=task_id), tsk=task(task_id)))
    res = journal.record({"action": "TASKS_DELETED", "tasks": [{"id": 10}, {"id": 999}]})
    assert res.status == "accepted" and res.reason.startswith("2 annotation(s)")
    assert sorted(label_map(journal)) == [11, 12]
    assert journal.record({"action": "TASKS_DELETED", "tasks": [{"id": 10}]}).status == "ignored"
    assert journal.record({"action": "PROJECT_DELETED", "project": {"id": PROJECT}}).status == "accepted"
    assert journal.labels().empty


def test_cancelled_annotation_is_recorded_but_not_a_label(journal: Journal) -> None:
    res = journal.record(event(ann=annotation(label=None, cancelled=True)))
    assert res.status == "accepted" and "skipped" in res.reason
    assert journal.labels().empty
    assert journal.new_label_count(0) == 0
    row = journal.annotations().iloc[0]
    assert bool(row["cancelled"]) and row["label"] is None
    # un-skipping (a later submitted version) makes it a label
    journal.record(event("ANNOTATION_UPDATED", annotation(label="neither", minute=2)))
    assert label_map(journal) == {10: "neither"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"action": "START_TRAINING", "project": {"id": PROJECT}}, "START_TRAINING"),
        ({"action": "PROJECT_UPDATED", "project": {"id": PROJECT}}, "does not change labels"),
        ({"action": "TASKS_CREATED", "tasks": [{"id": 1}]}, "does not change labels"),
        ({"action": "SOMETHING_NEW", "annotation": annotation()}, "unknown action 'SOMETHING_NEW'"),
    ],
)
def test_non_label_actions_are_ignored_with_a_reason(journal: Journal, payload: dict, reason: str) -> None:
    res = journal.record(payload)
    assert res.status == "ignored" and reason in res.reason
    assert journal.labels().empty and journal.stats()["ignored"] == 1


def _with(ann: dict, **changes: Any) -> dict:
    return {**ann, **changes}


def _without(obj: dict, key: str) -> dict:
    return {k: v for k, v in obj.items() if k != key}


MALFORMED = [
    ([1, 2], "not a JSON object"),
    ("ANNOTATION_CREATED", "not a JSON object"),
    (None, "not a JSON object"),
    ({"annotation": annotation()}, "no 'action'"),
    ({"action": "ANNOTATION_CREATED", "task": task()}, "without 'annotation'"),
    ({"action": "ANNOTATION_CREATED", "annotation": "x", "task": task()}, "must both be objects"),
    ({"action": "ANNOTATION_CREATED", "annotation": ["x"], "task": [task()]}, "not a JSON object"),
    ({"action": "ANNOTATION_CREATED", "annotation": {"id": {"a": 1}, "task": [1]}}, "no valid 'id'"),
    (event(ann=_without(annotation(), "id")), "no valid 'id'"),
    (event(ann=_with(annotation(), id="abc")), "no valid 'id'"),
    (event(ann=_without(annotation(), "updated_at")), "updated_at"),
    (event(ann=_with(annotation(), updated_at="yesterday")), "updated_at"),
    (_without(event(), "task"), "task is missing"),
    (event(tsk=task(task_id=11)), "belongs to task 10"),
    (event(ann=annotation(label="spam")), "['spam'] not in taxonomy 'hate_offensive'"),
    (event(ann=annotation(result_=[{"type": "textarea", "value": {"text": ["hi"]}}])), "no choices value"),
    (event(ann=annotation(label=None)), "no choices value"),
    (event(ann=annotation(result_={"choices": ["hate"]})), "'result' is not a list"),
    (event(ann=annotation(result_=result("hate", "offensive"))), "several taxonomy labels"),
    (event(tsk=task(text=None)), "has no text"),
    (event(tsk=task(text="   ")), "has no text"),
    (event(tsk=task(text=12345)), "has no text"),
    ({"action": "ANNOTATIONS_DELETED", "project": {"id": PROJECT}}, "without annotation ids"),
    (event(ann=_with(annotation(), id="²")), "no valid 'id'"),  # a digit to str.isdigit, not to int()
    (event(ann=_with(annotation(), id=2**70)), "no valid 'id'"),  # more than SQLite's 64 bits
    (event(ann=_with(annotation(), updated_at="9999-12-31T23:59:59-05:00")), "updated_at"),  # past datetime.max
    (event(tsk=task(text="lone \ud83d surrogate")), "unusable payload: UnicodeEncodeError"),
]


@pytest.mark.parametrize(("payload", "reason"), MALFORMED)
def test_malformed_payloads_are_stored_and_quarantined(journal: Journal, payload: Any, reason: str) -> None:
    res = journal.record(payload)
    assert res.status == "quarantined"
    assert reason in res.reason
    assert journal.labels().empty and journal.new_label_count(0) == 0
    [entry] = journal.quarantined()
    assert entry["event_id"] == res.event_id and entry["reason"] == res.reason
    assert entry["payload"] == payload  # the raw payload is kept for audit and replay


def test_reconcile_quarantines_an_annotation_it_cannot_store_and_goes_on(journal: Journal) -> None:
    bad = journal.apply_annotation(annotation(1, 10), task(10, text="lone \udc00 surrogate"))
    assert bad.status == "quarantined" and bad.reason.startswith("unusable payload")
    assert journal.apply_annotation(annotation(2, 11), task(11)).status == "accepted"
    assert label_map(journal) == {11: "hate"}


def test_label_outside_taxonomy_is_ignored_only_when_another_control_holds_a_taxonomy_label(
    journal: Journal,
) -> None:
    two_controls = result("offensive") + [
        {"from_name": "sarcasm", "to_name": "text", "type": "choices", "value": {"choices": ["yes"]}}
    ]
    assert journal.record(event(ann=annotation(result_=two_controls))).status == "accepted"
    assert label_map(journal) == {10: "offensive"}


def test_unusable_update_retracts_the_earlier_label(journal: Journal) -> None:
    journal.record(event())
    res = journal.record(event("ANNOTATION_UPDATED", annotation(label="spam", minute=1)))
    assert res.status == "quarantined"
    assert journal.labels().empty
    assert journal.annotations().loc[0, "problem"] == res.reason
    again = journal.record(event("ANNOTATION_UPDATED", annotation(label="spam", minute=1)))
    assert again.status == "duplicate" and len(journal.quarantined()) == 1
    journal.record(event("ANNOTATION_UPDATED", annotation(label="neither", minute=2)))
    assert label_map(journal) == {10: "neither"}


def test_bulk_created_event_applies_each_annotation(journal: Journal) -> None:
    payload = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [annotation(1, 10, "hate"), annotation(2, 11, "spam"), annotation(3, 12, "neither")],
        "task": [task(12, "third"), task(10), task(11)],
        "project": {"id": PROJECT},
    }
    res = journal.record(payload)
    assert res.status == "accepted"
    assert "#2: quarantined" in res.reason
    assert label_map(journal) == {10: "hate", 12: "neither"}
    assert journal.labels().set_index("task_id").loc[12, "text"] == "third"
    assert journal.record(payload).status == "duplicate"


def test_restart_keeps_state_and_still_dedupes(path: Path, state_backend: str | None) -> None:
    with open_journal(path, state_backend) as first:
        first.record(event())
        first.record(deleted(5))
        marker = first.last_event_id()
    with open_journal(path, state_backend) as second:
        assert label_map(second) == {10: "hate"}
        assert second.record(event()).status == "duplicate"
        assert second.apply_annotation(annotation(ann_id=5), task()).status == "ignored"
        assert second.last_event_id() == marker + 1
        assert second.new_label_count(0) == 1


def test_new_label_count_counts_labels_set_or_changed_after_an_event(journal: Journal) -> None:
    journal.record(event(ann=annotation(1, 10)))
    journal.record(event(ann=annotation(2, 11), tsk=task(11)))
    mark = journal.last_event_id()
    assert journal.new_label_count(0) == 2 and journal.new_label_count(mark) == 0
    journal.record(event(ann=annotation(3, 12), tsk=task(12)))
    journal.record(event("ANNOTATION_UPDATED", annotation(1, 10, "offensive", minute=1)))
    journal.record(event("ANNOTATION_UPDATED", _with(annotation(2, 11, minute=1), ground_truth=True),
                         task(11)))  # flag flipped, label unchanged: not a new label
    journal.record(event())  # duplicate
    journal.record(event(ann=annotation(4, 13, cancelled=True, label=None), tsk=task(13)))
    assert journal.new_label_count(mark) == 2
    journal.record(deleted(3))
    assert journal.new_label_count(mark) == 1
    assert journal.new_label_count(journal.last_event_id()) == 0


def test_labels_resolve_several_annotators_per_task(journal: Journal) -> None:
    def add(ann_id: int, task_id: int, label: str, minute: int, ground_truth: bool = False) -> None:
        ann = annotation(ann_id, task_id, label, minute, ground_truth=ground_truth, annotator=ann_id)
        assert journal.record(event(ann=ann, tsk=task(task_id))).status == "accepted"

    add(1, 10, "hate", 1)  # majority: 2 × hate beats a later offensive
    add(2, 10, "hate", 2)
    add(3, 10, "offensive", 3)
    add(4, 11, "hate", 1)  # tie: the latest wins
    add(5, 11, "neither", 4)
    add(6, 12, "hate", 1)  # a ground truth annotation beats the majority
    add(7, 12, "hate", 2)
    add(8, 12, "neither", 0, ground_truth=True)
    labels = journal.labels().set_index("task_id")
    assert labels["label"].to_dict() == {10: "hate", 11: "neither", 12: "neither"}
    assert labels["annotation_id"].to_dict() == {10: 2, 11: 5, 12: 8}
    assert labels["n_annotations"].to_dict() == {10: 3, 11: 2, 12: 3}
    assert len(journal.annotations()) == 8
    assert journal.labels(project_id=PROJECT + 1).empty and journal.annotations(PROJECT + 1).empty


def test_reconcile_path_dedupes_against_webhooks_without_growing_the_log(journal: Journal) -> None:
    journal.record(event())
    before = journal.last_event_id()
    res = journal.apply_annotation(annotation(), task())
    assert res == RecordResult("duplicate", res.reason, None)
    assert journal.last_event_id() == before
    missed = journal.apply_annotation(annotation(2, 11, "neither"), task(11))
    assert missed.status == "accepted" and missed.event_id == before + 1
    assert journal.annotations().set_index("annotation_id").loc[2, "source"] == "reconcile"
    assert journal.live_annotation_ids(PROJECT) == {1, 2}
    assert journal.mark_deleted(2, "reconcile").status == "accepted"
    assert journal.mark_deleted(2, "reconcile").status == "duplicate"
    assert journal.live_annotation_ids(PROJECT) == {1}
    bad = journal.apply_annotation({"id": 3}, task(12))
    assert bad.status == "quarantined" and bad.event_id is not None
    with pytest.raises(ValueError, match="source"):
        journal.apply_annotation(annotation(), task(), source="cron")  # type: ignore[arg-type]


def _versions(n_annotations: int) -> list[dict]:
    """Three versions of each annotation; the last one (minute 2) is the truth."""
    labels = TAXONOMY.labels
    return [
        event("ANNOTATION_CREATED" if minute == 0 else "ANNOTATION_UPDATED",
              annotation(i, 100 + i, labels[(i + minute) % 3], minute), task(100 + i))
        for i in range(1, n_annotations + 1) for minute in range(3)
    ]


def test_threads_recording_overlapping_events_apply_each_version_at_most_once(journal: Journal) -> None:
    payloads = _versions(40)
    results: list[tuple[dict, RecordResult]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        order = payloads[:]
        random.Random(seed).shuffle(order)
        for payload in order:
            res = journal.record(payload)
            with lock:
                results.append((payload, res))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(results) == 4 * len(payloads) == journal.stats()["events"]
    assert len({res.event_id for _, res in results}) == len(results)
    accepted: dict[tuple[int, str], int] = {}
    for payload, res in results:
        if res.status == "accepted":
            key = (payload["annotation"]["id"], payload["annotation"]["updated_at"])
            accepted[key] = accepted.get(key, 0) + 1
    assert set(accepted.values()) == {1}  # no version applied twice
    assert all((i, ts(2)) in accepted for i in range(1, 41))  # the newest always lands
    assert label_map(journal) == {100 + i: TAXONOMY.labels[(i + 2) % 3] for i in range(1, 41)}
    assert journal.new_label_count(0) == 40


def _reconcile_in_another_process(path: str, backend: str | None, n_annotations: int, started: Any, go: Any,
                                  out: Any) -> None:
    """Reports its statuses, or the error that stopped it (so a failure shows at once).

    It applies its first annotation, then waits until the other writer has applied one too, so each
    side is known to win at least once; after that the two race freely.
    """
    with open_journal(Path(path), backend) as journal:
        try:
            statuses = [journal.apply_annotation(annotation(1, 101, "offensive"), task(101)).status]
            started.set()
            go.wait(timeout=120)
            for i in range(2, n_annotations + 1):
                statuses.append(journal.apply_annotation(annotation(i, 100 + i, "offensive"), task(100 + i)).status)
            out.put(statuses)
        except Exception as e:
            started.set()
            out.put(f"{type(e).__name__}: {e}")


def test_a_second_process_writing_at_the_same_time_never_double_applies(journal: Journal, path: Path,
                                                                         state_backend: str | None) -> None:
    """The other process is the reconciler of the same machine, or on PostgreSQL also another replica."""
    n = 150
    ctx = multiprocessing.get_context("spawn")
    started, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    other = ctx.Process(target=_reconcile_in_another_process, args=(str(path), state_backend, n, started, go, out))
    other.start()
    try:
        assert started.wait(timeout=120)
        # The two writers walk the same annotations from opposite ends, so they meet in the middle.
        # SQLite's lock is not fair: a writer that never pauses starves the other one's busy-wait, so
        # this one pauses between events the way webhooks do.
        mine = []
        for i in range(n, 0, -1):
            mine.append(journal.record(event(ann=annotation(i, 100 + i, "offensive"), tsk=task(100 + i))).status)
            go.set()
            time.sleep(0.002)
        theirs = out.get(timeout=120)
    finally:
        other.join(timeout=60)
    assert isinstance(theirs, list), theirs
    assert other.exitcode == 0
    assert mine.count("accepted") + theirs.count("accepted") == n
    assert mine.count("duplicate") + theirs.count("duplicate") == n
    assert mine.count("accepted") > 0 and theirs.count("accepted") > 0
    assert len(journal.labels()) == n and journal.new_label_count(0) == n
    sources = journal.annotations()["source"].value_counts().to_dict()
    assert sources == {"webhook": mine.count("accepted"), "reconcile": theirs.count("accepted")}


def test_reconciling_the_same_malformed_annotation_again_does_not_grow_the_log(journal: Journal) -> None:
    broken = _without(annotation(1, 10), "updated_at")  # cannot even be versioned
    first = journal.apply_annotation(broken, task(10))
    assert first.status == "quarantined"
    events = journal.stats()["events"]
    for _ in range(3):  # later reconcile passes meet it again
        again = journal.apply_annotation(broken, task(10))
        assert again.status == "duplicate" and again.event_id is None
    assert journal.stats()["events"] == events and len(journal.quarantined()) == 1


# --- schema 2: lead time and the pre-label the annotator started from ---------------------------------------


def prediction(pred_id: int = 5, label: str = "offensive", version: str = "labelloop-hate-offensive:v3") -> dict:
    """A prediction as ``tasks.list(fields="all")`` returns it (observed on Label Studio 1.23.2)."""
    return {"id": pred_id, "model_version": version, "score": 0.4, "task": 10, "project": PROJECT,
            "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                        "value": {"choices": [label]}}]}


def suggestion_columns(journal: Journal) -> dict:
    row = journal.annotations().iloc[0]
    return {k: (None if row[k] is None or row[k] is pd.NA or (isinstance(row[k], float) and row[k] != row[k])
                else row[k])
            for k in ("lead_time", "prediction_id", "suggested_label", "suggested_model_version")}


def test_webhook_keeps_lead_time_and_prediction_id(journal: Journal) -> None:
    """A webhook's annotation names its parent prediction by id, and its task carries no predictions."""
    journal.record(event(ann={**annotation(), "parent_prediction": 5, "prediction": {}}))
    assert suggestion_columns(journal) == {"lead_time": 4.2, "prediction_id": 5, "suggested_label": None,
                                           "suggested_model_version": None}


def test_reconcile_listing_fills_in_the_suggestion_of_a_webhooked_version(journal: Journal) -> None:
    ann = {**annotation(), "parent_prediction": 5}
    journal.record(event(ann=ann))
    before = journal.last_event_id()
    res = journal.apply_annotation(ann, {**task(), "predictions": [prediction(4, "hate"), prediction(5)]})
    assert res.status == "duplicate" and res.event_id is None
    assert journal.last_event_id() == before and journal.new_label_count(before) == 0
    assert suggestion_columns(journal) == {"lead_time": 4.2, "prediction_id": 5, "suggested_label": "offensive",
                                           "suggested_model_version": "labelloop-hate-offensive:v3"}


def test_annotation_without_a_parent_prediction_has_no_suggestion(journal: Journal) -> None:
    journal.apply_annotation(annotation(), {**task(), "predictions": [prediction()]})
    assert suggestion_columns(journal)["suggested_label"] is None


def test_suggestion_outside_the_taxonomy_is_not_kept(journal: Journal) -> None:
    journal.apply_annotation({**annotation(), "parent_prediction": 5},
                             {**task(), "predictions": [prediction(5, "spam")]})
    cols = suggestion_columns(journal)
    assert cols["prediction_id"] == 5 and cols["suggested_label"] is None


def test_schema_1_journal_is_migrated_and_backfilled_from_its_events(path: Path) -> None:
    """A journal written before schema 2: new columns added, values read back from the stored payloads."""
    with Journal(path, TAXONOMY) as j:
        j.apply_annotation({**annotation(), "parent_prediction": 5, "lead_time": 9.5},
                           {**task(), "predictions": [prediction(5, "neither")]})
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE a2 AS SELECT annotation_id, project_id, task_id, item_id, text, label, "
                       "annotator, created_at, updated_at, cancelled, ground_truth, deleted, problem, source, "
                       "event_id, label_event_id FROM annotations; DROP TABLE annotations; "
                       "ALTER TABLE a2 RENAME TO annotations; PRAGMA user_version = 1;")
    conn.close()
    with Journal(path, TAXONOMY) as j:
        assert suggestion_columns(j) == {"lead_time": 9.5, "prediction_id": 5, "suggested_label": "neither",
                                         "suggested_model_version": "labelloop-hate-offensive:v3"}
        assert j.labels()["label"].tolist() == ["hate"]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"annotations_task", "annotations_project", "annotations_label_event"} <= indexes  # the rebuilt table's
    conn.close()


def test_a_newer_webhook_version_keeps_the_suggestion_read_from_the_same_prediction(journal: Journal) -> None:
    journal.apply_annotation({**annotation(), "parent_prediction": 5}, {**task(), "predictions": [prediction(5)]})
    journal.record(event("ANNOTATION_UPDATED", ann={**annotation(label="neither", minute=3), "parent_prediction": 5}))
    cols = suggestion_columns(journal)
    assert journal.annotations().loc[0, "label"] == "neither"
    assert (cols["suggested_label"], cols["suggested_model_version"]) == ("offensive", "labelloop-hate-offensive:v3")


def test_an_absurd_lead_time_is_dropped_not_the_label(journal: Journal) -> None:
    """``lead_time`` is a by-product; an integer beyond a float's range must not quarantine the label."""
    res = journal.record(event(ann={**annotation(), "lead_time": 10**400}))
    assert res.status == "accepted"
    assert label_map(journal) == {10: "hate"} and suggestion_columns(journal)["lead_time"] is None
    assert journal.record(event(ann={**annotation(2, 11), "lead_time": -(10**400)})).status == "accepted"


# --- multi-label taxonomies: labels are sets ----------------------------------------------------

MULTI = Taxonomy("targets", "Who is targeted", ("gender", "race", "religion"), ("G", "R", "Rel"), multi=True,
                 none_label="none_of_these")


@pytest.fixture
def multi_journal(tmp_path: Path):
    with Journal(tmp_path / "multi.sqlite", MULTI) as j:
        yield j


def multi_event(ann_id: int, task_id: int, *choices: str, minute: int = 0, annotator: int = 1,
                ground_truth: bool = False) -> dict:
    ann = annotation(ann_id, task_id, minute=minute, annotator=annotator, ground_truth=ground_truth,
                     result_=result(*choices))
    return event(ann=ann)


def test_a_multi_label_annotation_is_journaled_as_a_set_in_taxonomy_order(multi_journal: Journal) -> None:
    assert multi_journal.record(multi_event(1, 10, "religion", "gender")).status == "accepted"
    assert multi_journal.record(multi_event(2, 11, "none_of_these")).status == "accepted"
    frame = multi_journal.annotations().set_index("annotation_id")
    assert frame.loc[1, "label"] == ("gender", "religion")
    assert frame.loc[2, "label"] == ()  # the none label is the empty set, never a label of its own
    assert label_map(multi_journal) == {10: ("gender", "religion"), 11: ()}
    stored = sqlite3.connect(multi_journal.path).execute(
        "SELECT label FROM annotations ORDER BY annotation_id").fetchall()
    assert stored == [('["gender", "religion"]',), ("[]",)]


def test_the_same_set_in_another_order_is_not_a_new_label(multi_journal: Journal) -> None:
    multi_journal.record(multi_event(1, 10, "race", "gender"))
    mark = multi_journal.last_event_id()
    assert multi_journal.record(multi_event(1, 10, "gender", "race", minute=2)).status == "accepted"
    assert multi_journal.new_label_count(mark) == 0
    multi_journal.record(multi_event(1, 10, "gender", minute=3))
    assert multi_journal.new_label_count(mark) == 1


@pytest.mark.parametrize("choices, reason", [
    (("ethnicity",), "not in taxonomy"),
    (("gender", "ethnicity"), "not in taxonomy"),  # part of a set is never trained on
    (("none_of_these", "race"), "none of these"),
    ((), "no choices value"),  # with a none label, selecting nothing is not an answer
])
def test_unusable_label_sets_are_quarantined_with_the_reason(multi_journal: Journal, choices, reason) -> None:
    res = multi_journal.record(multi_event(1, 10, *choices))
    assert res.status == "quarantined" and reason in res.reason
    assert multi_journal.labels().empty
    assert reason in multi_journal.quarantined()[0]["reason"]


def test_without_a_none_label_an_answer_that_selects_nothing_is_the_empty_set(tmp_path: Path) -> None:
    taxonomy = Taxonomy("t", "T", ("a", "b"), ("A", "B"), multi=True)
    with Journal(tmp_path / "j.sqlite", taxonomy) as j:
        assert j.record(multi_event(1, 10)).status == "accepted"
        assert label_map(j) == {10: ()}


def test_votes_across_annotators_take_the_majority_per_label(multi_journal: Journal) -> None:
    for ann_id, choices in ((1, ("gender", "race")), (2, ("gender",)), (3, ("race", "religion"))):
        multi_journal.record(multi_event(ann_id, 10, *choices, minute=ann_id, annotator=ann_id))
    # two annotators who disagree on every label: no label has more than half
    multi_journal.record(multi_event(4, 11, "gender", annotator=1))
    multi_journal.record(multi_event(5, 11, "race", minute=1, annotator=2))
    labels = multi_journal.labels().set_index("task_id")
    assert labels.loc[10, "label"] == ("gender", "race") and labels.loc[10, "n_annotations"] == 3
    assert labels.loc[11, "label"] == ()
    assert labels.loc[10, "annotation_id"] == 3  # the row is the latest annotation's


def test_ground_truth_decides_a_multi_label_vote(multi_journal: Journal) -> None:
    multi_journal.record(multi_event(1, 10, "gender", "race", annotator=1))
    multi_journal.record(multi_event(2, 10, "gender", "race", minute=1, annotator=2))
    multi_journal.record(multi_event(3, 10, "religion", minute=2, annotator=3, ground_truth=True))
    assert label_map(multi_journal) == {10: ("religion",)}


def test_training_labels_vote_multi_label_sets_per_item(multi_journal: Journal, tmp_path: Path) -> None:
    from active_learning.training_labels import training_labels
    from labelloop.slices import SliceStore

    multi_journal.record(multi_event(1, 10, "gender", "race", annotator=1))
    multi_journal.record(event(ann=annotation(2, 12, minute=1, annotator=2, result_=result("race")),
                               tsk={**task(12), "data": {"text": "you people are awful", "item_id": "ls-10"}}))
    multi_journal.record(multi_event(3, 11, "none_of_these"))
    store = SliceStore(tmp_path / "slices.sqlite")
    try:
        frame = training_labels(multi_journal, store, PROJECT)
    finally:
        store.close()
    assert dict(zip(frame["id"], frame["label"], strict=True)) == {"ls-10": ("race",), "ls-11": ()}


def test_a_single_label_journal_is_not_read_as_label_sets(path: Path) -> None:
    with Journal(path, TAXONOMY) as j:
        j.record(event())
    with Journal(path, Taxonomy("hate_offensive", "x", ("hate", "offensive"), ("h", "o"), multi=True)) as j:
        with pytest.raises(JournalError, match="single-label"):
            j.labels()


def test_a_multi_label_journal_is_not_read_as_single_labels(multi_journal: Journal) -> None:
    """Read as names, the stored sets would be exported and trained on as labels such as '["race"]'."""
    multi_journal.record(multi_event(1, 10, "race"))
    with Journal(multi_journal.path, TAXONOMY) as j:
        with pytest.raises(JournalError, match="multi-label"):
            j.labels()


def test_label_text_is_the_journals_stored_form(multi_journal: Journal) -> None:
    from labelloop.journal import label_text

    multi_journal.record(multi_event(1, 10, "religion", "gender"))
    stored = sqlite3.connect(multi_journal.path).execute("SELECT label FROM annotations").fetchone()[0]
    assert label_text(MULTI, ("religion", "gender")) == stored
    assert label_text(MULTI, ()) == "[]" and label_text(TAXONOMY, "hate") == "hate"
