"""Inference off the event loop, one model call at a time, concurrent requests merged, admission bounded.

On a small CPU box two torch calls running side by side only fight over the same cores (each already
uses every intra-op thread), so inference is serialised through one queue. While a call runs, new
requests wait in the queue; the next call takes every waiting request *for the same model object* (up
to ``max_merge_texts``) and runs them as one length-sorted batch. Requests that started on an older
model are never merged with requests on the new one, which is what keeps hot swaps clean.

Admission control, because an unbounded queue turns overload into timeouts for everyone: the model
works through a fixed number of texts per second, so every text admitted beyond what it can finish
before the client gives up is work for nobody. Requests arrive in *lanes*, each with its own budget of
texts queued or in the running call (:class:`AdmissionPolicy`, pure); a request that would overrun its
lane's budget is refused at once with :class:`Overloaded` (the app answers 503 with ``Retry-After``).
Label Studio's ``/predict`` has a lane of its own that the worker serves first, so a flood of ``/v1/predict``
from scripts cannot starve the annotators' pre-labels. A request whose client went away before its turn
came is dropped without reaching the model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import anyio
import numpy as np

from training.registry import LoadedModel


class Lane(StrEnum):
    """Who is asking; the worker serves lanes in declaration order (Label Studio first)."""

    LABEL_STUDIO = "label_studio"
    API = "api"


LANES: tuple[Lane, ...] = tuple(Lane)


@dataclass(frozen=True)
class AdmissionPolicy:
    """How many texts each lane may have waiting for or inside the model; 0 (or absent) means unbounded.

    A request is admitted while its lane has room for all of its texts, and always into an empty lane: a
    single request larger than the budget (it is already capped by ``max_request_bytes``) would otherwise
    never be served, however idle the model.
    """

    budgets: Mapping[Lane, int] = field(default_factory=dict)
    max_retry_after: int = 30

    def admits(self, lane: Lane, queued: int, n_texts: int) -> bool:
        budget = self.budgets.get(lane, 0)
        return budget <= 0 or queued == 0 or queued + n_texts <= budget

    def retry_after(self, queued_total: int, texts_per_second: float | None) -> int:
        """Whole seconds until the work queued now is done at the measured rate (at least 1): a client that
        waits that long finds room, one that retries sooner is refused again."""
        if not texts_per_second or texts_per_second <= 0:
            return 1
        return max(1, min(self.max_retry_after, math.ceil(queued_total / texts_per_second)))


class Overloaded(Exception):
    """The lane's budget is spent; ``retry_after`` seconds is the client's best next try."""

    def __init__(self, lane: Lane, queued: int, budget: int, retry_after: int):
        self.lane, self.queued, self.budget, self.retry_after = lane, queued, budget, retry_after
        super().__init__(f"the model is at capacity: {queued} texts are queued for the {lane} lane "
                         f"(max_queued_texts{'_label_studio' if lane is Lane.LABEL_STUDIO else ''} = {budget}); "
                         f"retry in {retry_after} s")


class ClientDisconnected(Exception):
    """The caller hung up before its prediction was ready; its work was dropped or discarded."""


class BatcherObserver(Protocol):
    """What the batcher reports (``serving.metrics.ServingMetrics`` implements it)."""

    def observe_batch(self, n_texts: int, seconds: float) -> None: ...

    def observe_queue(self, lane: str, texts: int) -> None: ...

    def observe_drop(self, lane: str) -> None: ...


class _Silent:
    def observe_batch(self, n_texts: int, seconds: float) -> None:
        pass

    def observe_queue(self, lane: str, texts: int) -> None:
        pass

    def observe_drop(self, lane: str) -> None:
        pass


@dataclass(eq=False)
class _Job:
    model: LoadedModel
    texts: Sequence[str]
    lane: Lane
    future: asyncio.Future[np.ndarray]
    running: bool = False
    released: bool = False


class MicroBatcher:
    """``await predict(model, texts, lane)`` → probabilities, computed in a worker thread.

    The ``observer`` hears of every model call, every change of a lane's queued texts and every request
    dropped because its caller went away.
    """

    _RATE_WEIGHT = 0.3  # weight of the newest model call in the texts/s estimate behind Retry-After

    def __init__(self, batch_size: int, max_merge_texts: int, observer: BatcherObserver | None = None,
                 policy: AdmissionPolicy | None = None, target_call_seconds: float | None = 0.5):
        self.batch_size = batch_size
        self.max_merge_texts = max_merge_texts
        self.target_call_seconds = target_call_seconds
        self.policy = policy or AdmissionPolicy()
        self._observer: BatcherObserver = observer or _Silent()
        self._pending: dict[Lane, deque[_Job]] = {lane: deque() for lane in LANES}
        self._queued: dict[Lane, int] = dict.fromkeys(LANES, 0)
        self._rate: float | None = None
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def pending_jobs(self) -> int:
        """Requests waiting for the model (not counting the call in progress)."""
        return sum(not job.future.done() for queue in self._pending.values() for job in queue)

    def queued_texts(self, lane: Lane | None = None) -> int:
        """Texts admitted and not yet answered (waiting or in the running call), in one lane or all."""
        return self._queued[lane] if lane is not None else sum(self._queued.values())

    @property
    def texts_per_second(self) -> float | None:
        """The model's recent throughput (None before the first call)."""
        return self._rate

    def submit(self, model: LoadedModel, texts: Sequence[str], lane: Lane = Lane.API) -> asyncio.Future[np.ndarray]:
        """Queue ``texts`` (non-empty) or raise :class:`Overloaded`; cancelling the future drops the work.
        Synchronous, so the admission check and the enqueue are one step on the event loop."""
        queued = self._queued[lane]
        if not self.policy.admits(lane, queued, len(texts)):
            raise Overloaded(lane, queued, self.policy.budgets.get(lane, 0),
                             self.policy.retry_after(self.queued_texts(), self._rate))
        loop = asyncio.get_running_loop()
        self._ensure_worker(loop)
        job = _Job(model, texts, lane, loop.create_future())
        job.future.add_done_callback(lambda _: self._settled_while_waiting(job))
        self._pending[lane].append(job)
        self._queued[lane] += len(texts)
        self._observer.observe_queue(lane.value, self._queued[lane])
        assert self._wakeup is not None
        self._wakeup.set()
        return job.future

    async def predict(self, model: LoadedModel, texts: Sequence[str], lane: Lane = Lane.API, *,
                      disconnected: Callable[[], Awaitable[object]] | None = None) -> np.ndarray:
        """Probabilities for ``texts``. ``disconnected`` completes when the caller hangs up: the request is
        then dropped (if the model has not taken it yet) and :class:`ClientDisconnected` is raised."""
        if not texts:
            return np.zeros((0, len(model.classifier.labels)), dtype=np.float32)
        future = self.submit(model, texts, lane)
        if disconnected is None:
            return await future
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait((future, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not future.done():
                future.cancel()  # the caller is gone (or this task was cancelled): nobody wants the answer
        if future.cancelled():
            raise ClientDisconnected(f"the client hung up before its {len(texts)} texts were classified")
        return future.result()

    def _settled_while_waiting(self, job: _Job) -> None:
        """A job answered or cancelled before the model took it leaves the queue's count now; one the model
        has taken is counted until its call returns (its texts still occupy the model)."""
        if job.running:
            return
        if job.future.cancelled():
            self._observer.observe_drop(job.lane.value)
        self._release(job)

    def _release(self, job: _Job) -> None:
        if job.released:
            return
        job.released = True
        self._queued[job.lane] -= len(job.texts)
        self._observer.observe_queue(job.lane.value, self._queued[job.lane])

    def _ensure_worker(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker lazily, in the running loop (a test client may run several loops in turn)."""
        if self._worker is not None and not self._worker.done() and self._loop is loop:
            return
        self._loop = loop
        for lane in LANES:
            for job in self._pending[lane]:
                job.released = True  # its loop is gone; the fresh count must not hear of it
            self._pending[lane].clear()
            self._queued[lane] = 0
            self._observer.observe_queue(lane.value, 0)
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._run(), name="labelloop-inference")

    def call_limit(self) -> int:
        """Texts one merged call may hold: about ``target_call_seconds`` of work at the measured rate, at least
        one ``batch_size`` batch, at most ``max_merge_texts``. Lanes are served and hung-up callers dropped only
        between calls, so a call must end soon however slow the machine is; a single request larger than
        this still runs whole."""
        if self._rate is None or not self.target_call_seconds:
            return self.max_merge_texts
        return min(self.max_merge_texts, max(self.batch_size, int(self._rate * self.target_call_seconds)))

    def _take(self) -> list[_Job]:
        """The oldest live job of the first non-empty lane, plus every later job on the same model (its own
        lane first, then the lanes after it), up to :meth:`call_limit` texts."""
        first = None
        for lane in LANES:
            queue = self._pending[lane]
            while queue and queue[0].future.done():  # caller went away
                queue.popleft()
            if queue:
                first = queue.popleft()
                break
        if first is None:
            return []
        jobs, total, limit = [first], len(first.texts), self.call_limit()
        for lane in LANES:
            rest: deque[_Job] = deque()
            queue = self._pending[lane]
            while queue:
                job = queue.popleft()
                if job.future.done():
                    continue
                if job.model is first.model and total + len(job.texts) <= limit:
                    jobs.append(job)
                    total += len(job.texts)
                else:
                    rest.append(job)
            self._pending[lane] = rest
        for job in jobs:
            job.running = True
        return jobs

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while jobs := self._take():
                try:
                    await self._execute(jobs)
                finally:
                    for job in jobs:
                        self._release(job)

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
        seconds = time.perf_counter() - started
        self._observer.observe_batch(len(texts), seconds)
        if seconds > 0:
            rate = len(texts) / seconds
            self._rate = rate if self._rate is None else (1 - self._RATE_WEIGHT) * self._rate + self._RATE_WEIGHT * rate
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(proba[offset : offset + len(job.texts)])
            offset += len(job.texts)

    async def aclose(self) -> None:
        """Stop the worker and fail whatever is still queued (shutdown)."""
        for queue in self._pending.values():
            for job in queue:
                job.running = True  # a shutdown is not a client going away: not counted as a drop
                if not job.future.done():
                    job.future.cancel()
                self._release(job)
            queue.clear()
        worker, self._worker = self._worker, None
        if worker is not None and self._loop is asyncio.get_running_loop():  # else its loop is gone already
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
