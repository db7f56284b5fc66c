"""Every frame of a multi-frame object as display images, the file read at most twice.

:func:`ddn_node.dicom.pixels.load_display_image` decodes one frame and, given a path,
reads the whole file each time. An object of N frames read that way costs N reads of all
its pixel data; here the first frame comes from the path, so every guard of the decoder
(decompression bombs, deflate, the size limit) sees the file before anything else is
inflated, and the other frames from one dataset read once after it passed them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom

from ddn_node.dicom.pixels import CorruptPixelData, PixelDataError, PixelLimits, load_display_image


def load_display_frames(
    path: Path,
    frames: Sequence[int],
    limits: PixelLimits | None = None,
    max_side: int | None = None,
) -> Iterator[tuple[int, np.ndarray | PixelDataError]]:
    """``(frame, image)`` for each 0-based frame asked for, in that order; ``image`` is
    the :class:`PixelDataError` where that frame cannot be displayed. ``max_side``: as
    for :func:`~ddn_node.dicom.pixels.load_display_image` (JPEG 2000 frames may come at a
    lower resolution, the long side still at least that).

    When the first frame fails, every frame is given that error: the failure may be a
    guard (a bomb, a size over the limit) that a plain read would walk into.
    """
    if not frames:
        return
    first, rest = frames[0], frames[1:]
    try:
        image: np.ndarray | PixelDataError = load_display_image(path, first, limits, max_side)
    except PixelDataError as exc:
        image = exc
    if isinstance(image, PixelDataError):
        for frame in frames:
            yield frame, image
        return
    yield first, image
    if not rest:
        return
    try:
        ds = pydicom.dcmread(path, force=True)
    except (OSError, ValueError, EOFError) as exc:
        error = CorruptPixelData(f"re-reading for frames {list(rest)}: {exc}")
        for frame in rest:
            yield frame, error
        return
    for frame in rest:
        try:
            image = load_display_image(ds, frame, limits, max_side)
        except PixelDataError as exc:
            image = exc
        yield frame, image
