"""Batched, seeded augmentation on padded squares in [0, 1] (before normalisation).

The paper's recipe: rotation, flip and contrast. One affine ``grid_sample`` per batch
does rotation (+-10 deg), a mild zoom (0.9-1.1), a shift (+-5%) and a horizontal flip; then
per-image contrast, brightness and gamma. Horizontal flips put the heart on the wrong side,
which CheXNet (Rajpurkar et al., 2017) accepted for CXR; it is kept because the paper
lists it, and can be turned off (``hflip=0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05
    hflip: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.08
    gamma: tuple[float, float] = (0.8, 1.25)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, g: torch.Generator, spec: AugmentSpec = AugmentSpec()) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> augmented copy, same shape, in [0, 1]."""
    b = x.shape[0]
    ang = _uniform(b, -spec.rotate_deg, spec.rotate_deg, g) * (math.pi / 180)
    s = _uniform(b, *spec.scale, g)
    flip = torch.where(torch.rand(b, generator=g) < spec.hflip, -1.0, 1.0)
    tx, ty = (
        _uniform(b, -spec.shift, spec.shift, g) * 2,
        _uniform(b, -spec.shift, spec.shift, g) * 2,
    )
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    # theta maps output to input coordinates; the flip multiplies the x column.
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(
        x, grid.to(x.device), mode="bilinear", padding_mode="zeros", align_corners=False
    )
    c = _uniform(b, *spec.contrast, g).view(b, 1, 1, 1).to(x.device)
    br = _uniform(b, -spec.brightness, spec.brightness, g).view(b, 1, 1, 1).to(x.device)
    gm = (
        torch.exp(_uniform(b, math.log(spec.gamma[0]), math.log(spec.gamma[1]), g))
        .view(b, 1, 1, 1)
        .to(x.device)
    )
    mean = y.mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * c + mean + br).clamp(0.0, 1.0)
    return y.pow(gm)
