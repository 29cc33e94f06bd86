"""Labeled data in one schema: ``id``, ``text``, ``label`` (a taxonomy label name; for a multi-label
taxonomy a tuple of names in taxonomy order, ``()`` meaning none of them) and, when the source has official
splits, ``split`` (train / validation / test).

A source speaks its own label vocabulary: :class:`LabelSpec` says how its values become the taxonomy's
labels (a value map such as ``0=ham,1=spam``, one 0/1 column per label, or a delimited list column).
Texts are HTML-unescaped on load, whatever the source: Davidson's tweets carry ``&amp;`` and ``&#128514;``,
and reviewers would otherwise read the codes in Label Studio.

Sources: the shared public datasets by name, a local CSV / TSV / JSONL / Parquet file (optionally
gzipped), or a Hugging Face dataset id for users with internet. Every path ends in the same checks, so
a bad file fails here with a message that names the problem, before anything is trained or registered.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
import json
import tomllib
from dataclasses import dataclass, field, replace
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
        """Class indices, or for a multi-label taxonomy the (n, K) 0/1 matrix."""
        frame = self.frame if frame is None else frame
        if self.taxonomy.multi:
            return self.taxonomy.encode(frame["label"])
        return frame["label"].map({label: i for i, label in enumerate(self.taxonomy.labels)}).to_numpy()


@dataclass(frozen=True)
class LabelSpec:
    """How a source's label values become taxonomy labels.

    ``label_map`` maps source values (or, with ``label_columns``, column names) to label names; unmapped
    values must already be label names or class indices. A multi-label source gives either one 0/1 column
    per label (``label_columns``; ``("*",)`` or none at all: every taxonomy label that is a column) or one
    column of delimited label names (``delimiter``, default ``|``). ``threshold`` turns fractional 0..1
    columns (ETHOS's annotator shares) into 0/1; without it a fractional value is an error, not a guess.
    """

    label_map: dict[str, str] = field(default_factory=dict)
    label_columns: tuple[str, ...] | None = None
    delimiter: str | None = None
    threshold: float | None = None
    sep: str | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise DataError(f"--label-threshold must be in (0, 1], got {self.threshold}")
        if self.delimiter is not None and not self.delimiter:
            raise DataError("--label-delimiter must not be empty")
        if self.sep is not None and len(self.sep) != 1 and self.sep != "\\t":
            raise DataError(f"--sep must be one character, got {self.sep!r}")


def parse_label_map(spec: str | None) -> dict[str, str]:
    """``0=ham,1=spam``, or a file of value → label: TOML or JSON (a table/object of strings) or CSV (two
    columns, an optional ``value,label`` header)."""
    if spec is None or not spec.strip():
        return {}
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".toml", ".json", ".csv") or path.exists():
        return _label_map_file(path)
    mapping: dict[str, str] = {}
    for piece in spec.split(","):
        key, eq, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise DataError(f"--label-map {spec!r}: {piece.strip()!r} is not value=label (e.g. 0=ham,1=spam)")
        _add_mapping(mapping, key, value, f"--label-map {spec!r}")
    return mapping


def _add_mapping(mapping: dict[str, str], key: str, value: str, where: str) -> None:
    if mapping.get(key, value) != value:
        raise DataError(f"{where}: {key!r} is mapped twice ({mapping[key]!r} and {value!r})")
    mapping[key] = value


def _label_map_file(path: Path) -> dict[str, str]:
    """utf-8-sig: a map saved by Excel or Notepad starts with a byte-order mark, which would otherwise
    hide a CSV's header row and make TOML and JSON unparseable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"label map {path}: cannot read: {e}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            raw: object = tomllib.loads(text)
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
            if rows and [c.strip().lower() for c in rows[0][:2]] in (["value", "label"], ["source", "label"]):
                rows = rows[1:]
            if bad := [r for r in rows if len(r) != 2]:
                raise DataError(f"label map {path}: every row must be value,label; got {bad[0]}")
            raw = {}
            for key, value in rows:
                _add_mapping(raw, key.strip(), value.strip(), f"label map {path}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"label map {path}: not valid {suffix.lstrip('.')}: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise DataError(f"label map {path}: must map each source value to a label name (a string)")
    return {str(k): v.strip() for k, v in raw.items()}


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
    label_spec: LabelSpec | None = None,
) -> LabeledData:
    """Load, validate and de-duplicate a labeled dataset from a shared name, a file or a HF id."""
    settings = settings or get_settings()
    spec = label_spec or LabelSpec()
    if source in KNOWN_DATASETS:
        tax = get_taxonomy(taxonomy or KNOWN_DATASETS[source])
        frame = _normalise_labels(_unescape(_shared(source, settings.data_dir)), tax, source, spec)
    else:
        tax = get_taxonomy(taxonomy or settings.taxonomy)
        raw = _read_source(source, spec.sep)
        frame = _to_schema(raw, tax, source, text_column, label_column, spec)
    data = LabeledData(frame.reset_index(drop=True), tax, source)
    if dedupe:
        data = drop_duplicates(data)
    if data.frame.empty:
        raise DataError(f"{source}: no rows left after validation and de-duplication")
    return data


def load_unlabeled(source: str, *, text_column: str = "text", settings: Settings | None = None,
                   sep: str | None = None) -> pd.DataFrame:
    """A pool of texts (``id``, ``text``) to label; labels, if present, are dropped."""
    settings = settings or get_settings()
    if source in KNOWN_DATASETS:
        frame = _unescape(_shared(source, settings.data_dir))
    else:
        frame = _read_source(source, sep)
        if text_column not in frame.columns:
            raise DataError(f"{source}: no text column {text_column!r} (columns: {list(frame.columns)})")
        frame = _unescape(frame.rename(columns={text_column: "text"}))
    frame = _with_ids(frame)[["id", "text"] + (["created_at"] if "created_at" in frame.columns else [])]
    frame = frame[frame["text"].map(lambda t: isinstance(t, str) and t.strip() != "")]
    return frame.drop_duplicates("text").reset_index(drop=True)


def _unescape(frame: pd.DataFrame) -> pd.DataFrame:
    """``&amp;`` → ``&``, ``&#128514;`` → 😂: what the author wrote, before ids are derived from it."""
    frame = frame.copy()
    frame["text"] = frame["text"].map(lambda t: html.unescape(t) if isinstance(t, str) else t)
    return frame


def held_out_texts(texts) -> set[str]:
    """Texts to keep out of training or a pool: as given and as loaded now. Evaluation sets frozen before
    texts were unescaped on load hold the escaped form, which the unescaped training copy must still match."""
    texts = [t for t in texts if isinstance(t, str)]
    return set(texts) | {html.unescape(t) for t in texts}


def _read_source(source: str, sep: str | None = None) -> pd.DataFrame:
    path = Path(source).expanduser()
    suffixes = [s.lower() for s in path.suffixes]
    looks_like_file = bool(set(suffixes) & _FILE_SUFFIXES) or source.startswith((".", "/", "~"))
    if path.exists():
        return _read_file(path, suffixes, sep)
    if looks_like_file:
        raise DataError(f"file not found: {path}")
    try:
        return _read_hf_dataset(source)
    except DataError as e:
        raise DataError(f"{source!r} is neither a known dataset ({', '.join(KNOWN_DATASETS)}), an existing file, "
                        f"nor a loadable Hugging Face dataset: {e}") from None


def _read_file(path: Path, suffixes: list[str], sep: str | None = None) -> pd.DataFrame:
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a CSV, TSV, JSONL or Parquet file")
    kind = next((s for s in reversed(suffixes) if s in _FILE_SUFFIXES), None)
    compression = "gzip" if suffixes and suffixes[-1] == ".gz" else None
    try:
        if kind in (".csv", ".tsv"):
            sep = "\t" if sep == "\\t" else sep
            return pd.read_csv(path, sep=sep or _sniff_sep(path, compression, kind), compression=compression,
                               dtype=str, keep_default_na=False)
        if kind in (".jsonl", ".json"):
            return _read_json(path, compression, lines=kind == ".jsonl")
        if kind == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, UnicodeDecodeError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read as {kind.lstrip('.')}: {e}") from None
    raise DataError(f"{path}: unsupported format {''.join(suffixes) or '(no suffix)'}; "
                    "use .csv, .tsv, .jsonl, .json or .parquet (optionally .gz)")


def _sniff_sep(path: Path, compression: str | None, kind: str) -> str:
    """The separator of a CSV's header line: ETHOS's files use ``;``. A TSV is tab-separated."""
    if kind == ".tsv":
        return "\t"
    opener = gzip.open if compression == "gzip" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        header = f.readline()
    counts = {sep: header.count(sep) for sep in (",", ";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else ","


def _read_json(path: Path, compression: str | None, lines: bool) -> pd.DataFrame:
    """utf-8-sig: a file written with a byte-order mark would fail at position 0 (pandas' CSV reader skips
    one by itself)."""
    try:
        return pd.read_json(path, lines=lines, compression=compression, dtype=False, encoding="utf-8-sig")
    except ValueError:
        if lines:
            raise
        return pd.read_json(path, lines=True, compression=compression, dtype=False, encoding="utf-8-sig")


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


def _to_schema(raw: pd.DataFrame, tax: Taxonomy, source: str, text_column: str, label_column: str,
               spec: LabelSpec) -> pd.DataFrame:
    columns = _label_columns(raw, tax, source, label_column, spec)
    missing = [c for c in (text_column, *([label_column] if columns is None else [])) if c not in raw.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; columns present: {list(raw.columns)}. "
                        "Use --text-column / --label-column to name them"
                        + (", or --label-columns for one 0/1 column per label." if tax.multi else "."))
    keep = [c for c in ("id", "split", "created_at") if c in raw.columns]  # created_at: drift windows
    if columns is None:
        frame = raw[[text_column, label_column, *keep]].rename(columns={text_column: "text", label_column: "label"})
    else:
        frame = raw[[text_column, *keep]].rename(columns={text_column: "text"})
        frame["label"] = _label_sets_from_columns(raw, columns, source, spec.threshold)
        spec = replace(spec, label_map={})  # the map named columns; the sets hold label names already
    if "split" in frame.columns:
        frame["split"] = frame["split"].map(lambda s: _SPLIT_ALIASES.get(str(s).lower(), s))
        if not set(frame["split"]) <= set(SPLITS):
            frame = frame.drop(columns="split")
    return _normalise_labels(_with_ids(_unescape(frame)), tax, source, spec)


def _label_columns(raw: pd.DataFrame, tax: Taxonomy, source: str, label_column: str, spec: LabelSpec
                   ) -> dict[str, str] | None:
    """Column → label for a source with one 0/1 column per label, or None for a single label column.

    Asked for with ``label_columns``; also taken when a multi-label source has no label column but every
    taxonomy label (through the map) is a column."""
    wanted = spec.label_columns
    if wanted is None and not (tax.multi and label_column not in raw.columns):
        return None
    if wanted is not None and not tax.multi:
        raise DataError(f"--label-columns is for multi-label taxonomies; {tax.name!r} is single-label "
                        "(use --label-column and --label-map)")
    automatic = wanted is None or tuple(wanted) == ("*",)
    candidates = list(raw.columns) if automatic else list(wanted)
    mapping = {c: spec.label_map.get(c, c) for c in candidates}
    if automatic:
        mapping = {c: label for c, label in mapping.items() if label in tax.labels}
        if set(mapping.values()) != set(tax.labels):
            if wanted is None:
                return None  # let the missing label column be the error
            missing = [label for label in tax.labels if label not in set(mapping.values())]
            raise DataError(f"{source}: no column for label(s) {missing} (columns: {list(raw.columns)}); "
                            "name them with --label-columns, mapping column=label with --label-map")
        if len(set(mapping.values())) != len(mapping):  # one column's 1s would silently overwrite the other's
            shared = {label: [c for c, m in mapping.items() if m == label] for label in tax.labels}
            raise DataError(f"{source}: two label columns map to the same label: "
                            f"{ {label: cols for label, cols in shared.items() if len(cols) > 1} }; "
                            "name one column per label with --label-columns")
        return mapping
    if absent := [c for c in candidates if c not in raw.columns]:
        raise DataError(f"{source}: --label-columns names missing column(s) {absent}; columns present: "
                        f"{list(raw.columns)}")
    if unknown := {c: label for c, label in mapping.items() if label not in tax.labels}:
        raise DataError(f"{source}: label column(s) {unknown} are not labels of taxonomy {tax.name!r} "
                        f"{list(tax.labels)}; map a column to a label with --label-map column=label")
    if len(set(mapping.values())) != len(mapping):
        raise DataError(f"{source}: two label columns map to the same label: {mapping}")
    return mapping


def _label_sets_from_columns(raw: pd.DataFrame, columns: dict[str, str], source: str,
                             threshold: float | None) -> list[tuple[str, ...]]:
    on = {}
    for column, label in columns.items():
        text = raw[column].map(lambda v: str(v).strip().lower())
        values = pd.to_numeric(text.replace({"true": "1", "false": "0", "yes": "1", "no": "0"}), errors="coerce")
        bad = raw.loc[values.isna() | (values < 0) | (values > 1), column]
        if len(bad):
            raise DataError(f"{source}: label column {column!r} has {len(bad)} value(s) that are not 0/1 "
                            f"(or a share in 0..1), e.g. {sorted({str(v) for v in bad})[:5]}")
        fractional = values[(values != 0) & (values != 1)]
        if len(fractional) and threshold is None:
            raise DataError(f"{source}: label column {column!r} has fractional values, e.g. "
                            f"{fractional.iloc[0]:g}; pass --label-threshold (e.g. 0.5) to say when a share "
                            "of annotators counts as the label")
        on[label] = (values >= (threshold if threshold is not None else 1)).to_numpy()
    return [tuple(label for label in on if on[label][i]) for i in range(len(raw))]


def _with_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Content-derived ids when the source has none, so re-imports of the same text agree."""
    frame = frame.copy()
    if "id" not in frame.columns:
        frame["id"] = frame["text"].map(lambda t: hashlib.sha1(str(t).encode()).hexdigest()[:16])
    frame["id"] = frame["id"].astype(str)
    return frame


def _value_key(value: object) -> str:
    """How a source value is looked up in a label map: ``1``, ``1.0`` and ``"1"`` are the same key."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _normalise_labels(frame: pd.DataFrame, tax: Taxonomy, source: str, spec: LabelSpec | None = None
                      ) -> pd.DataFrame:
    """Accept label names or integer class indices (after the label map); reject anything else, naming
    the values. A multi-label cell becomes a tuple in taxonomy order."""
    spec = spec or LabelSpec()
    frame = frame.copy()
    bad_text = ~frame["text"].map(lambda t: isinstance(t, str))
    if bad_text.any():
        raise DataError(f"{source}: {int(bad_text.sum())} row(s) have a non-text value in the text column")
    frame = frame[frame["text"].str.strip() != ""]
    allowed = set(tax.choices)
    if bad_targets := sorted({v for v in spec.label_map.values() if v not in allowed}):
        raise DataError(f"--label-map maps to {bad_targets}, which are not labels of taxonomy {tax.name!r} "
                        f"{list(tax.choices)}")

    def to_name(value: object) -> str | None:
        key = _value_key(value)
        if key in spec.label_map:
            return spec.label_map[key]
        if isinstance(value, str) and value in allowed:
            return value
        try:
            idx = int(key)
        except ValueError:
            return None
        return tax.labels[idx] if 0 <= idx < len(tax.labels) and str(idx) == key else None

    delimiter = spec.delimiter or "|"

    def to_set(value: object) -> tuple[str, ...] | None:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(delimiter)] if value.strip() else []
        elif isinstance(value, (list, tuple, np.ndarray)):
            parts = list(value)
        else:
            return None
        names = [to_name(p) for p in parts if _value_key(p)]
        if any(n is None for n in names):
            return None
        chosen = set(names) - {tax.none_label}
        return tuple(label for label in tax.labels if label in chosen)

    names = frame["label"].map(to_set if tax.multi else to_name)
    unknown = frame.loc[names.isna(), "label"]
    if len(unknown):
        sample = sorted({str(v) for v in unknown})[:5]
        how = (f"label sets of {list(tax.choices)} separated by {delimiter!r} (--label-delimiter)" if tax.multi
               else f"{list(tax.labels)} (or their indices 0..{len(tax.labels) - 1})")
        raise DataError(f"{source}: {len(unknown)} row(s) have labels outside taxonomy {tax.name!r}: expected "
                        f"{how}, e.g. {sample}" + ("; map source values with --label-map" if not spec.label_map
                                                   else ""))
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
    whose copies disagree on the label (for multi-label: on the label set) are dropped entirely as
    unusable noise.
    """
    frame = data.frame
    n_labels = frame["label"].map(_label_key).groupby(frame["text"]).transform("nunique")
    frame = frame[n_labels == 1]
    if "split" in frame.columns:
        order = frame["split"].map({"test": 0, "validation": 1, "train": 2})
        frame = frame.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")
    frame = frame.drop_duplicates("text", keep="first").sort_index()
    return LabeledData(frame.reset_index(drop=True), data.taxonomy, data.source)


def _label_key(label: object) -> str:
    """One string per label value: the name, or a label set's names joined (taxonomy order) by ``|``."""
    return "|".join(label) if isinstance(label, tuple) else str(label)


def split(data: LabeledData, *, seed: int, val_frac: float = 0.1, test_frac: float = 0.2) -> Splits:
    """Official splits when the source has them, else deterministic stratified ones from ``seed``.

    Multi-label data is stratified on the label set when every set is common enough, else on each item's
    first label, else not at all (sklearn needs two items per stratum)."""
    frame = data.frame
    if data.has_official_splits:
        parts = {s: frame[frame["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
        if not parts["validation"].empty and not parts["test"].empty:
            return Splits(parts["train"], parts["validation"], parts["test"])
        if not parts["test"].empty and len(parts["train"]) >= 10:  # keep the official test; carve validation
            train, val = _split_off(parts["train"], val_frac, seed)
            return Splits(train.reset_index(drop=True), val.reset_index(drop=True), parts["test"])
        frame = frame.drop(columns="split")
    if data.taxonomy.multi:
        if len(frame) < 10:
            raise DataError(f"{data.source}: too few rows to split ({len(frame)} rows); need at least 10")
    else:
        counts = frame["label"].value_counts()
        if frame.empty:  # a loop with no labels yet, fine-tuned by hand: say so, not numpy's empty argmin
            raise DataError(f"{data.source}: no labeled rows to split; need at least 10, >= 3 per class")
        if len(frame) < 10 or counts.min() < 3:
            raise DataError(f"{data.source}: too few rows to split ({len(frame)} rows, smallest class "
                            f"{counts.idxmin()!r} has {counts.min()}); need >= 3 per class")
    rest, test = _split_off(frame, test_frac, seed)
    train, val = _split_off(rest, val_frac / (1 - test_frac), seed)
    return Splits(*(f.reset_index(drop=True) for f in (train, val, test)))


def _split_off(frame: pd.DataFrame, size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    for strata in _strata(frame):
        try:
            return train_test_split(frame, test_size=size, random_state=seed, stratify=strata)
        except ValueError:  # a stratum too small for this split size: try a coarser one
            continue
    return train_test_split(frame, test_size=size, random_state=seed)


def _strata(frame: pd.DataFrame) -> list[pd.Series]:
    """Candidate stratifications, finest first: the label (or label set), then a label set's first label.
    Only those where every stratum has two rows (else sklearn refuses)."""
    keys = [frame["label"].map(_label_key)]
    if frame["label"].map(lambda v: isinstance(v, tuple)).any():
        keys.append(frame["label"].map(lambda v: v[0] if v else ""))
    return [k for k in keys if len(k) and k.value_counts().min() >= 2]


def stratified_sample(frame: pd.DataFrame, n: int, *, seed: int) -> pd.DataFrame:
    """``n`` rows keeping class (or label-set) proportions, and at least a few of every one, for quick runs."""
    if n >= len(frame):
        return frame
    keys = frame["label"].map(_label_key)
    per_class = keys.value_counts()
    quota = (per_class / per_class.sum() * n).round().astype(int).clip(lower=min(5, n // len(per_class)))
    parts = [g.sample(min(len(g), quota[key]), random_state=seed) for key, g in frame.groupby(keys)]
    return pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def snapshot_id(frame: pd.DataFrame) -> str:
    """Content hash of a training set: the same rows give the same id, in any order."""
    rows = sorted(f"{i}\t{t}\t{_label_key(label)}"
                  for i, t, label in frame[["id", "text", "label"]].itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()[:16]
