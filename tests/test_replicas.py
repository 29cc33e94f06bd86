"""Two real ``labelloop serve`` replicas on one PostgreSQL, as behind a load balancer: webhooks sent to both
(the same event to both, as when a retry lands on the other replica, and distinct events spread across
them, concurrently) land in the one journal exactly once, and the retrain triggers of both never run two
rounds at once. Also: ``/health`` names the shared database, reachable or not, without its password."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import pytest

from active_learning.jobs import Job, JobRunner
from labelloop import data
from labelloop.config import Settings
from labelloop.db import Database, redact
from labelloop.journal import Journal
from serving.db_health import DatabaseHealth
from tests.test_journal import TAXONOMY
from tests.test_outages import Backend, labelled_event, serve, sqlite_champion, wait_until  # noqa: F401 (a fixture)

RETRAIN_EVERY = 8
DISTINCT, RETRIED = 30, 10  # events sent to one replica each; events sent to both


def _interval(job: Job) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(job.started_at), datetime.fromisoformat(job.finished_at)


def _replica(tmp_path: Path, settings: Settings, name: str) -> tuple[Path, Settings]:
    """A replica's own directory and state dir; the MLflow store (the "tracking server") is shared."""
    root = tmp_path / name
    root.mkdir()
    return root, settings.model_copy(update={"state_dir": root / "var"})


@pytest.mark.integration
def test_two_replicas_journal_each_event_once_and_never_run_two_rounds_at_once(
        tmp_path: Path, settings: Settings, pg_url: str, davidson_small: data.LabeledData,
        sqlite_champion: tuple[Path, str]) -> None:  # noqa: F811 (the fixture imported above)
    """The replicas share the registry too (a champion with its frozen evaluation set, so rounds retrain and
    gate for real) and keep state dirs of their own: only the database is shared state."""
    settings = settings.model_copy(update={"mlruns_dir": sqlite_champion[0]})
    rows = davidson_small.frame.sample(DISTINCT + RETRIED, random_state=5)
    events = [labelled_event(n, label, text)
              for n, (text, label) in enumerate(zip(rows["text"], rows["label"], strict=True), start=1)]
    shared = {"LABELLOOP_DATABASE_URL": pg_url, "LABELLOOP_RETRAIN_EVERY": str(RETRAIN_EVERY)}
    jobs = JobRunner(Database.postgres(pg_url, "jobs"), run_jobs=False)
    with ExitStack() as stack:
        a, b = (stack.enter_context(serve(*_replica(tmp_path, settings, name), **shared)) for name in "ab")
        for backend in (a, b):
            database = backend.health()["dependencies"]["database"]
            assert database == {"status": "ok", "detail": None, "since": None, "retry_in_s": None,
                                "url": redact(pg_url)}

        def post(backend: Backend, payload: dict) -> str:
            r = backend.post("/webhook", payload)
            assert r.status_code == 201, r.text
            return r.json()["result"]["status"]

        def send_concurrently(distinct: list[dict], retried: list[dict]) -> None:
            """``distinct`` alternately to a and b, each of ``retried`` to both, all at once."""
            sends = [((a, b)[n % 2], payload) for n, payload in enumerate(distinct)]
            sends += [(backend, payload) for payload in retried for backend in (a, b)]
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda send: post(*send), sends))
            assert statuses[:len(distinct)] == ["accepted"] * len(distinct)
            pairs = zip(statuses[len(distinct)::2], statuses[len(distinct) + 1::2], strict=True)
            assert all(sorted(pair) == ["accepted", "duplicate"] for pair in pairs)

        distinct, retried = events[:DISTINCT], events[DISTINCT:]
        send_concurrently(distinct[:20], retried[:5])
        # the second wave comes once a round has taken its snapshot, so that it must trigger another round
        wait_until(lambda: any(j.state == "done" or j.message.startswith("training on") for j in jobs.list()),
                   "a round to take its snapshot", 300)
        send_concurrently(distinct[20:], retried[5:])

        running_seen: list[int] = []

        def settled() -> bool:
            running = len(jobs.list(state="running"))
            running_seen.append(running)
            return running == 0 and not jobs.list(state="queued") and bool(jobs.list())

        wait_until(settled, "the retrain jobs to finish", 600, a.child)
        assert b.child.alive(), b.child.tail()
        replica_pids = {a.child.process.pid, b.child.process.pid}

    with Journal(Database.postgres(pg_url, "journal"), TAXONOMY) as journal:
        stats = journal.stats()
        assert (stats["accepted"], stats["duplicate"], stats["live_labels"]) == (
            DISTINCT + RETRIED, RETRIED, DISTINCT + RETRIED)
        assert len(journal.labels()) == DISTINCT + RETRIED
    finished = jobs.list(limit=200)
    jobs.close()
    assert max(running_seen) <= 1
    assert all(job.state == "done" for job in finished), [(j.state, j.error) for j in finished]
    assert {int(job.runner.split(":")[1]) for job in finished} <= replica_pids
    # dozens of trigger calls (every accepted label past the 8th), two waves: two or three jobs, no more
    assert 2 <= len(finished) <= 3, [(j.reason, j.runner, j.started_at, j.finished_at) for j in finished]
    intervals = sorted(_interval(job) for job in finished)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False))


def test_database_health_says_reachable_or_not_and_hides_the_password(pg_url: str) -> None:
    up = DatabaseHealth(pg_url).health()
    assert up.status == "ok" and up.url == redact(pg_url)
    started = time.monotonic()
    down = DatabaseHealth("postgresql://labelloop:s3cret@127.0.0.1:1/state").health()
    assert time.monotonic() - started < 10  # bounded even when nothing answers
    assert down.status == "unavailable" and down.detail and down.since
    assert "s3cret" not in down.model_dump_json()
    assert down.url == "postgresql://labelloop:***@127.0.0.1:1/state"
