"""Severity, escalation and reveal marks journaled exactly once, and escalations delivered exactly once through the
durable outbox: to a real local HTTP receiver that is down for a while, across process restarts, and listed by
``GET /v1/escalations`` and ``labelloop escalations``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from active_learning.training_labels import derive_training_labels
from labelloop.config import Settings
from labelloop.db import Database
from labelloop.escalations import (
    CLAIM_SECONDS,
    IDEMPOTENCY_HEADER,
    DeliveryWorker,
    EscalationOutbox,
    backoff_seconds,
)
from labelloop.journal import SCHEMA_VERSION, Journal
from labelloop.policy import ReviewPolicy, Severity
from labelloop.slices import COLUMNS as SLICE_COLUMNS
from labelloop.taxonomy import get_taxonomy
from tests.label_studio_fixtures import wait_for
from tests.test_journal import PROJECT, annotation, event, task

TAXONOMY = get_taxonomy("hate_offensive")
POLICY = ReviewPolicy(severity=Severity(severe_labels=("hate",)))


def review_result(label: str | None = "hate", *, severity: str | None = "critical", escalate: bool = True,
                  reason: str | None = "credible threat against a named person", reveal: bool = False,
                  reason_control: str = "textarea") -> list[dict]:
    """A result as Label Studio 1.23 stores it for a config with the label Choices, a severity Choices, an
    escalate checkbox (a one-choice Choices), a reason TextArea (or Choices) and a "show original" toggle."""
    out: list[dict] = []
    if label is not None:
        out.append({"id": "lbl", "from_name": "label", "to_name": "text", "type": "choices", "origin": "manual",
                    "value": {"choices": [label]}})
    if severity is not None:
        out.append({"id": "sev", "from_name": "severity", "to_name": "text", "type": "choices",
                    "origin": "manual", "value": {"choices": [severity]}})
    if escalate:
        out.append({"id": "esc", "from_name": "escalate", "to_name": "text", "type": "choices",
                    "origin": "manual", "value": {"choices": ["Escalate"]}})
    if reason is not None:
        value = {"text": [reason]} if reason_control == "textarea" else {"choices": [reason]}
        out.append({"id": "why", "from_name": "escalation_reason", "to_name": "text", "type": reason_control,
                    "origin": "manual", "value": value})
    if reveal:
        out.append({"id": "rev", "from_name": "reveal", "to_name": "text", "type": "choices", "origin": "manual",
                    "value": {"choices": ["show original"]}})
    return out


def review_event(ann_id: int = 1, task_id: int = 10, minute: int = 0, action: str = "ANNOTATION_CREATED",
                 annotator: int = 1, **marks: Any) -> dict:
    return event(action, annotation(ann_id, task_id, minute=minute, annotator=annotator,
                                    result_=review_result(**marks)), task(task_id, item_id=f"item-{task_id}"))


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.sqlite", TAXONOMY, policy=POLICY) as j:
        yield j


@pytest.fixture
def store_db(tmp_path: Path, state_backend: str | None) -> Callable[..., Database]:
    """Opens a side store's database as ``Settings.database`` does: ``<name>.sqlite`` in ``tmp_path``, or the
    schema ``<name>`` of this test's own PostgreSQL database. Each call is a new engine, as in another
    process or replica."""
    return lambda name="escalations": Database.open(state_backend, tmp_path / f"{name}.sqlite", name)


# --- journaling the marks --------------------------------------------------------------------------


def test_marks_are_journaled_with_the_label_and_escalate_exactly_once(journal: Journal) -> None:
    payload = review_event(reveal=True)
    assert journal.record(payload).status == "accepted"
    assert journal.record(payload).status == "duplicate"
    later = review_event(minute=5, action="ANNOTATION_UPDATED", severity="high", reason="changed wording")
    assert journal.record(later).status == "accepted"  # a newer version, still escalated: not a second escalation
    row = journal.annotations().iloc[0]
    # the update cleared the reveal toggle, but the reviewer did see the original: a reveal is not undone
    assert (row["label"], row["severity"], row["escalated"], row["revealed"]) == ("hate", "high", True, True)
    escalations = journal.escalations()
    assert len(escalations) == 1
    assert {k: escalations[0][k] for k in ("annotation_id", "task_id", "item_id", "label", "severity", "reason",
                                           "annotator", "project_id")} == {
        "annotation_id": 1, "task_id": 10, "item_id": "item-10", "label": "hate", "severity": "critical",
        "reason": "credible threat against a named person", "annotator": 1, "project_id": PROJECT}
    assert journal.stats()["quarantine"] == 0


def test_severity_outside_the_scale_keeps_the_label_and_quarantines_the_severity(journal: Journal) -> None:
    res = journal.record(review_event(severity="apocalyptic", escalate=False, reason=None))
    assert res.status == "accepted"
    assert "quarantined severity: 'apocalyptic' is not on the scale" in res.reason
    labels = journal.labels()
    assert labels[["label", "severity", "severity_weight"]].to_dict("records") == [
        {"label": "hate", "severity": None, "severity_weight": 1.0}]
    [entry] = journal.quarantined()
    assert entry["annotation_id"] == 1 and entry["reason"].startswith("severity: 'apocalyptic'")


def test_escalation_without_a_required_reason_is_quarantined_until_a_version_gives_one(journal: Journal) -> None:
    res = journal.record(review_event(reason=None))
    assert res.status == "accepted" and "quarantined escalation: escalated without a reason" in res.reason
    assert journal.labels()["label"].tolist() == ["hate"]
    assert journal.escalations() == []
    assert journal.quarantined()[0]["reason"].startswith("escalation:")
    fixed = journal.record(review_event(minute=2, action="ANNOTATION_UPDATED", reason="doxxing",
                                        reason_control="choices"))
    assert fixed.status == "accepted" and fixed.reason is None
    assert [e["reason"] for e in journal.escalations()] == ["doxxing"]


def test_an_escalation_is_kept_even_when_the_label_is_unusable(journal: Journal) -> None:
    res = journal.record(review_event(label=None))
    assert res.status == "quarantined" and "no choices value" in res.reason  # the label part
    assert len(journal.escalations()) == 1 and journal.labels().empty


def test_a_multi_label_escalation_carries_its_label_set(tmp_path: Path) -> None:
    from labelloop.escalations import payload
    from labelloop.taxonomy import Taxonomy

    multi = Taxonomy("harms", "Harms", ("hate", "threat"), ("hate speech", "a threat"), multi=True)
    with Journal(tmp_path / "multi.sqlite", multi) as j:
        j.record(review_event(label="threat"))
        [row] = j.escalations()
    assert json.loads(json.dumps(payload(row)))["label"] == ["threat"]


def test_severity_is_in_training_labels_and_export_with_its_weight(journal: Journal) -> None:
    journal.record(review_event(1, 10, severity="critical", escalate=False, reason=None))
    journal.record(review_event(2, 11, label="neither", severity="low", escalate=False, reason=None))
    journal.record(review_event(3, 12, label="offensive", severity=None, escalate=False, reason=None))
    labels = journal.labels().set_index("task_id")
    assert labels["severity"].fillna("-").to_dict() == {10: "critical", 11: "low", 12: "-"}
    assert labels["severity_weight"].to_dict() == {10: 4.0, 11: 1.0, 12: 1.0}
    derived = derive_training_labels(journal.annotations(), pd.DataFrame(columns=SLICE_COLUMNS), TAXONOMY)
    assert derived.set_index("task_id")["severity_weight"].to_dict() == {10: 4.0, 11: 1.0, 12: 1.0}


def test_a_schema_2_journal_opens_and_gains_the_review_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with Journal(path, TAXONOMY) as j:
        j.record(event())
    conn = sqlite3.connect(path)  # make it what labelloop wrote before schema 3
    conn.execute("DROP TABLE escalations")
    for column in ("severity", "escalated", "revealed"):
        conn.execute(f"ALTER TABLE annotations DROP COLUMN {column}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Journal(path, TAXONOMY, policy=POLICY) as j:
        assert j.labels()[["label", "severity", "severity_weight"]].to_dict("records") == [
            {"label": "hate", "severity": None, "severity_weight": 1.0}]
        assert j.record(review_event(2, 11)).status == "accepted"
        assert len(j.escalations()) == 1
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


# --- the outbox ------------------------------------------------------------------------------------


def test_sync_is_idempotent_and_recovers_what_a_crash_left_behind(journal: Journal, store_db) -> None:
    journal.record(review_event(1, 10))
    with EscalationOutbox(store_db()) as outbox:
        assert outbox.sync(journal) == 1
        assert outbox.sync(journal) == 0
    journal.record(review_event(2, 11))  # acknowledged, then the process died before copying it
    with EscalationOutbox(store_db()) as outbox:  # the restarted process
        assert outbox.sync(journal) == 1
        assert [e.body["annotation_id"] for e in outbox.entries()] == [2, 1]
        assert outbox.counts() == {"open": 2, "delivered": 0}


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_seconds(n, 2.0, 30.0) for n in range(6)] == [0.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert backoff_seconds(10_000, 2.0, 30.0) == 30.0


class Receiver:
    """A real HTTP escalation receiver on a fixed 127.0.0.1 port that can be down (connection refused),
    failing (500) or up (201); it records every POST it answers."""

    def __init__(self) -> None:
        self.mode = "down"
        self.posts: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code = 500 if receiver.mode == "failing" else 201
                receiver.posts.append({"key": self.headers.get(IDEMPOTENCY_HEADER), "body": body, "code": code})
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.httpd.allow_reuse_address = True
        self.httpd.server_bind()  # bound but not listening: connections are refused
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/escalations"
        self.thread: threading.Thread | None = None

    def up(self, mode: str = "up") -> None:
        self.mode = mode
        if self.thread is None:
            self.httpd.server_activate()
            self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
            self.thread.start()

    def delivered(self) -> list[dict[str, Any]]:
        return [p for p in self.posts if p["code"] == 201]

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_refused_connections_are_really_refused(receiver: Receiver) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.post(receiver.url, json={}, timeout=2)


def deliver_in_a_new_process(state_dir: Path, url: str) -> dict[str, Any]:
    """``labelloop escalations --deliver --json`` as its own process: each call is a service restart."""
    env = {**os.environ, "LABELLOOP_STATE_DIR": str(state_dir), "LABELLOOP_ESCALATION_URL": url,
           "LABELLOOP_ESCALATION_RETRY_SECONDS": "0.01", "LABELLOOP_CONFIG": str(state_dir / "none.toml")}
    proc = subprocess.run([sys.executable, "-m", "labelloop.cli", "escalations", "--deliver", "--json"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return {"listing": json.loads(proc.stdout), "report": proc.stderr.strip().splitlines()[-1]}


def test_delivered_exactly_once_after_the_receiver_was_down_across_restarts(tmp_path: Path,
                                                                            receiver: Receiver) -> None:
    state = tmp_path / "var"
    with Journal(state / "journal.sqlite", TAXONOMY) as journal:  # the webhook journaled it, then the service died
        journal.record(review_event(1, 10))
    first = deliver_in_a_new_process(state, receiver.url)  # receiver refuses connections
    assert first["report"] == "delivered 0, failed 1, still open 1"
    [entry] = first["listing"]["escalations"]
    assert entry["status"] == "open" and entry["attempts"] == 1 and "ConnectError" in entry["last_error"]

    receiver.up("failing")
    time.sleep(0.05)  # past the first backoff
    second = deliver_in_a_new_process(state, receiver.url)
    assert second["report"] == "delivered 0, failed 1, still open 1"
    assert second["listing"]["escalations"][0]["attempts"] == 2

    receiver.mode = "up"
    time.sleep(0.05)
    third = deliver_in_a_new_process(state, receiver.url)
    assert third["report"] == "delivered 1, failed 0, still open 0"
    fourth = deliver_in_a_new_process(state, receiver.url)
    assert fourth["report"] == "delivered 0, failed 0, still open 0"

    [delivered] = receiver.delivered()
    assert len(receiver.posts) == 2  # one 500, one 201: nothing after the 201
    assert delivered["key"] == entry["id"] == delivered["body"]["id"]
    assert {k: delivered["body"][k] for k in ("event", "annotation_id", "task_id", "label", "severity",
                                              "reason", "text")} == {
        "event": "escalation", "annotation_id": 1, "task_id": 10, "label": "hate", "severity": "critical",
        "reason": "credible threat against a named person", "text": "you people are awful"}
    assert {p["key"] for p in receiver.posts} == {entry["id"]}  # the same idempotency key on every attempt
    assert fourth["listing"]["escalations"][0]["status"] == "delivered"


def start_serve(root: Path, receiver_url: str) -> tuple[subprocess.Popen, str]:
    """``labelloop serve`` as its own process (no champion, no Label Studio): the webhook and the worker."""
    from labelloop.ls_server import free_port

    port = free_port()
    env = {**os.environ, "LABELLOOP_MLRUNS_DIR": str(root / "mlruns"), "LABELLOOP_STATE_DIR": str(root / "var"),
           "LABELLOOP_PORT": str(port), "LABELLOOP_ESCALATION_URL": receiver_url,
           "LABELLOOP_ESCALATION_RETRY_SECONDS": "0.2", "LABELLOOP_ESCALATION_RETRY_MAX_SECONDS": "0.5",
           "LABELLOOP_POLL_SECONDS": "0", "LABELLOOP_RECONCILE_SECONDS": "0", "LABELLOOP_DRIFT_EVERY_SECONDS": "0",
           "LABELLOOP_CONFIG": str(root / "none.toml")}
    log = (root / f"serve-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "labelloop.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"labelloop serve exited: {(root / f'serve-{port}.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/v1/escalations", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, "labelloop serve to answer", timeout=180)
    return proc, url


def test_serve_killed_right_after_acknowledging_delivers_after_restart(tmp_path: Path, receiver: Receiver) -> None:
    first, url = start_serve(tmp_path, receiver.url)  # the receiver refuses connections
    try:
        ack = httpx.post(f"{url}/webhook", json=review_event(1, 10), timeout=30).json()
        assert ack["result"]["status"] == "accepted"
        wait_for(lambda: httpx.get(f"{url}/v1/escalations", timeout=5).json()["escalations"][0]["attempts"] >= 1,
                 "a refused attempt")
    finally:
        first.kill()  # no clean shutdown
        first.wait(timeout=30)
    receiver.up("failing")
    second, url = start_serve(tmp_path, receiver.url)
    try:
        wait_for(lambda: len(receiver.posts) >= 2, "retries answered 500")
        receiver.mode = "up"
        wait_for(lambda: httpx.get(f"{url}/v1/escalations", timeout=5).json()["delivered"] == 1, "the delivery")
        time.sleep(1.0)  # several retry periods: nothing more may be sent
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert len(receiver.delivered()) == 1 and len({p["key"] for p in receiver.posts}) == 1
    assert receiver.delivered()[0]["body"]["reason"] == "credible threat against a named person"


def test_the_worker_retries_with_backoff_until_delivered(journal: Journal, store_db, receiver: Receiver) -> None:
    receiver.up("failing")
    with EscalationOutbox(store_db()) as outbox:
        worker = DeliveryWorker(outbox, journal, receiver.url, retry_seconds=0.05, retry_max_seconds=0.2,
                                idle_seconds=5)
        worker.start()
        try:
            journal.record(review_event(1, 10))
            journal.record(review_event(1, 10))  # the same webhook again
            worker.wake()
            wait_for(lambda: len(receiver.posts) >= 3, "three failed attempts", timeout=30)
            receiver.mode = "up"
            wait_for(lambda: outbox.counts()["delivered"] == 1, "delivery once the receiver is up", timeout=30)
            time.sleep(0.3)
        finally:
            worker.close()
        assert len(receiver.delivered()) == 1
        assert len({p["key"] for p in receiver.posts}) == 1
        assert outbox.entries()[0].attempts == len(receiver.posts)


def test_two_processes_delivering_at_once_send_each_escalation_once(journal: Journal, store_db,
                                                                    receiver: Receiver) -> None:
    receiver.up()
    for i in range(5):
        journal.record(review_event(i + 1, 10 + i))
    with EscalationOutbox(store_db()) as a, EscalationOutbox(store_db()) as b, httpx.Client(timeout=5) as client:
        a.sync(journal)
        claimed = a.claim_due(datetime.now(UTC))
        assert len(claimed) == 5 and b.claim_due(datetime.now(UTC)) == []
        report = b.deliver(receiver.url, client, retry_seconds=1, retry_max_seconds=1,
                           now=lambda: datetime.now(UTC) + timedelta(seconds=120))  # a's claim expired
        assert report.delivered == 5
        assert a.deliver(receiver.url, client, retry_seconds=1, retry_max_seconds=1).delivered == 0
    assert len(receiver.posts) == 5


def test_a_failed_pass_holds_the_rest_back_until_the_retry_then_delivers_in_order(
        journal: Journal, store_db, receiver: Receiver) -> None:
    """A receiver that is down is tried once per backoff period, not once per open escalation."""
    for i in range(3):
        journal.record(review_event(i + 1, 10 + i))
    with EscalationOutbox(store_db()) as outbox, httpx.Client(timeout=5) as client:
        outbox.sync(journal)
        start = datetime.now(UTC)

        def deliver(after: float):
            return outbox.deliver(receiver.url, client, retry_seconds=60, retry_max_seconds=60,
                                  now=lambda: start + timedelta(seconds=after))

        assert (deliver(0).failed, deliver(1).failed, deliver(59).failed) == (1, 0, 0)
        assert [e.attempts for e in outbox.entries()] == [0, 0, 1]
        receiver.up()
        assert deliver(61).delivered == 3
    assert [p["body"]["annotation_id"] for p in receiver.posts] == [1, 2, 3]


def test_a_pass_that_outlived_its_claim_does_not_post_what_another_pass_took(journal: Journal, store_db,
                                                                            receiver: Receiver) -> None:
    receiver.up()
    journal.record(review_event(1, 10))
    with EscalationOutbox(store_db()) as a, EscalationOutbox(store_db()) as b, httpx.Client(timeout=5) as client:
        a.sync(journal)
        start = datetime.now(UTC)
        stalled = a.claim_due(start)  # a's pass claims, then stalls (a slow receiver) past its claim
        later = start + timedelta(seconds=CLAIM_SECONDS + 1)
        assert b.deliver(receiver.url, client, retry_seconds=1, retry_max_seconds=1, now=lambda: later).delivered == 1
        a.claim_due = lambda *_args, **_kw: stalled  # a's pass goes on with the rows it claimed
        assert a.deliver(receiver.url, client, retry_seconds=1, retry_max_seconds=1, now=lambda: later).delivered == 0
    assert len(receiver.posts) == 1


def test_concurrent_claims_from_two_replicas_never_take_one_escalation_twice(journal: Journal, store_db) -> None:
    """The claim is what keeps two replicas' workers from posting one escalation each: many passes of both
    replicas claiming small batches at the same moment must split the open escalations without overlap."""
    n = 40
    for i in range(n):
        journal.record(review_event(i + 1, 10 + i))
    with EscalationOutbox(store_db()) as a, EscalationOutbox(store_db()) as b:
        a.sync(journal)
        start = threading.Barrier(6)
        claimed: list[int] = []

        def claim_until_empty(outbox: EscalationOutbox) -> None:
            start.wait()
            while batch := outbox.claim_due(datetime.now(UTC), limit=3):
                claimed.extend(e.escalation_id for e in batch)

        threads = [threading.Thread(target=claim_until_empty, args=(outbox,)) for outbox in (a, b) * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert sorted(claimed) == list(range(1, n + 1))


def test_the_workers_of_two_replicas_deliver_each_escalation_once(tmp_path: Path, store_db,
                                                                  receiver: Receiver) -> None:
    """Every replica of ``labelloop serve`` runs a delivery worker on the shared outbox. A burst of webhooks
    lands on either replica, and each one wakes both workers (the worst case: they sync and claim at the same
    moments); the receiver still gets every escalation exactly once."""
    receiver.up()
    n = 24
    journal_path = tmp_path / "journal.sqlite"
    with (Journal(journal_path, TAXONOMY, policy=POLICY) as journal_a,
          Journal(journal_path, TAXONOMY, policy=POLICY) as journal_b,
          EscalationOutbox(store_db()) as outbox_a, EscalationOutbox(store_db()) as outbox_b):
        workers = [DeliveryWorker(outbox, journal, receiver.url, retry_seconds=0.05, retry_max_seconds=0.2,
                                  idle_seconds=0.05) for outbox, journal in ((outbox_a, journal_a),
                                                                             (outbox_b, journal_b))]
        for worker in workers:
            worker.start()
        try:
            for i in range(n):
                (journal_a, journal_b)[i % 2].record(review_event(i + 1, 10 + i))
                for worker in workers:
                    worker.wake()
            wait_for(lambda: outbox_b.counts() == {"open": 0, "delivered": n}, "both workers to deliver",
                     timeout=60)
            time.sleep(0.3)  # several more passes of both workers: nothing more may be sent
        finally:
            for worker in workers:
                worker.close()
        assert outbox_a.counts() == {"open": 0, "delivered": n}
    keys = [p["key"] for p in receiver.posts]
    assert len(keys) == n and len(set(keys)) == n
    assert sorted(p["body"]["annotation_id"] for p in receiver.posts) == list(range(1, n + 1))


def test_a_replica_started_while_postgresql_is_unreachable_creates_the_tables_once_it_is_back(
        journal: Journal, pg_server) -> None:
    """Opening the store must not take a replica down with the database: the webhook path and the worker
    already survive a failed sync, and the tables appear at the first use that reaches the server."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    admin = pg_server.get_uri()
    url = admin.replace("/postgres?", "/not_created_yet?", 1)
    journal.record(review_event(1, 10))
    with EscalationOutbox(Database.postgres(url, "escalations")) as outbox:  # the database is not there yet
        with pytest.raises(OperationalError):
            outbox.counts()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE not_created_yet")
        try:
            assert outbox.sync(journal) == 1 and outbox.counts() == {"open": 1, "delivered": 0}
        finally:
            outbox.close()
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("DROP DATABASE not_created_yet WITH (FORCE)")


def test_a_store_whose_database_is_unreachable_is_one_cli_error_line() -> None:
    import typer

    from labelloop.cli_errors import friendly_errors

    @friendly_errors
    def listing() -> None:
        with EscalationOutbox(Database.postgres("postgresql://labelloop@127.0.0.1:1/state", "escalations")) as outbox:
            outbox.entries()

    with pytest.raises(typer.Exit) as exited:
        listing()
    assert exited.value.exit_code == 2


def test_without_a_url_nothing_is_sent_and_nothing_is_dropped(journal: Journal, store_db) -> None:
    journal.record(review_event(1, 10))
    with EscalationOutbox(store_db()) as outbox, httpx.Client() as client:
        outbox.sync(journal)
        assert outbox.deliver(None, client, retry_seconds=1, retry_max_seconds=1).pending == 1


# --- surfaced: the service's API and the CLI -------------------------------------------------------


def test_service_journals_lists_and_counts_a_webhook_escalation_once(settings: Settings, receiver: Receiver) -> None:
    from fastapi.testclient import TestClient

    from active_learning.service import Service

    receiver.up()
    service = Service(settings.model_copy(update={"poll_seconds": 0, "escalation_url": receiver.url,
                                                  "severity": POLICY.severity}))
    try:
        service.delivery.start()
        with TestClient(service.app) as client:
            payload = review_event(1, 10, reveal=True)
            assert client.post("/webhook", json=payload).json()["result"]["status"] == "accepted"
            assert client.post("/webhook", json=payload).json()["result"]["status"] == "duplicate"
            client.post("/webhook", json=review_event(2, 11, label="neither", severity="low", escalate=False,
                                                      reason=None, annotator=2))
            listing = client.get("/v1/escalations").json()
            assert listing["open"] + listing["delivered"] == 1
            assert listing["escalations"][0]["reason"] == "credible threat against a named person"
            wait_for(lambda: client.get("/v1/escalations", params={"status": "delivered"}).json()["delivered"] == 1,
                     "the worker to deliver", timeout=30)
            assert client.get("/v1/escalations", params={"status": "open"}).json()["escalations"] == []
            future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
            assert client.get("/v1/escalations", params={"since": future}).json()["escalations"] == []
            assert client.get("/v1/escalations", params={"status": "closed"}).status_code == 422
            assert client.get("/v1/escalations", params={"since": "0.5"}).status_code == 422  # not ISO-8601
        day = "2025-03-01"
        assert service.exposure.day(1, day).severe_seen == 1 and service.exposure.day(1, day).reveals == 1
        assert service.exposure.day(2, day).severe_seen == 0
    finally:
        service.close()
    assert len(receiver.delivered()) == 1


def test_reconciliation_that_applies_a_lost_webhook_queues_its_escalation_and_counts_exposure(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A webhook Label Studio cannot authenticate never arrives: the reconciler is the only path in, and the
    escalation and the reviewer's exposure must follow it without waiting for a webhook."""
    from active_learning import service as service_module
    from active_learning.reconcile import ReconcileReport
    from active_learning.service import Service

    def reconcile(client: Any, project_id: int, journal: Journal) -> ReconcileReport:
        lost = review_event(1, 10, reveal=True)
        applied = journal.apply_annotation(lost["annotation"], lost["task"]).status == "accepted"
        return ReconcileReport(seen=1, applied=int(applied), duplicates=0, deleted=0, quarantined=0, ignored=0)

    monkeypatch.setattr(service_module, "reconcile", reconcile)
    service = Service(settings.model_copy(update={"poll_seconds": 0, "ls_project_id": 1,
                                                  "severity": POLICY.severity}), client=object())
    try:
        assert service.reconcile_once()["applied"] == 1
        assert service.escalations.counts() == {"open": 1, "delivered": 0}
        assert service.exposure.day(1, "2025-03-01").reveals == 1
    finally:
        service.close()


def test_cli_lists_escalations_as_a_table_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from labelloop import cli

    settings = Settings(state_dir=tmp_path / "var", mlruns_dir=tmp_path / "mlruns")
    with Journal(settings.journal_path, TAXONOMY) as journal:
        journal.record(review_event(1, 10))
        journal.record(review_event(2, 11, minute=3, reason="self-harm risk"))
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    monkeypatch.setattr(cli, "console", Console(width=220))
    runner = CliRunner()
    table = runner.invoke(cli.app, ["escalations"])
    assert table.exit_code == 0, table.output
    assert "2 open, 0 delivered" in table.output and "self-harm risk" in table.output
    listed = json.loads(runner.invoke(cli.app, ["escalations", "--json", "--since", "2025-03-01T10:02"]).output)
    assert [e["reason"] for e in listed["escalations"]] == ["self-harm risk"]
    assert json.loads(runner.invoke(cli.app, ["escalations", "--json", "--status", "delivered"]).output)[
        "escalations"] == []
    bad = runner.invoke(cli.app, ["escalations", "--since", "yesterday"])
    assert bad.exit_code == 2 and "error:" in bad.output and "--since 'yesterday'" in bad.output
    no_url = runner.invoke(cli.app, ["escalations", "--deliver"])
    assert no_url.exit_code == 2 and "escalation_url" in no_url.output



# --- against a real Label Studio ---------------------------------------------------------------------

REVIEW_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="label" toName="text" choice="single" showInline="true">
    <Choice value="hate"/><Choice value="offensive"/><Choice value="neither"/>
  </Choices>
  <Choices name="severity" toName="text" choice="single" showInline="true">
    <Choice value="low"/><Choice value="medium"/><Choice value="high"/><Choice value="critical"/>
  </Choices>
  <Choices name="escalate" toName="text" choice="multiple"><Choice value="Escalate"/></Choices>
  <TextArea name="escalation_reason" toName="text" maxSubmissions="1"/>
  <Choices name="reveal" toName="text" choice="multiple"><Choice value="show original"/></Choices>
</View>"""


@pytest.mark.integration
def test_review_marks_round_trip_from_label_studio_webhooks_and_reconcile_exactly_once(
    label_studio, davidson_small, tmp_path: Path
) -> None:
    from active_learning.reconcile import reconcile
    from labelloop.exposure import ExposureLedger
    from labelloop.policy import Protection
    from tests.test_reconcile import WebhookReceiver

    sdk, client = label_studio.sdk, label_studio.client
    project = sdk.projects.create(title=f"review-{os.getpid()}-{time.monotonic_ns()}", label_config=REVIEW_CONFIG)
    journal = Journal(tmp_path / "journal.sqlite", TAXONOMY, policy=POLICY)
    hook = WebhookReceiver(journal)
    try:
        sdk.webhooks.create(project=project.id, url=hook.url, send_payload=True, send_for_all_actions=True)
        items = davidson_small.frame.iloc[:2][["id", "text"]].reset_index(drop=True)
        tasks = client.import_tasks(project.id, items)
        first, second = (tasks[i] for i in items["id"])
        made = sdk.annotations.create(first, result=review_result(reveal=True), lead_time=3.0)
        sdk.annotations.create(second, result=review_result("neither", severity="extreme", escalate=True,
                                                             reason=None))
        wait_for(lambda: len(journal.annotations(project.id)) == 2, "two annotation webhooks")

        rows = journal.annotations(project.id).set_index("task_id")
        assert rows.loc[first, ["label", "severity", "escalated", "revealed"]].tolist() == ["hate", "critical",
                                                                                              True, True]
        assert rows.loc[second, ["label", "escalated"]].tolist() == ["neither", False]
        assert pd.isna(rows.loc[second, "severity"])
        reasons = sorted(q["reason"].split(":")[0] for q in journal.quarantined())
        assert reasons == ["escalation", "severity"]  # both parts of the second annotation, its label kept

        assert reconcile(client, project.id, journal).duplicates == 2  # the listing is the same version
        sdk.annotations.update(made.id, result=review_result(severity="high", reason="updated reason"))
        wait_for(lambda: journal.annotations(project.id).set_index("task_id").loc[first, "severity"] == "high",
                 "the update webhook")
        reconcile(client, project.id, journal)
        [escalation] = journal.escalations()
        assert (escalation["task_id"], escalation["reason"], escalation["item_id"]) == (
            first, "credible threat against a named person", items["id"][0])

        with ExposureLedger(tmp_path / "exposure.sqlite") as ledger:
            ledger.sync(journal, POLICY.severity, Protection(lexicon=None))
            ledger.sync(journal, POLICY.severity, Protection(lexicon=None))
            [reviewer] = ledger.per_reviewer()
            assert (reviewer.severe_seen, reviewer.reveals) == (1, 1)
    finally:
        hook.close()
        journal.close()
        sdk.projects.delete(project.id)
