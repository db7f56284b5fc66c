"""Training and evaluation images from files, as the display image the model expects.

PNG/JPEG exports (the NIH set) and DICOM files alike become a float32 H x W image in [0, 1]
(MONOCHROME2 sense), so training, evaluation and the node's inference (which decodes
DICOM with the same :func:`ddn_node.dicom.pixels.load_display_image`) see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ddn_node.dicom.pixels import load_display_image


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, the usual definition for converting colour images to grey."""
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def load_image_file(path: str | Path) -> np.ndarray:
    """A PNG/JPEG (8- or 16-bit, grey/RGB/RGBA/palette) or DICOM file -> display image.

    Ordinary images are taken as already windowed for display: values are scaled by the
    bit depth's maximum, not min-max stretched, so a dark image stays dark.
    """
    p = Path(path)
    if p.suffix.lower() in (".dcm", ".dicom") or _is_dicom(p):
        return load_display_image(p)
    with Image.open(p) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32)
            # 16-bit PNGs from radiology exports hold up to 65535; "I" mode may be 32-bit.
            top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
            return np.clip(arr / top, 0, 1).astype(np.float32)
        if im.mode == "F":
            arr = np.asarray(im, dtype=np.float32)
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            return np.nan_to_num((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(
                np.float32
            )
        if im.mode == "L":
            return np.asarray(im, dtype=np.float32) / 255.0
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return rgb_to_gray(rgb).astype(np.float32)


def _is_dicom(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"
