"""The stopping monitor, simulation summaries, and a small real simulation logged to a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from active_learning.simulate import (
    DEFAULT_ARMS,
    MultiLabel,
    SimulationResult,
    _reviewer_answers,
    checkpoints,
    curve_stem,
    gain_table,
    labels_to_reach,
    paired_gain,
    parse_strategy,
    pool_and_test,
    simulate,
)
from active_learning.stopping import StoppingMonitor, agreement_kappa
from active_learning.strategies import ClassBalanced, MarginKMeans
from labelloop import cli, data
from labelloop.config import get_settings
from labelloop.taxonomy import Taxonomy
from tests.conftest import SHARED_DATA

ETHOS_TARGETS = ("violence", "directed", "gender", "race", "national_origin", "disability", "religion",
                 "sexual_orientation")

# --- stopping ---------------------------------------------------------------------------------------


def test_kappa_of_identical_predictions_is_one_even_for_a_single_class():
    assert agreement_kappa(np.zeros(10), np.zeros(10)) == 1.0
    assert agreement_kappa(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0])) < 0


def test_kappa_aligns_series_on_item_ids():
    previous = pd.Series([0, 1, 2, 1], index=["a", "b", "c", "d"])
    current = pd.Series([1, 2, 0, 5], index=["b", "c", "a", "new"])  # same answers, reordered, "d" labeled
    assert agreement_kappa(previous, current) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        agreement_kappa(np.zeros(3), np.zeros(4))


def test_monitor_stops_once_predictions_stay_stable_for_patience_rounds():
    g = np.random.default_rng(0)
    base = g.integers(0, 3, 1000)
    monitor = StoppingMonitor(kappa_threshold=0.99, patience=2)
    changing = [base.copy() for _ in range(3)]
    for i, preds in enumerate(changing):
        preds[g.choice(1000, 200, replace=False)] = i % 3  # big changes: keep going
    signals = [monitor.update(r, p, None) for r, p in enumerate(changing)]
    assert not any(s.stop for s in signals)
    assert signals[0].kappa is None and signals[1].kappa < 0.9
    stable = changing[-1]
    first = monitor.update(3, stable, None)
    second = monitor.update(4, stable, None)
    assert not first.stop and first.stable_rounds == 1
    assert second.stop and second.kappa == 1.0 and "stable" in second.reason


def test_monitor_estimates_gain_per_100_labels_and_stops_on_a_flat_curve():
    monitor = StoppingMonitor(kappa_threshold=0.999, patience=2, window=3, min_gain_per_100=0.002)
    g = np.random.default_rng(1)
    rising = [(100, 0.50), (200, 0.55), (300, 0.60)]
    for r, (n, f1) in enumerate(rising):
        signal = monitor.update(r, g.integers(0, 3, 500), f1, n_labels=n)
    assert signal.est_gain_per_100 == pytest.approx(0.05)
    assert not signal.stop
    for r, n in enumerate((400, 500, 600), start=3):
        signal = monitor.update(r, g.integers(0, 3, 500), 0.60, n_labels=n)
    assert signal.est_gain_per_100 == pytest.approx(0.0, abs=1e-9)
    assert signal.stop and "flat" in signal.reason


def test_monitor_without_label_counts_estimates_no_gain():
    monitor = StoppingMonitor()
    assert monitor.update(0, np.zeros(5), 0.5).est_gain_per_100 is None


# --- simulation pieces ------------------------------------------------------------------------------


def test_reviewer_flips_exactly_the_noise_share_to_wrong_labels():
    gold = np.arange(1000) % 3
    answers = _reviewer_answers(gold, 3, 0.1, np.random.default_rng(0))
    wrong = answers != gold
    assert wrong.sum() == 100
    assert set(answers[wrong]) <= {0, 1, 2}
    assert np.array_equal(_reviewer_answers(gold, 3, 0.0, np.random.default_rng(0)), gold)


def test_strategy_specs_name_composite_bases():
    balanced = parse_strategy("class_balanced:margin_kmeans")
    assert isinstance(balanced, ClassBalanced) and isinstance(balanced.base, MarginKMeans)
    with pytest.raises(ValueError, match="unknown query strategy"):
        parse_strategy("margn")


def curves_frame() -> pd.DataFrame:
    rows = []
    for seed, (r, m) in enumerate([((0.60, 0.62), (0.61, 0.66)), ((0.58, 0.60), (0.60, 0.65))]):
        for strategy, (f100, f200) in (("random", r), ("margin", m)):
            rows += [{"strategy": strategy, "seed": seed, "n_labels": 100, "macro_f1": f100},
                     {"strategy": strategy, "seed": seed, "n_labels": 200, "macro_f1": f200}]
    return pd.DataFrame(rows)


def test_paired_gain_and_labels_to_reach():
    mean, sd, n = paired_gain(curves_frame(), "margin", at=200)
    assert (mean, n) == (pytest.approx(0.045), 2)
    assert sd == pytest.approx(np.std([0.04, 0.05], ddof=1))
    reach = labels_to_reach(curves_frame(), 0.61)
    assert reach.loc["margin", "mean_labels"] == 150
    assert reach.loc["random", "seeds_reached"] == 1
    with pytest.raises(ValueError, match="no rows"):
        paired_gain(curves_frame(), "entropy", at=200)


def test_simulate_rejects_bad_arguments(settings):
    with pytest.raises(ValueError, match="initial"):
        simulate("davidson", ["random"], seeds=1, budget=50, initial=100, settings=settings, log_to_mlflow=False)
    with pytest.raises(ValueError, match="noise"):
        simulate("davidson", ["random"], seeds=1, noise=1.5, settings=settings, log_to_mlflow=False)
    with pytest.raises(ValueError, match="unknown query strategy"):
        simulate("davidson", ["best"], seeds=1, settings=settings, log_to_mlflow=False)


# --- a real (small) simulation -------------------------------------------------------------------------


@pytest.mark.integration
def test_small_davidson_simulation_writes_curves_and_logs_to_mlflow(davidson, settings, tmp_path):
    small = data.LabeledData(data.stratified_sample(davidson.frame, 1200, seed=0), davidson.taxonomy, "davidson")
    strategies = ["random", "margin", "margin_kmeans"]
    seen = []
    result = simulate(small, strategies, seeds=2, budget=300, step=100, initial=100, noise=0.05,
                      settings=settings, cold_start="kmeans", out_dir=tmp_path / "out", progress=seen.append)

    curves = result.curves
    assert len(curves) == len(seen) == 3 * 2 * 3
    assert sorted(curves["n_labels"].unique()) == [100, 200, 300]
    assert result.rare_class == "hate"
    assert curves["macro_f1"].between(0.2, 1.0).all()
    assert (curves.groupby(["strategy", "seed"])["labeled_hate"].diff().dropna() >= 0).all()
    labeled_total = curves[[f"labeled_{label}" for label in result.labels]].sum(axis=1)
    assert (labeled_total == curves["n_labels"]).all()
    # paired by seed: every strategy starts from the same initial labels, hence the same first model
    first = curves[curves["n_labels"] == 100].pivot_table(index="seed", columns="strategy", values="macro_f1")
    assert np.allclose(first.to_numpy(), first[["random"]].to_numpy())

    csv, md, png = (tmp_path / "out" / f"al_curves_davidson.{ext}" for ext in ("csv", "md", "png"))
    assert csv.exists() and png.stat().st_size > 10_000
    assert len(pd.read_csv(csv)) == 18
    assert result.paths == (csv, md, png) and "complete" in md.read_text()

    client = MlflowClient(tracking_uri=settings.resolved_tracking_uri)
    experiment = client.get_experiment_by_name(f"{settings.experiment}-al-simulation")
    assert experiment.artifact_location == settings.resolved_artifact_location
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["budget"] == "300" and parent.data.params["noise"] == "0.05"
    assert {a.path for a in client.list_artifacts(result.parent_run_id)} == {csv.name, md.name, png.name}
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"{s}-seed{i}" for s in strategies for i in (0, 1))
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "macro_f1")
        assert sorted(m.step for m in history) == [100, 200, 300]
        logged = {m.step: m.value for m in history}
        row = curves[(curves["strategy"] == run.data.params["strategy"]) &
                     (curves["seed"] == int(run.data.params["seed"]))].set_index("n_labels")
        assert logged == pytest.approx(row["macro_f1"].to_dict())
        assert "labeled_hate" in run.data.metrics and "kappa" in run.data.metrics


# --- output files: named after the dataset, written as the simulation goes ------------------------------


@pytest.mark.parametrize(("dataset", "stem"), [
    ("davidson", "al_curves_davidson"),
    ("file.csv", "al_curves_file"),
    ("path/to/file.csv", "al_curves_file"),
    ("/abs/dir/my labels.v2.parquet", "al_curves_my_labels.v2"),
    ("./exports/labels.jsonl.gz", "al_curves_labels"),
    ("tweet_eval/hate", "al_curves_tweet_eval_hate"),  # a hub id: no directory in the name
])
def test_outputs_are_named_after_the_dataset_never_its_path(dataset, stem):
    assert curve_stem(dataset) == stem


def test_each_checkpoint_is_reported_once():
    assert checkpoints(1000) == [500, 1000]
    assert checkpoints(2000) == [500, 1000, 2000]
    assert checkpoints(300) == [300]
    gains = gain_table(curves_frame(), ["random", "margin"], budget=200)
    assert list(gains.columns) == ["@200"] and gains.loc["margin", "@200"] == "+4.5 ± 0.7"


def test_simulate_command_shows_the_budget_column_once(monkeypatch):
    """`--budget 1000` showed the @1000 column twice."""
    rows = [{"strategy": s, "seed": seed, "n_labels": n, "macro_f1": 0.5 + 0.01 * seed + (0.05 if s == "margin" else 0)}
            for s in ("random", "margin") for seed in (0, 1) for n in (500, 1000)]

    def fake_simulate(dataset, strategies, *args, **kwargs):
        return SimulationResult(dataset, ("a", "b"), "a", pd.DataFrame(rows), paths=(Path("out/al_curves_x.csv"),))

    monkeypatch.setattr("active_learning.simulate.simulate", fake_simulate)
    monkeypatch.setattr(cli, "console", cli.Console(width=200))
    get_settings.cache_clear()
    result = CliRunner().invoke(cli.app, ["simulate", "--dataset", "x.csv", "--strategies", "random,margin",
                                          "--budget", "1000", "--seeds", "2"])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "strategy" in line and "@" in line)
    assert header.count("@1000") == 1 and header.count("@500") == 1
    assert "+5.0 ± 0.0" in result.stdout and "results: out/al_curves_x.csv" in result.stdout


@pytest.fixture
def small_davidson(davidson) -> data.LabeledData:
    return data.LabeledData(data.stratified_sample(davidson.frame, 800, seed=0), davidson.taxonomy, "davidson")


def test_a_crash_late_in_a_simulation_keeps_every_finished_round(small_davidson, settings, tmp_path):
    out = tmp_path / "out"
    stale = out / "al_curves_davidson.csv"
    out.mkdir()
    stale.write_text("an earlier run's curves\n")
    seen = []

    def crash_in_the_last_run(row: dict) -> None:
        seen.append(row)
        if len(seen) == 7:  # 2 strategies x 2 seeds x 2 rounds: the first round of the last run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(small_davidson, ["random", "margin"], seeds=2, budget=200, step=100, initial=100, settings=settings,
                 out_dir=out, log_to_mlflow=False, progress=crash_in_the_last_run)
    saved = pd.read_csv(out / "al_curves_davidson.csv")
    assert len(saved) == 7
    assert saved[["strategy", "seed", "n_labels"]].values.tolist() == [
        [r["strategy"], r["seed"], r["n_labels"]] for r in seen]
    assert saved["macro_f1"].to_numpy() == pytest.approx([r["macro_f1"] for r in seen], abs=1e-5)
    summary = (out / "al_curves_davidson.md").read_text()
    assert "3 of 4 runs finished" in summary and "| margin |" in summary and "@200" in summary


@pytest.mark.integration
def test_simulate_command_on_a_csv_path_names_outputs_after_its_stem(small_davidson, tmp_path, monkeypatch,
                                                                      embedding_cache_dir):
    """`--dataset path/to/file.csv` ran every round, then failed writing into 'al_curves_path/to/…'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    small_davidson.frame[["id", "text", "label"]].to_csv(tmp_path / "data" / "file.csv", index=False)
    monkeypatch.setenv("LABELLOOP_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(embedding_cache_dir))
    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setattr(cli, "console", cli.Console(width=200))
    get_settings.cache_clear()
    try:
        for dataset in ("data/file.csv", str(tmp_path / "data" / "file.csv")):
            result = CliRunner().invoke(cli.app, ["simulate", "--dataset", dataset, "--strategies", "random,margin",
                                                  "--seeds", "1", "--budget", "200", "--out", "sims"])
            assert result.exit_code == 0, result.output
            assert sorted(p.name for p in (tmp_path / "sims").iterdir()) == [
                "al_curves_file.csv", "al_curves_file.md", "al_curves_file.png"]
            assert len(pd.read_csv(tmp_path / "sims" / "al_curves_file.csv")) == 4  # 2 strategies x 2 rounds
            assert "complete" in (tmp_path / "sims" / "al_curves_file.md").read_text()
    finally:
        get_settings.cache_clear()


# --- multi-label --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ethos_multilabel() -> data.LabeledData:
    """140 real ETHOS comments with their target sets (a target counts at >= half of the annotators)."""
    raw = pd.read_csv(SHARED_DATA / "ethos" / "Ethos_Dataset_Multi_Label.csv.gz", sep=";").head(140)
    taxonomy = Taxonomy("ethos_targets", "ETHOS targets", ETHOS_TARGETS, ETHOS_TARGETS, multi=True)
    on = (raw.iloc[:, 1:].to_numpy() >= 0.5).astype(int)
    frame = pd.DataFrame({"id": [f"e{i}" for i in range(len(raw))], "text": raw["comment"],
                          "label": [taxonomy.decode(row) for row in on]})
    return data.LabeledData(frame, taxonomy, "ethos_multilabel")


def test_a_multi_label_reviewer_flips_one_label_of_exactly_the_noise_share():
    gold = np.random.default_rng(0).integers(0, 2, (500, 8))
    answers = MultiLabel().reviewer_answers(gold, 8, 0.1, np.random.default_rng(1))
    changed = (answers != gold).sum(axis=1)
    assert (changed > 0).sum() == 50 and changed.max() == 1
    assert MultiLabel().n_wrong(answers, gold) == 50
    assert np.array_equal(MultiLabel().reviewer_answers(gold, 8, 0.0, np.random.default_rng(1)), gold)


def test_a_multi_label_simulation_refuses_single_label_strategies_before_any_work(ethos_multilabel, settings):
    with pytest.raises(ValueError, match="'margin' is for single-label models only, but the taxonomy is multi-label"):
        simulate(ethos_multilabel, ["random", "margin"], seeds=1, budget=40, step=10, initial=10, settings=settings,
                 log_to_mlflow=False, cache_dir=settings.cache_dir / "never-created")
    assert not (settings.cache_dir / "never-created").exists()  # nothing embedded


def test_small_ethos_multi_label_simulation_reports_multi_label_metrics(ethos_multilabel, settings, tmp_path):
    result = simulate(ethos_multilabel, None, seeds=1, budget=40, step=10, initial=10, noise=0.05,
                      settings=settings, out_dir=tmp_path / "out")
    curves = result.curves
    assert list(dict.fromkeys(curves["strategy"])) == list(DEFAULT_ARMS["multi-label"])
    assert sorted(curves["n_labels"].unique()) == [10, 20, 30, 40]
    per_label = curves[[f"f1_{label}" for label in ETHOS_TARGETS]]
    assert np.allclose(curves["macro_f1"], per_label.mean(axis=1))  # macro-F1 over labels, not classes
    for column in ("macro_f1", "micro_f1", "subset_accuracy"):
        assert curves[column].between(0.0, 1.0).all()
    assert (curves.groupby("strategy")["macro_f1"].last() > 0.3).all()  # 40 labels already learn something
    assert "accuracy" not in curves  # single-label accuracy means nothing for label sets
    # every label count is the number of labeled items carrying that label: consistent with the gold sets
    labeled = curves[[f"labeled_{label}" for label in ETHOS_TARGETS]].to_numpy()
    assert (labeled <= curves[["n_labels"]].to_numpy()).all() and (labeled.sum(axis=1) > 0).all()
    pool, _ = pool_and_test(ethos_multilabel)
    assert result.rare_class == ETHOS_TARGETS[int(np.argmin(ethos_multilabel.taxonomy.encode(pool["label"]).sum(0)))]
    first = curves[curves["n_labels"] == 10].set_index("strategy")["macro_f1"]
    assert np.allclose(first, first.iloc[0])  # paired: the same cold-start labels, the same first model
    summary = (tmp_path / "out" / "al_curves_ethos_multilabel.md").read_text()
    assert "fixed threshold of 0.5" in summary and "## Micro-F1" in summary and "## Subset accuracy" in summary

    client = MlflowClient(tracking_uri=settings.resolved_tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(f"{settings.experiment}-al-simulation").experiment_id],
                             filter_string="attributes.run_name = 'cardinality-seed0'")[0]
    assert {"macro_f1", "micro_f1", "subset_accuracy", "f1_disability", "labeled_violence"} <= set(run.data.metrics)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["multi_label"] == "True" and parent.data.params["threshold"] == "0.5"


def test_simulate_command_runs_multi_label_from_a_taxonomy_file_and_label_columns(tmp_path, monkeypatch,
                                                                                  embedding_cache_dir):
    """The whole path a user takes: their taxonomy file, a CSV with one fractional column per target."""
    from labelloop.config import REPO_ROOT

    raw = pd.read_csv(SHARED_DATA / "ethos" / "Ethos_Dataset_Multi_Label.csv.gz", sep=";").head(120)
    raw.to_csv(tmp_path / "ethos_ml.csv", sep=";", index=False)
    monkeypatch.chdir(tmp_path)
    for name, value in {"MLRUNS_DIR": tmp_path / "mlruns", "STATE_DIR": tmp_path / "var",
                        "CACHE_DIR": embedding_cache_dir, "CONFIG": tmp_path / "none.toml"}.items():
        monkeypatch.setenv(f"LABELLOOP_{name}", str(value))
    monkeypatch.setattr(cli, "console", cli.Console(width=200))
    taxonomy = str(REPO_ROOT / "examples" / "taxonomies" / "ethos_targets.toml")
    source = ["--dataset", "ethos_ml.csv", "--taxonomy", taxonomy, "--text-column", "comment", "--label-columns", "*",
              "--label-map", "directed_vs_generalized=directed", "--label-threshold", "0.5"]
    small = ["--seeds", "1", "--budget", "30", "--step", "10", "--initial", "10", "--out", "sims"]
    get_settings.cache_clear()
    try:
        refused = CliRunner().invoke(cli.app, ["simulate", *source, *small, "--strategies", "random,margin"])
        result = CliRunner().invoke(cli.app, ["simulate", *source, *small, "--strategies", "random,cardinality"])
    finally:
        get_settings.cache_clear()
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error: query strategy 'margin' is for single-label models only")
    assert result.exit_code == 0, result.output
    curves = pd.read_csv(tmp_path / "sims" / "al_curves_ethos_ml.csv")
    assert len(curves) == 2 * 3 and {"micro_f1", "subset_accuracy", "f1_directed", "labeled_violence"} <= set(curves)
    assert "cardinality" in result.stdout
