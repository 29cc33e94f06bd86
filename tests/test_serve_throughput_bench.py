"""bench/serve_throughput.py records which path each champion was served on and why, and reports a champion
whose faster paths were all refused (or failed) instead of crashing."""

from __future__ import annotations

import importlib.util
import sys

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


def row(texts_per_s: float) -> dict:
    return {"requests": 3, "texts": 300, "seconds": 1.0, "texts_per_s": texts_per_s, "p50_ms": 20.0, "p95_ms": 30.0}


def champion(bench, seed: int, chosen: str, ours: float, pipeline: float, agreement: float) -> dict:
    candidates = [{"path": "torch-fp32", "agreement": 1.0, "texts_per_s": 150.0, "error": None},
                  {"path": "onnx-int8", "agreement": 0.978, "texts_per_s": 300.0, "error": None},
                  {"path": "onnx-fp32", "agreement": None, "texts_per_s": None,
                   "error": "ImportError: import of onnxruntime halted"}]
    entry = {"seed": seed, "version": f"m:v{seed}",
             "serving": {"loaded": True, "precision": chosen, "chosen": chosen, "reason": "because",
                         "candidates": candidates},
             "agreement": {"texts": 1000, "top_label": agreement},
             "sequential": {n: {bench.OURS: row(ours), bench.PIPELINE: row(pipeline),
                                "ratio": round(ours / pipeline, 2)} for n in ("100", "1")},
             "concurrent_single_task": {bench.OURS: {**row(ours), "concurrency": 8},
                                        bench.PIPELINE: {**row(pipeline), "concurrency": 8}, "ratio": 1.5}}
    entry["goal_met"] = bench.goal_met(entry)
    return entry


def fake_result(bench, champions: list[dict]) -> dict:
    return {"goal": bench.GOAL,
            "recipe": {"base_model": "all-MiniLM-L6-v2", "train_rows": 300, "epochs": 1, "min_steps": 20,
                       "seeds": [c["seed"] for c in champions], "quick": True},
            "texts": {"source": "Davidson", "tokens_mean": 30.0, "tokens_p95": 56},
            "machine": {"cpus": 2, "torch": "2.13", "torch_threads": 2, "load_average_start": [9, 9, 9],
                        "load_average_end": [9, 9, 9], "platform": "linux"},
            "rounds": 1, "champions": champions}


def test_the_goal_needs_speed_ratio_and_agreement(bench):
    assert champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995)["goal_met"]
    assert not champion(bench, 2, "onnx-fp32", 240.0, 40.0, 0.995)["goal_met"]  # under 250 texts/s
    assert not champion(bench, 3, "onnx-fp32", 300.0, 100.0, 0.995)["goal_met"]  # 3x
    assert not champion(bench, 4, "onnx-int8", 300.0, 60.0, 0.98)["goal_met"]  # agreement


def test_every_champion_is_reported_with_its_path_even_refused_or_failed(bench):
    refused = champion(bench, 2, "torch-fp32", 150.0, 60.0, 1.0)  # the guard refused the faster paths
    broken = {"seed": 3, "error": "RuntimeError: registry unreachable"}
    report = bench.markdown(fake_result(bench, [champion(bench, 1, "onnx-fp32", 300.0, 60.0, 0.995), refused, broken]))
    assert "| 1 | onnx-fp32 | 99.50% (1000 texts) | 300.0 | 60.0 | 5.0× |" in report
    assert "| 2 | torch-fp32 | 100.00% (1000 texts) | 150.0 | 60.0 | 2.5× |" in report and "| no |" in report
    assert "| 3 | – |" in report and "RuntimeError: registry unreachable" in report
    assert "| onnx-int8 | 97.80% | 300 |" in report
    assert "| onnx-fp32 | – | – | ImportError: import of onnxruntime halted |" in report
    assert "shared with other engineers" in report


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
