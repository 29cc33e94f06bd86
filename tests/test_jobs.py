"""Retrain jobs: one at a time, triggers coalesce, status is queryable, failures and restarts are reported."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from active_learning.jobs import JobRunner, RetrainTrigger, jobs_router
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
def runner(tmp_path, gate):
    r = JobRunner(tmp_path / "jobs.sqlite", gate)
    yield r
    for _ in range(10):
        gate.release.release()
    r.close()


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


def test_failure_is_reported_and_worker_survives(tmp_path):
    calls = []

    def work(progress):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("registry unreachable")
        return {"ok": True}

    r = JobRunner(tmp_path / "jobs.sqlite", work)
    try:
        failed = r.wait(r.submit("x").id, 30)
        assert failed.state == "failed" and "registry unreachable" in failed.error
        assert r.wait(r.submit("y").id, 30).state == "done"
    finally:
        r.close()


def test_restart_marks_interrupted_job_failed_and_keeps_history(tmp_path, gate):
    crashed = JobRunner(tmp_path / "jobs.sqlite", gate)
    job = crashed.submit("a")
    until(lambda: crashed.get(job.id).message == "half way")  # its last progress write is done
    watcher = JobRunner(tmp_path / "jobs.sqlite", run_jobs=False)  # e.g. `labelloop loop status`
    assert watcher.get(job.id).state == "running"  # a reader neither recovers nor claims jobs
    watcher.close()
    restarted = JobRunner(tmp_path / "jobs.sqlite", lambda p: {})  # opens the store while the job "runs"
    try:
        after = restarted.get(job.id)
        assert after.state == "failed" and "interrupted" in after.error
        assert restarted.list()[0].id == job.id
    finally:
        gate.release.release()
        crashed.close()
        restarted.close()


def test_a_reader_does_not_run_queued_jobs(tmp_path):
    reader = JobRunner(tmp_path / "jobs.sqlite", run_jobs=False)
    try:
        queued = reader.submit("from a reader")
        time.sleep(0.2)
        assert reader.get(queued.id).state == "queued"
    finally:
        reader.close()
    with pytest.raises(ValueError, match="needs the work"):
        JobRunner(tmp_path / "jobs.sqlite")


def test_trigger_after_n_labels_and_on_start_training(tmp_path, runner, gate):
    journal = Journal(tmp_path / "journal.sqlite", TAXONOMY)
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


def test_mark_survives_restart(tmp_path, gate):
    journal = Journal(tmp_path / "journal.sqlite", TAXONOMY)
    r = JobRunner(tmp_path / "jobs.sqlite", gate)
    for i in range(4):
        journal.record(event(ann=annotation(ann_id=i + 1, task_id=100 + i)))
    RetrainTrigger(journal, r, every=10).advance()
    journal.record(event(ann=annotation(ann_id=9, task_id=109)))
    r.close()
    r2 = JobRunner(tmp_path / "jobs.sqlite", gate)
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
