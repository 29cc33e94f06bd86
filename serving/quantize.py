"""Optional int8 dynamic quantisation of a freshly loaded champion, verified before it is swapped in.

``torch.ao.quantization.quantize_dynamic`` stores the transformer's Linear weights as int8 and
quantises activations on the fly: no calibration data, no export step, any CPU. It returns a *copy*.

Measured by ``bench/serve_throughput.py`` on held-out Davidson texts (see bench/results/): a fine-tuned
MiniLM keeps its top label on 99.25 % of 2,000 texts at 1.3-1.5x the fp32 speed, but a fast-mode model
(frozen encoder + logistic head) keeps it on only 92.6 %: the head separates classes by small
differences between normalised embeddings, which int8 noise blurs. Hence, with ``quantize="int8"``:

- fine-tuned models are quantised, and the copy is served only if its top label agrees with fp32 on at
  least :data:`MIN_AGREEMENT` of the model source's check texts (the registry's frozen evaluation
  set), checked on every load, so a champion that quantises badly is served in fp32;
- embedding-head models are always served in fp32.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import torch

from training.classifier import EmbeddingHeadClassifier, FineTunedClassifier, TextClassifier
from training.registry import LoadedModel

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99


def _int8(module: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        # torch 2.13 announces the end of quantised tensor constructors; torch is pinned to 2.13 here
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8).eval()


def quantize_classifier(classifier: TextClassifier) -> TextClassifier:
    """An int8 copy of ``classifier``; the original is left as it was (an embedding head's encoder is
    shared process-wide with training, so it must stay fp32)."""
    if isinstance(classifier, FineTunedClassifier):
        return FineTunedClassifier(_int8(classifier.model), classifier.tokenizer, classifier.labels,
                                   classifier.max_length)
    if isinstance(classifier, EmbeddingHeadClassifier):
        encoder = copy.copy(classifier.encoder)
        encoder.model = _int8(classifier.encoder.model)
        return EmbeddingHeadClassifier(encoder, classifier.head, classifier.labels)
    raise TypeError(f"no int8 path for classifier kind {classifier.kind!r}")


def top_label_agreement(a: TextClassifier, b: TextClassifier, texts: Sequence[str]) -> float:
    return float((a.predict_proba(texts).argmax(1) == b.predict_proba(texts).argmax(1)).mean())


def precision(classifier: TextClassifier) -> Literal["fp32", "int8"]:
    """What a served classifier computes in (reported by /health)."""
    model = classifier.model if isinstance(classifier, FineTunedClassifier) else getattr(
        getattr(classifier, "encoder", None), "model", None)
    quantized = model is not None and any(
        isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    return "int8" if quantized else "fp32"


def prepare_for_serving(loaded: LoadedModel, mode: Literal["none", "int8"],
                        check_texts: Sequence[str]) -> LoadedModel:
    """The model to swap in: the int8 copy when ``mode`` asks for it and it passes the agreement check,
    else the fp32 model as loaded."""
    if mode == "none":
        return loaded
    label = loaded.ref.label
    if not isinstance(loaded.classifier, FineTunedClassifier):
        log.info("%s: %s models are served in fp32 (int8 changes too many of their labels)",
                 label, loaded.classifier.kind)
        return loaded
    if not check_texts:
        log.warning("%s: no texts to verify an int8 copy against; serving fp32", label)
        return loaded
    candidate = quantize_classifier(loaded.classifier)
    agreement = top_label_agreement(loaded.classifier, candidate, check_texts)
    if agreement < MIN_AGREEMENT:
        log.warning("%s: int8 copy agrees with fp32 on %.2f%% of %d check texts (< %.0f%%); serving fp32",
                    label, 100 * agreement, len(check_texts), 100 * MIN_AGREEMENT)
        return loaded
    log.info("%s: serving int8 (top label agrees with fp32 on %.2f%% of %d check texts)",
             label, 100 * agreement, len(check_texts))
    return LoadedModel(loaded.ref, candidate)
