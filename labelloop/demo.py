"""``make demo``: the whole loop on embedded defaults, on 127.0.0.1, with simulated reviewers.

Starts (or reuses) Label Studio and the MLflow UI, runs the labelloop backend in this process, creates
(or reuses) the review project, imports a pool, and turns the loop a few times: reviewers label what
the queue serves, webhooks land in the journal, each batch triggers a retrain job, the gate promotes
or refuses, serving swaps to the new champion and the queue is re-ranked. Everything it starts is
recorded in ``var/demo/pids.json`` so ``make stop`` can stop it from another terminal.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import uvicorn
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from active_learning.labelstudio import LabelStudioClient
from active_learning.service import Service
from labelloop import data
from labelloop.config import Settings
from labelloop.ls_server import LabelStudioServer
from labelloop.taxonomy import FROM_NAME, TO_NAME
from training.registry import CHAMPION, Registry

console = Console()
PROJECT_TITLE = "labelloop integrity review (demo)"


def project_title(taxonomy: str) -> str:
    """One demo project per taxonomy: a project's label config is fixed, so `--dataset ethos` after a
    Davidson run gets a project of its own instead of a label-config clash."""
    return PROJECT_TITLE if taxonomy == "hate_offensive" else f"{PROJECT_TITLE}: {taxonomy}"


@dataclass
class DemoOptions:
    dataset: str = "davidson"
    pool_size: int = 3000
    eval_size: int | None = None  # None: the whole test split
    seed_labels: int = 100
    rounds: int = 3
    batch: int = 100
    noise: float = 0.0
    ls_port: int = 8080
    mlflow_port: int = 5000
    backend_port: int = 9090
    mlflow_ui: bool = True
    wait: bool = True
    label_studio_url: str | None = None  # use a running Label Studio instead of starting one
    label_studio_token: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def demo_dir(settings: Settings) -> Path:
    return settings.state_dir / "demo"


def _private(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    path.chmod(0o600)


def _backend_credentials(settings: Settings) -> tuple[str, str]:
    path = demo_dir(settings) / "backend-credentials.json"
    if not path.exists():
        _private(path, {"user": "labelstudio", "password": secrets.token_urlsafe(18)})
    stored = json.loads(path.read_text())
    return stored["user"], stored["password"]


def _record_pids(settings: Settings, pids: dict[str, int]) -> None:
    _private(demo_dir(settings) / "pids.json", pids)


def stop(settings: Settings) -> list[str]:
    """Stop what a demo started (``make stop``): each recorded process group, politely then firmly."""
    path = demo_dir(settings) / "pids.json"
    if not path.exists():
        return []
    stopped = []
    for name, pid in json.loads(path.read_text()).items():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig) if name != "demo" else os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(3 if sig == signal.SIGTERM else 0)
        stopped.append(f"{name} ({pid})")
    path.unlink(missing_ok=True)
    return stopped


def _start_mlflow_ui(settings: Settings, port: int) -> subprocess.Popen | None:
    if _answers(f"http://127.0.0.1:{port}/health"):
        console.print(f"MLflow UI already running on port {port}: reusing it")
        return None
    log = open(demo_dir(settings) / "mlflow-ui.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", settings.resolved_tracking_uri,
         "--default-artifact-root", settings.resolved_artifact_location],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _serve_in_thread(service: Service, settings: Settings) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=settings.port, log_level="warning"))
    threading.Thread(target=server.run, name="labelloop-backend", daemon=True).start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the labelloop backend did not start on port {settings.port}")
        time.sleep(0.2)
    return server


class Reviewers:
    """Simulated reviewers: they take tasks as Label Studio serves them and answer with the gold label,
    flipping a share ``noise`` to another label, as tired humans do."""

    def __init__(self, client: LabelStudioClient, project_id: int, gold: dict[str, str], labels: tuple[str, ...],
                 noise: float, seed: int):
        self.client, self.project_id, self.gold, self.labels = client, project_id, gold, labels
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def _answer(self, item_id: str) -> str:
        label = self.gold[item_id]
        if self.rng.random() < self.noise:
            label = str(self.rng.choice([x for x in self.labels if x != label]))
        return label

    def label_tasks(self, tasks: pd.DataFrame) -> int:
        for task_id, item_id in zip(tasks["task_id"], tasks["item_id"], strict=True):
            self.client.create_annotation(int(task_id), self._answer(str(item_id)), FROM_NAME, TO_NAME, lead_time=4.2)
        return len(tasks)

    def label_queue(self, n: int) -> list[int]:
        """Work through the queue as an annotator would: ask Label Studio for the next task, label it."""
        done = []
        for _ in range(n):
            task = self.client.next_task(self.project_id)
            if task is None:
                break
            self.client.create_annotation(task["id"], self._answer(str(task["data"]["item_id"])), FROM_NAME, TO_NAME,
                                          lead_time=4.2)
            done.append(task["id"])
        return done


def run(settings: Settings, options: DemoOptions) -> dict:
    """Bring the loop up and turn it; returns a summary (also printed)."""
    demo_dir(settings).mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {"demo": os.getpid()}
    user, password = _backend_credentials(settings)

    # 1. Label Studio -----------------------------------------------------------------------------
    ls_server = None
    if options.label_studio_url:
        ls_url, token = options.label_studio_url, options.label_studio_token or ""
    else:
        ls_server = LabelStudioServer(demo_dir(settings) / "label-studio", port=options.ls_port)
        ls_url, token = ls_server.url, ls_server.api_key
        if ls_server.is_up():
            console.print(f"Label Studio already running at {ls_url}: reusing it")
        else:
            with console.status(f"starting Label Studio on {ls_url} (first start runs migrations, ~1 min)"):
                ls_server.start(timeout=420)
            pids["label-studio"] = ls_server.pid
    client = LabelStudioClient(ls_url, token)

    # 2. MLflow UI --------------------------------------------------------------------------------
    mlflow_proc = _start_mlflow_ui(settings, options.mlflow_port) if options.mlflow_ui else None
    if mlflow_proc:
        pids["mlflow-ui"] = mlflow_proc.pid
    _record_pids(settings, pids)

    # 3. Data, evaluation set, project, pool --------------------------------------------------------
    with console.status(f"loading {options.dataset}"):
        labeled = data.load(options.dataset, settings=settings)
        settings = settings.model_copy(update={"taxonomy": labeled.taxonomy.name})
        splits = data.split(labeled, seed=settings.seed)
    registry = Registry(settings)
    test = splits.test if options.eval_size is None else data.stratified_sample(splits.test, options.eval_size,
                                                                                  seed=settings.seed)
    eval_id, eval_frame = registry.freeze_eval_set(test, labeled.source)
    pool = splits.train[~splits.train["text"].isin(set(eval_frame["text"]))]
    pool = data.stratified_sample(pool, options.pool_size, seed=settings.seed)
    # every labeled row, not just this run's sample: a re-run with another --pool-size serves older tasks too
    gold = dict(zip(labeled.frame["id"].astype(str), labeled.frame["label"], strict=True))
    project_id = client.ensure_project(project_title(labeled.taxonomy.name), labeled.taxonomy,
                                       description="Integrity review queue steered by labelloop active learning")
    client.use_uncertainty_sampling(project_id)
    settings = settings.model_copy(update={
        "ls_url": ls_url, "ls_api_key": SecretStr(token), "ls_project_id": project_id, "port": options.backend_port,
        "basic_user": user, "basic_password": SecretStr(password), "retrain_every": options.batch,
        "query_batch": options.batch, "poll_seconds": 5.0, "reconcile_seconds": 0})

    # 4. The labelloop backend, connected to the project -------------------------------------------
    service = Service(settings, client)
    with console.status(f"importing {len(pool)} tasks into project {project_id} and embedding the pool"):
        service.loop.import_pool(pool[["id", "text"]])
        service.loop.cache.get(service.loop.pool()["text"].tolist())
    backend = _serve_in_thread(service, settings)
    backend_url = f"http://127.0.0.1:{settings.port}"
    client.connect_backend(project_id, backend_url, basic_auth=(user, password))
    reviewers = Reviewers(client, project_id, gold, labeled.taxonomy.labels, options.noise, settings.seed)

    # 5. Turn the loop ------------------------------------------------------------------------------
    table = Table(title="active-learning rounds")
    for col in ("round", "labels", "trained", "macro-F1 (frozen eval)", "gate", "champion", "queue head"):
        table.add_column(col)
    try:
        if registry.alias_version(CHAMPION) is None:
            since = _now()
            seeds = service.loop.cold_start(options.seed_labels)
            with console.status(f"cold start: reviewers label {len(seeds)} diverse items"):
                reviewers.label_tasks(seeds)
            _finish_round(service, table, "seed", since)
        for r in range(1, options.rounds + 1):
            since = _now()
            with console.status(f"round {r}: reviewers label the next {options.batch} tasks Label Studio serves"):
                reviewers.label_queue(options.batch)
            _finish_round(service, table, str(r), since)
        console.print(table)
        summary = _summary(settings, client, project_id, registry, eval_id)
        _print_urls(settings, ls_url, options, project_id, ls_server, user, password)
        if options.wait:
            console.print("[bold]running until Ctrl-C[/] (or `make stop` from another terminal)")
            _wait_for_stop_signal()
        return summary
    finally:
        backend.should_exit = True
        service.close()
        if mlflow_proc:
            os.killpg(mlflow_proc.pid, signal.SIGTERM)
        if ls_server:
            ls_server.stop()  # a server this run started (a reused one keeps running)
        (demo_dir(settings) / "pids.json").unlink(missing_ok=True)


def _wait_for_stop_signal() -> None:
    """Until Ctrl-C or `make stop` (SIGTERM). Python runs signal handlers in the main thread, so the
    handler sets an event and the caller's ``finally`` stops everything this run started."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _finish_round(service: Service, table: Table, name: str, since: str) -> None:
    """Wait for the retrain job this round's webhooks triggered (reconciling first, in case a webhook
    was missed; submitting one if none was triggered) and add its outcome to the table."""
    service.reconcile_once()
    jobs = [j for j in service.runner.list(limit=5) if j.created_at >= since]
    if not jobs:
        jobs = [service.runner.submit(f"demo round {name}")]
    job = service.runner.wait(jobs[0].id, timeout=900)
    if job is None or job.state != "done":
        table.add_row(name, "-", "-", "-", f"[red]job failed: {job.error if job else 'missing'}[/]", "-", "-")
        return
    result = job.result or {}
    queue = result.get("queue") or {}
    f1 = result.get("macro_f1")
    table.add_row(name, str(result["labels"]), result.get("trained_version") or "-",
                  f"{f1:.3f}" if f1 is not None else "-",
                  "[green]promoted[/]" if result["promoted"] else f"[yellow]refused[/]: {result['gate_reason'][:60]}",
                  result.get("champion") or "-", ", ".join(map(str, queue.get("queued_task_ids", [])[:3])))


def _summary(settings: Settings, client: LabelStudioClient, project_id: int, registry: Registry, eval_id: str) -> dict:
    predictions = client.predictions(project_id)
    annotations = sum(1 for _ in client.annotations(project_id))
    champion = registry.alias_version(CHAMPION)
    return {"project_id": project_id, "predictions": len(predictions), "annotations": annotations,
            "champion": f"{registry.name}:v{champion}" if champion else None, "eval_set": eval_id}


def _print_urls(settings: Settings, ls_url: str, options: DemoOptions, project_id: int,
                ls_server: LabelStudioServer | None, user: str, password: str) -> None:
    console.rule("labelloop is up")
    console.print(f"Label Studio project   {ls_url}/projects/{project_id}/data")
    if ls_server:
        creds = ls_server.credentials()
        console.print(f"  log in as            {creds.username} / {creds.password}")
    if options.mlflow_ui:
        console.print(f"MLflow                 http://127.0.0.1:{options.mlflow_port}")
    console.print(f"labelloop API docs     http://127.0.0.1:{settings.port}/docs  (basic auth {user} / {password})")
    console.print(f"credentials are kept in {demo_dir(settings)} (git-ignored)")
