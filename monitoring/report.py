"""``labelloop report``: the dashboard as one self-contained HTML file (or its data as JSON) for a weekly
review that happens away from the running service, by mail or in a ticket.

It reads the same journal, registry, slice store and alert store as the served ``/dashboard`` and
renders the same page with plotly.js inlined, so the file opens offline in any browser. Registered on
the main ``labelloop`` app by :mod:`labelloop.cli`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from labelloop.cli_errors import friendly_errors
from labelloop.config import get_settings

console = Console()


def write_atomically(path: Path, text: str) -> None:
    """Write next to ``path`` and rename into place: a reader (or a mail client attaching it on a
    schedule) never sees half a report, and a failure leaves any previous report intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@friendly_errors
def report(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="file to write (default: report.html, or "
                                             "stdout with --json)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="write the page's data as JSON instead of HTML")] = False,
    project: Annotated[int | None, typer.Option("--project", min=1, help="Label Studio project id (default: "
                                                "settings)")] = None,
    taxonomy: Annotated[str | None, typer.Option(help="label taxonomy (default: settings)")] = None,
    mlflow_url: Annotated[str | None, typer.Option(help="MLflow UI that version links point to (default: the "
                                                   "tracking server, when it is an http one)")] = None,
) -> None:
    """Write the dashboard as one self-contained HTML file (plotly.js inlined), or its data as JSON."""
    from labelloop.journal import Journal
    from labelloop.taxonomy import get_taxonomy
    from monitoring.dashboard import collect, render
    from monitoring.overview import MonitoringContext

    settings = get_settings()
    updates = {k: v for k, v in {"taxonomy": taxonomy, "ls_project_id": project}.items() if v is not None}
    settings = settings.model_copy(update=updates)
    if mlflow_url is not None and not mlflow_url.startswith(("http://", "https://")):
        raise ValueError(f"--mlflow-url {mlflow_url!r} must be an http:// or https:// URL")
    if out is not None and out.exists() and out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a file")
    with Journal(settings.database("journal"), get_taxonomy(settings.taxonomy)) as journal:
        context = MonitoringContext(settings, journal, mlflow_url=mlflow_url)
        try:
            data = collect(context)
        finally:
            context.close()
    if as_json:
        text = data.model_dump_json(indent=2)
        if out is None:
            print(text)
            return
    else:
        text = render(data, inline_plotly=True)
        out = out or Path("report.html")
    write_atomically(out, text)
    console.print(f"wrote {out} ({len(text.encode()) // 1024} KiB): labels this week "
                  f"{data.overview.labels_this_week}, champion "
                  f"{data.overview.champion.label if data.overview.champion else 'none'}")
