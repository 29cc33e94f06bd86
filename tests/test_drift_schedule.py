"""`labelloop serve` evaluates drift on a schedule, and a failing evaluation never stops it."""

from __future__ import annotations

import threading

from monitoring import app as monitoring_app


def test_schedule_evaluates_repeatedly_and_survives_failures(settings, monkeypatch):
    calls: list[int] = []
    twice = threading.Event()

    def evaluate(s, project_id=None, *, client=None):
        calls.append(1)
        if len(calls) >= 2:
            twice.set()
        if len(calls) == 1:
            raise RuntimeError("no champion yet")
        return {}, []

    monkeypatch.setattr(monitoring_app, "run_drift_evaluation", evaluate)
    schedule = monitoring_app.DriftSchedule(settings.model_copy(update={"drift_every_seconds": 0.05,
                                                                        "ls_project_id": 1}))
    schedule.start()
    try:
        assert twice.wait(5), "the schedule stopped after a failed evaluation"
    finally:
        schedule.close()
    assert schedule._thread is not None and not schedule._thread.is_alive()


def test_schedule_is_off_without_a_period_or_a_project(settings, monkeypatch):
    monkeypatch.setattr(monitoring_app, "run_drift_evaluation", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    for update in ({"drift_every_seconds": 0, "ls_project_id": 1}, {"drift_every_seconds": 10, "ls_project_id": None}):
        schedule = monitoring_app.DriftSchedule(settings.model_copy(update=update))
        schedule.start()
        assert schedule._thread is None
        schedule.close()


def test_run_once_reports_failure_instead_of_raising(settings):
    # a real evaluation with no pool and no champion: logged, False, no exception
    assert monitoring_app.DriftSchedule(settings.model_copy(update={"ls_project_id": 1})).run_once() is False
