"""Labeled data in one schema: ``id``, ``text``, ``label`` (a taxonomy label name) and, when the source
has official splits, ``split`` (train / validation / test).

Sources: the shared public datasets by name, a local CSV / TSV / JSONL / Parquet file (optionally
gzipped), or a Hugging Face dataset id for users with internet. Every path ends in the same checks, so
a bad file fails here with a message that names the problem, before anything is trained or registered.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from labelloop.config import Settings, get_settings
from labelloop.taxonomy import Taxonomy, get_taxonomy

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                  "dev": "validation", "test": "test"}
_FILE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet"}

#: shared dataset name → taxonomy it is labeled in
KNOWN_DATASETS: dict[str, str] = {
    "davidson": "hate_offensive",
    "tweeteval_hate": "hate",
    "tweeteval_offensive": "offensive",
    "ethos": "hate",
    "sms_spam": "spam",
}


#: the same datasets on the Hugging Face hub, with the taxonomy's label order as integer labels: the
#: fallback for machines without ../shared/data (and with internet). name → (id, config, text column)
HUB_SOURCES: dict[str, tuple[str, str | None, str]] = {
    "davidson": ("tdavidson/hate_speech_offensive", None, "tweet"),
    "tweeteval_hate": ("cardiffnlp/tweet_eval", "hate", "text"),
    "tweeteval_offensive": ("cardiffnlp/tweet_eval", "offensive", "text"),
    "ethos": ("iamollas/ethos", "binary", "text"),
    "sms_spam": ("ucirvine/sms_spam", None, "sms"),
}


class DataError(ValueError):
    """Input data that cannot be used; the message says what is wrong and where."""


class SharedDataMissing(DataError):
    """A shared dataset's files are not on this machine."""


@dataclass
class LabeledData:
    frame: pd.DataFrame
    taxonomy: Taxonomy
    source: str

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def has_official_splits(self) -> bool:
        return "split" in self.frame.columns

    def label_ids(self, frame: pd.DataFrame | None = None) -> np.ndarray:
        frame = self.frame if frame is None else frame
        return frame["label"].map({label: i for i, label in enumerate(self.taxonomy.labels)}).to_numpy()


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load(
    source: str,
    *,
    taxonomy: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    settings: Settings | None = None,
    dedupe: bool = True,
) -> LabeledData:
    """Load, validate and de-duplicate a labeled dataset from a shared name, a file or a HF id."""
    settings = settings or get_settings()
    if source in KNOWN_DATASETS:
        tax = get_taxonomy(taxonomy or KNOWN_DATASETS[source])
        frame = _normalise_labels(_shared(source, settings.data_dir), tax, source)
    else:
        tax = get_taxonomy(taxonomy or settings.taxonomy)
        raw = _read_source(source)
        frame = _to_schema(raw, tax, source, text_column, label_column)
    data = LabeledData(frame.reset_index(drop=True), tax, source)
    if dedupe:
        data = drop_duplicates(data)
    if data.frame.empty:
        raise DataError(f"{source}: no rows left after validation and de-duplication")
    return data


def load_unlabeled(source: str, *, text_column: str = "text", settings: Settings | None = None) -> pd.DataFrame:
    """A pool of texts (``id``, ``text``) to label; labels, if present, are dropped."""
    settings = settings or get_settings()
    if source in KNOWN_DATASETS:
        frame = _shared(source, settings.data_dir)
    else:
        frame = _read_source(source)
        if text_column not in frame.columns:
            raise DataError(f"{source}: no text column {text_column!r} (columns: {list(frame.columns)})")
        frame = frame.rename(columns={text_column: "text"})
    frame = _with_ids(frame)[["id", "text"] + (["created_at"] if "created_at" in frame.columns else [])]
    frame = frame[frame["text"].map(lambda t: isinstance(t, str) and t.strip() != "")]
    return frame.drop_duplicates("text").reset_index(drop=True)


def _read_source(source: str) -> pd.DataFrame:
    path = Path(source).expanduser()
    suffixes = [s.lower() for s in path.suffixes]
    looks_like_file = bool(set(suffixes) & _FILE_SUFFIXES) or source.startswith((".", "/", "~"))
    if path.exists():
        return _read_file(path, suffixes)
    if looks_like_file:
        raise DataError(f"file not found: {path}")
    try:
        return _read_hf_dataset(source)
    except DataError as e:
        raise DataError(f"{source!r} is neither a known dataset ({', '.join(KNOWN_DATASETS)}), an existing file, "
                        f"nor a loadable Hugging Face dataset: {e}") from None


def _read_file(path: Path, suffixes: list[str]) -> pd.DataFrame:
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a CSV, TSV, JSONL or Parquet file")
    kind = next((s for s in reversed(suffixes) if s in _FILE_SUFFIXES), None)
    compression = "gzip" if suffixes and suffixes[-1] == ".gz" else None
    try:
        if kind in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", compression=compression,
                               dtype=str, keep_default_na=False)
        if kind in (".jsonl", ".json"):
            return _read_json(path, compression, lines=kind == ".jsonl")
        if kind == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read as {kind.lstrip('.')}: {e}") from None
    raise DataError(f"{path}: unsupported format {''.join(suffixes) or '(no suffix)'}; "
                    "use .csv, .tsv, .jsonl, .json or .parquet (optionally .gz)")


def _read_json(path: Path, compression: str | None, lines: bool) -> pd.DataFrame:
    try:
        return pd.read_json(path, lines=lines, compression=compression, dtype=False)
    except ValueError:
        if lines:
            raise
        return pd.read_json(path, lines=True, compression=compression, dtype=False)


def _read_hf_dataset(dataset_id: str, config: str | None = None) -> pd.DataFrame:
    import datasets  # heavy import, only for hub datasets

    try:
        dsd = datasets.load_dataset(dataset_id, config) if config else datasets.load_dataset(dataset_id)
    except Exception as e:  # offline, unknown id, gated: all surface as one clear error
        raise DataError(str(e)) from None
    frames = []
    for split_name, split in dsd.items():
        frame = split.to_pandas()
        frame["split"] = _SPLIT_ALIASES.get(split_name, split_name)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    if not set(frame["split"]) <= set(SPLITS) or not {"train", "test"} <= set(frame["split"]):
        frame = frame.drop(columns="split")  # a train-only dataset is split by us, like a local file
    return frame


def _to_schema(raw: pd.DataFrame, tax: Taxonomy, source: str, text_column: str, label_column: str
               ) -> pd.DataFrame:
    missing = [c for c in (text_column, label_column) if c not in raw.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; columns present: {list(raw.columns)}. "
                        "Use --text-column / --label-column to name them.")
    keep = [c for c in ("id", "split", "created_at") if c in raw.columns]  # created_at: drift windows
    frame = raw[[text_column, label_column, *keep]].rename(columns={text_column: "text", label_column: "label"})
    if "split" in frame.columns:
        frame["split"] = frame["split"].map(lambda s: _SPLIT_ALIASES.get(str(s).lower(), s))
        if not set(frame["split"]) <= set(SPLITS):
            frame = frame.drop(columns="split")
    return _normalise_labels(_with_ids(frame), tax, source)


def _with_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Content-derived ids when the source has none, so re-imports of the same text agree."""
    frame = frame.copy()
    if "id" not in frame.columns:
        frame["id"] = frame["text"].map(lambda t: hashlib.sha1(str(t).encode()).hexdigest()[:16])
    frame["id"] = frame["id"].astype(str)
    return frame


def _normalise_labels(frame: pd.DataFrame, tax: Taxonomy, source: str) -> pd.DataFrame:
    """Accept label names or integer class indices; reject anything else, naming the values."""
    frame = frame.copy()
    bad_text = ~frame["text"].map(lambda t: isinstance(t, str))
    if bad_text.any():
        raise DataError(f"{source}: {int(bad_text.sum())} row(s) have a non-text value in the text column")
    frame = frame[frame["text"].str.strip() != ""]

    def to_name(value: object) -> str | None:
        if isinstance(value, str) and value in tax.labels:
            return value
        try:
            idx = int(str(value).strip())
        except ValueError:
            return None
        return tax.labels[idx] if 0 <= idx < len(tax.labels) and str(idx) == str(value).strip() else None

    names = frame["label"].map(to_name)
    unknown = frame.loc[names.isna(), "label"]
    if len(unknown):
        sample = sorted({str(v) for v in unknown})[:5]
        raise DataError(f"{source}: {len(unknown)} row(s) have labels outside taxonomy {tax.name!r} "
                        f"{list(tax.labels)} (or their indices 0..{len(tax.labels) - 1}), e.g. {sample}")
    frame["label"] = names
    cols = ["id", "text", "label"] + [c for c in ("split", "created_at") if c in frame.columns]
    return frame[cols]


# ------------------------------------------------------------------------------------------------
# Adapters for ../shared/data
# ------------------------------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.exists():
        raise SharedDataMissing(f"shared dataset file not found: {path} (set LABELLOOP_DATA_DIR)")
    return path


def _shared(name: str, data_dir: Path) -> pd.DataFrame:
    """A shared dataset from ``data_dir``, else the same dataset from the Hugging Face hub."""
    try:
        return _SHARED_ADAPTERS[name](data_dir)
    except SharedDataMissing as missing:
        hub_id, config, text_column = HUB_SOURCES[name]
        try:
            raw = _read_hf_dataset(hub_id, config)
        except DataError as e:
            raise DataError(f"{missing}; its Hugging Face hub copy {hub_id}{' (' + config + ')' if config else ''} "
                            f"could not be loaded either: {e}") from None
    label_column = "class" if "class" in raw.columns else "label"  # Davidson's hub copy keeps its CSV header
    missing_columns = [c for c in (text_column, label_column) if c not in raw.columns]
    if missing_columns:
        raise DataError(f"{hub_id}: no column(s) {missing_columns} (columns: {list(raw.columns)})")
    frame = pd.DataFrame({"id": [f"{name}-hub-{i}" for i in range(len(raw))],
                          "text": raw[text_column].astype(str), "label": raw[label_column]})
    if "split" in raw.columns:
        frame["split"] = raw["split"].to_numpy()
    return frame


def _davidson(data_dir: Path) -> pd.DataFrame:
    raw = pd.read_csv(_require(data_dir / "davidson_hate_offensive" / "labeled_data.csv.gz"))
    return pd.DataFrame({
        "id": "davidson-" + raw.iloc[:, 0].astype(str),
        "text": raw["tweet"].astype(str),
        "label": raw["class"].astype(int),
    })


def _tweeteval(task: str):
    def read(data_dir: Path) -> pd.DataFrame:
        folder = data_dir / f"tweeteval_{task}"
        frames = []
        for split, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
            with gzip.open(_require(folder / f"{prefix}_text.txt.gz"), "rt", encoding="utf-8") as f:
                texts = [line.rstrip("\n").strip() for line in f]
            with gzip.open(_require(folder / f"{prefix}_labels.txt.gz"), "rt", encoding="utf-8") as f:
                labels = [int(line) for line in f if line.strip()]
            if len(texts) != len(labels):
                raise DataError(f"{folder}: {prefix} has {len(texts)} texts but {len(labels)} labels")
            frames.append(pd.DataFrame({
                "id": [f"tweeteval-{task}-{prefix}-{i}" for i in range(len(texts))],
                "text": texts, "label": labels, "split": split,
            }))
        return pd.concat(frames, ignore_index=True)

    return read


def _ethos(data_dir: Path) -> pd.DataFrame:
    raw = pd.read_csv(_require(data_dir / "ethos" / "Ethos_Dataset_Binary.csv.gz"), sep=";")
    return pd.DataFrame({
        "id": [f"ethos-{i}" for i in range(len(raw))],
        "text": raw["comment"].astype(str),
        "label": (raw["isHate"] >= 0.5).astype(int),  # the authors' threshold: 433 hate / 565 not
    })


def _sms_spam(data_dir: Path) -> pd.DataFrame:
    with gzip.open(_require(data_dir / "sms_spam" / "SMSSpamCollection.gz"), "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    return pd.DataFrame({
        "id": [f"sms-{i}" for i in range(len(rows))],
        "text": [text for _, text in rows],
        "label": [label for label, _ in rows],
    })


_SHARED_ADAPTERS = {
    "davidson": _davidson,
    "tweeteval_hate": _tweeteval("hate"),
    "tweeteval_offensive": _tweeteval("offensive"),
    "ethos": _ethos,
    "sms_spam": _sms_spam,
}


# ------------------------------------------------------------------------------------------------
# Cleaning, splitting, sampling, snapshot ids
# ------------------------------------------------------------------------------------------------


def drop_duplicates(data: LabeledData) -> LabeledData:
    """Remove exact duplicate texts before any split, so no text is both trained and tested on.

    Copies that agree keep one row (a test-split copy wins, keeping official test sets whole); texts
    whose copies disagree on the label are dropped entirely as unusable noise.
    """
    frame = data.frame
    n_labels = frame.groupby("text")["label"].transform("nunique")
    frame = frame[n_labels == 1]
    if "split" in frame.columns:
        order = frame["split"].map({"test": 0, "validation": 1, "train": 2})
        frame = frame.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")
    frame = frame.drop_duplicates("text", keep="first").sort_index()
    return LabeledData(frame.reset_index(drop=True), data.taxonomy, data.source)


def split(data: LabeledData, *, seed: int, val_frac: float = 0.1, test_frac: float = 0.2) -> Splits:
    """Official splits when the source has them, else deterministic stratified ones from ``seed``."""
    frame = data.frame
    if data.has_official_splits:
        parts = {s: frame[frame["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
        if not parts["validation"].empty and not parts["test"].empty:
            return Splits(parts["train"], parts["validation"], parts["test"])
        if not parts["test"].empty and len(parts["train"]) >= 10:  # keep the official test; carve validation
            train, val = train_test_split(parts["train"], test_size=val_frac, random_state=seed,
                                          stratify=_stratify_labels(parts["train"]))
            return Splits(train.reset_index(drop=True), val.reset_index(drop=True), parts["test"])
        frame = frame.drop(columns="split")
    counts = frame["label"].value_counts()
    if len(frame) < 10 or counts.min() < 3:
        raise DataError(f"{data.source}: too few rows to split ({len(frame)} rows, smallest class "
                        f"{counts.idxmin()!r} has {counts.min()}); need >= 3 per class")
    rest, test = train_test_split(frame, test_size=test_frac, random_state=seed, stratify=frame["label"])
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), random_state=seed,
                                  stratify=rest["label"])
    return Splits(*(f.reset_index(drop=True) for f in (train, val, test)))


def _stratify_labels(frame: pd.DataFrame) -> pd.Series | None:
    """Stratify by label when every class has at least two rows (else sklearn refuses)."""
    return frame["label"] if frame["label"].value_counts().min() >= 2 else None


def stratified_sample(frame: pd.DataFrame, n: int, *, seed: int) -> pd.DataFrame:
    """``n`` rows keeping class proportions, and at least a few of every class, for quick runs."""
    if n >= len(frame):
        return frame
    per_class = frame.groupby("label").size()
    quota = (per_class / per_class.sum() * n).round().astype(int).clip(lower=min(5, n // len(per_class)))
    parts = [g.sample(min(len(g), quota[label]), random_state=seed) for label, g in frame.groupby("label")]
    return pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def snapshot_id(frame: pd.DataFrame) -> str:
    """Content hash of a training set: the same rows give the same id, in any order."""
    rows = sorted(f"{i}\t{t}\t{label}" for i, t, label in frame[["id", "text", "label"]].itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]
