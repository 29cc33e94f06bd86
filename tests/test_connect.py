"""Connecting the backend so that Label Studio's webhooks get through (issue 8, item 5).

Connecting in Label Studio's UI (*Settings → Model*, i.e. ``ml.create`` with basic auth) makes the project
webhook without the backend's credentials. With auth on, every annotation event is then refused with 401,
and labels only arrive through the reconciler. ``labelloop connect`` fixes the webhook in place; ``loop
status``, the service's start and the 401 itself say what is wrong.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from rich.console import Console
from typer.testing import CliRunner

from active_learning.labelstudio import BackendLink, WebhookLink, basic_auth_header, connection_problems
from active_learning.service import Service
from labelloop import cli
from labelloop.config import Settings, get_settings
from labelloop.ls_server import free_port
from serving.auth import AuthMiddleware, Credentials
from tests.label_studio_fixtures import RunningLabelStudio, wait_for
from tests.test_serving_integration import ServerThread

USER, PASSWORD = "labelstudio", "connect-pass-7"
runner = CliRunner()


def accepts_only(user: str, password: str):
    return Credentials(Settings(basic_user=user, basic_password=SecretStr(password))).accepts


# --- the check, as a pure function ---------------------------------------------------------------------
BACKEND = BackendLink("http://127.0.0.1:9090", basic_auth=True)


def hook(authorization: str | None, hook_id: int = 1, active: bool = True) -> WebhookLink:
    return WebhookLink(hook_id, "http://127.0.0.1:9090/webhook", authorization, active)


def test_a_webhook_without_credentials_is_reported_when_auth_is_on():
    (problem,) = connection_problems(4, [BACKEND], [hook(None)], accepts_only(USER, PASSWORD))
    assert "webhook 1 to http://127.0.0.1:9090/webhook has no credentials" in problem
    assert "401" in problem and "labelloop connect" in problem


def test_a_webhook_with_the_backends_credentials_passes_and_auth_off_needs_none():
    good = hook(basic_auth_header(USER, PASSWORD))
    assert connection_problems(4, [BACKEND], [good], accepts_only(USER, PASSWORD)) == []
    open_backend = Credentials(Settings()).accepts
    assert connection_problems(4, [BackendLink(BACKEND.url, basic_auth=False)], [hook(None)], open_backend) == []


def test_wrong_credentials_duplicates_missing_and_disabled_webhooks_are_each_reported():
    accepts = accepts_only(USER, PASSWORD)
    (wrong,) = connection_problems(4, [BACKEND], [hook(basic_auth_header(USER, "old"))], accepts)
    assert "credentials the backend refuses" in wrong
    good = basic_auth_header(USER, PASSWORD)
    (twice,) = connection_problems(4, [BACKEND], [hook(good, 1), hook(good, 2)], accepts)
    assert "2 webhooks" in twice and "arrives 2 times" in twice
    (missing,) = connection_problems(4, [BACKEND], [], accepts)
    assert "no webhook to http://127.0.0.1:9090/webhook" in missing
    (off,) = connection_problems(4, [BACKEND], [hook(good, active=False)], accepts)
    assert "turned off" in off
    (nothing,) = connection_problems(4, [], [], accepts)
    assert "no ML backend is connected to project 4" in nothing
    (no_auth_backend,) = connection_problems(4, [BackendLink(BACKEND.url, basic_auth=False)], [hook(good)], accepts)
    assert "without credentials" in no_auth_backend and "pre-label" in no_auth_backend


# --- the 401 says what to do ---------------------------------------------------------------------------
@pytest.fixture
def guarded() -> TestClient:
    app = FastAPI()

    @app.post("/webhook")
    def webhook() -> dict:
        return {"status": "ok"}

    @app.get("/health")
    def health() -> dict:
        return {"status": "UP"}

    app.add_middleware(AuthMiddleware, credentials=Credentials(Settings(basic_user=USER,
                                                                        basic_password=SecretStr(PASSWORD))))
    return TestClient(app)


def test_a_webhook_refused_for_missing_credentials_says_run_labelloop_connect(guarded: TestClient, caplog):
    with caplog.at_level(logging.WARNING, logger="labelloop.auth"):
        r = guarded.post("/webhook", json={"action": "ANNOTATION_CREATED"})
    assert r.status_code == 401
    assert r.json()["detail"] == "Label Studio's webhook has no credentials: run `labelloop connect`"
    assert "www-authenticate" in r.headers
    assert "no credentials" in caplog.text
    wrong = guarded.post("/webhook", json={}, headers={"Authorization": basic_auth_header(USER, "old")})
    assert wrong.status_code == 401 and "credentials this backend refuses" in wrong.json()["detail"]
    assert guarded.get("/health").json()["detail"] == "authentication required: HTTP Basic or Bearer token"
    ok = guarded.post("/webhook", json={}, headers={"Authorization": basic_auth_header(USER, PASSWORD)})
    assert ok.status_code == 200


# --- the CLI -------------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(tmp_path: Path, embedding_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The CLI's settings through the environment, as a user sets them, in this test's temp dirs."""
    for name, value in {"MLRUNS_DIR": tmp_path / "mlruns", "STATE_DIR": tmp_path / "var",
                        "CACHE_DIR": embedding_cache_dir, "CONFIG": tmp_path / "no-such.toml",
                        "BASIC_USER": USER, "BASIC_PASSWORD": PASSWORD, "PORT": free_port()}.items():
        monkeypatch.setenv(f"LABELLOOP_{name}", str(value))
    monkeypatch.setattr(cli, "console", Console(width=250))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=250, soft_wrap=True))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def invoke(*args: str):
    return runner.invoke(cli.app, list(args))


def test_connect_refuses_missing_settings_an_unreachable_label_studio_and_a_bad_url(cli_env):
    result = invoke("connect")
    assert result.exit_code == 2 and "error: set LABELLOOP_LS_API_KEY" in result.output
    cli_env.setenv("LABELLOOP_LS_API_KEY", "some-token")
    cli_env.setenv("LABELLOOP_LS_PROJECT_ID", "3")
    cli_env.setenv("LABELLOOP_LS_URL", f"http://127.0.0.1:{free_port()}")
    get_settings.cache_clear()
    result = invoke("connect")
    assert result.exit_code == 2 and "error:" in result.output and "cannot reach Label Studio" in result.output
    result = invoke("connect", "--backend-url", "ftp://somewhere")
    assert result.exit_code == 2 and "must be an http:// or https:// URL" in result.output
    status = invoke("loop", "status")  # status still works while Label Studio is down, and says so
    assert status.exit_code == 0 and "warning: could not check the Label Studio connection" in status.output


def test_the_default_backend_url_brackets_an_ipv6_bind_address():
    def url(host: str) -> str:
        return cli._backend_url(Settings(host=host, port=9090), None)

    assert url("::1") == "http://[::1]:9090"
    assert url("[::1]") == "http://[::1]:9090"
    assert url("::") == url("0.0.0.0") == "http://127.0.0.1:9090"
    assert url("10.0.0.5") == "http://10.0.0.5:9090"


class CountingClient:
    """Stands in for Label Studio: a project whose webhook was made by the UI, without credentials."""

    def __init__(self):
        self.checks = 0

    def connection_problems(self, project_id, accepts, backend_url=None):
        self.checks += 1
        return [f"webhook 3 to http://backend/webhook has no credentials (project {project_id})"]


def test_setup_from_label_studio_checks_the_connection_once_per_period_off_the_request(settings, caplog):
    client = CountingClient()
    service = Service(settings.model_copy(update={"ls_project_id": 7}), client=client)
    try:
        with TestClient(service.app) as http, caplog.at_level(logging.WARNING, logger="labelloop.service"):
            for project in ("7.1700000000", "7.1700000000", "8.1700000000"):
                assert http.post("/setup", json={"project": project, "schema": "<View></View>"}).status_code == 200
            wait_for(lambda: "has no credentials (project 7)" in caplog.text, "the warning after /setup", 10)
        # one check, which looks twice (the problem was still there after settling); the second /setup falls in
        # the same period, and project 8 is not ours
        assert client.checks == 2
    finally:
        service.close()


class MendedClient(CountingClient):
    """A webhook without credentials at first look, fixed by then at the second: what a background check sees
    while `labelloop connect` (or the demo) connects the ML backend and then mends the webhook."""

    def connection_problems(self, project_id, accepts, backend_url=None):
        problems = super().connection_problems(project_id, accepts, backend_url)
        return problems if self.checks == 1 else []


def test_a_problem_mended_while_the_check_settles_is_not_reported(settings, caplog, monkeypatch):
    monkeypatch.setattr("active_learning.service.CONNECTION_SETTLE_SECONDS", 0.2)
    client = MendedClient()
    service = Service(settings.model_copy(update={"ls_project_id": 7}), client=client)
    try:
        with TestClient(service.app) as http, caplog.at_level(logging.WARNING, logger="labelloop.service"):
            assert http.post("/setup", json={"project": "7.1700000000", "schema": "<View></View>"}).status_code == 200
            wait_for(lambda: client.checks >= 2, "the second look", 10)
            time.sleep(0.2)
        assert "has no credentials" not in caplog.text
        assert service.check_connection() == []  # a direct call reports what is there now
    finally:
        service.close()


# --- against a real Label Studio and a real backend with auth on ----------------------------------------
@pytest.mark.integration
def test_connected_as_the_ui_does_webhooks_are_refused_until_labelloop_connect(
        cli_env, label_studio: RunningLabelStudio, ls_project: int, davidson_small, caplog):
    cli_env.setenv("LABELLOOP_LS_URL", label_studio.url)
    cli_env.setenv("LABELLOOP_LS_API_KEY", label_studio.api_key)
    cli_env.setenv("LABELLOOP_LS_PROJECT_ID", str(ls_project))
    cli_env.setenv("LABELLOOP_RECONCILE_SECONDS", "0")
    get_settings.cache_clear()
    settings = get_settings()
    client = label_studio.client
    tasks = client.import_tasks(ls_project, davidson_small.frame[["id", "text"]].head(3))
    task_ids = list(tasks.values())

    service = Service(settings)
    with ServerThread(service.app, settings.port) as server:
        # exactly what Label Studio's "Settings → Model" dialog does, basic auth included
        label_studio.sdk.ml.create(project=ls_project, url=server.url, title="labelloop", auth_method="BASIC_AUTH",
                                   basic_auth_user=USER, basic_auth_pass=PASSWORD)
        (made_by_ui,) = [h for h in label_studio.sdk.webhooks.list(project=str(ls_project))
                         if h.project == ls_project]
        assert made_by_ui.url == f"{server.url}/webhook" and not made_by_ui.headers

        # the problem is reported: by the service as it starts, and by `loop status`
        warning = f"webhook {made_by_ui.id} to {server.url}/webhook has no credentials"
        with caplog.at_level(logging.WARNING, logger="labelloop.service"):
            service.start_background()
            wait_for(lambda: warning in caplog.text, "the service's warning at start")
        (problem,) = service.check_connection()
        assert warning in problem and f"Label Studio project {ls_project}: {problem}" in caplog.text
        status = invoke("loop", "status")
        assert status.exit_code == 0, status.output
        assert f"warning: webhook {made_by_ui.id} to {server.url}/webhook has no credentials" in status.output

        # and it is real: the annotation's webhook is refused, so the journal stays empty
        client.create_annotation(task_ids[0], "hate")
        wait_for(lambda: "no credentials: run `labelloop connect`" in caplog.text, "the refused webhook's log line")
        assert service.journal.labels(ls_project).empty

        # `labelloop connect` fixes that webhook in place, and the next annotation arrives through it
        connected = invoke("connect", "--backend-url", server.url)
        assert connected.exit_code == 0, connected.output
        assert "one webhook to" in connected.output and "with HTTP Basic credentials" in connected.output
        hooks = [h for h in label_studio.sdk.webhooks.list(project=str(ls_project)) if h.project == ls_project]
        assert [h.id for h in hooks] == [made_by_ui.id]
        assert service.check_connection() == []
        assert "Label Studio connection: project" in invoke("loop", "status").output

        annotation = client.create_annotation(task_ids[1], "offensive")
        wait_for(lambda: not service.journal.annotations(ls_project).empty, "the annotation webhook")
        journaled = service.journal.annotations(ls_project)
        assert journaled[["annotation_id", "label", "source"]].values.tolist() == [
            [annotation["id"], "offensive", "webhook"]]
        service.close()

    # a project that does not exist is named as such
    missing = invoke("connect", "--project", "99999", "--backend-url", "http://127.0.0.1:9")
    assert missing.exit_code == 2
    assert f"error: project 99999 does not exist in Label Studio at {label_studio.url}" in missing.output
