"""Exposure accounting from the journal: severe items and reveals per reviewer per day, each counted once, and
the daily cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from labelloop.exposure import DayExposure, ExposureLedger, ReviewerExposure
from labelloop.journal import Journal
from labelloop.policy import Protection, ReviewPolicy, Severity
from labelloop.taxonomy import get_taxonomy
from tests.test_escalations import review_result
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
def ledger(tmp_path: Path) -> Iterator[ExposureLedger]:
    with ExposureLedger(tmp_path / "exposure.sqlite") as store:
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


def test_duplicates_updates_and_repeated_syncs_never_count_twice(journal: Journal, ledger: ExposureLedger) -> None:
    payload = review(1, 10, reviewer=1, severity="high", reveal=True)
    journal.record(payload)
    assert sync(ledger, journal) == (1, 1)
    journal.record(payload)  # the same webhook again
    journal.record(review(1, 10, reviewer=1, severity="critical", reveal=True, minute=5))  # a newer version
    assert sync(ledger, journal) == (0, 0)
    assert sync(ledger, journal) == (0, 0)
    with ExposureLedger(ledger.path) as restarted:  # a new process, same file
        assert sync(restarted, journal) == (0, 0)
    assert ledger.day(1, "2025-03-01") == DayExposure(1, "2025-03-01", 1, 1)


def test_a_rerun_from_scratch_counts_the_same(journal: Journal, ledger: ExposureLedger, tmp_path: Path) -> None:
    for i in range(4):
        journal.record(review(i + 1, 10 + i, reviewer=1, severity="high"))
    sync(ledger, journal)
    with ExposureLedger(tmp_path / "rebuilt.sqlite") as rebuilt:  # lost cursor: every row again
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
