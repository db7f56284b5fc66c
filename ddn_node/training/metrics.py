"""Classification and localisation metrics.

Definitions follow scikit-learn (``roc_auc_score``, ``average_precision_score``) for the
ranking metrics. Confidence intervals are percentile bootstrap intervals (Efron &
Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13) over *patients* when patient
IDs are given (a cluster bootstrap: images of one patient are resampled together, since
they are not independent), otherwise over images.

Localisation follows Wang et al., "ChestX-ray8", CVPR 2017, section 5.3: a heat map is
binarised, the bounding box of the hot region is compared with the expert box, and the
fraction of boxes with IoU (or IoBB = intersection over the *predicted* box area) at or above
T is reported for T in {0.1, 0.25, 0.5}; plus the pointing game (Zhang et al., "Top-down
Neural Attention by Excitation Backprop", ECCV 2016): a hit when the heat map's maximum
falls inside the box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

OVERLAP_THRESHOLDS = (0.1, 0.25, 0.5)


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.min() != y.max())


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present (undefined)."""
    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if len(y) and _both_classes(y) else None


def _fast_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties count 1/2), NaN when undefined.

    Equal to ``roc_auc_score`` but ~50x faster, which matters inside a 1000-sample
    bootstrap over 14 labels.
    """
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, p: np.ndarray) -> float | None:
    y = np.asarray(y)
    return float(average_precision_score(y, p)) if len(y) and y.max() > 0 else None


def _fast_ap(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision exactly as ``average_precision_score`` (step-wise, ties grouped), NaN without positives."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(p), kind="stable")
    ps, ys = np.asarray(p)[order], y[order]
    last = np.r_[ps[1:] != ps[:-1], True]
    tp = np.cumsum(ys)[last]
    fp = np.cumsum(~ys)[last]
    recall = tp / n_pos
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_counts(y: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, int]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    tn = int(np.sum(~y & ~pred))
    return tp, fp, fn, tn


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Accuracy, precision, recall (sensitivity), specificity and F1 at one threshold."""
    tp, fp, fn, tn = binary_counts(y, np.asarray(p) >= threshold)
    n = tp + fp + fn + tn
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return {
        "accuracy": (tp + tn) / n if n else None,
        "precision": prec,
        "recall": rec,
        "specificity": spec,
        "f1": f1,
    }


def choose_threshold(y: np.ndarray, p: np.ndarray) -> tuple[float, str]:
    """The probability threshold that maximises F1 on (validation) data.

    Ties go to the higher threshold (fewer false alarms). Without positives F1 is undefined
    and 0.5 is returned, said in the method string.
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return 0.5, f"default 0.5 (validation set has {n_pos} positives of {len(y)}, F1 undefined)"
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    # Only the last index of each run of equal scores is a realisable cut.
    last = np.r_[ps[1:] != ps[:-1], True]
    f1 = np.where(last, 2 * tp / (tp + fp + n_pos), -1.0)
    best = np.flatnonzero(f1 == f1.max())[0]
    thr = float(ps[best])
    return (
        thr,
        f"max F1 on the validation split ({n_pos} positives of {len(y)} images; F1={f1[best]:.3f})",
    )


def _groups(ids: Sequence[str] | None, n: int) -> list[np.ndarray]:
    if ids is None:
        return [np.array([i]) for i in range(n)]
    by: dict[str, list[int]] = {}
    for i, g in enumerate(ids):
        by.setdefault(g, []).append(i)
    return [np.array(v) for v in by.values()]


def bootstrap_indices(
    n: int, groups: Sequence[str] | None, n_boot: int, seed: int
) -> list[np.ndarray]:
    """Index vectors of ``n_boot`` cluster-bootstrap resamples (whole groups resampled)."""
    rng = np.random.default_rng(seed)
    gs = _groups(groups, n)
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(gs), size=len(gs))
        out.append(np.concatenate([gs[i] for i in pick]))
    return out


def percentile_ci(values: Sequence[float], alpha: float = 0.05) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)])
    if len(v) < 10:
        return None
    return [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]


@dataclass(frozen=True)
class BootstrapSpec:
    n_boot: int = 1000
    seed: int = 0


def classification_report(
    y: np.ndarray,
    p: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float],
    groups: Sequence[str] | None = None,
    boot: BootstrapSpec = BootstrapSpec(),
) -> dict[str, Any]:
    """Per-label and macro metrics with bootstrap 95% CIs for AUC and AP.

    Macro = unweighted mean over labels whose metric is defined (both classes present);
    the labels left out are listed.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = bootstrap_indices(len(y), groups, boot.n_boot, boot.seed)
    per: dict[str, dict[str, object]] = {}
    boot_auc = np.full((boot.n_boot, len(labels)), np.nan)
    boot_ap = np.full((boot.n_boot, len(labels)), np.nan)
    for j, lab in enumerate(labels):
        yj, pj = y[:, j], p[:, j]
        for b, ix in enumerate(idx):
            boot_auc[b, j] = _fast_auc(yj[ix], pj[ix])
            boot_ap[b, j] = _fast_ap(yj[ix], pj[ix])
        entry: dict[str, object] = {
            "n_positive": int(yj.sum()),
            "n": len(yj),
            "prevalence": float(yj.mean()) if len(yj) else None,
            "auc": auc(yj, pj),
            "auc_ci95": percentile_ci(boot_auc[:, j].tolist()),
            "average_precision": average_precision(yj, pj),
            "average_precision_ci95": percentile_ci(boot_ap[:, j].tolist()),
            "threshold": float(thresholds[j]),
        }
        entry.update(threshold_metrics(yj, pj, thresholds[j]))
        per[lab] = entry
    defined = [lab for lab in labels if per[lab]["auc"] is not None]
    cols = [labels.index(lab) for lab in defined]

    def _mean(key: str, names: Sequence[str]) -> float | None:
        vals = [per[n][key] for n in names if per[n][key] is not None]
        return float(np.mean(vals)) if vals else None  # type: ignore[arg-type]

    macro_auc_boot = np.nanmean(boot_auc[:, cols], axis=1) if cols else np.array([])
    macro_ap_boot = np.nanmean(boot_ap[:, cols], axis=1) if cols else np.array([])
    macro = {
        "auc": _mean("auc", defined),
        "auc_ci95": percentile_ci(macro_auc_boot.tolist()),
        "average_precision": _mean("average_precision", defined),
        "average_precision_ci95": percentile_ci(macro_ap_boot.tolist()),
        "accuracy": _mean("accuracy", labels),
        "precision": _mean("precision", labels),
        "recall": _mean("recall", labels),
        "f1": _mean("f1", labels),
        "labels_in_macro": defined,
        "labels_undefined": [lab for lab in labels if lab not in defined],
    }
    return {
        "per_label": per,
        "macro": macro,
        "bootstrap": {
            "n": boot.n_boot,
            "unit": "patient" if groups else "image",
            "seed": boot.seed,
        },
    }


def binary_auc_with_ci(
    y: np.ndarray,
    score: np.ndarray,
    groups: Sequence[str] | None = None,
    boot: BootstrapSpec = BootstrapSpec(),
) -> dict[str, object]:
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    vals = [
        _fast_auc(y[ix], score[ix])
        for ix in bootstrap_indices(len(y), groups, boot.n_boot, boot.seed)
    ]
    return {
        "auc": auc(y, score),
        "auc_ci95": percentile_ci(vals),
        "n_positive": int(y.sum()),
        "n": len(y),
    }


# --- localisation ------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixel coordinates of the image the heat map covers."""

    x: float
    y: float
    w: float
    h: float

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        m = np.zeros(shape, dtype=bool)
        x0, y0 = max(int(np.floor(self.x)), 0), max(int(np.floor(self.y)), 0)
        x1 = min(int(np.ceil(self.x + self.w)), shape[1])
        y1 = min(int(np.ceil(self.y + self.h)), shape[0])
        m[y0:y1, x0:x1] = True
        return m


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of the heat map's maximum.

    A coarse map upsampled bilinearly has flat plateaus at its maximum (at the borders,
    half a cell wide); ``argmax`` would pick the plateau's first pixel, biased towards the
    top-left edge. The maximum pixel nearest the plateau's centroid is used instead.
    """
    top = float(heatmap.max())
    rr, cc = np.nonzero(heatmap >= top - 1e-6 * max(abs(top), 1.0))
    if len(rr) == 1:
        return int(rr[0]), int(cc[0])
    i = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
    return int(rr[i]), int(cc[i])


def pointing_hit(heatmap: np.ndarray, box: Box) -> bool:
    """True when the heat map's peak pixel (its centre) lies inside the box."""
    r, c = peak(heatmap)
    return bool(box.x <= c + 0.5 <= box.x + box.w and box.y <= r + 0.5 <= box.y + box.h)


def predicted_box(heatmap: np.ndarray, level: float = 0.5) -> Box | None:
    """Box of the connected hot region (>= level x max) that holds the heat map's peak."""
    top = float(heatmap.max()) if heatmap.size else 0.0
    if top <= 0:
        return None
    hot = heatmap >= level * top
    lab, _ = ndimage.label(hot)
    r, c = peak(heatmap)
    region = lab == lab[r, c]
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    return Box(
        float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)
    )


def box_overlaps(pred: Box | None, truth: Box, shape: tuple[int, int]) -> tuple[float, float]:
    """(IoU, IoBB) of the predicted box against the expert box, on the pixel grid."""
    if pred is None:
        return 0.0, 0.0
    pm, tm = pred.mask(shape), truth.mask(shape)
    inter = float(np.sum(pm & tm))
    union = float(np.sum(pm | tm))
    return (inter / union if union else 0.0), (inter / float(pm.sum()) if pm.sum() else 0.0)


def localisation_summary(
    hits: Sequence[bool], ious: Sequence[float], iobbs: Sequence[float]
) -> dict[str, object]:
    n = len(hits)
    out: dict[str, object] = {
        "n_boxes": n,
        "pointing_game": float(np.mean(hits)) if n else None,
        "mean_iou": float(np.mean(ious)) if n else None,
        "mean_iobb": float(np.mean(iobbs)) if n else None,
    }
    for t in OVERLAP_THRESHOLDS:
        out[f"iou_acc@{t}"] = float(np.mean(np.asarray(ious) >= t)) if n else None
        out[f"iobb_acc@{t}"] = float(np.mean(np.asarray(iobbs) >= t)) if n else None
    return out
