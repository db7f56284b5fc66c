"""JPEG 2000 at a lower resolution level (``max_side``): the same picture, decoded from
fewer wavelet levels, gives the model the same input within a small tolerance, and every
other image keeps its full size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from ddn_node.dicom.frames import load_display_frames
from ddn_node.dicom.pixels import load_display_image
from ddn_node.model.preprocess import fit_to_square

CR = ("xray_other_real", "wg04__RG2_J2KR.dcm")  # 2140 x 1760, 10-bit, lossless
CR_LOSSY = ("xray_other_real", "wg04__RG2_J2KI.dcm")


def _model_input(image: np.ndarray) -> np.ndarray:
    square, _ = fit_to_square(image, 224)
    return square.numpy()[0]


@pytest.mark.parametrize("name", [CR, CR_LOSSY], ids=lambda n: n[1])
def test_reduced_j2k_gives_the_model_the_same_input(
    shared_data: Path, name: tuple[str, str]
) -> None:
    path = shared_data / "dicom" / name[0] / name[1]
    full = load_display_image(path)
    reduced = load_display_image(path, max_side=1024)
    # One level dropped: half the size, the long side still at least 1024 (the overlays').
    assert full.shape == (2140, 1760) and reduced.shape == (1070, 880)
    assert reduced.dtype == np.float32 and reduced.min() >= 0.0 and reduced.max() <= 1.0
    a, b = _model_input(full), _model_input(reduced)
    diff = np.abs(a - b)
    assert float(diff.mean()) < 0.003 and float(diff.max()) < 0.06
    # The same window: the grey levels agree on average, not only after resizing.
    assert abs(float(full.mean()) - float(reduced.mean())) < 0.005


def test_no_level_is_dropped_below_max_side(shared_data: Path) -> None:
    path = shared_data / "dicom" / CR[0] / CR[1]
    assert load_display_image(path, max_side=1100).shape == (2140, 1760)  # 1070 < 1100
    assert load_display_image(path, max_side=512).shape == (535, 440)  # two levels
    frames = dict(load_display_frames(path, [0], max_side=1024))
    assert isinstance(frames[0], np.ndarray) and frames[0].shape == (1070, 880)


def test_other_transfer_syntaxes_keep_rows_and_columns(shared_data: Path) -> None:
    for name in ("wg04__RG2_JLSL.dcm", "wg04__RG2_RLE.dcm"):
        img = load_display_image(shared_data / "dicom" / "xray_other_real" / name, max_side=256)
        assert img.shape == (2140, 1760), name


def test_signed_j2k_is_decoded_in_full(tmp_path: Path) -> None:
    # The reduced path reads unsigned samples only; a signed image takes the full decoders.
    openjpeg = pytest.importorskip("openjpeg")
    rng = np.random.default_rng(0)
    arr = (rng.normal(0, 300, (512, 512))).astype(np.int16)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pydicom.encaps.encapsulate([openjpeg.encode(arr)])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "signed.dcm"
    ds.save_as(path, enforce_file_format=True)
    full = load_display_image(path)
    assert load_display_image(path, max_side=128).shape == full.shape == (512, 512)
