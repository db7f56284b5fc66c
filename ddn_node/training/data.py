"""Training/evaluation datasets.

Two label layouts are read:

* NIH ChestX-ray14 (Wang et al., CVPR 2017; the ``Data_Entry_2017`` layout as laid out in
  ``../shared/data/nih/labels.csv``): ``Image Index``, ``Finding Labels`` (``|``-separated),
  ``Patient ID``, and optionally one 0/1 column per label. Labels are the 14 NIH findings;
  ``No Finding`` is not a model output but marks the "normal" studies for the
  abnormal-vs-normal evaluation.
* A folder of DICOM/PNG/JPEG images with a CSV: a file column (``file``, ``path``,
  ``filename`` or ``Image Index``), either a single-class ``label`` column (mutually
  exclusive classes -> softmax head) or one 0/1 column per label (``--label-columns``), and
  optionally ``Patient ID`` (without it every image is its own group).

Images are decoded once and kept in memory as padded squares (uint8, 50 kB each at 224 px),
which is what makes CPU training of ~1000 images feasible without data-loader workers.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from tqdm import tqdm

from ddn_node.model.preprocess import fit_to_square
from ddn_node.training.images import load_image_file

log = structlog.get_logger()

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
# NIH's BBox_List_2017 names differ from the image labels for one finding.
NIH_BBOX_TO_LABEL = {"Infiltrate": "Infiltration"}
FILE_COLUMNS = ("Image Index", "file", "path", "filename", "image")
PATIENT_COLUMNS = ("Patient ID", "patient_id", "PatientID", "patient")


class DatasetError(ValueError):
    """The image folder or label CSV cannot be used as given."""


@dataclass
class LabelTable:
    """Parsed label CSV: one row per image."""

    files: list[str]  # as written in the CSV (relative names)
    paths: list[Path]  # resolved image paths
    patients: list[str]  # group key for patient-disjoint splits
    labels: tuple[str, ...]
    targets: np.ndarray  # (N, L) float32 0/1
    activation: str  # "sigmoid" (multi-label) or "softmax" (one class per image)
    normal: np.ndarray  # (N,) bool: "No Finding" / the normal class, for abnormality AUC
    layout: str  # "nih" or "folder"
    csv_sha256: str = ""
    extra: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, idx: Sequence[int]) -> LabelTable:
        ix = list(idx)
        return LabelTable(
            files=[self.files[i] for i in ix],
            paths=[self.paths[i] for i in ix],
            patients=[self.patients[i] for i in ix],
            labels=self.labels,
            targets=self.targets[ix],
            activation=self.activation,
            normal=self.normal[ix],
            layout=self.layout,
            csv_sha256=self.csv_sha256,
            extra={k: [v[i] for i in ix] for k, v in self.extra.items()},
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(images: Path, csv_path: Path, name: str) -> Path:
    for base in (images, csv_path.parent):
        p = base / name
        if p.is_file():
            return p
    # NIH's CSV lists bare file names; folders sometimes hold them one level down.
    p = images / Path(name).name
    return p


def read_label_csv(  # noqa: C901, PLR0915 - one pass over the CSV, each column's checks beside it
    images: Path,
    labels_csv: Path,
    label_columns: Sequence[str] | None = None,
    normal_label: str | None = None,
) -> LabelTable:
    """Read a label CSV in the NIH or folder layout (see module docstring)."""
    if not labels_csv.is_file():
        raise DatasetError(f"label CSV not found: {labels_csv}")
    if not images.is_dir():
        raise DatasetError(f"image folder not found: {images}")
    with labels_csv.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{labels_csv} has no rows")
    file_col = next((c for c in FILE_COLUMNS if c in header), None)
    if file_col is None:
        raise DatasetError(
            f"{labels_csv}: no file column (one of {FILE_COLUMNS}); columns are {header}"
        )
    patient_col = next((c for c in PATIENT_COLUMNS if c in header), None)

    if "Finding Labels" in header and not label_columns:
        layout, activation = "nih", "sigmoid"
        labels = NIH_LABELS
        targets = np.zeros((len(rows), len(labels)), dtype=np.float32)
        normal = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows):
            found = {s.strip() for s in r["Finding Labels"].split("|") if s.strip()}
            unknown = found - set(labels) - {NO_FINDING}
            if unknown:
                raise DatasetError(
                    f"{labels_csv} row {i + 2}: unknown finding(s) {sorted(unknown)}"
                )
            for j, lab in enumerate(labels):
                # The text column is the source of truth; 0/1 columns, where present, must agree.
                targets[i, j] = 1.0 if lab in found else 0.0
                if lab in r and r[lab] not in ("", None) and float(r[lab]) != targets[i, j]:
                    raise DatasetError(
                        f"{labels_csv} row {i + 2}: column {lab} disagrees with Finding Labels"
                    )
            normal[i] = found == {NO_FINDING}
    elif label_columns:
        layout, activation = "folder", "sigmoid"
        missing = [c for c in label_columns if c not in header]
        if missing:
            raise DatasetError(f"{labels_csv}: label columns {missing} not in {header}")
        labels = tuple(label_columns)
        targets = np.array([[float(r[c] or 0) for c in labels] for r in rows], dtype=np.float32)
        normal = (
            np.array([float(r[normal_label] or 0) > 0 for r in rows])
            if normal_label and normal_label in header
            else targets.sum(1) == 0
        )
    elif "label" in header:
        layout, activation = "folder", "softmax"
        labels = tuple(sorted({r["label"].strip() for r in rows}))
        if len(labels) < 2:
            raise DatasetError(f"{labels_csv}: the 'label' column has fewer than two classes")
        targets = np.zeros((len(rows), len(labels)), dtype=np.float32)
        for i, r in enumerate(rows):
            targets[i, labels.index(r["label"].strip())] = 1.0
        normal_name = normal_label or next(
            (
                c
                for c in labels
                if c.lower().replace("_", "").replace(" ", "")
                in ("notumor", "notumour", "normal", "nofinding")
            ),
            None,
        )
        normal = (
            np.array([r["label"].strip() == normal_name for r in rows])
            if normal_name
            else np.zeros(len(rows), bool)
        )
    else:
        raise DatasetError(
            f"{labels_csv}: cannot tell the labels: need 'Finding Labels' (NIH), a 'label' column, or --label-columns"
        )

    files = [r[file_col] for r in rows]
    paths = [_resolve(images, labels_csv, f) for f in files]
    absent = [f for f, p in zip(files, paths, strict=True) if not p.is_file()]
    if absent:
        raise DatasetError(
            f"{len(absent)} image(s) listed in {labels_csv.name} are not in {images}, e.g. {absent[:3]}"
        )
    patients = [r[patient_col].strip() for r in rows] if patient_col else list(files)
    extra = {c: [r.get(c, "") for r in rows] for c in ("View Position",) if c in header}
    return LabelTable(
        files=files,
        paths=paths,
        patients=patients,
        labels=labels,
        targets=targets,
        activation=activation,
        normal=normal,
        layout=layout,
        csv_sha256=_sha256_file(labels_csv),
        extra=extra,
    )


def data_fingerprint(table: LabelTable, file_hashes: Sequence[str]) -> dict[str, Any]:
    """A stable fingerprint of exactly the images and labels a model saw."""
    h = hashlib.sha256()
    for f, fh, t in sorted(zip(table.files, file_hashes, table.targets.tolist(), strict=True)):
        h.update(f"{f}\t{fh}\t{','.join(str(int(v)) for v in t)}\n".encode())
    return {
        "sha256": h.hexdigest(),
        "n_images": len(table),
        "n_patients": len(set(table.patients)),
        "labels_csv_sha256": table.csv_sha256,
        "definition": "sha256 over sorted lines 'file<TAB>sha256(file bytes)<TAB>0/1 targets'",
    }


@dataclass
class ImageCache:
    """Decoded, squared images (uint8, (N, S, S)) and the sha256 of each source file."""

    squares: torch.Tensor
    file_sha256: list[str]


def load_images(
    table: LabelTable,
    size: int,
    progress: bool = True,
    loader: Callable[[Path], np.ndarray] = load_image_file,
) -> ImageCache:
    out = torch.empty((len(table), size, size), dtype=torch.uint8)
    hashes: list[str] = []
    for i, p in enumerate(
        tqdm(table.paths, desc="load images", unit="img", disable=not progress, leave=False)
    ):
        raw = p.read_bytes()
        hashes.append(hashlib.sha256(raw).hexdigest())
        img = loader(p)
        sq, _ = fit_to_square(img, size)
        out[i] = torch.round(sq[0] * 255.0).to(torch.uint8)
    log.info("data.images_loaded", n=len(table), size=size)
    return ImageCache(out, hashes)
