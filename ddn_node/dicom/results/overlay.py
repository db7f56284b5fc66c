"""The findings drawn on the image, as one compressed Secondary Capture per source image
(PS3.3 A.8.1): what any PACS viewer shows, where an SR or a Parametric Map is not drawn.

The picture is the source image in grey (MONOCHROME2 sense, as the worker rendered it for
display) with every reported finding of that image outlined in its own colour - the same
half-peak region the SR's planar ROI gives - lightly filled, and tagged with its label. A
legend lists each finding with its probability and operating point, and the reported
findings that have no heat map with the reason; the model version and, for demonstration
models, "NOT FOR DIAGNOSTIC USE" are burned in too, hence Burned In Annotation
(0028,0301) = YES (General Image, C.7.6.1). The colours are the Okabe-Ito palette, told
apart by colour-blind readers, in the model's label order so a finding keeps its colour.

Size: the source resolution capped at :data:`MAX_SIDE` on the longest side, JPEG Baseline
(what every viewer decodes; the outlines survive it): about 0.2 MB where the uncompressed
RGB capture of one finding was 3 MB.

:func:`render_png` turns such an object back into PNG bytes for the web UI and the docs.
"""

from __future__ import annotations

import datetime
import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from highdicom import PhotometricInterpretationValues
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.uid import JPEGBaseline8Bit

from ddn_node.dicom.results.codes import coded
from ddn_node.dicom.results.content import (
    NOT_FOR_DIAGNOSTIC_USE,
    add_series_anatomy,
    charsets_of,
    copy_patient_and_study,
    fit_text,
)
from ddn_node.dicom.results.equipment import algorithm_equipment, general_equipment
from ddn_node.dicom.results.region import Region, Shape
from ddn_node.model.types import AlgorithmInfo, Code

MAX_SIDE = 1024
# JPEG qualities tried, best first, until the capture fits its byte budget (about the size
# of the source image: the findings, not the pixels, are what the capture adds).
JPEG_QUALITIES = (90, 80, 70, 60, 50)
MIN_BUDGET_BYTES = 96 * 1024
FILL_ALPHA = 64  # of 255: the anatomy stays readable under the fill
# Okabe & Ito (2008), "Color Universal Design": distinguishable with colour-vision deficiency.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
# CID 7202 Source Image Purposes of Reference.
_SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")


@dataclass(frozen=True)
class DrawnFinding:
    """One reported finding of one image, as the overlay shows it."""

    label: str
    probability: float
    threshold: float
    colour_index: int  # the label's place in the model: its colour
    region: Region | None  # None: listed in the legend only
    note: str = ""  # why there is no region, for the legend


def sc_series_description(is_demo: bool) -> str:
    text = "DDN AI findings overlay (SC)"
    return f"{text} - {NOT_FOR_DIAGNOSTIC_USE}" if is_demo else text


def output_size(rows: int, columns: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(rows, columns) of the capture: the source size, longest side capped."""
    longest = max(rows, columns)
    if longest <= max_side:
        return rows, columns
    scale = max_side / longest
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def fit_display(display: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The display image at the overlay's size (float32 in [0, 1]): done once per image."""
    gray = np.nan_to_num(np.asarray(display, dtype=np.float32), nan=0.0)
    if gray.ndim != 2:
        raise ValueError(f"the display image must be 2-D grayscale, got shape {gray.shape}")
    rows, columns = output_size(int(gray.shape[0]), int(gray.shape[1]), max_side)
    if gray.shape != (rows, columns):
        image = Image.fromarray(gray, mode="F")
        # Pillow scales the filter support when shrinking, so this also anti-aliases.
        gray = np.asarray(
            image.resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32
        )
    return np.clip(gray, 0.0, 1.0)


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's built-in font scales when FreeType is available; otherwise the fixed bitmap.
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):
        return ImageFont.load_default()


def draw_findings(
    display: np.ndarray,
    findings: Sequence[DrawnFinding],
    *,
    source_size: tuple[int, int],
    title: str,
    warning: str | None = None,
) -> np.ndarray:
    """RGB uint8 picture: ``display`` (fitted, [0, 1]) with each finding's region outlined
    and filled in its colour, tagged, and a legend. Regions are in the source's pixel
    coordinates (``source_size`` = rows, columns) and scaled to the picture."""
    rows, columns = display.shape
    sx, sy = columns / source_size[1], rows / source_size[0]
    base = Image.fromarray((display * 255.0 + 0.5).astype(np.uint8), mode="L").convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    size = max(10, round(min(rows, columns) / 40))
    font = _font(size)
    width = max(2, round(min(rows, columns) / 300))
    for finding in findings:
        if finding.region is None:
            continue
        rgb = colour(finding.colour_index)
        points = [(float(x) * sx, float(y) * sy) for x, y in finding.region.points]
        if finding.region.shape is Shape.POLYLINE:
            draw.polygon(points, fill=(*rgb, FILL_ALPHA))
            draw.line([*points, points[0]], fill=(*rgb, 255), width=width, joint="curve")
            anchor = min(points, key=lambda p: (p[1], p[0]))
        else:
            (x, y), r = points[0], max(6, size)
            draw.ellipse((x - r, y - r, x + r, y + r), outline=(*rgb, 255), width=width)
            draw.line((x - 2 * r, y, x - r, y), fill=(*rgb, 255), width=width)
            draw.line((x + r, y, x + 2 * r, y), fill=(*rgb, 255), width=width)
            anchor = (x + r, y - r)
        _tag(draw, anchor, finding.label, rgb, font, size)
    _legend(draw, findings, (rows, columns), title, warning, font, size)
    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def _tag(
    draw: ImageDraw.ImageDraw,
    at: tuple[float, float],
    text: str,
    rgb: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    size: int,
) -> None:
    x, y = at[0], max(0.0, at[1] - size * 1.4)
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=(0, 0, 0, 170))
    draw.text((x, y), text, font=font, fill=(*rgb, 255))


def _legend(
    draw: ImageDraw.ImageDraw,
    findings: Sequence[DrawnFinding],
    shape: tuple[int, int],
    title: str,
    warning: str | None,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    size: int,
) -> None:
    """Top left: the warning and the title; bottom left: one line per finding."""
    rows, columns = shape
    margin = max(3, size // 3)
    white, red = (255, 255, 255, 255), (255, 72, 72, 255)

    def line(x: float, y: float, text: str, fill: tuple[int, int, int, int]) -> float:
        text = _fit_width(draw, text, font, columns - x - 2 * margin)
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle(
            (left - margin, top - margin, right + margin, bottom + margin), fill=(0, 0, 0, 170)
        )
        draw.text((x, y), text, font=font, fill=fill)
        return float(bottom + 2 * margin)

    y = float(margin * 2)
    if warning:
        y = line(margin * 2, y, warning, red)
    line(margin * 2, y, title, white)

    entries = []
    for f in findings:
        text = f"{f.label}: {100 * f.probability:.0f} % (threshold {100 * f.threshold:.0f} %)"
        entries.append((f, text if f.region is not None else f"{text} - {f.note or 'no heat map'}"))
    step = size * 1.6
    y = rows - margin * 3 - step * (len(entries) + (1 if warning else 0))
    for finding, text in entries:
        swatch = (margin * 2, y, margin * 2 + size, y + size)
        if finding.region is not None:
            draw.rectangle(swatch, fill=(*colour(finding.colour_index), 255))
        else:
            draw.rectangle(swatch, outline=white, width=1)
        line(margin * 3 + size, y, text, white)
        y += step
    if warning:
        line(margin * 2, y, warning, red)


def _fit_width(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: float,
) -> str:
    """``text``, cut with an ellipsis where it would run off the picture (the SR has the
    whole sentence)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def build_overlay(
    source: Dataset,
    header: Dataset,
    display: np.ndarray,
    findings: Sequence[DrawnFinding],
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    max_side: int = MAX_SIDE,
    max_bytes: int | None = None,
    now: datetime.datetime | None = None,
) -> SCImage:
    """The Secondary Capture of one source image with its reported findings drawn on it.

    ``max_bytes``: the budget of the JPEG (at least :data:`MIN_BUDGET_BYTES`); the best of
    :data:`JPEG_QUALITIES` that fits is used.
    """
    if not findings:
        raise ValueError("an overlay needs at least one reported finding")
    charsets = charsets_of(source)
    picture = draw_findings(
        fit_display(display, max_side),
        findings,
        source_size=(int(header.Rows), int(header.Columns)),
        title=f"AI findings - {algorithm.name} {algorithm.version}",
        warning=NOT_FOR_DIAGNOSTIC_USE if algorithm.is_demo else None,
    )
    equipment = general_equipment(algorithm)
    sc = SCImage(
        pixel_array=picture,
        # JPEG Baseline codes colour as YCbCr 4:2:2, which the attribute then says.
        photometric_interpretation=PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=equipment.manufacturer,
        # Replaced below by the source's own Patient Orientation (or empty): highdicom
        # insists on a value for the PATIENT coordinate system.
        patient_orientation=("L", "F"),
        manufacturer_model_name=equipment.manufacturer_model_name,
        software_versions=equipment.software_versions,
        device_serial_number=equipment.device_serial_number,
        contributing_equipment=[algorithm_equipment(algorithm, now)],
        series_description=sc_series_description(algorithm.is_demo),
        specific_character_set=None,  # set with the patient attributes, see content.py
    )
    copy_patient_and_study(sc, source)
    add_series_anatomy(sc, source)
    orientation = source.get("PatientOrientation")
    # Type 2C: the source's, or empty when it gives none.
    sc.PatientOrientation = (
        list(orientation) if orientation is not None and len(orientation) == 2 else []
    )
    # Workstation: the image was made by software from other images (C.8.6.1).
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    _compress(sc, picture, max_bytes)
    _lossy(sc, header, picture)
    sc.DerivationDescription = fit_text(
        "AI findings (" + ", ".join(f.label for f in findings) + ") drawn on the source image",
        1024,
        charsets,
    )
    sc.SourceImageSequence = [_image_reference(header, with_purpose=True)]
    sc.ReferencedImageSequence = [_image_reference(header, with_purpose=False)]
    if algorithm.is_demo:
        sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: demonstration model {algorithm.version}"
    return sc


def _compress(sc: Dataset, picture: np.ndarray, max_bytes: int | None) -> None:
    """JPEG Baseline (PS3.5 A.4.1), YCbCr 4:2:2 as YBR_FULL_422 says, encoded here rather
    than by highdicom: its fixed quality 95 and Pillow's default 4:2:0 subsampling make a
    larger file than the budget allows, and one that its Photometric Interpretation
    mislabels."""
    budget = None if max_bytes is None else max(MIN_BUDGET_BYTES, max_bytes)
    image = Image.fromarray(np.ascontiguousarray(picture), mode="RGB")
    data = b""
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, subsampling=1, optimize=True)
        data = buffer.getvalue()
        if budget is None or len(data) <= budget:
            break
    sc.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    sc.PhotometricInterpretation = "YBR_FULL_422"
    sc.PixelData = encapsulate([data])
    sc["PixelData"].VR = "OB"
    sc["PixelData"].is_undefined_length = True


def _lossy(sc: Dataset, header: Dataset, picture: np.ndarray) -> None:
    """Lossy Image Compression (C.7.6.1.1.5): this capture's JPEG, after the source's own
    history when the source was lossy already (once lossy, always lossy)."""
    methods, ratios = ["ISO_10918_1"], [f"{picture.nbytes / max(1, len(sc.PixelData)):.2f}"]
    if str(header.get("LossyImageCompression", "")) == "01":
        earlier_methods = _multi(header.get("LossyImageCompressionMethod"))
        earlier_ratios = _multi(header.get("LossyImageCompressionRatio"))
        if len(earlier_methods) == len(earlier_ratios) > 0:
            methods, ratios = [*earlier_methods, *methods], [*earlier_ratios, *ratios]
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionMethod = methods
    sc.LossyImageCompressionRatio = ratios


def _multi(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _image_reference(header: Dataset, *, with_purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    if with_purpose:
        item.PurposeOfReferenceCodeSequence = [coded(_SOURCE_FOR_PROCESSING)]
    return item


def render_png(ds: Dataset, max_side: int | None = None, compress_level: int = 6) -> bytes:
    """PNG bytes of a Secondary Capture (RGB or grayscale, uncompressed or compressed).

    ``max_side`` shrinks large images (a web thumbnail needs no 2048 px); a low
    ``compress_level`` trades a larger file for much less CPU.
    """
    pixels = ds.pixel_array  # pydicom converts JPEG's YCbCr back to RGB
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        mode = "RGB"
    elif pixels.ndim == 2:
        mode = "L"
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            pixels = pixels.max() - pixels
        if pixels.dtype != np.uint8:
            peak = float(pixels.max()) or 1.0
            pixels = (pixels.astype(np.float32) * (255.0 / peak)).astype(np.uint8)
    else:
        raise ValueError(f"cannot render pixel data of shape {pixels.shape} as PNG")
    image = Image.fromarray(np.ascontiguousarray(pixels), mode=mode)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
