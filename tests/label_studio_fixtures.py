"""Real Label Studio server fixtures (session-scoped).

One server per test session (its first start runs the migrations, ≈ 40-100 s on the 2-core box), in a temp
dir on a free port on 127.0.0.1; each test that needs a project gets a fresh one and it is deleted after.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio

from active_learning.labelstudio import LabelStudioClient
from labelloop.ls_server import LabelStudioServer, free_port
from labelloop.taxonomy import get_taxonomy, label_config_xml

START_TIMEOUT = 420.0  # first start under a loaded CI box; a healthy one needs far less


@dataclass(frozen=True)
class RunningLabelStudio:
    server: LabelStudioServer
    client: LabelStudioClient

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def api_key(self) -> str:
        return self.server.api_key

    @property
    def sdk(self) -> LabelStudio:
        return self.client.sdk


@pytest.fixture(scope="session")
def label_studio() -> Iterator[RunningLabelStudio]:
    base_dir = Path(tempfile.mkdtemp(prefix="labelloop-ls-"))
    server = LabelStudioServer(base_dir=base_dir, port=free_port())
    if not server.executable.exists():
        shutil.rmtree(base_dir, ignore_errors=True)
        pytest.fail(
            f"Label Studio is not installed ({server.executable} is missing): run `make install`, which "
            "installs it into .venv-ls. Integration tests need a real server; they are not skipped.",
            pytrace=False,
        )
    try:
        server.start(timeout=START_TIMEOUT)
        yield RunningLabelStudio(server=server, client=LabelStudioClient(server.url, server.api_key))
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def ls_project(label_studio: RunningLabelStudio) -> Iterator[int]:
    """A fresh project with the hate_offensive config; deleted, with everything in it, afterwards."""
    project = label_studio.sdk.projects.create(
        title=f"test-{uuid.uuid4().hex[:12]}", label_config=label_config_xml(get_taxonomy("hate_offensive"))
    )
    assert project.id is not None
    try:
        yield project.id
    finally:
        label_studio.sdk.projects.delete(project.id)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll until ``condition()``: Label Studio delivers webhooks on its own schedule, which under load
    may end after the API call that caused them has returned."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
