"""Commands that run and operate the node: serve, config, db, deliveries, send, echo,
the demo, the conformance statement, sample studies and password hashes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ddn_node.cli.common import (
    ConfigOption,
    console,
    credentials_or_exit,
    load_or_exit,
    setup_logging,
)
from ddn_node.logs import configure_logging
from ddn_node.vocabulary import HeatMapPolicy

app = typer.Typer()
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Result deliveries to the PACS and other systems.", no_args_is_help=True
)


@app.command()
def serve(
    config: ConfigOption = None,
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="scp, worker or web (repeatable); default: all three."),
    ] = None,
) -> None:
    """Run the node: DICOM SCP, scheduler, worker and web part."""
    from ddn_node.cli.serve import ROLES, StartupError, serve_forever

    settings = load_or_exit(config, check_files=True)
    guessable = credentials_or_exit(settings, config)
    setup_logging(settings)
    if guessable:
        import structlog

        log = structlog.get_logger("ddn_node.serve")
        for problem in guessable:
            log.warning("security.demo_credentials", key=problem.key, problem=problem.message)
    roles = frozenset(role or ROLES)
    if "all" in roles:
        roles = frozenset(ROLES)
    try:
        serve_forever(settings, roles)
    except StartupError as exc:
        console.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(1) from None
    except OSError as exc:
        console.print(f"[red]cannot start:[/red] {exc}")
        raise typer.Exit(1) from None


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file, the paths it names and its credentials."""
    settings = load_or_exit(config, check_files=True)
    guessable = credentials_or_exit(settings, config)
    console.print(
        f"[green]ok[/green] {config or '(defaults)'}: AE {settings.node.ae_title} on port "
        f"{settings.node.port}, {len(settings.peers)} peer(s), {len(settings.routing)} routing rule(s), "
        f"{len(settings.destinations)} destination(s)"
        + (f"; DEMO with {len(guessable)} guessable credential(s)" if guessable else ""),
        highlight=False,
    )


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOption = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Apply schema migrations to the configured database."""
    from ddn_node.store.engine import make_database
    from ddn_node.store.migrate import current_revision, upgrade

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        before = current_revision(db)
        upgrade(db, revision)
        after = current_revision(db)
    finally:
        db.dispose()
    console.print(f"database at {after} (was {before or 'empty'})", highlight=False)


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the schema revision of the configured database."""
    from ddn_node.store.engine import make_database
    from ddn_node.store.migrate import current_revision, head_revision

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        typer.echo(f"current={current_revision(db)} head={head_revision()}")
    finally:
        db.dispose()


@deliveries_app.command("retry")
def deliveries_retry(
    config: ConfigOption = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    refused: Annotated[
        bool,
        typer.Option(help="Also the refused ones (after the destination was set up to take them)."),
    ] = False,
    uncommitted: Annotated[
        bool,
        typer.Option(help="Also sent ones whose storage commitment the destination declined."),
    ] = False,
) -> None:
    """Put failed deliveries back in the queue (after the PACS problem is fixed)."""
    from ddn_node.pipeline.delivery import retry_failed
    from ddn_node.store.engine import make_database

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        n = retry_failed(db, destination, refused=refused, uncommitted=uncommitted)
    finally:
        db.dispose()
    console.print(f"{n} deliver{'y' if n == 1 else 'ies'} queued again", highlight=False)


@deliveries_app.command("list")
def deliveries_list(
    config: ConfigOption = None,
    state: Annotated[
        str | None, typer.Option(help="pending, sending, sent, refused or failed.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows, newest first.")] = 50,
) -> None:
    """Show deliveries with their state and the peer's last status."""
    from rich.table import Column, Table
    from sqlalchemy import select

    from ddn_node.store.engine import make_database
    from ddn_node.store.models import Delivery

    settings = load_or_exit(config)
    db = make_database(settings.database.url)
    try:
        with db.read() as session:
            stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
            if state:
                stmt = stmt.where(Delivery.state == state)
            rows = list(session.scalars(stmt))
    finally:
        db.dispose()
    header = (
        "id",
        "destination",
        "kind",
        "state",
        "commitment",
        "attempts",
        "last status",
        "error",
        "SOP Instance UID",
    )
    lines = [
        (
            str(d.id),
            d.destination,
            d.kind,
            d.state,
            d.commitment,
            str(d.attempts),
            _status_text(d.kind, d.last_status),
            d.last_error[:60],
            d.sop_instance_uid,
        )
        for d in rows
    ]
    if not sys.stdout.isatty():
        # Piped (grep, a script, a ticket): whole values, tab-separated, one row per line.
        typer.echo("\t".join(header))
        for line in lines:
            typer.echo("\t".join(line))
        return
    # In a terminal the short columns stay whole; the long ones fold rather than being cut
    # (a state shortened to "com…" tells the operator nothing).
    table = Table(
        *(Column(h, no_wrap=True) for h in header[:7]),
        *(Column(h, overflow="fold") for h in header[7:]),
    )
    for line in lines:
        table.add_row(*line)
    Console(soft_wrap=True).print(table)


def _status_text(kind: str, status: int | None) -> str:
    """DIMSE statuses read in hex; HTTP and HL7 statuses as they are."""
    from ddn_node.vocabulary import ResultKind

    if status is not None and kind in {k.value for k in ResultKind}:
        return f"0x{status:04X}"
    return str(status or "")


def _parse_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise typer.BadParameter("expected HOST:PORT")
    return host or "127.0.0.1", int(port)


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to send.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="HOST:PORT of the receiving SCP.")],
    called_aet: Annotated[
        str, typer.Option("--called-aet", "--aec", help="Called AE title.")
    ] = "DDN_NODE",
    calling_aet: Annotated[
        str, typer.Option("--calling-aet", "--aet", help="Our AE title.")
    ] = "DDN_SEND",
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA to verify a TLS peer (enables TLS).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Client certificate for mutual TLS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client key for mutual TLS.")] = None,
) -> None:
    """Send DICOM files with C-STORE (progress bar; exit 1 if any was not stored)."""
    from tqdm import tqdm

    from ddn_node.dicom.scu import Peer, StoreSCU, client_tls_context, dicom_files

    host, port = _parse_target(to)
    files = [f for p in paths for f in dicom_files(p)]
    tls = client_tls_context(tls_ca, tls_cert, tls_key) if tls_ca else None
    scu = StoreSCU(calling_aet, Peer(called_aet, host, port, tls))
    with tqdm(total=len(files), unit="file", desc=f"C-STORE to {called_aet}@{host}:{port}") as bar:
        outcomes = scu.send(files, progress=lambda _o: bar.update(1))
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        console.print(f"[red]not stored[/red] {outcome.path}: {outcome.error}", highlight=False)
    console.print(
        f"{len(outcomes) - len(failed)} stored, {len(failed)} not stored", highlight=False
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def echo(
    to: Annotated[str, typer.Option("--to", help="HOST:PORT of the peer.")],
    called_aet: Annotated[str, typer.Option("--called-aet", "--aec")] = "DDN_NODE",
    calling_aet: Annotated[str, typer.Option("--calling-aet", "--aet")] = "DDN_SEND",
) -> None:
    """C-ECHO a peer (verification)."""
    from ddn_node.dicom.scu import Peer, StoreSCU

    host, port = _parse_target(to)
    status = StoreSCU(calling_aet, Peer(called_aet, host, port)).echo()
    if status != 0:
        console.print(f"[red]echo failed[/red] (status {status})")
        raise typer.Exit(1)
    console.print("echo ok")


@app.command("sample-studies")
def sample_studies(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("sample_studies"),
    size: Annotated[int, typer.Option(help="Image rows and columns.")] = 512,
) -> None:
    """Generate the synthetic sample chest studies (deterministic)."""
    from ddn_node.dicom.samples import write_samples

    written = write_samples(out, size)
    console.print(f"wrote {len(written)} files under {out}", highlight=False)


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="Base configuration.")] = Path(
        "deploy/ddn-node.example.toml"
    ),
    studies: Annotated[Path, typer.Option(help="Studies to send.")] = Path("sample_studies"),
    home: Annotated[
        Path, typer.Option(help="Where the demo keeps its database, spool and Orthanc.")
    ] = Path("var/demo"),
    orthanc: Annotated[
        bool, typer.Option(help="Use a local Orthanc as the PACS when installed.")
    ] = True,
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop after the summary (for scripts and tests).")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Give up waiting for results after this many seconds.")
    ] = 600,
    heat_maps: Annotated[
        HeatMapPolicy,
        typer.Option(
            help="evidence (the default: only maps whose localisation beat the baselines), "
            "all (every finding, to see what the maps look like; they carry no evidence), or none."
        ),
    ] = HeatMapPolicy.EVIDENCE,
) -> None:
    """The whole node on this machine: node + local Orthanc + OHIF + the sample studies."""
    from ddn_node.demo.run import run_demo

    settings = load_or_exit(config, check_files=True)
    configure_logging(settings.logging.level, settings.logging.json_output, home / "ddn-node.log")
    raise typer.Exit(
        run_demo(
            config,
            studies,
            home,
            use_orthanc=orthanc,
            heat_maps=heat_maps,
            exit_when_done=exit_when_done,
            timeout_s=timeout,
        )
    )


@app.command()
def conformance(
    out: Annotated[Path | None, typer.Option(help="Write here instead of standard output.")] = None,
) -> None:
    """Print the DICOM Conformance Statement (PS3.2 layout) generated from the code."""
    from ddn_node.dicom.conformance import render

    text = render()
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text)
        console.print(f"wrote {out}", highlight=False)


@app.command("hash-password")
def hash_password(
    password: Annotated[
        str,
        typer.Option(prompt=True, hide_input=True, confirmation_prompt=True, help="The password."),
    ],
) -> None:
    """Print an argon2 hash for a web user's password_hash."""
    from argon2 import PasswordHasher

    typer.echo(PasswordHasher().hash(password))


def register(root: typer.Typer) -> None:
    root.registered_commands.extend(app.registered_commands)
    root.add_typer(config_app, name="config")
    root.add_typer(db_app, name="db")
    root.add_typer(deliveries_app, name="deliveries")
