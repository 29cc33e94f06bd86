"""The wire format: Label Studio's ML-backend protocol and labelloop's own ``/v1`` API.

Label Studio payloads are parsed leniently (extra fields kept, odd shapes such as ``tasks`` sent as a
single dict accepted) because the server sends whole task and project objects whose fields change
between releases; the upstream ``label-studio-ml-backend`` test suite sends degenerate payloads that
must still get a 2xx. Our own ``/v1`` API is strict.

The label config binds a model to a project: predictions must name the project's ``<Choices>`` and
``<Text>`` tags and may only use the project's choice values, so each (config, model labels) pair is
resolved once into a :class:`ConfigBinding` and cached.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from labelloop.taxonomy import LabelConfigError, parse_label_config

#: far above any real labeling config; caps what the per-project config caches can hold
MAX_LABEL_CONFIG_CHARS = 256 * 1024


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ------------------------------------------------------------------------------------------------
# Label Studio → backend
# ------------------------------------------------------------------------------------------------


class LSTask(_Lenient):
    """One Label Studio task; only ``data`` matters here, every other field is kept as sent."""

    id: StrictInt | str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class SetupRequest(_Lenient):
    project: str | StrictInt | None = Field(None, description='"<project id>.<created epoch>"')
    label_config: str | None = Field(None, alias="schema", max_length=MAX_LABEL_CONFIG_CHARS,
                                     description="the project's label config XML")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | None = None


class PredictRequest(_Lenient):
    tasks: list[LSTask] | LSTask | None = Field(None, description="tasks to pre-label, answered in order")
    project: str | StrictInt | None = None  # strict: a bool is no project id
    label_config: str | None = Field(None, max_length=MAX_LABEL_CONFIG_CHARS)
    params: dict[str, Any] | None = None

    def task_list(self) -> list[LSTask]:
        if self.tasks is None:
            return []
        return [self.tasks] if isinstance(self.tasks, LSTask) else self.tasks


# ------------------------------------------------------------------------------------------------
# backend → Label Studio
# ------------------------------------------------------------------------------------------------


class ChoicesValue(_Strict):
    choices: list[str]


class ChoicesRegion(_Strict):
    from_name: str
    to_name: str
    type: Literal["choices"] = "choices"
    value: ChoicesValue


class TaskPrediction(_Strict):
    model_version: str | None
    score: float = Field(description="single-label: probability of the predicted label; multi-label: mean over "
                         "labels of the confidence of each yes/no decision; 0 when there is no prediction")
    result: list[ChoicesRegion]


class PredictResponse(_Strict):
    results: list[TaskPrediction] = Field(
        description="one prediction per task, in request order; empty when no champion exists or the "
        "label config has no <Choices> bound to a <Text>"
    )


class SetupResponse(_Strict):
    model_version: str | None = Field(description='"<registered model>:v<N>", null before a champion exists')


class DependencyHealth(_Strict):
    """One dependency of the service as last seen: ``unavailable`` while calls to it fail."""

    status: Literal["ok", "unavailable"]
    detail: str | None = Field(None, description="why it is unavailable")
    since: str | None = Field(None, description="when it became unavailable (UTC, ISO-8601)")
    retry_in_s: float | None = Field(None, description="seconds until the next attempt (exponential backoff)")
    url: str | None = Field(None, description="where it is (the database's URL, password redacted)")


class ServingCandidate(_Strict):
    path: str = Field(description="torch-fp32, torch-int8, onnx-fp32, onnx-int8, torch-bf16, torch-fp16")
    agreement: float | None = Field(None, description="share of check texts whose top label matches fp32 torch "
                                    "(batch-dependent candidates: in every batching checked)")
    texts_per_s: float | None = Field(None, description="measured on a short timed batch at load")
    error: str | None = Field(None, description="why the candidate could not be built or run")
    batch_dependent: bool = Field(False, description="its labels can depend on which texts share a batch "
                                  "(dynamic int8): checked in every serving batching, judged by agreement_low")
    agreement_low: float | None = Field(None, description="batch-dependent candidates: the one-sided lower "
                                        "confidence bound on agreement that must reach min_agreement")
    agreement_by_batching: dict[str, float] | None = Field(None, description="agreement in each batching checked")


class ServingPath(_Strict):
    chosen: str
    reason: str
    check_texts: int
    min_agreement: float
    confidence: float | None = Field(None, description="the confidence of agreement_low")
    batchings: list[str] = Field(default_factory=list, description="the batch make-ups agreement was checked in")
    speeds_from: Literal["measured", "memo"] | None = Field(
        None, description="memo: speeds remembered from an earlier champion over the same accelerated module "
                          "(agreement is still checked for this one); null when nothing was tried")
    candidates: list[ServingCandidate]


class HealthResponse(_Strict):
    status: Literal["UP"] = "UP"
    model_class: str
    model_version: str | None
    model_loaded: bool
    precision: str | None = Field(None, description="fp32, int8, onnx-fp32, onnx-int8, bf16 or fp16: the "
                                  "path serving chose at load (settings.quantize)")
    serving_path: ServingPath | None = Field(None, description="the path chosen at load and every candidate's "
                                             "top-label agreement and measured speed")
    detail: str | None = None
    champion_error: str | None = Field(None, description="why the registry's champion is not served (registry "
                                       "unreachable, load failed); null when it is, or when there is none yet")
    retry_in_s: float | None = Field(None, description="seconds until the next attempt to load the champion")
    dependencies: dict[str, DependencyHealth] = Field(
        default_factory=dict, description="registry (MLflow), journal (webhooks are refused while it cannot be "
        "written), database (the PostgreSQL that replicas share, when database_url is set) and, in `labelloop "
        "serve` with a project, label_studio (reconciliation)")


class WebhookResult(_Strict):
    status: str
    reason: str | None = None
    event_id: int | None = None


class WebhookResponse(_Strict):
    status: Literal["ok"] = "ok"
    result: WebhookResult


class VersionsResponse(_Strict):
    model_version: str | None = Field(description="the version this process serves")
    registered_model: str
    versions: list[str] = Field(description="every registered version, oldest first (read by Label Studio)")
    aliases: dict[str, str] = Field(description="alias → version label, e.g. champion → name:v3")


class ReloadResponse(_Strict):
    swapped: bool
    previous: str | None
    model_version: str | None
    detail: str


# ------------------------------------------------------------------------------------------------
# /v1 API
# ------------------------------------------------------------------------------------------------


#: the schema says "not blank" (so generated clients and fuzzers know); the route checks it, with its own message
_NonBlankText = Annotated[str, WithJsonSchema({"type": "string", "pattern": r"\S"})]


class V1PredictRequest(_Strict):
    texts: list[_NonBlankText] = Field(min_length=1, description="texts to classify; each non-blank, at most "
                             "max_text_chars characters")


class V1Prediction(_Strict):
    label: str
    score: float = Field(description="probability of ``label``")
    probabilities: dict[str, float]


class V1MultiPrediction(_Strict):
    labels: list[str] = Field(description="the chosen labels, in taxonomy order; empty: none of them")
    score: float = Field(description="mean over labels of the confidence of each yes/no decision")
    probabilities: dict[str, float] = Field(description="each label's own probability (independent sigmoids)")


class V1PredictResponse(_Strict):
    model_version: str
    multi_label: bool = Field(False, description="true: each prediction is a label set (``labels``)")
    predictions: list[V1Prediction] | list[V1MultiPrediction] = Field(description="one per input text, in order")


class ErrorResponse(_Strict):
    detail: Any


def json_errors_on_html(**descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for an HTML page's error answers, which are JSON like every other route's.

    FastAPI documents a route's extra responses in the route's own media type, so a page would claim its
    400/401/404/413/503 answers are HTML. ``descriptions`` maps ``s<status>`` to its description."""
    schema = ErrorResponse.model_json_schema()
    return {int(code.lstrip("s")): {"description": text, "content": {"application/json": {"schema": schema}}}
            for code, text in descriptions.items()}


#: the errors any route can answer before it runs: a body or query that cannot be read, credentials, size
HTML_PAGE_ERRORS = json_errors_on_html(s400="the request cannot be parsed", s401="missing or wrong credentials",
                                       s413="body larger than max_request_bytes")


# ------------------------------------------------------------------------------------------------
# label config ↔ model labels
# ------------------------------------------------------------------------------------------------


class LabelMismatchError(ValueError):
    """The project's choices and the model's labels cannot be reconciled (a configuration error)."""


class Decider(Protocol):
    """What a binding needs of the served classifier (``training.classifier.TextClassifier``)."""

    labels: tuple[str, ...]

    def decide(self, proba: np.ndarray) -> list: ...


@dataclass(frozen=True)
class Decision:
    """One task's pre-label: the choices to pre-select (empty: no result item) and its score."""

    choices: tuple[str, ...]
    score: float


@dataclass(frozen=True)
class ConfigBinding:
    """How one single-label model's probability columns map onto one project's ``<Choices>``.

    ``columns`` are the model's columns whose labels the config offers, in model order. When the
    config offers a subset of the model's labels the probabilities are renormalised over that subset,
    so the prediction is always a value the project accepts.
    """

    from_name: str
    to_name: str
    value_field: str
    labels: tuple[str, ...]
    columns: tuple[int, ...]

    def restrict(self, proba: np.ndarray) -> np.ndarray:
        sub = proba[:, list(self.columns)]
        total = sub.sum(axis=1, keepdims=True)
        return np.divide(sub, total, out=np.full_like(sub, 1.0 / max(len(self.columns), 1)), where=total > 0)

    def decisions(self, proba: np.ndarray, classifier: Decider) -> list[Decision]:
        """The most probable offered label per row, scored by its (renormalised) probability."""
        restricted = self.restrict(proba)
        best = restricted.argmax(axis=1)
        return [Decision((self.labels[int(b)],), float(row[b])) for row, b in zip(restricted, best, strict=True)]


@dataclass(frozen=True)
class MultiConfigBinding(ConfigBinding):
    """A multi-label model on a ``choice="multiple"`` config.

    Each label is its own yes/no decision, taken by the classifier's per-label thresholds
    (``decide``); probabilities are never renormalised, because sigmoid outputs are not a distribution.
    A label the config does not offer is dropped from the set, and the score is the mean confidence of
    the offered labels' decisions, so a task the model is unsure about on any label ranks low in
    Label Studio's uncertainty sampling. An empty set pre-selects the config's "none of these" choice
    when it has one (``none_choice``), else shows nothing pre-selected.
    """

    none_choice: str | None = None

    def decisions(self, proba: np.ndarray, classifier: Decider) -> list[Decision]:
        cols = list(self.columns)
        offered = set(self.labels)
        out = []
        for row, decided in zip(proba, classifier.decide(proba), strict=True):
            chosen = tuple(label for label in decided if label in offered)
            on = np.isin(np.asarray(self.labels, dtype=object), chosen)
            sub = row[cols]
            score = float(np.where(on, sub, 1.0 - sub).mean()) if cols else 0.0
            choices = chosen or ((self.none_choice,) if self.none_choice else ())
            out.append(Decision(choices, score))
        return out


@lru_cache(maxsize=256)
def bind_config(label_config: str, model_labels: tuple[str, ...], multi_label: bool = False,
                none_label: str | None = None) -> ConfigBinding | None:
    """Resolve a label config against a model's labels.

    Returns None for a well-formed config without a ``<Choices>`` bound to a ``<Text>`` (nothing this
    backend can predict: a 2xx with no predictions, as upstream answers ``<View></View>``). Raises
    :class:`LabelMismatchError` for malformed XML or choices that do not match the model's labels:
    the config must contain every model label, or contain only model labels. A multi-label model needs
    a ``choice="multiple"`` config and a single-label model one without it: otherwise reviewers would
    answer a different question than the model's, and their answers would not train it. The taxonomy's
    ``none_label`` (multi-label only) is a reviewer's choice, not a model label, so it is left out of
    the comparison.
    """
    try:
        ET.fromstring(label_config)
    except ET.ParseError as e:
        raise LabelMismatchError(f"label config is not valid XML: {e}") from None
    try:
        control = parse_label_config(label_config)
    except LabelConfigError:
        return None
    if control.multiple != multi_label:
        wanted = 'choice="multiple"' if multi_label else 'a single choice (not choice="multiple")'
        raise LabelMismatchError(
            f"the model is {'multi' if multi_label else 'single'}-label, so <Choices name={control.from_name!r}> "
            f"needs {wanted}: use the config generated from the taxonomy (labelloop label-configs)")
    config_labels, known = set(control.labels) - {none_label}, set(model_labels)
    if not config_labels:
        raise LabelMismatchError(f"<Choices name={control.from_name!r}> offers no choices")
    if not (known <= config_labels or config_labels <= known):
        raise LabelMismatchError(
            f"label config choices {sorted(config_labels)} do not match the model's labels "
            f"{list(model_labels)}: "
            f"missing {sorted(known - config_labels)}, unknown to the model {sorted(config_labels - known)}. "
            "The <Choices> must contain every model label, or only model labels."
        )
    columns = tuple(i for i, label in enumerate(model_labels) if label in config_labels)
    labels = tuple(model_labels[i] for i in columns)
    if multi_label:
        none_choice = none_label if none_label is not None and none_label in control.labels else None
        return MultiConfigBinding(control.from_name, control.to_name, control.value_field, labels, columns,
                                  none_choice)
    return ConfigBinding(control.from_name, control.to_name, control.value_field, labels, columns)


@lru_cache(maxsize=64)
def bind_multi_label(model_labels: tuple[str, ...]) -> MultiConfigBinding:
    """Every label of a multi-label model, outside any Label Studio config (``/v1/predict``): the same
    decisions and score as a project that offers all of them, an empty set staying empty."""
    return MultiConfigBinding("", "", "", model_labels, tuple(range(len(model_labels))))
