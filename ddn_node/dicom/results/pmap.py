"""The heat maps of one source image as one Parametric Map (PS3.3 A.75), the machine-
readable form that viewers overlay on the radiograph.

One Parametric Map per source image with a heat map, one frame per finding (the most
probable first), each frame with its own Real World Value Mapping (C.7.6.16.2.11) that says
what the values are: quantity (130403, DCM, "Gradient-weighted class activation"), unit 1,
LUT label = the finding. The maps reference their source in the Referenced Series, Source
Image and Derivation Image sequences (Spatial Locations Preserved = YES).

Choices, each checked against OHIF Viewer 3.13.2 (which overlays a Parametric Map on the
image it derives from) and dciodvfy:

- **Grid**: the source's rows x columns. OHIF refuses a map of other dimensions
  ("different geometry dimensions"), so the map is resampled (bilinear; Grad-CAM comes
  from a 7 x 7 grid) to the source grid rather than stored coarser.
- **Plane orientation and Frame of Reference** (Type 1 in the Parametric Map, absent from
  projection radiographs, PS3.3 C.8.11.7 / C.8.19.6): the source's own when it has them.
  Otherwise the map declares the orientation ``1\\0\\0\\0\\1\\0`` - the rows and columns of
  the image as stored, which is what a viewer assumes for an image without one - at
  position 0\\0\\0, with a Frame of Reference of its own (a UID derived from the source SOP
  Instance UID, so no other object claims to be registered with it). It is not a patient
  geometry: a projection has none; it says "this map lies on the source's pixel grid",
  and the per-frame Derivation Image Sequence says which image that is. OHIF compares the
  orientation exactly (a synthesised patient-based orientation was "oblique" to it).
- **Pixel data**: 32-bit float values in [0, 1]. OHIF ignores the Real World Value Mapping
  of integer maps (a 16-bit map saturated), and values under :data:`BACKGROUND` are set
  to 0, so that the faint tail of a Grad-CAM map is not painted as a dark disc.
- **Size**: stored in Deflated Explicit VR Little Endian (PS3.5 A.5), the values in steps
  of 1/255 (:data:`LEVELS`): the zeroed background and the runs of equal values compress,
  a 1024 x 1024 frame of a diffuse map takes about 0.15 MB instead of 4 MB.
- **Frames**: OHIF 3.13.2 shows the first frame of a multi-frame map only: the most
  probable finding comes first. Each map is its own series, because OHIF fuses a map
  with the first image of the map's series' source.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from highdicom import ContentQualificationValues, VOILUTTransformation
from highdicom.pm import ParametricMap, RealWorldValueMapping
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

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
from ddn_node.model.types import AlgorithmInfo, Code

# Values under this are stored as 0 (see the module docstring).
BACKGROUND = 0.2
# Values are kept to steps of 1/LEVELS: no colour map shows a finer difference and Grad-CAM
# (upsampled from 7 x 7) carries none, and deflate then finds long runs - a 1024 x 1024
# frame takes about 0.15 MB instead of 2.6 MB. The largest change is 1/510.
LEVELS = 255
# The orientation of an image's own pixel grid: rows along +x, columns along +y.
GRID_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@dataclass(frozen=True)
class MapFrame:
    """One finding's heat map on one source image."""

    label: str
    code: Code
    probability: float
    heatmap: np.ndarray  # any grid; taken to cover the whole image


def heatmap_at(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``heatmap`` as float32 in [0, 1] with shape (rows, columns), in steps of
    1/:data:`LEVELS`; NaN counts as 0, and values under :data:`BACKGROUND` are 0."""
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if values.ndim != 2:
        raise ValueError(f"a heat map must be 2-D, got shape {values.shape}")
    if values.shape != (rows, columns):
        # Bilinear, on floats: the map is smooth (Grad-CAM is upsampled from 7x7 anyway).
        image = Image.fromarray(values, mode="F")
        values = np.asarray(
            image.resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32
        )
    values = np.clip(values, 0.0, 1.0)
    values[values < BACKGROUND] = 0.0
    return (np.round(values * LEVELS) / LEVELS).astype(np.float32)


def geometry_header(header: Dataset) -> Dataset:
    """``header`` with the Frame of Reference, plane and spacing the Parametric Map needs."""
    geo = copy.deepcopy(header)
    if "ImageOrientationPatient" not in geo or "FrameOfReferenceUID" not in geo:
        geo.FrameOfReferenceUID = generate_uid(
            entropy_srcs=["ddn-node parametric map frame of reference", str(header.SOPInstanceUID)]
        )
        geo.ImageOrientationPatient = list(GRID_ORIENTATION)
        geo.ImagePositionPatient = [0.0, 0.0, 0.0]
    if "ImagePositionPatient" not in geo:
        geo.ImagePositionPatient = [0.0, 0.0, 0.0]
    geo.PixelSpacing = _spacing(header)
    if "SliceThickness" not in geo:
        # A projection has no slice thickness; highdicom reads the attribute, and an
        # empty one leaves it out of the Pixel Measures (Type 1C, PS3.3 C.7.6.16.2.1).
        geo.SliceThickness = None
    return geo


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


def build_parametric_map(
    source: Dataset,
    header: Dataset,
    frames: Sequence[MapFrame],
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    now: datetime.datetime | None = None,
) -> ParametricMap:
    """The Parametric Map of one source image: one frame per finding, most probable first.

    Args:
        source: the source image header (patient and study attributes are copied).
        header: its :func:`~.content.reference_header`.
        frames: the findings' heat maps on this image (at least one).
    """
    if not frames:
        raise ValueError("a Parametric Map needs at least one heat map")
    if "Rows" not in header or "Columns" not in header:
        raise ValueError(f"source {header.SOPInstanceUID} has no Rows/Columns: cannot place a map")
    charsets = charsets_of(source)
    ordered = sorted(frames, key=lambda f: -f.probability)
    rows, columns = int(header.Rows), int(header.Columns)
    # (frames, rows, columns, channels): one spatial frame, one channel per finding.
    pixels = np.stack([heatmap_at(f.heatmap, rows, columns) for f in ordered], axis=-1)[None]
    labels = [fit_text(f.label, None, charsets) for f in ordered]
    mappings = [
        [
            RealWorldValueMapping(
                lut_label=fit_text(label, 16, charsets),
                lut_explanation=fit_text(f"Grad-CAM {label}", 64, charsets),
                unit=C.coded(C.UNIT_ONE),
                value_range=(0.0, 1.0),
                slope=1.0,
                intercept=0.0,
                quantity_definition=C.coded(C.GRADCAM),
            )
        ]
        for label in labels
    ]
    description = "Grad-CAM heat maps: " + ", ".join(
        f"{f.label} p={f.probability:.2f}" for f in ordered
    )
    if algorithm.is_demo:
        description = f"{NOT_FOR_DIAGNOSTIC_USE} - {description}"
    equipment = general_equipment(algorithm)
    pm = ParametricMap(
        source_images=[geometry_header(header)],
        pixel_array=pixels,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.manufacturer_model_name,
        # Software Versions is VM 1-n; highdicom annotates str | tuple[str] but writes
        # any sequence of strings (a tuple makes pydicom warn: it wants a list).
        software_versions=equipment.software_versions,  # type: ignore[arg-type]
        device_serial_number=equipment.device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings,
        voi_lut_transformations=[VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="GRADCAM",
        content_description=fit_text(description, 64, charsets),
        content_qualification=(
            ContentQualificationValues.RESEARCH
            if algorithm.is_demo
            else ContentQualificationValues.PRODUCT
        ),
        contributing_equipment=[algorithm_equipment(algorithm, now)],
        series_description=describe(
            "DDN heat maps", ", ".join(labels), "PM", algorithm.is_demo, charsets
        ),
        specific_character_set=None,  # set with the patient attributes, see content.py
    )
    copy_patient_and_study(pm, source)
    _add_anatomy(pm, source)
    for item, frame in zip(pm.PerFrameFunctionalGroupsSequence, ordered, strict=True):
        item.DerivationImageSequence[0].DerivationDescription = fit_text(
            f"Grad-CAM of {algorithm.name} {algorithm.version} for {frame.label}", 1024, charsets
        )
    if algorithm.is_demo:
        pm.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: demonstration model {algorithm.version}"
    pm.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
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
