"""The decode census of issue 16 item 1 (a tool, not a test):

    .venv/bin/python tests/model/decode_census.py

For every offered transfer syntax (then every syntax of a real file that is not offered):
its real files in ../shared/data/dicom (or $DDN_DATA), the sample made by an independent
encoder where there is no real one, and how many the node's pixel pipeline decodes, before
(in-process decoders only, as the node was) and now (with the isolated dcmdjpeg fallback).
Then the time of one 12-bit CR decode through the isolated process and of the same image
decoded in process from a syntax that is read there.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

import pydicom  # noqa: E402
import structlog  # noqa: E402
from pydicom.encaps import get_frame  # noqa: E402
from pydicom.pixels import pixel_array  # noqa: E402
from support.census import census, in_process_only, table  # noqa: E402

from ddn_node.dicom import isolated  # noqa: E402
from ddn_node.dicom.pixels import load_display_image  # noqa: E402

DATA = Path(os.environ.get("DDN_DATA", HERE.parents[2] / "shared" / "data")) / "dicom"


def best_ms(path: Path, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        load_display_image(path)
        times.append((time.perf_counter() - t) * 1000)
    return min(times)


def decode_only_ms(path: Path, isolated_process: bool, runs: int = 5) -> float:
    """The decode step alone: dcmdjpeg in its limited process, or pydicom in process."""
    ds = pydicom.dcmread(path)
    frame = get_frame(ds.PixelData, 0, number_of_frames=1) if isolated_process else b""
    argv = isolated.command_for(ds.file_meta.TransferSyntaxUID) or ("dcmdjpeg",)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        if isolated_process:
            isolated.decode_frame(
                ds, ds.file_meta.TransferSyntaxUID, frame, ds.Rows, ds.Columns, 1, 16, argv
            )
        else:
            pixel_array(ds)
        times.append((time.perf_counter() - t) * 1000)
    return min(times)


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    with tempfile.TemporaryDirectory() as work:
        with in_process_only():
            before = census(DATA, Path(work))
        now = census(DATA, Path(work))
    print(table(now, before))
    print()
    cr = DATA / "xray_other_real" / "wg04__RG2_JPLY.dcm"
    for label, path in (
        ("12-bit CR, JPEG Extended 4.51, isolated dcmdjpeg", cr),
        ("same CR, JPEG lossless SV1 4.70, in process", cr.with_name("wg04__RG2_JPLL.dcm")),
        ("same CR, JPEG 2000 lossless 4.90, in process", cr.with_name("wg04__RG2_J2KR.dcm")),
    ):
        alone = decode_only_ms(path, isolated_process=path == cr)
        print(
            f"{label}: decode {alone:.1f} ms, load_display_image {best_ms(path):.1f} ms (best of 5)"
        )


if __name__ == "__main__":
    main()
