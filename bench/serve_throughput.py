"""Serving throughput of three independently fine-tuned champions vs the upstream example's way of serving them.

Why three: whether a faster way of running a model keeps its labels depends on the trained weights. A
single champion's int8 copy passed the 99 % top-label guard once and failed it on the next fine-tune with
the same recipe, which halved the measured speed-up. So this benchmark fine-tunes three champions that
differ only in their seed (the product's default fine-tuning recipe) and serves all of them at once, each
next to its own baseline:

- ``labelloop``: ``serving.app`` over HTTP (uvicorn), the champion loaded from a real MLflow registry;
  at load it times every candidate path (fp32 torch, torch int8, ONNX Runtime fp32 and int8, and ONNX int8
  with its near-ties rerun on ONNX fp32) on the frozen evaluation texts and serves the fastest one that
  passes the guard: top-label agreement with fp32 torch of >= 99 % in the batches serving runs, for the
  batch-dependent int8 paths as a lower confidence bound (``serving/quantize.py``). The path chosen, and
  every candidate's agreement and speed, come from the server's ``/health``. The servers load one after
  another, so no load-time timing overlaps another's.
- ``upstream pipeline``: what label-studio-ml-backend's ``bert_classifier`` example does, with the model
  kept in memory: ``transformers.pipeline("text-classification")`` on the same fine-tuned checkpoint,
  behind an equivalent ``/predict`` (a sync handler, as upstream's Flask route is).

Workloads: 100 tasks per request (the goal), 1 task per request, and 8 concurrent clients sending one task
each. Every round measures every server on every workload, requests interleaved across all six servers in
a rotating order, so a burst of load from elsewhere on the machine falls on all of them alike; each number
is the median over rounds, each ratio the median of per-round ratios. The served labels are compared with
the champion's own fp32 PyTorch predictions on held-out texts that neither the guard nor the training saw.
A path the guard refuses is reported, never a crash: the champion is then timed on what it serves.

Goal (issue 15): for every champion, >= 250 texts/s and >= 4x the pipeline at 100 tasks per request on
2 cores, with >= 99 % top-label agreement with fp32 PyTorch.

Run: ``.venv/bin/python bench/serve_throughput.py``. The first run fine-tunes the three champions into
``--champions-dir`` (git-ignored, one MLflow store per recipe and seed); later runs reuse them and their
ONNX exports, so only the measuring runs again. ``--champions-key`` measures the champions of an earlier
recipe (after ``FineTuneConfig``'s defaults moved), reporting the recipe they recorded. ``--quick`` is a
small check with its own champions. Writes ``bench/results/serve_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
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
from transformers import AutoTokenizer  # noqa: E402

from labelloop import data  # noqa: E402
from labelloop.config import REPO_ROOT, Settings  # noqa: E402
from labelloop.taxonomy import get_taxonomy, label_config_xml  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.quantize import (  # noqa: E402
    GUARD_CONFIDENCE,
    MIN_AGREEMENT,
    Batching,
    OnnxCandidates,
    agreement_lower_bound,
    near_ties,
)
from training.classifier import resolve_model_path  # noqa: E402
from training.finetune import FineTuneConfig  # noqa: E402
from training.registry import Registry  # noqa: E402
from training.train import train_and_register  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
TAXONOMY = get_taxonomy("hate_offensive")
CONFIG = label_config_xml(TAXONOMY)
PIPELINE = "upstream pipeline"
OURS = "labelloop"
GOAL = {"texts_per_s_at_100": 250.0, "ratio_at_100": 4.0, "agreement": MIN_AGREEMENT}


# ------------------------------------------------------------------------------------------------
# the champions
# ------------------------------------------------------------------------------------------------


def bench_settings(store: Path, quantize: str = "auto") -> Settings:
    return Settings(mlruns_dir=store / "mlruns", state_dir=store / "var", taxonomy=TAXONOMY.name,
                    poll_seconds=0, quantize=quantize, basic_user=None, basic_password=None, api_token=None)


def recipe(train_rows: int, epochs: int | None = None) -> dict:
    """The fine-tuning recipe every champion shares: the product's default :class:`FineTuneConfig` (only the
    seed differs), on ``train_rows`` stratified Davidson rows."""
    config = asdict(FineTuneConfig(max_length=Settings().max_length))
    config.pop("seed")
    if epochs is not None:
        config["epochs"] = epochs
    return {"dataset": "davidson", "split_seed": 0, "train_rows": train_rows, "validation_rows": 300,
            "eval_rows": 500, "fine_tune": config}


def recipe_key(the_recipe: dict) -> str:
    return hashlib.sha1(json.dumps(the_recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


def champion_store(champions_dir: Path, the_recipe: dict, seed: int, key: str | None = None) -> Path:
    """Where the champion of ``seed`` under ``the_recipe`` is kept: a changed recipe never reuses a stale one.
    ``key`` names an earlier recipe's stores explicitly (``--champions-key``)."""
    return champions_dir / f"{key or recipe_key(the_recipe)}-seed-{seed}"


def ensure_champion(store: Path, davidson: data.LabeledData, seed: int, the_recipe: dict) -> dict:
    """Fine-tune once with ``seed`` and promote; later runs reuse the store. ``champion.json`` is written
    last, after the promotion: a store without it was left by an interrupted run and is trained again from
    scratch (removed before anything opens its MLflow database)."""
    settings = bench_settings(store)
    trained = store / "champion.json"
    if trained.exists():
        registry = Registry(settings)
        summary = {k: v for k, v in json.loads(trained.read_text()).items() if k != "recipe"}
        return {"version": f"{registry.name}:v{registry.alias_version('champion')}", "seed": seed,
                "trained_this_run": False, **summary}
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    splits = data.split(davidson, seed=the_recipe["split_seed"])
    train = data.stratified_sample(splits.train, the_recipe["train_rows"], seed=seed)
    validation = data.stratified_sample(splits.validation, the_recipe["validation_rows"], seed=0)
    evaluation = data.stratified_sample(splits.test, the_recipe["eval_rows"], seed=0)
    config = FineTuneConfig(**the_recipe["fine_tune"], seed=seed)
    result = train_and_register(train, validation, TAXONOMY, mode="finetune", settings=settings,
                                source="bench-serve", eval_frame=evaluation, finetune_config=config)
    registry = Registry(settings)
    registry.promote(result.ref.version)
    summary = {"eval_macro_f1": round(result.report.macro_f1, 4),
               "train_seconds": round(time.perf_counter() - started, 1)}
    trained.write_text(json.dumps({**summary, "recipe": the_recipe}))
    return {"version": result.ref.label, "seed": seed, "trained_this_run": True, **summary}


def stored_recipe(champions_dir: Path, key: str, seeds: list[int]) -> dict:
    """The recipe the champions stored under ``key`` were trained with, from their ``champion.json``: a run
    that reuses them by key reports their recipe, not today's defaults. Raises ``ValueError`` when a store
    is missing, does not record its recipe, or records one whose key is not ``key``."""
    found: dict | None = None
    for seed in seeds:
        trained = champions_dir / f"{key}-seed-{seed}" / "champion.json"
        if not trained.exists():
            raise ValueError(f"no finished champion under {trained.parent} (train it without --champions-key)")
        the_recipe = json.loads(trained.read_text()).get("recipe")
        if the_recipe is None or recipe_key(the_recipe) != key:
            raise ValueError(f"{trained} does not record the recipe of key {key}")
        if found is not None and the_recipe != found:
            raise ValueError(f"the champions under key {key} record different recipes")
        found = the_recipe
    if found is None:
        raise ValueError("no seeds given")
    return found


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
        deadline = time.monotonic() + 900  # startup includes the first champion load, slow on a busy machine
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.server.should_exit = True
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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ------------------------------------------------------------------------------------------------
# the measurement plan and its summary (pure)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    """One server under test: a champion's labelloop backend or its pipeline baseline."""

    seed: int
    name: str  # OURS or PIPELINE
    client: httpx.Client = field(compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"{self.seed}/{self.name}"


def rotation(items: list, turn: int) -> list:
    """``items`` starting at position ``turn``: over len(items) turns each goes first (and last) once, so
    a burst of load from elsewhere falls on every system alike."""
    k = turn % len(items) if items else 0
    return items[k:] + items[:k]


def round_rate(latencies: list[float], texts_per_request: int) -> float:
    return texts_per_request * len(latencies) / sum(latencies)


def summarise_rounds(rates: list[float], latencies: list[float]) -> dict:
    """Median over rounds (each round measured all systems interleaved), with the spread kept."""
    ms = [x * 1000 for x in latencies]
    return {"texts_per_s": round(statistics.median(rates), 1), "rounds": [round(r, 1) for r in rates],
            "requests": len(latencies), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(percentile(ms, 0.95), 1)}


def paired_ratio(ours: list[float], baseline: list[float]) -> float:
    """Median of the per-round ratios: each round's pair was measured under the same load."""
    return round(statistics.median(a / b for a, b in zip(ours, baseline, strict=True)), 2)


def goal_met(entry: dict) -> bool:
    at_100 = entry["workloads"]["100"]
    return (at_100[OURS]["texts_per_s"] >= GOAL["texts_per_s_at_100"]
            and at_100["ratio"] >= GOAL["ratio_at_100"] and entry["agreement"]["top_label"] >= GOAL["agreement"])


# ------------------------------------------------------------------------------------------------
# serving the champions and measuring them, interleaved
# ------------------------------------------------------------------------------------------------


def served_path(client: httpx.Client, wait_seconds: float = 1800) -> dict:
    """What the labelloop server chose at load, from its /health (None fields when nothing is loaded).
    Waits for the first load: serving starts answering before a slow load ends, without a model."""
    deadline = time.monotonic() + wait_seconds
    health = client.get("/health").json()
    while not health["model_loaded"] and time.monotonic() < deadline:
        time.sleep(1)
        health = client.get("/health").json()
    path = health.get("serving_path") or {}
    return {"loaded": health["model_loaded"], "precision": health.get("precision"), "chosen": path.get("chosen"),
            "reason": path.get("reason") or health.get("champion_error") or health.get("detail"),
            "candidates": path.get("candidates", [])}


def served_agreement(client: httpx.Client, texts: list[str], reference: list[str]) -> dict:
    """Top-label agreement of what the server answers with the champion's own fp32 PyTorch labels."""
    labels: list[str] = []
    for start in range(0, len(texts), 100):
        _, results = timed_predict(client, texts[start : start + 100])
        labels += [r["result"][0]["value"]["choices"][0] for r in results]
    same = float(np.mean([a == b for a, b in zip(labels, reference, strict=True)]))
    return {"texts": len(texts), "top_label": round(same, 4)}


def concurrent_run(client: httpx.Client, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """(texts/s, latencies) of ``concurrency`` clients sending one task each until ``texts`` are done."""
    def one(text: str) -> float:
        return timed_predict(client, [text])[0]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, texts))
    return len(texts) / (time.perf_counter() - started), latencies


def serve_champion(stack: ExitStack, store: Path, info: dict, agreement_texts: list[str]) -> tuple[dict, list[System]]:
    """Start the champion's labelloop backend (its load runs the real path chooser) and its pipeline
    baseline; returns what /health says was chosen and the served labels' agreement with fp32 torch."""
    settings = bench_settings(store)
    classifier = Registry(settings).load("champion").classifier
    checkpoint = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="labelloop-bench-ckpt-")))
    classifier.save(checkpoint)
    entry: dict[str, Any] = {**info}
    started = time.perf_counter()
    ours = stack.enter_context(ServerThread(create_app(settings)))
    client = stack.enter_context(httpx.Client(base_url=ours.url, timeout=900))
    entry["serving"] = served_path(client)  # waits for the load, so loads never overlap one another
    entry["load_and_choose_seconds"] = round(time.perf_counter() - started, 1)
    if not entry["serving"]["loaded"]:
        raise RuntimeError(f"labelloop served no model: {entry['serving']['reason']}")
    entry["agreement"] = served_agreement(client, agreement_texts, classifier.predict(agreement_texts))
    base = stack.enter_context(ServerThread(baseline_app(checkpoint / "model", classifier.labels, info["version"])))
    base_client = stack.enter_context(httpx.Client(base_url=base.url, timeout=900))
    systems = [System(info["seed"], OURS, client), System(info["seed"], PIPELINE, base_client)]
    for system in systems:  # warm-up: first calls pay lazy initialisation
        for n in (1, 100):
            timed_predict(system.client, agreement_texts[:n])
    return entry, systems


def measure(systems: list[System], pool: list[str], args: argparse.Namespace, loads: list[float]) -> dict:
    """Every system measured in every round, requests interleaved across all of them in a rotating order;
    returns per system and workload the per-round texts/s and every latency."""
    plan = {"100": (100, args.requests_100), "1": (1, args.requests_1)}
    rates = {w: {s.key: [] for s in systems} for w in [*plan, "concurrent"]}
    latencies = {w: {s.key: [] for s in systems} for w in [*plan, "concurrent"]}
    cursor, turn = 0, 0

    def take(n: int) -> list[str]:
        nonlocal cursor
        if cursor + n > len(pool):
            cursor = 0
        cursor += n
        return pool[cursor - n : cursor]

    for round_ in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        print(f"round {round_ + 1}/{args.rounds} (load average {loads[-1]})", flush=True)
        for workload, (n, count) in plan.items():
            this_round: dict[str, list[float]] = {s.key: [] for s in systems}
            for _ in range(count):
                texts = take(n)
                for system in rotation(systems, turn):
                    this_round[system.key].append(timed_predict(system.client, texts)[0])
                turn += 1
            for key, values in this_round.items():
                rates[workload][key].append(round_rate(values, n))
                latencies[workload][key] += values
        texts = take(args.concurrent_requests)
        for system in rotation(systems, turn):
            rate, values = concurrent_run(system.client, texts, args.concurrency)
            rates["concurrent"][system.key].append(rate)
            latencies["concurrent"][system.key] += values
        turn += 1
    return {"rates": rates, "latencies": latencies}


def summarise_champion(entry: dict, measured: dict, seed: int) -> dict:
    workloads = {}
    for workload, by_key in measured["rates"].items():
        ours, base = by_key[f"{seed}/{OURS}"], by_key[f"{seed}/{PIPELINE}"]
        workloads[workload] = {
            OURS: summarise_rounds(ours, measured["latencies"][workload][f"{seed}/{OURS}"]),
            PIPELINE: summarise_rounds(base, measured["latencies"][workload][f"{seed}/{PIPELINE}"]),
            "ratio": paired_ratio(ours, base)}
    entry = {**entry, "workloads": workloads}
    entry["goal_met"] = goal_met(entry)
    return entry


def held_out_texts(davidson: data.LabeledData, the_recipe: dict) -> list[str]:
    """The held-out split without the champions' frozen evaluation texts (their guard's check texts), in a
    fixed random order: agreement and speed are measured on texts no candidate was chosen on."""
    splits = data.split(davidson, seed=the_recipe["split_seed"])
    frozen = set(data.stratified_sample(splits.test, the_recipe["eval_rows"], seed=0)["text"])
    held_out = [t for t in splits.test["text"].tolist() if t not in frozen]
    rng = np.random.default_rng(0)
    return [held_out[i] for i in rng.permutation(len(held_out))]


def fallback_bands(args: argparse.Namespace) -> dict:
    """For each champion and band: the share of held-out texts whose ONNX int8 answer is a near-tie (and so
    falls back to ONNX fp32), and the top-label agreement with fp32 torch of int8 alone and of int8 with that
    fallback, in serving's batchings (calls of 100 texts in batches of 16, as the benchmark's requests, and
    single texts). What the ``onnx-int8+fallback`` candidate's band (``serving.quantize.FALLBACK_BAND``) is
    chosen from. fp32's answers do not depend on the batch, so they are computed once, in calls of 100."""
    the_recipe = args.recipe or recipe(args.train_rows, epochs=args.epochs)
    texts = held_out_texts(data.load("davidson", settings=Settings()), the_recipe)[: args.agreement_texts]
    batchings = (Batching("calls of 100 in batches of 16", 100, 16), Batching("single texts", None, 1))
    out: dict[str, Any] = {"texts": len(texts), "bands": args.fallback_bands, "champions": [],
                           "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    for seed in args.seeds:
        store = champion_store(args.champions_dir, the_recipe, seed, args.champions_key)
        settings = bench_settings(store)
        try:
            classifier = Registry(settings).load("champion").classifier
            onnx = OnnxCandidates(classifier, settings.cache_dir / "onnx")
            int8, fp32 = onnx.build("int8"), onnx.build("fp32")
            reference = classifier.decide_ids(batchings[0].run(classifier.predict_proba, texts))
            exact = fp32.predict_proba(texts, 16)
            fast = {b.name: b.run(int8.predict_proba, texts) for b in batchings}
        except Exception as e:  # one champion's failure is reported; the others are still measured
            out["champions"].append({"seed": seed, "error": f"{type(e).__name__}: {e}"})
            continue
        rows = []
        for band in [0.0, *args.fallback_bands]:
            kept_everywhere = np.ones(len(texts), dtype=bool)
            per_batching = {}
            for name, proba in fast.items():
                tie = near_ties(proba, band, classifier.thresholds if classifier.multi_label else None)
                served = np.where(tie[:, None], exact, proba)
                same = classifier.decide_ids(served) == reference
                kept_everywhere &= same.reshape(len(texts), -1).all(axis=1)
                per_batching[name] = {"fallback_share": round(float(tie.mean()), 4),
                                      "agreement": round(float(same.reshape(len(texts), -1).all(axis=1).mean()), 4)}
            rows.append({"band": band, "agreement_every_batching": round(float(kept_everywhere.mean()), 4),
                         "lower_bound": round(agreement_lower_bound(int(kept_everywhere.sum()), len(texts)), 4),
                         "by_batching": per_batching})
        out["champions"].append({"seed": seed, "store": str(store), "rows": rows})
        print(json.dumps(out["champions"][-1]), flush=True)
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def run(args: argparse.Namespace) -> dict:
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    the_recipe = getattr(args, "recipe", None) or recipe(args.train_rows, epochs=args.epochs)
    davidson = data.load("davidson", settings=Settings())
    pool = held_out_texts(davidson, the_recipe)
    agreement_texts, timing_pool = pool[: args.agreement_texts], pool[args.agreement_texts :]
    champions: dict[int, dict] = {}
    systems: list[System] = []
    with ExitStack() as stack:
        for seed in args.seeds:
            store = champion_store(args.champions_dir, the_recipe, seed, getattr(args, "champions_key", None))
            print(f"champion seed {seed}: {store} (fine-tuned once, then reused) …", flush=True)
            info: dict[str, Any] = {"seed": seed, "store": str(store)}
            try:
                info = {**info, **ensure_champion(store, davidson, seed, the_recipe)}
                entry, served = serve_champion(stack, store, info, agreement_texts)
                systems += served
            except Exception as e:  # one champion's failure is reported; the others are still measured
                entry = {**info, "error": f"{type(e).__name__}: {e}"}
            champions[seed] = entry
            print(json.dumps({k: entry.get(k) for k in ("seed", "version", "eval_macro_f1", "serving", "agreement",
                                                         "error")}, default=str)[:1500], flush=True)
        loads: list[float] = []
        measuring_started = time.perf_counter()
        measured = measure(systems, timing_pool, args, loads) if systems else None
        measuring_seconds = round(time.perf_counter() - measuring_started, 1)
    for seed, entry in champions.items():
        if measured is not None and "error" not in entry:
            champions[seed] = summarise_champion(entry, measured, seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(Settings().base_model))  # the champions' own
    lengths = [len(ids) for ids in tokenizer(timing_pool[:2000])["input_ids"]]
    return {
        "goal": GOAL,
        "recipe": {**the_recipe, "base_model": "all-MiniLM-L6-v2", "seeds": list(args.seeds), "quick": args.quick,
                   "champions_key": getattr(args, "champions_key", None)},
        "texts": {"source": "Davidson held-out test split without the frozen evaluation set, random order",
                  "tokens_mean": round(float(np.mean(lengths)), 1), "tokens_p95": int(np.percentile(lengths, 95))},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_start": load_start, "load_average_per_round": loads,
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "plan": {"rounds": args.rounds, "requests_100": args.requests_100, "requests_1": args.requests_1,
                 "concurrency": args.concurrency, "concurrent_requests": args.concurrent_requests,
                 "agreement_texts": args.agreement_texts},
        "seconds": {"total": round(time.perf_counter() - started, 1), "measuring": measuring_seconds},
        "champions": list(champions.values()),
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2%}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


#: everything after this line in the results file is written by hand (what the levers measured, what a run
#: means) and is kept when the benchmark writes its tables again
NOTES = "\n<!-- notes: kept across runs -->\n"
WORKLOAD_NAMES = {"100": "100 tasks/request", "1": "1 task/request", "concurrent": "8 concurrent clients, 1 task each"}


def markdown(result: dict) -> str:
    machine = result["machine"]
    recipe_ = result["recipe"]
    plan = result["plan"]
    loads = machine["load_average_per_round"]
    load_text = (f"1-min load average {min(loads)}–{max(loads)} (median {statistics.median(loads)}) over the "
                 f"measuring rounds" if loads else "no rounds measured")
    busy = max([*loads, machine["load_average_start"][0]]) > machine["cpus"]
    fine_tune = recipe_["fine_tune"]
    lines = [
        "# Serving throughput: three fine-tuned champions vs the upstream-style pipeline",
        "",
        f"Goal (issue 15), per champion: >= {GOAL['texts_per_s_at_100']:g} texts/s and >= {GOAL['ratio_at_100']:g}× "
        f"the `transformers.pipeline` baseline at 100 tasks per request, with >= {GOAL['agreement']:.0%} top-label "
        "agreement with fp32 PyTorch, on 2 CPU cores.",
        "",
        "Champions: all-MiniLM-L6-v2 fine-tuned with "
        + (f"the recipe stored with champions `{recipe_['champions_key']}` (`FineTuneConfig`'s defaults when they "
           "were trained: " if recipe_.get("champions_key") else "`FineTuneConfig`'s defaults (")
        + f"{fine_tune['epochs']} epochs, "
        f"lr {fine_tune['lr']:g}, batch {fine_tune['batch_size']}, {fine_tune['class_weighting']} class weights, "
        f"early stopping, min_steps {fine_tune['min_steps']}) on {recipe_['train_rows']:,} stratified Davidson "
        "rows, seeds "
        f"{', '.join(map(str, recipe_['seeds']))}"
        + (" (`--quick`)" if recipe_["quick"] else "") + ". Each is served by `serving.app` from its own MLflow "
        "registry, on the path its load-time chooser picked. Texts: "
        f"{result['texts']['source']} (mean {result['texts']['tokens_mean']} tokens, "
        f"p95 {result['texts']['tokens_p95']}).",
        "",
        f"Machine: {machine['cpus']} CPUs, torch {machine['torch']} with {machine['torch_threads']} threads; "
        f"{load_text}; {machine['load_average_start']} (1/5/15 min) at the start, {machine['load_average_end']} at "
        "the end. "
        + ("**The machine was shared with other engineers' work during this run, so the absolute texts/s are lower "
           "bounds; the ratios are the fair comparison.** " if busy else "")
        + f"All {len(result['champions']) * 2} servers were measured in each of {plan['rounds']} rounds, requests "
        "interleaved across them in a rotating order; each number is the median over rounds (ratios: the median of "
        "the per-round ratios).",
        "",
        "| seed | eval macro-F1 | path served | agreement with fp32 (goal >= 99%) | texts/s @100 (goal >= 250) | "
        "pipeline @100 | × @100 (goal >= 4×) | × @1 | × 8 concurrent | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["champions"]:
        if "workloads" not in c:
            chosen = (c.get("serving") or {}).get("chosen", "–")
            lines.append(f"| {c['seed']} | {c.get('eval_macro_f1', '–')} | {chosen} "
                         f"| – | – | – | – | – | – | no: {c.get('error', 'not measured')} |")
            continue
        w = c["workloads"]
        ours100 = w["100"][OURS]["texts_per_s"]
        agreement = c["agreement"]["top_label"]
        lines.append(
            f"| {c['seed']} | {c.get('eval_macro_f1', '–')} | {c['serving']['chosen']} | "
            f"{_pct(agreement)} ({c['agreement']['texts']} texts) {_mark(agreement >= GOAL['agreement'])} | "
            f"{ours100} {_mark(ours100 >= GOAL['texts_per_s_at_100'])} | {w['100'][PIPELINE]['texts_per_s']} | "
            f"{w['100']['ratio']}× {_mark(w['100']['ratio'] >= GOAL['ratio_at_100'])} | {w['1']['ratio']}× | "
            f"{w['concurrent']['ratio']}× | {'yes' if c['goal_met'] else 'no'} |")
    lines += ["", "## Why each path was chosen (measured by the server at load, on its check texts)", ""]
    for c in result["champions"]:
        serving = c.get("serving")
        if not serving:
            continue
        lines += [f"**seed {c['seed']}** ({c.get('version')}, load and choice {c.get('load_and_choose_seconds')} s): "
                  f"{serving['chosen']}: {serving['reason']}", "",
                  f"| candidate | top-label agreement | {GUARD_CONFIDENCE:.0%} lower bound (batch-dependent only) | "
                  "agreement per batching | texts/s at load | error |", "|---|---|---|---|---|---|"]
        for cand in serving["candidates"]:
            per_batching = ", ".join(f"{name}: {_pct(value)}"
                                     for name, value in (cand.get("agreement_by_batching") or {}).items())
            lines.append(f"| {cand['path']} | {_pct(cand['agreement'])} | {_pct(cand.get('agreement_low'))} | "
                         f"{per_batching or '–'} | {_num(cand['texts_per_s'])} | {cand['error'] or ''} |")
        lines.append("")
    lines += ["## Detail (median over rounds; every round's texts/s in brackets)", "",
              "| seed | workload | system | texts/s | rounds | p50 ms | p95 ms |", "|---|---|---|---|---|---|---|"]
    for c in result["champions"]:
        for workload, rows in c.get("workloads", {}).items():
            for name in (OURS, PIPELINE):
                row = rows[name]
                lines.append(f"| {c['seed']} | {WORKLOAD_NAMES[workload]} | {name} | {row['texts_per_s']} | "
                             f"{row['rounds']} | {row['p50_ms']} | {row['p95_ms']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--champions-dir", type=Path, default=REPO_ROOT / "var" / "bench" / "serve_champions",
                        help="one MLflow store per champion, named by recipe and seed (git-ignored, reused)")
    parser.add_argument("--champions-key", default=None,
                        help="measure the champions stored under this recipe key (the NNNNNNNNNN of "
                        "NNNNNNNNNN-seed-1) instead of the current recipe's, e.g. to compare with an earlier run "
                        "after FineTuneConfig's defaults moved; their recorded recipe is reported")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=None, help="default: the product's FineTuneConfig")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests-1", type=int, default=10)
    parser.add_argument("--requests-100", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--concurrent-requests", type=int, default=48)
    parser.add_argument("--agreement-texts", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small and fast: 300 training rows, 2 rounds, few "
                        "requests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fallback-bands", type=float, nargs="+", default=None,
                        help="instead of the throughput run: the int8 near-tie fallback's share and agreement "
                        "at these bands, written to serve_fallback_bands.json")
    args = parser.parse_args()
    if args.quick:
        args.train_rows, args.rounds = 300, 2
        args.requests_1, args.requests_100, args.concurrent_requests, args.agreement_texts = 4, 1, 16, 200
    args.recipe = None
    if args.champions_key:
        try:
            args.recipe = stored_recipe(args.champions_dir, args.champions_key, args.seeds)
        except ValueError as e:
            parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fallback_bands:
        bands = fallback_bands(args)
        (args.out / "serve_fallback_bands.json").write_text(json.dumps(bands, indent=2) + "\n")
        return
    result = run(args)
    (args.out / "serve_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    report = args.out / "serve_throughput.md"
    kept = report.read_text().partition(NOTES)[2] if report.exists() else ""
    report.write_text(markdown(result) + (NOTES + kept if kept else ""))
    print(markdown(result))


if __name__ == "__main__":
    main()
