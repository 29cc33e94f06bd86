"""The rare-class-aware and committee strategies measured for issue 15's label-efficiency goal."""

from __future__ import annotations

import numpy as np
import pytest

from active_learning.strategies import (
    CommitteeMargin,
    DiverseKMeans,
    Margin,
    PoolContext,
    RareWeighted,
    parse_strategy,
)
from tests.test_strategies import rng


def ctx(proba, labeled_y, **extra) -> PoolContext:
    proba = np.asarray(proba, dtype=float)
    return PoolContext(n_classes=proba.shape[1], proba=proba, labeled_y=np.asarray(labeled_y), **extra)


def test_rare_weighted_weights_each_class_by_how_short_of_its_share_the_labels_are():
    # 2 of 10 labels are class 0: add-one shares 3/12 and 9/12, weights 1/(2 * share)
    weights = RareWeighted().class_weights(ctx([[0.5, 0.5]], [0, 0] + [1] * 8))
    assert weights == pytest.approx([2.0, 2.0 / 3.0])


def test_rare_weighted_puts_the_item_that_may_be_rare_first_among_equally_uncertain_ones():
    # both items have the same margin; item 1 leans to class 0, which the labels are short of
    proba = [[0.3, 0.6, 0.1], [0.6, 0.3, 0.1], [0.05, 0.9, 0.05]]
    c = ctx(proba, [1] * 20 + [0, 2])
    assert Margin().scores(c)[0] == pytest.approx(Margin().scores(c)[1])
    assert RareWeighted().select(c, 1, rng()).tolist() == [1]
    assert Margin().select(c, 2, rng(0)).tolist() in ([0, 1], [1, 0])


def test_rare_weighted_leaves_the_base_ranking_alone_when_the_labels_are_balanced():
    g = rng(4)
    proba = g.dirichlet(np.ones(3), 60)
    c = ctx(proba, np.arange(30) % 3)
    np.testing.assert_allclose(RareWeighted().scores(c), Margin().scores(c))
    assert RareWeighted().select(c, 10, rng(1)).tolist() == Margin().select(c, 10, rng(1)).tolist()


def test_rare_weighted_power_zero_is_the_base_and_a_larger_power_pushes_harder():
    proba = [[0.45, 0.55], [0.65, 0.35]]  # item 0 is the more uncertain; item 1 leans to the rare class 0
    c = ctx(proba, [0] + [1] * 19)
    assert RareWeighted(power=0.0).select(c, 1, rng()).tolist() == [0]
    assert RareWeighted(power=1.0).select(c, 1, rng()).tolist() == [1]
    with pytest.raises(ValueError, match="power"):
        RareWeighted(power=-1.0)


def test_rare_weighted_needs_the_labeled_set_and_is_for_single_label_models():
    with pytest.raises(ValueError, match="labeled_y"):
        RareWeighted().scores(PoolContext(n_classes=2, proba=np.full((3, 2), 0.5)))
    with pytest.raises(ValueError, match="single-label"):
        parse_strategy("rare_weighted:margin", multi_label=True)


def test_kmeans_over_rare_weighted_margin_parses_and_spreads_the_batch_over_clusters():
    strategy = parse_strategy("kmeans:rare_weighted:margin")
    assert isinstance(strategy, DiverseKMeans) and isinstance(strategy.base, RareWeighted)
    assert strategy.spec == "kmeans:rare_weighted:margin"
    assert strategy.needs == {"embeddings", "proba", "labeled_y"}
    # 5 tight clusters of 40; every item equally uncertain: one pick per cluster
    centres = np.eye(5, 8) * 10.0
    emb = np.repeat(centres, 40, axis=0) + rng(1).normal(0, 0.1, (200, 8))
    c = ctx(np.full((200, 2), 0.5), [0, 1], embeddings=emb)
    chosen = strategy.select(c, 5, rng(2))
    assert sorted(set((chosen // 40).tolist())) == [0, 1, 2, 3, 4]


def test_committee_margin_is_margin_where_the_committee_agrees_and_ranks_disagreement_up():
    proba = np.array([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1]])
    agree = np.repeat(proba[None], 5, axis=0)
    c = PoolContext(n_classes=2, proba=proba, mc_proba=agree)
    np.testing.assert_allclose(CommitteeMargin().scores(c), Margin().scores(c), atol=1e-6)
    split = agree.copy()
    split[:, 1] = [[0.99, 0.01], [0.21, 0.79], [0.99, 0.01], [0.21, 0.79], [0.6, 0.4]]  # same mean, members split
    c = PoolContext(n_classes=2, proba=proba, mc_proba=split)
    assert CommitteeMargin().select(c, 1, rng()).tolist() == [1]
    assert CommitteeMargin(weight=0.0).scores(c) == pytest.approx(Margin().scores(c))
    with pytest.raises(ValueError, match="mc_proba"):
        CommitteeMargin().scores(PoolContext(n_classes=2, proba=proba))
