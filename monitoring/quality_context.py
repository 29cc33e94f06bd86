"""The thin I/O layer under the label-quality measures: read the journal, the slice store and the registry,
build the annotation table, and hand it to the pure functions in :mod:`monitoring.quality`,
:mod:`monitoring.agreement` and :mod:`monitoring.label_errors`.

The CLI (``labelloop quality``), the JSON API (``/v1/quality``) and the dashboard all go through
:class:`QualityContext`, so they report the same numbers. The taxonomy's :class:`monitoring.quality.LabelKind`
(single labels or label sets) is chosen here, once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.slices import SliceStore
from labelloop.taxonomy import Taxonomy, get_taxonomy
from monitoring import agreement as agreement_
from monitoring import quality
from monitoring.agreement import Agreement, Crowdlab
from monitoring.label_errors import LabelIssue
from monitoring.quality import Acceptance, AuditReport, AutomationBias, Breakdown, GoldAccuracy, LabelKind, label_kind
from monitoring.quality_stats import not_enough

log = logging.getLogger(__name__)

#: ``model_version`` strings as labelloop writes them (``ModelRef.label``): ``<registered name>:v<n>``
_VERSION = re.compile(r"^(?P<name>.+):v(?P<number>\d+)$")

Predictor = Callable[[str, list[str]], list[str] | list[tuple[str, ...]] | None]
Embedder = Callable[[list[str]], np.ndarray]


class QualityReport(BaseModel):
    """Every label-quality measure that needs no model beyond the recorded predictions."""

    generated_at: str
    project_id: int | None
    labels: list[str]
    #: label sets: every accuracy is an exact-set match, see each measure's description
    multi_label: bool = False
    n_annotations: int
    n_annotators: int
    acceptance: Acceptance
    gold: GoldAccuracy
    agreement: Agreement
    audit: AuditReport
    automation_bias: AutomationBias


class LabelIssues(BaseModel):
    n_labelled: int
    issues: list[LabelIssue]
    note: str | None = None


@dataclass
class QualityContext:
    """What the measures read. ``predict(model_version, texts)`` labels audit items with the model that
    was champion when they were served (None when that version cannot be loaded); ``embed(texts)`` gives
    frozen-encoder embeddings for the out-of-fold probabilities. Both default to the registry and the
    cached MiniLM encoder; tests pass fakes. ``prediction_cache`` keeps audit predictions per
    (version, text): a model version never changes, so each audit item is predicted once per process."""

    settings: Settings
    journal: Journal
    slices: SliceStore
    taxonomy: Taxonomy
    project_id: int | None = None
    predict: Predictor | None = None
    embed: Embedder | None = None
    min_n: int = quality.DEFAULT_MIN_N
    prediction_cache: dict[tuple[str, str], str | tuple[str, ...] | None] = field(default_factory=dict)

    @property
    def kind(self) -> LabelKind:
        return label_kind(self.taxonomy)

    # --- the table -----------------------------------------------------------------------------

    def table(self, with_model: bool = True) -> pd.DataFrame:
        """Usable annotations with kind, gold, model version and (for audit items, unless ``with_model`` is
        false) the label the model that was champion when the item was served gives it."""
        annotations = self.journal.annotations(self.project_id)
        if annotations.empty:
            return quality.empty_table()
        table = quality.attach_gold(annotations, self.slices.frame(self.project_id), self.taxonomy)
        if not with_model:
            return table
        audit = table[(table["kind"] == "audit") & table["model_version"].notna()]
        if not audit.empty:
            # a Series, so that a label set (a tuple) stays one cell instead of being spread across rows
            table.loc[audit.index, "model_label"] = pd.Series(self._model_labels(audit), index=audit.index,
                                                              dtype=object)
        return table

    def _model_labels(self, audit: pd.DataFrame) -> list[str | tuple[str, ...] | None]:
        predict = self.predict or self._registry_predict
        for version, group in audit.groupby("model_version", sort=False):
            missing = [t for t in group["text"].unique() if (version, t) not in self.prediction_cache]
            if missing:
                predicted = predict(str(version), missing)
                if predicted is None:  # not cached: the registry may be reachable on the next request
                    continue
                for text, label in zip(missing, predicted, strict=True):
                    self.prediction_cache[(version, text)] = label
        return [self.prediction_cache.get((v, t)) for v, t in zip(audit["model_version"], audit["text"], strict=True)]

    def _registry_predict(self, model_version: str, texts: list[str]) -> list | None:
        from mlflow.exceptions import MlflowException

        from training.registry import Registry, RegistryError

        match = _VERSION.match(model_version)
        if match is None or match["name"] != self.settings.registered_model_name:
            log.warning("audit items name model version %r, not one of %s", model_version,
                        self.settings.registered_model_name)
            return None
        try:
            loaded = Registry(self.settings).load(int(match["number"]))
        except (RegistryError, MlflowException, OSError) as e:  # MLflow down or the artifact gone
            log.warning("cannot load %s for the audit: %s", model_version, e)
            return None
        return loaded.classifier.predict(texts)

    def _default_embed(self, texts: list[str]) -> np.ndarray:
        from training.classifier import load_encoder
        from training.fast import EmbeddingCache

        encoder = load_encoder(self.settings.base_model, self.settings.max_length)
        return EmbeddingCache(self.settings.cache_dir / "embeddings", encoder).get(texts)

    # --- the measures ----------------------------------------------------------------------------

    def report(self, by: Breakdown | None = None) -> QualityReport:
        table = self.table()
        labels = list(self.taxonomy.labels)
        kind = self.kind
        return QualityReport(
            generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
            project_id=self.project_id,
            labels=labels,
            multi_label=kind.multi,
            n_annotations=len(table),
            n_annotators=int(table["annotator"].dropna().nunique()),
            acceptance=quality.acceptance(table, labels, by, self.min_n, kind),
            gold=quality.gold_accuracy(table, by, self.min_n, kind),
            agreement=kind.agreement(table, self.min_n),
            audit=quality.audit(table, labels, by, self.min_n, kind),
            automation_bias=quality.automation_bias(table, self.min_n, kind),
        )

    def acceptance(self, by: Breakdown | None = None) -> Acceptance:
        return quality.acceptance(self.table(with_model=False), list(self.taxonomy.labels), by, self.min_n, self.kind)

    def gold(self, by: Breakdown | None = None) -> GoldAccuracy:
        return quality.gold_accuracy(self.table(with_model=False), by, self.min_n, self.kind)

    def agreement(self) -> Agreement:
        return self.kind.agreement(self.table(with_model=False), self.min_n)

    def audit(self, by: Breakdown | None = None) -> AuditReport:
        return quality.audit(self.table(), list(self.taxonomy.labels), by, self.min_n, self.kind)

    def automation_bias(self) -> AutomationBias:
        return quality.automation_bias(self.table(), self.min_n, self.kind)

    def training_labels(self) -> pd.DataFrame:
        """The labels the model trains on, one per item (``active_learning.training_labels``): honeypots out,
        overlap copies voted together, adjudicated labels in place of the originals. Label errors are looked
        for there because that is what a retrain would learn."""
        from active_learning.training_labels import derive_training_labels

        slices = self.slices.frame(self.project_id)
        return derive_training_labels(self.journal.annotations(self.project_id), slices,
                                      self.journal.taxonomy).reset_index(drop=True)

    def out_of_fold(self, texts: list[str], y: np.ndarray, class_weight: str | None = None) -> np.ndarray:
        embed = self.embed or self._default_embed
        return self.kind.out_of_fold(embed(texts), y, seed=self.settings.seed, class_weight=class_weight)

    def crowdlab(self) -> Crowdlab:
        """CROWDLAB over items with 2+ annotators, with out-of-fold probabilities from every labelled item.
        Not available for label sets (cleanlab's multi-annotator functions are multi-class only): the note
        says so instead of a number that would be wrong."""
        labels = list(self.taxonomy.labels)
        table = self.table()
        # a journal kept across a taxonomy change holds other labels
        table = table[table["label"].map(self.kind.in_taxonomy).astype(bool)]
        pairs = agreement_.multi_annotated(table)
        n_items = int(pairs["item_id"].nunique()) if not pairs.empty else 0
        if self.kind.crowdlab_unavailable:
            return Crowdlab(n_items=n_items, note=self.kind.crowdlab_unavailable)
        if n_items < max(self.min_n, 1):
            return Crowdlab(n_items=n_items, note=not_enough(n_items, self.min_n, "items with 2+ annotators"))
        items = item_texts(table)
        majority = item_majority(table)
        if majority.nunique() < 2:
            return Crowdlab(n_items=n_items, note="every item has the same label: no model can be fit")
        y = majority.map({c: i for i, c in enumerate(labels)}).to_numpy(dtype=int)
        proba = pd.DataFrame(self.out_of_fold(items.loc[majority.index].tolist(), y,
                                              class_weight=agreement_.CROWDLAB_CLASS_WEIGHT), index=majority.index)
        grid = agreement_.item_by_annotator(pairs)
        return agreement_.crowdlab(grid, proba.loc[grid.index].to_numpy(), labels, self.min_n)

    def label_issues(self, top_k: int | None = None) -> LabelIssues:
        """Likely label errors among the training labels, most suspicious first."""
        top_k = self.settings.label_error_top_k if top_k is None else top_k
        kind = self.kind
        labels = self.training_labels()
        labels = labels[labels["label"].map(kind.in_taxonomy).astype(bool)].reset_index(drop=True)  # see crowdlab()
        n = len(labels)
        y = kind.targets(labels["label"])
        if n < max(self.min_n, 1) or not kind.varied(y):
            return LabelIssues(n_labelled=n, issues=[], note=not_enough(n, self.min_n, "labelled tasks, 2+ classes"))
        proba = self.out_of_fold(labels["text"].tolist(), y)
        return LabelIssues(n_labelled=n, issues=kind.rank_issues(labels, proba, top_k))

    def adjudication_candidates(self, top_k: int | None = None) -> list[LabelIssue]:
        """Likely label errors not yet sent for adjudication, for ``labelloop loop adjudicate`` to push to
        Label Studio. Items that already have an adjudication task (settled or waiting) are left out, so each
        dispute is raised once."""
        slices = self.slices.frame(self.project_id)
        adjudication = slices[slices["kind"] == "adjudication"]
        settled = set(adjudication["item_id"].astype(str))
        top_k = self.settings.label_error_top_k if top_k is None else top_k
        issues = self.label_issues(top_k + len(settled)).issues
        return [i for i in issues if i.item_id not in settled][:top_k]


def item_texts(table: pd.DataFrame) -> pd.Series:
    """One text per item id (copies of an item share it)."""
    return table.drop_duplicates("item_id").set_index("item_id")["text"]


def item_majority(table: pd.DataFrame) -> pd.Series:
    """Each item's majority label across all its annotations (the latest on a tie), indexed by item id."""
    votes = table.groupby(["item_id", "label"], as_index=False).agg(n=("annotation_id", "size"),
                                                                   latest=("updated_at", "max"))
    winner = votes.sort_values(["item_id", "n", "latest"], ascending=[True, False, False]).drop_duplicates("item_id")
    return winner.set_index("item_id")["label"].sort_index()


@contextmanager
def open_context(settings: Settings, project_id: int | None = None) -> Iterator[QualityContext]:
    """A context over the configured journal and slice store (``project_id`` defaults to the settings')."""
    taxonomy = get_taxonomy(settings.taxonomy)
    with Journal(settings.database("journal"), taxonomy) as journal, SliceStore(settings.database("slices")) as slices:
        yield QualityContext(settings=settings, journal=journal, slices=slices, taxonomy=taxonomy,
                             project_id=project_id if project_id is not None else settings.ls_project_id)
