"""Serving's fast path: the policy that picks a candidate, the measurement that never lets a candidate's
failure stop serving, a real ONNX Runtime export that keeps PyTorch's labels, and /health reporting it."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from labelloop.config import Settings
from serving import quantize
from serving.quantize import (
    FALLBACK_BAND,
    GUARD_CONFIDENCE,
    MIN_AGREEMENT,
    TORCH_FP32,
    Candidate,
    NearTieFallback,
    OnnxCandidates,
    Trial,
    agreement_lower_bound,
    choose_for_serving,
    choose_path,
    measure,
    near_ties,
    serving_batchings,
)
from tests.test_classifier_kinds import TEXTS, LengthClassifier, tiny_embedding_head, tiny_finetuned
from training.classifier import AutoTokenizer, resolve_model_path
from training.registry import LoadedModel, ModelRef

CHECK = [f"check text {i} " + "word " * (i % 17) for i in range(60)]
BATCHINGS = serving_batchings(16, 128)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


@pytest.fixture(autouse=True)
def no_remembered_speeds():
    """Each test starts without the process-wide speed memo (tiny models share weights across tests)."""
    quantize.SPEEDS.clear()
    yield
    quantize.SPEEDS.clear()


# --- the policy -----------------------------------------------------------------------------------


def test_the_fastest_passing_candidate_wins():
    trials = [Trial(TORCH_FP32, 1.0, 150.0), Trial("torch-int8", 0.978, 220.0), Trial("onnx-fp32", 1.0, 260.0),
              Trial("onnx-int8", 0.995, 300.0)]
    choice = choose_path(trials, 500)
    assert choice.chosen == "onnx-int8"
    assert "300 texts/s" in choice.reason and "99.50% of 500" in choice.reason
    assert "torch-int8 refused (97.80% agreement)" in choice.reason
    assert [c["path"] for c in choice.as_dict()["candidates"]] == [t.path for t in trials]


def test_a_guard_refusal_at_the_threshold_edge():
    just_below = MIN_AGREEMENT - 1e-4
    choice = choose_path([Trial(TORCH_FP32, 1.0, 100.0), Trial("onnx-int8", just_below, 500.0),
                          Trial("onnx-fp32", MIN_AGREEMENT, 120.0)], 100)
    assert choice.chosen == "onnx-fp32"


def test_when_nothing_passes_fp32_torch_is_served():
    choice = choose_path([Trial("torch-int8", 0.9, 300.0), Trial("onnx-int8", None, None, "ImportError: no")], 10)
    assert choice.chosen == TORCH_FP32
    assert "no candidate passed" in choice.reason and "onnx-int8 failed (ImportError: no)" in choice.reason


def test_a_slower_fp32_torch_is_not_chosen_over_a_faster_exact_path():
    choice = choose_path([Trial(TORCH_FP32, 1.0, 100.0), Trial("onnx-fp32", 1.0, 101.0)], 10)
    assert choice.chosen == "onnx-fp32" and "torch-fp32 100 texts/s" in choice.reason


def test_the_lower_bound_is_the_exact_one_sided_binomial_bound():
    assert agreement_lower_bound(500, 500) == pytest.approx((1 - GUARD_CONFIDENCE) ** (1 / 500))
    assert agreement_lower_bound(499, 500) >= MIN_AGREEMENT > agreement_lower_bound(498, 500)
    assert agreement_lower_bound(60, 60) < MIN_AGREEMENT  # too few texts to vouch for a batch-dependent copy
    assert agreement_lower_bound(0, 0) == 0.0


def test_a_batch_dependent_candidate_needs_the_margin_an_exact_one_does_not():
    """3 misses in 500 is 99.4 %: enough for a path whose labels are fixed per text, not for one whose labels
    move with the batch (its 95 % lower bound is under 99 %)."""
    low = agreement_lower_bound(497, 500)
    trials = [Trial(TORCH_FP32, 1.0, 100.0), Trial("onnx-fp32", 0.994, 200.0),
              Trial("onnx-int8", 0.994, 400.0, batch_dependent=True, agreement_low=low)]
    choice = choose_path(trials, 500)
    assert choice.chosen == "onnx-fp32"
    assert f"onnx-int8 refused (99.40% agreement in every serving batching, 95% lower bound {low:.2%})" in choice.reason
    sure = Trial("onnx-int8", 0.998, 400.0, batch_dependent=True, agreement_low=agreement_lower_bound(499, 500))
    assert choose_path([*trials[:2], sure], 500).chosen == "onnx-int8"


# --- measuring ------------------------------------------------------------------------------------


def test_a_candidate_that_raises_is_recorded_and_skipped():
    toy = LengthClassifier(cut=20)  # about half of CHECK is longer

    def broken():
        raise RuntimeError("export exploded")

    flipped = LengthClassifier(cut=0)  # calls every text "b": disagrees on most
    trials, built = measure([Candidate(TORCH_FP32, lambda: toy), Candidate("onnx-fp32", broken),
                             Candidate("torch-int8", lambda: flipped)], CHECK, CHECK[:8], BATCHINGS)
    by_path = {t.path: t for t in trials}
    assert by_path["onnx-fp32"].error == "RuntimeError: export exploded" and "onnx-fp32" not in built
    assert by_path[TORCH_FP32].agreement == 1.0 and by_path[TORCH_FP32].texts_per_s > 0
    assert by_path["torch-int8"].agreement < MIN_AGREEMENT
    assert choose_path(trials, len(CHECK)).chosen == TORCH_FP32


class FixedMultiLabel(LengthClassifier):
    """A multi-label toy answering the same probabilities for every text."""

    multi_label = True

    def __init__(self, row):
        super().__init__()
        self.row = np.asarray(row, dtype=np.float32)

    def predict_proba(self, texts, batch_size=64, progress=None):
        return np.tile(self.row, (len(texts), 1))


def test_a_multi_label_candidate_must_keep_the_whole_label_set_not_just_the_top_label():
    reference = FixedMultiLabel([0.9, 0.6])  # decides {a, b}
    shifted = FixedMultiLabel([0.9, 0.4])  # same top label, but b fell below its threshold: decides {a}
    same = FixedMultiLabel([0.8, 0.7])
    trials, _ = measure([Candidate(TORCH_FP32, lambda: reference), Candidate("onnx-int8", lambda: shifted),
                         Candidate("onnx-fp32", lambda: same)], CHECK, CHECK[:4], BATCHINGS)
    by_path = {t.path: t for t in trials}
    assert by_path["onnx-int8"].agreement == 0.0 and by_path["onnx-fp32"].agreement == 1.0
    assert choose_path(trials, len(CHECK)).chosen in (TORCH_FP32, "onnx-fp32")


def test_a_broken_reference_is_a_load_failure_not_a_silent_choice():
    def broken():
        raise RuntimeError("weights missing")

    with pytest.raises(RuntimeError, match="weights missing"):
        measure([Candidate(TORCH_FP32, broken)], CHECK, CHECK[:4], BATCHINGS)


# --- the guard checks in serving's batch make-ups (issue 15) ---------------------------------------

_lengths = np.random.default_rng(0).permutation(np.arange(400) % 100)
#: a random sample of texts of every length, as the frozen evaluation set is
SPREAD = [f"t{i:03d} " + "x" * int(n) for i, n in enumerate(_lengths)]


class PaddingSensitive(LengthClassifier):
    """Stands for dynamic int8: a text's label flips when its length-sorted batch pads it by more than
    ``tolerance`` characters, as a per-batch activation scale taken over the padding can move a label."""

    def __init__(self, cut: int, tolerance: int):
        super().__init__(cut=cut)
        self.tolerance = tolerance
        self.batch_sizes: list[int] = []

    def predict_proba(self, texts, batch_size=64, progress=None):
        self.batch_sizes.append(batch_size)
        proba = super().predict_proba(texts, batch_size)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            longest = max(len(texts[i]) for i in idx)
            for i in idx:
                if longest - len(texts[i]) > self.tolerance:
                    proba[i] = proba[i][::-1]
        return proba


class AloneSensitive(LengthClassifier):
    """A copy that decides some texts differently only when each runs alone (batch size 1)."""

    def predict_proba(self, texts, batch_size=64, progress=None):
        proba = super().predict_proba(texts, batch_size)
        if batch_size == 1:
            flip = np.array([i % 40 == 0 for i in range(len(texts))])
            proba[flip] = proba[flip][:, ::-1]
        return proba


class ChampionWithInt8(LengthClassifier):
    """An fp32 champion whose int8 copy (the ``int8`` mode's only candidate) is ``copy``."""

    def __init__(self, copy: LengthClassifier):
        super().__init__(cut=50)
        self.copy = copy

    def quantized_copy(self):
        return self.copy


def served_agreement(reference, served, texts, request_texts=100, batch_size=16):
    """What the serving benchmark measures: requests of ``request_texts``, each one model call."""
    def labels(model):
        return np.concatenate([model.predict_proba(texts[i : i + request_texts], batch_size).argmax(1)
                               for i in range(0, len(texts), request_texts)])

    return float((labels(reference) == labels(served)).mean())


def test_a_copy_that_keeps_labels_only_in_length_sorted_batches_of_the_whole_set_is_refused(tmp_path):
    """The seed-1 failure: sorted all together, the check texts fill batches of near-equal length and the
    copy agrees on all of them; in serving's calls it does not, and serving must not get it."""
    copy = PaddingSensitive(cut=50, tolerance=6)
    champion = ChampionWithInt8(copy)
    whole = (copy.predict_proba(SPREAD, 16).argmax(1) == champion.predict_proba(SPREAD, 16).argmax(1)).mean()
    assert whole == 1.0  # what the guard used to measure
    assert served_agreement(champion, copy, SPREAD) < MIN_AGREEMENT  # what serving then serves
    served, choice = choose_for_serving(champion, "int8", SPREAD, tmp_path, 16, call_texts=128)
    assert choice.chosen == TORCH_FP32 and served is champion
    int8 = next(c for c in choice.as_dict()["candidates"] if c["path"] == "torch-int8")
    assert int8["batch_dependent"] and int8["agreement"] < MIN_AGREEMENT
    # refused in merged calls already: single texts (a forward pass each) are not run for nothing
    assert list(int8["agreement_by_batching"]) == ["calls of 128 in batches of 16"]
    assert int8["agreement_by_batching"]["calls of 128 in batches of 16"] < MIN_AGREEMENT
    assert "torch-int8 refused" in choice.reason
    assert choice.as_dict()["batchings"] == ["calls of 128 in batches of 16", "single texts"]


def test_a_copy_that_differs_only_on_single_texts_is_refused(tmp_path):
    copy = AloneSensitive(cut=50)
    champion = ChampionWithInt8(copy)
    assert (copy.predict_proba(SPREAD, 16).argmax(1) == champion.predict_proba(SPREAD, 16).argmax(1)).all()
    _, choice = choose_for_serving(champion, "int8", SPREAD, tmp_path, 16, call_texts=128)
    assert choice.chosen == TORCH_FP32
    int8 = next(c for c in choice.as_dict()["candidates"] if c["path"] == "torch-int8")
    assert int8["agreement_by_batching"] == {"calls of 128 in batches of 16": 1.0, "single texts": 0.975}


def test_a_batch_dependent_copy_that_keeps_every_label_in_every_batching_is_served(tmp_path):
    copy = PaddingSensitive(cut=50, tolerance=1000)  # never flips
    served, choice = choose_for_serving(ChampionWithInt8(copy), "int8", SPREAD, tmp_path, 16, call_texts=128)
    assert choice.chosen == "torch-int8" and served is copy
    assert set(copy.batch_sizes) == {16, 1}  # checked in merged calls and alone
    int8 = next(c for c in choice.as_dict()["candidates"] if c["path"] == "torch-int8")
    assert int8["agreement"] == 1.0 and int8["agreement_low"] == pytest.approx(agreement_lower_bound(400, 400),
                                                                               abs=1e-4)
    assert f"{GUARD_CONFIDENCE:.0%} lower bound" in choice.reason


def test_too_few_check_texts_cannot_vouch_for_a_batch_dependent_copy(tmp_path):
    copy = PaddingSensitive(cut=50, tolerance=1000)
    _, choice = choose_for_serving(ChampionWithInt8(copy), "int8", SPREAD[:200], tmp_path, 16, call_texts=128)
    int8 = next(c for c in choice.as_dict()["candidates"] if c["path"] == "torch-int8")
    assert choice.chosen == TORCH_FP32 and int8["agreement"] == 1.0 and int8["agreement_low"] < MIN_AGREEMENT
    assert set(copy.batch_sizes) == {16}  # no single-text pass once the bound cannot reach 99 %


def test_a_batch_independent_candidate_is_checked_once_in_merged_calls(tmp_path):
    checked = CountingLength(50)
    trials, _ = measure([Candidate(TORCH_FP32, lambda: LengthClassifier(cut=50)),
                         Candidate("onnx-fp32", lambda: checked)], SPREAD, SPREAD[:8], BATCHINGS)
    assert checked.calls[0] == 128 and sum(checked.calls[:4]) == len(SPREAD)  # calls of 128, then timing
    assert trials[1].agreement_by_batching == {"calls of 128 in batches of 16": 1.0}
    assert trials[1].agreement_low is None and trials[1].passed


def test_without_onnxruntime_the_onnx_candidates_are_skipped(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    served, choice = choose_for_serving(tiny_finetuned(tokenizer), "auto", CHECK, tmp_path)
    errors = {c["path"]: c["error"] for c in choice.as_dict()["candidates"]}
    assert "onnxruntime" in errors["onnx-fp32"] and "onnxruntime" in errors["onnx-int8"]
    assert choice.chosen in (TORCH_FP32, "torch-int8") and served.precision in ("fp32", "int8")


def test_mode_none_and_no_check_texts_serve_fp32_torch(tokenizer, tmp_path):
    model = tiny_finetuned(tokenizer)
    assert choose_for_serving(model, "none", CHECK, tmp_path)[0] is model
    served, choice = choose_for_serving(model, "auto", [], tmp_path)
    assert served is model and choice.chosen == TORCH_FP32 and "no check texts" in choice.reason


def test_int8_mode_tries_torch_int8_only(tokenizer, tmp_path):
    _, choice = choose_for_serving(tiny_finetuned(tokenizer), "int8", CHECK, tmp_path)
    assert [c["path"] for c in choice.as_dict()["candidates"]] == [TORCH_FP32, "torch-int8"]


# --- a real ONNX Runtime export -------------------------------------------------------------------


def test_onnx_export_keeps_pytorch_labels_and_is_cached(tokenizer, tmp_path, monkeypatch):
    model = tiny_finetuned(tokenizer)
    reference = model.predict_proba(CHECK)
    onnx_fp32 = OnnxCandidates(model, tmp_path).build("fp32")
    assert onnx_fp32.precision == "onnx-fp32" and model.precision == "fp32"
    proba = onnx_fp32.predict_proba(CHECK)
    assert (proba.argmax(1) == reference.argmax(1)).all()
    assert np.abs(proba - reference).max() < 1e-4
    assert OnnxCandidates(model, tmp_path).build("int8").predict_proba(CHECK).shape == reference.shape

    def no_export(*args, **kwargs):
        raise AssertionError("a cached export must not be exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = OnnxCandidates(tiny_finetuned(tokenizer), tmp_path).build("fp32")  # same weights: same files
    assert np.allclose(again.predict_proba(CHECK), proba)
    assert len(list(tmp_path.iterdir())) == 1


def test_an_onnx_copy_still_samples_mc_dropout_from_torch(tokenizer, tmp_path):
    model = tiny_finetuned(tokenizer, hidden_dropout_prob=0.5)
    served = OnnxCandidates(model, tmp_path).build("fp32")
    mc = served.stochastic_proba(TEXTS, 4, seed=1)
    assert mc.std(axis=0).max() > 1e-3  # real dropout, not four copies of one deterministic answer
    assert np.allclose(mc, model.stochastic_proba(TEXTS, 4, seed=1))
    assert not served.model.training


def test_the_embedding_head_kind_accelerates_its_encoder(tokenizer, tmp_path):
    model = tiny_embedding_head(tokenizer)
    shared = model.encoder.model
    served = OnnxCandidates(model, tmp_path).build("fp32")
    assert model.encoder.model is shared  # the process-wide encoder is not touched
    assert np.abs(served.embed(CHECK) - model.embed(CHECK)).max() < 1e-4
    assert (served.predict_proba(CHECK).argmax(1) == model.predict_proba(CHECK).argmax(1)).all()


# --- /health --------------------------------------------------------------------------------------


class TinySource:
    model_name = "labelloop-hate-offensive"

    def __init__(self, classifier):
        self.classifier = classifier

    def current_version(self) -> int:
        return 1

    def load(self, version: int) -> LoadedModel:
        return LoadedModel(ModelRef(self.model_name, version), self.classifier)

    def aliases(self) -> dict[str, int]:
        return {"champion": 1}

    def versions(self) -> list[int]:
        return [1]

    def check_texts(self, limit: int) -> list[str]:
        return CHECK[:limit]


def test_health_reports_the_chosen_path_and_why(tokenizer, tmp_path, monkeypatch):
    from serving.app import create_app

    real_measure = quantize.measure

    def slow_onnx_int8(options, *args, **kwargs):  # fixes which path wins, whatever the machine's load
        trials, built = real_measure(options, *args, **kwargs)
        speeds = {TORCH_FP32: 100.0, "torch-int8": 150.0, "onnx-fp32": 300.0, "onnx-int8": 200.0,
                  "onnx-int8+fallback": 250.0}
        return [Trial(t.path, t.agreement, speeds[t.path], t.error) for t in trials], built

    monkeypatch.setattr(quantize, "measure", slow_onnx_int8)
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", quantize="auto", poll_seconds=0,
                        basic_user=None, basic_password=None, api_token=None, device="cpu")
    app = create_app(settings, model_source=TinySource(tiny_finetuned(tokenizer)))
    with TestClient(app) as client:
        health = client.get("/health").json()
        predicted = client.post("/v1/predict", json={"texts": TEXTS[:2]})
    path = health["serving_path"]
    assert health["precision"] == "onnx-fp32" and path["chosen"] == "onnx-fp32"
    assert [c["path"] for c in path["candidates"]] == [TORCH_FP32, "torch-int8", "onnx-fp32", "onnx-int8",
                                                        "onnx-int8+fallback"]
    assert all(c["agreement"] is not None for c in path["candidates"])
    assert "300 texts/s" in path["reason"] and path["check_texts"] == len(CHECK)
    assert predicted.status_code == 200
    assert list((settings.cache_dir / "onnx").iterdir())  # exported under the cache, for the next start


class SourceWithoutCheckTexts(TinySource):
    def check_texts(self, limit: int) -> list[str]:
        raise ConnectionError("MLflow went away between the load and the check")


def test_unreadable_check_texts_still_serve_the_loaded_champion_in_fp32(tokenizer, tmp_path):
    from serving.app import create_app

    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", quantize="auto", poll_seconds=0,
                        basic_user=None, basic_password=None, api_token=None, device="cpu")
    app = create_app(settings, model_source=SourceWithoutCheckTexts(tiny_finetuned(tokenizer)))
    with TestClient(app) as client:
        health = client.get("/health").json()
        predicted = client.post("/v1/predict", json={"texts": TEXTS[:2]})
    assert health["model_loaded"] and health["champion_error"] is None
    assert health["serving_path"]["chosen"] == TORCH_FP32 and predicted.status_code == 200


# --- remembered speeds (fast mode: a new head each round over the same encoder) ------------------


def test_memo_order_rechecks_only_faster_candidates_fastest_first():
    speeds = {TORCH_FP32: 100.0, "torch-int8": 90.0, "onnx-fp32": 180.0, "onnx-int8": 250.0}
    assert quantize.memo_order(speeds) == ["onnx-int8", "onnx-fp32"]
    assert quantize.memo_order(speeds | {"onnx-int8": None}) == ["onnx-fp32"]  # failed before: not retried
    assert quantize.memo_order({TORCH_FP32: 100.0, "torch-int8": 90.0}, preferred="torch-int8") == ["torch-int8"]
    assert quantize.memo_order({TORCH_FP32: 300.0, "onnx-fp32": 200.0}) == []


class CountingLength(LengthClassifier):
    """A toy whose calls are counted, standing for one way of running a champion."""

    def __init__(self, cut: int):
        super().__init__(cut=cut)
        self.calls: list[int] = []

    def predict_proba(self, texts, batch_size=64, progress=None):
        self.calls.append(len(texts))
        return super().predict_proba(texts, batch_size, progress)


class FakeChampion:
    """Candidates for one champion: ``heads`` maps a path to the cut its copy decides with."""

    def __init__(self, reference_cut: int, heads: dict[str, int]):
        self.models = {TORCH_FP32: CountingLength(reference_cut)} | {p: CountingLength(c) for p, c in heads.items()}
        self.built: list[str] = []

    def options(self) -> list[Candidate]:
        def build(path):
            self.built.append(path)
            return self.models[path]

        return [Candidate(path, lambda path=path: build(path)) for path in self.models]


def fake_speeds(measure_calls: list[int]):
    def fixed(options, check_texts, timing_texts, batchings, outputs=None):
        measure_calls.append(1)
        trials, built = measure(options, check_texts, timing_texts, batchings, outputs)
        speeds = {TORCH_FP32: 100.0, "torch-int8": 150.0, "onnx-fp32": 200.0, "onnx-int8": 300.0}
        return [Trial(t.path, t.agreement, speeds[t.path], t.error) for t in trials], built

    return fixed


@pytest.fixture
def one_encoder(monkeypatch):
    """Every champion here shares one accelerated module; ``use`` picks the champion's candidates."""
    measure_calls: list[int] = []
    current: dict[str, FakeChampion] = {}
    monkeypatch.setattr(quantize, "measure", fake_speeds(measure_calls))
    monkeypatch.setattr(quantize, "candidates", lambda classifier, mode, cache_dir: current["c"].options())
    monkeypatch.setattr(quantize, "_memo_key", lambda classifier, batch_size: ("encoder-abc", "cpu", batch_size))

    def use(champion: FakeChampion):
        current["c"] = champion
        return champion.models[TORCH_FP32]

    return use, measure_calls


def test_a_second_champion_over_the_same_module_rechecks_agreement_without_timing(one_encoder, tmp_path):
    use, measure_calls = one_encoder
    first = FakeChampion(20, {"torch-int8": 20, "onnx-fp32": 20, "onnx-int8": 20})
    served, choice = choose_for_serving(use(first), "auto", CHECK, tmp_path)
    assert choice.chosen == "onnx-int8" and choice.speeds_from == "measured" and len(measure_calls) == 1

    # the next round's head disagrees in its int8 copy: the guard must catch it, with no timing run
    second = FakeChampion(20, {"torch-int8": 20, "onnx-fp32": 20, "onnx-int8": 0})
    served, choice = choose_for_serving(use(second), "auto", CHECK, tmp_path)
    assert len(measure_calls) == 1  # nothing timed again
    assert choice.speeds_from == "memo" and choice.chosen == "onnx-fp32" and served is second.models["onnx-fp32"]
    assert second.built == [TORCH_FP32, "onnx-int8", "onnx-fp32"]  # fastest first, stopped at the first pass
    assert all(calls == [len(CHECK)] for calls in (second.models[p].calls for p in second.built))
    by_path = {c["path"]: c for c in choice.as_dict()["candidates"]}
    assert by_path["onnx-int8"]["agreement"] < MIN_AGREEMENT and by_path["onnx-fp32"]["agreement"] == 1.0
    assert by_path["torch-int8"]["agreement"] is None and by_path["onnx-fp32"]["texts_per_s"] == 200.0
    assert "remembered" in choice.reason and "encoder-abc" in choice.reason


def test_when_no_remembered_faster_candidate_passes_everything_is_measured_again(one_encoder, tmp_path):
    use, measure_calls = one_encoder
    choose_for_serving(use(FakeChampion(20, {"torch-int8": 20, "onnx-fp32": 20, "onnx-int8": 20})), "auto",
                       CHECK, tmp_path)
    refused = FakeChampion(20, {"torch-int8": 0, "onnx-fp32": 0, "onnx-int8": 0})
    served, choice = choose_for_serving(use(refused), "auto", CHECK, tmp_path)
    assert len(measure_calls) == 2 and choice.speeds_from == "measured"
    assert choice.chosen == TORCH_FP32 and served is refused.models[TORCH_FP32]


def test_a_different_device_or_module_is_measured_not_remembered(one_encoder, tmp_path, monkeypatch):
    use, measure_calls = one_encoder
    heads = {"torch-int8": 20, "onnx-fp32": 20, "onnx-int8": 20}
    choose_for_serving(use(FakeChampion(20, heads)), "auto", CHECK, tmp_path)
    monkeypatch.setattr(quantize, "_memo_key", lambda classifier, batch_size: ("encoder-abc", "cuda:0", batch_size))
    _, choice = choose_for_serving(use(FakeChampion(20, heads)), "auto", CHECK, tmp_path)
    assert len(measure_calls) == 2 and choice.speeds_from == "measured"


def _other_head(model):
    """The same frozen encoder under a head trained on other labels: the next active-learning round."""
    from sklearn.linear_model import LogisticRegression

    texts = [f"other {i} " + "z " * (i % 5) for i in range(12)]
    clone = copy.copy(model)
    clone.head = LogisticRegression().fit(model.embed(texts), [(i // 2) % 3 for i in range(12)])
    return clone


def test_a_real_fast_mode_champion_with_a_new_head_skips_timing_and_still_checks_agreement(
        tokenizer, tmp_path, monkeypatch):
    real_measure = quantize.measure

    def onnx_fp32_fastest(options, *args, **kwargs):  # a real measurement, its speeds fixed so the
        trials, built = real_measure(options, *args, **kwargs)  # remembered order is machine-independent
        speeds = {TORCH_FP32: 100.0, "torch-int8": 150.0, "onnx-fp32": 300.0, "onnx-int8": 200.0}
        return [Trial(t.path, t.agreement, speeds[t.path], t.error) for t in trials], built

    monkeypatch.setattr(quantize, "measure", onnx_fp32_fastest)
    first = tiny_embedding_head(tokenizer)
    _, choice = choose_for_serving(first, "auto", CHECK, tmp_path)
    assert choice.speeds_from == "measured" and choice.chosen == "onnx-fp32"

    def no_timing(*args, **kwargs):
        raise AssertionError("a champion over a remembered encoder must not be timed again")

    monkeypatch.setattr(quantize, "measure", no_timing)
    checked: list[str] = []
    real_labels = quantize._labels
    monkeypatch.setattr(quantize, "_labels", lambda model, *args: checked.append(model.precision)
                        or real_labels(model, *args))
    second = _other_head(tiny_embedding_head(tokenizer))
    expected = second.predict_proba(CHECK).argmax(1)
    assert not np.allclose(second.predict_proba(CHECK), first.predict_proba(CHECK))
    encoder_runs: list[int] = []
    real_embed = type(second.encoder).embed
    monkeypatch.setattr(type(second.encoder), "embed", lambda self, texts, *a, **k: encoder_runs.append(len(texts))
                        or real_embed(self, texts, *a, **k))
    served, again = choose_for_serving(second, "auto", CHECK, tmp_path)
    assert not encoder_runs  # the check texts' embeddings per path were kept from the first load
    assert again.speeds_from == "memo" and again.chosen == "onnx-fp32" and served.precision == "onnx-fp32"
    assert checked == ["fp32", "onnx-fp32"]  # the reference and the fastest remembered path, on this head
    chosen = next(c for c in again.as_dict()["candidates"] if c["path"] == "onnx-fp32")
    assert chosen["agreement"] >= MIN_AGREEMENT and chosen["texts_per_s"] == 300.0
    assert (served.predict_proba(CHECK).argmax(1) == expected).all()


def test_health_says_when_speeds_came_from_the_memo(tokenizer, tmp_path):
    from serving.app import create_app

    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", quantize="auto", poll_seconds=0,
                        basic_user=None, basic_password=None, api_token=None, device="cpu")
    model = tiny_embedding_head(tokenizer)
    for expected in ("measured", "memo"):
        app = create_app(settings, model_source=TinySource(_other_head(model) if expected == "memo" else model))
        with TestClient(app) as client:
            assert client.get("/health").json()["serving_path"]["speeds_from"] == expected


# --- int8 with its near-ties answered by fp32 (issue 15) -------------------------------------------


class Margin(LengthClassifier):
    """P(b) rises with length through 0.5 at ``cut``; ``shift`` moves it as int8's rounding might, and
    ``flip_every`` turns every n-th text's answer around however confident it is. Records the texts asked."""

    def __init__(self, cut: int = 55, shift: float = 0.0, flip_every: int = 0):
        super().__init__(cut=cut)
        self.shift = shift
        self.flip_every = flip_every
        self.asked: list[str] = []

    def predict_proba(self, texts, batch_size=64, progress=None):
        self.asked.extend(texts)
        p = np.clip(0.5 + (np.array([len(t) for t in texts]) - self.cut) / 100 + self.shift, 0, 1)
        if self.flip_every:
            flip = np.array([int(t[1:4]) % self.flip_every == 0 for t in texts])
            p = np.where(flip, 1 - p, p)
        return np.c_[1 - p, p].astype(np.float32)


def fallback_trials(fast: Margin, exact: Margin):
    reference = Margin()
    options = [Candidate(TORCH_FP32, lambda: reference),
               Candidate("onnx-int8", lambda: fast, batch_dependent=True),
               Candidate("onnx-int8+fallback", lambda: NearTieFallback(fast, exact, FALLBACK_BAND),
                         batch_dependent=True)]
    trials, built = measure(options, SPREAD, SPREAD[:8], BATCHINGS)
    return {t.path: t for t in trials}, built


def test_int8_whose_flips_are_near_ties_is_refused_alone_and_served_with_the_fallback():
    by_path, _ = fallback_trials(Margin(shift=0.03), Margin())
    assert by_path["onnx-int8"].agreement < MIN_AGREEMENT and not by_path["onnx-int8"].passed
    fallback = by_path["onnx-int8+fallback"]
    assert fallback.agreement == 1.0 and fallback.batch_dependent and fallback.passed
    assert choose_path(list(by_path.values()), len(SPREAD)).chosen in ("onnx-int8+fallback", TORCH_FP32)


def test_int8_whose_flips_are_confident_is_refused_even_with_the_fallback():
    by_path, _ = fallback_trials(Margin(flip_every=25), Margin())
    assert not by_path["onnx-int8+fallback"].passed
    assert by_path["onnx-int8+fallback"].agreement < MIN_AGREEMENT  # only the flipped near-ties are saved
    assert choose_path(list(by_path.values()), len(SPREAD)).chosen == TORCH_FP32


def test_exactly_the_near_ties_are_rerun_on_fp32():
    fast, exact = Margin(shift=0.03), Margin()
    served = NearTieFallback(fast, exact, FALLBACK_BAND)
    proba = served.predict_proba(SPREAD, 16)
    int8 = fast.predict_proba(SPREAD, 16)
    expected = [t for t, row in zip(SPREAD, int8, strict=True) if abs(row[1] - row[0]) < FALLBACK_BAND]
    assert 0 < len(expected) < len(SPREAD) and exact.asked == expected
    rerun = np.isin(SPREAD, expected)
    assert np.array_equal(proba[rerun], exact.predict_proba(expected)) and np.array_equal(proba[~rerun], int8[~rerun])
    assert served.precision == "fp32+fallback" and served.frozen_encoder is None


def test_near_ties_of_a_multi_label_model_are_labels_close_to_their_thresholds():
    proba = np.array([[0.9, 0.1], [0.62, 0.1], [0.9, 0.35], [0.5, 0.5]])
    assert near_ties(proba, 0.05, np.array([0.6, 0.3])).tolist() == [False, True, True, False]
    assert near_ties(proba, 0.05).tolist() == [False, False, False, True]  # single-label: the top two


class Broken(LengthClassifier):
    def predict_proba(self, texts, batch_size=64, progress=None):
        raise RuntimeError("fp32 session failed")


def test_a_failing_fp32_session_only_removes_the_fallback_candidate():
    by_path, built = fallback_trials(Margin(shift=0.03), Broken())
    assert by_path["onnx-int8+fallback"].error == "RuntimeError: fp32 session failed"
    assert "onnx-int8+fallback" not in built and TORCH_FP32 in built


def test_an_fp32_export_that_fails_never_breaks_loading(tokenizer, tmp_path, monkeypatch):
    real_build = OnnxCandidates.build

    def no_fp32(self, which):
        if which == "fp32":
            raise RuntimeError("fp32 session failed")
        return real_build(self, which)

    monkeypatch.setattr(OnnxCandidates, "build", no_fp32)
    model = tiny_finetuned(tokenizer)
    served, choice = choose_for_serving(model, "auto", CHECK, tmp_path)
    errors = {c["path"]: c["error"] for c in choice.as_dict()["candidates"]}
    assert errors["onnx-int8+fallback"] == errors["onnx-fp32"] == "RuntimeError: fp32 session failed"
    assert errors["onnx-int8"] is None and choice.chosen != "onnx-int8+fallback"
    assert served.predict_proba(CHECK[:2]).shape == (2, len(model.labels))


def test_the_fallback_is_not_offered_over_a_frozen_encoder(tokenizer, tmp_path):
    paths = [c.path for c in quantize.candidates(tiny_embedding_head(tokenizer), "auto", tmp_path)]
    assert "onnx-int8" in paths and "onnx-int8+fallback" not in paths
