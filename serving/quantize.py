"""Optional int8 dynamic quantisation of a freshly loaded champion, before it is swapped in.

``torch.ao.quantization.quantize_dynamic`` stores the transformer's Linear weights as int8 and
quantises activations on the fly: no calibration data, no export step, and it works on any CPU. It
returns a *copy*, which matters for the embedding-head kind: its encoder is shared, process-wide, with
training (``load_encoder`` is cached), so the shared fp32 encoder must stay untouched.

``settings.quantize`` selects it; bench/serve_throughput.py measures speed and top-label agreement with
fp32 on real texts, which decides the default.
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch

from training.classifier import EmbeddingHeadClassifier, FineTunedClassifier, TextClassifier
from training.registry import LoadedModel


def _int8(module: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch 2.13 announces the end of quantised tensor constructors; torch is pinned to 2.13 here
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8).eval()


def quantize_classifier(classifier: TextClassifier) -> TextClassifier:
    """An int8 copy of ``classifier``; the original is left as it was."""
    if isinstance(classifier, FineTunedClassifier):
        return FineTunedClassifier(_int8(classifier.model), classifier.tokenizer, classifier.labels,
                                   classifier.max_length)
    if isinstance(classifier, EmbeddingHeadClassifier):
        encoder = copy.copy(classifier.encoder)
        encoder.model = _int8(classifier.encoder.model)
        return EmbeddingHeadClassifier(encoder, classifier.head, classifier.labels)
    raise TypeError(f"no int8 path for classifier kind {classifier.kind!r}")


def prepare_for_serving(loaded: LoadedModel, mode: Literal["none", "int8"]) -> LoadedModel:
    if mode == "none":
        return loaded
    return LoadedModel(loaded.ref, quantize_classifier(loaded.classifier))
