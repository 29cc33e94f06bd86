"""Fast mode's hashed n-gram features: the encoder that puts them next to the frozen embedding, its cache,
and a model over them saving, loading and serving like any fast-mode model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from labelloop.config import Settings
from labelloop.taxonomy import get_taxonomy
from training.classifier import Encoder, NgramEncoder, NgramFeatures, TextClassifier, load_encoder
from training.fast import EmbeddingCache, fast_encoder_name, fit_head, train_fast

TEXTS = ["you are a stupid idiot", "have a lovely day", "that game was trash lol", "I love my dog",
         "go back to where you came from", "what a great match", "shut up loser", "thanks for the help"]


def test_ngram_features_depend_on_the_text_alone_and_are_normalised_per_analyser():
    features = NgramFeatures(64, max_length=32)
    together = features.embed(TEXTS)
    apart = np.vstack([features.embed([t]) for t in reversed(TEXTS)])[::-1]
    np.testing.assert_array_equal(together, apart)  # no fitted vocabulary: batch-independent
    assert together.shape == (len(TEXTS), 64) and together.dtype == np.float32
    weight = NgramFeatures.WEIGHT
    np.testing.assert_allclose(np.linalg.norm(together[:, :32], axis=1), weight, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together[:, 32:], axis=1), weight, rtol=1e-5)
    np.testing.assert_allclose(NgramFeatures(64, 32, weight=1.0).embed(TEXTS), together / weight, rtol=1e-5)
    assert not np.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="even"):
        NgramFeatures(63, max_length=32)


def test_load_encoder_parses_the_ngram_suffix(tiny_bert):
    encoder = load_encoder(f"{tiny_bert}+ngrams64", 32)
    base = load_encoder(tiny_bert, 32)
    assert isinstance(encoder, NgramEncoder) and encoder.base is base and encoder.model is base.model
    assert type(base) is Encoder and encoder.dim == base.dim + 64
    vectors = encoder.embed(TEXTS)
    np.testing.assert_allclose(vectors[:, : base.dim], base.embed(TEXTS), atol=1e-6)
    np.testing.assert_array_equal(vectors[:, base.dim:], NgramFeatures(64, 32).embed(TEXTS))


def test_cache_reuses_the_base_encoders_embeddings(tmp_path, tiny_bert, monkeypatch):
    base = load_encoder(tiny_bert, 32)
    EmbeddingCache(tmp_path, base).get(TEXTS)
    calls: list[int] = []
    real_embed = Encoder.embed
    monkeypatch.setattr(Encoder, "embed", lambda self, texts, *a, **k: calls.append(len(texts)) or
                        real_embed(self, texts, *a, **k))
    encoder = load_encoder(f"{tiny_bert}+ngrams64", 32)
    cache = EmbeddingCache(tmp_path, encoder)
    got = cache.get(TEXTS)
    assert calls == []  # the transformer's part came from the base encoder's store
    np.testing.assert_allclose(got, encoder.embed(TEXTS), atol=1e-6)
    calls.clear()
    assert cache.get(TEXTS[:2] + ["a brand new text"]).shape == (3, encoder.dim)
    assert calls == [1]  # only the new text was embedded


def test_fit_head_accepts_a_sparse_feature_matrix():
    rng = np.random.default_rng(0)
    x = sp.random(40, 30, density=0.2, format="csr", random_state=0)
    head = fit_head(x, rng.integers(0, 3, size=40), seed=0)
    assert head.predict_proba(x).shape == (40, 3)


def test_ngram_model_saves_loads_and_quantizes(tmp_path, tiny_bert):
    taxonomy = get_taxonomy("hate_offensive")
    labels = ["offensive", "neither", "offensive", "neither", "hate", "neither", "offensive", "neither"]
    train = pd.DataFrame({"text": TEXTS, "label": labels})
    encoder = load_encoder(f"{tiny_bert}+ngrams64", 32)
    model = train_fast(train, taxonomy, encoder=encoder, cache=EmbeddingCache(tmp_path / "cache", encoder))
    expected = model.predict_proba(TEXTS)
    loaded = TextClassifier.load(model.save(tmp_path / "model"))
    assert loaded.kind == "embedding_head" and loaded.encoder.name == encoder.name
    np.testing.assert_allclose(loaded.predict_proba(TEXTS), expected, atol=1e-5)
    quantized = loaded.quantized_copy()
    assert quantized.encoder.model is not loaded.encoder.model and loaded.encoder.model is encoder.model
    assert quantized.predict_proba(TEXTS).shape == expected.shape


def test_fast_encoder_name_follows_the_setting():
    assert fast_encoder_name(Settings(fast_ngram_features=0)) == Settings().base_model
    assert fast_encoder_name(Settings(fast_ngram_features=1024)) == f"{Settings().base_model}+ngrams1024"
    assert fast_encoder_name(Settings(fast_ngram_features=4096), multi_label=True) == Settings().base_model
    assert fast_encoder_name(Settings()) == Settings().base_model  # off by default
    with pytest.raises(ValueError):
        Settings(fast_ngram_features=7)


def test_serving_an_ngram_model_after_a_plain_one_over_the_same_weights_does_not_reuse_its_check_features(
        tiny_bert, tmp_path):
    """The serving path memo is keyed by the transformer's weights; a plain and an n-gram fast model share
    them but not their head's input width, so the second hot swap must not be handed the first one's
    remembered check-text features (it failed with a shape error)."""
    from serving.quantize import SpeedMemo, choose_for_serving

    taxonomy = get_taxonomy("hate_offensive")
    labels = ["offensive", "neither", "offensive", "neither", "hate", "neither", "offensive", "neither"]
    train = pd.DataFrame({"text": TEXTS * 3, "label": labels * 3})
    memo = SpeedMemo()
    for name in (tiny_bert, f"{tiny_bert}{NgramEncoder.SUFFIX}64"):
        encoder = load_encoder(name, 32)
        model = train_fast(train, taxonomy, encoder=encoder, cache=EmbeddingCache(tmp_path / "cache", encoder))
        served, choice = choose_for_serving(model, "int8", TEXTS * 3, tmp_path / "q", memo=memo)
        assert served.predict_proba(TEXTS[:2]).shape == (2, len(taxonomy.labels))
