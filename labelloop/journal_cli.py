"""``labelloop journal backup`` and ``labelloop journal restore``: copies of the annotation journal.

The journal is the only place that holds every label Label Studio sent (Label Studio never resends a
webhook), so it is worth a copy. A plain file copy of a WAL-mode SQLite database that a running service
writes to can catch the main file and the ``-wal`` file at different moments; SQLite's online backup API
(:meth:`sqlite3.Connection.backup`) copies a consistent snapshot in one read transaction instead, and in
WAL mode that never blocks the service's writers. So ``backup`` is safe while ``labelloop serve`` runs.

``restore`` replaces the journal, so it refuses while a process holds the journal open (the service would
go on writing to the replaced file) unless ``--force``; it checks that the file is an intact journal
before touching anything, and keeps the journal it replaces as ``journal.sqlite.bak``. Ids in the restored
journal continue after the replaced one's (:func:`continue_ids`), so the escalation outbox and the other
stores that follow the journal by id see everything recorded after the restore.

Both are for the SQLite journal. A journal in PostgreSQL (``database_url``) is one schema of a database whose
own tools already do this properly (``pg_dump`` takes a consistent snapshot while replicas write, and
``pg_restore`` keeps sequences, so ids go on after a restore): both commands say so and stop, rather than
copy or replace a SQLite file the service does not use.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from labelloop.cli_errors import CliError, friendly_errors
from labelloop.config import Settings, get_settings

journal_app = typer.Typer(help="The annotation journal: online backup and restore.", no_args_is_help=True)
console = Console()

#: tables a journal of any schema version has; restore refuses a file without them
CORE_TABLES = ("events", "annotations", "quarantine")


def _settings(taxonomy: str | None) -> Settings:
    from labelloop.taxonomy import taxonomy_setting

    settings = get_settings()
    return settings.model_copy(update={"taxonomy": taxonomy_setting(taxonomy)}) if taxonomy else settings


TaxonomyOpt = Annotated[str | None, typer.Option(help="taxonomy whose journal is meant (default: settings)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite an existing file / a journal in use")]


def sqlite_only(settings: Settings, command: str) -> None:
    """Refuse ``command`` for a journal in PostgreSQL, naming the tools that do it there."""
    if settings.database_url is None:
        return
    from labelloop.db import redact

    where = redact(settings.database_url)
    tool = (f"pg_dump --format=custom --schema=journal --file=journal.dump '{where}'" if command == "backup"
            else f"pg_restore --clean --if-exists --schema=journal --dbname='{where}' journal.dump")
    raise CliError(f"the journal is in PostgreSQL ({where}, schema journal), not a SQLite file: `labelloop journal "
                   f"{command}` copies SQLite files only; use PostgreSQL's own tools, e.g. {tool}")


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of ``source`` at ``target`` (a new file), with SQLite's online backup API.

    All pages are copied in one step, inside one read transaction: a step-wise copy restarts whenever
    another process writes, and might never finish while the service is busy."""
    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
        finally:
            dst.close()
    finally:
        src.close()


def check_journal_file(path: Path) -> int:
    """Raise :class:`CliError` unless ``path`` is an intact journal this labelloop can open; returns its
    schema version."""
    from labelloop.journal import SCHEMA_VERSION

    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise CliError(f"{path} is not a SQLite database: {e}") from None
    if integrity != "ok":
        raise CliError(f"{path} is damaged (SQLite integrity check: {integrity})")
    missing = [t for t in CORE_TABLES if t not in tables]
    if missing or version < 1:
        raise CliError(f"{path} is not a labelloop journal (schema version {version}, missing tables {missing})")
    if version > SCHEMA_VERSION:
        raise CliError(f"{path} has journal schema {version}; this labelloop understands up to {SCHEMA_VERSION}")
    return version


def holders(path: Path) -> list[str]:
    """Processes that hold ``path`` open, as ``"<pid> <name>"`` (those this user may inspect)."""
    import psutil

    target = str(path.resolve())
    found = []
    for process in psutil.process_iter(["pid", "name"]):
        try:
            if any(f.path == target for f in process.open_files()):
                found.append(f"{process.info['pid']} {process.info['name']}")
        except (psutil.Error, OSError):
            continue
    return found


@journal_app.command("backup")
@friendly_errors
def backup(
    path: Annotated[Path, typer.Argument(help="file to write the copy to")],
    force: ForceOpt = False,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Copy the journal to PATH with SQLite's online backup API: consistent, and safe while the service runs."""
    settings = _settings(taxonomy)
    sqlite_only(settings, "backup")
    source = settings.journal_path
    if not source.is_file():
        raise CliError(f"no journal at {source} (state_dir {settings.state_dir})")
    if path.exists() and not force:
        raise CliError(f"{path} exists; pass --force to overwrite it")
    if path.resolve() == source.resolve():
        raise CliError(f"{path} is the journal itself")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        copy_database(source, partial)
        check_journal_file(partial)
        partial.replace(path)  # a reader never sees half a backup
    finally:
        partial.unlink(missing_ok=True)
    events, labels = _counts(path)
    console.print(f"journal {source} → {path}: {events} events, {labels} labels")


@journal_app.command("restore")
@friendly_errors
def restore(
    path: Annotated[Path, typer.Argument(help="a backup written by `labelloop journal backup`")],
    force: ForceOpt = False,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Replace the journal with the backup at PATH; the journal it replaces is kept as journal.sqlite.bak.

    Refuses while a process (the service) holds the journal open, unless --force: stop `labelloop serve`
    first, or the service goes on writing to the replaced file and those events are lost."""
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    settings = _settings(taxonomy)
    sqlite_only(settings, "restore")
    target = settings.journal_path
    version = check_journal_file(path)
    if path.resolve() == target.resolve():
        raise CliError(f"{path} is the journal itself")
    if target.exists() and not force:
        users = holders(target)
        if users:
            raise CliError(f"the journal {target} is in use by process {', '.join(users)}: stop the service first, "
                           "or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f"{target.name}.restoring")
    for leftover in _files_of(staged):
        leftover.unlink(missing_ok=True)
    try:
        copy_database(path, staged)
        with Journal(staged, get_taxonomy(settings.taxonomy), policy=settings.review_policy) as restored:  # migrates
            stats = restored.stats()
        kept = None
        if target.exists():
            kept = target.with_name(f"{target.name}.bak")
            kept.unlink(missing_ok=True)
            copy_database(target, kept)  # through the WAL: the copy holds every committed event
            continue_ids(staged, kept)
        for stale in _files_of(target)[1:]:
            stale.unlink(missing_ok=True)
        staged.replace(target)
    finally:
        for leftover in _files_of(staged):
            leftover.unlink(missing_ok=True)
    console.print(f"restored {path} (schema {version}) → {target}: {stats['events']} events, "
                  f"{stats['live_labels']} labels" + (f"; the replaced journal is kept as {kept}" if kept else ""))


def continue_ids(restored: Path, replaced: Path) -> None:
    """Make the restored journal's next event, escalation and quarantine ids follow the replaced journal's.

    Other stores keep cursors on these ids: the escalation outbox copies the escalations above the highest id
    it holds, exposure accounting and the retrain trigger read the events above theirs. Ids that started again
    below those cursors would hide what comes after the restore from them: a new escalation would never reach
    the outbox, so it would never be delivered."""
    src = sqlite3.connect(f"{replaced.resolve().as_uri()}?mode=ro", uri=True)
    try:
        last = src.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
    except sqlite3.OperationalError:  # nothing was ever inserted there
        last = []
    finally:
        src.close()
    conn = sqlite3.connect(restored, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for name, seq in last:
            conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = ?", (seq, name))
            conn.execute("INSERT INTO sqlite_sequence (name, seq) SELECT ?1, ?2 WHERE ?1 IN "
                         "(SELECT name FROM sqlite_master WHERE type = 'table') AND NOT EXISTS "
                         "(SELECT 1 FROM sqlite_sequence WHERE name = ?1)", (name, seq))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _files_of(database: Path) -> list[Path]:
    """The database file and the two files SQLite keeps beside it in WAL mode."""
    return [database, database.with_name(f"{database.name}-wal"), database.with_name(f"{database.name}-shm")]


def _counts(path: Path) -> tuple[int, int]:
    """Events and usable labels in a journal file, read without opening it for writing."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        labels = conn.execute("SELECT COUNT(*) FROM annotations WHERE deleted = 0 AND label IS NOT NULL").fetchone()[0]
    finally:
        conn.close()
    return events, labels
