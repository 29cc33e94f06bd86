"""Scoring the unlabeled pool without recomputing what has not changed.

A round needs, for every unlabeled item, the current model's probabilities (uncertainty), frozen
encoder embeddings (diversity) and, for BALD, stochastic predictions. Embedding is the slow part
(~2 minutes for 20k texts on two cores) and never changes for a text, so embeddings live in the
shared :class:`training.fast.EmbeddingCache`. Probabilities change only when the model does:

* fast-mode models (:class:`EmbeddingHeadClassifier`) score straight from the cached embeddings with
  their linear head — milliseconds for 20k items, nothing worth caching;
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
import torch
from sklearn.base import clone

from active_learning.strategies import NEEDS, PoolContext, QueryStrategy, parse_strategy
from labelloop.config import DEFAULT_BASE_MODEL
from training.classifier import (
    EmbeddingHeadClassifier,
    Encoder,
    FineTunedClassifier,
    TextClassifier,
    length_sorted_batches,
    load_encoder,
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


def bootstrap_committee_proba(head, labeled_embeddings: np.ndarray, labeled_y: np.ndarray,
                              pool_embeddings: np.ndarray, n_classes: int, n_members: int,
                              rng: np.random.Generator) -> np.ndarray:
    """T x N x K predictions of ``n_members`` copies of ``head`` (same hyper-parameters) refit on
    bootstrap resamples of the labeled set — the stochastic predictions BALD needs, for a linear head
    that has no dropout. Resampling is done within each class so every member sees every class (a
    rare class would otherwise vanish from some resamples and get probability 0 by accident)."""
    labeled_y = np.asarray(labeled_y, dtype=int)
    by_class = [np.flatnonzero(labeled_y == c) for c in np.unique(labeled_y)]
    out = np.zeros((n_members, len(pool_embeddings), n_classes), dtype=np.float32)
    for t in range(n_members):
        sample = np.concatenate([rng.choice(members, size=len(members)) for members in by_class])
        member = clone(head).set_params(random_state=int(rng.integers(2**31 - 1)))
        member.fit(labeled_embeddings[sample], labeled_y[sample])
        if len(pool_embeddings):
            out[t][:, member.classes_] = member.predict_proba(pool_embeddings)
    return out


def mc_dropout_proba(classifier: FineTunedClassifier, texts: Sequence[str], n_samples: int, *, seed: int,
                     batch_size: int = 64) -> np.ndarray:
    """T x N x K softmax outputs with dropout left on (Gal & Ghahramani 2016): each text is tokenised
    once and run ``n_samples`` times. The model is put back in eval mode afterwards, and the global
    torch RNG is left as it was."""
    out = np.zeros((n_samples, len(texts), len(classifier.labels)), dtype=np.float32)
    if not len(texts):
        return out
    model = classifier.model
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(seed)
        model.train()
        try:
            for idx, batch in length_sorted_batches(classifier.tokenizer, texts, batch_size, classifier.max_length):
                for t in range(n_samples):
                    out[t, idx] = torch.softmax(model(**batch).logits, dim=-1).float().numpy()
        finally:
            model.eval()
    return out


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
                 seed: int = 0, batch_size: int = 64, progress: Callable[[int], None] | None = None):
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
        if encoder is None:
            encoder = (classifier.encoder if isinstance(classifier, EmbeddingHeadClassifier)
                       else load_encoder(DEFAULT_BASE_MODEL, classifier.max_length))
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

        index = {label: i for i, label in enumerate(self.classifier.labels)}
        unknown = sorted(set(self.labeled["label"]) - set(index))
        if unknown:
            raise ValueError(f"labeled set has labels {unknown} unknown to the model {list(index)}")
        return self._memoised("labeled_embeddings", compute), self.labeled["label"].map(index).to_numpy(int)

    def proba(self) -> np.ndarray:
        def compute() -> np.ndarray:
            if isinstance(self.classifier, EmbeddingHeadClassifier):
                return self.classifier.proba_from_embeddings(self.embeddings())
            return self.proba_cache.get(
                self.model_version, self.texts,
                lambda texts: self.classifier.predict_proba(texts, self.batch_size, self.progress))

        return self._memoised("proba", compute)

    def mc_proba(self) -> np.ndarray:
        """T x N x K: a bootstrap committee for fast-mode heads (needs ``labeled``), MC dropout for
        fine-tuned models (cached per version: T forward passes over the pool are expensive)."""
        def compute() -> np.ndarray:
            k, t = len(self.classifier.labels), self.mc_samples
            if isinstance(self.classifier, EmbeddingHeadClassifier):
                if self.labeled is None or self.labeled.empty:
                    raise ValueError("BALD on a fast-mode model needs the labeled set (bootstrap committee)")
                lab_emb, lab_y = self._labeled_arrays()
                return bootstrap_committee_proba(self.classifier.head, lab_emb, lab_y, self.embeddings(), k, t,
                                                 np.random.default_rng(self.seed))
            if isinstance(self.classifier, FineTunedClassifier):
                flat = self.proba_cache.get(
                    f"{self.model_version}#mc{t}-seed{self.seed}", self.texts,
                    lambda texts: mc_dropout_proba(self.classifier, texts, t, seed=self.seed,
                                                   batch_size=self.batch_size).transpose(1, 0, 2).reshape(
                                                       len(texts), t * k))
                return flat.reshape(len(self.texts), t, k).transpose(1, 0, 2)
            raise ValueError(f"no stochastic predictions for a {type(self.classifier).__name__}")

        return self._memoised("mc_proba", compute)

    def context(self, need: Iterable[str] = ("proba",)) -> PoolContext:
        """A :class:`PoolContext` holding exactly what ``need`` asks for (computing it at most once)."""
        need = frozenset(need)
        unknown = need - NEEDS
        if unknown:
            raise ValueError(f"unknown context field(s) {sorted(unknown)}; choose from {sorted(NEEDS)}")
        ctx = PoolContext(n_classes=len(self.classifier.labels), size=len(self.items))
        if "proba" in need:
            ctx.proba = self.proba()
        if "embeddings" in need:
            ctx.embeddings = self.embeddings()
            if self.labeled is not None and not self.labeled.empty:
                ctx.labeled_embeddings, ctx.labeled_y = self._labeled_arrays()
        if "mc_proba" in need:
            ctx.mc_proba = self.mc_proba()
        return ctx

    def rank(self, strategy: QueryStrategy | str, k: int, seed: int | None = None) -> pd.DataFrame:
        """The next batch of ``k`` items to review, most informative first: ``id``, ``text``, ``score``
        (the strategy's acquisition score) and, where the strategy used the model, its ``predicted``
        label and ``confidence``."""
        if isinstance(strategy, str):
            strategy = parse_strategy(strategy)
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
            batch["predicted"] = [self.classifier.labels[i] for i in ctx.proba[chosen].argmax(1)]
            batch["confidence"] = ctx.proba[chosen].max(1)
        return batch
