"""Fine-tune a transformer classifier on CPU with a plain torch loop.

A plain loop rather than the HF ``Trainer`` keeps the two things that matter on two CPU cores under
our control: texts are tokenised once and batched by similar length (tweets average ~27 tokens, so
padding every batch to ``max_length`` would waste over half the compute), and validation macro-F1 —
not loss — decides early stopping, because the rare harmful class is what we care about and loss is
dominated by the common ones. The best weights seen are restored at the end.

Epochs alone are the wrong unit on small data: two epochs of a few hundred rows are a couple of dozen
optimiser steps, after which the new classification head still predicts the majority class (on skewed
data that is a flat, early minimum of the weighted loss too). So training runs at least ``min_steps``
steps, adding epochs when the data is small, and early stopping may end a run only after those steps:
until the model leaves the majority-class plateau, validation macro-F1 does not move, and "no new best"
says nothing about whether more training helps.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

from labelloop.config import DEFAULT_BASE_MODEL
from labelloop.taxonomy import Taxonomy
from training.classifier import FineTunedClassifier, resolve_model_path
from training.evaluate import score_proba, tune_thresholds
from training.fast import warn_untrained

Progress = Callable[[str, int, int], None]
ClassWeighting = Literal["auto", "balanced", "sqrt", "none"]
DecisionRule = Literal["argmax", "offsets", "bagged_offsets"]
DECISION_RULES: tuple[str, ...] = ("argmax", "offsets", "bagged_offsets")

#: the per-class log-probability offsets a decision rule may choose from: wide enough to move a rare
#: class's decision boundary by a factor of e**3 either way, fine enough that the grid is not the limit
_OFFSET_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 10)
#: bootstrap resamples of the validation slice whose tuned offsets ``bagged_offsets`` averages
_OFFSET_BOOTSTRAPS = 25

#: the optimiser-step floor of ``labelloop train`` and of :func:`training.train.train_and_register`'s
#: default config. On a few hundred rows two epochs are a couple of dozen steps, which left the model
#: predicting the majority class; bench/results/train_small.md measures both side by side. On full data
#: one epoch is several times this floor, so it changes nothing there.
DEFAULT_MIN_STEPS = 150

#: how many batches' worth of shuffled examples are length-sorted together: large enough that batches
#: are nearly uniform in length, small enough that each epoch still sees a different mix.
_BUCKET_BATCHES = 50


@dataclass
class FineTuneConfig:
    base_model: str = DEFAULT_BASE_MODEL
    max_length: int = 64
    #: a ceiling, not a plan: early stopping (``patience``) ends the run once validation macro-F1 stops
    #: improving. Balanced weights with room to train past the first dip are the one lever that raised
    #: the rare class's F1 without costing macro-F1 on 2,000 loop-chosen labels, averaged over paired
    #: seeds (bench/results/al_transfer.md); the old 2-epoch, patience-1, sqrt recipe stopped earlier.
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # best validation macro-F1 on Davidson at 2 epochs (bench/results/train_davidson.md)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    patience: int = 3  # evaluations without a new best before stopping
    min_steps: int = 0  # train at least this many optimiser steps (more epochs on small data); 0: off
    #: ``auto``: ``balanced`` for a single-label taxonomy (measured, see ``epochs``), ``sqrt`` for a
    #: multi-label one, whose ``pos_weight`` was measured with it (bench/results/multilabel_thresholds.md)
    class_weighting: ClassWeighting = "auto"
    seed: int = 13
    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu (training.classifier.resolve_device)
    eval_every: int | None = None  # also evaluate every this many optimiser steps
    max_seconds: float | None = None  # wall-time budget: stop (after a final evaluation) once spent
    #: single-label only: how the trained model turns probabilities into a label. ``argmax``; or per-class
    #: log-probability offsets tuned for macro-F1 on the validation slice (``offsets``), or the mean of
    #: offsets tuned on bootstrap resamples of it (``bagged_offsets``), times ``offset_shrink``. The
    #: offsets are added to the classification head's bias, so the saved model carries the rule and
    #: every path that serves it (fp32, int8, ONNX) decides with it. See :func:`decision_offsets`.
    decision_rule: DecisionRule = "argmax"
    offset_shrink: float = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1 and max_length >= 8")
        if self.min_steps < 0:
            raise ValueError("min_steps must be >= 0")
        if self.class_weighting not in ("auto", "balanced", "sqrt", "none"):
            raise ValueError("class_weighting must be 'auto', 'balanced', 'sqrt' or 'none', "
                             f"not {self.class_weighting!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError("eval_every must be a positive number of steps or None")
        if self.max_seconds is not None and self.max_seconds < 0:
            raise ValueError("max_seconds must be >= 0 or None")
        if self.decision_rule not in DECISION_RULES:
            raise ValueError(f"decision_rule must be one of {', '.join(DECISION_RULES)}, not {self.decision_rule!r}")
        if not 0.0 <= self.offset_shrink <= 1.0:
            raise ValueError(f"offset_shrink must lie in [0, 1], not {self.offset_shrink!r}")

    def weighting(self, multi_label: bool) -> ClassWeighting:
        """The class weighting this config trains a single- or multi-label model with (``auto`` resolved)."""
        if self.class_weighting == "auto":
            return "sqrt" if multi_label else "balanced"
        return self.class_weighting


@dataclass
class FineTuneResult:
    classifier: FineTunedClassifier
    best_epoch: float  # fractional when the best evaluation fell mid-epoch (eval_every)
    best_val_macro_f1: float  # NaN when trained without a validation set
    history: list[dict] = field(default_factory=list)
    epochs: int = 0  # planned: config.epochs, or more when min_steps needs them
    seconds: float = 0.0
    #: the per-class logit offsets added to the head's bias by ``config.decision_rule`` (None: argmax)
    decision_offsets: list[float] | None = None


def class_weights(y: np.ndarray, n_classes: int, scheme: ClassWeighting) -> np.ndarray:
    """Per-class loss weights, scaled so the average weight over training examples is 1 (the learning
    rate then means the same thing under every scheme).

    ``balanced`` (the single-label default) weights by inverse frequency, which on Davidson makes one
    hate example count as much as ~13 offensive ones: it buys rare-class recall with some precision on
    the big classes, and measured against ``sqrt``, the geometric middle ground, it kept macro-F1 and raised the
    rare class's F1 once training was allowed to run longer (``FineTuneConfig.epochs``). A class absent
    from ``y`` gets weight 0: it contributes no examples anyway.
    """
    counts = np.bincount(np.asarray(y, dtype=int), minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    if scheme == "none":
        weights[present] = 1.0
    elif scheme in ("balanced", "sqrt"):
        inverse = counts.sum() / (present.sum() * counts[present])
        weights[present] = inverse if scheme == "balanced" else np.sqrt(inverse)
    else:
        raise ValueError(f"unknown class weighting {scheme!r}")
    return weights * counts.sum() / (weights * counts).sum()


def positive_weights(y: np.ndarray, scheme: ClassWeighting) -> np.ndarray:
    """Per-label ``pos_weight`` of the multi-label BCE loss: how much a positive counts against a
    negative of the same label. ``balanced`` is negatives / positives, which makes each label's
    positives weigh as much as its negatives in total; ``sqrt`` its square root (the default, as for
    single-label); ``none`` 1. A label with no positives gets 1: it has no positive term to weigh."""
    y = np.asarray(y, dtype=np.float64)
    positives = y.sum(0)
    ratio = np.where(positives > 0, (len(y) - positives) / np.maximum(positives, 1), 1.0)
    if scheme == "balanced":
        return ratio
    if scheme == "sqrt":
        return np.sqrt(ratio)
    if scheme == "none":
        return np.ones_like(ratio)
    raise ValueError(f"unknown class weighting {scheme!r}")


def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` (a class neither present nor predicted scores 0, as in
    ``evaluate_proba``), from a confusion count: the offset search calls this thousands of times."""
    confusion = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(0) + confusion.sum(1)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(f1.mean())


def decide_with_offsets(proba: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Label ids under per-class log-probability offsets: ``argmax(log p + offsets)``."""
    return (np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, None)) + offsets).argmax(1)


def tune_logit_offsets(proba: np.ndarray, y: np.ndarray, n_classes: int, passes: int = 2) -> np.ndarray:
    """Per-class log-probability offsets that maximise macro-F1 of ``argmax(log p + offsets)`` on
    held-out ``proba`` / label ids ``y``, by coordinate ascent over a fixed grid.

    Why offsets rather than argmax: a model trained on a few hundred examples of a rare class, even
    with class-weighted loss, puts too little mass on it where it is plausible, and macro-F1 rewards
    recalling it. Why the guards: a 200-item validation slice holds a couple of dozen rare items, so
    an offset moves only on a strict gain (ties keep the current one, which starts at argmax), and the
    result is centred (offsets are defined up to a constant). Even so, tuned on the 200 validation
    labels of a 2,000-label budget they lowered test macro-F1 and rare-class F1 on average
    (bench/results/al_transfer.md): argmax stays the default, and this is for validation slices large
    enough to tune on."""
    y = np.asarray(y, dtype=np.int64)
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, None))
    offsets = np.zeros(n_classes)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return offsets
    best = _macro_f1(y, logp.argmax(1), n_classes)
    for _ in range(passes):
        improved = False
        for k in range(n_classes):
            for value in _OFFSET_GRID:
                trial = offsets.copy()
                trial[k] = value
                score = _macro_f1(y, (logp + trial).argmax(1), n_classes)
                if score > best + 1e-12:
                    best, offsets, improved = score, trial, True
        if not improved:
            break
    return offsets - offsets.mean()


def decision_offsets(proba: np.ndarray, y: np.ndarray, n_classes: int, rule: DecisionRule, shrink: float = 1.0,
                     seed: int = 0) -> np.ndarray:
    """The offsets ``rule`` chooses on a validation slice, times ``shrink`` (toward argmax).

    ``bagged_offsets`` averages the offsets tuned on bootstrap resamples of the slice: an offset that
    only one or two rare items argue for is tuned differently on each resample and averages toward
    zero, which is the guard against overfitting a slice this small."""
    if rule == "argmax" or len(y) == 0:
        return np.zeros(n_classes)
    if rule == "offsets":
        return shrink * tune_logit_offsets(proba, y, n_classes)
    if rule == "bagged_offsets":
        y = np.asarray(y, dtype=np.int64)
        proba = np.asarray(proba)
        rng = np.random.default_rng(seed)
        draws = [rng.integers(0, len(y), len(y)) for _ in range(_OFFSET_BOOTSTRAPS)]
        return shrink * np.mean([tune_logit_offsets(proba[i], y[i], n_classes) for i in draws], axis=0)
    raise ValueError(f"unknown decision rule {rule!r}")


def planned_epochs(rows: int, config: FineTuneConfig) -> int:
    """``config.epochs``, or as many more as ``rows`` need to reach ``config.min_steps`` optimiser steps."""
    steps_per_epoch = max(1, math.ceil(rows / config.batch_size))
    return max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator
                            ) -> list[np.ndarray]:
    """Index batches of similar-length examples, in random order: shuffle, sort within pools of
    ``_BUCKET_BATCHES`` batches by length, cut, then shuffle the batches."""
    order = rng.permutation(len(lengths))
    pool = batch_size * _BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the load report that lists the new classification head as "missing weights" (it is new by
    design) and the per-tensor progress bar, then restore the caller's logging settings."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _label_ids(frame: pd.DataFrame, taxonomy: Taxonomy) -> np.ndarray:
    """Targets: label ids, or an (n, K) 0/1 matrix of label sets for a multi-label taxonomy."""
    if taxonomy.multi:
        return taxonomy.encode(frame["label"])
    return np.array([taxonomy.index(label) for label in frame["label"]], dtype=np.int64)


def _score_validation(classifier: FineTunedClassifier, texts: list[str], y: np.ndarray, batch_size: int,
                      progress: Progress | None) -> float:
    """Validation macro-F1 of the model as it stands (the early-stopping criterion). A multi-label
    model is scored with per-label thresholds tuned on this same pass, which are set on it: the weights
    and the thresholds that go with them are kept together as the best checkpoint."""
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("validate", done, len(texts))

    proba = classifier.predict_proba(texts, batch_size=max(64, batch_size), progress=step)
    if classifier.multi_label:
        classifier.thresholds = tune_thresholds(proba, y)
    return score_proba(classifier, proba, y).macro_f1


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without decay on biases and LayerNorm weights (decaying those only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _load_model(config: FineTuneConfig, taxonomy: Taxonomy
                ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    path = resolve_model_path(config.base_model)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(taxonomy.labels),
            problem_type="multi_label_classification" if taxonomy.multi else "single_label_classification",
            id2label=dict(enumerate(taxonomy.labels)),
            label2id={label: i for i, label in enumerate(taxonomy.labels)},
        )
    return model, tokenizer


def shift_logits(model: torch.nn.Module, offsets: np.ndarray) -> None:
    """Add ``offsets`` to the bias of the layer that produces the logits (the last Linear with one
    output per class), so that the saved weights carry the decision rule: softmax(logits + offsets) is
    the prior-shifted distribution whose argmax the rule picks, on every serving path alike."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(offsets)
             and m.bias is not None]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no biased Linear layer with {len(offsets)} outputs "
                         "to carry the decision offsets; use decision_rule='argmax'")
    with torch.no_grad():
        heads[-1].bias += torch.as_tensor(offsets, dtype=heads[-1].bias.dtype, device=heads[-1].bias.device)


def finetune(train: pd.DataFrame, validation: pd.DataFrame | None, taxonomy: Taxonomy, config: FineTuneConfig,
             progress: Progress | None = None) -> FineTuneResult:
    """Fine-tune ``config.base_model`` on ``train`` (columns ``text``, ``label`` by name).

    With a non-empty ``validation`` frame the model is scored after each epoch (and every
    ``config.eval_every`` steps), training stops after ``config.patience`` evaluations without a new
    best macro-F1, and the best weights are restored. Without one it trains all epochs and keeps the last.
    ``config.max_seconds`` bounds the wall time: once spent, the model is evaluated one last time and
    training ends (the learning-rate schedule still assumes all epochs, so prefer fewer epochs to a
    budget that cuts deep).

    A multi-label taxonomy (``label`` cells are tuples of names) trains independent sigmoids with a
    BCE loss whose per-label ``pos_weight`` follows ``config.class_weighting``; each evaluation tunes
    per-label thresholds on the validation set and scores macro-F1 with them, and the best
    checkpoint's thresholds are kept with its weights (0.5 each without a validation set).
    """
    started = time.perf_counter()
    if train.empty:
        raise ValueError("cannot fine-tune on an empty training set")
    _seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    y_train = _label_ids(train, taxonomy)
    if taxonomy.multi:
        warn_untrained(taxonomy.labels, y_train)
    has_validation = validation is not None and not validation.empty
    val_texts = validation["text"].tolist() if has_validation else []
    y_val = _label_ids(validation, taxonomy) if has_validation else np.zeros(0, dtype=np.int64)

    model, tokenizer = _load_model(config, taxonomy)
    classifier = FineTunedClassifier(model, tokenizer, taxonomy.labels, config.max_length).to(config.device)
    classifier.multi_label = taxonomy.multi
    input_ids = tokenizer(train["text"].tolist(), truncation=True, max_length=config.max_length)["input_ids"]
    lengths = np.array([len(ids) for ids in input_ids])

    steps_per_epoch = math.ceil(len(input_ids) / config.batch_size)
    epochs = planned_epochs(len(input_ids), config)
    total_steps = steps_per_epoch * epochs
    optimizer = _optimizer(model, config.lr, config.weight_decay)
    warmup_steps = round(config.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    if taxonomy.multi:
        pos_weight = torch.tensor(positive_weights(y_train, config.weighting(True)), dtype=torch.float32)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        labels_t = torch.from_numpy(y_train.astype(np.float32))
    else:
        weights = torch.tensor(class_weights(y_train, len(taxonomy.labels), config.weighting(False)),
                               dtype=torch.float32)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
        labels_t = torch.from_numpy(y_train)
    loss_fn, labels_t = loss_fn.to(classifier.device), labels_t.to(classifier.device)

    history: list[dict] = []
    best_f1, best_epoch, best_state, best_thresholds = -math.inf, float(epochs), None, None
    evals_without_gain = 0
    step, loss_sum, loss_n = 0, 0.0, 0

    def checkpoint() -> bool:
        """Record train loss (and validation F1); return True when early stopping says stop."""
        nonlocal best_f1, best_epoch, best_state, best_thresholds, evals_without_gain, loss_sum, loss_n
        entry = {"epoch": round(step / steps_per_epoch, 4), "step": step,
                 "train_loss": loss_sum / max(loss_n, 1), "seconds": round(time.perf_counter() - started, 2)}
        loss_sum, loss_n = 0.0, 0
        if not has_validation:
            history.append(entry)
            return False
        model.eval()  # dropout off: the score must be the one the saved model would get
        f1 = _score_validation(classifier, val_texts, y_val, config.batch_size, progress)
        model.train()
        entry["val_macro_f1"] = f1
        history.append(entry)
        if f1 > best_f1:
            best_f1, best_epoch, evals_without_gain = f1, entry["epoch"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_thresholds = classifier.thresholds.copy()
            return False
        evals_without_gain += 1
        return evals_without_gain >= config.patience and step >= config.min_steps

    def out_of_time() -> bool:
        return config.max_seconds is not None and time.perf_counter() - started > config.max_seconds

    model.train()
    stop = False
    for _ in range(epochs):
        for batch_idx in length_bucketed_batches(lengths, config.batch_size, rng):
            batch = tokenizer.pad({"input_ids": [input_ids[i] for i in batch_idx]}, return_tensors="pt").to(
                classifier.device)
            loss = loss_fn(model(**batch).logits, labels_t[batch_idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            if progress:
                progress("train", step, total_steps)
            end_of_epoch = step % steps_per_epoch == 0  # evaluated after the loop
            eval_due = bool(config.eval_every) and step % config.eval_every == 0
            if not end_of_epoch and (eval_due or out_of_time()):
                stop = checkpoint() or out_of_time()
                if stop:
                    break
        if stop or checkpoint() or out_of_time():
            break

    if best_state is not None:
        model.load_state_dict(best_state)
        if classifier.multi_label:
            classifier.thresholds = best_thresholds
    model.eval()
    offsets = None
    if has_validation and not taxonomy.multi and config.decision_rule != "argmax":
        proba = classifier.predict_proba(val_texts, batch_size=max(64, config.batch_size))
        chosen = decision_offsets(proba, y_val, len(taxonomy.labels), config.decision_rule, config.offset_shrink,
                                  config.seed)
        shift_logits(model, chosen)
        offsets = [float(x) for x in chosen]
    return FineTuneResult(
        classifier=classifier,
        best_epoch=best_epoch if has_validation else history[-1]["epoch"],
        best_val_macro_f1=best_f1 if has_validation else float("nan"),
        history=history,
        seconds=time.perf_counter() - started,
        epochs=epochs,
        decision_offsets=offsets,
    )
