"""Reviewer protection in a real Label Studio, seen in a real browser.

The generated config's masked view must work in the server's own frontend (``visibleWhen`` on ``View`` with
``choice-unselected`` / ``choice-selected``): the default view of a task with a lexicon term shows the masked
text and not the original, choosing "Show original" shows the original, and the submitted annotation carries
the reveal, severity and escalation, which the journal records (a reveal is exposure).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from active_learning.labelstudio import LabelStudioClient
from labelloop.exposure import ExposureLedger
from labelloop.journal import Journal
from labelloop.policy import Escalation, Protection, ReviewPolicy, Severity
from labelloop.taxonomy import (
    ESCALATE_CHOICE,
    REVEAL_CHOICE,
    check_label_config,
    get_taxonomy,
    parse_taxonomy,
    review_label_config,
)
from tests.label_studio_fixtures import RunningLabelStudio, wait_for

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
TAXONOMY = get_taxonomy("hate_offensive")
POLICY = ReviewPolicy(severity=Severity(severe_labels=("hate",)),
                      escalation=Escalation(reasons=("credible threat", "child safety", "self-harm")))
ORIGINAL = "you are a fucking disgrace and everyone on this street knows it"


def test_the_generated_config_keeps_the_label_control_and_points_every_control_at_the_text():
    xml = review_label_config(TAXONOMY, POLICY, masked=True)
    control = check_label_config(xml, TAXONOMY)
    assert (control.from_name, control.to_name, control.value_field) == ("label", "text", "text")
    assert 'name="text_masked" value="$text_masked"' in xml
    assert 'visibleWhen="choice-unselected" whenTagName="reveal"' in xml
    assert 'visibleWhen="choice-selected" whenTagName="escalate"' in xml
    assert review_label_config(TAXONOMY, None, masked=False) == review_label_config(TAXONOMY, None, masked=False)
    assert "severity" not in review_label_config(TAXONOMY, None, masked=False)


def test_a_taxonomy_file_carries_severity_escalation_and_protection_and_names_a_bad_field(tmp_path: Path):
    base = Path("examples/taxonomies/integrity_severity.toml").read_text(encoding="utf-8")
    taxonomy = parse_taxonomy(base, "integrity_severity.toml")
    assert taxonomy.policy is not None and taxonomy.policy.severity.levels == ("low", "medium", "high", "critical")
    assert "credible threat" in taxonomy.policy.escalation.reasons
    assert taxonomy.protection is not None and taxonomy.protection.daily_severe_cap is not None
    bad = base.replace('severe_from = "high"', 'severe_from = "extreme"')
    with pytest.raises(ValueError, match=r"line \d+: severity: .*severe_from 'extreme'"):
        parse_taxonomy(bad, "bad.toml")
    with pytest.raises(ValueError, match=r"severity.severe_labels: 'hat' is not one of the labels"):
        parse_taxonomy(base.replace('severe_labels = ["hate"]', 'severe_labels = ["hat"]'), "bad.toml")


@pytest.fixture
def review_project(label_studio: RunningLabelStudio) -> Iterator[int]:
    project = label_studio.sdk.projects.create(title=f"protect-{uuid.uuid4().hex[:10]}",
                                               label_config=review_label_config(TAXONOMY, POLICY, masked=True))
    assert project.id is not None
    try:
        yield project.id
    finally:
        label_studio.sdk.projects.delete(project.id)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make test installs it)")
def test_masked_by_default_reveal_on_demand_and_the_reveal_is_journaled(label_studio: RunningLabelStudio,
                                                                          review_project: int, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    protection = Protection()
    client = LabelStudioClient(label_studio.url, label_studio.api_key, mask=protection.mask_text)
    [task_id] = client.create_tasks(review_project, [("item-1", ORIGINAL)])
    masked = protection.mask_text(ORIGINAL)
    assert masked != ORIGINAL and "f******" in masked
    creds = label_studio.server.credentials()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("input[name=email]", creds.username)
            page.fill("input[name=password]", creds.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url, timeout=60_000)
            page.goto(f"{label_studio.url}/projects/{review_project}/data?task={task_id}")
            main = page.locator(".lsf-main-view")  # the labeling interface (the Data Manager grid is beside it)
            main.get_by_text(REVEAL_CHOICE).wait_for(timeout=90_000)
            # the choices can render before the text views: wait for the masked text to be shown (fails if never)
            main.get_by_text(masked, exact=True).wait_for(state="visible", timeout=30_000)
            assert not main.get_by_text(ORIGINAL, exact=True).is_visible(), "the original shows before a reveal"
            assert not main.get_by_text("Escalation reason").is_visible()
            page.screenshot(path=str(tmp_path / "masked.png"))

            main.get_by_text(REVEAL_CHOICE).click()
            main.get_by_text(ORIGINAL, exact=True).wait_for(timeout=10_000)
            main.get_by_text(masked, exact=True).wait_for(state="hidden", timeout=10_000)

            main.get_by_text(re.compile(r"^hate")).click()
            main.get_by_text(re.compile(r"^high")).click()
            main.get_by_text(ESCALATE_CHOICE).click()
            main.get_by_text("Escalation reason").wait_for(timeout=10_000)
            main.get_by_text("credible threat").click()
            page.screenshot(path=str(tmp_path / "revealed.png"))
            page.get_by_role("button", name="Submit").click()
            wait_for(lambda: any(True for _ in client.annotations(review_project)), "the submitted annotation", 60)
        finally:
            browser.close()

    [(annotation, task)] = list(client.annotations(review_project))
    controls = {item["from_name"] for item in annotation["result"]}
    assert {"label", "reveal", "severity", "escalate", "escalation_reason"} <= controls
    with Journal(tmp_path / "journal.sqlite", TAXONOMY, policy=POLICY) as journal:
        assert journal.apply_annotation(annotation, task).status == "accepted"
        row = journal.annotations(review_project).iloc[0]
        assert (row["label"], row["severity"], bool(row["revealed"]), bool(row["escalated"])) == (
            "hate", "high", True, True)
        [escalation] = journal.escalations()
        assert escalation["reason"] == "credible threat"
        ledger = ExposureLedger(tmp_path / "exposure.sqlite")
        assert ledger.sync(journal, POLICY.severity, protection) == (1, 1)  # a severe item seen, one reveal


def test_a_confident_severe_prediction_hides_the_whole_item_and_others_are_lexicon_masked():
    guard, scale = Protection(blur_threshold=0.9), POLICY.severity
    notice = guard.masked_view(ORIGINAL, scale, "hate", 0.95)
    assert ORIGINAL not in notice and "hate" in notice and "Show original" in notice
    assert guard.masked_view(ORIGINAL, scale, "hate", 0.6) == guard.mask_text(ORIGINAL) != ORIGINAL
    assert guard.masked_view(ORIGINAL, scale, "offensive", 0.99) == guard.mask_text(ORIGINAL)
    assert Protection(lexicon=None).mask_text(ORIGINAL) == ORIGINAL


@pytest.mark.integration
def test_tasks_carry_their_masked_text_and_a_blur_replaces_it(label_studio: RunningLabelStudio, review_project: int):
    guard = Protection()
    client = LabelStudioClient(label_studio.url, label_studio.api_key, mask=guard.mask_text)
    [task_id] = client.create_tasks(review_project, [("item-9", ORIGINAL)])
    data = label_studio.sdk.tasks.get(str(task_id)).data
    assert (data["text"], data["text_masked"]) == (ORIGINAL, guard.mask_text(ORIGINAL))
    notice = guard.masked_view(ORIGINAL, POLICY.severity, "hate", 0.97)
    client.set_masked_text(task_id, "item-9", ORIGINAL, notice)
    data = label_studio.sdk.tasks.get(str(task_id)).data
    assert (data["text"], data["text_masked"], data["item_id"]) == (ORIGINAL, notice, "item-9")
