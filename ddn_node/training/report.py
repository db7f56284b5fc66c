"""Human-readable evaluation report: ROC curves, calibration, example heat maps.

Figures are PNG files beside ``report.md`` and ``report.html`` (the HTML embeds the same
text as the Markdown plus the images), so the report opens in a browser and in a Git UI.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers without a display

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from sklearn.metrics import roc_curve

from ddn_node.training.data import LabelTable


def _fmt(v: object, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{_fmt(v[0], nd)}-{_fmt(v[1], nd)}"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _roc_png(
    path: Path,
    labels: Sequence[str],
    y: np.ndarray,
    p: np.ndarray,
    per_label: dict[str, Any],
    abn: tuple[np.ndarray, np.ndarray, float | None],
) -> None:
    n = len(labels) + 1
    cols = 5
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    panels = [(lab, y[:, j], p[:, j], per_label[lab]["auc"]) for j, lab in enumerate(labels)]
    panels.append(("abnormal vs normal", abn[0], abn[1], abn[2]))
    for ax, (name, yy, pp, a) in zip(axes.flat, panels, strict=False):
        ax.axis("on")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if yy.min() != yy.max():
            fpr, tpr, _ = roc_curve(yy, pp)
            ax.plot(fpr, tpr, lw=1.5)
        ax.set_title(f"{name}\nAUC {_fmt(a)} (n+={int(yy.sum())})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    fig.supxlabel("1 - specificity")
    fig.supylabel("sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _calibration_png(
    path: Path, y: np.ndarray, p: np.ndarray, bins: int = 10
) -> list[dict[str, float]]:
    """Reliability diagram pooled over labels (each image-label pair one prediction)."""
    yy, pp = y.ravel(), p.ravel()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(pp, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        m = which == b
        if m.any():
            table.append(
                {
                    "bin_lo": float(edges[b]),
                    "bin_hi": float(edges[b + 1]),
                    "mean_predicted": float(pp[m].mean()),
                    "observed": float(yy[m].mean()),
                    "n": int(m.sum()),
                }
            )
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8, label="perfect")
    ax.plot(
        [t["mean_predicted"] for t in table],
        [t["observed"] for t in table],
        marker="o",
        label="model",
    )
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("Calibration (all labels pooled)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return table


def _example_pngs(
    out: Path, table: LabelTable, examples: list[dict[str, Any]], n: int
) -> list[tuple[str, str]]:
    """The n boxed findings the model rated most likely, then the n least: heat map + boxes."""
    if not examples:
        return []
    ranked = sorted(examples, key=lambda e: -e["prob"])
    chosen = ranked[: n // 2] + ranked[-(n - n // 2) :] if len(ranked) > n else ranked
    d = out / "examples"
    d.mkdir(exist_ok=True)
    written = []
    from ddn_node.training.metrics import peak, predicted_box

    for e in chosen:
        img = e["image"]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.imshow(e["heatmap"], cmap="jet", alpha=0.35, vmin=0, vmax=1)
        b = e["box"]
        ax.add_patch(Rectangle((b.x, b.y), b.w, b.h, fill=False, ec="lime", lw=1.5))
        pb = predicted_box(e["heatmap"])
        if pb is not None:
            ax.add_patch(
                Rectangle((pb.x, pb.y), pb.w, pb.h, fill=False, ec="white", lw=1.0, ls="--")
            )
        r, c = peak(e["heatmap"])
        ax.plot([c], [r], marker="+", color="white", ms=10)
        ax.set_title(
            f"{e['label']} p={e['prob']:.2f} {'hit' if e['hit'] else 'miss'} IoU={e['iou']:.2f}",
            fontsize=8,
        )
        ax.axis("off")
        fig.tight_layout()
        name = f"{Path(table.files[e['i']]).stem}_{e['label']}.png"
        fig.savefig(d / name, dpi=90)
        plt.close(fig)
        written.append(
            (
                f"examples/{name}",
                f"{table.files[e['i']]}: {e['label']} (p={e['prob']:.2f}, {'hit' if e['hit'] else 'miss'})",
            )
        )
    return written


PART_TITLES = {"val": "validation", "test": "test", "all": "evaluated"}


def localisation_png(path: Path, evidence: dict[str, Any]) -> None:
    """Per label: pointing game with its 95% CI on each part, beside the random and centre
    baselines of that part; labels whose maps are shown in bold green."""
    labels = list(evidence["labels"])
    parts = [
        p
        for p in ("val", "test", "all")
        if any(p in v["parts"] for v in evidence["labels"].values())
    ]
    decided = evidence["rule"]["decided_on"]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(labels) + 1.6))
    colours = {"val": "tab:blue", "test": "tab:orange", "all": "tab:purple"}
    # The deciding part on top of each label's band.
    parts.sort(key=lambda p: p != decided)
    offsets = np.linspace(0.18, -0.18, len(parts)) if len(parts) > 1 else np.zeros(1)
    for row, lab in enumerate(labels):
        entry = evidence["labels"][lab]
        y0 = len(labels) - 1 - row
        if row % 2 == 0:
            ax.axhspan(y0 - 0.5, y0 + 0.5, color="0.96", zorder=0)
        drawn = False
        for off, part in zip(offsets, parts, strict=True):
            f = entry["parts"].get(part) or {}
            if not f.get("n_boxes"):
                continue
            drawn = True
            yy = y0 + off
            lo, hi = f["ci95"]
            pg = f["pointing_game"]
            ax.errorbar(
                [pg],
                [yy],
                xerr=[[max(pg - lo, 0.0)], [max(hi - pg, 0.0)]],
                fmt="o",
                ms=5,
                color=colours[part],
                capsize=2,
                lw=1.2,
                zorder=3,
            )
            ax.plot([f["random"]], [yy], marker="x", color="0.35", ms=6, zorder=2)
            ax.plot([f["centre"]], [yy], marker="|", color="crimson", ms=11, mew=2, zorder=2)
            ax.text(
                1.01,
                yy,
                f"n={f['n_boxes']}",
                va="center",
                fontsize=6,
                transform=ax.get_yaxis_transform(),
            )
        if not drawn:
            ax.text(0.5, y0, "no boxes", va="center", ha="center", fontsize=7, color="0.5")
    ax.set_yticks(range(len(labels)))
    ticks = ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    for t in ticks:
        if evidence["labels"][t.get_text()]["maps_shown"]:
            t.set_color("darkgreen")
            t.set_fontweight("bold")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("pointing game (share of expert boxes holding the heat map's peak)")
    handles = [
        plt.Line2D(
            [],
            [],
            color=colours[p],
            marker="o",
            ls="",
            label=f"Grad-CAM, {PART_TITLES[p]} (95% CI)",
        )
        for p in parts
    ]
    handles += [
        plt.Line2D(
            [], [], color="0.35", marker="x", ls="", label="random peak (box area fraction)"
        ),
        plt.Line2D([], [], color="crimson", marker="|", ms=10, mew=2, ls="", label="centre prior"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.9)
    shown = sum(v["maps_shown"] for v in evidence["labels"].values())
    ax.set_title(
        f"Localisation evidence: decided on {PART_TITLES.get(decided, decided)} ({evidence['rule']['kind']}); "
        f"heat maps shown for {shown} of {len(labels)} labels (green)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evidence_table(evidence: dict[str, Any]) -> list[str]:
    """Markdown table of the per-label localisation evidence (decision + every part)."""
    parts = [
        p
        for p in ("val", "test", "all")
        if any(p in v["parts"] for v in evidence["labels"].values())
    ]
    head = ["label", "heat maps"]
    for p in parts:
        t = PART_TITLES[p]
        head += [f"{t} boxes", f"{t} pointing game [95% CI]", f"{t} random / centre"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for lab, v in evidence["labels"].items():
        cells = [lab, "**shown**" if v["maps_shown"] else "not shown"]
        for p in parts:
            f = v["parts"].get(p) or {}
            if not f.get("n_boxes"):
                cells += ["0", "n/a", "n/a"]
                continue
            cells += [
                f"{f['n_boxes']} ({f['n_patients']} pat.)",
                f"{f['hits']}/{f['n_boxes']} = {_fmt(f['pointing_game'], 2)} [{_fmt(f['ci95'][0], 2)}-{_fmt(f['ci95'][1], 2)}]",
                f"{_fmt(f['random'], 2)} / {_fmt(f['centre'], 2)}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(
    out: Path,
    metrics: dict[str, Any],
    labels: Sequence[str],
    y: np.ndarray,
    p: np.ndarray,
    scores: np.ndarray,
    abnormal: np.ndarray,
    table: LabelTable,
    examples: list[dict[str, Any]],
    n_examples: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _roc_png(
        out / "roc_curves.png",
        labels,
        y,
        p,
        metrics["per_label"],
        (abnormal.astype(float), scores, metrics["abnormality"]["auc"]),
    )
    calib = _calibration_png(out / "calibration.png", y, p)
    ex = _example_pngs(out, table, examples, n_examples)
    m, a, loc = metrics["macro"], metrics["abnormality"], metrics["localization"]
    lines = [
        f"# Evaluation of {metrics['model']['name']} ({metrics['model']['version']}), head `{metrics['model']['head']}`",
        "",
        "Demonstration model, not for diagnostic use.",
        "",
        f"- images: {metrics['n_images']} from {metrics['n_patients']} patients ({metrics['data']['selection'].get('note', metrics['data']['selection']['policy'])})",
        f"- weights sha256: `{metrics['model']['weights_sha256']}`",
        f"- command: `{metrics['command']}`",
        f"- 95% CIs: percentile bootstrap, {metrics['bootstrap']['n']} resamples by {metrics['bootstrap']['unit']}",
        "",
        "## Headline",
        "",
        "| metric | value | 95% CI |",
        "| --- | --- | --- |",
        f"| macro ROC AUC ({len(m['labels_in_macro'])} labels) | {_fmt(m['auc'])} | {_fmt(m['auc_ci95'])} |",
        f"| macro average precision | {_fmt(m['average_precision'])} | {_fmt(m['average_precision_ci95'])} |",
        f"| abnormal vs normal AUC ({a['n_abnormal']} vs {a['n_normal']}) | {_fmt(a['auc'])} | {_fmt(a['auc_ci95'])} |",
        f"| Grad-CAM pointing game ({loc.get('n_boxes', 0)} boxes) | {_fmt(loc.get('pointing_game'))} | random maps {_fmt(loc.get('random_pointing_game'))}, centre {_fmt(loc.get('centre_pointing_game'))} |",
        "",
        "Accuracy is a poor guide on multi-label chest X-ray (an all-negative answer scores high): read AUC and AP.",
        "",
        "## Per label",
        "",
        "| label | n+ | AUC | AUC 95% CI | AP | AP 95% CI | threshold | sens. | spec. | F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lab in labels:
        r = metrics["per_label"][lab]
        lines.append(
            f"| {lab} | {r['n_positive']} | {_fmt(r['auc'])} | {_fmt(r['auc_ci95'])} | {_fmt(r['average_precision'])} | "
            f"{_fmt(r['average_precision_ci95'])} | {_fmt(r['threshold'])} | {_fmt(r['recall'])} | {_fmt(r['specificity'])} | {_fmt(r['f1'])} |"
        )
    lines += [
        "",
        f"Macro at the manifest thresholds: accuracy {_fmt(m['accuracy'])}, precision {_fmt(m['precision'])}, recall {_fmt(m['recall'])}, F1 {_fmt(m['f1'])}.",
        "",
        "![ROC curves](roc_curves.png)",
        "",
        "## Calibration",
        "",
        "![calibration](calibration.png)",
        "",
        "| predicted bin | mean predicted | observed | n |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {t['bin_lo']:.1f}-{t['bin_hi']:.1f} | {t['mean_predicted']:.3f} | {t['observed']:.3f} | {t['n']} |"
        for t in calib
    ]
    lines += ["", "## Grad-CAM localisation", ""]
    if loc.get("n_boxes"):
        lines += [
            loc["method"],
            "",
            "| metric | Grad-CAM | random maps |",
            "| --- | --- | --- |",
            f"| pointing game | {_fmt(loc['pointing_game'])} | {_fmt(loc['random_pointing_game'])} |",
            f"| mean IoU | {_fmt(loc['mean_iou'])} | {_fmt(loc['random']['mean_iou'])} |",
        ]
        for t in ("0.1", "0.25", "0.5"):
            lines.append(
                f"| IoU >= {t} | {_fmt(loc['iou_acc@' + t])} | {_fmt(loc['random']['iou_acc@' + t])} |"
            )
        for t in ("0.1", "0.25", "0.5"):
            lines.append(
                f"| IoBB >= {t} | {_fmt(loc['iobb_acc@' + t])} | {_fmt(loc['random']['iobb_acc@' + t])} |"
            )
        ev = loc.get("evidence")
        if ev is not None:
            localisation_png(out / "localisation.png", ev)
            lines += [
                "",
                "### Which labels get heat maps",
                "",
                f"Rule: {ev['rule']['description']}.",
                "",
                *evidence_table(ev),
                "",
                "Reasons:",
                "",
                *[f"- {lab}: {v['reason']}" for lab, v in ev["labels"].items()],
                "",
                "![localisation evidence](localisation.png)",
            ]
        else:
            lines += ["", "| label | boxes | pointing game |", "| --- | --- | --- |"]
            lines += [
                f"| {lab} | {v['n_boxes']} | {_fmt(v['pointing_game'])} |"
                for lab, v in loc["per_label"].items()
            ]
        lines += [
            "",
            "Examples (green: expert box; white dashed: box from the heat map; +: peak):",
            "",
        ]
        lines += [f"![{cap}]({src})" for src, cap in ex]
    else:
        lines.append(loc.get("note", "not measured"))
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(md, metrics["model"]["name"]))


def _html(md: str, title: str) -> str:
    """A minimal Markdown subset (headings, tables, images, lists) to HTML, no dependency."""
    body: list[str] = []
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-", " "} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(
                f'<figure><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<p>&bull; {html.escape(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}figure{display:inline-block;margin:4px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
