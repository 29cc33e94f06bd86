"""`labelloop journal backup` / `restore`: an online, consistent copy while a writer runs; a restore that
gives back the same training labels, checks the file first, keeps the replaced journal, and refuses to pull
the journal from under a process that holds it open."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from labelloop import cli, journal_cli
from labelloop.config import Settings
from labelloop.journal import Journal
from tests.test_journal import TAXONOMY, annotation, event, task

runner = CliRunner()
LABELS = ("hate", "offensive", "neither")


@pytest.fixture
def settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(journal_cli, "get_settings", lambda: settings)
    return settings


def invoke(*args: str):
    return runner.invoke(cli.app, ["journal", *args])


def labelled(journal: Journal, first: int, count: int, minute: int = 0) -> None:
    """``count`` annotations on their own tasks, ids from ``first``; the label cycles through the taxonomy."""
    for n in range(first, first + count):
        ann = annotation(n, task_id=1000 + n, label=LABELS[(n + minute) % 3], minute=minute)
        journal.record(event(ann=ann, tsk=task(1000 + n, f"text number {n}")))


def training_labels(path: Path) -> pd.DataFrame:
    with Journal(path, TAXONOMY) as journal:
        return journal.labels().sort_values("task_id").reset_index(drop=True)


def test_restore_gives_back_the_same_training_labels_and_keeps_the_replaced_journal(settings: Settings,
                                                                                  tmp_path: Path):
    with Journal(settings.journal_path, TAXONOMY) as journal:
        labelled(journal, 1, 30)
    before = training_labels(settings.journal_path)
    backup = tmp_path / "backups" / "journal-1.sqlite"
    run = invoke("backup", str(backup))
    assert run.exit_code == 0, run.output
    assert "30 events, 30 labels" in run.output
    with Journal(settings.journal_path, TAXONOMY) as journal:  # life goes on: new labels and changed ones
        labelled(journal, 31, 10)
        labelled(journal, 1, 5, minute=1)
    changed = training_labels(settings.journal_path)
    assert len(changed) == 40 and not changed.head(30).equals(before)

    run = invoke("restore", str(backup))
    assert run.exit_code == 0, run.output
    pd.testing.assert_frame_equal(training_labels(settings.journal_path), before)
    kept = settings.journal_path.with_name("journal.sqlite.bak")
    pd.testing.assert_frame_equal(training_labels(kept), changed)
    with Journal(settings.journal_path, TAXONOMY) as journal:  # the restored journal goes on deduplicating
        assert journal.record(event(ann=annotation(1, task_id=1001, label=LABELS[1], minute=0),
                                    tsk=task(1001, "text number 1"))).status == "duplicate"


def test_backup_while_another_connection_writes_is_a_consistent_snapshot(settings: Settings, tmp_path: Path):
    """A writer commits event after event during the backups; each copy holds a prefix of the events with
    exactly the labels those events made, and passes SQLite's integrity check."""
    with Journal(settings.journal_path, TAXONOMY) as journal:
        labelled(journal, 1, 20)
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        with Journal(settings.journal_path, TAXONOMY) as own:  # its own connection, as the service has
            n = 21
            while not stop.is_set() and n < 5000:
                labelled(own, n, 1)
                written.append(n)
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        copies = []
        for i in range(5):
            copy = tmp_path / f"copy-{i}.sqlite"
            run = invoke("backup", str(copy))
            assert run.exit_code == 0, run.output
            copies.append(copy)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert len(written) > 0, "the writer never wrote during the backups"
    for copy in copies:
        conn = sqlite3.connect(copy)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            ids = [row[0] for row in conn.execute("SELECT event_id FROM events ORDER BY event_id")]
        finally:
            conn.close()
        assert ids == list(range(1, len(ids) + 1))  # a prefix, no gap: each commit is in it whole or not at all
        labels = training_labels(copy)
        assert sorted(labels["annotation_id"]) == list(range(1, len(ids) + 1))


def test_restore_refuses_a_file_that_is_not_an_intact_journal(settings: Settings, tmp_path: Path):
    with Journal(settings.journal_path, TAXONOMY) as journal:
        labelled(journal, 1, 3)
    original = settings.journal_path.read_bytes()
    not_sqlite = tmp_path / "notes.sqlite"
    not_sqlite.write_text("this is not a database\n" * 100)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    for bad, reason in ((not_sqlite, "not a SQLite database"), (other, "not a labelloop journal"),
                        (tmp_path / "missing.sqlite", "no such file")):
        run = invoke("restore", str(bad))
        assert run.exit_code == 2, run.output
        assert "error:" in run.output and reason in run.output
    assert settings.journal_path.read_bytes() == original
    assert not settings.journal_path.with_name("journal.sqlite.bak").exists()


def test_restore_refuses_a_journal_another_process_holds_open_unless_forced(settings: Settings, tmp_path: Path):
    with Journal(settings.journal_path, TAXONOMY) as journal:
        labelled(journal, 1, 3)
    backup = tmp_path / "b.sqlite"
    assert invoke("backup", str(backup)).exit_code == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT COUNT(*) FROM events').fetchone(); print('open', flush=True); time.sleep(120)",
         str(settings.journal_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        run = invoke("restore", str(backup))
        assert run.exit_code == 2 and "in use by process" in run.output and str(holder.pid) in run.output
        forced = invoke("restore", str(backup), "--force")
        assert forced.exit_code == 0, forced.output
    finally:
        holder.kill()
        holder.wait()


def test_backup_refuses_to_overwrite_without_force_and_needs_a_journal(settings: Settings, tmp_path: Path):
    run = invoke("backup", str(tmp_path / "b.sqlite"))
    assert run.exit_code == 2 and "no journal at" in run.output
    with Journal(settings.journal_path, TAXONOMY) as journal:
        labelled(journal, 1, 2)
    existing = tmp_path / "b.sqlite"
    existing.write_text("keep me")
    run = invoke("backup", str(existing))
    assert run.exit_code == 2 and "--force" in run.output and existing.read_text() == "keep me"
    assert invoke("backup", str(existing), "--force").exit_code == 0
    assert len(training_labels(existing)) == 2


@pytest.mark.parametrize(("command", "tool"), [("backup", "pg_dump"), ("restore", "pg_restore")])
def test_a_journal_in_postgresql_is_refused_with_its_own_tools_named(settings: Settings, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     command: str, tool: str):
    """Never a silent copy of the SQLite file the service does not use: exit 2, the tool to use instead, and no
    password in the message."""
    with Journal(settings.journal_path, TAXONOMY) as journal:  # a stale SQLite journal beside the configuration
        labelled(journal, 1, 2)
    backup = tmp_path / "journal-copy.sqlite"
    if command == "restore":
        assert invoke("backup", str(backup)).exit_code == 0
    before = settings.journal_path.read_bytes()
    in_postgres = settings.model_copy(update={"database_url": "postgresql://labelloop:s3cret@db.internal/labelloop"})
    monkeypatch.setattr(journal_cli, "get_settings", lambda: in_postgres)
    run = invoke(command, str(backup))
    assert run.exit_code == 2, run.output
    output = " ".join(run.output.split())
    assert "PostgreSQL" in output and tool in output and "s3cret" not in output
    assert backup.exists() == (command == "restore") and settings.journal_path.read_bytes() == before


def test_after_a_restore_new_escalations_reach_the_outbox_and_event_ids_go_on(settings: Settings):
    """The outbox copies escalations above the highest id it holds: a restored journal that handed out its old
    ids again would hide every new escalation from it, so that escalation would never be delivered."""
    from labelloop.escalations import EscalationOutbox
    from tests.test_escalations import review_event

    with Journal(settings.journal_path, TAXONOMY) as journal:
        journal.record(review_event(1, 10))
    backup = settings.state_dir / "backup.sqlite"
    assert invoke("backup", str(backup)).exit_code == 0
    with Journal(settings.journal_path, TAXONOMY) as journal, EscalationOutbox(settings.escalations_path) as outbox:
        journal.record(review_event(2, 11))
        assert outbox.sync(journal) == 2
        last_event = journal.last_event_id()
    run = invoke("restore", str(backup))
    assert run.exit_code == 0, run.output
    with Journal(settings.journal_path, TAXONOMY) as journal, EscalationOutbox(settings.escalations_path) as outbox:
        new = journal.record(review_event(3, 12))
        assert new.event_id > last_event
        assert outbox.sync(journal) == 1
        assert sorted(e.body["annotation_id"] for e in outbox.entries()) == [1, 2, 3]
