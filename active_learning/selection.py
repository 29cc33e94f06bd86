"""Choosing the ``k`` best-scored items of a large pool without sorting all of it.

A full sort of a million scores is O(n log n) and, with a random tie-breaking key, a two-key lexsort; the
queue only ever needs the head. :func:`top_k` finds the ``k``-th best score with ``np.argpartition`` (O(n)),
keeps the items at or above it and sorts only those, so selecting 1,000 of 1M costs milliseconds. Equal
scores are still ordered by one random key per item drawn from ``rng`` exactly as a full lexsort would
order them, so a seeded round picks the same batch as before this shortcut existed.

Both the in-process loop (``strategies.top_k`` delegates here) and ``labelloop score`` select through it;
:func:`top_k_parquet` reads the one score column it needs from a scored Parquet file (local or object
storage, through pyarrow), never the rows.
"""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of the ``k`` highest ``scores``, best first. Ties are broken by a key drawn from ``rng``
    (one number per item, reproducible), or by position when ``rng`` is None. NaN scores rank last."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    k = max(0, min(int(k), n))
    tiebreak = rng.random(n) if rng is not None else np.arange(n, dtype=np.float64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    key = -scores
    if np.isnan(key).any():  # NaN sorts after every number in numpy: the full sort keeps that rule simple
        return np.lexsort((tiebreak, key))[:k].astype(np.int64)
    if k < n:
        kth = key[np.argpartition(key, k - 1)[k - 1]]
        candidates = np.flatnonzero(key <= kth)  # everything better than the k-th, and all of its ties
    else:
        candidates = np.arange(n)
    order = np.lexsort((tiebreak[candidates], key[candidates]))[:k]
    return candidates[order].astype(np.int64)


def top_k_parquet(path: str, column: str, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Row positions of the ``k`` highest values of ``column`` in the Parquet file ``path`` (a local path or
    a pyarrow filesystem URI such as ``s3://bucket/scores.parquet``), reading that column only."""
    import pyarrow.parquet as pq

    values = pq.read_table(path, columns=[column]).column(column).to_numpy(zero_copy_only=False)
    return top_k(values, k, rng)
