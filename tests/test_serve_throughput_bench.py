"""bench/serve_throughput.py when serving's int8 guard keeps a champion in fp32: the benchmark says so and
why, and leaves that server out of the timings, instead of raising "unexpected served precision"."""

from __future__ import annotations

import importlib.util
import sys

import httpx
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from labelloop.config import REPO_ROOT, Settings
from training.classifier import FineTunedClassifier, resolve_model_path
from training.registry import LoadedModel, ModelRef


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_throughput_bench", REPO_ROOT / "bench" / "serve_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


class TinyChampion:
    """A model source holding one small fine-tuned-kind model (the guard only quantises that kind)."""

    model_name = "labelloop-hate-offensive"

    def __init__(self):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32, num_labels=3)
        torch.manual_seed(0)
        self.model = FineTunedClassifier(BertForSequenceClassification(config), tokenizer,
                                         ("hate", "offensive", "neither"), 16)

    def current_version(self) -> int:
        return 1

    def load(self, version: int) -> LoadedModel:
        return LoadedModel(ModelRef(self.model_name, version), self.model)

    def aliases(self) -> dict[str, int]:
        return {"champion": 1}

    def versions(self) -> list[int]:
        return [1]

    def check_texts(self, limit: int) -> list[str]:
        return ["you are great", "some words here", "a b c d e f"][:limit]


AGREEMENT = {"texts": 2000, "top_label_agreement": 0.978, "max_abs_prob_diff": 0.2, "mean_abs_prob_diff": 0.01}


def fake_result(bench, precision: dict) -> dict:
    row = {"requests": 4, "texts": 4, "seconds": 0.1, "texts_per_s": 40.0, "p50_ms": 20.0, "p95_ms": 30.0}
    timed = [name for name in ("labelloop fp32", "labelloop int8", "upstream pipeline")
             if precision.get(name, {"timed": True})["timed"]]
    return {
        "model": {"version": "labelloop-hate-offensive:v1", "kind": "FineTunedClassifier", "max_length": 64,
                  "train_rows": 300},
        "texts": {"source": "Davidson", "tokens_mean": 30.0, "tokens_p95": 56},
        "machine": {"cpus": 2, "torch": "2.13", "torch_threads": 2, "load_average_start": [1, 1, 1],
                    "load_average_end": [1, 1, 1]},
        "rounds": 1, "precision": precision,
        "sequential": {name: {str(n): row for n in bench.SIZES} for name in timed},
        "throughput_ratio_vs_pipeline": {name: {str(n): 1.0 for n in bench.SIZES} for name in timed
                                         if name != "upstream pipeline"},
        "concurrent_single_text": {name: {"requests": 16, "concurrency": 8, "texts_per_s": 50.0, "p50_ms": 90.0,
                                          "p95_ms": 100.0} for name in timed},
        "int8_vs_fp32": AGREEMENT, "int8_vs_fp32_embedding_head": AGREEMENT,
        "served_fp32_label_matches_direct_predict": 1.0,
    }


def test_a_guard_that_serves_fp32_is_reported_with_its_reason(bench, tmp_path, monkeypatch):
    """The real guard, on a real server of the benchmark's kind, told that int8 agrees on 97.8 %."""
    from serving.app import create_app

    monkeypatch.setattr("serving.quantize.top_label_agreement", lambda a, b, texts: 0.978)
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", quantize="int8", poll_seconds=0,
                        basic_user=None, basic_password=None, api_token=None)
    app = create_app(settings, model_source=TinyChampion())
    with bench.GuardLog() as guard, bench.ServerThread(app) as server:
        served = httpx.get(f"{server.url}/health").json()["precision"]
    assert served == "fp32"

    precision = bench.precision_report({"labelloop fp32": "fp32", "labelloop int8": served}, guard.messages, AGREEMENT)
    assert precision["labelloop fp32"] == {"requested": "fp32", "served": "fp32", "timed": True}
    int8 = precision["labelloop int8"]
    assert int8["served"] == "fp32" and int8["timed"] is False
    assert guard.messages and all(message in int8["reason"] for message in guard.messages)  # the guard's own words
    assert "97.8" in guard.messages[0]
    assert "97.80% (the guard requires 99%" in int8["reason"]

    report = bench.markdown(fake_result(bench, precision))
    assert "## Precision served" in report and int8["reason"] in report
    assert "| labelloop int8 |" not in report and "| 1 | labelloop int8 |" not in report
    assert "| 1 | labelloop fp32 | 40.0 |" in report


def test_when_int8_is_served_nothing_is_left_out(bench):
    said = ["labelloop-hate-offensive:v1: serving int8 (top label agrees with fp32 on 99.40% of 500 check texts)"]
    precision = bench.precision_report({"labelloop fp32": "fp32", "labelloop int8": "int8"}, said, AGREEMENT)
    assert all(entry["timed"] and "reason" not in entry for entry in precision.values())
    assert precision["labelloop int8"]["guard_log"] == said
    report = bench.markdown(fake_result(bench, precision))
    assert "Precision served" not in report and "| 1 | labelloop int8 | 40.0 |" in report
