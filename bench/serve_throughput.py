"""Serving throughput: labelloop's ML backend vs the upstream example's way of serving the same model.

What is compared, side by side in one run (interleaved, so CPU contention from anything else running
hits every system alike):

- ``labelloop fp32`` / ``labelloop int8``: ``serving.app`` over HTTP (uvicorn), the champion loaded
  from a real MLflow registry, all texts of a request in one length-sorted, dynamically padded call.
- ``upstream pipeline``: what label-studio-ml-backend's ``bert_classifier`` example does, with the
  model kept in memory: ``transformers.pipeline("text-classification")`` loaded from the same fine-tuned
  checkpoint and called with the request's texts (one forward pass per task), behind an equivalent
  ``/predict`` endpoint (a sync handler, as upstream's Flask route is).

The model is MiniLM-L6 *fine-tuned briefly* on 2,000 real Davidson rows (one epoch) and registered
and promoted in a temporary MLflow store that is kept between runs (``--store``); speed is what is
measured, but a trained head makes the int8 top-label agreement meaningful. Agreement is measured on
held-out Davidson texts the model never saw.

Serving re-checks every champion it loads and serves int8 only if its top label agrees with fp32 on
enough check texts, so a fresh fine-tune may be served in fp32 by the "int8" server. The run then says
so, with the agreement the guard measured (``precision`` in the results), and times fp32 and the
pipeline rather than report fp32 speed under the int8 name.

Run: ``.venv/bin/python bench/serve_throughput.py`` (≈ 5-10 min on 2 cores, plus ≈ 2 min the first time
for the fine-tune; ``--help`` shows a quick configuration). Writes ``bench/results/serve_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from labelloop import data  # noqa: E402
from labelloop.config import REPO_ROOT, Settings  # noqa: E402
from labelloop.taxonomy import get_taxonomy, label_config_xml  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.quantize import MIN_AGREEMENT, quantize_classifier  # noqa: E402
from training.classifier import FineTunedClassifier, TextClassifier, load_encoder  # noqa: E402
from training.fast import train_fast  # noqa: E402
from training.finetune import FineTuneConfig  # noqa: E402
from training.registry import Registry  # noqa: E402
from training.train import train_and_register  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
TAXONOMY = get_taxonomy("hate_offensive")
CONFIG = label_config_xml(TAXONOMY)
SIZES = (1, 10, 100)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


def bench_settings(store: Path, quantize: str = "none") -> Settings:
    return Settings(mlruns_dir=store / "mlruns", state_dir=store / "var", taxonomy=TAXONOMY.name,
                    poll_seconds=0, quantize=quantize, basic_user=None, basic_password=None, api_token=None)


def ensure_champion(store: Path, davidson: data.LabeledData, train_rows: int = 2000) -> tuple[str, float]:
    """Fine-tune once and promote; later runs reuse the store. Returns (model version, seconds spent)."""
    settings = bench_settings(store)
    registry = Registry(settings)
    if registry.alias_version("champion") is not None:
        return f"{registry.name}:v{registry.alias_version('champion')}", 0.0
    started = time.perf_counter()
    splits = data.split(davidson, seed=0)
    train = data.stratified_sample(splits.train, train_rows, seed=0)
    validation = data.stratified_sample(splits.validation, 300, seed=0)
    evaluation = data.stratified_sample(splits.test, 500, seed=0)
    result = train_and_register(train, validation, TAXONOMY, mode="finetune", settings=settings,
                                source="bench-serve", eval_frame=evaluation,
                                finetune_config=FineTuneConfig(epochs=1, max_length=settings.max_length))
    registry.promote(result.ref.version)
    return result.ref.label, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------
# the upstream-style baseline
# ------------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class BaselinePredictRequest(_Lenient):
    tasks: list[dict[str, Any]]


def baseline_app(checkpoint: Path, labels: tuple[str, ...], model_version: str) -> FastAPI:
    """label-studio-ml-backend's bert_classifier ``predict``: a pipeline over the task texts."""
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(checkpoint), tokenizer=str(checkpoint), device="cpu")
    pipe.model.config.id2label = dict(enumerate(labels))
    pipe.model.config.label2id = {label: i for i, label in enumerate(labels)}
    app = FastAPI()

    @app.post("/predict")
    def predict(request: BaselinePredictRequest) -> dict:
        texts = [task["data"]["text"] for task in request.tasks]
        results = []
        for prediction in pipe(texts):
            region = {"from_name": "label", "to_name": "text", "type": "choices",
                      "value": {"choices": [prediction["label"]]}}
            results.append({"model_version": model_version, "score": prediction["score"], "result": [region]})
        return {"results": results}

    return app


# ------------------------------------------------------------------------------------------------
# servers and clients
# ------------------------------------------------------------------------------------------------


class ServerThread:
    """A uvicorn server on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, app: FastAPI):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def predict_body(texts: list[str]) -> dict:
    tasks = [{"id": i, "data": {"text": t}, "annotations": [], "predictions": [], "project": 1}
             for i, t in enumerate(texts)]
    return {"tasks": tasks, "project": "1.1700000000", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None}}


def timed_predict(client: httpx.Client, texts: list[str]) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    r = client.post("/predict", json=predict_body(texts))
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    results = r.json()["results"]
    if len(results) != len(texts):
        raise RuntimeError(f"{len(results)} results for {len(texts)} tasks")
    return elapsed, results


def batch_histogram(client: httpx.Client) -> tuple[float, float]:
    """(model calls, texts) so far, from the backend's Prometheus metrics."""
    text = client.get("/metrics/prometheus").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["labelloop_inference_batch_texts_count"], samples["labelloop_inference_batch_texts_sum"]


def summarise(latencies: list[float], n_texts: int) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    return {"requests": len(ms), "texts": n_texts, "seconds": round(sum(latencies), 3),
            "texts_per_s": round(n_texts / sum(latencies), 1),
            "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], 1)}


# ------------------------------------------------------------------------------------------------
# which precision was served, and why
# ------------------------------------------------------------------------------------------------

REQUESTED = {"labelloop fp32": "fp32", "labelloop int8": "int8"}


class GuardLog(logging.Handler):
    """What serving's int8 guard (``serving.quantize``) says while the servers load the champion: it logs
    the top-label agreement it measured and the precision it chose, and that is the reason to report
    when it serves fp32 where int8 was asked for."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._logger = logging.getLogger("serving.quantize")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> GuardLog:
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def precision_report(served: dict[str, str], guard_messages: list[str], agreement: dict[str, float]) -> dict:
    """Per labelloop system: the precision asked for, the one served, whether it is timed, and, when the
    two differ, why. The guard re-checks every champion it loads, so a fresh fine-tune may come out fp32;
    timing it under the name "int8" would report fp32 speed as int8, so such a system is reported and
    left out of the timings instead."""
    report = {}
    for name, wanted in REQUESTED.items():
        got = served.get(name)
        entry: dict[str, Any] = {"requested": wanted, "served": got, "timed": got == wanted}
        if wanted == "int8":
            entry["guard_log"] = list(guard_messages)
        if got != wanted:
            said = "; ".join(guard_messages) or "the guard logged no reason"
            entry["reason"] = (
                f"asked for {wanted}, served {got}: {said}. On this benchmark's {agreement['texts']} held-out "
                f"texts the int8 copy keeps the fp32 top label on {agreement['top_label_agreement']:.2%} (the "
                f"guard requires {MIN_AGREEMENT:.0%} on the frozen evaluation set's check texts), so this run "
                f"times fp32 and the upstream pipeline only")
        report[name] = entry
    return report


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def agreement(classifier: TextClassifier, texts: list[str]) -> dict[str, float]:
    fp32 = classifier.predict_proba(texts)
    int8 = quantize_classifier(classifier).predict_proba(texts)
    same = float((fp32.argmax(1) == int8.argmax(1)).mean())
    return {"texts": len(texts), "top_label_agreement": round(same, 4),
            "max_abs_prob_diff": round(float(np.abs(fp32 - int8).max()), 4),
            "mean_abs_prob_diff": round(float(np.abs(fp32 - int8).mean()), 5)}


def run(args: argparse.Namespace) -> dict:
    load_start = [round(x, 2) for x in os.getloadavg()]
    davidson = data.load("davidson", settings=Settings())
    model_version, finetune_seconds = ensure_champion(args.store, davidson, args.train_rows)
    registry = Registry(bench_settings(args.store))
    classifier = registry.load("champion").classifier
    assert isinstance(classifier, FineTunedClassifier)

    splits = data.split(davidson, seed=0)
    held_out = splits.test["text"].tolist()
    rng = np.random.default_rng(args.seed)
    pool = [held_out[i] for i in rng.permutation(len(held_out))]
    lengths = [len(ids) for ids in classifier.tokenizer(pool[:2000])["input_ids"]]

    print(f"model {model_version}; measuring int8 agreement on {args.agreement_texts} held-out texts …")
    agree = agreement(classifier, pool[: args.agreement_texts])
    print(agree)
    fast_model = train_fast(data.stratified_sample(splits.train, args.train_rows, seed=0), TAXONOMY,
                            encoder=load_encoder(bench_settings(args.store).base_model, classifier.max_length))
    agree_fast = agreement(fast_model, pool[: args.agreement_texts])
    print("embedding head:", agree_fast)

    checkpoint = Path(tempfile.mkdtemp(prefix="labelloop-bench-ckpt-"))
    classifier.save(checkpoint)
    systems = {
        "labelloop fp32": create_app(bench_settings(args.store, "none")),
        "labelloop int8": create_app(bench_settings(args.store, "int8")),
        "upstream pipeline": baseline_app(checkpoint / "model", classifier.labels, model_version),
    }
    requests_per_round = {1: args.requests_1, 10: args.requests_10, 100: args.requests_100}
    latencies: dict[str, dict[int, list[float]]] = {name: {n: [] for n in SIZES} for name in systems}
    fp32_name = "labelloop fp32"
    label_agreement: dict[str, list[bool]] = {fp32_name: []}
    cursor = args.agreement_texts  # texts for timing come after the agreement slice
    with GuardLog() as guard, ServerThread(systems["labelloop fp32"]) as ours, \
            ServerThread(systems["labelloop int8"]) as ours8, ServerThread(systems["upstream pipeline"]) as base:
        servers = {"labelloop fp32": ours, "labelloop int8": ours8, "upstream pipeline": base}
        clients = {name: httpx.Client(base_url=s.url, timeout=600) for name, s in servers.items()}
        served = {name: clients[name].get("/health").json()["precision"] for name in REQUESTED}
        precision = precision_report(served, guard.messages, agree)
        for name, entry in precision.items():
            print(f"{name}: served {entry['served']}" + (f" ({entry['reason']})" if "reason" in entry else ""))
        names = [name for name in systems if precision.get(name, {"timed": True})["timed"]]
        systems = {name: systems[name] for name in names}
        latencies = {name: latencies[name] for name in names}
        for client in (clients[name] for name in names):  # warm-up: first calls pay lazy initialisation
            for n in (1, 10, 100):
                timed_predict(client, pool[:n])
        for round_ in range(args.rounds):
            for n in SIZES:
                for i in range(requests_per_round[n]):
                    texts = pool[cursor : cursor + n]
                    cursor = (cursor + n) % (len(pool) - 100)
                    shift = (round_ + i) % len(names)  # every system goes first equally often
                    for name in names[shift:] + names[:shift]:
                        elapsed, results = timed_predict(clients[name], texts)
                        latencies[name][n].append(elapsed)
                        if name == fp32_name:
                            label_agreement[name].extend(
                                r["result"][0]["value"]["choices"][0] == label
                                for r, label in zip(results, classifier.predict(texts), strict=True))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)

        concurrent = {}
        texts_c = pool[cursor : cursor + args.concurrent_requests]
        for name in names:
            client = clients[name]
            before = batch_histogram(client) if name != "upstream pipeline" else None

            def one(text: str, client: httpx.Client = client) -> float:
                return timed_predict(client, [text])[0]

            started = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool_:
                lat = list(pool_.map(one, texts_c))
            wall = time.perf_counter() - started
            entry = {"requests": len(lat), "concurrency": args.concurrency,
                     "texts_per_s": round(len(lat) / wall, 1),
                     "p50_ms": round(statistics.median(lat) * 1000, 1),
                     "p95_ms": round(sorted(lat)[int(0.95 * (len(lat) - 1))] * 1000, 1)}
            if before is not None:
                after = batch_histogram(client)
                calls, texts_n = after[0] - before[0], after[1] - before[1]
                entry["model_calls"] = int(calls)
                entry["mean_texts_per_model_call"] = round(texts_n / calls, 2)
            concurrent[name] = entry
        for client in clients.values():
            client.close()

    sequential = {name: {str(n): summarise(latencies[name][n], n * len(latencies[name][n])) for n in SIZES}
                  for name in systems}
    base_name = "upstream pipeline"
    ratios = {name: {str(n): round(sequential[name][str(n)]["texts_per_s"] / sequential[base_name][str(n)]
                                   ["texts_per_s"], 2) for n in SIZES}
              for name in systems if name != base_name}
    return {
        "model": {"version": model_version,
                  "kind": f"FineTunedClassifier (all-MiniLM-L6-v2, fine-tuned 1 epoch on {args.train_rows:,} "
                          "Davidson rows)",
                  "train_rows": args.train_rows,
                  "finetune_seconds_this_run": round(finetune_seconds, 1),
                  "max_length": classifier.max_length},
        "texts": {"source": "Davidson held-out test split, random order",
                  "tokens_mean": round(float(np.mean(lengths)), 1),
                  "tokens_p95": int(np.percentile(lengths, 95))},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_start": load_start,
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rounds": args.rounds,
        "precision": precision,
        "sequential": sequential,
        "throughput_ratio_vs_pipeline": ratios,
        "concurrent_single_text": concurrent,
        "int8_vs_fp32": agree,
        "int8_vs_fp32_embedding_head": agree_fast,
        "served_fp32_label_matches_direct_predict": round(float(np.mean(label_agreement[fp32_name])), 4),
    }


def markdown(result: dict) -> str:
    seq, ratios = result["sequential"], result["throughput_ratio_vs_pipeline"]
    lines = [
        "# Serving throughput: labelloop ML backend vs upstream-style pipeline",
        "",
        f"Model: {result['model']['kind']}, served as `{result['model']['version']}`, max_length "
        f"{result['model']['max_length']}. Texts: {result['texts']['source']} "
        f"(mean {result['texts']['tokens_mean']} tokens, p95 {result['texts']['tokens_p95']}).",
        f"Machine: {result['machine']['cpus']} CPUs, torch {result['machine']['torch']} with "
        f"{result['machine']['torch_threads']} threads; load average (1/5/15 min) at the start "
        f"{result['machine']['load_average_start']}, at the end {result['machine']['load_average_end']} "
        "(other work was running: systems were interleaved request by request, "
        f"{result['rounds']} rounds, so contention hits all alike).",
        "",
        *precision_markdown(result.get("precision", {})),
        "## Sequential `/predict` requests over HTTP",
        "",
        "| tasks/request | system | texts/s | p50 ms | p95 ms | × pipeline |",
        "|---|---|---|---|---|---|",
    ]
    for n in SIZES:
        for name, rows in seq.items():
            row = rows[str(n)]
            ratio = ratios.get(name, {}).get(str(n), 1.0)
            lines.append(f"| {n} | {name} | {row['texts_per_s']} | {row['p50_ms']} | {row['p95_ms']} "
                         f"| {ratio}× |")
    concurrency = next(iter(result["concurrent_single_text"].values()))["concurrency"]
    lines += ["", f"## {concurrency} concurrent clients, one task per request", "",
              "| system | texts/s | p50 ms | p95 ms | texts per model call |", "|---|---|---|---|---|"]
    for name, row in result["concurrent_single_text"].items():
        lines.append(f"| {name} | {row['texts_per_s']} | {row['p50_ms']} | {row['p95_ms']} | "
                     f"{row.get('mean_texts_per_model_call', 1)} |")
    lines += ["", "## int8 dynamic quantisation vs fp32 (top-label agreement on held-out texts)", "",
              "| model | texts | top label agrees | largest prob. difference | mean prob. difference |",
              "|---|---|---|---|---|"]
    for kind, key in [("fine-tuned (the served model above)", "int8_vs_fp32"),
                      (f"fast mode: frozen encoder + logistic head, {result['model'].get('train_rows', 2000):,} rows",
                       "int8_vs_fp32_embedding_head")]:
        agree = result[key]
        lines.append(f"| {kind} | {agree['texts']} | {agree['top_label_agreement']:.2%} | "
                     f"{agree['max_abs_prob_diff']} | {agree['mean_abs_prob_diff']} |")
    lines += ["",
              f"Served fp32 labels match the classifier's direct `predict`: "
              f"{result['served_fp32_label_matches_direct_predict']:.2%}.", ""]
    return "\n".join(lines)


def precision_markdown(precision: dict) -> list[str]:
    """A line per labelloop system that did not serve what it was asked for, saying why."""
    lines = [f"- **{name}**: {entry['reason']}." for name, entry in precision.items() if "reason" in entry]
    return ["## Precision served", "", *lines, ""] if lines else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=REPO_ROOT / "var" / "bench" / "serve_throughput",
                        help="MLflow store + state for the bench model (kept between runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests-1", type=int, default=40)
    parser.add_argument("--requests-10", type=int, default=12)
    parser.add_argument("--requests-100", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--concurrent-requests", type=int, default=200)
    parser.add_argument("--agreement-texts", type=int, default=2000)
    parser.add_argument("--train-rows", type=int, default=2000,
                        help="Davidson rows the bench model is fine-tuned on (only when --store has no champion); "
                        "a quick check: --train-rows 300 --rounds 1 --requests-1 3 --requests-10 2 --requests-100 1 "
                        "--concurrent-requests 16 --agreement-texts 300 --store <new dir> --out <dir>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve_throughput.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
