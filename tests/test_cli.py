"""The ``labelloop`` command line against a real MLflow SQLite store in a temp dir: train, promote through
the gate, refuse a worse model, roll back, list models, evaluate, and refuse bad input with exit code 2
and one clear line, registering nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from labelloop import cli
from labelloop.config import Settings, get_settings
from labelloop.taxonomy import get_taxonomy
from training.registry import CHALLENGER, CHAMPION, Registry

pytestmark = pytest.mark.integration
runner = CliRunner()
MODEL = "labelloop-hate-offensive"
LABELS = get_taxonomy("hate_offensive").labels


@pytest.fixture
def cli_settings(tmp_path: Path, embedding_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Point the CLI's process-wide settings at this test's temp dirs (through the environment, as a user
    would) and give its consoles a fixed wide width, so tables and error lines are not wrapped."""
    monkeypatch.setenv("LABELLOOP_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("LABELLOOP_CACHE_DIR", str(embedding_cache_dir))
    monkeypatch.setenv("LABELLOOP_TAXONOMY", "hate_offensive")
    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "no-such-labelloop.toml"))
    monkeypatch.setattr(cli, "console", Console(width=220))
    monkeypatch.setattr(cli, "err", Console(stderr=True, soft_wrap=True))
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.mlruns_dir == (tmp_path / "mlruns").resolve()
    yield settings
    get_settings.cache_clear()


@pytest.fixture
def dataset_csv(tmp_path: Path, davidson_small) -> Path:
    path = tmp_path / "davidson_small.csv"
    davidson_small.frame[["id", "text", "label"]].to_csv(path, index=False)
    return path


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def macro_f1_in(output: str) -> float:
    match = re.search(r"macro-F1 (\d\.\d{4})", output)
    assert match, output
    return float(match.group(1))


def test_train_promote_refuse_rollback_models_evaluate(cli_settings: Settings, dataset_csv: Path):
    registry = Registry(cli_settings)

    trained = invoke("train", "--dataset", str(dataset_csv), "--mode", "fast", "--taxonomy", "hate_offensive")
    assert trained.exit_code == 0, trained.output
    assert f"registered {MODEL}:v1 as challenger" in trained.stdout
    assert registry.alias_version(CHALLENGER) == 1 and registry.alias_version(CHAMPION) is None
    eval_id, frozen = registry.eval_set()
    v1_f1 = registry.versions()[0].metric(eval_id, "macro_f1")
    assert macro_f1_in(trained.stdout) == pytest.approx(v1_f1, abs=1e-4)

    promoted = invoke("promote")
    assert promoted.exit_code == 0, promoted.output
    assert "promoted" in promoted.stdout and "champion is now v1" in promoted.stdout
    assert registry.alias_version(CHAMPION) == 1

    worse = invoke("train", "--dataset", str(dataset_csv), "--mode", "fast", "--taxonomy", "hate_offensive",
                   "--limit", "10")
    assert worse.exit_code == 0, worse.output
    assert f"registered {MODEL}:v2 as challenger" in worse.stdout
    assert macro_f1_in(worse.stdout) < v1_f1

    refused = invoke("promote")
    assert refused.exit_code == 1, refused.output
    assert "refused" in refused.stdout and "champion is now v1" in refused.stdout
    assert registry.alias_version(CHAMPION) == 1 and registry.alias_version(CHALLENGER) == 2

    rollback = invoke("promote", "--rollback")
    assert rollback.exit_code == 2, rollback.output
    assert rollback.stderr.strip().splitlines() == ["error: no earlier champion to roll back to"]
    assert registry.alias_version(CHAMPION) == 1

    listed = invoke("models")
    assert listed.exit_code == 0, listed.output
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if re.match(r"│ v\d ", line)}
    assert set(rows) == {"v1", "v2"}
    assert "champion" in rows["v1"] and "challenger" in rows["v2"] and "champion" not in rows["v2"]
    assert f"{v1_f1:.4f}" in rows["v1"] and eval_id in listed.stdout
    history = [line for line in listed.stdout.splitlines() if re.search(r"^│ \S+ +│ promote ", line)]
    assert len(history) == 2
    assert "yes" in history[0] and "no champion yet" in history[0]
    assert "refused" in history[1] and "v2" in history[1]

    evaluated = invoke("evaluate")
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{MODEL}:v1 on frozen:{eval_id}" in evaluated.stdout
    assert macro_f1_in(evaluated.stdout) == pytest.approx(v1_f1, abs=1e-3)
    support = {cells[1].strip(): int(cells[-2]) for line in evaluated.stdout.splitlines()
               if len(cells := line.split("│")) == 7 and cells[1].strip() in LABELS}
    assert support == frozen["label"].value_counts().to_dict()


def _csv(tmp_path: Path, frame: pd.DataFrame) -> list[str]:
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return ["--dataset", str(path)]


BAD_INPUT = {
    # case: (arguments to `labelloop train` given the tmp dir and 60 good rows, what the error must say)
    "missing file": (lambda tmp, rows: ["--dataset", str(tmp / "nowhere.csv"), "--mode", "fast"], "file not found"),
    "missing column": (lambda tmp, rows: [*_csv(tmp, rows.rename(columns={"text": "body"})), "--mode", "fast"],
                       "missing column(s) ['text']"),
    "unknown label": (lambda tmp, rows: [*_csv(tmp, rows.assign(label=["spam", *rows["label"][1:]])), "--mode", "fast"],
                      "labels outside taxonomy 'hate_offensive'"),
    "unknown mode": (lambda tmp, rows: [*_csv(tmp, rows), "--mode", "turbo"], "--mode must be finetune or fast"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_training_input_exits_2_with_one_line_and_registers_nothing(
        case: str, cli_settings: Settings, tmp_path: Path, davidson_small):
    make_args, expected = BAD_INPUT[case]
    args = make_args(tmp_path, davidson_small.frame[["id", "text", "label"]].head(60))

    result = invoke("train", *args, "--taxonomy", "hate_offensive")

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output and "registered" not in result.stdout
    if case == "unknown label":
        assert "'spam'" in lines[0]
    registry = Registry(cli_settings)
    assert registry.versions() == [] and registry.eval_set() is None


def _annotation_event(ann_id: int, task_id: int, text: str, label: str, annotator: int) -> dict:
    """A Label Studio 1.23 ANNOTATION_CREATED webhook body, reduced to what the journal reads."""
    result = [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]
    stamp = f"2026-11-22T08:00:{ann_id:02d}.000000Z"
    return {"action": "ANNOTATION_CREATED",
            "annotation": {"id": ann_id, "task": task_id, "project": 7, "result": result, "completed_by": annotator,
                           "was_cancelled": False, "ground_truth": False, "created_at": stamp, "updated_at": stamp},
            "task": {"id": task_id, "project": 7, "data": {"text": text, "item_id": f"item-{task_id}"}},
            "project": {"id": 7}}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_loop_export_writes_majority_labels_that_train_reads(cli_settings, tmp_path, suffix):
    from labelloop import data
    from labelloop.journal import Journal

    with Journal(cli_settings.journal_path, get_taxonomy("hate_offensive")) as journal:
        for ann_id, (task_id, text, label, annotator) in enumerate([
            (1, "first text, two say hate", "hate", 1), (1, "first text, two say hate", "offensive", 2),
            (1, "first text, two say hate", "hate", 3), (2, "second text, « quoted », one line", "neither", 1),
        ], start=1):
            assert journal.record(_annotation_event(ann_id, task_id, text, label, annotator)).status == "accepted"

    out = tmp_path / "exports" / f"labels{suffix}"
    result = invoke("loop", "export", str(out))
    assert result.exit_code == 0, result.output

    loaded = data.load(str(out), taxonomy="hate_offensive", dedupe=False).frame.sort_values("id")
    assert loaded[["id", "text", "label"]].values.tolist() == [
        ["item-1", "first text, two say hate", "hate"], ["item-2", "second text, « quoted », one line", "neither"]]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_loop_export_refuses_an_empty_journal_and_unknown_formats(cli_settings, tmp_path):
    empty = invoke("loop", "export", str(tmp_path / "labels.csv"))
    assert empty.exit_code == 2 and empty.stderr.startswith("error: no labels in the journal"), empty.output
    assert not (tmp_path / "labels.csv").exists()
    bad = invoke("loop", "export", str(tmp_path / "labels.xlsx"))
    assert bad.exit_code == 2 and "unsupported format '.xlsx'" in bad.stderr, bad.output


def test_serve_refuses_a_public_address_without_credentials(cli_settings):
    result = invoke("serve", "--host", "0.0.0.0", "--port", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: refusing to serve on 0.0.0.0 without credentials"), result.stderr


@pytest.mark.parametrize(("setting", "says"), [
    ('strategy = "margn"', "unknown query strategy 'margn'; choose from ['badge', 'bald', 'cardinality', "
                           "'class_balanced', 'cold_start', 'committee_margin', 'density_weighted', 'entropy', "
                           "'kmeans', 'least_confidence', 'margin', 'margin_kmeans', 'max_binary_entropy', "
                           "'mean_binary_entropy', 'mixed', 'random', 'rare_weighted', 'severity_weighted']"),
    ('strategy = "margin:entropy"', "'margin' takes no base strategy (in 'margin:entropy'); only ['class_balanced', "
                                    "'density_weighted', 'kmeans', 'mixed', 'rare_weighted', 'severity_weighted'] "
                                    "do")])
def test_a_bad_strategy_setting_fails_when_settings_load_with_one_error_line(tmp_path, monkeypatch, setting, says):
    """An unknown strategy used to fail only when a round ran; the error names every valid choice."""
    (tmp_path / "labelloop.toml").write_text(setting + "\n")
    monkeypatch.setenv("LABELLOOP_CONFIG", str(tmp_path / "labelloop.toml"))
    monkeypatch.setenv("LABELLOOP_MLRUNS_DIR", str(tmp_path / "mlruns"))
    monkeypatch.setenv("LABELLOOP_STATE_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        result = invoke("loop", "status")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, even at 80 columns
    assert result.stderr.startswith("error: invalid setting strategy="), result.stderr
    assert says in result.stderr
    assert not (tmp_path / "var").exists()


def test_train_promote_gates_its_own_version_and_exits_1_when_refused(cli_settings: Settings, dataset_csv: Path):
    base = ("train", "--dataset", str(dataset_csv), "--mode", "fast", "--taxonomy", "hate_offensive")
    first = invoke(*base, "--promote")
    assert first.exit_code == 0 and "champion is now v1" in first.stdout, first.output
    worse = invoke(*base, "--limit", "20", "--promote")
    assert worse.exit_code == 1 and "refused" in worse.stdout, worse.output
    assert Registry(cli_settings).alias_version(CHAMPION) == 1


def test_once_the_eval_set_is_frozen_every_row_of_a_new_dataset_trains(cli_settings: Settings, tmp_path: Path,
                                                                      davidson_small):
    """The `loop export` → `train` workflow: the gate judges on the frozen set, so no reviewer label is
    held back for a test split nobody uses."""
    frame = davidson_small.frame[["id", "text", "label"]]
    first_csv, second_csv = tmp_path / "first.csv", tmp_path / "reviewed.csv"
    frame.iloc[:300].to_csv(first_csv, index=False)
    frame.iloc[300:].to_csv(second_csv, index=False)
    for path in (first_csv, second_csv):
        result = invoke("train", "--dataset", str(path), "--mode", "fast", "--taxonomy", "hate_offensive")
        assert result.exit_code == 0, result.output
    registry = Registry(cli_settings)
    first, second = (int(registry.client.get_run(v.run_id).data.params["train_rows"]) for v in registry.versions())
    assert first == 300 - len(registry.eval_set()[1])  # its test split became the frozen eval set
    assert second == len(frame) - 300


def test_loop_import_append_leaves_the_frozen_evaluation_set_out_of_the_pool(cli_settings: Settings, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    """A first import keeps the frozen evaluation texts out of the pool; an appended batch must too, or
    reviewers label items whose labels training throws away."""
    frozen = pd.DataFrame({"id": ["e1", "e2"], "text": ["eval text one", "eval text two"],
                           "label": ["hate", "neither"]})
    Registry(cli_settings).freeze_eval_set(frozen, "test")
    batch = tmp_path / "batch.csv"
    pd.DataFrame({"text": ["eval text one", "a new post", "eval text two", "another new post"]}).to_csv(batch,
                                                                                                        index=False)
    loop = FakePoolLoop()
    monkeypatch.setattr(cli, "_loop", lambda settings, project=None: loop)
    result = invoke("loop", "import", "--append", "--dataset", str(batch))
    assert result.exit_code == 0, result.output
    assert sorted(loop.imported[0]["text"]) == ["a new post", "another new post"]
    assert "2 tasks appended" in result.output


class FakePoolLoop:
    """The loop's pool as ``loop import --append`` reads and extends it (ids map to existing tasks)."""

    project_id = 7

    def __init__(self, pool: pd.DataFrame | None = None):
        self._pool = pool
        self.imported: list[pd.DataFrame] = []

    def pool(self) -> pd.DataFrame:
        if self._pool is None:
            raise FileNotFoundError("no pool")
        return self._pool

    def import_pool(self, items: pd.DataFrame) -> int:
        self.imported.append(items)
        return len(items)


def test_loop_import_append_refuses_reused_ids_that_name_other_texts(cli_settings: Settings, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """A file's own ids (1, 2, 3...) reused by a second batch would map its new texts onto the first batch's
    tasks and lose them while reporting them appended; the same item again is skipped and said so."""
    loop = FakePoolLoop(pd.DataFrame({"item_id": ["1", "2"], "text": ["first batch one", "first batch two"]}))
    monkeypatch.setattr(cli, "_loop", lambda settings, project=None: loop)
    clashing = tmp_path / "clashing.csv"
    pd.DataFrame({"id": ["1", "3"], "text": ["a different text", "new"]}).to_csv(clashing, index=False)
    result = invoke("loop", "import", "--append", "--dataset", str(clashing))
    assert result.exit_code == 2 and "1 item id(s)" in result.output and "['1']" in result.output, result.output
    assert loop.imported == []

    again = tmp_path / "again.csv"
    pd.DataFrame({"id": ["2", "3"], "text": ["first batch two", "new"]}).to_csv(again, index=False)
    result = invoke("loop", "import", "--append", "--dataset", str(again))
    assert result.exit_code == 0, result.output
    assert "1 tasks appended" in result.output and "1 already in the pool" in result.output
