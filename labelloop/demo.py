"""``make demo``: the whole loop on embedded defaults, on 127.0.0.1, with simulated reviewers.

Starts (or reuses) Label Studio and the MLflow UI, runs the labelloop backend in this process, creates
(or reuses) the review project, imports a pool, and turns the loop a few times: reviewers label what
the queue serves, webhooks land in the journal, each batch triggers a retrain job, the gate promotes
or refuses, serving swaps to the new champion and the queue is re-ranked. Everything it starts is
recorded in ``var/demo/pids.json`` so ``make stop`` can stop it from another terminal.

The simulated reviewers feed every section of the PM dashboard: two Label Studio accounts of different
accuracy (made through the invite link, kept in ``var/demo/reviewers.json``) work the queue through
``/next`` with sessions of their own, so overlap copies get two annotators, honeypots are answered (some
wrongly), audit items are labelled blind, and each label carries a ``lead_time``. The demo serves more
measurement items than the defaults (:data:`DEMO_RATES`) so that a few rounds give each measure a number.
After the rounds it runs one adjudication pass, then appends a batch of another platform's texts (ETHOS
for a Davidson demo) with the same code as ``labelloop loop import --append`` and evaluates drift per
import batch, which raises a drift alert on that batch.
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
from collections.abc import Iterator
from contextlib import contextmanager
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
from rich.text import Text

from active_learning.labelstudio import LabelStudioClient
from active_learning.service import Service
from labelloop import data
from labelloop.config import Settings
from labelloop.ls_accounts import ReviewerAccount, sign_up_reviewer, still_valid
from labelloop.ls_server import LabelStudioServer
from labelloop.policy import (
    ESCALATE_CONTROL,
    REASON_CONTROL,
    SEVERITY_CONTROL,
    Escalation,
    Protection,
    Severity,
)
from labelloop.taxonomy import ESCALATE_CHOICE, FROM_NAME, TO_NAME, project_label_config
from monitoring.app import instrument, monitoring_routers
from monitoring.drift import run_drift_evaluation
from monitoring.quality_context import open_context
from training.registry import CHAMPION, Registry

console = Console(soft_wrap=True)  # a URL or password split over two lines cannot be copied from a log
PROJECT_TITLE = "labelloop integrity review (demo)"


#: the review policy the demo project runs under: a severity scale, escalation reasons and a daily cap
DEMO_POLICY = {
    "severity": Severity(severe_labels=("hate",)),
    "escalation": Escalation(reasons=("credible threat", "child safety", "self-harm")),
    "protection": Protection(daily_severe_cap=20),
}


class EscalationReceiver:
    """A stand-in for a team's incident tool: a local HTTP endpoint that logs every escalation POSTed to it,
    so the demo can show one arriving (once) from the durable outbox."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    received.append({"key": self.headers.get("Idempotency-Key"), **json.loads(body)})
                except ValueError:
                    received.append({"key": self.headers.get("Idempotency-Key"), "raw": body[:200].decode("latin-1")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/escalations"
        threading.Thread(target=self.server.serve_forever, name="escalation-receiver", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def project_title(taxonomy: str) -> str:
    """One demo project per taxonomy: a project's label config is fixed, so `--dataset ethos` after a
    Davidson run gets a project of its own instead of a label-config clash."""
    return PROJECT_TITLE if taxonomy == "hate_offensive" else f"{PROJECT_TITLE}: {taxonomy}"


@dataclass(frozen=True)
class ReviewerProfile:
    """One simulated reviewer: how often they are right, and how long an item takes them (median seconds,
    with a suggestion pre-selected; labelling blind takes longer)."""

    name: str
    accuracy: float
    seconds: float


#: a careful reviewer and a hasty one, so reviewer accuracy on gold and agreement have something to show
DEMO_REVIEWERS = (ReviewerProfile("careful", 0.95, 12.0), ReviewerProfile("hasty", 0.75, 5.0))
#: measurement items per pushed batch: above the defaults (5 %, 2 %, 5 %) so that a demo's few hundred
#: labels give every label-accuracy measure a few items (gold, agreement, blind audit)
DEMO_RATES = {"audit_rate": 0.1, "honeypot_rate": 0.1, "overlap_rate": 0.1}
#: another platform's texts for the drift batch, per demo dataset (the default: ETHOS)
DRIFT_SOURCES = {"ethos": "tweeteval_hate"}


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
    reviewers: tuple[ReviewerProfile, ...] = DEMO_REVIEWERS
    adjudicate: int = 5  # likely label errors sent back for adjudication after the rounds (0: none)
    drift_items: int = 150  # texts of another platform appended as one import batch (0: none)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Steps:
    """How the demo shows progress in a terminal: a spinner while a step runs, a line when a round ends,
    the rounds table at the terminal's width."""

    def __init__(self, console: Console):
        self.console = console

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        with self.console.status(message):
            yield

    def log(self, message: str) -> None:
        self.console.print(message)

    def print_table(self, table: Table) -> None:
        self.console.print(table, soft_wrap=False)  # the console soft-wraps text; a table's title is centred


class LogSteps(Steps):
    """Outside a terminal (CI, nohup, a pipe) a spinner draws nothing, and the demo was silent for minutes,
    then printed its table squeezed to the 80 columns rich assumes without a terminal. Here every step is
    a timestamped line when it starts, every :attr:`heartbeat_seconds` while it runs (a first Label Studio
    start or a retrain can take minutes) and when it ends, written as it happens; and the table gets the
    width it needs (up to :attr:`table_width`): a log file has no width to respect."""

    table_width = 220
    heartbeat_seconds = 30.0

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        self.log(f"{message} …")
        started = time.monotonic()
        finished = threading.Event()

        def heartbeat() -> None:
            while not finished.wait(self.heartbeat_seconds):
                self.log(f"still running after {time.monotonic() - started:.0f} s: {message}")

        beat = threading.Thread(target=heartbeat, name="demo-heartbeat", daemon=True)
        beat.start()
        outcome = "failed after"
        try:
            yield
            outcome = "done in"
        finally:
            finished.set()
            beat.join()
            self.log(f"{outcome} {time.monotonic() - started:.1f} s: {message}")

    def log(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.console.print(f"{stamp} {Text.from_markup(message).plain}", markup=False, highlight=False,
                           soft_wrap=True)

    def print_table(self, table: Table) -> None:
        # rich never prints wider than its console, so a console as wide as the table may need
        wide = Console(file=self.console.file, width=max(self.console.width, self.table_width), no_color=True,
                       highlight=False)
        wide.print(table)


def steps_for(output: Console) -> Steps:
    return Steps(output) if output.is_terminal else LogSteps(output)


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


#: the mistakes people make on these taxonomies: a neighbouring class, not a random one
CONFUSIONS: dict[str, tuple[str, ...]] = {
    "hate": ("offensive", "not_hate"), "offensive": ("neither", "hate", "not_offensive"),
    "neither": ("offensive",), "not_hate": ("hate",), "not_offensive": ("offensive",), "spam": ("ham",),
    "ham": ("spam",)}
#: an imported platform's labels in a demo taxonomy's terms (ETHOS and TweetEval say hate / not_hate)
CROSS_LABELS = {"not_hate": "neither", "not_offensive": "neither", "hate": "hate", "offensive": "offensive"}


def simulated_answer(truth: str | None, labels: tuple[str, ...], suggestion: str | None, accuracy: float,
                     rng: np.random.Generator) -> str:
    """A reviewer's label. Right with probability ``accuracy``; otherwise they take the model's word when it
    suggested something else (automation bias), or slip to a neighbouring class. An item whose answer the
    demo does not know gets the suggestion, else the last class (the taxonomy's "none of these")."""
    if truth is None:
        return suggestion or labels[-1]
    if rng.random() < accuracy:
        return truth
    if suggestion is not None and suggestion != truth:
        return suggestion
    near = [c for c in CONFUSIONS.get(truth, ()) if c in labels] or [c for c in labels if c != truth]
    return str(rng.choice(near))


def lead_time(profile: ReviewerProfile, suggested: bool, rng: np.random.Generator) -> float:
    """Seconds an item was open: log-normal around the reviewer's pace, half again as long without a
    pre-selected suggestion."""
    return round(float(profile.seconds * (1.0 if suggested else 1.5) * rng.lognormal(0.0, 0.4)), 1)


def shown_suggestion(task: dict, model_version: str | None) -> tuple[int | None, str | None]:
    """``(prediction id, label)`` of the pre-label Label Studio shows on ``task``: its prediction of the
    project's current model version, when that one selects a choice (audit items carry none)."""
    for prediction in task.get("predictions") or []:
        if prediction.get("model_version") == model_version and prediction.get("result"):
            return int(prediction["id"]), prediction["result"][0]["value"]["choices"][0]
    return None, None


@dataclass
class Reviewer:
    profile: ReviewerProfile
    account: ReviewerAccount
    client: LabelStudioClient


class Reviewers:
    """Simulated reviewers, each a Label Studio account working the queue with a session of its own. They
    answer from the gold labels with their own accuracy (:func:`simulated_answer`) and pace."""

    def __init__(self, members: list[Reviewer], project_id: int, gold: dict[str, str], labels: tuple[str, ...],
                 noise: float, seed: int):
        self.members, self.project_id, self.gold, self.labels = members, project_id, gold, labels
        self.noise = noise  # on top of each reviewer's own errors
        self.rng = np.random.default_rng(seed)

    def _annotate(self, reviewer: Reviewer, task_id: int, item_id: str, suggestion: tuple[int | None, str | None]
                  ) -> None:
        prediction_id, suggested = suggestion
        label = simulated_answer(self.gold.get(item_id), self.labels, suggested,
                                 reviewer.profile.accuracy * (1 - self.noise), self.rng)
        extra = {"parent_prediction": prediction_id} if prediction_id is not None else {}
        reviewer.client.create_annotation(task_id, label, FROM_NAME, TO_NAME,
                                          lead_time=lead_time(reviewer.profile, suggested is not None, self.rng),
                                          **extra)

    def label_tasks(self, tasks: pd.DataFrame) -> int:
        """Label the given tasks (the cold start: no pre-labels), shared out in turn."""
        for n, (task_id, item_id) in enumerate(zip(tasks["task_id"], tasks["item_id"], strict=True)):
            self._annotate(self.members[n % len(self.members)], int(task_id), str(item_id), (None, None))
        return len(tasks)

    def label_queue(self, n: int, model_version: str | None) -> list[int]:
        """Work through the queue as people at work at the same time do: each reviewer asks Label Studio for
        their next task (a task one of them holds is not served to another), then each labels theirs.
        ``model_version``: the project's current one, whose pre-labels the labeling screen shows."""
        done: list[int] = []
        while len(done) < n:
            fetched = [(r, r.client.next_task(self.project_id)) for r in self.members]
            fetched = [(r, task) for r, task in fetched if task is not None][: n - len(done)]
            if not fetched:
                break
            for reviewer, task in fetched:
                self._annotate(reviewer, task["id"], str(task["data"]["item_id"]),
                               shown_suggestion(task, model_version))
                done.append(task["id"])
        return done


def reviewer_accounts(settings: Settings, client: LabelStudioClient, ls_url: str,
                      profiles: tuple[ReviewerProfile, ...]) -> list[Reviewer]:
    """One Label Studio account per profile, reused across runs against the same server (kept, with their
    passwords, in ``var/demo/reviewers.json``, git-ignored)."""
    path = demo_dir(settings) / "reviewers.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    known = {name: ReviewerAccount(**a) for name, a in stored.get(ls_url, {}).items()}
    members = []
    for profile in profiles:
        account = known.get(profile.name)
        if account is None or not still_valid(ls_url, account):
            account = sign_up_reviewer(client.sdk, f"reviewer-{profile.name}", base_url=ls_url)
            known[profile.name] = account
        members.append(Reviewer(profile, account, LabelStudioClient(ls_url, account.token)))
    stored[ls_url] = {name: a.to_dict() for name, a in known.items()}
    _private(path, stored)
    return members


def drift_source(dataset: str) -> str:
    return DRIFT_SOURCES.get(dataset, "ethos")


def other_platform_batch(source: str, n: int, labels: tuple[str, ...], seed: int, settings: Settings
                         ) -> tuple[pd.DataFrame, dict[str, str]]:
    """``n`` texts of another platform, read as ``labelloop loop import --append`` reads them (labels
    dropped), and their labels in the demo's taxonomy where one maps, for the simulated reviewers."""
    items = data.load_unlabeled(source, settings=settings)
    items = items.sample(min(n, len(items)), random_state=seed)
    labeled = data.load(source, settings=settings).frame
    mapped = labeled["label"].map(lambda x: x if x in labels else CROSS_LABELS.get(x))
    gold = {i: g for i, g in zip(labeled["id"].astype(str), mapped, strict=True) if g in labels}
    return items, gold


def run(settings: Settings, options: DemoOptions) -> dict:
    """Bring the loop up and turn it; returns a summary (also printed)."""
    demo_dir(settings).mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {"demo": os.getpid()}
    user, password = _backend_credentials(settings)
    steps = steps_for(console)

    # 1. Label Studio -----------------------------------------------------------------------------
    ls_server = None
    if options.label_studio_url:
        ls_url, token = options.label_studio_url, options.label_studio_token or ""
    else:
        ls_server = LabelStudioServer(demo_dir(settings) / "label-studio", port=options.ls_port)
        ls_url, token = ls_server.url, ls_server.api_key
        if ls_server.is_up():
            steps.log(f"Label Studio already running at {ls_url}: reusing it")
        else:
            with steps.step(f"starting Label Studio on {ls_url} (first start runs migrations, ~1 min)"):
                ls_server.start(timeout=420)
            pids["label-studio"] = ls_server.pid
    client = LabelStudioClient(ls_url, token)

    # 2. MLflow UI --------------------------------------------------------------------------------
    mlflow_proc = _start_mlflow_ui(settings, options.mlflow_port) if options.mlflow_ui else None
    if mlflow_proc:
        pids["mlflow-ui"] = mlflow_proc.pid
        steps.log(f"MLflow UI starting on http://127.0.0.1:{options.mlflow_port} (pid {mlflow_proc.pid})")
    _record_pids(settings, pids)

    # 3. Data, evaluation set, project, pool --------------------------------------------------------
    with steps.step(f"loading {options.dataset}"):
        labeled = data.load(options.dataset, settings=settings)
        settings = settings.model_copy(update={"taxonomy": labeled.taxonomy.name})
        splits = data.split(labeled, seed=settings.seed)
    registry = Registry(settings)
    test = splits.test if options.eval_size is None else data.stratified_sample(splits.test, options.eval_size,
                                                                                  seed=settings.seed)
    eval_id, eval_frame = registry.freeze_eval_set(test, labeled.source)
    pool = splits.train[~splits.train["text"].isin(data.held_out_texts(eval_frame["text"]))]
    pool = data.stratified_sample(pool, options.pool_size, seed=settings.seed)
    # every labeled row, not just this run's sample: a re-run with another --pool-size serves older tasks too
    gold = dict(zip(labeled.frame["id"].astype(str), labeled.frame["label"], strict=True))
    other_platform, other_gold = (other_platform_batch(drift_source(options.dataset), options.drift_items,
                                                       labeled.taxonomy.labels, settings.seed, settings)
                                  if options.drift_items else (None, {}))
    gold.update(other_gold)  # a re-run's queue draws a share from the drifted batch: reviewers answer those too
    receiver = EscalationReceiver()
    settings = settings.model_copy(update={**DEMO_POLICY, "escalation_url": receiver.url})
    label_config = project_label_config(labeled.taxonomy, policy=settings.review_controls, masked=True)
    project_id = client.ensure_project(project_title(labeled.taxonomy.name), labeled.taxonomy,
                                       description="Integrity review queue steered by labelloop active learning",
                                       label_config=label_config)
    client.sdk.projects.update(project_id, label_config=label_config)  # a reused project gets the review controls
    client.mask = settings.protection_policy.mask_text
    client.use_uncertainty_sampling(project_id)
    settings = settings.model_copy(update={
        "ls_url": ls_url, "ls_api_key": SecretStr(token), "ls_project_id": project_id, "port": options.backend_port,
        "basic_user": user, "basic_password": SecretStr(password), "retrain_every": options.batch,
        "query_batch": options.batch, "poll_seconds": 5.0, "reconcile_seconds": 0, **DEMO_RATES,
        "drift_window": "batch"})

    # 4. The labelloop backend, connected to the project -------------------------------------------
    mlflow_url = f"http://127.0.0.1:{options.mlflow_port}" if options.mlflow_ui else None
    service = Service(settings, client, extra_routers=monitoring_routers(mlflow_url))
    alert_store = instrument(service.app)
    service.delivery.start()  # escalations reach the receiver as in `labelloop serve`, within seconds
    with steps.step(f"importing {len(pool)} tasks into project {project_id} and embedding the pool"):
        service.loop.import_pool(pool[["id", "text"]])
        service.loop.cache.get(service.loop.pool()["text"].tolist())
    _show_masking(pool["text"].tolist(), settings, steps)
    backend = _serve_in_thread(service, settings)
    backend_url = f"http://127.0.0.1:{settings.port}"
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    client.connect_backend(project_id, backend_url, basic_auth=(user, password), webhook_secret=secret)
    with steps.step(f"signing up {len(options.reviewers)} reviewer accounts in Label Studio"):
        members = reviewer_accounts(settings, client, ls_url, options.reviewers)
    steps.log("reviewers: " + ", ".join(f"{m.account.email} (user {m.account.user_id}, accuracy "
                                        f"{m.profile.accuracy:.0%})" for m in members))
    reviewers = Reviewers(members, project_id, gold, labeled.taxonomy.labels, options.noise, settings.seed)

    # 5. Turn the loop ------------------------------------------------------------------------------
    table = Table(title="active-learning rounds")
    for col in ("round", "labels", "trained", "macro-F1 (frozen eval)", "gate", "champion", "queue head"):
        table.add_column(col)
    try:
        if registry.alias_version(CHAMPION) is None:
            since = _now()
            seeds = service.loop.cold_start(options.seed_labels)
            with steps.step(f"cold start: reviewers label {len(seeds)} diverse items"):
                reviewers.label_tasks(seeds)
            _finish_round(service, table, "seed", since, steps)
        for r in range(1, options.rounds + 1):
            since = _now()
            with steps.step(f"round {r}: reviewers label the next {options.batch} tasks Label Studio serves"):
                reviewers.label_queue(options.batch, service.loop.project_model_version())
            _finish_round(service, table, str(r), since, steps)
        steps.print_table(table)
        if options.adjudicate:
            _adjudication_pass(service, reviewers, settings, options.adjudicate, steps)
        if other_platform is not None:
            _drift_batch(service, settings, other_platform, drift_source(options.dataset), steps)
        _escalate_one(service, members[0], receiver, steps)
        summary = _summary(settings, client, project_id, registry, eval_id)
        _print_urls(settings, ls_url, options, project_id, ls_server, user, password)
        if options.wait:
            steps.log("[bold]running until Ctrl-C[/] (or `make stop` from another terminal)")
            _wait_for_stop_signal()
        return summary
    finally:
        backend.should_exit = True
        service.close()
        receiver.close()
        alert_store.close()
        if mlflow_proc:
            os.killpg(mlflow_proc.pid, signal.SIGTERM)
        if ls_server:
            ls_server.stop()  # a server this run started (a reused one keeps running)
        (demo_dir(settings) / "pids.json").unlink(missing_ok=True)


def _show_masking(texts: list[str], settings: Settings, steps: Steps, shown: int = 3) -> None:
    """A few pool texts as reviewers see them by default (lexicon terms masked; "Show original" reveals)."""
    masked = [(t, settings.protection_policy.mask_text(t)) for t in texts]
    changed = [(t, m) for t, m in masked if t != m]
    steps.log(f"masking: {len(changed)} of {len(texts)} pool texts have lexicon terms masked by default, e.g.")
    for _, m in changed[:shown]:
        steps.log(f"  {m[:140]}")


def _escalate_one(service: Service, reviewer: Reviewer, receiver: EscalationReceiver, steps: Steps,
                  timeout: float = 60.0) -> None:
    """One reviewer escalates a task as a credible threat; the demo waits for the local receiver's log."""
    assert service.client is not None and service.settings.ls_project_id is not None
    project_id = service.settings.ls_project_id
    tasks = service.client.unlabelled_tasks(project_id)
    if not tasks:
        steps.log("escalation: no unlabelled task left to escalate")
        return
    task_id = int(tasks[0]["task_id"])
    result = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": ["hate"]}},
              {"from_name": SEVERITY_CONTROL, "to_name": TO_NAME, "type": "choices",
               "value": {"choices": ["critical"]}},
              {"from_name": ESCALATE_CONTROL, "to_name": TO_NAME, "type": "choices",
               "value": {"choices": [ESCALATE_CHOICE]}},
              {"from_name": REASON_CONTROL, "to_name": TO_NAME, "type": "choices",
               "value": {"choices": ["credible threat"]}}]
    with steps.step(f"escalation: {reviewer.account.email} escalates task {task_id} as a credible threat"):
        reviewer.client.sdk.annotations.create(task_id, result=result, lead_time=30.0)
        deadline = time.monotonic() + timeout
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.2)
    if not receiver.received:
        steps.log(f"escalation: nothing reached {receiver.url} within {timeout:.0f} s; it stays in the outbox "
                  "(`labelloop escalations`)")
        return
    steps.log(f"escalation receiver log ({receiver.url}):")
    for entry in receiver.received:
        steps.log(f"  POST key={entry.get('key')} task={entry.get('task_id')} label={entry.get('label')} "
                  f"severity={entry.get('severity')} reason={entry.get('reason')!r}")


def _adjudication_pass(service: Service, reviewers: Reviewers, settings: Settings, top_k: int, steps: Steps) -> None:
    """What `labelloop loop adjudicate` does, then the reviewers settle what it sent: the likeliest label
    errors (out-of-fold, cleanlab) go to the front of the queue with the disputed label shown."""
    with steps.step(f"adjudication: the {top_k} likeliest label errors back to the reviewers"):
        with open_context(settings, service.loop.project_id) as context:
            candidates = context.adjudication_candidates(top_k)
        result = service.loop.adjudicate(candidates)
        settled = reviewers.label_queue(len(result.sent), service.loop.project_model_version())
    steps.log(f"adjudication: {len(result.sent)} sent, {len(settled)} settled by a reviewer")


def _drift_batch(service: Service, settings: Settings, items: pd.DataFrame, source: str, steps: Steps) -> None:
    """Another platform's texts arrive as one import batch (as `labelloop loop import --append` appends
    them), then drift is evaluated per import batch, as `labelloop drift` does: that batch raises an alert."""
    with steps.step(f"drift: appending {len(items)} {source} texts as a new import batch"):
        service.loop.import_pool(items)
    with steps.step("drift: evaluating every import batch against the frozen evaluation set"):
        report, transitions = run_drift_evaluation(settings, service.loop.project_id)
    drifted = [w["window"] for w in report["windows"] if w.get("drifted")]
    steps.log(f"drift: {len(report['windows'])} batches, drifted: {', '.join(drifted) or 'none'}; "
              f"alerts raised: {len(transitions.raised)}")


def _wait_for_stop_signal() -> None:
    """Until Ctrl-C or `make stop` (SIGTERM). Python runs signal handlers in the main thread, so the
    handler sets an event and the caller's ``finally`` stops everything this run started."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _finish_round(service: Service, table: Table, name: str, since: str, steps: Steps) -> None:
    """Wait for the retrain job this round's webhooks triggered (reconciling first, in case a webhook
    was missed; submitting one if none was triggered) and add its outcome to the table."""
    with steps.step(f"round {name}: retraining on the new labels, then the gate"):
        service.reconcile_once()
        jobs = [j for j in service.runner.list(limit=5) if j.created_at >= since]
        if not jobs:
            jobs = [service.runner.submit(f"demo round {name}")]
        job = service.runner.wait(jobs[0].id, timeout=900)
    if job is None or job.state != "done":
        cells = [name, "-", "-", "-", f"[red]job failed: {job.error if job else 'missing'}[/]", "-", "-"]
    else:
        result = job.result or {}
        queue = result.get("queue") or {}
        f1 = result.get("macro_f1")
        cells = [name, str(result["labels"]), result.get("trained_version") or "-",
                 f"{f1:.3f}" if f1 is not None else "-",
                 "[green]promoted[/]" if result["promoted"] else f"[yellow]refused[/]: {result['gate_reason']}",
                 result.get("champion") or "-", ", ".join(map(str, queue.get("queued_task_ids", [])[:3]))]
    table.add_row(*cells[:4], cells[4][:80], *cells[5:])  # the log line below keeps the gate's whole reason
    steps.log("; ".join(f"{column.header}: {cell}" for column, cell in zip(table.columns, cells, strict=True)))


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
    console.print(f"PM dashboard           http://127.0.0.1:{settings.port}/dashboard  (same basic auth)")
    console.print(f"reviewers' next task   http://127.0.0.1:{settings.port}/queue/next?reviewer=<email>  (respects "
                  "the daily cap of severe items; same basic auth)")
    console.print(f"credentials are kept in {demo_dir(settings)} (git-ignored)")
