"""Scoring the unlabeled pool without recomputing what has not changed.

A round needs, for every unlabeled item, the current model's probabilities (uncertainty), frozen
encoder embeddings (diversity) and, for BALD, stochastic predictions. Embedding is the slow part
(~2 minutes for 20k texts on two cores) and never changes for a text, so embeddings live in the
shared :class:`training.fast.EmbeddingCache`. Probabilities change only when the model does:

* models with a ``frozen_encoder`` (fast mode: frozen encoder + linear head) score straight from the
  cached embeddings with their head — milliseconds for 20k items, nothing worth caching;
* any other model (fine-tuned) pays a full forward pass per text, so its probabilities are cached on
  disk per (model version, text) and a later round with the same version — or a pool that only
  grew — computes only the new texts.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from active_learning.strategies import NEEDS, PoolContext, QueryStrategy, parse_strategy
from labelloop.config import DEFAULT_BASE_MODEL
from training.classifier import (  # noqa: F401  (the two committee functions are imported from here too)
    Encoder,
    TextClassifier,
    bootstrap_committee_proba,
    load_encoder,
    mc_dropout_proba,
)
from training.fast import EmbeddingCache


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class ProbaCache:
    """Model outputs per (model version, text), one ``.npz`` file per version under ``directory``.

    A file is rewritten whole to a temporary name and renamed into place, so a reader never sees half
    of it; if two processes extend the same version at once, the later rename wins and the other's new
    rows are simply computed again next time — never wrong, at worst repeated.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, version: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", version).strip("-")[-48:]
        return self.directory / f"{slug}-{hashlib.sha1(version.encode()).hexdigest()[:8]}.npz"

    def _read(self, version: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self._path(version)
        if not path.exists():
            return None
        with np.load(path) as stored:
            return stored["keys"], stored["values"]

    def get(self, version: str, texts: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Rows for ``texts`` in order; ``compute`` runs once, on the texts this version has not seen."""
        if not len(texts):
            return np.asarray(compute([]), dtype=np.float32)
        keys = np.array([_text_key(t) for t in texts], dtype="U40")
        stored = self._read(version)
        known_keys, known_values = stored if stored is not None else (np.array([], dtype="U40"), None)
        unseen = ~np.isin(keys, known_keys)
        if unseen.any():
            new_keys, first = np.unique(keys[unseen], return_index=True)
            new_texts = [texts[i] for i in np.flatnonzero(unseen)[first]]
            new_values = np.asarray(compute(new_texts), dtype=np.float32)
            if known_values is None:
                known_keys, known_values = new_keys, new_values
            else:
                known_keys = np.concatenate([known_keys, new_keys])
                known_values = np.concatenate([known_values, new_values])
            self._write(version, known_keys, known_values)
        order = np.argsort(known_keys)
        rows = order[np.searchsorted(known_keys, keys, sorter=order)]
        return known_values[rows]

    def _write(self, version: str, keys: np.ndarray, values: np.ndarray) -> None:
        path = self._path(version)
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, keys=keys, values=values)
        os.replace(tmp, path)


class ScoredPool:
    """The unlabeled pool as seen by one model version.

    ``items``: the unlabeled pool (columns ``id``, ``text``). ``labeled``: the labeled set (``id``,
    ``text``, ``label`` by name), for strategies that look at it and for the BALD committee.
    ``encoder``: frozen encoder for diversity embeddings; defaults to the fast model's own encoder, or
    the default base model for other classifiers (a fine-tuned model's own embeddings would have to
    be recomputed for every version).
    """

    def __init__(self, items: pd.DataFrame, classifier: TextClassifier, model_version: str, cache_dir: Path, *,
                 labeled: pd.DataFrame | None = None, encoder: Encoder | None = None, mc_samples: int = 8,
                 seed: int = 0, batch_size: int = 64, progress: Callable[[int], None] | None = None,
                 severe_labels: Sequence[str] = ()):
        missing = {"id", "text"} - set(items.columns)
        if missing:
            raise ValueError(f"pool items need columns id and text (missing: {sorted(missing)})")
        if labeled is not None and not {"id", "text", "label"} <= set(labeled.columns):
            raise ValueError("the labeled set needs columns id, text and label")
        self.items = items.reset_index(drop=True)
        self.texts: list[str] = self.items["text"].astype(str).tolist()
        self.classifier = classifier
        self.model_version = model_version
        self.labeled = labeled
        self.mc_samples = mc_samples
        self.seed = seed
        self.batch_size = batch_size
        self.progress = progress
        self.severe_classes = np.array([classifier.labels.index(label) for label in severe_labels
                                        if label in classifier.labels], dtype=np.int64)
        if encoder is None:
            encoder = classifier.frozen_encoder or load_encoder(DEFAULT_BASE_MODEL, classifier.max_length).to(
                classifier.device)
        self.embedding_cache = EmbeddingCache(Path(cache_dir) / "embeddings", encoder)
        self.proba_cache = ProbaCache(Path(cache_dir) / "proba")
        self._memo: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _memoised(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def embeddings(self) -> np.ndarray:
        return self._memoised("embeddings", lambda: self.embedding_cache.get(self.texts, self.progress))

    def _labeled_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        def compute() -> np.ndarray:
            return self.embedding_cache.get(self.labeled["text"].astype(str).tolist())

        return self._memoised("labeled_embeddings", compute), self._labeled_y()

    def _labeled_y(self) -> np.ndarray:
        """The labeled set's labels as the model's outputs: label ids for a single-label model, an L x K
        0/1 matrix for a multi-label one (each cell a tuple of names; the empty tuple is "none of these")."""
        labels = self.classifier.labels
        index = {label: i for i, label in enumerate(labels)}
        cells = self.labeled["label"].tolist()
        names = {n for cell in cells for n in cell} if self.classifier.multi_label else set(cells)
        unknown = sorted(map(str, names - set(index)))
        if unknown:
            raise ValueError(f"labeled set has labels {unknown} unknown to the model {list(index)}")
        if not self.classifier.multi_label:
            return np.array([index[cell] for cell in cells], dtype=int)
        y = np.zeros((len(cells), len(labels)), dtype=np.int8)
        for row, cell in enumerate(cells):
            y[row, [index[n] for n in cell]] = 1
        return y

    def proba(self) -> np.ndarray:
        def compute() -> np.ndarray:
            if self.classifier.frozen_encoder is not None:
                return self.classifier.proba_from_embeddings(self.embeddings())
            return self.proba_cache.get(
                self.model_version, self.texts,
                lambda texts: self.classifier.predict_proba(texts, self.batch_size, self.progress))

        return self._memoised("proba", compute)

    def mc_proba(self) -> np.ndarray:
        """T x N x K: the classifier's own :meth:`~TextClassifier.stochastic_proba` (a bootstrap
        committee for fast-mode heads, which needs ``labeled``; MC dropout for fine-tuned models). Models
        that need forward passes are cached per version: T passes over the pool are expensive."""
        def compute() -> np.ndarray:
            k, t = len(self.classifier.labels), self.mc_samples
            has_labeled = self.labeled is not None and not self.labeled.empty
            sample = self.classifier.stochastic_proba
            options = {"seed": self.seed, "batch_size": self.batch_size, "embeddings": self.embeddings,
                       "labeled": self._labeled_arrays if has_labeled else None}
            if self.classifier.frozen_encoder is not None:
                return sample(self.texts, t, **options)
            flat = self.proba_cache.get(
                f"{self.model_version}#mc{t}-seed{self.seed}", self.texts,
                lambda texts: sample(texts, t, **options).transpose(1, 0, 2).reshape(len(texts), t * k))
            return flat.reshape(len(self.texts), t, k).transpose(1, 0, 2)

        return self._memoised("mc_proba", compute)

    def context(self, need: Iterable[str] = ("proba",)) -> PoolContext:
        """A :class:`PoolContext` holding exactly what ``need`` asks for (computing it at most once)."""
        need = frozenset(need)
        unknown = need - NEEDS
        if unknown:
            raise ValueError(f"unknown context field(s) {sorted(unknown)}; choose from {sorted(NEEDS)}")
        multi = self.classifier.multi_label
        ctx = PoolContext(n_classes=len(self.classifier.labels), size=len(self.items), multi_label=multi,
                          thresholds=self.classifier.thresholds if multi else None)
        if "proba" in need:
            ctx.proba = self.proba()
        has_labeled = self.labeled is not None and not self.labeled.empty
        if "embeddings" in need:
            ctx.embeddings = self.embeddings()
            if has_labeled:
                ctx.labeled_embeddings, ctx.labeled_y = self._labeled_arrays()
        if "labeled_y" in need:
            if not has_labeled:
                raise ValueError("this query strategy compares the pool with the labeled set: pass labeled=")
            ctx.labeled_y = self._labeled_y()
        if "mc_proba" in need:
            ctx.mc_proba = self.mc_proba()
        if "severe_classes" in need:
            ctx.severe_classes = self.severe_classes
        return ctx

    def rank(self, strategy: QueryStrategy | str, k: int, seed: int | None = None) -> pd.DataFrame:
        """The next batch of ``k`` items to review, most informative first: ``id``, ``text``, ``score``
        (the strategy's acquisition score) and, where the strategy used the model, its ``predicted``
        label and ``confidence``."""
        if isinstance(strategy, str):
            strategy = parse_strategy(strategy, self.classifier.multi_label)
        if not len(self.items):
            return self.items.assign(score=np.zeros(0))
        ctx = self.context(strategy.needs)
        rng = np.random.default_rng(self.seed if seed is None else seed)
        chosen = strategy.select(ctx, k, rng)
        scores = strategy.scores(ctx)[chosen]
        order = np.argsort(-scores, kind="stable")
        chosen, scores = chosen[order], scores[order]
        batch = self.items.iloc[chosen][["id", "text"]].reset_index(drop=True).assign(score=scores)
        if ctx.proba is not None:
            batch["predicted"] = self.classifier.decide(ctx.proba[chosen])
            batch["confidence"] = ctx.proba[chosen].max(1)
        return batch
