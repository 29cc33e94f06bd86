"""``labelloop quality``: the label-quality measures in the terminal (rich tables) or as JSON.

Registered on the main ``labelloop`` app by :mod:`labelloop.cli`; it reads the same
:class:`~monitoring.quality_context.QualityContext` as ``/v1/quality``, so both report the same numbers.
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from labelloop.cli_errors import err, friendly_errors
from labelloop.config import Settings, get_settings
from monitoring.label_errors import shown_label
from monitoring.quality import BREAKDOWNS, Breakdown, Group, ModelScores
from monitoring.quality_stats import Estimate, Proportion

quality_app = typer.Typer(help="Label accuracy: suggestion acceptance, gold accuracy, agreement, the blind audit, "
                               "likely label errors.", pretty_exceptions_enable=False)
console = Console()

ByOpt = Annotated[str | None, typer.Option("--by", help=f"break measures down by: {' | '.join(BREAKDOWNS)}")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
ProjectOpt = Annotated[int | None, typer.Option("--project", help="Label Studio project id (default: settings)")]
TaxonomyOpt = Annotated[str | None, typer.Option(help="label taxonomy (default: settings)")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", min=0, help="how many (default: label_error_top_k)")]


def _settings(taxonomy: str | None) -> Settings:
    settings = get_settings()
    return settings.model_copy(update={"taxonomy": taxonomy}) if taxonomy else settings


def _breakdown(by: str | None) -> Breakdown | None:
    if by is not None and by not in BREAKDOWNS:
        raise ValueError(f"--by must be one of {', '.join(BREAKDOWNS)}, not {by!r}")
    return by  # type: ignore[return-value]


def _context(taxonomy: str | None, project: int | None):
    from monitoring.quality_context import open_context

    return open_context(_settings(taxonomy), project)


def _print_json(model: BaseModel | list[BaseModel]) -> None:
    if isinstance(model, list):
        console.print_json(data=[m.model_dump(mode="json") for m in model])
    else:
        console.print_json(model.model_dump_json())


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _interval(m: Proportion | Estimate, percent: bool = True) -> str:
    if m.low is None or m.high is None:
        return ""
    fmt = _pct if percent else (lambda v: f"{v:.3f}")
    return f"{fmt(m.low)} – {fmt(m.high)}"


def _row(table: Table, name: str, m: Proportion | Estimate, percent: bool = True) -> None:
    value = (_pct(m.value) if percent else ("—" if m.value is None else f"{m.value:.3f}"))
    count = f"{m.k}/{m.n}" if isinstance(m, Proportion) else str(m.n)
    table.add_row(name, value, _interval(m, percent), count, m.note or "")


def _measure_table(title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("measure", "value", "95% interval", "n", "note"):
        table.add_column(column, overflow="fold")
    return table


def _groups_table(title: str, groups: list[Group]) -> Table:
    table = _measure_table(title)
    for g in groups:
        _row(table, g.key, g.value)
    return table


def _scores_rows(table: Table, scores: ModelScores) -> None:
    tag = "audit" if scores.unbiased else "active (biased)"
    _row(table, f"{tag}: accuracy", scores.accuracy)
    _row(table, f"{tag}: macro-F1", scores.macro_f1, percent=False)
    if scores.micro_f1 is not None:
        _row(table, f"{tag}: micro-F1", scores.micro_f1, percent=False)
    for label, recall in scores.recall.items():
        _row(table, f"{tag}: recall {label}", recall)


@quality_app.callback(invoke_without_command=True)
@friendly_errors
def quality(ctx: typer.Context, by: ByOpt = None, as_json: JsonOpt = False, project: ProjectOpt = None,
            taxonomy: TaxonomyOpt = None) -> None:
    """Every measure that needs no model run: acceptance, gold accuracy, agreement, the audit, automation bias."""
    if ctx.invoked_subcommand is not None:
        return
    breakdown = _breakdown(by)
    with _context(taxonomy, project) as qc:
        report = qc.report(breakdown)
    if as_json:
        _print_json(report)
        return
    console.print(f"project {report.project_id if report.project_id is not None else '(all)'}: "
                  f"{report.n_annotations} labels from {report.n_annotators} annotator(s)")
    summary = _measure_table("label quality")
    _row(summary, "suggestion acceptance", report.acceptance.overall)
    summary.add_row("labels made without a suggestion", str(report.acceptance.without_suggestion), "", "", "")
    _row(summary, "reviewer accuracy on gold" + (" (exact set)" if report.multi_label else ""), report.gold.overall)
    for label, accuracy in report.gold.per_label_accuracy.items():
        _row(summary, f"gold accuracy, {label}", accuracy)
    for label, recall in report.gold.per_label_recall.items():
        _row(summary, f"gold recall, {label}", recall)
    _row(summary, "Krippendorff's alpha (nominal)", report.agreement.alpha, percent=False)
    for label, alpha in report.agreement.alpha_per_class.items():
        _row(summary, f"alpha, {label} vs rest", alpha, percent=False)
    _scores_rows(summary, report.audit.audit)
    _scores_rows(summary, report.audit.active)
    bias = report.automation_bias
    _row(summary, "agrees with model, pre-label shown", bias.agreement_with_suggestion)
    _row(summary, "agrees with model, no pre-label", bias.agreement_without_suggestion)
    _row(summary, "gold accuracy, pre-label shown", bias.gold_accuracy_with_suggestion)
    _row(summary, "gold accuracy, no pre-label", bias.gold_accuracy_without_suggestion)
    for name, seconds in (("median seconds per label, pre-label shown", bias.median_seconds_with_suggestion),
                          ("median seconds per label, no pre-label", bias.median_seconds_without_suggestion)):
        summary.add_row(name, "—" if seconds is None else f"{seconds:.1f}", "", "", "")
    console.print(summary)
    if report.audit.note:
        err.print(f"[bold yellow]warning:[/] {escape(report.audit.note)}")
    if report.gold.per_annotator:
        console.print(_groups_table("reviewer accuracy on gold, per annotator", report.gold.per_annotator))
    if report.agreement.kappa_pairs:
        kappa = _measure_table("Cohen's kappa per pair of annotators")
        for pair in report.agreement.kappa_pairs:
            _row(kappa, f"{pair.annotator_a} × {pair.annotator_b}", pair.kappa, percent=False)
        console.print(kappa)
    if breakdown:
        console.print(_groups_table(f"suggestion acceptance by {breakdown}", report.acceptance.groups))
        console.print(_groups_table(f"reviewer accuracy on gold by {breakdown}", report.gold.groups))
        console.print(_groups_table(f"champion accuracy on the audit by {breakdown}", report.audit.groups))
    matrix = report.acceptance.confusion
    if matrix.n:
        confusion = Table(title="model suggestion (rows) vs reviewer's label (columns)", title_justify="left")
        confusion.add_column("")
        for label in matrix.labels:
            confusion.add_column(label, justify="right")
        for label, counts in zip(matrix.labels, matrix.counts, strict=True):
            confusion.add_row(label, *map(str, counts))
        console.print(confusion)


@quality_app.command("crowdlab")
@friendly_errors
def crowdlab(as_json: JsonOpt = False, project: ProjectOpt = None, taxonomy: TaxonomyOpt = None) -> None:
    """CROWDLAB consensus labels and per-annotator quality (embeds the multi-annotated items)."""
    with _context(taxonomy, project) as qc:
        result = qc.crowdlab()
    if as_json:
        _print_json(result)
        return
    if result.note:
        console.print(f"CROWDLAB over {result.n_items} item(s): {result.note}")
        return
    table = Table(title=f"annotator quality (CROWDLAB, {result.n_items} items)", title_justify="left")
    for column in ("annotator", "labels", "quality", "agrees with consensus", "worst class"):
        table.add_column(column)
    for a in result.annotators:
        table.add_row(str(a.annotator), str(a.n_labels), "—" if a.quality is None else f"{a.quality:.3f}",
                      _pct(a.agreement_with_consensus), a.worst_class or "")
    console.print(table)


@quality_app.command("issues")
@friendly_errors
def issues(top_k: TopKOpt = None, as_json: JsonOpt = False, project: ProjectOpt = None,
           taxonomy: TaxonomyOpt = None) -> None:
    """Likely label errors (cleanlab, out-of-fold probabilities), most suspicious first."""
    with _context(taxonomy, project) as qc:
        result = qc.label_issues(top_k)
    if as_json:
        _print_json(result)
        return
    if result.note:
        console.print(f"{result.n_labelled} labelled task(s): {result.note}")
        return
    table = Table(title=f"likely label errors among {result.n_labelled} labels", title_justify="left")
    for column in ("rank", "task", "label", "model says", "quality", "text"):
        table.add_column(column, overflow="fold")
    for i in result.issues:
        table.add_row(str(i.rank), str(i.task_id), shown_label(i.label), shown_label(i.model_label),
                      f"{i.quality:.3f}", escape(i.text[:80]))
    console.print(table)
