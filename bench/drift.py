"""Drift detection on a real platform shift (issue 10): can the monitor tell when another platform's texts
arrive among Davidson tweets, without crying wolf on Davidson itself?

Setup (``--seed`` fixes everything):

- Davidson (de-duplicated) shuffled once: ``--train`` rows train the model (a fast-mode head on the frozen
  MiniLM encoder, what the loop's rounds train), the next ``--reference`` rows are the reference (labelled,
  like the monitor's default reference, the frozen evaluation set: temperature scaling and the ATC threshold
  are fitted on it), the next ``--null-windows`` × ``--window`` rows are held out for windows.
- Other platforms: ETHOS (YouTube/Reddit comments, all 998), TweetEval-offensive (OLID tweets, 2019, user
  mentions masked as ``@USER``) and SMS spam, ``--other`` sampled rows each.
- Same-distribution windows: ``--null-windows`` disjoint windows of ``--window`` held-out Davidson rows.
  Their alarm rate is the false-alarm rate.
- Shifted windows: for each source and mix level (0, 5, 10, 25, 50 %), ``--trials`` windows of ``--window``
  items, ``level`` of them drawn from the source and the rest from held-out Davidson.

Alarm rules, side by side on the same windows (each test at p < ``--p-value``): the monitor's (MMD or kNN
novelty, ``monitoring.drift.ALARM_TESTS``, what ``labelloop drift`` alerts on); any of the four tests of
``monitoring.drift.compare``, without and with a Bonferroni threshold; and each test alone (MMD alone is the
issue's suggested input-drift test; the prediction χ² alone is a model-output-only monitor).

Label-free accuracy: on every shifted window, the true accuracy of the model (labels mapped into Davidson's
taxonomy: ETHOS hate → hate, else neither; TweetEval offensive → offensive, else neither; SMS → neither;
these mappings are approximate, an ETHOS "not hate" comment may be offensive) against the average
calibrated confidence (AC), ATC, and the naive baseline "accuracy stays at the reference's".

Embeddings are cached (``training.fast.EmbeddingCache`` under ``--cache-dir``); a cold cache costs one
encoder pass over ≈ 19k texts (minutes on 2 cores). Writes ``bench/results/drift.{json,md}``.
Run: ``.venv/bin/python bench/drift.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from labelloop import data  # noqa: E402
from labelloop.config import Settings  # noqa: E402
from monitoring.drift import ALARM_TESTS, TESTS, Calibration, DriftConfig, Sample, compare  # noqa: E402
from training.classifier import EmbeddingHeadClassifier  # noqa: E402
from training.fast import fit_head  # noqa: E402
from training.train import embedding_cache  # noqa: E402

LEVELS = (0.0, 0.05, 0.10, 0.25, 0.50)
SOURCES = ("ethos", "tweeteval_offensive", "sms_spam")
#: alarm rule → (tests, divisor of the p-value threshold). The monitor alarms on the input-drift tests; the
#: others are baselines: any of the four tests, the same with a Bonferroni threshold, and each test alone
MONITOR = "monitor (MMD or novelty)"
RULES = {MONITOR: (ALARM_TESTS, 1), "any of 4 tests": (TESTS, 1), "any of 4, Bonferroni": (TESTS, len(TESTS)),
         "mmd": (("embedding_mmd",), 1), "novelty": (("embedding_novelty",), 1), "prediction": (("prediction",), 1),
         "confidence": (("confidence",), 1)}
GOAL_FALSE_ALARMS, GOAL_DETECT_10 = 0.05, 0.90
#: each source's labels in Davidson's taxonomy (hate, offensive, neither)
LABEL_MAP = {"ethos": {"hate": "hate", "not_hate": "neither"},
             "tweeteval_offensive": {"offensive": "offensive", "not_offensive": "neither"},
             "sms_spam": {"ham": "neither", "spam": "neither"}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_frames(settings: Settings, args) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    davidson = data.load("davidson", settings=settings).frame.sample(frac=1.0, random_state=args.seed)
    davidson = davidson.reset_index(drop=True)
    need = args.train + args.reference + args.null_windows * args.window
    if len(davidson) < need:
        raise SystemExit(f"Davidson has {len(davidson)} rows, the settings need {need}")
    others = {}
    for name in SOURCES:
        frame = data.load(name, settings=settings).frame
        frame = frame.sample(min(args.other, len(frame)), random_state=args.seed).reset_index(drop=True)
        others[name] = frame.assign(label=frame["label"].map(LABEL_MAP[name]))
    return davidson.iloc[:need], others


def rule_alarm(p_values: dict[str, float], rule: tuple[tuple[str, ...], int], alpha: float) -> bool:
    tests, divisor = rule
    return any(p_values[t] < alpha / divisor for t in tests)


def run(args) -> dict:
    settings = Settings(cache_dir=args.cache_dir)
    started = time.perf_counter()
    davidson, others = load_frames(settings, args)
    cache = embedding_cache(settings)
    labels = ("hate", "offensive", "neither")
    index = {label: i for i, label in enumerate(labels)}
    texts = davidson["text"].tolist() + [t for f in others.values() for t in f["text"]]
    log(f"embedding {len(texts)} texts ({len(cache)} already cached)")
    t0 = time.perf_counter()
    embeddings = cache.get(texts)
    embed_seconds = time.perf_counter() - t0
    dav_emb = embeddings[: len(davidson)]
    offset, other_emb = len(davidson), {}
    for name, frame in others.items():
        other_emb[name] = embeddings[offset: offset + len(frame)]
        offset += len(frame)
    y = davidson["label"].map(index).to_numpy(int)
    tr, ref = slice(0, args.train), slice(args.train, args.train + args.reference)
    held = np.arange(args.train + args.reference, len(davidson))
    model = EmbeddingHeadClassifier(cache.encoder, fit_head(dav_emb[tr], y[tr], seed=args.seed), labels)
    proba = model.proba_from_embeddings(dav_emb)
    other_proba = {n: model.proba_from_embeddings(e) for n, e in other_emb.items()}
    reference = Sample(dav_emb[ref], proba[ref])
    calibration = Calibration.fit(proba[ref], y[ref])
    config = DriftConfig(p_value=args.p_value, permutations=args.permutations, seed=args.seed)
    log(f"model fitted; reference accuracy {calibration.reference_accuracy:.3f}, "
        f"temperature {calibration.temperature:.2f}")

    def evaluate(sample: Sample, rng: np.random.Generator) -> dict[str, float]:
        return {t.name: t.p_value for t in compare(reference, sample, config, rng)}

    rng = np.random.default_rng(args.seed)
    null_rows = []
    t0 = time.perf_counter()
    for w in range(args.null_windows):
        rows = held[w * args.window: (w + 1) * args.window]
        null_rows.append(evaluate(Sample(dav_emb[rows], proba[rows]), rng))
    seconds_per_window = (time.perf_counter() - t0) / max(args.null_windows, 1)
    log(f"{args.null_windows} same-distribution windows, {seconds_per_window:.2f} s per window")

    shifted = []
    for name in SOURCES:
        o_emb, o_proba, o_y = other_emb[name], other_proba[name], others[name]["label"].map(index).to_numpy(int)
        for level in LEVELS:
            n_other = round(level * args.window)
            for trial in range(args.trials):
                d_rows = rng.choice(held, args.window - n_other, replace=False)
                o_rows = rng.choice(len(o_emb), n_other, replace=False)
                sample = Sample(np.vstack([dav_emb[d_rows], o_emb[o_rows]]),
                                np.vstack([proba[d_rows], o_proba[o_rows]]))
                truth = np.r_[y[d_rows], o_y[o_rows]]
                estimate = calibration.estimate(sample.proba)
                shifted.append({"source": name, "level": level, "trial": trial, "p": evaluate(sample, rng),
                                "true_accuracy": float(np.mean(sample.proba.argmax(1) == truth)), **estimate})
        log(f"{name}: {len(LEVELS) * args.trials} windows")

    false_alarms = {rule: float(np.mean([rule_alarm(r, spec, args.p_value) for r in null_rows]))
                    for rule, spec in RULES.items()}
    zero_mix = [r["p"] for r in shifted if r["level"] == 0.0]  # more same-distribution windows (overlapping)
    false_alarms_zero_mix = {rule: float(np.mean([rule_alarm(p, spec, args.p_value) for p in zero_mix]))
                             for rule, spec in RULES.items()}
    per_test_null = {t: float(np.mean([r[t] < args.p_value for r in null_rows])) for t in TESTS}
    detection = {rule: {name: {f"{level:.2f}": float(np.mean([rule_alarm(r["p"], spec, args.p_value)
                                                               for r in shifted
                                                               if r["source"] == name and r["level"] == level]))
                               for level in LEVELS} for name in SOURCES} for rule, spec in RULES.items()}
    accuracy = {}
    for name in SOURCES:
        accuracy[name] = {}
        for level in LEVELS:
            rows = [r for r in shifted if r["source"] == name and r["level"] == level]
            true = np.array([r["true_accuracy"] for r in rows])
            accuracy[name][f"{level:.2f}"] = {
                "true_accuracy": float(true.mean()),
                "mae_average_confidence": float(np.mean(np.abs([r["average_confidence"] for r in rows] - true))),
                "mae_atc": float(np.mean(np.abs([r["atc"] for r in rows] - true))),
                "mae_reference_accuracy": float(np.mean(np.abs(calibration.reference_accuracy - true))),
            }
    monitor_10 = min(detection[MONITOR][name]["0.10"] for name in SOURCES)
    return {
        "setup": {"window": args.window, "trials": args.trials, "null_windows": args.null_windows,
                  "train": args.train, "reference": args.reference, "other_per_source": args.other,
                  "p_value": args.p_value, "permutations": args.permutations, "seed": args.seed,
                  "levels": LEVELS, "sources": SOURCES, "encoder": cache.encoder.name},
        "goals": {"false_alarm_rate_max": GOAL_FALSE_ALARMS, "detection_at_10pct_min": GOAL_DETECT_10},
        "met": {"false_alarms": false_alarms[MONITOR] <= GOAL_FALSE_ALARMS,
                "detection_10pct": monitor_10 >= GOAL_DETECT_10},
        "monitor_rule": MONITOR,
        "false_alarm_rate": false_alarms,
        "false_alarm_rate_zero_mix_windows": false_alarms_zero_mix,
        "false_alarm_rate_per_test": per_test_null,
        "detection_rate": detection,
        "reference_accuracy": calibration.reference_accuracy,
        "temperature": calibration.temperature,
        "accuracy_estimate": accuracy,
        "null_p_values": null_rows,
        "shifted_windows": shifted,
        "seconds": {"embedding": embed_seconds, "per_window": seconds_per_window,
                    "total": time.perf_counter() - started},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()[0]},
    }


def _wilson(rate: float, n: int) -> str:
    from scipy.stats import binomtest

    ci = binomtest(round(rate * n), n).proportion_ci(method="wilson")
    return f"{ci.low:.0%}-{ci.high:.0%}"


def markdown(result: dict) -> str:
    s, fa, det = result["setup"], result["false_alarm_rate"], result["detection_rate"]
    lines = [
        "# Drift detection: Davidson reference, other platforms mixed in",
        "",
        f"Windows of {s['window']} items; {s['null_windows']} same-distribution windows of held-out Davidson; "
        f"{s['trials']} windows per source and mix level; every test at p < {s['p_value']} "
        f"({s['permutations']} permutations for MMD). Reference: {s['reference']} labelled Davidson rows; model: "
        f"fast-mode head trained on {s['train']} other Davidson rows. Produced by `bench/drift.py`.",
        "",
        "## Goals",
        "",
        f"- false alarms ≤ {result['goals']['false_alarm_rate_max']:.0%}: **{fa[MONITOR]:.0%}** of "
        f"{s['null_windows']} disjoint held-out windows "
        f"(Wilson 95% interval {_wilson(fa[MONITOR], s['null_windows'])}; "
        f"{result['false_alarm_rate_zero_mix_windows'][MONITOR]:.0%} of the {len(s['sources']) * s['trials']} "
        "overlapping 0%-mix windows) "
        f"({'met' if result['met']['false_alarms'] else 'NOT met'})",
        f"- a 10% mix detected ≥ {result['goals']['detection_at_10pct_min']:.0%} of the time: **"
        + ", ".join(f"{name} {det[MONITOR][name]['0.10']:.0%}" for name in s["sources"])
        + f"** ({'met' if result['met']['detection_10pct'] else 'NOT met'})",
        "",
        "## Detection rate per mix level (0% = false-alarm check on mixed-in sampling)",
        "",
        f"| rule | source | false alarms ({s['null_windows']} disjoint held-out windows) | false alarms (all "
        f"{len(s['sources']) * s['trials']} 0% windows) | "
        + " | ".join(f"{level:.0%}" for level in s["levels"]) + " |",
        "|---|---|---|---|" + "---|" * len(s["levels"]),
    ]
    for rule in det:
        for name in s["sources"]:
            cells = " | ".join(f"{det[rule][name][f'{level:.2f}']:.0%}" for level in s["levels"])
            zero = result["false_alarm_rate_zero_mix_windows"][rule]
            lines.append(f"| {rule} | {name} | {fa[rule]:.0%} | {zero:.0%} | {cells} |")
    lines += [
        "",
        f"`{MONITOR}` is what `labelloop drift` alerts on: the MMD permutation test or the kNN novelty test "
        "below the threshold. Baselines on the same windows: `any of 4 tests` adds the prediction χ² and "
        "confidence KS tests; `any of 4, Bonferroni` divides the threshold by four; then each test alone. "
        "Per-test false-alarm rate (disjoint windows): "
        + ", ".join(f"{t} {v:.0%}" for t, v in result["false_alarm_rate_per_test"].items()) + ".",
        "",
        "## Label-free accuracy estimate vs true accuracy (mean absolute error over the windows)",
        "",
        f"Reference accuracy {result['reference_accuracy']:.3f}; temperature {result['temperature']:.2f}. "
        "True labels of other platforms are mapped into Davidson's taxonomy (approximate, see the script).",
        "",
        "| source | mix | true accuracy | AC error | ATC error | baseline (reference accuracy) error |",
        "|---|---|---|---|---|---|",
    ]
    for name, levels in result["accuracy_estimate"].items():
        for level, a in levels.items():
            lines.append(f"| {name} | {float(level):.0%} | {a['true_accuracy']:.3f} "
                         f"| {a['mae_average_confidence']:.3f} | {a['mae_atc']:.3f} "
                         f"| {a['mae_reference_accuracy']:.3f} |")
    sec = result["seconds"]
    lines += ["", f"Embedding (cache misses only) {sec['embedding']:.0f} s; {sec['per_window']:.2f} s per window for "
              f"the four tests; total {sec['total']:.0f} s on {result['machine']['cpus']} CPUs "
              f"(load average {result['machine']['load_average']:.1f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--null-windows", type=int, default=20)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--other", type=int, default=1500)
    parser.add_argument("--p-value", type=float, default=0.01)
    parser.add_argument("--permutations", type=int, default=Settings().drift_permutations)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        result = run(args)
    except (data.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(result, indent=2))
    (args.out / "drift.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
