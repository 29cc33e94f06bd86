"""Start and stop a local Label Studio server (open-source 1.23, SQLite) for the demo and the tests.

Label Studio lives in its own virtual environment (``.venv-ls``, installed by ``make install``) because it
pins versions of Django and friends that clash with the app's stack; this module only ever talks to it as a
subprocess and over HTTP.

Why the environment below:

* ``LABEL_STUDIO_USER_TOKEN`` + ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``: the admin user is created on
  the first start with a token *we* chose, so no browser step is needed to get an API key. The token only
  works if legacy tokens were enabled when the organisation was created, i.e. on that first start.
* ``LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false`` / ``LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false``: otherwise Label
  Studio refuses ML backends and webhooks on 127.0.0.0/8, which is exactly where our serving process runs.
* a stable ``SECRET_KEY``: it signs sessions and JWTs; a new one per start would log everybody out.
* analytics, version checks and Sentry off: review data must not leave the machine.
* ``fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short=true``: Label Studio's own newer
  prediction import path. The default (legacy) one recounts the predictions of *every* task in the project
  after each import request, so pushing a pool's worth of predictions in chunks grows quadratically;
  the newer path counts only the tasks it touched. (It does not validate results against the config;
  :meth:`active_learning.labelstudio.LabelStudioClient.import_predictions` does that itself.)

The server is started in its own process group (so :meth:`LabelStudioServer.stop` reaches every child) and,
on Linux, is sent SIGTERM if the thread that started it dies, so a killed demo or test run does not leave an
orphaned server behind: call :meth:`LabelStudioServer.start` from a thread that outlives the server.

The password, token and secret key are generated once (:func:`secrets.token_urlsafe`) and kept, mode 0600, in
``base_dir/credentials.json``; later starts on the same ``base_dir`` reuse them, because the SQLite database
already holds that user and token.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from labelloop.config import REPO_ROOT

CREDENTIALS_FILE = "credentials.json"
LOG_FILE = "label-studio.log"
LOG_TAIL_LINES = 40
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class LabelStudioServerError(RuntimeError):
    """The server could not be started, or did not become healthy."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    token: str
    secret_key: str


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it), for servers started by tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the parent thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _write_private_json(path: Path, payload: dict[str, str]) -> None:
    """Write ``payload`` so the file is never readable by others, not even for a moment, nor torn."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class LabelStudioServer:
    base_dir: Path
    port: int = 8080
    host: str = "127.0.0.1"
    venv: Path = REPO_ROOT / ".venv-ls"
    username: str = "admin@labelloop.local"
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _credentials: Credentials | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir).expanduser().resolve()

    # --- facts --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_key(self) -> str:
        return self.credentials().token

    @property
    def pid(self) -> int | None:
        """The server's process id while this object runs it (``None`` when it is not running)."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "label-studio"

    @property
    def log_path(self) -> Path:
        return self.base_dir / LOG_FILE

    def credentials(self) -> Credentials:
        """The admin credentials for this data dir: created on first use, then read back unchanged."""
        if self._credentials is not None:
            return self._credentials
        path = self.base_dir / CREDENTIALS_FILE
        if path.exists():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                creds = Credentials(**{k: str(stored[k]) for k in Credentials.__dataclass_fields__})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LabelStudioServerError(
                    f"{path} is unreadable ({e}); it holds the admin token of the database next to it. "
                    "Restore it, or delete the whole directory to start over with an empty Label Studio."
                ) from None
            if creds.username != self.username:
                raise LabelStudioServerError(f"{path} belongs to user {creds.username!r}, not {self.username!r}")
        else:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            creds = Credentials(
                username=self.username,
                password=secrets.token_urlsafe(18),
                token=secrets.token_urlsafe(30),
                secret_key=secrets.token_urlsafe(50),
            )
            _write_private_json(path, asdict(creds))
        self._credentials = creds
        return creds

    def environment(self) -> dict[str, str]:
        """The process environment for ``label-studio start`` (see the module docstring for why)."""
        creds = self.credentials()
        env = dict(os.environ)
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.base_dir),
                "DJANGO_DB": "sqlite",
                "DATABASE_NAME": str(self.base_dir / "label_studio.sqlite3"),
                "LABEL_STUDIO_USERNAME": creds.username,
                "LABEL_STUDIO_PASSWORD": creds.password,
                "LABEL_STUDIO_USER_TOKEN": creds.token,
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
                "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
                "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
                "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "SECRET_KEY": creds.secret_key,
                "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    # --- lifecycle ----------------------------------------------------------------------------
    def is_up(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/health", timeout=2.0)
            return response.status_code == 200 and response.json().get("status") == "UP"
        except (httpx.HTTPError, ValueError):
            return False

    def start(self, timeout: float = 180) -> None:
        """Start the server and wait until it answers ``/health`` and accepts our token.

        Raises :class:`LabelStudioServerError` (with the tail of the server log) if Label Studio is not
        installed, the port is taken, the process dies, or it is not healthy within ``timeout`` seconds.
        """
        if self._process is not None and self._process.poll() is None:
            return
        if not self.executable.exists():
            raise LabelStudioServerError(
                f"Label Studio is not installed at {self.executable}; `make install` installs it into {self.venv}"
            )
        if self.is_up():
            raise LabelStudioServerError(f"something already answers on {self.url}; choose another port")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.executable),
                    "start",
                    "--no-browser",
                    "--internal-host",
                    self.host,
                    "--port",
                    str(self.port),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,  # its own process group, so stop() reaches every child
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise LabelStudioServerError(f"Label Studio exited with code {code} while starting\n{self.log_tail()}")
            if self.is_up():
                self._check_token()
                return
            time.sleep(0.5)
        self.stop()
        raise LabelStudioServerError(
            f"Label Studio did not answer {self.url}/health within {timeout:.0f} s\n{self.log_tail()}"
        )

    def _check_token(self) -> None:
        """Fail now, not at the first API call, if the database does not know our token."""
        response = httpx.get(
            f"{self.url}/api/current-user/whoami",
            headers={"Authorization": f"Token {self.api_key}"},
            timeout=10.0,
        )
        if response.status_code != 200:
            self.stop()
            raise LabelStudioServerError(
                f"Label Studio at {self.url} is up but refuses the token in "
                f"{self.base_dir / CREDENTIALS_FILE} "
                f"(HTTP {response.status_code}); the database and credentials file do not belong together"
            )

    def stop(self, timeout: float = 20) -> None:
        """Terminate the server's whole process group; kill it if it does not exit within ``timeout``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=timeout)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
