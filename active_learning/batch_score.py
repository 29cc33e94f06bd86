"""Scoring a pool of any size with the champion on a Ray cluster (``labelloop score``).

The in-process scorer (:class:`active_learning.pool.ScoredPool`) runs every text through one model in one
process. A backlog of millions of items needs more than one machine, so this module runs the same model
call, :meth:`TextClassifier.predict_proba` (which sorts each batch's texts by length and pads dynamically,
the in-process scorer's source of speed), inside a Ray Data actor pool: each actor loads the champion once
and scores batch after batch; actors ask for a GPU each when the cluster has GPUs, so the model runs on
CUDA there (``device = auto``).

Acquisition scores are computed per batch by the strategy itself, which is exact for the strategies whose
score of an item depends only on that item's probabilities (margin, entropy, ...). Strategies that also
need embeddings, stochastic passes or the labeled set (k-means diversity, BADGE, BALD, cardinality) are
refused up front: their selection looks at the whole pool's embeddings at once, which is the loop's job
(``labelloop loop round``), not a streaming one.

The driver streams the scored batches into one Parquet file written under a temporary name and renamed
into place at the end, so a failed run leaves no partial output; it keeps only the score and probability
columns in memory, for the vectorised top-K (:mod:`active_learning.selection`) that ``--push-top`` sends to
Label Studio through the same calls the loop's queue push uses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from active_learning.strategies import PoolContext, QueryStrategy, parse_strategy
from labelloop.config import Settings

log = logging.getLogger("labelloop.score")

#: file suffix → Ray Data reader; ``.json`` is read as JSON Lines, one object per line
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json",
           ".json": "json"}
#: what an actor's strategy may look at: per-item probabilities (and which classes are severe)
STREAMABLE_NEEDS = frozenset({"proba", "severe_classes"})
ID_COLUMNS = ("id", "item_id")
DEFAULT_BATCH_SIZE = 1024
#: texts per forward pass inside an actor: the in-process scorer's 64 on CPU; a GPU wants wider passes
CPU_MODEL_BATCH, GPU_MODEL_BATCH = 64, 256


class ScoreError(ValueError):
    """Bad input to ``labelloop score``: a missing file, no text column, an empty pool, a strategy that
    cannot stream, no champion. The CLI prints it as one ``error:`` line and exits 2."""


@dataclass(frozen=True)
class PoolFiles:
    """The pool's files of one format on one filesystem (local or object storage)."""

    fmt: str
    paths: tuple[str, ...]
    filesystem: Any  # pyarrow.fs.FileSystem


@dataclass
class ScoreResult:
    rows: int
    model_version: str
    strategy: str
    out: str
    seconds: float
    actors: int
    gpus_per_actor: int
    top: pd.DataFrame = field(default_factory=pd.DataFrame)  # the top-K by acquisition score (with --push-top)
    pushed: int = 0
    note: str = ""  # why the strategy used is not the one configured (see fallback_note)
    #: seconds until the first scored batch came back (Ray start, actor start, champion load, first batch)
    first_batch_seconds: float = 0.0
    #: texts/s from the first scored batch to the last: the rate once the fixed start-up cost is paid
    steady_texts_per_second: float = 0.0

    @property
    def texts_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------------------- input files
def _filesystem(path: str):
    """``(filesystem, path on it)`` for a local path or a URI pyarrow understands (``s3://``, ``gs://``...)."""
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def _fmt(path: str) -> str | None:
    return FORMATS.get(PurePosixPath(path).suffix.lower())


def pool_files(paths: Sequence[str]) -> list[PoolFiles]:
    """Every Parquet/CSV/JSONL file the given paths name (a directory: the files in it, recursively; hidden
    files and ``_SUCCESS`` markers skipped), grouped by format and filesystem. Fails on a path that does not
    exist, a file of another type, or no file at all."""
    from pyarrow import fs

    if not paths:
        raise ScoreError("no pool given: pass --pool with Parquet/CSV/JSONL files or a directory of them")
    groups: dict[tuple[str, int], list[str]] = {}
    systems: dict[int, Any] = {}
    for given in paths:
        filesystem, path = _filesystem(str(given))
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise ScoreError(f"pool path not found: {given}")
        if info.type == fs.FileType.Directory:
            found = [f.path for f in filesystem.get_file_info(fs.FileSelector(path, recursive=True))
                     if f.type == fs.FileType.File and not PurePosixPath(f.path).name.startswith((".", "_"))
                     and _fmt(f.path)]
            if not found:
                raise ScoreError(f"no Parquet, CSV or JSONL files in {given}")
        elif _fmt(path) is None:
            raise ScoreError(f"{given}: not a Parquet, CSV or JSONL file (by its suffix: "
                             f"{', '.join(sorted(FORMATS))})")
        else:
            found = [path]
        systems[id(filesystem)] = filesystem
        for f in sorted(found):
            groups.setdefault((_fmt(f), id(filesystem)), []).append(f)
    return [PoolFiles(fmt, tuple(dict.fromkeys(files)), systems[fs_id]) for (fmt, fs_id), files in groups.items()]


def _columns(files: PoolFiles, path: str) -> list[str]:
    """The column names of one pool file, from its header or first record only."""
    import json

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if files.fmt == "parquet":
            return list(pq.read_schema(path, filesystem=files.filesystem).names)
        with files.filesystem.open_input_stream(path) as stream:
            if files.fmt == "csv":
                return list(pacsv.open_csv(stream).schema.names)
            head = b""
            while chunk := stream.read(1 << 16):  # up to the first non-blank line: that record names the columns
                head += chunk
                if head.strip() and b"\n" in head.lstrip():
                    break
            line = head.lstrip().split(b"\n", 1)[0]
            if not line.strip():
                raise ScoreError(f"the pool file {path} is empty: no JSON records")
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ScoreError(f"{path}: a JSONL pool needs one JSON object per line")
            return list(record)
    except ScoreError:
        raise
    except Exception as e:  # unreadable header: name the file and what the reader said
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ScoreError(f"{path}: cannot read it as {files.fmt}: {first}") from None


def pool_columns(groups: Sequence[PoolFiles], text_column: str, id_column: str | None) -> tuple[str, str, bool]:
    """``(text column, id column, has task_id)`` after checking every file has them; the id column
    defaults to ``id``, else ``item_id`` (the loop's own pool files)."""
    chosen_id, task_ids = id_column, True
    for files in groups:
        for path in files.paths:
            names = _columns(files, path)
            if text_column not in names:
                raise ScoreError(f"{path}: no text column {text_column!r} (columns: {names}); name it with "
                                 f"--text-column")
            candidates = [id_column] if id_column else [c for c in ID_COLUMNS if c in names]
            if not candidates or candidates[0] not in names:
                raise ScoreError(f"{path}: no id column {id_column or ' or '.join(ID_COLUMNS)!r} (columns: "
                                 f"{names}); name it with --id-column")
            if chosen_id is None:
                chosen_id = candidates[0]
            elif chosen_id not in names:
                raise ScoreError(f"{path}: no id column {chosen_id!r} like the other pool files (columns: {names})")
            task_ids = task_ids and "task_id" in names
    return text_column, chosen_id, task_ids


def _streams(strategy: QueryStrategy) -> bool:
    return strategy.needs <= STREAMABLE_NEEDS


def check_strategy(spec: str, multi_label: bool, *, explicit: bool = True) -> QueryStrategy:
    """The strategy ``spec`` names, if its acquisition score can be computed batch by batch.

    A strategy given on purpose (``explicit``) that cannot stream is refused. The ``strategy`` setting's
    (``auto`` is a k-means strategy by default) falls back to the first base strategy that streams: a k-means
    strategy's acquisition score *is* its base's, only its diversity step needs the pool's embeddings, so
    ``margin_kmeans`` ranks by margin here (:func:`fallback_note` says so)."""
    strategy = parse_strategy(spec, multi_label)
    if _streams(strategy):
        return strategy
    base = getattr(strategy, "base", None)
    while not explicit and base is not None and not _streams(base):
        base = getattr(base, "base", None)
    if not explicit and base is not None:
        return base
    extra = sorted(strategy.needs - STREAMABLE_NEEDS)
    raise ScoreError(f"strategy {strategy.spec!r} needs {extra} over the whole pool, which labelloop score does "
                     f"not compute; use a per-item strategy (margin, entropy, least_confidence, "
                     f"mean_binary_entropy, max_binary_entropy, random, class_balanced:<one of those>, "
                     f"mixed:..., severity_weighted:...) or rank with the loop (labelloop loop round)")


def fallback_note(spec: str, used: QueryStrategy, multi_label: bool) -> str:
    """What the output says when the setting's strategy was replaced by its streaming base ('' if not)."""
    configured = parse_strategy(spec, multi_label)
    if configured.spec == used.spec:
        return ""
    return (f"the strategy setting {spec!r} ({configured.spec}) needs the pool's embeddings for its diversity "
            f"step; scored and ranked by its base, {used.spec} (choose with --strategy)")


# ------------------------------------------------------------------------------------- the actors
def text_key(text: str) -> str:
    """The same key the in-process probability cache uses for a text (sha1 of its UTF-8)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def proba_columns(labels: Sequence[str]) -> list[str]:
    return [f"p_{label}" for label in labels]


class PoolScorer:
    """A Ray Data actor: loads one champion version once, then scores pandas batches of the pool.

    ``threads``: torch's intra-op threads in this actor (Ray's logical CPU counts leave torch free to use
    every core, so several actors on one node split them)."""

    def __init__(self, settings: Settings, version: int, strategy: str, text_column: str, id_column: str,
                 task_ids: bool, batch_size: int, threads: int):
        import torch

        from training.registry import Registry

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or threads)))
        loaded = Registry(settings).load(version)
        self.classifier = loaded.classifier
        self.model_version = loaded.ref.label
        self.strategy = parse_strategy(strategy, self.classifier.multi_label)
        self.severe = np.array([self.classifier.labels.index(label)
                                for label in settings.review_policy.severity.severe_labels
                                if label in self.classifier.labels], dtype=np.int64)
        self.text_column, self.id_column, self.task_ids = text_column, id_column, task_ids
        self.batch_size = batch_size

    def __call__(self, batch: pd.DataFrame):
        """The batch's scores as an Arrow table with fixed column types, so every batch (a multi-label
        batch where no item gets a label included) writes into the same Parquet schema."""
        import pyarrow as pa

        texts = batch[self.text_column].fillna("").astype(str).tolist()
        proba = self.classifier.predict_proba(texts, self.batch_size)
        multi = self.classifier.multi_label
        ctx = PoolContext(n_classes=len(self.classifier.labels), proba=proba, size=len(texts), multi_label=multi,
                          thresholds=self.classifier.thresholds if multi else None, severe_classes=self.severe)
        columns = {"id": pa.array(batch[self.id_column].astype(str).tolist(), pa.string()),
                   "text_sha1": pa.array([text_key(t) for t in texts], pa.string())}
        if self.task_ids:
            columns["task_id"] = pa.array(pd.to_numeric(batch["task_id"]).to_numpy(dtype=np.int64), pa.int64())
        for name, column in zip(proba_columns(self.classifier.labels), proba.T, strict=True):
            columns[name] = pa.array(column.astype(np.float32), pa.float32())
        decided = self.classifier.decide(proba)
        columns["predicted"] = (pa.array([list(d) for d in decided], pa.list_(pa.string())) if multi
                                else pa.array(decided, pa.string()))
        columns["model_version"] = pa.array([self.model_version] * len(texts), pa.string())
        columns["score"] = pa.array(np.asarray(self.strategy.scores(ctx), dtype=np.float64), pa.float64())
        columns["text"] = pa.array(texts, pa.string())  # for the driver (blurring what it pushes); never written
        return pa.table(columns)


# ------------------------------------------------------------------------------------- Ray
@dataclass
class RayCluster:
    """Connects to ``address`` (an existing cluster) or starts a quiet local Ray with ``num_cpus``, and
    leaves it as it found it: a Ray this process did not start (a test's) is neither started nor shut down."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_bytes: int = 1 << 30
    started: bool = False

    def __enter__(self) -> RayCluster:
        import ray

        quiet()
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                       "log_to_driver": False, "configure_logging": True}
            if self.address:
                ray.init(address=self.address, **options)
            else:
                # Ray's memory monitor kills workers when the *machine* nears full memory, whoever uses it: on a
                # shared box that restarts the actor (champion load and its batches again) because of other
                # programs. A local run leaves that to the kernel, as the in-process scorer does.
                os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
                ray.init(num_cpus=self.num_cpus or os.cpu_count() or 1,
                         object_store_memory=self.object_store_bytes, **options)
            self.started = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.started:
            ray.shutdown()

    @staticmethod
    def resources() -> tuple[float, float]:
        import ray

        total = ray.cluster_resources()
        return float(total.get("CPU", 0)), float(total.get("GPU", 0))


def quiet() -> None:
    """No progress bars, no per-run execution banners or stats: a CLI prints its own summary."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.verbose_stats_logs = False
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.ERROR)


def read_pool(groups: Sequence[PoolFiles], columns: Sequence[str]):
    """One Ray dataset over every pool file, only ``columns`` kept (so formats with other extras union)."""
    import ray.data

    # read_json's default reader is pyarrow's, which reads JSON Lines (one object per line)
    readers = {"parquet": ray.data.read_parquet, "csv": ray.data.read_csv, "json": ray.data.read_json}
    parts = []
    for files in groups:
        # the files were chosen by suffix already: no reader may drop one for its extension (.ndjson)
        options = {"columns": list(columns)} if files.fmt == "parquet" else {"file_extensions": None}
        ds = readers[files.fmt](list(files.paths), filesystem=files.filesystem, **options)
        parts.append(ds.select_columns(list(columns)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------------- output
class _AtomicParquet:
    """Streams tables into ``out`` under a temporary name beside it; :meth:`commit` renames it into place,
    :meth:`abort` removes it, so a reader never meets a half-written score file."""

    def __init__(self, out: str):
        filesystem, path = _filesystem(out)
        self.filesystem, self.path = filesystem, path
        parent = str(PurePosixPath(path).parent)
        self.tmp = f"{parent}/.{PurePosixPath(path).name}.{uuid.uuid4().hex}.tmp"
        filesystem.create_dir(parent, recursive=True)
        self.writer = None

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema, filesystem=self.filesystem)
        self.writer.write_table(table.cast(self.writer.schema))

    def commit(self) -> None:
        self.writer.close()
        self.filesystem.move(self.tmp, self.path)

    def abort(self) -> None:
        from pyarrow import fs

        if self.writer is not None:
            self.writer.close()
        if self.filesystem.get_file_info(self.tmp).type != fs.FileType.NotFound:
            self.filesystem.delete_file(self.tmp)


# ------------------------------------------------------------------------------------- the run
@dataclass
class Collected:
    """What the driver keeps of the scored pool for selection: no texts unless a push needs them."""

    ids: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    proba: list[np.ndarray] = field(default_factory=list)
    predicted: list[list] = field(default_factory=list)
    task_ids: list[np.ndarray] = field(default_factory=list)
    texts: list[list] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def add(self, table, keep_texts: bool) -> None:
        names = table.column_names
        if not self.labels:
            self.labels = [n.removeprefix("p_") for n in names if n.startswith("p_")]
        self.ids.append(table.column("id").to_numpy(zero_copy_only=False))
        self.scores.append(table.column("score").to_numpy())
        self.proba.append(np.column_stack([table.column(f"p_{label}").to_numpy() for label in self.labels]))
        if "task_id" in names:
            self.task_ids.append(table.column("task_id").to_numpy())
        if keep_texts:
            self.predicted.append(table.column("predicted").to_pylist())
            self.texts.append(table.column("text").to_pylist())

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"id": np.concatenate(self.ids), "score": np.concatenate(self.scores)})
        if self.task_ids:
            frame["task_id"] = np.concatenate(self.task_ids)
        if self.texts:
            frame["text"] = [t for part in self.texts for t in part]
            frame["predicted"] = [p for part in self.predicted for p in part]
        return frame

    def proba_matrix(self) -> np.ndarray:
        return np.concatenate(self.proba) if self.proba else np.zeros((0, len(self.labels)), dtype=np.float32)


def champion_version(settings: Settings) -> int:
    from training.registry import CHAMPION, Registry

    version = Registry(settings).alias_version(CHAMPION)
    if version is None:
        raise ScoreError(f"model {settings.model_name!r} has no champion in the registry at {settings.tracking_uri}: "
                         "train and promote one first (labelloop train --promote)")
    return version


def score_pool(settings: Settings, pool: Sequence[str], out: str, *, strategy: str | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, actors: int | None = None, ray_address: str | None = None,
               num_cpus: int | None = None, text_column: str = "text", id_column: str | None = None,
               push_top: int = 0, queue: QueuePush | None = None) -> ScoreResult:
    """Score every pool item with the registry's champion on Ray and write ``out`` (Parquet).

    Everything a user can get wrong is checked before Ray starts. With ``push_top``, the strategy's top
    items among ``queue``'s eligible ones (unlabeled tasks of its project) are selected and, when ``queue``
    is given, pushed; the output file is complete and in place before the push starts."""
    from labelloop.taxonomy import get_taxonomy

    if batch_size < 1:
        raise ScoreError("--batch-size must be at least 1")
    if actors is not None and actors < 1:
        raise ScoreError("--actors must be at least 1")
    if push_top < 0:
        raise ScoreError("--push-top must be 0 or more")
    multi_label = get_taxonomy(settings.taxonomy).multi
    chosen = check_strategy(strategy or settings.strategy, multi_label, explicit=strategy is not None)
    note = "" if strategy else fallback_note(settings.strategy, chosen, multi_label)
    groups = pool_files(pool)
    text_col, id_col, has_task_ids = pool_columns(groups, text_column, id_column)
    version = champion_version(settings)
    columns = [id_col, text_col, *(["task_id"] if has_task_ids else [])]
    started = time.perf_counter()
    with RayCluster(ray_address, num_cpus):
        cpus, gpus = RayCluster.resources()
        n_actors = actors or (int(gpus) if gpus >= 1 else 1)
        threads = max(1, int(cpus // n_actors)) if not gpus else 1
        # batch-sized blocks (a streaming split, no shuffle): a one-file pool is one block as read, which one
        # actor would score whole while the others idle, and whose results would reach the driver only at the end
        blocks = read_pool(groups, columns).repartition(target_num_rows_per_block=batch_size)
        scored = blocks.map_batches(
            PoolScorer, batch_size=batch_size, batch_format="pandas", concurrency=n_actors,
            num_cpus=1, num_gpus=1 if gpus >= 1 else 0,
            fn_constructor_kwargs={"settings": settings, "version": version, "strategy": chosen.spec,
                                   "text_column": text_col, "id_column": id_col, "task_ids": has_task_ids,
                                   "batch_size": GPU_MODEL_BATCH if gpus >= 1 else CPU_MODEL_BATCH,
                                   "threads": threads})
        writer = _AtomicParquet(out)
        collected = Collected()
        model_version = ""
        first_at, first_rows, last_at = 0.0, 0, 0.0
        try:
            for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                if not table.num_rows:
                    continue
                last_at = time.perf_counter()
                if not first_at:
                    first_at, first_rows = last_at, table.num_rows
                model_version = model_version or table.column("model_version")[0].as_py()
                collected.add(table, keep_texts=push_top > 0)
                writer.write(table.drop_columns(["text"]))
            rows = sum(len(s) for s in collected.scores)
            if rows == 0:
                raise ScoreError(f"the pool is empty: no rows in {', '.join(map(str, pool))}")
        except BaseException:
            writer.abort()
            raise
        writer.commit()
    result = ScoreResult(rows, model_version, chosen.spec, out, time.perf_counter() - started, n_actors,
                         1 if gpus >= 1 else 0, note=note, first_batch_seconds=first_at - started,
                         steady_texts_per_second=(rows - first_rows) / (last_at - first_at) if last_at > first_at
                         else 0.0)
    if push_top:
        frame, proba = collected.frame(), collected.proba_matrix()
        eligible = np.arange(len(frame))
        if queue is not None:
            frame["task_id"] = queue.task_ids(frame)
            eligible = np.flatnonzero(queue.eligible(frame["task_id"].to_numpy()))
            if not len(eligible):
                raise ScoreError(f"none of the {rows} pool items is an unlabeled task of project {queue.project_id}")
        top = eligible[select_top(frame.iloc[eligible], proba[eligible], chosen, push_top, settings,
                                  multi_label=multi_label)]
        result.top = frame.iloc[top].reset_index(drop=True)
        if queue is not None:
            result.pushed = queue.push(result.top, proba[top], version)
    return result


class QueuePush:
    """Puts the scored pool's top items at the front of a Label Studio project's queue with the calls the
    loop's :meth:`~active_learning.loop.ActiveLearningLoop.push_queue` makes: review priorities from
    :func:`~active_learning.slices_push.priorities_for` below every pre-label's score, the champion's label
    pre-selected, confidently severe items blurred first, one bulk import, then the project's
    ``model_version``. Only unlabeled tasks (per the journal) of the project are eligible."""

    def __init__(self, loop):
        self.loop = loop

    @property
    def project_id(self) -> int:
        return self.loop.project_id

    def task_ids(self, frame: pd.DataFrame) -> np.ndarray:
        """Each row's task id: the pool's own ``task_id`` column (the loop's pool files have one), else
        the project's task for the item id; -1 where the project has none."""
        if "task_id" in frame.columns:
            return frame["task_id"].to_numpy(dtype=np.int64)
        mapping = pd.Series(self.loop.client.task_ids(self.project_id), dtype="int64")
        return frame["id"].astype(str).map(mapping).fillna(-1).to_numpy(dtype=np.int64)

    def eligible(self, task_ids: np.ndarray) -> np.ndarray:
        annotated = self.loop.journal.annotations(self.project_id)["task_id"].to_numpy()
        return (task_ids > 0) & ~np.isin(task_ids, annotated)

    def push(self, top: pd.DataFrame, proba: np.ndarray, version: int) -> int:
        from active_learning.loop import priority_classes
        from active_learning.slices_push import Suggested, priorities_for

        loaded = self.loop.registry.load(version)
        unlabeled = pd.DataFrame({"item_id": top["id"].astype(str), "text": top["text"],
                                  "task_id": top["task_id"].astype("int64")})
        self.loop._blur_confident_severe(unlabeled, proba, loaded.classifier.labels, list(range(len(top))))
        shown = self.loop._shown(loaded.classifier.decide(proba))
        order = [Suggested(int(task), label) for task, label in zip(unlabeled["task_id"], shown, strict=True)]
        predictions = priorities_for(order, [], priority_classes(loaded.classifier), loaded.ref.label)
        pushed = self.loop.client.import_predictions(self.project_id, predictions)
        if predictions:
            self.loop.client.set_model_version(self.project_id, loaded.ref.label)
        return pushed


def select_top(frame: pd.DataFrame, proba: np.ndarray, strategy: QueryStrategy, k: int, settings: Settings,
               *, multi_label: bool, rng_seed: int | None = None) -> np.ndarray:
    """Positions of the strategy's top ``k`` of the scored pool, most informative first: the strategy's own
    :meth:`~QueryStrategy.select` (vectorised top-K, or its class quotas / random share), then ordered by
    acquisition score, exactly as the loop orders its batch."""
    from labelloop.taxonomy import get_taxonomy

    labels = list(get_taxonomy(settings.taxonomy).labels)
    severe = np.array([labels.index(label) for label in settings.review_policy.severity.severe_labels
                       if label in labels], dtype=np.int64)
    ctx = PoolContext(n_classes=proba.shape[1], proba=proba, size=len(frame), multi_label=multi_label,
                      severe_classes=severe)
    rng = np.random.default_rng(settings.seed if rng_seed is None else rng_seed)
    chosen = strategy.select(ctx, k, rng)
    scores = frame["score"].to_numpy()
    return chosen[np.argsort(-scores[chosen], kind="stable")]
