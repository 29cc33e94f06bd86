"""Registry, aliases and gate decisions against a real MLflow SQLite store in a temp dir."""

from __future__ import annotations

import re

import mlflow
import pandas as pd
import pytest

from labelloop import data
from labelloop.data import DataError
from training.gate import GatePolicy
from training.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from training.train import train_and_register

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def frames(davidson):
    """A fixed evaluation set and two training sets of very different size from real Davidson rows."""
    rest, eval_frame = data.split(davidson, seed=5).train, data.split(davidson, seed=5).test
    eval_frame = data.stratified_sample(eval_frame, 180, seed=1)
    big = data.stratified_sample(rest, 450, seed=2)
    tiny = pd.concat([g.head(4) for _, g in rest.groupby("label")]).reset_index(drop=True)
    return eval_frame, big, tiny


def _train(settings, train, eval_frame, seed=13):
    settings = settings.model_copy(update={"seed": seed})
    return train_and_register(train, None, davidson_tax(), mode="fast", settings=settings, source="davidson",
                              eval_frame=eval_frame)


def davidson_tax():
    from labelloop.taxonomy import get_taxonomy

    return get_taxonomy("hate_offensive")


def test_first_version_is_promoted_then_worse_refused_then_rollback(settings, frames):
    settings = settings.model_copy(update={"gate_max_recall_drop": 1.0})  # macro-F1 alone decides here
    eval_frame, big, tiny = frames
    registry = Registry(settings)

    weak = _train(settings, tiny, eval_frame)
    assert weak.ref.version == 1 and registry.alias_version(CHALLENGER) == 1
    first = registry.promote()
    assert first.promoted and "no champion" in first.reason
    assert registry.alias_version(CHAMPION) == 1

    strong = _train(settings, big, eval_frame)
    assert strong.report.macro_f1 > weak.report.macro_f1
    decision = registry.promote()
    assert decision.promoted and decision.champion_before == 1 and decision.champion_after == 2
    assert registry.alias_version(CHAMPION) == 2

    worse = _train(settings, tiny, eval_frame, seed=99)
    refused = registry.promote()
    assert not refused.promoted and "lower bound must exceed" in refused.reason
    assert registry.alias_version(CHAMPION) == 2 and registry.alias_version(CHALLENGER) == worse.ref.version

    back = registry.rollback()
    assert back.promoted and registry.alias_version(CHAMPION) == 1
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()

    history = registry.history()
    assert [(e.action, e.promoted) for e in history] == [
        ("promote", True), ("promote", True), ("promote", False), ("rollback", True)]
    assert history[2].candidate_metrics["macro_f1"] < history[2].champion_metrics["macro_f1"]


def test_the_gate_policy_comes_from_settings_and_decides_on_the_frozen_set(settings, frames):
    settings = settings.model_copy(update={"gate_min_gain": 0.9, "gate_max_recall_drop": 0.2,
                                           "gate_confidence": 0.9, "gate_bootstrap": 500, "seed": 3})
    assert Registry(settings).gate_policy() == GatePolicy(min_gain=0.9, max_recall_drop=0.2, confidence=0.9,
                                                          n_bootstrap=500, seed=3)
    eval_frame, big, tiny = frames
    registry = Registry(settings)
    _train(settings, tiny, eval_frame)
    registry.promote()
    strong = _train(settings, big, eval_frame)
    refused = registry.promote()  # a real gain, but its interval's lower bound is nowhere near +0.9
    assert not refused.promoted and registry.alias_version(CHAMPION) == 1
    assert "lower bound must exceed +0.9000" in refused.reason
    assert f"{strong.report.macro_f1:.4f} vs champion" in refused.reason
    assert re.search(r"macro-F1 \+0\.\d{4} \[[+-]0\.\d{4}, \+0\.\d{4}\]", refused.reason), refused.reason
    assert f"90% paired bootstrap over {len(registry.eval_set()[1])} eval items" in refused.reason
    lenient = Registry(settings.model_copy(update={"gate_min_gain": 0.0}))
    assert lenient.promote().promoted and lenient.alias_version(CHAMPION) == strong.ref.version


def test_versions_cached_without_what_the_gate_needs_are_evaluated_again_once(settings, frames, monkeypatch):
    """A version registered before the gate needed per-item predictions (or with a metric missing) is
    loaded and evaluated on the frozen set again; the result is cached, so the next gate reads it."""
    settings = settings.model_copy(update={"gate_max_recall_drop": 1.0})
    eval_frame, big, tiny = frames
    registry = Registry(settings)
    old = _train(settings, tiny, eval_frame)
    eval_id, _ = registry.eval_set()
    version = str(old.ref.version)
    registry.promote()
    tags = registry.client.get_model_version(registry.name, version).tags
    assert tags[f"eval_predictions.{eval_id}"] == f"evaluation/predictions/{eval_id}.parquet"
    for key in (f"eval_predictions.{eval_id}", f"eval.{eval_id}.recall_hate"):  # as an old version has them
        registry.client.delete_model_version_tag(registry.name, version, key)
    registry.client.set_model_version_tag(registry.name, version, f"eval.{eval_id}.macro_f1", "0.999")

    loads: list[int | str] = []
    real_load = registry.load
    monkeypatch.setattr(registry, "load", lambda v: loads.append(v) or real_load(v))
    new = _train(settings, big, eval_frame)
    decision = registry.promote()
    assert loads == [old.ref.version]  # the new version came with its predictions; the old one did not
    assert decision.promoted, decision.reason
    assert decision.champion_metrics["macro_f1"] == pytest.approx(old.report.macro_f1, abs=1e-6)
    assert decision.champion_metrics["recall_hate"] == pytest.approx(old.report.per_class["hate"]["recall"])
    assert decision.candidate_metrics["macro_f1"] == pytest.approx(new.report.macro_f1, abs=1e-6)
    tags = registry.client.get_model_version(registry.name, version).tags
    assert float(tags[f"eval.{eval_id}.recall_hate"]) == pytest.approx(old.report.per_class["hate"]["recall"],
                                                                       abs=1e-6)
    cached = pd.read_parquet(registry.client.download_artifacts(
        old.run_id, tags[f"eval_predictions.{eval_id}"], str(settings.state_dir)))
    assert cached["id"].tolist() == registry.eval_set()[1]["id"].tolist()
    assert {"label", "p_hate", "p_offensive", "p_neither"} <= set(cached.columns)

    loads.clear()  # everything is cached now: gating the old version again loads no model
    assert not registry.promote(old.ref.version).promoted and loads == []


def test_registered_model_loads_by_alias_and_as_plain_pyfunc(settings, frames):
    eval_frame, big, _ = frames
    result = _train(settings, big, eval_frame)
    registry = Registry(settings)
    registry.promote()
    loaded = registry.load("champion")
    assert loaded.ref.label == f"{settings.registered_model_name}:v1"
    texts = eval_frame["text"].head(8).tolist()
    proba = loaded.classifier.predict_proba(texts)
    assert proba.shape == (8, 3)
    mlflow.set_tracking_uri(settings.resolved_tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{settings.registered_model_name}@champion")
    out = pyfunc.predict(pd.DataFrame({"text": texts}))
    assert out["label"].tolist() == [loaded.classifier.labels[i] for i in proba.argmax(1)]
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["data_snapshot"] == data.snapshot_id(big)
    assert {"macro_f1", "ece", "recall_hate", "f1_neither"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts and "evaluation/report.json" in artifacts


def test_eval_set_is_frozen_and_never_trained_on(settings, frames):
    eval_frame, big, _ = frames
    leaky = pd.concat([big, eval_frame.head(50)], ignore_index=True)
    first = _train(settings, leaky, eval_frame)
    assert first.train_rows == len(big)
    registry = Registry(settings)
    eval_id, frozen = registry.eval_set()
    _train(settings, big, eval_frame.head(10))  # a different candidate eval set does not replace the frozen one
    assert registry.eval_set()[0] == eval_id and len(registry.eval_set()[1]) == len(frozen)


def test_bad_training_input_registers_nothing(settings, frames):
    eval_frame, big, _ = frames
    registry = Registry(settings)
    one_class = big[big["label"] == "offensive"]
    with pytest.raises(DataError, match="at least two classes"):
        _train(settings, one_class, eval_frame)
    with pytest.raises(DataError, match="taxonomy"):
        train_and_register(big, None, davidson_tax(), mode="fast", source="x", eval_frame=eval_frame,
                           settings=settings.model_copy(update={"taxonomy": "spam"}))
    assert registry.versions() == [] and registry.eval_set() is None  # not even the eval set was frozen
    with pytest.raises(RegistryError, match="no challenger"):
        registry.promote()


def test_a_registry_failure_is_never_read_as_no_champion(settings, frames, monkeypatch):
    """A locked SQLite database or an unreachable server must stop the gate, not wave the challenger through."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    eval_frame, big, _ = frames
    registry = Registry(settings)
    _train(settings, big, eval_frame)
    registry.promote()
    _train(settings, big.head(60), eval_frame)

    def locked(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(registry.client, "get_model_version_by_alias", locked)
    with pytest.raises(MlflowException, match="database is locked"):
        registry.promote()
    monkeypatch.undo()
    assert registry.alias_version(CHAMPION) == 1


def test_rollbacks_walk_back_through_champions_and_the_rolled_back_version_stays_out(settings, frames):
    settings = settings.model_copy(update={"gate_min_gain": -1.0, "gate_max_recall_drop": 1.0})  # all promote
    eval_frame, big, tiny = frames
    registry = Registry(settings)
    for i, train in enumerate([tiny, big, big.head(300)], start=1):
        assert _train(settings, train, eval_frame, seed=i).ref.version == i
        assert registry.promote().promoted
    assert registry.alias_version(CHAMPION) == 3 and registry.alias_version(CHALLENGER) == 3

    assert registry.rollback().reason == "rolled back from v3 to v2"
    assert registry.alias_version(CHALLENGER) is None  # a plain `promote` must not bring v3 back
    with pytest.raises(RegistryError, match="no challenger"):
        registry.promote()
    assert registry.rollback().reason == "rolled back from v2 to v1"
    assert registry.alias_version(CHAMPION) == 1
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()


@pytest.fixture
def cli_env(tmp_path, embedding_cache_dir, monkeypatch, davidson_small):
    """The CLI pointed at this test's temp dirs through the environment, and a small real Davidson CSV."""
    from rich.console import Console

    from labelloop import cli
    from labelloop.config import get_settings

    for name, value in {"MLRUNS_DIR": tmp_path / "mlruns", "STATE_DIR": tmp_path / "var",
                        "CACHE_DIR": embedding_cache_dir, "CONFIG": tmp_path / "none.toml"}.items():
        monkeypatch.setenv(f"LABELLOOP_{name}", str(value))
    monkeypatch.setattr(cli, "console", Console(width=220))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=400))
    get_settings.cache_clear()
    path = tmp_path / "davidson_small.csv"
    davidson_small.frame[["id", "text", "label"]].to_csv(path, index=False)
    yield path
    get_settings.cache_clear()


def test_train_warns_when_the_model_is_no_better_than_the_majority_class(cli_env, monkeypatch):
    from sklearn.dummy import DummyClassifier
    from typer.testing import CliRunner

    from labelloop import cli
    from training import fast

    args = ["train", "--dataset", str(cli_env), "--mode", "fast", "--taxonomy", "hate_offensive"]
    learned = CliRunner().invoke(cli.app, args)
    assert learned.exit_code == 0, learned.output
    assert "warning" not in learned.output

    # a head that collapsed onto the majority class, as small-data fine-tuning used to
    monkeypatch.setattr(fast, "fit_head", lambda embeddings, y, **_: DummyClassifier().fit(embeddings, y))
    collapsed = CliRunner().invoke(cli.app, args)
    assert collapsed.exit_code == 0, collapsed.output
    assert re.search(r"warning: macro-F1 0\.\d{4} is no better than predicting 'offensive' for every text "
                     r"\(0\.\d{4}; gain [+-]0\.0000 \[", collapsed.output), collapsed.output
    assert "--mode fast" not in collapsed.output  # it is the mode that collapsed: no advice to switch to it
    assert "registered labelloop-hate-offensive:v2 as challenger" in collapsed.output
