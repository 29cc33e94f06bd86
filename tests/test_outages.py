"""Dependencies down, against real processes: a `labelloop serve` subprocess, a real MLflow server that the test
starts and kills, the session's real Label Studio stopped and started, a journal file that cannot be written
and (where the test may mount one) a filesystem that is full.

What must hold: serving keeps answering (or says clearly, with 503, that it cannot), `/health` says what is
down and when it is retried, nothing is acknowledged that was not durably written, and every dependency is
picked up again once it is back, without a restart.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from active_learning.jobs import JobRunner
from labelloop import data
from labelloop.config import Settings
from labelloop.db import Database
from labelloop.journal import Journal
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy, label_config_xml
from serving.app import create_app
from serving.champion import Backoff
from tests.fakes import EmptyRegistry
from tests.label_studio_fixtures import RunningLabelStudio
from tests.test_journal import annotation, event, task

TAXONOMY = get_taxonomy("hate_offensive")
CONFIG = label_config_xml(TAXONOMY)
BIN = Path(sys.executable).parent
START_TIMEOUT = 300.0  # a serve process or MLflow server on a loaded 2-core box


# ------------------------------------------------------------------------------------------ processes
class Child:
    """A child process in its own process group (so a kill reaches its workers), logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(httpx.HTTPError):
            if condition():
                return
        if child is not None and not child.alive():
            raise AssertionError(f"the process died while waiting for {what}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f":\n{child.tail()}" if child else ""))
        time.sleep(0.2)


@dataclass
class Backend:
    url: str
    child: Child
    state_dir: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def health(self) -> dict[str, Any]:
        r = self.get("/health")
        assert r.status_code == 200, r.text
        return r.json()


@contextmanager
def serve(tmp_path: Path, settings: Settings, **overrides: str) -> Iterator[Backend]:
    """`labelloop serve` as its own process, on a free port, with ``settings``' directories and short retry
    waits; ``overrides`` are more LABELLOOP_* settings. Nothing of this machine's own LABELLOOP_* leaks in."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELLOOP_")}
    env.update({
        "LABELLOOP_STATE_DIR": str(settings.state_dir), "LABELLOOP_MLRUNS_DIR": str(settings.mlruns_dir),
        "LABELLOOP_CACHE_DIR": str(settings.cache_dir), "LABELLOOP_DATA_DIR": str(settings.data_dir),
        "LABELLOOP_POLL_SECONDS": "0.5", "LABELLOOP_BACKOFF_FIRST_SECONDS": "0.5",
        "LABELLOOP_BACKOFF_MAX_SECONDS": "2", "LABELLOOP_QUANTIZE": "none", "LABELLOOP_RETRAIN_EVERY": "100000",
        "LABELLOOP_RECONCILE_SECONDS": "0", "LABELLOOP_DRIFT_EVERY_SECONDS": "0",
        "LABELLOOP_CONFIG": str(tmp_path / "no-labelloop.toml"),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        **overrides,
    })
    child = Child([str(BIN / "labelloop"), "serve", "--host", "127.0.0.1", "--port", str(port)], env,
                  tmp_path / f"serve-{port}.log", tmp_path)
    backend = Backend(f"http://127.0.0.1:{port}", child, settings.state_dir)
    try:
        wait_until(lambda: backend.get("/health").status_code == 200, "labelloop serve to answer /health",
                   START_TIMEOUT, child)
        yield backend
    finally:
        child.kill(signal.SIGTERM)


def start_mlflow(tmp_path: Path, port: int) -> Child:
    store = tmp_path / "mlflow-server"
    store.mkdir(exist_ok=True)
    child = Child([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                   "--default-artifact-root", (store / "artifacts").as_uri()],
                  {**os.environ}, tmp_path / "mlflow-server.log", store)
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
               "the MLflow server to answer /health", START_TIMEOUT, child)
    return child


def train_champion(settings: Settings, davidson_small: data.LabeledData) -> str:
    """A fast-mode champion on real Davidson rows, registered and promoted in ``settings``' registry."""
    from training.registry import Registry
    from training.train import train_and_register

    frame = davidson_small.frame.sample(frac=1.0, random_state=3).reset_index(drop=True)
    result = train_and_register(frame.iloc[:150], None, davidson_small.taxonomy, mode="fast", settings=settings,
                                source="outage-test", eval_frame=frame.iloc[150:250])
    Registry(settings).promote(result.ref.version, force=True)
    return result.ref.label


def labelled_event(n: int, label: str, text: str | None = None) -> dict:
    return event(ann=annotation(n, task_id=500 + n, label=label), tsk=task(500 + n, text or f"outage text {n}"))


def predict_body(texts: list[str]) -> dict:
    return {"tasks": [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(texts)], "project": "3.1",
            "label_config": CONFIG}


@pytest.fixture(scope="module")
def sqlite_champion(tmp_path_factory: pytest.TempPathFactory, davidson_small: data.LabeledData,
                    embedding_cache_dir: Path) -> tuple[Path, str]:
    """One champion in a SQLite registry, shared by the tests that need MLflow to be up (it is a file)."""
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("champion")
    settings = Settings(mlruns_dir=root / "mlruns", state_dir=root / "var", data_dir=SHARED_DATA,
                        cache_dir=embedding_cache_dir)
    return settings.mlruns_dir, train_champion(settings, davidson_small)


# ------------------------------------------------------------------------------------------ MLflow
@pytest.mark.integration
def test_mlflow_down_at_start_then_up_then_down_again_and_a_retrain_that_crashes(
        tmp_path: Path, settings: Settings, davidson_small: data.LabeledData) -> None:
    """Start with MLflow unreachable: serve without a champion, say why, refuse predictions with 503. MLflow
    comes up and gets a champion: it is served without a restart. MLflow dies: the champion stays, /health
    shows the registry down. A retrain then crashes: the job is failed with a reason, the champion unchanged."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with serve(tmp_path, settings, LABELLOOP_TRACKING_URI=uri) as backend:
        health = backend.health()
        assert health["status"] == "UP" and health["model_loaded"] is False
        assert f"MLflow at {uri} unreachable" in health["champion_error"]
        registry = health["dependencies"]["registry"]
        assert registry["status"] == "unavailable" and registry["since"] and f"MLflow at {uri}" in registry["detail"]
        assert registry["retry_in_s"] is not None and 0 <= registry["retry_in_s"] <= 2  # capped backoff
        assert health["dependencies"]["journal"]["status"] == "ok"
        r = backend.post("/v1/predict", {"texts": ["you people are awful"]})
        assert r.status_code == 503 and "unreachable" in r.json()["detail"]
        r = backend.post("/predict", predict_body(["you people are awful"]))
        assert r.status_code == 503 and "unreachable" in r.json()["detail"]
        assert backend.post("/webhook", labelled_event(1, "hate")).status_code == 201  # the journal is fine

        mlflow = start_mlflow(tmp_path, port)
        try:
            champion = train_champion(settings.model_copy(update={"tracking_uri": uri}), davidson_small)
            wait_until(lambda: backend.health()["model_version"] == champion, "the champion to be picked up",
                       120, backend.child)
            health = backend.health()
            assert health["champion_error"] is None and health["dependencies"]["registry"]["status"] == "ok"
            r = backend.post("/v1/predict", {"texts": ["you people are awful"]})
            assert r.status_code == 200 and r.json()["model_version"] == champion
        finally:
            mlflow.kill()

        wait_until(lambda: backend.health()["dependencies"]["registry"]["status"] == "unavailable",
                   "/health to show the registry down", 60, backend.child)
        health = backend.health()
        assert health["model_version"] == champion and health["model_loaded"] and health["champion_error"] is None
        r = backend.post("/v1/predict", {"texts": ["you people are awful", "what a lovely day"]})
        assert r.status_code == 200 and r.json()["model_version"] == champion
        assert backend.post("/predict", predict_body(["what a lovely day"])).status_code == 200
        assert "MLflow at" in backend.child.tail(200_000)  # logged, once per outage (see the unit test below)

        for n, label in enumerate(["hate", "offensive", "neither", "offensive", "neither"], start=2):
            assert backend.post("/webhook", labelled_event(n, label)).status_code == 201
        job = backend.post("/jobs/retrain", {"reason": "outage test"})
        assert job.status_code == 202
        job_id = job.json()["id"]
        wait_until(lambda: backend.get(f"/jobs/{job_id}").json()["state"] == "failed", "the retrain job to fail",
                   180, backend.child)
        failed = backend.get(f"/jobs/{job_id}").json()
        assert f"127.0.0.1:{port}" in failed["error"] and failed["finished_at"]  # why: MLflow was gone
        assert backend.health()["model_version"] == champion
        assert backend.post("/v1/predict", {"texts": ["hello"]}).json()["model_version"] == champion
    stored = JobRunner(settings.database("jobs"), run_jobs=False)
    try:
        job = stored.get(job_id)
        assert job.state == "failed" and job.error == failed["error"]
    finally:
        stored.close()


# ------------------------------------------------------------------------------------------ the journal
def _probe_writable(path: Path) -> bool:
    try:
        with open(path, "r+b"):
            return True
    except OSError:
        return False


@contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make ``path`` refuse writes: chmod for an ordinary user. Root ignores modes, so there the immutable
    attribute (chattr +i), or, on a filesystem without it (tmpfs), a read-only bind mount of the file over
    itself. Skips the test where none of these works."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        undo = [["chmod", "644", str(path)]]
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = [["chattr", "-i", str(path)]]
    else:
        for step in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
            made = subprocess.run(step, capture_output=True, text=True)
            if made.returncode != 0:
                subprocess.run(["umount", "-l", str(path)], check=False)
                pytest.skip(f"cannot make {path} read-only as root here: {' '.join(step)}: {made.stderr.strip()}")
        undo = [["umount", "-l", str(path)]]
    try:
        if _probe_writable(path):
            pytest.skip(f"{path} stays writable after {undo[0][0]}")
        yield
    finally:
        for step in undo:
            subprocess.run(step, check=False)


@contextmanager
def tiny_filesystem(where: Path, size: str = "16m") -> Iterator[bool]:
    """A small tmpfs at ``where`` when this process may mount one (root); yields False (and mounts nothing)
    otherwise, so the caller skips the full-disk step and the unit test with SQLite's own SQLITE_FULL stands
    in for it."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last block."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        with suppress(OSError):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
                os.fsync(out.fileno())
    return filler


@pytest.mark.integration
def test_unwritable_journal_refuses_webhooks_with_503_and_serving_goes_on(
        tmp_path: Path, settings: Settings, sqlite_champion: tuple[Path, str]) -> None:
    """The journal is read-only when the service starts: it starts anyway, serves predictions, refuses every
    webhook with 503 and a reason (never 201), and says so in /health; once writable, webhooks are journaled
    again without a restart. Then (where a tiny filesystem can be mounted) the disk fills up: 503 again, no
    half-written event, and 201 once there is room."""
    mlruns, champion = sqlite_champion
    with tiny_filesystem(tmp_path / "state") as small_disk, ExitStack() as read_only:
        settings = settings.model_copy(update={"mlruns_dir": mlruns, "state_dir": tmp_path / "state"})
        Journal(settings.journal_path, TAXONOMY).close()
        read_only.enter_context(read_only_file(settings.journal_path))
        with serve(tmp_path, settings) as backend:
            health = backend.health()
            journal_health = health["dependencies"]["journal"]
            assert journal_health["status"] == "unavailable" and "cannot be written" in journal_health["detail"]
            assert journal_health["since"]
            wait_until(lambda: backend.health()["model_version"] == champion, "the champion", 120, backend.child)
            r = backend.post("/webhook", labelled_event(1, "hate"))
            assert r.status_code == 503 and "cannot be written" in r.json()["detail"]
            r = backend.post("/v1/predict", {"texts": ["you people are awful"]})
            assert r.status_code == 200 and r.json()["model_version"] == champion

            read_only.close()  # writable again, the service still running
            r = backend.post("/webhook", labelled_event(1, "hate"))
            assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
            assert backend.health()["dependencies"]["journal"]["status"] == "ok"

            if small_disk:
                filler = fill(settings.state_dir)
                try:
                    big = labelled_event(2, "offensive", "x" * 2_000_000)  # needs pages the WAL does not have yet
                    r = backend.post("/webhook", big)
                    assert r.status_code == 503 and "cannot be written" in r.json()["detail"]
                    assert backend.post("/v1/predict", {"texts": ["hello"]}).status_code == 200
                    assert backend.health()["dependencies"]["journal"]["status"] == "unavailable"
                finally:
                    filler.unlink()
                r = backend.post("/webhook", big)
                assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
        with Journal(settings.journal_path, TAXONOMY) as journal:
            stats = journal.stats()
            assert stats["events"] == (2 if small_disk else 1) == stats["live_labels"]  # the refused ones left no trace



@pytest.mark.integration
def test_a_retrain_killed_with_the_service_is_failed_after_restart_and_the_champion_is_unchanged(
        tmp_path: Path, settings: Settings, sqlite_champion: tuple[Path, str],
        davidson_small: data.LabeledData) -> None:
    """``kill -9`` of the service while its retrain job trains: after a restart the job is ``failed`` with
    the reason, in ``/jobs/{id}`` and in the job store, and the same champion is served."""
    mlruns, champion = sqlite_champion
    settings = settings.model_copy(update={"mlruns_dir": mlruns})
    rows = davidson_small.frame.sample(200, random_state=11)
    with serve(tmp_path, settings) as backend:
        for n, (text, label) in enumerate(zip(rows["text"], rows["label"], strict=True), start=1):
            assert backend.post("/webhook", labelled_event(n, label, text)).status_code == 201
        job_id = backend.post("/jobs/retrain", {"reason": "killed mid-training"}).json()["id"]
        wait_until(lambda: backend.get(f"/jobs/{job_id}").json()["message"].startswith("training on"),
                   "the job to start training", 120, backend.child)
        backend.child.kill(signal.SIGKILL)
    with serve(tmp_path, settings) as backend:
        job = backend.get(f"/jobs/{job_id}").json()
        assert job["state"] == "failed" and "interrupted" in job["error"]
        wait_until(lambda: backend.health()["model_version"] == champion, "the champion", 120, backend.child)
    stored = JobRunner(settings.database("jobs"), run_jobs=False)
    try:
        assert stored.get(job_id).state == "failed"
    finally:
        stored.close()


# ------------------------------------------------------------------------------------------ Label Studio
@pytest.mark.integration
def test_label_studio_down_reconciliation_backs_off_and_recovers_while_serving_goes_on(
        tmp_path: Path, settings: Settings, sqlite_champion: tuple[Path, str], label_studio: RunningLabelStudio,
        ls_project: int, davidson_small: data.LabeledData) -> None:
    mlruns, champion = sqlite_champion
    settings = settings.model_copy(update={"mlruns_dir": mlruns})
    items = davidson_small.frame.iloc[:3][["id", "text"]].reset_index(drop=True)
    tasks = label_studio.client.import_tasks(ls_project, items)
    with serve(tmp_path, settings, LABELLOOP_LS_URL=label_studio.url, LABELLOOP_LS_API_KEY=label_studio.api_key,
               LABELLOOP_LS_PROJECT_ID=str(ls_project), LABELLOOP_RECONCILE_SECONDS="0.5") as backend:
        wait_until(lambda: backend.health()["dependencies"]["label_studio"]["status"] == "ok"
                   and backend.health()["model_version"] == champion, "a first reconciliation and the champion",
                   120, backend.child)
        label_studio.server.stop()
        try:
            wait_until(lambda: backend.health()["dependencies"]["label_studio"]["status"] == "unavailable",
                       "/health to show Label Studio down", 60, backend.child)
            time.sleep(3)  # a few more failed passes: the backoff reaches its cap (2 s) and stays there
            down = backend.health()["dependencies"]["label_studio"]
            assert down["since"] and "Label Studio at" in down["detail"]
            assert down["retry_in_s"] is not None and down["retry_in_s"] <= 2
            r = backend.post("/webhook", labelled_event(1, "hate"))
            assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
            r = backend.post("/v1/predict", {"texts": ["you people are awful"]})
            assert r.status_code == 200 and r.json()["model_version"] == champion
            log = backend.child.tail(200_000)
            assert log.count("reconciliation failed:") == 1  # logged when the outage began, not on every pass
        finally:
            label_studio.server.start(timeout=START_TIMEOUT)
        wait_until(lambda: backend.health()["dependencies"]["label_studio"]["status"] == "ok",
                   "reconciliation to recover", 60, backend.child)
        made = label_studio.client.create_annotation(tasks[items["id"][0]], "offensive")  # no webhook: reconcile only

        def reconciled() -> bool:
            with Journal(settings.journal_path, TAXONOMY) as journal:
                return made["id"] in journal.live_annotation_ids(ls_project)

        wait_until(reconciled, "the reconciler to pull the new annotation", 60, backend.child)
        assert "works again" in backend.child.tail(200_000)


# ------------------------------------------------------------------------------------------ unit level
class FlakySource(EmptyRegistry):
    """A registry that is down until ``up`` is set."""

    def __init__(self) -> None:
        super().__init__("flaky")
        self.up = False
        self.asked = 0

    def current_version(self) -> int | None:
        self.asked += 1
        if not self.up:
            raise ConnectionError("connection refused")
        return None


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.failed(100.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.retry_at == 104.0 and not backoff.due(103.9) and backoff.due(104.0)
    backoff.succeeded()
    assert not backoff.failing and backoff.failed(0.0) == 0.5


def test_registry_outage_is_retried_with_backoff_and_logged_once(settings: Settings, caplog) -> None:
    source = FlakySource()
    app = create_app(settings.model_copy(update={"poll_seconds": 0, "backoff_first_seconds": 0.05,
                                                 "backoff_max_seconds": 0.2}), model_source=source)
    with caplog.at_level("DEBUG", logger="serving.champion"), TestClient(app) as client:
        time.sleep(1.0)  # waits 0.05, 0.1, 0.2, 0.2, ...: about 7 attempts, not one per tick of a busy loop
        assert 2 <= source.asked <= 12  # it retries, and far below a busy loop (loose: CI machines stall)
        health = client.get("/health").json()
        assert "connection refused" in health["champion_error"] and health["retry_in_s"] <= 0.2
        assert client.post("/v1/predict", json={"texts": ["x"]}).status_code == 503
        source.up = True
        deadline = time.monotonic() + 5
        while client.get("/health").json()["dependencies"]["registry"]["status"] != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/health").json()["champion_error"] is None
        asked = source.asked
        time.sleep(0.5)
        assert source.asked == asked  # poll_seconds 0: no polling once the registry answers
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "connection refused" in r.getMessage()]
    assert len(errors) == 1


class UnloadableSource(FlakySource):
    """A registry whose champion v1 cannot be loaded, until the alias is removed (``version = None``)."""

    def __init__(self) -> None:
        super().__init__()
        self.version: int | None = 1
        self.loads = 0

    def current_version(self) -> int | None:
        self.asked += 1
        return self.version

    def load(self, version: int):
        self.loads += 1
        raise OSError("model artifact missing")


def test_a_failing_champion_whose_alias_is_removed_stops_retrying(settings: Settings) -> None:
    """The failed load's backoff must end with the alias: a past-due retry that is never reset would make the
    poller ask the registry in a busy loop."""
    source = UnloadableSource()
    app = create_app(settings.model_copy(update={"poll_seconds": 0, "backoff_first_seconds": 0.05,
                                                 "backoff_max_seconds": 0.1}), model_source=source)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while source.loads < 2:  # the first load, then at least one retry with backoff
            assert time.monotonic() < deadline
            time.sleep(0.05)
        source.version = None
        while "no champion" not in (client.get("/health").json()["detail"] or ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        asked = source.asked
        time.sleep(0.5)
        assert source.asked - asked <= 1  # poll_seconds 0: nothing left to retry, so nothing is asked


def test_full_journal_answers_503_and_writes_nothing(settings: Settings) -> None:
    """SQLite's own SQLITE_FULL (max_page_count reached), the error a full disk gives: 503, nothing journaled,
    predictions unaffected; with room again, the same event is accepted."""
    with Journal(settings.journal_path, TAXONOMY) as journal:
        app = create_app(settings.model_copy(update={"poll_seconds": 0}), model_source=FlakySource(), journal=journal)
        with TestClient(app) as client:
            assert client.post("/webhook", json=labelled_event(1, "hate")).status_code == 201
            pages = journal._conn.execute("PRAGMA page_count").fetchone()[0]
            journal._conn.execute(f"PRAGMA max_page_count = {pages}")
            big = labelled_event(2, "offensive", "y" * 200_000)
            r = client.post("/webhook", json=big)
            assert r.status_code == 503 and "full" in r.json()["detail"]
            assert client.get("/health").json()["dependencies"]["journal"]["status"] == "unavailable"
            journal._conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
            r = client.post("/webhook", json=big)
            assert r.status_code == 201 and r.json()["result"]["status"] == "accepted"
            assert client.get("/health").json()["dependencies"]["journal"]["status"] == "ok"
        assert journal.stats()["events"] == 2


def test_a_job_that_raises_systemexit_fails_with_a_reason_and_the_worker_lives_on(tmp_path: Path) -> None:
    calls = []

    def work(progress) -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise SystemExit("a library gave up")
        return {"ok": True}

    runner = JobRunner(Database.sqlite(tmp_path / "jobs.sqlite"), work)
    try:
        first = runner.wait(runner.submit("one").id, 30)
        assert first.state == "failed" and first.error == "SystemExit: a library gave up"
        second = runner.wait(runner.submit("two").id, 30)
        assert second.state == "done" and second.result == {"ok": True}
    finally:
        runner.close()


def test_a_read_only_journal_opens_for_reading_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with Journal(path, TAXONOMY) as journal:
        journal.record(labelled_event(1, "hate"))
    with read_only_file(path):
        with Journal(path, TAXONOMY) as journal:
            assert journal.write_problem and journal.labels()["label"].tolist() == ["hate"]
            with pytest.raises(Exception, match="cannot be written"):
                journal.record(labelled_event(2, "hate"))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    finally:
        conn.close()

