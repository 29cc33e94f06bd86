"""How serving runs its champion: the fastest way that keeps the model's labels, chosen at every load.

Whether a faster way of running a model keeps its answers depends on the trained weights, not on the
recipe: two fine-tunes with the same recipe had their torch int8 copies pass and fail the guard (issue 15).
So no path is fixed in advance. Each freshly loaded champion is run every candidate way the device offers:

- CPU: fp32 torch (the reference), torch dynamic int8, ONNX Runtime fp32 with its BERT fusions
  (attention, GELU, skip-LayerNorm) and all graph optimisations, and ONNX Runtime int8 with per-channel
  weights;
- CUDA: fp32 torch, and bf16 / fp16 autocast.

Each candidate's top label (a multi-label model's whole decided label set) is compared with fp32 torch
on the check texts (the registry's frozen evaluation set) and its speed is timed on a short batch;
the fastest candidate that agrees on at least :data:`MIN_AGREEMENT` is served, and ``/health`` reports
the choice with every candidate's agreement and speed. A candidate that fails in any way (no onnxruntime,
an export error) is recorded and skipped: the choice never stops a champion from being
served, since fp32 torch always qualifies.

ONNX exports are cached on disk, keyed by the transformer's weights, so a restart (or a fast-mode
version that shares its frozen encoder with the last one) does not export again. For the frozen encoder
+ linear head kind the encoder is what is accelerated; the head stays in scikit-learn.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch

from training.classifier import TextClassifier
from training.registry import LoadedModel

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.99
TORCH_FP32 = "torch-fp32"
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


@dataclass(frozen=True)
class Trial:
    """One candidate way of running the champion, as measured at load."""

    path: str
    agreement: float | None = None  # share of check texts decided as fp32 torch decides them
    texts_per_s: float | None = None
    error: str | None = None  # why the candidate could not be built or run

    @property
    def passed(self) -> bool:
        return (self.error is None and self.texts_per_s is not None and self.agreement is not None
                and self.agreement >= MIN_AGREEMENT)


@dataclass(frozen=True)
class PathChoice:
    chosen: str
    reason: str
    check_texts: int = 0
    trials: tuple[Trial, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "reason": self.reason, "check_texts": self.check_texts,
                "min_agreement": MIN_AGREEMENT, "candidates": [asdict(t) for t in self.trials]}


def choose_path(trials: Sequence[Trial], check_texts: int, preferred: str | None = None) -> PathChoice:
    """The fastest candidate whose top label agrees with fp32 torch on >= :data:`MIN_AGREEMENT` of the
    check texts; fp32 torch when none does (it is the reference, so it cannot disagree with itself).
    A ``preferred`` path that passes wins regardless of speed: the operator asked for it by name."""
    passing = [t for t in trials if t.passed]
    others = [t for t in trials if not t.passed]
    refused = "; ".join(
        f"{t.path} failed ({t.error})" if t.error else
        f"{t.path} refused ({t.agreement:.2%} agreement)" if t.agreement is not None else
        f"{t.path} not measured" for t in others)
    if not passing:
        reason = f"no candidate passed the {MIN_AGREEMENT:.0%} top-label guard; serving fp32 torch"
        return PathChoice(TORCH_FP32, reason + (f" ({refused})" if refused else ""), check_texts, tuple(trials))
    asked = [t for t in passing if t.path == preferred]
    best = asked[0] if asked else max(passing, key=lambda t: t.texts_per_s)
    reason = (f"{'asked for by name' if asked else 'fastest passing candidate'}: {best.texts_per_s:.0f} texts/s, "
              f"top label agrees with fp32 torch on {best.agreement:.2%} of {check_texts} check texts "
              f"(>= {MIN_AGREEMENT:.0%} required)")
    slower = [t for t in passing if t is not best]
    if slower:
        reason += "; slower: " + ", ".join(f"{t.path} {t.texts_per_s:.0f} texts/s" for t in slower)
    if refused:
        reason += f"; {refused}"
    return PathChoice(best.path, reason, check_texts, tuple(trials))


# ------------------------------------------------------------------------------------------------
# the candidates
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    path: str
    build: Callable[[], TextClassifier]


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
    out.append(Candidate("torch-int8", classifier.quantized_copy))
    if mode == "auto":
        onnx = OnnxCandidates(classifier, cache_dir)
        out.append(Candidate("onnx-fp32", lambda: onnx.build("fp32")))
        out.append(Candidate("onnx-int8", lambda: onnx.build("int8")))
    return out


# ------------------------------------------------------------------------------------------------
# measuring and choosing
# ------------------------------------------------------------------------------------------------


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def measure(options: Sequence[Candidate], check_texts: Sequence[str], timing_texts: Sequence[str],
            batch_size: int) -> tuple[list[Trial], dict[str, TextClassifier]]:
    """Agreement of each candidate with the first (the reference) on ``check_texts``, then speed on
    ``timing_texts``: ``_TIMING_ROUNDS`` interleaved rounds, best round kept, so a burst of load from
    anything else on the machine does not decide the choice."""
    built: dict[str, TextClassifier] = {}
    agreement: dict[str, float] = {}
    errors: dict[str, str] = {}
    reference = None
    for candidate in options:
        try:
            model = candidate.build()
            # what serving answers with: the top label, or a multi-label model's thresholded label set (a
            # shifted sigmoid can flip a label across its threshold while the top label stays put)
            labels = model.decide_ids(model.predict_proba(check_texts, batch_size)).reshape(len(check_texts), -1)
        except Exception as e:  # any failure only removes the candidate
            if reference is None:
                raise  # the reference itself cannot run: the champion is broken, not a candidate
            errors[candidate.path] = _error(e)
            log.info("serving candidate %s failed: %s", candidate.path, errors[candidate.path])
            continue
        if reference is None:
            reference = labels
        built[candidate.path] = model
        agreement[candidate.path] = float((labels == reference).all(axis=1).mean())
    best: dict[str, float] = {}
    for _ in range(_TIMING_ROUNDS):
        for path, model in list(built.items()):
            try:
                started = time.perf_counter()
                model.predict_proba(timing_texts, batch_size)
                best[path] = min(best.get(path, np.inf), time.perf_counter() - started)
            except Exception as e:
                if path == options[0].path:
                    raise
                errors[path] = _error(e)
                del built[path]
    trials = []
    for candidate in options:
        path = candidate.path
        if path in errors:
            trials.append(Trial(path, agreement.get(path), None, errors[path]))
        else:
            trials.append(Trial(path, round(agreement[path], 4), round(len(timing_texts) / best[path], 1)))
    return trials, built


def choose_for_serving(classifier: TextClassifier, mode: Mode, check_texts: Sequence[str], cache_dir: Path,
                       batch_size: int = 16, timing_texts: int = 128) -> tuple[TextClassifier, PathChoice]:
    """The copy of ``classifier`` to serve and why (see the module docstring)."""
    if mode == "none":
        return classifier, PathChoice(TORCH_FP32, "settings.quantize is none: fp32 torch, nothing tried")
    if not check_texts:
        return classifier, PathChoice(TORCH_FP32, "no check texts to verify a faster path against; fp32 torch")
    options = candidates(classifier, mode, cache_dir)
    trials, built = measure(options, check_texts, list(check_texts[:timing_texts]), batch_size)
    choice = choose_path(trials, len(check_texts), preferred="torch-int8" if mode == "int8" else None)
    return built[choice.chosen], choice


def prepare_for_serving(loaded: LoadedModel, mode: Mode, check_texts: Sequence[str], *,
                        cache_dir: Path, device: str = "cpu", batch_size: int = 16) -> LoadedModel:
    """The model to swap in: ``loaded``'s classifier on ``device``, run the fastest way that keeps its
    labels, with the choice recorded in ``serving`` for /health."""
    classifier = loaded.classifier.to(device)
    served, choice = choose_for_serving(classifier, mode, check_texts, cache_dir, batch_size)
    log.info("%s: serving %s (%s)", loaded.ref.label, choice.chosen, choice.reason)
    return LoadedModel(loaded.ref, served, serving=choice.as_dict())
