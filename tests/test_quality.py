"""Label-quality measures on hand-built tables with known answers, and their CLI and HTTP access.

Known answers: Krippendorff's nominal example (Krippendorff 2011, "Computing Krippendorff's
Alpha-Reliability", 4 observers x 12 units, alpha = 0.743), the textbook Cohen's kappa example (50 items,
20/5/10/15, kappa = 0.4), and Newcombe's (1998) Wilson intervals (81/263: 0.2553-0.3662; 0/10: 0-0.2775).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.slices import SliceItem, SliceStore
from labelloop.taxonomy import get_taxonomy
from monitoring import agreement, label_errors, quality
from monitoring.quality_api import router
from monitoring.quality_context import QualityContext
from monitoring.quality_stats import macro_f1_estimate, proportion

TAXONOMY = get_taxonomy("hate_offensive")
LABELS = list(TAXONOMY.labels)
PROJECT = 3


def strict_json(model) -> str:
    """JSON as the API sends it; raises on NaN or infinity, which JSON cannot carry."""
    return json.dumps(model.model_dump(mode="json"), allow_nan=False)


# --- published worked examples -------------------------------------------------------------------------


def test_krippendorff_alpha_matches_the_published_nominal_example() -> None:
    nan = np.nan
    observers = {
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        "C": [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    }
    table = pd.DataFrame(observers).apply(lambda col: col.map(lambda v: None if pd.isna(v) else str(int(v))))
    alpha = agreement.krippendorff_alpha(table, ["1", "2", "3", "4", "5"], min_n=1)
    assert round(alpha.value, 3) == 0.743


def test_cohen_kappa_matches_the_textbook_example() -> None:
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    table = pd.DataFrame({1: a, 2: b}, index=[f"i{i}" for i in range(50)])
    (pair,) = agreement.pairwise_kappa(table, min_n=10)
    assert (pair.annotator_a, pair.annotator_b, pair.kappa.n) == (1, 2, 50)
    assert pair.kappa.value == pytest.approx(0.4)


@pytest.mark.parametrize(("k", "n", "low", "high"), [(81, 263, 0.2553, 0.3662), (0, 10, 0.0, 0.2775)])
def test_wilson_interval_matches_newcombe(k: int, n: int, low: float, high: float) -> None:
    p = proportion(k, n, min_n=1)
    assert (round(p.low, 4), round(p.high, 4)) == (low, high)
    assert p.value == pytest.approx(k / n)


def test_too_small_a_sample_says_so_with_its_count() -> None:
    p = proportion(2, 3)
    assert p.value is None and p.low is None and "not enough data (n=3" in p.note
    assert macro_f1_estimate(["hate"] * 3, ["hate"] * 3, LABELS).value is None


# --- hand-built annotation tables -------------------------------------------------------------------------


def row(annotation_id: int, label: str, *, task: int | None = None, item: str | None = None, annotator: int = 1,
        suggested: str | None = None, version: str | None = "m:v1", kind: str = "active", gold: str | None = None,
        ground_truth: bool = False, model_label: str | None = None, day: int = 1) -> dict:
    task = annotation_id if task is None else task
    return {"annotation_id": annotation_id, "task_id": task, "item_id": item or f"item-{task}",
            "text": f"text {task}", "label": label, "annotator": annotator,
            "updated_at": f"2026-03-{day:02d}T10:00:00.000000Z", "ground_truth": ground_truth, "lead_time": 3.0,
            "suggested_label": suggested, "suggested_model_version": version if suggested else None, "kind": kind,
            "gold": gold, "model_version": version if kind == "audit" else None, "model_label": model_label}


def table(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=quality.TABLE_COLUMNS) if rows else quality.empty_table()


def test_acceptance_counts_suggestions_apart_and_builds_the_confusion_matrix() -> None:
    t = table(
        row(1, "hate", suggested="hate"), row(2, "offensive", suggested="offensive", version="m:v2"),
        row(3, "neither", suggested="offensive", version="m:v2"), row(4, "hate", suggested="offensive"),
        row(5, "offensive", suggested="offensive"), row(6, "hate"), row(7, "neither", kind="audit"),
        row(8, "hate", suggested="hate", kind="adjudication"),  # pre-labelled with the disputed human label
    )
    result = quality.acceptance(t, LABELS, by="class", min_n=1)
    assert (result.overall.k, result.overall.n, result.without_suggestion) == (3, 5, 2)
    assert {g.key: (g.value.k, g.value.n) for g in result.groups} == {"hate": (1, 1), "offensive": (2, 4)}
    assert result.confusion.counts == [[1, 0, 0], [1, 2, 1], [0, 0, 0]]
    assert result.confusion_by_version["m:v2"].counts == [[0, 0, 0], [0, 1, 1], [0, 0, 0]]
    by_version = quality.acceptance(t, LABELS, by="version", min_n=1)
    assert {g.key: (g.value.k, g.value.n) for g in by_version.groups} == {"m:v1": (2, 3), "m:v2": (1, 2)}


def test_breakdown_by_week_groups_days_of_one_iso_week() -> None:
    t = table(*(row(i, "hate", suggested="hate", day=d) for i, d in enumerate([2, 8, 9, 10, 15], start=1)))
    result = quality.acceptance(t, LABELS, by="week", min_n=1)
    assert [(g.key, g.value.n) for g in result.groups] == [("2026-03-02", 2), ("2026-03-09", 3)]


def test_gold_accuracy_from_honeypots_and_ground_truth_per_annotator_and_class() -> None:
    annotations = pd.DataFrame([
        {**row(1, "hate", task=10, annotator=1), "id": "h1"},
        {**row(2, "offensive", task=11, annotator=1), "id": "h2"},
        {**row(3, "neither", task=11, annotator=2), "id": "h2"},
        {**row(4, "neither", task=12, annotator=9, ground_truth=True), "id": "g1"},  # defines the gold
        {**row(5, "neither", task=12, annotator=1), "id": "g1"},
        {**row(6, "hate", task=13, annotator=2), "id": "x"},  # no gold
    ]).drop(columns=["item_id", "kind", "gold", "model_version", "model_label"])
    slices = pd.DataFrame([
        {"project_id": PROJECT, "task_id": 10, "item_id": "h1", "kind": "honeypot", "gold_label": "hate"},
        {"project_id": PROJECT, "task_id": 11, "item_id": "h2", "kind": "honeypot", "gold_label": "neither"},
    ])
    t = quality.attach_gold(annotations, slices)
    result = quality.gold_accuracy(t, min_n=1)
    assert (result.overall.k, result.overall.n) == (3, 4)
    assert {g.key: (g.value.k, g.value.n) for g in result.per_annotator} == {"1": (2, 3), "2": (1, 1)}
    assert {g.key: (g.value.k, g.value.n) for g in result.per_class} == {"hate": (1, 1), "neither": (2, 3)}


def test_audit_scores_the_champion_on_audit_items_and_marks_active_labels_biased() -> None:
    audit_rows = [row(i, "offensive", kind="audit", model_label="offensive") for i in range(1, 9)]
    audit_rows += [row(9, "hate", kind="audit", model_label="offensive"), row(10, "hate", kind="audit",
                                                                              model_label="hate")]
    active_rows = [row(20 + i, "hate", suggested="offensive") for i in range(5)]
    result = quality.audit(table(*audit_rows, *active_rows), LABELS, min_n=5)
    assert result.audit.unbiased and (result.audit.accuracy.k, result.audit.accuracy.n) == (9, 10)
    assert (result.audit.recall["hate"].k, result.audit.recall["hate"].n) == (1, 2)
    assert result.audit.recall["hate"].value is None  # 2 hate items: too few
    assert result.audit.macro_f1.low <= result.audit.macro_f1.value <= result.audit.macro_f1.high
    assert not result.active.unbiased and "BIASED" in result.active.sample
    assert (result.active.accuracy.k, result.active.accuracy.n) == (0, 5)


def test_automation_bias_compares_shown_and_blind_conditions() -> None:
    t = table(
        row(1, "hate", suggested="hate", gold="hate"), row(2, "offensive", suggested="offensive", gold="hate"),
        row(3, "neither", kind="audit", model_label="offensive", gold="neither"),
        row(4, "offensive", kind="audit", model_label="offensive"),
    )
    bias = quality.automation_bias(t, min_n=1)
    assert (bias.agreement_with_suggestion.k, bias.agreement_with_suggestion.n) == (2, 2)
    assert (bias.agreement_without_suggestion.k, bias.agreement_without_suggestion.n) == (1, 2)
    assert (bias.gold_accuracy_with_suggestion.k, bias.gold_accuracy_with_suggestion.n) == (1, 2)
    assert (bias.gold_accuracy_without_suggestion.k, bias.gold_accuracy_without_suggestion.n) == (1, 1)
    assert bias.median_seconds_with_suggestion == bias.median_seconds_without_suggestion == 3.0
    assert quality.automation_bias(t, min_n=3).median_seconds_with_suggestion is None


def test_agreement_is_per_item_across_overlap_copies_and_counts_an_annotator_once() -> None:
    rows = []
    for i in range(12):
        label = LABELS[i % 3]
        rows += [row(100 + i, label, task=i, item=f"it{i}", annotator=1),
                 row(200 + i, label if i else "hate", task=1000 + i, item=f"it{i}", annotator=2, kind="overlap")]
    rows.append(row(999, "neither", task=5000, item="it0", annotator=1, day=2))  # annotator 1 again: latest wins
    result = agreement.agreement(table(*rows), LABELS, min_n=10)
    assert (result.n_items, result.n_annotators) == (12, 2)
    assert result.kappa_pairs[0].kappa.n == 12
    assert 0.7 < result.alpha.value < 1.0


def test_agreement_leaves_out_adjudications_of_suspected_label_errors() -> None:
    """An adjudication is a second reviewer on an item picked because its label looks wrong, with that label
    pre-selected: not an independent overlap label, so it must not pull alpha and kappa down."""
    rows = [r for i in range(12) for r in (row(100 + i, LABELS[i % 3], task=i, item=f"it{i}", annotator=1),
                                           row(200 + i, LABELS[i % 3], task=1000 + i, item=f"it{i}", annotator=2,
                                               kind="overlap"))]
    rows += [r for i in range(12) for r in (row(300 + i, "neither", task=2000 + i, item=f"e{i}", annotator=1),
                                            row(400 + i, LABELS[i % 2], task=3000 + i, item=f"e{i}", annotator=3,
                                                kind="adjudication", suggested="neither"))]
    result = agreement.agreement(table(*rows), LABELS, min_n=10)
    assert (result.n_items, result.n_annotators) == (12, 2)
    assert result.alpha.value == 1.0 and [p.kappa.value for p in result.kappa_pairs] == [1.0]


def test_edge_cases_never_give_nan_or_crash() -> None:
    empty = table()
    for model in (quality.acceptance(empty, LABELS), quality.gold_accuracy(empty, by="annotator"),
                  quality.audit(empty, LABELS, by="week"), quality.automation_bias(empty),
                  agreement.agreement(empty, LABELS)):
        assert "NaN" not in strict_json(model)
    single = table(*(row(i, LABELS[i % 3], annotator=4, suggested="hate") for i in range(3)))
    assert quality.gold_accuracy(single).overall.note.startswith("not enough data (n=0")
    assert quality.acceptance(single, LABELS).overall.note.startswith("not enough data (n=3")
    assert "two annotators" in agreement.agreement(single, LABELS).note
    same = table(*(r for i in range(12) for r in (row(i, "hate", item=f"s{i}", annotator=1),
                                                  row(100 + i, "hate", task=100 + i, item=f"s{i}", annotator=2))))
    result = agreement.agreement(same, LABELS)
    assert result.alpha.value == 1.0 and "trivially" in result.alpha.note
    strict_json(result)


# --- label errors ---------------------------------------------------------------------------------------


def noisy_blobs(n: int = 300, flips: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = np.eye(3, 16) * 4
    x = centres[y] + rng.normal(size=(n, 16))
    noisy = y.copy()
    idx = rng.choice(n, flips, replace=False)
    noisy[idx] = (y[idx] + rng.integers(1, 3, flips)) % 3
    return x, y, noisy


def test_label_errors_are_found_on_a_constructed_noisy_set() -> None:
    x, y, noisy = noisy_blobs()
    proba = label_errors.out_of_fold_proba(x, noisy, 3, seed=0)
    order, flagged, quality_scores = label_errors.issue_ranking(noisy, proba)
    is_flip = noisy != y
    assert is_flip[order[:20]].mean() >= 0.9
    assert is_flip[flagged].sum() >= 25 and quality_scores.shape == (300,)
    frame = pd.DataFrame({"task_id": range(300), "id": [f"i{i}" for i in range(300)], "annotation_id": range(300),
                          "label": [LABELS[c] for c in noisy], "text": [f"t{i}" for i in range(300)]})
    issues = label_errors.rank_issues(frame, proba, LABELS, top_k=10)
    assert [i.rank for i in issues] == list(range(1, 11))
    assert all(is_flip[i.task_id] and i.model_label == LABELS[y[i.task_id]] for i in issues)


def test_out_of_fold_probabilities_cope_with_a_rare_class() -> None:
    x, _, noisy = noisy_blobs(60, 0)
    noisy[:] = 0
    noisy[:30] = 1
    noisy[59] = 2  # one example only
    proba = label_errors.out_of_fold_proba(x, noisy, 3)
    assert proba.shape == (60, 3) and np.allclose(proba.sum(axis=1), 1)


# --- the context over a real journal and slice store, the API and the CLI ---------------------------------


def webhook_annotation(ann_id: int, task_id: int, label: str, *, annotator: int, item: str, text: str,
                       suggested: str | None = None, ground_truth: bool = False) -> tuple[dict, dict]:
    choice = [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
    annotation = {"id": ann_id, "task": task_id, "project": PROJECT, "completed_by": annotator, "result": choice,
                  "was_cancelled": False, "ground_truth": ground_truth, "lead_time": 5.0,
                  "created_at": "2026-03-02T10:00:00Z", "updated_at": "2026-03-02T10:00:00Z",
                  "parent_prediction": 7000 + task_id if suggested else None}
    predictions = [{"id": 7000 + task_id, "model_version": "labelloop-hate-offensive:v1", "score": 0.3,
                    "result": [{**choice[0], "value": {"choices": [suggested]}}]}] if suggested else []
    return annotation, {"id": task_id, "project": PROJECT, "data": {"text": text, "item_id": item},
                        "predictions": predictions}


def fake_embed(texts: list[str]) -> np.ndarray:
    """Texts name their true class ("hate 3"); the embedding is that class plus a little noise."""
    rng = np.random.default_rng(len(texts))
    return np.eye(3, 8)[[LABELS.index(t.split()[0]) for t in texts]] * 3 + rng.normal(size=(len(texts), 8))


@pytest.fixture
def filled(settings: Settings) -> Settings:
    """A journal with 60 labelled items (it21 mislabelled), 12 of them also labelled by a second annotator,
    4 honeypots and 12 audit items, recorded through the journal's own reconcile path."""
    settings = settings.model_copy(update={"ls_project_id": PROJECT})
    with Journal(settings.journal_path, TAXONOMY) as journal, SliceStore(settings.slices_path) as slices:
        ann_id = 0
        for i in range(60):
            truth = LABELS[i % 3]
            given = "neither" if i == 21 else truth  # item 21 is hate, labelled neither
            ann_id += 1
            journal.apply_annotation(*webhook_annotation(ann_id, i + 1, given, annotator=1, item=f"it{i}",
                                                         text=f"{truth} {i}", suggested=truth))
            if i < 12:
                ann_id += 1
                journal.apply_annotation(*webhook_annotation(ann_id, 500 + i, truth, annotator=2, item=f"it{i}",
                                                             text=f"{truth} {i}"))
                slices.add([SliceItem(PROJECT, 500 + i, f"it{i}", "overlap", source_task_id=i + 1)])
        for j in range(12):
            ann_id += 1
            truth = LABELS[j % 3]
            journal.apply_annotation(*webhook_annotation(ann_id, 900 + j, truth, annotator=2, item=f"au{j}",
                                                         text=f"{truth} a{j}"))
            slices.add([SliceItem(PROJECT, 900 + j, f"au{j}", "audit", model_version="labelloop-hate-offensive:v1")])
        for h in range(4):
            ann_id += 1
            journal.apply_annotation(*webhook_annotation(ann_id, 800 + h, "hate", annotator=2, item=f"hp{h}",
                                                         text=f"hate h{h}", suggested="hate"))
            slices.add([SliceItem(PROJECT, 800 + h, f"hp{h}", "honeypot", gold_label="hate" if h else "offensive")])
    return settings


def context(settings: Settings, journal: Journal, slices: SliceStore) -> QualityContext:
    return QualityContext(settings=settings, journal=journal, slices=slices, taxonomy=TAXONOMY,
                          project_id=PROJECT, predict=lambda version, texts: ["offensive"] * len(texts),
                          embed=fake_embed, min_n=3)


def test_context_reads_journal_and_slices_into_every_measure(filled: Settings) -> None:
    with Journal(filled.journal_path, TAXONOMY) as journal, SliceStore(filled.slices_path) as slices:
        ctx = context(filled, journal, slices)
        report = ctx.report(by="annotator")
        assert report.n_annotations == 60 + 12 + 12 + 4 and report.n_annotators == 2
        assert (report.acceptance.overall.k, report.acceptance.overall.n) == (63, 64)
        assert (report.gold.overall.k, report.gold.overall.n) == (3, 4)
        assert (report.audit.audit.accuracy.k, report.audit.audit.accuracy.n) == (4, 12)  # the fake says offensive
        assert report.agreement.n_items == 12
        strict_json(report)
        issues = ctx.label_issues(top_k=3)
        assert issues.n_labelled == 60 + 12  # one per item: honeypots out, overlap copies voted with their item
        assert issues.issues[0].item_id == "it21" and issues.issues[0].model_label == "hate"
        assert ctx.adjudication_candidates(top_k=3)[0].item_id == "it21"
        slices.add([SliceItem(PROJECT, 7777, "it21", "adjudication", source_task_id=22, disputed_label="neither")])
        assert "it21" not in {i.item_id for i in ctx.adjudication_candidates(top_k=3)}
        crowd = ctx.crowdlab()
        assert crowd.note is None and {a.annotator for a in crowd.annotators} == {1, 2}
        assert {c.item_id: c.consensus_label for c in crowd.consensus}["it0"] == "hate"


def test_router_serves_the_measures_and_refuses_bad_queries(filled: Settings) -> None:
    app = FastAPI()
    app.state.settings = filled
    app.include_router(router)
    with TestClient(app) as client:
        body = client.get("/v1/quality", params={"by": "week"}).json()
        assert body["acceptance"]["overall"]["n"] == 64 and body["acceptance"]["groups"][0]["key"] == "2026-03-02"
        assert client.get("/v1/quality/gold").json()["overall"]["k"] == 3
        audit = client.get("/v1/quality/audit").json()  # no registry model here: counted, not scored
        assert audit["audit"]["n"] == 0 and audit["unscored_audit_labels"] == 12 and "could not" in audit["note"]
        assert client.get("/v1/quality", params={"by": "month"}).status_code == 422
        assert client.get("/v1/quality/label-issues", params={"top_k": -1}).status_code == 422
        assert client.get("/v1/quality/agreement", params={"project_id": 0}).status_code == 422
        empty = client.get("/v1/quality/label-issues", params={"project_id": 99}).json()
        assert empty["issues"] == [] and "n=0" in empty["note"]


def test_cli_prints_tables_and_json_and_refuses_a_bad_breakdown(filled: Settings, monkeypatch,
                                                                 tmp_path: Path) -> None:
    from labelloop.cli import app

    monkeypatch.setattr("monitoring.cli.get_settings", lambda: filled)
    runner = CliRunner()
    result = runner.invoke(app, ["quality", "--by", "annotator"])
    assert result.exit_code == 0, result.output
    assert "suggestion acceptance" in result.output and "reviewer accuracy on gold" in result.output
    as_json = runner.invoke(app, ["quality", "--json"])
    assert json.loads(as_json.output)["gold"]["overall"]["n"] == 4
    bad = runner.invoke(app, ["quality", "--by", "month"])
    assert bad.exit_code == 2 and "error:" in bad.output
    broken = filled.model_copy(update={"state_dir": tmp_path / "broken"})
    broken.journal_path.parent.mkdir(parents=True)
    broken.journal_path.write_bytes(b"not a journal " * 20)
    monkeypatch.setattr("monitoring.cli.get_settings", lambda: broken)
    result = runner.invoke(app, ["quality"])
    assert result.exit_code == 2 and "error:" in result.output and "not a database" in result.output


# --- against a real Label Studio -----------------------------------------------------------------------


@pytest.mark.integration
def test_reconcile_records_the_pre_label_an_annotation_started_from(label_studio, ls_project: int,
                                                                   tmp_path: Path) -> None:
    """Label Studio 1.23 keeps ``parent_prediction`` (an id) and ``lead_time`` on an annotation; the listing
    with ``fields=all`` carries the task's predictions, so the journal learns the label and version shown."""
    from active_learning.labelstudio import choice_result
    from active_learning.reconcile import reconcile

    sdk = label_studio.sdk
    ids = sdk.projects.import_tasks(ls_project, request=[{"text": "you people are awful", "item_id": "q1"},
                                                         {"text": "nice weather today", "item_id": "q2"}],
                                    return_task_ids=True).task_ids
    sdk.projects.import_predictions(ls_project, request=[{"task": ids[0], "model_version": "labelloop-x:v4",
                                                          "score": 0.2, "result": choice_result("offensive")}])
    (shown,) = list(sdk.predictions.list(task=ids[0]))
    sdk.annotations.create(ids[0], result=choice_result("hate"), lead_time=7.5, parent_prediction=shown.id)
    sdk.annotations.create(ids[1], result=choice_result("neither"), lead_time=2.0)  # no pre-label (an audit item)
    with Journal(tmp_path / "journal.sqlite", TAXONOMY) as journal:
        reconcile(label_studio.client, ls_project, journal)
        rows = journal.annotations(ls_project).set_index("id")
    assert rows.loc["q1", ["label", "suggested_label", "suggested_model_version", "lead_time"]].tolist() == [
        "hate", "offensive", "labelloop-x:v4", 7.5]
    assert rows.loc["q1", "prediction_id"] == shown.id
    assert pd.isna(rows.loc["q2", "suggested_label"]) and pd.isna(rows.loc["q2", "prediction_id"])
    result = quality.acceptance(quality.attach_gold(rows.reset_index(), pd.DataFrame()), LABELS, min_n=1)
    assert (result.overall.k, result.overall.n, result.without_suggestion) == (0, 1, 1)


def test_audit_predictions_are_retried_when_the_registry_was_unreachable(filled: Settings, monkeypatch) -> None:
    """An MLflow outage leaves audit items unscored for that request only: it is neither a crash (500, or a
    `labelloop quality` that fails as a whole) nor a None cached for the life of the service."""
    from mlflow.exceptions import MlflowException

    class DownRegistry:
        def __init__(self, settings: Settings) -> None:
            pass

        def load(self, version: int):
            raise MlflowException("API request to http://127.0.0.1:5000 failed: connection refused")

    monkeypatch.setattr("training.registry.Registry", DownRegistry)
    with Journal(filled.journal_path, TAXONOMY) as journal, SliceStore(filled.slices_path) as slices:
        ctx = QualityContext(settings=filled, journal=journal, slices=slices, taxonomy=TAXONOMY, project_id=PROJECT,
                             embed=fake_embed, min_n=3)
        assert ctx.audit().unscored_audit_labels == 12
        ctx.predict = lambda version, texts: ["offensive"] * len(texts)
        report = ctx.audit()
    assert report.unscored_audit_labels == 0 and report.audit.accuracy.n == 12


def test_labels_outside_the_taxonomy_are_left_out_of_the_model_based_measures(filled: Settings) -> None:
    """The journal outlives a taxonomy change (``--taxonomy`` or a new setting over the same state dir):
    labels the taxonomy lacks cannot be coded for a model, and must not crash the measures that fit one."""
    other = get_taxonomy("hate")  # "offensive" and "neither" are not in it
    with Journal(filled.journal_path, TAXONOMY) as journal, SliceStore(filled.slices_path) as slices:
        ctx = QualityContext(settings=filled, journal=journal, slices=slices, taxonomy=other, project_id=PROJECT,
                             predict=lambda version, texts: ["hate"] * len(texts), embed=fake_embed, min_n=3)
        issues = ctx.label_issues(top_k=3)
        crowd = ctx.crowdlab()
    assert issues.issues == [] and "2+ classes" in issues.note
    assert crowd.n_items == 4 and "same label" in crowd.note


def test_a_pre_label_known_only_by_id_is_not_counted_as_labelling_blind(tmp_path: Path) -> None:
    """A webhook names the prediction an annotation started from by id only; until the reconciler reads its
    label, that annotation was still made *with* a suggestion, so it is neither accepted/rejected nor blind."""
    with Journal(tmp_path / "journal.sqlite", TAXONOMY) as journal:
        for i in range(1, 4):
            ann, task = webhook_annotation(i, i, "hate", annotator=1, item=f"w{i}", text=f"hate {i}",
                                           suggested="offensive")
            journal.record({"action": "ANNOTATION_CREATED", "annotation": ann, "task": {**task, "predictions": []},
                            "project": {"id": PROJECT}})
        ann, task = webhook_annotation(4, 4, "neither", annotator=1, item="w4", text="neither 4")
        journal.record({"action": "ANNOTATION_CREATED", "annotation": {**ann, "lead_time": 60.0}, "task": task,
                        "project": {"id": PROJECT}})
        t = quality.attach_gold(journal.annotations(PROJECT), pd.DataFrame())
    result = quality.acceptance(t, LABELS, min_n=1)
    assert (result.overall.n, result.without_suggestion, result.suggestion_unknown) == (0, 1, 3)
    assert quality.automation_bias(t, min_n=1).median_seconds_without_suggestion == 60.0
