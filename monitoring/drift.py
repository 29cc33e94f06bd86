"""Drift: is the content arriving in the pool, and the champion's behaviour on it, still like the reference?

Each window of the pool (a day, an ISO week or an import batch; ``labelloop.alerts_store.window_ids``) is
compared with a reference sample:

- **prediction drift**: the champion's predicted-class counts, window vs reference, by a chi-square test of
  homogeneity (p-value) and the Jensen-Shannon distance (effect size, 0..1);
- **input drift** on the base encoder's embeddings, two tests: the kernel two-sample test (MMD, RBF kernel
  with the median-distance bandwidth, permutation p-value), which sees a shift of the whole window; and a
  novelty test, which sees a minority of new content: the share of window items whose mean cosine distance
  to their nearest reference items is beyond what reference items show among themselves (beta-binomial
  p-value). A 10% mix of another platform's texts moves MMD by only 1% of a full shift
  (MMD² scales with the square of the mixing share) but moves the novel share several-fold;
- **confidence drift**: the champion's top-class probability, two-sample Kolmogorov-Smirnov;
- **accuracy without labels**: probabilities calibrated on the labelled reference (temperature scaling),
  then the average top-class probability (AC) and average thresholded confidence (ATC, Garg et al. 2022),
  shown next to the blind-audit accuracy of the window where reviewers audited items.

A window drifts when an input-drift test (MMD or novelty) has a p-value below ``settings.drift_p_value``;
windows with fewer than ``settings.drift_min_items`` items are reported but never alerted on. The
prediction and confidence tests are reported next to them but do not raise the drift alert: with one
champion the outputs are a function of the inputs, so they see no shift that the embedding tests miss at
the benchmark's 10% mix, and each extra test adds its own false alarms (``bench/results/drift.md`` has
both rules side by side). The accuracy
consequence of a shift has its own alert (the label-free estimate, ``monitoring/alerts.py``).

**Reference.** By default the frozen evaluation set: a held-out sample of the same source the champion
was trained from, with labels. The champion's training rows themselves are not a usable reference for the
model-output tests (a model is more confident on what it was fitted on, so every fresh window would look
like confidence drift), and the registry keeps only a content hash of them (``data_snapshot``). Setting
``drift_reference = "window:<id>"`` compares against a chosen window instead (no accuracy estimate then:
that needs labels for the calibration).

**Library.** scipy and scikit-learn, not Evidently 0.7: the tests needed are a few lines on top of
``scipy.stats`` (chi2_contingency, ks_2samp, betabinom) and ``sklearn.neighbors``; the novelty test that
the 10%-mix goal needs is not among Evidently's embedding-drift methods; and Evidently would add about 26
dependencies (litestar, a second plotly, statsmodels) and telemetry that is on by default to a service that
must run offline. The dashboard draws the per-window numbers itself.

The statistics are pure functions of arrays (:func:`compare`); :class:`DriftMonitor` does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, stats
from scipy.spatial.distance import jensenshannon
from sklearn.neighbors import NearestNeighbors

#: every test, in report order
TESTS = ("prediction", "embedding_mmd", "embedding_novelty", "confidence")
#: the tests whose p-value decides whether a window drifts (see the module docstring)
ALARM_TESTS = ("embedding_mmd", "embedding_novelty")


@dataclass(frozen=True)
class DriftConfig:
    p_value: float = 0.01
    min_items: int = 50
    permutations: int = 500
    neighbours: int = 5
    novelty_quantile: float = 0.95
    max_reference: int = 2000
    seed: int = 13


@dataclass
class TestResult:
    name: str
    statistic: float
    p_value: float
    detail: dict[str, Any] = field(default_factory=dict)

    def drifted(self, alpha: float) -> bool:
        return self.p_value < alpha


@dataclass
class Sample:
    """What the tests look at for one set of texts: base-encoder embeddings and the champion's probabilities."""

    embeddings: np.ndarray
    proba: np.ndarray

    def __len__(self) -> int:
        return len(self.embeddings)

    def take(self, index: np.ndarray) -> Sample:
        return Sample(self.embeddings[index], self.proba[index])


# ------------------------------------------------------------------------------------------------
# The statistics (pure)
# ------------------------------------------------------------------------------------------------


def prediction_drift(reference_pred: np.ndarray, current_pred: np.ndarray, n_classes: int) -> TestResult:
    """Chi-square test of homogeneity on predicted-class counts; Jensen-Shannon distance (base 2) as the effect."""
    ref = np.bincount(reference_pred, minlength=n_classes).astype(float)
    cur = np.bincount(current_pred, minlength=n_classes).astype(float)
    table = np.vstack([ref, cur])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        chi2, p = 0.0, 1.0
    else:
        chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
    js = float(jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2)) if ref.sum() and cur.sum() else 0.0
    return TestResult("prediction", js, float(p), {"chi2": float(chi2), "reference_share": (ref / ref.sum()).tolist(),
                                                    "current_share": (cur / cur.sum()).tolist()})


def confidence_drift(reference_conf: np.ndarray, current_conf: np.ndarray) -> TestResult:
    """Two-sample Kolmogorov-Smirnov on the top-class probability."""
    result = stats.ks_2samp(reference_conf, current_conf)
    return TestResult("confidence", float(result.statistic), float(result.pvalue),
                      {"reference_mean": float(np.mean(reference_conf)), "current_mean": float(np.mean(current_conf))})


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mmd_test(reference: np.ndarray, current: np.ndarray, *, permutations: int, rng: np.random.Generator
             ) -> TestResult:
    """Kernel two-sample test: squared MMD with an RBF kernel on unit-normalised embeddings (bandwidth: the
    median pairwise squared distance), p-value from ``permutations`` random relabellings of the pooled sample."""
    x = _unit(np.vstack([reference, current]))
    n, m = len(reference), len(current)
    sq = np.maximum(2.0 - 2.0 * (x @ x.T), 0.0)
    off_diag = sq[np.triu_indices(len(x), 1)]
    bandwidth = float(np.median(off_diag)) if len(off_diag) else 1.0
    kernel = np.exp(-sq / max(bandwidth, 1e-12))

    def mmd2(member: np.ndarray) -> np.ndarray:
        """Biased MMD² for each column of ``member`` (N × P, 1 = current)."""
        k_member = kernel @ member
        cur_cur = np.einsum("ip,ip->p", member, k_member)
        ref_cur = np.einsum("ip,ip->p", 1 - member, k_member)
        ref_ref = kernel.sum() - cur_cur - 2 * ref_cur
        return ref_ref / n**2 + cur_cur / m**2 - 2 * ref_cur / (n * m)

    observed = mmd2(np.r_[np.zeros(n), np.ones(m)][:, None])[0]
    member = np.zeros((n + m, permutations))
    for p in range(permutations):
        member[rng.permutation(n + m)[:m], p] = 1.0
    null = mmd2(member)
    p_value = (1 + int(np.sum(null >= observed))) / (1 + permutations)
    return TestResult("embedding_mmd", float(observed), p_value,
                      {"bandwidth": bandwidth, "null_mean": float(null.mean()), "permutations": permutations})


def novelty_test(reference: np.ndarray, current: np.ndarray, *, neighbours: int, quantile: float) -> TestResult:
    """Share of window items farther from the reference than reference items are from each other.

    Each item's novelty is its mean cosine distance to its ``neighbours`` nearest reference items
    (leave-one-out for reference items). "Novel" is beyond the k-th largest reference novelty, k = the
    reference's ``1 - quantile`` share. If window and reference come from one distribution, the number of
    novel window items is beta-binomial(m, k, n - k + 1) (the threshold is itself a random order statistic
    of the reference, which a binomial or Fisher test would ignore and so alarm too often); the p-value is
    its upper tail. Statistic: the window's novel share (about ``1 - quantile`` without drift)."""
    ref, cur = _unit(reference), _unit(current)
    n, m = len(ref), len(cur)
    k_nn = min(neighbours, n - 1)
    index = NearestNeighbors(n_neighbors=k_nn + 1, metric="cosine").fit(ref)
    ref_dist = index.kneighbors(ref, k_nn + 1)[0][:, 1:].mean(1)  # the first neighbour is the item itself
    cur_dist = index.kneighbors(cur, k_nn)[0].mean(1)
    k = max(1, math.ceil((1.0 - quantile) * n))
    threshold = float(np.sort(ref_dist)[n - k])
    novel = int((cur_dist > threshold).sum())
    p = float(stats.betabinom.sf(novel - 1, m, k, n - k + 1))
    return TestResult("embedding_novelty", novel / m, p,
                      {"threshold": threshold, "expected_share": k / (n + 1), "novel_items": novel})


# ------------------------------------------------------------------------------------------------
# Accuracy without labels
# ------------------------------------------------------------------------------------------------


def _temper(proba: np.ndarray, temperature: float) -> np.ndarray:
    logits = np.log(np.clip(proba, 1e-12, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling fitted on labelled reference items, and the ATC threshold: the confidence above
    which the share of reference items equals the reference accuracy."""

    temperature: float
    atc_threshold: float
    reference_accuracy: float

    @classmethod
    def fit(cls, proba: np.ndarray, labels: np.ndarray) -> Calibration:
        labels = np.asarray(labels, dtype=int)

        def nll(log_t: float) -> float:
            p = _temper(proba, math.exp(log_t))
            return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))

        temperature = math.exp(optimize.minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x)
        calibrated = _temper(proba, temperature)
        accuracy = float(np.mean(calibrated.argmax(1) == labels))
        threshold = float(np.quantile(calibrated.max(1), 1.0 - accuracy))
        return cls(temperature, threshold, accuracy)

    def estimate(self, proba: np.ndarray) -> dict[str, float]:
        """``average_confidence`` (AC) and ``atc``: two label-free estimates of accuracy on ``proba``'s items."""
        confidence = _temper(proba, self.temperature).max(1)
        return {"average_confidence": float(confidence.mean()), "atc": float(np.mean(confidence > self.atc_threshold))}


# ------------------------------------------------------------------------------------------------
# One window against the reference
# ------------------------------------------------------------------------------------------------


def compare(reference: Sample, current: Sample, config: DriftConfig, rng: np.random.Generator) -> list[TestResult]:
    """Every drift test of ``current`` against ``reference``, in :data:`TESTS` order."""
    n_classes = reference.proba.shape[1]
    return [
        prediction_drift(reference.proba.argmax(1), current.proba.argmax(1), n_classes),
        mmd_test(reference.embeddings, current.embeddings, permutations=config.permutations, rng=rng),
        novelty_test(reference.embeddings, current.embeddings, neighbours=config.neighbours,
                     quantile=config.novelty_quantile),
        confidence_drift(reference.proba.max(1), current.proba.max(1)),
    ]


@dataclass
class WindowDrift:
    window: str
    n_items: int
    first_item_at: str | None
    last_item_at: str | None
    evaluated: bool
    drifted: bool
    tests: list[TestResult]
    predicted_share: dict[str, float]
    mean_confidence: float
    estimated_accuracy: dict[str, float] | None
    audit: dict[str, Any] | None = None
    reason: str = ""

    @property
    def min_p_value(self) -> float:
        """The smallest p-value of the tests that decide drift (:data:`ALARM_TESTS`): the page draws it against
        the alarm line, so a reported-only test below that line would show as an alarm that was not raised."""
        return min((t.p_value for t in self.tests if t.name in ALARM_TESTS), default=1.0)

    @property
    def severity(self) -> float:
        """-log10 of the smallest p-value: how strongly the window drifts (orders windows for the queue)."""
        return float(-math.log10(max(self.min_p_value, 1e-300)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min_p_value": self.min_p_value, "severity": self.severity}


def evaluate_window(window: str, reference: Sample, current: Sample, labels: Sequence[str], config: DriftConfig,
                    calibration: Calibration | None, *, first: str | None = None, last: str | None = None
                    ) -> WindowDrift:
    """The report of one window. Small windows are described but not tested: their tests would be noise."""
    share = np.bincount(current.proba.argmax(1), minlength=len(labels)) / max(len(current), 1)
    estimate = calibration.estimate(current.proba) if calibration is not None and len(current) else None
    evaluated = len(current) >= config.min_items
    # a window is capped like the reference: the MMD kernel is quadratic in reference + window, and one
    # day's import of a whole dataset would otherwise need gigabytes
    tested = current.take(subsample(len(current), config.max_reference, config.seed))
    tests = compare(reference, tested, config, np.random.default_rng(config.seed)) if evaluated else []
    failing = [t.name for t in tests if t.drifted(config.p_value)]
    alarming = [name for name in failing if name in ALARM_TESTS]
    reason = (f"{', '.join(failing)} below p={config.p_value}" if failing
              else "no test below p=" + str(config.p_value) if evaluated
              else f"{len(current)} items, fewer than {config.min_items}: not tested")
    return WindowDrift(window, len(current), first, last, evaluated, bool(alarming), tests,
                       dict(zip(labels, share.round(4).tolist(), strict=True)),
                       float(current.proba.max(1).mean()) if len(current) else float("nan"), estimate, reason=reason)


def subsample(n: int, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` row positions out of ``n``, the same ones for the same seed (the MMD kernel is
    quadratic in the reference size)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# I/O: the pool, the champion, the reference, audits
# ------------------------------------------------------------------------------------------------


class DriftMonitor:
    """Evaluates every window of a project's pool against the reference, with the current champion."""

    def __init__(self, settings, project_id: int | None = None):
        from training.registry import Registry

        self.settings = settings
        self.project_id = project_id if project_id is not None else settings.ls_project_id
        self.registry = Registry(settings)
        self.config = DriftConfig(p_value=settings.drift_p_value, min_items=settings.drift_min_items,
                                  permutations=settings.drift_permutations, seed=settings.seed)

    # ---------------------------------------------------------------- inputs
    def pool(self) -> pd.DataFrame:
        from active_learning.loop import ActiveLearningLoop
        from labelloop.journal import Journal
        from labelloop.taxonomy import get_taxonomy

        if self.project_id is None:
            raise ValueError("no Label Studio project: set LABELLOOP_LS_PROJECT_ID (or pass --project)")
        with Journal(self.settings.database("journal"), get_taxonomy(self.settings.taxonomy)) as journal:
            loop = ActiveLearningLoop(self.settings, None, self.project_id, journal)
            try:  # the loop opens its own slice store; the scheduled evaluation must not leak one per run
                return loop.pool()
            finally:
                loop.slices.close()

    def _sample(self, frame: pd.DataFrame, loaded) -> Sample:
        from active_learning.pool import ScoredPool

        scored = ScoredPool(frame[["id", "text"]].reset_index(drop=True), loaded.classifier, loaded.ref.cache_key,
                            self.settings.cache_dir)
        return Sample(scored.embeddings(), scored.proba())

    def reference(self, pool: pd.DataFrame, windows: pd.Series) -> tuple[str, pd.DataFrame]:
        """``(description, frame[id, text, label?])`` of the configured reference."""
        choice = self.settings.drift_reference
        if choice.startswith("window:"):
            wanted = choice.split(":", 1)[1]
            frame = pool[windows.to_numpy() == wanted].rename(columns={"item_id": "id"})
            if frame.empty:
                raise ValueError(f"drift_reference {choice!r}: no pool items in that window "
                                 f"(windows: {sorted(set(windows))[:10]})")
            if len(frame) < self.config.min_items:  # a handful of items is no reference (one crashes novelty)
                raise ValueError(f"drift_reference {choice!r}: {len(frame)} item(s) in that window, fewer than "
                                 f"drift_min_items={self.config.min_items}")
            return f"window {wanted} ({len(frame)} items)", frame[["id", "text"]]
        frozen = self.registry.eval_set()
        if frozen is None:
            raise ValueError("no frozen evaluation set to use as the drift reference: train a first model "
                             "(labelloop loop import freezes one) or set drift_reference = 'window:<id>'")
        return f"frozen evaluation set {frozen[0]} ({len(frozen[1])} items)", frozen[1]

    def audit_accuracy(self, pool: pd.DataFrame, windows: pd.Series) -> dict[str, dict]:
        """Blind-audit accuracy per window, from the label-quality measures (``monitoring.quality``): audit
        items are drawn uniformly and shown without a pre-label, and each is scored against the model that
        was champion when it was served. A Wilson 95% interval; windows with fewer audit items than the
        quality measures' minimum n get none."""
        from monitoring import quality
        from monitoring.quality_context import open_context
        from monitoring.quality_stats import proportion

        with open_context(self.settings, self.project_id) as ctx:
            table = ctx.table()
            min_n = ctx.min_n
        audited = quality.item_truth(table[(table["kind"] == "audit") & table["model_label"].notna()])
        if audited.empty:
            return {}
        window_of = pd.Series(windows.to_numpy(), index=pool["task_id"].to_numpy())
        audited = audited.assign(window=audited["task_id"].map(window_of)).dropna(subset=["window"])
        out = {}
        for window, rows in audited.groupby("window"):
            p = proportion(int((rows["label"] == rows["model_label"]).sum()), len(rows), min_n)
            if p.value is not None:  # below the minimum n an accuracy would be noise: the window shows none
                out[str(window)] = {"accuracy": p.value, "k": p.k, "n": p.n, "low": p.low, "high": p.high,
                                    "model_versions": sorted(rows["model_version"].dropna().unique().tolist())}
        return out

    # ---------------------------------------------------------------- the evaluation
    def evaluate(self) -> dict[str, Any]:
        """The drift report of every window, as a JSON-able dict (what the store keeps and the API returns)."""
        from labelloop.alerts_store import window_ids
        from labelloop.taxonomy import get_taxonomy
        from training.registry import CHAMPION

        if self.registry.alias_version(CHAMPION) is None:
            raise ValueError("no champion yet: drift compares the champion's behaviour, train and promote one first")
        loaded = self.registry.load(CHAMPION)
        labels = list(get_taxonomy(self.settings.taxonomy).labels)
        pool = self.pool().reset_index(drop=True)
        windows = window_ids(pool, self.settings.drift_window).reset_index(drop=True)
        ref_name, ref_frame = self.reference(pool, windows)
        ref_frame = ref_frame.iloc[subsample(len(ref_frame), self.config.max_reference, self.config.seed)]
        reference = self._sample(ref_frame, loaded)
        calibration = None
        if "label" in ref_frame.columns:
            index = {label: i for i, label in enumerate(labels)}
            calibration = Calibration.fit(reference.proba, ref_frame["label"].map(index).to_numpy(int))
        current = self._sample(pool.rename(columns={"item_id": "id"}), loaded)
        audits = self.audit_accuracy(pool, windows)
        reports = []
        for window in sorted(set(windows)):
            mask = (windows == window).to_numpy()
            created = pool.loc[mask, "created_at"]
            report = evaluate_window(window, reference, current.take(np.flatnonzero(mask)), labels, self.config,
                                     calibration, first=str(created.min()), last=str(created.max()))
            report.audit = audits.get(window)
            reports.append(report)
        return {
            "evaluated_at": now_iso(),
            "project_id": self.project_id,
            "champion": loaded.ref.label,
            "window_kind": self.settings.drift_window,
            "reference": ref_name,
            "reference_items": len(ref_frame),
            "reference_accuracy": calibration.reference_accuracy if calibration else None,
            "p_value": self.config.p_value,
            "min_items": self.config.min_items,
            "labels": labels,
            "windows": [r.to_dict() for r in reports],
        }


def run_drift_evaluation(settings, project_id: int | None = None, *, client=None) -> tuple[dict[str, Any], Any]:
    """Evaluate every window now, keep the report, and raise, clear and deliver alerts. Returns the report and
    the alert transitions (what ``labelloop drift`` and ``POST /v1/monitoring/drift/evaluate`` do)."""
    from labelloop.alerts_store import AlertStore
    from monitoring.alerts import evaluate_alerts

    report = DriftMonitor(settings, project_id).evaluate()
    with AlertStore(settings.database("alerts")) as store:
        store.save_report(report)
        transitions = evaluate_alerts(store, report, accuracy_drop=settings.drift_accuracy_drop,
                                      alert_url=settings.alert_url, client=client)
    return report, transitions
