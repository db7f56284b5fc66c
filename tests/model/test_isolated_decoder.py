"""The isolated decoder: a codec that crashes, spins, blocks or allocates without bound
ends as a typed PixelDataError, the node's process goes on, and no temporary file stays.

A crashing codec cannot be had on demand, so the codec is replaced by a small Python
program that misbehaves in one way; the file is a real 12-bit JPEG Extended CR that the
in-process decoders refuse, so the node reaches the isolated decoder as it does in use.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGExtended12Bit

from ddn_node.dicom import isolated
from ddn_node.dicom.isolated import IsolatedLimits
from ddn_node.dicom.pixels import CorruptPixelData, PixelLimits, load_display_image
from ddn_node.dicom.syntaxes import supported_transfer_syntaxes

CR = Path("dicom") / "xray_other_real" / "wg04__RG2_JPLY.dcm"

CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
SPIN = "while True: pass"
BLOCK = "import signal; signal.pause()"
# Asks for 2 GiB; under the limit (256 MiB + 4x the 7 MiB frame) that must fail. Without
# a limit it succeeds, says so and writes no output: a different, visible outcome.
GREEDY = (
    "import sys\n"
    "try:\n"
    "    b = bytearray(2 << 30)\n"
    "except MemoryError:\n"
    "    sys.exit('fake codec: MemoryError')\n"
    "sys.exit('fake codec: allocated 2 GiB unhindered')\n"
)


@pytest.fixture
def cr(shared_data: Path) -> Path:
    return shared_data / CR


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the isolated decoder makes its temporary folder during the test."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _fake(monkeypatch: pytest.MonkeyPatch, program: str) -> None:
    monkeypatch.setitem(
        isolated.COMMANDS, str(JPEGExtended12Bit), (sys.executable, "-I", "-S", "-c", program)
    )


def test_the_real_codec_decodes_the_cr_and_leaves_no_file(cr: Path, scratch: Path) -> None:
    img = load_display_image(cr)
    assert img.shape == (2140, 1760) and float(img.std()) > 0.05
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("program", "limits", "says"),
    [
        (CRASH, IsolatedLimits(), "(isolated process): crashed: killed by SIGSEGV"),
        (SPIN, IsolatedLimits(cpu_seconds=1), "cpu limit"),
        # Never returns, with no CPU used: only the wall deadline can end it.
        (BLOCK, IsolatedLimits(wall_seconds=1), "timed out"),
        (GREEDY, IsolatedLimits(), "fake codec: MemoryError"),
        (GREEDY, IsolatedLimits(prlimit=False), "fake codec: MemoryError"),
    ],
    ids=["segfault", "cpu-loop", "blocked", "memory-prlimit", "memory-setrlimit"],
)
def test_a_misbehaving_codec_ends_as_a_typed_error_and_the_node_goes_on(
    cr: Path,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
    program: str,
    limits: IsolatedLimits,
    says: str,
) -> None:
    _fake(monkeypatch, program)
    with pytest.raises(CorruptPixelData) as caught:
        load_display_image(cr, limits=PixelLimits(isolated=limits))
    message = str(caught.value)
    assert says in message, message
    assert "libjpeg error" in message  # the in-process decoders were tried first
    assert list(scratch.iterdir()) == []  # the frame's copy is gone, crash or not
    # This process is unharmed and the next image decodes with the real codec.
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert load_display_image(cr).shape == (2140, 1760)


def test_the_codec_sees_one_frame_and_no_patient_data(
    cr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "seen.dcm"
    _fake(monkeypatch, f"import shutil, sys; shutil.copy(sys.argv[1], {str(copy)!r}); sys.exit(3)")
    with pytest.raises(CorruptPixelData, match="exit 3"):
        load_display_image(cr)
    seen = pydicom.dcmread(copy)
    assert "PatientName" not in seen and "PatientID" not in seen and "StudyInstanceUID" not in seen
    assert (seen.Rows, seen.Columns) == (2140, 1760)
    assert seen.file_meta.TransferSyntaxUID == JPEGExtended12Bit


def test_jpeg_extended_is_not_offered_without_its_isolated_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    supported_transfer_syntaxes.cache_clear()
    try:
        assert str(JPEGExtended12Bit) in supported_transfer_syntaxes()
        monkeypatch.setitem(isolated.COMMANDS, str(JPEGExtended12Bit), ("no-such-dcmdjpeg",))
        supported_transfer_syntaxes.cache_clear()
        offered = supported_transfer_syntaxes()
        assert str(JPEGExtended12Bit) not in offered
        assert "1.2.840.10008.1.2.4.50" in offered  # baseline is read in process
    finally:
        supported_transfer_syntaxes.cache_clear()


def test_the_memory_limit_reaches_the_real_codec(cr: Path, scratch: Path) -> None:
    # dcmdjpeg needs 48 to 64 MiB of address space for this CR; give it 8 + 4 x 7 MiB.
    with pytest.raises(CorruptPixelData, match=r"dcmdjpeg \(isolated process\): failed: exit"):
        load_display_image(cr, limits=PixelLimits(isolated=IsolatedLimits(memory_mb=8)))
    assert list(scratch.iterdir()) == []
