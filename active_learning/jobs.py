"""Background retraining jobs: one at a time, with status a client can poll at ``GET /jobs/{id}``.

Retraining never runs inside a webhook request. Events only *trigger* a job (after N new labels, or
Label Studio's START_TRAINING); a single worker thread runs jobs in order, and a trigger that arrives
while a job is queued joins that job instead of piling up another. Jobs and the trigger's high-water
mark live in SQLite next to the journal, so a restart neither forgets a finished job nor recounts
labels that were already trained on; a job that was running when the process died is marked failed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from labelloop.journal import Journal, RecordResult

log = logging.getLogger("labelloop.jobs")

JobStateName = Literal["queued", "running", "done", "failed"]
ReportProgress = Callable[[float, str], None]
_ERROR_CHARS = 1000  # a job's error is one line; the traceback's tail is in its message
#: the work of one job: reports progress, returns a JSON-able summary
JobWork = Callable[[ReportProgress], dict[str, Any]]


class Job(BaseModel):
    id: str
    kind: str = "retrain"
    reason: str
    state: JobStateName
    progress: float = Field(0.0, ge=0, le=1)
    message: str = ""
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class RetrainRequest(BaseModel):
    reason: str = Field("manual", max_length=200)


class JobList(BaseModel):
    jobs: list[Job]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class JobRunner:
    """Retrain jobs in SQLite, run one at a time by a worker thread.

    Exactly one process (the service) may run jobs on a database: it recovers jobs that a crash left
    ``running``. Other processes that only read or submit (``labelloop loop status``) pass
    ``run_jobs=False``, so they neither recover nor claim anything.
    """

    def __init__(self, db_path: Path, work: JobWork | None = None, *, run_jobs: bool = True):
        if run_jobs and work is None:
            raise ValueError("a runner that runs jobs needs the work to run")
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at TEXT, body TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._work = work
        self._stopped = False
        self._thread: threading.Thread | None = None
        if not run_jobs:
            return
        for job in self.list(state="running"):
            self._save(job.model_copy(update={"state": "failed", "finished_at": _now(),
                                              "error": "interrupted: the service stopped while it ran"}))
        self._thread = threading.Thread(target=self._loop, name="labelloop-jobs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ storage
    def _save(self, job: Job) -> Job:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)",
                             (job.id, job.created_at, job.model_dump_json()))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.model_validate_json(row[0]) if row else None

    def list(self, state: JobStateName | None = None, limit: int = 50) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE ?1 IS NULL OR json_extract(body, '$.state') = ?1 "
                "ORDER BY created_at DESC LIMIT ?2", (state, limit)).fetchall()
        return [Job.model_validate_json(r[0]) for r in rows]

    def meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ scheduling
    def submit(self, reason: str) -> Job:
        """Queue a job, or return the one already queued (triggers coalesce; a running job is not
        interrupted, so a trigger during a run queues exactly one follow-up)."""
        with self._lock:
            queued = self.list(state="queued", limit=1)
            if queued:
                return queued[0]
            job = self._save(Job(id=uuid.uuid4().hex[:12], reason=reason, state="queued", created_at=_now()))
            self._wake.notify()
            return job

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job finishes (for the CLI and tests); None if it does not exist."""
        deadline = datetime.now(UTC).timestamp() + timeout
        with self._lock:
            while True:
                job = self.get(job_id)
                if job is None or job.state in ("done", "failed"):
                    return job
                remaining = deadline - datetime.now(UTC).timestamp()
                if remaining <= 0:
                    return job
                self._wake.wait(min(remaining, 0.5))

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._thread is None or not self._thread.is_alive():
            self._db.close()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not (queued := self.list(state="queued")):
                    self._wake.wait()
                if self._stopped:
                    return
                job = self._save(queued[-1].model_copy(update={"state": "running", "started_at": _now()}))
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(fraction: float, message: str) -> None:
            nonlocal job
            job = self._save(job.model_copy(update={"progress": max(0.0, min(1.0, fraction)), "message": message}))

        try:
            result = self._work(progress)
        except BaseException as e:  # noqa: BLE001 - even SystemExit from a library: report it, the worker lives on
            first = (str(e).strip().splitlines() or [""])[0][:_ERROR_CHARS]
            log.error("job %s failed: %s: %s", job.id, type(e).__name__, first)
            job = job.model_copy(update={"state": "failed", "error": f"{type(e).__name__}: {first}".rstrip(": "),
                                         "message": traceback.format_exc(limit=3)[-2000:]})
        else:
            job = job.model_copy(update={"state": "done", "progress": 1.0, "result": json.loads(
                json.dumps(result, default=str))})
        with self._lock:
            self._save(job.model_copy(update={"finished_at": _now()}))
            self._wake.notify_all()


class RetrainTrigger:
    """Turns journal events into retrain jobs: after ``every`` new labels, or on START_TRAINING."""

    MARK = "trained_through_event"

    def __init__(self, journal: Journal, runner: JobRunner, every: int):
        self.journal = journal
        self.runner = runner
        self.every = every

    @property
    def mark(self) -> int:
        return int(self.runner.meta(self.MARK, "0"))

    def pending_labels(self) -> int:
        return self.journal.new_label_count(self.mark)

    def advance(self) -> int:
        """Called by the job when it snapshots the labels it trains on."""
        last = self.journal.last_event_id()
        self.runner.set_meta(self.MARK, str(last))
        return last

    def on_event(self, payload: Any, result: RecordResult) -> Job | None:
        action = payload.get("action") if isinstance(payload, dict) else None
        if action == "START_TRAINING":
            return self.runner.submit("START_TRAINING from Label Studio")
        if result.status == "accepted" and self.pending_labels() >= self.every:
            return self.runner.submit(f"{self.every} new labels")
        return None


def jobs_router(runner: JobRunner) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.get("/jobs", response_model=JobList)
    def list_jobs(limit: int = 20) -> JobList:
        return JobList(jobs=runner.list(limit=max(1, min(limit, 200))))

    # before /jobs/{job_id}: Starlette answers a wrong method with the Allow header of the first route
    # whose path matches, and "retrain" also matches {job_id}
    @router.post("/jobs/retrain", response_model=Job, status_code=202)
    def retrain(request: RetrainRequest) -> Job:
        return runner.submit(request.reason)

    @router.get("/jobs/{job_id}", response_model=Job, responses={404: {"description": "no job with this id"}})
    def get_job(job_id: str) -> Job:
        job = runner.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    return router
