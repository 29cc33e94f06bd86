"""The ML backend serving a multi-label model: ``choice="multiple"`` pre-labels with per-label thresholds,
the none label for an empty set, the score of a set, ``/v1/predict`` label sets, and configs that do not fit.

A deterministic keyword classifier (sigmoid-style probabilities per keyword) is served through a fake
model source, so every chosen set and score is known exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.taxonomy import Taxonomy, parse_label_config
from serving.app import create_app
from serving.protocol import bind_multi_label
from training.classifier import TextClassifier
from training.registry import LoadedModel, ModelRef

TAXONOMY = Taxonomy("targets", "Who is targeted", ("gender", "race", "religion"),
                    ("Targets a gender", "Targets a race", "Targets a religion"), multi=True,
                    none_label="none_of_these")
NAME = "labelloop-targets"
THRESHOLDS = (0.5, 0.3, 0.6)
# per keyword: each label's own probability (rows need not sum to one)
PROBA = {
    "women": (0.9, 0.1, 0.2),
    "both": (0.8, 0.35, 0.1),   # race 0.35 passes its 0.3 threshold: a set of two
    "faith": (0.1, 0.2, 0.55),  # religion 0.55 misses its 0.6 threshold: the empty set
    "other": (0.05, 0.1, 0.1),
}


def multi_config(labels: tuple[str, ...], choice: str = "multiple") -> str:
    options = "".join(f'<Choice value="{label}"/>' for label in labels)
    return (f'<View><Text name="text" value="$text"/>'
            f'<Choices name="label" toName="text" choice="{choice}">{options}</Choices></View>')


CONFIG = multi_config((*TAXONOMY.labels, "none_of_these"))


class KeywordSigmoids(TextClassifier):
    kind = "keyword_sigmoids"
    multi_label = True

    def __init__(self, multi_label: bool = True):
        self.labels = TAXONOMY.labels
        self.max_length = 64
        self.multi_label = multi_label
        self.thresholds = THRESHOLDS

    def predict_proba(self, texts, batch_size=64, progress=None) -> np.ndarray:
        rows = [next((PROBA[k] for k in PROBA if k in t.lower()), PROBA["other"]) for t in texts]
        return np.array(rows, dtype=np.float32).reshape(len(texts), len(self.labels))

    def embed(self, texts, batch_size=64, progress=None) -> np.ndarray:
        return np.zeros((len(texts), 2), dtype=np.float32)

    def _save_weights(self, path: Path) -> dict:
        return {}


class OneVersion:
    model_name = NAME

    def __init__(self, classifier: TextClassifier):
        self.classifier = classifier

    def current_version(self) -> int:
        return 1

    def load(self, version: int) -> LoadedModel:
        return LoadedModel(ModelRef(NAME, version), self.classifier)

    def aliases(self) -> dict[str, int]:
        return {"champion": 1}

    def versions(self) -> list[int]:
        return [1]

    def check_texts(self, limit: int) -> list[str]:
        return []


@pytest.fixture
def serve(settings: Settings) -> Iterator:
    clients: list[TestClient] = []

    def make(classifier: TextClassifier, taxonomy: Taxonomy = TAXONOMY) -> TestClient:
        journal = Journal(settings.journal_path.with_name(f"journal-{len(clients)}.sqlite"), taxonomy)
        app = create_app(settings.model_copy(update={"poll_seconds": 0}), model_source=OneVersion(classifier),
                         journal=journal)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def predict(client: TestClient, texts: list[str], config: str = CONFIG) -> list[dict]:
    body = {"tasks": [{"id": i + 1, "data": {"text": t}} for i, t in enumerate(texts)], "project": "4.1",
            "label_config": config}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def confidence(row: tuple[float, ...], chosen: tuple[int, ...]) -> float:
    return float(np.mean([p if i in chosen else 1 - p for i, p in enumerate(row)]))


def test_parse_label_config_knows_a_multiple_choice_control():
    assert parse_label_config(CONFIG).multiple
    assert not parse_label_config(multi_config(TAXONOMY.labels, "single")).multiple


def test_predict_preselects_the_whole_set_chosen_by_per_label_thresholds(serve):
    client = serve(KeywordSigmoids())
    women, both, faith, other = predict(client, ["Women should stay home", "both of them", "their faith", "hi"])
    assert women["result"] == [{"from_name": "label", "to_name": "text", "type": "choices",
                                "value": {"choices": ["gender"]}}]
    assert both["result"][0]["value"]["choices"] == ["gender", "race"]
    # religion at 0.55 is under its threshold of 0.6: nothing applies, so the explicit none label shows
    assert faith["result"][0]["value"]["choices"] == ["none_of_these"]
    assert other["result"][0]["value"]["choices"] == ["none_of_these"]
    assert women["score"] == pytest.approx(confidence(PROBA["women"], (0,)))
    assert both["score"] == pytest.approx(confidence(PROBA["both"], (0, 1)))
    assert faith["score"] == pytest.approx(confidence(PROBA["faith"], ()))
    # the uncertain item ranks first under Label Studio's lowest-score-first sampling
    assert min((p["score"], i) for i, p in enumerate((women, both, faith, other)))[1] == 1


def test_an_empty_set_without_a_none_choice_in_the_config_preselects_nothing(serve):
    client = serve(KeywordSigmoids())
    (p,) = predict(client, ["hello"], config=multi_config(TAXONOMY.labels))
    assert p["result"] == [] and p["score"] == pytest.approx(confidence(PROBA["other"], ()))


def test_a_config_offering_a_subset_drops_the_other_labels_from_the_set(serve):
    client = serve(KeywordSigmoids())
    (p,) = predict(client, ["both"], config=multi_config(("race", "religion", "none_of_these")))
    assert p["result"][0]["value"]["choices"] == ["race"]
    assert p["score"] == pytest.approx(np.mean([0.35, 1 - 0.1]))


@pytest.mark.parametrize("multi_label, config", [(True, multi_config(TAXONOMY.labels, "single")),
                                                 (False, CONFIG)])
def test_a_config_whose_choice_kind_does_not_fit_the_model_is_a_clear_422(serve, multi_label, config):
    client = serve(KeywordSigmoids(multi_label=multi_label))
    for path, body in (("/setup", {"project": "4.1", "schema": config}),
                       ("/predict", {"tasks": [{"id": 1, "data": {"text": "x"}}], "label_config": config})):
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert "multiple" in r.json()["detail"] and f"{NAME}:v1" in r.json()["detail"]


def test_v1_predict_returns_the_chosen_set_and_every_labels_probability(serve):
    client = serve(KeywordSigmoids())
    r = client.post("/v1/predict", json={"texts": ["both sides", "their faith"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["multi_label"] is True and body["model_version"] == f"{NAME}:v1"
    both, faith = body["predictions"]
    assert both["labels"] == ["gender", "race"] and faith["labels"] == []
    assert both["probabilities"] == pytest.approx(dict(zip(TAXONOMY.labels, PROBA["both"], strict=True)))
    assert both["score"] == pytest.approx(confidence(PROBA["both"], (0, 1)))
    assert set(both) == {"labels", "score", "probabilities"}


def test_single_label_v1_predict_keeps_its_shape(serve):
    single = Taxonomy("two", "Two", ("a", "b"), ("A", "B"))

    class Softmax(KeywordSigmoids):
        kind = "keyword_softmax"

        def __init__(self):
            self.labels, self.max_length, self.multi_label = ("a", "b"), 64, False

        def predict_proba(self, texts, batch_size=64, progress=None):
            return np.tile(np.array([0.3, 0.7], dtype=np.float32), (len(texts), 1))

    r = serve(Softmax(), single).post("/v1/predict", json={"texts": ["x"]})
    assert r.status_code == 200
    assert r.json()["multi_label"] is False
    assert r.json()["predictions"] == [{"label": "b", "score": pytest.approx(0.7),
                                        "probabilities": {"a": pytest.approx(0.3), "b": pytest.approx(0.7)}}]


# ------------------------------------------------------------------------------------------------
# pre-labels the loop pushes into a multi-label project
# ------------------------------------------------------------------------------------------------


def test_a_pushed_prediction_preselects_a_set_and_only_where_the_config_takes_several():
    from active_learning.labelstudio import PredictionIn

    multiple, single = parse_label_config(CONFIG), parse_label_config(multi_config(TAXONOMY.labels, "single"))
    both = PredictionIn(task_id=1, score=0.01, model_version="m:v1", label=("gender", "race"))
    assert both.to_ls()["result"] == [{"from_name": "label", "to_name": "text", "type": "choices",
                                       "value": {"choices": ["gender", "race"]}}]
    assert both.problem(multiple, 4) is None
    assert "one label" in both.problem(single, 4)
    assert "ethnicity" in PredictionIn(task_id=1, score=0.0, model_version="m:v1",
                                       label=("gender", "ethnicity")).problem(multiple, 4)
    # the empty set without a none label: the priority alone, nothing pre-selected
    assert PredictionIn(task_id=1, score=0.0, model_version="m:v1", label=()).to_ls()["result"] == []
    with pytest.raises(ValueError):
        PredictionIn(task_id=1, score=0.0, model_version="m:v1", label="")


def test_review_priorities_stay_below_every_multi_label_backend_score():
    from active_learning.loop import priority_classes
    from active_learning.slices_push import Suggested, priorities_for

    classifier = KeywordSigmoids()
    classifier.thresholds = (0.5, 0.05, 0.9)
    k = priority_classes(classifier)
    pushed = priorities_for([Suggested(i, ("gender",)) for i in range(1, 50)], [], k, "m:v1")
    proba = np.random.default_rng(0).random((2000, 3)).astype(np.float32)
    lowest = min(d.score for d in bind_multi_label(TAXONOMY.labels).decisions(proba, classifier))
    assert max(p.score for p in pushed) < lowest
    assert priority_classes(KeywordSigmoids(multi_label=False)) == 3


def test_pool_decisions_compare_multi_label_rounds_per_label():
    from active_learning.loop import pool_decisions
    from active_learning.stopping import agreement_kappa

    classifier = KeywordSigmoids()
    texts = ["women", "both", "faith", "other"]
    first = pool_decisions(classifier, classifier.predict_proba(texts), np.array([11, 12, 13, 14]))
    assert len(first) == 4 * 3 and first.loc[(12, 1)] == 1 and first.loc[(13, 2)] == 0
    shifted = pool_decisions(classifier, classifier.predict_proba(texts[1:] + ["women"]), np.array([12, 13, 14, 15]))
    assert agreement_kappa(first, shifted) == 1.0  # compared on the three tasks both rounds scored
