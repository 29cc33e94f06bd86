"""Classifier kinds: one class per kind, found by ``TextClassifier.load`` through the kind registry, and
the per-kind behaviour (device placement, int8 copies, stochastic predictions) as methods, not type checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

from labelloop.config import Settings
from training.classifier import (
    META_FILE,
    EmbeddingHeadClassifier,
    FineTunedClassifier,
    TextClassifier,
    resolve_device,
    resolve_model_path,
)


class LengthClassifier(TextClassifier):
    """A toy kind: long texts are "b". Defining this class is all it takes to make it loadable."""

    kind = "toy_length"

    def __init__(self, labels=("a", "b"), cut: int = 10):
        self.labels = tuple(labels)
        self.max_length = 16
        self.cut = cut

    def predict_proba(self, texts, batch_size=64, progress=None):
        p = np.array([float(len(t) > self.cut) for t in texts], dtype=np.float32)
        return np.c_[1 - p, p]

    def embed(self, texts, batch_size=64, progress=None):
        return np.array([[len(t)] for t in texts], dtype=np.float32)

    def _save_weights(self, path: Path) -> dict:
        return {"cut": self.cut}

    @classmethod
    def from_dir(cls, path, meta):
        return cls(meta["labels"], meta["cut"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


def tiny_bert_config(tokenizer, **extra) -> BertConfig:
    return BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, num_labels=3, **extra)


def tiny_finetuned(tokenizer, **extra) -> FineTunedClassifier:
    torch.manual_seed(0)
    return FineTunedClassifier(BertForSequenceClassification(tiny_bert_config(tokenizer, **extra)), tokenizer,
                               ("hate", "offensive", "neither"), 16)


class TinyEncoder:
    """A real (tiny, random) BERT as the frozen encoder of an embedding-head model."""

    def __init__(self, tokenizer):
        from training.classifier import Encoder

        torch.manual_seed(1)
        self.inner = Encoder.__new__(Encoder)
        self.inner.name, self.inner.tokenizer, self.inner.max_length = "tiny", tokenizer, 16
        self.inner.model = BertModel(tiny_bert_config(tokenizer), add_pooling_layer=False).eval()


def tiny_embedding_head(tokenizer) -> EmbeddingHeadClassifier:
    encoder = TinyEncoder(tokenizer).inner
    texts = [f"text {i} " + "w " * i for i in range(12)]
    head = LogisticRegression().fit(encoder.embed(texts), [i % 3 for i in range(12)])
    return EmbeddingHeadClassifier(encoder, head, ("hate", "offensive", "neither"))


TEXTS = ["you are great", "some words here", "a b c d e f", "short", "a much longer text than the others here"]


def test_a_new_kind_is_one_class_and_loads_through_the_registry(tmp_path):
    assert TextClassifier.kinds()["toy_length"] is LengthClassifier
    LengthClassifier(cut=4).save(tmp_path / "toy")
    loaded = TextClassifier.load(tmp_path / "toy")
    assert type(loaded) is LengthClassifier and loaded.cut == 4
    assert loaded.predict(["abc", "abcdef"]) == ["a", "b"]


def test_the_built_in_kinds_are_registered():
    kinds = TextClassifier.kinds()
    assert kinds["finetuned"] is FineTunedClassifier and kinds["embedding_head"] is EmbeddingHeadClassifier


def test_an_unknown_kind_is_a_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / META_FILE).write_text(json.dumps({"kind": "quantum", "labels": ["a"], "max_length": 8}))
    with pytest.raises(ValueError, match=r"unknown classifier kind 'quantum' \(known: .*finetuned"):
        TextClassifier.load(tmp_path / "m")


def test_two_classes_cannot_claim_one_kind():
    with pytest.raises(ValueError, match="'toy_length' is already"):
        class Impostor(LengthClassifier):  # noqa: F841
            kind = "toy_length"


def test_a_kind_without_a_transformer_says_so():
    toy = LengthClassifier()
    with pytest.raises(TypeError, match="toy_length classifier has no transformer"):
        toy.quantized_copy()
    with pytest.raises(ValueError, match="no stochastic predictions"):
        toy.stochastic_proba(TEXTS, 3, seed=0)


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("abacus")


def test_the_device_setting_is_checked_when_settings_load():
    assert Settings(device="cuda:0").device == "cuda:0"
    with pytest.raises(ValidationError, match="device"):
        Settings(device="gpu")


def test_to_cpu_moves_the_model_and_keeps_predictions(tokenizer):
    model = tiny_finetuned(tokenizer)
    before = model.predict_proba(TEXTS)
    assert model.to("cpu") is model and model.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in model.model.parameters())
    assert np.allclose(model.predict_proba(TEXTS), before)

    head = tiny_embedding_head(tokenizer)
    before = head.predict_proba(TEXTS)
    assert head.to("auto" if not torch.cuda.is_available() else "cpu").device == torch.device("cpu")
    assert head.encoder.device == torch.device("cpu")
    assert np.allclose(head.predict_proba(TEXTS), before)


def test_quantized_copies_leave_the_original_in_fp32(tokenizer):
    for model in (tiny_finetuned(tokenizer), tiny_embedding_head(tokenizer)):
        int8 = model.quantized_copy()
        assert int8.precision == "int8" and model.precision == "fp32"
        quantized = torch.ao.nn.quantized.dynamic.Linear
        assert any(isinstance(m, quantized) for m in int8.transformer().modules())
        assert not any(isinstance(m, quantized) for m in model.transformer().modules())
        assert int8.predict_proba(TEXTS).shape == (len(TEXTS), 3)


def test_stochastic_predictions_per_kind(tokenizer):
    finetuned = tiny_finetuned(tokenizer, hidden_dropout_prob=0.5)
    mc = finetuned.stochastic_proba(TEXTS, 4, seed=1)
    assert mc.shape == (4, len(TEXTS), 3) and mc.std(axis=0).max() > 1e-3
    assert not finetuned.model.training

    head = tiny_embedding_head(tokenizer)
    with pytest.raises(ValueError, match="needs the labeled set"):
        head.stochastic_proba(TEXTS, 4, seed=1)
    labeled_texts = [f"text {i} " + "w " * i for i in range(12)]
    labeled = (head.embed(labeled_texts), np.array([i % 3 for i in range(12)]))
    committee = head.stochastic_proba(TEXTS, 4, seed=1, labeled=lambda: labeled)
    assert committee.shape == (4, len(TEXTS), 3)
    assert np.allclose(committee.sum(-1), 1.0, atol=1e-5)


def test_mc_dropout_never_switches_the_shared_model_to_train_mode(tokenizer):
    """Active learning samples MC dropout from the very classifier serving answers with; serving's thread
    must never see that module in train mode (its predictions would carry dropout noise)."""
    finetuned = tiny_finetuned(tokenizer, hidden_dropout_prob=0.5)
    shared = finetuned.model
    seen_while_sampling = []
    shared.register_forward_pre_hook(lambda module, args: seen_while_sampling.append(shared.training))
    mc = finetuned.stochastic_proba(TEXTS, 3, seed=1)
    assert seen_while_sampling and not any(seen_while_sampling)
    assert mc.std(axis=0).max() > 1e-3  # the private copy did sample dropout


def test_mc_dropout_of_a_multi_label_model_gives_per_label_sigmoids(tokenizer):
    finetuned = tiny_finetuned(tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    finetuned.multi_label = True
    mc = finetuned.stochastic_proba(TEXTS, 2, seed=0)
    assert np.allclose(mc[0], finetuned.predict_proba(TEXTS), atol=1e-5)
    assert not np.allclose(mc.sum(-1), 1.0, atol=1e-3)
