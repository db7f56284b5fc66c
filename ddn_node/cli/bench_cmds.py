"""``ddn-node bench``: each figure with its ratio against a peer run in the same process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddn_node.cli import model_cmds, ops_cmds

bench_app = typer.Typer(
    help="Benchmarks: each figure with its ratio against a peer run in the same process.",
    no_args_is_help=True,
)
bench_app.command("model")(model_cmds.model_bench)
bench_app.command("worklist")(ops_cmds.worklist_bench)


@bench_app.command("ingest")
def bench_ingest(
    rounds: Annotated[int, typer.Option(help="Alternating rounds (medians are reported).")] = 3,
    quick: Annotated[bool, typer.Option(help="Fewer instances per run.")] = False,
) -> None:
    """Instances/s received: the node vs DCMTK storescp and Orthanc (storescu TCP_NODELAY=1)."""
    from ddn_node.bench.ingest import run

    run(rounds=rounds, quick=quick)


@bench_app.command("e2e")
def bench_e2e(
    studies: Annotated[int, typer.Option(help="Studies per phase (steady, burst).")] = 20,
    model: Annotated[Path, typer.Option(help="Model artifact.")] = Path("models/ddn-cxr"),
    size: Annotated[int, typer.Option(help="Image rows and columns.")] = 2048,
    phases: Annotated[
        str,
        typer.Option(
            help="Comma-separated: steady, burst, stat (a STAT study behind the backlog)."
        ),
    ] = "steady,burst,stat",
    backend: Annotated[
        str | None,
        typer.Option(help='[worker] backend ("torch", "onnxruntime"); default: the node\'s.'),
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help='[worker] precision ("fp32", "bf16"); default: the node\'s.')
    ] = None,
) -> None:
    """End-to-end latency through Orthanc, a STAT study behind a backlog, and memory."""
    from ddn_node.bench.e2e import PHASES, run

    chosen = tuple(p.strip() for p in phases.split(",") if p.strip())
    unknown = set(chosen) - set(PHASES)
    if unknown:
        raise typer.BadParameter(f"unknown phase(s) {sorted(unknown)}; choose from {PHASES}")
    run(
        n_studies=studies,
        model=model,
        size=size,
        phases=chosen,
        backend=backend,
        precision=precision,
    )


@bench_app.command("volume")
def bench_volume(
    images: Annotated[
        int, typer.Option(help="NIH radiographs to wrap as DX studies (plus the real CRs).")
    ] = 60,
    model: Annotated[Path, typer.Option(help="Model artifact.")] = Path("models/ddn-cxr"),
) -> None:
    """Result objects and bytes returned per study, through Orthanc, per heat-map policy."""
    from ddn_node.bench.volume import run

    run(n_images=images, model=model)


@bench_app.command("scale")
def bench_scale(
    studies: Annotated[int, typer.Option(help="Studies per run.")] = 16,
    model: Annotated[Path, typer.Option(help="Model artifact.")] = Path("models/ddn-cxr"),
) -> None:
    """Analysis throughput with 1, 2 and 4 worker processes sharing PostgreSQL."""
    from ddn_node.bench.scale import run

    run(studies=studies, model=model)


@bench_app.command("backends")
def bench_backends(
    model: Annotated[Path, typer.Option(help="Model artifact (with its split.csv).")] = Path(
        "models/ddn-cxr"
    ),
    images: Annotated[
        Path | None, typer.Option(help="Training images (default: from the manifest).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Label CSV (default: from the manifest).")
    ] = None,
    rounds: Annotated[int, typer.Option(help="Alternating timing rounds.")] = 7,
) -> None:
    """Validation AUC and speed of each inference backend vs eager fp32 (pick within 0.005)."""
    from ddn_node.bench.backends import run

    run(model=model, images=images, labels=labels, rounds=rounds)


@bench_app.command("all")
def bench_all(quick: Annotated[bool, typer.Option(help="Shorter runs.")] = False) -> None:
    """Every benchmark in turn (what `make bench` runs)."""
    from ddn_node.bench.e2e import run as e2e
    from ddn_node.bench.ingest import run as ingest
    from ddn_node.bench.model import BenchConfig, run_bench
    from ddn_node.bench.worklist import main as worklist_main

    ingest(rounds=2 if quick else 3, quick=quick)
    run_bench(
        BenchConfig(
            model=Path("models/ddn-cxr")
            if Path("models/ddn-cxr/manifest.json").is_file()
            else None,
            quick=quick,
        )
    )
    from ddn_node.bench.backends import run as backends

    backends(rounds=3 if quick else 7)
    e2e(n_studies=8 if quick else 20)
    from ddn_node.bench.volume import run as volume

    volume(n_images=12 if quick else 60)
    worklist_main(["--rounds", "3" if quick else "5"])
    from ddn_node.bench.scale import run as scale

    scale(studies=8 if quick else 16)


def register(root: typer.Typer) -> None:
    root.add_typer(bench_app, name="bench")
