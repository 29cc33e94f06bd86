"""Where labelloop keeps the state that replicas must share: SQLite files by default, one PostgreSQL database
when ``database_url`` is set.

The stores (journal, jobs, side stores) write through SQLAlchemy Core, so their SQL is written once. What
differs between the engines is serialisation, and that lives here rather than in each store:

* ``write(key)`` is a transaction that no other writer of the same key interleaves with. SQLite gets it from
  ``BEGIN IMMEDIATE`` (the whole file is the key); PostgreSQL from a transaction-scoped advisory lock on the
  key, because its default READ COMMITTED isolation would otherwise let two replicas both pass a
  read-check-write (the exactly-once rules are written as such checks).
* ``exclusive(name)`` is a lock held across transactions, e.g. "one training round at a time". On SQLite it
  is ``fcntl`` on a file next to the database (one machine only, which is all SQLite can serve anyway); on
  PostgreSQL a session advisory lock on a dedicated connection, which the server drops if the holder dies,
  so a crashed replica never wedges the others.

On PostgreSQL every store keeps its tables in a schema of its own (``journal``, ``jobs``, ...), so stores that
grew up as separate SQLite files keep their table names without colliding in one database.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

#: seconds a PostgreSQL connection attempt may take before the store reports the database unavailable
PG_CONNECT_TIMEOUT_S = 5
#: seconds a SQLite writer waits for another process's write lock before failing
SQLITE_BUSY_TIMEOUT_S = 30


class DatabaseURLError(ValueError):
    """A ``database_url`` that names no engine labelloop supports."""


def postgres_url(url: str) -> str:
    """The SQLAlchemy spelling of a PostgreSQL URL: users paste ``postgresql://`` (libpq's form, and what
    pgserver and most hosting consoles print); SQLAlchemy would pick psycopg2 for it, which is not installed."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    raise DatabaseURLError(f"database_url must start with postgresql:// (got {redact(url)!r})")


def redact(url: str) -> str:
    """The URL with any password replaced, for logs, errors and /health."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable database URL>"


def lock_id(key: str) -> int:
    """A stable signed 64-bit id for an advisory lock name (PostgreSQL's ``hashtext`` is not guaranteed stable
    across major versions, and replicas of different versions must agree)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


class Database:
    """One engine and its serialisation primitives. Build with ``Database.sqlite(path)`` or
    ``Database.postgres(url)``; ``Database.open(url, default_path)`` picks by whether a URL is configured."""

    def __init__(self, engine: Engine, lock_dir: Path | None = None):
        self.engine = engine
        self._lock_dir = lock_dir
        self.schema: str | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @classmethod
    def open(cls, url: str | None, default_path: Path, schema: str) -> Database:
        """The shared PostgreSQL (tables in ``schema``) when a URL is configured, else the SQLite file."""
        return cls.postgres(url, schema) if url else cls.sqlite(default_path)

    @classmethod
    def sqlite(cls, path: Path, *, read_only: bool = False) -> Database:
        """WAL so readers in other processes never block the writer; the driver's own transaction handling is
        switched off so that ``write`` can say ``BEGIN IMMEDIATE`` itself (pysqlite would say plain BEGIN,
        which takes the write lock only at the first write and can then fail instead of waiting)."""
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///file:{path}?mode=ro&uri=true" if read_only else f"sqlite:///{path}"
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                                  poolclass=sa.pool.QueuePool if not read_only else sa.pool.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
            if not read_only:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

        return cls(engine, lock_dir=path.parent)

    @classmethod
    def postgres(cls, url: str, schema: str) -> Database:
        """``pool_pre_ping`` so that a replica survives a database restart: a dead pooled connection is
        replaced at checkout instead of failing the next webhook. The pool is small because every store of
        every replica has one, and PostgreSQL's default allows 100 connections in all."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", schema):
            raise ValueError(f"schema name {schema!r} is not a plain lower-case identifier")
        # a database that is partitioned away (packets dropped, not refused) must fail a webhook with 503 in
        # seconds, not hang it: bounded connect, and TCP keepalives that notice a dead peer mid-session
        engine = sa.create_engine(postgres_url(url), pool_pre_ping=True, pool_size=2, max_overflow=6,
                                  connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S, "keepalives": 1,
                                                "keepalives_idle": 10, "keepalives_interval": 5,
                                                "keepalives_count": 3})

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record) -> None:
            import psycopg

            try:
                with dbapi_connection.cursor() as cursor:
                    cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                dbapi_connection.commit()
            except psycopg.errors.UniqueViolation:  # two replicas created it in the same instant: it exists
                dbapi_connection.rollback()
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET search_path TO {schema}")
            dbapi_connection.commit()

        db = cls(engine)
        db.schema = schema
        return db

    @contextmanager
    def write(self, key: str) -> Iterator[Connection]:
        """A transaction serialised against every other ``write`` on ``key``: committed when the block ends,
        rolled back if it raises."""
        conn = self.engine.connect()
        try:
            if self.is_postgres:
                with conn.begin():
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id(f"{self.schema}.{key}")})
                    yield conn
            else:
                conn = conn.execution_options(immediate=True)
                with conn.begin():
                    yield conn
        finally:
            conn.close()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One consistent snapshot for several SELECTs (a single transaction)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def exclusive(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the lock ``name`` for the block; yields False at once (without the lock) when ``wait`` is
        False and someone else holds it."""
        if self.is_postgres:
            with self.engine.connect() as conn:
                ident = {"id": lock_id(f"{self.schema}.{name}")}
                if wait:
                    conn.execute(sa.text("SELECT pg_advisory_lock(:id)"), ident)
                    got = True
                else:
                    got = bool(conn.execute(sa.text("SELECT pg_try_advisory_lock(:id)"), ident).scalar())
                conn.commit()
                try:
                    yield got
                finally:
                    if got:
                        conn.execute(sa.text("SELECT pg_advisory_unlock(:id)"), ident)
                        conn.commit()
            return
        assert self._lock_dir is not None
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        with (self._lock_dir / f"{name}.lock").open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()
