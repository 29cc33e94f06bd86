"""``labelloop taxonomy``: check and show a taxonomy file, and migrate a live project to a changed one.

A command group of the CLI, registered only by :mod:`labelloop.cli` (a composition point): like the CLI it
imports the registry inside the command that needs it, so the data layer itself never imports training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from labelloop.cli_errors import CliError, err, friendly_errors

taxonomy_app = typer.Typer(help="Label taxonomies as files: check, show, migrate.", no_args_is_help=True)
console = Console()

FileArg = Annotated[str, typer.Argument(help="a taxonomy file (TOML) or a built-in name")]


def _load_or_exit(file: str):
    """The taxonomy, or every problem in the file as its own ``error:`` line (exit 2), so that one run of
    ``check`` shows all that needs fixing."""
    from labelloop.taxonomy import TaxonomyError, load_taxonomy

    try:
        return load_taxonomy(file)
    except TaxonomyError as e:
        for problem in e.problems:
            err.print(f"[bold red]error:[/] {escape(problem)}")
        raise typer.Exit(2) from None


def _summary(taxonomy) -> str:
    none = f", none label {taxonomy.none_label!r}" if taxonomy.none_label else ""
    return (f"{taxonomy.name}: {taxonomy.kind}-label, {len(taxonomy.labels)} labels "
            f"({', '.join(taxonomy.labels)}){none}; fingerprint {taxonomy.fingerprint}")


@taxonomy_app.command("check")
@friendly_errors
def check(
    file: FileArg,
    label_config: Annotated[Path | None, typer.Option(help="also check this hand-edited Label Studio config "
                                                      "against the taxonomy")] = None,
) -> None:
    """Validate a taxonomy file: exit 0 with a one-line summary, or 2 with an error line per problem
    (the line and field of each)."""
    from labelloop.taxonomy import project_label_config

    taxonomy = _load_or_exit(file)
    if label_config is not None:
        project_label_config(taxonomy, label_config)
    console.print(f"ok: {escape(_summary(taxonomy))}"
                  + (f"; {label_config} matches it" if label_config is not None else ""), soft_wrap=True)
    for line in _policy_lines(taxonomy):
        console.print(f"  {escape(line)}", soft_wrap=True)


def _policy_lines(taxonomy) -> list[str]:
    """The file's review policy sections, one line each (none: the settings' apply)."""
    lines = []
    if taxonomy.policy is not None:
        sev, esc = taxonomy.policy.severity, taxonomy.policy.escalation
        lines.append(f"severity: {' < '.join(sev.levels)}; severe from {sev.severe_from}"
                     + (f"; severe labels {', '.join(sev.severe_labels)}" if sev.severe_labels else "")
                     + ("; required" if sev.required else ""))
        lines.append("escalation: " + ("off" if not esc.enabled else
                                       f"reasons {', '.join(esc.reasons) if esc.reasons else '(free text)'}"
                                       + ("; reason required" if esc.require_reason else "")))
    if taxonomy.protection is not None:
        guard = taxonomy.protection
        lines.append(f"protection: lexicon {guard.lexicon or 'off'}; blur at {guard.blur_threshold:.2f}; daily "
                     f"severe cap {guard.daily_severe_cap if guard.daily_severe_cap is not None else 'none'}")
    return lines


@taxonomy_app.command("show")
@friendly_errors
def show(
    file: FileArg,
    xml: Annotated[bool, typer.Option("--xml", help="print the Label Studio config generated from it")] = False,
) -> None:
    """Print a taxonomy: its labels with description, hotkey and colour; its type and none label."""
    from labelloop.taxonomy import review_label_config

    taxonomy = _load_or_exit(file)
    if xml:
        print(review_label_config(taxonomy, taxonomy.policy, masked=taxonomy.protection is not None), end="")
        return
    table = Table(title=f"{taxonomy.title} ({taxonomy.name}, {taxonomy.kind}-label)",
                  caption=f"none label: {taxonomy.none_label or '-'} · fingerprint {taxonomy.fingerprint}")
    for col in ("label", "description", "hotkey", "colour"):
        table.add_column(col)
    rows = zip(taxonomy.choices, taxonomy.resolved_hints(), taxonomy.resolved_hotkeys(),
               taxonomy.resolved_colours(), strict=True)
    for label, hint, hotkey, colour in rows:
        swatch = f"[{colour}]■[/] {colour}" if colour else "-"
        name = f"{label} (none of these)" if label == taxonomy.none_label else label
        table.add_row(escape(name), escape(hint), escape(hotkey or "-"), swatch)
    console.print(table)
    for line in _policy_lines(taxonomy):
        console.print(escape(line), soft_wrap=True)


@taxonomy_app.command("migrate")
@friendly_errors
def migrate(
    to: Annotated[str, typer.Option("--to", help="the new taxonomy file")],
    label_map: Annotated[str | None, typer.Option(help="old=new for every old label the new taxonomy does not "
                                                  "have under the same name (or a .toml/.json/.csv file)")] = None,
    model_name: Annotated[str | None, typer.Option(help="registered model for the new taxonomy (default: "
                                                   "labelloop-<new name>, with the fingerprint appended when "
                                                   "that is the current model's name)")] = None,
    taxonomy: Annotated[str | None, typer.Option(help="the current taxonomy (default: settings)")] = None,
) -> None:
    """Start a new model line for a changed taxonomy: relabel the frozen evaluation set through the label map
    and freeze it under a new registered model. The old model line, the journal and the Label Studio project
    are left as they are; the command prints the steps that move the collected labels and the project over."""
    from labelloop.config import get_settings
    from labelloop.data import parse_label_map
    from labelloop.taxonomy import get_taxonomy, migration_map, relabel, taxonomy_setting
    from training.registry import Registry

    settings = get_settings()
    if taxonomy:
        settings = settings.model_copy(update={"taxonomy": taxonomy_setting(taxonomy)})
    new = _load_or_exit(to)
    old = get_taxonomy(settings.taxonomy)
    if old.fingerprint == new.fingerprint:
        raise CliError(f"{to} has the same labels as the current taxonomy {old.name!r} (fingerprint "
                       f"{old.fingerprint}): nothing to migrate; descriptions, hotkeys and colours can change in place")
    mapping = migration_map(old, new, parse_label_map(label_map))
    old_registry = Registry(settings)
    frozen = old_registry.eval_set()
    if frozen is None:
        raise CliError(f"model {old_registry.name!r} has no frozen evaluation set: nothing to migrate; set "
                       f"taxonomy = {to!r} and train")
    recorded = old_registry.taxonomy_fingerprint()
    if recorded is not None and recorded != old.fingerprint:
        raise CliError(f"model {old_registry.name!r} was built for taxonomy fingerprint {recorded}, not the current "
                       f"taxonomy's {old.fingerprint}: pass --taxonomy with the file it was built with")
    name = model_name or f"labelloop-{new.name.replace('_', '-')}"
    if name == old_registry.name:
        name = f"{name}-{new.fingerprint[:8]}"
    new_settings = settings.model_copy(update={"taxonomy": taxonomy_setting(to), "model_name": name})
    new_registry = Registry(new_settings)
    if new_registry.eval_set() is not None:
        raise CliError(f"model {name!r} already has a frozen evaluation set (migrated before?): pass another "
                       "--model-name, or use it as it is")
    eval_id, frame = frozen
    relabelled = frame.assign(label=[relabel(label, mapping, new) for label in frame["label"]])
    new_id, _ = new_registry.freeze_eval_set(relabelled, f"migrated:{old_registry.name}:{eval_id}")
    changed = {k: v for k, v in mapping.items() if k != v and v is not None}
    console.print(f"froze evaluation set {new_id} ({len(relabelled)} rows, relabelled {changed or 'by name'}) "
                  f"for model [bold]{name}[/] (taxonomy {new.name}, fingerprint {new.fingerprint}); "
                  f"{old_registry.name} is unchanged")
    map_arg = ",".join(f"{k}={v}" for k, v in changed.items())
    console.print("next:\n"
                  f"  1. set taxonomy = \"{new_settings.taxonomy}\" and model_name = \"{name}\" (labelloop.toml)\n"
                  f"  2. labelloop loop export labels.parquet --taxonomy {old.source or old.name}   "
                  "(the labels collected so far, in the old taxonomy)\n"
                  "  3. labelloop train --dataset labels.parquet --mode fast --promote"
                  + (f" --label-map {map_arg}" if map_arg else "") + "\n"
                  "  4. labelloop loop import --title '<a new title>' ...   (a project with the new choices; "
                  "Label Studio keeps the old project's answers in the old labels)")
