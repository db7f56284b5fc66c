"""Add a task head to an existing artifact (multi-task DDN on one shared backbone).

``ddn-node train --add-head-to models/ddn-cxr --head brain_mri ...`` trains only a new
linear head on the frozen backbone + attention of the artifact (a linear probe: Alain &
Bengio, "Understanding intermediate layers using linear classifier probes", 2016) and
writes the artifact back with both heads, so the repository keeps one backbone.

With few images (the brain MRI demonstration has 48) the numbers that mean anything are
cross-validated: k folds (grouped by patient when the CSV has patient IDs, else by image)
give out-of-fold probabilities for the metrics and the thresholds; the head that ships is
then fitted on all images.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn

from ddn_node.model.artifact import HeadInfo, Manifest, ModelArtifact, save_artifact
from ddn_node.model.ddn import DDN, HeadConfig
from ddn_node.model.preprocess import normalise
from ddn_node.training.data import (
    DatasetError,
    ImageCache,
    LabelTable,
    data_fingerprint,
    load_images,
    read_label_csv,
)
from ddn_node.training.manifest_parts import (
    abnormality_def,
    choose_thresholds,
    command_line,
    json_clean,
    label_specs,
)
from ddn_node.training.metrics import BootstrapSpec, classification_report
from ddn_node.training.splits import kfold_groups, read_split_csv

log = structlog.get_logger()

PROBE_LR = 1e-3
PROBE_STEPS = 300
PROBE_WEIGHT_DECAY = 1e-4


@torch.inference_mode()
def pooled_features(model: DDN, cache: ImageCache, spec: Any, batch_size: int = 16) -> torch.Tensor:
    """Attention-pooled backbone features (N, C) of every cached image (eval mode)."""
    model.eval()
    out = []
    for s in range(0, cache.squares.shape[0], batch_size):
        x = cache.squares[s : s + batch_size].float().div_(255.0).unsqueeze(1)
        out.append(model.pooled(model.features(normalise(x, spec))))
    return torch.cat(out)


def fit_probe(
    feats: torch.Tensor, y: np.ndarray, activation: str, dropout: float, seed: int
) -> nn.Linear:
    """A linear head on fixed features, trained like the DDN's heads (dropout before it)."""
    torch.manual_seed(seed)
    lin = nn.Linear(feats.shape[1], y.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=PROBE_LR, weight_decay=PROBE_WEIGHT_DECAY)
    target = torch.from_numpy(y)
    if activation == "softmax":
        counts = np.maximum(y.sum(0), 1)
        crit: nn.Module = nn.CrossEntropyLoss(
            weight=torch.tensor(len(y) / (len(counts) * counts), dtype=torch.float32)
        )
        tgt = target.argmax(1)
    else:
        pos = y.sum(0)
        crit = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(
                np.clip((len(y) - pos) / np.maximum(pos, 1), 1, 10), dtype=torch.float32
            )
        )
        tgt = target
    lin.train()
    for _ in range(PROBE_STEPS):
        z = lin(F.dropout(feats, p=dropout, training=True))
        loss = crit(z, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return lin.eval()


def _probs(lin: nn.Linear, feats: torch.Tensor, activation: str) -> np.ndarray:
    with torch.no_grad():
        z = lin(feats)
        return (torch.softmax(z, 1) if activation == "softmax" else torch.sigmoid(z)).numpy()


def _without_test_images(table: LabelTable, base: Any) -> tuple[LabelTable, int]:
    """The rows the base artifact's ``split.csv`` does not hold out for ``evaluate``: a
    head refitted on the same data set (say, a new cxr head as a candidate) must never
    learn from the images that measure it."""
    split_csv = base / "split.csv"
    if not split_csv.is_file():
        return table, 0
    recorded = read_split_csv(split_csv)
    keep = [i for i, f in enumerate(table.files) if recorded.get(f) != "test"]
    if len(keep) == len(table):
        return table, 0
    if not keep:
        raise DatasetError(f"every image given is in the test split of {split_csv}")
    log.info("train.test_images_left_out", images=len(table) - len(keep), split_csv=str(split_csv))
    return table.subset(keep), len(table) - len(keep)


def _in_place(heads: tuple[HeadConfig, ...], fitted: HeadConfig) -> tuple[HeadConfig, ...]:
    """The heads with ``fitted`` where its namesake was (the first head is what `evaluate`
    reads by default), or after them for a new one."""
    if any(h.name == fitted.name for h in heads):
        return tuple(fitted if h.name == fitted.name else h for h in heads)
    return (*heads, fitted)


def add_head(cfg: Any) -> Manifest:
    """Train ``cfg.head`` on the frozen backbone of ``cfg.add_head_to``; write to ``cfg.out``."""
    t0 = time.monotonic()
    art = ModelArtifact.load(cfg.add_head_to)
    model, spec = art.model, art.preprocess
    table: LabelTable = read_label_csv(cfg.images, cfg.labels, cfg.label_columns or None)
    table, held_out = _without_test_images(table, cfg.add_head_to)
    cache = load_images(table, spec.size, progress=cfg.progress)
    fp = data_fingerprint(table, cache.file_sha256)
    feats = pooled_features(model, cache, spec)
    y = table.targets
    k = cfg.folds if cfg.folds >= 2 else 4
    folds = kfold_groups(table.patients, k, cfg.seed, y)
    oof = np.zeros_like(y)
    for i, fold in enumerate(folds):
        held = set(fold)
        train_idx = [j for j in range(len(table)) if j not in held]
        lin = fit_probe(
            feats[train_idx], y[train_idx], table.activation, model.config.dropout, cfg.seed + i
        )
        oof[fold] = _probs(lin, feats[fold], table.activation)
    thresholds, methods = choose_thresholds(y, oof, table.labels, "pooled out-of-fold predictions")
    rep = classification_report(
        y, oof, table.labels, thresholds, table.patients, BootstrapSpec(1000, cfg.seed)
    )
    cv: dict[str, Any] = {
        "folds": k,
        "grouping": "Patient ID"
        if table.patients != table.files
        else "image (the CSV has no patient IDs)",
        "out_of_fold": {"macro": rep["macro"], "per_label": rep["per_label"]},
    }
    if table.activation == "softmax":
        pred = oof.argmax(1)
        truth = y.argmax(1)
        acc = float((pred == truth).mean())
        rng = np.random.default_rng(cfg.seed)
        boots = [
            float((pred[ix] == truth[ix]).mean())
            for ix in (rng.integers(0, len(y), len(y)) for _ in range(1000))
        ]
        cv["accuracy_argmax"] = acc
        cv["accuracy_argmax_ci95"] = [
            float(np.quantile(boots, 0.025)),
            float(np.quantile(boots, 0.975)),
        ]
        cv["confusion_matrix"] = {
            "labels": list(table.labels),
            "rows_truth_cols_pred": np.bincount(
                truth * len(table.labels) + pred, minlength=len(table.labels) ** 2
            )
            .reshape(len(table.labels), -1)
            .tolist(),
        }
    final = fit_probe(feats, y, table.activation, model.config.dropout, cfg.seed)

    fitted = HeadConfig(cfg.head, tuple(table.labels), table.activation)  # type: ignore[arg-type]
    heads_cfg = _in_place(model.config.heads, fitted)
    new_model = DDN(replace(model.config, heads=heads_cfg))
    state = {
        k2: v for k2, v in model.state_dict().items() if not k2.startswith(f"heads.{cfg.head}.")
    }
    state[f"heads.{cfg.head}.weight"] = final.weight.detach().clone()
    state[f"heads.{cfg.head}.bias"] = final.bias.detach().clone()
    new_model.load_state_dict(state)
    commands = {"command": cfg.command or command_line()}
    head = HeadInfo(
        activation=table.activation,  # type: ignore[arg-type]
        labels=label_specs(table.labels, thresholds, methods),
        abnormality=abnormality_def(table),
        training={
            **commands,
            "method": "linear probe on the artifact's frozen backbone + attention (pooled features); "
            f"Adam lr {PROBE_LR}, {PROBE_STEPS} full-batch steps, weight decay {PROBE_WEIGHT_DECAY}, "
            f"dropout {model.config.dropout}, class-weighted loss",
            "backbone_from": f"{art.name} {art.version} (weights sha256 {art.weights_sha256})",
            "data": {
                **fp,
                "images_dir": str(cfg.images),
                "labels_csv": str(cfg.labels),
                "layout": table.layout,
            },
            "final_model": "fitted on all images after cross-validation",
            "test_images_left_out": held_out,
            "seconds": round(time.monotonic() - t0, 1),
        },
        metrics=json_clean({"cross_validation": cv}),
    )
    heads = {n: (head if n == cfg.head else h) for n, h in art.manifest.heads.items()}
    heads.setdefault(cfg.head, head)
    update: dict[str, Any] = {
        "heads": heads,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if cfg.version:
        update["version"] = cfg.version
    manifest = art.manifest.model_copy(update=update)
    cfg.out.mkdir(parents=True, exist_ok=True)
    final_manifest = save_artifact(cfg.out, new_model, manifest)
    if cfg.out.resolve() != cfg.add_head_to.resolve() and (cfg.add_head_to / "split.csv").is_file():
        shutil.copy2(cfg.add_head_to / "split.csv", cfg.out / "split.csv")
    log.info(
        "train.head_added",
        head=cfg.head,
        out=str(cfg.out),
        cv_macro_auc=rep["macro"]["auc"],
        seconds=head.training["seconds"],
    )
    return final_manifest
