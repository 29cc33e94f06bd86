"""bench/serve_throughput.py records which path each champion was served on and why, and reports a champion
whose faster paths were all refused (or failed) instead of crashing."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import httpx
import pytest

from labelloop.config import REPO_ROOT, Settings
from tests.test_classifier_kinds import tiny_finetuned
from tests.test_fast_path import TinySource
from training.classifier import AutoTokenizer, resolve_model_path


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_throughput_bench", REPO_ROOT / "bench" / "serve_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def workload(bench, ours: float, pipeline: float, ratio: float | None = None) -> dict:
    row = {"texts_per_s": ours, "rounds": [ours], "requests": 3, "p50_ms": 20.0, "p95_ms": 30.0}
    return {bench.OURS: row, bench.PIPELINE: {**row, "texts_per_s": pipeline, "rounds": [pipeline]},
            "ratio": ratio if ratio is not None else round(ours / pipeline, 2)}


def champion(bench, seed: int, chosen: str, ours: float, pipeline: float, agreement: float) -> dict:
    candidates = [{"path": "torch-fp32", "agreement": 1.0, "texts_per_s": 150.0, "error": None},
                  {"path": "onnx-int8", "agreement": 0.978, "texts_per_s": 300.0, "error": None,
                   "batch_dependent": True, "agreement_low": 0.9651,
                   "agreement_by_batching": {"calls of 128 in batches of 16": 0.99, "single texts": 0.982}},
                  {"path": "onnx-fp32", "agreement": None, "texts_per_s": None,
                   "error": "ImportError: import of onnxruntime halted"}]
    entry = {"seed": seed, "version": f"m:v{seed}", "eval_macro_f1": 0.71, "load_and_choose_seconds": 12.0,
             "serving": {"loaded": True, "precision": chosen, "chosen": chosen, "reason": "because",
                         "candidates": candidates},
             "agreement": {"texts": 1000, "top_label": agreement},
             "workloads": {w: workload(bench, ours, pipeline) for w in ("100", "1", "concurrent")}}
    entry["goal_met"] = bench.goal_met(entry)
    return entry


def fake_result(bench, champions: list[dict], loads: list[float]) -> dict:
    return {"goal": bench.GOAL,
            "recipe": {**bench.recipe(300), "base_model": "all-MiniLM-L6-v2",
                       "seeds": [c["seed"] for c in champions], "quick": True},
            "texts": {"source": "Davidson", "tokens_mean": 30.0, "tokens_p95": 56},
            "machine": {"cpus": 2, "torch": "2.13", "torch_threads": 2, "load_average_start": [loads[0]] * 3,
                        "load_average_per_round": loads, "load_average_end": [loads[-1]] * 3, "platform": "linux"},
            "plan": {"rounds": len(loads), "requests_100": 2, "requests_1": 4, "concurrency": 8,
                     "concurrent_requests": 16, "agreement_texts": 1000},
            "seconds": {"total": 100.0, "measuring": 50.0},
            "champions": champions}


def test_the_goal_needs_speed_ratio_and_agreement(bench):
    assert champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995)["goal_met"]
    assert not champion(bench, 2, "onnx-fp32", 240.0, 40.0, 0.995)["goal_met"]  # under 250 texts/s
    assert not champion(bench, 3, "onnx-fp32", 300.0, 100.0, 0.995)["goal_met"]  # 3x
    assert not champion(bench, 4, "onnx-int8", 300.0, 60.0, 0.98)["goal_met"]  # agreement


def test_every_champion_is_reported_with_its_path_even_refused_or_failed(bench):
    refused = champion(bench, 2, "torch-fp32", 150.0, 60.0, 1.0)  # the guard refused the faster paths
    broken = {"seed": 3, "error": "RuntimeError: registry unreachable"}
    report = bench.markdown(fake_result(bench, [champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995), refused,
                                                broken], [9.1, 12.0, 10.5]))
    assert "| 1 | 0.71 | onnx-fp32 | 99.50% (1000 texts) ✓ | 300.0 ✓ | 60.0 | 5.0× ✓ |" in report
    assert "| 2 | 0.71 | torch-fp32 | 100.00% (1000 texts) ✓ | 150.0 ✗ | 60.0 | 2.5× ✗ |" in report
    assert "| 3 | – | – |" in report and "RuntimeError: registry unreachable" in report
    assert ("| onnx-int8 | 97.80% | 96.51% | calls of 128 in batches of 16: 99.00%, single texts: 98.20% | 300 |"
            in report)
    assert "| onnx-fp32 | – | – | – | – | ImportError: import of onnxruntime halted |" in report
    assert "goal >= 250" in report and "goal >= 4×" in report and "goal >= 99%" in report
    assert "load average 9.1–12.0 (median 10.5)" in report
    assert "absolute texts/s are lower bounds" in report


def test_a_quiet_machine_is_not_called_loaded(bench):
    report = bench.markdown(fake_result(bench, [champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995)], [0.3, 0.5]))
    assert "lower bounds" not in report


def test_champions_are_cached_by_recipe_and_seed(bench, tmp_path):
    base = bench.recipe(2000)
    assert bench.champion_store(tmp_path, base, 1) == bench.champion_store(tmp_path, bench.recipe(2000), 1)
    assert bench.champion_store(tmp_path, base, 1) != bench.champion_store(tmp_path, base, 2)
    assert bench.champion_store(tmp_path, base, 1) != bench.champion_store(tmp_path, bench.recipe(1000), 1)
    assert bench.champion_store(tmp_path, base, 1) != bench.champion_store(tmp_path, bench.recipe(2000, epochs=1), 1)
    # an earlier recipe's champions, named explicitly (a new config field at a default that trains the same)
    assert bench.champion_store(tmp_path, base, 2, "f6ebbaf1ca") == tmp_path / "f6ebbaf1ca-seed-2"


def test_rounds_interleave_every_system_and_ratios_pair_rounds(bench):
    names = ["a", "b", "c", "d"]
    firsts = [bench.rotation(names, turn)[0] for turn in range(8)]
    assert sorted(firsts) == sorted(names * 2)
    assert all(sorted(bench.rotation(names, turn)) == names for turn in range(8))
    # round 2 ran under a burst of load that halved both systems: the paired ratio is unaffected
    assert bench.paired_ratio([400.0, 200.0, 420.0], [100.0, 50.0, 100.0]) == 4.0
    assert bench.summarise_rounds([400.0, 200.0, 420.0], [0.25, 0.5, 0.24])["texts_per_s"] == 400.0


def test_measure_interleaves_requests_across_servers(bench):
    """Fake servers that answer instantly: every system gets every round and workload, in rotating order."""
    calls: list[tuple[str, int]] = []

    def server(name: str) -> httpx.Client:
        def handler(request: httpx.Request) -> httpx.Response:
            import json

            tasks = json.loads(request.content)["tasks"]
            calls.append((name, len(tasks)))
            region = {"value": {"choices": ["hate"]}}
            return httpx.Response(200, json={"results": [{"result": [region]} for _ in tasks]})

        return httpx.Client(transport=httpx.MockTransport(handler), base_url="http://test")

    systems = [bench.System(1, bench.OURS, server("1o")), bench.System(1, bench.PIPELINE, server("1p")),
               bench.System(2, bench.OURS, server("2o")), bench.System(2, bench.PIPELINE, server("2p"))]
    args = SimpleNamespace(rounds=3, requests_100=2, requests_1=3, concurrency=2, concurrent_requests=4)
    loads: list[float] = []
    measured = bench.measure(systems, [f"text {i}" for i in range(500)], args, loads)
    assert len(loads) == 3
    hundreds = [name for name, n in calls if n == 100]
    assert len(hundreds) == 3 * 2 * 4
    assert {hundreds[i] for i in range(0, len(hundreds), 4)} == {"1o", "1p", "2o", "2p"}  # each goes first
    for workload in ("100", "1", "concurrent"):
        assert all(len(rates) == 3 for rates in measured["rates"][workload].values())
    entry = bench.summarise_champion({"seed": 1, "agreement": {"top_label": 1.0, "texts": 2}}, measured, 1)
    assert set(entry["workloads"]) == {"100", "1", "concurrent"} and isinstance(entry["goal_met"], bool)


def test_the_path_is_read_from_a_real_servers_health(bench, tmp_path, monkeypatch):
    """A real server whose ONNX candidates cannot run (no onnxruntime): the bench records that, and the path
    actually served, without raising."""
    from serving.app import create_app

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", quantize="auto", poll_seconds=0,
                        basic_user=None, basic_password=None, api_token=None, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    app = create_app(settings, model_source=TinySource(tiny_finetuned(tokenizer)))
    with bench.ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        path = bench.served_path(client)
        texts = ["you are great", "some words here"]
        agreement = bench.served_agreement(client, texts, tiny_finetuned(tokenizer).predict(texts))
    assert path["loaded"] and path["chosen"] in ("torch-fp32", "torch-int8")
    errors = {c["path"]: c["error"] for c in path["candidates"]}
    assert "onnxruntime" in errors["onnx-fp32"] and "onnxruntime" in errors["onnx-int8"]
    assert agreement == {"texts": 2, "top_label": 1.0}


def test_a_rerun_rewrites_the_tables_and_keeps_the_hand_written_notes(bench, tmp_path, monkeypatch):
    results = iter([fake_result(bench, [champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995)], [9.0]),
                    fake_result(bench, [champion(bench, 1, "onnx-int8", 310.0, 62.0, 0.995)], [0.4])])
    monkeypatch.setattr(bench, "run", lambda args: next(results))
    monkeypatch.setattr(sys, "argv", ["serve_throughput.py", "--out", str(tmp_path)])
    bench.main()
    report = tmp_path / "serve_throughput.md"
    report.write_text(report.read_text() + bench.NOTES + "## Levers\n\nstatic int8: slower\n")
    bench.main()
    rerun = report.read_text()
    assert "| 1 | 0.71 | onnx-int8 |" in rerun and "| 1 | 0.71 | onnx-fp32 |" not in rerun
    assert rerun.endswith("## Levers\n\nstatic int8: slower\n") and rerun.count(bench.NOTES) == 1
    assert json.loads((tmp_path / "serve_throughput.json").read_text())["champions"][0]["serving"]["chosen"] == \
        "onnx-int8"


def test_an_interrupted_champion_store_is_trained_again_and_a_finished_one_reused(bench, tmp_path, monkeypatch):
    from labelloop import data

    calls: list[tuple] = []

    class FakeRegistry:
        name = "m"

        def __init__(self, settings):
            pass

        def promote(self, version):
            calls.append(("promote", version))

        def alias_version(self, alias):
            return 7

    def fake_train(train, validation, taxonomy, *, settings, finetune_config, **kwargs):
        assert not (store / "leftover").exists()  # the interrupted run's files are gone before training
        calls.append(("train", len(train), finetune_config.seed))
        store.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(ref=SimpleNamespace(version=7, label="m:v7"), report=SimpleNamespace(macro_f1=0.7))

    monkeypatch.setattr(bench, "Registry", FakeRegistry)
    monkeypatch.setattr(bench, "train_and_register", fake_train)
    davidson = data.load("davidson", settings=Settings())
    recipe = bench.recipe(40)
    store = bench.champion_store(tmp_path, recipe, 5)
    store.mkdir(parents=True)
    (store / "leftover").write_text("a run killed mid-training")
    first = bench.ensure_champion(store, davidson, 5, recipe)
    assert first["trained_this_run"] and [c[0] for c in calls] == ["train", "promote"] and calls[0][2] == 5
    again = bench.ensure_champion(store, davidson, 5, recipe)
    assert not again["trained_this_run"] and again["eval_macro_f1"] == 0.7 and again["version"] == "m:v7"
    assert json.loads((store / "champion.json").read_text())["recipe"] == recipe and "recipe" not in again
    assert len(calls) == 2  # reused, not trained again


def test_champions_reused_by_key_report_the_recipe_they_were_trained_with(bench, tmp_path):
    old = bench.recipe(300, epochs=1)
    key = bench.recipe_key(old)
    for seed in (1, 2):
        store = bench.champion_store(tmp_path, old, seed)
        store.mkdir(parents=True)
        (store / "champion.json").write_text(json.dumps({"eval_macro_f1": 0.7, "recipe": old}))
    assert bench.stored_recipe(tmp_path, key, [1, 2]) == old
    with pytest.raises(ValueError, match="no finished champion"):
        bench.stored_recipe(tmp_path, key, [1, 3])
    (bench.champion_store(tmp_path, old, 2) / "champion.json").write_text(json.dumps({"eval_macro_f1": 0.7}))
    with pytest.raises(ValueError, match="does not record the recipe"):
        bench.stored_recipe(tmp_path, key, [1, 2])
    report = bench.markdown(fake_result(bench, [champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995)], [0.4])
                            | {"recipe": {**old, "base_model": "m", "seeds": [1], "quick": False,
                                          "champions_key": key}})
    assert f"the recipe stored with champions `{key}`" in report and "1 epochs" in report


def test_a_bad_champions_key_is_an_error_line_not_a_traceback(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["serve_throughput.py", "--champions-dir", str(tmp_path),
                                      "--champions-key", "0123456789", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2 and "error: no finished champion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
