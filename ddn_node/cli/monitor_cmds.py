"""``ddn-node monitor``: the model against this hospital's radiologists, and the triage effect.

What is computed and how is :mod:`ddn_node.pipeline.monitor`; the figures are
:mod:`ddn_node.pipeline.monitor_plots`. The same report is ``/admin/monitor``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ddn_node.cli.common import ConfigOption, exit_unreadable, load_or_exit
from ddn_node.pipeline.monitor import (
    MonitorReport,
    ShadowComparison,
    Waits,
    auc_text,
    difference_text,
    hours_text,
    proportion_text,
)


def report_json(report: MonitorReport) -> dict[str, Any]:
    """The report as plain data, without the per-study lists the figures are drawn from."""
    out: dict[str, Any] = dataclasses.asdict(report)
    for model in out["models"]:
        for label in model["labels"]:
            label.pop("scored")
    for shadow in out["shadows"]:
        for label in shadow["labels"]:
            label["live"].pop("scored")
            label["candidate"].pop("scored")
    for waits in (out["triage"]["urgent"], out["triage"]["routine"]):
        waits.pop("waits_s")
        waits.pop("baseline_waits_s")
    out["generated_at"] = report.generated_at.isoformat()
    return out


def print_report(report: MonitorReport, console: Console) -> None:
    if not report.models:
        console.print("No feedback recorded yet: nothing to measure the models against.")
    for model in report.models:
        table = Table(
            title=f"{model.key}: {model.results_reviewed} results reviewed",
            title_justify="left",
            header_style="bold",
            pad_edge=False,
            box=box.SIMPLE_HEAD,
        )
        for column in ("Label", "TP", "FP", "FN", "TN", "Sensitivity", "PPV", "AUC"):
            table.add_column(column, justify="left" if column == "Label" else "right")
        for lab in model.labels:
            table.add_row(
                lab.label,
                str(lab.tp),
                str(lab.fp),
                str(lab.fn),
                str(lab.tn),
                proportion_text(lab.sensitivity),
                proportion_text(lab.ppv),
                auc_text(lab.auc),
            )
        console.print(table)
        console.print(
            f"precision of STAT (a critical finding confirmed: "
            f"{', '.join(report.critical_findings)}): {proportion_text(model.stat_precision)}",
            highlight=False,
        )
    for shadow in report.shadows:
        print_shadow(shadow, report.critical_findings, console)
    triage = Table(
        title="Triage effect: arrival to first read",
        title_justify="left",
        header_style="bold",
        pad_edge=False,
        box=box.SIMPLE_HEAD,
    )
    for column in (
        "Studies",
        "Read",
        "Median",
        "Median, arrival order",
        "P90",
        "P90, arrival order",
        "Not read",
    ):
        triage.add_column(column, justify="left" if column == "Studies" else "right")
    rows: tuple[tuple[str, Waits], ...] = (
        ("urgent (STAT/HIGH)", report.triage.urgent),
        ("routine", report.triage.routine),
    )
    for name, waits in rows:
        triage.add_row(
            name,
            str(waits.n),
            hours_text(waits.median_s),
            hours_text(waits.baseline_median_s),
            hours_text(waits.p90_s),
            hours_text(waits.baseline_p90_s),
            str(waits.not_read),
        )
    console.print(triage)
    rate = report.triage.reads_per_hour
    console.print(
        "baseline: the same reading moments given to the studies in arrival order"
        + ("" if rate is None else f"; {rate:.1f} reads per hour"),
        highlight=False,
    )


def print_shadow(shadow: ShadowComparison, critical: list[str], console: Console) -> None:
    table = Table(
        title=(
            f"Shadow: candidate {shadow.candidate_name} {shadow.candidate_version} vs live "
            f"{shadow.live_name} {shadow.live_version} ({shadow.head}): scored "
            f"{shadow.scored} studies, {shadow.reviewed} reviewed, priority different in "
            f"{shadow.priority_changed}"
        ),
        title_justify="left",
        header_style="bold",
        pad_edge=False,
        box=box.SIMPLE_HEAD,
    )
    for column in (
        "Label",
        "Sensitivity live",
        "Sensitivity candidate",
        "PPV live",
        "PPV candidate",
        "AUC live",
        "AUC candidate",
        "AUC difference",
    ):
        table.add_column(column, justify="left" if column == "Label" else "right")
    for lab in shadow.labels:
        table.add_row(
            lab.label,
            proportion_text(lab.live.sensitivity),
            proportion_text(lab.candidate.sensitivity),
            proportion_text(lab.live.ppv),
            proportion_text(lab.candidate.ppv),
            auc_text(lab.live.auc),
            auc_text(lab.candidate.auc),
            difference_text(lab.auc_difference),
        )
    console.print(table)
    console.print(
        f"precision of STAT ({', '.join(critical)}): live "
        f"{proportion_text(shadow.live_stat_precision)}, candidate "
        f"{proportion_text(shadow.candidate_stat_precision)}; AUC difference = candidate - "
        "live with the paired DeLong 95 % interval: an interval that holds 0 is no evidence "
        "either way",
        highlight=False,
    )


def monitor(
    config: ConfigOption = None,
    plots: Annotated[
        Path | None,
        typer.Option("--plots", help="Write the figures (ROC, calibration, time to read) here."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Sensitivity, PPV and AUC per model version and label against radiologists' feedback,
    the precision of STAT, and the time to read of urgent vs routine studies."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from ddn_node.pipeline.monitor import build_report
    from ddn_node.store.engine import make_database

    settings = load_or_exit(config)
    database = make_database(settings.database.url)
    try:
        report = build_report(database, settings.triage.critical_findings)
    except (OperationalError, ProgrammingError) as exc:
        exit_unreadable("feedback", exc)
    finally:
        database.dispose()
    if json_output:
        typer.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report, Console(soft_wrap=False))
    if plots is not None:
        from ddn_node.pipeline.monitor_plots import write_plots

        for path in write_plots(report, plots):
            Console(stderr=True).print(f"wrote {path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``monitor`` to the node's CLI."""
    app.command("monitor")(monitor)
