"""The journal on a real PostgreSQL as replicas use it: two journals (two replicas) on one database, threads in
each recording the same and different webhooks at once; and a database that goes away and comes back."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from labelloop.config import Settings
from labelloop.journal import Journal, JournalUnavailable, RecordResult
from serving.app import create_app
from tests.fakes import EmptyRegistry
from tests.test_journal import TAXONOMY, annotation, event, task


def replica_journal(tmp_path: Path, url: str) -> Journal:
    """The journal as one ``labelloop serve`` replica opens it."""
    return Journal(Settings(state_dir=tmp_path, database_url=url).database("journal"), TAXONOMY)


def test_two_replicas_with_threads_apply_every_version_exactly_once(tmp_path: Path, pg_url: str) -> None:
    """Every replica gets some of the events twice (Label Studio's two webhooks for one URL, a load balancer's
    retry) and all of the shared ones, in its own order; events only one replica sees land as well."""
    labels = TAXONOMY.labels
    shared = [event("ANNOTATION_CREATED" if minute == 0 else "ANNOTATION_UPDATED",
                    annotation(i, 100 + i, labels[(i + minute) % 3], minute), task(100 + i))
              for i in range(1, 21) for minute in range(3)]
    own = {name: [event(ann=annotation(base + i, base + i, labels[i % 3]), tsk=task(base + i)) for i in range(10)]
           for name, base in (("a", 1000), ("b", 2000))}
    results: list[tuple[dict, RecordResult]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(journal: Journal, payloads: list[dict], seed: int) -> None:
        order = payloads[:]
        random.Random(seed).shuffle(order)
        try:
            for payload in order:
                res = journal.record(payload)
                with lock:
                    results.append((payload, res))
        except BaseException as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    with replica_journal(tmp_path / "a", pg_url) as a, replica_journal(tmp_path / "b", pg_url) as b:
        threads = [threading.Thread(target=worker, args=(journal, shared + own[name][seed % 2::2], seed))
                   for seed, (journal, name) in enumerate([(a, "a"), (a, "a"), (b, "b"), (b, "b")])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a writer is stuck (deadlock?)"
        assert not errors, errors
        sent = 4 * len(shared) + 20
        assert len(results) == sent == a.stats()["events"] == b.stats()["events"]
        assert len({res.event_id for _, res in results}) == sent  # one event row per delivery
        accepted = Counter((p["annotation"]["id"], p["annotation"]["updated_at"])
                           for p, res in results if res.status == "accepted")
        assert set(accepted.values()) == {1}  # no version applied twice
        assert sum(res.status == "duplicate" for _, res in results) == sent - sum(accepted.values())
        assert all(res.reason for _, res in results if res.status == "duplicate")
        newest = {100 + i: labels[(i + 2) % 3] for i in range(1, 21)}
        singles = {base + i: labels[i % 3] for base in (1000, 2000) for i in range(10)}
        for journal in (a, b):  # both replicas read the same state
            frame = journal.labels()
            assert dict(zip(frame["task_id"], frame["label"], strict=True)) == newest | singles
            assert journal.new_label_count(0) == 40


def _database_of(url: str) -> tuple[str, str]:
    """The per-test database's name and the server's admin URL."""
    name = url.split("?", 1)[0].rsplit("/", 1)[1]
    return name, url.replace(f"/{name}?", "/postgres?", 1)


def set_reachable(url: str, reachable: bool) -> None:
    """Take the database away as a restart does (refuse new connections, end the open ones), or give it back."""
    name, admin = _database_of(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {'true' if reachable else 'false'}")
        if not reachable:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


@pytest.fixture
def outage(pg_url: str) -> Iterator[str]:
    try:
        yield pg_url
    finally:
        set_reachable(pg_url, True)  # so that the fixture can drop the database


def test_a_database_gone_away_refuses_writes_with_journal_unavailable_and_recovers(tmp_path: Path, outage: str):
    with replica_journal(tmp_path, outage) as journal:
        assert journal.record(event()).status == "accepted"
        set_reachable(outage, False)
        with pytest.raises(JournalUnavailable, match="cannot be written"):
            journal.record(event(ann=annotation(2, 11), tsk=task(11)))
        assert journal.write_problem and journal.write_problem_since
        with pytest.raises(JournalUnavailable, match="cannot be read"):
            journal.labels()
        set_reachable(outage, True)
        # the pool's connections died with the outage: pre-ping replaces them, nothing surfaces
        assert journal.record(event(ann=annotation(2, 11), tsk=task(11))).status == "accepted"
        assert journal.write_problem is None
        assert journal.stats()["events"] == 2 and journal.new_label_count(0) == 2  # nothing half-written


def test_a_journal_opened_while_the_database_is_down_makes_its_tables_once_it_is_back(tmp_path: Path,
                                                                                       outage: str) -> None:
    set_reachable(outage, False)
    with replica_journal(tmp_path, outage) as journal:  # a replica that starts during the outage starts
        assert journal.write_problem
        with pytest.raises(JournalUnavailable):
            journal.record(event())
        set_reachable(outage, True)
        assert journal.record(event()).status == "accepted"
        assert journal.record(event()).status == "duplicate" and journal.write_problem is None


def test_nothing_listens_at_the_url_gives_journal_unavailable(tmp_path: Path) -> None:
    with replica_journal(tmp_path, "postgresql://labelloop@127.0.0.1:9/none") as journal:
        with pytest.raises(JournalUnavailable, match="cannot be written"):
            journal.record(event())


def test_the_webhook_answers_503_while_the_database_is_away_and_201_after(settings: Settings, tmp_path: Path,
                                                                          outage: str) -> None:
    """The same answer as a full disk: no acknowledgement without a durable write, and /health says why."""
    with replica_journal(tmp_path, outage) as journal:
        app = create_app(settings.model_copy(update={"poll_seconds": 0}), model_source=EmptyRegistry("fuzz"),
                         journal=journal)
        with TestClient(app) as client:
            set_reachable(outage, False)
            r = client.post("/webhook", json=event())
            assert r.status_code == 503 and "not recorded" in r.json()["detail"]
            assert client.get("/health").json()["dependencies"]["journal"]["status"] == "unavailable"
            set_reachable(outage, True)
            r = client.post("/webhook", json=event())
            assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
            assert client.get("/health").json()["dependencies"]["journal"]["status"] == "ok"
        assert journal.stats()["events"] == 1
