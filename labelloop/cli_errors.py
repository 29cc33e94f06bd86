"""How every ``labelloop`` command fails: one clear ``error:`` line and exit code 2 for what a user can act on.

Shared by :mod:`labelloop.cli` and the command groups that ``monitoring/`` registers on it, so that
``labelloop quality``, ``labelloop drift`` and ``labelloop report`` fail the same way as ``labelloop train``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, soft_wrap=True)  # an error stays one line in a log or a pipe, however long


class CliError(Exception):
    """An expected failure: printed as one clear line, exit code 2."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can act on: bad input or settings, a state file that is unreadable, a server that is
    down or refuses, a port in use. Imported lazily so that ``labelloop --help`` stays fast."""
    import sqlite3

    import httpx
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from active_learning.labelstudio import LabelStudioError
    from labelloop.data import DataError
    from labelloop.journal import JournalError
    from labelloop.ls_server import LabelStudioServerError
    from labelloop.taxonomy import LabelConfigError
    from training.registry import RegistryError

    return (CliError, DataError, RegistryError, LabelConfigError, LabelStudioError, LabelStudioServerError,
            JournalError, MlflowException, httpx.HTTPError, sqlite3.DatabaseError, sqlalchemy.exc.DatabaseError,
            OSError, ValueError)


def friendly_errors(fn: Callable) -> Callable:
    """One clear ``error:`` line and exit code 2 for expected failures; a traceback only for bugs
    (or for all failures with ``LABELLOOP_DEBUG=1``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if os.environ.get("LABELLOOP_DEBUG") or not isinstance(e, expected_errors()):
                raise
            err.print(f"[bold red]error:[/] {escape(one_line(e))}")
            raise typer.Exit(2) from None

    return wrapper


def one_line(e: Exception) -> str:
    """pydantic spreads a settings error over several lines with a documentation link; a user needs the
    setting, the value it got and what is wrong with it. Other messages keep their first line."""
    if isinstance(e, ValidationError):
        problems = (f"{'.'.join(map(str, p['loc']))}={p['input']!r}: {p['msg'].removeprefix('Value error, ')}"
                    for p in e.errors())
        return "invalid setting " + "; ".join(problems)
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
