"""The shared PostgreSQL (``database_url``) as a ``/health`` dependency.

Every replica keeps its journal, jobs and locks there, so a replica that cannot reach it still serves
predictions but refuses webhooks and runs no rounds; a load balancer or an operator should see that, and
where it was looking (the URL, password redacted). The probe is a ``SELECT 1`` on a connection of its own,
never one of the stores' pools: a pool that is exhausted or wedged must not make the database look down, nor
the reverse. Label Studio calls ``/health`` before every predict, so the answer is reused for
``CHECK_SECONDS`` and a database that does not answer holds ``/health`` up for at most ``TIMEOUT_S``.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import sqlalchemy as sa

from labelloop.db import postgres_url, redact
from serving.protocol import DependencyHealth

CHECK_SECONDS = 5.0
TIMEOUT_S = 2


class DatabaseHealth:
    """Reachable or not, as of the last probe (at most ``CHECK_SECONDS`` old)."""

    def __init__(self, url: str, check_seconds: float = CHECK_SECONDS):
        self.url = redact(url)
        self._engine = sa.create_engine(
            postgres_url(url), poolclass=sa.pool.NullPool,
            connect_args={"connect_timeout": TIMEOUT_S, "options": f"-c statement_timeout={TIMEOUT_S * 1000}"})
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._since: str | None = None

    def _probe(self) -> str | None:
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.SQLAlchemyError as e:
            cause = getattr(e, "orig", None) or e  # the driver's own error says why, without SQLAlchemy's SQL
            return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
        return None

    def health(self) -> DependencyHealth:
        with self._lock:
            if self._checked_at is None or time.monotonic() - self._checked_at >= self._check_seconds:
                self._problem = self._probe()
                self._checked_at = time.monotonic()
                if self._problem is None:
                    self._since = None
                elif self._since is None:
                    self._since = datetime.now(UTC).isoformat(timespec="seconds")
            if self._problem is None:
                return DependencyHealth(status="ok", url=self.url)
            return DependencyHealth(status="unavailable", detail=self._problem, since=self._since, url=self.url)
