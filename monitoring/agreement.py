"""Inter-annotator agreement on items that two or more annotators labelled.

Overlap copies are separate Label Studio tasks that share the source task's ``item_id``, so agreement is
computed per *item*, not per task. An annotator who labelled the same item twice counts once (their
latest label), because agreement is between people.

Three views, because each answers a different question:

* Krippendorff's alpha (nominal): how much reviewers agree beyond chance, overall and per class (one
  class against the rest); it copes with any number of annotators and missing labels.
* pairwise Cohen's kappa: which pair of reviewers disagrees, for coaching.
* CROWDLAB (cleanlab): a consensus label per item and a quality score per annotator that also weigh the
  model's out-of-sample probabilities, so one careful reviewer outvoted by two careless ones can still win.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import krippendorff
import numpy as np
import pandas as pd
from pydantic import BaseModel
from sklearn.metrics import cohen_kappa_score

from monitoring.quality_stats import DEFAULT_MIN_N, Estimate, finite, not_enough

#: CROWDLAB's model probabilities come from a head fit with balanced class weights. CROWDLAB weighs the model
#: as one more voter on every item; an unweighted head almost never votes for the rare class, and its vote
#: then pulls the consensus toward the majority class (the benchmark measures both:
#: ``bench/results/label_quality.md``). Label-error detection uses unweighted probabilities instead.
CROWDLAB_CLASS_WEIGHT = "balanced"


class PairKappa(BaseModel):
    annotator_a: int
    annotator_b: int
    kappa: Estimate


class AnnotatorQuality(BaseModel):
    annotator: int
    n_labels: int
    quality: float | None = None
    agreement_with_consensus: float | None = None
    worst_class: str | None = None


class ConsensusItem(BaseModel):
    item_id: str
    consensus_label: str
    consensus_quality: float | None = None
    annotator_agreement: float | None = None
    n_annotators: int


class Crowdlab(BaseModel):
    n_items: int
    annotators: list[AnnotatorQuality] = []
    consensus: list[ConsensusItem] = []
    note: str | None = None


class Agreement(BaseModel):
    """Agreement on items with two or more annotators; ``n_items`` counts those items."""

    n_items: int
    n_annotators: int
    alpha: Estimate
    alpha_per_class: dict[str, Estimate]
    kappa_pairs: list[PairKappa]
    note: str | None = None


def multi_annotated(labels: pd.DataFrame) -> pd.DataFrame:
    """Rows ``item_id, annotator, label`` of items that two or more distinct annotators labelled, one row
    per (item, annotator): their latest label. ``labels`` needs those columns plus ``updated_at``.

    Adjudication answers (``kind == "adjudication"``, when the column is there) are left out: those items
    were picked *because* their label looks wrong, and the adjudicator saw the disputed label pre-selected,
    so counting them would make reviewers look less in agreement than they are on ordinary items."""
    usable = labels[labels["label"].notna() & labels["annotator"].notna()]
    if "kind" in usable:
        usable = usable[usable["kind"] != "adjudication"]
    latest = (usable.sort_values("updated_at")
              .drop_duplicates(["item_id", "annotator"], keep="last")[["item_id", "annotator", "label"]])
    n_raters = latest.groupby("item_id")["annotator"].transform("nunique")
    out = latest[n_raters >= 2].copy()
    out["annotator"] = out["annotator"].astype("int64")
    return out.reset_index(drop=True)


def item_by_annotator(pairs: pd.DataFrame) -> pd.DataFrame:
    """The items x annotators table (NaN where an annotator did not label an item), rows sorted by item."""
    return pairs.pivot(index="item_id", columns="annotator", values="label").sort_index()


def krippendorff_alpha(table: pd.DataFrame, labels: Sequence[str], min_n: int = DEFAULT_MIN_N) -> Estimate:
    """Nominal alpha of an items x annotators table of label strings (NaN = not labelled)."""
    n = len(table)
    if n < max(min_n, 1):
        return Estimate(n=n, note=not_enough(n, min_n, "items with 2+ annotators"))
    codes = {label: i for i, label in enumerate(labels)}
    matrix = table.apply(lambda col: col.map(codes)).to_numpy(dtype=float).T  # raters x units
    if len(np.unique(matrix[~np.isnan(matrix)])) < 2:
        return Estimate(n=n, value=1.0, note="every label is the same class: agreement is trivially perfect")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = finite(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"))
    return Estimate(n=n, value=value, note=None if value is not None else "alpha undefined for these labels")


def alpha_per_class(table: pd.DataFrame, labels: Sequence[str], min_n: int = DEFAULT_MIN_N) -> dict[str, Estimate]:
    """Alpha of "this class or not" per class: where reviewers disagree about one harm in particular."""
    out = {}
    for label in labels:
        binary = table.apply(lambda col, c=label: col.map(lambda v: np.nan if pd.isna(v) else
                                                           ("yes" if v == c else "no")))
        out[label] = krippendorff_alpha(binary, ["yes", "no"], min_n)
    return out


def pairwise_kappa(table: pd.DataFrame, min_n: int = DEFAULT_MIN_N) -> list[PairKappa]:
    """Cohen's kappa for every pair of annotators, on the items both labelled."""
    pairs = []
    for a, b in itertools.combinations(table.columns, 2):
        both = table[[a, b]].dropna()
        n = len(both)
        if n < max(min_n, 1):
            estimate = Estimate(n=n, note=not_enough(n, min_n, "items in common"))
        elif both[a].nunique() == 1 and both[b].nunique() == 1:
            same = both[a].iloc[0] == both[b].iloc[0]
            estimate = Estimate(n=n, value=1.0 if same else None,
                                note="both gave one class only: kappa is undefined" if not same else
                                "both gave the same single class: kappa is trivially 1")
        else:
            estimate = Estimate(n=n, value=finite(cohen_kappa_score(both[a], both[b])))
        pairs.append(PairKappa(annotator_a=int(a), annotator_b=int(b), kappa=estimate))
    return pairs


def agreement(labels: pd.DataFrame, classes: Sequence[str], min_n: int = DEFAULT_MIN_N) -> Agreement:
    """Alpha overall and per class, and pairwise kappa, from one row per annotation
    (``item_id, annotator, label, updated_at``)."""
    pairs = multi_annotated(labels)
    if pairs.empty:
        empty = Estimate(n=0, note=not_enough(0, min_n, "items with 2+ annotators"))
        return Agreement(n_items=0, n_annotators=0, alpha=empty,
                         alpha_per_class={c: empty for c in classes}, kappa_pairs=[],
                         note="no item has been labelled by two annotators yet")
    table = item_by_annotator(pairs)
    return Agreement(n_items=len(table), n_annotators=table.shape[1], alpha=krippendorff_alpha(table, classes, min_n),
                     alpha_per_class=alpha_per_class(table, classes, min_n), kappa_pairs=pairwise_kappa(table, min_n))


def crowdlab(table: pd.DataFrame, pred_probs: np.ndarray, classes: Sequence[str],
             min_n: int = DEFAULT_MIN_N) -> Crowdlab:
    """CROWDLAB consensus and annotator quality.

    ``table``: items x annotators of label strings (NaN = not labelled), every item with at least one
    label; ``pred_probs``: out-of-sample class probabilities for the same items in the same order, columns
    in ``classes`` order.
    """
    from cleanlab.multiannotator import get_label_quality_multiannotator

    n = len(table)
    multi = int((table.notna().sum(axis=1) >= 2).sum()) if n else 0
    if multi < max(min_n, 1):
        return Crowdlab(n_items=n, note=not_enough(multi, min_n, "items with 2+ annotators"))
    if len(pred_probs) != n:
        raise ValueError(f"{len(pred_probs)} rows of probabilities for {n} items")
    codes = {label: i for i, label in enumerate(classes)}
    coded = table.apply(lambda col: col.map(codes)).astype(float)
    coded = coded.loc[:, coded.notna().any()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = get_label_quality_multiannotator(coded, np.asarray(pred_probs, dtype=float), verbose=False)
    except (ValueError, AssertionError) as e:
        return Crowdlab(n_items=n, note=f"CROWDLAB could not run on these labels: {e}")
    stats = result["annotator_stats"]
    quality = result["label_quality"]
    counts = coded.notna().sum()
    annotators = [
        AnnotatorQuality(annotator=int(a), n_labels=int(counts[a]), quality=finite(row["annotator_quality"]),
                         agreement_with_consensus=finite(row["agreement_with_consensus"]),
                         worst_class=classes[int(row["worst_class"])] if pd.notna(row["worst_class"]) else None)
        for a, row in stats.iterrows()
    ]
    consensus = [
        ConsensusItem(item_id=str(item), consensus_label=classes[int(row["consensus_label"])],
                      consensus_quality=finite(row["consensus_quality_score"]),
                      annotator_agreement=finite(row["annotator_agreement"]),
                      n_annotators=int(row["num_annotations"]))
        for item, row in zip(table.index, quality.to_dict("records"), strict=True)
    ]
    return Crowdlab(n_items=n, annotators=sorted(annotators, key=lambda a: -(a.quality or 0)), consensus=consensus)
