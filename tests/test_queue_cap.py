"""The cap-aware queue: the policy on its own, and ``/v1/queue/next`` against a real Label Studio.

The Label Studio project, its tasks, their serving order and the reviewer's account are real; the champion's
view of the texts is a stand-in (a model trained for this would only slow the test down, and what is tested
is what the queue does with a confident severe prediction, not the model).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from active_learning.labelstudio import LabelStudioClient, PriorityIn
from active_learning.service import ProjectTasks
from labelloop.config import Settings
from labelloop.exposure import ExposureLedger
from labelloop.journal import Journal
from labelloop.taxonomy import get_taxonomy, review_label_config
from serving.queue_api import CAP_HEADER, Candidate, get_scorer, notice, pick_next, queue_router
from tests.label_studio_fixtures import RunningLabelStudio

TAXONOMY_FILE = Path("examples/taxonomies/integrity_severity.toml").resolve()


# ------------------------------------------------------------------------------------------- policy
def test_under_the_cap_the_head_of_the_queue_is_served_severe_or_not():
    queue = [Candidate(1, "a", "predicted hate (0.97)"), Candidate(2, "b")]
    assert pick_next(queue, over_cap=False).candidate == queue[0]


def test_over_the_cap_severe_items_are_passed_over_while_other_work_exists_and_the_reviewer_is_told():
    queue = [Candidate(1, "a", "predicted hate (0.97)"), Candidate(2, "b", "predicted hate (0.95)"), Candidate(3, "c")]
    pick = pick_next(queue, over_cap=True)
    assert (pick.candidate, pick.skipped_severe) == (queue[2], 2)
    assert "cap of 5" in (notice(pick, over_cap=True, seen=5, cap=5) or "")


def test_over_the_cap_with_only_severe_work_left_it_is_served_and_said():
    queue = [Candidate(1, "a", "predicted hate (0.97)")]
    pick = pick_next(queue, over_cap=True)
    assert pick.candidate == queue[0] and pick.only_severe_left
    assert "only severe items are left" in (notice(pick, over_cap=True, seen=9, cap=5) or "")
    assert pick_next([], over_cap=True).candidate is None


def test_the_overlap_copy_of_a_blurred_item_is_blurred_too(settings: Settings):
    """An overlap copy is a task of its own, created with only the lexicon mask: without blurring it, the
    second reviewer read in full the item the first one was spared."""
    import numpy as np
    import pandas as pd

    from active_learning.loop import ActiveLearningLoop
    from labelloop.policy import Protection, Severity

    class Tasks:
        def __init__(self) -> None:
            self.masked: dict[int, str] = {}

        def set_masked_text(self, task_id: int, item_id: str, text: str, masked: str) -> None:
            self.masked[task_id] = masked

    loop = ActiveLearningLoop.__new__(ActiveLearningLoop)
    loop.settings = settings.model_copy(update={"severity": Severity(severe_labels=("hate",)),
                                                "protection": Protection(blur_threshold=0.9)})
    loop.client, loop.blurred, loop.taxonomy = Tasks(), {}, get_taxonomy("hate_offensive")
    unlabeled = pd.DataFrame({"task_id": [11, 12], "item_id": ["a", "b"], "text": ["vile threat", "a cat"]})
    proba = np.array([[0.97, 0.03], [0.2, 0.8]])
    assert loop._blur_confident_severe(unlabeled, proba, ["hate", "neither"], [0, 1], {0: 21, 1: 22}) == 2
    assert set(loop.client.masked) == set(loop.blurred) == {11, 21}
    assert all("vile" not in shown for shown in loop.client.masked.values())


def test_a_multi_label_item_is_judged_by_its_most_probable_severe_label():
    """Sigmoid labels are independent: "violence" at 0.95 beside a target group at 0.99 is a confident severe
    prediction, which the queue and the blur missed when they looked only at the top label."""
    from serving.queue_api import judged_prediction

    labels = ["gender", "violence", "race"]
    assert judged_prediction(labels, [0.99, 0.95, 0.1], multi_label=True, severe_labels=("violence",)) == (
        "violence", 0.95)
    assert judged_prediction(labels, [0.99, 0.95, 0.1], multi_label=True, severe_labels=()) == ("gender", 0.99)
    assert judged_prediction(labels, [0.5, 0.3, 0.2], multi_label=False, severe_labels=("violence",)) == (
        "gender", 0.5)


def test_the_loop_blurs_a_multi_label_item_with_a_confident_severe_label_below_the_top(settings: Settings):
    import numpy as np
    import pandas as pd

    from active_learning.loop import ActiveLearningLoop
    from labelloop.policy import Protection, Severity

    class Tasks:
        def __init__(self) -> None:
            self.masked: dict[int, str] = {}

        def set_masked_text(self, task_id: int, item_id: str, text: str, masked: str) -> None:
            self.masked[task_id] = masked

    loop = ActiveLearningLoop.__new__(ActiveLearningLoop)
    loop.settings = settings.model_copy(update={"severity": Severity(severe_labels=("violence",)),
                                                "protection": Protection(blur_threshold=0.9)})
    loop.client, loop.blurred = Tasks(), {}
    loop.taxonomy = get_taxonomy(str(Path("examples/taxonomies/ethos_targets.toml").resolve()))
    labels = list(loop.taxonomy.labels)
    row = np.full(len(labels), 0.05)
    row[labels.index("violence")], row[(labels.index("violence") + 1) % len(labels)] = 0.95, 0.99
    unlabeled = pd.DataFrame({"task_id": [11], "item_id": ["a"], "text": ["kill them all"]})
    assert loop._blur_confident_severe(unlabeled, row[None, :], labels, [0]) == 1
    assert loop.blurred == {11: ("violence", 0.95)} and "kill" not in loop.client.masked[11]


def test_over_the_cap_a_non_severe_task_past_the_first_lookahead_is_still_found(settings: Settings):
    """The queue looked only at the first LOOKAHEAD tasks: with those all severe it served a severe one and
    told the reviewer only severe work was left, though non-severe tasks waited further down."""
    import asyncio
    from types import SimpleNamespace

    from labelloop.policy import Protection, Severity
    from serving.queue_api import LOOKAHEAD, _next

    n_severe = LOOKAHEAD + 30
    tasks = [{"task_id": i, "item_id": f"i{i}", "text": "bad" if i <= n_severe else "fine", "score": None}
             for i in range(1, n_severe + 11)]
    source = SimpleNamespace(unlabelled_tasks=lambda: tasks, user_id=lambda email: 5,
                             labeling_url=lambda task_id: f"http://ls/projects/1/data?task={task_id}")
    ledger = SimpleNamespace(sync=lambda *a: None, day=lambda reviewer, day: SimpleNamespace(severe_seen=3))
    guarded = settings.model_copy(update={"severity": Severity(severe_labels=("hate",)),
                                          "protection": Protection(daily_severe_cap=3, blur_threshold=0.9)})

    async def scorer(texts: list[str]) -> list[tuple[str, float]]:
        return [("hate", 0.99) if text == "bad" else ("neither", 0.99) for text in texts]

    out = asyncio.run(_next("r@example.org", guarded, source, ledger, None, scorer))
    assert (out.task_id, out.severe, out.skipped_severe) == (n_severe + 1, False, n_severe)
    assert "only severe" not in (out.notice or "") and out.over_cap


def test_label_studio_down_gives_503_not_500(settings: Settings):
    """A Label Studio outage raised LabelStudioError through the route: a 500 where the issue asks for a
    clear answer."""
    import asyncio

    from fastapi import HTTPException

    from active_learning.labelstudio import LabelStudioError
    from serving.queue_api import _next

    class Down:
        def user_id(self, email: str) -> int | None:
            raise LabelStudioError("listing users failed: cannot reach Label Studio at http://ls")

    source = ProjectTasks(Down(), 1)  # type: ignore[arg-type]
    with pytest.raises(HTTPException) as raised:
        asyncio.run(_next("r@example.org", settings, source, None, None, None))  # type: ignore[arg-type]
    assert raised.value.status_code == 503 and "cannot reach Label Studio" in raised.value.detail


# ------------------------------------------------------------------------------------- real server
async def fake_champion(texts: list[str]) -> list[tuple[str, float]]:
    return [("hate", 0.97) if "SEVERE" in t else ("neither", 0.8) for t in texts]


@pytest.fixture
def queue_setup(label_studio: RunningLabelStudio, tmp_path: Path) -> Iterator[tuple[TestClient, ExposureLedger, int,
                                                                                        dict[str, int]]]:
    settings = Settings(state_dir=tmp_path / "var", mlruns_dir=tmp_path / "mlruns", taxonomy=str(TAXONOMY_FILE))
    taxonomy = get_taxonomy(settings.taxonomy)
    project = label_studio.sdk.projects.create(
        title=f"queue-{uuid.uuid4().hex[:10]}",
        label_config=review_label_config(taxonomy, settings.review_controls, masked=True))
    assert project.id is not None
    client = LabelStudioClient(label_studio.url, label_studio.api_key, mask=settings.protection_policy.mask_text)
    try:
        ids = client.create_tasks(project.id, [("severe-1", "SEVERE threat against a group"),
                                               ("plain-1", "lovely weather for a walk today")])
        tasks = dict(zip(["severe-1", "plain-1"], ids, strict=True))
        version = "v-test"  # the severe item first in the serving order, as uncertainty sampling would have it
        client.import_predictions(project.id, [PriorityIn(task_id=tasks["severe-1"], score=0.01, model_version=version),
                                               PriorityIn(task_id=tasks["plain-1"], score=0.02, model_version=version)])
        client.set_model_version(project.id, version)
        app = FastAPI()
        app.include_router(queue_router)
        ledger = ExposureLedger(settings.exposure_path)
        journal = Journal(settings.journal_path, taxonomy, policy=settings.review_policy)
        app.state.settings, app.state.exposure, app.state.journal = settings, ledger, journal
        app.state.review_queue = ProjectTasks(client, project.id)
        app.dependency_overrides[get_scorer] = lambda: fake_champion
        with TestClient(app) as http:
            yield http, ledger, client.user_id(label_studio.server.credentials().username), tasks
        journal.close()
    finally:
        label_studio.sdk.projects.delete(project.id)


def _see_severe(ledger: ExposureLedger, reviewer: int, count: int) -> None:
    """``count`` severe items this reviewer labelled today, as the journal would feed them."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    settings_policy = get_taxonomy(str(TAXONOMY_FILE))
    ledger.record([{"annotation_id": 10_000 + i, "task_id": 90_000 + i, "annotator": reviewer, "created_at": now,
                    "label": "hate", "severity": "high", "revealed": False} for i in range(count)],
                  settings_policy.policy.severity, settings_policy.protection)


@pytest.mark.integration
def test_a_reviewer_over_the_cap_is_served_a_non_severe_task_and_under_it_the_severe_one(
        queue_setup, label_studio: RunningLabelStudio):
    http, ledger, reviewer_id, tasks = queue_setup
    email = label_studio.server.credentials().username
    cap = get_taxonomy(str(TAXONOMY_FILE)).protection.daily_severe_cap

    under = http.get("/v1/queue/next", params={"reviewer": email})
    assert under.status_code == 200, under.text
    body = under.json()
    assert (body["task_id"], body["severe"], body["over_cap"], body["notice"]) == (tasks["severe-1"], True, False, None)
    assert under.headers[CAP_HEADER] == "ok"
    assert body["labeling_url"].endswith(f"/data?task={tasks['severe-1']}")

    _see_severe(ledger, reviewer_id, cap)
    over = http.get("/v1/queue/next", params={"reviewer": email})
    body = over.json()
    assert (body["task_id"], body["severe"], body["over_cap"], body["skipped_severe"]) == (
        tasks["plain-1"], False, True, 1)
    assert over.headers[CAP_HEADER] == "reached" and "cap" in body["notice"]
    page = http.get("/queue/next", params={"reviewer": email}, follow_redirects=False)
    assert page.status_code == 200 and "non-severe" in page.text and f"task={tasks['plain-1']}" in page.text


@pytest.mark.integration
def test_an_unknown_or_malformed_reviewer_gets_a_clear_4xx(queue_setup):
    http = queue_setup[0]
    unknown = http.get("/v1/queue/next", params={"reviewer": "nobody@example.org"})
    assert unknown.status_code == 404 and "nobody@example.org" in unknown.json()["detail"]
    assert http.get("/v1/queue/next", params={"reviewer": "not an email"}).status_code == 422
    assert http.get("/v1/queue/next").status_code == 422
