"""The data layer on the real shared datasets and on small local files, including bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from labelloop import data
from labelloop.config import Settings
from labelloop.data import DataError
from tests.conftest import SHARED_DATA


@pytest.fixture
def shared_settings() -> Settings:
    return Settings(data_dir=SHARED_DATA)


@pytest.mark.parametrize(
    ("name", "labels", "official"),
    [
        ("davidson", {"hate", "offensive", "neither"}, False),
        ("tweeteval_hate", {"hate", "not_hate"}, True),
        ("tweeteval_offensive", {"offensive", "not_offensive"}, True),
        ("ethos", {"hate", "not_hate"}, False),
        ("sms_spam", {"spam", "ham"}, False),
    ],
)
def test_shared_datasets_load_into_one_schema(name, labels, official, shared_settings):
    loaded = data.load(name, settings=shared_settings)
    assert set(loaded.frame["label"]) == labels
    assert list(loaded.frame.columns[:3]) == ["id", "text", "label"]
    assert loaded.frame["id"].is_unique
    assert loaded.frame["text"].is_unique  # exact duplicates removed
    assert loaded.has_official_splits is official


def test_davidson_keeps_its_class_balance(davidson):
    counts = davidson.frame["label"].value_counts()
    assert counts["hate"] == 1430 and counts["offensive"] == 19190 and counts["neither"] == 4163


def test_sms_spam_duplicates_removed_before_splitting(shared_settings):
    loaded = data.load("sms_spam", settings=shared_settings)
    raw = data.load("sms_spam", settings=shared_settings, dedupe=False)
    assert len(raw) == 5574 and len(loaded) < 5574 - 400  # the README counts 403 duplicate rows
    splits = data.split(loaded, seed=1)
    assert not set(splits.train["text"]) & set(splits.test["text"])


def test_tweeteval_conflicting_duplicates_dropped_and_test_split_kept(shared_settings):
    loaded = data.load("tweeteval_hate", settings=shared_settings)
    splits = data.split(loaded, seed=0)
    assert not set(splits.train["text"]) & set(splits.test["text"])  # 231 leaked tweets in the raw data
    assert len(splits.test) > 2800
    by_text = loaded.frame.groupby("text")["label"].nunique()
    assert (by_text == 1).all()


def test_split_is_deterministic_stratified_and_disjoint(davidson):
    a, b = data.split(davidson, seed=7), data.split(davidson, seed=7)
    assert a.train["id"].tolist() == b.train["id"].tolist()
    c = data.split(davidson, seed=8)
    assert a.train["id"].tolist() != c.train["id"].tolist()
    ids = [set(s["id"]) for s in (a.train, a.validation, a.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    share = a.test["label"].value_counts(normalize=True)["hate"]
    assert abs(share - 1430 / 24783) < 0.005


def test_snapshot_id_depends_on_content_not_order(davidson_small):
    frame = davidson_small.frame
    assert data.snapshot_id(frame) == data.snapshot_id(frame.sample(frac=1.0, random_state=3))
    changed = frame.copy()
    changed.loc[0, "label"] = "hate" if changed.loc[0, "label"] != "hate" else "neither"
    assert data.snapshot_id(changed) != data.snapshot_id(frame)


def test_stratified_sample_keeps_every_class(davidson):
    sample = data.stratified_sample(davidson.frame, 200, seed=0)
    assert 190 <= len(sample) <= 210
    assert sample["label"].value_counts()["hate"] >= 5


def _write(tmp_path: Path, name: str, frame: pd.DataFrame) -> Path:
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["items.csv", "items.jsonl", "items.parquet"])
def test_local_files_in_every_format(tmp_path, name, davidson_small, shared_settings):
    frame = davidson_small.frame[["text", "label"]].head(60)
    loaded = data.load(str(_write(tmp_path, name, frame)), taxonomy="hate_offensive", settings=shared_settings)
    assert len(loaded) == 60
    assert loaded.frame["label"].tolist() == frame["label"].tolist()


def test_integer_labels_map_to_taxonomy_names(tmp_path, shared_settings):
    path = _write(tmp_path, "ints.csv", pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}))
    loaded = data.load(str(path), taxonomy="hate_offensive", settings=shared_settings)
    assert loaded.frame["label"].tolist() == ["hate", "offensive", "neither"]


def test_custom_column_names(tmp_path, shared_settings):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"body": ["win money now", "see you at 5"],
                                                   "y": ["spam", "ham"]}))
    loaded = data.load(str(path), taxonomy="spam", text_column="body", label_column="y", settings=shared_settings)
    assert loaded.frame["label"].tolist() == ["spam", "ham"]


def test_missing_file_is_a_clear_error(tmp_path, shared_settings):
    with pytest.raises(DataError, match="file not found"):
        data.load(str(tmp_path / "nope.csv"), settings=shared_settings)


def test_missing_columns_named_in_error(tmp_path, shared_settings):
    path = _write(tmp_path, "cols.csv", pd.DataFrame({"tweet": ["x"], "class": [1]}))
    with pytest.raises(DataError, match=r"missing column\(s\) \['text', 'label'\]"):
        data.load(str(path), settings=shared_settings)


def test_labels_outside_taxonomy_rejected_with_examples(tmp_path, shared_settings):
    path = _write(tmp_path, "bad.csv", pd.DataFrame({"text": ["a", "b", "c"], "label": ["hate", "toxic", "7"]}))
    with pytest.raises(DataError, match=r"2 row\(s\) have labels outside taxonomy 'hate_offensive'.*toxic"):
        data.load(str(path), taxonomy="hate_offensive", settings=shared_settings)


def test_unreadable_file_is_a_clear_error(tmp_path, shared_settings):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="cannot read as parquet"):
        data.load(str(path), settings=shared_settings)
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"text": "ok", "label": "hate"}\n{not json\n')
    with pytest.raises(DataError, match="cannot read as jsonl"):
        data.load(str(jsonl), taxonomy="hate_offensive", settings=shared_settings)


def test_unsupported_suffix(tmp_path, shared_settings):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported format"):
        data.load(str(path), settings=shared_settings)


def test_empty_after_dedup_is_an_error(tmp_path, shared_settings):
    rows = [{"text": "same text", "label": "hate"}, {"text": "same text", "label": "neither"},
            {"text": "  ", "label": "hate"}]
    path = tmp_path / "conflict.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="no rows left"):
        data.load(str(path), taxonomy="hate_offensive", settings=shared_settings)


def test_unknown_hub_id_offline_is_a_clear_error(shared_settings):
    with pytest.raises(DataError, match="neither a known dataset"):
        data.load("no-such-org/no-such-dataset", settings=shared_settings)


def test_missing_shared_data_without_the_hub_names_both_places(tmp_path):
    with pytest.raises(DataError, match="LABELLOOP_DATA_DIR.*tdavidson/hate_speech_offensive"):
        data.load("davidson", settings=Settings(data_dir=tmp_path))


def test_missing_shared_data_falls_back_to_the_same_dataset_on_the_hub(tmp_path, monkeypatch):
    """The hub is out of reach here, so ``datasets.load_dataset`` answers with small frames shaped like
    the hub copies (Davidson keeps its CSV header; TweetEval has three splits and integer labels)."""
    import datasets

    hub = {
        ("tdavidson/hate_speech_offensive", None): {"train": pd.DataFrame({
            "count": [3, 3, 3], "hate_speech_count": [2, 0, 0], "offensive_language_count": [1, 3, 0],
            "neither_count": [0, 0, 3], "class": [0, 1, 2], "tweet": ["h a t e", "o f f", "n e i t h e r"]})},
        ("cardiffnlp/tweet_eval", "hate"): {
            split: pd.DataFrame({"text": [f"{split} one", f"{split} two"], "label": [0, 1]})
            for split in ("train", "validation", "test")},
    }
    calls = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        return datasets.DatasetDict({k: datasets.Dataset.from_pandas(v) for k, v in hub[(path, name)].items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    settings = Settings(data_dir=tmp_path)

    davidson = data.load("davidson", settings=settings)
    assert davidson.frame[["text", "label"]].values.tolist() == [
        ["h a t e", "hate"], ["o f f", "offensive"], ["n e i t h e r", "neither"]]
    assert not davidson.has_official_splits

    hate = data.load("tweeteval_hate", settings=settings)
    assert hate.has_official_splits and sorted(hate.frame["split"].unique()) == ["test", "train", "validation"]
    assert hate.frame.set_index("text").loc["test two", "label"] == "hate"
    assert calls == [("tdavidson/hate_speech_offensive", None), ("cardiffnlp/tweet_eval", "hate")]


def test_load_unlabeled_drops_labels_and_empty_texts(tmp_path, shared_settings):
    path = _write(tmp_path, "pool.csv", pd.DataFrame({"text": ["x", "", "y", "x"], "label": ["a", "b", "c", "d"]}))
    pool = data.load_unlabeled(str(path), settings=shared_settings)
    assert pool["text"].tolist() == ["x", "y"]
    assert list(pool.columns) == ["id", "text"]


def test_official_train_and_test_without_validation_keep_the_official_test(tmp_path, shared_settings):
    rows = [{"text": f"train text {i}", "label": i % 3, "split": "train"} for i in range(30)]
    rows += [{"text": f"test text {i}", "label": i % 3, "split": "test"} for i in range(9)]
    path = _write(tmp_path, "official.csv", pd.DataFrame(rows))
    loaded = data.load(str(path), taxonomy="hate_offensive", settings=shared_settings)
    splits = data.split(loaded, seed=0)
    assert sorted(splits.test["text"]) == sorted(f"test text {i}" for i in range(9))
    assert len(splits.validation) == 3 and len(splits.train) == 27
    assert not set(splits.validation["text"]) & set(splits.train["text"])
