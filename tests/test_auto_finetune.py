"""Fine-tuning as a background retrain: when one is due (pure schedule), one job per threshold across threads,
replicas and restarts (the jobs store's mark), fine-tunes in a lane of their own beside the rounds, bad settings
refused; and end to end on a real MLflow store: crossing the threshold queues one fine-tune that trains with
progress, is registered, gated (the decision in the audit trail) and swapped into serving."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from pydantic import ValidationError
from typer.testing import CliRunner

from active_learning.auto_finetune import MARK, AutoFinetune, FinetuneProgress, FinetuneSchedule
from active_learning.jobs import FINETUNE, INTERRUPTED, RETRAIN, JobRunner, jobs_router
from labelloop import data
from labelloop.config import Settings, get_settings
from labelloop.db import Database
from labelloop.ls_server import free_port
from tests.test_jobs import Gate, until
from tests.test_journal import annotation, event, task


# ------------------------------------------------------------------------------------------ the schedule
def test_a_fine_tune_is_due_at_each_threshold_once():
    schedule = FinetuneSchedule(after=2000, every=2000)
    assert schedule.due(1999, 0) is None
    assert schedule.due(2000, 0) == 2000
    assert schedule.due(3999, 2000) is None  # queued for 2000 already
    assert schedule.due(4000, 2000) == 4000
    # thresholds passed together (a service that was down, a schedule turned on late) are one fine-tune
    assert schedule.due(9000, 0) == 8000
    assert schedule.due(9000, 8000) is None
    assert [schedule.next_threshold(d) for d in (0, 1999, 2000, 5000, 8000)] == [2000, 2000, 4000, 6000, 10000]
    uneven = FinetuneSchedule(after=50, every=30)
    assert [uneven.threshold(n) for n in (49, 50, 79, 80, 111)] == [None, 50, 50, 80, 110]


def test_the_decision_moves_the_mark_only_when_due():
    decide = FinetuneSchedule(after=40, every=40).decide(85)
    value, reason = decide(None)
    assert value == "80" and "fine-tune at 80" in reason
    assert decide("80") is None
    assert decide("40") == ("80", reason)


@pytest.mark.parametrize(("after", "every"), [(0, 10), (10, 0), (-5, 10), (10, -1), (True, 10), (2.5, 10)])
def test_a_schedule_refuses_thresholds_that_are_not_positive_counts(after, every):
    with pytest.raises(ValueError, match="must be a positive number of labels"):
        FinetuneSchedule(after, every)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("finetune_after_labels", 0, "must be a positive number of labels"),
    ("finetune_every_labels", -3, "must be a positive number of labels"),
    ("finetune_after_labels", "lots", "valid integer"),
    ("auto_finetune", "maybe", "valid boolean"),
])
def test_settings_refuse_a_broken_fine_tune_setting(field, value, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})


def test_the_cli_names_a_broken_threshold_and_exits_2(tmp_path, monkeypatch):
    from labelloop.cli import app

    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "no-such.toml"))
    monkeypatch.setenv("LABELLOOP_FINETUNE_EVERY_LABELS", "0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["loop", "finetune"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "error: invalid setting finetune_every_labels='0': must be a positive number of labels" in result.output
    assert not (tmp_path / "var" / "jobs.sqlite").exists()  # nothing half-written


def test_progress_maps_training_steps_into_the_job_s_range_at_most_once_a_second():
    reports: list[tuple[float, str]] = []
    now = [0.0]
    progress = FinetuneProgress(lambda f, m: reports.append((round(f, 3), m)), 0.1, 0.9, clock=lambda: now[0])
    progress("train", 1, 100)
    progress("train", 2, 100)  # within the second: dropped
    now[0] = 1.5
    progress("train", 50, 100)
    progress("validate", 10, 20)  # dropped too: tiny epochs alternate stages many times a second
    progress("train", 100, 100)  # the last step always reports
    now[0] = 3.0
    progress("validate", 20, 20)  # where training left off
    assert reports == [(0.108, "fine-tuning: step 1 of 100"), (0.5, "fine-tuning: step 50 of 100"),
                       (0.9, "fine-tuning: step 100 of 100"), (0.9, "fine-tuning: validate 20 of 20")]


# ------------------------------------------------------------------------------------------ the jobs store
@pytest.fixture
def store(tmp_path, state_backend):
    return lambda: Database.open(state_backend, tmp_path / "jobs.sqlite", "jobs")


def finetunes(runner: JobRunner) -> list:
    return [job for job in runner.list(limit=200) if job.kind == FINETUNE]


def test_one_threshold_queues_one_fine_tune_across_replicas_and_restarts(store):
    schedule = FinetuneSchedule(after=2000, every=2000)
    replicas = [JobRunner(store(), run_jobs=False) for _ in range(3)]
    queued: list = []
    start = threading.Barrier(len(replicas) * 2)

    def check(runner: JobRunner) -> None:
        start.wait()
        queued.append(AutoFinetune(runner, schedule).check(2100))

    threads = [threading.Thread(target=check, args=(r,)) for r in replicas for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(finetunes(replicas[0])) == 1
        assert len({job.id for job in queued if job is not None}) == 1
        assert replicas[0].meta(MARK) == "2000"
        first = finetunes(replicas[0])[0]
        replicas[0]._save(first.model_copy(update={"state": "running"}))  # a worker took it: nothing is queued
        for r in replicas:
            r.close()
        restarted = JobRunner(store(), run_jobs=False)
        replicas = [restarted]
        assert AutoFinetune(restarted, schedule).check(2100) is None  # the mark survived the restart
        assert len(finetunes(restarted)) == 1
        assert AutoFinetune(restarted, schedule).next_threshold() == 4000
        # the next threshold while the first one runs: one follow-up, and later thresholds join it
        follow_up = AutoFinetune(restarted, schedule).check(4100)
        assert follow_up is not None and follow_up.id != first.id
        assert AutoFinetune(restarted, schedule).check(6100).id == follow_up.id
        assert len(finetunes(restarted)) == 2 and restarted.meta(MARK) == "6000"
        assert AutoFinetune(restarted, None).check(9000) is None  # auto_finetune off
        assert restarted.meta(MARK) == "6000"
    finally:
        for r in replicas:
            r.close()


def test_fine_tunes_run_in_their_own_lane_beside_rounds_and_a_threshold_during_one_is_kept(store):
    rounds, tunes = Gate(), Gate()
    retrain = JobRunner(store(), rounds, poll_seconds=0.05)
    finetune = JobRunner(store(), tunes, poll_seconds=0.05, kind=FINETUNE)
    auto = AutoFinetune(retrain, FinetuneSchedule(after=100, every=100))
    try:
        first = auto.check(120)
        round_job = retrain.submit("100 new labels")
        assert round_job.kind == RETRAIN and first.kind == FINETUNE and round_job.id != first.id
        until(lambda: rounds.running == 1 and tunes.running == 1)  # a fine-tune does not hold up a round
        # thresholds crossed while the fine-tune runs: one follow-up is queued, never more
        follow_up = auto.check(210)
        assert follow_up is not None and follow_up.id != first.id and follow_up.state == "queued"
        assert auto.check(250) is None and auto.check(260) is None
        assert auto.check(330).id == follow_up.id  # a later threshold joins the queued follow-up
        assert [j.state for j in finetunes(retrain)] == ["queued", "running"]
        rounds.release.release()
        tunes.release.release()
        tunes.release.release()
        until(lambda: [j.state for j in finetunes(retrain)] == ["done", "done"])
        assert tunes.max_running == 1 and tunes.calls == 2
        until(lambda: retrain.get(round_job.id).state == "done")
        assert rounds.calls == 1
    finally:
        for gate in (rounds, tunes):
            for _ in range(5):
                gate.release.release()
        retrain.close()
        finetune.close()


def test_recovery_fails_only_orphans_of_its_own_kind(store):
    tunes = Gate()
    submitter = JobRunner(store(), run_jobs=False)
    orphan = submitter.submit("left running by a process that died", FINETUNE)
    submitter._save(orphan.model_copy(update={"state": "running", "runner": "gone:1:abc"}))
    rounds = JobRunner(store(), Gate(), poll_seconds=0.05)  # the retrain lane holds no claim on it
    try:
        time.sleep(0.3)
        assert submitter.get(orphan.id).state == "running"
        finetune = JobRunner(store(), tunes, poll_seconds=0.05, kind=FINETUNE)
        try:
            failed = submitter.get(orphan.id)
            assert failed.state == "failed" and failed.error == INTERRUPTED
        finally:
            finetune.close()
    finally:
        rounds.close()
        submitter.close()


def test_the_retrain_route_queues_a_fine_tune_when_asked(store):
    runner = JobRunner(store(), run_jobs=False)
    app = FastAPI()
    app.include_router(jobs_router(runner))
    client = TestClient(app)
    try:
        made = client.post("/jobs/retrain", json={"reason": "operator", "kind": "finetune"})
        assert made.status_code == 202 and made.json()["kind"] == "finetune"
        assert client.post("/jobs/retrain", json={"reason": "operator"}).json()["kind"] == "retrain"
        assert client.post("/jobs/retrain", json={"kind": "full"}).status_code == 422
        assert {j["kind"] for j in client.get("/jobs").json()["jobs"]} == {"finetune", "retrain"}
    finally:
        runner.close()


# ------------------------------------------------------------------------------------------ end to end
def label_event(n: int, row) -> dict:
    return event(ann=annotation(ann_id=n, task_id=1000 + n, label=row.label),
                 tsk=task(1000 + n, text=row.text, item_id=str(row.id)))


def interleaved(frame, per_class: int, seed: int):
    """``per_class`` rows of each class, one class after another: every 20 rows hold each class several times,
    so each round trains on all of them and the fine-tune's stratified split finds each class often enough."""
    groups = [g.sample(per_class, random_state=seed) for _, g in frame.groupby("label")]
    return iter([group.iloc[i] for i in range(per_class) for group in groups])


@pytest.mark.integration
def test_crossing_the_threshold_fine_tunes_once_registers_gates_and_swaps_serving(settings, tiny_bert, davidson):
    from active_learning.service import Service
    from tests.test_serving_integration import ServerThread
    from training.registry import CHAMPION, Registry
    from training.train import train_and_register

    settings = settings.model_copy(update={
        "base_model": tiny_bert, "max_length": 32, "retrain_every": 20, "finetune_after_labels": 40,
        "finetune_every_labels": 1000, "port": free_port(), "poll_seconds": 0, "reconcile_seconds": 0,
        "gate_bootstrap": 200,
        # this test is about the plumbing around the gate; its judgement is tested in test_registry
        "gate_min_gain": -1.0, "gate_max_recall_drop": 1.0})
    splits = data.split(davidson, seed=5)
    train_and_register(data.stratified_sample(splits.validation, 60, seed=5), None, davidson.taxonomy, mode="fast",
                       settings=settings, source="seed", eval_frame=data.stratified_sample(splits.test, 60, seed=5))
    registry = Registry(settings)
    assert registry.promote().promoted
    stream = interleaved(splits.train, 20, seed=5)
    labelled = 0

    def label(service: Service, count: int) -> None:
        nonlocal labelled
        for _ in range(count):
            labelled += 1
            payload = label_event(labelled, next(stream))
            service.on_event(payload, service.journal.record(payload))

    def rounds_done(service: Service, n: int) -> bool:
        jobs = [j for j in service.runner.list(limit=50) if j.kind == RETRAIN]
        return len(jobs) == n and all(j.state == "done" for j in jobs)

    service = Service(settings)
    try:
        with ServerThread(service.app, settings.port) as server:
            label(service, 20)  # a round on 20 labels: no fine-tune before 40
            until(lambda: rounds_done(service, 1), 120)
            assert finetunes(service.runner) == []
            label(service, 20)  # the round on 40 labels queues the fine-tune
            until(lambda: finetunes(service.runner), 120)
            seen: set[tuple[float, str]] = set()

            def finished() -> bool:
                job = finetunes(service.runner)[0]
                seen.add((job.progress, job.message))
                return job.state in ("done", "failed")

            until(finished, 300)
            job = finetunes(service.runner)[0]
            assert job.state == "done", job.error
            assert job.progress == 1.0 and "40 labels" in job.reason
            assert any(0 < p < 1 and m.startswith("fine-tuning: ") for p, m in seen), seen
            version = int(job.result["trained_version"].rsplit(":v", 1)[1])
            run = MlflowClient(settings.resolved_tracking_uri).get_run(
                registry.client.get_model_version(registry.name, str(version)).run_id)
            assert run.data.params["mode"] == "finetune" and run.data.params["labels"] == "40"
            decision = next(d for d in registry.history() if d.candidate == version)  # the gate's audit trail
            assert decision.promoted and job.result["promoted"] and job.result["mode"] == "finetune"
            assert registry.alias_version(CHAMPION) == version
            health = httpx.get(f"{server.url}/health", timeout=30).json()  # swapped with alias polling off
            assert health["model_version"] == job.result["trained_version"]

            label(service, 20)  # past 40 again, short of 1040: a round, and no second fine-tune
            until(lambda: rounds_done(service, 3), 120)
            assert len(finetunes(service.runner)) == 1
    finally:
        service.close()
    restarted = Service(settings)  # a restart looks again at start, and finds the mark moved
    try:
        restarted._at_start()
        assert len(finetunes(restarted.runner)) == 1
        assert restarted.auto_finetune.next_threshold() == 1040
    finally:
        restarted.close()


@pytest.mark.integration
def test_an_engineer_runs_a_fine_tune_from_the_cli_and_status_shows_it(tmp_path, monkeypatch, embedding_cache_dir,
                                                                      tiny_bert, davidson):
    from labelloop import cli as cli_module
    from labelloop.cli import app
    from labelloop.journal import Journal
    from training.registry import Registry
    from training.train import train_and_register

    for name, value in {"MLRUNS_DIR": tmp_path / "mlruns", "STATE_DIR": tmp_path / "var", "CACHE_DIR":
                        embedding_cache_dir, "CONFIG": tmp_path / "no-such.toml", "TAXONOMY": "hate_offensive",
                        "BASE_MODEL": tiny_bert, "MAX_LENGTH": 32, "GATE_BOOTSTRAP": 200, "QUANTIZE": "none",
                        "FINETUNE_AFTER_LABELS": 500}.items():
        monkeypatch.setenv(f"LABELLOOP_{name}", str(value))
    get_settings.cache_clear()
    try:
        settings = get_settings()
        splits = data.split(davidson, seed=7)
        train_and_register(data.stratified_sample(splits.validation, 60, seed=7), None, davidson.taxonomy,
                           mode="fast", settings=settings, source="seed",
                           eval_frame=data.stratified_sample(splits.test, 60, seed=7))
        assert Registry(settings).promote().promoted
        with Journal(settings.database("journal"), davidson.taxonomy) as journal:
            for n, row in enumerate(interleaved(splits.train, 12, seed=7), start=1):
                journal.record(label_event(n, row))
        cli = CliRunner()
        done = cli.invoke(app, ["loop", "finetune", "--wait", "--reason", "new policy wording"])
        assert done.exit_code == 0, done.output
        assert "fine-tuned labelloop-hate-offensive:v2 on 36 labels" in done.output
        decision = Registry(settings).history()[-1]  # gated against the champion: the decision is in the audit trail
        assert decision.candidate == 2 and decision.champion_before == 1
        monkeypatch.setattr(cli_module.console, "width", 300)  # the jobs table unwrapped
        status = cli.invoke(app, ["loop", "status"])
        assert status.exit_code == 0, status.output
        assert "automatic fine-tune: next when the labelled set reaches 500" in status.output
        assert "finetune" in status.output and "new policy wording" in status.output
    finally:
        get_settings.cache_clear()


def test_a_fine_tune_trains_outside_the_round_lock_and_gates_inside_it(settings, davidson, monkeypatch):
    """Rounds go on while a fine-tune trains (minutes); its gate and queue refresh never interleave with theirs."""
    from types import SimpleNamespace

    from active_learning import loop as loop_module
    from labelloop.journal import Journal

    def round_lock_free() -> bool:
        db = settings.database("jobs")
        try:
            with db.exclusive("round", wait=False) as free:
                return free
        finally:
            db.dispose()

    seen: dict[str, bool] = {}
    labels = data.stratified_sample(davidson.frame, 40, seed=1)

    def train(train, validation, taxonomy, *, mode, progress, **_):
        seen["train"] = round_lock_free()
        assert mode == "finetune" and len(train) + len(validation) == len(labels)
        progress("train", 5, 10)
        return SimpleNamespace(ref=SimpleNamespace(label="m:v2", version=2), report=SimpleNamespace(macro_f1=0.5))

    class Registry:
        def promote(self, version):
            seen["gate"] = round_lock_free()
            return SimpleNamespace(promoted=False, reason=f"v{version} refused")

        def alias_version(self, alias):
            return None

    monkeypatch.setattr(loop_module, "train_and_register", train)
    with Journal(settings.database("journal"), davidson.taxonomy) as journal:
        loop = loop_module.ActiveLearningLoop(settings, None, None, journal)
        loop.registry = Registry()
        monkeypatch.setattr(loop, "training_labels", lambda: labels)
        reports: list[tuple[float, str]] = []
        result = loop.run_finetune(lambda f, m: reports.append((round(f, 3), m)))
        loop.slices.close()
    assert seen == {"train": True, "gate": False}
    assert result.mode == "finetune" and not result.promoted and result.gate_reason == "v2 refused"
    assert (0.45, "fine-tuning: step 5 of 10") in reports and reports[-1] == (0.9, "promotion gate")
