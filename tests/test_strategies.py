"""Query strategies on hand-built probability matrices and synthetic blobs, and pool scoring caches."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from active_learning.pool import ProbaCache, ScoredPool, mc_dropout_proba
from active_learning.strategies import (
    BALD,
    DEFAULT_STRATEGY,
    MULTI,
    SINGLE,
    STRATEGIES,
    CardinalityInconsistency,
    ClassBalanced,
    ColdStartKMeans,
    DiverseKMeans,
    Entropy,
    KindMismatch,
    LeastConfidence,
    Margin,
    MarginKMeans,
    MaxBinaryEntropy,
    MeanBinaryEntropy,
    Mixed,
    PoolContext,
    get_strategy,
    parse_strategy,
    validate_strategy_spec,
)
from training.classifier import EmbeddingHeadClassifier, FineTunedClassifier, TextClassifier, resolve_model_path


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def ctx_of(proba) -> PoolContext:
    proba = np.asarray(proba, dtype=float)
    return PoolContext(n_classes=proba.shape[1], proba=proba)


def blobs(n_blobs: int, per_blob: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tight, well separated clusters: centres far apart on distinct axes."""
    g = np.random.default_rng(seed)
    centres = np.eye(n_blobs, dim) * 10.0
    membership = np.repeat(np.arange(n_blobs), per_blob)
    return centres[membership] + g.normal(0, 0.1, (len(membership), dim)), membership


# --- uncertainty scores ---------------------------------------------------------------------------

def test_margin_ranks_the_even_split_first():
    proba = [[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.55, 0.45]]
    scores = Margin().scores(ctx_of(proba))
    assert np.argsort(-scores).tolist() == [1, 3, 2, 0]
    assert scores[1] == pytest.approx(1.0)
    assert Margin().select(ctx_of(proba), 2, rng()).tolist() == [1, 3]


def test_margin_uses_the_top_two_of_many_classes():
    proba = [[0.4, 0.4, 0.2], [0.6, 0.2, 0.2], [0.34, 0.33, 0.33]]
    scores = Margin().scores(ctx_of(proba))
    assert scores[0] == pytest.approx(1.0)
    assert scores[2] == pytest.approx(0.99)
    assert scores[1] == pytest.approx(0.6)


def test_margin_ties_are_broken_by_the_seed():
    tied = ctx_of(np.full((50, 2), 0.5))
    first = Margin().select(tied, 5, rng(1))
    assert np.array_equal(first, Margin().select(tied, 5, rng(1)))
    assert not np.array_equal(first, Margin().select(tied, 5, rng(2)))


def test_entropy_is_highest_on_the_uniform_row():
    proba = [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.8, 0.1, 0.1]]
    scores = Entropy().scores(ctx_of(proba))
    assert int(np.argmax(scores)) == 1
    assert scores[1] == pytest.approx(np.log(3))
    assert scores[0] == pytest.approx(0.0)
    assert scores[2] > scores[3]


def test_least_confidence_is_one_minus_the_top_probability():
    scores = LeastConfidence().scores(ctx_of([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]]))
    assert scores == pytest.approx([0.1, 0.4, 0.5])


def test_bald_is_high_where_samples_disagree_and_zero_where_they_agree():
    agree_confident = [[0.9, 0.1]] * 4
    agree_uncertain = [[0.5, 0.5]] * 4  # ambiguous, but every sample says so: no model uncertainty
    disagree = [[0.95, 0.05], [0.05, 0.95], [0.95, 0.05], [0.05, 0.95]]
    mc = np.stack([agree_confident, agree_uncertain, disagree], axis=1)  # T x N x K
    scores = BALD().scores(PoolContext(n_classes=2, mc_proba=mc))
    assert scores[0] == pytest.approx(0.0, abs=1e-9)
    assert scores[1] == pytest.approx(0.0, abs=1e-9)
    assert scores[2] > 0.4
    assert BALD().select(PoolContext(n_classes=2, mc_proba=mc), 1, rng()).tolist() == [2]


# --- batches --------------------------------------------------------------------------------------

def full_context(n: int = 200, k: int = 3, seed: int = 0, multi_label: bool = False) -> PoolContext:
    """A pool context for either kind of model: softmax rows, or independent per-label probabilities
    with a labeled set given as a 0/1 matrix."""
    g = np.random.default_rng(seed)
    emb, _ = blobs(10, n // 10, seed=seed)
    if multi_label:
        return PoolContext(n_classes=k, proba=g.uniform(0, 1, (n, k)), embeddings=emb, multi_label=True,
                           labeled_embeddings=emb[:5] + 0.5, labeled_y=g.integers(0, 2, (5, k)),
                           severe_classes=np.array([0]))
    proba = g.dirichlet(np.ones(k), n)
    return PoolContext(n_classes=k, proba=proba, embeddings=emb, mc_proba=g.dirichlet(np.ones(k), (5, n)),
                       labeled_embeddings=emb[:5] + 0.5, labeled_y=np.arange(5) % k, severe_classes=np.array([0]))


def context_for(name: str) -> PoolContext:
    return full_context(multi_label=SINGLE not in STRATEGIES[name].kinds)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_returns_k_unique_pool_indices(name):
    ctx = context_for(name)
    strategy = get_strategy(name)
    chosen = strategy.select(ctx, 25, rng(3))
    assert len(chosen) == 25
    assert len(set(chosen.tolist())) == 25
    assert chosen.min() >= 0 and chosen.max() < 200
    assert strategy.scores(ctx).shape == (200,)
    assert len(strategy.select(ctx, 0, rng())) == 0
    assert sorted(strategy.select(ctx, 500, rng()).tolist()) == list(range(200))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_fills_its_batch_when_the_pool_is_full_of_duplicates(name):
    """Retweets: 200 items but only 4 distinct embeddings, so clustering finds fewer groups than k."""
    ctx = context_for(name)
    ctx.embeddings = ctx.embeddings[np.arange(200) % 4]
    chosen = get_strategy(name).select(ctx, 25, rng(3))
    assert len(chosen) == 25 and len(set(chosen.tolist())) == 25


def test_missing_context_fields_are_named():
    with pytest.raises(ValueError, match="needs \\['mc_proba'\\]"):
        BALD().scores(ctx_of([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="embeddings"):
        MarginKMeans().select(ctx_of([[0.5, 0.5]] * 3), 2, rng())


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown query strategy 'nope'.*margin"):
        get_strategy("nope")


def test_margin_kmeans_spreads_the_batch_over_clusters_where_margin_does_not():
    emb, membership = blobs(5, 10)
    margin_scores = np.where(membership == 0, 0.99, 0.9) + np.random.default_rng(0).uniform(0, 0.001, 50)
    p1 = (1 + (1 - margin_scores)) / 2  # margin score = 1 - (p1 - p2) with p2 = 1 - p1
    ctx = PoolContext(n_classes=2, proba=np.c_[p1, 1 - p1], embeddings=emb)
    by_margin = Margin().select(ctx, 5, rng())
    assert set(membership[by_margin]) == {0}  # plain margin spends the whole batch in one cluster
    by_diversity = MarginKMeans(candidates_per_item=10).select(ctx, 5, rng())
    assert sorted(membership[by_diversity]) == [0, 1, 2, 3, 4]
    # within each cluster it keeps the most uncertain member
    for i in by_diversity:
        assert margin_scores[i] == margin_scores[membership == membership[i]].max()


def test_badge_scores_gradient_length_and_spreads_its_batch_over_clusters():
    emb, membership = blobs(4, 10)
    g = np.random.default_rng(2)
    p1 = g.uniform(0.5, 0.6, 40)
    proba = np.c_[p1, 1 - p1]
    proba[5] = [1.0, 0.0]  # confident: zero gradient embedding
    proba[17] = [0.5, 0.5]  # the most uncertain item
    ctx = PoolContext(n_classes=2, proba=proba, embeddings=emb)
    scores = get_strategy("badge").scores(ctx)
    assert scores[5] == 0.0 and int(np.argmax(scores)) == 17
    chosen = get_strategy("badge").select(ctx, 4, rng())
    assert chosen[0] == 17
    assert sorted(membership[chosen]) == [0, 1, 2, 3]  # D² sampling never stays in one tight blob


def test_cold_start_picks_one_representative_per_cluster():
    emb, membership = blobs(6, 30, seed=4)
    chosen = ColdStartKMeans().select(PoolContext(n_classes=2, embeddings=emb), 6, rng())
    assert sorted(membership[chosen]) == list(range(6))


def test_cold_start_scores_novelty_against_the_labeled_set():
    emb, membership = blobs(3, 10)
    ctx = PoolContext(n_classes=2, embeddings=emb, labeled_embeddings=emb[membership == 0][:2])
    scores = ColdStartKMeans().scores(ctx)
    assert scores[membership == 0].max() < scores[membership != 0].min()


def test_class_balanced_gives_the_rare_predicted_class_its_share():
    uncertain_common = np.tile([0.5, 0.45, 0.05], (80, 1))  # predicted class 0, very uncertain
    middle = np.tile([0.2, 0.7, 0.1], (15, 1))  # predicted class 1
    rare_confident = np.tile([0.02, 0.03, 0.95], (5, 1))  # predicted class 2, confident
    ctx = ctx_of(np.vstack([uncertain_common, middle, rare_confident]))
    assert set(Margin().select(ctx, 12, rng()).tolist()) <= set(range(80))  # margin ignores the rare class
    chosen = ClassBalanced().select(ctx, 12, rng())
    predicted = ctx.proba[chosen].argmax(1)
    assert np.bincount(predicted, minlength=3).tolist() == [4, 4, 4]
    assert len(set(chosen.tolist())) == 12


def test_class_balanced_passes_on_the_share_a_small_class_cannot_fill():
    proba = np.vstack([np.tile([0.6, 0.3, 0.1], (50, 1)), np.tile([0.3, 0.6, 0.1], (50, 1)),
                       np.tile([0.1, 0.1, 0.8], (2, 1))])
    predicted = ClassBalanced().select(ctx_of(proba), 30, rng()).tolist()
    counts = np.bincount(ctx_of(proba).proba[predicted].argmax(1), minlength=3)
    assert counts.tolist() == [14, 14, 2]


def test_mixed_holds_the_base_batch_plus_a_random_slice():
    g = np.random.default_rng(5)
    ctx = ctx_of(g.dirichlet([1, 1], 300))
    strategy = Mixed("margin", random_fraction=0.2)
    top8 = set(Margin().select(ctx, 8, rng()).tolist())
    slices = []
    for seed in range(3):
        chosen = strategy.select(ctx, 10, rng(seed))
        assert set(chosen[:8].tolist()) == top8
        random_part = set(chosen[8:].tolist())
        assert len(random_part) == 2 and not random_part & top8
        slices.append(random_part)
    assert len({frozenset(s) for s in slices}) > 1


def test_mixed_rejects_a_fraction_outside_zero_one():
    with pytest.raises(ValueError):
        Mixed("margin", random_fraction=1.5)


# --- multi-label strategies -----------------------------------------------------------------------

def multi_ctx(proba, labeled_y=None, thresholds=None) -> PoolContext:
    proba = np.asarray(proba, dtype=float)
    return PoolContext(n_classes=proba.shape[1], proba=proba, multi_label=True, thresholds=thresholds,
                       labeled_y=None if labeled_y is None else np.asarray(labeled_y))


def test_mean_binary_entropy_picks_the_items_nearest_one_half():
    proba = [[0.99, 0.01, 0.02], [0.5, 0.5, 0.5], [0.9, 0.1, 0.6], [0.45, 0.55, 0.4], [0.0, 1.0, 0.0]]
    scores = MeanBinaryEntropy().scores(multi_ctx(proba))
    assert np.argsort(-scores).tolist() == [1, 3, 2, 0, 4]
    assert scores[1] == pytest.approx(np.log(2))
    assert scores[4] == pytest.approx(0.0, abs=1e-9)
    assert MeanBinaryEntropy().select(multi_ctx(proba), 2, rng()).tolist() == [1, 3]


def test_max_binary_entropy_follows_the_most_doubtful_label_where_the_mean_dilutes_it():
    one_coin_flip = [0.5, 0.0, 0.0, 0.0]  # one label wholly undecided, the rest certain
    mildly_unsure = [0.2, 0.2, 0.2, 0.2]  # a little unsure about every label
    ctx = multi_ctx([one_coin_flip, mildly_unsure, [0.0, 1.0, 0.0, 1.0]])
    assert MaxBinaryEntropy().select(ctx, 1, rng()).tolist() == [0]
    assert MeanBinaryEntropy().select(ctx, 1, rng()).tolist() == [1]
    assert MaxBinaryEntropy().scores(ctx)[0] == pytest.approx(np.log(2))


def test_cardinality_picks_the_item_whose_label_count_disagrees_with_the_labeled_set():
    labeled = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]  # one label per item
    consistent = [0.8, 0.2, 0.2]  # one label decided, as the labeled items have
    three = [0.8, 0.8, 0.8]  # three labels: two more than usual
    none = [0.2, 0.2, 0.2]  # no label: one fewer
    ctx = multi_ctx([consistent, three, none, consistent], labeled_y=labeled)
    # every row is equally uncertain label by label: only the count tells them apart
    assert np.ptp(MeanBinaryEntropy().scores(ctx)) == pytest.approx(0.0, abs=1e-12)
    scores = CardinalityInconsistency().scores(ctx)
    assert np.argsort(-scores)[:2].tolist() == [1, 2]
    assert scores[0] == scores[3] == pytest.approx(0.0)
    assert CardinalityInconsistency().select(ctx, 1, rng()).tolist() == [1]
    # decisions follow the model's own thresholds: at 0.9 the 'three' row decides nothing, like 'none'
    strict = multi_ctx([consistent, three, none], labeled_y=labeled, thresholds=np.full(3, 0.9))
    high = CardinalityInconsistency().scores(strict)
    assert high[0] == pytest.approx(high[1]) == pytest.approx(high[2])


def test_cardinality_needs_the_labeled_set_as_a_label_matrix():
    with pytest.raises(ValueError, match=r"needs \['labeled_y'\]"):
        CardinalityInconsistency().scores(multi_ctx([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="L x 2 0/1 matrix"):
        CardinalityInconsistency().scores(multi_ctx([[0.5, 0.5]], labeled_y=[0, 1]))
    with pytest.raises(ValueError, match="beta"):
        CardinalityInconsistency(beta=2.0)


def test_kmeans_composite_spreads_a_multi_label_batch_over_clusters():
    emb, membership = blobs(5, 10)
    g = np.random.default_rng(0)
    p = np.where(membership == 0, 0.5, 0.8)[:, None] + g.uniform(0, 0.01, (50, 3))  # cluster 0 most uncertain
    ctx = PoolContext(n_classes=3, proba=np.clip(p, 0, 1), embeddings=emb, multi_label=True)
    assert set(membership[MeanBinaryEntropy().select(ctx, 5, rng())]) == {0}
    diverse = parse_strategy("kmeans:mean_binary_entropy", multi_label=True)
    assert isinstance(diverse, DiverseKMeans) and diverse.needs == {"proba", "embeddings"}
    assert sorted(membership[diverse.select(ctx, 5, rng())]) == [0, 1, 2, 3, 4]


def test_a_single_label_strategy_refuses_multi_label_predictions_and_vice_versa():
    multi = multi_ctx([[0.9, 0.8], [0.5, 0.1]])
    with pytest.raises(KindMismatch, match=r"'margin' is for single-label models only, but the taxonomy is "
                                           r"multi-label; for multi-label models choose from \[.*'cardinality'"):
        Margin().scores(multi)
    with pytest.raises(KindMismatch, match="'mean_binary_entropy' is for multi-label models only"):
        MeanBinaryEntropy().scores(ctx_of([[0.9, 0.1]]))
    with pytest.raises(KindMismatch, match="'margin'"):
        Mixed("margin").select(multi, 1, rng())  # a composite's base is checked too
    assert len(Mixed("max_binary_entropy", 0.5).select(multi, 2, rng())) == 2


@pytest.mark.parametrize(("spec", "multi", "refused"), [
    ("margin", True, "margin"),
    ("margin_kmeans", True, "margin_kmeans"),
    ("bald", True, "bald"),
    ("mixed:margin", True, "margin"),
    ("kmeans:entropy", True, "entropy"),
    ("class_balanced:mean_binary_entropy", True, "class_balanced"),
    ("class_balanced:mean_binary_entropy", False, "mean_binary_entropy"),
    ("cardinality", False, "cardinality"),
    ("mixed:kmeans:max_binary_entropy", False, "max_binary_entropy"),
])
def test_a_spec_unfit_for_the_taxonomys_kind_is_refused_when_validated(spec, multi, refused):
    kind, other = (MULTI, SINGLE) if multi else (SINGLE, MULTI)
    with pytest.raises(ValueError, match=f"query strategy '{refused}' is for {other} models only, but the "
                                         f"taxonomy is {kind}"):
        validate_strategy_spec(spec, multi_label=multi)
    assert validate_strategy_spec(spec) == spec  # kind not known yet: only the grammar is checked


def test_auto_resolves_to_the_default_of_the_models_kind():
    assert type(parse_strategy("auto", multi_label=False)) is type(parse_strategy(DEFAULT_STRATEGY[SINGLE]))
    assert type(parse_strategy("auto", multi_label=True)) is type(parse_strategy(DEFAULT_STRATEGY[MULTI]))
    assert SINGLE not in parse_strategy("auto", multi_label=True).kinds
    assert isinstance(parse_strategy("auto"), MarginKMeans)  # kind unknown: the single-label default
    nested = parse_strategy("mixed:auto", multi_label=True)
    assert type(nested.base) is type(parse_strategy(DEFAULT_STRATEGY[MULTI]))
    assert validate_strategy_spec(" auto ") == "auto"
    with pytest.raises(ValueError, match="'auto' takes no base strategy"):
        parse_strategy("auto:margin")


def test_multi_label_strategies_work_through_get_strategy_and_the_registry():
    for name in ("mean_binary_entropy", "max_binary_entropy", "cardinality"):
        assert STRATEGIES[name].kinds == {MULTI}
        assert get_strategy(name).select(full_context(multi_label=True), 7, rng()).shape == (7,)
    assert STRATEGIES["random"].kinds == STRATEGIES["cold_start"].kinds == {SINGLE, MULTI}


# --- pool scoring and caches ----------------------------------------------------------------------

class FakeEncoder:
    """Deterministic 4-d embeddings from a text hash; counts the texts it had to embed."""

    name = "fake-encoder"
    max_length = 16
    dim = 4

    def __init__(self):
        self.embedded: list[str] = []

    def embed(self, texts, batch_size=64, progress=None):
        self.embedded.extend(texts)
        seeds = [zlib.crc32(t.encode()) for t in texts]
        return np.array([np.random.default_rng(s).normal(size=4) for s in seeds], dtype=np.float32)


class CountingClassifier(TextClassifier):
    """A stand-in for a fine-tuned model: probabilities from text length, counting every text scored."""

    kind = "counting"
    labels = ("a", "b")
    max_length = 16

    def __init__(self):
        self.scored: list[str] = []

    def predict_proba(self, texts, batch_size=64, progress=None):
        self.scored.extend(texts)
        p = np.array([(len(t) % 10) / 10 for t in texts], dtype=np.float32)
        return np.c_[p, 1 - p]

    def embed(self, texts, batch_size=64, progress=None):
        raise AssertionError("pool diversity must use the frozen encoder, not the model")

    def _save_weights(self, path: Path) -> dict:
        return {}


def pool_items(n: int, prefix: str = "t") -> pd.DataFrame:
    texts = [f"{prefix} text {'x' * i}" for i in range(n)]
    return pd.DataFrame({"id": [f"{prefix}{i}" for i in range(n)], "text": texts})


def test_same_model_version_is_not_rescored(tmp_path):
    items = pool_items(30)
    first = CountingClassifier()
    proba = ScoredPool(items, first, "m:v1", tmp_path, encoder=FakeEncoder()).context({"proba"}).proba
    assert len(first.scored) == 30

    again = CountingClassifier()
    cached = ScoredPool(items, again, "m:v1", tmp_path, encoder=FakeEncoder()).context({"proba"}).proba
    assert again.scored == []
    assert np.allclose(cached, proba)

    grown = pd.concat([items, pool_items(2, prefix="new")], ignore_index=True)
    third = CountingClassifier()
    ScoredPool(grown.iloc[::-1], third, "m:v1", tmp_path, encoder=FakeEncoder()).context({"proba"})
    assert sorted(third.scored) == sorted(pool_items(2, prefix="new")["text"])

    newer = CountingClassifier()
    ScoredPool(items, newer, "m:v2", tmp_path, encoder=FakeEncoder()).context({"proba"})
    assert len(newer.scored) == 30


def test_proba_cache_returns_rows_in_the_asked_order(tmp_path):
    cache = ProbaCache(tmp_path)
    compute = lambda texts: np.array([[len(t)] for t in texts], dtype=np.float32)  # noqa: E731
    cache.get("v", ["aa", "b"], compute)
    assert cache.get("v", ["b", "aaa", "aa", "b"], compute)[:, 0].tolist() == [1, 3, 2, 1]


def test_embeddings_are_computed_once_across_rounds(tmp_path):
    items = pool_items(20)
    encoder = FakeEncoder()
    ScoredPool(items, CountingClassifier(), "v1", tmp_path, encoder=encoder).context({"embeddings"})
    ScoredPool(items, CountingClassifier(), "v2", tmp_path, encoder=encoder).context({"embeddings"})
    assert len(encoder.embedded) == 20


def fast_model(encoder: FakeEncoder) -> EmbeddingHeadClassifier:
    train = [f"train {i}" for i in range(40)]
    head = LogisticRegression().fit(encoder.embed(train), np.arange(40) % 3)
    return EmbeddingHeadClassifier(encoder, head, ("x", "y", "z"))


def test_fast_model_scores_from_cached_embeddings_and_ranks_a_batch(tmp_path):
    encoder = FakeEncoder()
    model = fast_model(encoder)
    encoder.embedded.clear()
    items = pool_items(60)
    pool = ScoredPool(items, model, "fast:v1", tmp_path)
    batch = pool.rank("margin", 10, seed=0)
    assert len(encoder.embedded) == 60
    assert list(batch.columns) == ["id", "text", "score", "predicted", "confidence"]
    assert len(batch) == 10 and batch["id"].is_unique
    assert batch["score"].is_monotonic_decreasing
    all_scores = Margin().scores(pool.context({"proba"}))
    assert batch["score"].min() >= np.sort(all_scores)[-10] - 1e-9
    assert set(batch["predicted"]) <= {"x", "y", "z"}

    ScoredPool(items, model, "fast:v1", tmp_path).rank("entropy", 5)
    assert len(encoder.embedded) == 60  # second round: nothing re-embedded


def test_fast_model_bald_uses_a_bootstrap_committee(tmp_path):
    encoder = FakeEncoder()
    model = fast_model(encoder)
    labeled = pd.DataFrame({"id": [f"l{i}" for i in range(40)], "text": [f"train {i}" for i in range(40)],
                            "label": [("x", "y", "z")[i % 3] for i in range(40)]})
    pool = ScoredPool(pool_items(30), model, "fast:v1", tmp_path, labeled=labeled, mc_samples=4)
    mc = pool.context({"mc_proba"}).mc_proba
    assert mc.shape == (4, 30, 3)
    assert np.allclose(mc.sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(mc[0], mc[1])  # members differ: they were fit on different resamples
    assert len(pool.rank("bald", 5)) == 5
    with pytest.raises(ValueError, match="labeled set"):
        ScoredPool(pool_items(5), model, "fast:v1", tmp_path).context({"mc_proba"})


def tiny_finetuned() -> FineTunedClassifier:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.5,
                        attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    return FineTunedClassifier(BertForSequenceClassification(config), tokenizer, ("x", "y", "z"), 16)


def test_mc_dropout_samples_differ_and_leave_the_model_in_eval_mode(tmp_path):
    model = tiny_finetuned()
    texts = ["you are great", "some words here", "a b c d e f"]
    before = model.predict_proba(texts)
    mc = mc_dropout_proba(model, texts, 6, seed=1)
    assert mc.shape == (6, 3, 3)
    assert np.allclose(mc.sum(-1), 1.0, atol=1e-5)
    assert mc.std(axis=0).max() > 1e-3
    assert not model.model.training
    assert np.allclose(model.predict_proba(texts), before)
    assert np.allclose(mc_dropout_proba(model, texts, 6, seed=1), mc)

    items = pd.DataFrame({"id": ["1", "2", "3"], "text": texts})
    first = ScoredPool(items, model, "ft:v1", tmp_path, encoder=FakeEncoder(), mc_samples=6, seed=1)
    sampled = first.context({"mc_proba"}).mc_proba
    assert sampled.shape == (6, 3, 3)
    model.model.forward = None  # a second round of the same version must not run the model at all
    again = ScoredPool(items, model, "ft:v1", tmp_path, encoder=FakeEncoder(), mc_samples=6, seed=1)
    assert np.allclose(again.context({"mc_proba"}).mc_proba, sampled)


def test_scored_pool_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="columns id and text"):
        ScoredPool(pd.DataFrame({"text": ["a"]}), CountingClassifier(), "v", tmp_path, encoder=FakeEncoder())
    pool = ScoredPool(pool_items(3), CountingClassifier(), "v", tmp_path, encoder=FakeEncoder())
    with pytest.raises(ValueError, match="unknown context field"):
        pool.context({"gradients"})
    labeled = pd.DataFrame({"id": ["l"], "text": ["t"], "label": ["not-a-label"]})
    with pytest.raises(ValueError, match="unknown to the model"):
        ScoredPool(pool_items(3), CountingClassifier(), "v", tmp_path, labeled=labeled,
                   encoder=FakeEncoder()).context({"embeddings"})


# --- strategy specs: one parser for settings, the service's loop and simulations -------------------------


def test_a_spec_names_a_composite_strategy_and_its_base_at_any_depth():
    balanced = parse_strategy("class_balanced:margin_kmeans")
    assert isinstance(balanced, ClassBalanced) and isinstance(balanced.base, MarginKMeans)
    assert balanced.needs == {"proba", "embeddings"}
    nested = parse_strategy(" mixed : class_balanced:entropy ")
    assert isinstance(nested, Mixed) and isinstance(nested.base, ClassBalanced)
    assert isinstance(nested.base.base, Entropy)
    assert isinstance(parse_strategy("margin"), Margin)


@pytest.mark.parametrize(("spec", "message"), [
    ("margn", r"unknown query strategy 'margn'; choose from \[.*'margin'.*'random'.*\]"),
    ("class_balanced:margn", "unknown query strategy 'margn'"),
    ("margin:entropy",
     r"'margin' takes no base strategy.*\['class_balanced', 'density_weighted', 'kmeans', 'mixed', 'rare_weighted', "
     r"'severity_weighted'\]"),
    ("class_balanced:", "names no base strategy"),
    ("  ", "empty query strategy spec"),
])
def test_a_bad_spec_is_refused_with_the_valid_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_strategy(spec)


def test_the_strategy_setting_is_validated_when_settings_load(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from labelloop.config import Settings

    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    assert Settings(strategy=" class_balanced:margin_kmeans").strategy == "class_balanced:margin_kmeans"
    with pytest.raises(ValidationError, match=r"unknown query strategy 'margn'.*'margin_kmeans'"):
        Settings(strategy="margn")
    monkeypatch.setenv("LABELLOOP_STRATEGY", "entropy:margin")
    with pytest.raises(ValidationError, match="takes no base strategy"):
        Settings()
    toml = tmp_path / "labelloop.toml"
    toml.write_text('strategy = "bald:margin"\n')
    monkeypatch.delenv("LABELLOOP_STRATEGY")
    monkeypatch.setenv("LABELLOOP_CONFIG", str(toml))
    with pytest.raises(ValidationError, match="'bald' takes no base strategy"):
        Settings()


def test_the_strategy_setting_must_fit_the_taxonomys_kind(tmp_path, monkeypatch):
    """`strategy = "margin"` with a multi-label taxonomy would fail only at the first round."""
    from pydantic import ValidationError

    from labelloop.config import REPO_ROOT, Settings

    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    multi = str(REPO_ROOT / "examples" / "taxonomies" / "ethos_targets.toml")
    assert Settings().strategy == Settings(taxonomy=multi).strategy == "auto"  # resolved per kind by the loop
    assert Settings(taxonomy=multi, strategy="mixed:kmeans:cardinality").strategy == "mixed:kmeans:cardinality"
    with pytest.raises(ValidationError, match=r"strategy\n.*'margin' is for single-label models only, but the "
                                              r"taxonomy is multi-label"):
        Settings(taxonomy=multi, strategy="margin")
    with pytest.raises(ValidationError, match="'max_binary_entropy' is for multi-label models only"):
        Settings(strategy="max_binary_entropy")


def test_a_scored_pool_ranks_by_a_composite_spec(tmp_path):
    pool = ScoredPool(pool_items(60), fast_model(FakeEncoder()), "fast:v1", tmp_path)
    batch = pool.rank("class_balanced:margin_kmeans", 9, seed=0)
    assert len(batch) == 9 and batch["id"].is_unique
    assert set(batch["predicted"]) == {"x", "y", "z"}  # the batch is spread over the predicted classes


class FakeLabelStudio:
    """Records what the loop pushes; assigns task ids on import."""

    def __init__(self):
        self.pushed: list = []
        self.model_version: str | None = None

    def import_tasks(self, project_id, items, **_):
        return {str(item_id): 1000 + i for i, item_id in enumerate(items["id"])}

    def create_tasks(self, project_id, items):
        return [2000 + i for i, _ in enumerate(items)]

    def import_predictions(self, project_id, predictions, **_):
        self.pushed.extend(predictions)
        return len(predictions)

    def set_model_version(self, project_id, model_version):
        self.model_version = model_version


def test_the_service_loop_pushes_a_queue_for_a_composite_strategy(tmp_path, monkeypatch):
    """`strategy = "class_balanced:margin_kmeans"` worked in simulations but not in the service."""
    from active_learning.loop import ActiveLearningLoop
    from labelloop.config import Settings
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy
    from training.registry import LoadedModel, ModelRef

    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", query_batch=6, queue_size=20,
                        strategy="class_balanced:margin_kmeans", honeypot_rate=0, overlap_rate=0, audit_rate=0)
    taxonomy = get_taxonomy(settings.taxonomy)
    encoder = FakeEncoder()
    train = [f"train {i}" for i in range(40)]
    model = EmbeddingHeadClassifier(encoder, LogisticRegression().fit(encoder.embed(train), np.arange(40) % 3),
                                    taxonomy.labels)
    client = FakeLabelStudio()
    with Journal(settings.journal_path, taxonomy) as journal:
        loop = ActiveLearningLoop(settings, client, 1, journal)
        loop.import_pool(pool_items(50))
        result = loop.push_queue(LoadedModel(ModelRef(settings.registered_model_name, 1), model))
    assert len(result.queued_task_ids) == 6 and len(client.pushed) == 20
    assert client.model_version == f"{settings.registered_model_name}:v1"


class MultiLabelCounting(CountingClassifier):
    """A multi-label stand-in: three independent per-label probabilities from the text's length."""

    labels = ("threat", "insult", "spam")
    multi_label = True

    def __init__(self):
        super().__init__()
        self.thresholds = np.array([0.5, 0.3, 0.9])

    def predict_proba(self, texts, batch_size=64, progress=None):
        self.scored.extend(texts)
        p = np.array([(len(t) % 10) / 10 for t in texts], dtype=np.float32)
        return np.c_[p, 1 - p, np.full(len(p), 0.5, dtype=np.float32)]


def test_a_scored_pool_gives_multi_label_strategies_the_kind_thresholds_and_labeled_sets(tmp_path):
    labeled = pd.DataFrame({"id": ["l1", "l2", "l3"], "text": ["a", "b", "c"],
                            "label": [("threat",), ("threat", "spam"), ()]})
    pool = ScoredPool(pool_items(40), MultiLabelCounting(), "m:v1", tmp_path, labeled=labeled,
                      encoder=FakeEncoder())
    ctx = pool.context({"proba", "labeled_y"})
    assert ctx.multi_label and ctx.thresholds.tolist() == [0.5, 0.3, 0.9]
    assert ctx.labeled_y.tolist() == [[1, 0, 0], [1, 0, 1], [0, 0, 0]]
    batch = pool.rank("cardinality", 5, seed=0)
    assert len(batch) == 5 and batch["id"].is_unique
    assert all(isinstance(p, tuple) and set(p) <= {"threat", "insult", "spam"} for p in batch["predicted"])
    with pytest.raises(KindMismatch, match="'margin'"):
        pool.rank("margin", 5)
    unknown = labeled.assign(label=[("threat",), ("harassment",), ()])
    with pytest.raises(ValueError, match=r"labels \[.harassment.\] unknown to the model"):
        ScoredPool(pool_items(5), MultiLabelCounting(), "m:v1", tmp_path, labeled=unknown,
                   encoder=FakeEncoder()).context({"labeled_y"})


def test_severity_weighted_ranks_a_possibly_severe_item_above_an_equally_uncertain_harmless_one():
    from active_learning.strategies import PoolContext as Ctx
    from active_learning.strategies import parse_strategy as parse

    # classes: hate (severe), offensive, neither; rows 0 and 1 have the same margin
    proba = np.array([[0.05, 0.50, 0.45], [0.45, 0.50, 0.05], [0.0, 0.98, 0.02]])
    strategy = parse("severity_weighted:margin")
    ctx = Ctx(3, proba=proba, severe_classes=np.array([0]))
    plain, weighted = parse("margin").scores(ctx), strategy.scores(ctx)
    assert plain[0] == pytest.approx(plain[1])
    assert weighted[1] > weighted[0] and list(strategy.select(ctx, 1, np.random.default_rng(0))) == [1]
    with pytest.raises(ValueError, match="severe_labels"):
        strategy.scores(Ctx(3, proba=proba, severe_classes=np.array([], dtype=np.int64)))


@pytest.mark.parametrize("spec", ["margin", "kmeans:mean_binary_entropy", "margin_kmeans", "class_balanced:margin",
                                  "mixed:kmeans:cardinality"])
def test_a_strategy_reports_the_spec_that_built_it(spec: str):
    assert parse_strategy(spec).spec == spec


class ConfidentHate(CountingClassifier):
    """Sure that every text is hate: every queued item is blurred."""

    labels = ("hate", "offensive", "neither")

    def predict_proba(self, texts, batch_size=64, progress=None):
        self.scored.extend(texts)
        return np.tile(np.array([0.95, 0.03, 0.02], dtype=np.float32), (len(texts), 1))


def test_queued_items_are_blurred_before_their_priorities_reach_label_studio(tmp_path, monkeypatch):
    """The loop pushed the priorities first and blurred afterwards: in between, a reviewer opening the head of
    the queue read a confidently severe item in full."""
    from active_learning.loop import ActiveLearningLoop
    from labelloop.config import Settings
    from labelloop.journal import Journal
    from labelloop.policy import Protection, Severity
    from labelloop.taxonomy import get_taxonomy
    from training.registry import LoadedModel, ModelRef

    class Recording(FakeLabelStudio):
        def __init__(self):
            super().__init__()
            self.events: list[str] = []

        def import_predictions(self, project_id, predictions, **_):
            self.events.append("push")
            return super().import_predictions(project_id, predictions)

        def set_masked_text(self, task_id, item_id, text, masked):
            self.events.append("blur")

    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "none.toml"))
    settings = Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", query_batch=4, queue_size=8,
                        taxonomy="hate_offensive", honeypot_rate=0, overlap_rate=0, audit_rate=0,
                        severity=Severity(severe_labels=("hate",)), protection=Protection(blur_threshold=0.9))
    client = Recording()
    with Journal(settings.journal_path, get_taxonomy(settings.taxonomy)) as journal:
        loop = ActiveLearningLoop(settings, client, 1, journal)
        loop.import_pool(pool_items(20))
        loop.push_queue(LoadedModel(ModelRef(settings.registered_model_name, 1), ConfidentHate()))
    assert "blur" in client.events and client.events.index("push") > max(
        i for i, event in enumerate(client.events) if event == "blur")
