"""``labelloop taxonomy check/show/migrate``, and what a taxonomy file does to training: a bad file or label
map creates nothing, and a changed taxonomy is refused by the registry until it is migrated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from labelloop import cli, taxonomy_cli
from labelloop.config import Settings, get_settings
from labelloop.taxonomy import get_taxonomy
from training.registry import Registry, RegistryError

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "taxonomies"

POLICY = """name = "policy"
title = "Our policy"
type = "single"

[[labels]]
name = "ok"
description = "Fine"
hotkey = "o"

[[labels]]
name = "scam"
description = "A scam"
hotkey = "s"
colour = "#d62728"
"""
# the same policy, edited: "ok" renamed and a label added
POLICY_V2 = POLICY.replace('name = "ok"', 'name = "fine"') + (
    '\n[[labels]]\nname = "phishing"\ndescription = "Asks for credentials"\n')


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The CLI's settings in this test's temp dir, through the environment as a user would set them."""
    monkeypatch.setenv("LABELLOOP_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "no-such-labelloop.toml"))
    monkeypatch.setenv("LABELLOOP_TAXONOMY", "hate_offensive")
    monkeypatch.setattr(cli, "console", Console(width=220))
    monkeypatch.setattr(taxonomy_cli, "console", Console(width=220))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_check_prints_a_one_line_summary():
    result = invoke("taxonomy", "check", str(EXAMPLES / "ethos_targets.toml"))
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1
    assert "ok: ethos_targets: multi-label, 8 labels" in result.output and "none label 'none'" in result.output


def test_check_a_built_in_by_name():
    result = invoke("taxonomy", "check", "hate_offensive")
    assert result.exit_code == 0 and "single-label, 3 labels (hate, offensive, neither)" in result.output


def test_check_prints_one_error_line_per_problem_with_line_and_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(POLICY.replace('name = "policy"', 'name = "Policy!"').replace('hotkey = "s"', 'hotkey = "o"'))
    result = invoke("taxonomy", "check", str(path))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "line 1: name: 'Policy!' must be" in errors[0]  # type errors first
    path.write_text(POLICY.replace('hotkey = "s"', 'hotkey = "o"').replace('name = "scam"', 'name = "ok"'))
    result = invoke("taxonomy", "check", str(path))
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 2
    assert "line 11: labels[1].name: duplicate label 'ok'" in errors[0]
    assert "line 13: labels[1].hotkey: hotkey 'o' of 'ok' clashes" in errors[1]


def test_check_a_missing_file_exits_2():
    result = invoke("taxonomy", "check", "/nowhere/policy.toml")
    assert result.exit_code == 2 and result.output.startswith("error: /nowhere/policy.toml: unknown taxonomy")


def test_check_with_a_hand_edited_label_config(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    config = tmp_path / "config.xml"
    config.write_text('<View><Text name="t" value="$text"/><Choices name="c" toName="t" choice="single">'
                      '<Choice value="ok"/><Choice value="scam"/></Choices></View>')
    result = invoke("taxonomy", "check", str(policy), "--label-config", str(config))
    assert result.exit_code == 0 and "matches it" in result.output
    config.write_text(config.read_text().replace('<Choice value="scam"/>', ''))
    result = invoke("taxonomy", "check", str(policy), "--label-config", str(config))
    assert result.exit_code == 2 and "missing choice(s) ['scam']" in result.output


def test_show_prints_labels_descriptions_hotkeys_colours_type_and_none_label():
    result = invoke("taxonomy", "show", str(EXAMPLES / "ethos_targets.toml"))
    assert result.exit_code == 0, result.output
    rows = {cells[1].strip(): [c.strip() for c in cells[2:5]]
            for line in result.output.splitlines() if len(cells := line.split("│")) == 6}
    assert rows["violence"] == ["Incites or calls for violence", "v", "■ #d62728"]
    assert rows["none (none of these)"][1:] == ["0", "-"]
    assert "multi-label" in result.output and "none label: none" in result.output


def test_show_xml_is_the_generated_label_studio_config():
    result = invoke("taxonomy", "show", str(EXAMPLES / "sms_policy.toml"), "--xml")
    assert result.exit_code == 0
    assert 'choice="single-radio"' in result.output and '<Choice value="scam"' in result.output


# ------------------------------------------------------------------------------------------------
# Training with a taxonomy file: nothing half-written
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def policy_csv(tmp_path: Path, shared_sms) -> Path:
    path = tmp_path / "sms.csv"
    shared_sms.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def shared_sms() -> pd.DataFrame:
    from labelloop import data
    from tests.conftest import SHARED_DATA

    frame = data.load("sms_spam", settings=Settings(data_dir=SHARED_DATA)).frame
    return data.stratified_sample(frame, 60, seed=0)[["id", "text", "label"]]


@pytest.mark.parametrize(("args", "expected"), [
    (["--taxonomy", "{bad}"], "line 1: name: 'Policy!' must be"),
    (["--taxonomy", "{policy}", "--label-map", "ham"], "'ham' is not value=label"),
    (["--taxonomy", "{policy}", "--label-map", "ham=ok,spam=spam"], "--label-map maps to ['spam'], which are not"),
    (["--taxonomy", "{policy}", "--label-map", "ham=ok"], "labels outside taxonomy 'policy'"),
    (["--taxonomy", "{policy}", "--label-map", "{nomap}"], "cannot read"),
    # a label MLflow cannot name a metric after (f1_<label>) would fail only after the eval set was frozen
    (["--taxonomy", "{unlogged}", "--label-map", "ham=ok,spam=scam (sms)"], "also names MLflow metrics"),
])
def test_a_bad_taxonomy_file_or_label_map_in_train_creates_nothing(env: Path, policy_csv: Path, args, expected):
    (env / "bad.toml").write_text(POLICY.replace('name = "policy"', 'name = "Policy!"'))
    (env / "policy.toml").write_text(POLICY)
    (env / "unlogged.toml").write_text(POLICY.replace('name = "scam"', 'name = "scam (sms)"'))
    names = {"bad": env / "bad.toml", "policy": env / "policy.toml", "nomap": env / "nomap.toml",
             "unlogged": env / "unlogged.toml"}
    result = invoke("train", "--dataset", str(policy_csv), "--mode", "fast",
                    *[a.format(**names) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and expected in result.output
    assert not (env / "mlruns").exists() and not (env / "var").exists()


def test_a_hand_edited_config_that_does_not_fit_is_refused_before_anything_is_frozen_or_created(
        env: Path, policy_csv: Path, monkeypatch: pytest.MonkeyPatch):
    (env / "policy.toml").write_text(POLICY)
    (env / "config.xml").write_text('<View><Text name="t" value="$text"/><Choices name="c" toName="t">'
                                    '<Choice value="ok"/><Choice value="spam"/></Choices></View>')
    monkeypatch.setenv("LABELLOOP_LABEL_CONFIG_FILE", str(env / "config.xml"))
    monkeypatch.setenv("LABELLOOP_LS_API_KEY", "unused")
    monkeypatch.setenv("LABELLOOP_LS_URL", "http://127.0.0.1:9")  # nothing may be asked of Label Studio
    get_settings.cache_clear()
    result = invoke("loop", "import", "--dataset", str(policy_csv), "--taxonomy", str(env / "policy.toml"),
                    "--label-map", "ham=ok,spam=scam")
    assert result.exit_code == 2, result.output
    assert "label_config_file" in result.output and "missing choice(s) ['scam']" in result.output
    assert not (env / "mlruns").exists()


def test_a_broken_taxonomy_setting_fails_when_settings_load(env: Path, monkeypatch: pytest.MonkeyPatch):
    (env / "bad.toml").write_text(POLICY.replace('type = "single"', 'type = "many"'))
    monkeypatch.setenv("LABELLOOP_TAXONOMY", str(env / "bad.toml"))
    get_settings.cache_clear()
    result = invoke("models")
    assert result.exit_code == 2 and "invalid setting taxonomy=" in result.output and "line 3: type" in result.output
    assert not (env / "mlruns").exists()


# ------------------------------------------------------------------------------------------------
# A changed taxonomy: refused until migrated
# ------------------------------------------------------------------------------------------------


def _frozen_policy(env: Path) -> tuple[Settings, pd.DataFrame]:
    path = env / "policy.toml"
    path.write_text(POLICY)
    settings = Settings(taxonomy=str(path))
    eval_frame = pd.DataFrame({"id": ["a", "b", "c"], "text": ["hi mum", "win a prize", "see you"],
                               "label": ["ok", "scam", "ok"]})
    Registry(settings).freeze_eval_set(eval_frame, "test")
    return settings, eval_frame


def test_the_registry_refuses_a_taxonomy_whose_fingerprint_changed(env: Path):
    from training.train import train_and_register

    settings, eval_frame = _frozen_policy(env)
    registry = Registry(settings)
    assert registry.name == "labelloop-policy"
    assert registry.taxonomy_fingerprint() == get_taxonomy(settings.taxonomy).fingerprint
    registry.check_taxonomy()  # unchanged: fine
    (env / "policy.toml").write_text(POLICY.replace("A scam", "Any scam"))  # wording only: same fingerprint
    Registry(Settings(taxonomy=settings.taxonomy)).check_taxonomy()
    (env / "policy.toml").write_text(POLICY_V2)
    changed = Settings(taxonomy=settings.taxonomy)
    with pytest.raises(RegistryError, match="another version of the taxonomy.*labelloop taxonomy migrate"):
        Registry(changed).check_taxonomy()
    with pytest.raises(RegistryError, match="taxonomy migrate"):
        Registry(changed).freeze_eval_set(eval_frame, "test")
    with pytest.raises(RegistryError, match="taxonomy migrate"):
        Registry(changed).promote()
    train = pd.DataFrame({"id": ["x", "y"], "text": ["hello", "free money"], "label": ["fine", "phishing"]})
    with pytest.raises(RegistryError, match="taxonomy migrate"):
        train_and_register(train, None, get_taxonomy(changed.taxonomy), mode="fast", settings=changed, source="t")
    assert Registry(changed).versions() == []


def test_the_registry_refuses_to_load_a_version_built_for_another_taxonomy(env: Path):
    settings, _ = _frozen_policy(env)
    registry = Registry(settings)
    registry.client.create_model_version(registry.name, str(env / "nowhere"),
                                         tags={"taxonomy.fingerprint": "0123456789ab"})
    with pytest.raises(RegistryError, match="v1 of 'labelloop-policy' were built for another version"):
        registry.load(1)


def test_migrate_relabels_the_frozen_eval_set_into_a_new_model_line(env: Path, monkeypatch: pytest.MonkeyPatch):
    settings, eval_frame = _frozen_policy(env)
    new_path = env / "policy_v2.toml"
    new_path.write_text(POLICY_V2)
    monkeypatch.setenv("LABELLOOP_TAXONOMY", settings.taxonomy)
    get_settings.cache_clear()
    refused = invoke("taxonomy", "migrate", "--to", str(new_path))
    assert refused.exit_code == 2 and "old label(s) ['ok'] have no counterpart" in refused.output
    assert "--label-map" in refused.output
    result = invoke("taxonomy", "migrate", "--to", str(new_path), "--label-map", "ok=fine")
    assert result.exit_code == 0, result.output
    new = get_taxonomy(str(new_path))
    name = f"labelloop-policy-{new.fingerprint[:8]}"  # same taxonomy name: the fingerprint tells them apart
    assert name in result.output and "labelloop train --dataset labels.parquet" in result.output
    migrated = Registry(Settings(taxonomy=str(new_path), model_name=name))
    migrated.check_taxonomy()
    frozen = migrated.eval_set()
    assert frozen is not None and frozen[1]["label"].tolist() == ["fine", "scam", "fine"]
    assert frozen[1]["text"].tolist() == eval_frame["text"].tolist()
    old = Registry(settings).eval_set()
    assert old is not None and old[1]["label"].tolist() == ["ok", "scam", "ok"]  # the old line is untouched
    again = invoke("taxonomy", "migrate", "--to", str(new_path), "--label-map", "ok=fine")
    assert again.exit_code == 2 and "already has a frozen evaluation set" in again.output


# ------------------------------------------------------------------------------------------------
# Generated and hand-edited configs on a real Label Studio
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_label_studio_accepts_generated_configs_and_a_matching_hand_edited_one(label_studio, tmp_path):
    import uuid

    from labelloop.taxonomy import LabelConfigError, label_config_xml, parse_label_config, project_label_config

    client = label_studio.client
    ethos = get_taxonomy(str(EXAMPLES / "ethos_targets.toml"))
    created = []
    try:
        multi = client.ensure_project(f"ethos-{uuid.uuid4().hex[:8]}", ethos)
        created.append(multi)
        stored = label_studio.sdk.projects.get(multi).label_config
        assert stored.strip() == label_config_xml(ethos).strip()
        control = parse_label_config(stored)
        assert control.multiple and control.labels == ethos.choices
        hand = tmp_path / "hand.xml"
        hand.write_text(label_config_xml(ethos).replace('<Header value="What does this hateful comment target?"/>',
                                                        '<Header value="Our wording"/>'))
        title = f"ethos-hand-{uuid.uuid4().hex[:8]}"
        edited = client.ensure_project(title, ethos, label_config=project_label_config(ethos, hand))
        created.append(edited)
        assert "Our wording" in label_studio.sdk.projects.get(edited).label_config
        refused = r"does not match taxonomy 'sms_policy'.*missing choice\(s\) \['ok', 'scam'\]"
        with pytest.raises(LabelConfigError, match=refused):
            client.ensure_project(title, get_taxonomy(str(EXAMPLES / "sms_policy.toml")))
        before = {p.id for p in label_studio.sdk.projects.list(page_size=1000)}
        wrong = label_config_xml(ethos).replace('choice="multiple"', 'choice="single-radio"')
        with pytest.raises(LabelConfigError, match='must use choice="multiple"'):
            client.ensure_project(f"ethos-bad-{uuid.uuid4().hex[:8]}", ethos, label_config=wrong)
        assert {p.id for p in label_studio.sdk.projects.list(page_size=1000)} == before  # nothing created
    finally:
        for project_id in created:
            label_studio.sdk.projects.delete(project_id)


@pytest.mark.integration
def test_loop_import_builds_a_multi_label_project_from_a_taxonomy_file_and_the_real_ethos_csv(
        label_studio, env: Path, monkeypatch: pytest.MonkeyPatch):
    import uuid

    from labelloop.taxonomy import parse_label_config
    from tests.conftest import SHARED_DATA

    monkeypatch.setenv("LABELLOOP_LS_URL", label_studio.url)
    monkeypatch.setenv("LABELLOOP_LS_API_KEY", label_studio.api_key)
    get_settings.cache_clear()
    taxonomy_file = str(EXAMPLES / "ethos_targets.toml")
    title = f"ethos-targets-{uuid.uuid4().hex[:8]}"
    result = invoke("loop", "import", "--dataset", str(SHARED_DATA / "ethos" / "Ethos_Dataset_Multi_Label.csv.gz"),
                    "--taxonomy", taxonomy_file, "--text-column", "comment", "--label-columns", "*",
                    "--label-map", "directed_vs_generalized=directed", "--label-threshold", "0.5",
                    "--limit", "40", "--title", title)
    assert result.exit_code == 0, result.output
    project_id = next(p.id for p in label_studio.sdk.projects.list(title=title) if p.title == title)
    try:
        control = parse_label_config(label_studio.sdk.projects.get(project_id).label_config)
        taxonomy = get_taxonomy(taxonomy_file)
        assert control.multiple and control.labels == taxonomy.choices
        assert f"project {project_id}: " in result.output
        registry = Registry(Settings(taxonomy=taxonomy_file))
        assert registry.name == "labelloop-ethos-targets"
        assert registry.taxonomy_fingerprint() == taxonomy.fingerprint
        frozen = registry.eval_set()
        assert frozen is not None and len(frozen[1]) > 50
        tasks = list(label_studio.sdk.tasks.list(project=project_id))
        assert 30 <= len(tasks) <= 50 and not {t.data["text"] for t in tasks} & set(frozen[1]["text"])
    finally:
        label_studio.sdk.projects.delete(project_id)
