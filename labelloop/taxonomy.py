"""The label taxonomies, and the Label Studio labeling configs derived from them.

The model's label list and the Label Studio ``<Choices>`` are the same list: the XML files in
``label_studio_config/`` are generated from :data:`TAXONOMIES` (``labelloop label-configs``) and a test
fails if they drift apart.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

LABEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "label_studio_config"

# Names used in the generated configs; parsing never relies on them (users may edit their config).
FROM_NAME = "label"
TO_NAME = "text"
TEXT_FIELD = "text"


@dataclass(frozen=True)
class Taxonomy:
    """A label policy. ``labels`` are what the model predicts; in a multi-label taxonomy an item carries
    any subset of them (a frame's ``label`` cell is then a tuple of names in taxonomy order, the empty
    tuple meaning "none of these"), and ``none_label`` is the reviewers' explicit choice for that empty
    set, never a model output."""

    name: str
    title: str
    labels: tuple[str, ...]
    hints: tuple[str, ...]
    multi: bool = False
    none_label: str | None = None

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


class UnknownLabelError(ValueError):
    def __init__(self, label: object, taxonomy: Taxonomy):
        super().__init__(
            f"label {label!r} is not in taxonomy {taxonomy.name!r} (expected one of {list(taxonomy.labels)})"
        )
        self.label = label


TAXONOMIES: dict[str, Taxonomy] = {
    t.name: t
    for t in (
        Taxonomy(
            "hate_offensive",
            "Hate speech, offensive language or neither",
            ("hate", "offensive", "neither"),
            (
                "Attacks or demeans a group on the basis of a protected attribute",
                "Rude, vulgar or insulting, but not hate speech",
                "Neither hateful nor offensive",
            ),
        ),
        Taxonomy(
            "hate",
            "Hate speech",
            ("not_hate", "hate"),
            ("Not hate speech", "Attacks or demeans a group on the basis of a protected attribute"),
        ),
        Taxonomy(
            "offensive",
            "Offensive language",
            ("not_offensive", "offensive"),
            ("Not offensive", "Profane, insulting or threatening, targeted or not"),
        ),
        Taxonomy(
            "spam",
            "Spam",
            ("ham", "spam"),
            ("A legitimate message", "Unsolicited commercial or fraudulent message"),
        ),
    )
}


def get_taxonomy(name: str) -> Taxonomy:
    try:
        return TAXONOMIES[name]
    except KeyError:
        raise ValueError(f"unknown taxonomy {name!r}; known: {sorted(TAXONOMIES)}") from None


def label_config_xml(taxonomy: Taxonomy) -> str:
    """The Label Studio labeling interface for one taxonomy (single choice, keyboard hotkeys)."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(label)} hint={quoteattr(hint)} hotkey=\"{i + 1}\"/>"
        for i, (label, hint) in enumerate(zip(taxonomy.labels, taxonomy.hints, strict=True))
    )
    return (
        "<View>\n"
        f"  <Header value={quoteattr(taxonomy.title)}/>\n"
        f'  <Text name="{TO_NAME}" value="${TEXT_FIELD}"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" required="true" '
        'showInline="true">\n'
        f"{choices}\n"
        "  </Choices>\n"
        "</View>\n"
    )


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
        if el.tag != "Choices":
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
        )
    raise LabelConfigError("label config has no <Choices> bound to a <Text> object")
