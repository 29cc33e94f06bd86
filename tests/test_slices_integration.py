"""The quality slices against a real Label Studio with two reviewer accounts and a real MLflow store.

Two reviewers sign up through Label Studio's invite link and work the queue through ``/next`` in
lockstep, as two people at work at once. Checked: the queue serves exactly the pushed priority order,
blind audit items included; an audit item has nothing pre-selected, neither in the pushed prediction
nor when Label Studio asks the backend; an overlap item reaches both reviewers; a honeypot answered
wrongly is that reviewer's wrong gold answer; an adjudicated label is served first, supersedes the
original in the next retrain's training labels, and is applied once however often it is re-delivered.
"""

from __future__ import annotations

import httpx
import pandas as pd
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

import active_learning.loop as loop_module
from active_learning.labelstudio import LabelStudioClient
from active_learning.service import Service
from active_learning.slices_push import pending_slices
from labelloop import cli, data
from labelloop.ls_accounts import sign_up_reviewer
from labelloop.ls_server import free_port
from labelloop.taxonomy import get_taxonomy, label_config_xml
from monitoring.quality import attach_gold, gold_accuracy
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.test_serving_integration import ServerThread
from training.registry import Registry
from training.train import train_and_register

pytestmark = pytest.mark.integration
TAXONOMY = get_taxonomy("hate_offensive")
AUTH = ("ls", "slices-pass-42")


@pytest.fixture
def slice_settings(settings, label_studio: RunningLabelStudio, ls_project: int):
    return settings.model_copy(update={
        "ls_url": label_studio.url, "ls_api_key": SecretStr(label_studio.api_key), "ls_project_id": ls_project,
        "port": free_port(), "basic_user": AUTH[0], "basic_password": SecretStr(AUTH[1]), "poll_seconds": 0,
        "reconcile_seconds": 0, "retrain_every": 10_000, "query_batch": 20, "queue_size": 26,
        # 20 × 0.1: exactly two of each per batch
        "audit_rate": 0.1, "honeypot_rate": 0.1, "overlap_rate": 0.1,
        "gate_min_gain": -1.0, "gate_max_recall_drop": 1.0})


def test_slices_reach_two_real_reviewers_and_flow_back(slice_settings, label_studio: RunningLabelStudio,
                                                      ls_project: int, davidson, monkeypatch):
    splits = data.split(davidson, seed=5)
    pool = data.stratified_sample(splits.train, 50, seed=5)
    eval_frame = data.stratified_sample(splits.test, 40, seed=5)
    gold = dict(zip(davidson.frame["id"].astype(str), davidson.frame["label"], strict=True))
    first = train_and_register(data.stratified_sample(splits.validation, 150, seed=5), None, TAXONOMY, mode="fast",
                               settings=slice_settings, source="seed", eval_frame=eval_frame)
    assert Registry(slice_settings).promote().promoted
    client = label_studio.client
    accounts = [sign_up_reviewer(label_studio.sdk, name) for name in ("rev1", "rev2")]
    reviewers = [(LabelStudioClient(label_studio.url, a.token), a.user_id) for a in accounts]

    service = Service(slice_settings)
    service.loop.import_pool(pool[["id", "text"]])
    client.use_uncertainty_sampling(ls_project)
    with ServerThread(service.app, slice_settings.port) as server:
        client.connect_backend(ls_project, server.url, basic_auth=AUTH)
        queue = service.loop.push_queue(service.loop.champion())
        assert queue.slices == {"audit": 2, "honeypot": 2, "overlap": 2, "pending": 0}
        slices = service.loop.slices.frame(ls_project).set_index("task_id")
        kind = slices["kind"].to_dict()
        audit = set(slices.index[slices["kind"] == "audit"])
        honeypots = slices[slices["kind"] == "honeypot"]
        assert set(honeypots["item_id"]) <= set(eval_frame["id"].astype(str))
        assert (honeypots["gold_label"] == honeypots["item_id"].map(gold)).all()

        # every pushed task carries a priority; audit items carry no choice, the rest the champion's
        pushed = sorted((p for p in client.predictions(ls_project) if p["model_version"] == first.ref.label),
                        key=lambda p: p["score"])
        assert len(pushed) == queue.pushed == 26 + 2 + 2
        assert {p["task"] for p in pushed} >= set(slices.index)
        assert all((p["result"] == []) == (p["task"] in audit) for p in pushed)

        # Label Studio asking the backend on open: no pre-label for an audit task, one for any other
        label_config = label_config_xml(TAXONOMY)
        tasks = client.sdk.tasks.list(project=ls_project, fields="all", page_size=200)
        by_id = {t.id: t for t in tasks}
        asked = [sorted(audit)[0], queue.queued_task_ids[0]]
        answer = httpx.post(f"{server.url}/predict", auth=AUTH, timeout=60, json={
            "tasks": [{"id": t, "data": by_id[t].data} for t in asked], "project": f"{ls_project}.1",
            "label_config": label_config}).json()["results"]
        assert answer[0]["result"] == [] and answer[1]["result"][0]["value"]["choices"][0] in TAXONOMY.labels

        # two reviewers in lockstep work the whole pushed queue
        served: list[tuple[int, dict]] = []
        while len(served) < len(pushed):
            fetched = [(who, rc.next_task(ls_project)) for who, (rc, _) in enumerate(reviewers)]
            for who, task in fetched:
                if task is None:
                    continue
                item = str(task["data"]["item_id"])
                label = gold[item]
                if kind.get(task["id"]) == "honeypot":
                    label = next(x for x in TAXONOMY.labels if x != gold[item])  # a reviewer's slip
                reviewers[who][0].create_annotation(task["id"], label)
                served.append((who, task))
            assert any(task is not None for _, task in fetched), "the queue ran dry early"
        assert [task["id"] for _, task in served] == [p["task"] for p in pushed]  # the pushed order, exactly
        assert served[0][1]["id"] == queue.queued_task_ids[0]
        for _, task in served:  # what the labeling screen pre-selects
            choices = [r["value"]["choices"] for p in task["predictions"] for r in p["result"]]
            assert (choices == []) == (task["id"] in audit)
        wait_for(lambda: len(service.journal.annotations(ls_project)) == len(served), "every annotation webhook")

        annotations = service.journal.annotations(ls_project)
        ids = {rid for _, rid in reviewers}
        assert set(annotations["annotator"]) == ids

        # an overlap item: labelled by both reviewers
        copies = slices[slices["kind"] == "overlap"]
        both = [set(annotations.loc[annotations["task_id"].isin([copy, row.source_task_id]), "annotator"])
                for copy, row in copies.iterrows()]
        assert ids in both

        # a honeypot answered wrongly: that reviewer's wrong gold answer
        answers = annotations.merge(honeypots.reset_index()[["task_id", "gold_label"]], on="task_id")
        assert len(answers) == 2 and (answers["label"] != answers["gold_label"]).all()
        assert set(answers["annotator"]) <= ids
        accuracy = gold_accuracy(attach_gold(annotations, service.loop.slices.frame(ls_project)), min_n=1)
        per_annotator = {group.key: group.value for group in accuracy.per_annotator}
        for who, wrong in answers.groupby("annotator").size().items():
            assert (per_annotator[str(who)].k, per_annotator[str(who)].n) == (0, wrong)

        # a likely label error goes back for adjudication, to the front of the queue, with its label shown
        ordinary = annotations[~annotations["task_id"].isin(slices.index)].iloc[0]
        disputed_item, disputed = ordinary["id"], ordinary["label"]
        result = service.loop.adjudicate([{"annotation_id": int(ordinary["annotation_id"]), "label": disputed}])
        assert len(result.sent) == 1 and service.loop.adjudicate(
            [{"annotation_id": int(ordinary["annotation_id"])}]).sent == []  # sent once
        adjudication = result.sent[0].task_id
        rc, rid = reviewers[1]
        task = rc.next_task(ls_project)
        assert task["id"] == adjudication and task["data"]["item_id"] == disputed_item
        assert [r["value"]["choices"] for p in task["predictions"] for r in p["result"]] == [[disputed]]
        settled = next(x for x in TAXONOMY.labels if x != disputed)
        rc.create_annotation(adjudication, settled)
        wait_for(lambda: adjudication in set(service.journal.annotations(ls_project)["task_id"]),
                 "the adjudication webhook")
        assert service.reconcile_once()["applied"] == 0  # a re-delivery is a duplicate

        # Label Studio itself asking the backend (as on opening a task with no current prediction): still
        # nothing to pre-select on the audit item, while an ordinary item gets the champion's choice
        blind_task, control = sorted(audit)[0], next(t for t in by_id if t not in {p["task"] for p in pushed})
        for p in client.predictions(ls_project):
            if p["task"] == blind_task:
                client.sdk.predictions.delete(p["id"])
        client.retrieve_predictions(ls_project, [blind_task, control])
        wait_for(lambda: any(p["task"] == control for p in client.predictions(ls_project)), "the backend's pre-label")
        asked_back = {p["task"]: p["result"] for p in client.predictions(ls_project) if p["task"] in asked + [control]}
        assert asked_back[control][0]["value"]["choices"][0] in TAXONOMY.labels
        assert asked_back.get(blind_task, []) == []

        # the next retrain learns the adjudicated label, once per item, and never a honeypot
        trained_on: list[pd.DataFrame] = []

        def spy(frame, *args, **kwargs):
            trained_on.append(frame.copy())
            return train_and_register(frame, *args, **kwargs)

        monkeypatch.setattr(loop_module, "train_and_register", spy)
        round_result = service.loop.run_round()
        assert round_result.trained_version is not None
        labels = trained_on[0].set_index("id")["label"]
        assert labels.index.is_unique
        assert labels[disputed_item] == settled
        assert not set(labels.index) & set(honeypots["item_id"])
        assert set(copies["item_id"]) <= set(labels.index)

        # `labelloop loop adjudicate`: the quality side's ranking, sent through the same path
        for name, value in {"MLRUNS_DIR": slice_settings.mlruns_dir, "STATE_DIR": slice_settings.state_dir,
                            "CACHE_DIR": slice_settings.cache_dir, "LS_URL": label_studio.url,
                            "LS_API_KEY": label_studio.api_key, "LS_PROJECT_ID": ls_project,
                            "TAXONOMY": TAXONOMY.name, "CONFIG": slice_settings.state_dir / "none.toml"}.items():
            monkeypatch.setenv(f"LABELLOOP_{name}", str(value))
        cli.get_settings.cache_clear()
        try:
            before = len(service.loop.slices.task_ids("adjudication", ls_project))
            ran = CliRunner().invoke(cli.app, ["loop", "adjudicate", "--top-k", "2"])
            assert ran.exit_code == 0 and "sent for adjudication" in ran.stdout, ran.output
            after = service.loop.slices.task_ids("adjudication", ls_project)
            assert before <= len(after) <= before + 2
        finally:
            cli.get_settings.cache_clear()

        # a new champion re-ranks the queue: slice tasks nobody answered yet keep their role under its version
        answered = set(service.journal.annotations(ls_project)["task_id"])
        waiting = pending_slices(service.loop.slices, ls_project, answered)
        assert set(waiting["kind"]) >= {"audit", "honeypot", "overlap"}
        again = service.loop.run_round()
        assert again.queue is not None and again.queue.slices["pending"] == len(waiting)
        current = {p["task"]: p for p in client.predictions(ls_project) if p["model_version"] == again.champion}
        for row in waiting.itertuples(index=False):
            prediction = current[row.task_id]
            choices = [r["value"]["choices"] for r in prediction["result"]]
            if row.kind == "audit":
                assert choices == [] and 0 <= prediction["score"] < 1 / len(TAXONOMY.labels)
            elif row.kind == "adjudication":
                assert choices == [[row.disputed_label]] and prediction["score"] < 0
            else:
                assert len(choices) == 1 and 0 <= prediction["score"] < 1 / len(TAXONOMY.labels)
        service.close()
