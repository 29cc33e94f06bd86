"""One turn of the loop against a real Label Studio project.

A round: snapshot the journal's labels → retrain in fast mode → run the promotion gate → score the
unlabeled pool with the champion → push the most informative items to the front of the annotators'
queue. Label Studio's open-source "Uncertainty sampling" serves the task whose prediction of the
project's current ``model_version`` has the lowest ``score`` (see ``active_learning/labelstudio.py``),
so the pushed ``score`` is the item's *review priority*: rank-ordered in [0, 1/K), lowest first. For least
confidence that order is the model's confidence order; for every strategy the Data Manager's
"Prediction score" column, sorted ascending, shows the queue.

Only the top ``queue_size`` items get priorities pushed (pushing a 20k pool costs ~30 s per round); the
rest are pre-labeled on demand by the ML backend when an annotator opens them.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from active_learning.labelstudio import LabelStudioClient, PredictionIn
from active_learning.pool import ScoredPool
from active_learning.stopping import StoppingMonitor
from active_learning.strategies import PoolContext, get_strategy
from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.taxonomy import FROM_NAME, TO_NAME, get_taxonomy
from serving.quantize import precision
from training.fast import EmbeddingCache
from training.registry import CHAMPION, LoadedModel, Registry
from training.train import embedding_cache, train_and_register

log = logging.getLogger("labelloop.loop")
ReportProgress = Callable[[float, str], None]


@dataclass
class QueueResult:
    model_version: str
    strategy: str
    pool_unlabeled: int
    queued_task_ids: list[int]
    pushed: int
    seconds: float


@dataclass
class RoundResult:
    labels: int
    trained_version: str | None
    macro_f1: float | None
    promoted: bool
    gate_reason: str
    champion: str | None
    queue: QueueResult | None
    stopping: dict | None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def priorities(count: int, n_classes: int) -> np.ndarray:
    """Unique review priorities in [0, 1/K), rising with rank: below any backend pre-label's ``score``
    (the top class's probability is at least 1/K), so every pushed item is served before the rest of
    the pool. Unique, because Label Studio does not break score ties."""
    return np.arange(count, dtype=np.float64) / max(count, 1) / max(n_classes, 1)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path``, held by this process until the block ends."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ActiveLearningLoop:
    """The loop for one Label Studio project (strategy and sizes from ``settings``)."""

    def __init__(
        self,
        settings: Settings,
        client: LabelStudioClient | None,
        project_id: int | None,
        journal: Journal,
        *,
        champion: Callable[[], LoadedModel | None] | None = None,
        on_promoted: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.taxonomy = get_taxonomy(settings.taxonomy)
        self.client = client
        self.project_id = project_id
        self.journal = journal
        self.strategy_name = settings.strategy
        self.queue_size = settings.queue_size
        self.registry = Registry(settings)
        self._champion = champion
        self._on_promoted = on_promoted
        self._loaded: LoadedModel | None = None
        self._cache: EmbeddingCache | None = None
        self.pool_predictions: pd.Series | None = None  # champion's labels on the pool, by task id
        self.stopping = StoppingMonitor()  # fed only when a new champion's predictions exist
        self.last_signal: dict | None = None
        self.rounds = 0

    @property
    def steers_queue(self) -> bool:
        """Without a Label Studio project the loop still retrains and gates; it just has no queue to push."""
        return self.client is not None and self.project_id is not None

    # ------------------------------------------------------------------ the pool
    @property
    def pool_path(self) -> Path:
        return self.settings.state_dir / "pools" / f"project-{self.project_id}.parquet"

    @property
    def cache(self) -> EmbeddingCache:
        """The encoder's embedding cache (cold start and pre-embedding the pool)."""
        if self._cache is None:
            self._cache = embedding_cache(self.settings)
        return self._cache

    def import_pool(self, items: pd.DataFrame) -> int:
        """Import ``items[id, text]`` as tasks (idempotent) and remember item → task for scoring."""
        mapping = self.client.import_tasks(self.project_id, items)
        pool = pd.DataFrame({"item_id": items["id"].astype(str).tolist(), "text": items["text"].tolist()})
        pool["task_id"] = pool["item_id"].map(mapping).astype(int)
        if self.pool_path.exists():
            pool = pd.concat([pd.read_parquet(self.pool_path), pool]).drop_duplicates("task_id", keep="last")
        self.pool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pool_path.with_suffix(".tmp")
        pool.to_parquet(tmp)
        tmp.replace(self.pool_path)
        return len(mapping)

    def pool(self) -> pd.DataFrame:
        if not self.pool_path.exists():
            raise FileNotFoundError(f"no pool for project {self.project_id}: import one first "
                                    "(labelloop loop import)")
        return pd.read_parquet(self.pool_path)

    def unlabeled(self) -> pd.DataFrame:
        labeled = set(self.journal.annotations(self.project_id)["task_id"])
        pool = self.pool()
        return pool[~pool["task_id"].isin(labeled)].reset_index(drop=True)

    # ------------------------------------------------------------------ model
    def champion(self) -> LoadedModel | None:
        return self._champion() if self._champion is not None else self.registry_champion()

    def registry_champion(self) -> LoadedModel | None:
        version = self.registry.alias_version(CHAMPION)
        if version is None:
            return None
        if self._loaded is None or self._loaded.ref.version != version:
            self._loaded = self.registry.load(version)
        return self._loaded

    # ------------------------------------------------------------------ steps
    def cold_start(self, k: int) -> pd.DataFrame:
        """The first ``k`` items to label when no model exists: spread over the encoder's embedding space."""
        unlabeled = self.unlabeled()
        ctx = PoolContext(n_classes=len(self.taxonomy.labels), embeddings=self.cache.get(unlabeled["text"].tolist()))
        rng = np.random.default_rng(self.settings.seed)
        picked = get_strategy("cold_start").select(ctx, min(k, len(unlabeled)), rng)
        return unlabeled.iloc[picked].reset_index(drop=True)

    def push_queue(self, loaded: LoadedModel, progress: ReportProgress | None = None) -> QueueResult:
        """Rank the unlabeled pool with the champion and push the top items' priorities to Label Studio.

        Items past the pushed top ``queue_size`` get pre-labels from the ML backend when Label Studio
        asks (``score`` = confidence there, ≥ 1/K, so they queue behind every pushed priority < 1/K).
        The strategy's batch leads, most informative first, then the rest by score."""
        started = time.perf_counter()
        unlabeled = self.unlabeled()
        labels = self.journal.labels(self.project_id)
        strategy = get_strategy(self.strategy_name)
        cache_key = f"{loaded.ref.cache_key}#{precision(loaded.classifier)}"  # served int8 ≠ registry fp32
        pool = ScoredPool(unlabeled.rename(columns={"item_id": "id"}), loaded.classifier, cache_key,
                          self.settings.cache_dir, labeled=labels[["id", "text", "label"]],
                          seed=self.settings.seed)
        ctx = pool.context(strategy.needs | {"proba"})
        k = min(self.settings.query_batch, len(unlabeled))
        batch = strategy.select(ctx, k, np.random.default_rng(self.settings.seed)) if k else np.zeros(0, int)
        scores = strategy.scores(ctx)
        batch = batch[np.argsort(-scores[batch], kind="stable")]  # cluster-based batches come in cluster order
        ranked = np.argsort(-scores, kind="stable")
        order = np.concatenate([batch, ranked[~np.isin(ranked, batch)]])[: max(self.queue_size, k)]
        label_idx = ctx.proba.argmax(1)
        predictions = [
            PredictionIn(task_id=int(unlabeled["task_id"].iat[i]), label=self.taxonomy.labels[label_idx[i]],
                         score=float(score), model_version=loaded.ref.label, from_name=FROM_NAME, to_name=TO_NAME)
            for i, score in zip(order, priorities(len(order), len(self.taxonomy.labels)), strict=True)
        ]
        if progress:
            progress(0.8, f"pushing {len(predictions)} priorities to Label Studio")
        pushed = self.client.import_predictions(self.project_id, predictions)
        if predictions:
            self.client.set_model_version(self.project_id, loaded.ref.label)
        self.pool_predictions = pd.Series(label_idx, index=unlabeled["task_id"].to_numpy())
        return QueueResult(loaded.ref.label, strategy.name, len(unlabeled),
                           [int(unlabeled["task_id"].iat[i]) for i in batch], pushed, time.perf_counter() - started)

    def project_model_version(self) -> str | None:
        return self.client.sdk.projects.get(self.project_id).model_version or None

    def run_round(self, progress: ReportProgress | None = None, on_snapshot: Callable[[], object] | None = None
                  ) -> RoundResult:
        """Retrain on every label in the journal, gate, and refresh the queue when the champion changed.

        ``on_snapshot`` runs right before the labels are read (the retrain trigger moves its mark there):
        a label that arrives in between is trained on now and also counts towards the next round, so
        none is ever skipped. Rounds on one state dir never overlap, across processes too (the service's
        retrain job and `labelloop loop round`)."""
        with _exclusive(self.settings.state_dir / "round.lock"):
            return self._run_round(progress, on_snapshot)

    def _run_round(self, progress: ReportProgress | None, on_snapshot: Callable[[], object] | None) -> RoundResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if on_snapshot:
            on_snapshot()
        labels = self.journal.labels(self.project_id)
        trained, macro_f1, promoted, reason = None, None, False, "not enough labels: need two classes"
        if len(labels) and labels["label"].nunique() >= 2:
            if progress:
                progress(0.1, f"training on {len(labels)} labels")
            result = train_and_register(labels[["id", "text", "label"]], None, self.taxonomy, mode="fast",
                                        settings=self.settings, source=f"label-studio:project-{self.project_id}",
                                        extra_params={"strategy": self.strategy_name})
            timings["train"] = time.perf_counter() - started
            trained, macro_f1 = result.ref.label, result.report.macro_f1
            if progress:
                progress(0.5, "promotion gate")
            decision = self.registry.promote(result.ref.version)
            promoted, reason = decision.promoted, decision.reason
            timings["gate"] = time.perf_counter() - started - timings["train"]
            if promoted and self._on_promoted:
                self._on_promoted()
        queue = None
        loaded = self.champion()
        if self.steers_queue and loaded is not None and self.project_model_version() != loaded.ref.label:
            t_push = time.perf_counter()
            queue = self.push_queue(loaded, progress)
            timings["queue"] = time.perf_counter() - t_push
        timings["total"] = time.perf_counter() - started
        self.rounds += 1
        if queue is not None:  # a new champion scored the pool: compare its predictions with the last one's
            self.last_signal = asdict(self.stopping.update(self.rounds, self.pool_predictions, macro_f1, len(labels)))
        signal = self.last_signal
        return RoundResult(len(labels), trained, macro_f1, promoted, reason,
                           loaded.ref.label if loaded else None, queue, signal, timings)
