"""Hostile Label Studio payloads against the journal and the webhook (hypothesis).

Whatever arrives, nothing escapes as an exception and every event ends as accepted, a duplicate, ignored or
quarantined, the last three with a reason, and the stored event says the same. The example count is modest
here (``make test``); ``make fuzz`` raises it with ``LABELLOOP_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from labelloop.config import Settings
from labelloop.journal import ANNOTATION_ACTIONS, NON_LABEL_ACTIONS, STATUSES, Journal, RecordResult
from labelloop.policy import REVIEW_CONTROLS
from serving.app import create_app
from tests.fakes import EmptyRegistry
from tests.test_journal import TAXONOMY, annotation, event, task

EXAMPLES = int(os.environ.get("LABELLOOP_FUZZ_EXAMPLES", "60"))
# `make test` runs the same examples every time (a failure there is reproducible); `make fuzz` explores
FUZZ = hypothesis_settings(max_examples=EXAMPLES, deadline=None,
                           derandomize="LABELLOOP_FUZZ_EXAMPLES" not in os.environ,
                           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                  HealthCheck.data_too_large, HealthCheck.large_base_example])
ACTIONS = (*ANNOTATION_ACTIONS, *NON_LABEL_ACTIONS, "ANNOTATIONS_DELETED", "TASKS_DELETED", "PROJECT_DELETED")

# ------------------------------------------------------------------------------------------ strategies
lone_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
weird_text = st.one_of(
    st.text(max_size=40),
    lone_surrogates,
    st.sampled_from(["", " ", "\x00", "NaN", "Infinity", "-1", "1e309", "null", "🙂" * 5, "‮rtl", "a\u0301" * 3]),
    st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "é", "🙂", " "]), st.integers(1_000, 300_000)),
)
weird_number = st.one_of(
    st.integers(), st.integers(min_value=2**62, max_value=2**80), st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, -0.0]),
)
scalar = st.one_of(st.none(), st.booleans(), weird_number, weird_text)
junk = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
ident = st.one_of(st.integers(-3, 40), st.integers(min_value=2**63 - 2, max_value=2**64),
                  st.sampled_from(["7", "07", "-1", "", "x"]), st.booleans(), st.none(), st.floats(), junk)
stamp = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()), st.sampled_from(["2025-03-01T10:00:00Z", "9999-12-31T23:59-05:00",
                                                                  "0001-01-01T00:00+01:00", "yesterday", ""]),
    junk,
)
label = st.one_of(st.sampled_from(TAXONOMY.labels), st.sampled_from(["Hate", "spam", "", "hate "]), junk)


@st.composite
def ls_annotation(draw) -> dict[str, Any]:
    """A Label Studio-shaped annotation whose fields are each valid, missing, or junk."""
    base = annotation(draw(st.integers(1, 30)), task_id=draw(st.integers(1, 10)),
                      label=draw(st.sampled_from(TAXONOMY.labels)), minute=draw(st.integers(0, 59)))
    overrides = {
        "id": ident, "task": ident, "updated_at": stamp, "created_at": stamp, "was_cancelled": junk,
        "ground_truth": junk, "lead_time": weird_number | junk, "completed_by": ident, "parent_prediction": ident,
        "result": st.one_of(junk, st.lists(st.fixed_dictionaries(
            {"value": st.fixed_dictionaries({"choices": st.lists(label, max_size=3)}) | junk},
            optional={"from_name": st.sampled_from(["label", *sorted(REVIEW_CONTROLS)]) | junk}), max_size=3)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(overrides)), unique=True, max_size=4)):
        base[key] = draw(overrides[key])
    for key in draw(st.lists(st.sampled_from(sorted(base)), unique=True, max_size=2)):
        base.pop(key)
    return base


@st.composite
def ls_task(draw, task_id: Any) -> dict[str, Any]:
    base = task(task_id if isinstance(task_id, int) else 1, draw(weird_text | junk))
    if draw(st.booleans()):
        base[draw(st.sampled_from(["id", "data", "project"]))] = draw(junk | ident)
    return base


@st.composite
def ls_payload(draw) -> Any:
    """Mostly near-valid webhook payloads, plus arbitrary JSON values."""
    kind = draw(st.sampled_from(["annotation", "annotations", "deleted", "tasks_deleted", "other", "junk"]))
    action = draw(st.sampled_from(ACTIONS) | st.text(max_size=20) | junk)
    if kind == "junk":
        return draw(junk)
    if kind == "annotation":
        ann = draw(ls_annotation())
        payload = event(ann=ann, tsk=draw(ls_task(ann.get("task"))))
        payload["action"] = draw(st.sampled_from(ANNOTATION_ACTIONS) | st.just(action))
    elif kind == "annotations":
        anns = draw(st.lists(ls_annotation(), max_size=4))
        payload = {"action": "ANNOTATIONS_CREATED", "annotation": anns,
                   "task": [draw(ls_task(a.get("task"))) for a in anns] if draw(st.booleans()) else draw(junk)}
    elif kind == "deleted":
        payload = {"action": "ANNOTATIONS_DELETED", "annotations": draw(st.lists(st.fixed_dictionaries(
            {"id": ident}), max_size=5) | junk)}
    elif kind == "tasks_deleted":
        payload = {"action": draw(st.sampled_from(["TASKS_DELETED", "PROJECT_DELETED"])),
                   "tasks": draw(st.lists(st.fixed_dictionaries({"id": ident}), max_size=5) | junk),
                   "project": draw(st.fixed_dictionaries({"id": ident}) | junk)}
    else:
        payload = {"action": action, **draw(st.dictionaries(st.text(max_size=10), junk, max_size=3))}
    if draw(st.booleans()):
        payload["project"] = draw(st.fixed_dictionaries({"id": ident}) | ident)
    return payload


# ------------------------------------------------------------------------------------------ checks
def stored(journal: Journal, event_id: int) -> dict[str, Any]:
    with journal._read() as conn:
        return dict(conn.execute(sa.text("SELECT status, reason FROM events WHERE event_id = :id"),
                                 {"id": event_id}).mappings().one())


def check(journal: Journal, outcome: RecordResult) -> None:
    assert outcome.status in STATUSES
    if outcome.status != "accepted":
        assert outcome.reason, f"{outcome.status} without a reason"
    if outcome.event_id is not None:
        row = stored(journal, outcome.event_id)
        assert (row["status"], row["reason"]) == (outcome.status, outcome.reason)


@pytest.fixture
def journal(tmp_path: Path, state_backend: str | None) -> Iterator[Journal]:
    """On SQLite and on PostgreSQL, which refuses what SQLite stores (a NUL in a text): the same four endings."""
    with Journal(Settings(state_dir=tmp_path, database_url=state_backend).database("journal"), TAXONOMY) as j:
        yield j


@FUZZ
@given(payload=ls_payload())
@example(payload={"action": "ANNOTATIONS_CREATED", "annotation": [], "task": []})  # once raised StopIteration
@example(payload=event(ann=annotation(result_=[{"from_name": ["severity"], "value": {"choices": ["high"]}}])))
def test_any_payload_ends_accepted_duplicate_ignored_or_quarantined_with_a_reason(journal: Journal, payload: Any):
    first = journal.record(payload)
    check(journal, first)
    assert first.event_id is not None  # every webhook payload is kept, whatever it holds
    again = journal.record(payload)
    check(journal, again)
    if isinstance(payload, dict) and payload.get("action") in ANNOTATION_ACTIONS:
        assert again.status != "accepted", "the same annotation version was applied twice"
    journal.labels()  # whatever got in, the training labels can still be read
    journal.annotations()


@FUZZ
@given(ann=junk | ls_annotation(), tsk=junk | ls_task(5))
def test_reconcile_path_never_raises_on_hostile_annotations(journal: Journal, ann: Any, tsk: Any):
    outcome = journal.apply_annotation(ann, tsk)
    check(journal, outcome)
    assert journal.apply_annotation(ann, tsk).status != "accepted"


@hypothesis_settings(FUZZ, max_examples=max(EXAMPLES // 3, 1))  # a fresh journal file per example
@given(payloads=st.lists(ls_payload(), min_size=2, max_size=6))
def test_a_stream_of_hostile_events_keeps_the_journal_consistent(tmp_path_factory, payloads: list[Any]):
    """Per stream, a fresh journal: event ids are gapless and every event's status is one of the four."""
    path = tmp_path_factory.mktemp("stream") / "journal.sqlite"
    with Journal(path, TAXONOMY) as journal:
        outcomes = [journal.record(p) for p in payloads]
        for outcome in outcomes:
            check(journal, outcome)
        stats = journal.stats()
    assert [o.event_id for o in outcomes] == list(range(1, len(payloads) + 1))
    assert stats["events"] == len(payloads)
    assert stats["quarantine"] >= sum(o.status == "quarantined" for o in outcomes)


# ------------------------------------------------------------------------------------------ over HTTP
@pytest.fixture
def client(settings: Settings, journal: Journal) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"poll_seconds": 0}), model_source=EmptyRegistry("fuzz"),
                     journal=journal)
    with TestClient(app) as c:
        yield c


def _json_bytes(value: Any) -> bytes:
    """JSON as a client may send it: non-finite numbers and lone surrogates included (escaped)."""
    return json.dumps(value, allow_nan=True).encode()


@FUZZ
@given(payload=ls_payload())
def test_webhook_answers_201_for_any_json_object_and_never_5xx(client: TestClient, journal: Journal, payload: Any):
    r = client.post("/webhook", content=_json_bytes(payload), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if isinstance(payload, dict):
        assert r.status_code == 201, r.text
        result = r.json()["result"]
        assert result["status"] in STATUSES
        assert result["status"] == "accepted" or result["reason"]
        assert stored(journal, result["event_id"])["status"] == result["status"]
    else:
        assert r.status_code == 422


@FUZZ
@given(body=st.binary(max_size=2000) | st.text(max_size=200).map(str.encode))
def test_webhook_answers_4xx_for_bodies_that_are_not_json_objects(client: TestClient, journal: Journal, body: bytes):
    before = journal.stats()["events"]
    r = client.post("/webhook", content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        assert 400 <= r.status_code < 500
        assert journal.stats()["events"] == before  # refused: nothing journaled
