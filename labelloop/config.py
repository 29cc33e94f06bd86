"""All labelloop settings, in one place.

Values come, highest priority first, from: keyword arguments, ``LABELLOOP_*`` environment variables,
a ``.env`` file, a TOML file named by ``LABELLOOP_CONFIG`` (or ``labelloop.toml`` in the working
directory), then the defaults below. Defaults keep every piece of state inside the repository (the
shared datasets are read from ``../shared/data``), so a fresh clone works offline with nothing configured.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from labelloop.policy import Escalation, Protection, ReviewPolicy, Severity

if TYPE_CHECKING:
    from labelloop.db import Database

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _config_file() -> Path:
    return Path(os.environ.get("LABELLOOP_CONFIG", "labelloop.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABELLOOP_", env_file=".env", extra="ignore")

    # --- where state lives -------------------------------------------------------------------
    mlruns_dir: Path = REPO_ROOT / "mlruns"
    state_dir: Path = Field(REPO_ROOT / "var", description="journal, caches, jobs, eval sets, LS credentials")
    cache_dir: Path | None = Field(None, description="embedding/probability caches (content-addressed); "
                                             "default: state_dir/cache")
    data_dir: Path = Field(REPO_ROOT.parent / "shared" / "data", description="the shared public datasets")
    database_url: str | None = Field(None, description="PostgreSQL (postgresql://user:pass@host/db) for the state "
                                     "that replicas share: journal, jobs, round lock, escalations, exposure, "
                                     "slices, alerts. Default: SQLite files in state_dir (one machine)")

    # --- MLflow ------------------------------------------------------------------------------
    tracking_uri: str | None = Field(None, description="default: SQLite under mlruns_dir")
    artifact_location: str | None = Field(None, description="default: mlruns_dir/artifacts")
    experiment: str = "labelloop"
    model_name: str | None = Field(None, description="registered model name; default labelloop-<taxonomy>")

    # --- the task ----------------------------------------------------------------------------
    taxonomy: str = Field("hate_offensive", description="a built-in taxonomy's name or a taxonomy file "
                          "(TOML; see `labelloop taxonomy check`); checked when settings load")
    label_config_file: Path | None = Field(None, description="a hand-edited Label Studio config for new projects "
                                           "(default: generated from the taxonomy); its choices must match it")
    base_model: str = Field(DEFAULT_BASE_MODEL, description="HF model id or local path")
    max_length: int = Field(64, ge=8, le=512)
    fast_ngram_features: int = Field(0, ge=0, multiple_of=2, description="fast mode, single-label: this many "
                                     "hashed word and character n-gram features next to the frozen embedding "
                                     "(e.g. 4096; 0: the embedding alone). Off by default: better models at every "
                                     "budget on Davidson, but rounds an order of magnitude slower, and not yet "
                                     "measured on TweetEval; see bench/results/al_levers.md")
    seed: int = 13

    # --- promotion gate ----------------------------------------------------------------------
    gate_min_gain: float = Field(0.0, description="the lower bound of the challenger's macro-F1 gain interval "
                                 "must exceed this (training/gate.py)")
    gate_max_recall_drop: float = Field(0.05, ge=0, le=1, description="largest allowed recall drop on a class the "
                                        "champion detects better than chance (at the drop interval's lower bound)")
    gate_confidence: float = Field(0.95, ge=0.5, lt=1, description="confidence level of the gate's paired "
                                   "bootstrap intervals")
    gate_bootstrap: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples of the frozen eval set "
                                "per gate decision")

    # --- serving -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 9090
    basic_user: str | None = None
    basic_password: SecretStr | None = None
    api_token: SecretStr | None = None
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_text_chars: int = Field(20_000, ge=1)
    batch_size: int = Field(16, ge=1, description="serving: texts per forward pass. Length-sorted batches of 16 "
                            "pad less than 64: on 2 CPU cores /predict with 100 tasks went from 175 to 219 texts/s "
                            "(int8, bench/serve_throughput.py)")
    max_queued_texts: int = Field(200, ge=0, description="admission control for POST /v1/predict: texts that may "
                                  "wait for or be inside the model call at once; a request beyond it is refused at "
                                  "once with 503 and Retry-After (0: unbounded). About one second of model work at "
                                  "the ~200 short texts/s of 2 idle CPU cores (bench/results/serve_throughput.md), so "
                                  "an admitted request is answered within about two; size it to your capacity "
                                  "(bench/results/load.md)")
    max_queued_texts_label_studio: int = Field(1024, ge=0, description="the same bound for Label Studio's POST "
                                               "/predict, a lane of its own that the model serves first, so a "
                                               "flood of /v1/predict cannot starve pre-labels (0: unbounded)")
    webhook_secret: SecretStr | None = Field(None, description="when set, POST /webhook must carry it in the "
                                             "X-Labelloop-Webhook-Secret header (`labelloop connect` makes Label "
                                             "Studio send it); otherwise 401 and nothing is journaled")
    poll_seconds: float = Field(10.0, ge=0, description="how often serving checks whether the champion alias "
                                "moved (0: only at start and on POST /reload)")
    backoff_first_seconds: float = Field(2.0, gt=0, description="first wait before asking an unreachable MLflow "
                                         "again for the champion (or retrying a failed load); doubles per failure")
    backoff_max_seconds: float = Field(300.0, gt=0, description="longest wait between two attempts to reach MLflow "
                                       "(champion) or Label Studio (reconciliation, which starts from "
                                       "reconcile_seconds)")
    quantize: Literal["none", "int8", "auto"] = Field(
        "auto", description="serving: at each champion load, time fp32 torch and the faster candidates (auto: torch "
        "int8, ONNX Runtime fp32 and per-channel int8 on CPU, bf16/fp16 autocast on CUDA; int8: torch int8 only) and "
        "serve the fastest whose top label agrees with fp32 on >= 99% of the frozen eval texts "
        "(serving/quantize.py); none: fp32 torch, nothing tried")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="where training, serving and "
                        "pool scoring run: auto is cuda when torch sees a GPU, else cpu")

    # --- active learning ---------------------------------------------------------------------
    retrain_every: int = Field(100, ge=1, description="retrain after this many new labels")
    query_batch: int = Field(100, ge=1, description="items selected per round (the front of the queue)")
    queue_size: int = Field(1000, ge=1, description="items whose review priority is pushed to Label Studio")
    strategy: str = Field("auto", description="query strategy for the annotators' queue ('auto': margin_kmeans "
                          "for single-label taxonomies, kmeans:mean_binary_entropy for multi-label ones)")
    reconcile_seconds: float = Field(60.0, description="how often the service pulls annotations from Label "
                                     "Studio to catch missed webhooks (0: never)")
    auto_finetune: bool = Field(True, description="queue a fine-tune of base_model on the loop's labels as a "
                                "background job once the labelled set reaches finetune_after_labels, and again "
                                "every finetune_every_labels more (false: only `labelloop loop finetune` does)")
    finetune_after_labels: int = Field(2000, description="labels before the first automatic fine-tune: the measured "
                                       "budget where a fine-tune beats the fast head (bench/results/al_transfer.md); "
                                       "on a few hundred labels it loses to it (bench/results/train_small.md)")
    finetune_every_labels: int = Field(2000, description="more labels between two automatic fine-tunes; each one "
                                       "takes minutes of CPU, growing with the labelled set")

    # --- label quality (monitoring/quality.py) -----------------------------------------------
    honeypot_rate: float = Field(0.02, ge=0, le=0.5, description="share of each pushed batch that is honeypots: "
                                 "frozen-eval items with known labels, for reviewer accuracy against gold")
    overlap_rate: float = Field(0.05, ge=0, le=0.5, description="share of each pushed batch also served to a "
                                "second annotator, for agreement (alpha, kappa, CROWDLAB)")
    audit_rate: float = Field(0.05, ge=0, le=0.5, description="share of each pushed batch drawn uniformly at "
                              "random from the pool and shown without a pre-label: the unbiased audit slice")
    label_error_top_k: int = Field(20, ge=0, description="likely label errors sent back for adjudication per pass")

    # --- drift and alerts (monitoring/drift.py) ----------------------------------------------
    drift_window: Literal["day", "week", "batch"] = Field("day", description="how pool content is windowed")
    drift_p_value: float = Field(0.01, gt=0, lt=1, description="a window drifts when a test's p-value is below this")
    drift_min_items: int = Field(50, ge=10, description="windows with fewer items are reported, never alerted on")
    drift_query_share: float = Field(0.2, ge=0, le=1, description="share of the next query batches drawn from a "
                                     "drifted window, so reviewers see the new content soon")
    drift_reference: str = Field("eval_set", pattern=r"^(eval_set|window:.+)$", description="what windows are "
                                 "compared with: the frozen evaluation set, or 'window:<id>' for a chosen window")
    drift_permutations: int = Field(500, ge=20, le=5000, description="permutations for the MMD test's p-value")
    drift_accuracy_drop: float = Field(0.1, gt=0, le=1, description="alert when a window's label-free accuracy "
                                       "estimate is this far below the reference accuracy")
    alert_url: str | None = Field(None, description="alerts are POSTed here as JSON when raised and cleared")
    drift_every_seconds: float = Field(3600.0, ge=0, description="how often `labelloop serve` evaluates drift and "
                                       "raises or clears alerts (0: only on `labelloop drift` or POST "
                                       "/v1/monitoring/drift/evaluate)")

    # --- severity, escalation, reviewer protection (labelloop/policy.py) ----------------------
    severity: Severity = Field(Severity(), description="the severity scale: [severity] levels, severe_from, "
                               "required, severe_labels, weights")
    escalation: Escalation = Field(Escalation(), description="the escalate checkbox: [escalation] enabled, "
                                   "reasons, require_reason")
    protection: Protection = Field(Protection(), description="[protection] lexicon (masking; null: off), "
                                   "blur_threshold, daily_severe_cap")
    escalation_url: str | None = Field(None, description="each escalation is POSTed here as JSON, once, with an "
                                       "Idempotency-Key header, retried with backoff until a 2xx")
    escalation_retry_seconds: float = Field(2.0, gt=0, description="first retry delay of an undelivered "
                                            "escalation; doubles per failed attempt")
    escalation_retry_max_seconds: float = Field(300.0, gt=0, description="longest delay between two attempts")

    # --- Label Studio ------------------------------------------------------------------------
    ls_url: str = "http://127.0.0.1:8080"
    ls_api_key: SecretStr | None = None
    ls_project_id: int | None = Field(None, description="the project whose queue the loop steers")

    @field_validator("mlruns_dir", "state_dir", "data_dir", "cache_dir")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    @field_validator("taxonomy")
    @classmethod
    def _loadable_taxonomy(cls, v: str) -> str:
        """A broken taxonomy file fails when settings load, naming the line (``taxonomy_setting``).
        ``labelloop.taxonomy`` imports only ``labelloop.policy``, so importing it here makes no cycle."""
        from labelloop.taxonomy import taxonomy_setting

        return taxonomy_setting(v)

    @field_validator("alert_url", "escalation_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        """A typo in the alert URL must fail at start, not at the first alert, which it would then never send."""
        if v is None or not v.strip():
            return None
        parsed = urlsplit(v.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, not {v!r}")
        return v.strip()

    @field_validator("finetune_after_labels", "finetune_every_labels")
    @classmethod
    def _positive_labels(cls, v: int) -> int:
        """A threshold of 0 would fine-tune on every round (and ``every = 0`` never advance): refused when
        settings load, with the way to turn the feature off instead."""
        if v < 1:
            raise ValueError(f"must be a positive number of labels, not {v} (to turn automatic fine-tuning off, "
                             "set auto_finetune = false)")
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str, info: ValidationInfo) -> str:
        """A misspelt strategy fails here, when settings load, instead of at the first round hours later.

        The spec grammar and the names live in ``active_learning.strategies`` (one parser for the service,
        simulations and benchmarks, so they cannot drift apart). It is imported inside the validator, not
        at module level: config belongs to the data layer that every other layer imports, and a module-level
        import would make all of them depend on active learning. ``strategies`` imports nothing from
        labelloop (no cycle) and only numpy at import time, so validating stays cheap. The taxonomy setting
        (validated before this one) says which kind of model the strategy must fit: margin on a multi-label
        taxonomy fails here too."""
        from active_learning.strategies import validate_strategy_spec
        from labelloop.taxonomy import get_taxonomy

        taxonomy = info.data.get("taxonomy")
        return validate_strategy_spec(v, get_taxonomy(taxonomy).multi if taxonomy else None)

    @model_validator(mode="after")
    def _default_cache_dir(self) -> Settings:
        if self.cache_dir is None:
            self.cache_dir = self.state_dir / "cache"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return init_settings, env_settings, dotenv_settings, toml, file_secret_settings

    # --- derived values ----------------------------------------------------------------------
    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.mlruns_dir / 'mlflow.db'}"

    @property
    def resolved_artifact_location(self) -> str:
        return self.artifact_location or (self.mlruns_dir / "artifacts").as_uri()

    @property
    def registered_model_name(self) -> str:
        return self.model_name or f"labelloop-{self.taxonomy_name.replace('_', '-')}"

    @property
    def taxonomy_name(self) -> str:
        """The taxonomy's own name (its file's ``name``), not the path the setting may hold."""
        from labelloop.taxonomy import get_taxonomy

        return get_taxonomy(self.taxonomy).name

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        """A typo'd scheme fails when settings load, not at the first webhook."""
        if v is None or not v.strip():
            return None
        from labelloop.db import postgres_url

        postgres_url(v.strip())
        return v.strip()

    def database(self, store: str) -> Database:
        """Where ``store`` (``journal``, ``jobs``, ``slices``, ...) keeps its tables: its schema in the shared
        PostgreSQL when ``database_url`` is set, else ``state_dir/<store>.sqlite``."""
        from labelloop.db import Database

        return Database.open(self.database_url, self.state_dir / f"{store}.sqlite", store)

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite"

    @property
    def slices_path(self) -> Path:
        return self.state_dir / "slices.sqlite"

    @property
    def escalations_path(self) -> Path:
        return self.state_dir / "escalations.sqlite"

    @property
    def exposure_path(self) -> Path:
        return self.state_dir / "exposure.sqlite"

    @property
    def review_policy(self) -> ReviewPolicy:
        """What the journal reads review marks with (checked against the taxonomy when a journal opens): the
        taxonomy file's [severity]/[escalation] sections when it has them, else these settings."""
        return self.review_controls or ReviewPolicy(severity=self.severity, escalation=self.escalation)

    @property
    def review_controls(self) -> ReviewPolicy | None:
        """The severity and escalation controls a generated Label Studio config shows: the taxonomy file's
        sections, else the settings' when they were set explicitly; None (no such controls) otherwise."""
        from labelloop.taxonomy import get_taxonomy

        policy = get_taxonomy(self.taxonomy).policy
        if policy is None and {"severity", "escalation"} & self.model_fields_set:
            policy = ReviewPolicy(severity=self.severity, escalation=self.escalation)
        return policy

    @property
    def protection_policy(self) -> Protection:
        """Masking, blur and the daily cap: the taxonomy file's [protection] section, else the settings'."""
        from labelloop.taxonomy import get_taxonomy

        return get_taxonomy(self.taxonomy).protection or self.protection

    @property
    def eval_sets_dir(self) -> Path:
        return self.state_dir / "eval_sets"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()
