"""Fixtures shared by the whole suite: isolated settings, small slices of the real shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from labelloop import data  # noqa: E402
from labelloop.config import REPO_ROOT, Settings  # noqa: E402

SHARED_DATA = Path(os.environ.get("LABELLOOP_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

pytest_plugins = ["tests.label_studio_fixtures"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose MLflow store, journal and caches live in this test's temp dir."""
    return Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", data_dir=SHARED_DATA)


@pytest.fixture(scope="session")
def davidson() -> data.LabeledData:
    return data.load("davidson", settings=Settings(data_dir=SHARED_DATA))


@pytest.fixture(scope="session")
def davidson_small(davidson: data.LabeledData) -> data.LabeledData:
    """600 real Davidson rows, stratified, every class present: enough for tiny training runs."""
    frame = data.stratified_sample(davidson.frame, 600, seed=0)
    return data.LabeledData(frame, davidson.taxonomy, "davidson")
