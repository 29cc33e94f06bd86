"""The review policy beyond the label: how severe an item is, when to escalate it, and how reviewers are protected.

Three sections, each a pydantic model so that a mistake names its field (``severity.severe_from``) wherever the
policy comes from: the settings today (``[severity]``, ``[escalation]``, ``[protection]`` tables in
``labelloop.toml``, or ``LABELLOOP_SEVERITY='{"levels": [...]}'``), and the taxonomy file's optional sections
once the taxonomy loader reads them (:class:`ReviewPolicy` is what it hands the journal).

Everything here is pure: reading review marks out of a Label Studio annotation result and deciding whether an
item counts as severe are functions of their inputs, so the journal (which stores them) and the exposure
ledger (which counts them) cannot disagree about what a mark or a severe item is.

Label Studio control names. Parsing the label itself never relies on control names (a hand-edited config may
rename its ``Choices``), but severity levels such as ``high`` could be anyone's choice values, so the review
controls are recognised by name: :data:`SEVERITY_CONTROL`, :data:`ESCALATE_CONTROL`, :data:`REASON_CONTROL`
and :data:`REVEAL_CONTROL`. A generated config uses exactly these; a hand-written one must too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from labelloop.protection import DEFAULT_LEXICON, Lexicon, load_lexicon

SEVERITY_CONTROL = "severity"
ESCALATE_CONTROL = "escalate"
REASON_CONTROL = "escalation_reason"
REVEAL_CONTROL = "reveal"
#: result items from these controls never carry the taxonomy label
REVIEW_CONTROLS = frozenset({SEVERITY_CONTROL, ESCALATE_CONTROL, REASON_CONTROL, REVEAL_CONTROL})


def is_review_item(item: Any) -> bool:
    """Whether a result item comes from a review control. ``from_name`` is checked to be a string first: a
    hostile payload's list or object there must be read as "not a review control", not raise (unhashable)."""
    if not isinstance(item, dict):
        return False
    name = item.get("from_name")
    return isinstance(name, str) and name in REVIEW_CONTROLS


#: longest escalation reason kept; a reason is a note for the receiver, not a place for the item's text
MAX_REASON_CHARS = 2000


class Severity(BaseModel):
    """An ordered severity scale, lowest first.

    ``severe_from``: the lowest level that makes an item severe (for exposure accounting and the severe
    queue). ``severe_labels``: taxonomy labels that make an item severe whatever its annotated severity
    (say, ``hate``); checked against the taxonomy by :meth:`ReviewPolicy.check`. ``weights``: the training
    weight of each level (``severity_weight`` in training labels); by default a level weighs its rank plus
    one, so the lowest weighs 1, and an item without a severity weighs 1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    levels: tuple[str, ...] = ("low", "medium", "high", "critical")
    severe_from: str = "high"
    required: bool = False
    severe_labels: tuple[str, ...] = ()
    weights: dict[str, float] | None = None

    @field_validator("levels")
    @classmethod
    def _distinct_levels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError("a severity scale needs at least two levels")
        blank = [i for i, level in enumerate(v) if not level.strip()]
        if blank:
            raise ValueError(f"level {blank[0]} is empty")
        repeated = sorted({level for level in v if v.count(level) > 1})
        if repeated:
            raise ValueError(f"levels repeat: {repeated}")
        return v

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            bad = {level: w for level, w in v.items() if not w > 0}
            if bad:
                raise ValueError(f"weights must be > 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _known_levels(self) -> Severity:
        if self.severe_from not in self.levels:
            raise ValueError(f"severe_from {self.severe_from!r} is not one of the levels {list(self.levels)}")
        if self.weights is not None:
            unknown = sorted(set(self.weights) - set(self.levels))
            missing = [level for level in self.levels if level not in self.weights]
            if unknown or missing:
                raise ValueError(f"weights must give exactly the levels {list(self.levels)}"
                                 + (f"; unknown: {unknown}" if unknown else "")
                                 + (f"; missing: {missing}" if missing else ""))
        return self

    def rank(self, level: str) -> int:
        return self.levels.index(level)

    def is_severe(self, level: str | None) -> bool:
        return level is not None and level in self.levels and self.rank(level) >= self.rank(self.severe_from)

    def weight(self, level: str | None) -> float:
        if level is None or level not in self.levels:
            return 1.0
        return self.weights[level] if self.weights is not None else float(self.rank(level) + 1)


class Escalation(BaseModel):
    """The escalate checkbox (``enabled`` false: the checkbox is ignored). ``reasons``: the reasons offered
    (a ``Choices`` control); empty means free text (a ``TextArea``). An escalation whose reason is missing
    while ``require_reason`` holds is quarantined, its label still journaled; a reason outside ``reasons``
    is kept as written, because dropping a credible threat over a wording mismatch would be worse than an
    odd reason."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    reasons: tuple[str, ...] = ()
    require_reason: bool = True

    @field_validator("reasons")
    @classmethod
    def _distinct_reasons(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not r.strip() for r in v):
            raise ValueError("a reason is empty")
        repeated = sorted({r for r in v if v.count(r) > 1})
        if repeated:
            raise ValueError(f"reasons repeat: {repeated}")
        return v


class Protection(BaseModel):
    """Reviewer protection. ``lexicon``: the masking lexicon (see :mod:`labelloop.protection`; ``None``
    turns masking off), checked when the settings load so that a bad file fails at start, never at
    request time. ``blur_threshold``: a prediction of a severe label at least this confident blurs the
    whole item and makes it count as severe. ``daily_severe_cap``: severe items a reviewer is served per
    UTC day before the queue prefers other work (``None``: no cap)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lexicon: Path | None = DEFAULT_LEXICON
    blur_threshold: float = Field(0.9, gt=0, le=1)
    daily_severe_cap: int | None = Field(None, ge=1)

    @field_validator("lexicon")
    @classmethod
    def _loadable(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        path = v.expanduser().resolve()
        load_lexicon(path)  # LexiconError is a ValueError: pydantic reports it under this field
        return path

    def mask_text(self, text: str) -> str:
        """What a reviewer sees by default: the text with lexicon terms masked (unchanged without a lexicon)."""
        return text if self.lexicon is None else _cached_lexicon(self.lexicon).mask(text)[0]

    def blurs(self, scale: Severity, predicted_label: str | None, predicted_probability: float | None) -> bool:
        """Whether the model's prediction hides the whole item: a severe label at least ``blur_threshold`` sure."""
        return (predicted_label is not None and predicted_label in scale.severe_labels
                and predicted_probability is not None and predicted_probability >= self.blur_threshold)

    def masked_view(self, text: str, scale: Severity, predicted_label: str | None = None,
                    predicted_probability: float | None = None) -> str:
        """The task's ``text_masked``: a notice instead of the text when the prediction blurs the item (the
        reviewer reads it only by choosing "show original"), else :meth:`mask_text`."""
        if self.blurs(scale, predicted_label, predicted_probability):
            return BLUR_NOTICE.format(label=predicted_label, probability=predicted_probability)
        return self.mask_text(text)


#: the whole-item blur; the reviewer learns why, and that revealing is their choice
BLUR_NOTICE = ("[Hidden: the model is {probability:.0%} sure this is {label}. Choose \"Show original\" to read "
               "it; revealing is recorded as exposure.]")


@lru_cache(maxsize=8)
def _cached_lexicon(path: Path) -> Lexicon:
    """Loaded once per process: a task import masks thousands of texts with the same lexicon."""
    return load_lexicon(path)


class ReviewPolicy(BaseModel):
    """What the journal needs to read review marks: the severity scale and the escalation rules."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    severity: Severity = Severity()
    escalation: Escalation = Escalation()

    def check(self, labels: Iterable[str]) -> ReviewPolicy:
        """Refuse severe labels the taxonomy does not have (a typo would silently never count)."""
        known = list(labels)
        unknown = [label for label in self.severity.severe_labels if label not in known]
        if unknown:
            raise ValueError(f"severity.severe_labels {unknown} are not taxonomy labels {known}")
        return self


# --- reading review marks from an annotation result ------------------------------------------------


@dataclass(frozen=True)
class ReviewMarks:
    """What an annotation says besides its label. ``problems`` name the parts that could not be used (a
    severity outside the scale, an escalation without a required reason); the label is unaffected."""

    severity: str | None = None
    escalated: bool = False
    reason: str | None = None
    revealed: bool = False
    problems: tuple[str, ...] = ()


def read_marks(result: Any, policy: ReviewPolicy, *, labelled: bool = False) -> ReviewMarks:
    """The review marks in a Label Studio result list (anything else: no marks).

    A severity outside the scale is dropped and reported (the label is kept): severity refines a label, and
    losing the label over it would lose the reviewer's main judgement. So is a missing severity on a
    ``labelled`` annotation when the scale is required. ``escalated`` is true only for an escalation that can
    be delivered; one that lacks a required reason is reported instead."""
    if not isinstance(result, list):
        return ReviewMarks()
    values: dict[str, list[str]] = {}
    for item in result:
        if not is_review_item(item):
            continue
        value = item.get("value")
        value = value if isinstance(value, dict) else {}
        raw = value.get("choices", value.get("text"))
        raw = raw if isinstance(raw, list) else [raw] if isinstance(raw, str) else []
        values.setdefault(item["from_name"], []).extend(v.strip() for v in raw if isinstance(v, str) and v.strip())
    problems: list[str] = []
    severity = _severity_of(values.get(SEVERITY_CONTROL, []), policy.severity, problems)
    if policy.severity.required and labelled and severity is None and not problems:
        problems.append("severity: none given, and the policy requires one (the label is kept)")
    escalated = bool(values.get(ESCALATE_CONTROL)) and policy.escalation.enabled
    reason = "; ".join(values.get(REASON_CONTROL, []))[:MAX_REASON_CHARS] or None
    if escalated and reason is None and policy.escalation.require_reason:
        problems.append("escalation: escalated without a reason, which the policy requires; not escalated "
                        "(the label is kept); update the annotation with a reason to escalate it")
        escalated = False
    return ReviewMarks(severity=severity, escalated=escalated, reason=reason if escalated else None,
                       revealed=bool(values.get(REVEAL_CONTROL)), problems=tuple(problems))


def _severity_of(chosen: list[str], scale: Severity, problems: list[str]) -> str | None:
    distinct = sorted(set(chosen))
    if len(distinct) > 1:
        problems.append(f"severity: several levels chosen {distinct}; none kept (the label is kept)")
        return None
    if distinct and distinct[0] not in scale.levels:
        problems.append(f"severity: {distinct[0]!r} is not on the scale {list(scale.levels)}; not kept "
                        "(the label is kept)")
        return None
    return distinct[0] if distinct else None


# --- what counts as a severe item --------------------------------------------------------------------


def severe_reason(scale: Severity, protection: Protection, *, severity: str | None,
                  label: str | Iterable[str] | None, predicted_label: str | None = None,
                  predicted_probability: float | None = None) -> str | None:
    """Why an item counts as severe for the reviewer who saw it, or None: an annotated severity at or above
    ``severe_from``, a severe label (any of a multi-label set), or a confident prediction of a severe label
    (the item shown blurred)."""
    if scale.is_severe(severity):
        return f"severity {severity}"
    labels = (label,) if isinstance(label, str) else tuple(label or ())
    severe = [name for name in labels if name in scale.severe_labels]
    if severe:
        return f"label {severe[0]}"
    if (predicted_label is not None and predicted_label in scale.severe_labels
            and predicted_probability is not None and predicted_probability >= protection.blur_threshold):
        return f"predicted {predicted_label} ({predicted_probability:.2f})"
    return None
