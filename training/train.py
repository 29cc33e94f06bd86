"""One training run end to end: guard against eval leakage, train (fine-tune or fast mode), evaluate
on the frozen evaluation set, log and register the model as the new challenger.

Every run is also compared with the trivial model that predicts the training data's majority class for
every text (multi-label: each label's majority value, usually "none"): on skewed data a collapsed model
looks busy (high accuracy, one class's recall near 1) while its macro-F1 is exactly that baseline's, and
the person training it must be told so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd

from labelloop.config import Settings
from labelloop.data import DataError, held_out_texts
from labelloop.taxonomy import Taxonomy, get_taxonomy
from training.classifier import TextClassifier, load_encoder, resolve_device
from training.evaluate import EvalReport, score_proba, true_labels
from training.fast import EmbeddingCache, fast_encoder_name, train_fast
from training.finetune import DEFAULT_MIN_STEPS, FineTuneConfig, finetune
from training.gate import Interval, macro_f1_gain
from training.registry import ModelRef, Registry, predictions_frame

Mode = Literal["finetune", "fast"]
Progress = Callable[[str, int, int], None]


@dataclass
class TrainResult:
    ref: ModelRef
    run_id: str
    report: EvalReport
    seconds: float
    mode: Mode
    train_rows: int
    majority_label: str
    majority_macro_f1: float  # of predicting majority_label for every frozen eval text
    gain_over_majority: Interval  # macro-F1 over that baseline, paired bootstrap at the gate's confidence

    @property
    def beats_majority(self) -> bool:
        """True when the model is better than the majority-class baseline beyond noise."""
        return self.gain_over_majority.low > 0


def majority_baseline(train: pd.DataFrame, taxonomy: Taxonomy, n: int) -> tuple[str, np.ndarray]:
    """The text-blind model's name and its ``n`` predictions: the training data's majority class for
    every text or, multi-label, each label's majority value (present only where most training items
    carry it, so usually the empty set) for every text."""
    if not taxonomy.multi:
        majority = str(train["label"].value_counts().idxmax())
        return majority, np.full(n, taxonomy.index(majority))
    chosen = (taxonomy.encode(train["label"]).mean(0) > 0.5).astype(np.int8)
    names = taxonomy.decode(chosen)
    name = " + ".join(names) if names else (taxonomy.none_label or "no label")
    return name, np.tile(chosen, (n, 1))


def embedding_cache(settings: Settings, encoder_name: str | None = None) -> EmbeddingCache:
    """The process's embedding cache for ``encoder_name``, by default the base model (what cold start and
    drift cluster and compare); fast mode passes :func:`~training.fast.fast_encoder_name`, whose cache reuses
    the base model's stored embeddings and adds the hashed n-grams."""
    encoder = load_encoder(encoder_name or settings.base_model, settings.max_length).to(resolve_device(settings.device))
    return EmbeddingCache(settings.cache_dir / "embeddings", encoder)


def train_and_register(
    train: pd.DataFrame,
    validation: pd.DataFrame | None,
    taxonomy: Taxonomy,
    *,
    mode: Mode,
    settings: Settings,
    source: str,
    eval_frame: pd.DataFrame | None = None,
    finetune_config: FineTuneConfig | None = None,
    extra_params: dict[str, object] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train on ``train`` and register the result as challenger.

    The registered model's frozen evaluation set is used when one exists; ``eval_frame`` freezes one
    on the first run. Texts of the evaluation set are removed from the training data, so no model is
    ever judged on what it was trained on.
    """
    configured = get_taxonomy(settings.taxonomy)
    if taxonomy.fingerprint != configured.fingerprint:
        raise DataError(f"data is labeled in taxonomy {taxonomy.name!r} but settings.taxonomy is "
                        f"{configured.name!r} ({settings.taxonomy}); set LABELLOOP_TAXONOMY to the data's taxonomy")
    registry = Registry(settings)
    registry.check_taxonomy()  # before anything is frozen or trained
    frozen = registry.eval_set()
    if frozen is None and (eval_frame is None or eval_frame.empty):
        raise DataError(f"model {registry.name!r} has no frozen evaluation set yet; the first training "
                        "run must supply one (labelloop train --dataset ... freezes its test split)")
    held_out = held_out_texts((frozen[1] if frozen else eval_frame)["text"])
    train = train[~train["text"].isin(held_out)].reset_index(drop=True)
    if validation is not None:
        validation = validation[~validation["text"].isin(held_out)].reset_index(drop=True)
    if taxonomy.multi:
        present = taxonomy.encode(train["label"])
        if not (present.any(0) & ~present.all(0)).any():
            raise DataError(f"{source}: multi-label training data needs items with and items without at least "
                            f"one of the labels {list(taxonomy.labels)}")
    elif train["label"].nunique() < 2:
        raise DataError(f"{source}: training data needs at least two classes, got {train['label'].unique()}")
    if mode == "finetune" and (validation is None or validation.empty):
        raise DataError("fine-tuning needs a validation split for early stopping")
    if frozen is None:  # only once the input is known to be usable: a failed first run freezes nothing
        frozen = registry.freeze_eval_set(eval_frame, source)
    eval_id, frozen_frame = frozen

    started = time.perf_counter()
    params: dict[str, object] = {"mode": mode, "source": source, "base_model": settings.base_model,
                                 "max_length": settings.max_length, "seed": settings.seed,
                                 "labels": ",".join(taxonomy.labels)}
    extra_metrics: dict[str, float] = {}
    classifier: TextClassifier
    if mode == "finetune":
        config = finetune_config or FineTuneConfig(base_model=settings.base_model, max_length=settings.max_length,
                                                   seed=settings.seed, min_steps=DEFAULT_MIN_STEPS,
                                                   device=settings.device)
        result = finetune(train, validation, taxonomy, config, progress)
        classifier = result.classifier
        params.update({f"ft_{k}": v for k, v in asdict(config).items()})
        extra_metrics = {"best_epoch": result.best_epoch, "val_macro_f1": result.best_val_macro_f1,
                         "train_steps": float(result.history[-1]["step"]) if result.history else 0.0}
        train_seconds = time.perf_counter() - started
        proba = classifier.predict_proba(frozen_frame["text"].tolist())
    else:
        cache = embedding_cache(settings, fast_encoder_name(settings, taxonomy.multi))
        classifier = train_fast(train, taxonomy, encoder=cache.encoder, cache=cache, seed=settings.seed)
        train_seconds = time.perf_counter() - started
        proba = classifier.proba_from_embeddings(cache.get(frozen_frame["text"].tolist()))
    y = true_labels(classifier, frozen_frame["label"])
    report = score_proba(classifier, proba, y)
    majority, baseline = majority_baseline(train, taxonomy, len(y))
    gain = macro_f1_gain(y, baseline, classifier.decide_ids(proba), len(taxonomy.labels), registry.gate_policy())
    params.update(extra_params or {})
    extra_metrics.update({"train_seconds": train_seconds, "majority_macro_f1": report.macro_f1 - gain.estimate})
    ref, run_id = registry.register(classifier, params=params, train_frame=train, report=report,
                                    eval_id=eval_id, run_name=f"{mode}-{source}", extra_metrics=extra_metrics,
                                    eval_predictions=predictions_frame(frozen_frame, proba, classifier))
    return TrainResult(ref, run_id, report, time.perf_counter() - started, mode, len(train), majority,
                       report.macro_f1 - gain.estimate, gain)
