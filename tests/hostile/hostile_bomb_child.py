"""Run decompression bombs through the parsers at the node's default limits; print a report.

Run as a child process by test_fuzz_parsers.py, so that what it measures is its own: the
peak resident set (VmHWM, reset before each case through /proc/self/clear_refs, so C
decoders' allocations count too) and the wall time of each case. The address space is
capped (RLIMIT_AS) so that a bomb which gets through fails here with MemoryError instead
of taking the machine down; the last line of stdout is the JSON report.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

# Imported after the path set-up above: this runs as a script, outside pytest.
from hostile_gen import bomb, seed, seeds  # noqa: E402
from hostile_oracle import check_header, check_pixels  # noqa: E402

from ddn_node.dicom.pixels import PixelLimits  # noqa: E402

# A bomb may cost what a legitimate image of the seed's size costs plus this: far less
# than the hundreds of MB to GB that the declared sizes would need.
BUDGET_MB = 96
TIME_S = 20.0


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _deflate_bomb(inflated_mb: int) -> bytes:
    """A deflated data set whose first element claims ``inflated_mb`` MiB of zeros.

    Built without deflating gigabytes: after a full flush a raw deflate stream is byte
    aligned and the compressor starts afresh, so 1 MiB of zeros deflates to the same
    bytes every time; those are repeated, and an empty final block ends the stream.
    """
    s = seed("deflate")
    head = (
        b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100"
        + b"\x09\x00\x10\x00OB\x00\x00"
        + struct.pack("<I", inflated_mb << 20)
    )
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    prefix = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    body = prefix + block * inflated_mb + b"\x03\x00"  # empty final fixed-Huffman block
    assert len(zlib.decompress(prefix + block * 2 + b"\x03\x00", -zlib.MAX_WBITS)) == len(head) + (
        2 << 20
    )
    return s.meta + body


def _jpeg_sof_far_away(rows: int, cols: int) -> bytes:
    """A baseline JPEG whose SOF sits after 70 kB of APP segments (past any short scan)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_frames
    from support.dicomgen import to_file_bytes

    ds = dcmread(io.BytesIO(seed("jpeg_baseline").file))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    app = b"".join(b"\xff\xe5" + struct.pack(">H", 65000) + b"\0" * 64998 for _ in range(2))
    frame[2:2] = app  # right after SOI
    i = frame.find(b"\xff\xc0", 2 + len(app))
    frame[i + 5 : i + 9] = struct.pack(">HH", rows, cols)
    ds.PixelData = encapsulate([bytes(frame)])
    return to_file_bytes(ds)


def bombs() -> dict[str, bytes | tuple[bytes, PixelLimits]]:
    """Name -> file, or (file, limits) where the default limits would let the case be a
    legitimate (if large) image: a deflated data set that inflates to 1 GiB is within the
    default 2 GiB decoded limit, so it is tested against a tighter one."""
    cases: dict[str, bytes | tuple[bytes, PixelLimits]] = {
        "native 20000x20000, 512 bytes": bomb("explicit_le", 20000, 20000),
        "native 65535x65535 x 2^31-1 frames": bomb("multiframe", 65535, 65535, frames=2**31 - 1),
        "native implicit 16000x16000 64-bit": bomb("implicit_le", 16000, 16000, bits_allocated=64),
        "native RGB 12000x12000": bomb("explicit_le", 12000, 12000, samples=3),
        "RLE 20000x20000, 1 kB": bomb("rle", 20000, 20000),
        "RLE 8000x8000, 1 kB": bomb("rle", 8000, 8000),
        "JPEG baseline 8000x8000, 600 bytes": bomb("jpeg_baseline", 8000, 8000),
        "JPEG baseline 20000x20000, 600 bytes": bomb("jpeg_baseline", 20000, 20000),
        "JPEG baseline SOF after 130 kB of APPn, 20000x20000": _jpeg_sof_far_away(20000, 20000),
        "JPEG-LS 8000x8000, half a frame": bomb("jpeg_ls", 8000, 8000, keep=0.5),
        "JPEG-LS 20000x20000": bomb("jpeg_ls", 20000, 20000),
        "JPEG 2000 20000x20000": bomb("jpeg2000", 20000, 20000),
        "JPEG 2000 20000x20000, truncated": bomb("jpeg2000", 20000, 20000, keep=0.3),
        "deflate: 1 MB on the wire, 1 GiB inflated, 64 MiB limit": (
            _deflate_bomb(1024),
            PixelLimits(max_decoded_mb=64),
        ),
        "deflate: 3 GiB inflated": _deflate_bomb(3072),
    }
    return cases


def main() -> int:
    # Warm up every decoder on the real seeds so that loading libraries does not count.
    tmp = Path(tempfile.mkdtemp(prefix="ddn-bombs-"))
    for s in seeds():
        path = tmp / f"{s.name}.dcm"
        path.write_bytes(s.file)
        check_header(path)
        check_pixels(path)
    cases = bombs()
    # Beyond this the child fails with MemoryError rather than the machine with OOM.
    vm = _status("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, ((vm + 3072) << 20, (vm + 3072) << 20))
    can_reset = _reset_peak()
    report: dict[str, object] = {"peak_reset": can_reset, "cases": {}}
    for name, case in cases.items():
        data, limits = case if isinstance(case, tuple) else (case, None)
        path = tmp / "bomb.dcm"
        path.write_bytes(data)
        base = _status("VmRSS")
        _reset_peak()
        t0 = time.monotonic()
        result: dict[str, object] = {"bytes": len(data)}
        try:
            result["header"] = check_header(path, seconds=60)
            result["pixels"] = check_pixels(path, limits, seconds=60)
        except AssertionError as exc:  # an untyped error, a hang, or MemoryError
            result["error"] = str(exc)[:300]
        result["seconds"] = round(time.monotonic() - t0, 2)
        result["peak_mb"] = _status("VmHWM") - base
        result["ok"] = (
            "error" not in result
            and result.get("pixels") != "image"  # a bomb must be refused, not decoded
            and result["peak_mb"] < BUDGET_MB  # type: ignore[operator]
            and result["seconds"] < TIME_S  # type: ignore[operator]
        )
        report["cases"][name] = result  # type: ignore[index]
        print(name, result, file=sys.stderr, flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
