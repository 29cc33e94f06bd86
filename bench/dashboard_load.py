"""How long the PM dashboard's label-quality sections take per page load, before and after computing each
thing once per load.

Before: the page built the label-quality report and its three breakdowns (audit per day, correction rate
per class and per version) as four full reports, each reading the journal, joining the slices and scoring
the audit items, and refitted the out-of-fold label-error model on every load. After
(``monitoring.dashboard.PageQuality``): one table per load, the breakdowns computed from it, and the
label-error pass refitted only when the training labels changed. Both are run side by side on the same
journal; the figures must be identical.

The journal: ``--items`` Davidson tweets labelled by two simulated reviewers (95 % and 75 % right) through
Label Studio-shaped webhook payloads, with 10 % each of honeypots, overlap copies and audit items, as the
demo serves them. Needs ``../shared/data`` (Davidson) and the offline MiniLM encoder (embeddings cached
under ``var/bench/cache``).

Goal: a reload with no new labels at least 3x faster than before; a first load no slower.
Run: ``.venv/bin/python bench/dashboard_load.py``. Writes ``bench/results/dashboard_load.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from active_learning.slices_push import slice_items  # noqa: E402
from labelloop import data  # noqa: E402
from labelloop.config import Settings  # noqa: E402
from labelloop.journal import Journal  # noqa: E402
from labelloop.slices import SliceStore  # noqa: E402
from labelloop.taxonomy import get_taxonomy  # noqa: E402
from monitoring import dashboard  # noqa: E402
from monitoring.dashboard import LabelAccuracy, PageQuality  # noqa: E402
from monitoring.overview import MonitoringContext  # noqa: E402
from training.registry import Registry  # noqa: E402
from training.train import train_and_register  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL_RELOAD_SPEEDUP = 3.0
PROJECT = 1


def payload(annotation_id: int, task_id: int, item_id: str, text: str, label: str, annotator: int,
            lead_time: float) -> dict:
    """An ANNOTATION_CREATED webhook as Label Studio 1.23 sends it."""
    stamp = "2026-03-11T10:00:00Z"
    annotation = {"id": annotation_id, "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                                   "value": {"choices": [label]}}],
                  "task": task_id, "project": PROJECT, "completed_by": annotator, "was_cancelled": False,
                  "ground_truth": False, "lead_time": lead_time, "created_at": stamp, "updated_at": stamp,
                  "parent_prediction": None}
    task = {"id": task_id, "data": {"text": text, "item_id": item_id}, "project": PROJECT}
    return {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task, "project": {"id": PROJECT}}


def build_state(settings: Settings, n_items: int, seed: int) -> int:
    """A champion (fast mode, trained on other Davidson rows) and the journal and slice store of a project
    worked like the demo's, audit items served under that champion; returns the annotation count."""
    taxonomy = get_taxonomy("hate_offensive")
    davidson = data.load("davidson", settings=settings).frame
    frame = data.stratified_sample(davidson, n_items, seed=seed).reset_index(drop=True)
    rest = davidson[~davidson["id"].isin(set(frame["id"]))]
    champion = train_and_register(data.stratified_sample(rest, 300, seed=seed), None, taxonomy, mode="fast",
                                  settings=settings, source="bench",
                                  eval_frame=data.stratified_sample(rest, 200, seed=seed + 1))
    Registry(settings).promote()
    version = champion.ref.label
    rng = np.random.default_rng(seed)
    accuracy = {1: 0.95, 2: 0.75}

    def answer(truth: str, who: int) -> str:
        return truth if rng.random() < accuracy[who] else str(rng.choice([x for x in taxonomy.labels if x != truth]))

    tenth = n_items // 10
    honeypot, audit, overlap = range(0, tenth), range(tenth, 2 * tenth), range(2 * tenth, 3 * tenth)
    rows, slices, next_task = [], [], 10_000
    for i, row in frame.iterrows():
        who = 1 + i % 2
        task = 1_000 + i
        rows.append((task, row["id"], row["text"], answer(row["label"], who), who))
        if i in overlap:  # a copy for the other reviewer
            rows.append((next_task, row["id"], row["text"], answer(row["label"], 3 - who), 3 - who))
            slices += slice_items(PROJECT, "overlap", [next_task], [row["id"]], version, source_task_id=[task])
            next_task += 1
    slices += slice_items(PROJECT, "honeypot", [1_000 + i for i in honeypot], frame.loc[list(honeypot), "id"].tolist(),
                          version, gold_label=frame.loc[list(honeypot), "label"].tolist())
    slices += slice_items(PROJECT, "audit", [1_000 + i for i in audit], frame.loc[list(audit), "id"].tolist(), version)
    with Journal(settings.database("journal"), taxonomy) as journal:
        for n, (task, item, text, label, who) in enumerate(rows):
            journal.record(payload(n + 1, task, item, text, label, who, float(rng.lognormal(2.0, 0.4))))
        recorded = journal.annotations(PROJECT)
        if len(recorded) != len(rows) or recorded["label"].isna().any():
            raise RuntimeError(f"the journal kept {len(recorded)} usable annotations of {len(rows)} sent")
    with SliceStore(settings.database("slices")) as store:
        store.add(slices)
    return len(rows)


def before(context: MonitoringContext) -> LabelAccuracy:
    """The label-quality sections as the page computed them before: a full report per breakdown, and the
    label-error pass every time."""
    quality = context.quality()
    report = quality.report()
    accuracy = LabelAccuracy(report=report, audit_by_day=quality.report("day").audit.groups,
                             acceptance_by_class=quality.report("class").acceptance.groups,
                             acceptance_by_version=quality.report("version").acceptance.groups)
    dashboard.collect_label_errors(context, quality)
    return accuracy


def after(context: MonitoringContext) -> LabelAccuracy:
    quality = PageQuality.of(context.quality())
    accuracy = dashboard.collect_label_accuracy(quality)
    dashboard.collect_label_errors(context, quality)
    return accuracy


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="labelloop-dashboard-bench-") as tmp:
        settings = Settings(state_dir=Path(tmp) / "var", mlruns_dir=Path(tmp) / "mlruns", cache_dir=args.cache_dir,
                            ls_project_id=PROJECT, taxonomy="hate_offensive")
        n_annotations = build_state(settings, args.items, args.seed)
        with Journal(settings.database("journal"), get_taxonomy("hate_offensive")) as journal:
            context = MonitoringContext(settings, journal)
            warm = timed(lambda: before(context))  # embeddings cached, audit predictions attempted once
            first_after = timed(lambda: after(context))  # its label-error cache is cold: a first load
            reload = {"before": [], "after": []}
            for _ in range(args.repeats):
                reload["before"].append(timed(lambda: before(context)))
                reload["after"].append(timed(lambda: after(context)))
            strip = {"report": {"generated_at"}}
            identical = before(context).model_dump(exclude=strip) == after(context).model_dump(exclude=strip)
            context.close()
    median = {k: statistics.median(v) for k, v in reload.items()}
    speedup = median["before"] / median["after"]
    return {"items": args.items, "annotations": n_annotations, "repeats": args.repeats,
            "warm_up_before_seconds": round(warm, 3), "first_load_after_seconds": round(first_after, 3),
            "reload_median_seconds": {k: round(v, 3) for k, v in median.items()},
            "reload_speedup": round(speedup, 1), "goal_reload_speedup": GOAL_RELOAD_SPEEDUP,
            "goal_met": bool(speedup >= GOAL_RELOAD_SPEEDUP and first_after <= median["before"] * 1.1),
            "figures_identical": identical}


def markdown(result: dict) -> str:
    if "error" in result:
        return f"# Dashboard load\n\nThe benchmark did not run: {result['error']}\n"
    r, m = result, result["reload_median_seconds"]
    return f"""# Dashboard load: the label-quality sections per page load

{r['started']}, {r['machine']}. {r['items']} Davidson items, {r['annotations']} annotations by two simulated
reviewers, 10 % each of honeypots, overlap copies and audit items; median of {r['repeats']} loads.
Run: `.venv/bin/python bench/dashboard_load.py`.

| | before (4 reports, label-error fit every load) | after (`PageQuality`) | goal |
|---|---|---|---|
| reload, no new labels | {m['before']:.3f} s | {m['after']:.3f} s (**{r['reload_speedup']}x**) | \
>= {r['goal_reload_speedup']:.0f}x |
| first load | {m['before']:.3f} s | {r['first_load_after_seconds']:.3f} s | no slower |

Goal met: {'yes' if r['goal_met'] else 'no'}. Figures identical before and after: \
{'yes' if r['figures_identical'] else 'NO'}.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    head = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    try:
        result = {**head, **run(args)}
    except Exception as e:  # a fresh clone without ../shared/data or the encoder: say so, do not crash
        traceback.print_exc()
        result = {**head, "error": f"{type(e).__name__}: {e}"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dashboard_load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "dashboard_load.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
