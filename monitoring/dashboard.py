"""``GET /dashboard``: one page that tells a PM whether the labels and the model can be trusted.

The page shows what the JSON endpoints return and nothing else: :func:`collect` gathers one
:class:`DashboardData` from the same functions that serve ``/v1/monitoring/*`` and ``/v1/quality``, and
:func:`render` turns it into HTML. Every number on the page carries the endpoint and JSON path it came
from (``data-source``/``data-path``/``data-value``), so a test or a suspicious reader can check it
against the API.

Charts are Plotly figures drawn by plotly.js from the installed ``plotly`` package, served by the backend
at ``/static/plotly.min.js`` (or inlined, for ``labelloop report``): no CDN, because review networks are
often offline. A section or chart without data renders one sentence that says what is missing.

The page is built from :class:`Block` objects (figures, charts, tables, sentences); each renders itself.
"""

from __future__ import annotations

import functools
import html
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment
from markupsafe import Markup, escape
from plotly.offline import get_plotlyjs
from pydantic import BaseModel

from labelloop.alerts_store import AlertStore
from monitoring import quality as measures
from monitoring.drift_api import NO_REPORT, AlertOut, DriftReport
from monitoring.label_errors import LabelIssue, shown_label
from monitoring.overview import (
    ContextDep,
    ModelSection,
    MonitoringContext,
    Overview,
    Protection,
    Throughput,
    collect_overview,
    collect_protection,
    collect_throughput,
    model_or_note,
)
from monitoring.quality import Group
from monitoring.quality_context import LabelIssues, QualityContext, QualityReport
from monitoring.quality_stats import Proportion
from serving.protocol import HTML_PAGE_ERRORS

log = logging.getLogger(__name__)

PLOTLY_PATH = "/static/plotly.min.js"
OVERVIEW_API, MODEL_API, THROUGHPUT_API = "/v1/monitoring/overview", "/v1/monitoring/model", "/v1/monitoring/throughput"
QUALITY_API, ISSUES_API = "/v1/quality", "/v1/quality/label-issues"
DRIFT_API, ALERTS_API = "/v1/monitoring/drift", "/v1/monitoring/alerts"
PROTECTION_API = "/v1/monitoring/protection"
Format = Literal["int", "pct", "num", "text", "seconds", "time"]


# ------------------------------------------------------------------------------------------ data
class LabelErrorRow(BaseModel):
    issue: LabelIssue
    task_url: str | None = None
    adjudication: str = "not sent for adjudication"
    adjudication_task_id: int | None = None
    adjudication_task_url: str | None = None


class LabelErrors(BaseModel):
    n_labelled: int
    rows: list[LabelErrorRow]
    note: str | None = None


class LabelAccuracy(BaseModel):
    report: QualityReport
    audit_by_day: list[Group]
    acceptance_by_class: list[Group]
    acceptance_by_version: list[Group]


class DriftData(BaseModel):
    report: DriftReport
    alerts: list[AlertOut]
    open_alerts: int


class DashboardData(BaseModel):
    """Everything the page shows; ``labelloop report --json`` writes exactly this."""

    generated_at: str
    project_id: int | None
    overview: Overview
    model: ModelSection
    throughput: Throughput
    label_accuracy: LabelAccuracy | None = None
    label_accuracy_note: str | None = None
    label_errors: LabelErrors | None = None
    label_errors_note: str | None = None
    drift: DriftData | None = None
    drift_note: str | None = None
    protection: Protection | None = None
    protection_note: str | None = None


def adjudication_states(issues: Sequence[LabelIssue], slices: pd.DataFrame, annotations: pd.DataFrame,
                        task_url: Callable[[int], str | None]) -> list[LabelErrorRow]:
    """Where each likely label error stands: not sent, waiting for the second reviewer (an adjudication
    copy exists but nobody labelled it), or adjudicated with the label the second reviewer chose."""
    copies = slices[slices["kind"] == "adjudication"] if len(slices) else slices
    by_source = {int(s): int(t) for s, t in zip(copies.get("source_task_id", []), copies.get("task_id", []),
                                                  strict=True) if pd.notna(s)}
    # once settled, an item's training label is the adjudication copy's: a label the second reviewer
    # confirmed can still rank as suspicious, under the copy's task id
    by_source.update({int(t): int(t) for t in copies.get("task_id", [])})
    labelled = annotations[annotations["label"].notna()].sort_values("updated_at")
    verdicts = labelled.groupby("task_id")["label"].last().to_dict() if len(labelled) else {}
    rows = []
    for issue in issues:
        copy = by_source.get(issue.task_id)
        if copy is None:
            state = "not sent for adjudication"
        elif copy in verdicts:
            state = f"adjudicated: {shown_label(verdicts[copy])}"
        else:
            state = "waiting for a second reviewer"
        rows.append(LabelErrorRow(issue=issue, task_url=task_url(issue.task_id), adjudication=state,
                                  adjudication_task_id=copy, adjudication_task_url=task_url(copy) if copy else None))
    return rows


def _guarded(what: str, compute: Callable[[], Any]) -> tuple[Any, str | None]:
    """One optional section: a failure there becomes that section's sentence, never a broken page."""
    try:
        return compute(), None
    except Exception as e:
        log.exception("dashboard: %s failed", what)
        return None, f"{what} could not be computed: {type(e).__name__}: {e}"


@dataclass
class PageQuality(QualityContext):
    """The label-quality measures for one page load. Each measure reads the journal, joins the slices and
    predicts the audit items (:meth:`QualityContext.table`); the page shows the report and three breakdowns
    of it, which took four such reads and four full reports per load. Here the table is built once per
    load and every figure is computed from it, by the same functions the JSON API calls, so the page and
    ``/v1/quality`` still agree.

    The likely label errors need an out-of-fold model fitted on every training label, the slowest part of a
    load; a reload refits only when the training labels changed (:data:`_LAST_ISSUES`)."""

    _tables: dict[bool, pd.DataFrame] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, base: QualityContext) -> PageQuality:
        return cls(**{f.name: getattr(base, f.name) for f in fields(base)})

    def table(self, with_model: bool = True) -> pd.DataFrame:
        if with_model not in self._tables:
            self._tables[with_model] = super().table(with_model)
        return self._tables[with_model].copy()  # measures may add columns to what they are given

    def label_issues(self, top_k: int | None = None) -> LabelIssues:
        top_k = self.settings.label_error_top_k if top_k is None else top_k
        labels = self.training_labels()
        key = (str(self.settings.journal_path), self.project_id, self.taxonomy.name, self.settings.base_model,
               self.settings.max_length, self.settings.seed, self.min_n, top_k,
               int(pd.util.hash_pandas_object(labels, index=False).sum()))
        cached = _LAST_ISSUES.get(key)
        if cached is None:
            cached = super().label_issues(top_k)
            _LAST_ISSUES.clear()
            _LAST_ISSUES[key] = cached
        return cached


#: the last page's likely label errors, by everything they are computed from (the training labels' hash,
#: the journal, project, model settings and top_k): one entry, a service steers one project
_LAST_ISSUES: dict[tuple, LabelIssues] = {}


def collect_label_accuracy(quality: QualityContext) -> LabelAccuracy | None:
    report = quality.report()
    if report.n_annotations == 0:
        return None
    table, labels = quality.table(), list(quality.taxonomy.labels)
    return LabelAccuracy(report=report, audit_by_day=measures.audit(table, labels, "day", quality.min_n).groups,
                         acceptance_by_class=measures.acceptance(table, labels, "class", quality.min_n).groups,
                         acceptance_by_version=measures.acceptance(table, labels, "version", quality.min_n).groups)


def collect_label_errors(context: MonitoringContext, quality: QualityContext) -> LabelErrors:
    """The page shows each suspicious item's text, and people who review harmful content read this page
    too, so the text is lexicon-masked as in Label Studio's default view (the original stays in
    ``/v1/quality/label-issues`` and one click away in the linked task)."""
    issues = quality.label_issues()
    guard = context.settings.protection_policy
    masked = [issue.model_copy(update={"text": guard.mask_text(issue.text)})
              for issue in issues.issues]
    rows = adjudication_states(masked, context.slice_store.frame(context.project_id),
                               context.journal.annotations(context.project_id), context.task_url)
    return LabelErrors(n_labelled=issues.n_labelled, rows=rows, note=issues.note)


def collect_drift(context: MonitoringContext) -> DriftData | None:
    store = AlertStore.existing(context.settings)
    if store is None:
        return None
    with store:
        latest = store.latest_report()
        if latest is None and not store.history(1):
            return None
        report = DriftReport(available=True, **latest) if latest else DriftReport(available=False, message=NO_REPORT)
        return DriftData(report=report, alerts=[AlertOut.of(a) for a in store.history(200)],
                         open_alerts=len(store.open_alerts()))


def collect(context: MonitoringContext) -> DashboardData:
    model = model_or_note(context)
    overview = collect_overview(context, model=model)
    quality = PageQuality.of(context.quality())
    accuracy, accuracy_note = _guarded("label accuracy", lambda: collect_label_accuracy(quality))
    errors, errors_note = _guarded("likely label errors", lambda: collect_label_errors(context, quality))
    drift, drift_note = _guarded("drift", lambda: collect_drift(context))
    guard, guard_note = _guarded("reviewer protection", lambda: collect_protection(context))
    return DashboardData(
        generated_at=overview.generated_at, project_id=context.project_id, overview=overview, model=model,
        throughput=collect_throughput(context),
        label_accuracy=accuracy,
        label_accuracy_note=accuracy_note or (None if accuracy else "no annotations in the journal yet: label "
                                              "accuracy needs reviewers' labels, honeypots and audit items"),
        label_errors=errors, label_errors_note=errors_note,
        drift=drift,
        drift_note=drift_note or (None if drift else "drift monitoring has not run yet: run `labelloop drift` once "
                                  "a champion exists and the pool is imported"),
        protection=guard, protection_note=guard_note)


# ------------------------------------------------------------------------------------------ formatting
def fmt(value: Any, kind: Format) -> str:
    """How a number reads on the page; the browser test applies the same rules to the API's values."""
    if value is None:
        return "–"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "pct":
        return f"{float(value) * 100:.1f} %"
    if kind == "num":
        return f"{float(value):.3f}"
    if kind == "seconds":
        return f"{float(value):.1f} s"
    if kind == "time":
        return f"{str(value)[:16].replace('T', ' ')} UTC"
    return str(value)


def _interval(p: Proportion) -> str:
    if p.value is None:
        return p.note or f"n={p.n}"
    return f"{p.value * 100:.1f} % ({p.low * 100:.0f}–{p.high * 100:.0f} %, n={p.n})"


# ------------------------------------------------------------------------------------------ blocks
class Block(ABC):
    @abstractmethod
    def render(self) -> Markup: ...


@dataclass
class Stat:
    """One headline number and where it came from."""

    label: str
    value: Any
    kind: Format = "int"
    source: str | None = None
    path: str | None = None
    note: str | None = None

    def render(self) -> Markup:
        attrs = Markup("")
        if self.source:
            attrs = Markup(' data-source="{}" data-path="{}" data-kind="{}" data-value="{}"').format(
                self.source, self.path, self.kind, json.dumps(self.value))
        note = Markup('<div class="note">{}</div>').format(self.note) if self.note else Markup("")
        size = " words" if self.kind in ("text", "time") else ""
        return Markup('<div class="stat"><div class="label">{}</div><div class="value{}"{}>{}</div>{}</div>').format(
            self.label, size, attrs, fmt(self.value, self.kind), note)


@dataclass
class Stats(Block):
    stats: list[Stat]

    def render(self) -> Markup:
        return Markup('<div class="stats">{}</div>').format(Markup("").join(f.render() for f in self.stats))


@dataclass
class Sentence(Block):
    text: str

    def render(self) -> Markup:
        return Markup('<p class="empty">{}</p>').format(self.text)


@dataclass
class Chart(Block):
    """A Plotly figure, or the sentence that says why there is none."""

    key: str
    title: str
    figure: go.Figure | None
    empty: str = ""

    def render(self) -> Markup:
        if self.figure is None:
            return Markup('<div class="chart-empty" data-chart="{}"><h3>{}</h3>{}</div>').format(
                self.key, self.title, Sentence(self.empty).render())
        self.figure.update_layout(template="plotly_white", margin={"l": 50, "r": 20, "t": 10, "b": 40}, height=300,
                                  legend={"orientation": "h", "y": -0.2})
        snippet = self.figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{self.key}",
                                   config={"displaylogo": False, "responsive": True})
        return Markup('<div class="chart" data-chart="{}"><h3>{}</h3>{}</div>').format(self.key, self.title,
                                                                                    Markup(snippet))


@dataclass
class Cell:
    text: Any
    href: str | None = None
    source: str | None = None
    path: str | None = None
    value: Any = None

    def render(self) -> Markup:
        content = Markup('<a href="{}" target="_blank" rel="noopener">{}</a>').format(self.href, self.text) \
            if self.href else escape(self.text)
        if self.source:
            return Markup('<td data-source="{}" data-path="{}" data-value="{}">{}</td>').format(
                self.source, self.path, json.dumps(self.value), content)
        return Markup("<td>{}</td>").format(content)


@dataclass
class Table(Block):
    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    empty: str = ""

    def render(self) -> Markup:
        if not self.rows:
            return Markup('<div class="table-empty" data-table="{}"><h3>{}</h3>{}</div>').format(
                self.key, self.title, Sentence(self.empty).render())
        head = Markup("").join(Markup("<th>{}</th>").format(c) for c in self.columns)
        body = Markup("").join(Markup("<tr>{}</tr>").format(Markup("").join(c.render() for c in row))
                               for row in self.rows)
        return Markup('<div class="table" data-table="{}"><h3>{}</h3><table><thead><tr>{}</tr></thead>'
                      "<tbody>{}</tbody></table></div>").format(self.key, self.title, head, body)


@dataclass
class Section:
    key: str
    title: str
    intro: str
    blocks: list[Block] = field(default_factory=list)

    def render(self) -> Markup:
        return Markup('<section id="{}"><h2>{}</h2><p class="intro">{}</p>{}</section>').format(
            self.key, self.title, self.intro, Markup("").join(b.render() for b in self.blocks))


# ------------------------------------------------------------------------------------------ sections
def _proportion_bars(groups: Sequence[Group], name: str, invert: bool = False) -> go.Figure | None:
    """Bars with Wilson intervals for the groups that have a value (small groups say so in the hover)."""
    shown = [g for g in groups if g.value.value is not None]
    if not shown:
        return None

    def val(p: Proportion) -> float:
        return 1 - p.value if invert else p.value

    y = [val(g.value) for g in shown]
    hi = [(1 - g.value.low if invert else g.value.high) - v for g, v in zip(shown, y, strict=True)]
    lo = [v - (1 - g.value.high if invert else g.value.low) for g, v in zip(shown, y, strict=True)]
    return go.Figure(go.Bar(x=[g.key for g in shown], y=y, name=name,
                            error_y={"type": "data", "array": hi, "arrayminus": lo},
                            hovertext=[f"n={g.value.n}" for g in shown])).update_yaxes(range=[0, 1], tickformat=".0%")


def _missing(groups: Sequence[Group], what: str) -> str:
    small = [g for g in groups if g.value.value is None]
    if not groups:
        return f"no {what} yet"
    return f"not enough data for any {what}: " + "; ".join(f"{g.key}: {g.value.note}" for g in small[:5])


def overview_section(data: DashboardData) -> Section:
    o = data.overview
    stop = o.stopping
    figures = [
        Stat("labels today", o.labels_today, "int", OVERVIEW_API, "labels_today"),
        Stat("labels this week", o.labels_this_week, "int", OVERVIEW_API, "labels_this_week"),
        Stat("backlog (unlabelled pool items)", o.backlog, "int", OVERVIEW_API, "backlog", o.backlog_note),
        Stat("labels still needed?",
               None if stop is None else ("no: stop labelling" if stop.stop else "yes: keep labelling"), "text",
               note=stop.reason if stop else o.stopping_note),
        Stat("champion", o.champion.label if o.champion else None, "text", OVERVIEW_API, "champion.label",
               note=f"promoted {o.champion.promoted_at[:19].replace('T', ' ')} UTC"
               if o.champion and o.champion.promoted_at else o.champion_note),
        Stat("open alerts", len(o.open_alerts), "int", note=o.alerts_note),
    ]
    per_day = o.labels_per_day
    chart = go.Figure(go.Bar(x=[d.day for d in per_day], y=[d.labels for d in per_day], name="labels")) \
        if any(d.labels for d in per_day) else None
    alerts = Table("open-alerts", "Open alerts", ["raised (UTC)", "kind", "window", "message"],
                   [[Cell(a.raised_at[:19]), Cell(a.kind), Cell(a.window or "–"), Cell(a.message)]
                    for a in o.open_alerts], o.alerts_note or "no open alerts")
    return Section("overview", "Overview", "How much was labelled, what is left, whether more labels still pay, "
                   "which model serves, and what needs attention now.",
                   [Stats(figures), Chart("labels-per-day", "Labels per day (UTC)", chart,
                                            "no labels yet: nothing has been annotated in Label Studio"), alerts])


def label_accuracy_section(data: DashboardData) -> Section:
    intro = ("Whether reviewers' labels and the model's accuracy can be trusted. The blind audit is a uniform "
             "random sample shown without a pre-label, so its accuracy is unbiased; accuracy on actively selected "
             "labels is biased (those items are the hard ones) and is shown for comparison only.")
    acc = data.label_accuracy
    if acc is None:
        return Section("label-accuracy", "Label accuracy", intro, [Sentence(data.label_accuracy_note or "")])
    r = acc.report
    figures = Stats([
        Stat("audit accuracy (unbiased)", r.audit.audit.accuracy.value, "pct", QUALITY_API,
               "audit.audit.accuracy.value", r.audit.audit.accuracy.note or f"n={r.audit.audit.n}"),
        Stat("accuracy on active labels (biased)", r.audit.active.accuracy.value, "pct", QUALITY_API,
               "audit.active.accuracy.value", r.audit.active.accuracy.note or f"n={r.audit.active.n}"),
        Stat("suggestions accepted", r.acceptance.overall.value, "pct", QUALITY_API, "acceptance.overall.value",
               r.acceptance.overall.note),
        Stat("reviewer accuracy on gold", r.gold.overall.value, "pct", QUALITY_API, "gold.overall.value",
               r.gold.overall.note),
        Stat("Krippendorff's α", r.agreement.alpha.value, "num", QUALITY_API, "agreement.alpha.value",
               r.agreement.alpha.note or r.agreement.note),
    ])
    audit = [g for g in acc.audit_by_day if g.value.value is not None]
    audit_fig = None
    if audit:
        x = [g.key for g in audit]
        audit_fig = go.Figure([
            go.Scatter(x=x, y=[g.value.high for g in audit], mode="lines", line={"width": 0}, showlegend=False,
                       hoverinfo="skip"),
            go.Scatter(x=x, y=[g.value.low for g in audit], mode="lines", line={"width": 0}, fill="tonexty",
                       fillcolor="rgba(31,119,180,0.2)", name="95 % interval", hoverinfo="skip"),
            go.Scatter(x=x, y=[g.value.value for g in audit], mode="lines+markers", name="audit accuracy"),
        ]).update_yaxes(range=[0, 1], tickformat=".0%")
    bias = r.automation_bias
    bias_fig = None
    pairs = [("agreement with the model", bias.agreement_with_suggestion, bias.agreement_without_suggestion),
             ("accuracy on gold", bias.gold_accuracy_with_suggestion, bias.gold_accuracy_without_suggestion)]
    if any(p.value is not None for _, a, b in pairs for p in (a, b)):
        bias_fig = go.Figure([
            go.Bar(name="with a suggestion", x=[n for n, _, _ in pairs], y=[a.value for _, a, _ in pairs]),
            go.Bar(name="blind (no suggestion)", x=[n for n, _, _ in pairs], y=[b.value for _, _, b in pairs]),
        ]).update_layout(barmode="group").update_yaxes(range=[0, 1], tickformat=".0%")
    kappa = Table("kappa", "Agreement between pairs of reviewers (Cohen's κ)", ["reviewer", "reviewer", "κ", "items"],
                  [[Cell(f"user {k.annotator_a}"), Cell(f"user {k.annotator_b}"), Cell(fmt(k.kappa.value, "num")),
                    Cell(k.kappa.n)] for k in r.agreement.kappa_pairs],
                  r.agreement.note or "no two reviewers labelled the same items yet (overlap items)")
    alpha = Table("alpha-per-class", "Agreement per class (Krippendorff's α)", ["class", "α", "note"],
                  [[Cell(c), Cell(fmt(e.value, "num")), Cell(e.note or "")]
                   for c, e in r.agreement.alpha_per_class.items()], r.agreement.note or "no overlap items yet")
    return Section("label-accuracy", "Label accuracy", intro, [
        figures,
        Chart("audit-over-time", "Audit accuracy per day, with its 95 % interval", audit_fig,
              _missing(acc.audit_by_day, "audit day") if acc.audit_by_day else
              "no audit items labelled yet: the blind audit slice has not been served"),
        Chart("correction-by-class", "Correction rate per class (reviewer changed the pre-label)",
              _proportion_bars(acc.acceptance_by_class, "correction rate", invert=True),
              _missing(acc.acceptance_by_class, "class with suggestions")),
        Chart("correction-by-version", "Correction rate per model version",
              _proportion_bars(acc.acceptance_by_version, "correction rate", invert=True),
              _missing(acc.acceptance_by_version, "model version with suggestions")),
        Chart("gold-by-annotator", "Reviewer accuracy against gold (honeypots, ground truth)",
              _proportion_bars(r.gold.per_annotator, "accuracy"),
              _missing(r.gold.per_annotator, "reviewer with gold answers")),
        Chart("suggestion-vs-blind", "With a suggestion vs blind", bias_fig,
              "not enough annotations with and without a suggestion to compare"),
        kappa, alpha,
    ])


def label_errors_section(data: DashboardData) -> Section:
    intro = ("Labels a model trained on the other labels disagrees with most (cleanlab, out-of-fold). The top "
             "ones go back to Label Studio for a second reviewer; the adjudicated label replaces the original in "
             "training.")
    errors = data.label_errors
    if errors is None:
        return Section("label-errors", "Likely label errors", intro, [Sentence(data.label_errors_note or "")])
    rows = [[Cell(row.issue.rank), Cell(f"task {row.issue.task_id}", row.task_url, ISSUES_API,
                                         f"issues.{i}.task_id", row.issue.task_id),
             Cell(html.unescape(row.issue.text)[:140]), Cell(shown_label(row.issue.label)),
             Cell(shown_label(row.issue.model_label)),
             Cell(fmt(row.issue.quality, "num")),
             Cell(row.adjudication, row.adjudication_task_url)]
            for i, row in enumerate(errors.rows)]
    return Section("label-errors", "Likely label errors", intro, [
        Stats([Stat("labelled tasks checked", errors.n_labelled, "int", ISSUES_API, "n_labelled")]),
        Table("label-errors", "Most suspicious labels first",
              ["rank", "Label Studio task", "text", "label given", "model says", "label quality", "adjudication"],
              rows, errors.note or "no likely label errors found"),
    ])


def model_section(data: DashboardData) -> Section:
    m = data.model
    intro = ("Every model version with its scores on the frozen evaluation set (the same rows for every version, "
             "so versions compare), and every decision of the promotion gate with its reason.")
    versions = [v for v in m.versions if v.macro_f1 is not None]
    chart = None
    if versions:
        x = [f"v{v.version}" for v in versions]
        traces = [go.Scatter(x=x, y=[v.macro_f1 for v in versions], mode="lines+markers", name="macro-F1",
                             line={"width": 3})]
        for label in versions[-1].per_class:
            traces.append(go.Scatter(x=x, y=[v.per_class[label].f1 if label in v.per_class else None
                                             for v in versions], mode="lines+markers", name=f"F1 {label}",
                                     line={"dash": "dot"}))
        chart = go.Figure(traces).update_yaxes(range=[0, 1])
    labels = list(versions[-1].per_class) if versions else []
    version_rows = [
        [Cell(f"v{v.version}", v.run_url), Cell(", ".join(v.aliases) or "–"), Cell(v.created_at[:19].replace("T", " ")),
         Cell(fmt(v.macro_f1, "num"), source=MODEL_API, path=f"versions.{i}.macro_f1", value=v.macro_f1),
         *[Cell(fmt(v.per_class[c].recall if c in v.per_class else None, "num")) for c in labels],
         Cell(v.model_kind or "–")]
        for i, v in enumerate(m.versions)]
    decisions = [[Cell(d.at[:19].replace("T", " ")), Cell(d.action),
                  Cell(f"v{d.candidate}" if d.candidate is not None else "–"),
                  Cell("promoted" if d.promoted else "refused"), Cell(d.reason)] for d in m.decisions]
    return Section("model", "Model", intro, [
        Stats([Stat("champion", f"v{m.champion}" if m.champion is not None else None, "text",
                        note=m.note), Stat("versions", len(m.versions), "int")]),
        Chart("model-versions", "Scores per version on the frozen evaluation set", chart,
              m.note or "no version has scores on the frozen evaluation set yet"),
        Table("versions", "Versions (click one for its MLflow run)",
              ["version", "aliases", "registered (UTC)", "macro-F1", *[f"recall {c}" for c in labels], "kind"],
              version_rows, m.note or "no versions yet"),
        Table("gate", "Gate decisions, newest first", ["at (UTC)", "action", "candidate", "outcome", "reason"],
              decisions, "the gate has not decided anything yet"),
    ])


def drift_section(data: DashboardData) -> Section:
    intro = ("Whether today's content still looks like what the champion was trained on: the predicted-class "
             "mix, the text embeddings and the model's confidence, per window, each against the reference.")
    drift = data.drift
    if drift is None:
        return Section("drift", "Drift", intro, [Sentence(data.drift_note or "")])
    r = drift.report
    blocks: list[Block] = [Stats([
        Stat("open alerts", drift.open_alerts, "int", ALERTS_API, "open"),
        Stat("last evaluated", r.evaluated_at, "time", DRIFT_API, "evaluated_at", r.message or None),
        Stat("reference", r.reference, "text", DRIFT_API, "reference"),
    ])]
    windows = r.windows
    tested = [w for w in windows if w.evaluated]
    p_fig = None
    if tested:
        p_fig = go.Figure(go.Scatter(x=[w.window for w in tested], y=[max(w.min_p_value, 1e-12) for w in tested],
                                     mode="markers", marker={"size": 14, "color": ["#d62728" if w.drifted else "#2ca02c"
                                                                                   for w in tested]},
                                     name="smallest p-value", hovertext=[w.reason for w in tested]))
        p_fig.add_hline(y=r.p_value, line_dash="dash", annotation_text=f"alarm below p={r.p_value}")
        p_fig.update_yaxes(type="log")
    share_fig = None
    if windows and r.labels:
        share_fig = go.Figure([go.Bar(name=label, x=[w.window for w in windows],
                                      y=[w.predicted_share.get(label, 0.0) for w in windows]) for label in r.labels])
        share_fig.update_layout(barmode="stack").update_yaxes(tickformat=".0%")
    acc_windows = [w for w in windows if w.estimated_accuracy]
    acc_fig = None
    if acc_windows:
        x = [w.window for w in acc_windows]
        traces = [go.Scatter(x=x, y=[w.estimated_accuracy.get("average_confidence") for w in acc_windows],
                             mode="lines+markers", name="estimated accuracy (no labels)")]
        audited = [w for w in acc_windows if w.audit]
        if audited:
            traces.append(go.Scatter(
                x=[w.window for w in audited], y=[w.audit.accuracy for w in audited], mode="markers",
                name="blind-audit accuracy", error_y={"type": "data",
                                                      "array": [w.audit.high - w.audit.accuracy for w in audited],
                                                      "arrayminus": [w.audit.accuracy - w.audit.low for w in audited]}))
        acc_fig = go.Figure(traces).update_yaxes(range=[0, 1], tickformat=".0%")
    no_windows = r.message or "the last evaluation found no windows"
    blocks += [
        Chart("drift-p-values", "Smallest drift-test p-value per window (red: drifted; below the line is an alarm)",
              p_fig,
              no_windows if not windows else f"no window has the {r.min_items} items a test needs"),
        Chart("drift-predicted-share", "Predicted class mix per window", share_fig, no_windows),
        Chart("drift-accuracy", "Accuracy estimated without labels, and the blind audit where it exists", acc_fig,
              "no accuracy estimate yet: it needs a calibrated champion and evaluated windows"),
        Table("alerts", "Alerts (raised and cleared)", ["raised (UTC)", "cleared (UTC)", "kind", "window", "message"],
              [[Cell(a.raised_at[:19]), Cell((a.cleared_at or "open")[:19]), Cell(a.kind), Cell(a.window or "–"),
                Cell(a.message)] for a in drift.alerts], "no alert has been raised"),
    ]
    return Section("drift", "Drift", intro, blocks)


def throughput_section(data: DashboardData) -> Section:
    t = data.throughput
    intro = (f"Reviewer speed over the last {t.days} days: labels per hour in which the reviewer worked, and the "
             "median time an item was open in Label Studio (its lead_time).")
    chart = None
    if t.hourly:
        frame = pd.DataFrame([h.model_dump() for h in t.hourly])
        frame["hour"] = frame["hour"].str[:13].str.replace("T", " ") + ":00"  # one bar per clock hour, as text
        chart = go.Figure([go.Bar(name=name, x=group["hour"], y=group["labels"])
                           for name, group in frame.groupby("annotator", sort=True)])
        chart.update_layout(barmode="stack").update_xaxes(type="category", categoryorder="category ascending")
    rows = [[Cell(a.annotator), Cell(a.labels, source=THROUGHPUT_API, path=f"annotators.{i}.labels", value=a.labels),
             Cell(a.active_hours), Cell(fmt(a.labels_per_hour, "num")), Cell(fmt(a.median_seconds, "seconds"))]
            for i, a in enumerate(t.annotators)]
    return Section("throughput", "Throughput", intro, [
        Stats([Stat("median time per item", t.median_seconds, "seconds", THROUGHPUT_API, "median_seconds",
                        t.note), Stat("reviewers active", len(t.annotators), "int")]),
        Chart("labels-per-hour", "Labels per hour, per reviewer (UTC)", chart,
              t.note or f"no labels in the last {t.days} days"),
        Table("annotators", "Per reviewer", ["reviewer", "labels", "active hours", "labels per hour",
                                             "median time per item"], rows,
              t.note or f"no labels in the last {t.days} days"),
    ])


def protection_section(data: DashboardData) -> Section:
    intro = ("The human cost of review: severe items each reviewer saw and masked texts they revealed (today and "
             "the last 7 days, UTC), against the daily cap, and escalations waiting for delivery.")
    g = data.protection
    if g is None:
        return Section("protection", "Reviewer protection", intro, [Sentence(data.protection_note or "")])
    rows = [[Cell(r.reviewer),
             Cell(r.severe_today, source=PROTECTION_API, path=f"reviewers.{i}.severe_today", value=r.severe_today),
             Cell(r.severe_7d, source=PROTECTION_API, path=f"reviewers.{i}.severe_7d", value=r.severe_7d),
             Cell(r.reveals_today, source=PROTECTION_API, path=f"reviewers.{i}.reveals_today", value=r.reveals_today),
             Cell(r.reveals_7d, source=PROTECTION_API, path=f"reviewers.{i}.reveals_7d", value=r.reveals_7d),
             Cell("over the cap" if r.over_cap else "–"), Cell(r.days_over_cap_7d)]
            for i, r in enumerate(g.reviewers)]
    return Section("protection", "Reviewer protection", intro, [
        Stats([Stat("daily cap of severe items", g.daily_severe_cap if g.daily_severe_cap is not None else "none",
                    "int" if g.daily_severe_cap is not None else "text"),
               Stat("reviewers over the cap today", sum(r.over_cap for r in g.reviewers), "int"),
               Stat("escalations open", g.escalations_open, "int", PROTECTION_API, "escalations_open"),
               Stat("escalations delivered", g.escalations_delivered, "int", PROTECTION_API,
                    "escalations_delivered"),
               Stat("masking by default", "on" if g.masking else "off", "text")]),
        Table("reviewer-exposure", "Per reviewer", ["reviewer", "severe today", "severe 7 days", "reveals today",
                                                     "reveals 7 days", "today", "days over cap (7 days)"], rows,
              g.note or ""),
    ])


SECTIONS: tuple[Callable[[DashboardData], Section], ...] = (
    overview_section, label_accuracy_section, label_errors_section, model_section, drift_section,
    throughput_section, protection_section)


# ------------------------------------------------------------------------------------------ page
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>labelloop dashboard</title><link rel="icon" href="data:,">
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1b1f24;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:20px;margin:0} header nav a{color:#cfd8e3;margin-right:14px;text-decoration:none}
main{padding:8px 24px 40px;max-width:1280px} section{background:#fff;border-radius:8px;padding:4px 20px 16px;
margin:16px 0;box-shadow:0 1px 2px rgba(0,0,0,.08)} h2{margin:14px 0 4px} h3{font-size:15px;margin:16px 0 6px}
.intro{color:#57606a;margin:0 0 8px;max-width:900px} .stats{display:flex;flex-wrap:wrap;gap:12px}
.stat{border:1px solid #e1e4e8;border-radius:6px;padding:8px 12px;min-width:150px;max-width:260px}
.stat .label{font-size:12px;color:#57606a} .stat .value{font-size:22px;font-weight:600}
.stat .value.words{font-size:16px} .stat .note,.empty{font-size:12px;color:#8a5a00} .empty{font-size:14px}
.chart{min-height:330px} table{border-collapse:collapse;font-size:13px;width:100%}
td,th{border-bottom:1px solid #e1e4e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} .meta{color:#9aa4af;font-size:12px}
</style>
{{ plotly }}
</head><body>
<header><h1>labelloop</h1><nav>{% for s in sections %}<a href="#{{ s.key }}">{{ s.title }}</a>{% endfor %}</nav>
<span class="meta">generated {{ generated }} UTC{% if project %} · Label Studio project {{ project }}{% endif %}</span>
</header>
<main>{% for s in sections %}{{ s.render() }}{% endfor %}</main>
</body></html>
"""

_env = Environment(autoescape=True)


@functools.cache
def plotly_js() -> str:
    return get_plotlyjs()


def render(data: DashboardData, *, inline_plotly: bool = False) -> str:
    """The page. ``inline_plotly`` puts plotly.js inside it (one self-contained file for
    ``labelloop report``); otherwise the page loads it from the backend at :data:`PLOTLY_PATH`."""
    script = (Markup("<script>{}</script>").format(Markup(plotly_js().replace("</script", "<\\/script")))
              if inline_plotly else Markup('<script src="{}"></script>').format(PLOTLY_PATH))
    sections = [build(data) for build in SECTIONS]
    return _env.from_string(_PAGE).render(plotly=script, sections=sections, project=data.project_id,
                                          generated=data.generated_at[:19].replace("T", " "))


# ------------------------------------------------------------------------------------------ routes
router = APIRouter(tags=["dashboard"])


@router.get("/dashboard", response_class=HTMLResponse, summary="the PM dashboard (HTML)", responses=HTML_PAGE_ERRORS)
def dashboard(context: ContextDep) -> HTMLResponse:
    return HTMLResponse(render(collect(context)))


@router.get(PLOTLY_PATH, include_in_schema=False)
def plotly_script() -> Response:
    """plotly.js from the installed ``plotly`` package, so the page works without internet."""
    return Response(plotly_js(), media_type="application/javascript",
                    headers={"Cache-Control": "private, max-age=86400"})
