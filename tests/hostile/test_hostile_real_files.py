"""Every real DICOM file of ../shared/data/dicom (edge_cases/ included) through every parser.

headers.read_header, pixels.load_display_image, results.read_sr (SR files) and the SCU's
file scan each give a result or their documented typed error, never another exception,
never a hang, never NaN. The network path for the same files is
tests/ingest/test_store_files.py; this is the in-process half.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hostile_oracle import check_header, check_pixels, check_scan, check_sr

_DATA = Path(
    os.environ.get("DDN_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
REAL_FILES = (
    sorted(
        str(p.relative_to(_DATA / "dicom"))
        for p in (_DATA / "dicom").rglob("*")
        if p.is_file() and p.suffix != ".csv"
    )
    if (_DATA / "dicom").is_dir()
    else []
)


@pytest.mark.parametrize("name", REAL_FILES or ["(no data)"])
def test_real_file_through_every_parser(shared_data: Path, name: str) -> None:
    path = shared_data / "dicom" / name
    header = check_header(path)
    pixels = check_pixels(path)
    sr = check_sr(path)
    scan = check_scan(path)
    if name.startswith("sr_reference/"):
        assert sr in ("sr", "ValueError"), f"{name}: read_sr saw {sr}"
    # A file the header reader accepts is one the SCP stores; the sender must agree that
    # it is a DICOM file unless it lacks the UIDs a C-STORE needs.
    print(f"{name}: header={header} pixels={pixels} sr={sr} scan={scan}")


def test_the_data_has_edge_cases(shared_data: Path) -> None:
    edge = [n for n in REAL_FILES if n.startswith("edge_cases/")]
    assert len(edge) >= 10, edge
