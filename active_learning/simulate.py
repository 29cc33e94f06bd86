"""Offline replay of the labeling loop: which query strategy gets the best model for the fewest labels?

A simulated reviewer returns each queried item's gold label (optionally flipping a fixed share, to
see how strategies cope with noisy reviewers). Every round refits the fast-mode model (cached frozen
embeddings, with hashed n-grams for a single-label taxonomy unless ``fast_ngram_features`` is 0, +
logistic-regression head: the same
encoder and ``fit_head`` the product trains with), scores it on a
held-out test split, and asks the strategy for the next batch — about a third of a second per round
on a 20k pool, so ten seeds of several strategies run in minutes.

Comparisons are paired by seed: for a given seed every strategy starts from the same initial labels
and meets the same reviewer mistakes, so differences between strategies are not seed luck.

Multi-label taxonomies replay the same way with one balanced logistic-regression head per label (the
product's ``fit_head`` on each label's yes/no column) and per-label decisions at a fixed 0.5 threshold:
tuning thresholds would need a validation slice carved out of a labeled set of a few dozen items, which
costs more labels than it saves at these budgets, and a class-balanced head already centres each label's
decision near 0.5. The curves then carry macro-F1 and per-label F1 over labels, micro-F1 and subset
accuracy.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from active_learning.pool import bootstrap_committee_proba
from active_learning.stopping import StoppingMonitor
from active_learning.strategies import MULTI, SINGLE, PoolContext, QueryStrategy, get_strategy, parse_strategy
from labelloop import data
from labelloop.config import Settings, get_settings
from labelloop.taxonomy import Taxonomy
from training.classifier import EmbeddingHeadClassifier, Encoder, load_encoder
from training.evaluate import evaluate_proba
from training.fast import DEFAULT_C, EmbeddingCache, fast_encoder_name, fit_head

ColdStart = Literal["kmeans", "random"]
Progress = Callable[[dict], None]
MC_MEMBERS = 5  # bootstrap committee size for BALD: 5 refits keep a round near a second
MULTI_LABEL_THRESHOLD = 0.5
#: the arms ``labelloop simulate`` compares when none are named, per kind of taxonomy
DEFAULT_ARMS = {SINGLE: ("random", "entropy", "margin", "margin_kmeans"),
                MULTI: ("random", "mean_binary_entropy", "max_binary_entropy", "cardinality")}


@dataclass
class SimulationResult:
    """Learning curves: one row of ``curves`` per (strategy, seed, round)."""

    dataset: str
    labels: tuple[str, ...]
    rare_class: str
    curves: pd.DataFrame
    config: dict = field(default_factory=dict)
    parent_run_id: str | None = None
    paths: tuple[Path, ...] = ()  # the files written under ``out_dir``: CSV, Markdown summary, PNG
    #: (strategy spec, seed) → pool row indices (of :func:`pool_and_test`'s pool) that run had labeled when
    #: it ended: the exact label set, so a final model can be trained on what the loop chose
    #: (bench/al_transfer.py fine-tunes on it)
    labeled: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def paired_gain(self, strategy: str, at: int, baseline: str = "random") -> tuple[float, float, int]:
        return paired_gain(self.curves, strategy, at, baseline)

    def labels_to_reach(self, target: float) -> pd.DataFrame:
        return labels_to_reach(self.curves, target)


def pool_and_test(labeled: data.LabeledData, split_seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The unlabeled pool and the test split. Official splits: pool = train, test = test (validation
    unused). Otherwise a stratified 80/20 split — the same protocol as the measured baselines; a
    multi-label set is stratified by each item's first label (label *sets* are mostly too rare to
    stratify on: ETHOS's 433 items carry dozens of distinct sets)."""
    if labeled.taxonomy.multi and not labeled.has_official_splits:
        frame = labeled.frame
        first = frame["label"].map(lambda labels: labels[0] if len(labels) else "")
        strata = first if first.value_counts().min() >= 2 else None
        pool, test = train_test_split(frame, test_size=0.2, random_state=split_seed, stratify=strata)
        return pool.reset_index(drop=True), test.reset_index(drop=True)
    parts = data.split(labeled, seed=split_seed)
    if labeled.has_official_splits:
        return parts.train, parts.test
    return pd.concat([parts.train, parts.validation], ignore_index=True), parts.test


def simulate(
    dataset: str | data.LabeledData,
    strategies: Sequence[str] | None = ("random", "margin"),
    seeds: int | Sequence[int] = 3,
    budget: int = 2000,
    step: int = 100,
    initial: int = 100,
    noise: float = 0.0,
    settings: Settings | None = None,
    *,
    cold_start: ColdStart = "kmeans",
    C: float = DEFAULT_C,
    split_seed: int = 0,
    cache_dir: Path | None = None,
    out_dir: Path | None = None,
    log_to_mlflow: bool = True,
    progress: Progress | None = None,
    taxonomy: str | None = None,
    load_options: dict | None = None,
) -> SimulationResult:
    """Replay active learning on ``dataset`` (a shared dataset name or loaded data) for every strategy
    spec and seed: ``initial`` labels chosen by ``cold_start`` (k-means over embeddings as the product
    does, or ``"random"`` to reproduce the classic random-seed-set protocol), then batches of ``step``
    chosen by the strategy until ``budget`` labels. ``noise``: the share of reviewer answers replaced
    by a wrong label. ``cache_dir``: embedding cache (default: the settings'
    cache). ``out_dir``: also write ``al_curves_<dataset name>`` CSV, Markdown summary and PNG there, the
    CSV row by row and the summary after every (strategy, seed) run, so a crash late in a long run keeps
    what was computed (and attach them to the MLflow run). ``progress`` receives each round's row as it
    is recorded. ``strategies=None``: :data:`DEFAULT_ARMS` for the dataset's kind of taxonomy;
    ``taxonomy``: the taxonomy to load a file's labels in (default: the dataset's, else the settings');
    ``load_options``: more keyword arguments for :func:`labelloop.data.load` (columns, a ``LabelSpec``).
    A strategy not defined for the taxonomy's kind (margin on a multi-label one) is refused before
    anything is loaded or embedded."""
    settings = settings or get_settings()
    if budget < initial or initial < 1 or step < 1:
        raise ValueError("need 1 <= initial <= budget and step >= 1")
    if not 0.0 <= noise < 1.0:
        raise ValueError("noise must lie in [0, 1)")
    if cold_start not in ("kmeans", "random"):
        raise ValueError("cold_start must be 'kmeans' or 'random'")
    if strategies is not None:
        for spec in strategies:  # a bad name fails before the data is loaded; the kind is checked below
            parse_strategy(spec)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)

    labeled = (dataset if isinstance(dataset, data.LabeledData)
               else data.load(dataset, taxonomy=taxonomy, settings=settings, **(load_options or {})))
    kind = label_kind(labeled.taxonomy)
    specs = DEFAULT_ARMS[kind.name] if strategies is None else strategies
    arms = {spec: parse_strategy(spec, labeled.taxonomy.multi) for spec in specs}
    if not arms:
        raise ValueError("no strategies given")
    labels = labeled.taxonomy.labels
    pool, test = pool_and_test(labeled, split_seed)
    if len(pool) < budget:
        raise ValueError(f"budget {budget} exceeds the pool ({len(pool)} items)")
    encoder = load_encoder(fast_encoder_name(settings, labeled.taxonomy.multi), settings.max_length)
    cache = EmbeddingCache(cache_dir or settings.cache_dir / "embeddings", encoder)
    embeddings = cache.get(pool["text"].tolist() + test["text"].tolist())
    world = _World(embeddings[: len(pool)], kind.label_ids(labeled, pool), embeddings[len(pool):],
                   kind.label_ids(labeled, test), labels, encoder, kind,
                   np.array([labels.index(s) for s in settings.review_policy.severity.severe_labels if s in labels],
                            dtype=np.int64))
    rare = int(np.argmin(kind.label_counts(world.pool_y, len(labels))))
    config = {"dataset": labeled.source, "strategies": ",".join(arms), "seeds": ",".join(map(str, seed_list)),
              "budget": budget, "step": step, "initial": initial, "noise": noise, "cold_start": cold_start,
              "C": C, "encoder": encoder.name, "split_seed": split_seed, "pool_size": len(pool), "test_size": len(test),
              "rare_class": labels[rare], "multi_label": labeled.taxonomy.multi, **kind.config}

    # the output directory is made before hours of work, not after: a bad --out fails at once
    files = CurveFiles(out_dir, curve_stem(labeled.source)) if out_dir is not None else None
    tracker = _Tracker(settings, config) if log_to_mlflow else None
    rows: list[dict] = []
    chosen: dict[tuple[str, int], np.ndarray] = {}
    starts = {seed: _initial_set(world, seed, initial, cold_start) for seed in seed_list}

    def result_so_far() -> SimulationResult:
        return SimulationResult(labeled.source, labels, labels[rare], pd.DataFrame(rows), config,
                                tracker.parent_id if tracker else None, files.paths if files else (), dict(chosen))

    runs_total, runs_done = len(arms) * len(seed_list), 0
    try:
        for spec, strategy in arms.items():
            for seed in seed_list:
                run_id = tracker.start(f"{spec}-seed{seed}", {"strategy": spec, "seed": seed}) if tracker else None
                is_labeled = np.zeros(len(world.pool_y), dtype=bool)
                for row in _replay(world, strategy, seed, starts[seed], budget, step, noise, C, is_labeled):
                    row = {"strategy": spec, "seed": seed, **row}
                    rows.append(row)
                    if files:
                        files.append(row)
                    if tracker:
                        tracker.log_round(run_id, row)
                    if progress:
                        progress(row)
                chosen[(spec, seed)] = np.flatnonzero(is_labeled)
                if tracker:
                    tracker.finish(run_id)
                runs_done += 1
                if files:
                    files.write_summary(result_so_far(), runs_done, runs_total)
        if files:
            files.write_plot(result_so_far())
            if tracker:
                tracker.attach(files.paths)
        result = result_so_far()
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    if tracker:
        tracker.finish(tracker.parent_id)
    return result


class LabelKind(ABC):
    """What a replay does differently for single- and multi-label taxonomies: how labels are encoded,
    how a simulated reviewer errs, which head is fitted and which metrics a round reports."""

    name: str
    multi_label: bool
    config: dict = {}

    @abstractmethod
    def label_ids(self, labeled: data.LabeledData, frame: pd.DataFrame) -> np.ndarray:
        """Gold labels of ``frame`` as model targets."""

    @abstractmethod
    def reviewer_answers(self, gold: np.ndarray, n_classes: int, noise: float,
                         rng: np.random.Generator) -> np.ndarray:
        """What the simulated reviewers answer for every pool item (see :func:`_reviewer_answers`)."""

    @abstractmethod
    def can_fit(self, y: np.ndarray) -> bool:
        """Whether the labels so far can train a model at all."""

    @abstractmethod
    def fit(self, world: _World, x: np.ndarray, y: np.ndarray, seed: int, C: float):
        """A model with ``proba_from_embeddings``; single-label models also expose ``head`` (BALD)."""

    @abstractmethod
    def metrics(self, proba: np.ndarray, y_true: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
        """Test-set metrics of one round: ``macro_f1`` and ``f1_<label>`` always, plus the kind's own."""

    @abstractmethod
    def decisions(self, proba: np.ndarray) -> np.ndarray:
        """The model's decisions as one flat vector, for the stabilising-predictions stop signal."""

    @abstractmethod
    def label_counts(self, y: np.ndarray, n_classes: int) -> np.ndarray:
        """Per label, how many of the items in ``y`` carry it."""

    @abstractmethod
    def n_wrong(self, observed: np.ndarray, gold: np.ndarray) -> int:
        """How many reviewer answers differ from gold."""


class SingleLabel(LabelKind):
    name = SINGLE
    multi_label = False

    def label_ids(self, labeled, frame):
        return labeled.label_ids(frame)

    def reviewer_answers(self, gold, n_classes, noise, rng):
        return _reviewer_answers(gold, n_classes, noise, rng)

    def can_fit(self, y):
        return len(np.unique(y)) >= 2

    def fit(self, world, x, y, seed, C):
        return EmbeddingHeadClassifier(world.encoder, fit_head(x, y, seed=seed, C=C), world.labels)

    def metrics(self, proba, y_true, labels):
        report = evaluate_proba(proba, y_true, labels)
        return {"macro_f1": report.macro_f1, "accuracy": report.accuracy,
                **{f"f1_{label}": report.per_class[label]["f1"] for label in labels}}

    def decisions(self, proba):
        return proba.argmax(1)

    def label_counts(self, y, n_classes):
        return np.bincount(y, minlength=n_classes)

    def n_wrong(self, observed, gold):
        return int((observed != gold).sum())


class MultiLabel(LabelKind):
    """One yes/no head per label, decisions at :data:`MULTI_LABEL_THRESHOLD` (see the module docstring)."""

    name = MULTI
    multi_label = True
    config = {"threshold": MULTI_LABEL_THRESHOLD, "head": "one balanced logistic regression per label"}

    def label_ids(self, labeled, frame):
        return labeled.taxonomy.encode(frame["label"])

    def reviewer_answers(self, gold, n_classes, noise, rng):
        """Gold sets, except an exact ``noise`` share of items with one uniformly chosen label flipped
        (a target missed or one added): the commonest reviewer slip on a multi-label form."""
        answers = gold.copy()
        flip = rng.choice(len(gold), size=int(round(noise * len(gold))), replace=False)
        which = rng.integers(0, n_classes, size=len(flip))
        answers[flip, which] = 1 - answers[flip, which]
        return answers

    def can_fit(self, y):
        return bool((y.min(axis=0) != y.max(axis=0)).any())

    def fit(self, world, x, y, seed, C):
        return _PerLabelHeads([fit_head(x, y[:, k], seed=seed, C=C) if y[:, k].min() != y[:, k].max()
                               else _ConstantHead(float(y[0, k])) for k in range(y.shape[1])])

    def metrics(self, proba, y_true, labels):
        predicted = (proba >= MULTI_LABEL_THRESHOLD).astype(int)
        per_label = f1_score(y_true, predicted, average=None, zero_division=0)
        return {"macro_f1": float(per_label.mean()),
                "micro_f1": float(f1_score(y_true, predicted, average="micro", zero_division=0)),
                "subset_accuracy": float(accuracy_score(y_true, predicted)),
                **{f"f1_{label}": float(f) for label, f in zip(labels, per_label, strict=True)}}

    def decisions(self, proba):
        return (proba >= MULTI_LABEL_THRESHOLD).astype(int).ravel()

    def label_counts(self, y, n_classes):
        return np.asarray(y).sum(axis=0)

    def n_wrong(self, observed, gold):
        return int((observed != gold).any(axis=1).sum())


class _ConstantHead:
    """A label whose labeled items all agree: that answer for every item (0 for a label never seen
    yet), because a classifier cannot be fitted on one class."""

    def __init__(self, p: float):
        self.p = p

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        return np.tile([1.0 - self.p, self.p], (len(embeddings), 1))


class _PerLabelHeads:
    """Independent per-label probabilities: column ``k`` is head ``k``'s probability of "yes"."""

    def __init__(self, heads: list):
        self.heads = heads

    def proba_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        proba = np.empty((len(embeddings), len(self.heads)), dtype=np.float32)
        for k, head in enumerate(self.heads):
            proba[:, k] = head.predict_proba(embeddings)[:, 1]
        return proba


def label_kind(taxonomy: Taxonomy) -> LabelKind:
    return MultiLabel() if taxonomy.multi else SingleLabel()


@dataclass
class _World:
    pool_x: np.ndarray
    pool_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: tuple[str, ...]
    encoder: Encoder
    kind: LabelKind = field(default_factory=SingleLabel)
    #: class indices of the severe labels (the review policy's ``severe_labels``), for severity_weighted
    severe_classes: np.ndarray | None = None


def _reviewer_answers(gold: np.ndarray, n_classes: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """What the simulated reviewers would answer for every pool item: gold, except an exact ``noise``
    share of items that get a uniformly chosen wrong label. Fixed per seed, so all strategies meet the
    same mistakes on the same items."""
    answers = gold.copy()
    flip = rng.choice(len(gold), size=int(round(noise * len(gold))), replace=False)
    answers[flip] = (gold[flip] + rng.integers(1, n_classes, size=len(flip))) % n_classes
    return answers


def _initial_set(world: _World, seed: int, initial: int, cold_start: ColdStart) -> np.ndarray:
    """The first ``initial`` pool items to label, before any model exists; depends only on the seed,
    so every strategy of a seed starts from the same labels (and k-means runs once per seed)."""
    start = get_strategy("cold_start") if cold_start == "kmeans" else get_strategy("random")
    ctx = PoolContext(len(world.labels), embeddings=world.pool_x, multi_label=world.kind.multi_label)
    return start.select(ctx, initial, np.random.default_rng([seed, 0]))


def _replay(world: _World, strategy: QueryStrategy, seed: int, start_set: np.ndarray, budget: int, step: int,
            noise: float, C: float, is_labeled: np.ndarray | None = None):
    """Yield one row per round for one strategy and seed. ``is_labeled``: an all-False mask over the pool,
    marked as items are labeled, so the caller knows the run's label set when it ends."""
    n_classes, kind = len(world.labels), world.kind
    answers = kind.reviewer_answers(world.pool_y, n_classes, noise, np.random.default_rng([seed, 1]))
    is_labeled = np.zeros(len(world.pool_y), dtype=bool) if is_labeled is None else is_labeled
    is_labeled[start_set] = True
    explore = get_strategy("random")
    rng = np.random.default_rng([seed, 2])
    monitor = StoppingMonitor()
    stop_at = np.nan
    round_no = 0
    while True:
        t0 = time.perf_counter()
        labeled_idx = np.flatnonzero(is_labeled)
        y_obs = answers[labeled_idx]
        if not kind.can_fit(y_obs):  # no model from one class: keep exploring until a second appears
            if len(labeled_idx) >= budget:
                raise ValueError(f"all {budget} labels came back as one class: nothing to train on")
            _label(is_labeled, explore, world, None, min(step, budget - len(labeled_idx)), rng)
            continue
        model = kind.fit(world, world.pool_x[labeled_idx], y_obs, seed, C)
        pool_proba = model.proba_from_embeddings(world.pool_x)
        seconds = time.perf_counter() - t0
        scores = kind.metrics(model.proba_from_embeddings(world.test_x), world.test_y, world.labels)
        signal = monitor.update(round_no, kind.decisions(pool_proba), None)
        if signal.stop and np.isnan(stop_at):
            stop_at = float(len(labeled_idx))
        counts = kind.label_counts(world.pool_y[labeled_idx], n_classes)
        row = {"round": round_no, "n_labels": len(labeled_idx), **scores,
               **{f"labeled_{label}": int(c) for label, c in zip(world.labels, counts, strict=True)},
               "noisy_labels": kind.n_wrong(y_obs, world.pool_y[labeled_idx]),
               "kappa": np.nan if signal.kappa is None else signal.kappa, "kappa_stop_at": stop_at}
        done = len(labeled_idx) >= budget or is_labeled.all()
        if not done:
            t1 = time.perf_counter()
            _label(is_labeled, strategy, world, (model, pool_proba, labeled_idx, y_obs, seed),
                   min(step, budget - len(labeled_idx)), rng)
            seconds += time.perf_counter() - t1
        # round_seconds: refit the head + score the whole pool + choose the next batch (the work a
        # live round does; test-set evaluation is simulation overhead and not counted)
        yield row | {"round_seconds": seconds}
        if done:
            return
        round_no += 1


def _label(is_labeled: np.ndarray, strategy: QueryStrategy, world: _World, model_state, k: int,
           rng: np.random.Generator) -> None:
    """Ask ``strategy`` for ``k`` unlabeled items and mark them labeled."""
    unlabeled = np.flatnonzero(~is_labeled)
    ctx = PoolContext(len(world.labels), size=len(unlabeled), multi_label=world.kind.multi_label,
                      severe_classes=world.severe_classes)
    if "embeddings" in strategy.needs:
        ctx.embeddings = world.pool_x[unlabeled]
    if model_state is not None:
        model, pool_proba, labeled_idx, y_obs, seed = model_state
        ctx.proba = pool_proba[unlabeled]
        ctx.labeled_embeddings, ctx.labeled_y = world.pool_x[labeled_idx], y_obs
        if "mc_proba" in strategy.needs:
            ctx.mc_proba = bootstrap_committee_proba(model.head, ctx.labeled_embeddings, y_obs,
                                                     world.pool_x[unlabeled], len(world.labels), MC_MEMBERS,
                                                     np.random.default_rng([seed, len(labeled_idx)]))
    is_labeled[unlabeled[strategy.select(ctx, k, rng)]] = True


_NOT_METRICS = frozenset({"strategy", "seed", "round", "n_labels", "kappa_stop_at"})


class _Tracker:
    """One MLflow parent run per simulation, a nested run per (strategy, seed), one metrics batch per
    round with step = number of labels. Uses an explicit client, so the process-wide tracking URI of
    whoever called us is left alone. MLflow is imported here, not at module level, so that a replay
    without tracking (``log_to_mlflow=False``, as ``bench/al_transfer.py`` runs it on a GPU machine that
    has no MLflow) needs none of it."""

    def __init__(self, settings: Settings, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.resolved_tracking_uri)
        name = f"{settings.experiment}-al-simulation"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                name, artifact_location=settings.resolved_artifact_location)
        else:
            self.experiment_id = experiment.experiment_id
        run = self.client.create_run(self.experiment_id, run_name=f"simulate-{config['dataset']}",
                                     tags={"labelloop.kind": "al-simulation"})
        self.parent_id = run.info.run_id
        self.open: list[str] = [self.parent_id]
        self.client.log_batch(self.parent_id, params=[Param(k, str(v)) for k, v in config.items()])

    def start(self, name: str, params: dict) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.parent_id, "labelloop.kind": "al-simulation"})
        self.open.append(run.info.run_id)
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id

    def log_round(self, run_id: str, row: dict) -> None:
        """Every number of the round (the kind's metrics, per-label F1 and counts, timing, kappa once
        defined), except the identifiers and the stop point, which are parameters of the run."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        keys = [key for key, value in row.items() if key not in _NOT_METRICS and not pd.isna(value)]
        metrics = [Metric(key, float(row[key]), now, int(row["n_labels"])) for key in keys]
        self.client.log_batch(run_id, metrics=metrics)

    def attach(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.parent_id, str(path))

    def finish(self, run_id: str) -> None:
        from mlflow.entities import RunStatus

        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        self.open.remove(run_id)

    def fail(self) -> None:
        from mlflow.entities import RunStatus

        for run_id in list(self.open):
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        self.open.clear()


# --------------------------------------------------------------------------------------------------
# Summaries and plots
# --------------------------------------------------------------------------------------------------


def at_labels(curves: pd.DataFrame, n: int, column: str = "macro_f1") -> pd.DataFrame:
    """``column`` per strategy (rows: seeds) at exactly ``n`` labels."""
    rows = curves[curves["n_labels"] == n]
    return rows.pivot_table(index="seed", columns="strategy", values=column)


def paired_gain(curves: pd.DataFrame, strategy: str, at: int, baseline: str = "random", column: str = "macro_f1"
                ) -> tuple[float, float, int]:
    """Mean and sd over seeds of (strategy - baseline) ``column`` (macro-F1) at ``at`` labels, and the
    number of seed pairs — paired, because seed-to-seed spread is larger than most strategy differences."""
    table = at_labels(curves, at, column)
    if strategy not in table or baseline not in table:
        raise ValueError(f"no rows for {strategy!r} and {baseline!r} at {at} labels")
    diff = (table[strategy] - table[baseline]).dropna()
    return float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0, int(len(diff))


def labels_to_reach(curves: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per strategy: the labels each seed needed to first reach macro-F1 ``target`` (NaN if never),
    summarised as mean over the seeds that reached it and the share that did."""
    reached = curves[curves["macro_f1"] >= target].groupby(["strategy", "seed"])["n_labels"].min()
    seeds = curves.groupby("strategy")["seed"].nunique()
    out = pd.DataFrame({"mean_labels": reached.groupby("strategy").mean(),
                        "seeds_reached": reached.groupby("strategy").size()}).reindex(seeds.index)
    out["seeds_reached"] = out["seeds_reached"].fillna(0).astype(int)
    out["seeds"] = seeds
    return out


def curve_summary(curves: pd.DataFrame, column: str = "macro_f1") -> pd.DataFrame:
    """Mean and sd over seeds of ``column`` per (strategy, n_labels)."""
    return curves.groupby(["strategy", "n_labels"])[column].agg(["mean", "std"]).reset_index()


def checkpoints(budget: int) -> list[int]:
    """Label counts the summaries report: 500, 1,000 and the budget, each once, none past the budget."""
    return sorted({n for n in (500, 1000, budget) if n <= budget})


def gain_table(curves: pd.DataFrame, strategies: Sequence[str], budget: int, baseline: str = "random"
               ) -> pd.DataFrame:
    """Paired macro-F1 gain over ``baseline`` in points, "mean ± sd" per strategy (rows) and checkpoint
    (columns ``@n``); "-" where no seed pair reached that many labels. Empty without the baseline."""
    cols = [f"@{n}" for n in checkpoints(budget)]
    rows = {}
    for name in (s for s in strategies if s != baseline and baseline in strategies):
        cells = []
        for n in checkpoints(budget):
            try:
                mean, sd, _ = paired_gain(curves, name, n, baseline)
                cells.append(f"{mean * 100:+.1f} ± {sd * 100:.1f}")
            except ValueError:
                cells.append("-")
        rows[name] = cells
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols).rename_axis("strategy")


def f1_table(curves: pd.DataFrame, strategies: Sequence[str], budget: int, column: str = "macro_f1"
             ) -> pd.DataFrame:
    """``column`` (macro-F1 by default) "mean ± sd" over seeds per strategy (rows) and checkpoint
    (columns ``@n``)."""
    cols = {}
    for n in checkpoints(budget):
        at = at_labels(curves, n, column)
        cols[f"@{n}"] = {name: _mean_sd(at[name].dropna()) if name in at else "-" for name in strategies}
    return pd.DataFrame(cols, index=list(strategies)).rename_axis("strategy")


def _mean_sd(values: pd.Series) -> str:
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {sd:.3f}"


def summary_markdown(result: SimulationResult, runs_done: int, runs_total: int) -> str:
    """The human-readable summary of (possibly part of) a simulation."""
    curves, config = result.curves, result.config
    strategies = list(dict.fromkeys(curves["strategy"]))
    budget = int(config.get("budget", curves["n_labels"].max()))
    state = ("complete" if runs_done == runs_total
             else f"**in progress or interrupted: {runs_done} of {runs_total} runs finished**")
    lines = [f"# Active-learning simulation: {result.dataset}", "",
             f"{state}. Strategies {', '.join(strategies)}; seeds {config.get('seeds', '?')}; "
             f"initial {config.get('initial', '?')} ({config.get('cold_start', '?')} cold start), batches of "
             f"{config.get('step', '?')} to {budget} labels; reviewer noise {config.get('noise', 0)}; pool "
             f"{config.get('pool_size', '?')}, test {config.get('test_size', '?')}; rare class "
             f"'{result.rare_class}'.", ""]
    if config.get("multi_label"):
        lines += [f"Multi-label: {config.get('head', 'a head per label')}, per-label decisions at a fixed "
                  f"threshold of {config.get('threshold', MULTI_LABEL_THRESHOLD)} (no validation slice); macro-F1 "
                  "is the mean of the labels' F1.", ""]
    lines += ["## Macro-F1 on the test split (mean ± sd over seeds)", "",
              _markdown(f1_table(curves, strategies, budget))]
    gains = gain_table(curves, strategies, budget)
    if not gains.empty:
        lines += ["", "## Macro-F1 gain over random, points (paired by seed, mean ± sd)", "", _markdown(gains)]
    for column, title in (("micro_f1", "Micro-F1"), ("subset_accuracy", "Subset accuracy (exact label set)")):
        if column in curves:
            lines += ["", f"## {title} on the test split (mean ± sd over seeds)", "",
                      _markdown(f1_table(curves, strategies, budget, column))]
    return "\n".join(lines) + "\n"


def _markdown(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *map(str, table.columns)]
    rows = [[str(i), *map(str, row)] for i, row in zip(table.index, table.to_numpy().tolist(), strict=True)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


_DATA_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".gz", ".bz2", ".xz", ".zip"}


def curve_stem(dataset: str) -> str:
    """``al_curves_<name>``, a plain file name whatever ``dataset`` is: a shared name as it is, a file by its
    stem (``data/my file.csv`` → ``al_curves_my_file``), a hub id with ``/`` turned into ``_``. The name of
    a file path once became a directory the writer could not find, after the whole simulation had run."""
    path = Path(dataset).expanduser()
    if path.suffix.lower() in _DATA_SUFFIXES or dataset.startswith((".", "/", "~")) or path.is_file():
        name = path.name
        while Path(name).suffix.lower() in _DATA_SUFFIXES:
            name = Path(name).stem
    else:
        name = dataset
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return f"al_curves_{name or 'dataset'}"


class CurveFiles:
    """A simulation's output files, written while it runs: each round's row is appended to the CSV as it
    is computed and the Markdown summary is rewritten after every (strategy, seed) run, so an
    interrupted simulation leaves every finished round on disk; the PNG comes at the end."""

    def __init__(self, out_dir: Path, stem: str):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv, self.md, self.png = (out_dir / f"{stem}{ext}" for ext in (".csv", ".md", ".png"))
        self._header = True
        for path in (self.csv, self.md, self.png):  # an earlier run's files must not mix with this one's
            path.unlink(missing_ok=True)

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.csv, self.md, self.png) if p.exists())

    def append(self, row: dict) -> None:
        pd.DataFrame([row]).to_csv(self.csv, mode="a", header=self._header, index=False, float_format="%.5f")
        self._header = False

    def write_summary(self, result: SimulationResult, runs_done: int, runs_total: int) -> None:
        tmp = self.md.with_name(f".{self.md.name}.tmp")
        tmp.write_text(summary_markdown(result, runs_done, runs_total))
        tmp.replace(self.md)  # a reader never sees half a summary

    def write_plot(self, result: SimulationResult) -> None:
        plot_curves(result, self.png)


def write_curves(result: SimulationResult, out_dir: Path, stem: str | None = None) -> tuple[Path, Path]:
    """Write every round as CSV and the plot (see :func:`plot_curves`), for curves computed elsewhere."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or curve_stem(result.dataset)
    csv_path, png_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.png"
    result.curves.to_csv(csv_path, index=False, float_format="%.5f")
    plot_curves(result, png_path)
    return csv_path, png_path


def plot_curves(result: SimulationResult, png_path: Path) -> None:
    """Mean ± sd over seeds: macro-F1, the rare class's F1 and how many rare-class items each strategy
    got labeled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rare = result.rare_class
    panels = [("macro_f1", "macro-F1 (test)"), (f"f1_{rare}", f"F1 of rare class '{rare}'"),
              (f"labeled_{rare}", f"'{rare}' items labeled")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    n_seeds = result.curves["seed"].nunique()
    for ax, (column, title) in zip(axes, panels, strict=True):
        summary = curve_summary(result.curves, column)
        for strategy in dict.fromkeys(result.curves["strategy"]):  # legend in run order, baseline dashed
            part = summary[summary["strategy"] == strategy]
            style = {"color": "black", "ls": "--"} if strategy == "random" else {}
            line, = ax.plot(part["n_labels"], part["mean"], label=strategy, lw=1.6, **style)
            sd = part["std"].fillna(0.0)
            ax.fill_between(part["n_labels"], part["mean"] - sd, part["mean"] + sd, color=line.get_color(),
                            alpha=0.15, lw=0)
        ax.set_title(title)
        ax.set_xlabel("labels")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result.dataset}: active learning, mean ± sd over {n_seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
