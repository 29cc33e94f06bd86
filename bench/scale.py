"""Pool scoring at scale (issue 14): ``labelloop score`` on a local Ray against the in-process scorer, the
vectorised top-K over 1M scores, and the GPU run when the machine has GPUs.

1. **Throughput, side by side in one run.** A fast-mode champion (frozen all-MiniLM-L6-v2 + linear head,
   trained on 300 Davidson rows) is registered and promoted in a temp MLflow store. The same ``--n`` Davidson
   texts (20,000 by default) are scored by

   - the in-process scorer: :class:`active_learning.pool.ScoredPool` ``.proba()`` with an empty embedding
     cache (so every text pays its forward pass, as a new pool does), in this process, torch on every core;
   - ``labelloop score``'s engine, :func:`active_learning.batch_score.score_pool`, exactly as the command
     runs it after parsing its options: a local Ray started on every core, one actor loading the champion,
     Parquet in and out, Ray shut down at the end. Its wall time includes all of that.

   The runs are interleaved A B B A (``--reps`` pairs) because other work on the machine moves the rates;
   the load average is recorded before each run. Goal: Ray costs ≤ 10 % over in-process on 2 cores.
2. **Selection** of the top 1,000 of 1M synthetic scores: :func:`active_learning.selection.top_k` (partition,
   then sort the head) against the full lexsort the loop used before, and from a Parquet score column.
   Goal: < 1 s.
3. **GPU**: when torch sees CUDA, ``score_pool`` with 1..N GPU actors over ``--gpu-n`` texts (Davidson,
   repeated), texts/s per actor count. Goal: near-linear in GPU workers, one GPU ≥ 20,000 texts/s. Without
   a GPU the section says so and gives the command.

Run: ``.venv/bin/python bench/scale.py`` (``--n 2000 --reps 1`` for a quick look). Writes
``bench/results/scale.{json,md}``. A section that fails is reported as failed, with its error, and the
others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RAY_GOAL = 1.10
SELECTION_GOAL_S = 1.0
GPU_GOAL = 20_000


def load() -> float:
    return round(os.getloadavg()[0], 2)


def setup(workdir: Path, n: int):
    """Settings over a temp registry holding a fresh fast-mode champion, and the pool as Parquet."""
    from labelloop import data
    from labelloop.config import REPO_ROOT, Settings
    from labelloop.taxonomy import get_taxonomy
    from training.registry import CHAMPION, Registry
    from training.train import train_and_register

    settings = Settings(mlruns_dir=workdir / "mlruns", state_dir=workdir / "var", cache_dir=workdir / "train-cache",
                        data_dir=Path(os.environ.get("LABELLOOP_DATA_DIR", REPO_ROOT.parent / "shared" / "data")),
                        quantize="none", strategy="margin")
    davidson = data.load("davidson", settings=settings)
    splits = data.split(davidson, seed=11)
    train = data.stratified_sample(splits.train, 300, seed=11)
    train_and_register(train, None, get_taxonomy("hate_offensive"), mode="fast", settings=settings,
                       source="bench-scale", eval_frame=data.stratified_sample(splits.test, 200, seed=11))
    Registry(settings).promote(force=True)
    rest = davidson.frame[~davidson.frame["id"].isin(train["id"])]
    pool = rest[["id", "text"]].sample(frac=1.0, random_state=11).astype({"id": str}).reset_index(drop=True)
    pool = pd.concat([pool] * (n // len(pool) + 1), ignore_index=True).head(n)
    pool["id"] = [f"{i}-{k}" for k, i in enumerate(pool["id"])]  # unique even where the pool repeats
    path = workdir / "pool.parquet"
    pool.to_parquet(path)
    return settings, pool, path, Registry(settings).load(CHAMPION)


def in_process(settings, pool: pd.DataFrame, loaded, workdir: Path) -> dict:
    from active_learning.pool import ScoredPool

    cache = workdir / f"cache-{time.monotonic_ns()}"  # empty: every text pays its forward pass
    started_load = load()
    started = time.perf_counter()
    proba = ScoredPool(pool, loaded.classifier, loaded.ref.cache_key, cache).proba()
    seconds = time.perf_counter() - started
    shutil.rmtree(cache, ignore_errors=True)
    return {"scorer": "in-process", "seconds": round(seconds, 2), "texts_per_s": round(len(pool) / seconds, 1),
            "load_before": started_load, "rows": int(len(proba))}


def on_ray(settings, pool_path: Path, workdir: Path, n: int, actors: int | None = None) -> dict:
    from active_learning.batch_score import score_pool

    out = workdir / f"scores-{time.monotonic_ns()}.parquet"
    started_load = load()
    started = time.perf_counter()
    result = score_pool(settings, [str(pool_path)], str(out), strategy="margin", actors=actors)
    seconds = time.perf_counter() - started
    out.unlink(missing_ok=True)
    assert result.rows == n, (result.rows, n)
    return {"scorer": "labelloop score (local Ray)", "seconds": round(seconds, 2),
            "texts_per_s": round(n / seconds, 1), "load_before": started_load, "rows": result.rows,
            "actors": result.actors, "gpus_per_actor": result.gpus_per_actor,
            "first_batch_s": round(result.first_batch_seconds, 2),
            "steady_texts_per_s": round(result.steady_texts_per_second, 1)}


def ray_start_cost() -> float:
    """Seconds to start and shut down the local Ray alone: the fixed part of ``labelloop score``'s overhead."""
    from active_learning.batch_score import RayCluster

    started = time.perf_counter()
    with RayCluster():
        pass
    return round(time.perf_counter() - started, 2)


def throughput(args, workdir: Path) -> dict:
    settings, pool, pool_path, loaded = setup(workdir, args.n)
    runs = []
    # interleaved A B B A ...: a drift in what else the machine runs falls on both scorers alike
    order = [name for i in range(args.reps)
             for name in (("in-process", "ray") if i % 2 == 0 else ("ray", "in-process"))]
    for which in order:
        run = in_process(settings, pool, loaded, workdir) if which == "in-process" else on_ray(
            settings, pool_path, workdir, args.n)
        print(json.dumps(run), flush=True)
        runs.append(run)
    mean = {name: statistics.mean(r["seconds"] for r in runs if r["scorer"].startswith(name))
            for name in ("in-process", "labelloop score")}
    ratio = mean["labelloop score"] / mean["in-process"]
    in_process_rate = statistics.mean(r["texts_per_s"] for r in runs if r["scorer"] == "in-process")
    steady = [r["steady_texts_per_s"] for r in runs if r.get("steady_texts_per_s")]
    steady_rate = statistics.mean(steady) if steady else 0.0
    return {"n": args.n, "order": order, "runs": runs, "mean_seconds": {k: round(v, 2) for k, v in mean.items()},
            "ratio_ray_over_in_process": round(ratio, 3), "goal": f"<= {RAY_GOAL}", "met": ratio <= RAY_GOAL,
            "steady_cost_ratio": round(in_process_rate / steady_rate, 3) if steady_rate else None,
            "ray_start_and_shutdown_s": ray_start_cost(), "cpus": os.cpu_count(),
            "torch_threads_in_process": __import__("torch").get_num_threads()}


def selection(workdir: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from active_learning.selection import top_k, top_k_parquet

    n, k, reps = 1_000_000, 1000, 5
    rng = np.random.default_rng(0)
    variants = {"continuous": rng.random(n), "ties (3 decimals)": np.round(rng.random(n), 3)}
    out = {}
    for name, scores in variants.items():
        path = workdir / "scores-1m.parquet"
        pq.write_table(pa.table({"score": scores}), path)
        timings = {"top_k (argpartition + sort of the head)": [], "full lexsort (before)": [],
                   "top_k_parquet (read the column + top_k)": []}
        for rep in range(reps):  # interleaved
            t = time.perf_counter()
            new = top_k(scores, k, np.random.default_rng(rep))
            timings["top_k (argpartition + sort of the head)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            rr = np.random.default_rng(rep)
            old = np.lexsort((rr.random(n), -scores))[:k]
            timings["full lexsort (before)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            top_k_parquet(str(path), "score", k, np.random.default_rng(rep))
            timings["top_k_parquet (read the column + top_k)"].append(time.perf_counter() - t)
            assert np.array_equal(new, old)
        out[name] = {label: round(statistics.median(v), 4) for label, v in timings.items()}
    worst = max(v for d in out.values() for label, v in d.items() if "before" not in label)
    return {"n": n, "k": k, "reps": reps, "median_seconds": out, "goal_s": SELECTION_GOAL_S,
            "met": worst < SELECTION_GOAL_S, "same_picks_as_before": True}


def gpu(args, workdir: Path) -> dict:
    import torch

    command = (".venv/bin/python bench/scale.py --gpu-n 200000 --reps 1 --n 20000  # on a node with CUDA "
               "GPUs, after make install with the CUDA build of torch (see README)")
    if not torch.cuda.is_available():
        return {"ran": False, "reason": "no GPU on this machine (torch sees no CUDA device), and no GPU machine "
                "was lent to this task", "command": command}
    settings, _, pool_path, _ = setup(workdir / "gpu", args.gpu_n)
    runs = [on_ray(settings, pool_path, workdir, args.gpu_n, actors=a) for a in range(1, torch.cuda.device_count() + 1)]
    one = runs[0]["texts_per_s"]
    return {"ran": True, "device": torch.cuda.get_device_name(0), "runs": runs, "goal_texts_per_s_one_gpu": GPU_GOAL,
            "met_one_gpu": one >= GPU_GOAL, "scaling": [round(r["texts_per_s"] / one, 2) for r in runs],
            "command": command}


def section(name: str, fn, *a) -> dict:
    try:
        return {"status": "ok", **fn(*a)}
    except Exception as e:  # a fresh clone without data, a failed start: reported, not a crash
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def markdown(result: dict) -> str:
    lines = ["# Pool scoring at scale (issue 14): `labelloop score` on Ray vs in-process, top-K selection, GPU", "",
             f"Machine: {result['machine']}. Run {result['date']}; load average {result['load_start']} at start, "
             f"{result['load_end']} at the end (other engineers share the 2 cores, so absolute rates are lower "
             "bounds; the ratio is measured side by side, interleaved).", ""]
    t = result["throughput"]
    lines += ["## 1. Throughput: the same texts, in-process vs `labelloop score` (local Ray)", ""]
    if t["status"] != "ok":
        lines += [f"Not measured: {t['error']}", ""]
    else:
        goal_met = "met in this run; see *Reading the ratio* below" if t["met"] else "NOT met"
        lines += [f"**Ray / in-process wall time: {t['ratio_ray_over_in_process']}** "
                  f"(goal ≤ {RAY_GOAL}: {goal_met}). {t['n']:,} Davidson texts, fast-mode champion (MiniLM "
                  f"encoder + linear head), {t['cpus']} CPUs, order {' → '.join(t['order'])}. Ray's wall time "
                  f"includes starting and stopping the local Ray (alone: {t['ray_start_and_shutdown_s']} s), the "
                  "actor's champion load, reading and writing Parquet.", "",
                  *([f"From its first scored batch to its last, Ray took {t['steady_cost_ratio']}× the in-process "
                     "time per text. The same model call runs on both sides, so a factor this far from 1 measures "
                     "the contention on the machine (see below), not either scorer.", ""]
                    if t.get("steady_cost_ratio") else []),
                  *([f"The issue asks for 20,000 texts; this run used {t['n']:,}, because at this load one "
                     "20,000-text run takes about 20 minutes and the four interleaved runs did not fit the time "
                     "there was. `bench/scale.py` defaults to 20,000.", ""] if t["n"] < 20_000 else []),
                  "| run | scorer | seconds | texts/s | Ray: first batch after s | Ray: texts/s after it | "
                  "load average before |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {i + 1} | {r['scorer']} | {r['seconds']} | {r['texts_per_s']} | {r.get('first_batch_s', '')} | "
                  f"{r.get('steady_texts_per_s', '')} | {r['load_before']} |" for i, r in enumerate(t["runs"])]
        lines += ["", f"Mean seconds: in-process {t['mean_seconds']['in-process']}, "
                  f"Ray {t['mean_seconds']['labelloop score']}.", "",
                  "Reading the ratio: when the load average is far above the 2 cores, the kernel shares the CPUs "
                  "between runnable threads, and the Ray run has more of them (raylet, GCS, the actor, the driver) "
                  "than the in-process run, so it can get a larger share of the machine. A ratio below 1 under "
                  "such load is not evidence that Ray is faster; it says Ray's overhead does not show above the "
                  "noise. The fixed costs do not depend on that: starting and stopping the local Ray, and the "
                  "actor's start and champion load before its first batch (the Ray column above).", ""]
    s = result["selection"]
    lines += ["## 2. Selecting the top 1,000 of 1M scores", ""]
    if s["status"] != "ok":
        lines += [f"Not measured: {s['error']}", ""]
    else:
        lines += [f"Goal < {SELECTION_GOAL_S} s: {'met' if s['met'] else 'NOT met'}. Median of {s['reps']} "
                  "interleaved runs; the new selection picks exactly what the full sort picked (same seeds).", "",
                  "| scores | method | median s |", "|---|---|---|"]
        for name, timings in s["median_seconds"].items():
            lines += [f"| {name} | {label} | {v} |" for label, v in timings.items()]
        lines.append("")
    g = result["gpu"]
    lines += ["## 3. GPU", ""]
    if g.get("status") == "ok" and g.get("ran"):
        lines += [f"Device {g['device']}; goal one GPU ≥ {GPU_GOAL:,} texts/s: "
                  f"{'met' if g['met_one_gpu'] else 'NOT met'}; scaling per actor count {g['scaling']}.", "",
                  "| GPU actors | texts/s | seconds |", "|---|---|---|"]
        lines += [f"| {r['actors']} | {r['texts_per_s']} | {r['seconds']} |" for r in g["runs"]]
    elif g.get("status") == "ok":
        lines += [f"**Not run**: {g['reason']}. Goals (untested): one GPU ≥ {GPU_GOAL:,} texts/s, near-linear in "
                  "GPU workers. On a GPU node run:", "", f"    {g['command']}"]
    else:
        lines += [f"Failed: {g['error']}"]
    lines += ["", "Reproduce: `.venv/bin/python bench/scale.py` (see its docstring for what each section times)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="texts scored by each scorer")
    parser.add_argument("--reps", type=int, default=2, help="pairs of runs per scorer (2: A B B A)")
    parser.add_argument("--gpu-n", type=int, default=200_000, help="texts per GPU run")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="labelloop-bench-scale-"))
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": load(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    try:
        result["selection"] = section("selection", selection, workdir)
        result["throughput"] = ({"status": "failed", "error": "skipped (--skip-throughput)"} if args.skip_throughput
                                else section("throughput", throughput, args, workdir))
        result["gpu"] = section("gpu", gpu, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_end"] = load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
