"""Display image -> network input, and heat map -> source image geometry.

One function serves every input: the node's DICOM images (after
:func:`ddn_node.dicom.pixels.load_display_image`) and the PNG/JPEG files used in training
(after :func:`ddn_node.training.images.load_image_file`),
so that training and inference see exactly the same pixels. The steps, recorded in the
artifact's manifest (:class:`PreprocessSpec`):

1. the display image is float32 HxW in [0, 1], bright = dense (MONOCHROME2);
2. aspect-preserving resize so that the long side is ``size`` (bilinear, anti-aliased);
3. centred zero padding to ``size`` x ``size``;
4. replicate to 3 channels, subtract ``mean`` and divide by ``std`` (ImageNet statistics,
   so that operator-supplied ImageNet weights see the inputs they were trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessSpec(BaseModel):
    """Pre-processing as recorded in ``manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = "display image float32 HxW in [0,1], MONOCHROME2 (bright = dense), from ddn_node.dicom.pixels.load_display_image or an 8/16-bit PNG/JPEG (RGB -> BT.601 luma)"
    size: int = 224
    resize: str = "aspect-preserving, long side = size, bilinear with anti-aliasing (torch.nn.functional.interpolate)"
    pad: str = "centred, value 0.0 (before normalisation)"
    channels: int = 3
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Geometry:
    """Where the source image lies inside the padded square, to map heat maps back."""

    src_h: int
    src_w: int
    new_h: int
    new_w: int
    top: int
    left: int
    size: int


def fit_geometry(h: int, w: int, size: int) -> Geometry:
    scale = size / max(h, w)
    new_h = max(1, min(size, round(h * scale)))
    new_w = max(1, min(size, round(w * scale)))
    return Geometry(h, w, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2, size)


def fit_to_square(image: np.ndarray | torch.Tensor, size: int) -> tuple[torch.Tensor, Geometry]:
    """Resize (aspect kept) and pad one HxW image to (1, size, size), values unchanged in [0, 1]."""
    t = (
        torch.as_tensor(np.asarray(image, dtype=np.float32))
        if isinstance(image, np.ndarray)
        else image.float()
    )
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D display image, got shape {tuple(t.shape)}")
    g = fit_geometry(int(t.shape[0]), int(t.shape[1]), size)
    # Anti-aliasing matters when a 3000 px radiograph shrinks to 224: without it thin
    # structures alias into moire that the network has never seen in training.
    r = F.interpolate(
        t[None, None], size=(g.new_h, g.new_w), mode="bilinear", align_corners=False, antialias=True
    )
    out = torch.zeros(1, size, size, dtype=torch.float32)
    out[:, g.top : g.top + g.new_h, g.left : g.left + g.new_w] = r[0].clamp_(0.0, 1.0)
    return out, g


def normalise(batch: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, channels, S, S) normalised."""
    x = batch.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean[: spec.channels], dtype=x.dtype, device=x.device).view(
        1, -1, 1, 1
    )
    std = torch.tensor(spec.std[: spec.channels], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def prepare_batch(
    images: Sequence[np.ndarray], spec: PreprocessSpec
) -> tuple[torch.Tensor, list[Geometry]]:
    """Display images -> a normalised (B, C, S, S) batch and each image's geometry."""
    squares, geoms = [], []
    for im in images:
        sq, g = fit_to_square(im, spec.size)
        squares.append(sq)
        geoms.append(g)
    return normalise(torch.stack(squares), spec), geoms


def map_size(geom: Geometry, max_side: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a heat map for the source of ``geom``: the source's size, or
    scaled (aspect kept) so its long side is at most ``max_side``."""
    h, w = geom.src_h, geom.src_w
    if max_side is None or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def map_to_source(cam: torch.Tensor, geom: Geometry, max_side: int | None = None) -> np.ndarray:
    """Map(s) over the padded square -> float32 at the source image's rows x columns, in [0, 1].

    With ``max_side``, on the source's grid scaled to at most that long side instead
    (:func:`map_size`): the same map, sampled more coarsely.

    ``cam``: (h, w) or (k, h, w), non-negative (Grad-CAM after ReLU). Each map is upsampled
    to the square, the padding cropped off and the map scaled to [0, 1] by its maximum while
    still small; only then is it resized to the source size. Bilinear interpolation is a
    convex combination, so the result stays in [0, 1] without another full-resolution pass
    (on a 2-core CPU each pass over a 3000 x 2500 map costs tens of milliseconds).
    """
    single = cam.ndim == 2
    maps = cam[None].float() if single else cam.float()
    sq = F.interpolate(
        maps[None], size=(geom.size, geom.size), mode="bilinear", align_corners=False
    )
    crop = sq[:, :, geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w].clamp(
        min=0.0
    )
    peak = crop.amax(dim=(2, 3), keepdim=True)
    crop = torch.where(peak > 0, crop / peak.clamp(min=1e-12), torch.zeros_like(crop))
    out_size = map_size(geom, max_side)
    if out_size != (geom.new_h, geom.new_w):
        crop = F.interpolate(crop, size=out_size, mode="bilinear", align_corners=False)
    out = crop[0].cpu().numpy().astype(np.float32, copy=False)
    return out[0] if single else out
