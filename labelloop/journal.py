"""The annotation journal: every Label Studio annotation event, durably, exactly once.

Label Studio posts webhooks synchronously with a 1 s timeout and never retries, so the serving app's
``POST /webhook`` writes the payload here and acknowledges only after :meth:`Journal.record` returns;
anything Label Studio failed to deliver is found later by the reconciler
(``active_learning.reconcile``), which feeds the annotations it lists through
:meth:`Journal.apply_annotation`. Both paths meet in one database (a SQLite file by default, the schema
``journal`` of the shared PostgreSQL when ``database_url`` is set, so that several ``labelloop serve``
replicas share one journal) with these tables:

``events``
    Every webhook payload exactly as received (plus the reconciler's state-changing applications),
    with the status and reason it was given: the audit trail and the replay source. ``event_id`` is
    monotonic (AUTOINCREMENT and PostgreSQL sequences never reuse ids), so "labels since event N" is a
    well-defined question.
``annotations``
    The current state, one row per Label Studio annotation id: task, item id and text, label,
    annotator, ``updated_at``, the cancelled / ground-truth / deleted flags, which path wrote it
    and which event last changed it. Training data is derived from this table only. For label
    quality it also keeps Label Studio's ``lead_time`` and the pre-label the annotator started from:
    the annotation's ``parent_prediction`` id and, when the payload holds that prediction, its label
    and ``model_version``. Webhook payloads carry only the id (their task has no ``predictions``); the
    reconciler's listing carries the predictions, so its pass fills in the label and version of an
    annotation a webhook already applied, without counting as a new version. In a multi-label
    taxonomy the label (and a suggested label) is a set, stored as a JSON list in taxonomy order (the
    none label as ``[]``): the column keeps its type, so no schema change, and equal sets are equal text.
``quarantine``
    One row per annotation (or payload) that could not be used, with the reason. A separate table
    because one event (``ANNOTATIONS_CREATED``) can carry several annotations, each with its own
    problem. A review mark that cannot be used (a severity off the scale, an escalation without a
    required reason) is quarantined on its own, reason prefixed ``severity:`` or ``escalation:``, while
    the label is kept: the event stays ``accepted``.
``escalations``
    One row per escalated annotation (:mod:`labelloop.policy` reads the severity, escalate, reason and
    reveal controls), inserted in the transaction that journals the annotation, so an acknowledged
    escalation is as durable as its label; a later version of the same annotation never escalates
    again. ``labelloop.escalations`` copies new rows into its outbox and delivers them.

Exactly-once rules, applied inside one write transaction per call:

* An annotation version is identified by ``(id, updated_at)``. The same version again is a
  ``duplicate``; a version older than the stored one is a ``duplicate`` too (superseded) and
  never overwrites newer state; a newer one replaces the row.
* Deletion is final: Label Studio never reuses annotation ids (Django's SQLite ``AUTOINCREMENT`` and
  PostgreSQL sequences), so a stale event or a reconcile pass that listed an annotation just before
  it was deleted cannot bring it back. Deleting an id never seen leaves a tombstone for that reason.
* A cancelled (skipped) annotation is recorded, but is not a label.
* A new version that is unusable (label outside the taxonomy, no choices value, task without
  text) is quarantined *and* replaces the stored row with an unlabeled one: the annotator changed
  their answer, so the older label must stop counting.

The write transaction is :meth:`labelloop.db.Database.write`'s on PostgreSQL: READ COMMITTED alone would
let two replicas both read "not seen yet" and both apply a version, so every write first takes a
transaction-scoped advisory lock on the journal, which makes the read-check-write of one replica wait for
the other's commit. SQLite gets the same from ``BEGIN IMMEDIATE``. The tables are written once, as
SQLAlchemy ``Table`` definitions (:data:`METADATA`); the schema version is SQLite's ``user_version`` or,
on PostgreSQL, the one row of ``journal_meta``, and the same migrations run on both.

Durability: on SQLite, WAL mode with ``synchronous=FULL``. In WAL mode ``NORMAL`` survives an application
crash but may lose the last commits on power loss or an OS crash; the journal's promise is that an
acknowledged webhook is never lost, and Label Studio does not resend, so every commit is fsynced. The
cost is one fsync per webhook, negligible at human labeling rates; reconcile passes mostly find
duplicates, which commit nothing. PostgreSQL's default ``synchronous_commit=on`` gives the same promise.

Unwritable: a journal whose file, directory or disk refuses writes (read-only, full, I/O errors) is
opened read-only (empty, if not even that works), so that everything that only reads keeps working;
each write then raises :class:`JournalUnavailable` and nothing is recorded, so the webhook answers
503 rather than acknowledging an event it could not store. ``write_problem`` says why; the next write
tries again (reopening read-write when the file was read-only) and clears it once a commit succeeds.
A PostgreSQL that is down, restarting, full or read-only is the same case: its connection errors raise
:class:`JournalUnavailable` (reads too, as there is nothing to read from), a journal opened while it is
down creates its tables at the first write that reaches it, and the pool's pre-ping replaces the
connections a restart killed.

Concurrency: on SQLite one connection per :class:`Journal`, serialised by a lock (so any number of
threads may share one instance), every write in ``BEGIN IMMEDIATE`` so that a second process (the
reconciler) waits on the database lock (``busy_timeout``) instead of failing or interleaving a
read-check-write. On PostgreSQL each call checks a connection out of the pool, and the advisory lock
serialises the writers of every thread and every replica.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from labelloop.db import Database
from labelloop.policy import ReviewMarks, ReviewPolicy, is_review_item, read_marks
from labelloop.taxonomy import Taxonomy

log = logging.getLogger(__name__)

Status = Literal["accepted", "duplicate", "ignored", "quarantined"]
Source = Literal["webhook", "reconcile"]
STATUSES: tuple[Status, ...] = ("accepted", "duplicate", "ignored", "quarantined")
SOURCES: tuple[Source, ...] = ("webhook", "reconcile")

SCHEMA_VERSION = 3
BUSY_TIMEOUT_MS = 30_000
#: the key of the journal's writes in :meth:`labelloop.db.Database.write`
WRITE_KEY = "journal"

#: actions that carry annotations to apply (``ANNOTATIONS_CREATED`` carries lists)
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
#: actions Label Studio sends that never change a label
NON_LABEL_ACTIONS = (
    "START_TRAINING",
    "PROJECT_CREATED",
    "PROJECT_UPDATED",
    "TASKS_CREATED",
    "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED",
    "LABEL_LINK_DELETED",
)

# --- the schema, once for both engines ---------------------------------------------------------------------
#: Label Studio ids are 64-bit (PostgreSQL's INTEGER is 32); on SQLite the id columns stay ``INTEGER`` because
#: only that exact type makes a primary key the rowid that AUTOINCREMENT needs
_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _flag(name: str, checked: bool = True) -> list[Any]:
    """A 0/1 column (SQLite has no boolean type, and the stored 0/1 must read the same on both engines)."""
    column = sa.Column(name, sa.Integer, nullable=False, server_default=sa.text("0"))
    return [column, sa.CheckConstraint(f"{name} IN (0, 1)")] if checked else [column]


METADATA = sa.MetaData()

EVENTS = sa.Table(
    "events", METADATA,
    sa.Column("event_id", _Id, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.Text, nullable=False),
    sa.Column("source", sa.Text, sa.CheckConstraint("source IN ('webhook', 'reconcile')"), nullable=False),
    sa.Column("action", sa.Text),
    sa.Column("project_id", _Id),
    sa.Column("annotation_id", _Id),
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('accepted', 'duplicate', 'ignored', 'quarantined')"),
              nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Index("events_status", "status"),
    sa.Index("events_annotation", "annotation_id"),
    sqlite_autoincrement=True,
)

ANNOTATIONS = sa.Table(
    "annotations", METADATA,
    sa.Column("annotation_id", _Id, primary_key=True, autoincrement=False),
    sa.Column("project_id", _Id),
    sa.Column("task_id", _Id),
    sa.Column("item_id", sa.Text),
    sa.Column("text", sa.Text),
    sa.Column("label", sa.Text),
    sa.Column("annotator", _Id),
    sa.Column("created_at", sa.Text),
    sa.Column("updated_at", sa.Text),
    *_flag("cancelled"),
    *_flag("ground_truth"),
    *_flag("deleted"),
    sa.Column("problem", sa.Text),
    sa.Column("source", sa.Text, sa.CheckConstraint("source IN ('webhook', 'reconcile')"), nullable=False),
    sa.Column("event_id", _Id, sa.ForeignKey("events.event_id"), nullable=False),
    sa.Column("label_event_id", _Id, sa.ForeignKey("events.event_id")),
    sa.Column("lead_time", sa.Float),
    sa.Column("prediction_id", _Id),
    sa.Column("suggested_label", sa.Text),
    sa.Column("suggested_model_version", sa.Text),
    sa.Column("severity", sa.Text),
    *_flag("escalated", checked=False),
    *_flag("revealed", checked=False),
    # only a tombstone (deleted before it was ever seen) may lack the task fields
    sa.CheckConstraint("deleted = 1 OR (task_id IS NOT NULL AND item_id IS NOT NULL AND updated_at IS NOT NULL)"),
    # a label is never stored next to a reason it is unusable, nor on a skipped annotation
    sa.CheckConstraint("label IS NULL OR (problem IS NULL AND cancelled = 0 AND text IS NOT NULL)"),
    sa.Index("annotations_task", "task_id"),
    sa.Index("annotations_project", "project_id"),
    sa.Index("annotations_label_event", "label_event_id"),
)

#: one row per escalated annotation, written in the transaction that journals it: the durable record that
#: labelloop.escalations' outbox copies (by escalation_id, monotonic) and delivers. Never updated or deleted.
ESCALATIONS = sa.Table(
    "escalations", METADATA,
    sa.Column("escalation_id", _Id, primary_key=True, autoincrement=True),
    sa.Column("uid", sa.Text, nullable=False, unique=True),
    sa.Column("annotation_id", _Id, nullable=False, unique=True),
    sa.Column("event_id", _Id, sa.ForeignKey("events.event_id"), nullable=False),
    sa.Column("project_id", _Id),
    sa.Column("task_id", _Id, nullable=False),
    sa.Column("item_id", sa.Text, nullable=False),
    sa.Column("text", sa.Text),
    sa.Column("label", sa.Text),
    sa.Column("severity", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("annotator", _Id),
    sa.Column("escalated_at", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)

QUARANTINE = sa.Table(
    "quarantine", METADATA,
    sa.Column("quarantine_id", _Id, primary_key=True, autoincrement=True),
    sa.Column("event_id", _Id, sa.ForeignKey("events.event_id"), nullable=False),
    sa.Column("annotation_id", _Id),
    sa.Column("task_id", _Id),
    sa.Column("reason", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)

# the statements of every webhook, built once: SQLAlchemy then reuses their compiled form from its cache
_INSERT_EVENT = EVENTS.insert()
_SET_STATUS = sa.text("UPDATE events SET status = :status, reason = :reason WHERE event_id = :id")
_CURRENT = sa.text("SELECT * FROM annotations WHERE annotation_id = :id")
_INSERT_ANNOTATION = ANNOTATIONS.insert()
_UPDATE_ANNOTATION = ANNOTATIONS.update().where(ANNOTATIONS.c.annotation_id == sa.bindparam("key"))
_INSERT_QUARANTINE = QUARANTINE.insert()

#: PostgreSQL has no ``user_version``: the schema version is the one row of this table, beside the journal's
_META = sa.Table("journal_meta", sa.MetaData(), sa.Column("schema_version", sa.Integer, nullable=False))

LABEL_COLUMNS = [
    "id", "text", "label", "task_id", "project_id", "annotation_id", "annotator", "updated_at",
    "n_annotations", "severity", "severity_weight",
]
ANNOTATION_COLUMNS = [
    "annotation_id", "task_id", "project_id", "id", "text", "label", "annotator", "created_at",
    "updated_at", "cancelled", "ground_truth", "problem", "source", "lead_time", "prediction_id",
    "suggested_label", "suggested_model_version", "severity", "escalated", "revealed", "severity_weight",
]
#: columns added after schema 1; an older journal gets them by ALTER TABLE and a backfill (schema 3's review
#: marks need none: no generated config had those controls before, so old rows have none)
_ADDED_COLUMNS = ("lead_time", "prediction_id", "suggested_label", "suggested_model_version", "severity",
                  "escalated", "revealed")


@dataclass(frozen=True)
class RecordResult:
    """What the journal did with one payload; ``event_id`` is None only for a reconcile no-op."""

    status: Status
    reason: str | None
    event_id: int | None


class JournalError(RuntimeError):
    """The journal cannot be used (newer schema, not a journal); never raised for bad payloads."""


class JournalUnavailable(JournalError):
    """The journal cannot be written now (read-only, disk full, I/O error, database down): nothing was
    recorded."""


class _Malformed(ValueError):
    """A payload whose shape is unusable; turned into a quarantine row, never raised to callers."""


@dataclass(frozen=True)
class _Version:
    """One annotation version, parsed; ``problem`` set means it carries no usable label."""

    annotation_id: int
    task_id: int
    project_id: int | None
    item_id: str
    text: str | None
    label: str | None
    annotator: int | None
    created_at: str | None
    updated_at: str
    cancelled: bool
    ground_truth: bool
    problem: str | None
    lead_time: float | None = None
    prediction_id: int | None = None
    suggested_label: str | None = None
    suggested_model_version: str | None = None
    marks: ReviewMarks = ReviewMarks()

    @property
    def is_label(self) -> bool:
        return self.label is not None


# --- where the tables live -----------------------------------------------------------------------------------


class _Store(ABC):
    """One engine's way of keeping the journal's promises: serialised writes, the schema version, and which
    errors mean "the database refuses writes now" (as opposed to a bad payload or a bug)."""

    #: the journal's location in messages (a file, or a redacted URL and schema)
    where: str
    #: the SQLite file, where there is one
    path: Path | None = None

    @abstractmethod
    def open(self, migrate: Callable[[Connection], None]) -> None:
        """Open for writing and bring the schema up to date with ``migrate`` (called in a write transaction)."""

    @abstractmethod
    def degrade(self, problem: str) -> None:
        """:meth:`open` failed with an error :meth:`unavailable` accepts: serve whatever reads can be served;
        the next :meth:`write` tries to open (and migrate) again."""

    @abstractmethod
    def write(self) -> AbstractContextManager[Connection]:
        """A transaction no other writer of this journal (thread, process or replica) interleaves with."""

    @abstractmethod
    def read(self) -> AbstractContextManager[Connection]:
        """One consistent snapshot for several SELECTs."""

    @abstractmethod
    def unavailable(self, error: BaseException) -> bool:
        """Whether ``error`` means the database refuses writes now, never that a payload is bad."""

    @abstractmethod
    def schema_version(self, conn: Connection) -> int:
        """The stored schema version, 0 for a database without a journal."""

    @abstractmethod
    def set_schema_version(self, conn: Connection, version: int) -> None: ...

    @property
    def raw_connection(self) -> sqlite3.Connection | None:
        """The one DBAPI connection every statement goes through, where there is one (SQLite)."""
        return None

    @abstractmethod
    def close(self) -> None: ...


#: SQLite result codes that mean the file or its disk refuses writes, never that a payload is bad
_UNWRITABLE_CODES = ("SQLITE_READONLY", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM",
                     "SQLITE_BUSY", "SQLITE_LOCKED")


class _SqliteStore(_Store):
    """One connection for the journal's lifetime, behind a lock: ``synchronous=FULL`` is a per-connection
    setting, SQLite admits one writer at a time anyway, and the read-only fallback swaps that one connection
    for another. Writes take the lock before ``BEGIN IMMEDIATE`` (the :class:`Database` engine's begin hook),
    so threads queue on the lock rather than busy-wait on SQLite's, and other processes wait on
    ``busy_timeout``."""

    def __init__(self, path: Path, db: Database | None = None):
        self.path = path
        self.where = str(path)
        self._db = db
        self._conn: Connection | None = None
        self._fallback: sa.Engine | None = None
        self._read_only = False
        self._lock = threading.Lock()
        self._migrate: Callable[[Connection], None] | None = None

    def open(self, migrate: Callable[[Connection], None]) -> None:
        self._migrate = migrate
        self._conn = self._open_writable()

    def _open_writable(self) -> Connection:
        assert self._migrate is not None
        if self._db is None:
            self._db = Database.sqlite(self.path)
        conn = self._db.engine.connect()
        try:
            raw = conn.connection.driver_connection
            mode = raw.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise JournalError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
            raw.execute("PRAGMA synchronous = FULL")
            with self._transaction(conn, immediate=True):
                self._migrate(conn)
        except BaseException:
            # not back into the pool: a connection opened while the file was read-only (a read-only mount)
            # stays read-only after the file becomes writable again, and the next try must open a fresh one
            conn.invalidate()
            conn.close()
            raise
        return conn

    def degrade(self, problem: str) -> None:
        """Read-only, else immutable (a read-only directory where SQLite cannot create the WAL index), else an
        empty in-memory journal (the file does not exist and cannot be created)."""
        self._read_only = True
        uri = self.path.resolve().as_uri()
        for suffix in ("?mode=ro", "?immutable=1"):
            engine = _plain_sqlite(uri + suffix)
            try:
                conn = engine.connect()
                with conn.begin():
                    version = self.schema_version(conn)
            except (sa.exc.OperationalError, sqlite3.OperationalError):
                engine.dispose()
                continue
            if version != SCHEMA_VERSION:
                conn.close()
                engine.dispose()
                raise JournalError(f"{self.path} has journal schema {version} and cannot be written to "
                                   f"migrate it to {SCHEMA_VERSION}: {problem}")
            self._conn, self._fallback = conn, engine
            return
        engine = _plain_sqlite(":memory:")
        METADATA.create_all(engine)
        self._conn, self._fallback = engine.connect(), engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._lock:
            if self._read_only:
                reopened = self._open_writable()
                self._close_connection()
                self._conn, self._read_only = reopened, False
            assert self._conn is not None
            with self._transaction(self._conn, immediate=True) as conn:
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._lock:
            assert self._conn is not None
            with self._transaction(self._conn, immediate=False) as conn:
                yield conn

    @staticmethod
    @contextmanager
    def _transaction(conn: Connection, *, immediate: bool) -> Iterator[Connection]:
        conn.execution_options(immediate=immediate)
        with conn.begin():
            yield conn

    def unavailable(self, error: BaseException) -> bool:
        if isinstance(error, OSError):
            return True
        cause = error.orig if isinstance(error, sa.exc.DBAPIError) else error
        return (isinstance(cause, sqlite3.OperationalError)
                and str(getattr(cause, "sqlite_errorname", "")).startswith(_UNWRITABLE_CODES))

    def schema_version(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar_one())

    def set_schema_version(self, conn: Connection, version: int) -> None:
        conn.exec_driver_sql(f"PRAGMA user_version = {int(version)}")

    @property
    def raw_connection(self) -> sqlite3.Connection | None:
        return None if self._conn is None else self._conn.connection.driver_connection

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._fallback is not None:
            self._fallback.dispose()
        self._conn = self._fallback = None

    def close(self) -> None:
        with self._lock:
            self._close_connection()
            if self._db is not None:
                self._db.dispose()


def _plain_sqlite(uri: str) -> sa.Engine:
    """An engine on one SQLite URI (``mode=ro``, ``immutable=1``, ``:memory:``) for the read-only fallback:
    one connection, autocommit in the driver and an explicit BEGIN per transaction, as the writable journal
    has through :class:`Database`."""
    engine = sa.create_engine(
        "sqlite://", poolclass=sa.pool.StaticPool,
        creator=lambda: sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False))
    sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
    return engine


#: SQLSTATE classes that mean the server cannot take the write now: connection exception, insufficient
#: resources (disk full, out of memory, too many connections), operator intervention (shutdown, restart,
#: terminated backend), system error; and 25006, a read-only transaction (a standby after a failover)
_PG_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
_PG_READ_ONLY = "25006"


class _PostgresStore(_Store):
    """The journal's tables in their schema of the shared PostgreSQL. Each call checks a connection out of
    the pool (pre-pinged, so one a restart killed is replaced rather than failing a webhook); writes go
    through :meth:`Database.write`, whose advisory lock serialises them across threads and replicas. A
    database that is down when the journal opens is not fatal: the tables are made by the first write that
    reaches it."""

    def __init__(self, db: Database):
        self._db = db
        self.where = f"{db.engine.url.render_as_string(hide_password=True)} (schema {db.schema})"
        self._migrate: Callable[[Connection], None] | None = None
        self._ready = False

    def open(self, migrate: Callable[[Connection], None]) -> None:
        self._migrate = migrate
        with self.write():
            pass

    def degrade(self, problem: str) -> None:
        """Nothing to fall back to: reads and writes raise :class:`JournalUnavailable` until it answers."""

    @contextmanager
    def write(self) -> Iterator[Connection]:
        assert self._migrate is not None
        with self._db.write(WRITE_KEY) as conn:
            migrating = not self._ready
            if migrating:
                self._migrate(conn)
            yield conn
        if migrating:
            self._ready = True

    @contextmanager
    def read(self) -> Iterator[Connection]:
        if not self._ready:  # opened while the database was down: make the tables before reading them
            with self.write():
                pass
        with self._db.read() as conn:
            yield conn

    def unavailable(self, error: BaseException) -> bool:
        if isinstance(error, OSError | sa.exc.TimeoutError):
            return True
        if not isinstance(error, sa.exc.DBAPIError):
            return False
        if error.connection_invalidated or isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError):
            return True
        state = str(getattr(error.orig, "sqlstate", "") or "")
        return state[:2] in _PG_UNAVAILABLE_CLASSES or state == _PG_READ_ONLY

    def schema_version(self, conn: Connection) -> int:
        _META.create(conn, checkfirst=True)
        return int(conn.execute(sa.select(sa.func.max(_META.c.schema_version))).scalar() or 0)

    def set_schema_version(self, conn: Connection, version: int) -> None:
        conn.execute(_META.delete())
        conn.execute(_META.insert().values(schema_version=version))

    def close(self) -> None:
        self._db.dispose()


def _store_for(target: Path | str | Database) -> _Store:
    if not isinstance(target, Database):
        return _SqliteStore(Path(target))
    if target.is_postgres:
        return _PostgresStore(target)
    return _SqliteStore(Path(str(target.engine.url.database)), target)


class Journal:
    """The persistent annotation journal for one taxonomy (any number of Label Studio projects)."""

    def __init__(self, store: Path | Database, taxonomy: Taxonomy, text_field: str = "text",
                 policy: ReviewPolicy | None = None):
        """``store``: a SQLite file, or the :class:`Database` the journal lives in (``Settings.database
        ("journal")``); the journal owns it and disposes of it on :meth:`close`. ``policy``: how severity
        and escalation marks are read (``Settings.review_policy``); the default scale and rules when None,
        which matter only to writers (readers see stored marks)."""
        self._backend = _store_for(store)
        #: the SQLite file (None on PostgreSQL)
        self.path = self._backend.path
        self.taxonomy = taxonomy
        self.text_field = text_field
        self.policy = (policy or ReviewPolicy()).check(taxonomy.labels)
        self._codec = _codec_for(taxonomy)
        #: why writes fail now (None: they do not); ``write_problem_since`` is when that began (UTC)
        self.write_problem: str | None = None
        self.write_problem_since: str | None = None
        try:
            self._backend.open(self._migrate)
        except Exception as e:
            if not self._backend.unavailable(e):
                self._backend.close()
                raise
            try:
                self._backend.degrade(str(self._unwritable_now(e)))
            except BaseException:
                self._backend.close()
                raise

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The SQLite connection every statement of this journal goes through (None on PostgreSQL), for
        per-connection settings such as ``max_page_count``."""
        return self._backend.raw_connection

    def _unwritable_now(self, error: BaseException) -> JournalUnavailable:
        """Record that writes fail (logged once per outage, not per write) and the error to raise."""
        problem = f"the journal {self._backend.where} cannot be written: {_describe(error)}"
        if self.write_problem is None:
            log.error("%s; webhooks are refused with 503 until it can", problem)
            self.write_problem_since = _now()
        self.write_problem = problem
        return JournalUnavailable(problem)

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self, conn: Connection) -> None:
        """Create what is missing and record the version; runs inside a write transaction on both engines
        (PostgreSQL's DDL is transactional, and the advisory lock keeps two replicas from racing here)."""
        version = self._backend.schema_version(conn)
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self._backend.where} has journal schema {version}; this labelloop understands {SCHEMA_VERSION}"
            )
        METADATA.create_all(conn)
        for table in METADATA.sorted_tables:  # create_all makes the indexes of new tables only
            for index in table.indexes:
                index.create(conn, checkfirst=True)
        present = {column["name"] for column in sa.inspect(conn).get_columns("annotations")}
        for name in _ADDED_COLUMNS:
            if name not in present:
                column = ANNOTATIONS.c[name]
                default = "" if column.server_default is None else " NOT NULL DEFAULT 0"
                conn.exec_driver_sql(f"ALTER TABLE annotations ADD COLUMN {name} "
                                     f"{column.type.compile(dialect=conn.dialect)}{default}")
        if 0 < version < 2:
            self._backfill_suggestions(conn)
        self._backend.set_schema_version(conn, SCHEMA_VERSION)

    def _backfill_suggestions(self, conn: Connection) -> None:
        """Schema 1 -> 2: read lead time and pre-label of each live annotation from the event that last
        wrote it (payloads are kept verbatim, so nothing has to be fetched from Label Studio again)."""
        rows = conn.execute(sa.text(
            "SELECT a.annotation_id, e.payload FROM annotations a JOIN events e USING (event_id) "
            "WHERE a.deleted = 0"
        )).mappings().all()
        for row in rows:
            try:
                payload = json.loads(row["payload"])
            except ValueError:
                continue
            found = _annotation_in(payload, row["annotation_id"])
            if found is None:
                continue
            annotation, task = found
            lead_time, prediction_id, label, version = self._suggestion_of(annotation, task)
            conn.execute(sa.text(
                "UPDATE annotations SET lead_time = :lead_time, prediction_id = :prediction_id, "
                "suggested_label = :label, suggested_model_version = :version WHERE annotation_id = :id"),
                {"lead_time": lead_time, "prediction_id": prediction_id, "label": label, "version": version,
                 "id": row["annotation_id"]})

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction, taken before reading so check-then-write is atomic across processes.

        A failure of the file, disk or database server (not of a payload) raises :class:`JournalUnavailable`."""
        try:
            with self._backend.write() as conn:
                yield conn
        except Exception as e:
            if not self._backend.unavailable(e):
                raise
            raise self._unwritable_now(e) from e
        if self.write_problem is not None:
            log.warning("the journal %s can be written again (it could not since %s)", self._backend.where,
                        self.write_problem_since)
            self.write_problem = self.write_problem_since = None

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A consistent snapshot for reads; a database that cannot be reached raises :class:`JournalUnavailable`
        (without marking writes as failing: only a write says whether writes work)."""
        try:
            with self._backend.read() as conn:
                yield conn
        except Exception as e:
            if not self._backend.unavailable(e):
                raise
            raise JournalUnavailable(f"the journal {self._backend.where} cannot be read: {_describe(e)}") from e

    # --- writing -------------------------------------------------------------------------------

    def record(self, payload: Any, source: Source = "webhook") -> RecordResult:
        """Journal one raw Label Studio webhook payload; durable (fsynced) when this returns.

        Never raises for a bad payload: it is stored and quarantined with the reason. Raises
        :class:`JournalUnavailable` when the file or disk refuses the write (read-only, full, I/O), in
        which case nothing was recorded and the event must not be acknowledged.
        """
        _check_source(source)
        action = payload.get("action") if isinstance(payload, dict) else None
        project_id = _project_id_of(payload) if isinstance(payload, dict) else None
        annotation = payload.get("annotation") if isinstance(payload, dict) else None
        annotation_id = _optional_int(annotation.get("id")) if isinstance(annotation, dict) else None
        try:
            with self._write() as conn:
                event_id = _insert_event(conn, source, action, project_id, annotation_id, payload)
                status, reason = self._dispatch(conn, event_id, source, payload)
                _set_status(conn, event_id, status, reason)
        except _UNFORESEEN as e:
            return self._quarantine_unusable(source, action, payload, e)
        return RecordResult(status, reason, event_id)

    def apply_annotation(self, annotation: dict, task: dict, source: Source = "reconcile") -> RecordResult:
        """Apply one annotation as the Label Studio API returns it, with its task.

        A version already applied commits nothing and returns ``event_id=None``, so repeated
        reconcile passes do not grow the event log; a state change or a quarantine is logged as an
        event with action ``RECONCILE_APPLY``.
        """
        _check_source(source)
        payload = {"action": "RECONCILE_APPLY", "annotation": annotation, "task": task}
        try:
            return self._apply(annotation, task, source, payload)
        except _UNFORESEEN as e:
            return self._quarantine_unusable(source, "RECONCILE_APPLY", payload, e)

    def _quarantine_unusable(self, source: Source, action: Any, payload: Any, error: Exception) -> RecordResult:
        """The safety net behind the payload checks: a value they did not foresee (a lone surrogate in
        a text, a date SQLite cannot hold, a NUL byte, which PostgreSQL's text refuses) rolled the transaction
        back; keep the payload, ASCII-escaped, and quarantine it in a fresh one."""
        reason = f"unusable payload: {_describe(error)}"
        log.warning("quarantined a %s event: %s", source, reason)
        with self._write() as conn:
            event_id = _insert_event(conn, source, action, None, None, payload, ascii_only=True)
            return self._finish_quarantine(conn, event_id, None, None, reason)

    def _apply(self, annotation: dict, task: dict, source: Source, payload: dict) -> RecordResult:
        project_id = _project_id_of(payload)
        with self._write() as conn:
            try:
                version = self._parse_version(annotation, task, project_id)
            except _Malformed as e:
                if _quarantined_before(conn, payload):  # the reconciler meets it on every pass
                    return RecordResult("duplicate", f"already quarantined: {e}", None)
                event_id = _insert_event(conn, source, "RECONCILE_APPLY", project_id, None, payload)
                return self._finish_quarantine(conn, event_id, _dict_int(annotation, "id"),
                                               _dict_int(task, "id"), str(e))
            current = _current(conn, version.annotation_id)
            verdict = _verdict(current, version)
            if verdict is not None:
                _enrich(conn, current, version)
                return RecordResult(verdict[0], verdict[1], None)
            event_id = _insert_event(conn, source, "RECONCILE_APPLY", version.project_id,
                                     version.annotation_id, payload)
            status, reason = self._store(conn, event_id, source, version, current)
            _set_status(conn, event_id, status, reason)
        return RecordResult(status, reason, event_id)

    def mark_deleted(self, annotation_id: int, source: Source) -> RecordResult:
        """Record that Label Studio no longer has this annotation (the reconciler confirmed it)."""
        _check_source(source)
        payload = {"action": "RECONCILE_DELETE", "annotation": {"id": annotation_id}}
        with self._write() as conn:
            current = _current(conn, annotation_id)
            if current is not None and current["deleted"]:
                return RecordResult("duplicate", f"annotation {annotation_id} is already deleted", None)
            project_id = current["project_id"] if current is not None else None
            event_id = _insert_event(conn, source, "RECONCILE_DELETE", project_id, annotation_id, payload)
            status, reason = _delete(conn, event_id, source, annotation_id)
            _set_status(conn, event_id, status, reason)
        return RecordResult(status, reason, event_id)

    # --- reading -------------------------------------------------------------------------------

    def last_event_id(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.text("SELECT COALESCE(MAX(event_id), 0) FROM events")).scalar_one())

    def new_label_count(self, since_event_id: int) -> int:
        """Usable labels (annotations, not tasks) set or changed by an event after ``since_event_id``.

        Counted on current state, so a label created and then deleted or skipped since does not
        count, and re-sending the same version never counts twice. The retrain trigger compares this
        with ``Settings.retrain_every`` using the ``last_event_id()`` taken when it last trained.
        """
        with self._read() as conn:
            return int(conn.execute(sa.text(
                "SELECT COUNT(*) FROM annotations WHERE deleted = 0 AND label IS NOT NULL "
                "AND label_event_id > :since"), {"since": since_event_id}).scalar_one())

    def live_annotation_ids(self, project_id: int) -> set[int]:
        """Ids of the project's annotations the journal holds as not deleted (for the reconciler)."""
        with self._read() as conn:
            ids = conn.execute(sa.text(
                "SELECT annotation_id FROM annotations WHERE deleted = 0 AND project_id = :project"),
                {"project": project_id}).scalars().all()
        return set(ids)

    def annotations(self, project_id: int | None = None) -> pd.DataFrame:
        """Every annotation not deleted, skipped and unusable ones included (``label`` is None there).

        One row per annotation, for agreement statistics: ``cancelled``, ``ground_truth`` and
        ``problem`` say why a row carries no label. ``lead_time`` is Label Studio's seconds spent;
        ``prediction_id`` the pre-label the annotator started from (None: no suggestion was taken up),
        with its ``suggested_label`` and ``suggested_model_version`` once a payload has shown them.
        ``severity`` (None when not given or off the scale), ``escalated`` and ``revealed`` are the review
        marks (:mod:`labelloop.policy`; ``revealed`` stays true once any version revealed the original,
        because the reviewer saw it); ``severity_weight`` is the severity's training weight under this
        journal's policy (1 without a severity).
        """
        sql = (
            "SELECT annotation_id, task_id, project_id, item_id AS id, text, label, annotator, created_at, "
            "updated_at, cancelled, ground_truth, problem, source, lead_time, prediction_id, suggested_label, "
            "suggested_model_version, severity, escalated, revealed, NULL FROM annotations WHERE deleted = 0"
        )
        params: dict[str, Any] = {}
        if project_id is not None:
            sql += " AND project_id = :project"
            params = {"project": project_id}
        with self._read() as conn:
            rows = conn.execute(sa.text(sql + " ORDER BY annotation_id"), params).all()
        frame = pd.DataFrame([tuple(r) for r in rows], columns=ANNOTATION_COLUMNS)
        frame["label"] = frame["label"].map(self._codec.cell, na_action="ignore")
        frame["suggested_label"] = frame["suggested_label"].map(self._codec.cell, na_action="ignore")
        frame["severity_weight"] = [self.policy.severity.weight(s) for s in frame["severity"]]
        return frame.astype({"annotation_id": "int64", "task_id": "int64", "project_id": "Int64",
                             "annotator": "Int64", "cancelled": bool, "ground_truth": bool,
                             "lead_time": "float64", "prediction_id": "Int64", "escalated": bool,
                             "revealed": bool, "severity_weight": "float64"})

    def escalations(self, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Escalations recorded after ``after_id``, oldest first (the outbox copies them from here)."""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT escalation_id, uid, annotation_id, event_id, project_id, task_id, item_id, text, label, "
                "severity, reason, annotator, escalated_at, recorded_at FROM escalations "
                "WHERE escalation_id > :after ORDER BY escalation_id LIMIT :limit"),
                {"after": after_id, "limit": limit}).mappings().all()
        return [{**row, "label": None if row["label"] is None else self._codec.cell(row["label"])}
                for row in rows]

    def review_marks_since(self, after_event_id: int) -> list[dict[str, Any]]:
        """Annotations last changed by an event after ``after_event_id``, skipped and deleted ones included (a
        reviewer who skipped an item, or whose annotation was deleted, still saw it), oldest change first,
        with what exposure accounting reads:
        ``annotation_id, task_id, annotator, created_at, updated_at, label, severity, revealed, event_id``."""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT annotation_id, task_id, annotator, created_at, updated_at, label, severity, revealed, "
                "suggested_label, event_id FROM annotations WHERE task_id IS NOT NULL AND event_id > :after "
                "ORDER BY event_id, annotation_id"), {"after": after_event_id}).mappings().all()
        return [{**row, "revealed": bool(row["revealed"]),
                 "label": None if row["label"] is None else self._codec.cell(row["label"]),
                 "suggested_label": None if row["suggested_label"] is None
                 else self._codec.cell(row["suggested_label"])} for row in rows]

    def labels(self, project_id: int | None = None) -> pd.DataFrame:
        """The training labels: one row per Label Studio task that holds at least one usable label.

        Columns: ``id`` (``task.data.item_id``, else ``ls-<task id>``), ``text``, ``label``,
        ``task_id``, ``project_id``, ``annotation_id``, ``annotator``, ``updated_at``,
        ``n_annotations``, and the chosen annotation's ``severity`` and ``severity_weight`` (a training
        weight the trainer may use). Per task:

        * annotations marked ground truth by a reviewer, when there are any, are the only ones
          considered (that is what the flag means in Label Studio);
        * otherwise the majority label of the task's usable annotations wins, because one annotator's
          slip should not override two who agree; a tie goes to the label whose latest annotation is
          the most recent, as the freshest judgement (often a reviewer's correction);
        * ``annotation_id``/``annotator``/``updated_at``/``text`` come from the latest annotation
          carrying the winning label; ``n_annotations`` counts all usable ones on the task.

        The same item imported into two tasks yields two rows with the same ``id``. For a multi-label
        taxonomy ``label`` is a tuple of names in taxonomy order (``()``: none of these), each label voted
        on by itself: in the set when strictly more than half of the considered annotations select it.
        """
        usable = self.annotations(project_id)
        usable = usable[usable["label"].notna()]
        if usable.empty:
            return pd.DataFrame(columns=LABEL_COLUMNS)
        chosen = vote(usable, "task_id", self.taxonomy)
        counts = usable.groupby("task_id").size().rename("n_annotations")
        return chosen.join(counts, on="task_id")[LABEL_COLUMNS].reset_index(drop=True)

    def stats(self) -> dict[str, int]:
        """Events per status, plus the quarantine size and the number of usable labels now."""
        with self._read() as conn:
            counts = {status: n for status, n in conn.execute(
                sa.text("SELECT status, COUNT(*) FROM events GROUP BY status"))}
            quarantine = conn.execute(sa.text("SELECT COUNT(*) FROM quarantine")).scalar_one()
            live = conn.execute(sa.text(
                "SELECT COUNT(*) FROM annotations WHERE deleted = 0 AND label IS NOT NULL")).scalar_one()
        result = {status: int(counts.get(status, 0)) for status in STATUSES}
        result.update(events=sum(result.values()), quarantine=int(quarantine), live_labels=int(live))
        return result

    def quarantined(self, limit: int = 100) -> list[dict]:
        """The most recent quarantine entries, newest first, each with the payload that caused it."""
        with self._read() as conn:
            rows = conn.execute(sa.text(
                "SELECT q.quarantine_id, q.event_id, e.received_at, e.source, e.action, q.annotation_id, "
                "q.task_id, q.reason, e.payload FROM quarantine q JOIN events e USING (event_id) "
                "ORDER BY q.quarantine_id DESC LIMIT :limit"), {"limit": limit}).mappings().all()
        return [{**row, "payload": json.loads(row["payload"])} for row in rows]

    # --- internals -----------------------------------------------------------------------------

    def _dispatch(self, conn: Connection, event_id: int, source: Source, payload: Any
                  ) -> tuple[Status, str | None]:
        if not isinstance(payload, dict):
            return self._quarantine(conn, event_id, None, None,
                                    f"payload is a {type(payload).__name__}, not a JSON object")
        action = payload.get("action")
        if not isinstance(action, str) or not action:
            return self._quarantine(conn, event_id, None, None, "payload has no 'action'")
        if action in ANNOTATION_ACTIONS:
            return self._apply_payload(conn, event_id, source, payload)
        if action == "ANNOTATIONS_DELETED":
            return self._delete_payload(conn, event_id, source, payload)
        if action == "TASKS_DELETED":
            return _delete_where(conn, event_id, source, "task_id", _ids_of(payload.get("tasks")), "tasks")
        if action == "PROJECT_DELETED":
            project = payload.get("project")
            ids = _ids_of([project]) if isinstance(project, dict) else []
            return _delete_where(conn, event_id, source, "project_id", ids, "project")
        if action == "START_TRAINING":
            return "ignored", "START_TRAINING: training is decided by the caller from new_label_count()"
        if action in NON_LABEL_ACTIONS:
            return "ignored", f"{action} does not change labels"
        return "ignored", f"unknown action {action!r}"

    def _apply_payload(self, conn: Connection, event_id: int, source: Source, payload: dict
                       ) -> tuple[Status, str | None]:
        annotations = payload.get("annotation")
        tasks = payload.get("task")
        if annotations is None:
            return self._quarantine(conn, event_id, None, None, f"{payload['action']} without 'annotation'")
        if isinstance(annotations, dict):
            annotations, tasks = [annotations], [tasks]
        if not isinstance(annotations, list) or not isinstance(tasks, list):
            return self._quarantine(conn, event_id, None, None,
                                    "'annotation' and 'task' must both be objects or both be lists")
        if not annotations:
            return "ignored", f"{payload['action']} with an empty 'annotation' list"
        by_task = {_dict_int(t, "id"): t for t in tasks if isinstance(t, dict)}
        only_task = tasks[0] if len(tasks) == 1 else None
        project_id = _project_id_of(payload)
        outcomes: list[tuple[Status, str | None]] = []
        for annotation in annotations:
            task = by_task.get(_dict_int(annotation, "task"), only_task)
            outcomes.append(self._apply_one(conn, event_id, source, annotation, task, project_id))
        if len(outcomes) == 1:
            return outcomes[0]
        return _combine(outcomes, annotations)

    def _apply_one(self, conn: Connection, event_id: int, source: Source, annotation: Any,
                   task: Any, project_id: int | None) -> tuple[Status, str | None]:
        try:
            version = self._parse_version(annotation, task, project_id)
        except _Malformed as e:
            return self._quarantine(conn, event_id, _dict_int(annotation, "id"), _dict_int(task, "id"),
                                    str(e))
        current = _current(conn, version.annotation_id)
        verdict = _verdict(current, version)
        if verdict is not None:
            _enrich(conn, current, version)
            return verdict
        return self._store(conn, event_id, source, version, current)

    def _store(self, conn: Connection, event_id: int, source: Source, version: _Version,
               current: RowMapping | None) -> tuple[Status, str | None]:
        """Replace the row with a newer version; keep ``label_event_id`` when the label is unchanged."""
        unchanged = (
            current is not None and current["label"] is not None
            and (current["label"], current["text"]) == (version.label, version.text)
        )
        label_event_id = (current["label_event_id"] if unchanged else event_id) if version.is_label else None
        # a reveal is something that happened: a later version that clears the toggle does not undo it
        revealed = version.marks.revealed or (current is not None and not current["deleted"]
                                              and bool(current["revealed"]))
        if (current is not None and not current["deleted"] and version.suggested_label is None
                and version.prediction_id is not None and version.prediction_id == current["prediction_id"]):
            # a webhook names the prediction by id only; the same id is the same prediction, already read
            version = replace(version, suggested_label=current["suggested_label"],
                              suggested_model_version=current["suggested_model_version"])
        row = {
            "annotation_id": version.annotation_id, "project_id": version.project_id, "task_id": version.task_id,
            "item_id": version.item_id, "text": version.text, "label": version.label, "annotator": version.annotator,
            "created_at": version.created_at, "updated_at": version.updated_at, "cancelled": int(version.cancelled),
            "ground_truth": int(version.ground_truth), "deleted": 0, "problem": version.problem, "source": source,
            "event_id": event_id, "label_event_id": label_event_id, "lead_time": version.lead_time,
            "prediction_id": version.prediction_id, "suggested_label": version.suggested_label,
            "suggested_model_version": version.suggested_model_version, "severity": version.marks.severity,
            "escalated": int(version.marks.escalated), "revealed": int(revealed),
        }
        # every column is written, so the row is the version whether it was there before or not (the current
        # row was read in this transaction, under the write lock)
        if current is None:
            conn.execute(_INSERT_ANNOTATION, row)
        else:
            conn.execute(_UPDATE_ANNOTATION, {**row, "key": version.annotation_id})
        parts = self._store_marks(conn, event_id, version)
        if version.problem is not None:
            return self._quarantine(conn, event_id, version.annotation_id, version.task_id, version.problem)
        if version.cancelled:
            return "accepted", f"annotation {version.annotation_id} was skipped: recorded, not a label"
        return "accepted", "; ".join(parts) or None

    def _store_marks(self, conn: Connection, event_id: int, version: _Version) -> list[str]:
        """Record the escalation (once per annotation: a later version never escalates again, so a receiver
        is not told twice about one judgement) and quarantine each unusable review mark on its own, keeping
        the label. Returns what was quarantined."""
        marks = version.marks
        if marks.escalated and conn.execute(sa.text("SELECT 1 FROM escalations WHERE annotation_id = :id"),
                                            {"id": version.annotation_id}).first() is None:
            conn.execute(ESCALATIONS.insert().values(
                uid=uuid.uuid4().hex, annotation_id=version.annotation_id, event_id=event_id,
                project_id=version.project_id, task_id=version.task_id, item_id=version.item_id, text=version.text,
                label=version.label, severity=marks.severity, reason=marks.reason, annotator=version.annotator,
                escalated_at=version.updated_at, recorded_at=_now()))
        for problem in marks.problems:
            self._quarantine(conn, event_id, version.annotation_id, version.task_id, problem)
        return [f"quarantined {problem}" for problem in marks.problems]

    def _delete_payload(self, conn: Connection, event_id: int, source: Source, payload: dict
                        ) -> tuple[Status, str | None]:
        ids = _ids_of(payload.get("annotations"))
        if not ids:
            return self._quarantine(
                conn, event_id, None, None,
                "ANNOTATIONS_DELETED without annotation ids (Label Studio sends none when it turns an "
                "annotation back into a draft); the reconciler will find the deletion",
            )
        outcomes = [_delete(conn, event_id, source, annotation_id) for annotation_id in ids]
        if len(outcomes) == 1:
            return outcomes[0]
        return _combine(outcomes, [{"id": i} for i in ids])

    def _quarantine(self, conn: Connection, event_id: int, annotation_id: int | None,
                    task_id: int | None, reason: str) -> tuple[Status, str]:
        conn.execute(_INSERT_QUARANTINE, {"event_id": event_id, "annotation_id": annotation_id, "task_id": task_id,
                                          "reason": reason})
        return "quarantined", reason

    def _finish_quarantine(self, conn: Connection, event_id: int, annotation_id: int | None,
                           task_id: int | None, reason: str) -> RecordResult:
        status, reason = self._quarantine(conn, event_id, annotation_id, task_id, reason)
        _set_status(conn, event_id, status, reason)
        return RecordResult(status, reason, event_id)

    def _parse_version(self, annotation: Any, task: Any, project_id: int | None) -> _Version:
        """Read one annotation + task; raise :class:`_Malformed` when it cannot even be identified."""
        if not isinstance(annotation, dict):
            raise _Malformed("annotation is not a JSON object")
        annotation_id = _required_int(annotation, "id", "annotation")
        if not isinstance(task, dict):
            raise _Malformed(f"annotation {annotation_id}: task is missing or not a JSON object")
        task_id = _required_int(task, "id", "task")
        if "task" in annotation and _optional_int(annotation["task"]) != task_id:
            raise _Malformed(
                f"annotation {annotation_id} belongs to task {annotation['task']!r}, not {task_id}"
            )
        updated_at = _timestamp(annotation.get("updated_at"))
        if updated_at is None:
            raise _Malformed(f"annotation {annotation_id} has no valid 'updated_at'")
        if project_id is None:
            project_id = _optional_int(annotation.get("project")) or _optional_int(task.get("project"))
        data = task.get("data")
        data = data if isinstance(data, dict) else {}
        item_id = data.get("item_id")
        item_id = str(item_id) if isinstance(item_id, (str, int)) and str(item_id) else f"ls-{task_id}"
        text = data.get(self.text_field)
        text = text if isinstance(text, str) and text.strip() else None
        cancelled = annotation.get("was_cancelled") is True
        label, problem = None, None
        if not cancelled:
            label, problem = self._label_of(annotation.get("result"))
            if text is None:
                label, problem = None, f"task {task_id} has no text in data[{self.text_field!r}]"
        lead_time, prediction_id, suggested_label, suggested_model_version = self._suggestion_of(annotation, task)
        return _Version(
            annotation_id=annotation_id, task_id=task_id, project_id=project_id, item_id=item_id, text=text,
            label=label, annotator=_annotator(annotation.get("completed_by")),
            created_at=_timestamp(annotation.get("created_at")), updated_at=updated_at,
            cancelled=cancelled, ground_truth=annotation.get("ground_truth") is True,
            problem=problem, lead_time=lead_time, prediction_id=prediction_id,
            suggested_label=suggested_label, suggested_model_version=suggested_model_version,
            marks=read_marks(annotation.get("result"), self.policy, labelled=label is not None),
        )

    def _suggestion_of(self, annotation: dict, task: Any
                       ) -> tuple[float | None, int | None, str | None, str | None]:
        """``(lead_time, prediction_id, suggested_label, suggested_model_version)`` of one annotation.

        Label Studio records the prediction an annotation started from as ``parent_prediction`` (an id);
        the prediction itself is in the task's ``predictions`` when the payload lists them (the API's
        ``fields=all``), or in the annotation's ``prediction`` object when the editor filled it in. A
        suggestion label outside the taxonomy is not a suggestion this taxonomy can compare with.
        """
        raw = annotation.get("lead_time")
        try:  # an int beyond a float's range raises OverflowError, which would quarantine a good label
            lead_time = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
        except OverflowError:
            lead_time = None
        if lead_time is not None and not (math.isfinite(lead_time) and lead_time >= 0):
            lead_time = None
        prediction_id = _optional_int(annotation.get("parent_prediction"))
        prediction = annotation.get("prediction")
        if not (isinstance(prediction, dict) and prediction.get("result")):
            predictions = task.get("predictions") if isinstance(task, dict) else None
            predictions = predictions if isinstance(predictions, list) and prediction_id is not None else []
            prediction = next((p for p in predictions if _dict_int(p, "id") == prediction_id), None)
        if prediction is None or not prediction.get("result"):  # a bare review priority suggests nothing
            return lead_time, prediction_id, None, None
        label, problem = self._label_of(prediction.get("result"))
        version = prediction.get("model_version")
        return (lead_time, prediction_id, label if problem is None else None,
                version if isinstance(version, str) and version else None)

    def _label_of(self, result: Any) -> tuple[str | None, str | None]:
        """The label as stored (a taxonomy label, or a canonical label set), or the reason there is none.
        Review controls (severity, escalate, reason, reveal) are left out first: their values are never
        labels, and a severity level that happened to equal a label name must not be read as one."""
        if isinstance(result, list):
            result = [item for item in result if not is_review_item(item)]
        return self._codec.parse(result)


class _LabelCodec(ABC):
    """How one kind of taxonomy reads a Label Studio ``result`` into the ``label`` column and back."""

    def __init__(self, taxonomy: Taxonomy):
        self.taxonomy = taxonomy

    @abstractmethod
    def parse(self, result: Any) -> tuple[str | None, str | None]:
        """``(stored label, None)``, or ``(None, why it is unusable)``."""

    def cell(self, stored: str) -> Any:
        """The stored label as a frame cell."""
        return stored

    def text(self, cell: Any) -> str:
        """A frame cell as the label is stored (the inverse of :meth:`cell`)."""
        return cell


class _SingleLabel(_LabelCodec):
    def parse(self, result: Any) -> tuple[str | None, str | None]:
        """The single taxonomy label in a result, or the reason there is none.

        Choices controls whose values are all outside the taxonomy are ignored (a config may hold
        other questions); several different taxonomy labels are ambiguous and not guessed at.
        """
        if not isinstance(result, list):
            return None, "annotation 'result' is not a list"
        found: list[str] = []
        outside: list[str] = []
        for item in result:
            value = item.get("value") if isinstance(item, dict) else None
            choices = value.get("choices") if isinstance(value, dict) else None
            if not isinstance(choices, list):
                continue
            for choice in choices:
                (found if choice in self.taxonomy.labels else outside).append(choice)
        if not found and not outside:
            return None, "annotation result has no choices value"
        if not found:
            return None, (f"label(s) {sorted(map(str, outside))} not in taxonomy {self.taxonomy.name!r} "
                          f"(expected one of {list(self.taxonomy.labels)})")
        if len(set(found)) > 1:
            return None, f"several taxonomy labels in one annotation: {sorted(set(found))}"
        return found[0], None

    def cell(self, stored: str) -> str:
        """A label set (a JSON list) means the journal was written for a multi-label taxonomy: read as a name,
        ``'["a", "b"]'`` would be exported and trained on as if it were one label."""
        if stored.startswith("[") and stored not in self.taxonomy.labels:
            try:
                is_set = isinstance(json.loads(stored), list)
            except ValueError:
                is_set = False
            if is_set:
                raise JournalError(
                    f"journal label {stored!r} is a label set, but taxonomy {self.taxonomy.name!r} is single-label: "
                    "this journal was written for a multi-label taxonomy (see `labelloop taxonomy migrate`)")
        return stored


class _LabelSet(_LabelCodec):
    """A multi-label taxonomy: the label is a set, stored as a JSON list in taxonomy order (``[]``: none of
    these), so equal sets are equal strings and an unchanged answer keeps its ``label_event_id``."""

    def parse(self, result: Any) -> tuple[str | None, str | None]:
        """The label set of a result, or the reason there is none.

        A choices control whose values are all outside the taxonomy is ignored (a config may hold other
        questions) when another names taxonomy labels; one that mixes taxonomy labels with unknown ones is
        refused rather than trained on in part (a renamed label, say). The none label with any other label
        contradicts itself. Without a none label in the taxonomy, an answer that selects nothing is the
        empty set; with one, reviewers say "none of these" by choosing it, so selecting nothing is refused.
        """
        if not isinstance(result, list):
            return None, "annotation 'result' is not a list"
        allowed = (*self.taxonomy.labels, *((self.taxonomy.none_label,) if self.taxonomy.none_label else ()))
        chosen: set[str] = set()
        outside: list[Any] = []
        controls = 0
        for item in result:
            value = item.get("value") if isinstance(item, dict) else None
            choices = value.get("choices") if isinstance(value, dict) else None
            if not isinstance(choices, list):
                continue
            controls += 1
            known = [c for c in choices if isinstance(c, str) and c in allowed]
            unknown = [c for c in choices if not (isinstance(c, str) and c in allowed)]
            if known and unknown:
                return None, (f"label(s) {sorted(map(str, unknown))} not in taxonomy {self.taxonomy.name!r} "
                              f"next to {sorted(known)} (expected labels from {list(allowed)})")
            chosen.update(known)
            outside.extend(unknown)
        if not chosen and outside:
            return None, (f"label(s) {sorted(map(str, outside))} not in taxonomy {self.taxonomy.name!r} "
                          f"(expected labels from {list(allowed)})")
        none = self.taxonomy.none_label
        if none is not None and none in chosen and len(chosen) > 1:
            return None, f"{none!r} (none of these) chosen together with {sorted(chosen - {none})}"
        if not chosen and (none is not None or (controls == 0 and result)):
            return None, ("annotation result has no choices value"
                          + (f" (choose {none!r} for none of these)" if none is not None else ""))
        return json.dumps([label for label in self.taxonomy.labels if label in chosen]), None

    def text(self, cell: Any) -> str:
        return json.dumps([label for label in self.taxonomy.labels if label in set(cell)])

    def cell(self, stored: str) -> tuple[str, ...]:
        try:
            names = json.loads(stored)
        except ValueError:
            names = None
        if not isinstance(names, list):
            raise JournalError(
                f"journal label {stored!r} is not a label set, but taxonomy {self.taxonomy.name!r} is multi-label: "
                "this journal was written for a single-label taxonomy (see `labelloop taxonomy migrate`)")
        return tuple(names)


# --- pure helpers ------------------------------------------------------------------------------


def label_text(taxonomy: Taxonomy, label: str | tuple[str, ...]) -> str:
    """A frame's label cell as the journal stores it: the name, or a label set's JSON list in taxonomy order.
    For other stores that keep labels as text (a honeypot's gold label), so they compare with the journal's."""
    return _codec_for(taxonomy).text(label)


def label_cell(taxonomy: Taxonomy, stored: str) -> str | tuple[str, ...]:
    """A label kept as text elsewhere (a honeypot's gold, a disputed label) as a frame cell, the inverse of
    :func:`label_text`: a label set's JSON list becomes the tuple the journal's frames carry."""
    return _codec_for(taxonomy).cell(stored)


def _codec_for(taxonomy: Taxonomy) -> _LabelCodec:
    return _LabelSet(taxonomy) if taxonomy.multi else _SingleLabel(taxonomy)


def vote(usable: pd.DataFrame, key: str, taxonomy: Taxonomy | None = None) -> pd.DataFrame:
    """One row per ``key`` (a task, or an item across its tasks): the winning label, as its latest annotation.

    Ground-truth annotations, where a group has any, are the only ones considered; otherwise the majority
    wins, and a tie goes to the label whose latest annotation is the most recent (the freshest judgement,
    often a reviewer's correction). ``usable`` holds only annotations with a label. For a multi-label
    ``taxonomy`` each label is voted on by itself (see :func:`_vote_sets`)."""
    has_truth = usable.groupby(key)["ground_truth"].transform("any")
    considered = usable[usable["ground_truth"] | ~has_truth]
    if taxonomy is not None and taxonomy.multi:
        return _vote_sets(considered, key, taxonomy)
    votes = (
        considered.groupby([key, "label"], as_index=False)
        .agg(n=("annotation_id", "size"), latest=("updated_at", "max"))
        .sort_values([key, "n", "latest"], ascending=[True, False, False])
        .drop_duplicates(key)
    )
    return (
        considered.merge(votes[[key, "label"]], on=[key, "label"])
        .sort_values([key, "updated_at", "annotation_id"])
        .drop_duplicates(key, keep="last")
    )


def _vote_sets(considered: pd.DataFrame, key: str, taxonomy: Taxonomy) -> pd.DataFrame:
    """Majority per label: a label is in the group's set when strictly more than half of the considered
    annotations select it, so two annotators who disagree on a label leave it out rather than let the
    later one win; the row (text, annotator, time) is the group's latest annotation."""
    selected = pd.DataFrame(taxonomy.encode(considered["label"]), index=considered.index)
    share = selected.groupby(considered[key].to_numpy()).mean()
    voted = {k: taxonomy.decode(row > 0.5) for k, row in zip(share.index, share.to_numpy(), strict=True)}
    latest = (considered.sort_values([key, "updated_at", "annotation_id"])
              .drop_duplicates(key, keep="last").copy())
    latest["label"] = [voted[k] for k in latest[key]]
    return latest




def _describe(error: BaseException) -> str:
    """An error for a reason or a message: the driver's own error rather than SQLAlchemy's wrapper, whose text
    repeats the statement and its parameters (the payload, with whatever made it unstorable), and escaped, so
    that the text itself is storable (PostgreSQL's text refuses NUL)."""
    cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig is not None else error
    return f"{type(cause).__name__}: {cause}".encode("ascii", "backslashreplace").decode().replace("\x00", "\\x00")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}")


def _insert_event(conn: Connection, source: str, action: Any, project_id: int | None,
                  annotation_id: int | None, payload: Any, ascii_only: bool = False) -> int:
    """Store the payload first (provisionally 'ignored'); the caller sets the final status. The action is
    kept as a column only when it is plain printable ASCII (it is in the payload either way)."""
    plain = isinstance(action, str) and action.isascii() and action.isprintable()
    result = conn.execute(_INSERT_EVENT, {
        "received_at": _now(), "source": source, "action": action if plain else None, "project_id": project_id,
        "annotation_id": annotation_id, "status": "ignored",
        "payload": json.dumps(payload, default=repr, ensure_ascii=ascii_only)})
    return int(result.inserted_primary_key[0])


def _quarantined_before(conn: Connection, payload: Any) -> bool:
    """Whether this exact payload already sits in quarantine (the quarantine table stays small)."""
    stored = json.dumps(payload, default=repr, ensure_ascii=False)
    return conn.execute(sa.text("SELECT 1 FROM quarantine q JOIN events e USING (event_id) "
                                "WHERE e.payload = :payload LIMIT 1"), {"payload": stored}).first() is not None


def _set_status(conn: Connection, event_id: int, status: Status, reason: str | None) -> None:
    conn.execute(_SET_STATUS, {"status": status, "reason": reason, "id": event_id})


def _current(conn: Connection, annotation_id: int) -> RowMapping | None:
    return conn.execute(_CURRENT, {"id": annotation_id}).mappings().first()


def _verdict(current: RowMapping | None, version: _Version) -> tuple[Status, str] | None:
    """Why this version must not be applied, or None when it is new state."""
    if current is None:
        return None
    if current["deleted"]:
        return "ignored", f"annotation {version.annotation_id} was deleted; deletions are final"
    if version.updated_at == current["updated_at"]:
        return "duplicate", f"annotation {version.annotation_id} version {version.updated_at} already applied"
    if version.updated_at < current["updated_at"]:
        return "duplicate", (f"annotation {version.annotation_id} version {version.updated_at} is older "
                             f"than the stored {current['updated_at']}")
    return None


def _enrich(conn: Connection, current: RowMapping | None, version: _Version) -> None:
    """The same version met again with details the first payload lacked (a webhook names the pre-label's
    id only; the reconciler's listing holds the prediction): fill in those columns, nothing else. The
    label and ``label_event_id`` stay, so this never counts as a new label or a new version."""
    if current is None or current["deleted"] or version.updated_at != current["updated_at"]:
        return
    updates = {name: getattr(version, name) for name in ("lead_time", "prediction_id", "suggested_label",
                                                         "suggested_model_version")
               if current[name] is None and getattr(version, name) is not None}
    if updates:
        conn.execute(ANNOTATIONS.update().where(ANNOTATIONS.c.annotation_id == version.annotation_id)
                     .values(updates))


def _annotation_in(payload: Any, annotation_id: int) -> tuple[dict, Any] | None:
    """The annotation with this id and its task, from a stored webhook or reconcile payload."""
    if not isinstance(payload, dict):
        return None
    annotations, tasks = payload.get("annotation"), payload.get("task")
    if isinstance(annotations, dict):
        annotations, tasks = [annotations], [tasks]
    if not isinstance(annotations, list):
        return None
    tasks = tasks if isinstance(tasks, list) else []
    by_task = {_dict_int(t, "id"): t for t in tasks if isinstance(t, dict)}
    for annotation in annotations:
        if _dict_int(annotation, "id") == annotation_id:
            return annotation, by_task.get(_dict_int(annotation, "task"), tasks[0] if len(tasks) == 1 else None)
    return None


def _delete(conn: Connection, event_id: int, source: str, annotation_id: int) -> tuple[Status, str | None]:
    current = _current(conn, annotation_id)
    if current is None:
        conn.execute(ANNOTATIONS.insert().values(annotation_id=annotation_id, deleted=1, source=source,
                                                 event_id=event_id))
        return "accepted", f"annotation {annotation_id} was never seen: tombstone recorded"
    if current["deleted"]:
        return "duplicate", f"annotation {annotation_id} is already deleted"
    conn.execute(sa.text("UPDATE annotations SET deleted = 1, source = :source, event_id = :event, "
                         "label_event_id = NULL WHERE annotation_id = :id"),
                 {"source": source, "event": event_id, "id": annotation_id})
    return "accepted", None


def _delete_where(conn: Connection, event_id: int, source: str, column: str, ids: list[int],
                  what: str) -> tuple[Status, str | None]:
    """Label Studio deletes a task's or project's annotations with it, without an annotation event."""
    if not ids:
        return "ignored", f"no {what} ids in the payload"
    changed = conn.execute(
        ANNOTATIONS.update()
        .where(ANNOTATIONS.c.deleted == 0, ANNOTATIONS.c[column].in_(ids))
        .values(deleted=1, source=source, event_id=event_id, label_event_id=None)
    ).rowcount
    if changed == 0:
        return "ignored", f"no journaled annotations in {what} {ids}"
    return "accepted", f"{changed} annotation(s) deleted with {what} {ids}"


def _combine(outcomes: list[tuple[Status, str | None]], items: list[Any]) -> tuple[Status, str | None]:
    """One status for a multi-annotation event: the most consequential one wins."""
    statuses = {status for status, _ in outcomes}
    status = next(s for s in ("accepted", "quarantined", "duplicate", "ignored") if s in statuses)
    reasons = [
        f"#{_dict_int(item, 'id')}: {status_}{'' if reason is None else ' (' + reason + ')'}"
        for item, (status_, reason) in zip(items, outcomes, strict=True)
    ]
    return status, "; ".join(reasons)


def _ids_of(items: Any) -> list[int]:
    if not isinstance(items, list):
        return []
    ids = [_dict_int(item, "id") for item in items]
    return [i for i in ids if i is not None]


def _project_id_of(payload: dict) -> int | None:
    project = payload.get("project")
    if isinstance(project, dict):
        return _optional_int(project.get("id"))
    return _optional_int(project)


_SQLITE_INT_MAX = 2**63 - 1
#: what a payload the checks did not foresee can raise inside a write (never an I/O failure); DataError is the
#: database refusing a value (PostgreSQL: a NUL byte in a text)
_UNFORESEEN = (ValueError, OverflowError, UnicodeError, sa.exc.DataError)


def _optional_int(value: Any) -> int | None:
    """An id as Label Studio sends it (int, or a digit string); bools are not ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and -_SQLITE_INT_MAX - 1 <= value <= _SQLITE_INT_MAX:  # SQLite and BIGINT hold 64 bits
        return value
    return None


def _dict_int(obj: Any, key: str) -> int | None:
    return _optional_int(obj.get(key)) if isinstance(obj, dict) else None


def _required_int(obj: dict, key: str, what: str) -> int:
    value = _optional_int(obj.get(key))
    if value is None:
        raise _Malformed(f"{what} has no valid {key!r} (got {obj.get(key)!r})")
    return value


def _annotator(completed_by: Any) -> int | None:
    """``completed_by`` is a user id, or a user object when the API expands it."""
    if isinstance(completed_by, dict):
        return _optional_int(completed_by.get("id"))
    return _optional_int(completed_by)


def _timestamp(value: Any) -> str | None:
    """Normalise to fixed-width UTC ISO-8601 so that string order is time order in SQL and Python."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:  # e.g. 9999-12-31T23:59-05:00 lies past datetime.max in UTC
        return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
