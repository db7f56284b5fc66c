"""The drift reference of an artifact, from its own validation split.

The images are the ones the artifact's ``split.csv`` marks ``val`` (never ``test``: the
reference is what the model was tuned against, and the test split stays held out), read as
training and evaluation read them (``training/images.py``), scored by the artifact itself
without heat maps. Per image it keeps the features ``model/drift_reference.py`` defines;
the size is the original image's long side from the label CSV (``OrigWidth`` /
``OrigHeight``: the PNGs are downscaled copies, the node sees the originals' headers) and
the view its ``View Position``. The label CSV names no manufacturer, so the reference has
none and the node shows that feature without comparing it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ddn_node.model.artifact import ModelArtifact
from ddn_node.model.drift_reference import (
    INTENSITY_MEAN,
    INTENSITY_STD,
    SCORE,
    SIZE,
    VIEW,
    DriftReference,
    intensity_stats,
    label_feature,
)
from ddn_node.model.inference import Predictor, abnormality_score
from ddn_node.training.images import load_image_file


class DriftReferenceError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReferenceConfig:
    model: Path
    images: Path
    labels: Path
    head: str | None = None
    split: str = "val"
    batch_size: int = 16
    device: str = "cpu"


def _split_files(model: Path, part: str) -> list[str]:
    path = model / "split.csv"
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return [row["file"] for row in csv.DictReader(fh) if row["split"] == part]
    except (OSError, KeyError) as e:
        raise DriftReferenceError(f"cannot read the split of {model}: {e}") from e


def compute_reference(cfg: ReferenceConfig) -> DriftReference:
    if cfg.split == "test":
        raise DriftReferenceError("the test split stays held out: the reference is 'val'")
    artifact = ModelArtifact.load(cfg.model)
    head = cfg.head or next(iter(artifact.heads))
    labels = artifact.head(head).label_names
    files = _split_files(cfg.model, cfg.split)
    if not files:
        raise DriftReferenceError(f"{cfg.model}/split.csv has no {cfg.split!r} images")
    with cfg.labels.open(newline="", encoding="utf-8") as fh:
        rows = {row["Image Index"]: row for row in csv.DictReader(fh)}
    missing = [f for f in files if f not in rows or not (cfg.images / f).is_file()]
    if missing:
        raise DriftReferenceError(f"{len(missing)} {cfg.split} images missing, e.g. {missing[0]}")
    predictor = Predictor(artifact, device=cfg.device, batch_size=cfg.batch_size)
    numeric: dict[str, list[float]] = {
        k: [] for k in (INTENSITY_MEAN, INTENSITY_STD, SIZE, SCORE, *map(label_feature, labels))
    }
    views: Counter[str] = Counter()
    digest = hashlib.sha256()
    for start in range(0, len(files), cfg.batch_size):
        batch = files[start : start + cfg.batch_size]
        images = [load_image_file(cfg.images / f) for f in batch]
        for f, image, pred in zip(
            batch, images, predictor.predict(images, head=head, heatmaps=False), strict=True
        ):
            row = rows[f]
            mean, std = intensity_stats(image)
            numeric[INTENSITY_MEAN].append(mean)
            numeric[INTENSITY_STD].append(std)
            numeric[SIZE].append(float(max(int(row["OrigWidth"]), int(row["OrigHeight"]))))
            numeric[SCORE].append(abnormality_score(artifact, head, pred.probabilities))
            for label in labels:
                numeric[label_feature(label)].append(float(pred.probabilities[label]))
            views[row["View Position"].strip().upper() or "unknown"] += 1
            digest.update(f.encode() + b"\n")
    return DriftReference(
        numeric=numeric,
        categorical={VIEW: dict(views)},
        provenance={
            "model": artifact.algorithm.name,
            "version": artifact.algorithm.version,
            "head": head,
            "split": cfg.split,
            "n_images": len(files),
            "files_sha256": digest.hexdigest(),
            "images": str(cfg.images),
            "labels_csv": str(cfg.labels),
            "device": cfg.device,
            "computed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "how": "ddn_node.training.drift_reference.compute_reference (ddn-node drift-reference)",
        },
    )
