"""``ddn-node worklist``: the same order as the API, patient data printed as inert text."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import tomli_w
from typer.testing import CliRunner
from worklist_factory import add_study, analyse

from ddn_node.cli.main import app
from ddn_node.store.engine import Database


def test_worklist_command_prints_the_worklist(
    sqlite_database: Database, sqlite_url: str, tmp_path: Path
) -> None:
    m = dt.timedelta(minutes=1)
    routine = add_study(sqlite_database, patient_name="[bold red]MARKUP[/]^X", received_ago=30 * m)
    stat = add_study(
        sqlite_database,
        patient_name="TERM\x1b]0;pwned\x07^\x1b[31mRED",
        received_ago=20 * m,
        modalities="DX",
    )
    waiting = add_study(sqlite_database, patient_name="WAIT^ING", received_ago=10 * m)
    read = add_study(
        sqlite_database, patient_name="READ^DONE", read_status="read", received_ago=5 * m
    )
    analyse(sqlite_database, routine, {"Mass": 0.2})
    analyse(sqlite_database, stat, {"Pneumothorax": 0.8})
    config = tmp_path / "node.toml"
    config.write_text(
        tomli_w.dumps(
            {"database": {"url": sqlite_url}, "node": {"spool_dir": str(tmp_path / "spool")}}
        )
    )
    runner = CliRunner()

    shown = runner.invoke(app, ["worklist", "--config", str(config)], env={"COLUMNS": "240"})
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert (
        out.index("TERM") < out.index("MARKUP") < out.index("WAIT, ING")
    )  # STAT, ROUTINE, not analysed
    assert "READ, DONE" not in out
    assert "[bold red]MARKUP[/], X" in out  # literal, not interpreted as rich markup
    assert "\x1b]0;pwned" not in out and "\x1b[31mRED" not in out
    assert "Pneumothorax 0.80" in out and "3 unread studies, priority order" in out

    as_json = runner.invoke(
        app, ["worklist", "--config", str(config), "--all", "--order", "arrival", "--json"]
    )
    assert as_json.exit_code == 0, as_json.output
    page = json.loads(as_json.output)
    assert [r["study_uid"] for r in page["rows"]] == [routine, stat, waiting, read]  # oldest first

    only_dx = runner.invoke(
        app, ["worklist", "--config", str(config), "--modality", "dx", "--json"]
    )
    assert [r["study_uid"] for r in json.loads(only_dx.output)["rows"]] == [stat]
    bad = runner.invoke(app, ["worklist", "--config", str(config), "--order", "random"])
    assert bad.exit_code != 0
