"""Full-data Davidson benchmark of both training modes, on the CPU.

    nice -n 5 .venv/bin/python bench/train_davidson.py            # both modes, ~30-40 min on 2 cores
    .venv/bin/python bench/train_davidson.py --skip-finetune       # fast mode only (keeps the last fine-tune result)
    .venv/bin/python bench/train_davidson.py --pilot-rows 4000 --lr 1e-4   # choose a config on validation

Split: ``data.split(seed=13)`` of the de-duplicated data (70 / 10 / 20, stratified). Fine-tuning early-stops
on validation macro-F1; fast mode picks its regularisation C on validation. Only the final models see the
test split. Writes ``bench/results/train_davidson.{json,md}`` (pilot runs print and write nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from labelloop import data  # noqa: E402
from labelloop.config import DEFAULT_BASE_MODEL, Settings  # noqa: E402
from training.classifier import load_encoder  # noqa: E402
from training.evaluate import EvalReport, evaluate, evaluate_proba, report_text  # noqa: E402
from training.fast import DEFAULT_C, EmbeddingCache, fit_head  # noqa: E402
from training.finetune import FineTuneConfig, finetune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
PUBLISHED = {"model": "DistilBERT, full data (published)", "macro_f1": 0.78, "f1_hate": 0.48}
FROZEN_BASELINE = {"model": "frozen MiniLM + balanced LR C=1 (al-baselines note, other split)", "macro_f1": 0.667}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def step_logger(every: int):
    """A ``progress(stage, done, total)`` that prints training steps every ``every`` and each validation."""
    started = time.perf_counter()

    def progress(stage: str, done: int, total: int) -> None:
        if (stage == "train" and done % every == 0) or done == total:
            log(f"{stage} {done}/{total}  ({time.perf_counter() - started:.0f} s)")

    return progress


def run_fast(splits: data.Splits, taxonomy, settings: Settings, max_length: int, seed: int) -> dict:
    encoder = load_encoder(DEFAULT_BASE_MODEL, max_length)
    directory = settings.cache_dir / "embeddings"
    cache = EmbeddingCache(directory, encoder)
    texts = {name: frame["text"].tolist() for name, frame in
             (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    y = {name: frame["label"].map(taxonomy.index).to_numpy() for name, frame in
         (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    all_texts = texts["train"] + texts["validation"] + texts["test"]

    cached_before = len(cache)
    t0 = time.perf_counter()
    cache.get(all_texts, progress=None)
    embed_seconds = time.perf_counter() - t0
    new_texts = len(cache) - cached_before
    log(f"fast: embedded {new_texts} new texts in {embed_seconds:.1f} s ({len(cache)} cached)")

    t0 = time.perf_counter()
    emb = {name: EmbeddingCache(directory, encoder).get(t) if name == "train" else cache.get(t)
           for name, t in texts.items()}
    cold_load_seconds = time.perf_counter() - t0  # dominated by reading the train pool from disk

    sweep = []
    for C in C_GRID:
        t0 = time.perf_counter()
        head = fit_head(emb["train"], y["train"], seed=seed, C=C)
        fit_seconds = time.perf_counter() - t0
        proba = np.zeros((len(y["validation"]), len(taxonomy.labels)))
        proba[:, head.classes_] = head.predict_proba(emb["validation"])
        f1 = evaluate_proba(proba, y["validation"], taxonomy.labels).macro_f1
        sweep.append({"C": C, "val_macro_f1": f1, "fit_seconds": fit_seconds})
        log(f"fast: C={C:<6} val macro-F1 {f1:.4f}  fit {fit_seconds:.2f} s")
    best_C = max(sweep, key=lambda r: r["val_macro_f1"])["C"]

    tests = {}
    for C in sorted({best_C, DEFAULT_C, 1.0}):
        head = fit_head(emb["train"], y["train"], seed=seed, C=C)
        t0 = time.perf_counter()
        proba = np.zeros((len(y["test"]), len(taxonomy.labels)))
        proba[:, head.classes_] = head.predict_proba(emb["test"])
        tests[str(C)] = {"report": evaluate_proba(proba, y["test"], taxonomy.labels).to_dict(),
                         "predict_seconds_cached": time.perf_counter() - t0}
    return {
        "encoder": DEFAULT_BASE_MODEL, "max_length": max_length,
        "embed_seconds_this_run": embed_seconds, "new_texts_embedded_this_run": new_texts,
        "cache_load_seconds": cold_load_seconds, "cache_rows": len(cache),
        "C_sweep_validation": sweep, "best_C_validation": best_C, "default_C": DEFAULT_C,
        "test": tests,
    }


def run_finetune(splits: data.Splits, taxonomy, config: FineTuneConfig) -> dict:
    log(f"finetune: {len(splits.train)} train / {len(splits.validation)} validation rows, {config}")
    result = finetune(splits.train, splits.validation, taxonomy, config, progress=step_logger(100))
    log(f"finetune: best epoch {result.best_epoch} val macro-F1 {result.best_val_macro_f1:.4f} "
        f"in {result.seconds:.0f} s")
    t0 = time.perf_counter()
    report = evaluate(result.classifier, splits.test)
    eval_seconds = time.perf_counter() - t0
    return {
        "config": vars(config), "train_seconds": result.seconds, "best_epoch": result.best_epoch,
        "best_val_macro_f1": result.best_val_macro_f1, "history": result.history,
        "test_eval_seconds": eval_seconds, "test_texts_per_second": len(splits.test) / eval_seconds,
        "test": report.to_dict(),
    }


def markdown(results: dict) -> str:
    labels = results["labels"]
    rows = []

    def row(name: str, report: dict, seconds: str) -> None:
        r = EvalReport.from_dict(report)
        per_class = " | ".join(f"{r.per_class[label]['f1']:.3f}" for label in labels)
        rows.append(f"| {name} | **{r.macro_f1:.4f}** | {per_class} | {r.accuracy:.4f} | {r.ece:.4f} | {seconds} |")

    if "finetune" in results:
        ft = results["finetune"]
        cfg = ft["config"]
        row(f"fine-tuned MiniLM (lr {cfg['lr']}, {cfg['class_weighting']} weights, best epoch {ft['best_epoch']})",
            ft["test"], f"train {ft['train_seconds'] / 60:.1f} min; test eval {ft['test_eval_seconds']:.0f} s")
    if "fast" in results:
        fast = results["fast"]
        for C, entry in fast["test"].items():
            tag = " (validation-best)" if float(C) == fast["best_C_validation"] else ""
            tag += " (default)" if float(C) == fast["default_C"] else ""
            fit = next(s["fit_seconds"] for s in fast["C_sweep_validation"] if s["C"] == float(C))
            row(f"fast: frozen MiniLM + LR, C={C}{tag}", entry["report"], f"head fit {fit:.2f} s")
    header = [
        "# Davidson full-data benchmark", "",
        f"Split `data.split(seed=13)`: {results['sizes']}. Test-split metrics; CPU, "
        f"{results['machine']['cpus']} cores, torch threads {results['machine']['torch_threads']}, "
        f"load average at start {results['machine']['loadavg_start']} / end {results['machine']['loadavg_end']} "
        "(other jobs shared the machine, so wall times are upper bounds).", "",
        f"| model | macro-F1 | {' | '.join(f'F1 {label}' for label in labels)} | accuracy | ECE | time |",
        "|---|---|" + "---|" * len(labels) + "---|---|---|",
        *rows,
        f"| {PUBLISHED['model']} | {PUBLISHED['macro_f1']} | {PUBLISHED['f1_hate']} | – | – | – | – | – |",
        f"| {FROZEN_BASELINE['model']} | {FROZEN_BASELINE['macro_f1']} | – | – | – | – | – | – |",
    ]
    if "finetune" in results:
        ft = results["finetune"]
        header += ["", "## Fine-tuning history (validation)", "", "| epoch | step | train loss | val macro-F1 | s |",
                   "|---|---|---|---|---|"]
        header += [f"| {h['epoch']} | {h['step']} | {h['train_loss']:.4f} | {h.get('val_macro_f1', float('nan')):.4f} "
                   f"| {h['seconds']:.0f} |" for h in ft["history"]]
        header += ["", "```", report_text(EvalReport.from_dict(ft["test"])), "```",
                   f"Test inference: {ft['test_texts_per_second']:.0f} texts/s."]
    if "fast" in results:
        fast = results["fast"]
        header += ["", "## Fast mode", "",
                   f"Embedding cache: {fast['cache_rows']} texts; this run embedded "
                   f"{fast['new_texts_embedded_this_run']} new texts in {fast['embed_seconds_this_run']:.1f} s; "
                   f"reopening the cache and loading all splits took {fast['cache_load_seconds']:.3f} s.", "",
                   "| C | validation macro-F1 | head fit s |", "|---|---|---|"]
        header += [f"| {s['C']} | {s['val_macro_f1']:.4f} | {s['fit_seconds']:.2f} |"
                   for s in fast["C_sweep_validation"]]
    return "\n".join(header) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FineTuneConfig()
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--class-weighting", choices=("balanced", "sqrt", "none"), default=defaults.class_weighting)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time budget for fine-tuning")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; default: 1 while other work keeps every core busy (two threads "
                             "sharing a loaded machine ran a training step 6x slower than one), else all cores")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-fast", action="store_true")
    parser.add_argument("--pilot-rows", type=int, default=None,
                        help="fine-tune on this many training rows, report validation only, write nothing")
    args = parser.parse_args()

    settings = Settings()
    dataset = data.load("davidson", settings=settings)
    splits = data.split(dataset, seed=13)
    taxonomy = dataset.taxonomy
    config = FineTuneConfig(max_length=args.max_length, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, class_weighting=args.class_weighting, patience=args.patience,
                            eval_every=args.eval_every, seed=args.seed,
                            max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    cpus = os.cpu_count() or 1
    torch.set_num_threads(args.threads or (1 if os.getloadavg()[0] >= cpus else cpus))
    log(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    if args.pilot_rows:
        train = data.stratified_sample(splits.train, args.pilot_rows, seed=args.seed)
        pilot = data.Splits(train, splits.validation, splits.validation)
        result = finetune(pilot.train, pilot.validation, taxonomy, config, progress=step_logger(100))
        for h in result.history:
            log(f"pilot: {h}")
        log(f"pilot: best epoch {result.best_epoch}, validation macro-F1 {result.best_val_macro_f1:.4f}, "
            f"{result.seconds:.0f} s")
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "train_davidson.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    results.update({
        "labels": list(taxonomy.labels),
        "sizes": {"train": len(splits.train), "validation": len(splits.validation), "test": len(splits.test)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": round(os.getloadavg()[0], 1)},
        "reference": {"published": PUBLISHED, "frozen_baseline": FROZEN_BASELINE},
    })
    if not args.skip_fast:
        results["fast"] = run_fast(splits, taxonomy, settings, args.max_length, args.seed)
    if not args.skip_finetune:
        results["finetune"] = run_finetune(splits, taxonomy, config)
        log(report_text(EvalReport.from_dict(results["finetune"]["test"])))
    results["machine"]["loadavg_end"] = round(os.getloadavg()[0], 1)
    json_path.write_text(json.dumps(results, indent=2))
    (RESULTS / "train_davidson.md").write_text(markdown(results))
    log(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
