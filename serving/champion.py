"""The champion model this process serves, and how it is swapped when the registry's alias moves.

The model is loaded once per process. A background poll asks the registry the cheap question ("which
version is champion?") every ``poll_seconds``; only when the answer changes is the new version loaded,
fully, in a worker thread, and then swapped in with one reference assignment. A request reads the
reference once and keeps that :class:`LoadedModel` to the end, so in-flight requests finish on the
model they started with and no response mixes two versions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from labelloop.config import Settings
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
        return self.registry.alias_version(CHAMPION)

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
    cost never lands on a request. ``on_swap`` is told about each swap (metrics).
    """

    def __init__(self, source: ModelSource, *, prepare: Callable[[LoadedModel], LoadedModel] | None = None,
                 on_swap: Callable[[LoadedModel], None] | None = None):
        self.source = source
        self._prepare = prepare
        self._on_swap = on_swap
        self._current: LoadedModel | None = None
        self._lock = asyncio.Lock()
        self._failed_version: int | None = None  # polls skip it; /reload or a moved alias retries
        self.last_error: str | None = None

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
                return self._failed(previous, f"could not read the champion alias: {e}")
            if version is None:
                detail = "the registry has no champion yet" if previous is None else (
                    f"the registry has no champion alias; still serving {previous}")
                return SwapResult(False, previous, previous, detail)
            if self._current is not None and self._current.ref.version == version:
                return SwapResult(False, previous, previous, f"{previous} is already served")
            if not retry_failed and version == self._failed_version:
                return SwapResult(False, previous, previous, self.last_error or f"v{version} failed", failed=True)
            try:
                loaded = await anyio.to_thread.run_sync(self._load, version)
            except Exception as e:
                self._failed_version = version
                return self._failed(previous, f"could not load champion v{version}: {e}")
            self._current = loaded
            self._failed_version = None
            self.last_error = None
            if self._on_swap:
                self._on_swap(loaded)
            log.info("serving %s (was %s)", loaded.ref.label, previous)
            return SwapResult(True, previous, loaded.ref.label, f"now serving {loaded.ref.label}")

    def _failed(self, previous: str | None, detail: str) -> SwapResult:
        self.last_error = detail
        log.error("%s", detail)
        return SwapResult(False, previous, previous, detail, failed=True)

    async def poll_forever(self, every_seconds: float) -> None:
        """Background task: refresh every ``every_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await self.refresh(retry_failed=False)
            except Exception:  # never let one bad tick end polling for the life of the process
                log.exception("champion poll failed")
