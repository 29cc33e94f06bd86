"""How serving runs its champion: the fastest way that keeps the model's labels, chosen at every load.

Whether a faster way of running a model keeps its answers depends on the trained weights, not on the
recipe: two fine-tunes with the same recipe had their torch int8 copies pass and fail the guard (issue 15).
So no path is fixed in advance. Each freshly loaded champion is run every candidate way the device offers:

- CPU: fp32 torch (the reference), torch dynamic int8, ONNX Runtime fp32 with its BERT fusions
  (attention, GELU, skip-LayerNorm) and all graph optimisations, ONNX Runtime int8 with per-channel
  weights, and (models without a frozen encoder) that int8 with its near-ties rerun on the fp32 session
  (:class:`NearTieFallback`);
- CUDA: fp32 torch, and bf16 / fp16 autocast.

Each candidate's top label (a multi-label model's whole decided label set) is compared with fp32 torch
on the check texts (the registry's frozen evaluation set) and its speed is timed on a short batch;
the fastest candidate that passes the guard is served, and ``/health`` reports the choice with every
candidate's agreement and speed. A candidate that fails in any way (no onnxruntime, an export error) is
recorded and skipped: the choice never stops a champion from being served, since fp32 torch always
qualifies.

The guard measures what serving serves. Dynamic int8 (torch's and ONNX Runtime's) scales each batch's
activations by that batch's own range, padding included, so a text's label can depend on which texts
share its batch. Checked with all check texts length-sorted together (batches of near-equal length, the
least padding), a torch int8 copy once passed that then served clearly under the threshold (issue 15;
``bench/results/serve_throughput.md`` has the numbers). So the check runs in the batchings serving uses
(:func:`serving_batchings`): merged calls of the size the micro-batcher runs, each length-sorted and cut
into ``batch_size`` batches, and single texts. A candidate whose numerics depend on the batch keeps a
text only when it keeps it in every batching, and passes only when the one-sided lower confidence bound
on that share (Clopper-Pearson, :data:`GUARD_CONFIDENCE`) reaches :data:`MIN_AGREEMENT`: the check sees
a few of the batch make-ups serving will meet, on a sample of texts, and a point estimate at the
threshold passes a worse copy about half the time. A candidate whose numerics do not depend on the batch
(the fp32 and half-precision paths) is checked in serving's merged calls against the point estimate, so
that a small evaluation set does not lock serving into fp32 torch.

ONNX exports are cached on disk, keyed by the transformer's weights, so a restart (or a fast-mode
version that shares its frozen encoder with the last one) does not export again. For the frozen encoder
+ linear head kind the encoder is what is accelerated; the head stays in scikit-learn.

Speeds are a property of the accelerated module, not of the head: fast mode registers a new version every
active-learning round over the same frozen encoder, and timing every candidate again each round would
cost seconds a round cannot spare (issue 15). So each process remembers the measured speeds per module
weights and device (:class:`SpeedMemo`); a later champion over the same module re-checks agreement (it
depends on the head, so the guard is never skipped) only for the remembered faster candidates, fastest
first, and stops at the first that passes. Nothing remembered, or nothing passing, means the full
measurement. For a frozen encoder + head the memo also keeps each path's embeddings of the check texts:
a new head's agreement is then computed on exactly what its path's encoder produces, in milliseconds.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import binomtest

from training.classifier import TextClassifier
from training.registry import LoadedModel

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99
#: one-sided confidence that a batch-dependent candidate's agreement is at least MIN_AGREEMENT; with 500
#: check texts it allows one disagreement
GUARD_CONFIDENCE = 0.95
TORCH_FP32 = "torch-fp32"
#: the ``onnx-int8+fallback`` candidate reruns on fp32 the rows whose int8 answer is within this much of a
#: tie: the top two probabilities (multi-label: any label's probability and its threshold); chosen on the
#: cached champions' held-out texts, the share of rows it sends to fp32 and what it keeps are in
#: ``bench/results/serve_throughput.md``
FALLBACK_BAND = 0.2
#: serving modes (``settings.quantize``): ``auto`` tries every candidate, ``int8`` only torch's dynamic
#: int8 against fp32 (the behaviour before ONNX Runtime), ``none`` serves fp32 torch without checking
Mode = Literal["none", "int8", "auto"]
_TIMING_ROUNDS = 3


def precision(classifier: TextClassifier) -> str:
    """What a served classifier computes in, e.g. ``fp32``, ``int8``, ``onnx-fp32`` (reported by /health,
    and part of the pool's cache key: a served copy's probabilities differ slightly from fp32's)."""
    return classifier.precision


# ------------------------------------------------------------------------------------------------
# the policy: pure, given what was measured
# ------------------------------------------------------------------------------------------------


def agreement_lower_bound(kept: int, checked: int, confidence: float = GUARD_CONFIDENCE) -> float:
    """The one-sided (Clopper-Pearson) lower confidence bound on the share of texts a candidate keeps."""
    if checked <= 0:
        return 0.0
    interval = binomtest(kept, checked, alternative="greater").proportion_ci(confidence_level=confidence,
                                                                              method="exact")
    return float(interval.low)


@lru_cache(maxsize=64)
def fewest_kept(checked: int) -> int | None:
    """The fewest kept texts out of ``checked`` whose lower bound still reaches :data:`MIN_AGREEMENT` (None:
    not even all of them do): once a batch-dependent candidate has lost more, its remaining batchings
    cannot save it and are not run."""
    if checked <= 0 or agreement_lower_bound(checked, checked) < MIN_AGREEMENT:
        return None
    kept = checked
    while kept > 0 and agreement_lower_bound(kept - 1, checked) >= MIN_AGREEMENT:
        kept -= 1
    return kept


@dataclass(frozen=True)
class Trial:
    """One candidate way of running the champion, as measured at load."""

    path: str
    #: share of check texts decided as fp32 torch decides them (a batch-dependent candidate: in every batching)
    agreement: float | None = None
    texts_per_s: float | None = None
    error: str | None = None  # why the candidate could not be built or run
    batch_dependent: bool = False
    #: batch-dependent candidates: the one-sided lower confidence bound on ``agreement`` that must pass
    agreement_low: float | None = None
    agreement_by_batching: dict[str, float] | None = field(default=None, compare=False)

    @property
    def passed(self) -> bool:
        if self.error is not None or self.texts_per_s is None or self.agreement is None:
            return False
        if self.batch_dependent:
            return self.agreement_low is not None and self.agreement_low >= MIN_AGREEMENT
        return self.agreement >= MIN_AGREEMENT

    def verdict(self) -> str:
        """The measured agreement as the guard judged it, for the reason /health gives."""
        if not self.batch_dependent or self.agreement_low is None:
            return f"{self.agreement:.2%} agreement"
        return (f"{self.agreement:.2%} agreement in every serving batching, {GUARD_CONFIDENCE:.0%} lower bound "
                f"{self.agreement_low:.2%}")


@dataclass(frozen=True)
class PathChoice:
    chosen: str
    reason: str
    check_texts: int = 0
    trials: tuple[Trial, ...] = field(default_factory=tuple)
    #: where the candidates' speeds came from: timed at this load, or remembered from an earlier champion
    #: over the same accelerated module (agreement is measured at every load either way)
    speeds_from: Literal["measured", "memo"] | None = None
    #: the batchings agreement was checked in (batch-dependent candidates: all; the others: the first)
    batchings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "reason": self.reason, "check_texts": self.check_texts,
                "min_agreement": MIN_AGREEMENT, "confidence": GUARD_CONFIDENCE, "batchings": list(self.batchings),
                "speeds_from": self.speeds_from, "candidates": [asdict(t) for t in self.trials]}


def memo_order(speeds: dict[str, float | None], preferred: str | None = None) -> list[str]:
    """The candidates worth re-checking on a champion over a remembered module: those that were faster
    than fp32 torch, fastest first (a ``preferred`` one first, as :func:`choose_path` would take it)."""
    reference = speeds.get(TORCH_FP32) or 0.0
    faster = sorted((p for p, v in speeds.items() if p != TORCH_FP32 and v is not None and v > reference),
                    key=lambda p: -speeds[p])
    if preferred in faster:
        faster.remove(preferred)
        return [preferred, *faster]
    if preferred is not None and speeds.get(preferred) is not None and preferred != TORCH_FP32:
        return [preferred, *faster]
    return faster


def choose_path(trials: Sequence[Trial], check_texts: int, preferred: str | None = None,
                batchings: Sequence[str] = ()) -> PathChoice:
    """The fastest candidate that passes the guard (:attr:`Trial.passed`: agreement with fp32 torch of at
    least :data:`MIN_AGREEMENT`, for a batch-dependent candidate as a lower confidence bound); fp32 torch
    when none does (it is the reference, so it cannot disagree with itself). A ``preferred`` path that
    passes wins regardless of speed: the operator asked for it by name."""
    passing = [t for t in trials if t.passed]
    others = [t for t in trials if not t.passed]
    refused = "; ".join(
        f"{t.path} failed ({t.error})" if t.error else
        f"{t.path} refused ({t.verdict()})" if t.agreement is not None else
        f"{t.path} not measured" for t in others)
    if not passing:
        reason = f"no candidate passed the {MIN_AGREEMENT:.0%} top-label guard; serving fp32 torch"
        return PathChoice(TORCH_FP32, reason + (f" ({refused})" if refused else ""), check_texts, tuple(trials),
                          batchings=tuple(batchings))
    asked = [t for t in passing if t.path == preferred]
    best = asked[0] if asked else max(passing, key=lambda t: t.texts_per_s)
    kept = (f"in every serving batching, {GUARD_CONFIDENCE:.0%} lower bound {best.agreement_low:.2%}"
            if best.batch_dependent and best.agreement_low is not None else "in serving's merged calls")
    reason = (f"{'asked for by name' if asked else 'fastest passing candidate'}: {best.texts_per_s:.0f} texts/s, "
              f"top label agrees with fp32 torch on {best.agreement:.2%} of {check_texts} check texts {kept} "
              f"(>= {MIN_AGREEMENT:.0%} required)")
    slower = [t for t in passing if t is not best]
    if slower:
        reason += "; slower: " + ", ".join(f"{t.path} {t.texts_per_s:.0f} texts/s" for t in slower)
    if refused:
        reason += f"; {refused}"
    return PathChoice(best.path, reason, check_texts, tuple(trials), batchings=tuple(batchings))


def near_ties(proba: np.ndarray, band: float, thresholds: np.ndarray | None = None) -> np.ndarray:
    """The rows whose decision a small shift of the probabilities could flip: the top two closer than
    ``band`` (single-label), or any label closer than ``band`` to its threshold (multi-label, ``thresholds``
    given). Dynamic int8 moves probabilities by a little, so the labels it flips are near-ties of this kind."""
    proba = np.asarray(proba)
    if thresholds is not None:
        return (np.abs(proba - thresholds) < band).any(axis=1)
    if proba.shape[1] < 2:
        return np.zeros(len(proba), dtype=bool)
    top_two = np.partition(proba, -2, axis=1)[:, -2:]
    return (top_two[:, 1] - top_two[:, 0]) < band


# ------------------------------------------------------------------------------------------------
# the candidates
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    path: str
    build: Callable[[], TextClassifier]
    #: its numerics depend on which texts share a batch (dynamic int8: per-batch activation scales)
    batch_dependent: bool = False


@dataclass(frozen=True)
class Batching:
    """One way serving groups texts for the model: calls of ``call_texts`` texts in the order given (``None``:
    one call), each length-sorted and cut into ``batch_size`` batches by ``predict_proba`` / ``embed``."""

    name: str
    call_texts: int | None
    batch_size: int

    def run(self, compute: Callable[[Sequence[str], int], np.ndarray], texts: Sequence[str]) -> np.ndarray:
        step = self.call_texts or max(1, len(texts))
        parts = [compute(texts[start : start + step], self.batch_size) for start in range(0, len(texts), step)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else compute(texts, self.batch_size)


def serving_batchings(batch_size: int, call_texts: int) -> tuple[Batching, ...]:
    """The batch make-ups serving runs, merged calls first (the one every candidate is checked in):
    the micro-batcher's merged calls of up to ``call_texts`` texts from whichever requests were waiting
    (the check texts are a random sample of the evaluation set, so consecutive chunks mix lengths as
    merged requests do), and a text alone (a task opened in Label Studio, a one-text API call)."""
    return (Batching(f"calls of {call_texts} in batches of {batch_size}", call_texts, batch_size),
            Batching("single texts", None, 1))


class AutocastModule(torch.nn.Module):
    """Runs ``inner`` under CUDA autocast (matmuls in half precision, reductions in fp32)."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    @property
    def config(self):
        return self.inner.config

    @property
    def base_model(self):
        return self.inner.base_model

    def forward(self, **inputs):
        with torch.autocast(device_type="cuda", dtype=self.dtype):
            return self.inner(**inputs)


class OrtModule(torch.nn.Module):
    """An exported transformer run by ONNX Runtime, called like the torch module it replaces.

    In train mode (MC dropout for BALD) the original torch module runs instead: an inference session
    has no dropout to switch on, and a silently deterministic "sample" would make every BALD score zero.
    """

    def __init__(self, original: torch.nn.Module, session, output_name: str):
        super().__init__()
        self.original = original
        self.session = session
        self.output_name = output_name
        self.input_names = [i.name for i in session.get_inputs()]
        self.eval()

    @property
    def config(self):
        return self.original.config

    @property
    def base_model(self):
        return self.original.base_model

    def __deepcopy__(self, memo):
        """A copy with its own torch module (MC dropout samples in a private copy) and the same session:
        an inference session is immutable and cannot be copied."""
        clone = OrtModule(copy.deepcopy(self.original, memo), self.session, self.output_name)
        return clone.train(self.training)

    def forward(self, **inputs):
        if self.training:
            return self.original(**inputs)
        feeds = {name: inputs[name].cpu().numpy() for name in self.input_names}
        (out,) = self.session.run([self.output_name], feeds)
        return SimpleNamespace(**{self.output_name: torch.from_numpy(out)})


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Names an export by the weights it was made from (and the exporting library versions)."""
    import onnxruntime

    h = hashlib.sha1(f"{torch.__version__}|{onnxruntime.__version__}|{type(module).__name__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _output_name(module: torch.nn.Module, sample: dict[str, torch.Tensor]) -> str:
    """``logits`` for a classification model, ``last_hidden_state`` for a bare encoder."""
    with torch.inference_mode():
        return next(iter(module(**sample).keys()))


_INPUTS = ("input_ids", "attention_mask")  # what serving's length-sorted batches hold


class _OneOutput(torch.nn.Module):
    """The exported graph: the inputs serving passes, by position, and the one output it reads."""

    def __init__(self, inner: torch.nn.Module, output_name: str):
        super().__init__()
        self.inner = inner
        self.output_name = output_name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.inner(input_ids=input_ids, attention_mask=attention_mask), self.output_name)


def export_onnx(module: torch.nn.Module, tokenizer, directory: Path) -> tuple[Path, Path, str]:
    """Export ``module`` to ``directory`` as ``fp32.onnx`` (fused by onnxruntime's transformer optimiser
    when it knows the architecture) and ``int8.onnx`` (per-channel dynamic quantisation of it); return
    both paths and the output name. Reuses an earlier export of the same weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fp32, int8, name_file = directory / "fp32.onnx", directory / "int8.onnx", directory / "output_name"
    if fp32.exists() and int8.exists() and name_file.exists():
        return fp32, int8, name_file.read_text()
    tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        # a private CPU copy with eager attention: onnxruntime's optimiser recognises (and fuses) the
        # eager attention pattern, not the SDPA one; the served and shared modules stay untouched
        exported = copy.deepcopy(module).cpu().eval()
        exported.set_attn_implementation("eager")
        sample = dict(tokenizer(["a short text", "a longer text, so that the first one is padded"],
                                padding=True, return_tensors="pt", return_token_type_ids=False))
        output_name = _output_name(exported, sample)
        dynamic = {k: {0: "batch", 1: "tokens"} for k in _INPUTS} | {output_name: {0: "batch"}}
        raw = tmp / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on HF's shape checks and the legacy exporter
            torch.onnx.export(_OneOutput(exported, output_name), tuple(sample[k] for k in _INPUTS), str(raw),
                              input_names=list(_INPUTS), output_names=[output_name], dynamic_axes=dynamic,
                              opset_version=17, dynamo=False)
        config = exported.config
        if config.model_type in optimizer.MODEL_TYPES:
            fused = optimizer.optimize_model(str(raw), model_type=config.model_type,
                                             num_heads=config.num_attention_heads, hidden_size=config.hidden_size)
            fused.save_model_to_file(str(tmp / "fp32.onnx"))
        else:
            shutil.copyfile(raw, tmp / "fp32.onnx")
        quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), per_channel=True,
                         weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})  # 1: FLOAT
        raw.unlink()
        (tmp / "output_name").write_text(output_name)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if directory.exists():  # another process finished the same export first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fp32, int8, output_name


@lru_cache(maxsize=4)
def ort_session(path: Path):
    """One session per exported file and process: files are immutable (named by the weights), sessions are
    safe to share between threads, and building one (graph optimisation) costs seconds. Fast-mode versions
    that share their frozen encoder reuse its session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # no per-session warnings in the server log
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxCandidates:
    """Builds the two ONNX Runtime copies of one classifier from one (cached) export."""

    def __init__(self, classifier: TextClassifier, cache_dir: Path):
        self.classifier = classifier
        self.cache_dir = cache_dir
        self._export: tuple[Path, Path, str] | None = None

    def _exported(self) -> tuple[Path, Path, str]:
        if self._export is None:
            module = self.classifier.transformer()
            self._export = export_onnx(module, self.classifier.tokenizer, self.cache_dir / weights_fingerprint(module))
        return self._export

    def build(self, which: Literal["fp32", "int8"]) -> TextClassifier:
        fp32, int8, output_name = self._exported()
        session = ort_session(fp32 if which == "fp32" else int8)
        served = self.classifier.with_module(lambda module: OrtModule(module, session, output_name))
        served.precision = f"onnx-{which}"
        return served

    def build_fallback(self, band: float = FALLBACK_BAND) -> NearTieFallback:
        """ONNX int8 with its near-ties answered by ONNX fp32 (both sessions are shared with the plain
        candidates, so this costs no extra export or session)."""
        return NearTieFallback(self.build("int8"), self.build("fp32"), band)


class NearTieFallback(TextClassifier):
    """Serves ``fast``'s answers, except on the rows where ``fast`` is within ``band`` of a tie
    (:func:`near_ties`): those are run again, alone together, on ``exact`` and take its answer.

    Why: int8 is faster than fp32 on CPU, but its flips cost it the guard; most of them are near-ties, so
    rerunning only those keeps fp32's labels while most rows pay only int8. Which rows fall back depends on ``fast``'s
    batch-dependent probabilities, so the copy is as batch-dependent as ``fast`` and checked like it. It has
    no frozen encoder (a head over cached embeddings could not fall back row by row), so it is only offered
    for models that run their transformer on every prediction.
    """

    def __init__(self, fast: TextClassifier, exact: TextClassifier, band: float):
        self.fast = fast
        self.exact = exact
        self.band = band
        self.labels = fast.labels
        self.max_length = fast.max_length
        self.device = fast.device
        self.multi_label = fast.multi_label
        if fast.multi_label:
            self.thresholds = fast.thresholds
        self.precision = f"{fast.precision}+fallback"

    def fallback_rows(self, proba: np.ndarray) -> np.ndarray:
        """Indices of the rows of ``fast``'s ``proba`` that ``exact`` answers."""
        return np.flatnonzero(near_ties(proba, self.band, self.thresholds if self.multi_label else None))

    def predict_proba(self, texts, batch_size=64, progress=None):
        proba = np.array(self.fast.predict_proba(texts, batch_size, progress))
        rows = self.fallback_rows(proba)
        if len(rows):
            proba[rows] = self.exact.predict_proba([texts[i] for i in rows], batch_size)
        return proba

    def embed(self, texts, batch_size=64, progress=None):
        return self.fast.embed(texts, batch_size, progress)

    @property
    def tokenizer(self):
        return self.fast.tokenizer

    def transformer(self) -> torch.nn.Module:
        return self.fast.transformer()

    def stochastic_proba(self, texts, n_samples, *, seed, batch_size=64, embeddings=None, labeled=None):
        return self.fast.stochastic_proba(texts, n_samples, seed=seed, batch_size=batch_size,
                                          embeddings=embeddings, labeled=labeled)

    def _save_weights(self, path: Path) -> dict:
        raise TypeError("a served int8+fallback copy is not saved: the registry keeps the fp32 champion")


def _autocast_copy(classifier: TextClassifier, dtype: torch.dtype, name: str) -> TextClassifier:
    served = classifier.with_module(lambda module: AutocastModule(module, dtype))
    served.precision = name
    return served


def candidates(classifier: TextClassifier, mode: Mode, cache_dir: Path) -> list[Candidate]:
    """The ways to run ``classifier`` on its device that ``mode`` allows, fp32 torch first."""
    out = [Candidate(TORCH_FP32, lambda: classifier)]
    if classifier.device.type == "cuda":
        if mode == "auto":
            if torch.cuda.is_bf16_supported():
                out.append(Candidate("torch-bf16", lambda: _autocast_copy(classifier, torch.bfloat16, "bf16")))
            out.append(Candidate("torch-fp16", lambda: _autocast_copy(classifier, torch.float16, "fp16")))
        return out
    # both int8 paths quantise activations dynamically, per tensor: the scale comes from the batch
    out.append(Candidate("torch-int8", classifier.quantized_copy, batch_dependent=True))
    if mode == "auto":
        onnx = OnnxCandidates(classifier, cache_dir)
        out.append(Candidate("onnx-fp32", lambda: onnx.build("fp32")))
        out.append(Candidate("onnx-int8", lambda: onnx.build("int8"), batch_dependent=True))
        if classifier.frozen_encoder is None:
            out.append(Candidate("onnx-int8+fallback", onnx.build_fallback, batch_dependent=True))
    return out


# ------------------------------------------------------------------------------------------------
# measuring and choosing
# ------------------------------------------------------------------------------------------------


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def measure(options: Sequence[Candidate], check_texts: Sequence[str], timing_texts: Sequence[str],
            batchings: Sequence[Batching], outputs: dict[str, np.ndarray] | None = None
            ) -> tuple[list[Trial], dict[str, TextClassifier]]:
    """Agreement of each candidate with the first (the reference) on ``check_texts`` (:func:`_agreement`),
    then speed on ``timing_texts`` run as serving's merged calls (the first batching): ``_TIMING_ROUNDS``
    interleaved rounds, best round kept, so a burst of load from anything else on the machine does not
    decide the choice."""
    built: dict[str, TextClassifier] = {}
    agreement: dict[str, Trial] = {}
    errors: dict[str, str] = {}
    reference = None
    for candidate in options:
        try:
            model = candidate.build()
            if reference is None:
                reference = _labels(model, check_texts, batchings[0], outputs, candidate.path)
            agreement[candidate.path] = _agreement(candidate, model, check_texts, reference, batchings, outputs)
        except Exception as e:  # any failure only removes the candidate
            if reference is None:
                raise  # the reference itself cannot run: the champion is broken, not a candidate
            errors[candidate.path] = _error(e)
            log.info("serving candidate %s failed: %s", candidate.path, errors[candidate.path])
            continue
        built[candidate.path] = model
    best: dict[str, float] = {}
    for _ in range(_TIMING_ROUNDS):
        for path, model in list(built.items()):
            try:
                started = time.perf_counter()
                batchings[0].run(model.predict_proba, timing_texts)
                best[path] = min(best.get(path, np.inf), time.perf_counter() - started)
            except Exception as e:
                if path == options[0].path:
                    raise
                errors[path] = _error(e)
                del built[path]
    trials = []
    for candidate in options:
        path = candidate.path
        checked = agreement.get(path, Trial(path, batch_dependent=candidate.batch_dependent))
        if path in errors:
            trials.append(replace(checked, error=errors[path]))
        else:
            trials.append(replace(checked, texts_per_s=round(len(timing_texts) / best[path], 1)))
    return trials, built


def _agreement(candidate: Candidate, model: TextClassifier, texts: Sequence[str], reference: np.ndarray,
               batchings: Sequence[Batching], outputs: dict[str, np.ndarray] | None = None) -> Trial:
    """How ``model`` keeps the reference's decisions: the top label, or a multi-label model's thresholded
    label set (a shifted sigmoid can flip a label across its threshold while the top label stays put). A
    batch-dependent candidate is run in every batching, keeps a text only when it keeps it in all of them,
    and is judged by the lower confidence bound (the batchings left once it cannot pass are skipped: single
    texts cost a forward pass each); any other in serving's merged calls alone."""
    used = batchings if candidate.batch_dependent else batchings[:1]
    needed = fewest_kept(len(texts)) if candidate.batch_dependent else None
    kept = np.ones(len(texts), dtype=bool)
    by_batching: dict[str, float] = {}
    for batching in used:
        if by_batching and (needed is None or kept.sum() < needed):
            break
        same = (_labels(model, texts, batching, outputs, candidate.path) == reference).all(axis=1)
        by_batching[batching.name] = round(float(same.mean()), 4)
        kept &= same
    low = round(agreement_lower_bound(int(kept.sum()), len(texts)), 4) if candidate.batch_dependent else None
    return Trial(candidate.path, round(float(kept.mean()), 4), batch_dependent=candidate.batch_dependent,
                 agreement_low=low, agreement_by_batching=by_batching)


def _labels(model: TextClassifier, texts: Sequence[str], batching: Batching,
            outputs: dict[str, np.ndarray] | None = None, path: str | None = None) -> np.ndarray:
    """What serving answers on ``texts`` when they are batched as ``batching`` says. A frozen-encoder model's
    embeddings of the check texts are kept in ``outputs`` by path and batching: they depend on the encoder
    alone, so a later head over the same encoder is checked on exactly the outputs its path produces,
    without running the encoder again."""
    if outputs is None or model.frozen_encoder is None:
        proba = batching.run(model.predict_proba, texts)
    else:
        key = f"{path}|{batching.name}"
        if key not in outputs:
            outputs[key] = batching.run(model.embed, texts)
        proba = model.proba_from_embeddings(outputs[key])
    return model.decide_ids(proba).reshape(len(texts), -1)


def recheck(options: Sequence[Candidate], order: Sequence[str], speeds: dict[str, float | None],
            check_texts: Sequence[str], batchings: Sequence[Batching], outputs: dict[str, np.ndarray] | None = None
            ) -> tuple[list[Trial], dict[str, TextClassifier]]:
    """Agreement with the reference (the first option) for the candidates in ``order``, stopping at the
    first that passes; speeds are the remembered ones. Candidates not reached keep no agreement, so
    :func:`choose_path` cannot pick them."""
    by_path = {c.path: c for c in options}
    reference = options[0].build()
    expected = _labels(reference, check_texts, batchings[0], outputs, options[0].path)
    built = {options[0].path: reference}
    found: dict[str, Trial] = {options[0].path: Trial(options[0].path, 1.0, speeds.get(options[0].path))}
    for path in order:
        candidate = by_path[path]
        try:
            model = candidate.build()
            checked = _agreement(candidate, model, check_texts, expected, batchings, outputs)
        except Exception as e:  # as in measure: a failure only removes the candidate
            found[path] = Trial(path, None, None, _error(e), batch_dependent=candidate.batch_dependent)
            continue
        found[path] = replace(checked, texts_per_s=speeds.get(path))
        if found[path].passed:
            built[path] = model
            break
    trials = [found.get(c.path, Trial(c.path, None, speeds.get(c.path), batch_dependent=c.batch_dependent))
              for c in options]
    return trials, built


class SpeedMemo:
    """Each candidate's measured speed per accelerated module (its weights fingerprint), device and batch
    size, for this process: the most recent few modules, since a long-lived server sees a new encoder
    only when the recipe changes."""

    def __init__(self, size: int = 8):
        self.size = size
        self._speeds: OrderedDict[tuple[str, str, int], dict[str, float | None]] = OrderedDict()
        self._outputs: OrderedDict[tuple[tuple[str, str, int], str], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def outputs(self, key: tuple[str, str, int], texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The (mutable) per-path encoder outputs on ``texts`` for a frozen-encoder module: the check
        texts are a fixed sample of the frozen evaluation set, so the same few arrays serve every round."""
        digest = hashlib.sha1("\x00".join(texts).encode()).hexdigest()
        with self._lock:
            found = self._outputs.setdefault((key, digest), {})
            self._outputs.move_to_end((key, digest))
            while len(self._outputs) > self.size:
                self._outputs.popitem(last=False)
            return found

    def get(self, key: tuple[str, str, int]) -> dict[str, float | None] | None:
        with self._lock:
            found = self._speeds.get(key)
            if found is not None:
                self._speeds.move_to_end(key)
            return dict(found) if found is not None else None

    def put(self, key: tuple[str, str, int], trials: Sequence[Trial]) -> None:
        """Remembers what the full measurement timed; a candidate that failed is remembered as ``None``
        (a failure to build or run is the module's or the machine's, not the head's)."""
        with self._lock:
            self._speeds[key] = {t.path: (t.texts_per_s if t.error is None else None) for t in trials}
            self._speeds.move_to_end(key)
            while len(self._speeds) > self.size:
                self._speeds.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._speeds.clear()
            self._outputs.clear()


SPEEDS = SpeedMemo()


def _memo_key(classifier: TextClassifier, batch_size: int) -> tuple[str, str, int] | None:
    """The accelerated module's identity, or ``None`` when it cannot be named (then nothing is remembered).
    The frozen encoder's name is part of it: two fast-mode models over the same transformer weights may feed
    their heads different features (the embedding alone, or with hashed n-grams), and remembered check-text
    features of one would not fit the other's head."""
    try:
        encoder = classifier.frozen_encoder
        features = encoder.name if encoder is not None else ""
        return f"{weights_fingerprint(classifier.transformer())}|{features}", str(classifier.device), batch_size
    except Exception as e:
        log.info("serving speeds not remembered: %s", _error(e))
        return None


def choose_for_serving(classifier: TextClassifier, mode: Mode, check_texts: Sequence[str], cache_dir: Path,
                       batch_size: int = 16, timing_texts: int = 128, memo: SpeedMemo = SPEEDS, *,
                       call_texts: int = 128) -> tuple[TextClassifier, PathChoice]:
    """The copy of ``classifier`` to serve and why (see the module docstring). ``batch_size`` and
    ``call_texts`` are serving's: texts per forward pass and the most texts one merged call holds."""
    if mode == "none":
        return classifier, PathChoice(TORCH_FP32, "settings.quantize is none: fp32 torch, nothing tried")
    if not check_texts:
        return classifier, PathChoice(TORCH_FP32, "no check texts to verify a faster path against; fp32 torch")
    options = candidates(classifier, mode, cache_dir)
    preferred = "torch-int8" if mode == "int8" else None
    batchings = serving_batchings(batch_size, call_texts)
    names = tuple(b.name for b in batchings)
    key = _memo_key(classifier, batch_size)
    speeds = memo.get(key) if key is not None else None
    outputs = memo.outputs(key, check_texts) if key is not None else None
    if speeds is not None and {c.path for c in options} <= speeds.keys():
        order = memo_order(speeds, preferred)
        if not order:  # fp32 torch was the fastest: the reference needs no guard, and nothing is faster
            trials = [Trial(c.path, 1.0 if c.path == TORCH_FP32 else None, speeds[c.path]) for c in options]
            reason = (f"speeds remembered from an earlier champion over the same {key[1]} module ({key[0]}): "
                      f"no candidate was faster than fp32 torch")
            return classifier, PathChoice(TORCH_FP32, reason, len(check_texts), tuple(trials), speeds_from="memo",
                                          batchings=names)
        trials, built = recheck(options, order, speeds, check_texts, batchings, outputs)
        choice = choose_path(trials, len(check_texts), preferred, names)
        if choice.chosen != TORCH_FP32:
            reason = (f"speeds remembered from an earlier champion over the same {key[1]} module "
                      f"({key[0]}), agreement checked now; {choice.reason}")
            return built[choice.chosen], replace(choice, reason=reason, speeds_from="memo")
        log.info("no remembered faster path passed the guard for this champion; measuring every candidate")
    trials, built = measure(options, check_texts, list(check_texts[:timing_texts]), batchings, outputs)
    if key is not None:
        memo.put(key, trials)
    choice = choose_path(trials, len(check_texts), preferred, names)
    return built[choice.chosen], replace(choice, speeds_from="measured")


def prepare_for_serving(loaded: LoadedModel, mode: Mode, check_texts: Sequence[str], *,
                        cache_dir: Path, device: str = "cpu", batch_size: int = 16, call_texts: int = 128,
                        memo: SpeedMemo = SPEEDS) -> LoadedModel:
    """The model to swap in: ``loaded``'s classifier on ``device``, run the fastest way that keeps its
    labels, with the choice recorded in ``serving`` for /health."""
    classifier = loaded.classifier.to(device)
    served, choice = choose_for_serving(classifier, mode, check_texts, cache_dir, batch_size, memo=memo,
                                        call_texts=call_texts)
    log.info("%s: serving %s (%s)", loaded.ref.label, choice.chosen, choice.reason)
    return LoadedModel(loaded.ref, served, serving=choice.as_dict())
