"""Fixtures shared by the whole suite: isolated settings, small slices of the real shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from labelloop import data  # noqa: E402
from labelloop.config import DEFAULT_BASE_MODEL, REPO_ROOT, Settings  # noqa: E402

SHARED_DATA = Path(os.environ.get("LABELLOOP_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

pytest_plugins = ["tests.label_studio_fixtures", "tests.pg_fixtures"]


@pytest.fixture(scope="session")
def embedding_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for the session: it is keyed by text content, so sharing it between tests
    changes no result and saves re-embedding the same real rows."""
    return tmp_path_factory.mktemp("embedding-cache")


@pytest.fixture
def settings(tmp_path: Path, embedding_cache_dir: Path) -> Settings:
    """Settings whose MLflow store, journal and state live in this test's temp dir.

    Served champions run as fp32 torch (``quantize="none"``): choosing a fast path exports and times every
    candidate at each load, which tests that are not about that choice should not pay for; the chooser has
    its own tests (test_fast_path.py, test_serving.py)."""
    return Settings(mlruns_dir=tmp_path / "mlruns", state_dir=tmp_path / "var", data_dir=SHARED_DATA,
                    cache_dir=embedding_cache_dir, quantize="none")


@pytest.fixture(autouse=True)
def _fresh_serving_path_memo():
    """Serving remembers each encoder's measured paths for the life of the process; a test's champion must
    not be served from what an earlier test's measured (nor a test's monkeypatched measurement skipped)."""
    quantize = sys.modules.get("serving.quantize")
    if quantize is not None:
        quantize.SPEEDS.clear()
    yield


@pytest.fixture(scope="session")
def davidson() -> data.LabeledData:
    return data.load("davidson", settings=Settings(data_dir=SHARED_DATA))


@pytest.fixture(scope="session")
def davidson_small(davidson: data.LabeledData) -> data.LabeledData:
    """600 real Davidson rows, stratified, every class present: enough for tiny training runs."""
    frame = data.stratified_sample(davidson.frame, 600, seed=0)
    return data.LabeledData(frame, davidson.taxonomy, "davidson")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer and no classification head: the same
    loading path as the real base model at a fraction of the cost, for tests of the machinery around it.
    Read-only: tests that train save their models elsewhere."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.classifier import resolve_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_BASE_MODEL))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
