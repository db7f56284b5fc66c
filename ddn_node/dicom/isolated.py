"""Decoding one frame in a separate, resource-limited process.

For codestreams that no in-process decoder reads: 12-bit JPEG Extended files whose scan
header has Ss/Se other than 0/63 (WG04 *_JPLY, Orthanc's and pydicom's 4.51 samples) are
refused by libjpeg (error -1038) and Pillow has no 12-bit JPEG, but DCMTK's ``dcmdjpeg``
reads them. A native codec is the part of a node most likely to crash on a hostile file,
so it never runs inside the node: the frame is written alone to a private temporary
folder, the codec runs there as its own process group under an address-space, CPU-time,
output-size and no-core-dump limit, and a wall-clock deadline kills the whole group. A
crash, a hang or a runaway allocation ends as :class:`IsolatedDecodeFailed`; the node
process is not touched.

Measured on the 2-core CI machine (the 6 real 12-bit files libjpeg refuses, wall time of
one decode including the process start): ``dcmdjpeg`` 15 ms (512x512 MR) to 30 ms
(2140x1760 CR); GDCM's ``gdcmconv --raw`` 19 to 51 ms with bit-identical pixels. DCMTK is
the faster of the two and the node already depends on it (Containerfile, bootstrap), so
it is the one used; GDCM is not needed.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import JPEGExtended12Bit

# The attributes a codec needs to turn one frame into native pixels (Image Pixel module).
_PIXEL_ATTRIBUTES = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)

# dcmdjpeg reads every JPEG process DICOM uses (8- and 12-bit baseline / extended, lossless
# any selection value) and writes Explicit VR Little Endian; its default colour handling
# (+cp) turns YCbCr into RGB, as pydicom's in-process decoders do. It is used only where
# the in-process decoders fail on real files: JPEG Extended. For baseline and lossless
# they read every real file, so a frame they refuse is a damaged one, and a codec that
# tolerates more (the fuzzer found dcmdjpeg decoding a baseline frame whose header had
# been altered) would turn it into an image to score instead of "analysis failed".
DCMTK_JPEG = ("dcmdjpeg",)
COMMANDS: dict[str, tuple[str, ...]] = {
    str(JPEGExtended12Bit): DCMTK_JPEG,
}


@dataclass(frozen=True)
class IsolatedLimits:
    """What one isolated decode may use. dcmdjpeg needs between 48 and 64 MiB of address
    space (its libraries included: under 32 MiB it cannot even load them) for a 2140x1760
    12-bit CR, and 30 ms; the limits leave a wide margin for legitimate images and still
    stop a runaway codec long before it hurts the node."""

    memory_mb: int = 256  # RLIMIT_AS, plus 4x the decoded frame (input, output, buffers)
    cpu_seconds: int = 30  # RLIMIT_CPU: SIGXCPU, and SIGKILL a second later
    wall_seconds: float = 60.0  # a codec blocked without using CPU is killed at this deadline
    prlimit: bool = True  # set the limits with prlimit(1) when installed, else setrlimit

    def address_space(self, frame_bytes: int) -> int:
        return (self.memory_mb << 20) + 4 * frame_bytes


class IsolatedDecodeFailed(Exception):
    """The isolated decoder did not produce the frame. ``reason`` is one of: crashed,
    cpu limit, timed out, failed, bad output."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def command_for(transfer_syntax: str) -> tuple[str, ...] | None:
    """The installed isolated decoder command for a transfer syntax, or None."""
    argv = COMMANDS.get(str(transfer_syntax))
    if not argv or shutil.which(argv[0]) is None:
        return None
    return argv


def _single_frame_file(ds: Dataset, transfer_syntax: str, frame: bytes) -> bytes:
    """A minimal DICOM file holding only this frame: the codec sees no other attribute
    of the original (names, private tags), and never more than one frame."""
    out = Dataset()
    for key in _PIXEL_ATTRIBUTES:
        if key in ds:
            out[key] = ds[key]
    out.SOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    out.SOPInstanceUID = ds.get("SOPInstanceUID", pydicom.uid.generate_uid())
    out.PixelData = encapsulate([frame])
    out["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = pydicom.uid.UID(transfer_syntax)
    out.file_meta = meta
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _limits_argv(
    prlimit: str, argv: Sequence[str], limits: IsolatedLimits, mem: int, fsize: int
) -> list[str]:
    """prlimit(1) sets the limits on itself and then execs the codec: no Python runs
    between fork and exec (a preexec_fn does, and the node is multi-threaded)."""
    return [
        prlimit,
        f"--as={mem}",
        f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}",
        f"--fsize={fsize}",
        "--core=0",
        "--",
        *argv,
    ]


def _preexec(limits: IsolatedLimits, mem: int, fsize: int) -> Callable[[], None]:
    """The same limits through setrlimit, for a machine without prlimit(1)."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _tail(path: Path, size: int = 300) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", "replace").strip().replace("\n", " | ")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def decode_frame(
    ds: Dataset,
    transfer_syntax: str,
    frame: bytes,
    rows: int,
    cols: int,
    samples: int,
    bits_allocated: int,
    argv: Sequence[str],
    limits: IsolatedLimits | None = None,
) -> np.ndarray:
    """Decode one compressed frame with ``argv`` (``argv + [in, out]`` is run) in a child
    process. Returns the native array (rows x cols [x samples]).

    Raises :class:`IsolatedDecodeFailed` for anything short of a frame of that size.
    """
    limits = limits or IsolatedLimits()
    expected = rows * cols * samples * -(-bits_allocated // 8)
    # The decoded file is the frame plus a small header; nothing larger may be written.
    fsize = expected + (1 << 20)
    mem = limits.address_space(expected)
    with tempfile.TemporaryDirectory(prefix="ddn-decode-") as work:
        src, dst = Path(work) / "in.dcm", Path(work) / "out.dcm"
        src.write_bytes(_single_frame_file(ds, transfer_syntax, frame))
        command = [*argv, str(src), str(dst)]
        prlimit = shutil.which("prlimit") if limits.prlimit else None
        preexec = None if prlimit else _preexec(limits, mem, fsize)
        if prlimit:
            command = _limits_argv(prlimit, command, limits, mem, fsize)
        # stderr goes to a file, not a pipe: the output-size limit bounds it too, and
        # only its tail is read back.
        with open(Path(work) / "stderr", "wb") as err_file:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err_file,
                    cwd=work,
                    start_new_session=True,  # its own process group, killed as one
                    preexec_fn=preexec,
                    close_fds=True,
                )
            except OSError as e:
                raise IsolatedDecodeFailed("failed", f"cannot start: {e}") from e
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise IsolatedDecodeFailed(
                    "timed out", f"killed after {limits.wall_seconds:g} s"
                ) from None
            except BaseException:
                # Interrupted while waiting (a signal handler's exception, Ctrl-C): the
                # codec must not outlive the call that started it.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        tail = _tail(Path(work) / "stderr")
        if proc.returncode < 0:
            sig = -proc.returncode
            reason = "cpu limit" if sig == signal.SIGXCPU else "crashed"
            raise IsolatedDecodeFailed(reason, f"killed by {_signal_name(sig)} {tail}".strip())
        if proc.returncode != 0:
            raise IsolatedDecodeFailed("failed", f"exit {proc.returncode}: {tail}")
        if not dst.is_file() or dst.stat().st_size > fsize:
            raise IsolatedDecodeFailed("bad output", "no decoded file written")
        return _read_output(dst, rows, cols, samples, bits_allocated)


def _read_output(path: Path, rows: int, cols: int, samples: int, bits_allocated: int) -> np.ndarray:
    """The decoded file is native pixel data, read by pydicom alone (no codec)."""
    try:
        out = pydicom.dcmread(path, force=True)
        ts = out.file_meta.TransferSyntaxUID
        if ts.is_compressed:
            raise IsolatedDecodeFailed("bad output", f"output is still {ts.name}")
        if (int(out.Rows), int(out.Columns), int(out.get("SamplesPerPixel", 1))) != (
            rows,
            cols,
            samples,
        ):
            raise IsolatedDecodeFailed(
                "bad output", f"decoded {out.Rows}x{out.Columns}, expected {rows}x{cols}"
            )
        if int(out.get("BitsAllocated", 0)) != bits_allocated:
            # The codestream's precision disagrees with the header the pipeline reads.
            raise IsolatedDecodeFailed(
                "bad output",
                f"decoded Bits Allocated {out.get('BitsAllocated')}, the header {bits_allocated}",
            )
        arr = pixel_array(out)
        photometric = str(out.get("PhotometricInterpretation", ""))
        if samples == 3 and photometric.startswith("YBR") and photometric != "YBR_RCT":
            # The callers expect RGB from a compressed syntax, as pydicom's decoders give.
            arr = convert_color_space(arr, photometric, "RGB")
        return np.asarray(arr)
    except IsolatedDecodeFailed:
        raise
    except (ValueError, KeyError, AttributeError, TypeError, OSError, EOFError) as e:
        raise IsolatedDecodeFailed("bad output", f"{type(e).__name__}: {str(e)[:200]}") from e
