"""A Grad-CAM heat map as a Parametric Map (PS3.3 A.75), the machine-readable form.

One Parametric Map per (source image, positive label): 32-bit float values in [0, 1] at
the source image's rows x columns, with a Real World Value Mapping (C.7.6.16.2.11) that
says what the values are - quantity (130403, DCM, "Gradient-weighted class activation"),
unit 1, LUT label ``GRADCAM`` - and references to the source image in the Referenced
Series, Source Image and Derivation Image sequences (Spatial Locations Preserved = YES).

Geometry: the Parametric Map IOD requires a Frame of Reference and Plane Position /
Plane Orientation (Patient) functional groups, which projection radiographs (CR, DX) do
not have. When the source has them they are used as they are; otherwise the map gets a
Frame of Reference of its own - a UID derived from the source SOP Instance UID, so all
maps of one image share it and no other object claims to be registered with it - and a
plane built from the source's Patient Orientation (row and column directions), its
Pixel Spacing (or Imager Pixel Spacing), and the origin (0, 0, 0). The pixel grid is the
source's, which is what a viewer needs to overlay the map on the image.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass

import numpy as np
from highdicom import (
    ContentQualificationValues,
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    PlanePositionSequence,
    VOILUTTransformation,
)
from highdicom.pm import ParametricMap, RealWorldValueMapping
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.content import (
    NOT_FOR_DIAGNOSTIC_USE,
    add_series_anatomy,
    anatomic_region,
    charsets_of,
    copy_patient_and_study,
    describe,
    fit_text,
    source_laterality,
)
from ddn_node.dicom.results.equipment import algorithm_equipment, general_equipment
from ddn_node.model.types import AlgorithmInfo

LUT_LABEL = "GRADCAM"

# PS3.3 C.7.6.2.1.1: unit vectors of the patient axes (LPS) for the letters of Patient
# Orientation (0020,0020): L = +x, P = +y, H = +z.
_AXES = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}
# A frontal chest radiograph displayed as usual: rows run to the patient's left, columns
# to the feet ("L\F"); used when the source gives no usable orientation.
_DEFAULT_ORIENTATION = ("L", "F")


def heatmap_at(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``heatmap`` as float32 in [0, 1] with shape (rows, columns); NaN counts as 0."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if values.ndim != 2:
        raise ValueError(f"a heat map must be 2-D, got shape {values.shape}")
    if values.shape != (rows, columns):
        # Bilinear, on floats: the map is smooth (Grad-CAM is upsampled from 7x7 anyway).
        image = Image.fromarray(values, mode="F")
        resized = image.resize((columns, rows), Image.Resampling.BILINEAR)
        values = np.asarray(resized, dtype=np.float32)
    return np.clip(values, 0.0, 1.0)


def geometry_header(header: Dataset) -> Dataset:
    """``header`` with the Frame of Reference and plane the Parametric Map needs."""
    geo = copy.deepcopy(header)
    if "FrameOfReferenceUID" not in geo or "ImageOrientationPatient" not in geo:
        geo.FrameOfReferenceUID = generate_uid(
            entropy_srcs=["ddn-node parametric map frame of reference", str(header.SOPInstanceUID)]
        )
        geo.ImageOrientationPatient = _orientation(header.get("PatientOrientation"))
        geo.ImagePositionPatient = [0.0, 0.0, 0.0]
    if "ImagePositionPatient" not in geo:
        geo.ImagePositionPatient = [0.0, 0.0, 0.0]
    geo.PixelSpacing = _spacing(header)
    if "SliceThickness" not in geo:
        # A projection has no slice thickness; highdicom reads the attribute, and an
        # empty one leaves it out of the Pixel Measures (Type 1C, PS3.3 C.7.6.16.2.1).
        geo.SliceThickness = None
    return geo


def _orientation(value: object) -> list[float]:
    letters = _DEFAULT_ORIENTATION
    if isinstance(value, (list, tuple, MultiValue)) and len(value) == 2:
        row, col = (str(v).strip().upper() for v in value)
        if row and col and all(ch in _AXES for ch in row + col):
            letters = (row, col)
    row_vec = _unit(letters[0])
    col_vec = _unit(letters[1])
    if abs(float(np.dot(row_vec, col_vec))) > 1e-6:
        row_vec, col_vec = _unit("L"), _unit("F")
    return [float(v) for v in (*row_vec, *col_vec)]


def _unit(letters: str) -> np.ndarray:
    # Oblique orientations combine letters ("LF"); the main one dominates but all count.
    vec = np.zeros(3)
    for weight, ch in zip((1.0, 0.5, 0.25), letters, strict=False):
        vec += weight * np.array(_AXES[ch])
    return vec / np.linalg.norm(vec)


def _spacing(header: Dataset) -> list[float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is not None and len(value) == 2:
            try:
                spacing = [float(v) for v in value]
            except (TypeError, ValueError):
                continue
            if all(s > 0 for s in spacing):
                return spacing
    return [1.0, 1.0]


# Grad-CAM is upsampled from the last stage's 7x7 grid: a 512-pixel map holds all of its
# information, at 1 MiB of floats where the source resolution (2048^2) would take 16 MiB
# per finding in the PACS.
MAX_MAP_SIDE = 512


@dataclass(frozen=True)
class _Grid:
    rows: int
    columns: int
    pixel_measures: PixelMeasuresSequence | None = None
    plane_orientation: PlaneOrientationSequence | None = None
    plane_positions: list[PlanePositionSequence] | None = None


def map_grid(geo: Dataset, max_side: int | None) -> _Grid:
    """The map's pixel grid: the source's, or coarser with the same extent in the patient.

    A coarser grid keeps the source's plane; its pixel spacing grows by the scale factor
    and the centre of its first pixel moves half a (new) pixel minus half an (old) pixel
    along each axis, so the map covers the image exactly (PS3.3 C.7.6.2.1.1).
    """
    rows, columns = int(geo.Rows), int(geo.Columns)
    if max_side is None or max(rows, columns) <= max_side:
        return _Grid(rows, columns)
    scale = max(rows, columns) / max_side
    new_rows, new_columns = max(1, round(rows / scale)), max(1, round(columns / scale))
    s_rows, s_cols = rows / new_rows, columns / new_columns
    row_spacing, col_spacing = (float(v) for v in geo.PixelSpacing)
    orientation = [float(v) for v in geo.ImageOrientationPatient]
    along_row, along_col = np.array(orientation[:3]), np.array(orientation[3:])
    origin = np.array([float(v) for v in geo.ImagePositionPatient])
    first = (
        origin
        + along_row * (s_cols - 1) / 2 * col_spacing
        + along_col * (s_rows - 1) / 2 * row_spacing
    )
    return _Grid(
        new_rows,
        new_columns,
        PixelMeasuresSequence([row_spacing * s_rows, col_spacing * s_cols], None),
        PlaneOrientationSequence("PATIENT", orientation),
        [PlanePositionSequence("PATIENT", [float(v) for v in first])],
    )


def build_parametric_map(
    source: Dataset,
    header: Dataset,
    heatmap: np.ndarray,
    *,
    label: str,
    probability: float,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    now: datetime.datetime | None = None,
    max_side: int | None = MAX_MAP_SIDE,
) -> ParametricMap:
    """The Parametric Map of one heat map of one source image.

    Args:
        source: the source image header (patient and study attributes are copied).
        header: its :func:`~.content.reference_header`.
        heatmap: Grad-CAM values in [0, 1]; resampled to the map's grid.
        max_side: longest side of the map in pixels (None: the source's grid).
    """
    if "Rows" not in header or "Columns" not in header:
        raise ValueError(f"source {header.SOPInstanceUID} has no Rows/Columns: cannot place a map")
    charsets = charsets_of(source)
    geo = geometry_header(header)
    grid = map_grid(geo, max_side)
    values = heatmap_at(heatmap, grid.rows, grid.columns)
    label_text = fit_text(label, None, charsets)
    mapping = RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=fit_text(f"Grad-CAM {label_text}", 64, charsets),
        unit=C.coded(C.UNIT_ONE),
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=C.coded(C.GRADCAM),
    )
    content_description = f"Grad-CAM heat map of {label_text}, p={probability:.2f}"
    if algorithm.is_demo:
        content_description = f"{NOT_FOR_DIAGNOSTIC_USE} - {content_description}"
    equipment = general_equipment(algorithm)
    pm = ParametricMap(
        source_images=[geo],
        pixel_array=values,
        pixel_measures=grid.pixel_measures,
        plane_orientation=grid.plane_orientation,
        plane_positions=grid.plane_positions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=str(equipment["manufacturer"]),
        manufacturer_model_name=str(equipment["manufacturer_model_name"]),
        software_versions=equipment["software_versions"],  # type: ignore[arg-type]
        device_serial_number=str(equipment["device_serial_number"]),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label=LUT_LABEL,
        content_description=fit_text(content_description, 64, charsets),
        content_qualification=(
            ContentQualificationValues.RESEARCH
            if algorithm.is_demo
            else ContentQualificationValues.PRODUCT
        ),
        contributing_equipment=[algorithm_equipment(algorithm, now)],
        series_description=describe("DDN heat map", label, "PM", algorithm.is_demo, charsets),
        specific_character_set=None,  # set with the patient attributes, see content.py
    )
    copy_patient_and_study(pm, source)
    _add_anatomy(pm, source)
    derivation = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    derivation.DerivationDescription = fit_text(
        f"Grad-CAM of {algorithm.name} {algorithm.version} for {label_text}", 1024, charsets
    )
    if algorithm.is_demo:
        pm.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: demonstration model {algorithm.version}"
    return pm


def _add_anatomy(pm: Dataset, source: Dataset) -> None:
    """Frame Anatomy (C.7.6.16.2.8) when the body part is known, else series Laterality.

    Frame Laterality answers the General Series Laterality condition (Type 2C) for the
    Parametric Map; a chest is unpaired ("U").
    """
    add_series_anatomy(pm, source)
    region = anatomic_region(source)
    if region is None:
        return
    code, paired = region
    laterality = source_laterality(source) if paired else "U"
    if laterality is None:
        return
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [C.coded(code)]
    anatomy.FrameLaterality = laterality
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    if "Laterality" in pm and not paired:
        del pm.Laterality
