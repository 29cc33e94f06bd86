"""Wall time of one active-learning round, as issue 4 asks: "retrain in fast mode + rescore a 20k pool +
push the new queue to Label Studio", against a real Label Studio and a real MLflow SQLite store.

Setup (timed once, reported apart from the rounds):

- a Label Studio 1.23 server started in a temp dir on a free port (stopped and removed at the end), one
  project with the hate_offensive config and uncertainty sampling;
- the pool = Davidson's train split (``data.split(davidson, seed=13)``, ≈ 17k items) imported through
  :meth:`ActiveLearningLoop.import_pool`; the frozen evaluation set = the test split (≈ 5k rows);
- pool and evaluation texts embedded once into the embedding cache (the one-off cost of fast mode);
- ``--seed-labels`` gold labels on the cold-start pick, *annotated through the Label Studio API* (as a
  reviewer's submit would be) and brought into the journal by :func:`reconcile` (the webhook's safety
  net: the same ``Journal.apply_annotation`` path).

Then ``--rounds`` calls of :meth:`ActiveLearningLoop.run_round`, each followed by gold labels for the
round's query batch (annotated through the API + reconciled, not timed as part of the round). Every round
is broken down by timing wrappers around the loop's own calls (behaviour unchanged):

- train: labels snapshot → ``train_fast`` (cached embeddings + logistic-regression fit) → evaluation on
  the frozen set → MLflow log + register (``Registry.register``);
- gate: ``Registry.promote`` (metrics come from version tags, no re-evaluation);
- rescore: champion load from the registry, the unlabeled pool, ``ScoredPool.context`` (cached
  embeddings → the head's probabilities), strategy scores/selection and building the predictions;
- push: ``import_predictions`` of the top ``queue_size`` priorities + ``set_model_version``.

The gate is set permissive (``gate_min_gain=-1``) so every round promotes and therefore pushes: the
round's full path is what is measured. (With the default gate a refused round stops after the gate.)

Baselines, side by side in the same run (same project, same labels):

- ``whole-pool push``: a round that pushes priorities for the *whole* unlabeled pool instead of the top
  ``queue_size`` (what the loop would do without that trick);
- ``no embedding cache``: rescoring with a full forward pass over the unlabeled pool costs what embedding
  costs (the same encoder forward pass over the same texts, at the embedding rate measured in this run),
  so that round is the measured round with ``ScoredPool.context`` replaced by ``unlabeled / rate``.

Serving's swap, side by side (issue 15: a fast-path round, swap included, stays ≤ 15 s): after each
round the new champion is prepared for serving as ``serving.app`` does at every load
(:func:`serving.quantize.prepare_for_serving` on the registry's check texts), three ways in turn:
``quantize=none`` (fp32 torch, nothing checked), the default ``auto`` (speeds, and each path's embeddings
of the check texts, remembered per encoder, so after the first load only agreement is checked) and
``auto`` with an empty memo (every candidate checked and timed, what each load cost before the memo).
``--no-serving-swap`` skips this.

Run: ``.venv/bin/python bench/al_round.py``. With an empty embedding cache (``--cache-dir``, default
``var/bench/cache``, git-ignored) the one-off embedding of ≈ 22k texts takes 2-15 min depending on what
else the 2 cores run; with a warm one the run takes ≈ 6 min and the embedding rate is measured on a
``--embed-sample`` of pool texts instead. Writes ``bench/results/al_round.{json,md}``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import training.train as train_module  # noqa: E402
from active_learning.labelstudio import LabelStudioClient, PredictionIn  # noqa: E402
from active_learning.loop import ActiveLearningLoop, RoundResult  # noqa: E402
from active_learning.pool import ScoredPool  # noqa: E402
from active_learning.reconcile import reconcile  # noqa: E402
from labelloop import data  # noqa: E402
from labelloop.config import REPO_ROOT, Settings  # noqa: E402
from labelloop.journal import Journal  # noqa: E402
from labelloop.ls_server import LabelStudioServer, free_port  # noqa: E402
from labelloop.taxonomy import get_taxonomy  # noqa: E402
from serving.app import _QUANTIZE_CHECK_TEXTS  # noqa: E402
from serving.champion import RegistryModelSource  # noqa: E402
from serving.quantize import SpeedMemo, prepare_for_serving  # noqa: E402
from training.fast import EmbeddingCache  # noqa: E402
from training.registry import Registry  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
TAXONOMY = get_taxonomy("hate_offensive")
TARGET_SECONDS = 15.0
SPLIT_SEED = 13

#: calls inside a round worth naming in the profile (cumulative time; the rest is plumbing)
PROFILED = tuple(f"({name})" for name in (
    "train_fast", "fit_head", "evaluate_proba", "register", "plot_confusion", "log_model", "predict_proba",
    "save", "infer_signature", "create_model_version", "set_registered_model_alias", "log_metrics",
    "log_params", "log_dict", "log_text", "log_artifact", "start_run", "end_run", "promote", "load",
    "load_model", "unlabeled", "annotations", "score_pool", "select", "scores", "import_predictions",
    "_validate_predictions", "_model_version_counts", "set_model_version", "eval_set", "labels",
    "_pip_requirements", "_ensure_registered_model", "experiment_id"))


def log(message: str) -> None:
    print(f"[al_round {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# timing wrappers: measure the loop's own calls without changing what they do
# ------------------------------------------------------------------------------------------------


class Stopwatch:
    """Accumulates wall time per part while installed; :meth:`take` returns and resets the totals."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in vars(owner)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[part] += time.perf_counter() - started

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original) if had_own else delattr(owner, attr))

    def take(self) -> dict[str, float]:
        taken, self.totals = dict(self.totals), defaultdict(float)
        return taken

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


def instrument(loop: ActiveLearningLoop) -> Stopwatch:
    watch = Stopwatch()
    watch.wrap(train_module, "train_fast", "train.fit")
    watch.wrap(Registry, "register", "train.register")
    watch.wrap(loop, "champion", "rescore.load_champion")
    watch.wrap(loop, "project_model_version", "rescore.model_version_check")
    watch.wrap(loop, "unlabeled", "rescore.unlabeled")
    watch.wrap(ScoredPool, "context", "rescore.score_pool")
    watch.wrap(loop.client, "import_predictions", "push.import_predictions")
    watch.wrap(loop.client, "set_model_version", "push.set_model_version")
    return watch


def breakdown(parts: dict[str, float], result: RoundResult, wall: float) -> dict[str, float]:
    """The four figures issue 4 asks about, plus sub-parts: the loop's own ``train``/``gate``/``queue``
    timings, split further by the wrapped calls' totals."""
    g = lambda k: parts.get(k, 0.0)  # noqa: E731
    loop = result.seconds
    queue = loop.get("queue", 0.0)
    push = g("push.import_predictions") + g("push.set_model_version")
    between = loop["total"] - loop["train"] - loop["gate"] - queue  # champion load + model_version check
    out = {
        "total": wall,
        "train": loop["train"],
        "gate": loop["gate"],
        "rescore": between + queue - push,
        "push": push,
        "train.fit": g("train.fit"),
        "train.register": g("train.register"),
        "train.other": loop["train"] - g("train.fit") - g("train.register"),
        "rescore.load_champion": g("rescore.load_champion"),
        "rescore.model_version_check": g("rescore.model_version_check"),
        "rescore.unlabeled": g("rescore.unlabeled"),
        "rescore.score_pool": g("rescore.score_pool"),
        "rescore.strategy_and_ranking": queue - g("rescore.unlabeled") - g("rescore.score_pool") - push,
        "push.import_predictions": g("push.import_predictions"),
        "push.set_model_version": g("push.set_model_version"),
        "after_round": wall - loop["total"],  # the stopping monitor's update, after the loop's own clock
    }
    return {k: round(v, 3) for k, v in out.items()}


def timed_round(loop: ActiveLearningLoop, watch: Stopwatch, profile: bool
                ) -> tuple[RoundResult, dict[str, float], dict[str, list[dict[str, Any]]] | None]:
    started = time.perf_counter()
    if profile:
        result, stats = profile_round(loop)
    else:
        result, stats = loop.run_round(), None
    wall = time.perf_counter() - started
    return result, breakdown(watch.take(), result, wall), stats


@contextmanager
def timer(into: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    into[key] = round(time.perf_counter() - started, 3)


# ------------------------------------------------------------------------------------------------
# labels: gold answers given through the Label Studio API, brought in by reconciliation
# ------------------------------------------------------------------------------------------------


def annotate(loop: ActiveLearningLoop, task_ids: list[int], gold: dict[int, str]) -> dict[str, float]:
    """Give the gold label for each task as the API user, then reconcile the journal with Label Studio."""
    timings: dict[str, float] = {}
    with timer(timings, "annotate_via_api"):
        for task_id in task_ids:
            loop.client.create_annotation(task_id, gold[task_id])
    with timer(timings, "reconcile"):
        report = reconcile(loop.client, loop.project_id, loop.journal)
    if report.applied != len(task_ids):
        raise RuntimeError(f"reconciliation applied {report.applied} annotations, expected {len(task_ids)}")
    timings["labels"] = len(task_ids)
    return timings


# ------------------------------------------------------------------------------------------------
# Label Studio's side of a push, sampled with py-spy (optional: skipped when py-spy is not installed)
# ------------------------------------------------------------------------------------------------

#: frames that name where an ``/api/projects/<id>/import/predictions`` request spends its time
SERVER_PARTS = {"update_tasks_counters": "update_tasks_counters (",
                "bulk_create_predictions": "QuerySet.bulk_create (",
                "json_parsing": "JSONParser.parse ("}


def label_studio_pid(port: int) -> int | None:
    """The Label Studio server we started: our child process serving ``port``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and any(b"label-studio" in part for part in cmdline) and str(port).encode() in cmdline:
            return int(proc.name)
    return None


def profile_server_push(loop: ActiveLearningLoop, port: int, out: Path) -> dict[str, Any] | None:
    """Push one more ``queue_size`` of priorities (under a throwaway model_version, after the measured
    rounds) while py-spy samples the Label Studio server; shares of the import request's samples."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    pid = label_studio_pid(port)
    if not Path(spy).exists() or pid is None:
        return None
    champion = loop.champion()
    unlabeled = loop.unlabeled().head(loop.settings.queue_size)
    version = f"{champion.ref.label}-profiled"
    predictions = [PredictionIn(task_id=int(t), label=TAXONOMY.labels[0], score=i / len(unlabeled),
                                model_version=version) for i, t in enumerate(unlabeled["task_id"])]
    raw = out / "py-spy-push.txt"
    recorder = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                 "--output", str(raw), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # py-spy attaches
        started = time.perf_counter()
        loop.client.import_predictions(loop.project_id, predictions)
        seconds = time.perf_counter() - started
        time.sleep(0.5)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
    if not raw.exists():
        return None
    in_request, parts = 0, dict.fromkeys(SERVER_PARTS, 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "ImportPredictionsAPI.create (" not in stack:
            continue
        in_request += int(count)
        for part, frame in SERVER_PARTS.items():
            parts[part] += int(count) if frame in stack else 0
    if not in_request:
        return None
    shares = {k: round(v / in_request, 3) for k, v in parts.items()}
    shares["other"] = round(1 - sum(shares.values()), 3)
    return {"predictions": len(predictions), "seconds": round(seconds, 3), "samples": in_request,
            "share_of_request": shares}


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def profile_round(loop: ActiveLearningLoop, top: int = 40) -> tuple[RoundResult, dict[str, list[dict[str, Any]]]]:
    """One round under cProfile (this process only; Label Studio's side shows up as socket waits)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = loop.run_round()
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(filename).name}:{line}({func})", "calls": ncalls,
                     "tottime": round(tottime, 3), "cumtime": round(cumtime, 3)})
    by_cum = sorted(rows, key=lambda r: r["cumtime"], reverse=True)[:top]
    by_tot = sorted(rows, key=lambda r: r["tottime"], reverse=True)[:top]
    named = sorted((r for r in rows if r["function"].endswith(PROFILED)), key=lambda r: r["cumtime"], reverse=True)
    return result, {"selected": named, "by_cumtime": by_cum, "by_tottime": by_tot}


def run(args: argparse.Namespace) -> dict[str, Any]:
    davidson = data.load("davidson", settings=Settings())
    splits = data.split(davidson, seed=SPLIT_SEED)
    pool_frame = splits.train[~splits.train["text"].isin(set(splits.test["text"]))].reset_index(drop=True)
    if args.pool_limit:
        pool_frame = data.stratified_sample(pool_frame, args.pool_limit, seed=SPLIT_SEED)
    eval_frame = splits.test
    one_off: dict[str, float] = {}
    results: dict[str, Any] = {"pool_items": len(pool_frame), "eval_rows": len(eval_frame), "one_off": one_off}

    work = Path(tempfile.mkdtemp(prefix="labelloop-al-round-"))
    server = LabelStudioServer(base_dir=work / "label-studio", port=free_port())
    try:
        log(f"starting Label Studio in {server.base_dir} on port {server.port}")
        with timer(one_off, "label_studio_start"):
            server.start(timeout=420)
        settings = Settings(mlruns_dir=work / "mlruns", state_dir=work / "var", cache_dir=args.cache_dir,
                            taxonomy=TAXONOMY.name, gate_min_gain=-1.0, gate_max_recall_drop=1.0,
                            ls_url=server.url)
        results["settings"] = {k: getattr(settings, k) for k in ("queue_size", "query_batch", "strategy",
                                                                 "max_length", "base_model")}
        client = LabelStudioClient(server.url, server.api_key)
        project_id = client.ensure_project(f"al-round-bench-{uuid.uuid4().hex[:8]}", TAXONOMY)
        client.use_uncertainty_sampling(project_id)
        journal = Journal(settings.database("journal"), TAXONOMY)
        loop = ActiveLearningLoop(settings, client, project_id, journal)

        log(f"importing the pool: {len(pool_frame)} tasks")
        with timer(one_off, "import_pool"):
            loop.import_pool(pool_frame[["id", "text"]])
        task_of = dict(zip(loop.pool()["item_id"], loop.pool()["task_id"], strict=True))
        gold = {int(task_of[str(i)]): label for i, label in zip(pool_frame["id"], pool_frame["label"], strict=True)}

        cache = loop.cache
        before = len(cache)
        log(f"embedding pool + eval set into {cache.directory} ({before} vectors cached already)")
        with timer(one_off, "embed_pool_and_eval"):
            cache.get(pool_frame["text"].tolist())
            cache.get(eval_frame["text"].tolist())
        embedded = len(cache) - before
        one_off["texts_embedded_now"] = embedded
        if embedded >= args.embed_sample:
            one_off["embed_texts_per_s"] = round(embedded / one_off["embed_pool_and_eval"], 1)
        else:  # a warm cache: measure the encoder's rate now, on a sample, into a throwaway cache
            sample = pool_frame["text"].sample(args.embed_sample, random_state=SPLIT_SEED).tolist()
            with timer(one_off, "embed_sample"):
                EmbeddingCache(work / "rate-sample", cache.encoder).get(sample)
            one_off["embed_texts_per_s"] = round(len(sample) / one_off["embed_sample"], 1)
            one_off["embed_rate_measured_on"] = len(sample)
        one_off["embed_pool_and_eval_cold_estimate"] = round(
            (len(pool_frame) + len(eval_frame)) / one_off["embed_texts_per_s"], 1)

        with timer(one_off, "freeze_eval_set"):
            Registry(settings).freeze_eval_set(eval_frame, "davidson")
        check_texts = RegistryModelSource(settings).check_texts(_QUANTIZE_CHECK_TEXTS) if args.serving_swap else []

        log(f"cold start: {args.seed_labels} gold labels through the Label Studio API")
        with timer(one_off, "cold_start_pick"):
            seed = loop.cold_start(args.seed_labels)
        one_off["seed_labels"] = annotate(loop, seed["task_id"].astype(int).tolist(), gold)

        watch = instrument(loop)
        rounds: list[dict[str, Any]] = []
        profile = None
        try:
            for number in range(1, args.rounds + 1):
                log(f"round {number}")
                result, seconds, stats = timed_round(loop, watch, profile=args.profile_round == number)
                profile = stats or profile
                rounds.append(round_record(number, "top queue_size", result, seconds))
                log(f"round {number}: {seconds}")
                if args.serving_swap:
                    rounds[-1]["serving_swap"] = serving_swap(loop, settings, check_texts)
                    log(f"round {number} serving swap: {rounds[-1]['serving_swap']}")
                rounds[-1]["labels_after"] = annotate(loop, result.queue.queued_task_ids, gold)

            log("baseline: one round pushing priorities for the whole unlabeled pool")
            loop.queue_size = len(pool_frame)
            result, seconds, _ = timed_round(loop, watch, profile=False)
            baseline = round_record(args.rounds + 1, "whole pool", result, seconds)
            log(f"baseline: {seconds}")
        finally:
            watch.uninstall()
        log("py-spy on Label Studio during one more queue_size push")
        results["server_push_profile"] = profile_server_push(loop, server.port, work)
        results["rounds"] = rounds
        results["baseline_whole_pool_push"] = baseline
        results["profile"] = {"round": args.profile_round, **profile} if profile else None
        results["summary"] = summarize(rounds, baseline, one_off)
        journal.close()
        return results
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


SWAP_VARIANTS = ("none", "auto", "auto_no_memo")


def serving_swap(loop: ActiveLearningLoop, settings: Settings, check_texts: list[str]) -> dict[str, Any]:
    """Seconds to prepare the round's champion for serving each way (see the module docstring); a variant
    that raises is recorded, not fatal. The champion is already loaded by the round (its rescore)."""
    loaded = loop.registry_champion()
    out: dict[str, Any] = {}
    for variant in SWAP_VARIANTS:
        mode = "none" if variant == "none" else "auto"
        extra = {"memo": SpeedMemo()} if variant == "auto_no_memo" else {}
        started = time.perf_counter()
        try:
            served = prepare_for_serving(loaded, mode, check_texts, cache_dir=settings.cache_dir / "onnx",
                                         device="cpu", batch_size=settings.batch_size, **extra)
        except Exception as e:
            out[variant] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        out[variant] = {"seconds": round(time.perf_counter() - started, 3), "chosen": served.serving["chosen"],
                        "speeds_from": served.serving["speeds_from"]}
    return out


def round_record(number: int, push: str, result: RoundResult, seconds: dict[str, float]) -> dict[str, Any]:
    if result.queue is None or not result.promoted:
        raise RuntimeError(f"round {number} did not promote and push ({result.gate_reason}); "
                           "the bench needs the full round path")
    return {"round": number, "push": push, "labels": result.labels, "model_version": result.trained_version,
            "macro_f1": round(result.macro_f1, 4), "pool_unlabeled": result.queue.pool_unlabeled,
            "pushed": result.queue.pushed, "seconds": seconds,
            "loop_reported": {k: round(v, 3) for k, v in result.seconds.items()}}


def summarize(rounds: list[dict[str, Any]], baseline: dict[str, Any], one_off: dict[str, float]) -> dict[str, Any]:
    def median(key: str, rows: list[dict[str, Any]]) -> float:
        return round(statistics.median(r["seconds"][key] for r in rows), 3)

    warm = rounds[1:] or rounds  # round 1 pays first-use costs of this process (imports, first MLflow load)
    typical = {k: median(k, warm) for k in ("total", "train", "gate", "rescore", "push")}
    summary: dict[str, Any] = {
        "target_seconds": TARGET_SECONDS,
        "round_seconds_all": [r["seconds"]["total"] for r in rounds],
        "median_warm_round": typical,
        "meets_target": max(r["seconds"]["total"] for r in rounds) <= TARGET_SECONDS,
        "whole_pool_push_round_seconds": baseline["seconds"]["total"],
        "whole_pool_push_seconds": baseline["seconds"]["push"],
        "ratio_whole_pool_push_vs_median_round": round(baseline["seconds"]["total"] / typical["total"], 1),
    }
    rate = one_off.get("embed_texts_per_s")
    if rate:
        unlabeled = rounds[-1]["pool_unlabeled"]
        forward = unlabeled / rate
        without_cache = typical["total"] - median("rescore.score_pool", warm) + forward
        summary["no_cache_forward_pass_seconds"] = round(forward, 1)
        summary["no_cache_round_seconds_derived"] = round(without_cache, 1)
        summary["ratio_no_cache_vs_median_round"] = round(without_cache / typical["total"], 1)
    return summary


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    s, one = results["summary"], results["one_off"]
    m = s["median_warm_round"]
    lines = [
        "# One active-learning round (issue 4): retrain fast + rescore the pool + push the queue",
        "",
        f"Real Label Studio 1.23 (SQLite) and a real MLflow SQLite store, both in temp dirs. Pool: Davidson train "
        f"split, {results['pool_items']} items; frozen eval set: test split, {results['eval_rows']} rows. "
        f"Strategy `{results['settings']['strategy']}`, query batch {results['settings']['query_batch']}, "
        f"queue_size {results['settings']['queue_size']}. Labels: gold answers annotated through the Label "
        f"Studio API and reconciled into the journal. Gate set permissive so every round promotes and pushes.",
        "",
        f"**Median warm round: {m['total']:.2f} s** (target ≤ {s['target_seconds']:.0f} s: "
        f"{'met' if s['meets_target'] else 'NOT met'} by every round: {s['round_seconds_all']}).",
        "",
        "| round | labels | macro-F1 | total s | train | (fit / MLflow register / other) | gate | rescore | "
        "(load champion / unlabeled / score_pool / strategy) | push | pushed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [*results["rounds"], results["baseline_whole_pool_push"]]:
        x = r["seconds"]
        name = f"{r['round']}" + (" (whole-pool push)" if r["push"] == "whole pool" else "")
        lines.append(
            f"| {name} | {r['labels']} | {r['macro_f1']:.3f} | **{x['total']:.2f}** | {x['train']:.2f} | "
            f"{x['train.fit']:.2f} / {x['train.register']:.2f} / {x['train.other']:.2f}"
            f" | {x['gate']:.2f} | {x['rescore']:.2f} | {x['rescore.load_champion']:.2f} / "
            f"{x['rescore.unlabeled']:.2f} / {x['rescore.score_pool']:.2f} / {x['rescore.strategy_and_ranking']:.2f}"
            f" | {x['push']:.2f} | {r['pushed']} |")
    lines += [
        "",
        "## Side by side",
        "",
        "| round variant | seconds | × median round |",
        "|---|---|---|",
        f"| top `queue_size` pushed, cached embeddings (labelloop) | {m['total']:.2f} | 1.0 |",
        f"| whole unlabeled pool pushed (measured) | {s['whole_pool_push_round_seconds']:.2f} | "
        f"{s['ratio_whole_pool_push_vs_median_round']} |",
    ]
    if "no_cache_round_seconds_derived" in s:
        lines.append(f"| full forward pass instead of cached embeddings (derived: unlabeled pool at the measured "
                     f"embedding rate, {s['no_cache_forward_pass_seconds']} s) | "
                     f"{s['no_cache_round_seconds_derived']:.1f} | {s['ratio_no_cache_vs_median_round']} |")
    lines += swap_lines(results["rounds"])
    seed = one["seed_labels"]
    lines += [
        "",
        "## One-off costs (not part of a round)",
        "",
        f"- Label Studio first start (migrations): {one['label_studio_start']:.1f} s",
        f"- `import_pool` of {results['pool_items']} tasks: {one['import_pool']:.1f} s",
        (f"- embedding pool + eval set ({results['pool_items'] + results['eval_rows']} texts): "
         + (f"{one['embed_pool_and_eval']:.0f} s measured ({one['embed_texts_per_s']} texts/s)"
            if "embed_rate_measured_on" not in one else
            f"cache was warm; ≈ {one['embed_pool_and_eval_cold_estimate']:.0f} s cold at the "
            f"{one['embed_texts_per_s']} texts/s measured on {one['embed_rate_measured_on']} texts in this run")),
        f"- freezing the eval set in MLflow: {one['freeze_eval_set']:.1f} s; cold-start pick: "
        f"{one['cold_start_pick']:.1f} s",
        f"- {seed['labels']} seed labels: {seed['annotate_via_api']:.1f} s to annotate through the API, "
        f"{seed['reconcile']:.2f} s to reconcile into the journal",
    ]
    if results.get("profile"):
        prof = results["profile"]
        lines += ["", f"## cProfile of round {prof['round']} (this process; Label Studio's own work shows as socket "
                  "waits inside the HTTP calls)", "", "| call | calls | cumulative s |", "|---|---|---|"]
        lines += [f"| `{r['function']}` | {r['calls']} | {r['cumtime']:.3f} |" for r in prof["selected"][:25]]
    spied = results.get("server_push_profile")
    if spied:
        share = spied["share_of_request"]
        lines += ["", f"## Label Studio's side of a push (py-spy on the server, {spied['predictions']} predictions, "
                  f"{spied['seconds']:.2f} s, {spied['samples']} samples in the import request)", "",
                  "| part of `POST /api/projects/<id>/import/predictions` | share |", "|---|---|"]
        lines += [f"| `{k}` | {v:.0%} |" for k, v in share.items()]
    if results.get("findings"):
        lines += ["", "## Where the time goes", "", *[f"- {f}" for f in results["findings"]]]
    mach = results["machine"]
    lines += ["", f"Machine: {mach['cpus']} cores, Python {mach['python']}, load average "
              f"{mach['loadavg_start']} at start / {mach['loadavg_end']} at end (shared with other jobs); "
              f"run took {results['wall_seconds']:.0f} s. Re-run: `.venv/bin/python bench/al_round.py`.", ""]
    return "\n".join(lines)


def swap_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """The serving-swap table: each round's wall time plus serving's swap, per ``quantize`` variant."""
    if not any("serving_swap" in r for r in rounds):
        return []

    def cell(swap: dict[str, Any], variant: str, base: float) -> str:
        v = swap.get(variant, {})
        if "seconds" not in v:
            return f"failed ({v.get('error', 'not run')})"
        return f"{v['seconds']:.2f} / **{base + v['seconds']:.2f}** ({v['chosen']}, speeds {v['speeds_from'] or '-'})"

    lines = ["", f"## Round + serving swap, side by side (goal: ≤ {TARGET_SECONDS:.0f} s per fast-path round, "
             "swap included; issue 15)", "",
             "Each cell: swap s / **round + swap s** (path served, where its speeds came from). `auto` is the "
             "default; `auto, no memo` is every load measuring every candidate (the cost before the memo).", "",
             "| round | round s | quantize=none | quantize=auto (default) | quantize=auto, no memo |",
             "|---|---|---|---|---|"]
    for r in rounds:
        if "serving_swap" not in r:
            continue
        base, swap = r["seconds"]["total"], r["serving_swap"]
        lines.append(f"| {r['round']} | {base:.2f} | " + " | ".join(cell(swap, v, base) for v in SWAP_VARIANTS) + " |")
    warm = [r for r in rounds[1:] if "seconds" in r.get("serving_swap", {}).get("auto", {})]
    if warm:
        totals = {v: statistics.median(r["seconds"]["total"] + r["serving_swap"][v]["seconds"] for r in warm
                                       if "seconds" in r["serving_swap"].get(v, {})) for v in SWAP_VARIANTS}
        auto = totals["auto"]
        lines += ["", f"Median round + swap after round 1: none {totals['none']:.2f} s, **auto {auto:.2f} s** "
                  f"(goal ≤ {TARGET_SECONDS:.0f} s: {'met' if auto <= TARGET_SECONDS else 'NOT met'}), "
                  f"auto without the memo {totals['auto_no_memo']:.2f} s. Round 1's `auto` pays this "
                  "process's first full measurement, and the ONNX export unless an earlier run left it cached "
                  "on disk (keyed by the encoder's weights)."]
    return lines


def findings(results: dict[str, Any]) -> list[str]:
    """Plain statements from the numbers: the largest parts of a warm round."""
    warm = results["rounds"][1:] or results["rounds"]
    keys = ("train.fit", "train.register", "train.other", "gate", "rescore.load_champion", "rescore.unlabeled",
            "rescore.score_pool", "rescore.strategy_and_ranking", "push.import_predictions",
            "push.set_model_version", "after_round")
    medians = {k: statistics.median(r["seconds"][k] for r in warm) for k in keys}
    total = statistics.median(r["seconds"]["total"] for r in warm)
    ranked = sorted(medians.items(), key=lambda kv: kv[1], reverse=True)
    return [f"`{k}`: {v:.2f} s ({v / total:.0%} of a warm round)" for k, v in ranked[:5]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed-labels", type=int, default=200)
    parser.add_argument("--pool-limit", type=int, default=None, help="stratified sample of the pool (smoke runs)")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench" / "cache",
                        help="embedding cache (git-ignored); a warm one skips the one-off embedding")
    parser.add_argument("--embed-sample", type=int, default=1000,
                        help="with a warm cache, measure the embedding rate on this many pool texts")
    parser.add_argument("--profile-round", type=int, default=2, help="run this round under cProfile (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-serving-swap", dest="serving_swap", action="store_false",
                        help="skip timing serving's swap to each round's champion")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    started = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "loadavg_start": round(os.getloadavg()[0], 1)}
    results = run(args)
    machine["loadavg_end"] = round(os.getloadavg()[0], 1)
    results["machine"] = machine
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["findings"] = findings(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "al_round.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "al_round.md").write_text(markdown(results))
    log(f"wrote {args.out / 'al_round.md'}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
