"""Fine-tuning as a background retrain, once the loop has collected enough labels.

Fast-mode rounds (a frozen encoder under a linear head) retrain in seconds but level off: on Davidson the same
2,000 loop labels make a 0.695 macro-F1 fast head and a 0.730 fine-tuned model (bench/results/al_transfer.md),
while on a few hundred labels fine-tuning loses to the fast head (bench/results/train_small.md). So the service
fine-tunes only from ``finetune_after_labels`` on, and again every ``finetune_every_labels`` more, as a job in a
lane of its own (:mod:`active_learning.jobs`): fast rounds keep running while it trains, and the gate decides
whether the fine-tuned model serves.

The schedule is pure (:class:`FinetuneSchedule`); the one piece of state, the highest threshold already
queued, is a mark in the jobs store that moves in the same write that queues the job
(:meth:`~active_learning.jobs.JobRunner.submit_if`). That write is what makes each threshold queue one job
across restarts and replicas: whoever moves the mark first queues the job; everybody after finds it moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from active_learning.jobs import FINETUNE, Decision, Job, JobRunner
from labelloop.data import LabeledData, split
from labelloop.taxonomy import Taxonomy

#: the jobs store's key for the highest label threshold a fine-tune was queued for
MARK = "finetune_through_labels"
ReportProgress = Callable[[float, str], None]


@dataclass(frozen=True)
class FinetuneSchedule:
    """Fine-tune when the labelled set first reaches ``after`` labels, then at every ``every`` more."""

    after: int
    every: int

    def __post_init__(self) -> None:
        for name, value in (("finetune_after_labels", self.after), ("finetune_every_labels", self.every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of labels, not {value!r}")

    def threshold(self, labels: int) -> int | None:
        """The highest threshold at or below ``labels``; None before the first."""
        if labels < self.after:
            return None
        return self.after + (labels - self.after) // self.every * self.every

    def due(self, labels: int, done_through: int) -> int | None:
        """The threshold a fine-tune is due for, given that one was queued for ``done_through`` already.

        Thresholds passed together (labels that arrived while the service was down, or a schedule turned on
        late) are one fine-tune: it trains on every label there is, so a second one would learn nothing new."""
        reached = self.threshold(labels)
        return reached if reached is not None and reached > done_through else None

    def next_threshold(self, done_through: int) -> int:
        """The first threshold above ``done_through``."""
        if done_through < self.after:
            return self.after
        return self.after + ((done_through - self.after) // self.every + 1) * self.every

    def decide(self, labels: int) -> Callable[[str | None], Decision]:
        """The decision for :meth:`JobRunner.submit_if`, given the stored mark: the new mark and the job's
        reason when a threshold is due, else None."""
        def decision(mark: str | None) -> Decision:
            threshold = self.due(labels, int(mark) if mark else 0)
            if threshold is None:
                return None
            return str(threshold), f"{labels} labels: fine-tune at {threshold} (first at {self.after}, then " \
                                   f"every {self.every})"
        return decision


class AutoFinetune:
    """Queues the fine-tune jobs the schedule calls for; ``schedule=None`` (the ``auto_finetune`` setting off)
    queues none, while ``labelloop loop finetune`` and ``POST /jobs/retrain`` with ``kind=finetune`` still can."""

    def __init__(self, runner: JobRunner, schedule: FinetuneSchedule | None):
        self.runner = runner
        self.schedule = schedule

    def done_through(self) -> int:
        return int(self.runner.meta(MARK, "0") or 0)

    def next_threshold(self) -> int | None:
        return self.schedule.next_threshold(self.done_through()) if self.schedule else None

    def check(self, labels: int) -> Job | None:
        """Queue a fine-tune if ``labels`` (the size of the labelled set a round just trained on) crossed a
        threshold not yet queued for; the job queued (or the one already waiting), else None."""
        if self.schedule is None or self.schedule.due(labels, self.done_through()) is None:
            return None  # most rounds cross no threshold: a read answers that, with no serialised write
        return self.runner.submit_if(MARK, self.schedule.decide(labels), FINETUNE)  # decided again, under the lock


def finetune_frames(labels: pd.DataFrame, taxonomy: Taxonomy, *, seed: int, source: str
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, validation)`` from the loop's labels, split as ``labelloop train --dataset <export>`` splits
    them: the data's stratified split, with its test part trained on because the frozen evaluation set is what
    the gate judges on. The validation part is early stopping's."""
    splits = split(LabeledData(labels[["id", "text", "label"]].reset_index(drop=True), taxonomy, source), seed=seed)
    return pd.concat([splits.train, splits.test], ignore_index=True), splits.validation


class FinetuneProgress:
    """Turns the trainer's ``(stage, done, total)`` into a job's ``(fraction, message)`` within ``[start, end]``,
    at most about once a second: a fine-tune takes hundreds of steps, and each report is a write to the jobs
    store."""

    def __init__(self, report: ReportProgress | None, start: float, end: float, min_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.report = report
        self.start, self.end = start, end
        self.min_seconds = min_seconds
        self.clock = clock
        self._last: float | None = None
        self._fraction = start

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.report is None:
            return
        if stage == "train":
            self._fraction = self.start + (self.end - self.start) * min(done, total) / max(total, 1)
        now = self.clock()
        last_step = stage == "train" and done >= total
        if not last_step and self._last is not None and now - self._last < self.min_seconds:
            return
        self._last = now
        # validation passes between epochs keep the fraction where training left it
        self.report(self._fraction, f"fine-tuning: step {done} of {total}" if stage == "train"
                    else f"fine-tuning: {stage} {done} of {total}")
