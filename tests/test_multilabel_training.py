"""Multi-label training (issue 11): sigmoid heads in fast and fine-tune modes, per-label thresholds tuned
on validation data and saved with the model, multi-label metrics, and the gate on a real MLflow store,
on slices of the real ETHOS multi-label data."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from labelloop.config import DEFAULT_BASE_MODEL
from labelloop.taxonomy import Taxonomy
from tests.conftest import SHARED_DATA
from training import finetune as finetune_module
from training.classifier import EmbeddingHeadClassifier, TextClassifier, load_encoder
from training.evaluate import (
    EvalReport,
    MultiLabelEvalReport,
    evaluate,
    evaluate_multilabel,
    evaluate_proba,
    label_matrix,
    plot_confusion,
    report_text,
    score_proba,
    tune_thresholds,
)
from training.fast import EmbeddingCache, UntrainedLabelWarning, fit_head, out_of_fold_proba, train_fast
from training.finetune import FineTuneConfig, finetune, positive_weights
from training.gate import GatePolicy, macro_f1_gain
from training.pyfunc_model import output_frame
from training.train import majority_baseline

ETHOS_FILE = SHARED_DATA / "ethos" / "Ethos_Dataset_Multi_Label.csv.gz"
ETHOS_LABELS = ("violence", "directed", "gender", "race", "national_origin", "disability", "religion",
                "sexual_orientation")
ETHOS = Taxonomy("ethos_targets", "What does this hateful comment target?", ETHOS_LABELS, ETHOS_LABELS,
                 multi=True, none_label="none")


def read_ethos() -> pd.DataFrame:
    """ETHOS multi-label as a labelloop frame: a label applies where at least half of the annotators
    chose it (the file holds those fractions, one column per label)."""
    raw = pd.read_csv(ETHOS_FILE, sep=";").rename(columns={"comment": "text",
                                                          "directed_vs_generalized": "directed"})
    raw = raw.drop_duplicates("text").reset_index(drop=True)
    on = raw[list(ETHOS_LABELS)].to_numpy() >= 0.5
    return pd.DataFrame({"id": [f"ethos-{i}" for i in range(len(raw))], "text": raw["text"],
                         "label": [ETHOS.decode(row) for row in on]})


@pytest.fixture(scope="module")
def ethos() -> dict[str, pd.DataFrame]:
    """Disjoint train (240) / validation (60) / test (the rest, ~130) rows, shuffled once."""
    frame = read_ethos().sample(frac=1.0, random_state=0).reset_index(drop=True)
    return {"train": frame.iloc[:240], "validation": frame.iloc[240:300], "test": frame.iloc[300:]}


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(DEFAULT_BASE_MODEL, 64)


@pytest.fixture(scope="module")
def cache(embedding_cache_dir, encoder) -> EmbeddingCache:
    return EmbeddingCache(embedding_cache_dir / "embeddings", encoder)


@pytest.fixture(scope="module")
def fast_model(ethos, encoder, cache) -> EmbeddingHeadClassifier:
    return train_fast(ethos["train"], ETHOS, encoder=encoder, cache=cache, seed=13)


# ------------------------------------------------------------------------------------------------
# Thresholds and metrics, by hand
# ------------------------------------------------------------------------------------------------


def test_thresholds_maximise_each_labels_f1_between_scores():
    proba = np.array([[0.90, 0.8, 0.2],
                      [0.35, 0.7, 0.1],
                      [0.30, 0.6, 0.3],
                      [0.10, 0.2, 0.4]])
    y = np.array([[1, 1, 0],
                  [1, 0, 0],
                  [0, 1, 0],
                  [0, 1, 0]])
    thresholds = tune_thresholds(proba, y)
    # label 0: keeping 0.90 and 0.35 is perfect; the cut lies halfway to the next score below, 0.30
    assert thresholds[0] == pytest.approx(0.325)
    # label 1: every item positive is best (F1 6/7); halfway between the lowest score and 0
    assert thresholds[1] == pytest.approx(0.1)
    # label 2: no positives, nothing to tune on
    assert thresholds[2] == 0.5
    # a label the model scores 0 everywhere (never trained on) is not chosen for everything
    assert tune_thresholds(np.zeros((4, 1)), y[:, :1])[0] == 0.5
    assert tune_thresholds(np.array([[0.0], [0.0], [0.4], [0.0]]), y[:, 1:2])[0] == pytest.approx(0.2)
    decided = (proba >= thresholds).astype(int)
    assert decided[:, 0].tolist() == [1, 1, 0, 0]


def test_threshold_ties_go_to_the_lowest_cut():
    proba = np.array([[0.8], [0.6], [0.4], [0.2]])
    y = np.array([[1], [0], [1], [0]])
    # cuts: 0.8 -> F1 2/3; 0.6 -> P 1/2 R 1/2 F1 1/2; 0.4 -> P 2/3 R 1 F1 4/5; 0.2 -> P 1/2 R 1 F1 2/3
    assert tune_thresholds(proba, y)[0] == pytest.approx(0.3)
    tied = np.array([[0.9], [0.7], [0.5], [0.3]])
    y_tied = np.array([[1], [0], [0], [1]])
    # 0.9 -> F1 2/3 ; 0.3 (all positive) -> P 1/2 R 1 F1 2/3: equal, the lower cut wins
    assert tune_thresholds(tied, y_tied)[0] == pytest.approx(0.15)


def test_multilabel_metrics_on_a_hand_checked_case(tmp_path):
    y = np.array([[1, 0, 1],
                  [0, 1, 0],
                  [1, 1, 0],
                  [0, 0, 0]])
    proba = np.array([[0.9, 0.1, 0.7],   # {a, c}: exact
                      [0.2, 0.2, 0.6],   # {c}: misses b, c is a false positive
                      [0.8, 0.9, 0.1],   # {a, b}: exact
                      [0.6, 0.1, 0.1]])  # {a}: false positive
    report = evaluate_multilabel(proba, y, ("a", "b", "c"), np.full(3, 0.5))

    assert isinstance(report, MultiLabelEvalReport)
    # a: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8; b: tp 1, fn 1 -> P 1, R 1/2, F1 2/3; c: tp 1, fp 1 -> F1 2/3
    assert report.per_class["a"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report.per_class["b"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert report.per_class["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert report.macro_f1 == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert report.micro_f1 == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))  # tp 4, fp 2, fn 1
    assert report.subset_accuracy == report.accuracy == pytest.approx(0.5)
    assert report.confusion == [[1, 1, 0, 2], [2, 0, 1, 1], [2, 1, 0, 1]]  # per label [tn, fp, fn, tp]

    metrics = report.metrics()
    assert {"macro_f1", "micro_f1", "subset_accuracy", "ece", "precision_a", "recall_b", "f1_c"} <= set(metrics)
    assert metrics["recall_b"] == 0.5

    # through JSON (the registry's report.json) and back, as the right kind of report
    again = EvalReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and isinstance(again, MultiLabelEvalReport)
    assert "micro-F1 0.7273" in report_text(report) and "subset accuracy 0.5000" in report_text(report)
    assert plot_confusion(report, tmp_path / "labels.png").stat().st_size > 5000

    # thresholds move decisions: at 0.65 label a's false positive (0.6) is gone
    assert evaluate_multilabel(proba, y, ("a", "b", "c"), [0.65, 0.5, 0.5]).per_class["a"]["precision"] == 1.0


def test_single_label_reports_keep_their_shape():
    report = evaluate_proba(np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, 1]), ("x", "y", "z"))
    d = report.to_dict()
    assert d["multi_label"] is False and "micro_f1" not in report.metrics()
    old = {k: v for k, v in d.items() if k != "multi_label"}  # a report.json written before multi-label
    assert type(EvalReport.from_dict(old)) is EvalReport and EvalReport.from_dict(old) == report


def test_bad_multilabel_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        evaluate_multilabel(np.zeros((2, 3)), np.zeros((2, 2)), ("a", "b", "c"), np.full(3, 0.5))
    with pytest.raises(ValueError, match="0/1"):
        evaluate_multilabel(np.zeros((2, 2)), np.full((2, 2), 2), ("a", "b"), np.full(2, 0.5))
    with pytest.raises(ValueError, match="not among"):
        label_matrix([("a",), ("zzz",)], ("a", "b"))


def test_positive_weights_follow_label_frequencies():
    y = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(positive_weights(y, "balanced"), [1.0, 3.0, 1.0])
    np.testing.assert_allclose(positive_weights(y, "sqrt"), [1.0, np.sqrt(3.0), 1.0])
    np.testing.assert_allclose(positive_weights(y, "none"), [1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# Fast mode on real ETHOS rows
# ------------------------------------------------------------------------------------------------


def test_fast_multilabel_beats_each_labels_majority_baseline(fast_model, ethos, cache):
    test = ethos["test"]
    y = ETHOS.encode(test["label"])
    proba = fast_model.proba_from_embeddings(cache.get(test["text"].tolist()))
    report = score_proba(fast_model, proba, y)
    name, baseline = majority_baseline(ethos["train"], ETHOS, len(test))
    assert name == "none" and not baseline.any()  # no target is on most ETHOS comments
    base = evaluate_multilabel(baseline.astype(float), y, ETHOS_LABELS, np.full(8, 0.5))

    assert isinstance(report, MultiLabelEvalReport)
    gain = macro_f1_gain(y, baseline, fast_model.decide_ids(proba), 8, GatePolicy())
    assert gain.low > 0.3, (gain, report.text())
    assert gain.estimate == pytest.approx(report.macro_f1 - base.macro_f1)
    for label in ETHOS_LABELS:
        prevalence = y[:, ETHOS_LABELS.index(label)].mean()
        always = 2 * prevalence / (1 + prevalence)  # F1 of predicting the label for every text
        assert report.per_class[label]["f1"] > always + 0.1, (label, report.text())


def test_fast_multilabel_outputs_sigmoids_thresholds_and_label_sets(fast_model, ethos):
    texts = ethos["test"]["text"].tolist()[:30]
    proba = fast_model.predict_proba(texts)
    assert fast_model.multi_label and proba.shape == (30, 8) and proba.dtype == np.float32
    assert not np.allclose(proba.sum(1), 1.0)  # independent per label, not a distribution
    thresholds = fast_model.thresholds
    assert thresholds.shape == (8,) and not np.allclose(thresholds, 0.5)  # tuned
    decided = fast_model.predict(texts)
    assert decided == [tuple(label for label, p, t in zip(ETHOS_LABELS, row, thresholds, strict=True) if p >= t)
                       for row in proba]
    assert all(isinstance(d, tuple) for d in decided) and any(len(d) > 1 for d in decided)
    np.testing.assert_array_equal(fast_model.decide_ids(proba), ETHOS.encode(decided))
    frame = ethos["test"].iloc[:30]
    assert evaluate(fast_model, frame) == evaluate_multilabel(proba, ETHOS.encode(frame["label"]), ETHOS_LABELS,
                                                              thresholds)


def test_fast_multilabel_thresholds_are_tuned_out_of_fold(fast_model, ethos, cache):
    """Each training row is scored by a head fitted without it, and the thresholds are tuned on those
    held-out scores, not on the final head's own (over-confident) in-sample scores."""
    train = ethos["train"]
    x, y = cache.get(train["text"].tolist()), ETHOS.encode(train["label"])
    np.testing.assert_allclose(fast_model.thresholds, tune_thresholds(out_of_fold_proba(x, y, seed=13), y))
    assert not np.allclose(fast_model.thresholds, tune_thresholds(fast_model.proba_from_embeddings(x), y))


def test_a_label_with_no_training_positives_gets_probability_zero_and_a_warning(ethos, encoder, cache):
    train = ethos["train"].assign(label=ethos["train"]["label"].map(
        lambda s: tuple(label for label in s if label != "disability")))
    with pytest.warns(UntrainedLabelWarning, match="'disability'"):
        model = train_fast(train, ETHOS, encoder=encoder, cache=cache, seed=13)
    proba = model.proba_from_embeddings(cache.get(ethos["test"]["text"].tolist()))
    assert (proba[:, ETHOS_LABELS.index("disability")] == 0).all()
    assert proba[:, ETHOS_LABELS.index("race")].max() > 0.5
    assert all("disability" not in s for s in model.decide(proba))


def test_multilabel_training_data_with_no_labels_at_all_is_refused(ethos, encoder, cache):
    empty = ethos["train"].assign(label=[()] * len(ethos["train"]))
    with pytest.raises(ValueError, match="items with and items without"):
        train_fast(empty, ETHOS, encoder=encoder, cache=cache, seed=13)


def test_fast_multilabel_save_load_keeps_thresholds(fast_model, ethos, tmp_path):
    texts = ethos["test"]["text"].tolist()[:8]
    fast_model.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "labelloop.json").read_text())
    assert meta["multi_label"] is True and meta["thresholds"] == pytest.approx(list(fast_model.thresholds))

    loaded = TextClassifier.load(tmp_path / "model")
    assert loaded.multi_label and loaded.labels == ETHOS_LABELS
    np.testing.assert_array_equal(loaded.thresholds, fast_model.thresholds)
    np.testing.assert_allclose(loaded.predict_proba(texts), fast_model.predict_proba(texts), atol=1e-6)
    assert loaded.predict(texts) == fast_model.predict(texts)


def test_an_old_single_label_model_still_loads_as_single_label(ethos, encoder, cache, tmp_path):
    """Models saved before multi-label have no ``multi_label``/``thresholds`` in their meta."""
    labels = ("not_violent", "violent")
    train = ethos["train"]
    y = np.array(["violence" in s for s in train["label"]], dtype=int)
    model = EmbeddingHeadClassifier(encoder, fit_head(cache.get(train["text"].tolist()), y, seed=0), labels)
    model.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "labelloop.json").read_text())
    assert set(meta) == {"kind", "labels", "max_length", "encoder"}  # the pre-multi-label format

    loaded = TextClassifier.load(tmp_path / "old")
    proba = loaded.proba_from_embeddings(cache.get(ethos["test"]["text"].tolist()))
    assert not loaded.multi_label
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert loaded.decide(proba) == [labels[i] for i in proba.argmax(1)]
    assert loaded.predict(ethos["test"]["text"].tolist()[:3]) == loaded.decide(proba[:3])
    frame = output_frame(loaded, proba)
    assert list(frame.columns) == ["label", "p_not_violent", "p_violent"]


def test_pyfunc_output_of_a_multilabel_model(fast_model, ethos):
    texts = ethos["test"]["text"].tolist()[:5]
    frame = output_frame(fast_model, fast_model.predict_proba(texts))
    assert list(frame.columns) == ["labels", *(f"p_{label}" for label in ETHOS_LABELS)]
    assert frame["labels"].tolist() == [list(s) for s in fast_model.predict(texts)]


# ------------------------------------------------------------------------------------------------
# Fine-tuning
# ------------------------------------------------------------------------------------------------


def test_tiny_multilabel_finetune_gives_sigmoids_and_tuned_thresholds(ethos, tiny_bert, tmp_path):
    config = FineTuneConfig(base_model=tiny_bert, max_length=32, epochs=1, batch_size=16, lr=1e-3, seed=3)
    result = finetune(ethos["train"].iloc[:96], ethos["validation"], ETHOS, config)
    clf = result.classifier
    assert clf.multi_label and clf.model.config.problem_type == "multi_label_classification"
    texts = ethos["test"]["text"].tolist()[:12]
    proba = clf.predict_proba(texts)

    batch = clf.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.sigmoid(clf.model(**batch).logits).numpy()
    np.testing.assert_allclose(proba, expected, atol=1e-5)

    val = ethos["validation"]
    val_proba = clf.predict_proba(val["text"].tolist())
    np.testing.assert_allclose(clf.thresholds, tune_thresholds(val_proba, ETHOS.encode(val["label"])))
    assert result.best_val_macro_f1 == pytest.approx(
        evaluate_multilabel(val_proba, ETHOS.encode(val["label"]), ETHOS_LABELS, clf.thresholds).macro_f1)

    clf.save(tmp_path / "ft")
    loaded = TextClassifier.load(tmp_path / "ft")
    assert loaded.multi_label and loaded.kind == "finetuned"
    np.testing.assert_array_equal(loaded.thresholds, clf.thresholds)
    np.testing.assert_allclose(loaded.predict_proba(texts), proba, atol=1e-5)


def test_multilabel_early_stopping_keeps_the_best_checkpoints_thresholds(monkeypatch, ethos, tiny_bert):
    scores = [0.3, 0.6, 0.5]
    given: list[np.ndarray] = []

    def fake(classifier, texts, y, batch_size, progress):
        classifier.thresholds = np.full(8, 0.1 * (len(given) + 1))
        given.append(classifier.thresholds.copy())
        return scores[len(given) - 1]

    monkeypatch.setattr(finetune_module, "_score_validation", fake)
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=5, batch_size=16, lr=1e-3, patience=1,
                            seed=1)
    result = finetune(ethos["train"].iloc[:32], ethos["validation"], ETHOS, config)
    assert [h["val_macro_f1"] for h in result.history] == scores
    np.testing.assert_allclose(result.classifier.thresholds, given[1])


def test_multilabel_finetune_without_validation_keeps_half_thresholds(ethos, tiny_bert):
    config = FineTuneConfig(base_model=tiny_bert, max_length=16, epochs=1, batch_size=16, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedLabelWarning)  # every ETHOS label occurs in 32 rows
        result = finetune(ethos["train"].iloc[:32], None, ETHOS, config)
    np.testing.assert_array_equal(result.classifier.thresholds, np.full(8, 0.5))


# ------------------------------------------------------------------------------------------------
# Registry and gate on a real MLflow store
# ------------------------------------------------------------------------------------------------


def _write_taxonomy(path) -> str:
    """ETHOS' eight targets as a taxonomy file, which settings.taxonomy can name."""
    labels = "".join(f'\n[[labels]]\nname = "{label}"\ndescription = "Targets {label}"\n' for label in ETHOS_LABELS)
    path.write_text(f'name = "ethos_targets"\ntitle = "{ETHOS.title}"\ntype = "multi"\nnone_label = "none"\n'
                    f"{labels}", encoding="utf-8")
    return str(path)


@pytest.mark.integration
def test_multilabel_models_register_and_the_gate_runs_on_cached_predictions(settings, ethos, tmp_path, monkeypatch):
    from labelloop.taxonomy import get_taxonomy
    from training.registry import CHAMPION, Registry
    from training.train import train_and_register

    # macro-F1 alone decides here: the recall rule has its own tests in test_gate.py
    settings = settings.model_copy(update={"taxonomy": _write_taxonomy(tmp_path / "ethos_targets.toml"),
                                           "gate_max_recall_drop": 1.0})
    taxonomy = get_taxonomy(settings.taxonomy)
    assert taxonomy.multi and taxonomy.labels == ETHOS_LABELS
    train, test = ethos["train"], ethos["test"]
    weak_rows = train.iloc[:12].reset_index(drop=True)

    weak = train_and_register(weak_rows, None, taxonomy, mode="fast", settings=settings, source="ethos",
                              eval_frame=test)
    assert isinstance(weak.report, MultiLabelEvalReport)
    registry = Registry(settings)
    eval_id, frozen = registry.eval_set()
    assert frozen["label"].tolist() == test["label"].tolist()  # label sets survive the parquet round trip
    assert registry.promote().promoted

    strong = train_and_register(train, ethos["validation"], taxonomy, mode="fast", settings=settings,
                                source="ethos", eval_frame=test)
    assert strong.report.macro_f1 > weak.report.macro_f1
    assert strong.beats_majority and strong.majority_label == "none"

    # the gate reads both versions' cached predictions: it must not load either model
    monkeypatch.setattr(Registry, "load", lambda *a, **k: pytest.fail("the gate loaded a model"))
    decision = Registry(settings).promote()
    assert decision.candidate == strong.ref.version
    assert re.search(r"macro-F1 [+-]0\.\d{4} \[", decision.reason), decision.reason
    assert decision.candidate_metrics["macro_f1"] == pytest.approx(strong.report.macro_f1, abs=1e-5)
    assert decision.promoted, decision.reason  # 240 labelled rows against 12: a gain beyond noise
    assert Registry(settings).alias_version(CHAMPION) == strong.ref.version
    monkeypatch.undo()

    # the cached predictions are label sets, and the registered model serves them through pyfunc
    import mlflow

    mv = registry.client.get_model_version(registry.name, str(strong.ref.version))
    local = registry.client.download_artifacts(mv.run_id, mv.tags[f"eval_predictions.{eval_id}"], str(tmp_path))
    cached = pd.read_parquet(local)
    decided = [tuple(json.loads(s)) for s in cached["label"]]
    assert decided[:20] == registry.load(strong.ref.version).classifier.predict(test["text"].tolist()[:20])

    # a version without cached predictions is evaluated again, as label sets, and cached
    registry.client.delete_model_version_tag(registry.name, str(weak.ref.version), f"eval_predictions.{eval_id}")
    again = registry._eval_outcome(weak.ref.version, eval_id, frozen)
    assert all(isinstance(s, tuple) for s in again.predicted)
    assert again.metrics["macro_f1"] == pytest.approx(weak.report.macro_f1, abs=1e-5)
    assert f"eval_predictions.{eval_id}" in registry.client.get_model_version(registry.name,
                                                                               str(weak.ref.version)).tags
    out = mlflow.pyfunc.load_model(f"models:/{registry.name}/{strong.ref.version}").predict(
        pd.DataFrame({"text": test["text"].tolist()[:4]}))
    assert [tuple(labels) for labels in out["labels"]] == decided[:4]
