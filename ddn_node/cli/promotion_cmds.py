"""``ddn-node model``: which model each routing rule runs, a candidate in shadow, promotion.

The same decisions as ``/admin/models`` (:mod:`ddn_node.pipeline.promotion`); a running
node picks each one up at the next study, without a restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddn_node.cli.common import ConfigOption, console, load_or_exit

model_app = typer.Typer(
    help="Which model each routing rule runs; a candidate in shadow; promote, roll back.",
    no_args_is_help=True,
)

By = Annotated[str, typer.Option("--by", help="Who decides (for the audit trail).")]
RuleArg = Annotated[str, typer.Argument(help="The routing rule's name ([[routing]] name).")]


def _run(config: Path | None, change: str, rule: str, **kwargs: object) -> None:
    from ddn_node.pipeline import promotion
    from ddn_node.store.engine import make_database

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        action = getattr(promotion, change)
        models = action(settings, db, rule, **kwargs)
    except promotion.PromotionError as exc:
        console.print(f"[red]error[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        db.dispose()
    shadow = models.shadow.label if models.shadow else "none"
    typer.echo(f"{models.rule}: live {models.live.label}; shadow {shadow}")


@model_app.command("status")
def model_status(config: ConfigOption = None) -> None:
    """Per routing rule: the live model, where it came from, and the candidate beside it."""
    from rich.table import Table

    from ddn_node.pipeline.promotion import status
    from ddn_node.store.engine import make_database

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        rules = status(settings, db)
    finally:
        db.dispose()
    table = Table("rule", "head", "live", "from", "shadow", "changed (UTC)", "by")
    for r in rules:
        a = r.assignment
        table.add_row(
            r.rule,
            r.head,
            r.live.label,
            "promoted" if r.promoted else "config",
            r.shadow.label if r.shadow else "-",
            a.updated_at.strftime("%Y-%m-%d %H:%M:%S") if a.updated_at else "-",
            a.updated_by or "-",
        )
    console.print(table)


@model_app.command("shadow")
def model_shadow(
    rule: RuleArg,
    by: By,
    candidate: Annotated[
        Path | None,
        typer.Argument(help="The candidate's artifact folder (manifest.json + weights)."),
    ] = None,
    stop: Annotated[bool, typer.Option("--stop", help="Take the candidate away.")] = False,
    config: ConfigOption = None,
) -> None:
    """Run a candidate beside the live model on the same studies: stored, never sent."""
    if stop == (candidate is not None):
        console.print("[red]error[/red] give a candidate folder, or --stop", highlight=False)
        raise typer.Exit(2)
    if stop:
        _run(config, "stop_shadow", rule, by=by)
    else:
        _run(config, "start_shadow", rule, candidate=candidate, by=by)


@model_app.command("promote")
def model_promote(
    rule: RuleArg,
    by: By,
    expect_version: Annotated[
        str | None,
        typer.Option(help="Refuse unless the candidate is still this version."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make the rule's candidate live from the next study on (no restart)."""
    _run(config, "promote", rule, by=by, expect_version=expect_version)


@model_app.command("rollback")
def model_rollback(rule: RuleArg, by: By, config: ConfigOption = None) -> None:
    """Make live again what was live before the last promotion."""
    _run(config, "rollback", rule, by=by)


def register(root: typer.Typer) -> None:
    root.add_typer(model_app, name="model")
