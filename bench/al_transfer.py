"""Do the labels the loop chose make the better *final* model? Fine-tune the default model on them and
on as many random labels, paired by seed.

    nice -n 5 .venv/bin/python bench/al_transfer.py --seeds 5 --resume        # the full run, resumable
    .venv/bin/python bench/al_transfer.py --seeds 1 --rows 600 --budget 100 --initial 20 --step 20 \\
        --epochs 1 --min-steps 0 --out /tmp/al_transfer                         # a smoke run, seconds

The loop arm is an offline replay of fast-mode rounds exactly as ``active_learning.simulate`` runs them
(frozen-encoder head refit every round, batches of ``--step`` to ``--budget``) after ``--initial`` random
labels, the classic arms' start in ``bench/al_curves.py``: the random arm starts from the same ones, so a
seed's two arms differ only in what the strategy chose (``--cold-start kmeans``: the live loop's start),
with the query strategy the ``strategy`` setting names (``auto`` by default, resolved by
``parse_strategy`` for the taxonomy's kind): a later rerun measures whatever the default has become, and
the results record which strategy and head were used. The random arm labels ``--budget`` random pool
items (the same replay with the ``random`` strategy and a random start). Both arms then fine-tune
``base_model`` with the product's recipe (``FineTuneConfig`` defaults, ``DEFAULT_MIN_STEPS``, early
stopping on validation macro-F1) on their labels only: the validation slice is carved out of the same
``--budget`` labels, because a team that bought 2,000 labels has no others to validate on. Both arms of
a seed share the fine-tuning seed, so the paired difference is about the labels, not the initialisation.

The test split is ``al_curves``'s (``pool_and_test``: Davidson stratified 20 %), never seen by either arm.

Each finished (seed, arm) is written to the JSON at once (and the Markdown rewritten), so an interrupted
run keeps its results and ``--resume`` continues where it stopped; a failed fine-tune is recorded and the
run goes on. ``--deadline HH:MM`` (UTC) starts no run that would not finish by then, judged by the
slowest finished one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a fresh clone without an installed package
    sys.path.insert(0, str(REPO))

from active_learning.simulate import label_kind, parse_strategy, pool_and_test, simulate  # noqa: E402
from labelloop import data  # noqa: E402
from labelloop.config import Settings  # noqa: E402
from training.classifier import load_encoder  # noqa: E402
from training.evaluate import evaluate  # noqa: E402
from training.finetune import DEFAULT_MIN_STEPS, FineTuneConfig, finetune  # noqa: E402

RESULTS = REPO / "bench" / "results"
STEM = "al_transfer"
ARMS = ("loop", "random")
#: issue 15's label-efficiency goal: a final model this good from at most this many labels
GOAL = {"macro_f1": 0.72, "f1_rare": 0.45, "max_labels": 2000}
#: Davidson references from /work/shared/notes/al-baselines.md (its test split is this benchmark's:
#: stratified 20 %, random_state 0) and from bench/results/train_davidson.json (another split, seed 13)
NOTE_REFERENCES = [
    {"model": "MiniLM fine-tuned, 4,000 random labels, 1 epoch, class-weighted (note, 3 seeds)",
     "labels": 4000, "macro_f1": 0.699, "f1_rare": 0.35, "split": "same"},
    {"model": "frozen MiniLM + balanced LR, all 19,826 pool labels (note)",
     "labels": 19826, "macro_f1": 0.667, "f1_rare": 0.350, "split": "same"},
    {"model": "DistilBERT, full data (published)", "labels": None, "macro_f1": 0.78, "f1_rare": 0.48,
     "split": "published"},
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class ProtocolMismatch(Exception):
    """``--resume`` met results of a different protocol: mixing them would pair unlike runs."""


# --------------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace, settings: Settings) -> data.LabeledData:
    """The dataset, or a stratified ``--rows`` slice of it (smoke runs)."""
    labeled = data.load(args.dataset, settings=settings)
    if args.rows:
        frame = data.stratified_sample(labeled.frame, args.rows, seed=0)
        labeled = data.LabeledData(frame, labeled.taxonomy, labeled.source)
    return labeled


def finetune_config(args: argparse.Namespace, settings: Settings, seed: int) -> FineTuneConfig:
    """The product's default fine-tune recipe (what ``labelloop train --mode finetune`` uses), seeded per
    benchmark seed; ``--epochs`` / ``--min-steps`` override it only for smoke runs."""
    config = FineTuneConfig(base_model=settings.base_model, max_length=settings.max_length, seed=seed,
                            min_steps=DEFAULT_MIN_STEPS, device=settings.device)
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.min_steps is not None:
        config.min_steps = args.min_steps
    config.__post_init__()  # the overrides are checked like any config
    return config


def fast_head(taxonomy, C: float, encoder_name: str, max_length: int) -> str:
    """What the fast-mode rounds fitted, read off a head the replay's own code fits on a toy problem, so
    the record follows the product if its head changes."""
    labels = taxonomy.labels
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12 * len(labels), 8)).astype(np.float32)
    y = np.arange(len(x)) % len(labels)
    try:
        world = SimpleNamespace(encoder=load_encoder(encoder_name, max_length), labels=labels)
        model = label_kind(taxonomy).fit(world, x, y, 0, C)
    except Exception as exc:  # the record is informative, not essential: never lose a run over it
        return f"unknown ({type(exc).__name__}: {exc})"
    return repr(getattr(model, "head", model))


def protocol(args: argparse.Namespace, settings: Settings, labeled: data.LabeledData, pool: pd.DataFrame,
             test: pd.DataFrame) -> dict:
    resolved = parse_strategy(settings.strategy, labeled.taxonomy.multi)
    ft = asdict(finetune_config(args, settings, 0))
    ft.pop("seed")
    return {"dataset": labeled.source, "rows": len(labeled), "pool": len(pool), "test": len(test),
            "test_split": "active_learning.simulate.pool_and_test(split_seed=0)", "budget": args.budget,
            "initial": args.initial, "step": args.step, "cold_start": args.cold_start,
            "strategy_setting": settings.strategy, "strategy": resolved.spec, "val_frac": args.val_frac,
            "finetune": ft, "labels": list(labeled.taxonomy.labels)}


def rare_label(labels: list[str], pool: pd.DataFrame) -> str:
    counts = pool["label"].value_counts()
    return min(labels, key=lambda label: counts.get(label, 0))


def choose_labels(labeled: data.LabeledData, arm: str, seed: int, args: argparse.Namespace,
                  settings: Settings) -> tuple[np.ndarray, dict, dict]:
    """The pool rows the arm labels for ``seed``, the fast-mode model's test scores at the budget, and the
    replay's config (C, encoder, ...). The random arm takes its ``budget - initial`` random labels in one
    batch: the same set as batches of ``step`` would give, without refitting a head per batch that chooses
    nothing (those refits cost minutes per seed on two busy cores)."""
    spec, cold_start, step = ((settings.strategy, args.cold_start, args.step) if arm == "loop"
                              else ("random", "random", max(1, args.budget - args.initial)))
    result = simulate(labeled, [spec], [seed], args.budget, step, args.initial, settings=settings,
                      cold_start=cold_start, cache_dir=args.cache_dir, log_to_mlflow=False)
    last = result.curves[result.curves["n_labels"] == result.curves["n_labels"].max()].iloc[0]
    labels = labeled.taxonomy.labels
    fast = {"macro_f1": float(last["macro_f1"]), **{f"f1_{label}": float(last[f"f1_{label}"]) for label in labels},
            **{f"labeled_{label}": int(last[f"labeled_{label}"]) for label in labels}}
    return result.labeled[(spec, seed)], fast, result.config


def split_labels(frame: pd.DataFrame, val_frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation parts of an arm's labels, stratified when every class has two items."""
    strata = frame["label"] if frame["label"].value_counts().min() >= 2 else None
    train, val = train_test_split(frame, test_size=val_frac, random_state=seed, stratify=strata)
    return train.reset_index(drop=True), val.reset_index(drop=True)


def run_one(arm: str, seed: int, chosen: np.ndarray, fast: dict, pool: pd.DataFrame, test: pd.DataFrame,
            labeled: data.LabeledData, args: argparse.Namespace, settings: Settings) -> dict:
    labels = list(labeled.taxonomy.labels)
    frame = pool.iloc[chosen][["id", "text", "label"]].reset_index(drop=True)
    train, val = split_labels(frame, args.val_frac, seed)
    config = finetune_config(args, settings, seed)
    log(f"seed {seed} {arm}: fine-tuning on {len(train)} + validating on {len(val)} "
        f"({dict(frame['label'].value_counts())})")
    result = finetune(train, val, labeled.taxonomy, config)
    t0 = time.perf_counter()
    report = evaluate(result.classifier, test)
    eval_seconds = time.perf_counter() - t0
    row = {"seed": seed, "arm": arm, "n_labels": len(frame), "n_train": len(train), "n_val": len(val),
           "label_counts": {label: int((frame["label"] == label).sum()) for label in labels},
           "macro_f1": report.macro_f1, "accuracy": report.accuracy,
           **{f"f1_{label}": report.per_class[label]["f1"] for label in labels},
           "per_class": report.per_class, "best_epoch": result.best_epoch,
           "best_val_macro_f1": result.best_val_macro_f1, "epochs_planned": result.epochs,
           "steps": int(result.history[-1]["step"]) if result.history else 0,
           "train_seconds": round(result.seconds, 1), "test_eval_seconds": round(eval_seconds, 1),
           "fast_mode_at_budget": fast, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    log(f"seed {seed} {arm}: macro-F1 {report.macro_f1:.4f}, " + ", ".join(
        f"{label} F1 {report.per_class[label]['f1']:.3f}" for label in labels)
        + f" (train {result.seconds:.0f} s, eval {eval_seconds:.0f} s)")
    return row


# --------------------------------------------------------------------------------------------------
# Results: JSON written after every run, Markdown rendered from it
# --------------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def load_previous(path: Path, expected: dict) -> dict | None:
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    if previous.get("protocol") != expected:
        changed = sorted(k for k in expected.keys() | previous.get("protocol", {}).keys()
                         if expected.get(k) != previous.get("protocol", {}).get(k))
        raise ProtocolMismatch(f"{path} holds results of another protocol (differs in {', '.join(changed)}); "
                               "rerun without --resume to start over, or with another --out")
    return previous


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader, or a kill mid-write, never leaves half a file


def save(state: dict, out: Path) -> None:
    """Write the JSON and Markdown, first taking in the runs another process (``--arms``, same ``--out``)
    finished meanwhile under the same protocol; a lock keeps two savers from losing each other's runs."""
    import fcntl

    path = out / f"{STEM}.json"
    lock = os.open(out, os.O_RDONLY)  # the directory itself: no lock file left beside the results
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            on_disk = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            on_disk = {}
        if on_disk.get("protocol") == state["protocol"]:
            mine = {(r["seed"], r["arm"]) for r in state["runs"]}
            state["runs"] += [r for r in on_disk.get("runs", []) if (r["seed"], r["arm"]) not in mine]
            failed = {(e["seed"], e["arm"]) for e in state["errors"]}
            state["errors"] += [e for e in on_disk.get("errors", []) if (e["seed"], e["arm"]) not in failed
                                and (e["seed"], e["arm"]) not in mine]
        state["summary"] = summarise(state)
        write_atomic(path, json.dumps(state, indent=1, default=float) + "\n")
        write_atomic(out / f"{STEM}.md", markdown(state))
    finally:
        os.close(lock)  # closing releases the lock


def _mean_sd(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()) if len(arr) else math.nan,
            "sd": float(arr.std(ddof=1)) if len(arr) > 1 else math.nan, "n": int(len(arr))}


def paired(runs: list[dict], column: str) -> dict:
    """loop − random per seed that has both, with mean, sd and a 95 % t-interval of the mean."""
    by = {(r["seed"], r["arm"]): r for r in runs}
    seeds = sorted(s for s in {r["seed"] for r in runs} if (s, "loop") in by and (s, "random") in by)
    diffs = [by[(s, "loop")][column] - by[(s, "random")][column] for s in seeds]
    out = {"seeds": seeds, "diffs": diffs, **_mean_sd(diffs)}
    if len(diffs) > 1:
        from scipy import stats

        half = stats.t.ppf(0.975, len(diffs) - 1) * out["sd"] / math.sqrt(len(diffs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def summarise(state: dict) -> dict:
    runs, rare = state["runs"], state["rare_label"]
    arms = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        arms[arm] = {"macro_f1": _mean_sd([r["macro_f1"] for r in mine]),
                     f"f1_{rare}": _mean_sd([r[f"f1_{rare}"] for r in mine]),
                     f"labeled_{rare}": _mean_sd([r["label_counts"][rare] for r in mine]),
                     "fast_macro_f1": _mean_sd([r["fast_mode_at_budget"]["macro_f1"] for r in mine]),
                     f"fast_f1_{rare}": _mean_sd([r["fast_mode_at_budget"][f"f1_{rare}"] for r in mine])}
        m = arms[arm]
        met = m["macro_f1"]["n"] > 0 and m["macro_f1"]["mean"] >= GOAL["macro_f1"] \
            and m[f"f1_{rare}"]["mean"] >= GOAL["f1_rare"] and state["protocol"]["budget"] <= GOAL["max_labels"]
        m["goal"] = {"met": bool(met), "macro_f1_margin": m["macro_f1"]["mean"] - GOAL["macro_f1"],
                     "f1_rare_margin": m[f"f1_{rare}"]["mean"] - GOAL["f1_rare"]}
    pairs = {column: paired(runs, column) for column in ("macro_f1", f"f1_{rare}")}
    pairs[f"labeled_{rare}"] = paired([r | {f"labeled_{rare}": r["label_counts"][rare]} for r in runs],
                                      f"labeled_{rare}")
    complete = len(pairs["macro_f1"]["seeds"])
    return {"arms": arms, "paired": pairs, "seeds_complete": complete, "seeds_requested": len(state["seeds"])}


def _fmt(stat: dict, digits: int = 3) -> str:
    if stat["n"] == 0:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["n"] > 1 else "")


def _pts(stat: dict) -> str:
    if stat["n"] == 0:
        return "–"
    text = f"{100 * stat['mean']:+.1f}" + (f" ± {100 * stat['sd']:.1f}" if stat["n"] > 1 else "")
    if "ci95" in stat:
        text += f" (95 % CI {100 * stat['ci95'][0]:+.1f} … {100 * stat['ci95'][1]:+.1f})"
    return text


def markdown(state: dict) -> str:
    p, s, rare = state["protocol"], state["summary"], state["rare_label"]
    arms, pairs = s["arms"], s["paired"]
    ft = p["finetune"]
    n_done, n_req = s["seeds_complete"], s["seeds_requested"]
    status = ("complete" if n_done == n_req and not state["errors"] else
              f"**{n_done} of {n_req} seeds completed** (both arms fine-tuned and scored)")
    lines = [
        "# Do the loop's labels make the better final model? (issue 15, part 2)", "",
        f"{status}. Dataset {p['dataset']}: pool {p['pool']:,}, test {p['test']:,} "
        f"({p['test_split']}, the split of `bench/al_curves.py`).", "",
        f"- **loop arm**: fast-mode rounds replayed by `active_learning.simulate`: {p['initial']} "
        f"{p['cold_start']} cold-start labels, then batches of {p['step']} to {p['budget']} chosen by the "
        f"`strategy` setting `{p['strategy_setting']}` → **`{p['strategy']}`**, fast head refit every round: "
        f"`{state['fast_head']}` on `{state['replay'].get('encoder', '?')}` features.",
        f"- **random arm**: {p['budget']} random pool labels"
        + (f" (the loop arm's first {p['initial']}, then {p['budget'] - p['initial']} more at random)."
           if p["cold_start"] == "random" else ".")
        + (f" Its replay (which chose nothing but gives the fast-mode column) ran on "
           f"`{state['replay_random_arm'].get('encoder', '?')}` features." if state.get("replay_random_arm") else ""),
        f"- **final model** per arm: `{ft['base_model']}` fine-tuned with the product's recipe (epochs "
        f"{ft['epochs']}, min steps {ft['min_steps']}, lr {ft['lr']}, batch {ft['batch_size']}, max_length "
        f"{ft['max_length']}, {ft['class_weighting']} class weights, early stopping on validation macro-F1); "
        f"{100 * p['val_frac']:.0f} % of the arm's own {p['budget']} labels (stratified) are its validation "
        "slice. Both arms of a seed use the same fine-tuning seed; Δ = loop − random, paired by seed.", "",
        f"Machine: {state['machine']['cpus']} CPUs, torch {state['machine']['torch']} "
        f"({state['machine']['torch_threads']} threads), load average at start "
        f"{state['machine']['load_average']} / last save {state.get('load_average_last', '?')} "
        "(shared machine: times are upper bounds).", "",
        f"## Fine-tuned on {p['budget']:,} labels: test scores (mean ± sd over seeds)", "",
        f"| arm | seeds | macro-F1 | {rare} F1 | {rare} labels of {p['budget']:,} | fast-mode head @"
        f"{p['budget']:,}: macro-F1 | fast-mode {rare} F1 | goal (≥ {GOAL['macro_f1']} and {rare} F1 ≥ "
        f"{GOAL['f1_rare']}) |",
        "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        a = arms[arm]
        g = a["goal"]
        verdict = "–" if a["macro_f1"]["n"] == 0 else (
            ("**met**" if g["met"] else "not met") + f": macro-F1 {100 * g['macro_f1_margin']:+.1f} pts, "
            f"{rare} F1 {100 * g['f1_rare_margin']:+.1f} pts")
        lines.append(f"| {arm} | {a['macro_f1']['n']} | **{_fmt(a['macro_f1'])}** | {_fmt(a[f'f1_{rare}'])} | "
                     f"{_fmt(a[f'labeled_{rare}'], 0)} | {_fmt(a['fast_macro_f1'])} | "
                     f"{_fmt(a[f'fast_f1_{rare}'])} | {verdict} |")
    lines += ["", "## Paired difference, loop − random", "",
              "| measure | Δ mean ± sd over seeds | per seed |", "|---|---|---|"]
    for column, title, scale in (("macro_f1", "macro-F1 (points)", 100), (f"f1_{rare}", f"{rare} F1 (points)", 100)):
        d = pairs[column]
        per = ", ".join(f"{d_:+.1f}" for d_ in np.multiply(d["diffs"], scale))
        lines.append(f"| {title} | {_pts(d)} | {per or '–'} |")
    d = pairs[f"labeled_{rare}"]
    lines.append(f"| {rare} labels | {_fmt(d, 0) if d['n'] else '–'} | "
                 + (", ".join(f"{x:+.0f}" for x in d["diffs"]) or "–") + " |")
    lines += ["", "## Per run", "",
              "| seed | arm | " + " | ".join(f"{label} labels" for label in p["labels"])
              + " | macro-F1 | " + " | ".join(f"{label} F1" for label in p["labels"])
              + " | best epoch | steps | train s | eval s |",
              "|---|---|" + "---|" * (2 * len(p["labels"]) + 5)]
    for r in sorted(state["runs"], key=lambda r: (r["seed"], ARMS.index(r["arm"]))):
        lines.append(f"| {r['seed']} | {r['arm']} | "
                     + " | ".join(str(r["label_counts"][label]) for label in p["labels"])
                     + f" | {r['macro_f1']:.4f} | " + " | ".join(f"{r[f'f1_{label}']:.3f}" for label in p["labels"])
                     + f" | {r['best_epoch']} | {r['steps']} | {r['train_seconds']:.0f} | "
                       f"{r['test_eval_seconds']:.0f} |")
    if state["errors"]:
        lines += ["", "## Runs that failed", ""] + [f"- seed {e['seed']} {e['arm']}: {e['error']}"
                                                    for e in state["errors"]]
    lines += ["", "## References (Davidson test split)", "",
              f"| model | labels | macro-F1 | {rare} F1 | split |", "|---|---|---|---|---|"]
    for ref in state["references"]:
        labels = f"{ref['labels']:,}" if ref["labels"] else "all"
        f1r = "–" if ref["f1_rare"] is None else f"{ref['f1_rare']:.3f}"
        lines.append(f"| {ref['model']} | {labels} | {ref['macro_f1']:.3f} | {f1r} | {ref['split']} |")
    lines += ["", f"Goal of issue 15: ≥ {GOAL['macro_f1']} macro-F1 with {rare} F1 ≥ {GOAL['f1_rare']} using ≤ "
              f"{GOAL['max_labels']:,} labels; margins above are arm means minus the goal.", "",
              "Reproduce (resumes from this file; runs no seed twice):", "",
              f"    {state['command']}", ""]
    return "\n".join(lines)


def references(rare: str) -> list[dict]:
    """The note's references, plus the product recipe on all training labels if that benchmark ran."""
    refs = [dict(r) for r in NOTE_REFERENCES]
    try:
        full = json.loads((RESULTS / "train_davidson.json").read_text())
        test = full["finetune"]["test"]
        refs.insert(0, {"model": "MiniLM fine-tuned with the product's recipe on all training labels "
                                 "(bench/results/train_davidson.json)", "labels": full["sizes"]["train"],
                        "macro_f1": test["macro_f1"], "f1_rare": test["per_class"][rare]["f1"],
                        "split": "other (data.split seed 13)"})
    except (OSError, KeyError, ValueError):
        pass  # a missing or older result file only drops one reference row
    return refs


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="davidson")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--initial", type=int, default=100)
    ap.add_argument("--step", type=int, default=100)
    ap.add_argument("--cold-start", choices=("random", "kmeans"), default="random",
                    help="the loop arm's first labels: random (default) is al_curves' classic protocol and "
                         "gives both arms the same first labels; kmeans is the live loop's cold start, whose "
                         "k-means over the 20k pool costs minutes per seed on two busy cores")
    ap.add_argument("--val-frac", type=float, default=0.1, help="share of each arm's labels for validation")
    ap.add_argument("--rows", type=int, default=0, help="a stratified slice of the dataset (smoke runs)")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (smoke runs)")
    ap.add_argument("--min-steps", type=int, default=None, help="override the recipe's step floor (smoke runs)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default: the settings')")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep the finished runs of --out's JSON")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="run only these arms (comma-separated): two processes, one per arm, may share --out")
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: start no run that would end after it")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.budget < args.initial or args.initial < 1 or args.step < 1:
        ap.error("need --seeds >= 1, 1 <= --initial <= --budget and --step >= 1")
    if not 0 < args.val_frac < 0.5:
        ap.error("--val-frac must lie in (0, 0.5)")
    args.arms = tuple(a.strip() for a in args.arms.split(","))
    if not args.arms or set(args.arms) - set(ARMS):
        ap.error(f"--arms must name some of {', '.join(ARMS)}")
    if args.deadline is not None:
        try:
            hh, mm = (int(x) for x in args.deadline.split(":"))
            now = datetime.now(UTC)
            args.deadline_at = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
        except ValueError:
            ap.error(f"--deadline must be HH:MM, not {args.deadline!r}")
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = ["nice -n 5 .venv/bin/python bench/al_transfer.py", f"--seeds {args.seeds}"]
    defaults = parse_args([])
    for name in ("dataset", "budget", "initial", "step", "cold_start", "val_frac", "rows", "epochs", "min_steps"):
        if getattr(args, name) != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    if args.out.resolve() != RESULTS.resolve():
        parts.append(f"--out {args.out}")
    return " ".join(parts + ["--resume"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    try:
        labeled = load_data(args, settings)
        pool, test = pool_and_test(labeled)
        if len(pool) < args.budget:
            raise data.DataError(f"budget {args.budget} exceeds the pool ({len(pool)} items)")
        proto = protocol(args, settings, labeled, pool, test)
    except (data.DataError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{STEM}.json"
    try:
        previous = load_previous(json_path, proto) if args.resume else None
        if not args.resume:  # an earlier run's results must not mix with this one's (save merges the file)
            json_path.unlink(missing_ok=True)
    except (ProtocolMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rare = rare_label(proto["labels"], pool)
    seeds = list(range(args.seeds))
    state = {"benchmark": "al_transfer", "protocol": proto, "rare_label": rare, "seeds": seeds,
             "machine": (previous or {}).get("machine") or machine(),
             "command": command_line(args), "goal": GOAL, "references": references(rare),
             "runs": (previous or {}).get("runs", []), "errors": [],
             "replay": (previous or {}).get("replay", {}), "fast_head": (previous or {}).get("fast_head", "")}
    done = {(r["seed"], r["arm"]) for r in state["runs"]}
    todo = [(seed, arm) for seed in seeds for arm in ARMS if (seed, arm) not in done and arm in args.arms]
    log(f"{labeled.source}: pool {len(pool):,}, test {len(test):,}; strategy {settings.strategy!r} → "
        f"{proto['strategy']!r}; {len(done)} runs already done, {len(todo)} to go")
    if not todo:
        save(state, args.out)
        return 0

    slowest, checked = 0.0, False
    for seed, arm in todo:
        if args.deadline is not None and time.time() + slowest > args.deadline_at:
            log(f"deadline {args.deadline}: not starting seed {seed} {arm} (the slowest run took {slowest:.0f} s)")
            break
        t0 = time.perf_counter()
        try:
            log(f"seed {seed} {arm}: replaying fast-mode rounds")
            chosen, fast, config = choose_labels(labeled, arm, seed, args, settings)
            if not checked:  # both arms' replays use the same head: the first one tells
                replay = {k: config[k] for k in ("C", "encoder", "head") if k in config}
                head = fast_head(labeled.taxonomy, replay["C"], replay.get("encoder", settings.base_model),
                                 settings.max_length)
                if previous and (previous.get("replay"), previous.get("fast_head")) != (replay, head):
                    raise ProtocolMismatch(f"{json_path} was made with fast-mode rounds {previous.get('replay')} "
                                           f"/ {previous.get('fast_head')}, these would use {replay} / {head}; "
                                           "rerun without --resume to start over, or with another --out")
                state["replay"], state["fast_head"], checked = replay, head, True
        except (data.DataError, OSError, ValueError, ProtocolMismatch) as exc:
            print(f"error: choosing labels failed: {exc}", file=sys.stderr)
            return 2
        try:
            state["runs"].append(run_one(arm, seed, chosen, fast, pool, test, labeled, args, settings))
        except Exception as exc:  # one failed fine-tune must not lose the others: record it, go on
            log(f"seed {seed} {arm}: failed: {type(exc).__name__}: {exc}")
            state["errors"].append({"seed": seed, "arm": arm, "error": f"{type(exc).__name__}: {exc}"})
        slowest = max(slowest, time.perf_counter() - t0)
        state["load_average_last"] = [round(x, 2) for x in os.getloadavg()]
        save(state, args.out)
    save(state, args.out)
    s = state["summary"]
    log(f"{s['seeds_complete']} of {s['seeds_requested']} seeds complete; wrote {args.out / STEM}.{{json,md}}")
    return 1 if state["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
