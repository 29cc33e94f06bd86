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

For a multi-label taxonomy (label sets) see :func:`label_set_agreement`: alpha per label on its yes/no
answers and their mean, kappa and raw agreement per pair on the exact set. CROWDLAB has no multi-label
form in cleanlab, so it is not reported there.
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

from monitoring.quality_stats import DEFAULT_MIN_N, Estimate, Proportion, finite, not_enough, proportion

#: CROWDLAB's model probabilities come from a head fit with balanced class weights. CROWDLAB weighs the model
#: as one more voter on every item; an unweighted head almost never votes for the rare class, and its vote
#: then pulls the consensus toward the majority class (the benchmark measures both:
#: ``bench/results/label_quality.md``). Label-error detection uses unweighted probabilities instead.
CROWDLAB_CLASS_WEIGHT = "balanced"


class PairKappa(BaseModel):
    annotator_a: int
    annotator_b: int
    kappa: Estimate


class PairAgreement(BaseModel):
    """How often two reviewers gave exactly the same answer (the same label set) on the items both labelled."""

    annotator_a: int
    annotator_b: int
    agreement: Proportion


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
    """Agreement on items with two or more annotators; ``n_items`` counts those items.

    Multi-label: ``alpha`` is the mean of the per-label alphas (no interval), ``alpha_per_class`` each label's
    alpha on its yes/no answers, ``kappa_pairs`` Cohen's kappa on the exact set as one nominal answer, and
    ``pair_agreement`` the raw exact-set agreement per pair (empty for single-label)."""

    n_items: int
    n_annotators: int
    alpha: Estimate
    alpha_per_class: dict[str, Estimate]
    kappa_pairs: list[PairKappa]
    pair_agreement: list[PairAgreement] = []
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


def _set_key(cell: object) -> str:
    """A label set as one nominal answer: equal sets give equal keys, whatever their order."""
    return "+".join(sorted(cell)) if isinstance(cell, tuple | list | set | frozenset) else str(cell)


def label_set_agreement(labels: pd.DataFrame, classes: Sequence[str], min_n: int = DEFAULT_MIN_N) -> Agreement:
    """Agreement for a multi-label taxonomy (each row's ``label`` a tuple of label names).

    Every label is its own yes/no question: Krippendorff's nominal alpha per label, and overall the mean over
    the labels some reviewer chose and some did not (a label nobody chose is trivially 1 in its own row but
    says nothing about reviewers, so it does not lift the mean). Pairs of reviewers
    are compared on the exact set, as Cohen's kappa and as a raw proportion with its Wilson interval."""
    pairs = multi_annotated(labels)
    if pairs.empty:
        empty = Estimate(n=0, note=not_enough(0, min_n, "items with 2+ annotators"))
        return Agreement(n_items=0, n_annotators=0, alpha=empty, alpha_per_class={c: empty for c in classes},
                         kappa_pairs=[], note="no item has been labelled by two annotators yet")
    sets = item_by_annotator(pairs)
    per_label, defined = {}, []
    for label in classes:
        binary = sets.apply(lambda col, c=label: col.map(lambda v: "yes" if c in v else "no", na_action="ignore"))
        per_label[label] = krippendorff_alpha(binary, ["yes", "no"], min_n)
        answers = set(binary.stack().dropna().unique())
        if per_label[label].value is not None and answers == {"yes", "no"}:
            defined.append(per_label[label].value)
    n = len(sets)
    if n < max(min_n, 1):
        alpha = Estimate(n=n, note=not_enough(n, min_n, "items with 2+ annotators"))
    elif defined:
        alpha = Estimate(n=n, value=finite(float(np.mean(defined))),
                         note=f"mean of the per-label alphas ({len(defined)} of {len(classes)} labels)")
    else:
        alpha = Estimate(n=n, note="alpha undefined for every label")
    keyed = sets.apply(lambda col: col.map(_set_key, na_action="ignore"))
    agreed = []
    for a, b in itertools.combinations(keyed.columns, 2):
        both = keyed[[a, b]].dropna()
        agreed.append(PairAgreement(annotator_a=int(a), annotator_b=int(b),
                                    agreement=proportion(int((both[a] == both[b]).sum()), len(both), min_n)))
    return Agreement(n_items=n, n_annotators=sets.shape[1], alpha=alpha, alpha_per_class=per_label,
                     kappa_pairs=pairwise_kappa(keyed, min_n), pair_agreement=agreed)
