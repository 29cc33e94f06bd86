"""Exposure accounting from the journal: severe items and reveals per reviewer per day, each counted once, and
the daily cap."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from labelloop.exposure import DayExposure, ExposureLedger, ReviewerExposure
from labelloop.journal import Journal
from labelloop.policy import Protection, ReviewPolicy, Severity
from labelloop.taxonomy import get_taxonomy
from tests.test_escalations import review_result, store_db  # noqa: F401 (store_db is a fixture)
from tests.test_journal import annotation, deleted, event, task

TAXONOMY = get_taxonomy("hate_offensive")
SCALE = Severity(severe_labels=("hate",))
PROTECTION = Protection(lexicon=None, blur_threshold=0.9)


def review(ann_id: int, task_id: int, reviewer: int, day: int = 1, *, label: str = "neither",
           severity: str | None = None, reveal: bool = False, minute: int = 0, cancelled: bool = False) -> dict:
    ann = annotation(ann_id, task_id, minute=minute, annotator=reviewer, cancelled=cancelled,
                     result_=review_result(label, severity=severity, escalate=False, reason=None, reveal=reveal))
    ann["created_at"] = f"2025-03-{day:02d}T23:59:00.000000+00:00"
    return event("ANNOTATION_UPDATED" if minute else "ANNOTATION_CREATED", ann, task(task_id))


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite", TAXONOMY, policy=ReviewPolicy(severity=SCALE)) as j:
        yield j


@pytest.fixture
def ledger(store_db) -> Iterator[ExposureLedger]:  # noqa: F811 (the fixture imported above)
    with ExposureLedger(store_db("exposure")) as store:
        yield store


def sync(ledger: ExposureLedger, journal: Journal, predictions=None) -> tuple[int, int]:
    return ledger.sync(journal, SCALE, PROTECTION, predictions)


def test_severe_items_and_reveals_per_reviewer_and_day(journal: Journal, ledger: ExposureLedger) -> None:
    journal.record(review(1, 10, reviewer=1, severity="high"))                  # severe by severity
    journal.record(review(2, 11, reviewer=1, label="hate", severity="low"))     # severe by label
    journal.record(review(3, 12, reviewer=1, severity="medium", reveal=True))   # not severe, revealed
    journal.record(review(4, 13, reviewer=1, day=2, severity="critical", reveal=True))
    journal.record(review(5, 10, reviewer=2, severity="low"))                   # same task, another reviewer
    assert sync(ledger, journal) == (3, 2)
    assert ledger.day(1, "2025-03-01") == DayExposure(1, "2025-03-01", severe_seen=2, reveals=1)
    assert ledger.day(1, "2025-03-02") == DayExposure(1, "2025-03-02", severe_seen=1, reveals=1)
    assert ledger.day(2, "2025-03-01") == DayExposure(2, "2025-03-01", severe_seen=0, reveals=0)


def test_duplicates_updates_and_repeated_syncs_never_count_twice(journal: Journal, ledger: ExposureLedger,
                                                                 store_db) -> None:  # noqa: F811
    payload = review(1, 10, reviewer=1, severity="high", reveal=True)
    journal.record(payload)
    assert sync(ledger, journal) == (1, 1)
    journal.record(payload)  # the same webhook again
    journal.record(review(1, 10, reviewer=1, severity="critical", reveal=True, minute=5))  # a newer version
    assert sync(ledger, journal) == (0, 0)
    assert sync(ledger, journal) == (0, 0)
    with ExposureLedger(store_db("exposure")) as restarted:  # a new process, same store
        assert sync(restarted, journal) == (0, 0)
    assert ledger.day(1, "2025-03-01") == DayExposure(1, "2025-03-01", 1, 1)


def test_a_rerun_from_scratch_counts_the_same(journal: Journal, ledger: ExposureLedger,
                                              store_db) -> None:  # noqa: F811
    for i in range(4):
        journal.record(review(i + 1, 10 + i, reviewer=1, severity="high"))
    sync(ledger, journal)
    with ExposureLedger(store_db("rebuilt")) as rebuilt:  # lost cursor: every row again
        sync(rebuilt, journal)
        rebuilt.record(journal.review_marks_since(0), SCALE, PROTECTION)
        assert rebuilt.daily() == ledger.daily() == [DayExposure(1, "2025-03-01", 4, 0)]


def test_skipped_and_deleted_annotations_still_count_as_seen(journal: Journal, ledger: ExposureLedger) -> None:
    journal.record(review(1, 10, reviewer=1, cancelled=True, reveal=True))
    journal.record(review(2, 11, reviewer=1, severity="high"))
    journal.record(deleted(2))
    assert sync(ledger, journal) == (1, 1)
    assert ledger.day(1, "2025-03-01") == DayExposure(1, "2025-03-01", 1, 1)


def test_a_confident_severe_prediction_makes_an_item_severe(journal: Journal, ledger: ExposureLedger) -> None:
    journal.record(review(1, 10, reviewer=1))
    journal.record(review(2, 11, reviewer=1))
    journal.record(review(3, 12, reviewer=1))
    predictions = {10: ("hate", 0.95), 11: ("hate", 0.6), 12: ("offensive", 0.99)}
    assert sync(ledger, journal, predictions) == (1, 0)


def test_the_cap_and_the_per_reviewer_aggregates(journal: Journal, ledger: ExposureLedger) -> None:
    for i in range(3):
        journal.record(review(i + 1, 10 + i, reviewer=1, severity="high", reveal=i == 0))
    journal.record(review(4, 20, reviewer=1, day=2, severity="high"))
    journal.record(review(5, 21, reviewer=2, severity="high"))
    sync(ledger, journal)
    assert ledger.over_cap(1, "2025-03-01", cap=3)
    assert not ledger.over_cap(1, "2025-03-01", cap=4)
    assert not ledger.over_cap(1, "2025-03-02", cap=3)
    assert not ledger.over_cap(2, "2025-03-01", cap=3)
    assert not ledger.over_cap(1, "2025-03-01", cap=None)
    assert ledger.per_reviewer(cap=3) == [
        ReviewerExposure(reviewer=1, days_active=2, severe_seen=4, reveals=1, max_severe_in_a_day=3, days_over_cap=1),
        ReviewerExposure(reviewer=2, days_active=1, severe_seen=1, reveals=0, max_severe_in_a_day=1, days_over_cap=0),
    ]
    assert [r.severe_seen for r in ledger.per_reviewer(since="2025-03-02")] == [1]
    assert ledger.daily(until="2025-03-01") == [DayExposure(1, "2025-03-01", 3, 1), DayExposure(2, "2025-03-01", 1, 0)]


def test_an_annotation_without_a_reviewer_is_not_attributed(journal: Journal, ledger: ExposureLedger) -> None:
    payload = review(1, 10, reviewer=1, severity="high")
    payload["annotation"]["completed_by"] = None
    payload["annotation"]["updated_by"] = None
    journal.record(payload)
    assert sync(ledger, journal) == (0, 0)
    assert ledger.cursor() == journal.last_event_id()


def test_two_replicas_recording_one_reviewer_at_once_count_each_item_once(store_db) -> None:  # noqa: F811
    """Two replicas' ledgers on one store, both recording the same reviewer's day at once (each after its own
    webhooks, half of them the same events seen through both): every item counts once, each replica
    reports it new at most once between them, the cap reads the same from both, and the cursor keeps the
    furthest position whichever replica finishes last."""
    day = "2025-03-01"

    def mark(task_id: int) -> dict:
        return {"annotator": 7, "task_id": task_id, "annotation_id": task_id, "created_at": f"{day}T10:00:00Z",
                "severity": "high", "label": "neither", "revealed": task_id % 4 == 0}

    with ExposureLedger(store_db("exposure")) as a, ExposureLedger(store_db("exposure")) as b:
        work = {a: list(range(0, 30)), b: list(range(15, 45))[::-1]}  # tasks 15..29 reach both replicas
        new: dict[ExposureLedger, list[tuple[int, int]]] = {a: [], b: []}
        start = threading.Barrier(2)

        def record(ledger: ExposureLedger) -> None:
            start.wait()
            for task_id in work[ledger]:
                new[ledger].append(ledger.record([mark(task_id)], SCALE, PROTECTION, cursor=task_id))

        threads = [threading.Thread(target=record, args=(ledger,)) for ledger in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert sum(seen for seen, _ in new[a] + new[b]) == 45
        assert sum(revealed for _, revealed in new[a] + new[b]) == len(range(0, 45, 4))
        assert a.day(7, day) == b.day(7, day) == DayExposure(7, day, severe_seen=45, reveals=len(range(0, 45, 4)))
        assert a.over_cap(7, day, cap=45) and b.over_cap(7, day, cap=45)
        assert not a.over_cap(7, day, cap=46) and not b.over_cap(7, day, cap=46)
        assert a.cursor() == b.cursor() == 44
        a.record([], SCALE, PROTECTION, cursor=3)  # a replica that read an older position finishes last
        assert b.cursor() == 44


def test_the_queue_answers_503_while_the_shared_ledger_is_unreachable(journal: Journal, tmp_path: Path) -> None:
    """Without the ledger the daily cap cannot be held: the reviewer queue says so instead of a 500, and
    instead of serving as if the reviewer had seen nothing."""
    import anyio
    from fastapi import HTTPException

    from labelloop.config import Settings
    from labelloop.db import Database
    from serving.queue_api import _next

    class Source:
        def user_id(self, email: str) -> int:
            return 1

        def unlabelled_tasks(self) -> list[dict]:
            return [{"id": 10, "text": "a severe text"}]

    async def scorer(texts: list[str]) -> list[tuple[str, float]]:
        return [("hate", 0.99) for _ in texts]

    settings = Settings(state_dir=tmp_path / "var", mlruns_dir=tmp_path / "mlruns")
    with ExposureLedger(Database.postgres("postgresql://labelloop@127.0.0.1:1/state", "exposure")) as ledger:
        with pytest.raises(HTTPException) as refused:
            anyio.run(_next, "reviewer@example.org", settings, Source(), ledger, journal, scorer)
    assert refused.value.status_code == 503 and "daily cap" in refused.value.detail
