"""Contract fuzzing: schemathesis against a real ``labelloop serve`` process, every route, with credentials.

The server runs as a subprocess on 127.0.0.1 with a fast-mode champion in a temp MLflow store, so the
prediction routes do real work. ``--checks all`` includes the contract checks (undocumented status codes,
schema-valid requests rejected, schema-violating requests accepted, response schema conformance) and the
server-error check; the only 5xx allowed is a documented 503 (``tests/fuzz/schemathesis.toml``).
``LABELLOOP_FUZZ_EXAMPLES`` sets examples per operation: small in ``make test``, larger in ``make fuzz``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labelloop import data
from labelloop.config import Settings
from labelloop.ls_server import free_port
from tests.label_studio_fixtures import wait_for
from training.registry import Registry
from training.train import train_and_register

pytestmark = pytest.mark.integration

TOKEN = "fuzz-token-123456"
CONFIG = Path(__file__).parent / "fuzz" / "schemathesis.toml"
EXAMPLES = int(os.environ.get("LABELLOOP_FUZZ_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, davidson: data.LabeledData,
           embedding_cache_dir: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    settings = Settings(mlruns_dir=root / "mlruns", state_dir=root / "var", cache_dir=embedding_cache_dir,
                        taxonomy=davidson.taxonomy.name)
    splits = data.split(davidson, seed=0)
    trained = train_and_register(data.stratified_sample(splits.train, 300, seed=0), None, davidson.taxonomy,
                                 mode="fast", settings=settings, source="fuzz",
                                 eval_frame=data.stratified_sample(splits.validation, 150, seed=0))
    assert Registry(settings).promote(trained.ref.version).promoted
    port = free_port()
    env = {**os.environ, "LABELLOOP_MLRUNS_DIR": str(root / "mlruns"), "LABELLOOP_STATE_DIR": str(root / "var"),
           "LABELLOOP_CACHE_DIR": str(embedding_cache_dir), "LABELLOOP_TAXONOMY": davidson.taxonomy.name,
           "LABELLOOP_API_TOKEN": TOKEN, "LABELLOOP_PORT": str(port),
           # no Label Studio: reconciliation backs off quietly; drift runs only on demand
           "LABELLOOP_LS_URL": f"http://127.0.0.1:{free_port()}", "LABELLOOP_RECONCILE_SECONDS": "3600",
           "LABELLOOP_DRIFT_EVERY_SECONDS": "0",
           # the contract does not depend on which fast path serves; skip choosing one at load
           "LABELLOOP_QUANTIZE": "none"}
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "labelloop.cli", "serve"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    health: dict = {}

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"labelloop serve exited: {(root / 'serve.log').read_text()[-3000:]}")
        try:
            health.update(httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2).json())
        except httpx.HTTPError:
            return False
        return bool(health.get("model_loaded"))

    try:
        try:
            wait_for(ready, "labelloop serve to load its champion", timeout=180)
        except AssertionError as e:
            raise AssertionError(f"{e}; last /health: {health}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_every_route_keeps_its_documented_contract_under_fuzzing(served: str, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis (st) is not installed"
    result = subprocess.run(
        [st, "--config-file", str(CONFIG), "run", f"{served}/openapi.json", "--checks", "all",
         "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", str(EXAMPLES), "--seed", "20261130",
         "--report", "junit", "--report-dir", str(tmp_path), "--no-color"],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path)  # its .schemathesis/ cache lands there
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    assert "Tested:" in out and "0 generated" not in out, out[-2000:]
