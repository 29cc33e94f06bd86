"""bench/al_transfer.py fine-tunes on exactly the labels the loop chose and on as many random ones, saves
every finished run at once, resumes without redoing one, and reports a failed run instead of crashing; it
keeps each replay's choices for a fine-tune elsewhere, and scores the recipe levers' decision rules on
their saved probabilities.

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


def scratch(root) -> list[str]:
    """Kept replays and probabilities go under ``root``, never into the repository's var/."""
    return ["--choices-dir", str(root / "choices"), "--proba-dir", str(root / "proba")]


@pytest.fixture
def env(monkeypatch, tmp_path, embedding_cache_dir):
    """The bench builds its own Settings: point them at the shared data and a throwaway state dir."""
    monkeypatch.setenv("LABELLOOP_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    return ["--cache-dir", str(embedding_cache_dir), *scratch(tmp_path)]


@pytest.fixture(scope="module")
def finished(bench, tmp_path_factory, embedding_cache_dir):
    """One real end-to-end run, shared by the tests that read its results."""
    out = tmp_path_factory.mktemp("al_transfer")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LABELLOOP_DATA_DIR", str(SHARED_DATA))
        mp.setenv("LABELLOOP_STATE_DIR", str(out / "var"))
        code = bench.main([*TINY, "--out", str(out), "--cache-dir", str(embedding_cache_dir), *scratch(out),
                           "--recipes", "default,sqrt_e2"])
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
    assert {(r["seed"], r["arm"], r["recipe"]) for r in state["runs"]} == {
        (0, arm, recipe) for arm in ("loop", "random") for recipe in ("default", "sqrt_e2")}
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
    assert bench.main([*TINY, "--out", str(out), "--resume", *env, *scratch(out), "--recipes", "default,sqrt_e2"]) == 0
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
    assert state["errors"] == [{"seed": 0, "arm": "loop", "recipe": "default", "error": "RuntimeError: out of memory"}]
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


FINETUNE = {"base_model": "m", "epochs": 2, "min_steps": 150, "lr": 1e-4, "batch_size": 32, "max_length": 64,
            "class_weighting": "sqrt"}


def fake_run(seed: int, arm: str, macro: float) -> dict:
    return {"seed": seed, "arm": arm, "recipe": "default", "finetune": FINETUNE,
            "macro_f1": macro, "f1_hate": 0.4, "f1_offensive": 0.9, "f1_neither": 0.8,
            "label_counts": {"hate": 200, "offensive": 1300, "neither": 500}, "best_epoch": 3.0, "steps": 171,
            "train_seconds": 900.0, "test_eval_seconds": 60.0, "fast_mode_at_budget": {"macro_f1": 0.6, "f1_hate": 0.3}}


def fake_state(runs: list[dict], val_frac: float = 0.1) -> dict:
    protocol = {"dataset": "davidson", "pool": 19826, "test": 4957, "test_split": "s", "budget": 2000,
                "initial": 100, "step": 100, "cold_start": "random", "strategy_setting": "auto", "strategy": "margin",
                "val_frac": val_frac, "labels": ["hate", "offensive", "neither"]}
    return {"protocol": protocol, "rare_label": "hate", "seeds": [0, 1], "runs": runs, "errors": [],
            "expected": {"default": FINETUNE},
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


def test_lever_runs_keep_probabilities_and_score_every_decision_rule(finished):
    code, out = finished
    state = json.loads((out / "al_transfer.json").read_text())
    for run in state["runs"]:
        if run["recipe"] == "default" and run["finetune"]["decision_rule"] != "argmax":
            assert "rules" not in run  # its probabilities are already shifted: rules on top would apply twice
            continue
        assert set(run["rules"]) == {"argmax", "offsets", "offsets x0.5", "bagged_offsets", "bagged_offsets x0.5"}
        # the argmax rule, scored from the saved probabilities, is the run's own test score
        assert run["rules"]["argmax"]["macro_f1"] == pytest.approx(run["macro_f1"])
        saved = np.load(out / "proba" / f"{run['recipe']}-seed0-{run['arm']}.npz")
        assert saved["test_proba"].shape == (len(saved["test_y"]), 3) and len(saved["val_y"]) == run["n_val"]
    levers = state["summary"]["levers"]
    assert {(row["recipe"], row["rule"]) for row in levers} >= {("sqrt_e2", "argmax"), ("sqrt_e2", "offsets")}
    baseline = next(row for row in levers if (row["recipe"], row["rule"]) == ("sqrt_e2", "argmax"))
    assert baseline["delta_macro_f1"]["mean"] == 0 and not baseline["keeps_macro_raises_rare"]
    assert "## Levers" in (out / "al_transfer.md").read_text()
    assert all(run["device"].startswith("cpu") for run in state["runs"])


def test_kept_replays_are_reused_without_replaying(bench, finished, env, monkeypatch, tmp_path):
    """A GPU machine has neither the embedding cache nor MLflow: it fine-tunes on the replays a CPU kept."""
    code, out = finished

    def no_replay(*args, **kwargs):
        raise AssertionError("a kept replay was replayed")

    monkeypatch.setattr(bench, "simulate", no_replay)
    fresh = tmp_path / "elsewhere"
    assert bench.main([*TINY, "--out", str(fresh), *env, "--choices-dir", str(out / "choices"),
                       "--proba-dir", str(fresh / "proba"), "--recipes", "default"]) == 0
    before = {(r["arm"], r["recipe"]): r for r in json.loads((out / "al_transfer.json").read_text())["runs"]}
    after = json.loads((fresh / "al_transfer.json").read_text())["runs"]
    for run in after:
        assert run["label_counts"] == before[(run["arm"], "default")]["label_counts"]
        assert run["macro_f1"] == pytest.approx(before[(run["arm"], "default")]["macro_f1"], abs=1e-6)


def test_choose_only_keeps_replays_and_fine_tunes_nothing(bench, env, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "finetune", lambda *a, **k: pytest.fail("fine-tuned in --choose-only"))
    assert bench.main([*TINY, "--out", str(tmp_path), *env, "--choose-only"]) == 0
    kept = sorted(p.name for p in (tmp_path / "choices").iterdir())
    assert len(kept) == 2 and kept[0].endswith("seed0-loop.json") and kept[1].endswith("seed0-random.json")
    assert len(json.loads((tmp_path / "choices" / kept[0]).read_text())["ids"]) == 40


def test_a_default_run_of_an_older_default_recipe_is_not_kept(bench, tmp_path):
    stale = fake_run(0, "loop", 0.71) | {"finetune": {"base_model": "m", "epochs": 2, "class_weighting": "sqrt"}}
    current = fake_run(1, "loop", 0.73)
    expected = fake_state([])["expected"]
    assert bench.is_current(current, expected) and not bench.is_current(stale, expected)
    bench.save(fake_state([stale]) | {"expected": {}}, tmp_path)  # written before the default changed
    bench.save(fake_state([current]), tmp_path)
    assert [r["seed"] for r in json.loads((tmp_path / "al_transfer.json").read_text())["runs"]] == [1]


def test_bad_recipe_or_seed_list_is_an_error_line(bench, env, tmp_path, capsys):
    for bad in (["--recipes", "lots_of_epochs"], ["--only-seeds", "7"], ["--only-seeds", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*TINY, "--out", str(tmp_path), *env, *bad])
        assert exit_info.value.code == 2
    assert "--recipes" in capsys.readouterr().err


def test_a_levers_runs_stand_for_the_product_recipe_when_they_are_exactly_it(bench):
    """Runs are what they trained with: a lever whose recipe the product adopted needs no second run."""
    lever = fake_run(0, "loop", 0.74) | {"recipe": "balanced_e10"}  # same record as the default
    other = fake_run(0, "random", 0.70) | {"recipe": "sqrt_e2", "finetune": FINETUNE | {"epochs": 3}}
    summary = bench.summarise(fake_state([lever, other]))
    assert summary["arms"]["loop"]["macro_f1"]["mean"] == pytest.approx(0.74)
    assert summary["arms"]["random"]["macro_f1"]["n"] == 0
    named = fake_run(0, "loop", 0.5)  # a run under the default's own name comes first
    assert bench.default_runs([lever, named], {"default": FINETUNE}) == [named]
