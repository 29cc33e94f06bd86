"""The SQLite plumbing the small side stores share (slices, alerts): one connection per store, serialised by a
lock so any number of threads may share it, WAL so that readers in other processes never block a writer, and
writes in ``BEGIN IMMEDIATE`` so that a second process waits on the database lock instead of interleaving a
read-check-write. The journal keeps its own, stricter setup (``synchronous=FULL``, schema migrations)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self


class SQLiteStore:
    """Subclasses set ``SCHEMA`` (idempotent ``CREATE … IF NOT EXISTS`` statements)."""

    SCHEMA: str = ""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(self.SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
