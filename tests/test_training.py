"""Fine-tuning, fast mode and evaluation, on small slices of the real Davidson data."""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pandas as pd
import pytest

from labelloop.config import DEFAULT_BASE_MODEL
from labelloop.data import LabeledData
from training import finetune as finetune_module
from training.classifier import TextClassifier, load_encoder
from training.evaluate import (
    EvalReport,
    evaluate,
    evaluate_proba,
    expected_calibration_error,
    plot_confusion,
    report_text,
)
from training.fast import EmbeddingCache, fit_head, train_fast
from training.finetune import FineTuneConfig, class_weights, finetune, length_bucketed_batches


def majority_macro_f1(train: pd.DataFrame, test: pd.DataFrame, labels: tuple[str, ...]) -> float:
    majority = train["label"].value_counts().idxmax()
    proba = np.zeros((len(test), len(labels)))
    proba[:, labels.index(majority)] = 1.0
    return evaluate_proba(proba, test["label"].map(labels.index).to_numpy(), labels).macro_f1


@pytest.fixture(scope="module")
def parts(davidson_small: LabeledData) -> dict[str, pd.DataFrame]:
    """Disjoint train (360) / validation (60) / held-out (the remaining ~180) rows of the 600-row slice."""
    frame = davidson_small.frame
    return {"train": frame.iloc[:360], "validation": frame.iloc[360:420], "heldout": frame.iloc[420:]}


@pytest.fixture(scope="module")
def tiny_finetune(parts, davidson_small):
    config = FineTuneConfig(max_length=32, epochs=1, batch_size=8, lr=2e-4, seed=13)
    calls: list[tuple[str, int, int]] = []
    result = finetune(parts["train"], parts["validation"], davidson_small.taxonomy, config,
                      progress=lambda stage, done, total: calls.append((stage, done, total)))
    return result, calls


# ------------------------------------------------------------------------------------------------
# Fine-tuning
# ------------------------------------------------------------------------------------------------


def test_tiny_finetune_beats_majority_and_gives_distributions(tiny_finetune, parts, davidson_small):
    result, _ = tiny_finetune
    labels = davidson_small.taxonomy.labels
    assert result.classifier.labels == labels
    proba = result.classifier.predict_proba(parts["heldout"]["text"].tolist())
    assert proba.shape == (len(parts["heldout"]), len(labels))
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    report = evaluate(result.classifier, parts["heldout"])
    assert report.macro_f1 > majority_macro_f1(parts["train"], parts["heldout"], labels) + 0.05
    assert len(result.history) == 1 and result.best_epoch == 1.0
    assert result.best_val_macro_f1 == pytest.approx(result.history[0]["val_macro_f1"])


def test_finetune_reports_progress_per_step_and_validation(tiny_finetune, parts):
    _, calls = tiny_finetune
    train_calls = [c for c in calls if c[0] == "train"]
    steps = -(-len(parts["train"]) // 8)
    assert [c[1] for c in train_calls] == list(range(1, steps + 1))
    assert all(c[2] == steps for c in train_calls)
    assert ("validate", len(parts["validation"]), len(parts["validation"])) in calls


def test_finetuned_save_load_round_trip(tiny_finetune, parts, tmp_path):
    result, _ = tiny_finetune
    texts = parts["heldout"]["text"].tolist()[:40]
    result.classifier.save(tmp_path / "model")
    loaded = TextClassifier.load(tmp_path / "model")
    assert loaded.kind == "finetuned" and loaded.labels == result.classifier.labels
    np.testing.assert_allclose(loaded.predict_proba(texts), result.classifier.predict_proba(texts), atol=1e-5)


def _scripted_validation(monkeypatch, scores: list[float]) -> list[np.ndarray]:
    """Replace validation scoring with a script; record the head weights each evaluation saw."""
    seen: list[np.ndarray] = []

    def fake(classifier, texts, y, batch_size, progress):
        seen.append(classifier.model.classifier.weight.detach().clone().numpy())
        return scores[len(seen) - 1]

    monkeypatch.setattr(finetune_module, "_score_validation", fake)
    return seen


def test_early_stopping_stops_and_restores_best_epoch(monkeypatch, parts, davidson_small, tiny_bert):
    seen = _scripted_validation(monkeypatch, [0.50, 0.70, 0.60, 0.90, 0.95])
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=5, batch_size=16, lr=1e-3, patience=1,
                            seed=1)
    result = finetune(parts["train"].iloc[:48], parts["validation"], davidson_small.taxonomy, config)

    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]  # stopped after the first drop
    assert result.best_epoch == 2.0 and result.best_val_macro_f1 == 0.70
    restored = result.classifier.model.classifier.weight.detach().numpy()
    np.testing.assert_array_equal(restored, seen[1])
    assert not np.array_equal(restored, seen[2])


def test_patience_and_mid_epoch_evaluation(monkeypatch, parts, davidson_small, tiny_bert):
    seen = _scripted_validation(monkeypatch, [0.40, 0.80, 0.70, 0.60, 0.99])
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=3, batch_size=16, lr=1e-3, patience=2,
                            eval_every=2, seed=1)
    # 64 rows / 16 = 4 steps per epoch: evaluations at epochs 0.5, 1.0, 1.5, 2.0, ...
    result = finetune(parts["train"].iloc[:64], parts["validation"], davidson_small.taxonomy, config)

    assert [h["epoch"] for h in result.history] == [0.5, 1.0, 1.5, 2.0]
    assert result.best_epoch == 1.0 and result.best_val_macro_f1 == 0.80
    np.testing.assert_array_equal(result.classifier.model.classifier.weight.detach().numpy(), seen[1])


def test_time_budget_ends_training_after_a_final_evaluation(monkeypatch, parts, davidson_small, tiny_bert):
    _scripted_validation(monkeypatch, [0.30, 0.20])
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=3, batch_size=16, max_seconds=0, seed=1)
    result = finetune(parts["train"].iloc[:64], parts["validation"], davidson_small.taxonomy, config)
    assert [(h["step"], h["epoch"]) for h in result.history] == [(1, 0.25)]
    assert result.best_epoch == 0.25 and result.best_val_macro_f1 == 0.30


def test_finetune_without_validation_trains_all_epochs(parts, davidson_small, tiny_bert):
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=2, batch_size=16, seed=1)
    result = finetune(parts["train"].iloc[:32], None, davidson_small.taxonomy, config)
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    assert result.best_epoch == 2.0 and np.isnan(result.best_val_macro_f1)


def test_small_data_trains_min_steps_before_early_stopping_may_stop(monkeypatch, parts, davidson_small, tiny_bert):
    """Validation macro-F1 sits on the majority-class plateau for the first evaluations: patience alone
    would stop there, after a handful of steps."""
    _scripted_validation(monkeypatch, [0.29, 0.29, 0.29, 0.29, 0.60, 0.55, 0.50, 0.45])
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=2, batch_size=16, lr=1e-3, patience=1,
                            min_steps=20, seed=1)
    # 64 rows / 16 = 4 steps per epoch: 5 epochs reach 20 steps
    assert finetune_module.planned_epochs(64, config) == 5
    result = finetune(parts["train"].iloc[:64], parts["validation"], davidson_small.taxonomy, config)
    assert [h["step"] for h in result.history] == [4, 8, 12, 16, 20]
    assert result.epochs == 5 and result.best_epoch == 5.0 and result.best_val_macro_f1 == 0.60
    assert finetune_module.planned_epochs(64_000, config) == 2  # large data: the epochs asked for


def test_default_finetune_on_a_small_real_slice_beats_the_majority_class(parts, davidson_small):
    """`labelloop train --limit 300` fine-tuned 20 steps and registered a model that predicted the
    majority class for every text; the default step floor must learn more than that from a few hundred rows."""
    config = FineTuneConfig(max_length=32, min_steps=finetune_module.DEFAULT_MIN_STEPS, seed=13)
    result = finetune(parts["train"], parts["validation"], davidson_small.taxonomy, config)
    report = evaluate(result.classifier, parts["heldout"])
    assert report.macro_f1 > majority_macro_f1(parts["train"], parts["heldout"], davidson_small.taxonomy.labels) + 0.1


def test_finetune_rejects_unknown_labels_and_bad_config(parts, davidson_small):
    bad = parts["train"].iloc[:8].assign(label="spam")
    with pytest.raises(ValueError, match="spam"):
        finetune(bad, None, davidson_small.taxonomy, FineTuneConfig(max_length=16, epochs=1))
    with pytest.raises(ValueError, match="class_weighting"):
        FineTuneConfig(class_weighting="inverse")
    with pytest.raises(ValueError):
        FineTuneConfig(patience=0)


def test_class_weights():
    y = np.array([0] * 10 + [1] * 40 + [2] * 50)
    balanced = class_weights(y, 3, "balanced")
    np.testing.assert_allclose(balanced, [100 / 30, 100 / 120, 100 / 150])
    sqrt = class_weights(y, 3, "sqrt")
    assert sqrt[0] / sqrt[1] == pytest.approx(2.0) and sqrt[1] / sqrt[2] == pytest.approx(np.sqrt(50 / 40))
    for weights in (balanced, sqrt):  # the average weight over examples is 1 under every scheme
        assert (weights[y]).mean() == pytest.approx(1.0)
    np.testing.assert_allclose(class_weights(y, 3, "none"), [1.0, 1.0, 1.0])
    missing = class_weights(np.array([0] * 10 + [1] * 30), 3, "balanced")
    np.testing.assert_allclose(missing, [2.0, 40 / 60, 0.0])


def test_length_bucketed_batches_cover_everything_once_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=1000)
    batches = length_bucketed_batches(lengths, 10, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 5  # random batches of 10 would spread ~50 tokens
    again = length_bucketed_batches(lengths, 10, np.random.default_rng(2))
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # each epoch differs


# ------------------------------------------------------------------------------------------------
# Fast mode
# ------------------------------------------------------------------------------------------------


class CountingEncoder:
    """Deterministic stand-in for :class:`Encoder` that counts the texts it embeds."""

    def __init__(self, name: str = "fake-encoder", max_length: int = 32, dim: int = 8):
        self.name, self.max_length, self.dim = name, max_length, dim
        self.embedded: list[str] = []
        self._lock = threading.Lock()

    def embed(self, texts, batch_size=64, progress=None):
        with self._lock:
            self.embedded.extend(texts)
        vectors = [np.random.default_rng(list(hashlib.sha1(t.encode()).digest())).normal(size=self.dim)
                   for t in texts]
        return np.array(vectors, dtype=np.float32).reshape(len(texts), self.dim)


def test_cache_embeds_each_text_once_and_persists(tmp_path):
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path, encoder)
    first = cache.get(["a", "b", "a", "c"])
    assert sorted(encoder.embedded) == ["a", "b", "c"]
    np.testing.assert_array_equal(first[0], first[2])

    second = cache.get(["c", "b", "d"])
    assert sorted(encoder.embedded) == ["a", "b", "c", "d"]  # only "d" was new
    np.testing.assert_array_equal(second[:2], first[[3, 1]])

    reopened = EmbeddingCache(tmp_path, CountingEncoder())
    np.testing.assert_array_equal(reopened.get(["d", "a"]), cache.get(["d", "a"]))
    assert reopened.encoder.embedded == [] and len(reopened) == 4
    assert cache.get([]).shape == (0, encoder.dim)


def test_cache_is_keyed_by_encoder_and_max_length(tmp_path):
    EmbeddingCache(tmp_path, CountingEncoder()).get(["x"])
    other_length = CountingEncoder(max_length=64)
    other_name = CountingEncoder(name="other")
    EmbeddingCache(tmp_path, other_length).get(["x"])
    EmbeddingCache(tmp_path, other_name).get(["x"])
    assert other_length.embedded == ["x"] and other_name.embedded == ["x"]


def test_cache_concurrent_gets_embed_once(tmp_path):
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path, encoder)
    texts = [f"text {i}" for i in range(200)]
    results: list[np.ndarray] = []

    def work(offset: int) -> None:
        results.append(cache.get(texts[offset:] + texts[:offset]))

    threads = [threading.Thread(target=work, args=(k * 25,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(encoder.embedded) == 200
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, CountingEncoder()).get(texts), cache.get(texts))


def test_train_fast_uses_cache_and_handles_missing_class(tmp_path, davidson_small):
    taxonomy = davidson_small.taxonomy
    rows = davidson_small.frame[davidson_small.frame["label"] != "hate"].iloc[:80]
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path, encoder)
    classifier = train_fast(rows, taxonomy, encoder=encoder, cache=cache)
    train_fast(rows, taxonomy, encoder=encoder, cache=cache, C=0.5)  # retrain: all cache hits
    assert len(encoder.embedded) == rows["text"].nunique()

    proba = classifier.predict_proba(rows["text"].tolist()[:10])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert (proba[:, taxonomy.index("hate")] == 0).all()
    with pytest.raises(ValueError, match="different encoder"):
        train_fast(rows, taxonomy, encoder=CountingEncoder(), cache=cache)


def test_fit_head_needs_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        fit_head(np.zeros((4, 3)), np.array([1, 1, 1, 1]), seed=0)


def test_fast_mode_with_real_encoder_beats_majority(parts, davidson_small, tmp_path):
    encoder = load_encoder(DEFAULT_BASE_MODEL, 32)
    classifier = train_fast(parts["train"], davidson_small.taxonomy, encoder=encoder,
                            cache=EmbeddingCache(tmp_path, encoder))
    report = evaluate(classifier, parts["heldout"])
    assert report.macro_f1 > majority_macro_f1(parts["train"], parts["heldout"], classifier.labels) + 0.05
    classifier.save(tmp_path / "fast")
    loaded = TextClassifier.load(tmp_path / "fast")
    texts = parts["heldout"]["text"].tolist()[:20]
    np.testing.assert_allclose(loaded.predict_proba(texts), classifier.predict_proba(texts), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------

LABELS = ("hate", "offensive", "neither")


def hand_example() -> EvalReport:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    proba = np.full((6, 3), 0.1)
    proba[np.arange(6), y_pred] = 0.8
    return evaluate_proba(proba, y_true, LABELS)


def test_evaluate_proba_matches_hand_computed_metrics():
    report = hand_example()
    # hate: P 1/2 R 1/2; offensive: P 2/3 R 1 -> F1 0.8; neither: P 1 R 1/2 -> F1 2/3
    assert report.per_class["hate"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2.0}
    assert report.per_class["offensive"]["f1"] == pytest.approx(0.8)
    assert report.per_class["neither"]["precision"] == 1.0
    assert report.per_class["neither"]["f1"] == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # all confidences 0.8, accuracy 4/6
    assert report.ece == pytest.approx(0.8 - 4 / 6)


def test_eval_report_flat_metrics_and_round_trip():
    report = hand_example()
    metrics = report.metrics()
    assert metrics["macro_f1"] == report.macro_f1 and metrics["recall_offensive"] == 1.0
    assert set(metrics) == {"macro_f1", "accuracy", "ece"} | {
        f"{m}_{label}" for m in ("precision", "recall", "f1") for label in LABELS}
    assert EvalReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_evaluate_proba_rejects_mismatched_input():
    with pytest.raises(ValueError, match="shape"):
        evaluate_proba(np.ones((3, 2)), np.array([0, 1, 2]), LABELS)
    with pytest.raises(ValueError, match="label ids"):
        evaluate_proba(np.ones((2, 3)) / 3, np.array([0, 5]), LABELS)


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    n = 10_000
    confidence = rng.uniform(0.4, 1.0, size=n)
    correct = rng.uniform(size=n) < confidence  # right exactly as often as claimed
    y_true = np.where(correct, 0, 1)
    proba = np.column_stack([confidence, 1 - confidence])
    assert expected_calibration_error(proba, y_true) < 0.02

    overconfident = np.tile([0.99, 0.01], (n, 1))
    y_half = np.arange(n) % 2  # right half the time
    assert expected_calibration_error(overconfident, y_half) == pytest.approx(0.49)


def test_plot_confusion_and_report_text(tmp_path):
    report = hand_example()
    path = plot_confusion(report, tmp_path / "plots" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report_text(report)
    assert all(label in text for label in LABELS) and f"{report.macro_f1:.4f}" in text


def test_evaluate_rejects_labels_the_classifier_does_not_know(tiny_finetune, parts):
    result, _ = tiny_finetune
    with pytest.raises(ValueError, match="spam"):
        evaluate(result.classifier, parts["heldout"].iloc[:3].assign(label="spam"))

