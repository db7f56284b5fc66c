"""Negotiated equals decodable: every transfer syntax the node offers has a real sample
(or one made by an independent encoder from a real image), and every one decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.census import (
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_RPCL,
    JPEG_LOSSLESS_14,
    census,
    produce,
    raw_pixels,
    table,
)

from ddn_node.dicom.pixels import TruncatedPixelData, load_display_image


def test_every_offered_syntax_has_a_sample_and_every_sample_decodes(
    shared_data: Path, tmp_path: Path
) -> None:
    rows = census(shared_data / "dicom", tmp_path)
    report = table(rows)
    offered = [r for r in rows if r.offered]
    assert len(offered) >= 10, report
    no_sample = [r.syntax for r in offered if not r.samples]
    assert no_sample == [], (
        f"offered with no real or produced sample: {no_sample}; make one or stop offering it\n"
        + report
    )
    # A file whose Pixel Data is shorter than its header says is refused before any decoder
    # runs (pydicom's MR_truncated.dcm): a defect of that file, whatever its syntax. Every
    # other failure is a syntax the node offers and cannot read.
    undecoded = [
        f"{r.syntax} {s.path.name}: {s.error}"
        for r in offered
        for s in r.samples
        if s.error and s.error_type is not TruncatedPixelData
    ]
    assert undecoded == [], "\n".join(undecoded) + "\n" + report
    # Each offered syntax has at least one sample that decoded, so no row is all defects.
    assert [r.syntax for r in offered if r.decoded == 0] == [], report


def test_twelve_bit_jpeg_extended_is_read_from_every_real_file(
    shared_data: Path, tmp_path: Path
) -> None:
    # The case of issue 16: 6 of these 7 were stored, routed, then 'analysis failed'.
    row = next(r for r in census(shared_data / "dicom", tmp_path) if r.syntax.endswith("4.51"))
    assert row.offered and len(row.real) == 7 and row.decoded == 7, table([row])


@pytest.mark.parametrize("syntax", [JPEG_LOSSLESS_14, HTJ2K_LOSSLESS, HTJ2K_RPCL])
def test_a_lossless_sample_made_by_another_encoder_decodes_to_the_source_exactly(
    shared_data: Path, tmp_path: Path, syntax: str
) -> None:
    sample = produce(syntax, shared_data / "dicom", tmp_path)
    assert sample.source is not None
    source = raw_pixels(sample.source)
    decoded = raw_pixels(sample.path)
    assert decoded.dtype == source.dtype and np.array_equal(decoded, source)
    np.testing.assert_array_equal(
        load_display_image(sample.path), load_display_image(sample.source)
    )


def test_lossy_htj2k_decodes_as_the_encoders_own_decoder_does(
    shared_data: Path, tmp_path: Path
) -> None:
    import subprocess

    sample = produce(HTJ2K, shared_data / "dicom", tmp_path)
    assert sample.source is not None
    source = raw_pixels(sample.source).astype(np.int64)
    decoded = raw_pixels(sample.path).astype(np.int64)
    # OpenJPH's own decoder is the reference for its irreversible codestream; two 9/7
    # decoders may round a few coefficients differently, by a grey level or so.
    subprocess.run(
        ["ojph_expand", "-i", str(tmp_path / "htj2k.j2c"), "-o", str(tmp_path / "x.raw")],
        check=True,
        capture_output=True,
    )
    reference = np.fromfile(tmp_path / "x.raw", dtype="<i2").reshape(decoded.shape)
    diff = np.abs(decoded - reference)
    assert float(diff.mean()) < 0.05 and float(np.percentile(diff, 99.9)) <= 1, diff.max()
    # And it is the image: a few grey levels of a 0..4000 range from the source.
    assert float(np.abs(decoded - source).mean()) < 5
    display = load_display_image(sample.path)
    assert float(np.abs(display - load_display_image(sample.source)).mean()) < 0.01
