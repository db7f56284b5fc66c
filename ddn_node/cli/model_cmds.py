"""``ddn-node train``, ``ddn-node evaluate`` and ``ddn-node bench model``.

``register(app)`` adds ``train`` and ``evaluate`` to the main Typer app;
:func:`model_bench` is a plain function that ``cli/main.py`` mounts as ``bench model``.
Heavy imports (torch) happen inside the commands so ``ddn-node --help`` stays fast.
"""

from __future__ import annotations

import shlex
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


def invoked_command(ctx: typer.Context) -> str:
    """The command line as the user gave it, rebuilt from click's context.

    Only options that came from the command line are listed, in declaration order, so the
    manifest's "exact training command" can be pasted back into a shell. (``sys.argv`` is
    not used: under a test runner or an embedding program it is someone else's argv.)
    """
    parts = ["ddn-node", *ctx.command_path.split()[1:]] if ctx.command_path else ["ddn-node"]
    if len(parts) == 1 and ctx.info_name:
        parts.append(ctx.info_name)
    for param in ctx.command.params:
        # Compared by name: Typer vendors its own click, whose enum is not click's.
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name is None or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        opt = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if getattr(param, "is_flag", False):
            if getattr(param, "secondary_opts", None) and not value:
                opt = param.secondary_opts[0]
            parts.append(opt)
            continue
        parts += [opt, shlex.quote(str(value.value if isinstance(value, StrEnum) else value))]
    return " ".join(parts)


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class MapsRule(StrEnum):
    ci_lower_bound = "ci_lower_bound"
    point_estimate = "point_estimate"


class MapsDecideOn(StrEnum):
    val = "val"
    evaluated = "evaluated"


class BackboneChoice(StrEnum):
    resnet50 = "resnet50"
    resnet18 = "resnet18"
    tiny = "tiny"


def train(
    ctx: typer.Context,
    images: Annotated[
        Path, typer.Option(help="Folder of images (PNG/JPEG/DICOM)", exists=True, file_okay=False)
    ],
    labels: Annotated[
        Path,
        typer.Option(
            help="Label CSV (NIH ChestX-ray14 layout or file,label)", exists=True, dir_okay=False
        ),
    ],
    out: Annotated[Path, typer.Option(help="Artifact directory to write, e.g. models/NAME")],
    init_weights: Annotated[
        str | None,
        typer.Option(
            help="torchvision ResNet state dict (.pth/.safetensors) for the backbone, or 'imagenet' (online)"
        ),
    ] = None,
    folds: Annotated[
        int,
        typer.Option(
            min=1, help="k > 1: k-fold CV grouped by patient, then a refit on all development data"
        ),
    ] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint of this run")
    ] = False,
    device: Annotated[Device, typer.Option(help="cpu or cuda")] = Device.cpu,
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs (early stopping on validation macro AUC)")
    ] = 20,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    lr: Annotated[float, typer.Option(help="Adam learning rate (paper: 1e-4)")] = 1e-4,
    patience: Annotated[int, typer.Option(min=1, help="Early-stopping patience in epochs")] = 5,
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of images (whole patients) for validation")
    ] = 0.15,
    test_fraction: Annotated[
        float, typer.Option(help="Fraction held out for `evaluate` (never used in training)")
    ] = 0.15,
    seed: Annotated[int, typer.Option()] = 0,
    backbone: Annotated[
        BackboneChoice, typer.Option(help="resnet50 (the DDN); smaller ones for tests")
    ] = BackboneChoice.resnet50,
    image_size: Annotated[int, typer.Option(min=32)] = 224,
    head: Annotated[str, typer.Option(help="Name of the task head")] = "cxr",
    add_head_to: Annotated[
        Path | None,
        typer.Option(
            help="Train only a new head on the frozen backbone of this artifact (multi-task); --out may be the same"
        ),
    ] = None,
    label_columns: Annotated[
        str | None, typer.Option(help="Comma-separated 0/1 label columns (folder layout)")
    ] = None,
    checkpoints: Annotated[
        Path | None, typer.Option(help="Checkpoint directory (default runs/<out name>)")
    ] = None,
    threads: Annotated[
        int, typer.Option(min=0, help="CPU threads for torch (0: torch default)")
    ] = 0,
    progress: Annotated[bool, typer.Option(help="Progress bars")] = True,
    version: Annotated[
        str | None,
        typer.Option(
            help="The artifact's version (default: date-name; with --add-head-to, the base's)."
            " A candidate for 'ddn-node model shadow' needs its own"
        ),
    ] = None,
) -> None:
    """Train the DDN (Adam, weighted BCE, augmentation; patient-disjoint splits) and write an artifact."""
    from ddn_node.training.data import DatasetError
    from ddn_node.training.train import TrainConfig, TrainingError, run_training

    cfg = TrainConfig(
        images=images,
        labels=labels,
        out=out,
        init_weights=init_weights,
        folds=folds,
        resume=resume,
        device=device.value,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        backbone=backbone.value,
        image_size=image_size,
        head=head,
        add_head_to=add_head_to,
        label_columns=tuple(c.strip() for c in label_columns.split(",")) if label_columns else (),
        checkpoints=checkpoints,
        threads=threads,
        progress=progress,
        command=invoked_command(ctx),
        version=version,
    )
    try:
        manifest = run_training(cfg)
    except (TrainingError, DatasetError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(
        f"wrote {out} (weights sha256 {manifest.weights.sha256[:16]}..., heads {', '.join(manifest.heads)})"
    )


def evaluate(
    ctx: typer.Context,
    model: Annotated[
        Path, typer.Option(help="Artifact directory (models/NAME)", exists=True, file_okay=False)
    ],
    images: Annotated[Path, typer.Option(help="Folder of images", exists=True, file_okay=False)],
    labels: Annotated[
        Path, typer.Option(help="Label CSV (NIH layout or file,label)", exists=True, dir_okay=False)
    ],
    out: Annotated[
        Path, typer.Option(help="Report directory (metrics.json, report.md, report.html, PNGs)")
    ],
    bboxes: Annotated[
        Path | None,
        typer.Option(help="NIH bboxes.csv for Grad-CAM localisation", exists=True, dir_okay=False),
    ] = None,
    head: Annotated[
        str | None, typer.Option(help="Head to evaluate (default: the artifact's first)")
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="'held-out': skip images the model trained/validated on (from its split.csv); 'all'"
        ),
    ] = "held-out",
    device: Annotated[Device, typer.Option()] = Device.cpu,
    n_boot: Annotated[
        int, typer.Option(min=100, help="Bootstrap resamples for the 95% CIs")
    ] = 1000,
    threads: Annotated[int, typer.Option(min=0)] = 0,
    record_in_manifest: Annotated[
        bool,
        typer.Option(
            "--record-in-manifest",
            "--write-manifest",
            help="Write the headline test metrics and, with --bboxes, the per-label localisation "
            "evidence (which labels get heat maps) into the artifact's manifest",
        ),
    ] = False,
    maps_rule: Annotated[
        MapsRule,
        typer.Option(
            help="When a label's heat maps are shown: 'ci_lower_bound' (the 95% lower bound of its "
            "pointing game beats the random and centre baselines) or 'point_estimate' (weaker evidence)"
        ),
    ] = MapsRule.ci_lower_bound,
    maps_min_boxes: Annotated[
        int,
        typer.Option(min=1, help="Fewest expert boxes a label needs before its maps can be shown"),
    ] = 5,
    maps_decide_on: Annotated[
        MapsDecideOn,
        typer.Option(
            help="Images whose boxes decide: 'val' (the artifact's validation patients; the test split only "
            "reports) or 'evaluated' (the evaluated images, e.g. an operator's own boxed set)"
        ),
    ] = MapsDecideOn.val,
    progress: Annotated[bool, typer.Option(help="Progress bars")] = True,
) -> None:
    """Evaluate an artifact: AUC/AP with CIs, abnormality AUC, Grad-CAM localisation, report."""
    from ddn_node.training.data import DatasetError
    from ddn_node.training.evaluate import EvalConfig, EvaluationError, run_evaluation

    try:
        metrics = run_evaluation(
            EvalConfig(
                model=model,
                images=images,
                labels=labels,
                out=out,
                bboxes=bboxes,
                head=head,
                split=split,
                device=device.value,
                n_boot=n_boot,
                threads=threads,
                record_in_manifest=record_in_manifest,
                maps_rule=maps_rule.value,
                maps_min_boxes=maps_min_boxes,
                maps_decide_on=maps_decide_on.value,
                progress=progress,
                command=invoked_command(ctx),
            )
        )
    except (EvaluationError, DatasetError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    macro = metrics["macro"]
    ci = macro.get("auc_ci95") or [float("nan"), float("nan")]
    auc = macro.get("auc")
    typer.echo(
        f"{metrics['n_images']} images / {metrics['n_patients']} patients: macro AUC "
        f"{auc if auc is None else f'{auc:.3f}'} (95% CI {ci[0]:.3f}-{ci[1]:.3f}); report in {out}"
    )
    evidence = metrics["localization"].get("evidence")
    if evidence is not None:
        shown = [lab for lab, v in evidence["labels"].items() if v["maps_shown"]]
        where = evidence["rule"]["decided_on"]
        typer.echo(
            f"heat maps ({evidence['rule']['kind']}, decided on {where}): "
            + (", ".join(shown) if shown else "none of the labels beats both baselines")
            + (
                "; written to the manifest"
                if record_in_manifest
                else "; not written (add --record-in-manifest)"
            )
        )


def model_bench(
    model: Annotated[
        Path | None, typer.Option(help="Artifact to benchmark (default: random DDN weights)")
    ] = None,
    dicom: Annotated[
        list[Path] | None,
        typer.Option(help="DICOM file(s) for the end-to-end timing (repeat the option)"),
    ] = None,
    rounds: Annotated[
        int, typer.Option(min=1, help="Alternating measurement rounds (medians reported)")
    ] = 5,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: torch default)")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer variants and iterations (smoke test)")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON")
    ] = None,
) -> None:
    """Speed of ResNet-50 vs DDN, Grad-CAM overhead, end-to-end DICOM -> result (CPU)."""
    from ddn_node.bench.model import BenchConfig, run_bench

    run_bench(
        BenchConfig(
            model=model,
            dicom=tuple(dicom or ()),
            rounds=rounds,
            threads=threads,
            quick=quick,
            json_out=json_out,
        )
    )


def drift_reference(
    model: Annotated[
        Path, typer.Option(help="Artifact directory (models/NAME)", exists=True, file_okay=False)
    ],
    images: Annotated[
        Path, typer.Option(help="Folder of the training images", exists=True, file_okay=False)
    ],
    labels: Annotated[
        Path,
        typer.Option(
            help="NIH label CSV (View Position, OrigWidth, OrigHeight)", exists=True, dir_okay=False
        ),
    ],
    head: Annotated[str | None, typer.Option(help="Head (default: the first)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Write the artifact's drift reference (drift_reference.json) from its validation split."""
    from ddn_node.model.drift_reference import write_reference
    from ddn_node.training.drift_reference import (
        DriftReferenceError,
        ReferenceConfig,
        compute_reference,
    )

    try:
        reference = compute_reference(
            ReferenceConfig(model=model, images=images, labels=labels, head=head, device=device)
        )
    except (DriftReferenceError, OSError, ValueError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    out = write_reference(model, reference)
    typer.echo(f"wrote {out} ({reference.provenance['n_images']} validation images)")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``evaluate`` to the node's CLI."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("drift-reference")(drift_reference)
