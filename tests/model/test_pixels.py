"""DICOM -> display image: every real file with pixels, and the pipeline's rules on synthetic data."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ddn_node.dicom.pixels import (
    CorruptPixelData,
    FrameOutOfRange,
    ImageTooLarge,
    NoPixelData,
    NotDicom,
    PixelDataError,
    PixelLimits,
    TruncatedPixelData,
    UnsupportedTransferSyntax,
    decoder_plugins,
    load_display_image,
)

_DATA = Path(
    os.environ.get("DDN_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
REAL_FILES = (
    sorted(str(p.relative_to(_DATA / "dicom")) for p in (_DATA / "dicom").rglob("*.dcm"))
    if (_DATA / "dicom").is_dir()
    else []
)
# Files whose failure is the right answer (verified by hand: pydicom/libjpeg/GDCM all refuse
# them or the header describes no pixels); anything else must decode.
EXPECTED_ERRORS = {
    "edge_cases/pydicomwhl__MR_truncated.dcm": TruncatedPixelData,
}


@pytest.mark.parametrize("name", REAL_FILES)
def test_every_real_file_gives_a_sane_image_or_a_typed_error(shared_data: Path, name: str) -> None:
    path = shared_data / "dicom" / name
    try:
        img = load_display_image(path)
    except PixelDataError as e:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=False)
        if "PixelData" not in ds:
            assert isinstance(e, NoPixelData)
        else:
            # No other failure is allowed: 12-bit JPEG Extended files that the in-process
            # decoders refuse are decoded by dcmdjpeg in an isolated process.
            assert name in EXPECTED_ERRORS, e
            assert isinstance(e, EXPECTED_ERRORS[name])
        return
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    assert img.dtype == np.float32 and img.ndim == 2
    assert img.shape == (int(ds.Rows), int(ds.Columns))
    assert np.isfinite(img).all()
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img.std()) > 0.01, "a real image should not come out (nearly) constant"


def test_monochrome1_chest_is_inverted_so_lungs_are_dark(shared_data: Path) -> None:
    img = load_display_image(
        shared_data / "dicom" / "chest_xray_real" / "pylibjpegdata__966_fixed.dcm"
    )
    h, w = img.shape
    # Lungs (upper middle thirds, left and right of the spine) are less dense than the spine.
    lungs = np.concatenate(
        [
            img[h // 4 : h // 2, w // 5 : 2 * w // 5].ravel(),
            img[h // 4 : h // 2, 3 * w // 5 : 4 * w // 5].ravel(),
        ]
    )
    spine = img[h // 4 : h // 2, 9 * w // 20 : 11 * w // 20]
    assert float(np.median(lungs)) < float(np.median(spine))


def test_same_image_in_every_transfer_syntax_decodes_alike(shared_data: Path) -> None:
    ref = load_display_image(shared_data / "dicom" / "mri_brain_wg04" / "wg04__MR1_UNC.dcm")
    for ts in ("J2KR", "JLSL", "JPLL", "RLE"):
        img = load_display_image(shared_data / "dicom" / "mri_brain_wg04" / f"wg04__MR1_{ts}.dcm")
        assert np.abs(img - ref).max() < 1e-6, ts


def test_decoder_preference_never_uses_gdcm() -> None:
    # python-gdcm aborts the process (std::terminate) on some corrupt codestreams, so it is
    # never tried, although it is the fastest JPEG 2000 / JPEG lossless decoder here.
    for uid in (
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
    ):
        assert "gdcm" not in decoder_plugins(uid)
    assert decoder_plugins("1.2.840.10008.1.2.4.90")[0] == "pylibjpeg"
    assert decoder_plugins("1.2.840.10008.1.2.4.80")[0] == "pyjpegls"
    assert decoder_plugins("1.2.840.10008.1.2.4.51")[0] == "pylibjpeg"


# --- synthetic datasets -------------------------------------------------------------------


def _ds(
    arr: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **extra: object,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 3 if arr.ndim == 3 else 1
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.tobytes()
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def _ramp(dtype: type = np.uint16, hi: int = 4095) -> np.ndarray:
    return np.linspace(0, hi, 64 * 48).reshape(64, 48).astype(dtype)


def test_monochrome2_percentile_window_keeps_order() -> None:
    img = load_display_image(_ds(_ramp()))
    assert img.shape == (64, 48) and img.dtype == np.float32
    assert img[0, 0] == 0.0 and img[-1, -1] == 1.0
    assert np.all(np.diff(img.ravel()) >= 0)


def test_percentile_window_of_a_large_image_matches_every_pixel_within_half_a_grey_level() -> None:
    """Large images take their auto-window from a sub-grid; what the radiologist and the
    model see must not change by more than half of one 8-bit grey level."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:2048, 0:2048]
    body = 1500 + 1200 * np.exp(-((yy - 1024) ** 2 + (xx - 900) ** 2) / (2 * 500.0**2))
    arr = np.clip(body + rng.normal(0, 120, body.shape), 0, 4095).astype(np.uint16)
    arr[100:140, 1800:1840] = 4095  # a small marker, brighter than anything else
    img = load_display_image(_ds(arr))
    lo, hi = np.percentile(arr.astype(np.float64), [0.5, 99.5])
    exact = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    assert np.abs(img - exact).max() <= 0.5 / 255


def test_monochrome1_is_inverted() -> None:
    m2 = load_display_image(_ds(_ramp()))
    m1 = load_display_image(_ds(_ramp(), photometric="MONOCHROME1"))
    assert np.allclose(m1, 1.0 - m2, atol=1e-6)


def test_window_center_width_linear_per_ps3_3() -> None:
    arr = np.array([[0, 100, 200, 300, 400]], dtype=np.uint16)
    img = load_display_image(_ds(arr, WindowCenter=200, WindowWidth=201))
    # C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> 0; x > c - 0.5 + (w-1)/2 -> 1; linear between.
    assert img[0, 0] == 0.0 and img[0, 4] == 1.0
    assert abs(img[0, 2] - 0.5025) < 1e-3


def test_rescale_is_applied_before_the_window() -> None:
    arr = np.array([[0, 10, 20, 30]], dtype=np.uint16)
    # Stored 0..30 -> HU -1000..-700 with slope 10, intercept -1000; window on HU values.
    img = load_display_image(
        _ds(arr, RescaleSlope=10, RescaleIntercept=-1000, WindowCenter=-850, WindowWidth=299)
    )
    assert img[0, 0] == 0.0 and img[0, 3] == 1.0 and abs(img[0, 1] - 0.3333) < 0.01


def test_modality_lut_sequence_is_applied() -> None:
    arr = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.ModalityLUTType = "US"
    lut.LUTData = [0, 1000, 10, 20]  # deliberately non-monotonic
    img = load_display_image(_ds(arr, ModalityLUTSequence=[lut]))
    assert img[0, 1] == 1.0 and img[0, 0] == 0.0 and img[0, 2] < img[0, 3] < 0.1


def test_voi_lut_sequence_is_used() -> None:
    arr = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    voi = Dataset()
    voi.LUTDescriptor = [4, 0, 8]
    voi.LUTData = [255, 0, 128, 64]
    img = load_display_image(_ds(arr, VOILUTSequence=[voi]))
    assert np.allclose(img[0], [1.0, 0.0, 128 / 255, 64 / 255], atol=1e-6)


def test_overlay_bits_above_bits_stored_are_masked() -> None:
    arr = _ramp(hi=1023)  # 10-bit data...
    dirty = arr | np.uint16(1 << 14)  # ...with an overlay bit set in an unused high bit
    assert np.allclose(
        load_display_image(_ds(dirty, bits_stored=10)), load_display_image(_ds(arr, bits_stored=10))
    )


def test_signed_data_any_bit_depth() -> None:
    arr = np.linspace(-2000, 2000, 64 * 48).reshape(64, 48).astype(np.int16)
    img = load_display_image(_ds(arr, bits_stored=12))
    assert np.isfinite(img).all() and img[0, 0] == 0.0 and img[-1, -1] == 1.0


def test_8_bit_and_1_bit_images() -> None:
    assert load_display_image(_ds(_ramp(np.uint8, 255))).max() == 1.0
    bits = np.zeros((16, 16), dtype=np.uint8)
    bits[4:12, 4:12] = 1
    ds = _ds(bits)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = np.packbits(bits.ravel(), bitorder="little").tobytes()
    img = load_display_image(ds)
    assert img[8, 8] == 1.0 and img[0, 0] == 0.0


def test_rgb_becomes_bt601_gray() -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    img = load_display_image(_ds(rgb, photometric="RGB"))
    assert np.allclose(img, 0.299, atol=1e-3)


def test_constant_image_is_zeros_not_nan() -> None:
    img = load_display_image(_ds(np.full((8, 8), 77, dtype=np.uint16)))
    assert np.isfinite(img).all() and float(img.max()) == 0.0


def test_multiframe_returns_the_requested_frame() -> None:
    frames = np.stack([np.full((8, 8), i * 100, dtype=np.uint16) for i in range(3)])
    frames[:, 0, 0] = 0  # give each frame some contrast
    ds = _ds(frames[0])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    assert load_display_image(ds, frame=2)[4, 4] == 1.0
    with pytest.raises(FrameOutOfRange):
        load_display_image(ds, frame=3)


def test_missing_pixel_data_is_typed() -> None:
    ds = _ds(_ramp())
    del ds.PixelData
    with pytest.raises(NoPixelData):
        load_display_image(ds)


def test_truncated_native_pixel_data_is_refused_before_decoding() -> None:
    ds = _ds(_ramp())
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(TruncatedPixelData):
        load_display_image(ds)


def test_decompression_bomb_is_refused_before_allocation() -> None:
    ds = _ds(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1000  # 4 TB declared, 8 bytes present
    with pytest.raises(ImageTooLarge):
        load_display_image(ds)
    small = _ds(np.zeros((64, 64), dtype=np.uint16))
    with pytest.raises(ImageTooLarge):
        load_display_image(small, limits=PixelLimits(max_megapixels=0.001))


def test_declared_size_far_above_actual_native_length_is_refused() -> None:
    ds = _ds(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows, ds.Columns = 8000, 8000  # 128 MB declared, 8 bytes present: refused, not allocated
    with pytest.raises(TruncatedPixelData):
        load_display_image(ds)


def test_deflate_bomb_is_refused_while_inflating(tmp_path: Path) -> None:
    ds = _ds(np.zeros((4, 4), dtype=np.uint16))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    # Body starts after preamble (128) + "DICM" + the group length element (12) + the group.
    meta_end = (
        132
        + 12
        + int(
            pydicom.dcmread(path, stop_before_pixels=True).file_meta.FileMetaInformationGroupLength
        )
    )
    # Replace the body with 24 MiB of zeros deflated to ~24 kB (cap: 1 MiB + 16 MiB slack).
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(b"\0" * (24 << 20)) + c.flush()
    path.write_bytes(raw[:meta_end] + body)
    with pytest.raises(ImageTooLarge):
        load_display_image(path, limits=PixelLimits(max_decoded_mb=1))


def test_not_dicom_and_unknown_syntax_are_typed(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(PixelDataError):
        load_display_image(junk)
    with pytest.raises(NotDicom):
        load_display_image(tmp_path / "absent.dcm")
    ds = _ds(_ramp())
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
    with pytest.raises((UnsupportedTransferSyntax, CorruptPixelData)):
        load_display_image(ds)
