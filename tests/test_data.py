"""The data layer on the real shared datasets and on small local files, including bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("rows", [0, 5])
def test_split_of_too_few_rows_is_a_data_error_that_says_why(davidson_small, rows):
    """A fine-tune queued before the loop has labels splits an empty frame: one clear DataError, not numpy's
    'argmin of an empty sequence'."""
    few = data.LabeledData(davidson_small.frame.head(rows), davidson_small.taxonomy, "label-studio:project-1")
    with pytest.raises(DataError, match=r"label-studio:project-1: .*need (at least 10, )?>= 3 per class"):
        data.split(few, seed=0)


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


# ------------------------------------------------------------------------------------------------
# Your own labels: label maps, multi-label columns and lists, HTML entities
# ------------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "taxonomies"
SMS_POLICY = str(EXAMPLES / "sms_policy.toml")
ETHOS_TARGETS = str(EXAMPLES / "ethos_targets.toml")
ETHOS_MULTI = SHARED_DATA / "ethos" / "Ethos_Dataset_Multi_Label.csv.gz"
ETHOS_COLUMNS = ("violence", "directed_vs_generalized", "gender", "race", "national_origin", "disability",
                 "religion", "sexual_orientation")


def test_inline_label_map():
    assert data.parse_label_map(" 0=ham, 1 = spam ") == {"0": "ham", "1": "spam"}
    assert data.parse_label_map(None) == {} == data.parse_label_map("")


@pytest.mark.parametrize(("spec", "expected"), [
    ("0=ham,1", r"'1' is not value=label"),
    ("0=ham,=spam", r"'=spam' is not value=label"),
    ("0=ham,0=spam", r"'0' is mapped twice"),
])
def test_bad_inline_label_maps_are_clear_errors(spec, expected):
    with pytest.raises(DataError, match=expected):
        data.parse_label_map(spec)


@pytest.mark.parametrize(("name", "text"), [
    ("map.toml", 'ham = "ok"\nspam = "scam"\n'),
    ("map.json", '{"ham": "ok", "spam": "scam"}'),
    ("map.csv", "value,label\nham,ok\nspam,scam\n"),
    ("map2.csv", "ham,ok\nspam,scam\n"),
])
def test_label_map_files(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert data.parse_label_map(str(path)) == {"ham": "ok", "spam": "scam"}


@pytest.mark.parametrize(("name", "text"), [
    ("map.toml", 'ham = "ok"\nspam = "scam"\n'),
    ("map.json", '{"ham": "ok", "spam": "scam"}'),
    ("map.csv", "value,label\nham,ok\nspam,scam\n"),
])
def test_label_map_files_saved_with_a_byte_order_mark(tmp_path, name, text):
    """Excel and Notepad save a BOM: it must neither hide a CSV's header nor break TOML and JSON."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")
    assert data.parse_label_map(str(path)) == {"ham": "ok", "spam": "scam"}


@pytest.mark.parametrize("name", ["x.csv", "x.jsonl", "x.json"])
def test_data_files_saved_with_a_byte_order_mark_load(tmp_path, shared_settings, name):
    frame = pd.DataFrame({"text": [f"message {i}" for i in range(12)], "label": ["spam", "ham"] * 6})
    text = (frame.to_csv(index=False) if name.endswith(".csv")
            else frame.to_json(orient="records", lines=name.endswith(".jsonl")))
    path = tmp_path / name
    path.write_text(text, encoding="utf-8-sig")
    loaded = data.load(str(path), taxonomy="spam", settings=shared_settings)
    assert loaded.frame["label"].tolist() == ["spam", "ham"] * 6


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("map.toml", 'ham = 1\n', "must map each source value to a label name"),
    ("map.json", '["ham"]', "must map each source value to a label name"),
    ("map.json", '{"ham": ', "not valid json"),
    ("map.csv", "ham,ok,extra\n", "every row must be value,label"),
    ("missing.toml", None, "cannot read"),
])
def test_bad_label_map_files_are_clear_errors(tmp_path, name, text, expected):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=expected):
        data.parse_label_map(str(path))


def test_label_map_relabels_a_shared_dataset_into_your_own_taxonomy(shared_settings):
    spec = data.LabelSpec(label_map=data.parse_label_map("ham=ok,spam=scam"))
    loaded = data.load("sms_spam", taxonomy=SMS_POLICY, settings=shared_settings, label_spec=spec)
    plain = data.load("sms_spam", settings=shared_settings)
    assert loaded.taxonomy.name == "sms_policy"
    assert loaded.frame["label"].value_counts().to_dict() == {
        "ok": int((plain.frame["label"] == "ham").sum()), "scam": int((plain.frame["label"] == "spam").sum())}


def test_label_map_on_a_file_with_numeric_values(tmp_path, shared_settings):
    path = _write(tmp_path, "x.jsonl", pd.DataFrame({"text": ["win a prize now", "see you at 6"], "label": [1, 0]}))
    spec = data.LabelSpec(label_map={"0": "ok", "1": "scam"})
    loaded = data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings, label_spec=spec, dedupe=False)
    assert loaded.frame["label"].tolist() == ["scam", "ok"]


def test_unmapped_values_and_bad_targets_are_clear_errors(tmp_path, shared_settings):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"text": ["a b", "c d"], "label": ["ham", "phish"]}))
    with pytest.raises(DataError, match=r"1 row\(s\) have labels outside taxonomy 'sms_policy'.*phish"):
        data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings,
                  label_spec=data.LabelSpec(label_map={"ham": "ok"}))
    with pytest.raises(DataError, match=r"--label-map maps to \['spam'\], which are not labels of taxonomy"):
        data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings,
                  label_spec=data.LabelSpec(label_map={"ham": "spam"}))


def test_ethos_multi_label_loads_from_its_real_file_through_the_generic_path(shared_settings):
    spec = data.LabelSpec(label_map={"directed_vs_generalized": "directed"}, label_columns=("*",), threshold=0.5)
    loaded = data.load(str(ETHOS_MULTI), taxonomy=ETHOS_TARGETS, text_column="comment", settings=shared_settings,
                       label_spec=spec)
    raw = pd.read_csv(ETHOS_MULTI, sep=";")
    assert loaded.taxonomy.multi and 400 < len(loaded) <= len(raw)
    first = loaded.frame.iloc[0]
    assert first["text"] == raw["comment"][0] and first["label"] == ("gender",)
    y = loaded.label_ids()
    assert y.shape == (len(loaded), 8) and set(np.unique(y)) == {0, 1}
    expected = (raw.drop_duplicates("comment")[list(ETHOS_COLUMNS)] >= 0.5).sum().to_numpy()
    assert np.abs(y.sum(0) - expected).max() <= 3  # a few texts with conflicting copies are dropped
    explicit = data.LabelSpec(label_map={"directed_vs_generalized": "directed"}, label_columns=ETHOS_COLUMNS,
                              threshold=0.5)
    again = data.load(str(ETHOS_MULTI), taxonomy=ETHOS_TARGETS, text_column="comment", settings=shared_settings,
                      label_spec=explicit)
    assert again.frame["label"].tolist() == loaded.frame["label"].tolist()


def test_fractional_label_columns_need_a_threshold(shared_settings):
    spec = data.LabelSpec(label_map={"directed_vs_generalized": "directed"}, label_columns=("*",))
    with pytest.raises(DataError, match="fractional values.*--label-threshold"):
        data.load(str(ETHOS_MULTI), taxonomy=ETHOS_TARGETS, text_column="comment", settings=shared_settings,
                  label_spec=spec)


def _targets(tmp_path: Path) -> str:
    path = tmp_path / "targets.toml"
    path.write_text('name = "targets"\ntitle = "T"\ntype = "multi"\nnone_label = "none"\n'
                    '[[labels]]\nname = "violence"\ndescription = "v"\n'
                    '[[labels]]\nname = "race"\ndescription = "r"\n'
                    '[[labels]]\nname = "gender"\ndescription = "g"\n')
    return str(path)


def test_label_columns_with_0_1_values_become_label_sets_in_taxonomy_order(tmp_path, shared_settings):
    frame = pd.DataFrame({"text": ["a", "b", "c", "d"], "gender": ["1", "0", "0", "true"], "violence": [1, 0, 1, 0],
                          "race": [1, 0, 0, 0]})
    path = _write(tmp_path, "x.csv", frame)
    loaded = data.load(str(path), taxonomy=_targets(tmp_path), settings=shared_settings, dedupe=False)
    assert loaded.frame["label"].tolist() == [("violence", "race", "gender"), (), ("violence",), ("gender",)]


@pytest.mark.parametrize(("columns", "expected"), [
    (("violence", "nope"), r"--label-columns names missing column\(s\) \['nope'\]"),
    (("violence", "extra"), r"label column\(s\) \{'extra': 'extra'\} are not labels of taxonomy"),
])
def test_bad_label_columns_are_clear_errors(tmp_path, shared_settings, columns, expected):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"text": ["a"], "violence": [1], "extra": [0]}))
    with pytest.raises(DataError, match=expected):
        data.load(str(path), taxonomy=_targets(tmp_path), settings=shared_settings,
                  label_spec=data.LabelSpec(label_columns=columns))


@pytest.mark.parametrize("columns", [("*",), None])
def test_two_columns_for_one_label_are_refused_when_columns_are_found_automatically(tmp_path, shared_settings,
                                                                                   columns):
    """A column mapped onto a label that is also a column: one's 1s would silently replace the other's."""
    frame = pd.DataFrame({"text": ["a", "b"], "violence": [0, 1], "race": [0, 0], "gender": [0, 0],
                          "ethnicity": [1, 0]})
    path = _write(tmp_path, "x.csv", frame)
    with pytest.raises(DataError, match=r"two label columns map to the same label: \{'race': \['race', 'ethnicity'\]"):
        data.load(str(path), taxonomy=_targets(tmp_path), settings=shared_settings,
                  label_spec=data.LabelSpec(label_columns=columns, label_map={"ethnicity": "race"}))


def test_non_binary_label_column_values_are_named(tmp_path, shared_settings):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"text": ["a", "b"], "violence": ["1", "yes please"],
                                                   "race": [0, 0], "gender": [0, 0]}))
    with pytest.raises(DataError, match=r"label column 'violence' has 1 value\(s\) that are not 0/1.*yes please"):
        data.load(str(path), taxonomy=_targets(tmp_path), settings=shared_settings)


def test_label_columns_are_for_multi_label_only(tmp_path, shared_settings):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"text": ["a"], "ok": [1]}))
    with pytest.raises(DataError, match="--label-columns is for multi-label"):
        data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings,
                  label_spec=data.LabelSpec(label_columns=("ok",)))


def test_a_delimited_label_column(tmp_path, shared_settings):
    frame = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["race; violence", "", "none", "V"]})
    path = _write(tmp_path, "x.csv", frame)
    spec = data.LabelSpec(delimiter=";", label_map={"V": "violence"})
    loaded = data.load(str(path), taxonomy=_targets(tmp_path), settings=shared_settings, label_spec=spec,
                       dedupe=False)
    assert loaded.frame["label"].tolist() == [("violence", "race"), (), (), ("violence",)]


def test_a_delimited_label_column_with_an_unknown_label(tmp_path, shared_settings):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"text": ["a", "b"], "label": ["race|sexism", "race"]}))
    with pytest.raises(DataError, match=r"1 row\(s\) have labels outside taxonomy 'targets'.*race\|sexism"):
        data.load(str(path), taxonomy=_targets(tmp_path), settings=shared_settings)


def test_list_labels_from_jsonl_and_parquet(tmp_path, shared_settings):
    frame = pd.DataFrame({"text": ["a", "b"], "label": [["race", "violence"], []]})
    for name in ("x.jsonl", "x.parquet"):
        loaded = data.load(str(_write(tmp_path, name, frame)), taxonomy=_targets(tmp_path), settings=shared_settings,
                           dedupe=False)
        assert loaded.frame["label"].tolist() == [("violence", "race"), ()]


def test_multi_label_dedupe_split_sample_and_snapshot(shared_settings):
    spec = data.LabelSpec(label_map={"directed_vs_generalized": "directed"}, label_columns=("*",), threshold=0.5)
    loaded = data.load(str(ETHOS_MULTI), taxonomy=ETHOS_TARGETS, text_column="comment", settings=shared_settings,
                       label_spec=spec)
    doubled = pd.concat([loaded.frame, loaded.frame.head(5).assign(id=lambda f: f["id"] + "-copy")])
    conflicting = pd.concat([doubled, loaded.frame.head(1).assign(id="x", label=[("violence",)])])
    deduped = data.drop_duplicates(data.LabeledData(conflicting.reset_index(drop=True), loaded.taxonomy, "t"))
    assert len(deduped) == len(loaded) - 1  # copies that agree keep one row; a conflicting text is dropped
    a, b = data.split(loaded, seed=3), data.split(loaded, seed=3)
    assert a.test["id"].tolist() == b.test["id"].tolist()
    ids = [set(s["id"]) for s in (a.train, a.validation, a.test)]
    assert sum(map(len, ids)) == len(loaded) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    sample = data.stratified_sample(loaded.frame, 100, seed=0)
    assert 80 <= len(sample) <= 140 and all(isinstance(label, tuple) for label in sample["label"])
    frame = loaded.frame
    assert data.snapshot_id(frame) == data.snapshot_id(frame.sample(frac=1.0, random_state=1))
    changed = frame.copy()
    changed.at[0, "label"] = ("violence",) if changed.at[0, "label"] != ("violence",) else ()
    assert data.snapshot_id(changed) != data.snapshot_id(frame)


def test_multi_label_split_falls_back_when_label_sets_are_all_rare(tmp_path, shared_settings):
    taxonomy = data.get_taxonomy(_targets(tmp_path))
    sets = [("violence",), ("race",), ("gender",), ("violence", "race"), ("race", "gender"), ()]
    frame = pd.DataFrame({"id": [str(i) for i in range(12)], "text": [f"t{i}" for i in range(12)],
                          "label": [sets[i % 6] if i < 6 else sets[0] for i in range(12)]})
    splits = data.split(data.LabeledData(frame, taxonomy, "t"), seed=0)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 12


def test_a_semicolon_separated_csv_is_sniffed_and_sep_can_be_given(tmp_path, shared_settings):
    path = tmp_path / "x.csv"
    path.write_text("text;label\nhello there;ok\nbuy now;scam\n")
    loaded = data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings, dedupe=False)
    assert loaded.frame["label"].tolist() == ["ok", "scam"]
    path.write_text("text|label\nhello, there;x|ok\n")
    loaded = data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings,
                       label_spec=data.LabelSpec(sep="|"), dedupe=False)
    assert loaded.frame["text"].tolist() == ["hello, there;x"]


def test_html_entities_are_unescaped_in_real_davidson_rows(davidson):
    frame = davidson.frame.set_index("id")
    raw = pd.read_csv(SHARED_DATA / "davidson_hate_offensive" / "labeled_data.csv.gz")
    escaped = raw[raw["tweet"].str.contains("&amp;|&#128514;|&lt;|&gt;", regex=True)]
    assert len(escaped) > 100
    for _, row in escaped.head(200).iterrows():
        text = frame.loc[f"davidson-{row.iloc[0]}", "text"] if f"davidson-{row.iloc[0]}" in frame.index else None
        if text is not None:
            assert "&amp;" not in text and "&#128514;" not in text
    assert frame.loc["davidson-0", "text"].endswith("&amp; as a man you should always take the trash out...".replace(
        "&amp;", "&"))
    assert not frame["text"].str.contains("&#128514;|&amp;", regex=True).any()
    assert frame["text"].str.contains("\U0001F602").sum() > 100  # 😂, written &#128514; in the file


def test_html_entities_are_unescaped_in_files_and_unlabeled_pools(tmp_path, shared_settings):
    path = _write(tmp_path, "x.csv", pd.DataFrame({"text": ["fish &amp; chips &#128514;", "a &lt;b&gt;"],
                                                   "label": ["ok", "scam"]}))
    loaded = data.load(str(path), taxonomy=SMS_POLICY, settings=shared_settings)
    assert loaded.frame["text"].tolist() == ["fish & chips \U0001F602", "a <b>"]
    pool = data.load_unlabeled(str(path), settings=shared_settings)
    assert pool["text"].tolist() == ["fish & chips \U0001F602", "a <b>"]
    assert pool["id"].tolist() == loaded.frame["id"].tolist()  # ids come from the unescaped text
    hub_like = data.load_unlabeled("davidson", settings=shared_settings)
    assert not hub_like["text"].str.contains("&amp;").any()


def test_held_out_texts_match_evaluation_sets_frozen_before_unescaping():
    held = data.held_out_texts(["fish &amp; chips", "plain", None])
    assert {"fish &amp; chips", "fish & chips", "plain"} == held
