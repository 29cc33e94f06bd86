"""``labelloop score`` on a real local Ray (2 CPUs) with a real MLflow registry champion: the scores match the
in-process scorer, bad input fails cleanly, ``--push-top`` lands priorities in a real Label Studio; and the
vectorised top-K selection both of them use."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from active_learning.pool import ScoredPool
from active_learning.selection import top_k, top_k_parquet
from active_learning.strategies import Margin, PoolContext
from labelloop import cli, data
from labelloop.config import Settings, get_settings
from labelloop.taxonomy import get_taxonomy
from tests.conftest import SHARED_DATA
from tests.label_studio_fixtures import RunningLabelStudio
from training.registry import CHAMPION, Registry
from training.train import train_and_register

runner = CliRunner()
TAXONOMY = get_taxonomy("hate_offensive")
POOL_SIZE = 240  # 80 rows in each of Parquet, CSV and JSONL


# ------------------------------------------------------------------------------ selection (unit)
def _full_sort_top_k(scores: np.ndarray, k: int, seed: int) -> np.ndarray:
    """What the loop selected before partitioning: a full lexsort with a random tie-break."""
    rng = np.random.default_rng(seed)
    return np.lexsort((rng.random(len(scores)), -scores))[: max(0, min(k, len(scores)))]


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_picks_exactly_what_a_full_sort_picks(ties: bool):
    rng = np.random.default_rng(1)
    for trial in range(50):
        n = int(rng.integers(1, 400))
        scores = rng.integers(0, 4, n).astype(float) if ties else rng.random(n)
        if trial % 5 == 0:
            scores[rng.integers(0, n, 2)] = np.nan
        k = int(rng.integers(0, n + 2))
        assert np.array_equal(top_k(scores, k, np.random.default_rng(trial)), _full_sort_top_k(scores, k, trial))


def test_top_1000_of_a_million_scores_takes_well_under_a_second(tmp_path: Path):
    scores = np.random.default_rng(0).random(1_000_000)
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"score": scores}), path)
    started = time.perf_counter()
    chosen = top_k(scores, 1000, np.random.default_rng(0))
    from_file = top_k_parquet(str(path), "score", 1000, np.random.default_rng(0))
    elapsed = time.perf_counter() - started
    assert np.array_equal(chosen, np.argsort(-scores)[:1000])
    assert np.array_equal(from_file, chosen)
    assert elapsed < 1.0, f"selection over 1M scores (array and Parquet column) took {elapsed:.2f} s"


class _MultiLabelModel:
    """A stand-in multi-label classifier: fixed sigmoid outputs, the third label's threshold high."""

    labels = ("violence", "gender", "race")
    multi_label = True
    thresholds = np.array([0.5, 0.5, 0.9])

    def predict_proba(self, texts, batch_size=64):
        return np.tile(np.array([[0.1, 0.2, 0.3]], dtype=np.float32), (len(texts), 1))

    def decide(self, proba):
        return [tuple(label for label, on in zip(self.labels, row >= self.thresholds, strict=True) if on)
                for row in proba]


def test_a_multi_label_batch_where_nothing_applies_keeps_the_output_schema():
    """Every batch must write into one Parquet schema: label sets are lists of strings even when empty."""
    from active_learning.batch_score import PoolScorer
    from active_learning.strategies import parse_strategy

    scorer = PoolScorer.__new__(PoolScorer)  # the model is a stand-in; loading one is the integration tests' job
    scorer.classifier, scorer.model_version = _MultiLabelModel(), "m:v1"
    scorer.strategy, scorer.severe = parse_strategy("mean_binary_entropy", True), np.zeros(0, dtype=np.int64)
    scorer.text_column, scorer.id_column, scorer.task_ids, scorer.batch_size = "text", "id", True, 64
    table = scorer(pd.DataFrame({"id": [7, 8], "text": ["a post", None], "task_id": [3, 4]}))
    assert str(table.schema.field("predicted").type) == "list<item: string>"
    assert table.column("predicted").to_pylist() == [[], []]
    assert table.column("id").to_pylist() == ["7", "8"] and table.column("task_id").to_pylist() == [3, 4]
    expected = -(np.log([0.1, 0.2, 0.3]) * [0.1, 0.2, 0.3] + np.log([0.9, 0.8, 0.7]) * [0.9, 0.8, 0.7]).mean()
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("spec", ["margin_kmeans", "kmeans:margin", "badge", "bald", "cold_start"])
def test_strategies_that_need_the_whole_pool_are_refused(spec: str):
    from active_learning.batch_score import ScoreError, check_strategy

    with pytest.raises(ScoreError, match="labelloop loop round"):
        check_strategy(spec, multi_label=False)


def test_the_settings_k_means_strategy_ranks_by_its_base_score():
    """``auto`` is a k-means strategy: ``labelloop score`` without --strategy must still run, by its base's score
    (what the k-means strategy itself scores with), and say so; the same strategy asked for by name is refused."""
    from active_learning.batch_score import ScoreError, check_strategy, fallback_note

    for spec, base in (("margin_kmeans", "margin"), ("class_balanced:margin_kmeans", "margin")):
        used = check_strategy(spec, multi_label=False, explicit=False)
        assert used.spec == base
        assert base in fallback_note(spec, used, multi_label=False)
        with pytest.raises(ScoreError):
            check_strategy(spec, multi_label=False)
    assert check_strategy("auto", multi_label=True, explicit=False).spec == "mean_binary_entropy"
    assert fallback_note("margin", check_strategy("margin", False, explicit=False), False) == ""


def test_per_item_strategies_stream():
    from active_learning.batch_score import check_strategy

    for spec in ("margin", "entropy", "class_balanced:margin", "mixed:entropy", "severity_weighted:margin"):
        assert check_strategy(spec, multi_label=False).spec == spec
    assert check_strategy("max_binary_entropy", multi_label=True).spec == "max_binary_entropy"


# ------------------------------------------------------------------------------ real Ray + MLflow
@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray for the module (a start costs seconds); ``labelloop score`` joins it and leaves it up."""
    import ray

    from active_learning.batch_score import quiet

    quiet()
    with pytest.MonkeyPatch.context() as mp:  # as labelloop score's own local Ray: no kills for others' memory
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20,
                 logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, embedding_cache_dir: Path) -> Iterator[Path]:
    """The CLI's settings (through the environment, as a user sets them) point at a module temp dir."""
    root = tmp_path_factory.mktemp("score")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABELLOOP_MLRUNS_DIR", str(root / "mlruns"))
        mp.setenv("LABELLOOP_STATE_DIR", str(root / "var"))
        mp.setenv("LABELLOOP_CACHE_DIR", str(embedding_cache_dir))
        mp.setenv("LABELLOOP_DATA_DIR", str(SHARED_DATA))
        mp.setenv("LABELLOOP_TAXONOMY", "hate_offensive")
        mp.setenv("LABELLOOP_QUANTIZE", "none")
        mp.setenv("LABELLOOP_CONFIG", str(root / "no-such-labelloop.toml"))
        get_settings.cache_clear()
        yield root
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _settings_from_this_tests_environment() -> Iterator[None]:
    """``get_settings`` is cached per process; a test that changes the environment must be read afresh, and
    must not leave its settings to the next test."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def champion(env: Path, davidson) -> Settings:
    """A fast-mode champion trained on 300 real Davidson rows, registered and promoted in a real MLflow."""
    settings = get_settings()
    splits = data.split(davidson, seed=5)
    train = data.stratified_sample(splits.train, 300, seed=5)
    train_and_register(train, None, TAXONOMY, mode="fast", settings=settings, source="test-score",
                       eval_frame=data.stratified_sample(splits.test, 120, seed=5))
    assert Registry(settings).promote(force=True).promoted
    return settings


@pytest.fixture(scope="module")
def pool_frame(davidson) -> pd.DataFrame:
    splits = data.split(davidson, seed=5)
    return splits.validation[["id", "text"]].head(POOL_SIZE).astype({"id": str}).reset_index(drop=True)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory, pool_frame: pd.DataFrame) -> Path:
    """The pool split over the three formats, in one directory (the CSV's ids are numbers to the reader)."""
    folder = tmp_path_factory.mktemp("pool")
    third = POOL_SIZE // 3
    pool_frame.iloc[:third].to_parquet(folder / "a.parquet")
    pool_frame.iloc[third: 2 * third].to_csv(folder / "b.csv", index=False)
    pool_frame.iloc[2 * third:].to_json(folder / "c.jsonl", orient="records", lines=True)
    return folder


def invoke(*args: str):
    return runner.invoke(cli.app, ["score", *args])


@pytest.mark.integration
def test_score_matches_the_in_process_scorer(ray_local, champion: Settings, pool_dir: Path,
                                             pool_frame: pd.DataFrame, tmp_path: Path):
    out = tmp_path / "scores.parquet"
    result = invoke("--pool", str(pool_dir), "--out", str(out), "--strategy", "margin", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    scored = pd.read_parquet(out).set_index("id").loc[pool_frame["id"]]
    assert list(os.listdir(tmp_path)) == ["scores.parquet"]  # no temporary file left beside it

    loaded = Registry(champion).load(CHAMPION)
    in_process = ScoredPool(pool_frame, loaded.classifier, loaded.ref.cache_key, champion.cache_dir)
    proba = in_process.proba()
    np.testing.assert_allclose(scored[[f"p_{label}" for label in TAXONOMY.labels]].to_numpy(), proba, atol=1e-4)
    assert scored["predicted"].tolist() == loaded.classifier.decide(proba)
    assert set(scored["model_version"]) == {loaded.ref.label}
    expected_scores = Margin().scores(PoolContext(n_classes=len(TAXONOMY.labels), proba=proba))
    np.testing.assert_allclose(scored["score"].to_numpy(), expected_scores, atol=1e-4)
    assert scored["text_sha1"].str.len().eq(40).all()

    # the in-process ranking's top-K is the output's top-K (ties at the cut may fall either way)
    k = 25
    ranked = in_process.rank("margin", k)
    ours = pd.read_parquet(out).iloc[top_k_parquet(str(out), "score", k)]
    np.testing.assert_allclose(ours["score"].to_numpy(), ranked["score"].to_numpy(), atol=1e-4)
    cut = ranked["score"].iloc[-1] + 1e-4
    assert set(ours.loc[ours["score"] > cut, "id"]) == set(ranked.loc[ranked["score"] > cut, "id"].astype(str))


@pytest.mark.integration
def test_bad_input_exits_2_and_writes_nothing(ray_local, champion: Settings, pool_dir: Path, tmp_path: Path,
                                              pool_frame: pd.DataFrame):
    pool_frame.rename(columns={"text": "tweet"}).to_csv(tmp_path / "no_text.csv", index=False)
    pool_frame.head(0).to_parquet(tmp_path / "empty.parquet")
    (tmp_path / "notes.txt").write_text("not a pool")
    cases = {
        "missing file": (["--pool", str(tmp_path / "nope.parquet")], "not found"),
        "no text column": (["--pool", str(tmp_path / "no_text.csv")], "no text column"),
        "not a pool file": (["--pool", str(tmp_path / "notes.txt")], "not a Parquet"),
        "empty pool": (["--pool", str(tmp_path / "empty.parquet")], "pool is empty"),
        "unknown strategy": (["--pool", str(pool_dir), "--strategy", "mystery"], "unknown query strategy"),
        "whole-pool strategy": (["--pool", str(pool_dir), "--strategy", "margin_kmeans"], "needs ['embeddings']"),
        "push without Label Studio": (["--pool", str(pool_dir), "--push-top", "5"], "LABELLOOP_LS_API_KEY"),
    }
    for name, (args, message) in cases.items():
        out = tmp_path / "out" / f"{name}.parquet"
        result = invoke(*args, "--out", str(out))
        assert result.exit_code == 2, (name, result.output)
        assert "error:" in result.output and message in result.output, (name, result.output)
        assert not out.exists(), name
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), name


@pytest.mark.integration
def test_no_champion_exits_2(env: Path, tmp_path: Path, pool_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELLOOP_MLRUNS_DIR", str(tmp_path / "empty-mlruns"))
    result = invoke("--pool", str(pool_dir), "--out", str(tmp_path / "s.parquet"))
    assert result.exit_code == 2 and "no champion" in result.output, result.output
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.integration
def test_push_top_lands_priorities_in_label_studio(ray_local, champion: Settings, pool_frame: pd.DataFrame,
                                                   label_studio: RunningLabelStudio, ls_project: int,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    client = label_studio.client
    mapping = client.import_tasks(ls_project, pool_frame)
    pool_frame.to_json(tmp_path / "pool.jsonl", orient="records", lines=True)
    monkeypatch.setenv("LABELLOOP_LS_URL", label_studio.url)
    monkeypatch.setenv("LABELLOOP_LS_API_KEY", label_studio.api_key)
    monkeypatch.setenv("LABELLOOP_LS_PROJECT_ID", str(ls_project))
    out = tmp_path / "scores.parquet"
    k = 15
    result = invoke("--pool", str(tmp_path / "pool.jsonl"), "--out", str(out), "--strategy", "entropy",
                    "--push-top", str(k))
    assert result.exit_code == 0, result.output
    assert f"pushed {k} of the top {k}" in result.output

    scored = pd.read_parquet(out)
    top = scored.iloc[top_k(scored["score"].to_numpy(), k)]
    version = Registry(champion).load(CHAMPION).ref.label
    stored = [p for p in client.predictions(ls_project) if p["model_version"] == version]
    by_priority = sorted(stored, key=lambda p: p["score"])
    assert [p["task"] for p in by_priority] == [mapping[i] for i in top["id"]]  # most informative first
    assert all(p["score"] < 1 / len(TAXONOMY.labels) for p in stored)  # ahead of every backend pre-label
    labels = [p["result"][0]["value"]["choices"][0] for p in by_priority]
    assert labels == top["predicted"].tolist()
    assert label_studio.sdk.projects.get(ls_project).model_version == version
