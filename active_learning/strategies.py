"""Query strategies: which unlabeled items reviewers should see next.

Each strategy is a small class behind one interface (in the style of small-text): ``scores`` gives
every pool item an acquisition score (higher = more informative, used to order the review queue) and
``select`` picks a batch of ``k``. Everything is vectorised over the pool, because a live pool holds
tens of thousands of items and a round must stay well under a second.

Why several: plain uncertainty (margin) is the measured best single signal on skewed trust & safety
data, but it picks near-duplicates within a batch and, early on, ignores a rare class the model barely
predicts. The diversity (margin → k-means), class-balanced and mixed strategies address exactly those
failure modes; cold start covers the first batch, before any model exists.

Multi-label models (one sigmoid per label, labels chosen independently) need their own signals: a row
of their probabilities does not sum to one, so margin and softmax entropy are meaningless on it. Each
strategy therefore declares the model kinds it makes sense for (``kinds``), a spec is checked against
the taxonomy's kind when it is parsed, and ``auto`` resolves to a default per kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from active_learning.selection import top_k as partitioned_top_k

NEEDS = frozenset({"proba", "embeddings", "mc_proba", "labeled_y", "severe_classes"})
_EPS = 1e-12

SINGLE, MULTI = "single-label", "multi-label"
BOTH = frozenset({SINGLE, MULTI})
#: what ``strategy = "auto"`` (the setting's default) means for each kind of model. Single-label: margin with
#: the k-means diversity step, the arm measured best on Davidson, a rare-harm task, with the fast head's
#: embedding and with its n-gram features, and not below random on TweetEval-offensive
#: (bench/results/al_levers.md, al_summary.md); no variant of it measured since (candidate pool, class quotas,
#: cold start, early batch size, committee, rare-class and density weights) beat it at 500 and 1,000 labels
#: (bench/results/al_levers_selection.md).
#: Multi-label: on ETHOS (bench/results/al_curves_ethos_multilabel.md) mean binary entropy with the k-means
#: diversity step is the only arm that beats random clearly at some budget and falls clearly below it at
#: none; without the diversity step the same score falls clearly below random at some budgets.
AUTO = "auto"
DEFAULT_STRATEGY = {SINGLE: "margin_kmeans", MULTI: "kmeans:mean_binary_entropy"}


def kind_of(multi_label: bool) -> str:
    return MULTI if multi_label else SINGLE


@dataclass
class PoolContext:
    """What a strategy may look at for the ``N`` unlabeled pool items (rows aligned across fields).

    ``proba``: N x K predicted probabilities — softmax rows for a single-label model, independent
    per-label sigmoid probabilities when ``multi_label``; ``embeddings``: N x D; ``mc_proba``: T x N x K
    stochastic predictions (MC dropout or a bootstrap committee); ``labeled_*``: the already-labeled set,
    for strategies that measure novelty or label cardinality against it (``labeled_y``: label ids for a
    single-label model, an L x K 0/1 matrix for a multi-label one); ``thresholds``: the multi-label
    model's per-label decision thresholds (0.5 each when absent).
    """

    n_classes: int
    proba: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    mc_proba: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    labeled_y: np.ndarray | None = None
    size: int | None = None  # pool size, for strategies that need no arrays (random)
    multi_label: bool = False
    thresholds: np.ndarray | None = None
    #: class indices of the severe labels (``[severity] severe_labels``), for severity-weighted acquisition
    severe_classes: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return kind_of(self.multi_label)

    def decision_thresholds(self) -> np.ndarray:
        if self.thresholds is None:
            return np.full(self.n_classes, 0.5)
        return np.asarray(self.thresholds, dtype=np.float64)

    @property
    def n_items(self) -> int:
        if self.size is not None:
            return self.size
        for arr in (self.proba, self.embeddings):
            if arr is not None:
                return len(arr)
        if self.mc_proba is not None:
            return self.mc_proba.shape[1]
        raise ValueError("PoolContext holds neither proba, embeddings nor mc_proba: pool size unknown")

    def subset(self, indices: np.ndarray) -> PoolContext:
        """The same context restricted to the pool items ``indices`` (labeled set unchanged)."""
        return PoolContext(
            n_classes=self.n_classes,
            proba=None if self.proba is None else self.proba[indices],
            embeddings=None if self.embeddings is None else self.embeddings[indices],
            mc_proba=None if self.mc_proba is None else self.mc_proba[:, indices],
            labeled_embeddings=self.labeled_embeddings,
            labeled_y=self.labeled_y,
            size=len(indices),
            multi_label=self.multi_label,
            thresholds=self.thresholds,
            severe_classes=self.severe_classes,
        )

    def require(self, strategy: QueryStrategy) -> None:
        """Refuse a context that lacks what ``strategy`` needs, or holds a kind of model it is not for."""
        if self.kind not in strategy.kinds:
            raise KindMismatch(strategy, self.multi_label)
        missing = sorted(n for n in strategy.needs if getattr(self, n) is None)
        if missing:
            raise ValueError(f"strategy {strategy.name!r} needs {missing} in the pool context")


class KindMismatch(ValueError):
    """A strategy asked to rank the predictions of a kind of model it is not defined for."""

    def __init__(self, strategy: QueryStrategy, multi_label: bool):
        kind = kind_of(multi_label)
        fits = sorted(name for name, cls in STRATEGIES.items() if kind in cls.kinds)
        super().__init__(
            f"query strategy {strategy.name!r} is for {' and '.join(sorted(type(strategy).kinds))} models only, "
            f"but the taxonomy is {kind}; for {kind} models choose from {fits} (or {AUTO!r}: "
            f"{DEFAULT_STRATEGY[kind]})")


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``k`` highest scores; equal scores are ordered randomly (reproducible by ``rng``)
    so ties never favour whatever order the pool happens to be stored in. Partitions instead of sorting the
    whole pool (:mod:`active_learning.selection`, shared with ``labelloop score``)."""
    return partitioned_top_k(scores, k, rng)


def _entropy(proba: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.clip(proba, _EPS, 1.0)
    return -(proba * np.log(p)).sum(axis=axis)


def _binary_entropy(proba: np.ndarray) -> np.ndarray:
    """Element-wise entropy (nats) of independent yes/no decisions with probabilities ``proba``."""
    p = np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0 - _EPS)
    return -(p * np.log(p) + (1.0 - p) * np.log1p(-p))


class QueryStrategy(ABC):
    name: str
    needs: frozenset[str] = frozenset()
    #: the kinds of model whose predictions the strategy makes sense for (a composite's own kinds are
    #: narrowed to its base's when it is built)
    kinds: frozenset[str] = frozenset({SINGLE})
    #: composite strategies wrap a base strategy, named in a spec as ``name:base``
    takes_base: bool = False

    @abstractmethod
    def scores(self, ctx: PoolContext) -> np.ndarray:
        """One acquisition score per pool item, higher = more informative."""

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        """Indices (into the pool) of a batch of ``k`` distinct items."""
        return top_k(self.scores(ctx), k, rng)

    @property
    def spec(self) -> str:
        """The spec that rebuilds this strategy, base included: what round reports and queue logs show,
        so ``kmeans:mean_binary_entropy`` is not reported as a bare ``kmeans``."""
        base = getattr(self, "base", None)
        return f"{self.name}:{base.spec}" if self.takes_base and base is not None else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class RandomSampling(QueryStrategy):
    """The baseline every other strategy must beat; also the unbiased slice inside :class:`Mixed`."""

    name = "random"
    kinds = BOTH

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return np.zeros(ctx.n_items)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        n = ctx.n_items
        return rng.choice(n, size=max(0, min(int(k), n)), replace=False)


class LeastConfidence(QueryStrategy):
    name = "least_confidence"
    needs = frozenset({"proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        return 1.0 - ctx.proba.max(axis=1)


class Margin(QueryStrategy):
    """1 - (p_top1 - p_top2): highest where the model cannot separate its two best guesses."""

    name = "margin"
    needs = frozenset({"proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        if ctx.proba.shape[1] < 2:
            return np.zeros(len(ctx.proba))
        top2 = np.partition(ctx.proba, -2, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])


class Entropy(QueryStrategy):
    name = "entropy"
    needs = frozenset({"proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        return _entropy(ctx.proba)


class BALD(QueryStrategy):
    """Mutual information between the prediction and the model parameters (Houlsby et al. 2011):
    H(mean_t p_t) - mean_t H(p_t). High where stochastic predictions disagree, zero where they agree,
    so it separates model uncertainty (worth a label) from inherent ambiguity (a coin flip stays one)."""

    name = "bald"
    needs = frozenset({"mc_proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        mc = ctx.mc_proba
        return np.clip(_entropy(mc.mean(axis=0)) - _entropy(mc).mean(axis=0), 0.0, None)


class DiverseKMeans(QueryStrategy):
    """Uncertainty first, then diversity: take the ``candidates_per_item * k`` items the base strategy
    scores highest, cluster their embeddings into ``k`` groups and keep the best-scored item of each
    group, so one batch does not spend ten labels on ten near-copies of the same borderline tweet.
    Named ``kmeans:<base>`` in a spec, so any uncertainty score (single- or multi-label) gets the same
    diversity step."""

    name = "kmeans"
    takes_base = True
    kinds = BOTH

    def __init__(self, base: QueryStrategy | str = "margin", candidates_per_item: int = 10, max_iter: int = 50):
        if candidates_per_item < 1:
            raise ValueError("candidates_per_item must be >= 1")
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.candidates_per_item = candidates_per_item
        self.max_iter = max_iter
        self.needs = frozenset({"embeddings"}) | self.base.needs
        self.kinds = type(self).kinds & self.base.kinds

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return self.base.scores(ctx)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self)
        scores = self.scores(ctx)
        candidates = top_k(scores, self.candidates_per_item * k, rng)
        if len(candidates) <= k:
            return candidates
        clusters = _kmeans(k, self.max_iter, rng).fit_predict(ctx.embeddings[candidates])
        chosen = _best_per_group(candidates, clusters, -scores[candidates])
        if len(chosen) < k:  # duplicate texts (retweets) leave clusters empty: top up by score
            rest = candidates[~np.isin(candidates, chosen)]
            chosen = np.concatenate([chosen, rest[np.argsort(-scores[rest], kind="stable")[: k - len(chosen)]]])
        return chosen


class MarginKMeans(DiverseKMeans):
    """``kmeans:margin`` under the name the settings and published benchmarks have always used."""

    name = "margin_kmeans"
    takes_base = False
    kinds = frozenset({SINGLE})

    def __init__(self, candidates_per_item: int = 10, max_iter: int = 50):
        super().__init__(Margin(), candidates_per_item, max_iter)


class Badge(QueryStrategy):
    """BADGE (Ash et al. 2020) for a linear softmax head: k-means++ seeding over the gradient the
    head's loss would get if the predicted label were correct, g = (p - onehot(argmax p)) ⊗ x. Its
    length grows with uncertainty and its direction with the item's content, so one sampling pass
    trades the two off with no tuning knob. Distances come from ‖g‖² = ‖a‖²‖x‖² and
    g_i·g_j = (a_i·a_j)(x_i·x_j) with a = p - onehot: the N x (K·D) gradients are never built, and
    each of the ``k`` seeding steps is one vectorised pass over the pool."""

    name = "badge"
    needs = frozenset({"proba", "embeddings"})

    def _residuals(self, ctx: PoolContext) -> np.ndarray:
        a = np.asarray(ctx.proba, dtype=np.float64).copy()
        a[np.arange(len(a)), a.argmax(axis=1)] -= 1.0
        return a

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        x = np.asarray(ctx.embeddings, dtype=np.float64)
        return np.sqrt((self._residuals(ctx) ** 2).sum(1) * (x**2).sum(1))

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self)
        n = ctx.n_items
        k = max(0, min(int(k), n))
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        a, x = self._residuals(ctx), np.asarray(ctx.embeddings, dtype=np.float64)
        norms = (a**2).sum(1) * (x**2).sum(1)
        chosen = [int(top_k(norms, 1, rng)[0])]
        nearest = np.full(n, np.inf)
        for _ in range(k - 1):
            c = chosen[-1]
            d2 = np.clip(norms + norms[c] - 2.0 * (a @ a[c]) * (x @ x[c]), 0.0, None)
            nearest = np.minimum(nearest, d2)
            nearest[chosen] = 0.0
            total = nearest.sum()
            if total <= 0:  # every remaining item duplicates a chosen one: fill uniformly
                rest = np.setdiff1d(np.arange(n), chosen)
                chosen.extend(rng.choice(rest, size=k - len(chosen), replace=False).tolist())
                break
            chosen.append(int(rng.choice(n, p=nearest / total)))
        return np.asarray(chosen, dtype=np.int64)


class MeanBinaryEntropy(QueryStrategy):
    """Multi-label uncertainty: the mean over labels of each yes/no decision's entropy. Every label a
    model is unsure about adds to the score, so an item with several borderline labels ranks above one
    with a single borderline label — the item whose review settles the most decisions at once."""

    name = "mean_binary_entropy"
    needs = frozenset({"proba"})
    kinds = frozenset({MULTI})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        return _binary_entropy(ctx.proba).mean(axis=1)


class MaxBinaryEntropy(QueryStrategy):
    """Multi-label uncertainty of the single most doubtful label. Unlike the mean it is not diluted by
    the many labels an item clearly lacks, so a rare label's borderline items are not outranked by
    items that are mildly unsure about every common one."""

    name = "max_binary_entropy"
    needs = frozenset({"proba"})
    kinds = frozenset({MULTI})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        if not ctx.proba.shape[1]:
            return np.zeros(len(ctx.proba))
        return _binary_entropy(ctx.proba).max(axis=1)


class CardinalityInconsistency(QueryStrategy):
    """Label-cardinality inconsistency weighted by uncertainty (Li & Guo, IJCAI 2013):
    ``u(x)**beta * c(x)**(1 - beta)``, where ``c(x) = |n(x) - mean cardinality|`` is the distance between
    how many labels the model decides for the item (``proba >= thresholds``) and the labeled set's mean
    number of labels per item, and ``u`` is the mean binary entropy scaled to [0, 1].

    Per-label uncertainty alone cannot see a structural mistake: a model that gives a post four targets,
    or none, when posts carry one or two, is likely wrong about the set even when each label looks
    confident. The uncertainty factor keeps the ranking among equally inconsistent items informative."""

    name = "cardinality"
    needs = frozenset({"proba", "labeled_y"})
    kinds = frozenset({MULTI})

    def __init__(self, beta: float = 0.5):
        if not 0.0 <= beta <= 1.0:
            raise ValueError("beta must lie in [0, 1]")
        self.beta = beta

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        labeled = np.asarray(ctx.labeled_y)
        if labeled.ndim != 2 or labeled.shape[1] != ctx.proba.shape[1]:
            raise ValueError(f"strategy {self.name!r} needs the labeled set as an L x {ctx.proba.shape[1]} "
                             f"0/1 matrix, got shape {labeled.shape}")
        mean_cardinality = labeled.sum(axis=1).mean() if len(labeled) else 0.0
        decided = (ctx.proba >= ctx.decision_thresholds()).sum(axis=1)
        inconsistency = np.abs(decided - mean_cardinality)
        uncertainty = _binary_entropy(ctx.proba).mean(axis=1) / np.log(2.0) if ctx.proba.shape[1] else 0.0
        return uncertainty**self.beta * inconsistency ** (1.0 - self.beta)


def _kmeans(k: int, max_iter: int, rng: np.random.Generator):
    """One k-means++ run seeded from ``rng``. scikit-learn is imported here, not at module level: the
    settings validate the ``strategy`` setting through this module on every load, and importing
    ``sklearn.cluster`` costs seconds that commands which never cluster should not pay."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=int(rng.integers(2**31 - 1)))


def _best_per_group(items: np.ndarray, groups: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """For each group, the item with the lowest cost (vectorised: sort by (group, cost), keep firsts)."""
    order = np.lexsort((cost, groups))
    _, first = np.unique(groups[order], return_index=True)
    return items[order[first]]


class ClassBalanced(QueryStrategy):
    """Split the batch evenly across *predicted* classes, most uncertain first within each.

    Pure uncertainty sampling follows the model's blind spots: early on a rare class (hate: 6 % of
    Davidson) is predicted for few items, so few of them are ever shown and the rare class stays
    under-learned. An equal share per predicted class guarantees reviewers see the rare class's
    candidates every round; shares a class cannot fill go to the others.
    """

    name = "class_balanced"
    needs = frozenset({"proba"})

    takes_base = True

    def __init__(self, base: QueryStrategy | str = "margin"):
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.needs = frozenset({"proba"}) | self.base.needs
        self.kinds = type(self).kinds & self.base.kinds

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return self.base.scores(ctx)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self)
        k = max(0, min(int(k), ctx.n_items))
        predicted = ctx.proba.argmax(axis=1)
        quota = _water_fill(np.bincount(predicted, minlength=ctx.n_classes), k)
        # Within each predicted class the base strategy chooses (loops over classes, not items), so
        # class_balanced:margin_kmeans also spreads each class's share over clusters.
        parts = []
        for c in np.flatnonzero(quota):
            members = np.flatnonzero(predicted == c)
            parts.append(members[self.base.select(ctx.subset(members), int(quota[c]), rng)])
        chosen = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        scores = self.scores(ctx)[chosen]
        return chosen[np.lexsort((rng.random(len(chosen)), -scores))]


def _water_fill(available: np.ndarray, k: int) -> np.ndarray:
    """Split ``k`` as evenly as possible over classes, never giving a class more than it has; what a
    small class cannot take is shared among the rest (loops over classes, never over items)."""
    quota = np.zeros_like(available)
    remaining = int(min(k, available.sum()))
    open_classes = available > 0
    while remaining > 0 and open_classes.any():
        share, extra = divmod(remaining, int(open_classes.sum()))
        grant = np.where(open_classes, share, 0)
        grant[np.flatnonzero(open_classes)[:extra]] += 1
        grant = np.minimum(grant, available - quota)
        quota += grant
        remaining -= int(grant.sum())
        open_classes = quota < available
    return quota


class Mixed(QueryStrategy):
    """Mostly ``base``, plus a random slice of ``random_fraction`` of each batch: keeps the labeled set
    an honest sample of the pool (unbiased estimates, recovery from a confidently wrong model)."""

    name = "mixed"
    kinds = BOTH
    takes_base = True

    def __init__(self, base: QueryStrategy | str = "margin", random_fraction: float = 0.1):
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError("random_fraction must lie in [0, 1]")
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.random_fraction = random_fraction
        self.needs = self.base.needs
        self.kinds = type(self).kinds & self.base.kinds

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return self.base.scores(ctx)

    def n_random(self, k: int) -> int:
        return int(round(k * self.random_fraction))

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        n = ctx.n_items
        k = max(0, min(int(k), n))
        n_random = self.n_random(k)
        from_base = self.base.select(ctx, k - n_random, rng)
        rest = np.setdiff1d(np.arange(n), from_base, assume_unique=True)
        return np.concatenate([from_base, rng.choice(rest, size=n_random, replace=False)])


class SeverityWeighted(QueryStrategy):
    """The base strategy's score times ``1 + boost * p(severe)``: among equally informative items, the ones
    the model thinks may be severe come first, so for the same budget more severe items reach reviewers (and
    the escalation path) early, while an item the model is sure is harmless keeps its plain score.

    ``p(severe)`` is the predicted probability of any severe class: their summed softmax probability for a
    single-label model, the largest of their sigmoid probabilities for a multi-label one. The base score is
    shifted to be non-negative first, so the weight always ranks up, never down."""

    name = "severity_weighted"
    needs = frozenset({"proba", "severe_classes"})
    kinds = BOTH
    takes_base = True

    def __init__(self, base: QueryStrategy | str = "margin", boost: float = 2.0):
        if boost < 0:
            raise ValueError("boost must be >= 0")
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.boost = boost
        self.needs = type(self).needs | self.base.needs
        self.kinds = type(self).kinds & self.base.kinds

    def severe_probability(self, ctx: PoolContext) -> np.ndarray:
        severe = np.asarray(ctx.severe_classes, dtype=np.int64)
        if severe.size == 0:
            raise ValueError("severity_weighted needs severe labels: set [severity] severe_labels in the "
                             "taxonomy file or the settings")
        part = ctx.proba[:, severe]
        return part.max(axis=1) if ctx.multi_label else part.sum(axis=1)

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        base = self.base.scores(ctx)
        base = base - min(0.0, float(base.min())) if len(base) else base
        return base * (1.0 + self.boost * self.severe_probability(ctx))


class RareWeighted(QueryStrategy):
    """The base strategy's score times ``(sum_c p_c / (K * q_c)) ** power``, where ``q_c`` is class ``c``'s
    share of the labels so far (add-one smoothed): among equally uncertain items, the one the model thinks
    may belong to a class the labeled set is short of comes first.

    Macro-F1 weighs every class equally, so on a skewed task (Davidson's hate class is 6 % of the pool) the
    rare class's F1 decides it, and the rare class is what plain uncertainty under-samples early. Unlike
    :class:`ClassBalanced`, which hands the rare predicted class a fixed share of each batch whatever its
    candidates are worth, the weight multiplies the base score, so an item must still be uncertain to be chosen; unlike
    :class:`SeverityWeighted`, it needs no severity policy and follows the labels: when the classes are
    balanced every weight is 1 and the base strategy is unchanged, and the push fades as the rare class
    catches up. The base score is shifted to be non-negative first, so the weight always ranks up.

    Not the default: on Davidson it labels far more of the rare class but gains less than the plain base at
    500 and 1,000 labels, and as much or more only at 2,000 (bench/results/al_levers_selection.md)."""

    name = "rare_weighted"
    needs = frozenset({"proba", "labeled_y"})
    takes_base = True

    def __init__(self, base: QueryStrategy | str = "margin", power: float = 1.0):
        if power < 0:
            raise ValueError("power must be >= 0")
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.power = power
        self.needs = type(self).needs | self.base.needs
        self.kinds = type(self).kinds & self.base.kinds

    def class_weights(self, ctx: PoolContext) -> np.ndarray:
        """``1 / (K * q_c)`` per class: 1 for a class holding its fair share of the labels, above 1 below it."""
        counts = np.bincount(np.asarray(ctx.labeled_y, dtype=np.int64), minlength=ctx.n_classes)
        share = (counts + 1.0) / (counts.sum() + ctx.n_classes)
        return 1.0 / (ctx.n_classes * share)

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        base = self.base.scores(ctx)
        base = base - min(0.0, float(base.min())) if len(base) else base
        return base * (ctx.proba @ self.class_weights(ctx)) ** self.power


class DensityWeighted(QueryStrategy):
    """The base strategy's score times the item's density to the power ``beta`` (information density, Settles
    & Craven 2008): density is the mean cosine similarity, mapped to [0, 1], between the item and its
    ``neighbours`` most similar items in a fixed, evenly spaced sample of up to ``sample`` pool items.

    Uncertainty alone can favour outliers whose labels teach the head little about the rest of the pool;
    weighting by how typical an item is of the pool prefers the uncertain
    items whose label generalises to many others, which matters most while the labeled set is small.

    Not the default: on Davidson it measured below the plain base at every budget
    (bench/results/al_levers_selection.md)."""

    name = "density_weighted"
    needs = frozenset({"embeddings"})
    takes_base = True

    def __init__(self, base: QueryStrategy | str = "margin", beta: float = 1.0, sample: int = 1000,
                 neighbours: int = 20):
        if beta < 0 or sample < 1 or neighbours < 1:
            raise ValueError("beta must be >= 0, sample and neighbours >= 1")
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.beta, self.sample, self.neighbours = beta, sample, neighbours
        self.needs = type(self).needs | self.base.needs
        self.kinds = type(self).kinds & self.base.kinds

    def density(self, ctx: PoolContext) -> np.ndarray:
        x = np.asarray(ctx.embeddings, dtype=np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        if not len(x):
            return np.zeros(0)
        reference = x[np.linspace(0, len(x) - 1, min(self.sample, len(x))).astype(np.int64)]
        similarity = x @ reference.T
        nearest = min(self.neighbours, similarity.shape[1])
        top = np.partition(similarity, similarity.shape[1] - nearest, axis=1)[:, -nearest:]
        return (1.0 + top.mean(axis=1)) / 2.0

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        base = self.base.scores(ctx)
        base = base - min(0.0, float(base.min())) if len(base) else base
        return base * np.clip(self.density(ctx), 0.0, None) ** self.beta


class CommitteeMargin(QueryStrategy):
    """Margin plus ``weight`` times the committee's disagreement (BALD, scaled to [0, 1] by ``log K``).

    Margin alone cannot tell an item the head is unsure about because it has seen too little like it from
    one that is ambiguous by nature (a tweet reviewers split on stays a coin flip however many neighbours
    get labeled). A bootstrap committee disagrees on the first kind only; adding its disagreement to the
    margin moves those items forward without discarding margin's signal, which BALD alone does. With the
    k-means step it measured no better than ``margin_kmeans``, at five refits per round
    (bench/results/al_levers_selection.md)."""

    name = "committee_margin"
    needs = frozenset({"proba", "mc_proba"})

    def __init__(self, weight: float = 1.0):
        if weight < 0:
            raise ValueError("weight must be >= 0")
        self.weight = weight

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        disagreement = BALD().scores(ctx) / np.log(max(ctx.n_classes, 2))
        return Margin().scores(ctx) + self.weight * disagreement


class ColdStartKMeans(QueryStrategy):
    """No model yet: k-means (k-means++ seeding) over encoder embeddings, one item per cluster — the
    member closest to its centroid — so the first labels cover the pool's topics instead of repeating
    its majority. Scores rank by novelty: distance to the nearest already-labeled item (0 without any)."""

    name = "cold_start"
    needs = frozenset({"embeddings"})
    kinds = BOTH

    def __init__(self, max_iter: int = 100):
        self.max_iter = max_iter

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self)
        if ctx.labeled_embeddings is None or not len(ctx.labeled_embeddings):
            return np.zeros(len(ctx.embeddings))
        x, lab = ctx.embeddings, ctx.labeled_embeddings
        sq = (x**2).sum(1)[:, None] + (lab**2).sum(1)[None, :] - 2.0 * x @ lab.T
        return np.sqrt(np.clip(sq, 0.0, None)).min(axis=1)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self)
        n = len(ctx.embeddings)
        k = max(0, min(int(k), n))
        if k == 0 or k == n:
            return rng.permutation(n)[:k]
        km = _kmeans(k, self.max_iter, rng).fit(ctx.embeddings)
        distance = np.linalg.norm(ctx.embeddings - km.cluster_centers_[km.labels_], axis=1)
        chosen = _best_per_group(np.arange(n), km.labels_, distance)
        if len(chosen) < k:  # k-means left a cluster empty: top up with random unchosen items
            rest = np.setdiff1d(np.arange(n), chosen, assume_unique=True)
            chosen = np.concatenate([chosen, rng.choice(rest, size=k - len(chosen), replace=False)])
        return chosen


STRATEGIES: dict[str, type[QueryStrategy]] = {
    cls.name: cls
    for cls in (RandomSampling, LeastConfidence, Margin, Entropy, BALD, MarginKMeans, Badge, ClassBalanced,
                Mixed, ColdStartKMeans, DiverseKMeans, MeanBinaryEntropy, MaxBinaryEntropy,
                CardinalityInconsistency, SeverityWeighted, RareWeighted, CommitteeMargin,
                DensityWeighted)
}


def get_strategy(name: str, **kwargs) -> QueryStrategy:
    """A strategy by registry name, e.g. ``get_strategy("mixed", base="margin", random_fraction=0.2)``."""
    return _strategy_class(name)(**kwargs)


def _strategy_class(name: str) -> type[QueryStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown query strategy {name!r}; choose from {sorted(STRATEGIES)}, or "
                         f"{' / '.join(_composites())}:<base> (e.g. class_balanced:margin_kmeans), or "
                         f"{AUTO!r} (the default for the taxonomy's kind)") from None


def _composites() -> list[str]:
    return sorted(name for name, cls in STRATEGIES.items() if cls.takes_base)


def parse_strategy(spec: str, multi_label: bool | None = None) -> QueryStrategy:
    """The strategy a spec names: ``name``, or ``name:base`` for a composite strategy, e.g.
    ``class_balanced:margin_kmeans``, ``mixed:class_balanced:margin`` or ``kmeans:mean_binary_entropy``;
    ``auto`` names the default strategy of the model's kind (:data:`DEFAULT_STRATEGY`).

    The one parser for every place a spec comes from (the ``strategy`` setting, ``labelloop simulate
    --strategies``, benchmarks), so a spec that works in a simulation works in the service too, and a
    bad one fails the same way everywhere: a ``ValueError`` naming the valid choices.

    ``multi_label``: the kind of model the strategy will rank for. Given, a spec with a part that is not
    defined for that kind (margin on sigmoid outputs) is refused here, before any round runs, and
    ``auto`` resolves for that kind; ``None`` skips the check (kind not known yet) and ``auto`` resolves
    to the single-label default."""
    strategy = _parse(spec, bool(multi_label))
    if multi_label is not None:
        part: QueryStrategy | None = strategy
        while part is not None:
            if kind_of(multi_label) not in type(part).kinds:
                raise KindMismatch(part, multi_label)
            part = getattr(part, "base", None) if part.takes_base else None
    return strategy


def _parse(spec: str, multi_label: bool) -> QueryStrategy:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty query strategy spec; choose from {sorted(STRATEGIES)} or {AUTO!r}")
    name, colon, base = (part.strip() for part in spec.strip().partition(":"))
    if name == AUTO and not colon:
        return _parse(DEFAULT_STRATEGY[kind_of(multi_label)], multi_label)
    cls = _strategy_class(name) if name != AUTO else None
    if not colon:
        return cls()
    if cls is None or not cls.takes_base:
        raise ValueError(f"query strategy {name!r} takes no base strategy (in {spec!r}); only "
                         f"{_composites()} do, e.g. class_balanced:{name}")
    if not base:
        raise ValueError(f"query strategy spec {spec!r} names no base strategy after ':'")
    return cls(base=_parse(base, multi_label))


def validate_strategy_spec(spec: str, multi_label: bool | None = None) -> str:
    """``spec`` with surrounding whitespace removed, if :func:`parse_strategy` accepts it for the kind of
    model ``multi_label`` says (raises ``ValueError`` otherwise): what settings store, so the loop never
    meets a bad spec at round time. ``auto`` stays ``auto``: it resolves when the kind is known."""
    parse_strategy(spec, multi_label)
    return ":".join(part.strip() for part in spec.strip().split(":"))
