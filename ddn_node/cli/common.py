"""What every ``ddn-node`` command shares: the console, the --config option, loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from ddn_node.config import (
    ConfigError,
    ConfigProblem,
    Settings,
    check_paths,
    insecure_settings,
    load_settings,
)
from ddn_node.logs import configure_logging

console = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (default: $DDN_CONFIG, else built-in defaults).",
        envvar="DDN_CONFIG",
    ),
]


def load_or_exit(config: Path | None, *, check_files: bool = False) -> Settings:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        for problem in exc.problems:
            console.print(f"[red]error[/red] {problem}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    if check_files:
        problems = check_paths(settings, str(config) if config else "(defaults)")
        if problems:
            for problem in problems:
                console.print(f"[red]error[/red] {problem}", highlight=False)
            raise typer.Exit(2)
    return settings


def credentials_or_exit(settings: Settings, config: Path | None) -> list[ConfigProblem]:
    """Exit 2 on guessable credentials unless the configuration says it is a demo; in a
    demo, print each as a warning and return them (serve logs them, pages show them)."""
    problems = insecure_settings(settings, str(config) if config else "(defaults)")
    if problems and not settings.demo:
        for problem in problems:
            console.print(f"[red]error[/red] {problem}", highlight=False)
        console.print(
            "guessable credentials are accepted only in a demo (demo = true, which every "
            "page and log line then shows)",
            highlight=False,
        )
        raise typer.Exit(2)
    for problem in problems:
        console.print(f"[yellow]demo[/yellow] {problem}", highlight=False)
    return problems


def exit_unreadable(what: str, exc: Exception) -> NoReturn:
    """Exit 1 saying the database could not be read, and the likely cause."""
    orig = getattr(exc, "orig", None)
    console.print(
        f"[red]cannot read the {what}:[/red] {type(orig).__name__ if orig else exc}; "
        "is the database migrated ('ddn-node db upgrade')?",
        highlight=False,
    )
    raise typer.Exit(1) from None


def setup_logging(settings: Settings) -> None:
    configure_logging(
        settings.logging.level,
        settings.logging.json_output,
        settings.logging.file,
        demo=settings.demo,
    )
