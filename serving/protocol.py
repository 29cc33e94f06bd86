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
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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

    id: int | str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class SetupRequest(_Lenient):
    project: str | int | None = Field(None, description='"<project id>.<created epoch>"')
    label_config: str | None = Field(None, alias="schema", max_length=MAX_LABEL_CONFIG_CHARS,
                                     description="the project's label config XML")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | None = None


class PredictRequest(_Lenient):
    tasks: list[LSTask] | LSTask | None = Field(None, description="tasks to pre-label, answered in order")
    project: str | int | None = None
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
    score: float = Field(description="probability of the predicted label (0 when there is no prediction)")
    result: list[ChoicesRegion]


class PredictResponse(_Strict):
    results: list[TaskPrediction] = Field(
        description="one prediction per task, in request order; empty when no champion exists or the "
        "label config has no <Choices> bound to a <Text>"
    )


class SetupResponse(_Strict):
    model_version: str | None = Field(description='"<registered model>:v<N>", null before a champion exists')


class HealthResponse(_Strict):
    status: Literal["UP"] = "UP"
    model_class: str
    model_version: str | None
    model_loaded: bool
    precision: Literal["fp32", "int8"] | None = Field(None, description="int8 when settings.quantize applied")
    detail: str | None = None


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


class V1PredictRequest(_Strict):
    texts: list[str] = Field(min_length=1, description="texts to classify; each non-blank, at most "
                             "max_text_chars characters")


class V1Prediction(_Strict):
    label: str
    score: float = Field(description="probability of ``label``")
    probabilities: dict[str, float]


class V1PredictResponse(_Strict):
    model_version: str
    predictions: list[V1Prediction] = Field(description="one per input text, in order")


class ErrorResponse(_Strict):
    detail: Any


# ------------------------------------------------------------------------------------------------
# label config ↔ model labels
# ------------------------------------------------------------------------------------------------


class LabelMismatchError(ValueError):
    """The project's choices and the model's labels cannot be reconciled (a configuration error)."""


@dataclass(frozen=True)
class ConfigBinding:
    """How one model's probability columns map onto one project's ``<Choices>``.

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


@lru_cache(maxsize=256)
def bind_config(label_config: str, model_labels: tuple[str, ...]) -> ConfigBinding | None:
    """Resolve a label config against a model's labels.

    Returns None for a well-formed config without a ``<Choices>`` bound to a ``<Text>`` (nothing this
    backend can predict: a 2xx with no predictions, as upstream answers ``<View></View>``). Raises
    :class:`LabelMismatchError` for malformed XML or choices that do not match the model's labels:
    the config must contain every model label, or contain only model labels.
    """
    try:
        ET.fromstring(label_config)
    except ET.ParseError as e:
        raise LabelMismatchError(f"label config is not valid XML: {e}") from None
    try:
        control = parse_label_config(label_config)
    except LabelConfigError:
        return None
    config_labels, known = set(control.labels), set(model_labels)
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
    return ConfigBinding(control.from_name, control.to_name, control.value_field,
                         tuple(model_labels[i] for i in columns), columns)
