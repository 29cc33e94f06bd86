"""Query strategies: which unlabeled items reviewers should see next.

Each strategy is a small class behind one interface (in the style of small-text): ``scores`` gives
every pool item an acquisition score (higher = more informative, used to order the review queue) and
``select`` picks a batch of ``k``. Everything is vectorised over the pool, because a live pool holds
tens of thousands of items and a round must stay well under a second.

Why several: plain uncertainty (margin) is the measured best single signal on skewed trust & safety
data, but it picks near-duplicates within a batch and, early on, ignores a rare class the model barely
predicts. The diversity (margin → k-means), class-balanced and mixed strategies address exactly those
failure modes; cold start covers the first batch, before any model exists.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

NEEDS = frozenset({"proba", "embeddings", "mc_proba"})
_EPS = 1e-12


@dataclass
class PoolContext:
    """What a strategy may look at for the ``N`` unlabeled pool items (rows aligned across fields).

    ``proba``: N x K predicted probabilities; ``embeddings``: N x D; ``mc_proba``: T x N x K stochastic
    predictions (MC dropout or a bootstrap committee); ``labeled_*``: the already-labeled set, for
    strategies that measure novelty against it.
    """

    n_classes: int
    proba: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    mc_proba: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    labeled_y: np.ndarray | None = None
    size: int | None = None  # pool size, for strategies that need no arrays (random)

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
        )

    def require(self, needs: frozenset[str], strategy: str) -> None:
        missing = sorted(n for n in needs if getattr(self, n) is None)
        if missing:
            raise ValueError(f"strategy {strategy!r} needs {missing} in the pool context")


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``k`` highest scores; equal scores are ordered randomly (reproducible by ``rng``)
    so ties never favour whatever order the pool happens to be stored in."""
    k = max(0, min(int(k), len(scores)))
    order = np.lexsort((rng.random(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return order[:k]


def _entropy(proba: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.clip(proba, _EPS, 1.0)
    return -(proba * np.log(p)).sum(axis=axis)


class QueryStrategy(ABC):
    name: str
    needs: frozenset[str] = frozenset()
    #: composite strategies wrap a base strategy, named in a spec as ``name:base``
    takes_base: bool = False

    @abstractmethod
    def scores(self, ctx: PoolContext) -> np.ndarray:
        """One acquisition score per pool item, higher = more informative."""

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        """Indices (into the pool) of a batch of ``k`` distinct items."""
        return top_k(self.scores(ctx), k, rng)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class RandomSampling(QueryStrategy):
    """The baseline every other strategy must beat; also the unbiased slice inside :class:`Mixed`."""

    name = "random"

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return np.zeros(ctx.n_items)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        n = ctx.n_items
        return rng.choice(n, size=max(0, min(int(k), n)), replace=False)


class LeastConfidence(QueryStrategy):
    name = "least_confidence"
    needs = frozenset({"proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self.needs, self.name)
        return 1.0 - ctx.proba.max(axis=1)


class Margin(QueryStrategy):
    """1 - (p_top1 - p_top2): highest where the model cannot separate its two best guesses."""

    name = "margin"
    needs = frozenset({"proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self.needs, self.name)
        if ctx.proba.shape[1] < 2:
            return np.zeros(len(ctx.proba))
        top2 = np.partition(ctx.proba, -2, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])


class Entropy(QueryStrategy):
    name = "entropy"
    needs = frozenset({"proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self.needs, self.name)
        return _entropy(ctx.proba)


class BALD(QueryStrategy):
    """Mutual information between the prediction and the model parameters (Houlsby et al. 2011):
    H(mean_t p_t) - mean_t H(p_t). High where stochastic predictions disagree, zero where they agree,
    so it separates model uncertainty (worth a label) from inherent ambiguity (a coin flip stays one)."""

    name = "bald"
    needs = frozenset({"mc_proba"})

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self.needs, self.name)
        mc = ctx.mc_proba
        return np.clip(_entropy(mc.mean(axis=0)) - _entropy(mc).mean(axis=0), 0.0, None)


class MarginKMeans(QueryStrategy):
    """Uncertainty first, then diversity: take the ``candidates_per_item * k`` highest-margin items,
    cluster their embeddings into ``k`` groups and keep the most uncertain item of each group, so one
    batch does not spend ten labels on ten near-copies of the same borderline tweet."""

    name = "margin_kmeans"
    needs = frozenset({"proba", "embeddings"})

    def __init__(self, candidates_per_item: int = 10, max_iter: int = 50):
        if candidates_per_item < 1:
            raise ValueError("candidates_per_item must be >= 1")
        self.candidates_per_item = candidates_per_item
        self.max_iter = max_iter
        self._margin = Margin()

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return self._margin.scores(ctx)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self.needs, self.name)
        scores = self.scores(ctx)
        candidates = top_k(scores, self.candidates_per_item * k, rng)
        if len(candidates) <= k:
            return candidates
        clusters = _kmeans(k, self.max_iter, rng).fit_predict(ctx.embeddings[candidates])
        chosen = _best_per_group(candidates, clusters, -scores[candidates])
        if len(chosen) < k:  # duplicate texts (retweets) leave clusters empty: top up by margin
            rest = candidates[~np.isin(candidates, chosen)]
            chosen = np.concatenate([chosen, rest[np.argsort(-scores[rest], kind="stable")[: k - len(chosen)]]])
        return chosen


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
        ctx.require(self.needs, self.name)
        x = np.asarray(ctx.embeddings, dtype=np.float64)
        return np.sqrt((self._residuals(ctx) ** 2).sum(1) * (x**2).sum(1))

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self.needs, self.name)
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

    def scores(self, ctx: PoolContext) -> np.ndarray:
        return self.base.scores(ctx)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self.needs, self.name)
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

    takes_base = True

    def __init__(self, base: QueryStrategy | str = "margin", random_fraction: float = 0.1):
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError("random_fraction must lie in [0, 1]")
        self.base = parse_strategy(base) if isinstance(base, str) else base
        self.random_fraction = random_fraction
        self.needs = self.base.needs

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


class ColdStartKMeans(QueryStrategy):
    """No model yet: k-means (k-means++ seeding) over encoder embeddings, one item per cluster — the
    member closest to its centroid — so the first labels cover the pool's topics instead of repeating
    its majority. Scores rank by novelty: distance to the nearest already-labeled item (0 without any)."""

    name = "cold_start"
    needs = frozenset({"embeddings"})

    def __init__(self, max_iter: int = 100):
        self.max_iter = max_iter

    def scores(self, ctx: PoolContext) -> np.ndarray:
        ctx.require(self.needs, self.name)
        if ctx.labeled_embeddings is None or not len(ctx.labeled_embeddings):
            return np.zeros(len(ctx.embeddings))
        x, lab = ctx.embeddings, ctx.labeled_embeddings
        sq = (x**2).sum(1)[:, None] + (lab**2).sum(1)[None, :] - 2.0 * x @ lab.T
        return np.sqrt(np.clip(sq, 0.0, None)).min(axis=1)

    def select(self, ctx: PoolContext, k: int, rng: np.random.Generator) -> np.ndarray:
        ctx.require(self.needs, self.name)
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
                Mixed, ColdStartKMeans)
}


def get_strategy(name: str, **kwargs) -> QueryStrategy:
    """A strategy by registry name, e.g. ``get_strategy("mixed", base="margin", random_fraction=0.2)``."""
    return _strategy_class(name)(**kwargs)


def _strategy_class(name: str) -> type[QueryStrategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown query strategy {name!r}; choose from {sorted(STRATEGIES)}, or "
                         f"{' / '.join(_composites())}:<base> (e.g. class_balanced:margin_kmeans)") from None


def _composites() -> list[str]:
    return sorted(name for name, cls in STRATEGIES.items() if cls.takes_base)


def parse_strategy(spec: str) -> QueryStrategy:
    """The strategy a spec names: ``name``, or ``name:base`` for a composite strategy, e.g.
    ``class_balanced:margin_kmeans`` or ``mixed:class_balanced:margin``.

    The one parser for every place a spec comes from (the ``strategy`` setting, ``labelloop simulate
    --strategies``, benchmarks), so a spec that works in a simulation works in the service too, and a
    bad one fails the same way everywhere: a ``ValueError`` naming the valid choices."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty query strategy spec; choose from {sorted(STRATEGIES)}")
    name, colon, base = (part.strip() for part in spec.strip().partition(":"))
    cls = _strategy_class(name)
    if not colon:
        return cls()
    if not cls.takes_base:
        raise ValueError(f"query strategy {name!r} takes no base strategy (in {spec!r}); only "
                         f"{_composites()} do, e.g. class_balanced:{name}")
    if not base:
        raise ValueError(f"query strategy spec {spec!r} names no base strategy after ':'")
    return cls(base=parse_strategy(base))


def validate_strategy_spec(spec: str) -> str:
    """``spec`` with surrounding whitespace removed, if :func:`parse_strategy` accepts it (raises
    ``ValueError`` otherwise): what settings store, so the loop never meets a bad spec at round time."""
    parse_strategy(spec)
    return ":".join(part.strip() for part in spec.strip().split(":"))
