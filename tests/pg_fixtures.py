"""A real PostgreSQL 16 for the tests, without Docker: the ``pgserver`` wheel ships the server binaries.

One server per test session (it starts in about a second); every test that asks for ``pg_url`` gets a
database of its own, dropped afterwards, so tests never see each other's rows. ``state_backend`` runs a test
once on SQLite and once on PostgreSQL: the exactly-once rules must hold on both.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_names = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    pgserver = pytest.importorskip("pgserver")
    # a short path: the server's Unix socket lives in the data directory, and socket paths max out at 107 bytes.
    # Not under pytest's basetemp: as root, pgserver runs the server as the user `pgserver` and opens the path's
    # parents to it, and every other pytest session that starts makes /tmp/pytest-of-<user> 0700 again, which
    # crashes the server mid-run (PANIC: could not open pg_control: Permission denied).
    data = Path(tempfile.mkdtemp(prefix="labelloop-pg-", dir="/tmp"))
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server) -> Iterator[str]:
    """A URL (``postgresql://…?host=<socket dir>``) to an empty database that only this test uses."""
    import psycopg

    admin = pg_server.get_uri()
    name = f"t{next(_names)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    url = admin.replace("/postgres?", f"/{name}?", 1)
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def state_backend(request: pytest.FixtureRequest) -> str | None:
    """``None`` (SQLite files in state_dir) or a PostgreSQL URL: pass it as ``Settings(database_url=…)``."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")
