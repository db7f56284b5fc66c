"""Resize + pad + normalise, and mapping heat maps back to the source image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddn_node.model.preprocess import (
    PreprocessSpec,
    fit_geometry,
    fit_to_square,
    map_to_source,
    normalise,
    prepare_batch,
)
from ddn_node.training.images import load_image_file


@pytest.mark.parametrize("h,w", [(300, 480), (480, 300), (224, 224), (1, 5), (3000, 2500)])
def test_geometry_keeps_aspect_and_centres(h: int, w: int) -> None:
    g = fit_geometry(h, w, 224)
    assert max(g.new_h, g.new_w) == 224
    assert abs(g.new_h / g.new_w - h / w) < 0.02 or min(g.new_h, g.new_w) == 1
    assert g.top == (224 - g.new_h) // 2 and g.left == (224 - g.new_w) // 2


def test_fit_to_square_pads_with_zero_and_keeps_range() -> None:
    img = np.ones((100, 200), dtype=np.float32)
    sq, g = fit_to_square(img, 224)
    assert sq.shape == (1, 224, 224)
    assert (g.new_h, g.new_w, g.top, g.left) == (112, 224, 56, 0)
    assert float(sq[0, :56].max()) == 0.0 and float(sq[0, 56 + 112 :].max()) == 0.0
    assert float(sq[0, 60:160].min()) == pytest.approx(1.0)


def test_normalise_replicates_and_uses_recorded_statistics() -> None:
    spec = PreprocessSpec()
    x = normalise(torch.full((2, 1, 4, 4), 0.5), spec)
    assert x.shape == (2, 3, 4, 4)
    for c in range(3):
        assert float(x[0, c, 0, 0]) == pytest.approx((0.5 - spec.mean[c]) / spec.std[c])


def test_map_to_source_round_trips_a_location() -> None:
    src = np.zeros((300, 480), dtype=np.float32)
    src[60:90, 360:400] = 1.0  # a bright patch
    batch, geoms = prepare_batch([src], PreprocessSpec(size=224))
    square = batch[0, 0]
    back = map_to_source((square - square.min()).clone(), geoms[0])
    assert back.shape == (300, 480)
    r, c = np.unravel_index(int(np.argmax(back)), back.shape)
    assert 55 <= r <= 95 and 355 <= c <= 405
    assert 0.95 <= float(back.max()) <= 1.0
    assert float(map_to_source(torch.zeros(7, 7), geoms[0]).max()) == 0.0  # empty map stays empty


def test_load_image_file_png_jpeg_16bit_rgb(tmp_path: Path) -> None:
    g8 = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    a = load_image_file(tmp_path / "g8.png")
    assert a.dtype == np.float32 and a.max() == pytest.approx(1.0) and a[0, 0] == 0.0
    g16 = (np.arange(64 * 64) * 16).astype(np.uint16).reshape(64, 64)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    b = load_image_file(tmp_path / "g16.png")
    assert b.max() == pytest.approx(g16.max() / 65535, rel=1e-4)
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=100)
    c = load_image_file(tmp_path / "rgb.jpg")
    assert c.shape == (32, 32) and abs(float(c.mean()) - 0.587) < 0.02
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    assert load_image_file(tmp_path / "rgba.png").shape == (32, 32)


def test_nih_png_and_dicom_take_the_same_path(shared_data: Path) -> None:
    png = load_image_file(shared_data / "nih" / "png256" / "00000072_000.png")
    assert png.shape == (256, 256) and 0 <= png.min() < png.max() <= 1
    dcm = load_image_file(shared_data / "dicom" / "chest_xray_real" / "wg04__RG1_J2KI.dcm")
    assert dcm.ndim == 2 and dcm.dtype == np.float32
