"""Label-quality benchmarks (issue 9), on real Davidson tweets and MiniLM embeddings (cached).

1. **Label-error detection.** 2,000 Davidson labels (stratified sample), 10 % of them flipped, two noise
   types: *uniform* (to any other class) and *hate<->offensive* (only between those two classes, the
   confusion Davidson's own crowd makes most). Out-of-fold probabilities from the fast head
   (``monitoring.label_errors.out_of_fold_proba``, 5 folds). The ranking labelloop uses
   (``issue_ranking``: cleanlab's flagged issues first, by normalized margin) against the plain baseline of
   lowest self-confidence first, and against the same ranking on probabilities from a head fit with
   "balanced" class weights (fast mode's setting). Precision@50, precision@100, recall (of the injected
   flips, by cleanlab's flagged set; the baseline at the same number of items), AUPRC. 5 seeds. Goal:
   precision@50 >= 0.6 on both noise types.
2. **Annotator quality.** 5 simulated annotators with accuracies 0.95/0.9/0.8/0.7/0.6, each item labelled
   by 3 of them at random. A wrong answer is drawn from the item's own crowd vote distribution over the
   wrong classes (Davidson ships per-tweet CrowdFlower vote counts), falling back to the class's pooled
   vote confusion when the crowd was unanimous. CROWDLAB (``monitoring.agreement.crowdlab``) with
   out-of-fold probabilities from a head fit on majority-vote labels with balanced class weights. Goal:
   Spearman(CROWDLAB annotator quality, true accuracy) >= 0.9, and consensus accuracy above majority vote.
   5 seeds. Side by side: the consensus with probabilities from an unweighted head (the label-error setting).
3. **Audit estimator.** A champion (fast head on 300 labels) and a pool of the other sampled items; the
   truth is its accuracy on the whole pool. 200 simulated blind audits of 400 items drawn uniformly: how
   often the Wilson 95 % interval (``monitoring.quality_stats.proportion``) covers the truth (goal >= 93 %),
   and the same for the bootstrap macro-F1 interval. Next to it, the estimate from 400 *actively selected*
   items (lowest margin among a random half of the pool, as the loop's queue serves them): how far off.

Run: ``.venv/bin/python bench/label_quality.py`` (a few minutes on 2 cores; embedding the ~4,000 texts once
takes most of it when the cache is cold). Writes ``bench/results/label_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labelloop import data  # noqa: E402
from labelloop.config import Settings  # noqa: E402
from monitoring.agreement import CROWDLAB_CLASS_WEIGHT, crowdlab  # noqa: E402
from monitoring.label_errors import issue_ranking, out_of_fold_proba, self_confidence_ranking  # noqa: E402
from monitoring.quality_stats import macro_f1_estimate, proportion  # noqa: E402
from training.classifier import load_encoder  # noqa: E402
from training.fast import EmbeddingCache, fit_head  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ACCURACIES = (0.95, 0.9, 0.8, 0.7, 0.6)
GOALS = {"precision_at_50": 0.6, "spearman": 0.9, "coverage": 0.93}
#: rankings compared in benchmark 1: labelloop's, the plain baseline, and labelloop's on class-weighted probabilities
METHODS = {"cleanlab": "cleanlab (labelloop)", "self_confidence": "low self-confidence (baseline)",
           "cleanlab_balanced": "cleanlab on class-weighted probabilities"}


def load_davidson(settings: Settings) -> tuple[pd.DataFrame, list[str]]:
    """Davidson rows (``id, text, label``) with the per-tweet crowd votes per class."""
    labelled = data.load("davidson", settings=settings)
    labels = list(labelled.taxonomy.labels)
    raw = pd.read_csv(settings.data_dir / "davidson_hate_offensive" / "labeled_data.csv.gz")
    votes = pd.DataFrame({"id": "davidson-" + raw.iloc[:, 0].astype(str), "hate": raw["hate_speech"],
                          "offensive": raw["offensive_language"], "neither": raw["neither"]})
    frame = labelled.frame.merge(votes, on="id", how="inner")
    return frame.reset_index(drop=True), labels


# --- 1. label-error detection ------------------------------------------------------------------------


def flip(y: np.ndarray, labels: list[str], kind: str, rng: np.random.Generator, share: float = 0.1) -> np.ndarray:
    noisy = y.copy()
    n_flip = int(round(share * len(y)))
    if kind == "uniform":
        idx = rng.choice(len(y), n_flip, replace=False)
        for i in idx:
            noisy[i] = rng.choice([c for c in range(len(labels)) if c != y[i]])
    else:
        hate, offensive = labels.index("hate"), labels.index("offensive")
        pool = np.flatnonzero((y == hate) | (y == offensive))
        idx = rng.choice(pool, n_flip, replace=False)
        noisy[idx] = np.where(y[idx] == hate, offensive, hate)
    return noisy


def ranking_scores(order: np.ndarray, flips: np.ndarray, flagged_count: int) -> dict[str, float]:
    hits = flips[order]
    score = np.empty(len(order))
    score[order] = np.arange(len(order), 0, -1)  # higher = more suspicious
    return {"precision_at_50": float(hits[:50].mean()), "precision_at_100": float(hits[:100].mean()),
            "recall": float(hits[:flagged_count].sum() / max(flips.sum(), 1)),
            "auprc": float(average_precision_score(flips, score))}


def bench_label_errors(emb: np.ndarray, y: np.ndarray, labels: list[str], seeds: int) -> dict:
    runs = []
    for kind in ("uniform", "hate_offensive"):
        for seed in range(seeds):
            rng = np.random.default_rng(1000 + seed)
            noisy = flip(y, labels, kind, rng)
            flips = noisy != y
            proba = out_of_fold_proba(emb, noisy, len(labels), seed=seed)
            order, flagged, _ = issue_ranking(noisy, proba)
            base = self_confidence_ranking(noisy, proba)
            balanced = out_of_fold_proba(emb, noisy, len(labels), seed=seed, class_weight="balanced")
            order_b, flagged_b, _ = issue_ranking(noisy, balanced)
            runs.append({"noise": kind, "seed": seed, "flipped": int(flips.sum()), "flagged": int(flagged.sum()),
                         "cleanlab": ranking_scores(order, flips, int(flagged.sum())),
                         "self_confidence": ranking_scores(base, flips, int(flagged.sum())),
                         "cleanlab_balanced": ranking_scores(order_b, flips, int(flagged_b.sum()))})
            print(f"  label errors {kind} seed {seed}: cleanlab p@50 {runs[-1]['cleanlab']['precision_at_50']:.2f}, "
                  f"baseline {runs[-1]['self_confidence']['precision_at_50']:.2f}", flush=True)
    summary = {}
    for kind in ("uniform", "hate_offensive"):
        rows = [r for r in runs if r["noise"] == kind]
        summary[kind] = {
            method: {metric: {"mean": float(np.mean([r[method][metric] for r in rows])),
                              "std": float(np.std([r[method][metric] for r in rows]))}
                     for metric in ("precision_at_50", "precision_at_100", "recall", "auprc")}
            for method in METHODS
        }
        summary[kind]["flagged_mean"] = float(np.mean([r["flagged"] for r in rows]))
        summary[kind]["goal_met"] = summary[kind]["cleanlab"]["precision_at_50"]["mean"] >= GOALS["precision_at_50"]
    return {"runs": runs, "summary": summary}


# --- 2. annotator quality ------------------------------------------------------------------------------


def wrong_answer_distribution(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Per item, the probability of each wrong class: its own crowd votes for the wrong classes, else the
    pooled wrong votes of its class."""
    votes = frame[labels].to_numpy(dtype=float)
    y = frame["label"].map({c: i for i, c in enumerate(labels)}).to_numpy()
    wrong = votes.copy()
    wrong[np.arange(len(y)), y] = 0
    pooled = np.vstack([wrong[y == c].sum(axis=0) for c in range(len(labels))])
    pooled = np.where(pooled.sum(axis=1, keepdims=True) > 0, pooled, 1.0 - np.eye(len(labels)))
    empty = wrong.sum(axis=1) == 0
    wrong[empty] = pooled[y[empty]]
    return wrong / wrong.sum(axis=1, keepdims=True)


def bench_annotators(emb: np.ndarray, frame: pd.DataFrame, labels: list[str], seeds: int,
                     per_item: int = 3) -> dict:
    y = frame["label"].map({c: i for i, c in enumerate(labels)}).to_numpy()
    wrong = wrong_answer_distribution(frame, labels)
    runs = []
    for seed in range(seeds):
        rng = np.random.default_rng(2000 + seed)
        n = len(y)
        table = np.full((n, len(ACCURACIES)), np.nan)
        for i in range(n):
            for a in rng.choice(len(ACCURACIES), per_item, replace=False):
                table[i, a] = y[i] if rng.random() < ACCURACIES[a] else rng.choice(len(labels), p=wrong[i])
        majority = np.array([_majority(row, rng, len(labels)) for row in table])
        proba = out_of_fold_proba(emb, majority, len(labels), seed=seed, class_weight=CROWDLAB_CLASS_WEIGHT)
        grid = pd.DataFrame(table, columns=range(len(ACCURACIES))).apply(
            lambda col: col.map(lambda v: None if np.isnan(v) else labels[int(v)]))
        grid.index = [f"item-{i}" for i in range(n)]
        result = crowdlab(grid, proba, labels, min_n=10)
        unweighted = crowdlab(grid, out_of_fold_proba(emb, majority, len(labels), seed=seed), labels, min_n=10)
        unweighted_consensus = np.array([labels.index(c.consensus_label) for c in unweighted.consensus])
        quality = {a.annotator: a.quality for a in result.annotators}
        consensus = np.array([labels.index(c.consensus_label) for c in result.consensus])
        rho = float(spearmanr([quality[a] for a in range(len(ACCURACIES))], ACCURACIES).statistic)
        empirical = [float(np.mean(table[~np.isnan(table[:, a]), a] == y[~np.isnan(table[:, a])]))
                     for a in range(len(ACCURACIES))]
        runs.append({"seed": seed, "spearman": rho, "annotator_quality": [quality[a] for a in range(len(ACCURACIES))],
                     "empirical_accuracy": empirical,
                     "consensus_accuracy": float(np.mean(consensus == y)),
                     "consensus_accuracy_unweighted_probabilities": float(np.mean(unweighted_consensus == y)),
                     "majority_accuracy": float(np.mean(majority == y))})
        print(f"  annotators seed {seed}: spearman {rho:.2f}, consensus {runs[-1]['consensus_accuracy']:.3f} vs "
              f"majority {runs[-1]['majority_accuracy']:.3f}", flush=True)
    summary = {key: {"mean": float(np.mean([r[key] for r in runs])), "min": float(np.min([r[key] for r in runs]))}
               for key in ("spearman", "consensus_accuracy", "majority_accuracy",
                           "consensus_accuracy_unweighted_probabilities")}
    summary["consensus_beats_majority_runs"] = sum(r["consensus_accuracy"] > r["majority_accuracy"] for r in runs)
    summary["goal_met"] = (summary["spearman"]["min"] >= GOALS["spearman"]
                           and summary["consensus_beats_majority_runs"] == len(runs))
    return {"runs": runs, "summary": summary, "annotators_per_item": per_item}


def _majority(row: np.ndarray, rng: np.random.Generator, k: int) -> int:
    counts = np.bincount(row[~np.isnan(row)].astype(int), minlength=k)
    return int(rng.choice(np.flatnonzero(counts == counts.max())))


# --- 3. audit estimator -----------------------------------------------------------------------------------


def bench_audit(emb: np.ndarray, y: np.ndarray, labels: list[str], audits: int, audit_size: int,
                train_size: int = 300) -> dict:
    rng = np.random.default_rng(3000)
    train = rng.choice(len(y), train_size, replace=False)
    pool = np.setdiff1d(np.arange(len(y)), train)
    head = fit_head(emb[train], y[train], seed=0)
    proba = np.zeros((len(pool), len(labels)))
    proba[:, head.classes_] = head.predict_proba(emb[pool])
    predicted, truth = proba.argmax(axis=1), y[pool]
    names = np.array(labels)
    true_accuracy = float(np.mean(predicted == truth))
    true_f1 = macro_f1_estimate(names[truth], names[predicted], labels, min_n=1, rounds=1).value
    ordered = np.sort(proba, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]
    covered = covered_f1 = 0
    audit_estimates, active_estimates, active_covered = [], [], 0
    for r in range(audits):
        sample = rng.choice(len(pool), audit_size, replace=False)
        est = proportion(int((predicted[sample] == truth[sample]).sum()), audit_size)
        covered += est.low <= true_accuracy <= est.high
        f1 = macro_f1_estimate(names[truth[sample]], names[predicted[sample]], labels, rounds=300, seed=r)
        covered_f1 += f1.low <= true_f1 <= f1.high
        audit_estimates.append(est.value)
        available = rng.choice(len(pool), len(pool) // 2, replace=False)
        active = available[np.argsort(margin[available], kind="stable")[:audit_size]]
        act = proportion(int((predicted[active] == truth[active]).sum()), audit_size)
        active_estimates.append(act.value)
        active_covered += act.low <= true_accuracy <= act.high
    return {"pool": int(len(pool)), "train_labels": train_size, "audits": audits, "audit_size": audit_size,
            "true_accuracy": true_accuracy, "true_macro_f1": true_f1,
            "wilson_coverage": covered / audits, "macro_f1_bootstrap_coverage": covered_f1 / audits,
            "audit_mean_estimate": float(np.mean(audit_estimates)),
            "audit_mean_abs_error": float(np.mean(np.abs(np.array(audit_estimates) - true_accuracy))),
            "active_mean_estimate": float(np.mean(active_estimates)),
            "active_bias": float(np.mean(active_estimates) - true_accuracy),
            "active_interval_coverage": active_covered / audits,
            "goal_met": covered / audits >= GOALS["coverage"]}


# --- report -------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = ["# Label quality benchmarks (issue 9)", "",
             f"Run {result['started']} on {result['machine']}; {result['seconds']:.0f} s in all "
             f"(embedding {result['embedding_seconds']:.0f} s of it). Davidson, MiniLM embeddings (frozen), fast "
             "head; `bench/label_quality.py`.", ""]
    errors = result.get("label_errors")
    if "error" in errors:
        lines += ["## 1. Label-error detection", "", f"failed: `{errors['error']}`", ""]
    else:
        lines += [f"## 1. Label-error detection: {result['n_labels']:,} labels, 10 % flipped, "
                  f"{len(errors['runs']) // 2} seeds", "",
                  f"**Goal: precision@50 >= {GOALS['precision_at_50']} on both noise types.** Mean ± std over seeds; "
                  "recall = share of the injected flips inside cleanlab's flagged set (the baseline: inside the "
                  "same number of its top-ranked items).", "",
                  "| noise | ranking | precision@50 | precision@100 | recall | AUPRC | goal met |",
                  "|---|---|---|---|---|---|---|"]
        for kind, s in errors["summary"].items():
            for method, name in METHODS.items():
                m = s[method]
                cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in
                         ("precision_at_50", "precision_at_100", "recall", "auprc")]
                goal = ("yes" if s["goal_met"] else "**no**") if method == "cleanlab" else ""
                lines.append(f"| {kind} | {name} | " + " | ".join(cells) + f" | {goal} |")
        lines += ["", "Mean number of items cleanlab flags: " + ", ".join(
            f"{k} {v['flagged_mean']:.0f}" for k, v in errors["summary"].items())
            + f" (of {errors['runs'][0]['flipped']} flipped).", ""]
    ann = result.get("annotators")
    lines += ["## 2. Annotator quality: 5 simulated annotators, 3 per item, errors from the crowd votes", ""]
    if "error" in ann:
        lines += [f"failed: `{ann['error']}`", ""]
    else:
        s = ann["summary"]
        lines += [f"**Goals: Spearman >= {GOALS['spearman']} in every run; CROWDLAB consensus beats majority "
                  f"vote.** Met: {'yes' if s['goal_met'] else '**no**'}.", "",
                  "| seed | Spearman | CROWDLAB quality (0.95/0.9/0.8/0.7/0.6) | empirical accuracy | "
                  "consensus acc. | majority-vote acc. | consensus acc., unweighted probabilities |",
                  "|---|---|---|---|---|---|---|"]
        for r in ann["runs"]:
            lines.append(f"| {r['seed']} | {r['spearman']:.2f} | "
                         + " / ".join(f"{q:.3f}" for q in r["annotator_quality"]) + " | "
                         + " / ".join(f"{q:.3f}" for q in r["empirical_accuracy"])
                         + f" | {r['consensus_accuracy']:.3f} | {r['majority_accuracy']:.3f} | "
                         f"{r['consensus_accuracy_unweighted_probabilities']:.3f} |")
        lines += ["", f"Mean Spearman {s['spearman']['mean']:.2f} (min {s['spearman']['min']:.2f}); consensus "
                  f"{s['consensus_accuracy']['mean']:.3f} vs majority {s['majority_accuracy']['mean']:.3f}; consensus "
                  f"better in {s['consensus_beats_majority_runs']} of {len(ann['runs'])} runs. CROWDLAB's "
                  "probabilities come from a head fit with balanced class weights; with unweighted ones (those "
                  "label-error detection uses) the consensus is "
                  f"{s['consensus_accuracy_unweighted_probabilities']['mean']:.3f}.", ""]
    audit = result.get("audit")
    lines += [f"## 3. Audit estimator: {audit.get('audits', '?')} blind audits of {audit.get('audit_size', '?')} items",
              ""]
    if "error" in audit:
        lines += [f"failed: `{audit['error']}`", ""]
    else:
        a = audit
        lines += [f"**Goal: the 95 % interval covers the true accuracy >= {GOALS['coverage']:.0%} of the time.** "
                  f"Met: {'yes' if a['goal_met'] else '**no**'}.", "",
                  "| measure | value |", "|---|---|",
                  f"| pool / champion's training labels | {a['pool']} / {a['train_labels']} |",
                  f"| true accuracy on the pool / true macro-F1 | {a['true_accuracy']:.3f} / "
                  f"{a['true_macro_f1']:.3f} |",
                  f"| Wilson interval coverage of accuracy (goal >= 93 %) | **{a['wilson_coverage']:.1%}** |",
                  f"| bootstrap interval coverage of macro-F1 | {a['macro_f1_bootstrap_coverage']:.1%} |",
                  f"| audit estimate: mean / mean absolute error | {a['audit_mean_estimate']:.3f} / "
                  f"{a['audit_mean_abs_error']:.3f} |",
                  f"| actively selected 400 (lowest margin): mean estimate | {a['active_mean_estimate']:.3f} |",
                  f"| actively selected: bias (estimate - truth) | **{a['active_bias']:+.3f}** |",
                  f"| actively selected: how often its interval covers the truth | "
                  f"{a['active_interval_coverage']:.1%} |",
                  ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="labels for benchmarks 1 and 2")
    parser.add_argument("--pool", type=int, default=4000, help="items for the audit benchmark")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--audits", type=int, default=200)
    parser.add_argument("--audit-size", type=int, default=400)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter()
    settings = Settings()
    frame, labels = load_davidson(settings)
    codes = {c: i for i, c in enumerate(labels)}
    pool = data.stratified_sample(frame, args.pool, seed=13).reset_index(drop=True)
    sample = data.stratified_sample(pool, args.n, seed=14).reset_index(drop=True)
    encoder = load_encoder(settings.base_model, settings.max_length)
    cache = EmbeddingCache(args.cache_dir / "embeddings", encoder)
    t_embed = time.perf_counter()
    pool_emb = cache.get(pool["text"].tolist())
    sample_emb = cache.get(sample["text"].tolist())
    embedding_seconds = time.perf_counter() - t_embed
    print(f"embedded {len(pool)} texts in {embedding_seconds:.0f} s", flush=True)

    result = {"started": started, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "embedding_seconds": embedding_seconds, "goals": GOALS, "n_labels": len(sample), "n_pool": len(pool)}
    y_sample = sample["label"].map(codes).to_numpy()
    for name, run in (
        ("label_errors", lambda: bench_label_errors(sample_emb, y_sample, labels, args.seeds)),
        ("annotators", lambda: bench_annotators(sample_emb, sample, labels, args.seeds)),
        ("audit", lambda: bench_audit(pool_emb, pool["label"].map(codes).to_numpy(), labels, args.audits,
                                      args.audit_size)),
    ):
        t = time.perf_counter()
        try:
            result[name] = run()
        except Exception as e:  # a benchmark reports what happened rather than crash
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result[f"{name}_seconds"] = time.perf_counter() - t
        print(f"{name}: {result[f'{name}_seconds']:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "label_quality.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
