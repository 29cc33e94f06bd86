"""The running service: the serving app plus the active-learning side wired into it.

Serving knows nothing of active learning (imports point downstream only); this module composes them:
webhooks land in the journal (serving), the journal's events drive the retrain trigger, one worker runs
retrain rounds (train → gate → push queue), a second one runs fine-tunes once enough labels exist
(:mod:`active_learning.auto_finetune`), a promotion refreshes the served champion at once, and a
reconciler pulls annotations from Label Studio now and then so that a missed webhook is never a lost
label.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from mlflow.exceptions import MlflowException

from active_learning.auto_finetune import AutoFinetune, FinetuneSchedule
from active_learning.jobs import FINETUNE, JobRunner, RetrainTrigger, jobs_router
from active_learning.labelstudio import LabelStudioClient, LabelStudioError
from active_learning.loop import ActiveLearningLoop
from active_learning.reconcile import Reconciler, reconcile
from labelloop.config import Settings
from labelloop.escalations import DeliveryWorker, EscalationOutbox
from labelloop.exposure import ExposureLedger
from labelloop.journal import Journal, RecordResult
from labelloop.taxonomy import get_taxonomy
from serving.app import create_app
from serving.auth import Credentials
from serving.escalations_api import escalations_router
from serving.queue_api import TaskSourceUnavailable, queue_router
from training.registry import CHAMPION

log = logging.getLogger("labelloop.service")

#: how often a ``/setup`` from Label Studio may trigger a connection check
SETUP_CHECK_SECONDS = 300.0
#: how long a background connection check waits before it warns about what it found, and looks again: `labelloop
#: connect` and the demo connect the ML backend first (Label Studio then calls ``/setup``, which starts a check)
#: and fix the webhook's credentials a moment later, so a first look can catch a problem that is being mended
CONNECTION_SETTLE_SECONDS = 3.0


@dataclass(frozen=True)
class ProjectTasks:
    """The review project as ``/v1/queue/next`` sees it (:class:`serving.queue_api.TaskSource`)."""

    client: LabelStudioClient
    project_id: int

    def unlabelled_tasks(self) -> list[dict[str, Any]]:
        try:
            return self.client.unlabelled_tasks(self.project_id)
        except LabelStudioError as e:
            raise TaskSourceUnavailable(str(e)) from None

    def user_id(self, email: str) -> int | None:
        try:
            return self.client.user_id(email)
        except LabelStudioError as e:
            raise TaskSourceUnavailable(str(e)) from None

    def labeling_url(self, task_id: int) -> str:
        return self.client.labeling_url(self.project_id, task_id)


class Service:
    """Everything ``labelloop serve`` runs, built once per process."""

    def __init__(self, settings: Settings, client: LabelStudioClient | None = None,
                 extra_routers: Sequence[APIRouter] = ()):
        """``extra_routers`` are mounted next to the backend's own, behind the same authentication: the
        composition points add downstream routers (monitoring) that this package must not import."""
        self.settings = settings
        self.journal = Journal(settings.database("journal"), get_taxonomy(settings.taxonomy),
                               policy=settings.review_policy)
        if client is None and settings.ls_api_key is not None and settings.ls_project_id is not None:
            client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value(),
                                       mask=settings.protection_policy.mask_text)
        self.client = client
        self.loop = ActiveLearningLoop(settings, client, settings.ls_project_id, self.journal,
                                       champion=self._served_champion, on_promoted=self._refresh_serving)
        self.runner = JobRunner(settings.database("jobs"), self._run_round)
        self.trigger = RetrainTrigger(self.journal, self.runner, settings.retrain_every)
        self.finetune_runner = JobRunner(settings.database("jobs"), self._run_finetune, kind=FINETUNE)
        self.auto_finetune = AutoFinetune(self.runner, FinetuneSchedule(
            settings.finetune_after_labels, settings.finetune_every_labels) if settings.auto_finetune else None)
        self.escalations = EscalationOutbox(settings.database("escalations"))
        self.exposure = ExposureLedger(settings.database("exposure"))
        self.delivery = DeliveryWorker(self.escalations, self.journal, settings.escalation_url,
                                       retry_seconds=settings.escalation_retry_seconds,
                                       retry_max_seconds=settings.escalation_retry_max_seconds)
        self.app: FastAPI = create_app(settings, journal=self.journal, on_event=self.on_event,
                                       on_setup=self.on_setup,
                                       extra_routers=[jobs_router(self.runner), escalations_router, queue_router,
                                                      *extra_routers])
        self.app.state.escalations = self.escalations
        self.app.state.exposure = self.exposure
        if client is not None and settings.ls_project_id is not None:
            self.app.state.review_queue = ProjectTasks(client, settings.ls_project_id)
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self.reconciler = Reconciler(self.reconcile_once, settings.reconcile_seconds, settings.backoff_max_seconds,
                                     what=f"Label Studio at {settings.ls_url}")
        if self.loop.steers_queue and settings.reconcile_seconds > 0:
            self.app.state.health_reporters["label_studio"] = self.reconciler
        self._setup_checked_at: float | None = None
        self._setup_lock = threading.Lock()

    # ------------------------------------------------------------------ wiring
    def on_event(self, payload: dict, result: RecordResult) -> None:
        """After each journaled webhook: copy its escalation into the outbox and wake the delivery worker
        (an escalation reaches the receiver within seconds), count the reviewer's exposure, then let the
        retrain trigger look at it. Both copies are idempotent and also run from their own cursors, so a
        failure here loses nothing."""
        if result.status == "accepted":
            self._follow_journal(f"journal event {result.event_id}")
        self.trigger.on_event(payload, result)

    def _follow_journal(self, after: str) -> None:
        """Copy new escalations into the outbox, wake the delivery worker and count exposure: after a webhook,
        and after a reconciliation pass that applied annotations whose webhook never arrived (a webhook Label
        Studio cannot authenticate: without this, exposure would wait for a webhook that never comes)."""
        try:
            self.escalations.sync(self.journal)
            self.exposure.sync(self.journal, self.settings.review_policy.severity,
                               self.settings.protection_policy, self.loop.blurred)
        except Exception as e:  # both catch up from their cursors at the next sync (worker, next event)
            log.warning("escalation or exposure sync after %s failed: %s: %s", after, type(e).__name__, e)
        self.delivery.wake()

    def _served_champion(self):
        """Rank with the very model serving answers with, or load the registry's if serving has none."""
        served = self.app.state.champion.current
        return served if served is not None else self.loop.registry_champion()

    def _refresh_serving(self) -> None:
        """Swap serving to the new champion now, from the job's worker thread, on serving's event loop."""
        loop: asyncio.AbstractEventLoop | None = getattr(self.app.state, "loop", None)
        if loop is None or loop.is_closed():
            return  # not serving (CLI or tests): the next request's load or the poller picks it up
        asyncio.run_coroutine_threadsafe(self.app.state.champion.refresh(), loop).result(timeout=300)

    def _run_round(self, progress) -> dict[str, Any]:
        result = self.loop.run_round(progress, on_snapshot=self.trigger.advance)
        self.check_finetune(result.labels)  # the round counted the labelled set anyway
        return result.to_dict()

    def check_finetune(self, labels: int | None = None) -> None:
        """Queue a fine-tune if the labelled set (``labels``, else counted now) crossed a threshold. Never raises:
        on failure the mark has not moved, so the next check queues it."""
        if self.auto_finetune.schedule is None:
            return
        try:
            labels = len(self.loop.training_labels()) if labels is None else labels
            if (job := self.auto_finetune.check(labels)) is not None:
                log.info("%d labels: fine-tune job %s queued (%s)", labels, job.id, job.reason)
        except Exception as e:
            log.warning("could not check whether a fine-tune is due: %s: %s", type(e).__name__, e)

    def _run_finetune(self, progress) -> dict[str, Any]:
        return self.loop.run_finetune(progress).to_dict()

    # ------------------------------------------------------------------ reconciliation
    def reconcile_once(self) -> dict[str, int]:
        if not self.loop.steers_queue:
            return {}
        report = reconcile(self.client, self.settings.ls_project_id, self.journal)
        if report.applied:
            self._follow_journal("reconciliation")
        if self.trigger.pending_labels() >= self.settings.retrain_every:
            self.runner.submit("labels found by reconciliation")
        return dict(vars(report))

    # ------------------------------------------------------------------ the Label Studio connection
    def check_connection(self, settle_seconds: float = 0.0) -> list[str]:
        """Log a warning for each reason Label Studio's calls or annotation webhooks would not reach this
        backend, above all a webhook made by connecting in Label Studio's UI, which carries no credentials:
        with auth on, each of its events is refused and labels wait for the reconciler. Never raises: a
        Label Studio that is down must not keep the backend from serving. With ``settle_seconds``, problems
        found are looked at again after that long and only those still there are reported (see
        :data:`CONNECTION_SETTLE_SECONDS`)."""
        if not self.loop.steers_queue:
            return []
        project_id = self.settings.ls_project_id
        try:
            problems = self.client.connection_problems(project_id, Credentials(self.settings).accepts)
            if problems and settle_seconds > 0:
                time.sleep(settle_seconds)
                problems = self.client.connection_problems(project_id, Credentials(self.settings).accepts)
        except LabelStudioError as e:
            log.warning("could not check the connection of Label Studio project %s: %s", project_id, e)
            return []
        for problem in problems:
            log.warning("Label Studio project %s: %s", project_id, problem)
        return problems

    def on_setup(self, project_id: str | None) -> None:
        """Check the connection in the background when Label Studio calls ``/setup`` for our project.

        Connecting the backend in Label Studio's UI ends with a ``/setup``, right after Label Studio made
        a webhook without credentials, so this is when the warning helps. Label Studio also calls
        ``/setup`` before every predict, hence at most one check per ``SETUP_CHECK_SECONDS``, off the
        request (Label Studio waits for the answer)."""
        if not self.loop.steers_queue or project_id != str(self.settings.ls_project_id):
            return
        with self._setup_lock:
            now = time.monotonic()
            if self._setup_checked_at is not None and now - self._setup_checked_at < SETUP_CHECK_SECONDS:
                return
            self._setup_checked_at = now
        threading.Thread(target=self.check_connection, args=(CONNECTION_SETTLE_SECONDS,), name="labelloop-setup-check",
                         daemon=True).start()

    def _at_start(self) -> None:
        """Check the connection, and on a project with no champion yet run a round at once: it pushes the
        cold-start queue (or finds it still queued), so the first reviewers do not work in random order
        until enough labels for a retrain have come in. Also queue a fine-tune that became due while no service
        ran (or before ``auto_finetune`` was turned on): rounds check only when new labels come in."""
        threading.Thread(target=self.check_connection, args=(CONNECTION_SETTLE_SECONDS,), name="labelloop-start-check",
                         daemon=True).start()
        self.check_finetune()
        if not self.loop.steers_queue:
            return
        try:
            no_champion = self.loop.registry.alias_version(CHAMPION) is None
        except MlflowException as e:
            log.warning("could not read the champion from MLflow: %s", e)
            return
        if no_champion:
            self.runner.submit("no champion yet: cold-start queue")

    def start_background(self) -> None:
        self.delivery.start()
        threading.Thread(target=self._at_start, name="labelloop-start", daemon=True).start()
        if self.loop.steers_queue and self.settings.reconcile_seconds > 0:
            self._reconciler = threading.Thread(target=self.reconciler.run, args=(self._stop,),
                                                name="labelloop-reconcile", daemon=True)
            self._reconciler.start()

    def close(self) -> None:
        self._stop.set()
        self.delivery.close()
        self.runner.close()
        self.finetune_runner.close()
        if self._reconciler:
            self._reconciler.join(timeout=10)
        self.journal.close()
        self.loop.slices.close()
        self.escalations.close()
        self.exposure.close()
