"""The output stays small beside its input: for a 1024 x 1024 12-bit radiograph (2 MiB)
with three findings, the Parametric Map (deflated), the overlay (JPEG) and the SR as
written take less than 1.5 times the source's bytes (docs: "about 1.5x its bytes at most
by default")."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from results_factories import (
    DEFLATED,
    JPEG_BASELINE,
    prediction_for,
    synthetic_source,
    with_pixels,
)

from ddn_node.dicom.results import build_results

BUDGET = 1.5
THREE = {"Pneumothorax": 0.91, "Effusion": 0.72, "Nodule": 0.55}


def _chest_like(size: int = 1024) -> np.ndarray:
    """A deterministic stand-in for a radiograph: a bright mediastinum, two darker lungs
    crossed by ribs, and some quantum noise (which JPEG has to code)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 0.75 - 0.2 * yy
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1.0
        ribs = 0.06 * np.sin(2 * np.pi * (yy * 9 + 2 * (xx - cx) ** 2))
        image = np.where(lung, 0.35 + ribs, image)
    noise = np.random.default_rng(11).normal(0.0, 0.015, image.shape)
    return np.clip(image + noise, 0.0, 1.0).astype(np.float32)


def _nih_image(shared_data) -> np.ndarray:
    folder = shared_data / "nih" / "originals_1024"
    first = sorted(folder.glob("*.png"))
    if not first:
        pytest.skip(f"no NIH 1024 px originals in {folder}")
    with Image.open(first[0]) as image:
        return np.asarray(image.convert("L").resize((1024, 1024)), dtype=np.float32) / 255.0


@pytest.mark.parametrize("picture", ["synthetic", "nih"])
def test_results_take_less_than_one_and_a_half_times_the_source(picture, tmp_path, request) -> None:
    if picture == "nih":
        display = _nih_image(request.getfixturevalue("shared_data"))
    else:
        display = _chest_like()
    source = with_pixels(synthetic_source(rows=1024, columns=1024), display, bits_stored=12)
    source_path = tmp_path / "source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    source_bytes = source_path.stat().st_size
    assert source_bytes > 2 * 1024 * 1024  # 2 MiB of pixels plus the header

    prediction = prediction_for([source], [THREE])
    assert len(prediction.images[0].heatmaps) == 3
    results = build_results(
        [source], prediction, "STAT", {str(source.SOPInstanceUID): display}, uid_seed="size"
    )
    (pm,) = results.parametric_maps
    (sc,) = results.overlays
    assert int(pm.NumberOfFrames) == 3
    assert pm.file_meta.TransferSyntaxUID == DEFLATED
    assert sc.file_meta.TransferSyntaxUID == JPEG_BASELINE
    sizes = {}
    for kind, ds in results.all():
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sizes[str(kind)] = path.stat().st_size
    assert set(sizes) == {"sr", "pm", "sc"}
    assert sum(sizes.values()) < BUDGET * source_bytes, (sizes, source_bytes)
