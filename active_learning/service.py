"""The running service: the serving app plus the active-learning side wired into it.

Serving knows nothing of active learning (imports point downstream only); this module composes them:
webhooks land in the journal (serving), the journal's events drive the retrain trigger, one worker runs
retrain rounds (train → gate → push queue), a promotion refreshes the served champion at once, and a
reconciler pulls annotations from Label Studio now and then so that a missed webhook is never a lost
label.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastapi import FastAPI

from active_learning.jobs import JobRunner, RetrainTrigger, jobs_router
from active_learning.labelstudio import LabelStudioClient
from active_learning.loop import ActiveLearningLoop
from active_learning.reconcile import reconcile
from labelloop.config import Settings
from labelloop.journal import Journal
from labelloop.taxonomy import get_taxonomy
from serving.app import create_app

log = logging.getLogger("labelloop.service")


class Service:
    """Everything ``labelloop serve`` runs, built once per process."""

    def __init__(self, settings: Settings, client: LabelStudioClient | None = None):
        self.settings = settings
        self.journal = Journal(settings.journal_path, get_taxonomy(settings.taxonomy))
        if client is None and settings.ls_api_key is not None and settings.ls_project_id is not None:
            client = LabelStudioClient(settings.ls_url, settings.ls_api_key.get_secret_value())
        self.client = client
        self.loop = ActiveLearningLoop(settings, client, settings.ls_project_id, self.journal,
                                       champion=self._served_champion, on_promoted=self._refresh_serving)
        self.runner = JobRunner(settings.state_dir / "jobs.sqlite", self._run_round)
        self.trigger = RetrainTrigger(self.journal, self.runner, settings.retrain_every)
        self.app: FastAPI = create_app(settings, journal=self.journal, on_event=self.trigger.on_event,
                                       extra_routers=[jobs_router(self.runner)])
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None

    # ------------------------------------------------------------------ wiring
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
        return self.loop.run_round(progress, on_snapshot=self.trigger.advance).to_dict()

    # ------------------------------------------------------------------ reconciliation
    def reconcile_once(self) -> dict[str, int]:
        if not self.loop.steers_queue:
            return {}
        report = reconcile(self.client, self.settings.ls_project_id, self.journal)
        if self.trigger.pending_labels() >= self.settings.retrain_every:
            self.runner.submit("labels found by reconciliation")
        return dict(vars(report))

    def _reconcile_forever(self) -> None:
        while not self._stop.wait(self.settings.reconcile_seconds):
            try:
                self.reconcile_once()
            except Exception as e:  # Label Studio down: try again next period, keep serving
                log.warning("reconciliation failed: %s", e)

    def start_background(self) -> None:
        if self.loop.steers_queue and self.settings.reconcile_seconds > 0:
            self._reconciler = threading.Thread(target=self._reconcile_forever, name="labelloop-reconcile",
                                                daemon=True)
            self._reconciler.start()

    def close(self) -> None:
        self._stop.set()
        self.runner.close()
        if self._reconciler:
            self._reconciler.join(timeout=10)
        self.journal.close()
