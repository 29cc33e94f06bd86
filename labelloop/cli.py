"""The ``labelloop`` command line: the one front door for ML engineers and operators."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import functools  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from labelloop.config import Settings, get_settings  # noqa: E402

app = typer.Typer(help="labelloop: ML-assisted labeling and active learning for trust & safety review.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)


class CliError(Exception):
    """An expected failure: printed as one clear line, exit code 2."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can act on (bad input, a server that is down or refuses, a port in use)."""
    import httpx
    from mlflow.exceptions import MlflowException

    from active_learning.labelstudio import LabelStudioError
    from labelloop.data import DataError
    from labelloop.ls_server import LabelStudioServerError
    from labelloop.taxonomy import LabelConfigError
    from training.registry import RegistryError

    return (CliError, DataError, RegistryError, LabelConfigError, LabelStudioError, LabelStudioServerError,
            MlflowException, httpx.HTTPError, OSError, ValueError)


def friendly_errors(fn: Callable) -> Callable:
    """One clear ``error:`` line and exit code 2 for expected failures; a traceback only for bugs
    (or for all failures with ``LABELLOOP_DEBUG=1``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if os.environ.get("LABELLOOP_DEBUG") or not isinstance(e, _expected_errors()):
                raise
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


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
    settings = get_settings()
    return settings.model_copy(update={"taxonomy": taxonomy}) if taxonomy else settings


DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="shared dataset name (davidson, tweeteval_hate, "
                                         "tweeteval_offensive, ethos, sms_spam), a CSV/JSONL/Parquet file, "
                                         "or a Hugging Face dataset id")]
TaxonomyOpt = Annotated[str | None, typer.Option(help="label taxonomy (default: the dataset's, else settings)")]


@app.command()
@friendly_errors
def train(
    dataset: DatasetOpt = "davidson",
    mode: Annotated[str, typer.Option(help="finetune (best quality) or fast (frozen encoder + linear head)")] = (
        "finetune"),
    limit: Annotated[int | None, typer.Option(help="train on a stratified sample of N rows (quick runs)")] = None,
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs (early stopping may stop sooner)")] = 2,
    taxonomy: TaxonomyOpt = None,
    text_column: str = "text",
    label_column: str = "label",
    promote: Annotated[bool, typer.Option(help="run the promotion gate right after training")] = False,
) -> None:
    """Train a classifier, evaluate it on the frozen evaluation set, log it to MLflow and register it
    as the challenger."""
    import pandas as pd

    from labelloop import data
    from training.finetune import FineTuneConfig
    from training.train import train_and_register

    if mode not in ("finetune", "fast"):
        raise CliError(f"--mode must be finetune or fast, not {mode!r}")
    tax_name = taxonomy or data.KNOWN_DATASETS.get(dataset)
    settings = settings_for(tax_name)
    with console.status(f"loading {dataset}"):
        labeled = data.load(dataset, taxonomy=tax_name, text_column=text_column, label_column=label_column,
                            settings=settings)
        settings = settings.model_copy(update={"taxonomy": labeled.taxonomy.name})
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
    config = FineTuneConfig(base_model=settings.base_model, max_length=settings.max_length, epochs=epochs,
                            seed=settings.seed)
    with progress_bars() as progress:
        result = train_and_register(train_frame, val_frame, labeled.taxonomy, mode=mode, settings=settings,
                                    source=labeled.source, eval_frame=splits.test, finetune_config=config,
                                    extra_params={"limit": limit or 0}, progress=progress)
    _print_report(result.report)
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
        labeled = data.load(dataset, taxonomy=settings.taxonomy, settings=settings)
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
) -> None:
    """Serve the champion as a Label Studio ML backend, with webhooks, retrain jobs and the queue loop."""
    import ipaddress

    import uvicorn

    from active_learning.service import Service
    from serving.auth import Credentials

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
    service = Service(settings)
    service.start_background()
    console.print(f"serving {settings.registered_model_name}@champion on http://{settings.host}:{settings.port} "
                  f"(API docs at /docs); Label Studio project: {settings.ls_project_id or 'not configured'}")
    try:
        uvicorn.run(service.app, host=settings.host, port=settings.port, workers=1, log_level="info")
    finally:
        service.close()


loop_app = typer.Typer(help="The active-learning loop against a Label Studio project.", no_args_is_help=True)
app.add_typer(loop_app, name="loop")


def _loop(settings: Settings, project_id: int | None = None):
    from active_learning.labelstudio import LabelStudioClient
    from active_learning.loop import ActiveLearningLoop
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    project_id = project_id or settings.ls_project_id
    if settings.ls_api_key is None or project_id is None:
        raise CliError("set LABELLOOP_LS_API_KEY and LABELLOOP_LS_PROJECT_ID (or pass --project) first")
    client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value())
    journal = Journal(settings.journal_path, get_taxonomy(settings.taxonomy))
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
) -> None:
    """Create (or reuse) the review project, freeze the evaluation set, and import the pool as tasks."""
    from active_learning.labelstudio import LabelStudioClient
    from labelloop import data

    tax_name = taxonomy or data.KNOWN_DATASETS.get(dataset)
    settings = settings_for(tax_name)
    if settings.ls_api_key is None:
        raise CliError("set LABELLOOP_LS_API_KEY (the Label Studio token) first")
    labeled = data.load(dataset, taxonomy=tax_name, settings=settings)
    settings = settings.model_copy(update={"taxonomy": labeled.taxonomy.name})
    splits = data.split(labeled, seed=settings.seed)
    frozen = _registry(settings).freeze_eval_set(splits.test, labeled.source)
    pool = splits.train[~splits.train["text"].isin(set(frozen[1]["text"]))]
    if limit:
        pool = data.stratified_sample(pool, limit, seed=settings.seed)
    client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value())
    project_id = client.ensure_project(title, labeled.taxonomy, description="labelloop integrity review queue")
    client.use_uncertainty_sampling(project_id)
    with console.status(f"importing {len(pool)} tasks into project {project_id}"):
        count = _loop(settings, project_id).import_pool(pool[["id", "text"]])
    console.print(f"project {project_id}: {count} tasks; frozen evaluation set {frozen[0]} ({len(frozen[1])} rows)")
    console.print(f"export LABELLOOP_LS_PROJECT_ID={project_id}")


@loop_app.command("round")
@friendly_errors
def loop_round(project: ProjectOpt = None, taxonomy: TaxonomyOpt = None) -> None:
    """Run one round now: retrain on the journal's labels, gate, and push the new queue."""
    loop = _loop(settings_for(taxonomy), project)
    with console.status("running a round"):
        result = loop.run_round(lambda f, m: console.log(m))
    console.print_json(data=result.to_dict())


@loop_app.command("status")
@friendly_errors
def loop_status(taxonomy: TaxonomyOpt = None) -> None:
    """Labels collected, labels waiting for the next retrain, recent jobs and the stopping signal."""
    from active_learning.jobs import JobRunner, RetrainTrigger
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    settings = settings_for(taxonomy)
    journal = Journal(settings.journal_path, get_taxonomy(settings.taxonomy))
    runner = JobRunner(settings.state_dir / "jobs.sqlite", run_jobs=False)  # the service runs them
    try:
        trigger = RetrainTrigger(journal, runner, settings.retrain_every)
        console.print(f"labels: {len(journal.labels())}; waiting for the next retrain: {trigger.pending_labels()} "
                      f"(retrain every {settings.retrain_every}); journal: {journal.stats()}")
        table = Table(title="recent retrain jobs")
        for col in ("created", "state", "reason", "labels", "macro-F1", "gate", "stopping signal"):
            table.add_column(col)
        for job in runner.list(limit=10):
            r = job.result or {}
            f1 = r.get("macro_f1")
            stopping = r.get("stopping") or {}
            table.add_row(job.created_at[:19], job.state, job.reason, str(r.get("labels", "-")),
                          f"{f1:.4f}" if f1 is not None else "-",
                          ("promoted" if r.get("promoted") else "refused") if r else (job.error or "-"),
                          ("STOP: " if stopping.get("stop") else "") + stopping.get("reason", "-"))
        console.print(table)
    finally:
        runner.close()
        journal.close()


@loop_app.command("export")
@friendly_errors
def loop_export(
    out: Annotated[Path, typer.Argument(help="file to write: .csv, .jsonl or .parquet")],
    project: Annotated[int | None, typer.Option("--project", help="only this Label Studio project")] = None,
    taxonomy: TaxonomyOpt = None,
) -> None:
    """Write the reviewers' labels (one per task, majority vote) to a file that `labelloop train --dataset`
    reads: how an ML engineer fine-tunes on what the loop collected."""
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy

    writers = {".csv": lambda f, p: f.to_csv(p, index=False),
               ".jsonl": lambda f, p: f.to_json(p, orient="records", lines=True, force_ascii=False),
               ".parquet": lambda f, p: f.to_parquet(p, index=False)}
    if out.suffix not in writers:
        raise CliError(f"{out}: unsupported format {out.suffix!r}; use one of {sorted(writers)}")
    settings = settings_for(taxonomy)
    with Journal(settings.journal_path, get_taxonomy(settings.taxonomy)) as journal:
        labels = journal.labels(project)
    if labels.empty:
        raise CliError(f"no labels in the journal {settings.journal_path}"
                       + (f" for project {project}" if project else ""))
    frame = labels[["id", "text", "label", "annotator", "updated_at", "n_annotations", "project_id", "task_id"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writers[out.suffix](frame, tmp)
    tmp.replace(out)  # a reader never sees half a file
    console.print(f"{len(frame)} labels → {out} ({frame['label'].value_counts().to_dict()})")


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
                                            "bald, margin_kmeans, class_balanced[:base], mixed[:base]")] =
        "random,entropy,margin,margin_kmeans",
    seeds: Annotated[int, typer.Option(help="repetitions per strategy (paired by seed)")] = 3,
    budget: Annotated[int, typer.Option(help="labels at the end of each run")] = 2000,
    step: Annotated[int, typer.Option(help="labels per round")] = 100,
    initial: Annotated[int, typer.Option(help="labels before the first model (cold start)")] = 100,
    noise: Annotated[float, typer.Option(help="share of simulated answers flipped to a wrong label")] = 0.0,
    out: Annotated[Path, typer.Option(help="where the curves CSV and PNG go")] = Path("var/simulations"),
) -> None:
    """Replay the loop offline with simulated reviewers; write learning curves (CSV + PNG), log to MLflow."""
    from active_learning.simulate import labels_to_reach, paired_gain
    from active_learning.simulate import simulate as run_simulation

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    if not 0 <= noise < 1:
        raise CliError("--noise must be in [0, 1)")
    with progress_bars() as progress:
        rounds_per_run = (budget - initial) // step + 1

        def on_round(row: dict) -> None:
            key = f"{row['strategy']} seed {row['seed']}"
            progress(key, int((row["n_labels"] - initial) // step + 1), rounds_per_run)

        result = run_simulation(dataset, names, seeds, budget, step, initial, noise, get_settings(),
                                out_dir=out, progress=on_round)
    table = Table(title=f"{result.dataset}: macro-F1 gain over random (paired by seed, mean ± sd)")
    for col in ("strategy", *(f"@{n}" for n in (500, 1000, budget) if n <= budget)):
        table.add_column(col)
    for name in names:
        if name == "random" or "random" not in names:
            continue
        cells = []
        for n in (500, 1000, budget):
            if n > budget:
                continue
            try:
                mean, sd, _ = paired_gain(result.curves, name, n)
                cells.append(f"{mean * 100:+.1f} ± {sd * 100:.1f}")
            except ValueError:
                cells.append("-")
        table.add_row(name, *cells)
    console.print(table)
    best = result.curves["macro_f1"].max()
    console.print(labels_to_reach(result.curves, 0.95 * best).to_string())
    console.print(f"curves: {out / f'al_curves_{result.dataset}.csv'}, {out / f'al_curves_{result.dataset}.png'}")


@app.command()
@friendly_errors
def demo(
    dataset: DatasetOpt = "davidson",
    pool_size: Annotated[int, typer.Option(help="items imported into Label Studio")] = 3000,
    rounds: Annotated[int, typer.Option(help="active-learning rounds after the cold start")] = 3,
    batch: Annotated[int, typer.Option(help="labels per round")] = 100,
    seed_labels: Annotated[int, typer.Option(help="cold-start labels before the first model")] = 100,
    noise: Annotated[float, typer.Option(help="share of simulated answers flipped to a wrong label")] = 0.0,
    short: Annotated[bool, typer.Option(help="small pool, one round, exit when done (for tests)")] = False,
    wait: Annotated[bool, typer.Option(help="keep running until Ctrl-C")] = True,
    mlflow_ui: Annotated[bool, typer.Option(help="start the MLflow UI")] = True,
    label_studio_url: Annotated[str | None, typer.Option(help="use this running Label Studio")] = None,
    label_studio_token: Annotated[str | None, typer.Option(envvar="LABELLOOP_LS_API_KEY")] = None,
    ls_port: int = 8080,
    mlflow_port: int = 5000,
    backend_port: int = 9090,
) -> None:
    """Bring the whole loop up on 127.0.0.1 and turn it with simulated reviewers."""
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
    table = Table(title=f"macro-F1 {report.macro_f1:.4f} · accuracy {report.accuracy:.4f} · ECE {report.ece:.4f}")
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
