"""``ddn-node worklist``: the worklist in a terminal, for administrators.

The same rows, in the same order, as the web page and ``/api/worklist``
(:mod:`ddn_node.pipeline.worklist`). :func:`worklist_bench` is a plain function for
``cli/bench_cmds.py`` to mount as ``bench worklist``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ddn_node.cli.common import exit_unreadable, load_or_exit
from ddn_node.vocabulary import Priority

# Patient names come from DICOM headers: a terminal escape sequence in one would be
# interpreted by the administrator's terminal. C0/C1 controls are shown as '?'.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_STYLE = {
    Priority.STAT: "bold white on red",
    Priority.HIGH: "bold black on dark_orange",
    Priority.ROUTINE: "white on grey37",
    Priority.NOT_ANALYSED: "black on grey70",
}


def _plain(value: str) -> Text:
    # Text (not a markup string): "[bold]" in a name stays literal text.
    return Text(_CONTROL.sub("?", value))


def worklist(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML configuration file (default: $DDN_CONFIG).",
            envvar="DDN_CONFIG",
        ),
    ] = None,
    unread: Annotated[
        bool, typer.Option("--unread/--all", help="Only unread studies (default), or all.")
    ] = True,
    modality: Annotated[
        str | None, typer.Option(help="Only studies with this modality (CR, DX, CT...).")
    ] = None,
    priority: Annotated[
        Priority | None, typer.Option(case_sensitive=False, help="Only this effective priority.")
    ] = None,
    order: Annotated[
        str, typer.Option(help="priority (triage order) or arrival (oldest first).")
    ] = "priority",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Rows to show.")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Rows to skip.")] = 0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the page as JSON (as /api/worklist).")
    ] = False,
) -> None:
    """Print the triage worklist: the same rows and order as the web page."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from ddn_node.pipeline.worklist import WorklistQuery, format_duration, get_worklist, page_json
    from ddn_node.store.engine import make_database

    if order not in ("priority", "arrival"):
        raise typer.BadParameter("choose priority or arrival", param_hint="--order")
    settings = load_or_exit(config)
    query = WorklistQuery(
        unread=unread,
        modality=(modality or "").strip().upper() or None,
        priority=priority,
        order=order,  # type: ignore[arg-type]
        limit=limit,
        offset=offset,
    )
    database = make_database(settings.database.url)
    try:
        page = get_worklist(database, query)
    except (OperationalError, ProgrammingError) as exc:
        exit_unreadable("worklist", exc)
    finally:
        database.dispose()
    if json_output:
        typer.echo(page_json(page).decode())
        return

    table = Table(
        title=f"{page.total}{'' if page.total_exact else '+'} {'unread ' if unread else ''}studies, {order} order"
        + (f", modality {query.modality}" if query.modality else "")
        + (f", {priority.value}" if priority else ""),
        title_justify="left",
        header_style="bold",
        pad_edge=False,
    )
    for column, justify in (
        ("#", "right"),
        ("Priority", "left"),
        ("Score", "right"),
        ("Findings", "left"),
        ("Patient", "left"),
        ("Patient ID", "left"),
        ("Accession", "left"),
        ("Mod.", "left"),
        ("Study time", "left"),
        ("Waiting", "right"),
        ("Status", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for n, row in enumerate(page.rows, start=offset + 1):
        badge = Text(f" {row.priority.value.replace('_', ' ')} ", style=_STYLE[row.priority])
        if row.priority_override:
            badge.append(" override", style="italic")
        elif row.aged:
            badge.append(" aged", style="italic")
        table.add_row(
            str(n),
            badge,
            "" if row.abnormality_score is None else f"{row.abnormality_score:.2f}",
            _plain(", ".join(f"{f.label} {f.probability:.2f}" for f in row.top_findings)),
            _plain(row.patient_name_display),
            _plain(row.patient_id),
            _plain(row.accession_number),
            _plain("/".join(row.modalities)),
            row.study_datetime or "",
            format_duration(row.waiting_s),
            _plain(f"{row.status_text} · {row.read_status.value}"),
        )
    console = Console(soft_wrap=False)
    console.print(table)
    if len(page.rows) == limit and (not page.total_exact or page.total > offset + limit):
        console.print(f"... more with --offset {offset + limit}", highlight=False)


def worklist_bench(
    studies: Annotated[
        list[int] | None, typer.Option("--studies", help="Study counts (repeatable).")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1)] = 5,
    requests: Annotated[int, typer.Option(min=1, help="Requests per view per round.")] = 40,
    postgres: Annotated[
        bool, typer.Option("--postgres/--no-postgres", help="Also PostgreSQL when reachable.")
    ] = True,
) -> None:
    """Worklist latency (p50/p95 of /api/worklist and the page) at 10,000 and 100,000 studies."""
    from ddn_node.bench.worklist import main as bench_main

    args = ["--rounds", str(rounds), "--requests", str(requests)]
    args += ["--studies", *(str(n) for n in (studies or [10_000, 100_000]))]
    if not postgres:
        args.append("--no-postgres")
    raise typer.Exit(bench_main(args))


def register(app: typer.Typer) -> None:
    """Add ``worklist`` to the node's CLI."""
    app.command("worklist")(worklist)
