"""The ``labelloop`` command line: the one front door for ML engineers and operators."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from labelloop.cli_errors import CliError, err, friendly_errors  # noqa: E402
from labelloop.config import Settings, get_settings  # noqa: E402

app = typer.Typer(help="labelloop: ML-assisted labeling and active learning for trust & safety review.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one rich bar per stage."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def settings_for(taxonomy: str | None) -> Settings:
    from labelloop.taxonomy import taxonomy_setting

    settings = get_settings()
    return settings.model_copy(update={"taxonomy": taxonomy_setting(taxonomy)}) if taxonomy else settings


DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="shared dataset name (davidson, tweeteval_hate, "
                                         "tweeteval_offensive, ethos, sms_spam), a CSV/JSONL/Parquet file, "
                                         "or a Hugging Face dataset id")]
TaxonomyOpt = Annotated[str | None, typer.Option(help="label taxonomy: a built-in name or a taxonomy file "
                                                "(default: the dataset's, else settings)")]
LabelMapOpt = Annotated[str | None, typer.Option(help="source value → taxonomy label: 0=ham,1=spam, or a "
                                                 ".toml/.json/.csv file; with --label-columns, column=label")]
LabelColumnsOpt = Annotated[str | None, typer.Option(help="multi-label: one 0/1 column per label, comma-separated, "
                                                     "or '*' for every taxonomy label that is a column")]
LabelDelimiterOpt = Annotated[str | None, typer.Option(help="multi-label: the label column lists label names "
                                                       "separated by this (default '|')")]
LabelThresholdOpt = Annotated[float | None, typer.Option(help="multi-label: a fractional 0..1 label column "
                                                         "(a share of annotators) counts as the label at this "
                                                         "value or above, e.g. 0.5")]
SepOpt = Annotated[str | None, typer.Option(help="CSV separator (default: sniffed from the header: , ; tab |)")]


def label_spec(label_map: str | None, label_columns: str | None, label_delimiter: str | None,
               label_threshold: float | None, sep: str | None):
    """The ``--label-*`` options as one :class:`labelloop.data.LabelSpec` (checked before anything runs)."""
    from labelloop import data

    columns = tuple(c.strip() for c in label_columns.split(",") if c.strip()) if label_columns else None
    return data.LabelSpec(label_map=data.parse_label_map(label_map), label_columns=columns or None,
                          delimiter=label_delimiter, threshold=label_threshold, sep=sep)


@app.command()
@friendly_errors
def train(
    dataset: DatasetOpt = "davidson",
    mode: Annotated[str, typer.Option(help="finetune (best quality) or fast (frozen encoder + linear head)")] = (
        "finetune"),
    limit: Annotated[int | None, typer.Option(help="train on a stratified sample of N rows (quick runs)")] = None,
    epochs: Annotated[int | None, typer.Option(help="the most fine-tuning epochs; early stopping usually ends "
                                               "sooner (default: training.finetune.FineTuneConfig's)", min=1)] = None,
    min_steps: Annotated[int | None, typer.Option(help="fine-tune at least this many optimiser steps, adding "
                                                  "epochs on small data (default: training.finetune."
                                                  "DEFAULT_MIN_STEPS; 0: off)", min=0)] = None,
    taxonomy: TaxonomyOpt = None,
    text_column: str = "text",
    label_column: str = "label",
    label_map: LabelMapOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_delimiter: LabelDelimiterOpt = None,
    label_threshold: LabelThresholdOpt = None,
    sep: SepOpt = None,
    promote: Annotated[bool, typer.Option(help="run the promotion gate right after training")] = False,
) -> None:
    """Train a classifier, evaluate it on the frozen evaluation set, log it to MLflow and register it
    as the challenger."""
    import pandas as pd

    from labelloop import data
    from training.finetune import DEFAULT_MIN_STEPS, FineTuneConfig, planned_epochs
    from training.train import train_and_register

    if mode not in ("finetune", "fast"):
        raise CliError(f"--mode must be finetune or fast, not {mode!r}")
    tax_name = taxonomy or data.KNOWN_DATASETS.get(dataset)
    settings = settings_for(tax_name)
    spec = label_spec(label_map, label_columns, label_delimiter, label_threshold, sep)
    with console.status(f"loading {dataset}"):
        labeled = data.load(dataset, taxonomy=settings.taxonomy, text_column=text_column, label_column=label_column,
                            settings=settings, label_spec=spec)
        splits = data.split(labeled, seed=settings.seed)
    # Rows no split needs go to training: the test split once an evaluation set is frozen (the gate
    # judges on that), the validation split in fast mode (no early stopping).
    extra = ([splits.test] if _registry(settings).eval_set() is not None else []) + (
        [splits.validation] if mode == "fast" else [])
    train_frame = pd.concat([splits.train, *extra], ignore_index=True)
    val_frame = splits.validation
    if limit:
        train_frame = data.stratified_sample(train_frame, limit, seed=settings.seed)
        val_frame = data.stratified_sample(val_frame, max(limit // 4, 50), seed=settings.seed)
    validating = f", validating on {len(val_frame)}" if mode == "finetune" else ""
    console.print(f"{labeled.source}: {len(labeled)} rows after de-duplication; training on {len(train_frame)}"
                  f"{validating}, taxonomy {labeled.taxonomy.name} {list(labeled.taxonomy.labels)}")
    epochs = FineTuneConfig.epochs if epochs is None else epochs
    config = FineTuneConfig(base_model=settings.base_model, max_length=settings.max_length, epochs=epochs,
                            seed=settings.seed, min_steps=DEFAULT_MIN_STEPS if min_steps is None else min_steps,
                            device=settings.device)
    if mode == "finetune" and planned_epochs(len(train_frame), config) > epochs:
        console.print(f"small training set: up to {planned_epochs(len(train_frame), config)} epochs, to reach "
                      f"{config.min_steps} optimiser steps (early stopping may end sooner after those)")
    with progress_bars() as progress:
        result = train_and_register(train_frame, val_frame, labeled.taxonomy, mode=mode, settings=settings,
                                    source=labeled.source, eval_frame=splits.test, finetune_config=config,
                                    extra_params={"limit": limit or 0}, progress=progress)
    _print_report(result.report)
    if not result.beats_majority:
        err.print(f"[bold yellow]warning:[/] macro-F1 {result.report.macro_f1:.4f} is no better than predicting "
                  f"{result.majority_label!r} for every text ({result.majority_macro_f1:.4f}; gain "
                  f"{result.gain_over_majority}): the model has learned nothing useful. Train on more rows"
                  + (" or use --mode fast." if mode == "finetune" else "."))
    console.print(f"registered [bold]{result.ref.label}[/] as challenger (run {result.run_id}, "
                  f"{result.seconds:.0f} s)")
    if promote:  # this run's version, even if another process registered a challenger meanwhile
        decision = _registry(settings).promote(result.ref.version)
        _print_decision(decision)
        if not decision.promoted:
            raise typer.Exit(1)


@app.command()
@friendly_errors
def evaluate(
    version: Annotated[str, typer.Argument(help="version number or alias")] = "champion",
    dataset: Annotated[str | None, typer.Option(help="evaluate on this dataset's test split instead of the "
                                                "frozen evaluation set")] = None,
    taxonomy: TaxonomyOpt = None,
    text_column: str = "text",
    label_column: str = "label",
    label_map: LabelMapOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_delimiter: LabelDelimiterOpt = None,
    label_threshold: LabelThresholdOpt = None,
    sep: SepOpt = None,
) -> None:
    """Evaluate a registered model (per-class precision/recall/F1, confusion matrix, calibration) and log
    the result to MLflow."""
    import mlflow

    from labelloop import data
    from training.evaluate import evaluate as run_eval

    settings = settings_for(taxonomy or (data.KNOWN_DATASETS.get(dataset) if dataset else None))
    registry = _registry(settings)
    loaded = registry.load(version)
    if dataset:
        labeled = data.load(dataset, taxonomy=settings.taxonomy, text_column=text_column, label_column=label_column,
                            settings=settings, label_spec=label_spec(label_map, label_columns, label_delimiter,
                                                                     label_threshold, sep))
        frame, eval_name = data.split(labeled, seed=settings.seed).test, f"{labeled.source}:test"
    else:
        frozen = registry.eval_set()
        if frozen is None:
            raise CliError("no frozen evaluation set yet; pass --dataset")
        frame, eval_name = frozen[1], f"frozen:{frozen[0]}"
    with console.status(f"evaluating {loaded.ref.label} on {eval_name} ({len(frame)} rows)"):
        report = run_eval(loaded.classifier, frame)
    with mlflow.start_run(experiment_id=registry.experiment_id(), run_name=f"evaluate-{loaded.ref.label}",
                          tags={"labelloop.kind": "evaluation", "model_version": loaded.ref.label,
                                "eval_set": eval_name}):
        mlflow.log_metrics(report.metrics())
        mlflow.log_dict(report.to_dict(), "evaluation/report.json")
    console.print(f"[bold]{loaded.ref.label}[/] on {eval_name}")
    _print_report(report)


@app.command()
@friendly_errors
def promote(
    version: Annotated[int | None, typer.Argument(help="version to promote (default: the challenger)")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="return champion to the previous champion")] = False,
    force: Annotated[bool, typer.Option(help="skip the gate (recorded as forced)")] = False,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Promote the challenger to champion through the gate, or roll back."""
    registry = _registry(settings_for(taxonomy))
    decision = registry.rollback() if rollback else registry.promote(version, force=force)
    _print_decision(decision)
    if not decision.promoted:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def models(taxonomy: TaxonomyOpt = None) -> None:
    """Registered versions with aliases and key metrics, and the promotion history."""
    registry = _registry(settings_for(taxonomy))
    frozen = registry.eval_set()
    eval_id = frozen[0] if frozen else None
    table = Table(title=f"{registry.name} (frozen eval set {eval_id or '-'})")
    for col in ("version", "aliases", "kind", "macro-F1", "ECE", "data snapshot", "created"):
        table.add_column(col)
    for v in registry.versions():
        f1, ece = v.metric(eval_id, "macro_f1"), v.metric(eval_id, "ece")
        table.add_row(f"v{v.version}", ", ".join(v.aliases), v.tags.get("model_kind", ""),
                      f"{f1:.4f}" if f1 is not None else "-", f"{ece:.4f}" if ece is not None else "-",
                      v.tags.get("data_snapshot", ""), v.created.strftime("%Y-%m-%d %H:%M"))
    console.print(table)
    history = Table(title="promotion history")
    for col in ("at", "action", "result", "candidate", "champion before → after", "reason"):
        history.add_column(col)
    for e in registry.history():
        history.add_row(e.at[:19], e.action, "[green]yes[/]" if e.promoted else "[red]refused[/]",
                        f"v{e.candidate}" if e.candidate else "-",
                        f"{_v(e.champion_before)} → {_v(e.champion_after)}", e.reason)
    console.print(history)


@app.command()
@friendly_errors
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: settings, 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: settings, 9090)")] = None,
    taxonomy: TaxonomyOpt = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="allow a non-loopback address without credentials "
                                          "(only behind something that authenticates for you)")] = False,
    mlflow_url: Annotated[str | None, typer.Option(help="MLflow UI that the dashboard links runs to (default: the "
                                                   "tracking server, when it is an http one)")] = None,
) -> None:
    """Serve the champion as a Label Studio ML backend, with webhooks, retrain jobs, the queue loop and the
    PM dashboard (/dashboard)."""
    import ipaddress

    import uvicorn

    from active_learning.service import Service
    from monitoring.app import DriftSchedule, instrument, monitoring_routers
    from serving.auth import Credentials

    # The service retries an unreachable MLflow itself, with capped backoff, and says so in /health; MLflow's
    # own default (7 retries, doubling) would hide an outage inside one call for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    settings = settings_for(taxonomy)
    settings = settings.model_copy(update={k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not (loopback or no_auth or Credentials(settings).enabled):
        raise CliError(f"refusing to serve on {settings.host} without credentials: anyone who can reach it could "
                       "read predictions, post webhooks and reload models. Set LABELLOOP_BASIC_USER and "
                       "LABELLOOP_BASIC_PASSWORD (what Label Studio sends) or LABELLOOP_API_TOKEN, or pass --no-auth")
    if mlflow_url is not None and not mlflow_url.startswith(("http://", "https://")):
        raise CliError(f"--mlflow-url {mlflow_url!r} must be an http:// or https:// URL")
    service = Service(settings, extra_routers=monitoring_routers(mlflow_url))
    alert_store = instrument(service.app)
    service.start_background()
    drift = DriftSchedule(settings)
    drift.start()
    console.print(f"serving {settings.registered_model_name}@champion on http://{settings.host}:{settings.port} "
                  f"(API docs at /docs, dashboard at /dashboard); Label Studio project: "
                  f"{settings.ls_project_id or 'not configured'}")
    try:
        uvicorn.run(service.app, host=settings.host, port=settings.port, workers=1, log_level="info")
    finally:
        drift.close()
        service.close()
        alert_store.close()


def _backend_url(settings: Settings, given: str | None) -> str:
    """Where Label Studio reaches the backend: ``given``, else ``serve``'s own address (a wildcard bind
    address is reached as 127.0.0.1, which only a Label Studio on the same machine can use; an IPv6
    address goes in brackets, or its colons would read as the port)."""
    import httpx

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = given or f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{settings.port}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise CliError(f"--backend-url {url!r} is not a URL: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CliError(f"--backend-url {url!r} must be an http:// or https:// URL with a host")
    return url.rstrip("/")


@app.command()
@friendly_errors
def connect(
    project: Annotated[int | None, typer.Option("--project", help="Label Studio project id (default: settings)")]
        = None,
    backend_url: Annotated[str | None, typer.Option(help="the backend's URL as Label Studio reaches it (default: "
                                                    "http://<host>:<port> from settings)")] = None,
    title: Annotated[str, typer.Option(help="the ML backend's name in Label Studio")] = "labelloop",
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Connect the running backend (`labelloop serve`) to the Label Studio project, with its credentials.

    Registers the ML backend with HTTP Basic auth and keeps exactly one project webhook to <backend>/webhook
    that carries the credentials (and LABELLOOP_WEBHOOK_SECRET, when set). Connecting in Label Studio's UI
    instead makes that webhook without them, so with auth on every annotation event is refused; this command
    also repairs such a webhook in place."""
    from active_learning.labelstudio import LabelStudioClient
    from serving.auth import Credentials

    settings = settings_for(taxonomy)
    project_id = project or settings.ls_project_id
    if settings.ls_api_key is None or project_id is None:
        raise CliError("set LABELLOOP_LS_API_KEY and LABELLOOP_LS_PROJECT_ID (or pass --project) first")
    credentials = Credentials(settings)
    if credentials.token is not None and credentials.basic is None:
        raise CliError("Label Studio can call an ML backend only with HTTP Basic credentials: set "
                       "LABELLOOP_BASIC_USER and LABELLOOP_BASIC_PASSWORD for the backend (an api_token alone "
                       "cannot be sent)")
    url = _backend_url(settings, backend_url)
    basic = (settings.basic_user, settings.basic_password.get_secret_value()) if credentials.basic else None
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value(),
                               mask=settings.protection_policy.mask_text)
    with console.status(f"connecting {url} to project {project_id} (Label Studio calls its /health and /setup)"):
        backend_id = client.connect_backend(project_id, url, title=title, basic_auth=basic, webhook_secret=secret)
        problems = client.connection_problems(project_id, credentials.accepts, url)
    for problem in problems:
        err.print(f"[bold yellow]warning:[/] {escape(problem)}")
    if problems:
        raise typer.Exit(1)
    console.print(f"project {project_id}: ML backend {backend_id} at {url} and one webhook to {url}/webhook, "
                  + ("both with HTTP Basic credentials" if basic else "without credentials (the backend has none)")
                  + (", the webhook with the webhook secret" if secret else ""))


loop_app = typer.Typer(help="The active-learning loop against a Label Studio project.", no_args_is_help=True)
app.add_typer(loop_app, name="loop")

from monitoring.cli import quality_app  # noqa: E402  (monitoring is downstream; the CLI composes it)

app.add_typer(quality_app, name="quality")

from monitoring.drift_cli import drift_app  # noqa: E402  (same: monitoring is composed here)

app.add_typer(drift_app, name="drift")

from labelloop.journal_cli import journal_app  # noqa: E402

app.add_typer(journal_app, name="journal")

from labelloop.taxonomy_cli import taxonomy_app  # noqa: E402  (taxonomy check / show / migrate)

app.add_typer(taxonomy_app, name="taxonomy")

from active_learning.score_cli import score as score_command  # noqa: E402  (pool scoring on Ray)

app.command("score")(score_command)

from monitoring.report import report as report_command  # noqa: E402  (same: the dashboard as a file)

app.command("report")(report_command)


def _loop(settings: Settings, project_id: int | None = None):
    from active_learning.labelstudio import LabelStudioClient
    from active_learning.loop import ActiveLearningLoop
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    project_id = project_id or settings.ls_project_id
    if settings.ls_api_key is None or project_id is None:
        raise CliError("set LABELLOOP_LS_API_KEY and LABELLOOP_LS_PROJECT_ID (or pass --project) first")
    client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value(),
                               mask=settings.protection_policy.mask_text)
    journal = Journal(settings.database("journal"), get_taxonomy(settings.taxonomy), policy=settings.review_policy)
    return ActiveLearningLoop(settings, client, project_id, journal)


ProjectOpt = Annotated[int | None, typer.Option("--project", help="Label Studio project id (default: settings)")]


@loop_app.command("import")
@friendly_errors
def loop_import(
    dataset: DatasetOpt = "davidson",
    title: Annotated[str, typer.Option(help="project title; an existing project with it is reused")] =
        "Integrity review",
    limit: Annotated[int | None, typer.Option(help="import a stratified sample of N items")] = None,
    taxonomy: TaxonomyOpt = None,
    append: Annotated[bool, typer.Option(help="append the dataset's texts to the existing project as a new import "
                                         "batch (any labels dropped; the project keeps its taxonomy and "
                                         "evaluation set), e.g. content from another platform")] = False,
    project: ProjectOpt = None,
    text_column: str = "text",
    label_column: str = "label",
    label_map: LabelMapOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_delimiter: LabelDelimiterOpt = None,
    label_threshold: LabelThresholdOpt = None,
    sep: SepOpt = None,
) -> None:
    """Create (or reuse) the review project, freeze the evaluation set, and import the pool as tasks.

    Every import is one batch: its items carry the source's ``created_at`` when it has one, else the import
    time, so drift is measured per day, week or batch (`labelloop drift`)."""
    from active_learning.labelstudio import LabelStudioClient
    from labelloop import data
    from labelloop.taxonomy import project_label_config

    if append:
        import pandas as pd

        settings = settings_for(taxonomy)
        items = data.load_unlabeled(dataset, text_column=text_column, settings=settings, sep=sep)
        frozen = _registry(settings).eval_set()
        if frozen is not None:  # as on a first import: the gate's items are never queued for labelling
            items = items[~items["text"].isin(data.held_out_texts(frozen[1]["text"]))]
        if limit:
            items = items.sample(min(limit, len(items)), random_state=settings.seed)
        loop = _loop(settings, project)
        try:
            known = loop.pool().drop_duplicates("item_id").set_index("item_id")["text"]
        except FileNotFoundError:
            known = pd.Series(dtype=object)
        # An item id the project already has is mapped to its existing task and not imported again: right
        # for the same text, but a different text under a reused id (a file's own 1, 2, 3...) would be lost.
        ids = items["id"].astype(str)
        seen = ids.isin(known.index)
        clash = ids[seen][known.reindex(ids[seen]).to_numpy() != items["text"][seen].to_numpy()]
        if len(clash):
            raise CliError(f"{len(clash)} item id(s) of {dataset} already name other texts in project "
                           f"{loop.project_id}'s pool, e.g. {clash.head(5).tolist()}: give the batch ids of its own "
                           "(or no id column, for ids derived from the text)")
        with console.status(f"appending {len(items)} tasks to project {loop.project_id}"):
            loop.import_pool(items)
        console.print(f"project {loop.project_id}: {int((~seen).sum())} tasks appended as one import batch"
                      + (f"; {int(seen.sum())} already in the pool were not imported again" if seen.any() else ""))
        return
    tax_name = taxonomy or data.KNOWN_DATASETS.get(dataset)
    settings = settings_for(tax_name)
    if settings.ls_api_key is None:
        raise CliError("set LABELLOOP_LS_API_KEY (the Label Studio token) first")
    labeled = data.load(dataset, taxonomy=settings.taxonomy, text_column=text_column, label_column=label_column,
                        settings=settings, label_spec=label_spec(label_map, label_columns, label_delimiter,
                                                                 label_threshold, sep))
    # a hand-edited config that does not fit the taxonomy fails before anything is frozen or created
    label_config = project_label_config(labeled.taxonomy, settings.label_config_file,
                                        policy=settings.review_controls,
                                        masked=settings.protection_policy.lexicon is not None)
    splits = data.split(labeled, seed=settings.seed)
    frozen = _registry(settings).freeze_eval_set(splits.test, labeled.source)
    pool = splits.train[~splits.train["text"].isin(data.held_out_texts(frozen[1]["text"]))]
    if limit:
        pool = data.stratified_sample(pool, limit, seed=settings.seed)
    client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value(),
                               mask=settings.protection_policy.mask_text)
    project_id = client.ensure_project(title, labeled.taxonomy, description="labelloop integrity review queue",
                                       label_config=label_config)
    client.use_uncertainty_sampling(project_id)
    with console.status(f"importing {len(pool)} tasks into project {project_id}"):
        count = _loop(settings, project_id).import_pool(pool[[c for c in ("id", "text", "created_at") if c in pool]])
    console.print(f"project {project_id}: {count} tasks; frozen evaluation set {frozen[0]} ({len(frozen[1])} rows)")
    console.print(f"export LABELLOOP_LS_PROJECT_ID={project_id}")


@loop_app.command("round")
@friendly_errors
def loop_round(project: ProjectOpt = None, taxonomy: TaxonomyOpt = None) -> None:
    """Run one round now: retrain on the journal's labels, gate, and push the new queue."""
    loop = _loop(settings_for(taxonomy), project)
    with console.status("running a round"):
        result = loop.run_round(lambda f, m: console.log(m))
    if result.cold_start:
        console.print(result.cold_start)
    console.print_json(data=result.to_dict())


@loop_app.command("status")
@friendly_errors
def loop_status(project: ProjectOpt = None, taxonomy: TaxonomyOpt = None) -> None:
    """Labels collected, labels waiting for the next retrain, recent jobs, the stopping signal, and whether
    Label Studio's webhooks can reach the backend."""
    from active_learning.auto_finetune import AutoFinetune, FinetuneSchedule
    from active_learning.jobs import JobRunner, RetrainTrigger
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    settings = settings_for(taxonomy)
    journal = Journal(settings.database("journal"), get_taxonomy(settings.taxonomy))
    runner = JobRunner(settings.database("jobs"), run_jobs=False)  # the service runs them
    try:
        trigger = RetrainTrigger(journal, runner, settings.retrain_every)
        console.print(f"labels: {len(journal.labels())}; waiting for the next retrain: {trigger.pending_labels()} "
                      f"(retrain every {settings.retrain_every}); journal: {journal.stats()}")
        auto = AutoFinetune(runner, FinetuneSchedule(settings.finetune_after_labels, settings.finetune_every_labels)
                            if settings.auto_finetune else None)
        console.print(f"automatic fine-tune: next when the labelled set reaches {auto.next_threshold()} "
                      f"(then every {settings.finetune_every_labels})" if auto.schedule else
                      "automatic fine-tune: off (auto_finetune = false; `labelloop loop finetune` queues one)")
        table = Table(title="recent retrain jobs")
        for col in ("created", "kind", "state", "reason", "progress", "labels", "macro-F1", "gate",
                    "stopping signal"):
            table.add_column(col)
        for job in runner.list(limit=10):
            r = job.result or {}
            f1 = r.get("macro_f1")
            stopping = r.get("stopping") or {}
            table.add_row(job.created_at[:19], job.kind, job.state, job.reason,
                          f"{job.progress:.0%} {job.message}" if job.state == "running" else "-",
                          str(r.get("labels", "-")),
                          f"{f1:.4f}" if f1 is not None else "-",
                          ("promoted" if r.get("promoted") else "refused") if r else (job.error or "-"),
                          ("STOP: " if stopping.get("stop") else "") + stopping.get("reason", "-"))
        console.print(table)
        _print_connection(settings, project or settings.ls_project_id)
    finally:
        runner.close()
        journal.close()


@loop_app.command("finetune")
@friendly_errors
def loop_finetune(
    wait: Annotated[bool, typer.Option(help="follow the job to its end, running it in this process unless a "
                                       "running `labelloop serve` takes it first")] = False,
    reason: Annotated[str, typer.Option(help="why, shown with the job")] = "requested by an ML engineer",
    project: ProjectOpt = None,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Queue a fine-tune of base_model on the loop's labels now, as a background job: what the service does by
    itself once the labelled set reaches finetune_after_labels. It is registered as challenger and gated like
    any retrain; serving swaps to it if it wins."""
    from active_learning.jobs import FINETUNE, JobRunner

    if not reason.strip() or len(reason) > 200:
        raise CliError("--reason must be 1 to 200 characters")
    settings = settings_for(taxonomy)
    submitter = JobRunner(settings.database("jobs"), run_jobs=False)
    try:
        job = submitter.submit(reason, FINETUNE)
    finally:
        submitter.close()
    console.print(f"fine-tune job {job.id} {job.state} ({job.reason}): a running `labelloop serve` takes it (or "
                  f"`--wait` here); follow it with `labelloop loop status` or GET /jobs/{job.id}")
    if not wait:
        return
    loop = _finetune_loop(settings, project)
    worker = JobRunner(settings.database("jobs"), lambda progress: loop.run_finetune(progress).to_dict(),
                       kind=FINETUNE, poll_seconds=1.0)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("fine-tune queued", total=1.0)
            while (job := worker.get(job.id)) is not None and job.state not in ("done", "failed"):
                bar.update(task, completed=job.progress, description=job.message or job.state)
                worker.wait(job.id, 1.0)
    finally:
        worker.close()
        loop.journal.close()
        loop.slices.close()
    if job is None or job.state == "failed":
        raise CliError(f"fine-tune job {job.id if job else '?'} failed: {job.error if job else 'it disappeared'}")
    r = job.result or {}
    console.print(f"fine-tuned {r.get('trained_version')} on {r.get('labels')} labels: macro-F1 "
                  f"{r.get('macro_f1', float('nan')):.4f}; {'promoted' if r.get('promoted') else 'refused'}: "
                  f"{r.get('gate_reason')}")


def _finetune_loop(settings: Settings, project_id: int | None):
    """The loop a fine-tune run here trains with: the project's when Label Studio is configured (its queue is
    refreshed if the fine-tune is promoted), else one over every label in the journal, with no queue to push."""
    from active_learning.loop import ActiveLearningLoop
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    if settings.ls_api_key is not None and (project_id or settings.ls_project_id) is not None:
        return _loop(settings, project_id)
    journal = Journal(settings.database("journal"), get_taxonomy(settings.taxonomy), policy=settings.review_policy)
    return ActiveLearningLoop(settings, None, project_id, journal)


def _print_connection(settings: Settings, project_id: int | None) -> None:
    """Whether Label Studio's calls and annotation events reach the backend, judged with the backend's own
    credentials; a status line, never a failure: status must work while Label Studio is down."""
    from active_learning.labelstudio import LabelStudioClient, LabelStudioError
    from serving.auth import Credentials

    if settings.ls_api_key is None or project_id is None:
        console.print("Label Studio connection: not checked (set LABELLOOP_LS_API_KEY and LABELLOOP_LS_PROJECT_ID)")
        return
    client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value(),
                               mask=settings.protection_policy.mask_text)
    try:
        problems = client.connection_problems(project_id, Credentials(settings).accepts)
    except LabelStudioError as e:
        err.print(f"[bold yellow]warning:[/] could not check the Label Studio connection: {escape(str(e))}")
        return
    for problem in problems:
        err.print(f"[bold yellow]warning:[/] {escape(problem)}")
    if not problems:
        console.print(f"Label Studio connection: project {project_id}'s ML backend and webhook reach the backend")


@loop_app.command("export")
@friendly_errors
def loop_export(
    out: Annotated[Path, typer.Argument(help="file to write: .csv, .jsonl or .parquet")],
    project: Annotated[int | None, typer.Option("--project", help="only this Label Studio project")] = None,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Write the reviewers' labels (one per item, majority vote; honeypots left out, adjudications applied) to a
    file that `labelloop train --dataset` reads: how an ML engineer fine-tunes on what the loop collected."""
    from active_learning.training_labels import training_labels
    from labelloop.journal import Journal
    from labelloop.slices import SliceStore
    from labelloop.taxonomy import get_taxonomy

    writers = {".csv": lambda f, p: f.to_csv(p, index=False),
               ".jsonl": lambda f, p: f.to_json(p, orient="records", lines=True, force_ascii=False),
               ".parquet": lambda f, p: f.to_parquet(p, index=False)}
    if out.suffix not in writers:
        raise CliError(f"{out}: unsupported format {out.suffix!r}; use one of {sorted(writers)}")
    settings = settings_for(taxonomy)
    policy = get_taxonomy(settings.taxonomy)
    with (Journal(settings.database("journal"), policy, policy=settings.review_policy) as journal,
          SliceStore(settings.database("slices")) as slices):
        labels = training_labels(journal, slices, project)
    if policy.multi and out.suffix == ".csv":  # a CSV cell is text: label sets in the loader's "a|b" form
        labels["label"] = labels["label"].map(lambda names: "|".join(names) or (policy.none_label or ""))
    if labels.empty:
        raise CliError(f"no labels in the journal {settings.journal_path}"
                       + (f" for project {project}" if project else ""))
    frame = labels[["id", "text", "label", "annotator", "updated_at", "n_annotations", "project_id", "task_id",
                    "severity", "severity_weight"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writers[out.suffix](frame, tmp)
    tmp.replace(out)  # a reader never sees half a file
    console.print(f"{len(frame)} labels → {out} ({frame['label'].value_counts().to_dict()})")


@loop_app.command("adjudicate")
@friendly_errors
def loop_adjudicate(
    project: ProjectOpt = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="how many likely label errors to send "
                                              "(default: the label_error_top_k setting)")] = None,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Send the likeliest label errors back to Label Studio, at the front of the queue, for another reviewer to
    settle; the settled label replaces the original in training. Running it again sends nothing twice."""
    from monitoring.quality_context import open_context

    if top_k is not None and top_k < 0:
        raise CliError(f"--top-k must be 0 or more, got {top_k}")
    settings = settings_for(taxonomy)
    loop = _loop(settings, project)
    with console.status("ranking likely label errors (out-of-fold, cleanlab)"), \
            open_context(settings, loop.project_id) as context:
        candidates = context.adjudication_candidates(top_k)
    result = loop.adjudicate(candidates)
    console.print(f"{len(result.sent)} sent for adjudication to project {loop.project_id}"
                  + (f": tasks {[item.task_id for item in result.sent]}" if result.sent else "")
                  + (f"; {len(result.skipped)} skipped ({result.skipped})" if result.skipped else ""))


@loop_app.command("reconcile")
@friendly_errors
def loop_reconcile(project: ProjectOpt = None, taxonomy: TaxonomyOpt = None) -> None:
    """Pull every annotation from Label Studio into the journal (catches missed webhooks; idempotent)."""
    from active_learning.reconcile import reconcile

    loop = _loop(settings_for(taxonomy), project)
    report = reconcile(loop.client, loop.project_id, loop.journal)
    console.print_json(data=dict(vars(report)))


@app.command()
@friendly_errors
def simulate(
    dataset: DatasetOpt = "davidson",
    strategies: Annotated[str, typer.Option(help="comma-separated: random, least_confidence, margin, entropy, "
                                            "bald, margin_kmeans, class_balanced[:base], mixed[:base], "
                                            "kmeans:<base>; multi-label: mean_binary_entropy, "
                                            "max_binary_entropy, cardinality (default: random and three "
                                            "uncertainty strategies of the taxonomy's kind)")] = "",
    seeds: Annotated[int, typer.Option(help="repetitions per strategy (paired by seed)")] = 3,
    budget: Annotated[int, typer.Option(help="labels at the end of each run")] = 2000,
    step: Annotated[int, typer.Option(help="labels per round")] = 100,
    initial: Annotated[int, typer.Option(help="labels before the first model (cold start)")] = 100,
    noise: Annotated[float, typer.Option(help="share of simulated answers flipped to a wrong label")] = 0.0,
    out: Annotated[Path, typer.Option(help="directory for al_curves_<dataset name>.csv/.md/.png (the CSV and "
                                      "summary are written as the simulation goes)")] = Path("var/simulations"),
    taxonomy: TaxonomyOpt = None,
    text_column: str = "text",
    label_column: str = "label",
    label_map: LabelMapOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_delimiter: LabelDelimiterOpt = None,
    label_threshold: LabelThresholdOpt = None,
    sep: SepOpt = None,
) -> None:
    """Replay the loop offline with simulated reviewers; write learning curves (CSV, Markdown summary, PNG),
    log to MLflow. Multi-label taxonomies report macro-F1 over labels, micro-F1 and subset accuracy."""
    from active_learning.simulate import gain_table, labels_to_reach
    from active_learning.simulate import simulate as run_simulation

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    if not 0 <= noise < 1:
        raise CliError("--noise must be in [0, 1)")
    load_options = {"text_column": text_column, "label_column": label_column,
                    "label_spec": label_spec(label_map, label_columns, label_delimiter, label_threshold, sep)}
    with progress_bars() as progress:
        rounds_per_run = (budget - initial) // step + 1

        def on_round(row: dict) -> None:
            key = f"{row['strategy']} seed {row['seed']}"
            progress(key, int((row["n_labels"] - initial) // step + 1), rounds_per_run)

        result = run_simulation(dataset, names or None, seeds, budget, step, initial, noise, get_settings(),
                                out_dir=out, progress=on_round, taxonomy=taxonomy, load_options=load_options)
    table = Table(title=f"{result.dataset}: macro-F1 gain over random (paired by seed, mean ± sd)")
    gains = gain_table(result.curves, list(dict.fromkeys(result.curves["strategy"])), budget)
    for col in ("strategy", *gains.columns):
        table.add_column(col)
    for name, cells in gains.iterrows():
        table.add_row(name, *cells)
    console.print(table)
    best = result.curves["macro_f1"].max()
    console.print(labels_to_reach(result.curves, 0.95 * best).to_string())
    console.print("results: " + ", ".join(map(str, result.paths)))


@app.command()
@friendly_errors
def demo(
    dataset: DatasetOpt = "davidson",
    pool_size: Annotated[int, typer.Option(help="items imported into Label Studio")] = 3000,
    rounds: Annotated[int, typer.Option(help="active-learning rounds after the cold start")] = 3,
    batch: Annotated[int, typer.Option(help="labels per round")] = 100,
    seed_labels: Annotated[int, typer.Option(help="cold-start labels before the first model")] = 100,
    noise: Annotated[float, typer.Option(help="extra share of simulated answers made wrong, on top of each "
                                         "reviewer's own accuracy (95 % and 75 %)")] = 0.0,
    short: Annotated[bool, typer.Option(help="small pool, one round, exit when done (for tests)")] = False,
    wait: Annotated[bool, typer.Option(help="keep running until Ctrl-C")] = True,
    mlflow_ui: Annotated[bool, typer.Option(help="start the MLflow UI")] = True,
    label_studio_url: Annotated[str | None, typer.Option(help="use this running Label Studio")] = None,
    label_studio_token: Annotated[str | None, typer.Option(envvar="LABELLOOP_LS_API_KEY")] = None,
    ls_port: int = 8080,
    mlflow_port: int = 5000,
    backend_port: int = 9090,
) -> None:
    """Bring the whole loop up on 127.0.0.1 and turn it with simulated reviewers.

    Two reviewer accounts (95 % and 75 % accurate) work Label Studio's queue; each batch carries 10 % each of
    audit items, honeypots and overlap copies (more than the defaults, so the dashboard's measures fill
    quickly); then one adjudication pass, and a batch of another platform's texts that trips a drift alert."""
    from labelloop.demo import DemoOptions, run

    options = DemoOptions(dataset=dataset, pool_size=pool_size, rounds=rounds, batch=batch, seed_labels=seed_labels,
                          noise=noise, wait=wait, mlflow_ui=mlflow_ui, label_studio_url=label_studio_url,
                          label_studio_token=label_studio_token, ls_port=ls_port, mlflow_port=mlflow_port,
                          backend_port=backend_port)
    if short:
        options.pool_size, options.rounds, options.batch, options.seed_labels = 300, 1, 30, 30
        options.eval_size = 600
        options.wait, options.mlflow_ui = False, False
    summary = run(get_settings(), options)
    console.print_json(data=summary)


@app.command()
def stop() -> None:
    """Stop what `labelloop demo` started (Label Studio, MLflow UI, the backend)."""
    from labelloop.demo import stop as stop_demo

    stopped = stop_demo(get_settings())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
@friendly_errors
def escalations(
    status: Annotated[str | None, typer.Option(help="only open (not yet delivered) or delivered ones")] = None,
    since: Annotated[str | None, typer.Option(help="escalated at or after this time (ISO-8601, UTC if no "
                                              "offset), e.g. 2026-11-30 or 2026-11-30T09:00")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (one object with counts and the list)")] = False,
    deliver: Annotated[bool, typer.Option(help="first POST the due ones to escalation_url (what `labelloop serve` "
                                          "does in the background)")] = False,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """What reviewers escalated, newest first, with whether each reached the escalation receiver."""
    from datetime import datetime

    import httpx

    from labelloop.escalations import REQUEST_TIMEOUT, EscalationOutbox
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    if status not in (None, "open", "delivered"):
        raise CliError(f"--status must be open or delivered, not {status!r}")
    try:
        since_at = datetime.fromisoformat(since) if since else None
    except ValueError:
        raise CliError(f"--since {since!r} is not an ISO-8601 date or time") from None
    settings = settings_for(taxonomy)
    if deliver and not settings.escalation_url:
        raise CliError("--deliver needs escalation_url (LABELLOOP_ESCALATION_URL)")
    with (Journal(settings.database("journal"), get_taxonomy(settings.taxonomy),
                  policy=settings.review_policy) as journal,
          EscalationOutbox(settings.database("escalations")) as outbox):
        outbox.sync(journal)
        if deliver:
            with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                report = outbox.deliver(settings.escalation_url, client,
                                        retry_seconds=settings.escalation_retry_seconds,
                                        retry_max_seconds=settings.escalation_retry_max_seconds)
            err.print(f"delivered {report.delivered}, failed {report.failed}, still open {report.pending}")
        entries = outbox.entries(status, since_at, limit)  # type: ignore[arg-type]
        counts = outbox.counts()
    if as_json:
        from serving.escalations_api import EscalationOut, EscalationsResponse

        body = EscalationsResponse(**counts, escalations=[EscalationOut.of(e) for e in entries])
        console.print_json(body.model_dump_json())
        return
    table = Table(title=f"escalations: {counts['open']} open, {counts['delivered']} delivered")
    for col in ("escalated", "status", "task", "item", "label", "severity", "reason", "reviewer", "attempts",
                "id"):
        table.add_column(col, overflow="fold")
    for e in entries:
        b = e.body
        table.add_row(e.escalated_at[:19], e.status if e.delivered_at is None else f"delivered {e.delivered_at[:19]}",
                      str(b["task_id"]), escape(str(b["item_id"])), escape(str(b["label"] or "-")),
                      b["severity"] or "-", escape(b["reason"] or "-"), str(b["annotator"] or "-"),
                      str(e.attempts) + (f" ({escape(e.last_error)})" if e.last_error and e.delivered_at is None
                                         else ""), e.uid)
    console.print(table)


@app.command("label-configs")
def label_configs() -> None:
    """Regenerate label_studio_config/*.xml from the taxonomy (the model's label list)."""
    from labelloop.taxonomy import write_label_configs

    for path in write_label_configs():
        console.print(f"wrote {path}")


def _registry(settings: Settings):
    from training.registry import Registry

    return Registry(settings)


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "-"


def _print_report(report) -> None:
    table = Table(title=report.headline().replace("   ", " · "))  # multi-label: micro-F1, subset accuracy too
    for col in ("label", "precision", "recall", "F1", "support"):
        table.add_column(col)
    for label, m in report.per_class.items():
        table.add_row(label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(int(m["support"])))
    console.print(table)


def _print_decision(decision) -> None:
    colour = "green" if decision.promoted else "red"
    verb = {"promote": "promoted" if decision.promoted else "refused", "rollback": "rolled back"}[decision.action]
    console.print(f"[bold {colour}]{verb}[/]: {decision.reason}; champion is now {_v(decision.champion_after)}")


if __name__ == "__main__":
    app()
