"""Multi-label end to end, with a taxonomy none of the built-ins has (ETHOS's eight targets, from
``examples/taxonomies/ethos_targets.toml``) and a small slice of the real ETHOS multi-label CSV: train in fast
mode, register and promote, serve, a real Label Studio project whose ``choice="multiple"`` config is generated
from the taxonomy file, pre-labels shown as pre-selected multiple choices (pushed by the loop and asked for by
Label Studio itself), reviewers' label sets journaled through the real webhook, one active-learning round on
them, and an export that ``labelloop train`` reads back."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from active_learning.service import Service
from labelloop import data
from labelloop.cli import app as cli_app
from labelloop.config import REPO_ROOT, Settings, get_settings
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy, parse_label_config
from tests.conftest import SHARED_DATA
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.test_serving_integration import ServerThread
from training.registry import CHAMPION, Registry
from training.train import train_and_register

pytestmark = pytest.mark.integration

TAXONOMY_FILE = REPO_ROOT / "examples" / "taxonomies" / "ethos_targets.toml"
ETHOS = SHARED_DATA / "ethos" / "Ethos_Dataset_Multi_Label.csv.gz"
AUTH = ("ls", "multi-pass-42")


def load_ethos(settings: Settings) -> data.LabeledData:
    """ETHOS's one column per target (annotator shares, 0..1) as label sets, as a new user would load it."""
    spec = data.LabelSpec(label_map={"directed_vs_generalized": "directed"}, label_columns=("*",), threshold=0.5)
    return data.load(str(ETHOS), taxonomy=str(TAXONOMY_FILE), text_column="comment", settings=settings,
                     label_spec=spec)


def choices_of(prediction: dict) -> list[str]:
    (region,) = prediction["result"]
    assert region["type"] == "choices" and (region["from_name"], region["to_name"]) == ("label", "text")
    return region["value"]["choices"]


@pytest.fixture
def multi_settings(settings: Settings, label_studio: RunningLabelStudio) -> Settings:
    return settings.model_copy(update={
        "taxonomy": str(TAXONOMY_FILE), "ls_url": label_studio.url, "ls_api_key": SecretStr(label_studio.api_key),
        "port": free_port(), "basic_user": AUTH[0], "basic_password": SecretStr(AUTH[1]),
        "poll_seconds": 0, "reconcile_seconds": 0, "retrain_every": 1000, "query_batch": 8, "queue_size": 20,
        "strategy": "auto",
        # this test is about multi-label plumbing; the gate's judgement has its own tests
        "gate_min_gain": -1.0, "gate_max_recall_drop": 1.0,
        "audit_rate": 0.0, "honeypot_rate": 0.0, "overlap_rate": 0.0})


def test_a_multi_label_taxonomy_file_runs_the_whole_loop(multi_settings: Settings, label_studio: RunningLabelStudio,
                                                         tmp_path: Path):
    taxonomy = get_taxonomy(str(TAXONOMY_FILE))
    assert taxonomy.multi and taxonomy.none_label == "none" and len(taxonomy.labels) == 8
    ethos = load_ethos(multi_settings)
    splits = data.split(ethos, seed=0)
    seed, pool = splits.train.iloc[:120], splits.train.iloc[120:150]
    gold = dict(zip(pool["id"], pool["label"], strict=True))

    # train (fast mode), register, promote: the first champion, with per-label thresholds
    first = train_and_register(seed, splits.validation, taxonomy, mode="fast", settings=multi_settings,
                               source="ethos-seed", eval_frame=splits.test.iloc[:60])
    registry = Registry(multi_settings)
    assert registry.promote().promoted
    champion = registry.load(first.ref.version).classifier
    assert champion.multi_label and champion.thresholds.shape == (8,)

    # a real project whose config is generated from the taxonomy file: multiple choices plus the none label
    client = label_studio.client
    project = client.ensure_project(f"ethos-targets-{uuid.uuid4().hex[:8]}", taxonomy)
    try:
        control = parse_label_config(label_studio.sdk.projects.get(project).label_config)
        assert control.multiple and set(control.labels) == {*taxonomy.labels, "none"}
        settings = multi_settings.model_copy(update={"ls_project_id": project})

        service = Service(settings)
        service.loop.import_pool(pool[["id", "text"]])
        client.use_uncertainty_sampling(project)
        with ServerThread(service.app, settings.port) as server:
            client.connect_backend(project, server.url, basic_auth=AUTH)

            # the loop pushes the champion's label sets as pre-selected multiple choices
            queue = service.loop.push_queue(service.loop.champion())
            assert queue.model_version == first.ref.label
            assert queue.strategy == "kmeans:mean_binary_entropy"  # the multi-label default, reported in full
            assert queue.pushed == 20
            tasks = client.task_ids(project)
            text_of = dict(zip(pool["id"].map(tasks), pool["text"], strict=True))
            stored = {p["task"]: p for p in client.predictions(project) if p["model_version"] == first.ref.label}
            assert len(stored) == 20
            expected = dict(zip(stored, champion.predict([text_of[t] for t in stored]), strict=True))
            for task_id, prediction in stored.items():
                assert choices_of(prediction) == (list(expected[task_id]) or ["none"])
            assert any(len(s) >= 2 for s in expected.values()), "the champion predicts no set of two on this slice"

            # Label Studio asks the backend itself for the tasks the loop did not push: same sets, same names
            rest = sorted(set(tasks.values()) - set(stored))[:5]
            client.retrieve_predictions(project, rest)
            asked = {p["task"]: p for p in client.predictions(project) if p["task"] in rest}
            assert set(asked) == set(rest)
            predicted = champion.predict([text_of[t] for t in rest])
            for task_id, labels in zip(rest, predicted, strict=True):
                assert asked[task_id]["model_version"] == first.ref.label
                assert choices_of(asked[task_id]) == (list(labels) or ["none"])
                assert 0 < asked[task_id]["score"] <= 1

            # reviewers answer with several choices (or "none of these"); the webhook journals sets
            by_task = {tasks[item]: labels for item, labels in gold.items()}
            answered = sorted(by_task, key=lambda t: (-len(by_task[t]), t))[:5]
            answers = {t: by_task[t] for t in answered}
            none_task = next(t for t in sorted(by_task) if t not in answers)
            answers[none_task] = ()
            assert any(len(s) >= 2 for s in answers.values())
            for task_id, labels in answers.items():
                client.create_annotation(task_id, list(labels) or ["none"])
            wait_for(lambda: len(service.journal.labels(project)) == len(answers), "the annotation webhooks")
            journaled = service.journal.annotations(project)
            assert (journaled["source"] == "webhook").all()
            assert dict(zip(journaled["task_id"], journaled["label"], strict=True)) == answers
            assert service.journal.stats()["quarantine"] == 0

            # one active-learning round: a fast multi-label head on the journal's sets, promoted, new pre-labels,
            # this time with the quality slices on: honeypots from the frozen eval set keep their gold label set
            service.loop.settings = settings.model_copy(update={"honeypot_rate": 0.5, "audit_rate": 0.25})
            result = service.loop.run_round()
            assert result.labels == len(answers) and result.promoted, result.gate_reason
            new_label = f"{registry.name}:v{registry.alias_version(CHAMPION)}"
            assert result.trained_version == new_label != first.ref.label
            assert result.queue is not None and result.queue.model_version == new_label
            assert result.queue.slices["honeypot"] > 0 and result.queue.slices["audit"] > 0
            fresh = {p["task"]: p for p in client.predictions(project) if p["model_version"] == new_label}
            slices = service.loop.slices.frame(project).set_index("task_id")
            audit = set(slices.index[slices["kind"] == "audit"])
            assert audit and all(fresh[t]["result"] == [] for t in audit)  # blind: nothing pre-selected
            shown = [p for t, p in fresh.items() if t not in audit]
            assert shown and all(set(choices_of(p)) <= {*taxonomy.labels, "none"} for p in shown)
            eval_sets = {item: labels for item, labels in zip(splits.test["id"], splits.test["label"], strict=True)}
            honeypots = slices[slices["kind"] == "honeypot"]
            assert len(honeypots) == result.queue.slices["honeypot"]
            for row in honeypots.itertuples():
                assert json.loads(row.gold_label) == list(eval_sets[row.item_id])
            service.close()
    finally:
        label_studio.sdk.projects.delete(project)

    # export: the reviewers' sets, in a file `labelloop train --dataset` reads back as the same sets
    out = tmp_path / "export.csv"
    env = {"LABELLOOP_TAXONOMY": str(TAXONOMY_FILE), "LABELLOOP_STATE_DIR": str(settings.state_dir),
           "LABELLOOP_MLRUNS_DIR": str(settings.mlruns_dir)}
    get_settings.cache_clear()  # the CLI reads settings once per process: make it read this test's env
    try:
        exported = CliRunner().invoke(cli_app, ["loop", "export", str(out), "--project", str(project)], env=env)
    finally:
        get_settings.cache_clear()
    assert exported.exit_code == 0, exported.output
    back = data.load(str(out), taxonomy=str(TAXONOMY_FILE), settings=settings, dedupe=False)
    by_item = {str(k): v for k, v in zip(pd.read_csv(out)["id"], back.frame["label"], strict=True)}
    assert by_item == {item: answers[tasks[item]] for item in gold if tasks[item] in answers}
