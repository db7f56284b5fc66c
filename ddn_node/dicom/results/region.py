"""Where a heat map points: the region at or above half its peak, as an outline in the
source image's pixel coordinates, for the SR's planar ROIs and the overlay's contours.

Coordinates follow PS3.3 C.18.6.1.2 (SCOORD): column\\row, the top left corner of the top
left pixel is 0\\0, so the centre of pixel (r, c) is (c + 0.5, r + 0.5).

The outline is traced on a grid of at most :data:`CONTOUR_GRID` pixels a side (Grad-CAM
comes from a 7 x 7 map, upsampled bilinearly as the Parametric Map shows it: nothing is
lost) with contourpy (matplotlib's own contouring), zero-padded so that a region touching
the border still closes, and simplified (Ramer-Douglas-Peucker) to at most
:data:`MAX_POINTS` vertices. The innermost closed line around the peak is kept; a region
too small to outline becomes a POINT at the peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import contourpy
import numpy as np
from matplotlib.path import Path as MplPath
from PIL import Image

HALF_PEAK = 0.5
CONTOUR_GRID = 256
MAX_POINTS = 128
MIN_AREA_PX = 4.0  # in source pixels; smaller outlines become a POINT at the peak


class Shape(StrEnum):
    """SCOORD Graphic Type (PS3.3 C.18.6.1.1) of a region."""

    POLYLINE = "POLYLINE"  # closed: first point == last point
    POINT = "POINT"
    CIRCLE = "CIRCLE"  # centre, then a point on the circle


@dataclass(frozen=True)
class Region:
    """A heat map's region in the source image's pixel space."""

    shape: Shape
    points: np.ndarray  # (N, 2) float32 (column, row); N == 1 for a POINT
    area_px: float  # polygon area in source pixels (0 for a POINT)
    peak: tuple[float, float]  # (column, row) of the heat map's maximum
    level: float  # the iso-level outlined (HALF_PEAK x the peak value)


def heatmap_region(heatmap: np.ndarray, rows: int, columns: int) -> Region | None:
    """The region at or above half the heat map's peak, in the source's pixel coordinates.

    The heat map may be on any grid; it is taken to cover the whole image. None for an
    empty map (no positive value: nothing to point at).
    """
    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"a heat map must be 2-D, got shape {values.shape}")
    if float(values.max()) <= 0.0:
        return None
    scale = min(1.0, CONTOUR_GRID / max(rows, columns))
    grid = (max(1, round(columns * scale)), max(1, round(rows * scale)))  # (w, h) for PIL
    if values.shape != (grid[1], grid[0]):
        values = np.asarray(
            Image.fromarray(values, mode="F").resize(grid, Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
    h, w = values.shape
    sx, sy = columns / w, rows / h  # source pixels per grid pixel
    peak_r, peak_c = np.unravel_index(int(np.argmax(values)), values.shape)
    level = HALF_PEAK * float(values[peak_r, peak_c])
    peak = ((float(peak_c) + 0.5) * sx, (float(peak_r) + 0.5) * sy)

    best = _innermost_around(values, level, float(peak_c), float(peak_r))
    if best is None:
        return _point(peak, level)
    src = np.empty_like(best)
    src[:, 0] = np.clip((best[:, 0] + 0.5) * sx, 0.0, float(columns))
    src[:, 1] = np.clip((best[:, 1] + 0.5) * sy, 0.0, float(rows))
    src = _simplify_closed(src, epsilon=0.5 * max(sx, sy), max_points=MAX_POINTS)
    area = abs(_shoelace(src))
    if len(src) < 4 or area < MIN_AREA_PX:
        return _point(peak, level)
    return Region(Shape.POLYLINE, src.astype(np.float32), area, peak, level)


def for_viewers(region: Region, rows: int, columns: int) -> tuple[Shape, np.ndarray]:
    """The region as viewers draw it without asking questions.

    OHIF 3.13.2 offers to "continue tracking" a POINT or an outline of five points or
    fewer (a rectangle), and its conversion then drops the measurement: a point becomes a
    small CIRCLE around it (centre, then a point on the circle, PS3.3 C.18.6.1.1) and a
    short outline gets its edges halved until it has more than six points.
    """
    if region.shape is Shape.POINT:
        (x, y) = (float(v) for v in region.points[0])
        radius = max(4.0, 0.02 * min(rows, columns))
        return Shape.CIRCLE, np.array(
            [[x, y], [min(float(columns), x + radius), y]], dtype=np.float32
        )
    return Shape.POLYLINE, densified(region.points)


def densified(points: np.ndarray, more_than: int = 6) -> np.ndarray:
    """A closed outline with its edges halved until it has more than ``more_than`` points."""
    while len(points) <= more_than:
        mids = (points[:-1] + points[1:]) / 2.0
        dense = np.empty((len(points) + len(mids), 2), dtype=np.float32)
        dense[0::2], dense[1::2] = points, mids
        points = dense
    return points


def _innermost_around(values: np.ndarray, level: float, x: float, y: float) -> np.ndarray | None:
    """The smallest closed iso-line at ``level`` that holds (x, y), in grid coordinates."""
    padded = np.pad(values, 1, mode="constant", constant_values=0.0)
    generator = contourpy.contour_generator(z=padded, name="serial", line_type="Separate")
    best: np.ndarray | None = None
    best_area = np.inf
    for line in generator.lines(level):
        if len(line) < 4:
            continue
        xy = np.asarray(line, dtype=np.float64) - 1.0  # undo the padding
        on_line = bool(np.any(np.hypot(xy[:, 0] - x, xy[:, 1] - y) < 1e-6))
        if not (on_line or MplPath(xy).contains_point((x, y), radius=1e-9)):
            continue
        area = abs(_shoelace(xy))
        if area < best_area:
            best, best_area = xy, area
    return best


def _point(peak: tuple[float, float], level: float) -> Region:
    return Region(Shape.POINT, np.array([peak], dtype=np.float32), 0.0, peak, level)


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _rdp(points: np.ndarray, epsilon: float) -> np.ndarray:
    """Ramer-Douglas-Peucker on an open polyline (iterative, no recursion limit)."""
    keep = np.zeros(len(points), dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        start, end = stack.pop()
        if end <= start + 1:
            continue
        a, b = points[start], points[end]
        segment = b - a
        norm = float(np.hypot(*segment))
        inner = points[start + 1 : end]
        if norm == 0.0:
            dist = np.hypot(*(inner - a).T)
        else:
            dist = (
                np.abs(segment[0] * (inner[:, 1] - a[1]) - segment[1] * (inner[:, 0] - a[0])) / norm
            )
        index = int(np.argmax(dist))
        if float(dist[index]) > epsilon:
            split = start + 1 + index
            keep[split] = True
            stack.extend([(start, split), (split, end)])
    return points[keep]


def _simplify_closed(points: np.ndarray, epsilon: float, max_points: int) -> np.ndarray:
    """A closed line (first point == last point) of at most ``max_points`` points."""
    ring = points[:-1] if np.allclose(points[0], points[-1]) else points
    if len(ring) < 3:
        return np.vstack([ring, ring[:1]])
    # Split at the vertex farthest from the first, so that both halves are open lines.
    far = int(np.argmax(np.hypot(*(ring - ring[0]).T)))
    while True:
        first = _rdp(ring[: far + 1], epsilon)
        second = _rdp(np.vstack([ring[far:], ring[:1]]), epsilon)
        simplified = np.vstack([first, second[1:]])  # ends with ring[0]: closed
        if len(simplified) <= max_points:
            return simplified
        epsilon *= 1.5
