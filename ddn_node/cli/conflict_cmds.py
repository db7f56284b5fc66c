"""``ddn-node conflicts``: instances refused because their identity contradicts the store.

The same list as the admin page ``/admin/conflicts``; discarding deletes the quarantined
copy and is audited under the name given (the sender still has the instance).
"""

from __future__ import annotations

from typing import Annotated

import typer

from ddn_node.cli.common import ConfigOption, console, load_or_exit

conflicts_app = typer.Typer(
    help="Instances refused for an identity conflict (kept in quarantine).", no_args_is_help=True
)


@conflicts_app.command("list")
def conflicts_list(config: ConfigOption = None) -> None:
    """Show the open refusals: why, from whom, and which study already holds the UID."""
    from rich.table import Table

    from ddn_node.store.engine import make_database
    from ddn_node.store.quarantine import EXPLANATIONS, open_conflicts
    from ddn_node.vocabulary import ConflictKind

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        with db.read() as session:
            rows = list(open_conflicts(session))
    finally:
        db.dispose()
    table = Table(
        "id", "at (UTC)", "why", "from", "SOP Instance UID", "sent study", "held by study"
    )
    for c in rows:
        table.add_row(
            str(c.id),
            c.at.strftime("%Y-%m-%d %H:%M:%S"),
            EXPLANATIONS.get(ConflictKind(c.kind), c.kind),
            c.calling_ae,
            c.sop_instance_uid,
            c.study_uid,
            c.existing_study_uid,
        )
    console.print(table)
    typer.echo(f"{len(rows)} open conflict(s)")


@conflicts_app.command("discard")
def conflicts_discard(
    conflict_id: Annotated[int, typer.Argument(help="The id from 'ddn-node conflicts list'.")],
    by: Annotated[str, typer.Option(help="Who decides (for the audit trail).")],
    config: ConfigOption = None,
) -> None:
    """Delete one quarantined copy after the sending system was corrected."""
    from ddn_node.dicom.spool import Spool
    from ddn_node.store.engine import make_database
    from ddn_node.store.quarantine import mark_discarded

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        with db.session() as session:
            path = mark_discarded(session, conflict_id, by)
    finally:
        db.dispose()
    if path is None:
        console.print(f"[red]no open conflict {conflict_id}[/red]")
        raise typer.Exit(1)
    if path:
        # After the row: a crash in between leaves an unreferenced file, never a row
        # naming a missing one.
        Spool(settings.node.spool_dir).path(path).unlink(missing_ok=True)
    typer.echo(f"conflict {conflict_id} discarded")


def register(root: typer.Typer) -> None:
    root.add_typer(conflicts_app, name="conflicts")
