"""The SCP's header read of a file it received (``read_received_header``, which trusts
the File Meta Information pynetdicom wrote) says what ``read_header`` says, in every
transfer syntax the node accepts, and refuses what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from support.dicomgen import make_cr

from ddn_node.dicom.headers import HeaderError, dataset_offset, read_header, read_received_header

SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]


def _saved(ds: Dataset, syntax: str, path: Path) -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(
        path,
        enforce_file_format=True,
        little_endian=syntax != ExplicitVRBigEndian,
        implicit_vr=syntax == ImplicitVRLittleEndian,
    )
    return path


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_the_same_header_as_read_header(syntax: str, tmp_path: Path) -> None:
    ds = make_cr("1.2.826.0.1.3680043.8.498.77", size=32, patient_name="Müller^Jörg")
    ds.RequestedProcedurePriority = "STAT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    path = _saved(ds, syntax, tmp_path / "one.dcm")
    received = read_received_header(path, dataset_offset(path), syntax)
    assert received == read_header(path)
    assert received.text("PatientName") == "Müller^Jörg"
    assert received.text("ImageType") == "ORIGINAL\\PRIMARY"
    assert received.integer("Rows") == 32


def test_garbage_after_the_meta_is_refused_from_the_file_and_from_the_first_bytes(
    tmp_path: Path,
) -> None:
    path = _saved(
        make_cr("1.2.826.0.1.3680043.8.498.78", size=8), ExplicitVRLittleEndian, tmp_path / "x.dcm"
    )
    offset = dataset_offset(path)
    data = bytearray(path.read_bytes())
    # An element declaring far more bytes than the file has, before the pixel data.
    data[offset : offset + 12] = b"\x08\x00\x05\x00SQ\x00\x00\xff\xff\xff\x7f"
    path.write_bytes(bytes(data))
    with pytest.raises(HeaderError):
        read_header(path)
    with pytest.raises(HeaderError):
        read_received_header(path, offset, ExplicitVRLittleEndian)
    # The same from the first bytes the SCP kept while streaming, however many.
    dataset = bytes(data[offset:])
    for head in (dataset[:64], dataset):
        with pytest.raises(HeaderError):
            read_received_header(path, offset, ExplicitVRLittleEndian, head, len(dataset))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_header_from_the_first_bytes_is_the_header_from_the_file(
    syntax: str, tmp_path: Path
) -> None:
    # The SCP parses the first bytes it kept while streaming; wherever they end (inside
    # an element, past the attributes, the whole data set), the header is the file's.
    ds = make_cr("1.2.826.0.1.3680043.8.498.79", size=16, patient_name="Müller^Jörg")
    ds.RequestedProcedurePriority = "STAT"
    ds.StudyDescription = "x" * 5000  # longer than defer_size: skipped, not read
    path = _saved(ds, syntax, tmp_path / "head.dcm")
    offset = dataset_offset(path)
    data = path.read_bytes()[offset:]
    expected = read_received_header(path, offset, syntax)
    # (The pixel data, the last 512 bytes, is where the parse stops.)
    for cut in [*range(1, 400, 7), 5100, 5200, *range(len(data) - 600, len(data) + 10, 9)]:
        head = data[:cut]
        assert read_received_header(path, offset, syntax, head, len(data)) == expected, cut
