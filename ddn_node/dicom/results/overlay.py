"""A Grad-CAM heat map blended on the image, as an RGB Secondary Capture (PS3.3 A.8.1).

Every viewer shows a Secondary Capture, which is why the heat map goes back in this form
too (the Parametric Map is the machine-readable twin). The picture is the source image in
grey (MONOCHROME2 sense, as the worker rendered it for display) with the heat map in a
perceptually uniform colour map (matplotlib's *inferno*) whose opacity grows with the
value, so cold regions leave the anatomy untouched. The label, its probability and
threshold, the model version and - for demonstration models - "NOT FOR DIAGNOSTIC USE"
are burned in, hence Burned In Annotation (0028,0301) = YES (General Image, C.7.6.1).

Size: the source resolution, capped at :data:`MAX_SIDE` on the longest side. A 3000 px
RGB capture is 27 MB, and every positive finding makes one: at 1024 px each is 3 MB, enough
to show where the model looked (the heat map itself comes from a 7x7 grid), and a study
with several findings no longer costs the PACS a hundred megabytes.

:func:`render_png` turns such an object back into PNG bytes for the web UI and the docs.
"""

from __future__ import annotations

import datetime
import functools
import io

import numpy as np
from highdicom import PhotometricInterpretationValues
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from ddn_node.dicom.results.codes import coded
from ddn_node.dicom.results.content import (
    NOT_FOR_DIAGNOSTIC_USE,
    add_series_anatomy,
    charsets_of,
    copy_patient_and_study,
    fit_text,
)
from ddn_node.dicom.results.equipment import algorithm_equipment, general_equipment
from ddn_node.model.types import AlgorithmInfo, Code

MAX_SIDE = 1024
COLORMAP = "inferno"
# Below this heat nothing is drawn; above it opacity rises to MAX_ALPHA at 1.0.
ALPHA_FLOOR = 0.15
MAX_ALPHA = 0.6
# CID 7202 Source Image Purposes of Reference.
_SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
_LOSSY_KEYWORDS = (
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)


def sc_series_description(is_demo: bool) -> str:
    text = "DDN heat map overlay (SC)"
    return f"{text} - {NOT_FOR_DIAGNOSTIC_USE}" if is_demo else text


@functools.lru_cache(maxsize=4)
def _colormap_lut(name: str) -> np.ndarray:
    """256 x 3 uint8 colours of a matplotlib colour map, 0..0.9 (read-only, cached)."""
    from matplotlib import colormaps  # imported here: matplotlib is slow to import

    # The top tenth of inferno is near-white, which would wash out over bright bone:
    # stop at saturated yellow.
    lut = (colormaps[name](np.linspace(0.0, 0.9, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def output_size(rows: int, columns: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(rows, columns) of the capture: the source size, longest side capped."""
    longest = max(rows, columns)
    if longest <= max_side:
        return rows, columns
    scale = max_side / longest
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def _resize(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    if values.shape == (rows, columns):
        return values
    image = Image.fromarray(values.astype(np.float32), mode="F")
    # Pillow scales the filter support when shrinking, so this also anti-aliases.
    return np.asarray(image.resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def fit_display(display: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The display image at the overlay's size: done once per image, not once per finding."""
    gray = np.nan_to_num(np.asarray(display, dtype=np.float32), nan=0.0)
    if gray.ndim != 2:
        raise ValueError(f"the display image must be 2-D grayscale, got shape {gray.shape}")
    return np.clip(_resize(gray, *output_size(*gray.shape, max_side=max_side)), 0.0, 1.0)


def blend(
    display: np.ndarray, heatmap: np.ndarray, *, max_side: int = MAX_SIDE, colormap: str = COLORMAP
) -> np.ndarray:
    """RGB uint8 image of ``heatmap`` over ``display`` (both 2-D, values in [0, 1]).

    The heat map is resampled to the display image; the result is capped at
    ``max_side`` pixels on its longest side.
    """
    gray = np.nan_to_num(np.asarray(display, dtype=np.float32), nan=0.0)
    if gray.ndim != 2:
        raise ValueError(f"the display image must be 2-D grayscale, got shape {gray.shape}")
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    if heat.ndim != 2:
        raise ValueError(f"a heat map must be 2-D, got shape {heat.shape}")
    rows, columns = output_size(*gray.shape, max_side=max_side)
    gray = np.clip(_resize(gray, rows, columns), 0.0, 1.0)
    heat = np.clip(_resize(heat, rows, columns), 0.0, 1.0)

    colours = _colormap_lut(colormap)[np.round(heat * 255.0).astype(np.uint8)].astype(np.float32)
    alpha = np.clip((heat - ALPHA_FLOOR) / (1.0 - ALPHA_FLOOR), 0.0, 1.0)[..., None] * MAX_ALPHA
    base = np.repeat(gray[..., None] * 255.0, 3, axis=2)
    return np.clip(base * (1.0 - alpha) + colours * alpha + 0.5, 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's built-in font scales when FreeType is available; otherwise the fixed bitmap.
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):
        return ImageFont.load_default()


def burn_in(
    rgb: np.ndarray, lines: list[str], *, warning: str | None = None, colormap: str = COLORMAP
) -> np.ndarray:
    """Write ``lines`` (top left) and ``warning`` (top and bottom, red) into the image.

    Text sits on a translucent black box so it stays readable over any anatomy; a small
    colour bar (low .. high) in the bottom right explains the colours.
    """
    image = Image.fromarray(rgb, mode="RGB").convert("RGBA")
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width, height = image.size
    size = max(10, round(min(width, height) / 36))
    font = _font(size)
    margin = max(3, size // 3)
    white, red = (255, 255, 255, 255), (255, 72, 72, 255)

    def text_box(x: int, y: int, text: str, fill: tuple[int, int, int, int]) -> int:
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle(
            (left - margin, top - margin, right + margin, bottom + margin), fill=(0, 0, 0, 160)
        )
        draw.text((x, y), text, font=font, fill=fill)
        return bottom + 2 * margin

    y = margin * 2
    if warning:
        y = text_box(margin * 2, y, warning, red)
    for line in lines:
        y = text_box(margin * 2, y, line, white)
    if warning:
        _, top, _, bottom = draw.textbbox((0, 0), warning, font=font)
        text_box(margin * 2, height - (bottom - top) - margin * 3, warning, red)

    bar_w, bar_h = max(16, width // 6), max(4, size // 2)
    x0, y0 = width - bar_w - margin * 2, height - bar_h - margin * 3 - size
    if x0 > margin and y0 > y:
        lut = _colormap_lut(colormap)
        ramp = lut[np.linspace(0, 255, bar_w).astype(np.uint8)]
        bar = Image.fromarray(np.repeat(ramp[None, :, :], bar_h, axis=0), mode="RGB")
        layer.paste(bar.convert("RGBA"), (x0, y0))
        small = _font(max(8, size * 2 // 3))
        draw.text((x0, y0 + bar_h + 2), "low", font=small, fill=white)
        right = draw.textbbox((0, 0), "high", font=small)[2]
        draw.text((x0 + bar_w - right, y0 + bar_h + 2), "high", font=small, fill=white)
    return np.asarray(Image.alpha_composite(image, layer).convert("RGB"))


def build_overlay(
    source: Dataset,
    header: Dataset,
    display: np.ndarray,
    heatmap: np.ndarray,
    *,
    label: str,
    probability: float,
    threshold: float,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    max_side: int = MAX_SIDE,
    now: datetime.datetime | None = None,
) -> SCImage:
    """The Secondary Capture of one heat map over one source image."""
    charsets = charsets_of(source)
    # Burned-in text is pixels, not DICOM text: any character the font has will do.
    lines = [
        f"{label}: p = {probability:.2f} (threshold {threshold:.2f})",
        f"Grad-CAM heat map - {algorithm.name} {algorithm.version}",
    ]
    warning = NOT_FOR_DIAGNOSTIC_USE if algorithm.is_demo else None
    rgb = burn_in(blend(display, heatmap, max_side=max_side), lines, warning=warning)

    equipment = general_equipment(algorithm)
    sc = SCImage(
        pixel_array=rgb,
        photometric_interpretation=PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=str(equipment["manufacturer"]),
        # Replaced below by the source's own Patient Orientation (or empty): highdicom
        # insists on a value for the PATIENT coordinate system.
        patient_orientation=("L", "F"),
        manufacturer_model_name=str(equipment["manufacturer_model_name"]),
        software_versions=equipment["software_versions"],  # type: ignore[arg-type]
        device_serial_number=str(equipment["device_serial_number"]),
        contributing_equipment=[algorithm_equipment(algorithm, now)],
        series_description=sc_series_description(algorithm.is_demo),
        specific_character_set=None,  # set with the patient attributes, see content.py
    )
    copy_patient_and_study(sc, source)
    add_series_anatomy(sc, source)
    orientation = source.get("PatientOrientation")
    sc.PatientOrientation = (
        list(orientation) if orientation is not None and len(orientation) == 2 else None
    )
    # Workstation: the image was made by software from other images (C.8.6.1).
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    for keyword in _LOSSY_KEYWORDS:
        if keyword in header:
            sc[keyword] = header[keyword]
    sc.DerivationDescription = fit_text(
        f"Grad-CAM heat map of {label} blended on the source image", 1024, charsets
    )
    sc.SourceImageSequence = [_image_reference(header, with_purpose=True)]
    sc.ReferencedImageSequence = [_image_reference(header, with_purpose=False)]
    if algorithm.is_demo:
        sc.ImageComments = f"{NOT_FOR_DIAGNOSTIC_USE}: demonstration model {algorithm.version}"
    return sc


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
    pixels = ds.pixel_array
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
