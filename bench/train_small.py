"""Small-data fine-tuning: does `labelloop train --limit 300` learn more than the majority class?

The same rows as `labelloop train --dataset davidson --limit 300` (the CLI's split and stratified sample,
seed 13) are fine-tuned twice in one run, side by side: with the step floor off (``min_steps=0``, two
epochs: the old default, which registered a model predicting "offensive" for every text) and with the
default floor (``training.finetune.DEFAULT_MIN_STEPS``). Fast mode (frozen encoder + logistic head) on
the same rows is the reference an ML engineer could use instead. Every model is scored on the Davidson
test split (the frozen evaluation set `labelloop train` freezes), against the majority-class baseline.

Goal: the default fine-tune beats the majority-class baseline by at least 0.2 macro-F1 (the lower bound of
the paired bootstrap interval above 0 as well), where the step-floor-off run does not beat it at all.

    .venv/bin/python bench/train_small.py [--rows 300] [--eval-rows N] [--threads 1]

Writes bench/results/train_small.md (and .json). A failing configuration is reported, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from labelloop import data  # noqa: E402
from labelloop.config import Settings  # noqa: E402
from training.classifier import load_encoder  # noqa: E402
from training.evaluate import evaluate_proba  # noqa: E402
from training.fast import train_fast  # noqa: E402
from training.finetune import DEFAULT_MIN_STEPS, FineTuneConfig, finetune  # noqa: E402
from training.gate import GatePolicy, macro_f1_gain  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300, help="as `labelloop train --limit`")
    parser.add_argument("--eval-rows", type=int, default=None, help="score on a stratified sample of the test split")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a loaded machine)")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    torch.set_num_threads(args.threads or (1 if os.getloadavg()[0] >= cpus else cpus))

    settings = Settings()
    labeled = data.load("davidson", settings=settings)
    splits = data.split(labeled, seed=args.seed)
    train = data.stratified_sample(splits.train, args.rows, seed=args.seed)
    validation = data.stratified_sample(splits.validation, max(args.rows // 4, 50), seed=args.seed)
    test = splits.test if args.eval_rows is None else data.stratified_sample(splits.test, args.eval_rows, seed=1)
    taxonomy = labeled.taxonomy
    y = test["label"].map(taxonomy.index).to_numpy()
    majority = str(train["label"].value_counts().idxmax())
    baseline = np.full(len(y), taxonomy.index(majority))
    policy = GatePolicy(seed=args.seed)
    majority_f1 = evaluate_proba(np.eye(len(taxonomy.labels))[baseline], y, taxonomy.labels).macro_f1

    def finetuned(min_steps: int):
        def run():
            config = FineTuneConfig(base_model=settings.base_model, max_length=settings.max_length,
                                    seed=args.seed, min_steps=min_steps)
            result = finetune(train, validation, taxonomy, config)
            return result.classifier, {"steps": result.history[-1]["step"], "epochs": result.epochs,
                                       "best_epoch": result.best_epoch}
        return run

    def fast():
        return train_fast(train, taxonomy, encoder=load_encoder(settings.base_model, settings.max_length),
                          seed=args.seed), {}

    runs = {"fine-tune, step floor off (old default: 2 epochs)": finetuned(0),
            f"fine-tune, min_steps={DEFAULT_MIN_STEPS} (new default)": finetuned(DEFAULT_MIN_STEPS),
            "fast mode (frozen encoder + logistic head)": fast}
    rows = []
    for name, run in runs.items():
        started = time.perf_counter()
        try:
            classifier, extra = run()
            proba = classifier.predict_proba(test["text"].tolist())
            report = evaluate_proba(proba, y, taxonomy.labels)
            gain = macro_f1_gain(y, baseline, proba, len(taxonomy.labels), policy)
            rows.append({"config": name, "macro_f1": report.macro_f1, "gain_over_majority": str(gain),
                         "gain_low": gain.low, **{f"recall_{k}": v["recall"] for k, v in report.per_class.items()},
                         "seconds": time.perf_counter() - started, **extra})
        except Exception as e:  # report what happened, keep measuring the others
            rows.append({"config": name, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=3)})
        print(json.dumps(rows[-1], default=str), flush=True)

    new = next((r for r in rows if "new default" in r["config"]), {})
    met = "macro_f1" in new and new["macro_f1"] - majority_f1 >= GOAL and new["gain_low"] > 0
    lines = [
        "# Small-data fine-tuning (`bench/train_small.py`)",
        "",
        f"Davidson, the rows `labelloop train --limit {args.rows}` trains on ({len(train)} train, {len(validation)} "
        f"validation, seed {args.seed}); scored on {len(test)} test-split texts; torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {cpus} CPUs at the end.",
        f"Majority-class baseline (always {majority!r}): macro-F1 **{majority_f1:.4f}**.",
        "",
        f"**Goal:** the default fine-tune beats that baseline by at least {GOAL} macro-F1, with the paired "
        f"bootstrap lower bound above 0. **{'met' if met else 'NOT met'}.**",
        "",
        "| configuration | macro-F1 | gain over majority [95% interval] | recall hate / offensive / neither "
        "| steps (epochs) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} | | | | |")
            continue
        steps = f"{r['steps']} ({r['epochs']})" if "steps" in r else "-"
        lines.append(f"| {r['config']} | {r['macro_f1']:.4f} | {r['gain_over_majority']} | "
                     f"{r['recall_hate']:.3f} / {r['recall_offensive']:.3f} / {r['recall_neither']:.3f} | "
                     f"{steps} | {r['seconds']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_small.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "train_small.json").write_text(json.dumps({"majority_macro_f1": majority_f1, "runs": rows},
                                                         indent=2, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
