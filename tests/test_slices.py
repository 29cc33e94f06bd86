"""The quality slices' mixing policy and the training labels derived around them (no servers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from active_learning.adjudication import CandidateError, front_scores, plan_adjudication
from active_learning.slices_push import (
    Blind,
    SliceRates,
    Suggested,
    assemble_queue,
    follow,
    interleave,
    place_pending,
    plan_batch,
    priorities_for,
    slice_counts,
)
from active_learning.training_labels import derive_training_labels
from labelloop.journal import ANNOTATION_COLUMNS
from labelloop.slices import COLUMNS as SLICE_COLUMNS
from labelloop.taxonomy import get_taxonomy
from tests.test_cli import cli_settings, invoke  # noqa: F401 (cli_settings is a fixture)
from tests.test_escalations import store_db  # noqa: F401 (a fixture)

LABELS = get_taxonomy("hate_offensive").labels
RATES = SliceRates(audit=0.05, honeypot=0.02, overlap=0.05)


# ------------------------------------------------------------------------------------------ rates
def test_slice_counts_hold_the_rates_on_average_even_for_small_batches():
    rng = np.random.default_rng(0)
    draws = [slice_counts(10, RATES, rng) for _ in range(4000)]
    assert np.mean([d.audit for d in draws]) == pytest.approx(0.5, abs=0.03)
    assert np.mean([d.honeypot for d in draws]) == pytest.approx(0.2, abs=0.03)
    assert np.mean([d.overlap for d in draws]) == pytest.approx(0.5, abs=0.03)
    exact = slice_counts(100, RATES, rng)
    assert (exact.audit, exact.honeypot, exact.overlap) == (5, 2, 5)


def test_slice_counts_never_exceed_the_batch():
    counts = slice_counts(3, SliceRates(0.5, 0.5, 0.5), np.random.default_rng(1))
    assert counts.audit + counts.honeypot + counts.overlap <= 3


def _plan(seed: int, n: int = 200, k: int = 40, pending=(), limit: int = 80, candidates: int = 30, rates=RATES):
    rng = np.random.default_rng(seed)
    ranked = np.random.default_rng(seed + 1000).permutation(n)
    return plan_batch(n_unlabeled=n, batch=ranked[:k], ranked=ranked, pending_audit=np.array(pending, dtype=int),
                      limit=limit, n_honeypot_candidates=candidates, rates=rates, rng=rng), ranked


def test_no_pool_item_is_queued_twice_and_the_limit_holds():
    for seed in range(50):
        plan, _ = _plan(seed, pending=[3, 7])
        pool_items = [*plan.audit, 3, 7, *plan.al, *plan.tail]
        assert len(pool_items) == len(set(pool_items))
        assert len(pool_items) <= 80
        assert set(plan.overlap_sources) <= set(plan.al)
        assert len(set(plan.honeypots)) == len(plan.honeypots) < 30


def test_pending_audit_items_stay_blind():
    for seed in range(30):
        plan, ranked = _plan(seed, pending=ranked_head(seed))
        assert not set(ranked_head(seed)) & set(plan.al + plan.tail + plan.audit)


def ranked_head(seed: int) -> list[int]:
    return np.random.default_rng(seed + 1000).permutation(200)[:2].tolist()


def test_audit_items_are_drawn_uniformly_from_the_whole_pool_not_from_the_batch():
    hits = np.zeros(20)
    batch = np.arange(5)
    for seed in range(4000):
        plan = plan_batch(n_unlabeled=20, batch=batch, ranked=np.arange(20), pending_audit=np.zeros(0, int), limit=20,
                          n_honeypot_candidates=0, rates=SliceRates(audit=0.2), rng=np.random.default_rng(seed))
        hits[plan.audit] += 1
    assert hits.sum() == 4000
    assert hits.min() > 140 and hits.max() < 260  # 200 expected per item; batch items are not favoured


def test_the_active_learning_order_holds_for_everything_else():
    plan, ranked = _plan(4, rates=SliceRates())
    assert plan.al == ranked[:40].tolist() and plan.tail == ranked[40:80].tolist()
    plan, ranked = _plan(4)
    kept = [i for i in ranked[:40].tolist() if i not in plan.audit]
    assert plan.al == kept[: len(plan.al)]


# ------------------------------------------------------------------------------------------ order
def test_interleave_keeps_the_head_and_follow_puts_copies_right_behind_their_source():
    batch = [Suggested(i, "hate") for i in range(1, 11)]
    extras = [Blind(100), Blind(101), Suggested(102, "neither")]
    for seed in range(30):
        order = interleave(batch, extras, np.random.default_rng(seed))
        assert order[0] == batch[0]
        assert sorted(e.task_id for e in order) == sorted([*range(1, 11), 100, 101, 102])
        assert [e for e in order if e in batch] == batch
    copy = Suggested(200, "hate")
    order = follow(batch, {5: [copy]})
    assert order[order.index(batch[4]) + 1] == copy


def test_priorities_are_unique_with_adjudications_first_and_audit_items_unlabelled():
    order = [Suggested(1, "hate"), Blind(2), Suggested(3, "offensive")]
    predictions = priorities_for(order, [Suggested(9, "neither")], len(LABELS), "m:v1")
    scores = [p.score for p in predictions]
    assert [p.task_id for p in predictions] == [9, 1, 2, 3]
    assert scores == sorted(scores) and len(set(scores)) == 4
    assert scores[0] < 0 <= scores[1] and scores[-1] < 1 / len(LABELS)
    blind = predictions[2].to_ls()
    assert blind["result"] == [] and blind["score"] == scores[2]
    assert predictions[1].to_ls()["result"][0]["value"]["choices"] == ["hate"]


def test_front_scores_queue_new_adjudications_behind_waiting_ones_and_ahead_of_the_rest():
    first = front_scores(3, None)
    later = front_scores(2, max(first))
    assert first == sorted(first) and later == sorted(later)
    assert -1 <= first[0] and max(first) < later[0] < later[1] < 0


def test_pending_slice_tasks_keep_their_role_in_the_next_queue():
    pending = slices([
        {"task_id": 20, "item_id": "g", "kind": "honeypot", "gold_label": "hate"},
        {"task_id": 21, "item_id": "a", "kind": "overlap", "source_task_id": 5},   # source in the new batch
        {"task_id": 22, "item_id": "b", "kind": "overlap", "source_task_id": 99},  # source answered already
        {"task_id": 23, "item_id": "c", "kind": "adjudication", "source_task_id": 7, "disputed_label": "neither",
         "disputed_annotation_id": 70},
        {"task_id": 24, "item_id": "h", "kind": "honeypot", "gold_label": "hate"},  # text unknown: left out
    ])
    carried = place_pending(pending, {20: "offensive", 21: "hate", 22: "neither"}, in_batch={5, 6})
    assert carried.copies == {5: [Suggested(21, "hate")]}
    assert carried.loose == [Suggested(20, "offensive"), Suggested(22, "neither")]
    assert carried.adjudications == [Suggested(23, "neither")]  # the disputed label, not the model's


# ------------------------------------------------------------------------------------------ training labels
def annotations(rows: list[tuple]) -> pd.DataFrame:
    """rows: (annotation_id, task_id, item id, label, annotator, minute)."""
    frame = pd.DataFrame([{
        "annotation_id": a, "task_id": t, "project_id": 1, "id": i, "text": f"text of {i}", "label": label,
        "annotator": who, "created_at": f"2026-01-01T00:{m:02d}:00.000000Z",
        "updated_at": f"2026-01-01T00:{m:02d}:00.000000Z", "cancelled": label is None, "ground_truth": False,
        "problem": None, "source": "webhook"} for a, t, i, label, who, m in rows], columns=ANNOTATION_COLUMNS)
    return frame


def slices(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"project_id": 1, "model_version": "m:v1", "created_at": "2026", **r} for r in rows]
                        ).reindex(columns=SLICE_COLUMNS)


def test_honeypot_answers_never_train():
    frame = annotations([(1, 10, "a", "hate", 7, 1), (2, 20, "gold-1", "neither", 7, 2)])
    store = slices([{"task_id": 20, "item_id": "gold-1", "kind": "honeypot", "gold_label": "hate"}])
    labels = derive_training_labels(frame, store)
    assert labels["id"].tolist() == ["a"]
    assert derive_training_labels(frame, slices([]))["id"].tolist() == ["a", "gold-1"]  # the filter is what drops it


def test_overlap_copies_are_one_item_with_the_majority_label_and_ties_to_the_latest():
    frame = annotations([
        (1, 10, "a", "hate", 7, 1), (2, 11, "a", "offensive", 8, 2),   # a tie: the later answer wins
        (3, 30, "b", "neither", 7, 1), (4, 31, "b", "hate", 8, 5), (5, 30, "b", "neither", 9, 3),  # 2:1
    ])
    store = slices([{"task_id": 11, "item_id": "a", "kind": "overlap", "source_task_id": 10},
                    {"task_id": 31, "item_id": "b", "kind": "overlap", "source_task_id": 30}])
    labels = derive_training_labels(frame, store).set_index("id")
    assert labels.index.is_unique and sorted(labels.index) == ["a", "b"]
    assert labels.loc["a", "label"] == "offensive" and labels.loc["b", "label"] == "neither"
    assert labels.loc["a", "n_annotations"] == 2 and labels.loc["b", "n_annotations"] == 3


def test_an_adjudicated_label_supersedes_the_original_and_a_replayed_one_changes_nothing():
    frame = annotations([(1, 10, "a", "hate", 7, 1), (2, 11, "a", "hate", 8, 2), (3, 40, "a", "neither", 9, 3),
                         (4, 50, "c", "offensive", 7, 1)])
    store = slices([{"task_id": 11, "item_id": "a", "kind": "overlap", "source_task_id": 10},
                    {"task_id": 40, "item_id": "a", "kind": "adjudication", "source_task_id": 10,
                     "disputed_label": "hate", "disputed_annotation_id": 1}])
    labels = derive_training_labels(frame, store).set_index("id")
    assert labels.loc["a", "label"] == "neither" and labels.loc["a", "annotation_id"] == 3
    assert labels.loc["c", "label"] == "offensive"
    replayed = pd.concat([frame, frame.iloc[[2]]])  # the journal never holds one annotation twice; even so
    assert derive_training_labels(replayed, store).set_index("id").loc["a", "label"] == "neither"
    # with no adjudication recorded the two agreeing reviewers win
    assert derive_training_labels(frame, store.iloc[:1]).set_index("id").loc["a", "label"] == "hate"


def test_skipped_answers_and_an_empty_journal_give_no_labels():
    assert derive_training_labels(annotations([]), slices([])).empty
    assert derive_training_labels(annotations([(1, 10, "a", None, 7, 1)]), slices([])).empty


# ------------------------------------------------------------------------------------------ adjudication plan
def test_adjudication_plan_skips_repeats_and_honeypots_and_refuses_unknown_annotations():
    frame = annotations([(1, 10, "a", "hate", 7, 1), (2, 20, "g", "hate", 7, 2), (3, 30, "b", "neither", 8, 3)])
    store = slices([{"task_id": 20, "item_id": "g", "kind": "honeypot", "gold_label": "neither"},
                    {"task_id": 40, "item_id": "b", "kind": "adjudication", "source_task_id": 30,
                     "disputed_label": "neither", "disputed_annotation_id": 3}])
    send, skipped = plan_adjudication([{"annotation_id": 1}, {"annotation_id": 2, "label": "hate"},
                                       {"annotation_id": 3, "label": "neither"}], frame, store, LABELS)
    assert send[["annotation_id", "disputed_label", "task_id", "id"]].values.tolist() == [[1, "hate", 10, "a"]]
    assert set(skipped) == {2, 3} and "honeypot" in skipped[2] and "already" in skipped[3]
    with pytest.raises(CandidateError, match=r"\[99\]"):
        plan_adjudication([{"annotation_id": 99}], frame, store, LABELS)
    with pytest.raises(CandidateError, match="taxonomy"):
        plan_adjudication([{"annotation_id": 1, "label": "spam"}], frame, store, LABELS)
    with pytest.raises(CandidateError, match="annotation_id"):
        plan_adjudication([{"annotation_id": "one"}], frame, store, LABELS)


def test_adjudication_plan_skips_a_skipped_answer_instead_of_disputing_nan():
    """A skipped (cancelled) annotation has no label: joined from the journal it is NaN, not None, and
    must not go out as an adjudication task disputing the label "nan"."""
    frame = annotations([(1, 10, "a", None, 7, 1), (2, 20, "b", "hate", 7, 2)])
    send, skipped = plan_adjudication([{"annotation_id": 1}, {"annotation_id": 2}], frame, slices([]), LABELS)
    assert send["annotation_id"].tolist() == [2]
    assert "no usable label" in skipped[1]


# ------------------------------------------------------------------------------------------ CLI
def _event(annotation_id: int, task_id: int, item_id: str, label: str, annotator: int) -> dict:
    result = [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
    stamp = f"2026-11-22T08:00:{annotation_id:02d}.000000Z"
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": annotation_id, "task": task_id, "project": 7, "result": result,
                           "completed_by": annotator, "was_cancelled": False, "ground_truth": False,
                           "created_at": stamp, "updated_at": stamp},
            "task": {"id": task_id, "project": 7, "data": {"text": f"text of {item_id}", "item_id": item_id}},
            "project": {"id": 7}}


def test_loop_export_writes_training_labels_not_per_task_votes(cli_settings, tmp_path):  # noqa: F811
    from labelloop.journal import Journal
    from labelloop.slices import SliceItem, SliceStore

    with Journal(cli_settings.journal_path, get_taxonomy("hate_offensive")) as journal:
        for event in [_event(1, 1, "item-a", "hate", 1), _event(2, 2, "item-a", "hate", 2),   # overlap pair
                      _event(3, 3, "item-g", "neither", 1),                                  # honeypot
                      _event(4, 4, "item-b", "offensive", 1), _event(5, 5, "item-b", "neither", 2)]:  # adjudicated
            assert journal.record(event).status == "accepted"
    with SliceStore(cli_settings.slices_path) as store:
        store.add([SliceItem(7, 2, "item-a", "overlap", source_task_id=1),
                   SliceItem(7, 3, "item-g", "honeypot", gold_label="hate"),
                   SliceItem(7, 5, "item-b", "adjudication", source_task_id=4, disputed_label="offensive",
                             disputed_annotation_id=4)])
    out = tmp_path / "labels.csv"
    result = invoke("loop", "export", str(out))
    assert result.exit_code == 0, result.output
    exported = pd.read_csv(out).sort_values("id")
    assert exported[["id", "label", "n_annotations"]].values.tolist() == [["item-a", "hate", 2],
                                                                           ["item-b", "neither", 2]]


def test_loop_adjudicate_refuses_bad_input_with_one_error_line(cli_settings):  # noqa: F811
    negative = invoke("loop", "adjudicate", "--top-k", "-1")
    assert negative.exit_code == 2 and negative.stderr.startswith("error: --top-k must be 0 or more"), negative.output
    unconfigured = invoke("loop", "adjudicate")
    assert unconfigured.exit_code == 2 and unconfigured.stderr.startswith("error: set LABELLOOP_LS_API_KEY")


def test_assemble_queue_keeps_the_head_copies_behind_sources_and_the_tail_last():
    al = [Suggested(i, "hate") for i in (1, 2, 3, 4)]
    tail = [Suggested(i, "neither") for i in (8, 9)]
    carried = place_pending(slices([
        {"task_id": 30, "item_id": "c", "kind": "overlap", "source_task_id": 3},
        {"task_id": 40, "item_id": "d", "kind": "adjudication", "source_task_id": 7, "disputed_label": "hate",
         "disputed_annotation_id": 70}]), {30: "offensive"}, in_batch={1, 2, 3, 4})
    for seed in range(20):
        order, adjudications = assemble_queue(al, tail, [Blind(50), Suggested(60, "hate")],
                                              {2: [Suggested(20, "hate")]}, carried, np.random.default_rng(seed))
        ids = [e.task_id for e in order]
        assert ids[0] == 1 and ids[-2:] == [8, 9] and sorted(ids) == [1, 2, 3, 4, 8, 9, 20, 30, 50, 60]
        assert ids[ids.index(2) + 1] == 20 and ids[ids.index(3) + 1] == 30
        assert [e.task_id for e in adjudications] == [40]


# ------------------------------------------------------------------------------------------ serving
def test_the_backend_pre_labels_nothing_on_an_audit_task(settings):
    from fastapi.testclient import TestClient

    from labelloop.slices import SliceItem, SliceStore
    from labelloop.taxonomy import label_config_xml
    from serving.app import create_app
    from tests.test_serving import TABLES, FakeSource, KeywordClassifier

    with SliceStore(settings.slices_path) as store:
        store.add([SliceItem(3, 11, "item-11", "audit", model_version="labelloop-test:v1")])
    app = create_app(settings.model_copy(update={"poll_seconds": 0}),
                     model_source=FakeSource({1: KeywordClassifier(TABLES[1])}, champion=1))
    tasks = [{"id": i, "data": {"text": "I hate this"}, "project": 3} for i in (11, 12)]
    with TestClient(app) as client:
        response = client.post("/predict", json={"tasks": tasks, "project": "3.1",
                                                 "label_config": label_config_xml(get_taxonomy("hate_offensive"))})
    assert response.status_code == 200, response.text
    audit, ordinary = response.json()["results"]
    assert audit["result"] == [] and audit["model_version"] == ordinary["model_version"]
    assert ordinary["result"][0]["value"]["choices"] == ["hate"]
    assert audit["score"] == pytest.approx(ordinary["score"])  # the same place in the queue, just no suggestion


def test_the_backend_answers_503_not_a_guess_while_the_slice_store_is_unreachable(settings):
    """With the slice store on a PostgreSQL that is down, no task can be told apart from an audit item: a
    pre-label shown by guess would unblind it, and an empty one would be stored for good."""
    from fastapi.testclient import TestClient

    from labelloop.taxonomy import label_config_xml
    from serving.app import create_app
    from tests.test_serving import TABLES, FakeSource, KeywordClassifier

    down = settings.model_copy(update={"poll_seconds": 0,
                                       "database_url": "postgresql://labelloop@127.0.0.1:1/state"})
    app = create_app(down, model_source=FakeSource({1: KeywordClassifier(TABLES[1])}, champion=1))
    tasks = [{"id": 11, "data": {"text": "I hate this"}, "project": 3}]
    with TestClient(app) as client:
        response = client.post("/predict", json={"tasks": tasks, "project": "3.1",
                                                 "label_config": label_config_xml(get_taxonomy("hate_offensive"))})
    assert response.status_code == 503, response.text
    assert "blind audit items" in response.json()["detail"]


def test_adjudication_takes_the_quality_side_s_label_issues_as_they_come():
    from monitoring.label_errors import LabelIssue

    frame = annotations([(1, 10, "a", "hate", 7, 1)])
    issue = LabelIssue(rank=1, task_id=10, item_id="a", annotation_id=1, label="hate", model_label="neither",
                       quality=0.01, text="text of a")
    send, skipped = plan_adjudication([issue], frame, slices([]), LABELS)
    assert send[["annotation_id", "disputed_label", "task_id"]].values.tolist() == [[1, "hate", 10]] and not skipped


def test_slice_store_skips_a_recorded_task_but_refuses_a_honeypot_without_gold(store_db):  # noqa: F811
    """A second record of a task keeps the first purpose, also when another replica recorded it; a honeypot row
    with no gold label is an error, not a silent skip: unrecorded, that task's answers would train on the
    frozen evaluation set."""
    from sqlalchemy.exc import IntegrityError

    from labelloop.slices import SliceItem, SliceStore

    with SliceStore(store_db("slices")) as store, SliceStore(store_db("slices")) as other_replica:
        assert store.add([SliceItem(1, 5, "a", "audit")]) == 1
        assert other_replica.add([SliceItem(1, 5, "a", "overlap", source_task_id=4),
                                  SliceItem(1, 6, "b", "audit")]) == 1
        assert store.kind_of(5) == other_replica.kind_of(5) == "audit"
        with pytest.raises(IntegrityError):
            store.add([SliceItem(1, 7, "c", "audit"), SliceItem(1, 8, "gold-1", "honeypot")])
        assert store.kind_of(7) is None  # nothing of the failed batch was written
        assert store.add([SliceItem(2, 9, "g", "honeypot", gold_label="hate", created_at="2025-01-01T00:00:00"),
                          SliceItem(2, 10, "a", "overlap", source_task_id=5)]) == 2
        assert store.of_kind("audit", [5, 6, 9, 99]) == {5, 6} and store.of_kind("audit", []) == set()
        assert store.task_ids("audit") == {5, 6} and store.task_ids("overlap", project_id=2) == {10}
        frame = other_replica.frame(project_id=2)
        assert list(frame.columns) == SLICE_COLUMNS
        assert frame["task_id"].tolist() == [9, 10] and frame["kind"].tolist() == ["honeypot", "overlap"]
        assert frame["gold_label"].iloc[0] == "hate" and frame["source_task_id"].iloc[1] == 5
        assert frame["gold_label"].isna().iloc[1] and frame["source_task_id"].isna().iloc[0]
