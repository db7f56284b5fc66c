"""Helpers for the result-builder tests: synthetic sources, hand-made predictions, walking
the SR content tree, and the external validators (via ``tests/support/validators.py``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import validators as V

from ddn_node.dicom.results import codes as C
from ddn_node.model.types import AlgorithmInfo, Code, ImagePrediction, LabelSpec, StudyPrediction

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
GRID_PLANE = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

LABELS = [
    LabelSpec("Pneumothorax", Code("36118008", "SCT", "Pneumothorax"), 0.5),
    LabelSpec("Effusion", Code("60046008", "SCT", "Pleural effusion"), 0.4),
    LabelSpec("Nodule", Code("RID3875", "RADLEX", "Nodule"), 0.3),
]
SPEC = {spec.name: spec for spec in LABELS}
# Where prediction_for puts each label's hot spot (fractions of rows, columns).
CENTRES = {spec.name: (0.4, 0.3 + 0.2 * i) for i, spec in enumerate(LABELS)}


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
    """A DX For Presentation header as a modality would send it (no pixel data, no
    Image Orientation / Frame of Reference: a projection radiograph)."""
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


def same_study(count: int, **kwargs: object) -> list[Dataset]:
    """``count`` synthetic sources of one study (one series each)."""
    first = synthetic_source(**kwargs)  # type: ignore[arg-type]
    rest = [
        synthetic_source(study_uid=str(first.StudyInstanceUID), **kwargs)  # type: ignore[arg-type]
        for _ in range(count - 1)
    ]
    return [first, *rest]


def with_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int = 12) -> Dataset:
    """``ds`` with uncompressed MONOCHROME2 pixel data (uint16) from ``pixels`` in [0, 1]."""
    values = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 1.0) * (2**bits_stored - 1)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = np.round(values).astype("<u2").tobytes()
    return ds


def blob(
    rows: int, columns: int, cy: float = 0.4, cx: float = 0.6, width: float = 0.15
) -> np.ndarray:
    """A smooth heat map with one hot spot (what Grad-CAM upsampled looks like); its peak
    is at pixel (rows * cy, columns * cx)."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    return np.exp(
        -(((yy - rows * cy) / (rows * width)) ** 2 + ((xx - columns * cx) / (columns * width)) ** 2)
    ).astype(np.float32)


def blob_centre(rows: int, columns: int, label: str) -> tuple[float, float]:
    """The (column, row) SCOORD position (PS3.3 C.18.6.1.2) of a label's blob peak."""
    cy, cx = CENTRES[label]
    return columns * cx + 0.5, rows * cy + 0.5


def prediction_for(
    sources: Sequence[Dataset],
    probabilities: Sequence[dict[str, float]],
    *,
    demo: bool = True,
    labels: Sequence[LabelSpec] = LABELS,
) -> StudyPrediction:
    """A StudyPrediction as the worker makes it: heat maps for labels at/above threshold
    on each image, label i's hot spot at row 0.4, column 0.3 + 0.2 i."""
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


def flat_display(sources: Sequence[Dataset], level: float = 0.5) -> dict[str, np.ndarray]:
    """A uniform grey display image per source: whatever is not grey was drawn."""
    return {
        str(ds.SOPInstanceUID): np.full((int(ds.Rows), int(ds.Columns)), level, np.float32)
        for ds in sources
    }


def roundtrip(ds: Dataset, tmp_path: Path, name: str) -> tuple[Path, Dataset]:
    """Write ``ds`` as a DICOM file and read it back, as the PACS would see it."""
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


def explicit_copy(ds: Dataset, tmp_path: Path, name: str) -> Path:
    """``ds`` written as Explicit VR Little Endian (dciodvfy cannot read deflated files);
    ``ds`` itself keeps its transfer syntax."""
    clone = copy.deepcopy(ds)
    clone.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"{name}.dcm"
    clone.save_as(path, enforce_file_format=True)
    return path


def frame_mappings(pm: Dataset) -> list[Dataset]:
    """The Real World Value Mapping item of each frame of a Parametric Map: per frame, or
    shared by all frames (where highdicom puts it for a single-frame map)."""
    shared = pm.SharedFunctionalGroupsSequence[0].get("RealWorldValueMappingSequence")
    out = []
    for item in pm.PerFrameFunctionalGroupsSequence:
        (mapping,) = item.get("RealWorldValueMappingSequence") or shared
        out.append(mapping)
    return out


def half_peak_area(heatmap: np.ndarray) -> int:
    """Pixels at or above half the heat map's peak."""
    values = np.asarray(heatmap, dtype=np.float32)
    return int((values >= 0.5 * float(values.max())).sum())


def shoelace(points: Sequence[Sequence[float]]) -> float:
    xy = np.asarray(points, dtype=np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# --- the SR content tree ------------------------------------------------------------------


def is_concept(item: Dataset, code: Code) -> bool:
    seq = item.get("ConceptNameCodeSequence")
    return bool(seq) and C.same_code(seq[0], code)


def child(item: Dataset, code: Code) -> Dataset:
    """The one child content item of ``item`` whose concept name is ``code``."""
    (found,) = [c for c in item.get("ContentSequence", []) if is_concept(c, code)]
    return found


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The TID 1410 groups under "Imaging Measurements" (126010, DCM)."""
    return list(child(sr, C.IMAGING_MEASUREMENTS).get("ContentSequence", []))


FINDING = Code("121071", "DCM", "Finding")
TRACKING_ID = Code("112039", "DCM", "Tracking Identifier")
WHOLE_IMAGE = "Whole image"


def finding_groups(sr: Dataset) -> list[Dataset]:
    """The groups of reported findings (those with a Finding), in document order."""
    return [
        g for g in measurement_groups(sr) if any(is_concept(i, FINDING) for i in g.ContentSequence)
    ]


def whole_image_groups(sr: Dataset) -> list[Dataset]:
    """The "Whole image" group of each scored image, in document order."""
    return [
        g
        for g in measurement_groups(sr)
        if any(
            is_concept(i, TRACKING_ID) and str(i.TextValue) == WHOLE_IMAGE
            for i in g.ContentSequence
        )
    ]


def evaluations(sr: Dataset) -> list[Dataset]:
    """The items of the Qualitative Evaluations container (TID 1500 row 12)."""
    return list(child(sr, C.QUALITATIVE_EVALUATIONS).get("ContentSequence", []))


def walk(item: Dataset) -> Iterator[Dataset]:
    """Every content item below ``item``, depth first."""
    for sub in item.get("ContentSequence", []):
        yield sub
        yield from walk(sub)


def texts(items: Sequence[Dataset], code: Code) -> list[str]:
    return [str(i.TextValue) for i in items if i.ValueType == "TEXT" and is_concept(i, code)]


# --- validators -----------------------------------------------------------------------------


def inherited_vr_errors(source_path: Path) -> set[tuple[int, int]]:
    """Tags whose *source* values already break their VR (copied verbatim on purpose)."""
    return V.vr_error_tags(V.dciodvfy(source_path))


def own_errors(
    report: V.Report[V.IODMessage], inherited: set[tuple[int, int]]
) -> V.Report[V.IODMessage]:
    """``report`` without the VR errors inherited verbatim from the source (and then
    without dciodvfy's summary line of those)."""
    return report.without(
        lambda m: (
            m.tag in inherited
            or (bool(inherited) and m.text.startswith("Dicom dataset contains invalid data values"))
        )
    )
