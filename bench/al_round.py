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
- rescore: champion load from the registry, the unlabeled pool, ``score_pool`` (cached embeddings →
  head), strategy scores/selection;
- push: ``import_predictions`` of the top ``queue_size`` priorities + ``set_model_version``.

The gate is set permissive (``gate_min_gain=-1``) so every round promotes and therefore pushes: the
round's full path is what is measured. (With the default gate a refused round stops after the gate.)

Baselines, side by side in the same run (same project, same labels):

- ``whole-pool push``: a round that pushes priorities for the *whole* unlabeled pool instead of the top
  ``queue_size`` (what the loop would do without that trick);
- ``no embedding cache``: rescoring with a full forward pass over the unlabeled pool costs what embedding
  it cost in the one-off step (the same encoder forward pass over the same texts), so that round's time is
  the measured round with ``score_pool`` replaced by ``unlabeled / measured embedding rate``.

Run: ``.venv/bin/python bench/al_round.py`` (≈ 6-8 min on 2 cores with an empty cache; the embedding
cache in ``--cache-dir``, default ``var/bench/embeddings`` (git-ignored), makes later runs faster; the
report says how many texts were embedded in *this* run). Writes ``bench/results/al_round.{json,md}``.
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
import statistics
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

import pandas as pd  # noqa: E402

import active_learning.loop as loop_module  # noqa: E402
import training.train as train_module  # noqa: E402
from active_learning.labelstudio import LabelStudioClient  # noqa: E402
from active_learning.loop import ActiveLearningLoop, RoundResult  # noqa: E402
from active_learning.reconcile import reconcile  # noqa: E402
from labelloop import data  # noqa: E402
from labelloop.config import REPO_ROOT, Settings  # noqa: E402
from labelloop.journal import Journal  # noqa: E402
from labelloop.ls_server import LabelStudioServer, free_port  # noqa: E402
from labelloop.taxonomy import get_taxonomy  # noqa: E402
from training.registry import Registry  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "results"
TAXONOMY = get_taxonomy("hate_offensive")
TARGET_SECONDS = 15.0
SPLIT_SEED = 13

#: the breakdown's parts, each a wrapped call; "train.other" etc. are what the wrapped calls leave over
PARTS = ("labels_snapshot", "train", "train.fit", "train.register", "gate", "rescore.load_champion",
         "rescore.model_version_check", "rescore.unlabeled", "rescore.score_pool", "push",
         "push.import_predictions", "push.set_model_version")


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
    watch.wrap(loop.journal, "labels", "labels_snapshot")
    watch.wrap(loop_module, "train_and_register", "train")
    watch.wrap(train_module, "train_fast", "train.fit")
    watch.wrap(Registry, "register", "train.register")
    watch.wrap(Registry, "promote", "gate")
    watch.wrap(loop, "champion", "rescore.load_champion")
    watch.wrap(loop, "project_model_version", "rescore.model_version_check")
    watch.wrap(loop, "unlabeled", "rescore.unlabeled")
    watch.wrap(loop_module, "score_pool", "rescore.score_pool")
    watch.wrap(loop, "push_queue", "push")  # the whole push_queue; split below
    watch.wrap(loop.client, "import_predictions", "push.import_predictions")
    watch.wrap(loop.client, "set_model_version", "push.set_model_version")
    return watch


def breakdown(parts: dict[str, float], result: RoundResult) -> dict[str, float]:
    """The four figures issue 4 asks about, plus the sub-parts, from the wrapped calls' totals."""
    g = lambda k: parts.get(k, 0.0)  # noqa: E731
    push_queue = g("push")
    rescore = (g("rescore.load_champion") + g("rescore.model_version_check") + push_queue
               - g("push.import_predictions") - g("push.set_model_version"))
    out = {
        "total": result.seconds["total"],
        "train": g("labels_snapshot") + g("train"),
        "gate": g("gate"),
        "rescore": rescore,
        "push": g("push.import_predictions") + g("push.set_model_version"),
        "train.labels_snapshot": g("labels_snapshot"),
        "train.fit": g("train.fit"),
        "train.register": g("train.register"),
        "train.other": g("train") - g("train.fit") - g("train.register"),
        "rescore.load_champion": g("rescore.load_champion"),
        "rescore.model_version_check": g("rescore.model_version_check"),
        "rescore.unlabeled": g("rescore.unlabeled"),
        "rescore.score_pool": g("rescore.score_pool"),
        "rescore.strategy_and_ranking": push_queue - g("rescore.unlabeled") - g("rescore.score_pool")
        - g("push.import_predictions") - g("push.set_model_version"),
        "push.import_predictions": g("push.import_predictions"),
        "push.set_model_version": g("push.set_model_version"),
    }
    out["unaccounted"] = out["total"] - out["train"] - out["gate"] - out["rescore"] - out["push"]
    return {k: round(v, 3) for k, v in out.items()}


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
# the run
# ------------------------------------------------------------------------------------------------


def profile_round(loop: ActiveLearningLoop, top: int = 25) -> tuple[RoundResult, list[dict[str, Any]]]:
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
    return result, [{"by": "cumtime", "rows": by_cum}, {"by": "tottime", "rows": by_tot}]


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
        journal = Journal(settings.journal_path, TAXONOMY)
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
        if embedded:
            one_off["embed_texts_per_s"] = round(embedded / one_off["embed_pool_and_eval"], 1)

        with timer(one_off, "freeze_eval_set"):
            Registry(settings).freeze_eval_set(eval_frame, "davidson")

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
                if args.profile_round == number:
                    result, profile = profile_round(loop)
                else:
                    result = loop.run_round()
                rounds.append(round_record(number, "top queue_size", result, watch.take()))
                log(f"round {number}: {rounds[-1]['seconds']}")
                rounds[-1]["labels_after"] = annotate(loop, result.queue.queued_task_ids, gold)

            log("baseline: one round pushing priorities for the whole unlabeled pool")
            loop.queue_size = len(pool_frame)
            result = loop.run_round()
            baseline = round_record(args.rounds + 1, "whole pool", result, watch.take())
            log(f"baseline: {baseline['seconds']}")
        finally:
            watch.uninstall()
        results["rounds"] = rounds
        results["baseline_whole_pool_push"] = baseline
        results["profile"] = profile
        results["summary"] = summarize(rounds, baseline, one_off)
        journal.close()
        return results
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def round_record(number: int, push: str, result: RoundResult, parts: dict[str, float]) -> dict[str, Any]:
    if result.queue is None or not result.promoted:
        raise RuntimeError(f"round {number} did not promote and push ({result.gate_reason}); "
                           "the bench needs the full round path")
    return {"round": number, "push": push, "labels": result.labels, "model_version": result.trained_version,
            "macro_f1": round(result.macro_f1, 4), "pool_unlabeled": result.queue.pool_unlabeled,
            "pushed": result.queue.pushed, "seconds": breakdown(parts, result),
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
            f"{x['train.fit']:.2f} / {x['train.register']:.2f} / {x['train.other'] + x['train.labels_snapshot']:.2f}"
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
    seed = one["seed_labels"]
    lines += [
        "",
        "## One-off costs (not part of a round)",
        "",
        f"- Label Studio first start (migrations): {one['label_studio_start']:.1f} s",
        f"- `import_pool` of {results['pool_items']} tasks: {one['import_pool']:.1f} s",
        f"- embedding pool + eval set: {one['embed_pool_and_eval']:.1f} s for {one['texts_embedded_now']} texts "
        "embedded in this run" + (f" ({one['embed_texts_per_s']} texts/s)" if one.get("embed_texts_per_s") else
                                  " (cache was warm)"),
        f"- freezing the eval set in MLflow: {one['freeze_eval_set']:.1f} s; cold-start pick: "
        f"{one['cold_start_pick']:.1f} s",
        f"- {seed['labels']} seed labels: {seed['annotate_via_api']:.1f} s to annotate through the API, "
        f"{seed['reconcile']:.2f} s to reconcile into the journal",
    ]
    if results.get("findings"):
        lines += ["", "## Where the time goes", "", *[f"- {f}" for f in results["findings"]]]
    mach = results["machine"]
    lines += ["", f"Machine: {mach['cpus']} cores, Python {mach['python']}, load average "
              f"{mach['loadavg_start']} at start / {mach['loadavg_end']} at end (shared with other jobs); "
              f"run took {results['wall_seconds']:.0f} s. Re-run: `.venv/bin/python bench/al_round.py`.", ""]
    return "\n".join(lines)


def findings(results: dict[str, Any]) -> list[str]:
    """Plain statements from the numbers: the largest parts of a warm round."""
    warm = results["rounds"][1:] or results["rounds"]
    keys = ("train.fit", "train.register", "train.other", "gate", "rescore.load_champion", "rescore.unlabeled",
            "rescore.score_pool", "rescore.strategy_and_ranking", "push.import_predictions",
            "push.set_model_version")
    medians = {k: statistics.median(r["seconds"][k] for r in warm) for k in keys}
    total = statistics.median(r["seconds"]["total"] for r in warm)
    ranked = sorted(medians.items(), key=lambda kv: kv[1], reverse=True)
    return [f"`{k}`: {v:.2f} s ({v / total:.0%} of a warm round)" for k, v in ranked[:5]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed-labels", type=int, default=200)
    parser.add_argument("--pool-limit", type=int, default=None, help="stratified sample of the pool (smoke runs)")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench" / "embeddings")
    parser.add_argument("--profile-round", type=int, default=2, help="run this round under cProfile (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
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
