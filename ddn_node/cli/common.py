"""What every ``ddn-node`` command shares: the console, the --config option, loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ddn_node.config import ConfigError, Settings, check_paths, load_settings
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


def setup_logging(settings: Settings) -> None:
    configure_logging(settings.logging.level, settings.logging.json_output, settings.logging.file)
