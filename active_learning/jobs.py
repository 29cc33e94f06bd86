"""Background retraining jobs: one at a time, with status a client can poll at ``GET /jobs/{id}``.

Retraining never runs inside a webhook request. Events only *trigger* a job (after N new labels, or
Label Studio's START_TRAINING); a worker thread runs jobs in order, and a trigger that arrives while a job
is queued joins that job instead of piling up another. Jobs and the trigger's high-water mark live in the
``jobs`` store (``Settings.database("jobs")``: SQLite next to the journal, or the shared PostgreSQL), so a
restart neither forgets a finished job nor recounts labels that were already trained on.

Several replicas may run workers on one database. What keeps them in step:

* **One job at a time, across replicas.** A worker claims and runs a job only while it holds the store's
  ``job-slot`` lock (``Database.exclusive``: ``fcntl`` next to the SQLite file, a session advisory lock on
  PostgreSQL). Whoever holds the slot takes the oldest queued job inside a serialised write, so a job is
  claimed by exactly one worker, and the jobs table never shows two running jobs.
* **Triggers coalesce across replicas.** ``submit`` looks for a queued job and inserts one only if there is
  none, inside ``Database.write("jobs")``, which no other replica's write interleaves with.
* **Crash recovery fails only orphans.** A live worker holds the slot for as long as its job runs and writes
  the job's final state before it lets go. So a worker that holds the slot and still finds a ``running`` job
  knows its runner is gone (the process died, and with it the ``fcntl`` lock or the PostgreSQL session), and
  marks it failed. Workers check this at start and whenever they poll, so a surviving replica cleans up
  after a dead one without a restart, and a replica that starts never fails the job a live one is running.
  (A lease with heartbeats would need clocks and timeouts; the lock is released by the OS or the database
  server the moment its holder is gone.)
* **Submissions from elsewhere are seen.** A worker also polls every ``poll_seconds``, so a job submitted on
  another replica or by the CLI starts even when this replica's own submit never woke it.
* **Kinds run in lanes of their own.** A runner runs one ``kind`` of job (``retrain``: the fast rounds;
  ``finetune``: a transformer fine-tune that takes minutes) under that kind's slot, so a fine-tune never holds
  up the rounds queued behind it. Everything above holds per kind: one running job, one queued job, and
  recovery fails only the orphans of its own kind (the other lane's running job has a live holder).
* **Conditional submits are exactly once.** ``submit_if`` reads a mark, decides and queues in one serialised
  write, so replicas that see the same threshold crossed queue one job between them, and a restart that finds
  the mark already moved queues none.

One limit: if a PostgreSQL session holding the slot is cut while its job still runs (a database restart),
another replica may fail that job and start the next; the job's own final write then records how it ended.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection

from labelloop.db import Database
from labelloop.journal import Journal, RecordResult

log = logging.getLogger("labelloop.jobs")

JobStateName = Literal["queued", "running", "done", "failed"]
ReportProgress = Callable[[float, str], None]
_ERROR_CHARS = 1000  # a job's error is one line; the traceback's tail is in its message
#: the work of one job: reports progress, returns a JSON-able summary
JobWork = Callable[[ReportProgress], dict[str, Any]]
#: the lock a worker holds while it claims and runs a job of the default kind (see the module docstring)
JOB_SLOT = "job-slot"
RETRAIN = "retrain"
FINETUNE = "finetune"
JobKind = Literal["retrain", "finetune"]
#: a conditional submit's decision: ``None`` (nothing to queue), or the mark's new value and the job's reason
Decision = tuple[str, str] | None
#: the key of every serialised write to the jobs store
_WRITE_KEY = "jobs"
INTERRUPTED = "interrupted: the service stopped while it ran"

_metadata = sa.MetaData()
_jobs = sa.Table(
    "jobs", _metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    # a column of its own (the body has it too) so that claiming filters on it the same way on both engines
    sa.Column("state", sa.Text),
)
_jobs_by_state = sa.Index("ix_jobs_state", _jobs.c.state, _jobs.c.created_at)
_meta = sa.Table(
    "meta", _metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text),
)


class Job(BaseModel):
    id: str
    kind: str = RETRAIN
    reason: str
    state: JobStateName
    progress: float = Field(0.0, ge=0, le=1)
    message: str = ""
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    runner: str | None = Field(None, description="the worker that ran it (host:pid:worker), among replicas")
    result: dict[str, Any] | None = None
    error: str | None = None


class RetrainRequest(BaseModel):
    reason: str = Field("manual", max_length=200)
    kind: JobKind = Field(RETRAIN, description="retrain: a fast-mode round; finetune: fine-tune the base model on "
                          "the loop's labels (minutes), gated like any retrain")


class JobList(BaseModel):
    jobs: list[Job]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _slot(kind: str) -> str:
    return JOB_SLOT if kind == RETRAIN else f"{JOB_SLOT}-{kind}"


def _of_kind(bodies: Iterable[str], kind: str) -> list[Job]:
    """The jobs among ``bodies`` of ``kind``, in the given order. Kind is read from the body (a row written
    before kinds existed is a retrain), and the rows filtered are few: the queued or running ones."""
    return [job for job in map(Job.model_validate_json, bodies) if job.kind == kind]


def _create_schema(conn: Connection) -> None:
    """Create the tables, and give a jobs table written before ``state`` was a column that column: stores
    from earlier versions open unchanged in meaning."""
    _metadata.create_all(conn)
    columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    if "state" not in columns:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN state TEXT"))
        for job_id, body in conn.execute(sa.select(_jobs.c.id, _jobs.c.body)).all():
            conn.execute(_jobs.update().where(_jobs.c.id == job_id).values(state=json.loads(body)["state"]))
    _jobs_by_state.create(conn, checkfirst=True)


class JobRunner:
    """Jobs of one ``kind`` in the jobs store, run one at a time (across every replica on the store) by worker
    threads; a runner of another kind on the same store runs its own jobs alongside (see the module docstring).

    Processes that only read or submit (``labelloop loop status``, the dashboard) pass ``run_jobs=False``:
    they neither recover nor claim anything. The runner owns ``db`` and disposes of it on ``close``.
    """

    def __init__(self, db: Database, work: JobWork | None = None, *, run_jobs: bool = True,
                 poll_seconds: float = 1.0, kind: str = RETRAIN):
        if run_jobs and work is None:
            raise ValueError("a runner that runs jobs needs the work to run")
        self.kind = kind
        self._slot = _slot(kind)
        self._db = db
        self._schema_ready = False
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._work = work
        self._poll_seconds = poll_seconds
        self._stopped = False
        self._submitted = False  # a local submit since the worker last looked: look again before sleeping
        self._thread: threading.Thread | None = None
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        try:
            self._open()
            if run_jobs:
                with db.exclusive(self._slot, wait=False) as free:
                    if free:  # nobody runs a job: any job still "running" lost its runner
                        with self._write() as conn:
                            self._recover(conn)
        except sa.exc.OperationalError as e:  # the worker and every call try again
            log.warning("the jobs store cannot be reached (%s); jobs wait until it answers",
                        (str(e.orig or e).strip().splitlines() or [""])[0])
        if not run_jobs:
            return
        self._thread = threading.Thread(target=self._loop, name="labelloop-jobs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ storage
    def _open(self) -> None:
        """Make the tables, once per runner. Not in ``__init__`` alone: a shared database that is down when
        a replica starts must not keep it from starting and serving; the first call that reaches it makes
        them (concurrent replicas serialise on the write key, so they never race to create a table)."""
        if self._schema_ready:
            return
        with self._db.write(_WRITE_KEY) as conn:
            _create_schema(conn)
        self._schema_ready = True

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self._open()
        with self._db.write(_WRITE_KEY) as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        self._open()
        with self._db.read() as conn:
            yield conn

    def _update(self, conn: Connection, job: Job) -> Job:
        conn.execute(_jobs.update().where(_jobs.c.id == job.id).values(state=job.state, body=job.model_dump_json()))
        return job

    def _save(self, job: Job) -> Job:
        with self._write() as conn:
            return self._update(conn, job)

    def get(self, job_id: str) -> Job | None:
        with self._read() as conn:
            body = conn.execute(sa.select(_jobs.c.body).where(_jobs.c.id == job_id)).scalar()
        return Job.model_validate_json(body) if body is not None else None

    def list(self, state: JobStateName | None = None, limit: int = 50) -> list[Job]:
        query = sa.select(_jobs.c.body).order_by(_jobs.c.created_at.desc(), _jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(_jobs.c.state == state)
        with self._read() as conn:
            return [Job.model_validate_json(body) for body in conn.execute(query).scalars()]

    def meta(self, key: str, default: str | None = None) -> str | None:
        with self._read() as conn:
            value = conn.execute(sa.select(_meta.c.value).where(_meta.c.key == key)).scalar()
        return default if value is None else value

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            self._set_meta(conn, key, value)

    @staticmethod
    def _set_meta(conn: Connection, key: str, value: str) -> None:
        if not conn.execute(_meta.update().where(_meta.c.key == key).values(value=value)).rowcount:
            conn.execute(_meta.insert().values(key=key, value=value))

    # ------------------------------------------------------------------ scheduling
    def submit(self, reason: str, kind: str | None = None) -> Job:
        """Queue a job of ``kind`` (default: this runner's), or return the one of that kind already queued, by
        whichever replica (triggers coalesce; a running job is not interrupted, so a trigger during a run
        queues exactly one follow-up)."""
        with self._write() as conn:
            job = self._submit(conn, reason, kind or self.kind)
        self._woken()
        return job

    def submit_if(self, key: str, decide: Callable[[str | None], Decision], kind: str | None = None) -> Job | None:
        """Queue a job of ``kind`` when ``decide`` says so, given the mark stored under ``key``; the mark moves to
        the value ``decide`` returns in the same serialised write, so no two callers (threads, replicas, a
        restarted process) act on one mark. A job of that kind already queued absorbs the new reason's job
        (the mark still moves: the queued job will train on everything there is by then)."""
        with self._write() as conn:
            decision = decide(conn.execute(sa.select(_meta.c.value).where(_meta.c.key == key)).scalar())
            if decision is None:
                return None
            value, reason = decision
            self._set_meta(conn, key, value)
            job = self._submit(conn, reason, kind or self.kind)
        self._woken()
        return job

    def _submit(self, conn: Connection, reason: str, kind: str) -> Job:
        queued = _of_kind(conn.execute(sa.select(_jobs.c.body).where(_jobs.c.state == "queued")
                                       .order_by(_jobs.c.created_at, _jobs.c.id)).scalars(), kind)
        if queued:
            return queued[0]
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, reason=reason, state="queued", created_at=_now())
        conn.execute(_jobs.insert().values(id=job.id, created_at=job.created_at, state=job.state,
                                           body=job.model_dump_json()))
        return job

    def _woken(self) -> None:
        with self._lock:
            self._submitted = True
            self._wake.notify_all()

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
            self._db.dispose()

    # ------------------------------------------------------------------ the worker
    def _recover(self, conn: Connection) -> None:
        """Fail every ``running`` job of this kind. Only call with the kind's slot held: then none of them has a
        live runner (a running job of another kind has its own slot, and maybe a live runner)."""
        for job in _of_kind(conn.execute(sa.select(_jobs.c.body).where(_jobs.c.state == "running")).scalars(),
                            self.kind):
            log.warning("job %s lost its runner %s: marking it failed", job.id, job.runner)
            self._update(conn, job.model_copy(update={"state": "failed", "finished_at": _now(),
                                                      "error": INTERRUPTED}))

    def _claim(self) -> Job | None:
        """Fail orphans and take the oldest queued job, in one write (with the job slot held)."""
        with self._write() as conn:
            self._recover(conn)
            queued = _of_kind(conn.execute(sa.select(_jobs.c.body).where(_jobs.c.state == "queued")
                                           .order_by(_jobs.c.created_at, _jobs.c.id)).scalars(), self.kind)
            if not queued:
                return None
            job = queued[0].model_copy(update={"state": "running", "started_at": _now(), "runner": self.name})
            return self._update(conn, job)

    def _run_next(self) -> bool:
        """Claim and run the oldest queued job of this kind; False when there was nothing this worker could run
        (none queued, or another worker holds the slot). An idle poll is one read: no lock, no write."""
        with self._read() as conn:
            if not _of_kind(conn.execute(sa.select(_jobs.c.body).where(_jobs.c.state.in_(("queued", "running")))
                                         ).scalars(), self.kind):
                return False
        with self._db.exclusive(self._slot, wait=False) as held:
            if not held:
                return False
            job = self._claim()
            if job is None:
                return False
            self._run(job)  # writes the final state before the slot is let go
            return True

    def _loop(self) -> None:
        problem: str | None = None  # logged when it starts and when it ends, not at every poll
        while True:
            with self._lock:
                if self._stopped:
                    return
                self._submitted = False
            try:
                ran = self._run_next()
            except Exception as e:  # the database is unreachable: keep the worker, try again at the next poll
                if problem is None:
                    log.warning("job worker cannot use the jobs store, retrying every %.0f s: %s: %s",
                                self._poll_seconds, type(e).__name__, (str(e).strip().splitlines() or [""])[0])
                problem, ran = str(e), False
            else:
                if problem is not None:
                    log.info("job worker: the jobs store answers again")
                problem = None
            with self._lock:
                if not ran and not self._submitted and not self._stopped:
                    self._wake.wait(self._poll_seconds)

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
        self._save(job.model_copy(update={"finished_at": _now()}))
        with self._lock:
            self._wake.notify_all()


class RetrainTrigger:
    """Turns journal events into retrain jobs: after ``every`` new labels, or on START_TRAINING. The
    high-water mark is in the jobs store, so replicas on one database count from the same mark."""

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
        return runner.submit(request.reason, request.kind)

    @router.get("/jobs/{job_id}", response_model=Job, responses={404: {"description": "no job with this id"}})
    def get_job(job_id: str) -> Job:
        job = runner.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    return router
