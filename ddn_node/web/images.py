"""Pictures for the study page: source-image thumbnails and Grad-CAM overlays, as PNG.

Source thumbnails are rendered from the spooled DICOM (``dicom.pixels`` applies the LUTs
and photometric rules the model sees), overlays from the RGB Secondary Capture objects the
worker sent to the PACS (rendering them only when someone looks keeps PNG encoding off the
analysis's critical path). Both are scaled down and kept in a bounded in-memory cache on
``app.state``; decoding a 2048x2048 JPEG 2000 image costs hundreds of milliseconds and a
radiologist opens the same study several times.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

THUMB_PX = 384
FULL_PX = 2048  # "full size" overlays are still capped: a browser tab, not a viewer


class ImageUnavailable(Exception):
    """The picture cannot be produced (file gone, pixel data undecodable)."""


class ImageCache:
    """A byte-bounded LRU of rendered PNGs, safe across the server's worker threads."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int, int], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


def _png(image: Image.Image, max_px: int) -> bytes:
    image.thumbnail((max_px, max_px), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _key(path: Path, max_px: int) -> tuple[str, int, int]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageUnavailable(f"file missing: {exc.strerror}") from None
    # Spool files are written once (fsync + rename); size guards against a rewrite.
    return (str(path), size, max_px)


def dicom_thumbnail(cache: ImageCache, path: Path, max_px: int = THUMB_PX) -> bytes:
    key = _key(path, max_px)
    cached = cache.get(key)
    if cached is not None:
        return cached
    # Imported here: pydicom and the decoders are only needed once someone looks.
    from ddn_node.dicom.pixels import PixelDataError, load_display_image

    try:
        pixels = load_display_image(path)
    except (PixelDataError, OSError, ValueError) as exc:
        raise ImageUnavailable(str(exc)) from None
    gray = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    data = _png(Image.fromarray(gray, mode="L"), max_px)
    cache.put(key, data)
    return data


def png_scaled(cache: ImageCache, path: Path, max_px: int = THUMB_PX) -> bytes:
    key = _key(path, max_px)
    cached = cache.get(key)
    if cached is not None:
        return cached
    try:
        if path.suffix == ".dcm":
            import pydicom

            pixels = pydicom.dcmread(path).pixel_array
            if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
                raise ImageUnavailable("not an 8-bit RGB Secondary Capture")
            data = _png(Image.fromarray(np.ascontiguousarray(pixels), mode="RGB"), max_px)
        else:
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise ImageUnavailable("not a PNG file")
                data = _png(img.convert("RGB"), max_px)
    except (OSError, ValueError, AttributeError, Image.DecompressionBombError) as exc:
        raise ImageUnavailable(str(exc)) from None
    cache.put(key, data)
    return data
