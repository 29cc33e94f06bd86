"""Inference off the event loop, one model call at a time, concurrent requests merged.

On a small CPU box two torch calls running side by side only fight over the same cores (each already
uses every intra-op thread), so inference is serialised through one queue. While a call runs, new
requests wait in the queue; the next call takes every waiting request *for the same model object* (up
to ``max_merge_texts``) and runs them as one length-sorted batch. Requests that started on an older
model are never merged with requests on the new one, which is what keeps hot swaps clean.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import numpy as np

from training.registry import LoadedModel


@dataclass
class _Job:
    model: LoadedModel
    texts: Sequence[str]
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """``await predict(model, texts)`` → probabilities, computed in a worker thread.

    ``on_batch(n_texts, seconds)`` is called after each model call (metrics).
    """

    def __init__(self, batch_size: int, max_merge_texts: int,
                 on_batch: Callable[[int, float], None] | None = None):
        self.batch_size = batch_size
        self.max_merge_texts = max_merge_texts
        self._on_batch = on_batch
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending_jobs(self) -> int:
        """Requests waiting for the model (not counting the call in progress)."""
        return sum(not job.future.done() for job in self._pending)

    async def predict(self, model: LoadedModel, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(model.classifier.labels)), dtype=np.float32)
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        job = _Job(model, texts, loop.create_future())
        self._pending.append(job)
        assert self._wakeup is not None
        self._wakeup.set()
        return await job.future

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker lazily, in the running loop (a test client may run several loops in turn)."""
        if self._worker is not None and not self._worker.done() and self._loop is loop:
            return
        self._loop = loop
        self._pending.clear()
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._run(), name="labelloop-inference")

    def _take(self) -> list[_Job]:
        """The oldest live job plus every later job on the same model, up to ``max_merge_texts``."""
        while self._pending and self._pending[0].future.done():  # caller went away
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        jobs, total, rest = [first], len(first.texts), deque()
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():
                continue
            if job.model is first.model and total + len(job.texts) <= self.max_merge_texts:
                jobs.append(job)
                total += len(job.texts)
            else:
                rest.append(job)
        self._pending = rest
        return jobs

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while jobs := self._take():
                await self._execute(jobs)

    async def _execute(self, jobs: list[_Job]) -> None:
        texts = [text for job in jobs for text in job.texts]
        classifier = jobs[0].model.classifier
        started = time.perf_counter()
        try:
            proba = await anyio.to_thread.run_sync(classifier.predict_proba, texts, self.batch_size)
        except Exception as e:  # the model failed: every caller of this batch gets the error
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        if self._on_batch:
            self._on_batch(len(texts), time.perf_counter() - started)
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(proba[offset : offset + len(job.texts)])
            offset += len(job.texts)

    async def aclose(self) -> None:
        """Stop the worker and fail whatever is still queued (shutdown)."""
        for job in self._pending:
            if not job.future.done():
                job.future.cancel()
        self._pending.clear()
        worker, self._worker = self._worker, None
        if worker is not None and self._loop is asyncio.get_running_loop():  # else its loop is gone already
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
