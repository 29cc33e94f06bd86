"""Label-quality measures and adjudication for a multi-label taxonomy, on hand-checked label sets.

Every number asserted here is worked out by hand in the comment beside it. The taxonomy has three labels
(hate, threat, spam) and an explicit "none" choice; a label cell is a tuple of names.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from active_learning.adjudication import CandidateError, plan_adjudication, send_for_adjudication
from active_learning.slices_push import place_pending
from labelloop.config import Settings
from labelloop.journal import Journal, label_cell, label_text
from labelloop.slices import SliceItem, SliceStore
from labelloop.taxonomy import Taxonomy, get_taxonomy
from monitoring import agreement, quality
from monitoring.label_errors import LabelIssue, label_set_out_of_fold_proba, rank_label_set_issues, shown_label
from monitoring.quality_api import router
from monitoring.quality_context import QualityContext

TOML = """
name = "harms"
title = "Harms (multi-label)"
type = "multi"
none_label = "none"

[[labels]]
name = "hate"
description = "Attacks a protected group"

[[labels]]
name = "threat"
description = "Threatens violence"

[[labels]]
name = "spam"
description = "Unsolicited advertising"
"""
TAXONOMY = Taxonomy(name="harms", title="Harms", labels=("hate", "threat", "spam"), hints=("", "", ""), multi=True,
                    none_label="none")
KIND = quality.label_kind(TAXONOMY)
PROJECT = 5


def strict_json(model) -> str:
    return json.dumps(model.model_dump(mode="json"), allow_nan=False)


def row(annotation_id: int, label: tuple, *, task: int | None = None, item: str | None = None, annotator: int = 1,
        suggested: tuple | None = None, kind: str = "active", gold: tuple | None = None,
        model_label: tuple | None = None, day: int = 1) -> dict:
    task = annotation_id if task is None else task
    return {"annotation_id": annotation_id, "task_id": task, "item_id": item or f"item-{task}",
            "text": f"text {task}", "label": label, "annotator": annotator,
            "updated_at": f"2026-03-{day:02d}T10:00:00.000000Z", "ground_truth": False, "lead_time": 3.0,
            "suggested_label": suggested, "suggested_model_version": "m:v1" if suggested is not None else None,
            "kind": kind, "gold": gold, "model_version": "m:v1" if kind == "audit" else None,
            "model_label": model_label, "prediction_id": None}


def table(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=quality.TABLE_COLUMNS)


# --- gold -----------------------------------------------------------------------------------------------


def test_gold_is_an_exact_set_match_with_per_label_accuracy_and_recall() -> None:
    """Honeypot gold comes from the slice store as the journal's JSON text; it must compare with the
    journal's tuples (before, every multi-label reviewer read as wrong on every honeypot)."""
    def ann(annotation_id: int, label: tuple, task: int, annotator: int, ground_truth: bool = False) -> dict:
        return {**row(annotation_id, label, task=task, annotator=annotator), "id": f"i{task}",
                "ground_truth": ground_truth}

    annotations = pd.DataFrame([
        ann(1, ("hate", "threat"), 10, 1),  # gold hate+threat: right
        ann(2, ("hate",), 10, 2),           # misses threat: wrong
        ann(3, (), 11, 1),                  # gold none: right
        ann(4, ("hate", "spam"), 12, 1),    # gold spam, adds hate: wrong
        ann(5, ("threat",), 13, 9, ground_truth=True),  # defines the gold of task 13
        ann(6, ("threat",), 13, 2),         # right
    ]).drop(columns=["item_id", "kind", "gold", "model_version", "model_label"])
    slices = pd.DataFrame([
        {"project_id": PROJECT, "task_id": t, "item_id": f"i{t}", "kind": "honeypot",
         "gold_label": label_text(TAXONOMY, g)}
        for t, g in ((10, ("threat", "hate")), (11, ()), (12, ("spam",)))
    ])
    t = quality.attach_gold(annotations, slices, TAXONOMY)
    result = quality.gold_accuracy(t, min_n=1, kind=KIND)
    assert (result.overall.k, result.overall.n) == (3, 5)
    assert {g.key: (g.value.k, g.value.n) for g in result.per_annotator} == {"1": (2, 3), "2": (1, 2)}
    assert {g.key: (g.value.k, g.value.n) for g in result.per_class} == {
        "hate+threat": (1, 2), "none": (1, 1), "spam": (0, 1), "threat": (1, 1)}
    # hate: wrong only on task 12 (added); threat: wrong only where annotator 2 missed it; spam: always right
    assert {k: (p.k, p.n) for k, p in result.per_label_accuracy.items()} == {
        "hate": (4, 5), "threat": (4, 5), "spam": (5, 5)}
    # of gold carriers: hate 2 rows (both given), threat 3 rows (one missed), spam 1 row (given)
    assert {k: (p.k, p.n) for k, p in result.per_label_recall.items()} == {
        "hate": (2, 2), "threat": (2, 3), "spam": (1, 1)}
    assert result.overall.low < 0.6 < result.overall.high  # Wilson interval around 3/5
    strict_json(result)


# --- acceptance, automation bias --------------------------------------------------------------------------


def test_acceptance_is_an_exact_set_match_and_the_confusion_counts_label_pairs() -> None:
    t = table(
        row(1, ("hate",), suggested=("hate",)),                      # accepted
        row(2, ("hate", "threat"), suggested=("hate",)),             # threat added
        row(3, (), suggested=("spam",)),                             # spam removed
        row(4, ("threat", "hate"), suggested=("hate", "threat")),    # same set, other order: accepted
        row(5, ("spam",)),                                           # no pre-label
        row(6, ("hate",), suggested=("spam",), kind="adjudication"),  # a disputed human label: left out
    )
    result = quality.acceptance(t, TAXONOMY.labels, by="class", min_n=1, kind=KIND)
    assert (result.overall.k, result.overall.n, result.without_suggestion) == (2, 4, 1)
    assert {g.key: (g.value.k, g.value.n) for g in result.groups} == {"hate": (1, 2), "hate+threat": (1, 1),
                                                                       "spam": (0, 1)}
    assert result.confusion.labels == ["hate", "threat", "spam", "none"]
    # rows: suggested; columns: chosen. 1: h->h. 2: h->h, h->t. 3: s->none. 4: {h,t} x {h,t}
    assert result.confusion.counts == [[3, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert result.confusion.n == 8
    strict_json(result)


def test_automation_bias_compares_exact_sets_shown_and_blind() -> None:
    t = table(
        row(1, ("hate",), suggested=("hate",), gold=("hate",)),
        row(2, ("hate", "threat"), suggested=("hate",), gold=("hate",)),
        row(3, ("spam",), kind="audit", model_label=("spam",), gold=("spam",)),
        row(4, (), kind="audit", model_label=("spam",), gold=("threat",)),
    )
    bias = quality.automation_bias(t, min_n=1, kind=KIND)
    assert (bias.agreement_with_suggestion.k, bias.agreement_with_suggestion.n) == (1, 2)
    assert (bias.agreement_without_suggestion.k, bias.agreement_without_suggestion.n) == (1, 2)
    assert (bias.gold_accuracy_with_suggestion.k, bias.gold_accuracy_with_suggestion.n) == (1, 2)
    assert (bias.gold_accuracy_without_suggestion.k, bias.gold_accuracy_without_suggestion.n) == (1, 2)


# --- audit ----------------------------------------------------------------------------------------------


def test_audit_scores_exact_sets_per_label_recall_and_macro_micro_f1() -> None:
    rows = [row(i, ("hate",), kind="audit", model_label=("hate",)) for i in range(1, 7)]
    rows += [row(7, ("hate", "threat"), kind="audit", model_label=("hate",)),   # threat missed
             row(8, ("threat",), kind="audit", model_label=("threat",)),
             row(9, (), kind="audit", model_label=("spam",)),                   # spam predicted wrongly
             row(10, ("spam",), kind="audit", model_label=("spam",)),
             # two reviewers on one task: hate 2/2 > half, threat 1/2 is not more than half -> (hate,)
             row(11, ("hate", "threat"), task=11, annotator=1, kind="audit", model_label=("hate",)),
             row(12, ("hate",), task=11, annotator=2, kind="audit", model_label=("hate",), day=2)]
    result = quality.audit(table(*rows), TAXONOMY.labels, min_n=5, kind=KIND)
    scores = result.audit
    assert scores.n == 11 and (scores.accuracy.k, scores.accuracy.n) == (9, 11)
    assert {k: (p.k, p.n) for k, p in scores.recall.items()} == {"hate": (8, 8), "threat": (1, 2), "spam": (1, 1)}
    # F1: hate 1, threat 2*1/(2+1), spam 2*1/(1+2) -> macro 7/9; micro 2*10/(16+3+3) = 20/22
    assert scores.macro_f1.value == pytest.approx(7 / 9)
    assert scores.micro_f1.value == pytest.approx(20 / 22)
    assert scores.macro_f1.low <= scores.macro_f1.value <= scores.macro_f1.high
    by_class = quality.audit(table(*rows), TAXONOMY.labels, by="class", min_n=1, kind=KIND)
    assert {g.key: (g.value.k, g.value.n) for g in by_class.groups}["hate+threat"] == (0, 1)
    assert "NaN" not in strict_json(result)


# --- agreement ------------------------------------------------------------------------------------------


def overlap(i: int, first: tuple, second: tuple) -> list[dict]:
    return [row(100 + i, first, task=i, item=f"it{i}", annotator=1),
            row(200 + i, second, task=1000 + i, item=f"it{i}", annotator=2, kind="overlap")]


def test_agreement_is_per_label_alpha_their_mean_and_exact_set_pairs() -> None:
    rows = [r for i in range(6) for r in overlap(i, ("hate",), ("hate",))]
    rows += [r for i in range(6, 9) for r in overlap(i, ("hate", "threat"), ("hate",))]
    rows += [r for i in range(9, 12) for r in overlap(i, (), ())]
    result = agreement.label_set_agreement(table(*rows), TAXONOMY.labels, min_n=10)
    assert (result.n_items, result.n_annotators) == (12, 2)
    assert result.alpha_per_class["hate"].value == 1.0
    # threat: 24 pairable values, 3 yes; D_o = 6/24, D_e = 2*3*21/(24*23): alpha = 1 - 138/126 = -2/21
    assert result.alpha_per_class["threat"].value == pytest.approx(-2 / 21)
    assert result.alpha_per_class["spam"].value == 1.0 and "trivially" in result.alpha_per_class["spam"].note
    # the mean leaves out spam, which nobody ever chose: (1 - 2/21) / 2
    assert result.alpha.value == pytest.approx((1 - 2 / 21) / 2)
    (pair,) = result.pair_agreement
    assert (pair.agreement.k, pair.agreement.n) == (9, 12)
    # kappa on the set as one answer: p_o = 9/12, p_e = (6/12)(9/12) + (3/12)(3/12) = 7/16 -> 5/9
    assert result.kappa_pairs[0].kappa.value == pytest.approx(5 / 9)
    strict_json(result)
    assert KIND.agreement(table(*rows), 10).alpha.value == result.alpha.value


def test_agreement_without_overlap_says_so() -> None:
    result = agreement.label_set_agreement(table(row(1, ("hate",))), TAXONOMY.labels)
    assert result.n_items == 0 and "two annotators" in result.note
    strict_json(result)


# --- label issues ---------------------------------------------------------------------------------------


def noisy_sets(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each label is one embedding direction; 12 items get a label added or dropped."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.35).astype(int)
    x = np.hstack([y * 4.0, np.zeros((n, 3))]) + rng.normal(size=(n, 6))
    flipped = rng.choice(n, 12, replace=False)
    noisy = y.copy()
    noisy[flipped, rng.integers(0, 3, 12)] ^= 1
    return x, noisy, flipped


def test_label_set_errors_are_found_with_cleanlab_multi_label() -> None:
    x, noisy, flipped = noisy_sets()
    proba = label_set_out_of_fold_proba(x, noisy, seed=0)
    assert proba.shape == noisy.shape and ((proba >= 0) & (proba <= 1)).all()
    frame = pd.DataFrame({"task_id": np.arange(len(noisy)), "id": [f"i{i}" for i in range(len(noisy))],
                          "annotation_id": np.arange(len(noisy)), "text": "t",
                          "label": [KIND.key(tuple(c for c, on in zip(TAXONOMY.labels, r, strict=True) if on))
                                    for r in noisy]})
    issues = rank_label_set_issues(frame, noisy, proba, TAXONOMY.labels, top_k=12)
    found = {i.task_id for i in issues}
    assert len(found & set(flipped)) >= 9, (sorted(found), sorted(flipped))
    first = issues[0]
    assert isinstance(first.label, list) and set(first.label) <= set(TAXONOMY.labels)
    assert [i.quality for i in issues] == sorted(i.quality for i in issues)
    assert shown_label([]) == "none" and shown_label(["hate", "spam"]) == "hate+spam" and shown_label("hate") == "hate"


# --- adjudication ---------------------------------------------------------------------------------------


def annotations_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"annotation_id": 1, "task_id": 10, "id": "a", "text": "text a", "label": ("hate", "threat")},
        {"annotation_id": 2, "task_id": 11, "id": "b", "text": "text b", "label": ()},
        {"annotation_id": 3, "task_id": 12, "id": "c", "text": "text c", "label": ("spam",)},
    ])


def no_slices() -> pd.DataFrame:
    return pd.DataFrame(columns=["project_id", "task_id", "item_id", "kind", "gold_label", "source_task_id",
                                 "disputed_label", "disputed_annotation_id", "model_version", "created_at"])


def test_plan_adjudication_takes_label_sets_and_refuses_unknown_names() -> None:
    issue = LabelIssue(rank=1, task_id=10, item_id="a", annotation_id=1, label=["threat", "hate"],
                       model_label=["hate"], quality=0.1, text="text a")
    send, skipped = plan_adjudication([issue, {"annotation_id": 2}, {"annotation_id": 3, "label": '["spam"]'}],
                                      annotations_frame(), no_slices(), TAXONOMY.labels, TAXONOMY)
    assert not skipped
    assert send["disputed_label"].tolist() == [("hate", "threat"), (), ("spam",)]
    with pytest.raises(CandidateError, match="bogus"):
        plan_adjudication([{"annotation_id": 1, "label": ["hate", "bogus"]}], annotations_frame(), no_slices(),
                          TAXONOMY.labels, TAXONOMY)


def test_send_for_adjudication_stores_the_set_and_pre_selects_it(tmp_path: Path) -> None:
    class FakeClient:
        def __init__(self) -> None:
            self.imported: list = []

        def predictions(self, project_id: int) -> list:
            return []

        def create_tasks(self, project_id: int, items: list) -> list[int]:
            return [500 + n for n in range(len(items))]

        def import_predictions(self, project_id: int, predictions: list) -> int:
            self.imported += predictions
            return len(predictions)

    client = FakeClient()
    journal = SimpleNamespace(taxonomy=TAXONOMY, annotations=lambda project_id: annotations_frame())
    with SliceStore(tmp_path / "slices.db") as store:
        result = send_for_adjudication(client, PROJECT, journal, store, [{"annotation_id": 1}, {"annotation_id": 2}],
                                       "m:v3", TAXONOMY.labels)
        frame = store.frame(PROJECT)
    assert [i.disputed_label for i in result.sent] == ['["hate", "threat"]', "[]"]
    assert frame["disputed_label"].map(lambda s: label_cell(TAXONOMY, s)).tolist() == [("hate", "threat"), ()]
    assert [p.label for p in client.imported] == [("hate", "threat"), ("none",)]  # empty set: the none choice
    # a pending adjudication carried into a later queue is pre-selected as the same set
    carried = place_pending(frame, {}, set(), lambda stored: label_cell(TAXONOMY, stored))
    assert [s.label for s in carried.adjudications] == [("hate", "threat"), ()]


# --- the whole context and /v1/quality --------------------------------------------------------------------


def webhook(ann_id: int, task_id: int, labels: list[str], *, annotator: int, item: str, text: str,
            suggested: list[str] | None = None) -> tuple[dict, dict]:
    def result(names: list[str]) -> list[dict]:
        return [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": names}}]

    annotation = {"id": ann_id, "task": task_id, "project": PROJECT, "completed_by": annotator,
                  "result": result(labels or ["none"]), "was_cancelled": False, "ground_truth": False,
                  "lead_time": 5.0, "created_at": "2026-03-02T10:00:00Z", "updated_at": "2026-03-02T10:00:00Z",
                  "parent_prediction": 7000 + task_id if suggested is not None else None}
    predictions = [{"id": 7000 + task_id, "model_version": "labelloop-harms:v1", "score": 0.3,
                    "result": result(suggested or ["none"])}] if suggested is not None else []
    return annotation, {"id": task_id, "project": PROJECT, "data": {"text": text, "item_id": item},
                        "predictions": predictions}


def truth_of(i: int) -> list[str]:
    return [label for j, label in enumerate(TAXONOMY.labels) if (i >> j) & 1]


def fake_embed(texts: list[str]) -> np.ndarray:
    """Texts start with their true set as a bit mask ("5 item"); the embedding is those bits plus noise."""
    rng = np.random.default_rng(len(texts))
    bits = np.array([[(int(t.split()[0]) >> j) & 1 for j in range(3)] for t in texts], dtype=float)
    return np.hstack([bits * 4, np.zeros((len(texts), 3))]) + rng.normal(scale=0.5, size=(len(texts), 6))


@pytest.fixture
def multi_settings(settings: Settings, tmp_path: Path) -> Settings:
    """A multi-label journal: 64 items (it21 given a wrong set), 12 also labelled by a second annotator
    (3 of them disagreeing on threat), 4 honeypots (gold stored as the loop stores it) and 8 audit items."""
    path = tmp_path / "harms.toml"
    path.write_text(TOML)
    settings = settings.model_copy(update={"taxonomy": str(path), "ls_project_id": PROJECT})
    taxonomy = get_taxonomy(settings.taxonomy)
    with Journal(settings.journal_path, taxonomy) as journal, SliceStore(settings.slices_path) as slices:
        ann = 0
        for i in range(64):
            truth = truth_of(i % 8)
            given = ["spam"] if i == 21 else truth  # item 21 is hate+spam... (21 % 8 = 5), labelled spam only
            ann += 1
            journal.apply_annotation(*webhook(ann, i + 1, given, annotator=1, item=f"it{i}", text=f"{i % 8} {i}",
                                              suggested=truth))
            if i < 12:
                second = [*truth, "threat"] if i in (0, 1, 4) else truth  # adds threat where it is absent
                ann += 1
                journal.apply_annotation(*webhook(ann, 500 + i, sorted(set(second)), annotator=2, item=f"it{i}",
                                                  text=f"{i % 8} {i}"))
                slices.add([SliceItem(PROJECT, 500 + i, f"it{i}", "overlap", source_task_id=i + 1)])
        for h, (gold, given) in enumerate([(["hate"], ["hate"]), (["hate", "threat"], ["threat", "hate"]),
                                           ([], []), (["spam"], ["spam", "hate"])]):
            ann += 1
            journal.apply_annotation(*webhook(ann, 800 + h, given, annotator=2, item=f"hp{h}", text=f"1 h{h}",
                                              suggested=["hate"]))
            slices.add([SliceItem(PROJECT, 800 + h, f"hp{h}", "honeypot", gold_label=label_text(taxonomy, gold))])
        for a in range(8):
            ann += 1
            journal.apply_annotation(*webhook(ann, 900 + a, truth_of(a), annotator=2, item=f"au{a}",
                                              text=f"{a} a{a}"))
            slices.add([SliceItem(PROJECT, 900 + a, f"au{a}", "audit", model_version="labelloop-harms:v1")])
    return settings


def test_context_measures_a_multi_label_journal(multi_settings: Settings) -> None:
    taxonomy = get_taxonomy(multi_settings.taxonomy)
    with Journal(multi_settings.journal_path, taxonomy) as journal, SliceStore(multi_settings.slices_path) as slices:
        # the fake champion predicts {hate} for every audit item: right on truth_of(1) only
        ctx = QualityContext(settings=multi_settings, journal=journal, slices=slices, taxonomy=taxonomy,
                             project_id=PROJECT, predict=lambda version, texts: [("hate",)] * len(texts),
                             embed=fake_embed, min_n=3)
        report = ctx.report()
        assert report.multi_label and report.n_annotations == 64 + 12 + 4 + 8
        assert (report.gold.overall.k, report.gold.overall.n) == (3, 4)  # only the last honeypot is wrong
        assert (report.acceptance.overall.k, report.acceptance.overall.n) == (63 + 1, 64 + 4)
        assert (report.audit.audit.accuracy.k, report.audit.audit.accuracy.n) == (1, 8)
        assert report.agreement.n_items == 12 and report.agreement.pair_agreement[0].agreement.k == 9
        strict_json(report)
        crowd = ctx.crowdlab()
        assert crowd.annotators == [] and "not available for multi-label" in crowd.note
        issues = ctx.label_issues(top_k=3)
        assert issues.n_labelled == 64 + 8  # honeypots out, overlap copies voted with their item
        assert issues.issues and issues.issues[0].item_id == "it21"
        assert issues.issues[0].label == ["spam"] and issues.issues[0].model_label == ["hate", "spam"]


def test_router_answers_a_multi_label_journal_without_nan(multi_settings: Settings) -> None:
    app = FastAPI()
    app.state.settings = multi_settings
    app.include_router(router)
    with TestClient(app) as client:
        response = client.get("/v1/quality", params={"by": "class"})
        assert response.status_code == 200
        body = json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
        assert body["multi_label"] is True
        assert (body["gold"]["overall"]["k"], body["gold"]["overall"]["n"]) == (3, 4)
        assert body["gold"]["per_label_recall"]["hate"]["k"] == 2
        assert body["acceptance"]["confusion"]["labels"] == ["hate", "threat", "spam", "none"]
        assert body["agreement"]["alpha_per_class"]["hate"]["value"] is not None
        crowd = client.get("/v1/quality/crowdlab")
        assert crowd.status_code == 200 and "not available for multi-label" in crowd.json()["note"]
        for path in ("/v1/quality/gold", "/v1/quality/agreement", "/v1/quality/audit",
                     "/v1/quality/automation-bias", "/v1/quality/acceptance"):
            assert client.get(path).status_code == 200, path


def test_cli_prints_the_multi_label_measures(multi_settings: Settings, monkeypatch) -> None:
    from typer.testing import CliRunner

    from labelloop.cli import app

    monkeypatch.setattr("monitoring.cli.get_settings", lambda: multi_settings)
    result = CliRunner().invoke(app, ["quality", "--by", "class"])
    assert result.exit_code == 0, result.output
    assert "reviewer accuracy on gold" in result.output and "gold recall" in result.output
    as_json = json.loads(CliRunner().invoke(app, ["quality", "--json"]).output)
    assert as_json["multi_label"] and as_json["gold"]["per_label_recall"]["threat"]["n"] == 1
    crowd = CliRunner().invoke(app, ["quality", "crowdlab"])
    assert crowd.exit_code == 0 and "not available for multi-label" in crowd.output.replace("\n", " ")


def test_dashboard_shows_an_adjudicated_label_set_readably() -> None:
    from monitoring.dashboard import adjudication_states

    issue = LabelIssue(rank=1, task_id=10, item_id="a", annotation_id=1, label=["spam"], model_label=["hate", "spam"],
                       quality=0.1, text="text a")
    slices = pd.DataFrame([{"kind": "adjudication", "task_id": 500, "source_task_id": 10}])
    annotations = pd.DataFrame([{"task_id": 500, "label": ("hate", "spam"), "updated_at": "2026-03-02T10:00:00Z"}])
    (state,) = adjudication_states([issue], slices, annotations, lambda task: None)
    assert state.adjudication == "adjudicated: hate+spam"
