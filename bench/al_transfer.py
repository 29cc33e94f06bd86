"""Do the labels the loop chose make the better *final* model? Fine-tune the default model on them and
on as many random labels, paired by seed, with the product's recipe and with the recipe levers.

    nice -n 5 .venv/bin/python bench/al_transfer.py --seeds 5 --resume        # the full run, resumable
    .venv/bin/python bench/al_transfer.py --seeds 1 --rows 600 --budget 100 --initial 20 --step 20 \\
        --epochs 1 --min-steps 0 --out /tmp/al_transfer                         # a smoke run, seconds
    .venv/bin/python bench/al_transfer.py --seeds 5 --choose-only              # the replays alone (CPU)
    python3 bench/al_transfer.py --seeds 5 --recipes default,sqrt_e2,balanced_e6 --device cuda \\
        --model-path /tmp/minilm --only-seeds 0                                  # fine-tunes on a GPU machine

The loop arm is an offline replay of fast-mode rounds exactly as ``active_learning.simulate`` runs them
(frozen-encoder head refit every round, batches of ``--step`` to ``--budget``) after ``--initial`` random
labels, the classic arms' start in ``bench/al_curves.py``: the random arm starts from the same ones, so a
seed's two arms differ only in what the strategy chose (``--cold-start kmeans``: the live loop's start),
with the query strategy the ``strategy`` setting names (``auto`` by default, resolved by
``parse_strategy`` for the taxonomy's kind): a later rerun measures whatever the default has become, and
the results record which strategy and head were used. The random arm labels ``--budget`` random pool
items (the same replay with the ``random`` strategy and a random start). Each replay's chosen pool rows
are kept under ``--choices-dir`` (git-ignored ``var/``), so the fine-tunes can run elsewhere (a GPU
machine without the embedding cache or MLflow) on exactly the labels a CPU replay chose.

Both arms then fine-tune ``base_model`` on their labels only: the validation slice is carved out of the
same ``--budget`` labels, because a team that bought 2,000 labels has no others to validate on. Both arms
of a seed share the fine-tuning seed, so the paired difference is about the labels, not the
initialisation. ``--recipes`` names the fine-tune recipes to run: ``default`` is the product's
(``FineTuneConfig`` defaults, ``DEFAULT_MIN_STEPS``: what ``labelloop train`` does today, decision rule
included); the lever recipes (:data:`LEVER_RECIPES`) pin class weighting, epochs and patience explicitly
and decide by argmax, and every offline decision rule (:data:`OFFLINE_RULES`) is scored on their saved
validation and test probabilities (npz under ``--proba-dir``), so decision rules need no retraining.

The test split is ``al_curves``'s (``pool_and_test``: Davidson stratified 20 %), never seen by either arm.

Each finished (seed, arm, recipe) is written to the JSON at once (and the Markdown rewritten), so an
interrupted run keeps its results and ``--resume`` continues where it stopped; a failed fine-tune is
recorded and the run goes on. Processes that share ``--out`` (one per seed on a GPU machine) merge their
runs. ``--deadline HH:MM`` (UTC) starts no run that would not finish by then, judged by the slowest
finished one.
"""

from __future__ import annotations

import argparse
import hashlib
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
from training.evaluate import evaluate_proba, score_proba, true_labels  # noqa: E402
from training.finetune import (  # noqa: E402
    DEFAULT_MIN_STEPS,
    FineTuneConfig,
    decide_with_offsets,
    decision_offsets,
    finetune,
)

RESULTS = REPO / "bench" / "results"
STEM = "al_transfer"
ARMS = ("loop", "random")
DEFAULT_RECIPE = "default"
#: the fine-tune levers of issue 15, each recipe pinning every lever so that it means the same thing
#: whatever the product's defaults become; all decide by argmax, the decision rules are scored offline
LEVER_RECIPES: dict[str, dict] = {
    "sqrt_e2": {"class_weighting": "sqrt", "epochs": 2, "patience": 1, "decision_rule": "argmax"},
    "balanced_e2": {"class_weighting": "balanced", "epochs": 2, "patience": 1, "decision_rule": "argmax"},
    "sqrt_e6": {"class_weighting": "sqrt", "epochs": 6, "patience": 2, "decision_rule": "argmax"},
    "balanced_e6": {"class_weighting": "balanced", "epochs": 6, "patience": 2, "decision_rule": "argmax"},
    "sqrt_e10": {"class_weighting": "sqrt", "epochs": 10, "patience": 3, "decision_rule": "argmax"},
    "balanced_e10": {"class_weighting": "balanced", "epochs": 10, "patience": 3, "decision_rule": "argmax"},
}
#: the lever table's reference: the recipe the product shipped before these levers were measured
BASELINE = ("sqrt_e2", "argmax")
#: decision rules scored on an argmax recipe's saved probabilities: (rule, shrink toward argmax)
OFFLINE_RULES: dict[str, tuple[str, float]] = {
    "argmax": ("argmax", 1.0), "offsets": ("offsets", 1.0), "offsets x0.5": ("offsets", 0.5),
    "bagged_offsets": ("bagged_offsets", 1.0), "bagged_offsets x0.5": ("bagged_offsets", 0.5),
}
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


def finetune_config(args: argparse.Namespace, settings: Settings, seed: int,
                    recipe: str = DEFAULT_RECIPE) -> FineTuneConfig:
    """``recipe``'s fine-tune config (``default``: the product's, what ``labelloop train --mode finetune``
    uses), seeded per benchmark seed, loading weights from ``--model-path`` when given; ``--epochs`` /
    ``--min-steps`` override it only for smoke runs."""
    config = FineTuneConfig(base_model=args.model_path or settings.base_model, max_length=settings.max_length,
                            seed=seed, min_steps=DEFAULT_MIN_STEPS, device=args.device or settings.device,
                            **LEVER_RECIPES.get(recipe, {}))
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.min_steps is not None:
        config.min_steps = args.min_steps
    config.__post_init__()  # the overrides are checked like any config
    return config


def recipe_record(args: argparse.Namespace, settings: Settings, recipe: str, multi_label: bool) -> dict:
    """What a run of ``recipe`` is, seed and device aside: rows whose record differs (the product's
    default changed since) are not the same runs and are redone on ``--resume``. The model is named as
    the settings name it, wherever its weights were loaded from (``--model-path``), and the class
    weighting as the taxonomy's kind resolves it."""
    config = finetune_config(args, settings, 0, recipe)
    record = asdict(config)
    for key in ("seed", "device"):
        record.pop(key)
    record["base_model"] = settings.base_model
    record["class_weighting"] = config.weighting(multi_label)
    return record


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
    return {"dataset": labeled.source, "rows": len(labeled), "pool": len(pool), "test": len(test),
            "test_split": "active_learning.simulate.pool_and_test(split_seed=0)", "budget": args.budget,
            "initial": args.initial, "step": args.step, "cold_start": args.cold_start,
            "strategy_setting": settings.strategy, "strategy": resolved.spec, "val_frac": args.val_frac,
            "labels": list(labeled.taxonomy.labels)}


def rare_label(labels: list[str], pool: pd.DataFrame) -> str:
    counts = pool["label"].value_counts()
    return min(labels, key=lambda label: counts.get(label, 0))


def choices_path(args: argparse.Namespace, settings: Settings, proto: dict, arm: str, seed: int) -> Path:
    """Where ``choose_labels`` keeps an arm's replay: named by everything the replay depends on."""
    key = {k: proto[k] for k in ("dataset", "rows", "pool", "budget", "initial", "step", "cold_start", "strategy")}
    key.update(encoder=settings.base_model, max_length=settings.max_length,
               ngrams=getattr(settings, "fast_ngram_features", 0))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return args.choices_dir / f"{proto['dataset']}-{digest}-seed{seed}-{arm}.json"


def choose_labels(labeled: data.LabeledData, pool: pd.DataFrame, arm: str, seed: int, args: argparse.Namespace,
                  settings: Settings, proto: dict) -> tuple[np.ndarray, dict, dict]:
    """The pool rows the arm labels for ``seed``, the fast-mode model's test scores at the budget, and the
    replay's record (C, encoder, head), from ``--choices-dir`` when a replay of the same protocol left them
    there. The random arm takes its ``budget - initial`` random labels in one batch: the same set as
    batches of ``step`` would give, without refitting a head per batch that chooses nothing (those refits
    cost minutes per seed on two busy cores)."""
    path = choices_path(args, settings, proto, arm, seed)
    if path.exists():
        kept = json.loads(path.read_text())
        # by id, not position: another machine's pandas or sklearn may order the same pool differently
        position = pd.Series(np.arange(len(pool)), index=pool["id"].astype(str))
        missing = [i for i in kept["ids"] if i not in position.index]
        if missing:
            raise ProtocolMismatch(f"{path} names {len(missing)} items this pool lacks (e.g. {missing[0]!r}); "
                                   "delete it to replay")
        return position.loc[kept["ids"]].to_numpy(dtype=np.int64), kept["fast"], kept["replay"]
    spec, cold_start, step = ((settings.strategy, args.cold_start, args.step) if arm == "loop"
                              else ("random", "random", max(1, args.budget - args.initial)))
    result = simulate(labeled, [spec], [seed], args.budget, step, args.initial, settings=settings,
                      cold_start=cold_start, cache_dir=args.cache_dir, log_to_mlflow=False)
    last = result.curves[result.curves["n_labels"] == result.curves["n_labels"].max()].iloc[0]
    labels = labeled.taxonomy.labels
    fast = {"macro_f1": float(last["macro_f1"]), **{f"f1_{label}": float(last[f"f1_{label}"]) for label in labels},
            **{f"labeled_{label}": int(last[f"labeled_{label}"]) for label in labels}}
    chosen = np.asarray(result.labeled[(spec, seed)], dtype=np.int64)
    replay = {k: result.config[k] for k in ("C", "encoder", "head") if k in result.config}
    replay["fast_head"] = fast_head(labeled.taxonomy, replay["C"], replay.get("encoder", settings.base_model),
                                    settings.max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"positions": chosen.tolist(), "ids": pool.iloc[chosen]["id"].astype(str).tolist(),
                                   "fast": fast, "replay": replay}, default=str))
    return chosen, fast, replay


def split_labels(frame: pd.DataFrame, val_frac: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation parts of an arm's labels, stratified when every class has two items."""
    strata = frame["label"] if frame["label"].value_counts().min() >= 2 else None
    train, val = train_test_split(frame, test_size=val_frac, random_state=seed, stratify=strata)
    return train.reset_index(drop=True), val.reset_index(drop=True)


def device_name(classifier) -> str:
    """The device a run fine-tuned on, in words: results from a GPU machine and from the CPU sit side by
    side in one table."""
    import torch

    device = torch.device(classifier.device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def rule_scores(val_proba: np.ndarray, val_y: np.ndarray, test_proba: np.ndarray, test_y: np.ndarray,
                labels: list[str], seed: int) -> dict:
    """Test macro-F1 and per-class F1 under each offline decision rule, its offsets tuned on the arm's own
    validation slice only."""
    out = {}
    for name, (rule, shrink) in OFFLINE_RULES.items():
        offsets = decision_offsets(val_proba, val_y, len(labels), rule, shrink, seed)
        # the decided ids as one-hot "probabilities": evaluate_proba scores exactly those decisions
        decided = np.eye(len(labels))[decide_with_offsets(test_proba, offsets)]
        report = evaluate_proba(decided, test_y, labels)
        out[name] = {"macro_f1": report.macro_f1, **{f"f1_{label}": report.per_class[label]["f1"] for label in labels},
                     "offsets": [round(float(x), 4) for x in offsets]}
    return out


def run_one(arm: str, seed: int, recipe: str, chosen: np.ndarray, fast: dict, pool: pd.DataFrame,
            test: pd.DataFrame, labeled: data.LabeledData, args: argparse.Namespace, settings: Settings) -> dict:
    labels = list(labeled.taxonomy.labels)
    frame = pool.iloc[chosen][["id", "text", "label"]].reset_index(drop=True)
    train, val = split_labels(frame, args.val_frac, seed)
    config = finetune_config(args, settings, seed, recipe)
    log(f"seed {seed} {arm} {recipe}: fine-tuning on {len(train)} + validating on {len(val)} "
        f"({dict(frame['label'].value_counts())})")
    result = finetune(train, val, labeled.taxonomy, config)
    classifier = result.classifier
    t0 = time.perf_counter()
    test_proba = classifier.predict_proba(test["text"].tolist())
    eval_seconds = time.perf_counter() - t0
    test_y = true_labels(classifier, test["label"])
    report = score_proba(classifier, test_proba, test_y)
    row = {"seed": seed, "arm": arm, "recipe": recipe,
           "finetune": recipe_record(args, settings, recipe, labeled.taxonomy.multi),
           "device": device_name(classifier), "n_labels": len(frame), "n_train": len(train), "n_val": len(val),
           "label_counts": {label: int((frame["label"] == label).sum()) for label in labels},
           "macro_f1": report.macro_f1, "accuracy": report.accuracy,
           **{f"f1_{label}": report.per_class[label]["f1"] for label in labels},
           "per_class": report.per_class, "best_epoch": result.best_epoch,
           "best_val_macro_f1": result.best_val_macro_f1, "epochs_planned": result.epochs,
           "steps": int(result.history[-1]["step"]) if result.history else 0,
           "decision_offsets": result.decision_offsets,
           "train_seconds": round(result.seconds, 1), "test_eval_seconds": round(eval_seconds, 1),
           "fast_mode_at_budget": fast, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if not classifier.multi_label and config.decision_rule == "argmax":  # raw probabilities: rules apply
        val_proba = classifier.predict_proba(val["text"].tolist())
        val_y = true_labels(classifier, val["label"])
        row["rules"] = rule_scores(val_proba, val_y, test_proba, test_y, labels, seed)
        if args.proba_dir is not None:
            args.proba_dir.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.proba_dir / f"{recipe}-seed{seed}-{arm}.npz", val_proba=val_proba,
                                val_y=val_y, test_proba=test_proba, test_y=test_y, labels=np.asarray(labels))
    log(f"seed {seed} {arm} {recipe}: macro-F1 {report.macro_f1:.4f}, " + ", ".join(
        f"{label} F1 {report.per_class[label]['f1']:.3f}" for label in labels)
        + f" (train {result.seconds:.0f} s, eval {eval_seconds:.0f} s, {row['device']})")
    return row


# --------------------------------------------------------------------------------------------------
# Results: JSON written after every run, Markdown rendered from it
# --------------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def run_key(row: dict) -> tuple:
    """A run's identity: rows written before recipes existed are the product default's."""
    return row["seed"], row["arm"], row.get("recipe", DEFAULT_RECIPE)


def default_runs(runs: list[dict], expected: dict | None) -> list[dict]:
    """The product recipe's runs: those named ``default``, and a lever recipe's runs wherever the lever
    is exactly what the product's default has become (same record), one per (seed, arm), a ``default``
    row first: a run is what it trained with, not what it was called."""
    target = (expected or {}).get(DEFAULT_RECIPE)
    chosen: dict[tuple, dict] = {}
    for row in sorted(runs, key=lambda r: r.get("recipe", DEFAULT_RECIPE) != DEFAULT_RECIPE):
        if row.get("recipe", DEFAULT_RECIPE) == DEFAULT_RECIPE or (target and row.get("finetune") == target):
            chosen.setdefault((row["seed"], row["arm"]), row)
    return list(chosen.values())


def is_current(row: dict, expected: dict | None) -> bool:
    """Whether ``row`` was fine-tuned with the recipe its name stands for now (``expected``: recipe →
    record); a ``default`` run made before the product's default changed is not."""
    if not expected:
        return True
    recipe = row.get("recipe", DEFAULT_RECIPE)
    return recipe in expected and row.get("finetune") == expected[recipe]


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
    """Write the JSON and Markdown, first taking in the runs another process (``--arms``, ``--only-seeds``,
    same ``--out``) finished meanwhile under the same protocol and recipes; a lock keeps two savers from
    losing each other's runs."""
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
            expected = state.get("expected")
            mine = {run_key(r) for r in state["runs"]}
            state["runs"] += [r for r in on_disk.get("runs", []) if run_key(r) not in mine and is_current(r, expected)]
            failed = {run_key(e) for e in state["errors"]}
            state["errors"] += [e for e in on_disk.get("errors", []) if run_key(e) not in failed
                                and run_key(e) not in mine]
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


def lever_table(runs: list[dict], rare: str) -> list[dict]:
    """Per (recipe, decision rule): each arm's mean ± sd of test macro-F1 and rare-class F1 over seeds, and
    the paired difference from :data:`BASELINE` on the same seed and arm (same labels, same fine-tune
    seed), pooled over both arms. ``keeps_macro_raises_rare``: the mean differences say it raises
    rare-class F1 without costing macro-F1, the bar a lever must clear to become the product's default."""
    scored = {(r["recipe"], rule, r["arm"], r["seed"]): v for r in runs if r.get("recipe") in LEVER_RECIPES
              for rule, v in r.get("rules", {}).items()}
    rows = []
    for recipe in LEVER_RECIPES:
        for rule in OFFLINE_RULES:
            mine = {(a, s): v for (rc, ru, a, s), v in scored.items() if (rc, ru) == (recipe, rule)}
            if not mine:
                continue
            row = {"recipe": recipe, "rule": rule, "arms": {}}
            for arm in ARMS:
                cells = [v for (a, _), v in sorted(mine.items()) if a == arm]
                row["arms"][arm] = {"macro_f1": _mean_sd([c["macro_f1"] for c in cells]),
                                    f"f1_{rare}": _mean_sd([c[f"f1_{rare}"] for c in cells])}
            pairs = [(v, scored[(*BASELINE, a, s)]) for (a, s), v in mine.items() if (*BASELINE, a, s) in scored]
            for column in ("macro_f1", f"f1_{rare}"):
                row[f"delta_{column}"] = _mean_sd([v[column] - b[column] for v, b in pairs])
            row["keeps_macro_raises_rare"] = bool(pairs) and row["delta_macro_f1"]["mean"] >= 0 \
                and row[f"delta_f1_{rare}"]["mean"] > 0
            rows.append(row)
    return rows


def summarise(state: dict) -> dict:
    rare = state["rare_label"]
    all_runs = state["runs"]
    runs = default_runs(all_runs, state.get("expected"))
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
    return {"arms": arms, "paired": pairs, "seeds_complete": complete, "seeds_requested": len(state["seeds"]),
            "levers": lever_table(all_runs, rare)}


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


def describe_recipe(ft: dict) -> str:
    rule = ft.get("decision_rule", "argmax")
    if rule != "argmax" and ft.get("offset_shrink", 1.0) != 1.0:
        rule += f" x{ft['offset_shrink']:g}"
    return (f"epochs {ft.get('epochs')}, patience {ft.get('patience')}, min steps {ft.get('min_steps')}, "
            f"lr {ft.get('lr')}, batch {ft.get('batch_size')}, max_length {ft.get('max_length')}, "
            f"{ft.get('class_weighting')} class weights, decision rule {rule}")


def lever_markdown(state: dict) -> list[str]:
    rows, rare = state["summary"].get("levers", []), state["rare_label"]
    if not rows:
        return []
    base = " / ".join(BASELINE)
    lines = ["", "## Levers: recipe × decision rule (test scores, mean ± sd over seeds)", "",
             "Recipes pin every lever (" + "; ".join(f"`{name}`: " + ", ".join(f"{k} {v}" for k, v in rc.items()
                                                                        if k != "decision_rule")
                                                     for name, rc in LEVER_RECIPES.items())
             + f"; min steps {DEFAULT_MIN_STEPS}, the rest as the product's). Each trains once and decides by "
             "argmax; each decision rule is then applied to its saved probabilities, the offsets tuned on the "
             "arm's own validation slice only (`offsets`: coordinate ascent on macro-F1; `bagged_offsets`: the "
             "mean over bootstrap resamples of the slice; `x0.5`: halved toward argmax). Δ: paired with "
             f"`{base}` (the product's recipe before this change) on the same seed and arm, pooled over both "
             f"arms, in points; ✓: raises {rare} F1 without costing macro-F1 on average.", "",
             f"| recipe | rule | loop macro-F1 | loop {rare} F1 | random macro-F1 | random {rare} F1 | "
             f"Δ macro-F1 | Δ {rare} F1 | ✓ |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["arms"]
        lines.append(f"| {r['recipe']} | {r['rule']} | {_fmt(a['loop']['macro_f1'])} | "
                     f"{_fmt(a['loop'][f'f1_{rare}'])} | {_fmt(a['random']['macro_f1'])} | "
                     f"{_fmt(a['random'][f'f1_{rare}'])} | "
                     f"{_pts(r['delta_macro_f1'])} | {_pts(r[f'delta_f1_{rare}'])} | "
                     f"{'✓' if r['keeps_macro_raises_rare'] else ''} |")
    return lines


def markdown(state: dict) -> str:
    p, s, rare = state["protocol"], state["summary"], state["rare_label"]
    arms, pairs = s["arms"], s["paired"]
    ft = state.get("expected", {}).get(DEFAULT_RECIPE) or p.get("finetune", {})
    devices = sorted({r["device"] for r in state["runs"] if r.get("device")})
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
        f"- **final model** per arm: `{ft.get('base_model', '?')}` fine-tuned with the product's recipe "
        f"(`{DEFAULT_RECIPE}`: {describe_recipe(ft)}, early stopping on validation macro-F1); "
        f"{100 * p['val_frac']:.0f} % of the arm's own {p['budget']} labels (stratified) are its validation "
        "slice. Both arms of a seed use the same fine-tuning seed; Δ = loop − random, paired by seed.", "",
        f"Machine: {state['machine']['cpus']} CPUs"
        + (f", {state['machine']['gpu']}" if state["machine"].get("gpu") else "")
        + f", torch {state['machine']['torch']} "
        f"({state['machine']['torch_threads']} threads), load average at start "
        f"{state['machine']['load_average']} / last save {state.get('load_average_last', '?')} "
        "(shared machine: times are upper bounds). Fine-tuned on: " + ("; ".join(devices) or "–") + ".",
        *[f"- {note}" for note in state.get("notes", [])], "",
        f"## Product recipe, fine-tuned on {p['budget']:,} labels: test scores (mean ± sd over seeds)", "",
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
    lines += lever_markdown(state)
    lines += ["", f"## Per run (product recipe `{DEFAULT_RECIPE}`; a lever's runs where its recipe is exactly the "
              "product's)", "",
              "| seed | arm | run | " + " | ".join(f"{label} labels" for label in p["labels"])
              + " | macro-F1 | " + " | ".join(f"{label} F1" for label in p["labels"])
              + " | best epoch | steps | train s | eval s | device |",
              "|---|---|---|" + "---|" * (2 * len(p["labels"]) + 6)]
    product = default_runs(state["runs"], state.get("expected"))
    for r in sorted(product, key=lambda r: (r["seed"], ARMS.index(r["arm"]))):
        lines.append(f"| {r['seed']} | {r['arm']} | {r.get('recipe', DEFAULT_RECIPE)} | "
                     + " | ".join(str(r["label_counts"][label]) for label in p["labels"])
                     + f" | {r['macro_f1']:.4f} | " + " | ".join(f"{r[f'f1_{label}']:.3f}" for label in p["labels"])
                     + f" | {r['best_epoch']} | {r['steps']} | {r['train_seconds']:.0f} | "
                       f"{r['test_eval_seconds']:.0f} | {r.get('device', '?')} |")
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
    """The note's references, plus a fine-tune on all training labels if that benchmark ran, named by the
    recipe it ran with (not necessarily today's)."""
    refs = [dict(r) for r in NOTE_REFERENCES]
    try:
        full = json.loads((RESULTS / "train_davidson.json").read_text())
        test = full["finetune"]["test"]
        cfg = full["finetune"].get("config", {})
        recipe = ", ".join(f"{k} {cfg[k]}" for k in ("epochs", "patience", "class_weighting") if k in cfg)
        refs.insert(0, {"model": f"MiniLM fine-tuned on all training labels ({recipe}; "
                                 "bench/results/train_davidson.json)", "labels": full["sizes"]["train"],
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
    ap.add_argument("--choices-dir", type=Path, default=REPO / "var" / "bench" / STEM / "choices",
                    help="where each replay's chosen pool rows are kept and reused")
    ap.add_argument("--proba-dir", type=Path, default=REPO / "var" / "bench" / STEM / "proba",
                    help="validation and test probabilities of every argmax run (npz), for offline rules")
    ap.add_argument("--recipes", default=DEFAULT_RECIPE,
                    help=f"fine-tune recipes, comma-separated: {DEFAULT_RECIPE} (the product's) and/or "
                         f"{', '.join(LEVER_RECIPES)}, or 'levers' for all of those")
    ap.add_argument("--only-seeds", default=None, help="run only these of the seeds (comma-separated): "
                                                       "one process per seed may share --out")
    ap.add_argument("--choose-only", action="store_true", help="replay and keep the choices, fine-tune nothing")
    ap.add_argument("--device", default=None, help="fine-tune on this device (default: the settings')")
    ap.add_argument("--model-path", default=None,
                    help="load the base model's weights from here (a copy of the settings' base_model)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results (repeatable)")
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
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    recipes = [x for r in recipes for x in (LEVER_RECIPES if r == "levers" else [r])]
    unknown = sorted(set(recipes) - {DEFAULT_RECIPE, *LEVER_RECIPES})
    if not recipes or unknown:
        ap.error(f"--recipes must name some of {DEFAULT_RECIPE}, {', '.join(LEVER_RECIPES)}, levers"
                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    args.recipes = tuple(dict.fromkeys(recipes))
    try:
        args.only_seeds = None if args.only_seeds is None else sorted({int(x) for x in args.only_seeds.split(",")})
    except ValueError:
        ap.error(f"--only-seeds must be comma-separated integers, not {args.only_seeds!r}")
    if args.only_seeds is not None and not set(args.only_seeds) <= set(range(args.seeds)):
        ap.error(f"--only-seeds must lie in 0 .. {args.seeds - 1}")
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
    if args.recipes != defaults.recipes:
        parts.append(f"--recipes {','.join(args.recipes)}")
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
        if not args.resume and not args.choose_only:  # an earlier run's results must not mix with this one's
            json_path.unlink(missing_ok=True)
    except (ProtocolMismatch, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rare = rare_label(proto["labels"], pool)
    seeds = list(range(args.seeds))
    expected = {name: recipe_record(args, settings, name, labeled.taxonomy.multi)
                for name in (DEFAULT_RECIPE, *LEVER_RECIPES)}
    kept = [r for r in (previous or {}).get("runs", []) if is_current(r, expected)]
    state = {"benchmark": "al_transfer", "protocol": proto, "rare_label": rare, "seeds": seeds,
             "machine": (previous or {}).get("machine") or machine(), "expected": expected,
             "notes": list(dict.fromkeys([*(previous or {}).get("notes", []), *args.note])),
             "command": command_line(args), "goal": GOAL, "references": references(rare),
             "runs": kept, "errors": [],
             "replay": (previous or {}).get("replay", {}), "fast_head": (previous or {}).get("fast_head", "")}
    done = {run_key(r) for r in state["runs"]} | {(r["seed"], r["arm"], DEFAULT_RECIPE)
                                                  for r in default_runs(state["runs"], expected)}
    mine = [seed for seed in seeds if args.only_seeds is None or seed in args.only_seeds]
    todo = [(seed, arm, recipe) for seed in mine for arm in ARMS for recipe in args.recipes
            if (seed, arm, recipe) not in done and arm in args.arms]
    log(f"{labeled.source}: pool {len(pool):,}, test {len(test):,}; strategy {settings.strategy!r} → "
        f"{proto['strategy']!r}; {len(state['runs'])} runs already done, {len(todo)} to go")
    if not todo and not args.choose_only:
        save(state, args.out)
        return 0

    slowest, chosen_for = 0.0, {}
    pairs = list(dict.fromkeys((seed, arm) for seed, arm, _ in todo)) if not args.choose_only else \
        [(seed, arm) for seed in mine for arm in ARMS if arm in args.arms]
    for seed, arm in pairs:
        try:
            log(f"seed {seed} {arm}: replaying fast-mode rounds (or reading the kept replay)")
            chosen_for[(seed, arm)] = chosen, fast, replay = choose_labels(labeled, pool, arm, seed, args, settings,
                                                                           proto)
        except (data.DataError, OSError, ValueError, ProtocolMismatch) as exc:
            print(f"error: choosing labels failed: {exc}", file=sys.stderr)
            return 2
        record = {k: replay[k] for k in ("C", "encoder", "head") if k in replay}
        if not state["replay"]:
            state["replay"], state["fast_head"] = record, replay.get("fast_head", "")
        elif (state["replay"], state["fast_head"]) != (record, replay.get("fast_head", "")):
            print(f"error: {json_path} was made with fast-mode rounds {state['replay']} / {state['fast_head']}, "
                  f"seed {seed} {arm} with {record} / {replay.get('fast_head')}; rerun without --resume to start "
                  "over, or with another --out", file=sys.stderr)
            return 2
        if args.choose_only:
            continue
        for _, _, recipe in [t for t in todo if t[:2] == (seed, arm)]:
            if args.deadline is not None and time.time() + slowest > args.deadline_at:
                log(f"deadline {args.deadline}: not starting seed {seed} {arm} {recipe} "
                    f"(the slowest run took {slowest:.0f} s)")
                break
            t0 = time.perf_counter()
            try:
                state["runs"].append(run_one(arm, seed, recipe, chosen, fast, pool, test, labeled, args, settings))
            except Exception as exc:  # one failed fine-tune must not lose the others: record it, go on
                log(f"seed {seed} {arm} {recipe}: failed: {type(exc).__name__}: {exc}")
                state["errors"].append({"seed": seed, "arm": arm, "recipe": recipe,
                                        "error": f"{type(exc).__name__}: {exc}"})
            slowest = max(slowest, time.perf_counter() - t0)
            state["load_average_last"] = [round(x, 2) for x in os.getloadavg()]
            save(state, args.out)
    if args.choose_only:
        log(f"kept {len(chosen_for)} replays under {args.choices_dir}")
        return 0
    save(state, args.out)
    s = state["summary"]
    log(f"{s['seeds_complete']} of {s['seeds_requested']} seeds complete; wrote {args.out / STEM}.{{json,md}}")
    return 1 if state["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
