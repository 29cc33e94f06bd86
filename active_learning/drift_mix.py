"""Drift leads to action: part of each query batch comes from windows that drift, so reviewers see the new
kind of content soon and the next model learns it.

:func:`mix_drifted` is the policy (pure). :func:`drift_batch` reads which windows drift from the alert
store in the data layer (``labelloop.alerts_store``), never from ``monitoring``, which is downstream of
the loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from labelloop.alerts_store import AlertStore, window_ids
from labelloop.config import Settings


def mix_drifted(batch: np.ndarray, windows: np.ndarray, drifted: Mapping[str, float], scores: np.ndarray,
                share: float) -> np.ndarray:
    """The batch with its last ``ceil(share × len(batch))`` picks replaced by items from drifted windows.

    ``batch``: pool positions, most informative first. ``windows``: each pool item's window id.
    ``drifted``: drifted window id → severity. ``scores``: the strategy's informativeness per pool item.
    Drifted items already in the batch count towards the share. The rest are taken round-robin over the
    drifted windows, most severe window first, each window's most informative item first; with too few
    drifted items, fewer are swapped. The batch keeps its length and has no duplicates."""
    batch = np.asarray(batch, dtype=np.int64)
    if not len(batch) or share <= 0 or not drifted:
        return batch
    windows = np.asarray(windows).astype(str)
    want = math.ceil(share * len(batch))
    in_drift = np.isin(windows, list(drifted))
    have = int(in_drift[batch].sum())
    if have >= want:
        return batch
    taken = set(batch.tolist())
    queues = []
    for window in sorted(drifted, key=lambda w: (-drifted[w], w)):
        members = np.flatnonzero(windows == window)
        members = members[np.argsort(-scores[members], kind="stable")]
        queues.append([int(i) for i in members if int(i) not in taken])
    extra: list[int] = []
    while len(extra) < want - have and any(queues):
        for queue in queues:
            if queue and len(extra) < want - have:
                extra.append(queue.pop(0))
    if not extra:
        return batch
    keep = [int(i) for i in batch if in_drift[i]]  # drifted picks stay; replace from the least informative end
    others = [int(i) for i in batch if not in_drift[i]]
    others = others[: len(batch) - len(keep) - len(extra)]
    kept = set(keep) | set(others)
    return np.array([i for i in batch if int(i) in kept] + extra, dtype=np.int64)


def drift_batch(batch: np.ndarray, scores: np.ndarray, unlabeled: pd.DataFrame, settings: Settings) -> np.ndarray:
    """:func:`mix_drifted` with the open drift alerts of ``settings.drift_window`` windows (none: unchanged).

    The drifted picks then move right behind the batch's head: the loop cuts the quality slices' places
    from the batch's end (``slices_push.plan_batch``), and that cut must come out of the strategy's own
    picks, or the audit and overlap items would eat the drift share."""
    if settings.drift_query_share <= 0 or "created_at" not in unlabeled.columns:
        return batch
    store = AlertStore.existing(settings)
    if store is None:
        return batch
    with store:
        drifted = store.drifted_windows(settings.drift_window)
    if not drifted:
        return batch
    windows = window_ids(unlabeled, settings.drift_window).to_numpy()
    mixed = mix_drifted(batch, windows, drifted, scores, settings.drift_query_share)
    if len(mixed) < 2:
        return mixed
    rest = mixed[1:]
    in_drift = np.isin(windows[rest], list(drifted))
    return np.concatenate([mixed[:1], rest[in_drift], rest[~in_drift]]).astype(np.int64)
