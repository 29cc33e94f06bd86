"""bench/al_transfer.py fine-tunes on exactly the labels the loop chose and on as many random ones, saves
every finished run at once, resumes without redoing one, and reports a failed run instead of crashing.

The end-to-end runs use a tiny real Davidson slice (160-item pool, 40 labels, one epoch of two steps)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from active_learning.simulate import parse_strategy, pool_and_test, simulate
from labelloop.config import REPO_ROOT
from tests.conftest import SHARED_DATA

TINY = ["--seeds", "1", "--rows", "200", "--budget", "40", "--initial", "10", "--step", "10", "--epochs", "1",
        "--min-steps", "0", "--val-frac", "0.2"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("al_transfer_bench", REPO_ROOT / "bench" / "al_transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def env(monkeypatch, tmp_path, embedding_cache_dir):
    """The bench builds its own Settings: point them at the shared data and a throwaway state dir."""
    monkeypatch.setenv("LABELLOOP_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    return ["--cache-dir", str(embedding_cache_dir)]


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory, embedding_cache_dir):
    """One real end-to-end run, shared by the tests that read its results."""
    out = tmp_path_factory.mktemp("al_transfer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABELLOOP_DATA_DIR", str(SHARED_DATA))
        mp.setenv("LABELLOOP_STATE_DIR", str(out / "var"))
        code = bench.main([*TINY, "--out", str(out), "--cache-dir", str(embedding_cache_dir)])
    return code, out


def test_simulate_reports_each_runs_label_set(davidson_small, settings):
    result = simulate(davidson_small, ["margin", "random"], seeds=[0], budget=40, step=10, initial=10,
                      settings=settings, log_to_mlflow=False)
    pool_y = pool_and_test(davidson_small)[0]["label"].to_numpy()
    for spec in ("margin", "random"):
        chosen = result.labeled[(spec, 0)]
        assert len(chosen) == 40 and len(np.unique(chosen)) == 40
        last = result.curves[(result.curves["strategy"] == spec) & (result.curves["n_labels"] == 40)].iloc[0]
        for label in davidson_small.taxonomy.labels:
            assert (pool_y[chosen] == label).sum() == last[f"labeled_{label}"]
    assert set(result.labeled[("margin", 0)]) != set(result.labeled[("random", 0)])


def test_runs_end_to_end_and_reports_both_arms(finished):
    code, out = finished
    assert code == 0
    state = json.loads((out / "al_transfer.json").read_text())
    assert {(r["seed"], r["arm"]) for r in state["runs"]} == {(0, "loop"), (0, "random")}
    for run in state["runs"]:
        assert run["n_labels"] == 40 and sum(run["label_counts"].values()) == 40
        assert run["n_train"] + run["n_val"] == 40
        assert 0.0 <= run["macro_f1"] <= 1.0 and 0.0 <= run["f1_hate"] <= 1.0
        fast = run["fast_mode_at_budget"]
        assert {k: fast[f"labeled_{k}"] for k in run["label_counts"]} == run["label_counts"]
    default = parse_strategy("auto", multi_label=False).spec  # whatever the default is today, resolved
    assert state["protocol"]["strategy_setting"] == "auto" and state["protocol"]["strategy"] == default
    assert "LogisticRegression" in state["fast_head"] and state["replay"]["encoder"]
    assert state["summary"]["seeds_complete"] == 1
    md = (out / "al_transfer.md").read_text()
    assert f"`auto` → **`{default}`**" in md and "1 of 1 seeds" not in md and "Paired difference" in md
    assert "--resume" in md and "0.699" in md  # the command to continue, and the note's reference


def test_resume_redoes_no_finished_run(bench, finished, env, monkeypatch):
    code, out = finished
    before = json.loads((out / "al_transfer.json").read_text())["runs"]

    def no_finetune(*args, **kwargs):
        raise AssertionError("a finished run was fine-tuned again")

    monkeypatch.setattr(bench, "finetune", no_finetune)
    assert bench.main([*TINY, "--out", str(out), "--resume", *env]) == 0
    assert json.loads((out / "al_transfer.json").read_text())["runs"] == before


def test_resume_refuses_results_of_another_protocol(bench, finished, env, capsys):
    code, out = finished
    text = (out / "al_transfer.json").read_text()
    assert bench.main([*TINY[:-2], "--val-frac", "0.25", "--out", str(out), "--resume", *env]) == 2
    assert "val_frac" in capsys.readouterr().err
    assert (out / "al_transfer.json").read_text() == text


def test_a_failed_finetune_is_reported_and_the_other_arm_still_runs(bench, env, tmp_path, monkeypatch):
    real = bench.finetune
    calls = []

    def flaky(train, *args, **kwargs):
        calls.append(len(train))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(train, *args, **kwargs)

    monkeypatch.setattr(bench, "finetune", flaky)
    assert bench.main([*TINY, "--out", str(tmp_path), *env]) == 1
    state = json.loads((tmp_path / "al_transfer.json").read_text())
    assert state["errors"] == [{"seed": 0, "arm": "loop", "error": "RuntimeError: out of memory"}]
    assert [r["arm"] for r in state["runs"]] == ["random"]
    md = (tmp_path / "al_transfer.md").read_text()
    assert "0 of 1 seeds completed" in md and "out of memory" in md


def test_bad_input_is_an_error_line(bench, env, tmp_path, capsys):
    assert bench.main(["--rows", "200", "--budget", "5000", "--out", str(tmp_path), *env]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "al_transfer.json").exists()


def test_paired_difference_and_goal(bench):
    runs = [{"seed": s, "arm": a, "macro_f1": f, "f1_hate": h, "label_counts": {"hate": n},
             "fast_mode_at_budget": {"macro_f1": 0.6, "f1_hate": 0.3}}
            for s, a, f, h, n in [(0, "loop", 0.74, 0.47, 250), (0, "random", 0.70, 0.40, 120),
                                  (1, "loop", 0.73, 0.46, 240), (1, "random", 0.71, 0.42, 110),
                                  (2, "random", 0.74, 0.30, 100)]]  # unpaired: not in the difference
    state = {"runs": runs, "rare_label": "hate", "seeds": [0, 1, 2], "protocol": {"budget": 2000}}
    summary = bench.summarise(state)
    d = summary["paired"]["macro_f1"]
    assert d["seeds"] == [0, 1] and d["mean"] == pytest.approx(0.03) and d["ci95"][0] < 0.03 < d["ci95"][1]
    assert summary["paired"]["labeled_hate"]["mean"] == pytest.approx(130)
    assert summary["arms"]["loop"]["goal"]["met"] and not summary["arms"]["random"]["goal"]["met"]
    assert summary["seeds_complete"] == 2


def fake_run(seed: int, arm: str, macro: float) -> dict:
    return {"seed": seed, "arm": arm, "macro_f1": macro, "f1_hate": 0.4, "f1_offensive": 0.9, "f1_neither": 0.8,
            "label_counts": {"hate": 200, "offensive": 1300, "neither": 500}, "best_epoch": 3.0, "steps": 171,
            "train_seconds": 900.0, "test_eval_seconds": 60.0, "fast_mode_at_budget": {"macro_f1": 0.6, "f1_hate": 0.3}}


def fake_state(runs: list[dict], val_frac: float = 0.1) -> dict:
    finetune = {"base_model": "m", "epochs": 2, "min_steps": 150, "lr": 1e-4, "batch_size": 32, "max_length": 64,
                "class_weighting": "sqrt"}
    protocol = {"dataset": "davidson", "pool": 19826, "test": 4957, "test_split": "s", "budget": 2000,
                "initial": 100, "step": 100, "cold_start": "random", "strategy_setting": "auto", "strategy": "margin",
                "val_frac": val_frac, "finetune": finetune, "labels": ["hate", "offensive", "neither"]}
    return {"protocol": protocol, "rare_label": "hate", "seeds": [0, 1], "runs": runs, "errors": [],
            "machine": {"cpus": 2, "torch": "2", "torch_threads": 2, "load_average": [1, 1, 1]},
            "fast_head": "LogisticRegression()", "replay": {"encoder": "m", "C": 1.0}, "references": [],
            "command": "bench/al_transfer.py --resume"}


def test_two_processes_sharing_an_out_dir_keep_each_others_runs(bench, tmp_path):
    bench.save(fake_state([fake_run(0, "loop", 0.73)]), tmp_path)
    bench.save(fake_state([fake_run(0, "random", 0.70)]), tmp_path)
    state = json.loads((tmp_path / "al_transfer.json").read_text())
    assert sorted((r["seed"], r["arm"]) for r in state["runs"]) == [(0, "loop"), (0, "random")]
    assert state["summary"]["paired"]["macro_f1"]["mean"] == pytest.approx(0.03)
    assert "1 of 2 seeds completed" in (tmp_path / "al_transfer.md").read_text()
    bench.save(fake_state([fake_run(1, "loop", 0.5)], val_frac=0.2), tmp_path)  # another protocol: not merged
    assert [r["seed"] for r in json.loads((tmp_path / "al_transfer.json").read_text())["runs"]] == [1]
