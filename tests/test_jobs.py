"""Retrain jobs: one at a time, triggers coalesce, status is queryable, failures and restarts are reported; on
SQLite and on a PostgreSQL that several replicas share (one job at a time across them, a dead replica's job
failed, a live one's never), and the round lock across replicas."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from active_learning.jobs import INTERRUPTED, JobRunner, RetrainTrigger, jobs_router
from labelloop.config import Settings
from labelloop.db import Database
from labelloop.journal import Journal
from tests.test_journal import TAXONOMY, annotation, event


class Gate:
    """Work whose runs the test releases one by one, recording how many ran at once."""

    def __init__(self) -> None:
        self.release = threading.Semaphore(0)
        self.running = 0
        self.max_running = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, progress) -> dict:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.max_running = max(self.max_running, self.running)
        progress(0.5, "half way")
        self.release.acquire(timeout=30)
        with self.lock:
            self.running -= 1
        return {"call": self.calls}


def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def store(tmp_path: Path, state_backend: str | None):
    """Opens the jobs store afresh (a new engine each call, as another process or replica would)."""
    return lambda: Database.open(state_backend, tmp_path / "jobs.sqlite", "jobs")


@pytest.fixture
def runner(store, gate):
    r = JobRunner(store(), gate, poll_seconds=0.1)
    yield r
    for _ in range(10):
        gate.release.release()
    r.close()


# a runner in a process of its own whose job never finishes: the test kills it, as a crash would
_REPLICA = """
import sys, threading
from pathlib import Path
from active_learning.jobs import JobRunner
from labelloop.db import Database

def work(progress):
    progress(0.5, "half way")
    threading.Event().wait()

runner = JobRunner(Database.open(sys.argv[1] or None, Path(sys.argv[2]), "jobs"), work, poll_seconds=0.1)
print(runner.submit("in a replica that dies").id, flush=True)
threading.Event().wait()
"""


def replica_running_a_job(tmp_path: Path, backend: str | None) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", _REPLICA, backend or "", str(tmp_path / "jobs.sqlite")],
                             stdout=subprocess.PIPE, text=True)
    return child, child.stdout.readline().strip()


def kill(child: subprocess.Popen) -> None:
    child.kill()
    child.wait(timeout=30)
    child.stdout.close()


def test_jobs_run_one_at_a_time_and_triggers_coalesce(runner, gate):
    first = runner.submit("a")
    until(lambda: runner.get(first.id).message == "half way")  # progress is saved while it runs
    assert runner.get(first.id).state == "running"
    second = runner.submit("b")
    third = runner.submit("c")  # joins the queued one instead of piling up
    assert third.id == second.id and third.reason == "b"
    gate.release.release()
    assert runner.wait(first.id, 30).state == "done"
    gate.release.release()
    done = runner.wait(second.id, 30)
    assert done.state == "done" and done.result == {"call": 2} and done.progress == 1.0
    assert gate.max_running == 1 and gate.calls == 2


def test_replicas_claim_each_job_once_run_one_at_a_time_and_coalesce_triggers(store, gate):
    """Three workers on one store (three replicas): every job runs exactly once, never two at once, and a
    trigger on any replica joins the job another replica queued."""
    replicas = [JobRunner(store(), gate, poll_seconds=0.05) for _ in range(3)]
    try:
        first = replicas[0].submit("a")
        until(lambda: replicas[1].get(first.id).message == "half way")
        queued = replicas[1].submit("b")
        assert replicas[2].submit("c").id == queued.id  # coalesced across replicas
        assert [j.state for j in replicas[2].list()] == ["queued", "running"]
        time.sleep(0.3)  # every worker polled a few times: none took the queued job while one runs
        assert gate.calls == 1 and replicas[0].get(queued.id).state == "queued"
        gate.release.release()
        until(lambda: replicas[2].get(queued.id).state == "running")
        gate.release.release()
        finished = [replicas[0].wait(job_id, 30) for job_id in (first.id, queued.id)]
        assert [j.state for j in finished] == ["done", "done"] and [j.result for j in finished] == [
            {"call": 1}, {"call": 2}]
        assert gate.calls == 2 and gate.max_running == 1
        assert {j.runner for j in finished} <= {r.name for r in replicas}
    finally:
        for _ in range(10):
            gate.release.release()
        for r in replicas:
            r.close()


def test_failure_is_reported_and_worker_survives(store):
    calls = []

    def work(progress):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("registry unreachable")
        return {"ok": True}

    r = JobRunner(store(), work)
    try:
        failed = r.wait(r.submit("x").id, 30)
        assert failed.state == "failed" and "registry unreachable" in failed.error
        assert r.wait(r.submit("y").id, 30).state == "done"
    finally:
        r.close()


def test_restart_marks_interrupted_job_failed_and_keeps_history(tmp_path, store, state_backend):
    crashed, job_id = replica_running_a_job(tmp_path, state_backend)
    try:
        watcher = JobRunner(store(), run_jobs=False)  # e.g. `labelloop loop status`
        until(lambda: watcher.get(job_id).message == "half way")  # its last progress write is done
    finally:
        kill(crashed)
    assert watcher.get(job_id).state == "running"  # a reader neither recovers nor claims jobs
    watcher.close()
    restarted = JobRunner(store(), lambda p: {})
    try:
        after = restarted.get(job_id)
        assert after.state == "failed" and after.error == INTERRUPTED
        assert restarted.list()[0].id == job_id
    finally:
        restarted.close()


def test_a_live_replica_s_job_is_left_running_and_a_dead_one_s_is_failed_by_the_survivor(
        tmp_path, store, state_backend):
    """A replica that starts while another runs a job must not fail it (the old rule, "every running job
    at startup is a crash's", would); when the other dies, the survivor fails its job without a restart."""
    other, job_id = replica_running_a_job(tmp_path, state_backend)
    survivor = None
    try:
        watcher = JobRunner(store(), run_jobs=False)
        until(lambda: watcher.get(job_id).message == "half way")
        watcher.close()
        survivor = JobRunner(store(), lambda p: {"ran": "here"}, poll_seconds=0.05)
        follow_up = survivor.submit("after the other's job")
        time.sleep(0.5)  # the survivor polled about ten times meanwhile
        assert survivor.get(job_id).state == "running" and survivor.get(follow_up.id).state == "queued"
        kill(other)
        until(lambda: survivor.get(job_id).state == "failed")
        assert survivor.get(job_id).error == INTERRUPTED
        done = survivor.wait(follow_up.id, 30)
        assert done.state == "done" and done.result == {"ran": "here"} and done.runner == survivor.name
    finally:
        if other.poll() is None:
            kill(other)
        if survivor is not None:
            survivor.close()


def test_a_runner_starts_while_the_database_is_down_and_works_once_it_answers(pg_url):
    """A replica must start (and serve) while the shared database is unreachable; its jobs wait for it."""
    import psycopg

    later = pg_url.replace("?", "_later?", 1)  # a database that does not exist yet: connecting fails
    admin = pg_url.split("?")[0].rsplit("/", 1)[0] + "/postgres?" + pg_url.split("?", 1)[1]
    runner = JobRunner(Database.postgres(later, "jobs"), lambda p: {"ok": True}, poll_seconds=0.05)
    try:
        with pytest.raises(sa.exc.OperationalError):
            runner.submit("while down")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {later.split('?')[0].rsplit('/', 1)[1]}")
        assert runner.wait(runner.submit("once up").id, 30).state == "done"
    finally:
        runner.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {later.split('?')[0].rsplit('/', 1)[1]} WITH (FORCE)")


def test_a_reader_does_not_run_queued_jobs(store):
    reader = JobRunner(store(), run_jobs=False)
    try:
        queued = reader.submit("from a reader")
        time.sleep(0.2)
        assert reader.get(queued.id).state == "queued"
    finally:
        reader.close()
    with pytest.raises(ValueError, match="needs the work"):
        JobRunner(store())


def test_a_job_submitted_elsewhere_is_picked_up_by_polling(store):
    worker = JobRunner(store(), lambda p: {"ok": True}, poll_seconds=0.05)
    reader = JobRunner(store(), run_jobs=False)  # the CLI, or another replica: its submit wakes no local worker
    try:
        assert worker.wait(reader.submit("from elsewhere").id, 30).state == "done"
    finally:
        reader.close()
        worker.close()


def test_a_store_from_before_the_state_column_opens_unchanged(tmp_path):
    old = sqlite3.connect(tmp_path / "jobs.sqlite")
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, created_at TEXT, body TEXT)")
    old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    for job_id, state in (("j1", "done"), ("j2", "queued")):
        old.execute("INSERT INTO jobs VALUES (?, ?, ?)", (job_id, f"2026-01-0{job_id[1]}", (
            f'{{"id": "{job_id}", "reason": "r", "state": "{state}", "created_at": "2026-01-0{job_id[1]}"}}')))
    old.execute("INSERT INTO meta VALUES ('trained_through_event', '41')")
    old.commit()
    old.close()
    reader = JobRunner(Database.sqlite(tmp_path / "jobs.sqlite"), run_jobs=False)
    try:
        assert [j.id for j in reader.list(state="queued")] == ["j2"]
        assert reader.submit("joins the queued one").id == "j2"
        assert [j.id for j in reader.list()] == ["j2", "j1"] and reader.meta("trained_through_event") == "41"
    finally:
        reader.close()


def journal_on(tmp_path: Path, backend: str | None) -> Journal:
    return Journal(Database.open(backend, tmp_path / "journal.sqlite", "journal"), TAXONOMY)


def test_trigger_after_n_labels_and_on_start_training(tmp_path, state_backend, runner, gate):
    journal = journal_on(tmp_path, state_backend)
    trigger = RetrainTrigger(journal, runner, every=3)
    for i in range(2):
        payload = event(ann=annotation(ann_id=i + 1, task_id=100 + i))
        assert trigger.on_event(payload, journal.record(payload)) is None
    duplicate = event(ann=annotation(ann_id=1, task_id=100))
    assert trigger.on_event(duplicate, journal.record(duplicate)) is None  # a replay is not a new label
    third = event(ann=annotation(ann_id=3, task_id=102))
    job = trigger.on_event(third, journal.record(third))
    assert job is not None and "3 new labels" in job.reason
    trigger.advance()
    assert trigger.pending_labels() == 0
    start = {"action": "START_TRAINING", "project": {"id": 7}}
    assert trigger.on_event(start, journal.record(start)) is not None
    journal.close()


def test_mark_survives_restart_and_is_shared_by_replicas(tmp_path, state_backend, store, gate):
    journal = journal_on(tmp_path, state_backend)
    r = JobRunner(store(), gate)
    replica = JobRunner(store(), gate)
    for i in range(4):
        journal.record(event(ann=annotation(ann_id=i + 1, task_id=100 + i)))
    RetrainTrigger(journal, r, every=10).advance()
    journal.record(event(ann=annotation(ann_id=9, task_id=109)))
    assert RetrainTrigger(journal, replica, every=10).pending_labels() == 1
    replica.close()
    r.close()
    r2 = JobRunner(store(), gate)
    try:
        assert RetrainTrigger(journal, r2, every=10).pending_labels() == 1
    finally:
        r2.close()
        journal.close()


def test_routes(runner, gate):
    app = FastAPI()
    app.include_router(jobs_router(runner))
    client = TestClient(app)
    created = client.post("/jobs/retrain", json={"reason": "operator"})
    assert created.status_code == 202
    job_id = created.json()["id"]
    gate.release.release()
    runner.wait(job_id, 30)
    got = client.get(f"/jobs/{job_id}")
    assert got.status_code == 200 and got.json()["state"] == "done"
    assert client.get("/jobs").json()["jobs"][0]["id"] == job_id
    assert client.get("/jobs/nope").status_code == 404
    assert client.post("/jobs/retrain", json={"reason": 5}).status_code == 422
    # a wrong method on /jobs/retrain names the method that route takes, not /jobs/{job_id}'s
    wrong = client.options("/jobs/retrain")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


# ------------------------------------------------------------------------------------------ the round lock
def replica_loop(tmp_path: Path, backend: str | None, n: int, round_body) -> SimpleNamespace:
    """Just enough of an ``ActiveLearningLoop`` for its ``run_round`` to take the round lock around
    ``round_body``. On PostgreSQL each replica has a state dir of its own, as on separate machines: only the
    database is shared."""
    state_dir = tmp_path / f"replica{n}" if backend else tmp_path
    return SimpleNamespace(settings=Settings(state_dir=state_dir, database_url=backend), _run_round=round_body)


def test_rounds_never_overlap_across_replicas(tmp_path, state_backend):
    from active_learning.loop import ActiveLearningLoop

    intervals: list[tuple[float, float]] = []

    def round_body(progress, on_snapshot):
        start = time.monotonic()
        time.sleep(0.15)
        intervals.append((start, time.monotonic()))

    loops = [replica_loop(tmp_path, state_backend, n, round_body) for n in range(3)]
    threads = [threading.Thread(target=ActiveLearningLoop.run_round, args=(loop,)) for loop in loops * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    intervals.sort()
    assert len(intervals) == 6
    assert all(end <= next_start for (_, end), (next_start, _) in zip(intervals, intervals[1:], strict=False))


def test_a_round_lock_holder_whose_connection_dies_releases_it(tmp_path, pg_url):
    """A replica that dies mid-round (here: its database session is cut) must not wedge the others."""
    import psycopg

    from active_learning.loop import ActiveLearningLoop

    entered, leave, second_ran = threading.Event(), threading.Event(), threading.Event()
    first = replica_loop(tmp_path, pg_url, 0, lambda p, s: (entered.set(), leave.wait(30)))
    second = replica_loop(tmp_path, pg_url, 1, lambda p, s: second_ran.set())
    errors: list[BaseException] = []

    def run(loop) -> None:
        try:
            ActiveLearningLoop.run_round(loop)
        except Exception as e:  # the dead session cannot unlock: expected for the first holder
            errors.append(e)

    holder = threading.Thread(target=run, args=(first,))
    holder.start()
    assert entered.wait(30)
    waiter = threading.Thread(target=run, args=(second,))
    waiter.start()
    assert not second_ran.wait(0.5)  # held
    with psycopg.connect(pg_url, autocommit=True) as admin:
        cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks "
                            "WHERE locktype = 'advisory' AND granted").fetchall()
    assert cut == [(True,)]
    assert second_ran.wait(30)
    leave.set()
    holder.join(timeout=30)
    waiter.join(timeout=30)
    assert len(errors) <= 1
