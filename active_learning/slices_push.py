"""Mixing the quality slices into each pushed queue: blind audit items, honeypots and overlap copies.

Each batch the loop pushes (``query_batch`` items) gives a share of its places to measurement:

* **audit** (``audit_rate``): pool items drawn uniformly at random, shown with nothing pre-selected. Their
  priority is pushed as a prediction with an empty ``result``: Label Studio's uncertainty sampling orders by
  the prediction's ``score`` whatever its result, and the labeling screen has no choice to pre-select. An
  audit item keeps that role until it is labelled (it is never pushed with a pre-label later), so the
  audit stays blind.
* **honeypots** (``honeypot_rate``): frozen-evaluation items with known labels, imported as ordinary
  tasks (same ``text``/``item_id`` fields, the item's own dataset id) and pre-labelled by the model like
  any other item, so reviewers cannot tell them apart. Their labels never train (see
  :mod:`active_learning.training_labels`).
* **overlap** (``overlap_rate``): a second task for an item of the active-learning batch, queued right
  behind its source. Label Studio's open-source edition has no per-user assignment, and
  ``maximum_annotations > 1`` would switch ``/next`` to breadth-first and break the order. What it does
  have is per-user task locks: the reviewer who is served the source holds it until they submit, so
  the next ``/next`` from anyone else is served the copy. Queued right behind the source, the copy goes
  to a different reviewer whenever another one asks for work during the source's labeling time, which
  with two or more reviewers at work is nearly always; queued anywhere else, the source's own reviewer
  would get it about one time in the number of reviewers. With a single reviewer at work nothing can give
  a second annotator,
  and the journal shows it (both tasks carry the same annotator), so the measures can leave it out.

Slice items are interleaved at random places inside the batch, never ahead of its most informative item,
so the active-learning order holds for everything else. Slice tasks still waiting for a label when a new
champion re-ranks the queue are pushed again under the new model version (else they would fall out of
uncertainty sampling), keeping their role; pending adjudications (:mod:`active_learning.adjudication`)
stay at the very front.

Counts per batch use stochastic rounding, so the shares hold on average even for small batches.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from active_learning.labelstudio import PredictionIn, PriorityIn
from labelloop.config import Settings
from labelloop.slices import SliceItem, SliceKind, SliceStore

#: adjudication priorities lie in [ADJUDICATION_FLOOR, 0), ahead of every active-learning priority (>= 0)
ADJUDICATION_FLOOR = -1.0


@dataclass(frozen=True)
class SliceRates:
    audit: float = 0.0
    honeypot: float = 0.0
    overlap: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SliceRates:
        return cls(settings.audit_rate, settings.honeypot_rate, settings.overlap_rate)


@dataclass(frozen=True)
class SliceCounts:
    audit: int = 0
    honeypot: int = 0
    overlap: int = 0


def batch_rng(seed: int, model_version: str) -> np.random.Generator:
    """A generator per (seed, batch): reproducible, yet each champion's batch draws afresh."""
    return np.random.default_rng([seed, zlib.crc32(model_version.encode())])


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
    whole = int(np.floor(x))
    return whole + int(rng.random() < x - whole)


def slice_counts(batch: int, rates: SliceRates, rng: np.random.Generator) -> SliceCounts:
    """How many of ``batch`` places go to each slice; the active-learning items keep at least the rest."""
    audit = min(_stochastic_round(batch * rates.audit, rng), batch)
    honeypot = min(_stochastic_round(batch * rates.honeypot, rng), batch - audit)
    overlap = min(_stochastic_round(batch * rates.overlap, rng), batch - audit - honeypot)
    return SliceCounts(audit, honeypot, overlap)


# ---------------------------------------------------------------------------------------- queue entries
@dataclass(frozen=True)
class Suggested:
    """A task shown with the model's (or the disputed) label pre-selected; a label set (tuple) in a
    multi-label project."""

    task_id: int
    label: str | tuple[str, ...]

    def prediction(self, score: float, model_version: str) -> PriorityIn:
        return PredictionIn(task_id=self.task_id, label=self.label, score=score, model_version=model_version)


@dataclass(frozen=True)
class Blind:
    """A task shown with nothing pre-selected (audit): the priority alone."""

    task_id: int

    def prediction(self, score: float, model_version: str) -> PriorityIn:
        return PriorityIn(task_id=self.task_id, score=score, model_version=model_version)


Entry = Suggested | Blind


def interleave(batch: list[Entry], extras: list[Entry], rng: np.random.Generator) -> list[Entry]:
    """``extras`` at uniformly random places among ``batch``, never before its head (the most informative
    item stays first), their relative order kept."""
    if not batch:
        return list(extras)
    slots = np.sort(rng.integers(1, len(batch) + 1, size=len(extras)))
    out: list[Entry] = []
    j = 0
    for i, entry in enumerate(batch):
        while j < len(extras) and slots[j] == i:
            out.append(extras[j])
            j += 1
        out.append(entry)
    out.extend(extras[j:])
    return out


def follow(order: list[Entry], copies: dict[int, list[Entry]]) -> list[Entry]:
    """Each copy right behind the entry of its source task."""
    out: list[Entry] = []
    for entry in order:
        out.append(entry)
        out.extend(copies.get(entry.task_id, ()))
    return out


def priorities_for(order: list[Entry], adjudications: list[Entry], n_classes: int, model_version: str
                   ) -> list[PriorityIn]:
    """Unique priorities: adjudications in [-1, 0) first, then ``order`` in [0, 1/K) (see ``loop.priorities``)."""
    adj = ADJUDICATION_FLOOR + np.arange(len(adjudications)) / max(len(adjudications), 1)
    rest = np.arange(len(order), dtype=np.float64) / max(len(order), 1) / max(n_classes, 1)
    return ([e.prediction(float(s), model_version) for e, s in zip(adjudications, adj, strict=True)]
            + [e.prediction(float(s), model_version) for e, s in zip(order, rest, strict=True)])


# ---------------------------------------------------------------------------------------- the plan
@dataclass
class BatchPlan:
    """Positions into the unlabeled pool (``audit``, ``al``, ``tail``, ``overlap_sources``) and into the
    honeypot candidates (``honeypots``)."""

    audit: list[int]
    al: list[int]
    tail: list[int]
    overlap_sources: list[int]
    honeypots: list[int]
    counts: SliceCounts = field(default_factory=SliceCounts)


def plan_batch(*, n_unlabeled: int, batch: np.ndarray, ranked: np.ndarray, pending_audit: np.ndarray, limit: int,
               n_honeypot_candidates: int, rates: SliceRates, rng: np.random.Generator) -> BatchPlan:
    """Split one batch between active learning and the slices.

    ``batch``: the strategy's picks, most informative first; ``ranked``: the whole unlabeled pool by
    informativeness; ``pending_audit``: pool positions already serving as audit items (they stay blind and
    never count as active-learning picks); ``limit``: how many pool items get a priority in all."""
    k = len(batch)
    counts = slice_counts(k, rates, rng)
    blind = set(pending_audit.tolist())
    drawable = np.setdiff1d(np.arange(n_unlabeled), pending_audit)
    audit = rng.choice(drawable, size=min(counts.audit, len(drawable)), replace=False).tolist()
    blind.update(audit)
    n_al = k - len(audit) - min(counts.honeypot, n_honeypot_candidates) - counts.overlap
    al = [int(i) for i in batch if int(i) not in blind][: max(n_al, 1 if counts.overlap else 0)]
    sources = rng.choice(al, size=min(counts.overlap, len(al)), replace=False).tolist() if al else []
    honeypots = rng.choice(n_honeypot_candidates, size=min(counts.honeypot, n_honeypot_candidates),
                           replace=False).tolist()
    taken = blind | set(al)
    tail = [int(i) for i in ranked if int(i) not in taken][: max(limit - len(al) - len(blind), 0)]
    return BatchPlan(audit=[int(i) for i in audit], al=al, tail=tail, overlap_sources=[int(i) for i in sources],
                     honeypots=[int(i) for i in honeypots],
                     counts=SliceCounts(len(audit), len(honeypots), len(sources)))


@dataclass
class Carried:
    """Where slice tasks still waiting for an answer go in a new queue."""

    copies: dict[int, list[Entry]]  # overlap copies right behind their source, by source task id
    loose: list[Entry]  # honeypots and copies whose source is not in the batch: interleaved
    adjudications: list[Entry]  # ahead of everything, first come first served


def place_pending(pending: pd.DataFrame, labels: dict[int, str], in_batch: set[int],
                  disputed: Callable[[str], str | tuple[str, ...]] = str) -> Carried:
    """Place the pending honeypots, overlap copies and adjudications (``pending``: slice rows, oldest
    first) in a queue whose batch holds the tasks ``in_batch``. ``labels``: the pre-label of each pending
    honeypot or copy; one without (its text is no longer known) is left out. Audit items are pool items,
    placed by the plan. ``disputed`` turns an adjudication's stored disputed label into its pre-label (a
    multi-label project stores a set as JSON text and pre-selects the set)."""
    carried = Carried({}, [], [])
    for row in pending.itertuples(index=False):
        if row.kind == "adjudication":
            carried.adjudications.append(Suggested(int(row.task_id), disputed(str(row.disputed_label))))
        elif row.kind in ("honeypot", "overlap") and row.task_id in labels:
            entry = Suggested(int(row.task_id), labels[row.task_id])
            if row.kind == "overlap" and row.source_task_id in in_batch:
                carried.copies.setdefault(int(row.source_task_id), []).append(entry)
            else:
                carried.loose.append(entry)
    return carried


def assemble_queue(al: list[Entry], tail: list[Entry], extras: list[Entry], copies: dict[int, list[Entry]],
                   carried: Carried, rng: np.random.Generator) -> tuple[list[Entry], list[Entry]]:
    """The pushed order and the adjudications that go ahead of it: the active-learning batch with the
    slice items (``extras`` and the carried loose ones, shuffled) interleaved after its head, every overlap
    copy right behind its source, then the rest of the ranked pool (``tail``)."""
    copies = {source: list(entries) for source, entries in copies.items()}
    for source, entries in carried.copies.items():
        copies.setdefault(source, []).extend(entries)
    mixed = [*extras, *carried.loose]
    mixed = [mixed[j] for j in rng.permutation(len(mixed))]
    return follow(interleave(al, mixed, rng), copies) + list(tail), list(carried.adjudications)


def pending_slices(store: SliceStore, project_id: int, annotated_task_ids: set[int]) -> pd.DataFrame:
    """The project's slice tasks nobody has answered yet (a skipped one counts as answered, as in the pool)."""
    frame = store.frame(project_id)
    return frame[~frame["task_id"].isin(annotated_task_ids)].reset_index(drop=True)


def honeypot_candidates(eval_frame: pd.DataFrame | None, store: SliceStore, project_id: int,
                        pool_texts: set[str]) -> pd.DataFrame:
    """Frozen-evaluation items not yet used as honeypots in this project and not in its pool."""
    if eval_frame is None or eval_frame.empty:
        return pd.DataFrame(columns=["id", "text", "label"])
    used = set(store.frame(project_id).query("kind == 'honeypot'")["item_id"])
    frame = eval_frame[["id", "text", "label"]].astype({"id": str})
    keep = ~frame["id"].isin(used) & ~frame["text"].isin(pool_texts)
    return frame[keep & frame["text"].map(lambda t: isinstance(t, str) and bool(t.strip()))].reset_index(drop=True)


def slice_items(project_id: int, kind: SliceKind, task_ids: list[int], item_ids: list[str], model_version: str,
                **per_item: list) -> list[SliceItem]:
    return [SliceItem(project_id=project_id, task_id=int(t), item_id=str(i), kind=kind, model_version=model_version,
                      **{k: v[n] for k, v in per_item.items()})
            for n, (t, i) in enumerate(zip(task_ids, item_ids, strict=True))]
