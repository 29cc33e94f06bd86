"""Fast mode for active-learning rounds: frozen encoder embeddings, cached on disk, plus a
scikit-learn logistic-regression head (one per label, with tuned thresholds, for a multi-label taxonomy).

Embedding is the only slow step (~160 texts/s on two cores, ~2 minutes for a 20k pool), and a text's
embedding never changes for a given encoder, so each text is embedded once, ever; after that a round
(refit the head on a few thousand labels, score the whole pool) takes well under a second.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.multiclass import OneVsRestClassifier

from labelloop.config import Settings
from labelloop.taxonomy import Taxonomy
from training.classifier import EmbeddingHeadClassifier, Encoder, NgramEncoder
from training.evaluate import tune_thresholds

#: Inverse regularisation of the head. Fast mode mostly trains active-learning rounds on a few hundred
#: labels: on Davidson (6 paired seeds, margin -> k-means) C=1 gave macro-F1 0.662 / 0.677 at 500 / 1,000
#: labels, against 0.651 / 0.669 with C=4 and 0.654 / 0.667 with C=0.25. On the full data C hardly
#: matters (0.663-0.666 for C in 0.25..4, bench/results/train_davidson.md).
DEFAULT_C = 1.0

_DIGEST_BYTES = 20  # sha1


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Embeddings of one encoder, persisted under ``directory``: each of the encoder's
    :meth:`~training.classifier.Encoder.parts` (the transformer; hashed n-grams when the encoder has them)
    in a store of its own, so an encoder with n-grams reuses every embedding its transformer already has
    on disk, and :meth:`get` puts the parts side by side."""

    def __init__(self, directory: Path, encoder: Encoder):
        self.encoder = encoder
        # anything with name, max_length, dim and embed is an encoder; only composite ones declare parts
        parts = encoder.parts() if hasattr(encoder, "parts") else (encoder,)
        self.stores = [_ShardStore(Path(directory), part) for part in parts]
        self.directory = self.stores[0].directory

    def __len__(self) -> int:
        return min(len(store) for store in self.stores)

    def get(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embeddings for ``texts``, in order; only texts never embedded before are run through the
        encoder (``progress`` counts those, for the transformer)."""
        keys = [_digest(t) for t in texts]
        parts = [store.get(texts, keys, progress if i == 0 else None) for i, store in enumerate(self.stores)]
        return parts[0] if len(parts) == 1 else np.hstack(parts)


class _ShardStore:
    """One feature source's vectors, keyed by (source name, max_length, sha1(text)).

    Storage is append-only: each batch of newly embedded texts becomes one ``.npz`` shard (keys +
    float32 vectors) written to a temporary name and renamed into place, so readers — other threads or
    other processes — never see half a shard and a crash loses at most the batch in flight. Shards
    written by other processes are picked up on the next :meth:`get`.
    """

    def __init__(self, directory: Path, source):
        self.source = source
        slug = re.sub(r"[^A-Za-z0-9]+", "-", source.name).strip("-")[-48:]
        name_hash = hashlib.sha1(source.name.encode()).hexdigest()[:8]
        self.directory = Path(directory) / f"{slug}-{name_hash}-len{source.max_length}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self._row: dict[bytes, int] = {}
        self._blocks: list[np.ndarray] = []
        self._matrix = np.zeros((0, source.dim), dtype=np.float32)

    def __len__(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._row)

    def get(self, texts: Sequence[str], keys: Sequence[bytes],
            progress: Callable[[int], None] | None = None) -> np.ndarray:
        with self._lock:
            self._refresh()
            missing: dict[bytes, str] = {}
            for key, text in zip(keys, texts, strict=True):
                if key not in self._row and key not in missing:
                    missing[key] = text
            if missing:
                vectors = self.source.embed(list(missing.values()), progress=progress)
                keys_array = np.frombuffer(b"".join(missing), dtype=np.uint8).reshape(-1, _DIGEST_BYTES)
                self._write_shard(keys_array, vectors)
            matrix = self._consolidated()
            rows = np.fromiter((self._row[k] for k in keys), dtype=np.int64, count=len(keys))
        return matrix[rows]

    def _refresh(self) -> None:
        """Load shards that appeared on disk since the last call (written by us or anyone else)."""
        for path in sorted(self.directory.glob("*.npz")):
            if path.name not in self._loaded:
                with np.load(path) as shard:
                    self._add(shard["keys"], shard["vectors"])
                self._loaded.add(path.name)

    def _add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        base = len(self._matrix) + sum(len(b) for b in self._blocks)
        fresh = []
        for i, key in enumerate(k.tobytes() for k in keys):
            if key not in self._row:
                self._row[key] = base + len(fresh)
                fresh.append(i)
        if fresh:
            self._blocks.append(vectors[fresh].astype(np.float32, copy=False))

    def _consolidated(self) -> np.ndarray:
        if self._blocks:
            self._matrix = np.concatenate([self._matrix, *self._blocks])
            self._blocks = []
        return self._matrix

    def _write_shard(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        name = f"{uuid.uuid4().hex}.npz"
        tmp = self.directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, keys=keys, vectors=vectors.astype(np.float32, copy=False))
        os.replace(tmp, self.directory / name)
        self._add(keys, vectors)
        self._loaded.add(name)


def fast_encoder_name(settings: Settings, multi_label: bool = False) -> str:
    """The encoder fast mode trains on: for a single-label taxonomy the base model with hashed n-grams next
    to its embedding, unless ``fast_ngram_features`` is 0 (:func:`training.classifier.load_encoder` parses
    the name). Multi-label taxonomies keep the embedding alone: the n-grams were measured on single-label
    Davidson and TweetEval only, and ETHOS's multi-label curves were measured without them."""
    n = settings.fast_ngram_features
    return f"{settings.base_model}{NgramEncoder.SUFFIX}{n}" if n and not multi_label else settings.base_model


def fit_head(embeddings: np.ndarray, y: np.ndarray, *, seed: int, C: float = DEFAULT_C,
             class_weight: str | dict | None = "balanced") -> LogisticRegression:
    """Fit the logistic-regression head on integer label ids. Classes absent from ``y`` are simply not
    in ``head.classes_``; :class:`EmbeddingHeadClassifier` gives them probability 0."""
    y = np.asarray(y, dtype=int)
    if embeddings.shape[0] != len(y):  # shape, not len(): a sparse feature matrix has no len()
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise ValueError("the training set needs examples of at least two classes")
    head = LogisticRegression(C=C, class_weight=class_weight, max_iter=2000, random_state=seed)
    return head.fit(embeddings, y)


class UntrainedLabelWarning(UserWarning):
    """A multi-label model was trained without a single positive example of some labels: it gives
    those labels probability 0 until labelled examples of them arrive."""


def warn_untrained(labels: Sequence[str], y: np.ndarray) -> None:
    """Name the labels no training item carries (an (n, K) 0/1 ``y``): a reviewer's first example of a
    new label otherwise goes unnoticed as the model keeps predicting it nowhere."""
    untrained = [label for label, present in zip(labels, np.asarray(y).any(0), strict=True) if not present]
    if untrained:
        warnings.warn(f"no training item carries {', '.join(map(repr, untrained))}: the model gives "
                      f"{'that label' if len(untrained) == 1 else 'those labels'} probability 0 until "
                      "labelled examples arrive", UntrainedLabelWarning, stacklevel=3)


def fit_multilabel_head(embeddings: np.ndarray, y: np.ndarray, *, seed: int, C: float = DEFAULT_C
                        ) -> OneVsRestClassifier:
    """One class-balanced logistic regression per label on an (n, K) 0/1 matrix of label sets: each
    label's probability is its own sigmoid, and a label's rarity is balanced within its own yes/no
    problem. A label that is never (or always) present in ``y`` gets a constant probability of 0 (or 1)
    instead of a regression; :func:`train_fast` says so."""
    y = np.asarray(y)
    if y.ndim != 2 or len(embeddings) != len(y):
        raise ValueError(f"{len(embeddings)} embeddings but label sets of shape {y.shape}")
    if not (y.any(0) & ~y.all(0)).any():
        raise ValueError("the training set needs items with and items without at least one label")
    head = OneVsRestClassifier(LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        # sklearn's "Label not k is present in all training examples": train_fast names the labels itself
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        return head.fit(embeddings, y)


def out_of_fold_proba(embeddings: np.ndarray, y: np.ndarray, *, seed: int, C: float = DEFAULT_C,
                      folds: int = 5) -> np.ndarray:
    """Each training item's per-label probabilities from a head fitted without it (k-fold): held-out
    scores for every labelled row, to tune thresholds on."""
    cv = KFold(n_splits=min(folds, len(y)), shuffle=True, random_state=seed)
    head = OneVsRestClassifier(LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        return cross_val_predict(head, embeddings, y, cv=cv, method="predict_proba")


def train_fast(train: pd.DataFrame, taxonomy: Taxonomy, *, encoder: Encoder,
               cache: EmbeddingCache | None = None, seed: int = 13, C: float = DEFAULT_C) -> EmbeddingHeadClassifier:
    """Train the fast-mode classifier on ``train`` (columns ``text``, ``label`` by name; tuples of names
    for a multi-label taxonomy).

    A multi-label model's per-label thresholds are tuned on out-of-fold predictions over ``train`` (five
    more fits of the head: fractions of a second), so every labelled row serves both the head and the
    thresholds. Fast mode has no early stopping to keep a validation split for, and thresholds tuned on
    a small one alone cost macro-F1 on ETHOS (bench/results/multilabel_thresholds.md)."""
    if cache is not None and cache.encoder is not encoder:
        raise ValueError("the embedding cache belongs to a different encoder")
    texts = train["text"].tolist()
    embeddings = cache.get(texts) if cache is not None else encoder.embed(texts)
    if not taxonomy.multi:
        y = np.array([taxonomy.index(label) for label in train["label"]], dtype=int)
        return EmbeddingHeadClassifier(encoder, fit_head(embeddings, y, seed=seed, C=C), taxonomy.labels)

    y = taxonomy.encode(train["label"])
    head = fit_multilabel_head(embeddings, y, seed=seed, C=C)
    warn_untrained(taxonomy.labels, y)
    classifier = EmbeddingHeadClassifier(encoder, head, taxonomy.labels)
    classifier.multi_label = True
    classifier.thresholds = tune_thresholds(out_of_fold_proba(embeddings, y, seed=seed, C=C), y)
    return classifier
