"""The champion model this process serves, and how it is swapped when the registry's alias moves.

The model is loaded once per process. A background poll asks the registry the cheap question ("which
version is champion?") every ``poll_seconds``; only when the answer changes is the new version loaded,
fully, in a worker thread, and then swapped in with one reference assignment. A request reads the
reference once and keeps that :class:`LoadedModel` to the end, so in-flight requests finish on the
model they started with and no response mixes two versions.

Outages: MLflow is a remote dependency. When it cannot be read, serving keeps the model it has (or
serves none, and says why in ``/health``), and the registry is asked again after a wait that doubles
from ``backoff_first_seconds`` up to ``backoff_max_seconds`` (:class:`Backoff`), logged once when the
outage begins and once when it ends. A version that fails to load is retried on the same kind of
schedule, while polling goes on following the alias.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import anyio

from labelloop.config import Settings
from serving.protocol import DependencyHealth
from training.registry import CHAMPION, LoadedModel, Registry

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    """Where champions come from; the default wraps the MLflow registry, tests use a fake."""

    @property
    def model_name(self) -> str: ...

    def current_version(self) -> int | None:
        """The champion's version number, or None when there is no champion; must be cheap."""

    def load(self, version: int) -> LoadedModel:
        """Load one version completely (weights in memory, ready to predict)."""

    def aliases(self) -> dict[str, int]:
        """Every alias of the registered model and the version it points to."""

    def versions(self) -> list[int]:
        """Every registered version number, ascending."""

    def check_texts(self, limit: int) -> list[str]:
        """Up to ``limit`` real texts to verify a quantised copy against (may be empty)."""


class RegistryModelSource:
    """:class:`ModelSource` over :class:`training.registry.Registry`."""

    def __init__(self, settings: Settings):
        self.registry = Registry(settings)

    @property
    def model_name(self) -> str:
        return self.registry.name

    def current_version(self) -> int | None:
        try:
            return self.registry.alias_version(CHAMPION)
        except Exception as e:  # the message names where MLflow was looked for, in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RegistryUnreachable(f"MLflow at {self.registry.tracking_uri} unreachable: "
                                      f"{first[:_ERROR_CHARS]}") from e

    def load(self, version: int) -> LoadedModel:
        return self.registry.load(version)

    def aliases(self) -> dict[str, int]:
        return self.registry.aliases()

    def versions(self) -> list[int]:
        return [v.version for v in self.registry.versions()]

    def check_texts(self, limit: int) -> list[str]:
        """A fixed sample of the registered model's frozen evaluation set."""
        frozen = self.registry.eval_set()
        if frozen is None:
            return []
        frame = frozen[1]
        return frame["text"].sample(min(limit, len(frame)), random_state=0).tolist()


_ERROR_CHARS = 300  # MLflow's connection errors run to kilobytes of retry history


class RegistryUnreachable(RuntimeError):
    """The registry could not be asked which version is champion."""


@dataclass
class Backoff:
    """Exponential backoff: after ``n`` consecutive failures the next attempt waits
    ``min(cap, base * 2 ** (n - 1))`` seconds. Pure policy: callers pass the (monotonic) time."""

    base: float
    cap: float
    failures: int = 0
    retry_at: float | None = None

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, now: float) -> float:
        """Count a failure; returns the wait before the next attempt."""
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 60))
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures, self.retry_at = 0, None

    def remaining(self, now: float) -> float:
        return 0.0 if self.retry_at is None else max(0.0, self.retry_at - now)

    def due(self, now: float) -> bool:
        return self.retry_at is not None and now >= self.retry_at


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SwapResult:
    swapped: bool
    previous: str | None
    current: str | None
    detail: str
    failed: bool = False


class Champion:
    """Holds the served :class:`LoadedModel`; ``current`` is read lock-free, swaps are serialised.

    ``prepare`` runs on every freshly loaded model before it is swapped in (e.g. quantisation), so the
    cost never lands on a request. ``on_swap`` is told about each swap (metrics). ``backoff`` is the
    first and the longest wait between attempts while the registry is unreachable or a load fails.
    """

    def __init__(self, source: ModelSource, *, prepare: Callable[[LoadedModel], LoadedModel] | None = None,
                 on_swap: Callable[[LoadedModel], None] | None = None, backoff: tuple[float, float] = (2.0, 300.0)):
        self.source = source
        self._prepare = prepare
        self._on_swap = on_swap
        self._current: LoadedModel | None = None
        self._lock = asyncio.Lock()
        self._failed_version: int | None = None  # polls skip it until its backoff is due; /reload retries it
        #: why the registry's champion is not served (None: it is, or the registry has none)
        self.last_error: str | None = "the first attempt to load the champion has not finished"
        #: why the registry cannot be read now, and since when (UTC)
        self.registry_error: str | None = None
        self.registry_error_since: str | None = None
        self._registry_backoff = Backoff(*backoff)
        self._load_backoff = Backoff(*backoff)
        # made by start(), on the serving loop: set when the retry schedule changes, and after the first load
        self._wake: asyncio.Event | None = None
        self._first_attempt: asyncio.Event | None = None
        self._next_attempt_at: float | None = None

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def label(self) -> str | None:
        return self._current.ref.label if self._current else None

    def _load(self, version: int) -> LoadedModel:
        loaded = self.source.load(version)
        return self._prepare(loaded) if self._prepare else loaded

    async def refresh(self, retry_failed: bool = True) -> SwapResult:
        """Load and swap in the registry's champion if it differs from the served one.

        Registry or load failures keep the served model and are reported in the result (and in
        ``last_error``), so a broken new version never takes serving down. With ``retry_failed=False``
        (polling) a version that already failed to load is not loaded again on every tick.
        """
        async with self._lock:
            previous = self.label
            try:
                version = await anyio.to_thread.run_sync(self.source.current_version)
            except Exception as e:  # the registry is a remote dependency: report, keep serving
                return self._registry_down(previous, e if isinstance(e, RegistryUnreachable) else
                                           f"could not read the champion alias: {e}")
            self._registry_up()
            if version is None:
                # nothing to load: a failed load's retries end here, or a past-due retry would spin polling
                self.last_error = None
                self._failed_version = None
                self._load_backoff.succeeded()
                detail = "the registry has no champion yet" if previous is None else (
                    f"the registry has no champion alias; still serving {previous}")
                return SwapResult(False, previous, previous, detail)
            if self._current is not None and self._current.ref.version == version:
                self.last_error = None
                self._failed_version = None
                self._load_backoff.succeeded()
                return SwapResult(False, previous, previous, f"{previous} is already served")
            if (not retry_failed and version == self._failed_version
                    and not self._load_backoff.due(time.monotonic())):
                return SwapResult(False, previous, previous, self.last_error or f"v{version} failed", failed=True)
            try:
                loaded = await anyio.to_thread.run_sync(self._load, version)
            except Exception as e:
                self._failed_version = version
                self._load_backoff.failed(time.monotonic())
                self._reschedule()
                return self._failed(previous, f"could not load champion v{version}: {e}")
            self._current = loaded
            self._failed_version = None
            self._load_backoff.succeeded()
            self.last_error = None
            if self._on_swap:
                self._on_swap(loaded)
            log.info("serving %s (was %s)", loaded.ref.label, previous)
            return SwapResult(True, previous, loaded.ref.label, f"now serving {loaded.ref.label}")

    def _failed(self, previous: str | None, detail: str) -> SwapResult:
        self.last_error = detail
        log.error("%s", detail)
        return SwapResult(False, previous, previous, detail, failed=True)

    def _registry_down(self, previous: str | None, error: Exception | str) -> SwapResult:
        """Back off; log when the outage begins, not on every attempt."""
        detail = str(error)
        delay = self._registry_backoff.failed(time.monotonic())
        if self.registry_error is None:
            self.registry_error_since = utc_now()
            log.error("%s; %s; retrying in %.0f s, then backing off up to %.0f s", detail,
                      f"still serving {previous}" if previous else "serving no champion", delay,
                      self._registry_backoff.cap)
        else:
            log.debug("%s (attempt %d)", detail, self._registry_backoff.failures)
        self.registry_error = detail
        if previous is None or self.last_error is not None:
            self.last_error = detail
        self._reschedule()
        return SwapResult(False, previous, previous, detail, failed=True)

    def _registry_up(self) -> None:
        if self.registry_error is not None:
            log.warning("the registry answers again (it did not since %s)", self.registry_error_since)
            self._reschedule()
        self.registry_error = self.registry_error_since = None
        self._registry_backoff.succeeded()

    # ------------------------------------------------------------------ health and the background task
    def _reschedule(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def retry_in(self) -> float | None:
        """Seconds until the background task next asks the registry, while something is failing."""
        if self._next_attempt_at is None or not (self.registry_error or self.last_error):
            return None
        return round(max(0.0, self._next_attempt_at - time.monotonic()), 1)

    def health(self) -> DependencyHealth:
        """The registry as a dependency of serving."""
        if self.registry_error is None:
            return DependencyHealth(status="ok")
        return DependencyHealth(status="unavailable", detail=self.registry_error, since=self.registry_error_since,
                                retry_in_s=self.retry_in())

    def _next_wait(self, poll_seconds: float, now: float) -> float | None:
        """Seconds until the next registry check; None: nothing to check until woken."""
        if self._registry_backoff.failing:
            return self._registry_backoff.remaining(now)
        waits = [poll_seconds] if poll_seconds > 0 else []
        if self._load_backoff.failing:
            waits.append(self._load_backoff.remaining(now))
        return min(waits) if waits else None

    def start(self, poll_seconds: float) -> asyncio.Task:
        """Start :meth:`keep_current` on the running loop (the app's lifespan)."""
        self._wake, self._first_attempt = asyncio.Event(), asyncio.Event()
        return asyncio.create_task(self.keep_current(poll_seconds, self._wake, self._first_attempt))

    async def wait_first_attempt(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the first load that :meth:`start` began; True if it finished,
        else it goes on in the background (a registry that hangs must not keep the app from starting)."""
        if self._first_attempt is None:
            return False
        try:
            await asyncio.wait_for(self._first_attempt.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def keep_current(self, poll_seconds: float, wake: asyncio.Event, first_attempt: asyncio.Event) -> None:
        """Until cancelled: load the champion now, then follow the alias every ``poll_seconds`` (0: only
        retries after failures) and retry failures with backoff; ``wake`` makes it recompute its wait."""
        try:
            await self.refresh()
        except Exception:
            log.exception("loading the champion failed")
        first_attempt.set()
        while True:
            wake.clear()
            wait = self._next_wait(poll_seconds, time.monotonic())
            self._next_attempt_at = None if wait is None else time.monotonic() + wait
            try:
                await asyncio.wait_for(wake.wait(), wait)
                continue  # a refresh elsewhere (/reload) changed the schedule: recompute the wait
            except TimeoutError:
                pass
            try:
                await self.refresh(retry_failed=False)
            except Exception:  # never let one bad tick end polling for the life of the process
                log.exception("champion poll failed")
