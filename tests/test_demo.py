"""`labelloop demo --short` run as a user would, non-interactively, against the session's real Label
Studio; afterwards Label Studio holds the project, pre-labels and the simulated reviews, MLflow the champion."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from labelloop.demo import PROJECT_TITLE
from labelloop.ls_server import free_port
from tests.label_studio_fixtures import RunningLabelStudio
from training.registry import CHAMPION, Registry

pytestmark = pytest.mark.integration


def test_short_demo_turns_the_loop_and_a_second_run_reuses_it(settings, label_studio: RunningLabelStudio):
    env = {**os.environ, "LABELLOOP_MLRUNS_DIR": str(settings.mlruns_dir),
           "LABELLOOP_STATE_DIR": str(settings.state_dir),
           "LABELLOOP_CACHE_DIR": str(settings.cache_dir), "LABELLOOP_LS_API_KEY": label_studio.api_key}

    def demo() -> None:
        run = subprocess.run(
            [sys.executable, "-m", "labelloop.cli", "demo", "--short", "--label-studio-url", label_studio.url,
             "--backend-port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "labelloop is up" in run.stdout

    def projects() -> list[int]:
        return [p.id for p in label_studio.sdk.projects.list(title=PROJECT_TITLE) if p.title == PROJECT_TITLE]

    demo()
    assert len(projects()) == 1
    project = projects()[0]
    try:
        client = label_studio.client
        pool = pd.read_parquet(settings.state_dir / "pools" / f"project-{project}.parquet")
        assert 290 <= len(pool) <= 310 and set(client.task_ids(project)) == set(pool["item_id"])
        assert sum(1 for _ in client.annotations(project)) == 60  # 30 cold-start labels + one round of 30
        registry = Registry(settings.model_copy(update={"taxonomy": "hate_offensive"}))
        champion = registry.alias_version(CHAMPION)
        assert champion is not None
        versions = {p["model_version"] for p in client.predictions(project)}
        assert f"{registry.name}:v{champion}" in versions
        assert not (settings.state_dir / "demo" / "pids.json").exists()  # it cleaned up after itself

        demo()  # reuses the project, its pool and the champion: no cold start, one more round
        assert projects() == [project]
        assert set(client.task_ids(project)) == set(pool["item_id"])
        assert sum(1 for _ in client.annotations(project)) == 90
        assert registry.alias_version(CHAMPION) is not None
    finally:
        label_studio.sdk.projects.delete(project)
