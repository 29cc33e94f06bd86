"""``labelloop drift``: evaluate drift now, print the windows, raise and clear alerts; ``labelloop drift alerts``
lists alerts with their raised and cleared times."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from labelloop.cli_errors import friendly_errors
from labelloop.config import get_settings

drift_app = typer.Typer(help="Drift of the pool's content and the champion's behaviour, per window; alerts.",
                        invoke_without_command=True)
console = Console()


def _p(value: float) -> str:
    return f"{value:.3g}"


def _audit(audit: dict | None) -> str:
    if not audit:
        return "-"
    return f"{audit['accuracy']:.3f} ({audit['low']:.2f}-{audit['high']:.2f}, n={audit['n']})"


@drift_app.callback()
@friendly_errors
def drift(
    ctx: typer.Context,
    project: Annotated[int | None, typer.Option("--project", help="Label Studio project (default: settings)")] = None,
    window: Annotated[str | None, typer.Option(help="day, week or batch: window the pool by day, ISO week or "
                                               "import batch (default: settings)")] = None,
    reference: Annotated[str | None, typer.Option(help="'eval_set' or 'window:<id>' (default: settings)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Evaluate every window of the pool against the reference now, store the report, raise/clear alerts."""
    if ctx.invoked_subcommand is not None:
        return
    from monitoring.drift import run_drift_evaluation

    settings = get_settings()
    update = {k: v for k, v in {"drift_window": window, "drift_reference": reference}.items() if v is not None}
    if update:
        settings = type(settings).model_validate({**settings.model_dump(), **update})
    with console.status("evaluating drift (embedding new pool items on the first run)"):
        report, transitions = run_drift_evaluation(settings, project)
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        _print_report(report)
    for alert in transitions.raised:
        console.print(f"[bold red]raised[/] {alert.key}: {alert.message}")
    for alert in transitions.cleared:
        console.print(f"[green]cleared[/] {alert.key}")
    if settings.alert_url:
        console.print(f"alert URL: {transitions.delivered} delivered, {transitions.undelivered} pending (retried "
                      "at the next evaluation)")


def _print_report(report: dict) -> None:
    acc = report["reference_accuracy"]
    table = Table(title=f"drift of project {report['project_id']} by {report['window_kind']}, champion "
                        f"{report['champion']}, vs {report['reference']}"
                        + (f" (accuracy {acc:.3f})" if acc is not None else ""))
    for col in ("window", "items", "drift", "p prediction", "p MMD", "p novelty", "p confidence", "predicted",
                "est. accuracy (AC / ATC)", "audit accuracy"):
        table.add_column(col)
    for w in report["windows"]:
        p = {t["name"]: t["p_value"] for t in w["tests"]}
        est, audit = w["estimated_accuracy"], w["audit"]
        status = "[bold red]DRIFT[/]" if w["drifted"] else ("ok" if w["evaluated"] else "[dim]too small[/]")
        table.add_row(
            w["window"], str(w["n_items"]), status,
            *(_p(p[t]) if t in p else "-" for t in ("prediction", "embedding_mmd", "embedding_novelty", "confidence")),
            " ".join(f"{label[:4]} {share:.0%}" for label, share in w["predicted_share"].items()),
            f"{est['average_confidence']:.3f} / {est['atc']:.3f}" if est else "-",
            _audit(audit))
    console.print(table)


@drift_app.command("alerts")
@friendly_errors
def alerts(open_only: Annotated[bool, typer.Option("--open", help="only alerts still raised")] = False,
           limit: int = 50) -> None:
    """Alerts with their raised and cleared times, open ones first."""
    from labelloop.alerts_store import AlertStore

    settings = get_settings()
    with AlertStore(settings.database("alerts")) as store:
        rows = store.open_alerts() if open_only else store.history(limit)
    table = Table(title="alerts")
    for col in ("raised", "cleared", "kind", "window", "severity", "message"):
        table.add_column(col)
    for a in rows[:limit]:
        table.add_row(a.raised_at, a.cleared_at or "[bold red]open[/]", a.kind, a.window or "-", f"{a.severity:.1f}",
                      a.message)
    console.print(table if rows else "no alerts")
