"""Helpers for the result-builder tests: synthetic sources, hand-made predictions, and
running the validators (dciodvfy from dicom3tools, dsrdump from DCMTK)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ddn_node.model.types import AlgorithmInfo, Code, ImagePrediction, LabelSpec, StudyPrediction

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

LABELS = [
    LabelSpec("Pneumothorax", Code("36118008", "SCT", "Pneumothorax"), 0.5),
    LabelSpec("Effusion", Code("60046008", "SCT", "Pleural effusion"), 0.4),
    LabelSpec("Nodule", Code("RID3875", "RADLEX", "Nodule"), 0.3),
]


def algorithm(*, demo: bool = True) -> AlgorithmInfo:
    return AlgorithmInfo(
        name="DDN chest X-ray",
        version="2026.11.27-ddn-cxr-r1",
        manufacturer="ddn-node project",
        software_version="0.1.0",
        device_uid="1.2.826.0.1.3680043.8.498.424242",
        is_demo=demo,
        intended_use="triage of frontal chest radiographs",
    )


def synthetic_source(
    *,
    rows: int = 96,
    columns: int = 80,
    study_uid: str | None = None,
    name: str = "Müller^Jürgen",
    charset: str | list[str] = "ISO_IR 192",
) -> Dataset:
    """A DX For Presentation header as a modality would send it (no pixel data)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = name
    ds.PatientID = "P-0042"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "M"
    ds.PatientAge = "063Y"
    ds.StudyDate = "20261120"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC123"
    ds.ReferringPhysicianName = "Ref^Erin"
    ds.StudyID = "S1"
    ds.StudyDescription = "Thorax PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.143, 0.143]
    ds.Rows = rows
    ds.Columns = columns
    return ds


def blob(
    rows: int, columns: int, cy: float = 0.4, cx: float = 0.6, width: float = 0.15
) -> np.ndarray:
    """A smooth heat map with one hot spot (what Grad-CAM upsampled looks like)."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    return np.exp(
        -(((yy - rows * cy) / (rows * width)) ** 2 + ((xx - columns * cx) / (columns * width)) ** 2)
    ).astype(np.float32)


def prediction_for(
    sources: Sequence[Dataset],
    probabilities: Sequence[dict[str, float]],
    *,
    demo: bool = True,
    labels: Sequence[LabelSpec] = LABELS,
) -> StudyPrediction:
    """A StudyPrediction as the worker makes it: heat maps for labels at/above threshold."""
    images = []
    for ds, probs in zip(sources, probabilities, strict=True):
        rows, columns = int(ds.Rows), int(ds.Columns)
        heatmaps = {
            spec.name: blob(rows, columns, cx=0.3 + 0.2 * i)
            for i, spec in enumerate(labels)
            if probs[spec.name] >= spec.threshold
        }
        images.append(ImagePrediction(str(ds.SOPInstanceUID), dict(probs), heatmaps))
    study = {spec.name: max(p[spec.name] for p in probabilities) for spec in labels}
    return StudyPrediction(
        head="cxr",
        labels=list(labels),
        probabilities=study,
        abnormality_score=max(study.values()),
        images=images,
        algorithm=algorithm(demo=demo),
    )


def display_for(sources: Sequence[Dataset]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        str(ds.SOPInstanceUID): (rng.random((int(ds.Rows), int(ds.Columns))) * 0.6 + 0.2).astype(
            np.float32
        )
        for ds in sources
    }


def roundtrip(ds: Dataset, tmp_path: Path, name: str) -> tuple[Path, Dataset]:
    """Write ``ds`` as a DICOM file and read it back, as the PACS would see it."""
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


_VR_ERROR = re.compile(r"^Error - Value invalid for this VR - \((0x[0-9a-f]{4}),(0x[0-9a-f]{4})\)")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for ``path``."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60, check=False)
    text = (out.stdout + out.stderr).decode("latin-1")
    lines = [line.strip() for line in text.splitlines()]
    errors = [line for line in lines if line.startswith("Error - ")]
    warnings = [line for line in lines if line.startswith("Warning - ")]
    return errors, warnings


def inherited_vr_errors(source_path: Path) -> set[tuple[str, str]]:
    """Tags whose *source* values already break their VR (copied verbatim on purpose)."""
    errors, _ = dciodvfy(source_path)
    found = set()
    for line in errors:
        match = _VR_ERROR.match(line)
        if match:
            found.add((match.group(1), match.group(2)))
    return found


def own_errors(errors: list[str], inherited: set[tuple[str, str]]) -> list[str]:
    """Errors that are ours: not the summary line and not a VR error inherited verbatim."""
    ours = []
    for line in errors:
        match = _VR_ERROR.match(line)
        if match and (match.group(1), match.group(2)) in inherited:
            continue
        if line.startswith("Error - Dicom dataset contains invalid data values") and inherited:
            continue
        ours.append(line)
    return ours
