"""A small typed wrapper over ``label_studio_sdk.LabelStudio`` (SDK 2.1.2, open-source server 1.23.2).

How active learning steers what reviewers see next
---------------------------------------------------
The open-source server has no API to push a queue order, but its project ``sampling = "Uncertainty
sampling"`` is enough (``label_studio/projects/functions/next_task.py``, ``_try_uncertainty_sampling``):

* ``GET /api/projects/<id>/next/`` takes the tasks this user has not solved (``get_not_solved_tasks_qs``:
  not labelled, no annotation or postponed draft by this user), keeps those holding a prediction whose
  ``model_version`` equals the **project's** ``model_version``, and orders them by that prediction's
  ``score``, **lowest first** (``order_by('predictions__score')`` reuses the join of the model_version
  filter, so predictions of older versions never count). So: push predictions whose ``score`` is a
  *priority*, lowest = ask a human first, then :meth:`LabelStudioClient.set_model_version` to that version.
  For least-confidence sampling the priority is simply the model's confidence (max probability); for any
  other acquisition function use e.g. ``rank / n`` so the most informative item gets the lowest score.
* The project ``model_version`` must be set explicitly: importing predictions through
  ``/api/projects/<id>/import/predictions`` does not set it, and connecting an ML backend to a project whose
  ``model_version`` is empty sets it to the backend's *title* (``ml/api.py`` ``perform_create``), which no
  prediction carries, so sampling silently falls back to random.
* Ties are not broken by the server (SQLite happens to return them in task-id order): make priorities unique.
* Tasks without a current-version prediction are served only after all predicted ones, at random; with no
  current-version prediction at all the whole queue is random ("uncertainty sampling fallback").
* The returned task is locked for that user for ``TASK_LOCK_TTL`` (24 h) or until they annotate or skip
  it: a later ``/next`` returns the same task first ("Task lock" queue), even after a re-ranking.
* What comes *before* sampling in ``get_next_task``: manually assigned tasks, ground-truth onboarding
  (``annotator_evaluation_enabled``) and, when ``maximum_annotations > 1``, "breadth first" (tasks others
  already annotated, in random order). ``show_overlap_first`` restricts the pool to tasks with
  ``overlap > 1`` when there are any. Keep ``maximum_annotations = 1`` and ``show_overlap_first = False``.
* ``project.annotators()`` is empty in the open-source edition, so the "several annotators: random among
  the top" branch (which in fact ignores the ordering altogether) is never taken there.

In the Data Manager the "Prediction score" column (``predictions_score``) is the mean score of the task's
predictions *of the project's current model_version* (``data_manager/managers.py``
``annotate_predictions_score``), i.e. exactly the priority: sorting it ascending shows the queue order.
The labeling screen pre-selects that prediction's label (``show_collab_predictions`` is on by default).

Webhooks: ``ml.create`` also creates a project webhook to ``<backend>/webhook`` for all actions
(``ml/models.py`` ``create_ml_webhook``), without the backend's basic-auth credentials;
:meth:`LabelStudioClient.connect_backend` keeps exactly one such webhook and gives it the
``Authorization`` header, so every event arrives once and is accepted.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import pandas as pd
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from pydantic import BaseModel, ConfigDict, Field

from labelloop.taxonomy import (
    FROM_NAME,
    MASKED_FIELD,
    TO_NAME,
    ChoicesControl,
    LabelConfigError,
    Taxonomy,
    check_label_config,
    label_config_xml,
    parse_label_config,
)
from serving.auth import WEBHOOK_SECRET_HEADER

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
RETRIEVE_PREDICTIONS_ACTION = "retrieve_tasks_predictions"
PAGE_SIZE = 1000


class LabelStudioError(RuntimeError):
    """Label Studio refused a request or could not be reached."""


class InvalidPredictionError(ValueError):
    """A prediction does not fit the project (unknown task, label or control names); nothing was sent."""


class PriorityIn(BaseModel):
    """A review priority with no pre-label: for a cold start (no model yet) or an item to be labeled blind.

    ``score`` orders the annotation queue under uncertainty sampling (lowest first), see the module docstring.
    Label Studio stores the empty ``result`` as a prediction of ``model_version``, so sampling orders by it,
    while the labeling screen has nothing to pre-select: no model's guess is shown where none exists.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: int = Field(gt=0)
    score: float = Field(allow_inf_nan=False)
    model_version: str = Field(min_length=1)

    def result(self) -> list[dict[str, Any]]:
        return []

    def problem(self, control: ChoicesControl, project_id: int) -> str | None:
        """Why this prediction does not fit the project's labeling config, or ``None`` when it does."""
        return None

    def to_ls(self) -> dict[str, Any]:
        return {"task": self.task_id, "model_version": self.model_version, "score": self.score,
                "result": self.result()}


class PredictionIn(PriorityIn):
    """One prediction to store in Label Studio: a priority plus the model's label, or for a multi-label
    project the tuple of choices to pre-select. An empty tuple stores the priority with nothing pre-selected
    (the caller shows "none of these" as the taxonomy's none label, when it has one)."""

    label: Annotated[str, Field(min_length=1)] | tuple[str, ...]
    from_name: str = FROM_NAME
    to_name: str = TO_NAME

    def result(self) -> list[dict[str, Any]]:
        return choice_result(self.label, self.from_name, self.to_name) if self.label else []

    def problem(self, control: ChoicesControl, project_id: int) -> str | None:
        if (self.from_name, self.to_name) != (control.from_name, control.to_name):
            return (f"prediction for task {self.task_id} targets {self.from_name}->{self.to_name}, "
                    f"but project {project_id} labels with {control.from_name}->{control.to_name}")
        choices = _choices(self.label)
        unknown = [label for label in choices if label not in control.labels]
        if unknown:
            return (f"prediction for task {self.task_id} has label(s) {unknown}, "
                    f"not among project {project_id}'s choices {list(control.labels)}")
        if len(choices) > 1 and not control.multiple:
            return (f"prediction for task {self.task_id} selects {choices}, but project {project_id}'s "
                    'choices take one label (not choice="multiple")')
        return None


def _choices(label: str | Sequence[str]) -> list[str]:
    return [label] if isinstance(label, str) else list(label)


def choice_result(label: str | Sequence[str], from_name: str = FROM_NAME, to_name: str = TO_NAME
                  ) -> list[dict[str, Any]]:
    """The ``result`` of a choices annotation or prediction, as Label Studio stores it: one label, or
    the selected set of a ``choice="multiple"`` control."""
    return [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": _choices(label)}}]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError(f"chunk size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe(error: ApiError) -> str:
    body = error.body
    if isinstance(body, dict):
        detail = body.get("validation_errors") or body.get("detail") or body
        return f"HTTP {error.status_code}: {json.dumps(detail, default=str)}"
    return f"HTTP {error.status_code}: {body}"


CONNECT_HINT = "run `labelloop connect`"


def basic_auth_header(user: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic, as Label Studio sends it to the ML backend."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass(frozen=True)
class BackendLink:
    """An ML backend as a project registered it: where Label Studio calls it, and whether with credentials."""

    url: str
    basic_auth: bool


@dataclass(frozen=True)
class WebhookLink:
    """A project webhook: where Label Studio posts events, with which ``Authorization`` header."""

    id: int
    url: str
    authorization: str | None
    active: bool


def connection_problems(
    project_id: int,
    backends: Sequence[BackendLink],
    hooks: Sequence[WebhookLink],
    accepts: Callable[[bytes | None], bool],
) -> list[str]:
    """What stops Label Studio's calls or events from reaching the backend, one sentence each (none: all is well).

    ``accepts`` is the backend's own credential check (``serving.auth.Credentials.accepts``), so the verdict
    is the one the backend would give. The case this exists for: connecting the backend in Label Studio's UI
    (*Settings → Model*, or ``ml.create``) makes a webhook to ``<backend>/webhook`` without the credentials,
    so with auth on every event is refused with 401 and labels wait for the reconciler.
    """
    if not backends:
        return [f"no ML backend is connected to project {project_id}: Label Studio asks for no pre-labels and "
                f"sends no annotation webhooks; {CONNECT_HINT}"]
    auth_required = not accepts(None)
    problems = []
    for backend in backends:
        base = backend.url.rstrip("/")
        if auth_required and not backend.basic_auth:
            problems.append(f"Label Studio calls the ML backend {base} without credentials, which it requires: "
                            f"every pre-label request is refused with 401; {CONNECT_HINT}")
        target = f"{base}/webhook"
        mine = [h for h in hooks if h.url.rstrip("/") == target]
        if not mine:
            problems.append(f"project {project_id} has no webhook to {target}: labels arrive only when the "
                            f"reconciler pulls them; {CONNECT_HINT}")
        elif len(mine) > 1:
            problems.append(f"{len(mine)} webhooks of project {project_id} point at {target}: every event "
                            f"arrives {len(mine)} times; {CONNECT_HINT}")
        for hook in mine:
            if not hook.active:
                problems.append(f"webhook {hook.id} to {target} is turned off: labels arrive only when the "
                                f"reconciler pulls them; {CONNECT_HINT}")
            elif hook.authorization is None and auth_required:
                problems.append(f"webhook {hook.id} to {target} has no credentials, but the backend requires "
                                "them: every annotation event is refused with 401 and labels arrive only when the "
                                f"reconciler pulls them; {CONNECT_HINT}")
            elif hook.authorization is not None and not accepts(hook.authorization.encode()):
                problems.append(f"webhook {hook.id} to {target} carries credentials the backend refuses: every "
                                f"annotation event is refused with 401; {CONNECT_HINT}")
    return problems


def _authorization(headers: dict[str, Any] | None) -> str | None:
    return next((str(v) for k, v in (headers or {}).items() if k.lower() == "authorization"), None)


class LabelStudioClient:
    """What labelloop needs from Label Studio, with errors that say which call failed and why."""

    def __init__(self, url: str, api_key: str, mask: Callable[[str], str] | None = None):
        """``mask``: what reviewers see of a text by default (``Protection.mask_text``); every task this client
        creates carries it as ``text_masked`` (the text itself without one), so a project whose config shows
        the masked view never shows a task blank, whichever code path imported it."""
        self.url = url.rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=api_key)
        self.mask = mask or str
        # Task ids seen per project. Listing tasks is the slow call (``/api/tasks`` loads every task's
        # predictions, so it slows down as predictions pile up); this spares a listing per prediction push.
        self._known_tasks: dict[int, set[int]] = {}

    @contextmanager
    def _call(self, what: str) -> Iterator[None]:
        try:
            yield
        except ApiError as e:
            raise LabelStudioError(f"{what} failed: {_describe(e)}") from None
        except httpx.HTTPError as e:
            raise LabelStudioError(f"{what} failed: cannot reach Label Studio at {self.url}: {e}") from None

    def _raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Endpoints the SDK does not wrap (``/next``, model versions), authenticated like the SDK."""
        response = self.sdk._client_wrapper.httpx_client.request(path, method=method, **kwargs)
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text
            raise ApiError(status_code=response.status_code, headers=dict(response.headers), body=body)
        return response

    # --- projects -----------------------------------------------------------------------------
    def ensure_project(self, title: str, taxonomy: Taxonomy, description: str = "",
                       label_config: str | None = None) -> int:
        """The id of the project called ``title``, created with ``label_config`` (default: the taxonomy's
        generated config) if there is none.

        An existing project is reused (the oldest when several share the title) as long as its choices are
        the taxonomy's (labels, the none label for multi-label, and the choice type); otherwise
        :class:`LabelConfigError`: its labels would not fit the model. A given config is checked the same
        way before the project is created.
        """
        label_config = label_config or label_config_xml(taxonomy)
        check_label_config(label_config, taxonomy)
        with self._call(f"listing projects titled {title!r}"):
            matches = sorted(p.id for p in self.sdk.projects.list(title=title, page_size=100) if p.title == title)
        if matches:
            project_id = matches[0]
            with self._call(f"reading project {project_id}"):
                config = self.sdk.projects.get(project_id).label_config or ""
            try:
                check_label_config(config, taxonomy, f"project {project_id} ({title!r})")
            except LabelConfigError as e:
                raise LabelConfigError(f"{e} (it has choices {list(parse_label_config(config).labels)})") from None
            return project_id
        with self._call(f"creating project {title!r}"):
            project = self.sdk.projects.create(
                title=title, description=description, label_config=label_config
            )
        assert project.id is not None
        return project.id

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Make ``model_version`` the project's current one.

        It drives uncertainty sampling, the Data Manager's prediction columns and the pre-label annotators
        see. The server accepts only a version some prediction of the project carries (or an ML backend's
        title)."""
        with self._call(f"setting model_version {model_version!r} on project {project_id}"):
            self.sdk.projects.update(project_id, model_version=model_version)

    def use_uncertainty_sampling(self, project_id: int) -> None:
        """Serve tasks by lowest current-version prediction score (overlap-first would bypass it)."""
        with self._call(f"enabling uncertainty sampling on project {project_id}"):
            self.sdk.projects.update(project_id, sampling=UNCERTAINTY_SAMPLING, show_overlap_first=False)

    def next_task(self, project_id: int) -> dict[str, Any] | None:
        """The task ``GET /api/projects/<id>/next/`` gives the API user, as an annotator's label stream would;
        ``None`` when nothing is left. Side effect, as in the UI: the task is locked for this user."""
        with self._call(f"asking project {project_id} for the next task"):
            try:
                return dict(self._raw("GET", f"api/projects/{project_id}/next/").json())
            except ApiError as e:
                if e.status_code == 404:
                    return None
                raise

    # --- tasks --------------------------------------------------------------------------------
    def _tasks(
        self, project_id: int, *, fields: str = "task_only", query: dict[str, Any] | None = None
    ) -> Iterator[Any]:
        """The project's tasks as SDK objects, page by page (``query``: Data Manager filters/ordering)."""
        kwargs: dict[str, Any] = {"project": project_id, "fields": fields, "page_size": PAGE_SIZE}
        if query is not None:
            kwargs["query"] = json.dumps(query)
        with self._call(f"listing tasks of project {project_id}"):
            yield from self.sdk.tasks.list(**kwargs)

    def task_ids(self, project_id: int) -> dict[str, int]:
        """``item_id -> task_id`` for the tasks labelloop imported.

        Tasks without ``data.item_id`` are skipped; should an item have been imported twice by hand, its
        oldest task wins."""
        mapping: dict[str, int] = {}
        seen: set[int] = set()
        for task in self._tasks(project_id):
            if task.id is None:
                continue
            seen.add(task.id)
            item_id = (task.data or {}).get("item_id")
            if item_id is not None:
                key = str(item_id)
                mapping[key] = min(task.id, mapping.get(key, task.id))
        self._known_tasks[project_id] = seen
        return mapping

    def import_tasks(self, project_id: int, items: pd.DataFrame, chunk_size: int = PAGE_SIZE) -> dict[str, int]:
        """Import ``items[id, text]`` as tasks ``{"text", "item_id"}``, skipping items already imported.

        Everything is validated before the first request. Returns ``item_id -> task_id`` for every given item.
        """
        missing = {"id", "text"} - set(items.columns)
        if missing:
            raise ValueError(f"items lack column(s) {sorted(missing)}; expected at least id and text")
        ids = items["id"].astype(str)
        if ids.duplicated().any():
            raise ValueError(f"duplicate item ids: {sorted(set(ids[ids.duplicated()]))[:10]}")
        bad = [i for i, t in zip(ids, items["text"], strict=True) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"{len(bad)} item(s) have no text, e.g. {bad[:10]}")
        existing = self.task_ids(project_id)
        new = [
            {"text": text, MASKED_FIELD: self.mask(text), "item_id": item_id}
            for item_id, text in zip(ids, items["text"], strict=True)
            if item_id not in existing
        ]
        for chunk in _chunks(new, chunk_size):
            with self._call(f"importing {len(chunk)} tasks into project {project_id}"):
                response = self.sdk.projects.import_tasks(project_id, request=list(chunk), return_task_ids=True)
            task_ids = response.task_ids or []
            if len(task_ids) != len(chunk):
                raise LabelStudioError(
                    f"Label Studio returned {len(task_ids)} task ids for {len(chunk)} imported tasks"
                )
            existing.update({row["item_id"]: task_id for row, task_id in zip(chunk, task_ids, strict=True)})
            self._known_tasks.setdefault(project_id, set()).update(task_ids)
        return {item_id: existing[item_id] for item_id in ids}

    def create_tasks(self, project_id: int, items: Sequence[tuple[str, str]]) -> list[int]:
        """Import ``(item_id, text)`` pairs as new tasks even when the item already has one, in order; returns
        their task ids. For the quality slices: a second copy of an item (overlap, adjudication) or a
        frozen-evaluation item (honeypot) must look to reviewers exactly like an ordinary task."""
        rows = [{"text": text, "item_id": str(item_id)} for item_id, text in items]
        bad = [r["item_id"] for r in rows if not isinstance(r["text"], str) or not r["text"].strip()]
        if bad:
            raise ValueError(f"{len(bad)} item(s) have no text, e.g. {bad[:10]}")
        for row in rows:
            row[MASKED_FIELD] = self.mask(row["text"])
        if not rows:
            return []
        with self._call(f"importing {len(rows)} tasks into project {project_id}"):
            response = self.sdk.projects.import_tasks(project_id, request=rows, return_task_ids=True)
        task_ids = list(response.task_ids or [])
        if len(task_ids) != len(rows):
            raise LabelStudioError(f"Label Studio returned {len(task_ids)} task ids for {len(rows)} imported tasks")
        self._known_tasks.setdefault(project_id, set()).update(task_ids)
        return task_ids

    # --- predictions --------------------------------------------------------------------------
    def _model_version_counts(self, project_id: int) -> dict[str, int]:
        with self._call(f"reading model versions of project {project_id}"):
            return dict(self._raw("GET", f"api/projects/{project_id}/model-versions/").json())

    def model_versions(self, project_id: int) -> dict[str, int]:
        """``model_version -> number of predictions`` for every version the project's predictions carry."""
        return self._model_version_counts(project_id)

    def _validate_predictions(self, project_id: int, predictions: Sequence[PriorityIn]) -> None:
        with self._call(f"reading project {project_id}"):
            config = self.sdk.projects.get(project_id).label_config or ""
        control = parse_label_config(config)
        for p in predictions:
            problem = p.problem(control, project_id)
            if problem is not None:
                raise InvalidPredictionError(problem)
        wanted = {p.task_id for p in predictions}
        if not wanted <= self._known_tasks.get(project_id, set()):
            self.task_ids(project_id)  # refreshes what this client knows of the project's tasks
        unknown = sorted(wanted - self._known_tasks[project_id])
        if unknown:
            raise InvalidPredictionError(f"task(s) {unknown[:10]} are not in project {project_id}")

    def import_predictions(self, project_id: int, predictions: Sequence[PriorityIn], chunk_size: int = 500) -> int:
        """Store predictions, in chunks; returns how many were created.

        All predictions are checked against the project first (the server silently drops predictions whose
        label is not in the config), so a bad one means nothing is written. Task ids are checked against the
        tasks this client has seen, listing them again only for ids it has not; a task deleted in Label Studio
        since then is refused by the server, for its chunk only. A task that already holds a prediction of
        the same ``model_version`` keeps it and is skipped, so a repeated run adds no duplicates; to re-rank,
        push under a new model_version.
        """
        if not predictions:
            return 0
        self._validate_predictions(project_id, predictions)
        versions = {p.model_version for p in predictions}
        if versions & set(self._model_version_counts(project_id)):
            stored = {(p["task"], p["model_version"]) for p in self.predictions(project_id)}
            predictions = [p for p in predictions if (p.task_id, p.model_version) not in stored]
        seen: set[tuple[int, str]] = set()
        unique = []
        for p in predictions:
            if (p.task_id, p.model_version) not in seen:
                seen.add((p.task_id, p.model_version))
                unique.append(p)
        created = 0
        for chunk in _chunks(unique, chunk_size):
            with self._call(f"importing {len(chunk)} predictions into project {project_id}"):
                response = self.sdk.projects.import_predictions(project_id, request=[p.to_ls() for p in chunk])
            created += int(response.created or 0)
        return created

    def predictions(self, project_id: int) -> list[dict[str, Any]]:
        """Every stored prediction of the project: ``id, task, model_version, score, result``."""
        with self._call(f"listing predictions of project {project_id}"):
            stored = self.sdk.predictions.list(project=project_id)
        return [
            {
                "id": p.id,
                "task": p.task,
                "model_version": p.model_version,
                "score": p.score,
                "result": p.result,
            }
            for p in stored
        ]

    def unlabelled_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """The project's tasks nobody has annotated or skipped yet, in the order its uncertainty sampling serves
        them: ``task_id, item_id, text, score`` (the current model_version's prediction score, lowest first;
        tasks without one last, oldest first), what a cap-aware queue chooses from."""
        with self._call(f"reading project {project_id}"):
            version = self.sdk.projects.get(project_id).model_version or None
        unlabelled = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal", "type": "Number", "value": 0}]}}
        rows = []
        for task in self._tasks(project_id, fields="all", query=unlabelled):
            data = task.data or {}
            scores = [p.get("score") if isinstance(p, dict) else getattr(p, "score", None)
                      for p in task.predictions or []
                      if (p.get("model_version") if isinstance(p, dict) else getattr(p, "model_version", None))
                      == version]
            score = next((float(s) for s in scores if s is not None), None)
            rows.append({"task_id": task.id, "item_id": str(data.get("item_id", task.id)),
                         "text": data.get("text") if isinstance(data.get("text"), str) else "", "score": score})
        return sorted(rows, key=lambda r: (r["score"] is None, r["score"] or 0.0, r["task_id"]))

    def set_masked_text(self, task_id: int, item_id: str, text: str, masked: str) -> None:
        """Replace what a task shows by default (``text_masked``), keeping its text and item id."""
        with self._call(f"updating the masked text of task {task_id}"):
            self.sdk.tasks.update(str(task_id), data={"text": text, MASKED_FIELD: masked, "item_id": item_id})

    def user_id(self, email: str) -> int | None:
        """The Label Studio user id of the account with this email (case-insensitive), or None."""
        with self._call("listing users"):
            users = self.sdk.users.list()
        wanted = email.strip().lower()
        return next((u.id for u in users if (u.email or "").lower() == wanted), None)

    def labeling_url(self, project_id: int, task_id: int) -> str:
        """Where a reviewer labels this one task in Label Studio's own interface."""
        return f"{self.url}/projects/{project_id}/data?task={task_id}"

    # --- ML backend -----------------------------------------------------------------------------
    def connect_backend(
        self,
        project_id: int,
        url: str,
        *,
        title: str = "labelloop",
        basic_auth: tuple[str, str] | None = None,
        webhook_secret: str | None = None,
    ) -> int:
        """Connect the serving ML backend (reusing one already registered with this URL); returns its id.

        Label Studio calls the backend's ``/health`` and ``/setup`` right away, so it must be running.
        Afterwards exactly one project webhook points at ``<url>/webhook``, carrying the basic-auth header and,
        when given, the backend's ``webhook_secret`` in ``X-Labelloop-Webhook-Secret`` (``serving.auth``).
        A project without a model_version gets the backend's *title* as one (Label Studio does that), which
        no prediction carries: call :meth:`set_model_version` after pushing predictions.
        """
        url = url.rstrip("/")
        self.require_project(project_id)
        auth: dict[str, Any] = {"auth_method": "NONE"}
        if basic_auth is not None:
            user, password = basic_auth
            auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password}
        with self._call(f"listing ML backends of project {project_id}"):
            backends = [b for b in self.sdk.ml.list(project=project_id) if b.url.rstrip("/") == url]
        if backends:
            backend_id = min(b.id for b in backends if b.id is not None)
            with self._call(f"updating ML backend {backend_id}"):
                # url and project are needed: the server re-validates the connection with them (else HTTP 500)
                self.sdk.ml.update(backend_id, project=project_id, url=url, title=title, **auth)
        else:
            with self._call(f"connecting ML backend {url} to project {project_id}"):
                backend = self.sdk.ml.create(project=project_id, url=url, title=title, is_interactive=False, **auth)
            assert backend.id is not None
            backend_id = backend.id
        self._ensure_one_webhook(project_id, f"{url}/webhook", basic_auth, webhook_secret)
        return backend_id

    def _ensure_one_webhook(self, project_id: int, url: str, basic_auth: tuple[str, str] | None,
                            webhook_secret: str | None = None) -> None:
        """Keep the oldest webhook to ``url`` (fixing its headers in place) and delete the others: a second
        hook to the same URL would deliver every event twice."""
        headers: dict[str, str] = {}
        if basic_auth is not None:
            headers["Authorization"] = basic_auth_header(*basic_auth)
        if webhook_secret:
            headers[WEBHOOK_SECRET_HEADER] = webhook_secret
        with self._call(f"listing webhooks of project {project_id}"):
            hooks = sorted(
                (
                    h
                    for h in self.sdk.webhooks.list(project=str(project_id))
                    if h.project == project_id and h.url == url
                ),
                key=lambda h: h.id or 0,
            )
        if not hooks:
            with self._call(f"creating webhook {url}"):
                self.sdk.webhooks.create(
                    project=project_id, url=url, send_payload=True, send_for_all_actions=True, headers=headers
                )
            return
        keep, *extra = hooks
        for hook in extra:
            with self._call(f"deleting duplicate webhook {hook.id}"):
                self.sdk.webhooks.delete(hook.id)
        if (keep.headers or {}) != headers or not keep.is_active:
            with self._call(f"updating webhook {keep.id}"):
                self.sdk.webhooks.update(keep.id, headers=headers, is_active=True)

    def require_project(self, project_id: int) -> None:
        """Fail with a sentence that names the project when it does not exist (the SDK's 404 names nothing)."""
        with self._call(f"reading project {project_id}"):
            try:
                self.sdk.projects.get(project_id)
            except ApiError as e:
                if e.status_code == 404:
                    raise LabelStudioError(f"project {project_id} does not exist in Label Studio at {self.url}"
                                           ) from None
                raise

    def connection_problems(
        self, project_id: int, accepts: Callable[[bytes | None], bool], backend_url: str | None = None
    ) -> list[str]:
        """:func:`connection_problems` for the project as Label Studio has it now; ``backend_url`` limits the
        check to that backend (by default every ML backend of the project is taken to be labelloop's)."""
        self.require_project(project_id)
        with self._call(f"listing ML backends of project {project_id}"):
            backends = [BackendLink(b.url.rstrip("/"), b.auth_method == "BASIC_AUTH")
                        for b in self.sdk.ml.list(project=project_id)]
        if backend_url is not None:
            backends = [b for b in backends if b.url == backend_url.rstrip("/")]
        with self._call(f"listing webhooks of project {project_id}"):
            hooks = [WebhookLink(h.id or 0, h.url, _authorization(h.headers), bool(h.is_active))
                     for h in self.sdk.webhooks.list(project=str(project_id)) if h.project == project_id]
        return connection_problems(project_id, backends, hooks, accepts)

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> None:
        """Ask the connected ML backend for predictions (Data Manager action), for all tasks or some.

        Label Studio skips tasks that already hold a prediction of the backend's current model_version.
        """
        with self._call(f"listing ML backends of project {project_id}"):
            if not list(self.sdk.ml.list(project=project_id)):
                raise LabelStudioError(f"project {project_id} has no ML backend; connect_backend() first")
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        with self._call(f"retrieving predictions for project {project_id}"):
            self.sdk.actions.create(id=RETRIEVE_PREDICTIONS_ACTION, project=project_id, selected_items=selected)

    # --- annotations --------------------------------------------------------------------------
    def annotations(self, project_id: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """``(annotation, task)`` for every annotation in the project, skipped ones (``was_cancelled``)
        included; only tasks that have annotations are fetched. The task keeps its ``predictions``: the
        journal reads from them which pre-label an annotation started from (``parent_prediction``)."""
        has_annotations = {
            "filters": {
                "conjunction": "or",
                "items": [
                    {
                        "filter": "filter:tasks:total_annotations",
                        "operator": "greater",
                        "type": "Number",
                        "value": 0,
                    },
                    {
                        "filter": "filter:tasks:cancelled_annotations",
                        "operator": "greater",
                        "type": "Number",
                        "value": 0,
                    },
                ],
            }
        }
        for task in self._tasks(project_id, fields="all", query=has_annotations):
            task_dict = task.model_dump(mode="json", exclude={"annotations", "drafts"})
            for annotation in task.annotations or []:
                yield dict(annotation), task_dict

    def create_annotation(
        self, task_id: int, label: str | Sequence[str], from_name: str = FROM_NAME, to_name: str = TO_NAME,
        **kw: Any
    ) -> dict[str, Any]:
        """Annotate a task as the API user (simulated reviewers, tests) with one label, or a set of labels in a
        ``choice="multiple"`` project; ``kw`` goes to ``annotations.create`` (``lead_time``, ``was_cancelled``,
        ``ground_truth``, ...). Fires the project's webhooks."""
        with self._call(f"annotating task {task_id}"):
            annotation = self.sdk.annotations.create(task_id, result=choice_result(label, from_name, to_name), **kw)
        return annotation.model_dump(mode="json")
