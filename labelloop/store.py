"""What the small side stores share (escalation outbox, exposure ledger, slices, alerts): a
:class:`labelloop.db.Database` (an SQLite file, or a schema of the shared PostgreSQL when ``database_url`` is
set), tables declared once with SQLAlchemy Core for both engines, and writes inside ``db.write(KEY)``, so that
a read-check-write in one replica never interleaves with another replica's. The journal and the job store keep
their own, stricter setup (schema migrations, ``synchronous=FULL``)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from os import PathLike
from pathlib import Path
from typing import ClassVar, Self

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from labelloop.db import Database

log = logging.getLogger("labelloop.store")

#: Label Studio and journal ids: 64-bit on PostgreSQL; plain INTEGER on SQLite, where it is 64-bit anyway and an
#: ``INTEGER PRIMARY KEY`` stays the rowid (the files written before this module keep their exact schema)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

#: the dialect's INSERT, whose ``on_conflict_do_nothing``/``on_conflict_do_update`` both engines spell alike
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class StoreClosed(RuntimeError):
    """A store used after :meth:`Store.close` (its engine would silently reconnect otherwise)."""


class Store:
    """Subclasses set ``METADATA`` (their tables) and ``KEY`` (what their writes serialise on).

    A store owns the database it is given and disposes of it on :meth:`close`: ``Settings.database`` builds a
    new one per call, so nobody else holds it. A path still works, as the SQLite file it names."""

    METADATA: ClassVar[sa.MetaData]
    KEY: ClassVar[str]

    def __init__(self, where: Database | str | PathLike[str]):
        self.db = where if isinstance(where, Database) else Database.sqlite(Path(where))
        self._schema_ready = self._closed = False
        try:
            self._ensure_schema()
        except sa.exc.OperationalError as e:
            if not self.db.is_postgres:  # a file that cannot be opened is a setup error: say so at start
                raise
            # a replica that starts while the shared database is down still serves what needs no database;
            # the tables are created by the first use that reaches it
            log.warning("%s: database unreachable at start (%s); tables are created at first use",
                        type(self).__name__, type(e.orig or e).__name__)

    def _ensure_schema(self) -> None:
        """Under the write lock: two replicas starting at once would otherwise both see no table and both
        CREATE it, and PostgreSQL refuses the second."""
        if not self._schema_ready:
            with self.db.write("schema") as conn:
                self.METADATA.create_all(conn)
            self._schema_ready = True

    def insert(self, table: sa.Table) -> sa.Insert:
        """``INSERT`` with the engine's ``ON CONFLICT`` clauses."""
        return _INSERTS[self.db.dialect](table)

    def close(self) -> None:
        self._closed = True
        self.db.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[Connection]:
        """One write transaction, serialised with every other writer of this store in any process or
        replica: committed when the block ends, rolled back if it raises."""
        self._usable()
        return self.db.write(self.KEY)

    def _read(self) -> AbstractContextManager[Connection]:
        self._usable()
        return self.db.read()

    def _usable(self) -> None:
        if self._closed:
            raise StoreClosed(f"{type(self).__name__} is closed")
        self._ensure_schema()


def greatest(column: sa.ColumnElement, value: sa.ColumnElement) -> sa.Case:
    """The larger of two values: SQLite spells it ``MAX(a, b)``, PostgreSQL ``GREATEST(a, b)``."""
    return sa.case((value > column, value), else_=column)

