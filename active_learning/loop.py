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

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from numbers import Number
from pathlib import Path

import numpy as np
import pandas as pd

from active_learning.adjudication import AdjudicationResult, send_for_adjudication
from active_learning.auto_finetune import FinetuneProgress, finetune_frames
from active_learning.drift_mix import drift_batch
from active_learning.labelstudio import LabelStudioClient, PriorityIn
from active_learning.pool import ScoredPool
from active_learning.slices_push import (
    Blind,
    SliceRates,
    Suggested,
    assemble_queue,
    batch_rng,
    honeypot_candidates,
    pending_slices,
    place_pending,
    plan_batch,
    priorities_for,
    slice_items,
)
from active_learning.stopping import StoppingMonitor
from active_learning.strategies import PoolContext, get_strategy, parse_strategy
from active_learning.training_labels import training_labels
from labelloop.config import Settings
from labelloop.journal import Journal, label_cell, label_text
from labelloop.slices import SliceStore
from labelloop.taxonomy import get_taxonomy
from serving.quantize import precision
from serving.queue_api import judged_prediction
from training.classifier import TextClassifier
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
    slices: dict[str, int] = field(default_factory=dict)  # new audit/honeypot/overlap items, pending ones


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
    cold_start: str | None = None  # what the round did for the queue while no champion exists
    mode: str = "fast"  # how the round's model was trained: fast (frozen encoder + head) or finetune

    def to_dict(self) -> dict:
        return asdict(self)


def priorities(count: int, n_classes: int) -> np.ndarray:
    """Unique review priorities in [0, 1/K), rising with rank: below any backend pre-label's ``score``
    (the top class's probability is at least 1/K), so every pushed item is served before the rest of
    the pool. Unique, because Label Studio does not break score ties."""
    return np.arange(count, dtype=np.float64) / max(count, 1) / max(n_classes, 1)


def priority_classes(classifier: TextClassifier) -> int:
    """The ``K`` of the review priorities' range [0, 1/K): it must lie below every score the backend gives a
    pre-label. That is 1/K for a single-label model (its top probability); a multi-label pre-label scores the
    mean confidence of its per-label decisions, at least ``min(t, 1 - t)`` for a label with threshold ``t``."""
    if not classifier.multi_label:
        return len(classifier.labels)
    thresholds = np.asarray(classifier.thresholds, dtype=np.float64)
    floor = float(np.minimum(thresholds, 1.0 - thresholds).min()) if len(thresholds) else 0.5
    return max(len(classifier.labels), math.ceil(1.0 / max(floor, 1e-6)))


def pool_decisions(classifier: TextClassifier, proba: np.ndarray, task_ids: np.ndarray) -> pd.Series:
    """The champion's decisions on the pool, one value per (task, output): the label id of a single-label
    model, each label's 0/1 of a multi-label one. The stopping rule's kappa compares two rounds' series on
    their common index, so a multi-label model is compared on every per-label decision."""
    ids = np.asarray(classifier.decide_ids(proba))
    return pd.DataFrame(ids.reshape(len(task_ids), -1), index=task_ids).stack()


COLD_START_PREFIX = "cold-start-"


def next_cold_start_version(existing: Iterable[str]) -> str:
    """The model_version for a new cold-start queue, numbered after every earlier one in the project.

    A fresh name each time, because Label Studio keeps a task's prediction when it already holds one of the
    same version: a reused name would leave an earlier queue's priorities in place."""
    numbers = [int(v.removeprefix(COLD_START_PREFIX)) for v in existing
               if v.startswith(COLD_START_PREFIX) and v.removeprefix(COLD_START_PREFIX).isdigit()]
    return f"{COLD_START_PREFIX}{max(numbers, default=0) + 1}"


def _created_at(items: pd.DataFrame) -> pd.Series:
    """The items' own ``created_at`` as UTC times (missing: NaT), or all NaT when the source has none."""
    if "created_at" not in items.columns:
        return pd.Series(pd.NaT, index=range(len(items)), dtype="datetime64[ns, UTC]")
    raw = items["created_at"].reset_index(drop=True)
    # a number would parse as nanoseconds since 1970 (epoch seconds land on 1970-01-01): refused like any
    # other value that is not a date/time, since its unit cannot be known
    numeric = raw.map(lambda v: isinstance(v, Number) and not isinstance(v, bool)) & raw.notna()
    parsed = pd.to_datetime(raw.mask(numeric), utc=True, errors="coerce", format="mixed")
    bad = numeric | (parsed.isna() & raw.notna() & (raw.astype(str).str.strip() != ""))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} item(s) have a created_at that is not a date/time (ISO 8601; a bare "
                         f"number's unit is unknown), e.g. {raw[bad].astype(str).head(3).tolist()}")
    return parsed


@contextmanager
def _exclusive_round(settings: Settings) -> Iterator[None]:
    """The round lock of the jobs store: ``state_dir/round.lock`` (``fcntl``) on SQLite, a session advisory
    lock on a shared PostgreSQL, which the server drops if the holding replica dies, so one that crashed
    mid-round never wedges the others."""
    db = settings.database("jobs")
    try:
        with db.exclusive("round"):
            yield
    finally:
        db.dispose()


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
        self.slices = SliceStore(settings.database("slices"))
        self.strategy_name = settings.strategy
        parse_strategy(self.strategy_name, self.taxonomy.multi)  # a spec unfit for the taxonomy's kind fails here
        self.queue_size = settings.queue_size
        self.registry = Registry(settings)
        self._champion = champion
        self._on_promoted = on_promoted
        self._loaded: LoadedModel | None = None
        self._cache: EmbeddingCache | None = None
        self.pool_predictions: pd.Series | None = None  # champion's labels on the pool, by task id
        #: task id → (label, probability) of the queued items shown blurred: exposure counts them as severe
        self.blurred: dict[int, tuple[str, float]] = {}
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

    def import_pool(self, items: pd.DataFrame, *, batch_id: str | None = None) -> int:
        """Import ``items[id, text]`` (and ``created_at`` when the source has one) as tasks, as one new
        import batch appended to the pool, and remember item → task for scoring.

        Every pool row carries ``created_at`` (the source's time, else the import time) and ``batch_id``,
        so drift monitoring can window the pool by day, week or import batch. Import is idempotent: an
        item already in the pool keeps its first batch and time, because re-importing it is not new content."""
        created = _created_at(items)  # checked before anything is imported: a bad value imports nothing
        mapping = self.client.import_tasks(self.project_id, items)
        imported_at = pd.Timestamp.now(tz="UTC")
        batch_id = batch_id or f"batch-{imported_at.strftime('%Y%m%dT%H%M%S%f')}"
        pool = pd.DataFrame({"item_id": items["id"].astype(str).tolist(), "text": items["text"].tolist()})
        pool["task_id"] = pool["item_id"].map(mapping).astype(int)
        pool["created_at"] = created.fillna(imported_at)
        pool["batch_id"] = batch_id
        pool["imported_at"] = imported_at
        if self.pool_path.exists():
            pool = pd.concat([self.pool(), pool]).drop_duplicates("task_id", keep="first")
        self.pool_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pool_path.with_suffix(".tmp")
        pool.reset_index(drop=True).to_parquet(tmp)
        tmp.replace(self.pool_path)
        return len(mapping)

    def pool(self) -> pd.DataFrame:
        """The imported pool: ``item_id``, ``text``, ``task_id``, ``created_at``, ``batch_id``, ``imported_at``.

        A pool written before imports were timestamped reads as one ``legacy`` batch created when the
        file was last written."""
        if not self.pool_path.exists():
            raise FileNotFoundError(f"no pool for project {self.project_id}: import one first "
                                    "(labelloop loop import)")
        pool = pd.read_parquet(self.pool_path)
        if "created_at" not in pool.columns:
            written = pd.Timestamp(self.pool_path.stat().st_mtime, unit="s", tz="UTC")
            pool = pool.assign(created_at=written, batch_id="legacy", imported_at=written)
        return pool

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
    def cold_start(self, k: int, unlabeled: pd.DataFrame | None = None) -> pd.DataFrame:
        """The first ``k`` items to label when no model exists: spread over the encoder's embedding space."""
        unlabeled = self.unlabeled() if unlabeled is None else unlabeled
        ctx = PoolContext(n_classes=len(self.taxonomy.labels), embeddings=self.cache.get(unlabeled["text"].tolist()))
        rng = np.random.default_rng(self.settings.seed)
        picked = get_strategy("cold_start").select(ctx, min(k, len(unlabeled)), rng)
        return unlabeled.iloc[picked].reset_index(drop=True)

    def push_cold_start(self, progress: ReportProgress | None = None) -> tuple[QueueResult | None, str]:
        """While no model can rank the pool, put ``query_batch`` diverse items (:meth:`cold_start`) at the
        front of the queue: review priorities with an empty result, so reviewers see no pre-label.

        A cold-start queue stays while any of its items is unlabeled: clustering again each round would push
        the same kind of items again and reshuffle what reviewers are working through. Once it is used up
        and there is still no champion (say every label so far is one class), the next one goes out under a
        new model_version. Returns the push (``None`` when nothing was pushed) and a sentence saying what
        happened."""
        if not self.pool_path.exists():
            return None, f"cold start: no pool imported for project {self.project_id} (labelloop loop import)"
        started = time.perf_counter()
        unlabeled = self.unlabeled()
        current = self.project_model_version()
        if current is not None and current.startswith(COLD_START_PREFIX):
            queued = {p["task"] for p in self.client.predictions(self.project_id) if p["model_version"] == current}
            waiting = queued & set(unlabeled["task_id"])
            if waiting:
                return None, f"cold start: {len(waiting)} diverse items of {current} are still queued"
        seeds = self.cold_start(self.settings.query_batch, unlabeled)
        if seeds.empty:
            return None, "cold start: every pool item is labeled, nothing left to queue"
        version = next_cold_start_version(self.client.model_versions(self.project_id))
        batch = [PriorityIn(task_id=int(task_id), score=float(score), model_version=version)
                 for task_id, score in zip(seeds["task_id"], priorities(len(seeds), len(self.taxonomy.labels)),
                                           strict=True)]
        if progress:
            progress(0.8, f"cold start: pushing {len(batch)} diverse items to Label Studio")
        pushed = self.client.import_predictions(self.project_id, batch)
        self.client.set_model_version(self.project_id, version)
        queue = QueueResult(version, "cold_start", len(unlabeled), [p.task_id for p in batch], pushed,
                            time.perf_counter() - started)
        return queue, f"cold start: pushed {pushed} diverse items ({version})"

    def training_labels(self) -> pd.DataFrame:
        """What a retrain learns from: one label per item, honeypots left out, adjudications applied."""
        return training_labels(self.journal, self.slices, self.project_id)

    def push_queue(self, loaded: LoadedModel, progress: ReportProgress | None = None) -> QueueResult:
        """Rank the unlabeled pool with the champion and push the top items' priorities to Label Studio.

        Items past the pushed top ``queue_size`` get pre-labels from the ML backend when Label Studio
        asks (``score`` = confidence there, ≥ 1/K, so they queue behind every pushed priority < 1/K).
        The strategy's batch leads, most informative first, then the rest by score. The batch shares its
        places with the quality slices (:mod:`active_learning.slices_push`): blind audit items, honeypots
        and overlap copies interleaved after its head, and pending adjudications ahead of everything."""
        started = time.perf_counter()
        unlabeled = self.unlabeled()
        labels = self.training_labels()
        strategy = parse_strategy(self.strategy_name, self.taxonomy.multi)
        cache_key = f"{loaded.ref.cache_key}#{precision(loaded.classifier)}"  # served int8 ≠ registry fp32
        pool = ScoredPool(unlabeled.rename(columns={"item_id": "id"}), loaded.classifier, cache_key,
                          self.settings.cache_dir, labeled=labels[["id", "text", "label"]],
                          seed=self.settings.seed, severe_labels=self.settings.review_policy.severity.severe_labels)
        ctx = pool.context(strategy.needs | {"proba"})
        k = min(self.settings.query_batch, len(unlabeled))
        batch = strategy.select(ctx, k, np.random.default_rng(self.settings.seed)) if k else np.zeros(0, int)
        scores = strategy.scores(ctx)
        batch = batch[np.argsort(-scores[batch], kind="stable")]  # cluster-based batches come in cluster order
        batch = drift_batch(batch, scores, unlabeled, self.settings)  # a share from drifted windows, if any
        ranked = np.argsort(-scores, kind="stable")
        version = loaded.ref.label
        rng = batch_rng(self.settings.seed, version)
        answered = set(self.journal.annotations(self.project_id)["task_id"])
        pending = pending_slices(self.slices, self.project_id, answered)
        pending_audit = np.flatnonzero(unlabeled["task_id"].isin(pending.query("kind == 'audit'")["task_id"]))
        needs_eval = self.settings.honeypot_rate > 0 or (pending["kind"] == "honeypot").any()
        frozen = self.registry.eval_set() if needs_eval else None
        eval_frame = frozen[1].astype({"id": str}) if frozen else pd.DataFrame(columns=["id", "text", "label"])
        all_pool = self.pool()
        candidates = honeypot_candidates(eval_frame, self.slices, self.project_id, set(all_pool["text"]))
        plan = plan_batch(n_unlabeled=len(unlabeled), batch=batch, ranked=ranked, pending_audit=pending_audit,
                          limit=max(self.queue_size, k), n_honeypot_candidates=len(candidates),
                          rates=SliceRates.from_settings(self.settings), rng=rng)

        # new honeypots and overlap copies become tasks of their own, recorded before anyone can answer them
        honey = candidates.iloc[plan.honeypots]
        sources = unlabeled.iloc[plan.overlap_sources]
        created = self.client.create_tasks(self.project_id, [*zip(honey["id"], honey["text"], strict=True),
                                                             *zip(sources["item_id"], sources["text"], strict=True)])
        honey_tasks, copy_tasks = created[: len(honey)], created[len(honey):]
        audit = unlabeled.iloc[plan.audit]
        self.slices.add([
            *slice_items(self.project_id, "audit", audit["task_id"].tolist(), audit["item_id"].tolist(), version),
            *slice_items(self.project_id, "honeypot", honey_tasks, honey["id"].tolist(), version,
                         gold_label=[label_text(self.taxonomy, gold) for gold in honey["label"]]),
            *slice_items(self.project_id, "overlap", copy_tasks, sources["item_id"].tolist(), version,
                         source_task_id=sources["task_id"].astype(int).tolist()),
        ])

        # pre-labels: the champion's label (or label set) for pool items and for every suggested slice task
        shown = self._shown(loaded.classifier.decide(ctx.proba))
        by_position = {i: Suggested(int(unlabeled["task_id"].iat[i]), shown[i]) for i in (*plan.al, *plan.tail)}
        carried = pending[pending["kind"].isin(["honeypot", "overlap"])]
        texts = dict(zip(all_pool["item_id"].astype(str), all_pool["text"], strict=False))
        texts.update(zip(eval_frame["id"], eval_frame["text"], strict=False))
        carried = carried[carried["item_id"].isin(texts)]
        extra_texts = [*honey["text"], *(texts[i] for i in carried["item_id"])]
        extra_labels = self._shown(loaded.classifier.predict(extra_texts)) if extra_texts else []
        new_honey = [Suggested(t, label) for t, label in zip(honey_tasks, extra_labels, strict=False)]
        carried_labels = dict(zip(carried["task_id"], extra_labels[len(honey_tasks):], strict=True))
        copies = {by_position[position].task_id: [Suggested(copy, by_position[position].label)]
                  for position, copy in zip(plan.overlap_sources, copy_tasks, strict=True)}
        blind = [Blind(int(t)) for t in unlabeled["task_id"].iloc[[*pending_audit.tolist(), *plan.audit]]]
        order, adjudications = assemble_queue(
            [by_position[i] for i in plan.al], [by_position[i] for i in plan.tail], [*blind, *new_honey], copies,
            place_pending(pending, carried_labels, {by_position[i].task_id for i in plan.al},
                          lambda stored: self._shown([label_cell(self.taxonomy, stored)])[0]), rng)
        predictions = priorities_for(order, adjudications, priority_classes(loaded.classifier), version)
        # blurred before the priorities move these items to the head of the queue, never after
        self._blur_confident_severe(unlabeled, ctx.proba, loaded.classifier.labels, [*plan.al, *plan.tail],
                                    dict(zip(plan.overlap_sources, copy_tasks, strict=True)))
        if progress:
            progress(0.8, f"pushing {len(predictions)} priorities to Label Studio")
        pushed = self.client.import_predictions(self.project_id, predictions)
        if predictions:
            self.client.set_model_version(self.project_id, version)
        self.pool_predictions = pool_decisions(loaded.classifier, ctx.proba, unlabeled["task_id"].to_numpy())
        counts = {"audit": plan.counts.audit, "honeypot": plan.counts.honeypot, "overlap": plan.counts.overlap,
                  "pending": len(pending)}
        return QueueResult(version, strategy.spec, len(unlabeled), [by_position[i].task_id for i in plan.al],
                           pushed, time.perf_counter() - started, counts)

    def _blur_confident_severe(self, unlabeled: pd.DataFrame, proba: np.ndarray, labels: Sequence[str],
                               positions: Sequence[int], copies: Mapping[int, int] | None = None) -> int:
        """Hide the whole text of queued items the champion predicts as a severe label with at least
        ``blur_threshold`` confidence: the masked view shows a notice until the reviewer chooses "Show
        original" (a recorded reveal), so nobody reads such an item before deciding to. ``copies`` maps a
        position to the overlap copy of its item (a task of its own, created with only the lexicon mask):
        the copy is blurred with it, or its second reviewer would read the item the first one was spared."""
        guard, scale = self.settings.protection_policy, self.settings.review_policy.severity
        copies = copies or {}
        blurred = 0
        multi = self.taxonomy.multi
        for i in dict.fromkeys([*positions, *copies]):
            label, probability = judged_prediction(labels, proba[i], multi_label=multi,
                                                   severe_labels=scale.severe_labels)
            if guard.blurs(scale, label, probability):
                row = unlabeled.iloc[i]
                masked = guard.masked_view(str(row["text"]), scale, label, probability)
                task_ids = [*([int(row["task_id"])] if i in positions else []),
                            *([int(copies[i])] if i in copies else [])]
                for task_id in task_ids:
                    self.client.set_masked_text(task_id, str(row["item_id"]), str(row["text"]), masked)
                    self.blurred[task_id] = (label, probability)
                    blurred += 1
        return blurred

    def _shown(self, decided: list) -> list:
        """What each pre-label pre-selects: the label, or the label set with the empty set shown as the
        taxonomy's none label (without one it stays empty: a priority with nothing pre-selected)."""
        none = (self.taxonomy.none_label,) if self.taxonomy.none_label else ()
        return [label or none for label in decided]

    def adjudicate(self, candidates: pd.DataFrame | Iterable) -> AdjudicationResult:
        """Send likely label errors (``annotation_id`` and optional disputed ``label`` per row) to Label
        Studio as adjudication tasks at the front of the queue (see :mod:`active_learning.adjudication`)."""
        version = self.project_model_version()
        if version is None:
            loaded = self.champion()
            if loaded is None:
                raise ValueError("no champion and no model_version on the project: nothing to queue against yet")
            version = loaded.ref.label
        result = send_for_adjudication(self.client, self.project_id, self.journal, self.slices, candidates,
                                       version, self.taxonomy.labels)
        if result.sent and self.project_model_version() != version:
            self.client.set_model_version(self.project_id, version)
        return result

    def project_model_version(self) -> str | None:
        return self.client.sdk.projects.get(self.project_id).model_version or None

    def run_round(self, progress: ReportProgress | None = None, on_snapshot: Callable[[], object] | None = None
                  ) -> RoundResult:
        """Retrain on every label in the journal, gate, and refresh the queue when the champion changed.

        ``on_snapshot`` runs right before the labels are read (the retrain trigger moves its mark there):
        a label that arrives in between is trained on now and also counts towards the next round, so
        none is ever skipped. Rounds on one jobs store (a state dir, or a PostgreSQL that replicas share)
        never overlap, across processes and replicas too (the services' retrain jobs and `labelloop loop
        round`)."""
        with _exclusive_round(self.settings):
            return self._run_round(progress, on_snapshot)

    def _run_round(self, progress: ReportProgress | None, on_snapshot: Callable[[], object] | None) -> RoundResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if on_snapshot:
            on_snapshot()
        labels = self.training_labels()
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
        queue, cold_start = None, None
        loaded = self.champion()
        t_push = time.perf_counter()
        if self.steers_queue and loaded is None:  # no model to rank with: diverse items first
            queue, cold_start = self.push_cold_start(progress)
            timings["queue"] = time.perf_counter() - t_push
        elif self.steers_queue and self.project_model_version() != loaded.ref.label:
            queue = self.push_queue(loaded, progress)
            timings["queue"] = time.perf_counter() - t_push
        timings["total"] = time.perf_counter() - started
        self.rounds += 1
        if queue is not None and loaded is not None:  # a new champion scored the pool: compare with the last
            self.last_signal = asdict(self.stopping.update(self.rounds, self.pool_predictions, macro_f1, len(labels)))
        signal = self.last_signal
        return RoundResult(len(labels), trained, macro_f1, promoted, reason,
                           loaded.ref.label if loaded else None, queue, signal, timings, cold_start)

    def run_finetune(self, progress: ReportProgress | None = None) -> RoundResult:
        """Fine-tune the base model on every label the loop has, with the product's recipe (what
        ``labelloop train --dataset <loop export>`` does), register it as challenger and gate it like any retrain.

        Training takes minutes, so it runs outside the round lock and fast rounds go on meanwhile; the gate, the
        serving swap and the queue refresh take the lock, so they never interleave with a round's own, and the
        gate compares with whichever champion the rounds left in place by then."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        labels = self.training_labels()
        source = f"label-studio:project-{self.project_id}" if self.project_id is not None else "the journal's labels"
        if progress:
            progress(0.02, f"splitting {len(labels)} labels for fine-tuning")
        train, validation = finetune_frames(labels, self.taxonomy, seed=self.settings.seed, source=source)
        result = train_and_register(train, validation, self.taxonomy, mode="finetune", settings=self.settings,
                                    source=source, extra_params={"strategy": self.strategy_name, "labels": len(labels)},
                                    progress=FinetuneProgress(progress, 0.05, 0.85))
        timings["train"] = time.perf_counter() - started
        with _exclusive_round(self.settings):
            if progress:
                progress(0.9, "promotion gate")
            decision = self.registry.promote(result.ref.version)
            timings["gate"] = time.perf_counter() - started - timings["train"]
            if decision.promoted and self._on_promoted:
                self._on_promoted()
            loaded = self.champion()
            queue = None
            if self.steers_queue and loaded is not None and self.project_model_version() != loaded.ref.label:
                t_push = time.perf_counter()
                queue = self.push_queue(loaded, progress)
                timings["queue"] = time.perf_counter() - t_push
        timings["total"] = time.perf_counter() - started
        return RoundResult(len(labels), result.ref.label, result.report.macro_f1, decision.promoted, decision.reason,
                           loaded.ref.label if loaded else None, queue, None, timings, mode="finetune")
