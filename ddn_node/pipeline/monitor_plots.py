"""The monitor's figures as PNG: ROC and calibration per model version, time to read, and
each shadow candidate's AUC difference per label.

Built on ``matplotlib.figure.Figure`` (never ``pyplot``): pyplot keeps global state, and
the admin page draws these in the web server's worker threads. Each function returns
None when there is nothing to draw (say, no label with both classes for a ROC).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ddn_node.pipeline.monitor import (
    ModelPerformance,
    MonitorReport,
    Scored,
    ShadowComparison,
    TriageEffect,
)

CALIBRATION_BINS = 10


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return out.getvalue()


def roc_points(scored: list[Scored]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) at every distinct probability, from
    (0, 0) to (1, 1); tied scores move both rates at once (a diagonal step)."""
    positives = sum(1 for s in scored if s.truth)
    negatives = len(scored) - positives
    points = [(0.0, 0.0)]
    tp = fp = 0
    ordered = sorted(scored, key=lambda s: -s.probability)
    for i, s in enumerate(ordered):
        tp += s.truth
        fp += not s.truth
        if i + 1 == len(ordered) or ordered[i + 1].probability != s.probability:
            points.append((fp / negatives, tp / positives))
    return points


def roc_png(model: ModelPerformance) -> bytes | None:
    curves = [lab for lab in model.labels if lab.auc is not None]
    if not curves:
        return None
    figure = Figure(figsize=(5.5, 5))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for lab in curves:
        assert lab.auc is not None
        xs, ys = zip(*roc_points(lab.scored), strict=True)
        ci = "" if lab.auc.low is None else f" [{lab.auc.low:.2f}-{lab.auc.high:.2f}]"
        ax.plot(xs, ys, linewidth=1.5, label=f"{lab.label}: AUC {lab.auc.value:.2f}{ci}")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity",
        title=f"ROC against radiologists: {model.key}",
    )
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def calibration_png(model: ModelPerformance) -> bytes | None:
    """Mean probability against the share the radiologists called present, per bin of
    probability, every label of the version pooled (the marker's size: how many)."""
    scored = [s for lab in model.labels for s in lab.scored]
    if not scored:
        return None
    bins: dict[int, list[Scored]] = {}
    for s in scored:
        bins.setdefault(
            min(int(s.probability * CALIBRATION_BINS), CALIBRATION_BINS - 1), []
        ).append(s)
    figure = Figure(figsize=(5.5, 5))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="perfect calibration")
    keys = sorted(bins)
    xs = [sum(s.probability for s in bins[k]) / len(bins[k]) for k in keys]
    ys = [sum(s.truth for s in bins[k]) / len(bins[k]) for k in keys]
    sizes = [20 + 8 * len(bins[k]) for k in keys]
    ax.plot(xs, ys, color="C0", linewidth=1)
    ax.scatter(xs, ys, s=sizes, color="C0", zorder=3, label="observed (size: count)")
    ax.set(
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
        xlabel="model probability (bin mean)",
        ylabel="share present per radiologists",
        title=f"Calibration, all labels: {model.key}",
    )
    ax.legend(loc="upper left", fontsize="small")
    return _png(figure)


def _ecdf(ax: Axes, values_s: list[float], **style: object) -> None:
    hours = sorted(v / 3600 for v in values_s)
    ys = [(i + 1) / len(hours) for i in range(len(hours))]
    ax.step([0.0, *hours], [0.0, *ys], where="post", **style)  # type: ignore[arg-type]


def time_to_read_png(effect: TriageEffect) -> bytes | None:
    if not effect.urgent.n and not effect.routine.n:
        return None
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    for name, waits, colour in (
        ("urgent (STAT/HIGH)", effect.urgent, "C3"),
        ("routine", effect.routine, "C0"),
    ):
        if not waits.n:
            continue
        _ecdf(ax, waits.waits_s, color=colour, linewidth=2, label=f"{name}, as read (n={waits.n})")
        _ecdf(
            ax,
            waits.baseline_waits_s,
            color=colour,
            linewidth=1,
            linestyle="--",
            label=f"{name}, if read in arrival order",
        )
    ax.set(
        xlabel="hours from arrival to read",
        ylabel="share of studies read",
        ylim=(0, 1.02),
        title="Time to read: triage order against arrival order",
    )
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def shadow_png(shadow: ShadowComparison) -> bytes | None:
    """Per label, candidate AUC - live AUC with its paired 95 % interval (a forest plot):
    at a glance, which labels the candidate moves, and whether the evidence says so."""
    rows = [lab for lab in shadow.labels if lab.auc_difference is not None]
    if not rows:
        return None
    figure = Figure(figsize=(6.5, 0.35 * len(rows) + 1.6))
    ax = figure.subplots()
    ax.axvline(0, color="0.6", linewidth=1)
    for y, lab in enumerate(reversed(rows)):
        d = lab.auc_difference
        assert d is not None
        if d.low is not None and d.high is not None:
            clear = d.low > 0 or d.high < 0
            ax.plot([d.low, d.high], [y, y], color="C2" if clear else "0.4", linewidth=2)
        ax.plot([d.value], [y], marker="o", color="C2" if d.value > 0 else "C3")
    ax.set_yticks(range(len(rows)), [lab.label for lab in reversed(rows)], fontsize=8)
    ax.set(
        xlim=(-1, 1),
        xlabel="AUC candidate - AUC live (paired DeLong 95 % interval)",
        title=(f"{shadow.candidate_version} vs {shadow.live_version}: {shadow.reviewed} reviewed"),
    )
    ax.grid(axis="x", color="0.9")
    return _png(figure)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def write_plots(report: MonitorReport, directory: Path) -> list[Path]:
    """Every figure of the report as a PNG under ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figures: list[tuple[str, bytes | None]] = []
    for model in report.models:
        figures.append((f"roc-{slug(model.key)}.png", roc_png(model)))
        figures.append((f"calibration-{slug(model.key)}.png", calibration_png(model)))
    figures.append(("time-to-read.png", time_to_read_png(report.triage)))
    for shadow in report.shadows:
        figures.append((f"shadow-{slug(shadow.key)}.png", shadow_png(shadow)))
    for name, data in figures:
        if data is not None:
            path = directory / name
            path.write_bytes(data)
            written.append(path)
    return written


def drift_png(feature: str, histogram: dict[str, list], psi: float, ks: float | None) -> bytes:
    """One feature's shares per bin: the validation set against the node's window."""
    bins = [str(b) for b in histogram.get("bins", [])]
    reference = [float(v) for v in histogram.get("reference", [])]
    current = [float(v) for v in histogram.get("current", [])]
    figure = Figure(figsize=(6, 3.6))
    ax = figure.subplots()
    xs = list(range(len(bins)))
    ax.bar([x - 0.2 for x in xs], reference, width=0.4, label="validation set", color="0.6")
    ax.bar([x + 0.2 for x in xs], current, width=0.4, label="this node (window)", color="C3")
    ax.set_xticks(xs, bins, rotation=45, ha="right", fontsize=7)
    stat = f"PSI {psi:.3f}" + ("" if ks is None else f", KS {ks:.3f}")
    ax.set(ylabel="share of images", title=f"{feature}: {stat}")
    ax.legend(loc="best", fontsize=8)
    return _png(figure)
