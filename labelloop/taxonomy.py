"""Label taxonomies as data: TOML files, their validation, and the Label Studio configs derived from them.

A team's policy (its harm classes, their definitions, single- or multi-label) lives in a file, not in code.
The four built-ins are such files too (``label_studio_config/taxonomies/<name>.toml``), loaded by the same
:func:`load_taxonomy` as a user's own. The model's label list and the Label Studio ``<Choices>`` are the
same list: the XML files in ``label_studio_config/`` are generated from the built-in files
(``labelloop label-configs``) and a test fails if they drift apart. A hand-edited config is accepted when
its choices are the taxonomy's (:func:`check_label_config`).

File format::

    name = "sms_policy"                 # lower-case letters, digits, _ or -
    title = "SMS policy"
    type = "single"                     # or "multi": an item carries any subset of the labels
    none_label = "none"                 # multi only, optional: the reviewers' explicit "none of these"
                                        # (or a table: [none_label] name/description/hotkey/colour)
    [[labels]]
    name = "ok"
    description = "A legitimate message"   # shown to reviewers as the choice's hint
    hotkey = "o"                        # optional; labels without one get the next free digit
    colour = "#2ca02c"                  # optional (or color); a CSS colour

Each section is a pydantic model that forbids unknown keys, so adding a section (issue 12's severity or
escalation) is one more model and one more field on :class:`_TaxonomyFile`; its errors name the field, and
:func:`_locate` turns the field into the file's line.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tomllib
import typing
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import quoteattr

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labelloop.policy import (
    ESCALATE_CONTROL,
    REASON_CONTROL,
    REVEAL_CONTROL,
    REVIEW_CONTROLS,
    SEVERITY_CONTROL,
    Escalation,
    Protection,
    ReviewPolicy,
    Severity,
)

LABEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "label_studio_config"
BUILTIN_DIR = LABEL_CONFIG_DIR / "taxonomies"

# Names used in the generated configs; parsing never relies on them (users may edit their config).
FROM_NAME = "label"
TO_NAME = "text"
TEXT_FIELD = "text"

DEFAULT_NONE_HINT = "None of the labels applies"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# A colour goes into a style attribute: only forms that cannot carry anything else are accepted.
_COLOUR = re.compile(r"^(#[0-9a-fA-F]{3}|#[0-9a-fA-F]{6}|[a-zA-Z]{3,30})$")
_DIGITS = tuple("1234567890")
# What MLflow accepts in a metric name on every platform (mlflow.utils.validation; ':' is refused on Windows)
_METRIC_SAFE = re.compile(r"^[/\w.\- ]+$")


@dataclass(frozen=True)
class Taxonomy:
    """A label policy. ``labels`` are what the model predicts; in a multi-label taxonomy an item carries
    any subset of them (a frame's ``label`` cell is then a tuple of names in taxonomy order, the empty
    tuple meaning "none of these"), and ``none_label`` is the reviewers' explicit choice for that empty
    set, never a model output.

    ``hotkeys`` and ``colours`` are per label (empty: digits 1, 2, ... and no colour); they change how
    reviewers see the labels, not what the labels mean, so the :attr:`fingerprint` leaves them out."""

    name: str
    title: str
    labels: tuple[str, ...]
    hints: tuple[str, ...]
    multi: bool = False
    none_label: str | None = None
    hotkeys: tuple[str | None, ...] = ()
    colours: tuple[str | None, ...] = ()
    none_hint: str = DEFAULT_NONE_HINT
    none_hotkey: str | None = None
    none_colour: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it was loaded from
    #: the file's [severity] / [escalation] sections (None: it has neither; the settings' apply)
    policy: ReviewPolicy | None = field(default=None, compare=False)
    #: the file's [protection] section (None: the settings' apply)
    protection: Protection | None = field(default=None, compare=False)

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise UnknownLabelError(label, self) from None

    def encode(self, label_sets: Iterable[Iterable[str]]) -> np.ndarray:
        """Label sets → an (n, K) 0/1 matrix in taxonomy order (multi-label training targets)."""
        rows = list(label_sets)
        out = np.zeros((len(rows), len(self.labels)), dtype=np.int8)
        for i, labels in enumerate(rows):
            for label in labels:
                if label != self.none_label:
                    out[i, self.index(label)] = 1
        return out

    def decode(self, row: Sequence[int] | np.ndarray) -> tuple[str, ...]:
        """A 0/1 row → the label set, in taxonomy order."""
        return tuple(label for label, on in zip(self.labels, row, strict=True) if on)

    @property
    def kind(self) -> str:
        return "multi" if self.multi else "single"

    @property
    def choices(self) -> tuple[str, ...]:
        """What reviewers choose from: the labels, then the none label when there is one."""
        return self.labels + ((self.none_label,) if self.none_label else ())

    @property
    def fingerprint(self) -> str:
        """What a model's outputs and a frozen evaluation set's labels mean: type, labels in order and the
        none label. Models and eval sets record it; a taxonomy whose fingerprint differs is a different
        task, never silently mixed with the old one."""
        content = json.dumps({"type": self.kind, "labels": list(self.labels), "none_label": self.none_label})
        return hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]

    def resolved_hotkeys(self) -> tuple[str | None, ...]:
        """Per choice (labels, then the none label): the file's hotkey, else the next digit no choice claims."""
        given = list(self.hotkeys) or [None] * len(self.labels)
        given += [self.none_hotkey] if self.none_label else []
        free = iter(d for d in _DIGITS if d not in {h.lower() for h in given if h})
        return tuple(h if h else next(free, None) for h in given)

    def resolved_colours(self) -> tuple[str | None, ...]:
        colours = list(self.colours) or [None] * len(self.labels)
        return tuple(colours + ([self.none_colour] if self.none_label else []))

    def resolved_hints(self) -> tuple[str, ...]:
        return self.hints + ((self.none_hint,) if self.none_label else ())


class UnknownLabelError(ValueError):
    def __init__(self, label: object, taxonomy: Taxonomy):
        super().__init__(
            f"label {label!r} is not in taxonomy {taxonomy.name!r} (expected one of {list(taxonomy.labels)})"
        )
        self.label = label


class TaxonomyError(ValueError):
    """A taxonomy file that cannot be used. ``problems`` holds one line per problem, each naming the file,
    the line where it could be found, and the field; the message is all of them on one line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = [f"{source}: {p}" for p in problems]
        super().__init__("; ".join(self.problems))


# ------------------------------------------------------------------------------------------------
# The file format: one pydantic model per section
# ------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class _Choice(_Section):
    """What reviewers see of one choice: the description is its hint."""

    name: str
    description: str
    hotkey: str | None = None
    colour: str | None = Field(None, alias="color")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        """A label name is written in label maps (``a=b,c=d``), in label lists (``a|b``) and in metric names."""
        if not v.strip():
            raise ValueError("must not be empty")
        if v != v.strip() or any(c in v for c in "|,="):
            raise ValueError(f"{v!r} must not start or end with spaces nor contain '|', ',' or '='")
        return v

    @field_validator("hotkey")
    @classmethod
    def _one_key(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError(f"{v!r} is not a hotkey: use a key such as \"1\" or \"h\", without spaces")
        return v

    @field_validator("colour")
    @classmethod
    def _css_colour(cls, v: str | None) -> str | None:
        if v is not None and not _COLOUR.match(v):
            raise ValueError(f"{v!r} is not a colour: use #rgb, #rrggbb or a CSS colour name")
        return v


class _Label(_Choice):
    @field_validator("name")
    @classmethod
    def _metric_safe(cls, v: str) -> str:
        """A model label also names MLflow metrics (``f1_<label>``, ``recall_<label>``), and MLflow refuses
        other characters only when training logs them, after the evaluation set was frozen. (The none label
        is never a model output, so it is not held to this.)"""
        if not _METRIC_SAFE.match(v) or posixpath.normpath(f"f1_{v}") != f"f1_{v}":
            raise ValueError(f"{v!r} also names MLflow metrics (f1_<label>): use letters, digits, spaces, "
                             "'_', '-', '.' or '/' (no '//', no '/' at either end)")
        return v


class _NoneLabel(_Choice):
    description: str = DEFAULT_NONE_HINT


class _TaxonomyFile(_Section):
    name: str
    title: str
    type: Literal["single", "multi"]
    labels: list[_Label] = Field(min_length=1)
    none_label: _NoneLabel | None = None
    severity: Severity | None = None
    escalation: Escalation | None = None
    protection: Protection | None = None

    @field_validator("none_label", mode="before")
    @classmethod
    def _name_only(cls, v: object) -> object:
        """``none_label = "none"`` is short for a table with just the name."""
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name_is_an_identifier(cls, v: str) -> str:
        """The name becomes the registered model's name and a file name: keep it plain."""
        if not _NAME.match(v):
            raise ValueError(f"{v!r} must be lower-case letters, digits, '_' or '-', starting with a letter or digit")
        return v


def _semantic_problems(spec: _TaxonomyFile) -> list[tuple[tuple, str]]:
    """What pydantic cannot see per field: clashes between labels, and rules that depend on the type."""
    problems: list[tuple[tuple, str]] = []
    seen: dict[str, int] = {}
    for i, label in enumerate(spec.labels):
        if label.name in seen:
            problems.append((("labels", i, "name"), f"duplicate label {label.name!r} "
                             f"(also labels[{seen[label.name]}])"))
        seen.setdefault(label.name, i)
    none = spec.none_label
    if none is not None:
        if spec.type != "multi":
            problems.append((("none_label",), "a none label is for multi-label taxonomies only (type = \"multi\")"))
        if none.name in seen:
            problems.append((("none_label",), f"none label {none.name!r} is also a label (labels[{seen[none.name]}])"))
    if len(spec.labels) < 2:
        problems.append((("labels",), f"a {spec.type}-label taxonomy needs at least two labels"))
    if spec.severity is not None:
        names = {label.name for label in spec.labels}
        for label in spec.severity.severe_labels:
            if label not in names:
                problems.append((("severity", "severe_labels"), f"{label!r} is not one of the labels {sorted(names)}"))
    keys: dict[str, tuple] = {}
    owners = [(("labels", i, "hotkey"), label.name, label.hotkey) for i, label in enumerate(spec.labels)]
    if none is not None:
        owners.append((("none_label", "hotkey"), none.name, none.hotkey))
    for loc, owner, hotkey in owners:
        if hotkey is None:
            continue
        if hotkey.lower() in keys:
            other_loc, other = keys[hotkey.lower()]
            problems.append((loc, f"hotkey {hotkey!r} of {owner!r} clashes with {other!r} "
                             f"({_dotted(other_loc)})"))
        else:
            keys[hotkey.lower()] = (loc, owner)
    return problems


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _locate(text: str, loc: tuple) -> int | None:
    """The 1-based line of a field in the TOML text: ``("labels", 2, "hotkey")`` is the ``hotkey =`` line
    under the third ``[[labels]]``; a missing key points at its table's header. None when the field is
    written some other way (inline tables, dotted keys)."""
    table: tuple = ()
    counts: dict[str, int] = {}
    headers: dict[tuple, int] = {(): 1}
    keys: dict[tuple, int] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if m := re.match(r"^\[\[\s*([\w.-]+)\s*\]\]", stripped):
            name = m.group(1)
            counts[name] = counts.get(name, -1) + 1
            table = (name, counts[name])
            headers[table] = n
        elif m := re.match(r"^\[\s*([\w.-]+)\s*\]", stripped):
            table = tuple(m.group(1).split("."))
            headers[table] = n
        elif m := re.match(r"^([A-Za-z0-9_-]+|\"[^\"]*\")\s*=", stripped):
            keys.setdefault((*table, m.group(1).strip('"')), n)
    if not loc:
        return None
    key = tuple(loc)
    if key[-1] == "colour" and key not in keys:
        key = (*key[:-1], "color")
    for candidate in (key, key[:-1], key[:-2]):
        if candidate in keys:
            return keys[candidate]
        if candidate in headers and candidate:
            return headers[candidate]
        if candidate and (*candidate, 0) in headers:  # the whole array of tables: its first entry
            return headers[(*candidate, 0)]
    return None


def _problem(text: str, loc: tuple, message: str) -> str:
    line = _locate(text, loc)
    where = f"line {line}: " if line else ""
    return f"{where}{_dotted(loc) or 'file'}: {message}"


def parse_taxonomy(text: str, source: str = "<taxonomy>") -> Taxonomy:
    """A taxonomy from TOML text; :class:`TaxonomyError` lists every problem, each with its line and field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TaxonomyError(source, [f"not valid TOML: {e}"]) from None
    _anchor_lexicon(raw, source)
    try:
        spec = _TaxonomyFile.model_validate(raw)
    except ValidationError as e:
        problems = []
        for p in e.errors():
            loc = tuple(p["loc"])
            message = p["msg"].removeprefix("Value error, ")
            if p["type"] == "extra_forbidden":
                message = f"unknown key (allowed: {', '.join(_allowed_keys(loc))})"
            elif p["type"] == "missing":
                message = "required key is missing"
            problems.append(_problem(text, loc, message))
        raise TaxonomyError(source, sorted(dict.fromkeys(problems), key=_line_of)) from None
    problems = [_problem(text, loc, message) for loc, message in _semantic_problems(spec)]
    if problems:
        raise TaxonomyError(source, sorted(problems, key=_line_of))
    none = spec.none_label
    return Taxonomy(
        name=spec.name,
        title=spec.title,
        labels=tuple(label.name for label in spec.labels),
        hints=tuple(label.description for label in spec.labels),
        multi=spec.type == "multi",
        none_label=none.name if none else None,
        hotkeys=tuple(label.hotkey for label in spec.labels),
        colours=tuple(label.colour for label in spec.labels),
        none_hint=none.description if none else DEFAULT_NONE_HINT,
        none_hotkey=none.hotkey if none else None,
        none_colour=none.colour if none else None,
        source=source,
        policy=None if spec.severity is None and spec.escalation is None else ReviewPolicy.model_validate(
            {"severity": spec.severity or Severity(), "escalation": spec.escalation or Escalation()}),
        protection=spec.protection,
    )


def _anchor_lexicon(raw: dict, source: str) -> None:
    """A relative ``[protection] lexicon`` path is relative to the taxonomy file, not to wherever the
    command runs, so a policy folder (taxonomy plus lexicon) can move as one."""
    section = raw.get("protection")
    if not isinstance(section, dict) or not isinstance(section.get("lexicon"), str):
        return
    lexicon, base = Path(section["lexicon"]).expanduser(), Path(source).parent
    if not lexicon.is_absolute() and Path(source).is_file():
        section["lexicon"] = str(base / lexicon)


def _line_of(problem: str) -> int:
    """Problems are reported in file order; those without a line come last."""
    m = re.match(r"line (\d+):", problem)
    return int(m.group(1)) if m else 1 << 30


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the section holding ``loc`` accepts, found by walking the models' field types, so a new
    section (a model and a field) needs no change here."""
    model: type[BaseModel] = _TaxonomyFile
    for part in loc[:-1]:
        if isinstance(part, int) or part not in model.model_fields:
            continue
        nested = [t for t in _flatten(model.model_fields[part].annotation)
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if nested:
            model = nested[0]
    keys = []
    for name, info in model.model_fields.items():
        keys += [name] + ([info.alias] if info.alias and info.alias != name else [])
    return keys


def _flatten(annotation: object) -> list[object]:
    args = typing.get_args(annotation)
    return [annotation] if not args else [t for arg in args for t in _flatten(arg)]


def taxonomy_to_toml(taxonomy: Taxonomy) -> str:
    """The file for a taxonomy (how built-ins were written, and how ``taxonomy migrate`` shows one)."""
    lines = [f"name = {json.dumps(taxonomy.name)}", f"title = {json.dumps(taxonomy.title)}",
             f"type = {json.dumps(taxonomy.kind)}"]
    if taxonomy.none_label:
        plain = (taxonomy.none_hint, taxonomy.none_hotkey, taxonomy.none_colour) == (DEFAULT_NONE_HINT, None, None)
        if plain:
            lines.append(f"none_label = {json.dumps(taxonomy.none_label)}")
        else:
            lines += ["", "[none_label]", f"name = {json.dumps(taxonomy.none_label)}",
                      f"description = {json.dumps(taxonomy.none_hint)}"]
            lines += [f"hotkey = {json.dumps(taxonomy.none_hotkey)}"] if taxonomy.none_hotkey else []
            lines += [f"colour = {json.dumps(taxonomy.none_colour)}"] if taxonomy.none_colour else []
    hotkeys = taxonomy.hotkeys or (None,) * len(taxonomy.labels)
    colours = taxonomy.colours or (None,) * len(taxonomy.labels)
    for label, hint, hotkey, colour in zip(taxonomy.labels, taxonomy.hints, hotkeys, colours, strict=True):
        lines += ["", "[[labels]]", f"name = {json.dumps(label)}", f"description = {json.dumps(hint)}"]
        lines += [f"hotkey = {json.dumps(hotkey)}"] if hotkey else []
        lines += [f"colour = {json.dumps(colour)}"] if colour else []
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Loading: built-in names and files, one loader
# ------------------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def taxonomy_path(name_or_path: str | Path) -> Path:
    """A built-in name's file, else the path itself (a built-in name is a plain word: never a path)."""
    text = str(name_or_path)
    if _NAME.match(text) and (BUILTIN_DIR / f"{text}.toml").exists():
        return BUILTIN_DIR / f"{text}.toml"
    return Path(text).expanduser()


def is_builtin(name_or_path: str | Path) -> bool:
    return taxonomy_path(name_or_path).parent == BUILTIN_DIR


def load_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """A built-in taxonomy by name (``hate_offensive``) or a taxonomy file by path."""
    path = taxonomy_path(name_or_path)
    try:
        stat = path.stat()
    except OSError:
        raise TaxonomyError(str(name_or_path), [f"unknown taxonomy: no such file, and not a built-in name "
                                                f"(built-ins: {', '.join(builtin_names())})"]) from None
    return _load_cached(str(path.resolve()), stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _load_cached(path: str, mtime_ns: int) -> Taxonomy:
    """Parsed once per file version: settings name a taxonomy, and many call sites ask for it."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # editors on Windows may save a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise TaxonomyError(path, [f"cannot read: {e}"]) from None
    taxonomy = parse_taxonomy(text, path)
    if Path(path).parent == BUILTIN_DIR and taxonomy.name != Path(path).stem:
        raise TaxonomyError(path, [_problem(text, ("name",), f"a built-in's name must be its file's name "
                                            f"{Path(path).stem!r}")])
    return taxonomy


def taxonomy_setting(name_or_path: str | Path) -> str:
    """The value the ``taxonomy`` setting keeps: a built-in's name, or the file's absolute path (so the
    service, its jobs and the CLI read the same file whatever their working directory). Loading it first
    means a broken file fails here, naming its line."""
    load_taxonomy(name_or_path)
    return str(name_or_path) if is_builtin(name_or_path) else str(taxonomy_path(name_or_path).resolve())


def get_taxonomy(name_or_path: str | Path) -> Taxonomy:
    """The taxonomy a setting names: a built-in name or a file path."""
    return load_taxonomy(name_or_path)


#: the built-in taxonomies by name, read from their files like any other
TAXONOMIES: dict[str, Taxonomy] = {name: load_taxonomy(name) for name in builtin_names()}


# ------------------------------------------------------------------------------------------------
# Migrating to a changed taxonomy (pure policy; ``labelloop taxonomy migrate`` does the I/O)
# ------------------------------------------------------------------------------------------------


def migration_map(old: Taxonomy, new: Taxonomy, label_map: dict[str, str]) -> dict[str, str | None]:
    """Every old choice → its new label: ``label_map`` first, else the same name when the new taxonomy has
    it. An old label with neither, a target the new taxonomy lacks, or a change between single- and
    multi-label is refused: guessing would put wrong labels into the new evaluation set. The old none
    label needs no guess: "none of these" is the empty set in any multi-label taxonomy, so unless mapped it
    goes to the new none label, or to None when the new taxonomy has none (a renamed or dropped none label
    must not block a migration, nor become a real label that happens to share its name)."""
    if old.multi != new.multi:
        raise ValueError(f"cannot migrate a {old.kind}-label taxonomy ({old.name!r}) to a {new.kind}-label one "
                         f"({new.name!r}): the labels mean different things; label a new evaluation set instead")
    if unknown := sorted(set(label_map) - set(old.choices)):
        raise ValueError(f"--label-map names {unknown}, which are not labels of the old taxonomy {old.name!r} "
                         f"{list(old.choices)}")
    if bad := sorted({v for v in label_map.values() if v not in new.choices}):
        raise ValueError(f"--label-map maps to {bad}, which are not labels of the new taxonomy {new.name!r} "
                         f"{list(new.choices)}")
    mapping: dict[str, str | None] = {label: label_map.get(label, label) for label in old.choices}
    if old.none_label is not None and old.none_label not in label_map:
        mapping[old.none_label] = new.none_label
    if unmapped := [label for label, target in mapping.items()
                    if target not in new.choices and label != old.none_label]:
        raise ValueError(f"old label(s) {unmapped} have no counterpart in {new.name!r} {list(new.choices)}: say "
                         "where each goes with --label-map " + ",".join(f"{label}=<new label>" for label in unmapped))
    return mapping


def relabel(label: object, mapping: dict[str, str | None], new: Taxonomy) -> object:
    """One stored label (a name, or a label set) through a migration map, in the new taxonomy's order."""
    if isinstance(label, str):
        return mapping[label]
    chosen = {mapping[str(name)] for name in label} - {new.none_label, None}
    return tuple(name for name in new.labels if name in chosen)


# ------------------------------------------------------------------------------------------------
# Label Studio configs
# ------------------------------------------------------------------------------------------------


def label_config_xml(taxonomy: Taxonomy) -> str:
    """The Label Studio labeling interface for a taxonomy: radio buttons for single-label, checkboxes with
    the none label as a choice for multi-label; the description as each choice's hint, hotkeys, and a
    colour stripe (``<Choice style>``, the only styling attribute Label Studio's Choice tag reads)."""
    choices = []
    for label, hint, hotkey, colour in zip(taxonomy.choices, taxonomy.resolved_hints(),
                                           taxonomy.resolved_hotkeys(), taxonomy.resolved_colours(), strict=True):
        attrs = f"value={quoteattr(label)} hint={quoteattr(hint)}"
        attrs += f" hotkey={quoteattr(hotkey)}" if hotkey else ""
        attrs += f" style={quoteattr(f'border-left: 6px solid {colour}; padding-left: 4px')}" if colour else ""
        choices.append(f"    <Choice {attrs}/>")
    kind = "multiple" if taxonomy.multi else "single-radio"
    # without a none label a multi-label answer may be empty, so a choice cannot be required
    required = ' required="true"' if not taxonomy.multi or taxonomy.none_label else ""
    return (
        "<View>\n"
        f"  <Header value={quoteattr(taxonomy.title)}/>\n"
        f'  <Text name="{TO_NAME}" value="${TEXT_FIELD}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="{kind}"{required} showInline="true">\n'
        + "\n".join(choices) + "\n"
        "  </Choices>\n"
        "</View>\n"
    )


#: the masked text a reviewer sees by default (lexicon-masked, or a notice for a confidently severe item)
MASKED_FIELD = "text_masked"
REVEAL_CHOICE = "Show original"
ESCALATE_CHOICE = "Escalate"


def review_label_config(taxonomy: Taxonomy, policy: ReviewPolicy | None, *, masked: bool) -> str:
    """:func:`label_config_xml` plus the review controls: a severity scale and an escalate checkbox with its
    reason when ``policy`` is given, and, when ``masked``, the masked view by default.

    The masked view: ``$text_masked`` in a ``View`` shown while the ``reveal`` choice is unselected, the
    original ``$text`` in one shown only once it is selected (``visibleWhen="choice-unselected"`` /
    ``"choice-selected"`` with ``whenTagName``, which Label Studio 1.23 supports on ``View``). Revealing is
    therefore part of the annotation's result, so the journal records it as exposure. Every control still
    points at the original ``text`` object, so predictions keep naming ``text`` as ``to_name``;
    :func:`parse_label_config` skips the review controls by name when it looks for the label's ``Choices``."""
    base = label_config_xml(taxonomy)
    if policy is None and not masked:
        return base
    text_tag = f'  <Text name="{TO_NAME}" value="${TEXT_FIELD}"/>\n'
    head, _, rest = base.partition(text_tag)
    labels_end = rest.index("  </Choices>\n") + len("  </Choices>\n")
    label_choices, tail = rest[:labels_end], rest[labels_end:]
    if masked:
        view = (f'  <View visibleWhen="choice-unselected" whenTagName="{REVEAL_CONTROL}">\n'
                f'    <Text name="{MASKED_FIELD}" value="${MASKED_FIELD}"/>\n'
                "  </View>\n"
                f'  <View visibleWhen="choice-selected" whenTagName="{REVEAL_CONTROL}">\n'
                f"  {text_tag}"
                "  </View>\n"
                f'  <Choices name="{REVEAL_CONTROL}" toName="{TO_NAME}" choice="multiple" showInline="true">\n'
                f'    <Choice value={quoteattr(REVEAL_CHOICE)} hint="Shows the unmasked text; recorded as exposure"/>\n'
                "  </Choices>\n")
    else:
        view = text_tag
    controls = ""
    if policy is not None:
        controls += (f'  <Header value="Severity" size="6"/>\n'
                     f'  <Choices name="{SEVERITY_CONTROL}" toName="{TO_NAME}" choice="single-radio" showInline="true"'
                     + (' required="true"' if policy.severity.required else "") + ">\n"
                     + "".join(f"    <Choice value={quoteattr(level)}/>\n" for level in policy.severity.levels)
                     + "  </Choices>\n")
        if policy.escalation.enabled:
            reason = (f'    <Choices name="{REASON_CONTROL}" toName="{TO_NAME}" choice="single-radio" '
                      'showInline="true">\n'
                      + "".join(f"      <Choice value={quoteattr(r)}/>\n" for r in policy.escalation.reasons)
                      + "    </Choices>\n") if policy.escalation.reasons else (
                f'    <TextArea name="{REASON_CONTROL}" toName="{TO_NAME}" rows="2" maxSubmissions="1" '
                'placeholder="Why this needs urgent action"/>\n')
            controls += (f'  <Choices name="{ESCALATE_CONTROL}" toName="{TO_NAME}" choice="multiple">\n'
                         f'    <Choice value={quoteattr(ESCALATE_CHOICE)} hint="Needs urgent action"/>\n'
                         "  </Choices>\n"
                         f'  <View visibleWhen="choice-selected" whenTagName="{ESCALATE_CONTROL}">\n'
                         '    <Header value="Escalation reason" size="6"/>\n'
                         f"{reason}"
                         "  </View>\n")
    return head + view + label_choices + controls + tail


def label_config_path(taxonomy: Taxonomy) -> Path:
    return LABEL_CONFIG_DIR / f"{taxonomy.name}.xml"


def write_label_configs() -> list[Path]:
    paths = []
    for taxonomy in TAXONOMIES.values():
        path = label_config_path(taxonomy)
        path.write_text(label_config_xml(taxonomy), encoding="utf-8")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class ChoicesControl:
    """What a prediction must name to land in a given Label Studio config."""

    from_name: str
    to_name: str
    value_field: str
    labels: tuple[str, ...]
    #: ``choice="multiple"``: an answer (and a prediction) may hold any number of the labels
    multiple: bool = False


class LabelConfigError(ValueError):
    pass


def parse_label_config(xml: str) -> ChoicesControl:
    """Find the first ``<Choices>`` bound to a ``<Text>`` object in a labeling config.

    Label Studio sends the config with every /setup and /predict; predictions must echo its names.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise LabelConfigError(f"label config is not valid XML: {e}") from None
    texts = {el.get("name"): el.get("value", "") for el in root.iter() if el.tag == "Text" and el.get("name")}
    for el in root.iter():
        if el.tag != "Choices" or el.get("name") in REVIEW_CONTROLS:  # severity, reveal...: never the label
            continue
        to_name = el.get("toName", "")
        if to_name not in texts:
            continue
        # with an alias, Label Studio stores the alias in results, so that is the label's name
        labels = tuple(c.get("alias") or c.get("value") or "" for c in el.iter("Choice"))
        return ChoicesControl(
            from_name=el.get("name", ""),
            to_name=to_name,
            value_field=texts[to_name].lstrip("$"),
            labels=tuple(label for label in labels if label),
            multiple=el.get("choice", "single") == "multiple",
        )
    raise LabelConfigError("label config has no <Choices> bound to a <Text> object")


def check_label_config(xml: str, taxonomy: Taxonomy, source: str = "label config") -> ChoicesControl:
    """Accept a (possibly hand-edited) config whose choices are exactly the taxonomy's (labels, plus the
    none label for multi-label) with the matching choice type; anything else would collect answers the
    model cannot learn from, so it is refused before a project is created."""
    control = parse_label_config(xml)
    expected = set(taxonomy.choices)
    problems = []
    if missing := [c for c in taxonomy.choices if c not in control.labels]:
        problems.append(f"missing choice(s) {missing}")
    if extra := [c for c in control.labels if c not in expected]:
        problems.append(f"choice(s) {extra} not in the taxonomy")
    if len(set(control.labels)) != len(control.labels):
        problems.append("a choice appears twice")
    if control.multiple != taxonomy.multi:
        want = 'choice="multiple"' if taxonomy.multi else 'choice="single" or "single-radio"'
        problems.append(f"its <Choices> must use {want} for a {taxonomy.kind}-label taxonomy")
    if problems:
        raise LabelConfigError(f"{source} does not match taxonomy {taxonomy.name!r} ({taxonomy.kind}-label, choices "
                               f"{list(taxonomy.choices)}): " + "; ".join(problems))
    return control


def project_label_config(taxonomy: Taxonomy, config_file: Path | None = None, *,
                         policy: ReviewPolicy | None = None, masked: bool = False) -> str:
    """The config a new project gets: the user's file when given (after :func:`check_label_config`; its
    review controls are the user's business, named as :mod:`labelloop.policy` says), else the one generated
    from the taxonomy with the review controls (:func:`review_label_config`)."""
    if config_file is None:
        return review_label_config(taxonomy, policy, masked=masked)
    try:
        xml = Path(config_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelConfigError(f"label_config_file {config_file}: cannot read: {e}") from None
    check_label_config(xml, taxonomy, f"label_config_file {config_file}")
    return xml
