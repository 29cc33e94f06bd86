"""Lever study for fast-mode active learning: which change to the head's features, its regularisation or
the query strategy buys the most macro-F1 per label (issue 15, part 2)?

    nice -n 5 .venv/bin/python bench/al_levers.py                              # Davidson, 10 seeds
    nice -n 5 .venv/bin/python bench/al_levers.py --datasets tweeteval_offensive --arms finalists
    .venv/bin/python bench/al_levers.py --seeds 2 --arms quick                 # smoke run

The selection study (``bench/results/al_levers_selection.md``): ``--arms selection`` and ``selection2`` on
Davidson, ``selection_te`` and ``selection2_te`` on TweetEval-offensive, each with ``--tag _selection``; its
float32 check ``--arms selection_check`` and ``selection3`` with ``--tag _check``, and ``--arms selection_check
--initial 50 --step 50 --tag _init50``. A run
resumes from the finished (arm, seed) pairs already in its CSV (``--fresh`` starts over), and writes the CSV after
every run. To replay on a machine with more cores but without the data or the encoder::

    .venv/bin/python bench/al_levers.py --datasets davidson,tweeteval_offensive --export-arrays .alsel/arrays
    python3 bench/al_levers.py --arms selection --arrays .alsel/arrays --jobs 16 --no-timing --tag _selection
    .venv/bin/python bench/al_levers.py --datasets davidson --from-csv bench/results/al_levers_davidson_selection.csv \
        --tag _selection --ran-on "..."        # back here: render, and time the rounds on this machine

Protocol (the one of ``bench/al_curves.py``): pool/test split of ``active_learning.simulate.pool_and_test``,
100 initial labels (the same per seed in every arm with the same start: random, or the product's k-means cold
start for arms that say ``kmeans start``), batches of 100 up to 2,000 labels, the head refit
from scratch each round, macro-F1 and the rare class's F1 on the test split. Every arm of a seed starts from
the same labels, so gains are paired by seed. Δ is an arm's gain over random sampling **with the same
features** (the gain active learning itself buys) and, separately, over today's product (frozen embeddings,
random sampling), which also counts what the better head buys.

The pool is embedded once (cached MiniLM embeddings); lexical features are built once per dataset, so each
round is a logistic-regression refit, a pool rescore and a batch choice.

Feature sets:

* ``emb``: frozen MiniLM embeddings (today's fast head);
* ``emb+tfidf``: embeddings next to TF-IDF word 1-2-grams and character 2-5-grams fitted on the pool's
  texts (an upper bound: the vocabulary and IDF need the pool);
* ``emb+hashN``: embeddings next to the same n-grams hashed into ``N`` signed buckets, l2-normalised per
  analyser (``emb+hashNxW``: the n-gram blocks scaled by ``W``, which regularises them more). No fitting,
  so a text's features depend on the text alone and are cached and served like an embedding: what the
  product's ``<base>+ngramsN`` encoder computes (:class:`training.classifier.NgramEncoder`).

Writes ``bench/results/al_levers_<dataset><tag>.csv`` (one row per arm, seed and checkpoint) and
``bench/results/al_levers<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402
from sklearn.feature_extraction.text import HashingVectorizer, TfidfVectorizer  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from active_learning.strategies import (  # noqa: E402
    STRATEGIES,
    ColdStartKMeans,
    DensityWeighted,
    DiverseKMeans,
    PoolContext,
    RareWeighted,
    parse_strategy,
)
from labelloop import data  # noqa: E402
from labelloop.config import Settings  # noqa: E402
from training.classifier import bootstrap_committee_proba, load_encoder  # noqa: E402
from training.fast import EmbeddingCache, fit_head  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = (200, 500, 1000, 1500, 2000)
GOALS = {"gain": 4.0, "macro_f1": 0.72, "rare_f1": 0.45}
#: dataset -> (macro-F1, rare-class F1, pool size) of the embedding head fitted on every pool label: the
#: ceiling the curves of that head are read against
FULL_DATA: dict[str, tuple[float, float, int]] = {}
MC_MEMBERS = 5  # bootstrap committee size, as the product's BALD uses (active_learning.simulate)


#: the cold starts an arm may use: 100 random items (the classic protocol) or the product's k-means start
STARTS = ("random", "kmeans")
#: an arm with ``early_step`` queries batches of that size until this many labels, then ``--step``
EARLY_UNTIL = 500


@dataclass(frozen=True)
class Arm:
    features: str
    strategy: str
    C: float = 1.0
    start: str = "random"
    early_step: int = 0

    @property
    def name(self) -> str:
        return (f"{self.features} · {self.strategy}" + (f" · C={self.C:g}" if self.C != 1.0 else "")
                + (f" · {self.start} start" if self.start != "random" else "")
                + (f" · batches of {self.early_step} to {EARLY_UNTIL}" if self.early_step else ""))

    @property
    def baseline(self) -> Arm:
        """Random sampling with the same features, C and cold start: what the strategy's gain is paired against
        (early batch sizes make no difference to random sampling)."""
        return Arm(self.features, "random", self.C, self.start)


def arm_of(row) -> Arm:
    """The arm a saved CSV row belongs to (rows written before arms had a start or early batches have neither)."""
    start = getattr(row, "start", "random")
    early = getattr(row, "early_step", 0)
    return Arm(row.features, row.strategy, float(row.C), start if isinstance(start, str) else "random",
               0 if pd.isna(early) else int(early))


def _arms(*specs: tuple) -> list[Arm]:
    return [Arm(*s) for s in specs]


ARM_SETS = {
    "davidson": _arms(
        ("emb", "random"), ("emb", "margin_kmeans"), ("emb", "kmeans20:margin"), ("emb", "kmeans5:margin"),
        ("emb", "severity_weighted:margin_kmeans"), ("emb", "margin_kmeans", 0.5), ("emb", "margin_kmeans", 2.0),
        ("emb+tfidf", "random"), ("emb+tfidf", "margin_kmeans"),
        ("emb+hash4096", "random"), ("emb+hash4096", "margin"), ("emb+hash4096", "margin_kmeans"),
        ("emb+hash4096", "class_balanced:margin_kmeans"), ("emb+hash4096", "severity_weighted:margin_kmeans"),
        ("emb+hash4096", "margin_kmeans", 0.5), ("emb+hash4096", "margin_kmeans", 2.0),
        ("emb+hash1024", "random"), ("emb+hash1024", "margin_kmeans")),
    "core": _arms(
        ("emb", "random"), ("emb", "margin_kmeans"), ("emb+hash4096", "random"), ("emb+hash4096", "margin_kmeans"),
        ("emb+hash4096", "margin"), ("emb+hash1024", "random"), ("emb+hash1024", "margin_kmeans")),
    "extras": _arms(
        ("emb+tfidf", "random"), ("emb+tfidf", "margin_kmeans"), ("emb+hash4096", "class_balanced:margin_kmeans"),
        ("emb+hash4096", "severity_weighted:margin_kmeans"), ("emb+hash4096", "margin_kmeans", 0.5),
        ("emb+hash4096", "margin_kmeans", 2.0), ("emb", "kmeans20:margin")),
    "scaled": _arms(("emb+hash4096x0.5", "random"), ("emb+hash4096x0.5", "margin_kmeans")),
    "default": _arms(("emb", "random"), ("emb+hash4096x0.5", "random"), ("emb+hash4096x0.5", "margin_kmeans"),
                     ("emb", "margin_kmeans")),
    "finalists": _arms(
        ("emb", "random"), ("emb+hash4096", "random"), ("emb+hash4096", "margin_kmeans"),
        ("emb+hash4096", "margin"), ("emb", "margin_kmeans"), ("emb", "margin")),
    "quick": _arms(("emb", "random"), ("emb", "margin_kmeans"), ("emb+hash4096", "random"),
                   ("emb+hash4096", "margin_kmeans")),
    # selection levers with today's head (the embedding): rare-class-aware scores and quotas, the k-means
    # candidate pool, smaller early batches, the k-means cold start, committee disagreement
    "selection": _arms(
        ("emb", "random"), ("emb", "margin_kmeans"), ("emb", "random", 1.0, "kmeans"),
        ("emb", "margin_kmeans", 1.0, "kmeans"), ("emb", "class_balanced:margin_kmeans"),
        ("emb", "class_balanced:margin_kmeans", 1.0, "kmeans"), ("emb", "kmeans3:margin"),
        ("emb", "kmeans5:margin"), ("emb", "kmeans20:margin"), ("emb", "kmeans5:margin", 1.0, "kmeans"),
        ("emb", "kmeans3:margin", 1.0, "kmeans"), ("emb", "margin_kmeans", 1.0, "random", 50),
        ("emb", "margin_kmeans", 1.0, "kmeans", 50), ("emb", "kmeans:committee_margin"),
        ("emb", "kmeans:committee_margin", 1.0, "kmeans"), ("emb", "kmeans:rare_weighted0.5:margin"),
        ("emb", "kmeans:rare_weighted0.25:margin"), ("emb", "kmeans:rare_weighted:margin"),
        ("emb", "severity_weighted:margin_kmeans"), ("emb", "margin"), ("emb", "badge"),
        ("emb", "badge", 1.0, "kmeans")),
    # second round: information density, the head's C, and more seeds for the closest arms
    "selection2": _arms(
        ("emb", "random"), ("emb", "margin_kmeans"), ("emb", "kmeans3:margin"),
        ("emb", "kmeans:density_weighted:margin"), ("emb", "kmeans:density_weighted0.5:margin"),
        ("emb", "kmeans:density_weighted2:margin"), ("emb", "density_weighted:margin"),
        ("emb", "kmeans3:density_weighted:margin"),
        ("emb", "random", 0.5), ("emb", "margin_kmeans", 0.5), ("emb", "random", 0.25), ("emb", "margin_kmeans", 0.25),
        ("emb", "random", 4.0), ("emb", "margin_kmeans", 4.0)),
    "selection2_te": _arms(
        ("emb", "random"), ("emb", "margin_kmeans"), ("emb", "kmeans3:margin"),
        ("emb", "kmeans:density_weighted:margin"), ("emb", "kmeans:density_weighted0.5:margin"),
        ("emb", "kmeans:density_weighted2:margin"), ("emb", "kmeans3:density_weighted:margin"),
        ("emb", "random", 0.5), ("emb", "margin_kmeans", 0.5)),
    # the closest arms again on this machine from the float32 cache, against the float16 copies replayed elsewhere
    "selection_check": _arms(("emb", "random"), ("emb", "margin_kmeans"), ("emb", "kmeans3:margin")),
    # other uncertainty scores under the diversity step, and (with --initial 50) a smaller random seed set
    "selection3": _arms(("emb", "random"), ("emb", "margin_kmeans"), ("emb", "kmeans:entropy"),
                        ("emb", "kmeans:least_confidence"), ("emb", "margin_kmeans", 1.0, "random", 50),
                        ("emb", "mixed:margin_kmeans")),
    # TweetEval-offensive: the n-gram head (item 2 of the study) and the selection levers' candidates
    "selection_te": _arms(
        ("emb", "random"), ("emb", "margin_kmeans"), ("emb+hash4096x0.5", "random"),
        ("emb+hash4096x0.5", "margin_kmeans"), ("emb", "random", 1.0, "kmeans"),
        ("emb", "margin_kmeans", 1.0, "kmeans"), ("emb", "class_balanced:margin_kmeans"),
        ("emb", "kmeans3:margin"), ("emb", "kmeans5:margin"), ("emb", "kmeans5:margin", 1.0, "kmeans"),
        ("emb", "kmeans3:margin", 1.0, "kmeans"), ("emb", "margin_kmeans", 1.0, "random", 50),
        ("emb", "margin_kmeans", 1.0, "kmeans", 50), ("emb", "kmeans:committee_margin"),
        ("emb", "kmeans:committee_margin", 1.0, "kmeans"), ("emb", "kmeans:rare_weighted0.5:margin"),
        ("emb", "margin"), ("emb", "badge"), ("emb", "badge", 1.0, "kmeans")),
}


def ngram_vectorizers(n_features: int) -> list:
    """Word 1-2-grams and character 2-5-grams (within word boundaries), each hashed into half the buckets."""
    half = n_features // 2
    return [HashingVectorizer(analyzer="word", ngram_range=(1, 2), n_features=half, alternate_sign=True,
                              lowercase=True, norm="l2"),
            HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), n_features=half, alternate_sign=True,
                              lowercase=True, norm="l2")]


def build_features(name: str, texts: list[str], pool_n: int, emb: np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The feature matrix of ``name`` for pool + test texts (rows in that order)."""
    if name == "emb":
        return emb
    if name == "emb+tfidf":
        blocks = []
        for analyzer, ngrams in (("word", (1, 2)), ("char_wb", (2, 5))):
            vec = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, min_df=2, sublinear_tf=True)
            vec.fit(texts[:pool_n])
            blocks.append(vec.transform(texts))
        return sp.hstack([sp.csr_matrix(emb), *blocks], format="csr")
    if name.startswith("emb+hash"):
        size, _, weight = name.removeprefix("emb+hash").partition("x")
        blocks = [float(weight or 1.0) * v.transform(texts) for v in ngram_vectorizers(int(size))]
        return sp.hstack([sp.csr_matrix(emb), *blocks], format="csr")
    raise ValueError(f"unknown feature set {name!r}")


def strategy_of(spec: str):
    """Product strategies by spec, plus two knobs the spec grammar has no room for, at any depth:
    ``kmeansN:<base>``, the k-means diversity step over N candidates per batch item (the product's default is
    10), and ``rare_weightedP:<base>``, the rare-class weight raised to the power P (default 1)."""
    head, colon, base = spec.partition(":")
    for prefix, build in (("kmeans", lambda n, b: DiverseKMeans(b, candidates_per_item=int(n))),
                          ("rare_weighted", lambda p, b: RareWeighted(b, power=float(p))),
                          ("density_weighted", lambda p, b: DensityWeighted(b, beta=float(p)))):
        knob = head.removeprefix(prefix)
        if head.startswith(prefix) and knob[:1].isdigit() and colon:
            return build(knob, strategy_of(base))
    if colon and STRATEGIES.get(head) is not None and STRATEGIES[head].takes_base:
        return STRATEGIES[head](base=strategy_of(base))
    return parse_strategy(spec)


class _DenseRows:
    """Row selections of a sparse matrix, returned dense: what the strategies index ``embeddings`` with."""

    def __init__(self, matrix):
        self.matrix = matrix

    def __len__(self) -> int:
        return self.matrix.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        return self.matrix[rows].toarray()


def replay(arm: Arm, seed: int, feats, emb_pool: np.ndarray, pool_y: np.ndarray, test_y: np.ndarray,
           n_classes: int, rare: int, severe: np.ndarray, initial: int, step: int, budget: int) -> list[dict]:
    """One arm and seed: the macro-F1 and rare-class F1 at each checkpoint, and the mean round time."""
    with threadpool_limits(1):
        pool_n = len(pool_y)
        x_pool, x_test = feats[:pool_n], feats[pool_n:]
        # k-means and novelty see what the product's pool sees: the encoder's output, n-grams included
        # (dense, as the product holds it: sparse k-means is several times slower)
        lexical = arm.features.startswith("emb+hash")
        strategy = strategy_of(arm.strategy)
        rng = np.random.default_rng([seed, 2])
        labeled = np.zeros(pool_n, dtype=bool)
        labeled[initial_set(arm.start, emb_pool, initial, seed)] = True
        rows, seconds = [], []
        while True:
            idx = np.flatnonzero(labeled)
            t0 = time.perf_counter()
            head = fit_head(x_pool[idx], pool_y[idx], seed=seed, C=arm.C)
            if len(idx) in CHECKPOINTS:
                pred = head.classes_[head.predict_proba(x_test).argmax(1)]
                per_class = f1_score(test_y, pred, labels=range(n_classes), average=None, zero_division=0)
                rows.append({"arm": arm.name, "features": arm.features, "strategy": arm.strategy, "C": arm.C,
                             "start": arm.start, "early_step": arm.early_step, "seed": seed, "n_labels": len(idx),
                             "macro_f1": float(per_class.mean()),
                             "rare_f1": float(per_class[rare]), "rare_labeled": int((pool_y[idx] == rare).sum())})
            if len(idx) >= budget:
                break
            unlabeled = np.flatnonzero(~labeled)
            t1 = time.perf_counter()
            proba = np.zeros((len(unlabeled), n_classes))
            proba[:, head.classes_] = head.predict_proba(x_pool[unlabeled])
            ctx = PoolContext(n_classes, proba=proba, severe_classes=severe, labeled_y=pool_y[idx],
                              embeddings=_DenseRows(x_pool[unlabeled]) if lexical else emb_pool[unlabeled])
            if "mc_proba" in strategy.needs:
                ctx.mc_proba = bootstrap_committee_proba(head, x_pool[idx], pool_y[idx], x_pool[unlabeled], n_classes,
                                                         MC_MEMBERS, np.random.default_rng([seed, len(idx)]))
            batch = arm.early_step if arm.early_step and len(idx) < EARLY_UNTIL else step
            labeled[unlabeled[strategy.select(ctx, min(batch, budget - len(idx)), rng)]] = True
            seconds.append(time.perf_counter() - t1 + (t1 - t0))
    for row in rows:
        row["round_s_mean"] = float(np.mean(seconds)) if seconds else float("nan")
    return rows


def dataset_arrays(name: str, args: argparse.Namespace, settings: Settings) -> dict:
    """Texts (pool then test), frozen embeddings, label ids, label names, the rare class and the severe classes
    of ``name``. With ``--arrays DIR`` they come from ``DIR/<name>.npz`` and ``DIR/<name>.texts.json`` (written by
    ``--export-arrays DIR``), so a replay runs on a machine with neither the shared data nor the encoder."""
    stored = args.arrays / f"{name}.npz" if args.arrays else None
    if stored is not None and stored.exists():
        z = np.load(stored)
        texts = json.loads(stored.with_suffix(".texts.json").read_text())
        log(f"{name}: arrays from {stored} (embeddings stored as {z['emb'].dtype})")
        return {"texts": texts, "emb": z["emb"].astype(np.float32), "pool_y": z["pool_y"], "test_y": z["test_y"],
                "labels": tuple(z["labels"].tolist()), "rare": int(z["rare"]), "severe": z["severe"]}
    from active_learning.simulate import pool_and_test  # its MLflow import is not needed with --arrays

    labeled = data.load(name, settings=settings)
    pool, test = pool_and_test(labeled)
    labels = labeled.taxonomy.labels
    pool_y, test_y = labeled.label_ids(pool), labeled.label_ids(test)
    rare = int(np.argmin(np.bincount(pool_y, minlength=len(labels))))
    severe = np.array([labels.index(s) for s in settings.review_policy.severity.severe_labels if s in labels]
                      or [rare], dtype=np.int64)
    texts = pool["text"].tolist() + test["text"].tolist()
    started = time.perf_counter()
    cache = EmbeddingCache(args.cache_dir, load_encoder(settings.base_model, settings.max_length))
    emb = cache.get(texts)
    log(f"{name}: pool {len(pool)}, test {len(test)}, embeddings in {time.perf_counter() - started:.0f} s")
    if args.export_arrays:
        args.export_arrays.mkdir(parents=True, exist_ok=True)
        path = args.export_arrays / f"{name}.npz"
        np.savez(path, emb=emb.astype(np.float16), pool_y=pool_y, test_y=test_y, labels=np.array(labels),
                 rare=rare, severe=severe)
        path.with_suffix(".texts.json").write_text(json.dumps(texts))
        log(f"{name}: wrote {path} (embeddings as float16, to travel)")
    return {"texts": texts, "emb": emb, "pool_y": pool_y, "test_y": test_y, "labels": labels, "rare": rare,
            "severe": severe}


def initial_set(start: str, emb_pool: np.ndarray, initial: int, seed: int) -> np.ndarray:
    """The first labels of a seed, the same for every arm with that start: ``random``, or ``kmeans`` over the
    frozen embedding (the product's cold start, :class:`ColdStartKMeans`, seeded as ``simulate`` seeds it)."""
    g = np.random.default_rng([seed, 0])
    if start == "kmeans":
        return ColdStartKMeans().select(PoolContext(0, embeddings=emb_pool), initial, g)
    return g.choice(len(emb_pool), initial, replace=False)


def time_round(feats, emb_pool: np.ndarray, pool_y: np.ndarray, n_classes: int, arms: list[Arm],
               n_labels: int = 2000, step: int = 100, repeats: int = 3) -> pd.DataFrame:
    """One live round's model work at ``n_labels`` labels on the whole pool, per arm (features as the
    product holds them: a dense matrix), median of ``repeats``, the arms interleaved repeat by repeat."""
    dense = {}
    for arm in arms:
        if arm.features not in dense:
            x = feats[arm.features][: len(pool_y)]
            dense[arm.features] = x.toarray().astype(np.float32) if sp.issparse(x) else x
    times: dict[str, list[float]] = {arm.name: [] for arm in arms}
    with threadpool_limits(1):  # on a loaded machine, OpenMP/BLAS threads that spin-wait dominate the timing
        for r in range(repeats):
            _time_repeat(r, dense, emb_pool, pool_y, n_classes, arms, n_labels, step, times)
    return pd.DataFrame({"arm": list(times), "round_s": [float(np.median(t)) for t in times.values()]})


def _time_repeat(r: int, dense: dict, emb_pool: np.ndarray, pool_y: np.ndarray, n_classes: int, arms: list[Arm],
                 n_labels: int, step: int, times: dict[str, list[float]]) -> None:
    """One repeat: the same labeled set for every arm, each arm's refit + pool rescore + batch choice timed."""
    g = np.random.default_rng(r)
    chosen = g.choice(len(pool_y), n_labels, replace=False)
    unlabeled = np.setdiff1d(np.arange(len(pool_y)), chosen)
    for arm in arms:
        x = dense[arm.features]
        t0 = time.perf_counter()
        head = fit_head(x[chosen], pool_y[chosen], seed=r, C=arm.C)
        proba = np.zeros((len(unlabeled), n_classes))
        proba[:, head.classes_] = head.predict_proba(x[unlabeled])
        diversity = x[unlabeled] if arm.features.startswith("emb+hash") else emb_pool[unlabeled]
        strategy = strategy_of(arm.strategy)
        ctx = PoolContext(n_classes, proba=proba, embeddings=diversity, severe_classes=np.array([0]),
                          labeled_y=pool_y[chosen])
        if "mc_proba" in strategy.needs:
            ctx.mc_proba = bootstrap_committee_proba(head, x[chosen], pool_y[chosen], x[unlabeled], n_classes,
                                                     MC_MEMBERS, g)
        strategy.select(ctx, step, g)
        times[arm.name].append(time.perf_counter() - t0)


def run_dataset(name: str, args: argparse.Namespace, settings: Settings) -> pd.DataFrame:
    arms = ARM_SETS[args.arms if args.arms != "auto" else ("davidson" if name == "davidson" else "finalists")]
    csv_path = args.out / f"al_levers_{name}{args.tag}.csv"
    if args.from_csv:
        saved = pd.concat([pd.read_csv(p) for p in args.from_csv if p.name == csv_path.name or
                           p.stem.startswith(f"al_levers_{name}")], ignore_index=True)
        arms = list(dict.fromkeys(arm_of(r) for r in saved.itertuples()))
        log(f"{name}: {len(saved)} saved rows, {len(arms)} arms, from {[str(p) for p in args.from_csv]}")
    d = dataset_arrays(name, args, settings)
    texts, emb, pool_y, test_y, labels, rare, severe = (d[k] for k in ("texts", "emb", "pool_y", "test_y", "labels",
                                                                         "rare", "severe"))
    pool = range(len(pool_y))
    feats = {}
    for arm in arms:
        if arm.features not in feats:
            t0 = time.perf_counter()
            feats[arm.features] = build_features(arm.features, texts, len(pool), emb)
            log(f"{name}: features {arm.features} {feats[arm.features].shape} in {time.perf_counter() - t0:.1f} s")
    # seed-major: a run cut short has every arm paired on the seeds it finished
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(arm, seed) for seed in seeds for arm in arms]
    rows: list[dict] = []
    if csv_path.exists() and not args.from_csv and not args.fresh:  # resume: keep every finished (arm, seed)
        rows = [r for r in pd.read_csv(csv_path).drop(columns=["round_s", "dataset", "rare_class"], errors="ignore")
                .to_dict("records")]
        finished = pd.DataFrame(rows).groupby(["arm", "seed"])["n_labels"].max() if rows else pd.Series(dtype=int)
        done_pairs = {key for key, top in finished.items() if top >= args.budget}
        rows = [r for r in rows if (r["arm"], r["seed"]) in done_pairs]
        jobs = [(arm, seed) for arm, seed in jobs if (arm.name, seed) not in done_pairs]
        saved_arms = {arm_of(argparse.Namespace(**r)) for r in rows}
        arms = arms + [arm for arm in saved_arms if arm not in arms]
        for arm in arms:
            if arm.features not in feats:
                feats[arm.features] = build_features(arm.features, texts, len(pool), emb)
        log(f"{name}: resuming {csv_path.name}: {len(done_pairs)} finished runs kept, {len(jobs)} to run")
    if args.from_csv:  # re-render (and re-time) earlier runs, possibly cut short, without replaying them
        saved["arm"] = [arm_of(r).name for r in saved.itertuples()]
        rows, jobs = saved.drop(columns=["round_s", "dataset", "rare_class"], errors="ignore").to_dict("records"), []
    started = time.perf_counter()
    with Parallel(n_jobs=args.jobs, return_as="generator_unordered") as parallel:
        for done, part in enumerate(parallel(
                delayed(replay)(arm, seed, feats[arm.features], emb[: len(pool)], pool_y, test_y, len(labels),
                                rare, severe, args.initial, args.step, args.budget) for arm, seed in jobs), 1):
            rows.extend(part)
            last = part[-1]
            log(f"  {name} [{done}/{len(jobs)}] {last['arm']:<52} seed {last['seed']}: @2000 {last['macro_f1']:.3f} "
                f"({labels[rare]} {last['rare_f1']:.3f})")
            pd.DataFrame(rows).to_csv(csv_path, index=False, float_format="%.5f")
    log(f"{name}: {len(jobs)} runs in {(time.perf_counter() - started) / 60:.1f} min")
    curves = pd.DataFrame(rows)
    full = fit_head(emb[: len(pool)], pool_y, seed=0)
    per_class = f1_score(test_y, full.predict(emb[len(pool):]), labels=range(len(labels)), average=None,
                         zero_division=0)
    FULL_DATA[name] = (float(per_class.mean()), float(per_class[rare]), len(pool_y))
    if args.no_timing:  # replays on another machine: time the rounds here later (--from-csv)
        curves["round_s"] = np.nan
    else:
        timing = time_round(feats, emb[: len(pool)], pool_y, len(labels), arms)
        curves = curves.merge(timing, on="arm", how="left")
    curves["dataset"], curves["rare_class"] = name, labels[rare]
    curves.to_csv(csv_path, index=False, float_format="%.5f")
    return curves


def summarise(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: mean ± sd of macro-F1 at each checkpoint, paired gains in points over random with the
    same features and over today's product (emb · random), rare-class F1 and labeled count at the budget."""
    at = curves.pivot_table(index="seed", columns=["arm", "n_labels"], values="macro_f1")
    rare_at = curves.pivot_table(index="seed", columns=["arm", "n_labels"], values="rare_f1")
    budget = int(curves["n_labels"].max())
    out = []
    for arm, part in curves.groupby("arm", sort=False):
        features = part["features"].iat[0]
        same_random = arm_of(next(part.itertuples())).baseline.name
        row = {"arm": arm, "features": features}
        for n in (c for c in CHECKPOINTS if c <= budget):
            row[f"f1@{n}"] = at[(arm, n)].mean()
            row[f"sd@{n}"] = at[(arm, n)].std(ddof=1)
        for n in (500, 1000, budget):
            for key, base in (("d", same_random), ("dp", BASELINE_ARM)):
                if (base, n) in at and base != arm:
                    diff = 100 * (at[(arm, n)] - at[(base, n)])
                    row[f"{key}@{n}"], row[f"{key}sd@{n}"] = diff.mean(), diff.std(ddof=1)
        row["rare_f1"] = rare_at[(arm, budget)].mean()
        row["rare_sd"] = rare_at[(arm, budget)].std(ddof=1)
        row["rare_labeled"] = part.loc[part["n_labels"] == budget, "rare_labeled"].mean()
        row["round_s"] = part["round_s"].iat[0]
        row["seeds"] = part["seed"].nunique()
        out.append(row)
    return pd.DataFrame(out)


def _cell(row: pd.Series, key: str, n: int) -> str:
    value = row.get(f"{key}@{n}")
    if value is None or pd.isna(value):
        return "–"
    return f"{value:+.1f} ± {row[f'{key}sd@{n}']:.1f}"


def markdown(summaries: dict[str, tuple[pd.DataFrame, str]], args: argparse.Namespace, minutes: float) -> str:
    lines = [f"# Fast-mode lever study (issue 15, part 2){args.title}", "",
             f"Up to {args.seeds} paired seeds per arm (seeds {args.first_seed}–{args.first_seed + args.seeds - 1}; an "
             "arm cut short by the time limit shows its count); "
             f"{args.initial} initial labels, drawn at random unless the arm says `kmeans start` (the product's "
             "cold start: one item per k-means cluster of the frozen embedding; such an arm's Δ is over random "
             f"sampling from the same start), then batches of {args.step} to {args.budget} (`batches of 50 to 500`: "
             "50 until 500 labels); logistic-regression head (`fit_head`, class-balanced) refit each round; "
             "macro-F1 on the test split of `pool_and_test`. **Δ** = paired gain (macro-F1 points, mean ± sd "
             "over seeds) over random "
             "sampling with the same features and C (what the query strategy buys); **Δ prod** = over today's "
             "product, `emb · random` (what strategy and head buy together). Round = one live round's model "
             "work at 2,000 labels on the whole pool (refit + score pool + choose 100; dense features as the "
             "product holds them; one thread, median of 3, arms interleaved). "
             + (f"Rendered from saved runs in {minutes:.0f} min (features rebuilt, rounds timed now on the shared "
                f"2-core machine, load average {os.getloadavg()[0]:.0f} at the end); the replays ran earlier"
                + (f": {args.ran_on}" if args.ran_on else ", on the shared 2-core machine") if args.from_csv else
                f"Total run time {minutes:.0f} min on the shared 2-core machine, load average "
                f"{os.getloadavg()[0]:.0f} at the end") + ".", "",
             f"Goals: Δ ≥ +{GOALS['gain']:.0f} at 500 and at 1,000 labels (Davidson); macro-F1 ≥ "
             f"{GOALS['macro_f1']} with hate F1 ≥ {GOALS['rare_f1']} at ≤ 2,000 labels; TweetEval-offensive: no "
             "recommended strategy more than 1 point below random at any budget.", ""]
    for name, (table, rare) in summaries.items():
        budget = args.budget
        lines += [f"## {name}", "",
                  f"| arm (features · strategy · C) | @500 | @1000 | @{budget} | Δ@500 | Δ@1000 | Δ@{budget} | "
                  f"Δ prod @500 | Δ prod @1000 | {rare} F1 @{budget} | {rare} labeled | round (s) |",
                  "|---" * 13 + "|"]
        for _, r in table.iterrows():
            arm = r["arm"] if r["seeds"] == args.seeds else f"{r['arm']} ({r['seeds']} seeds)"
            lines.append(
                f"| {arm} | {r['f1@500']:.3f} | {r['f1@1000']:.3f} | {r[f'f1@{budget}']:.3f} ± "
                f"{r[f'sd@{budget}']:.3f} | {_cell(r, 'd', 500)} | {_cell(r, 'd', 1000)} | {_cell(r, 'd', budget)} | "
                f"{_cell(r, 'dp', 500)} | {_cell(r, 'dp', 1000)} | {r['rare_f1']:.3f} ± {r['rare_sd']:.3f} | "
                f"{r['rare_labeled']:.0f} | {r['round_s']:.2f} |")
        lines.append("")
        if name in FULL_DATA:
            macro, rare_f1, n = FULL_DATA[name]
            lines += [f"The embedding head fitted on all {n:,} pool labels (C=1): macro-F1 {macro:.3f}, {rare} F1 "
                      f"{rare_f1:.3f}.", ""]
        lines += verdict(name, table, rare, budget)
    return "\n".join(lines)


#: the product's fast-mode default (``fast_ngram_features = 0``: the embedding alone; ``strategy = "auto"``).
#: The n-gram head (``emb+hash4096x0.5``) is opt-in: see the README's *Known limits* for why.
PRODUCT_ARM = Arm("emb", "margin_kmeans").name
BASELINE_ARM = Arm("emb", "random").name


def verdict(name: str, table: pd.DataFrame, rare: str, budget: int) -> list[str]:
    """The goals, met or not, for the product default, in words next to the numbers."""
    rows = table.set_index("arm")
    if PRODUCT_ARM not in rows.index:
        return [f"The product default ({PRODUCT_ARM}) was not run on {name}.", ""]
    r = rows.loc[PRODUCT_ARM]

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [f"Product default `{PRODUCT_ARM}` on {name} ({int(r['seeds'])} seeds):"]
    if name == "davidson":
        for n in (500, 1000):
            lines.append(f"- Δ@{n} ≥ +{GOALS['gain']:.0f}: {_cell(r, 'd', n)} over random with the same features "
                         f"({met(r.get(f'd@{n}', -99) >= GOALS['gain'])}); {_cell(r, 'dp', n)} over today's "
                         f"`{BASELINE_ARM}` ({met(r.get(f'dp@{n}', -99) >= GOALS['gain'])})")
        lines.append(f"- macro-F1 ≥ {GOALS['macro_f1']} and {rare} F1 ≥ {GOALS['rare_f1']} at ≤ {budget} labels: "
                     f"{r[f'f1@{budget}']:.3f} ({met(r[f'f1@{budget}'] >= GOALS['macro_f1'])}), {rare} F1 "
                     f"{r['rare_f1']:.3f} ({met(r['rare_f1'] >= GOALS['rare_f1'])})")
    else:
        worst = min(r.get(f"d@{n}", np.nan) for n in (500, 1000, budget))
        lines.append(f"- no more than 1 point below random at any budget: worst paired Δ {worst:+.1f} over random "
                     f"with the same features ({met(worst >= -1.0)})")
    lines.append(f"- round at 2,000 labels ≤ 15 s: {r['round_s']:.2f} s ({met(r['round_s'] <= 15)})")
    return lines + [""] + lever_verdict(name, table, budget)


def lever_verdict(name: str, table: pd.DataFrame, budget: int) -> list[str]:
    """Every arm that is not random sampling, against the goal of its dataset: on Davidson the arm whose
    weaker gain (at 500 or at 1,000 labels) is largest, on any other dataset the arms that fall more than a
    point below random at some budget."""
    arms = table[~table["arm"].str.contains(" · random")].copy()
    if arms.empty or "d@500" not in arms:
        return []
    if name == "davidson":
        arms["weaker"] = arms[["d@500", "d@1000"]].min(axis=1)
        best = arms.sort_values("weaker", ascending=False).iloc[0]
        reached = arms[(arms["d@500"] >= GOALS["gain"]) & (arms["d@1000"] >= GOALS["gain"])]
        return [f"Best arm by its weaker gain: `{best['arm']}`, {_cell(best, 'd', 500)} @500 and "
                f"{_cell(best, 'd', 1000)} @1000 over random with the same features and start; arms with Δ ≥ "
                f"+{GOALS['gain']:.0f} at both: {', '.join(f'`{a}`' for a in reached['arm']) or 'none'}.", ""]
    worst = arms[[f"d@{n}" for n in (500, 1000, budget)]].min(axis=1)
    below = arms.loc[worst < -1.0, "arm"]
    return [f"Arms more than 1 point below random with the same features and start at some budget (of "
            f"{len(arms)}): {', '.join(f'`{a}`' for a in below) or 'none'}.", ""]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="davidson")
    parser.add_argument("--arms", default="auto", choices=["auto", *ARM_SETS],
                        help="arm set (auto: the full study on davidson, the finalists elsewhere)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed+seeds-1")
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--step", type=int, default=100)
    parser.add_argument("--initial", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--title", default="", help="appended to the report's title")
    parser.add_argument("--ran-on", default="", help="with --from-csv: where and how the saved replays ran")
    parser.add_argument("--tag", default="", help="suffix of the CSV name (al_levers_<dataset><tag>.csv)")
    parser.add_argument("--no-timing", action="store_true", help="skip timing the rounds (replays run elsewhere)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over instead of resuming the finished runs already in the CSV")
    parser.add_argument("--arrays", type=Path, default=None,
                        help="read each dataset's texts, labels and embeddings from DIR/<dataset>.npz and .texts.json")
    parser.add_argument("--export-arrays", type=Path, default=None,
                        help="write each dataset's arrays to DIR (for --arrays elsewhere) and stop")
    parser.add_argument("--from-csv", type=Path, nargs="*", default=None,
                        help="render (and time) the arms in these earlier al_levers_<dataset>*.csv files instead "
                             "of replaying them")
    args = parser.parse_args(argv)
    if args.budget not in CHECKPOINTS or args.budget < 1000:
        parser.error(f"--budget must be one of {[c for c in CHECKPOINTS if c >= 1000]}")
    settings = Settings()
    args.cache_dir = args.cache_dir or settings.cache_dir / "embeddings"
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if args.export_arrays:
        for name in names:
            dataset_arrays(name, args, settings)
        return 0
    started = time.perf_counter()
    summaries = {}
    md_path = args.out / f"al_levers{args.tag}.md"
    for name in names:
        try:
            curves = run_dataset(name, args, settings)
        except data.SharedDataMissing as e:
            log(f"{name}: not run ({e})")
            continue
        summaries[name] = (summarise(curves), curves["rare_class"].iat[0])
        md_path.write_text(markdown(summaries, args, (time.perf_counter() - started) / 60))
    if not summaries:
        md_path.write_text("# Fast-mode lever study\n\nNot run: none of the datasets is on this machine.\n")
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
