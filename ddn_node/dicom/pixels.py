"""DICOM pixel data -> a display image for the model.

:func:`load_display_image` returns float32 HxW in [0, 1] with MONOCHROME2 semantics
(bright = dense), following the grayscale pipeline of PS3.3 C.11 / PS3.4 N.2:

1. decode one frame (the fastest installed decoder for the transfer syntax, falling back
   to the others when one refuses a file, and for JPEG Extended last to DCMTK in an
   isolated, resource-limited process: dicom/isolated.py);
2. mask unused high bits (overlays may live there, PS3.5 8.1.1 / PS3.3 C.9.2);
3. Modality LUT: Rescale Slope/Intercept or Modality LUT Sequence (PS3.3 C.11.1);
4. VOI LUT: VOI LUT Sequence, else Window Center/Width with VOI LUT Function
   LINEAR / LINEAR_EXACT / SIGMOID (PS3.3 C.11.2.1.2), else a robust percentile window;
5. MONOCHROME1 inverted (PS3.3 C.7.6.3.1.2: minimum sample value is white);
6. colour (RGB, YBR_*, PALETTE COLOR) -> grey with the BT.601 luma weights.

Every failure is a :class:`PixelDataError` (a ``ValueError``) with a typed subclass, and
the image is never NaN. Decompression bombs are refused *before* anything is allocated:
the declared size (Rows x Columns x frames x samples x bits) is checked against a limit,
native pixel data against the bytes actually present, compressed frames against the
dimensions in their codestream header and against the fewest bytes that size can be coded
in (RLE, Huffman JPEG, JPEG-LS; JPEG 2000 has no such bound, only the limit), and deflated
datasets while they inflate.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    get_decoder,
    pixel_array,
)
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from ddn_node.dicom import isolated
from ddn_node.dicom.isolated import IsolatedDecodeFailed, IsolatedLimits

log = structlog.get_logger()

DEFAULT_MAX_MEGAPIXELS = 512.0  # Rows x Columns x frames x samples, in millions
DEFAULT_MAX_DECODED_MB = 2048.0  # declared decoded size of the whole pixel data, MiB


class PixelDataError(ValueError):
    """Pixels cannot be turned into a display image. Subclasses say why."""


class NotDicom(PixelDataError):
    """The bytes do not parse as a DICOM dataset."""


class NoPixelData(PixelDataError):
    """The dataset has no Pixel Data (SR, RT Plan, waveform, header-only...)."""


class UnsupportedTransferSyntax(PixelDataError):
    """No installed decoder handles the transfer syntax (or it is unknown / missing)."""


class CorruptPixelData(PixelDataError):
    """The pixel data or its describing attributes are inconsistent, or decoding failed."""


class TruncatedPixelData(CorruptPixelData):
    """Native pixel data shorter than the declared image size."""


class ImageTooLarge(PixelDataError):
    """The declared image exceeds the configured limits (decompression-bomb guard)."""


class FrameOutOfRange(PixelDataError):
    """The requested frame index is not in the image."""


@dataclass(frozen=True)
class PixelLimits:
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_decoded_mb: float = DEFAULT_MAX_DECODED_MB
    # the out-of-process decoder's limits (dicom/isolated.py)
    isolated: IsolatedLimits = field(default_factory=IsolatedLimits)


# What pydicom raises on a malformed data set, while reading it and again while converting
# a raw value on first access. BytesLengthException (a value whose length does not fit its
# VR) derives from Exception only; RecursionError comes from undefined-length sequences
# nested hundreds deep and never closed; OSError ("No tag to read at file position") from
# a sequence that runs off the end of the data (also lazily: a defined-length sequence is
# parsed on first access); NotImplementedError from an unknown VR.
_VALUE_ERRORS = (BytesLengthException, RecursionError, struct.error, NotImplementedError, OSError)
_PARSE_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    zlib.error,
    OSError,
    *_VALUE_ERRORS,
)


def _is_decoder_panic(exc: BaseException) -> bool:
    """pyo3 (the Rust binding of pylibjpeg-rle) turns a Rust panic, e.g. an index out of
    bounds on a corrupt RLE segment, into ``PanicException``, which derives from
    BaseException so that ``except Exception`` lets it through."""
    return type(exc).__name__ == "PanicException"


NATIVE_SYNTAXES = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
}

# Decoder preference per transfer syntax, fastest first. Measured on this 2-core CPU with
# the WG04 RG2 CR image (2140x1760, 10-bit), best of 3 (ms):
#   JPEG 2000 lossless: gdcm 334, pillow 419, pylibjpeg 509
#   JPEG-LS lossless:   pyjpegls 71, gdcm 102, pylibjpeg 304
#   JPEG lossless SV1:  gdcm 75, pylibjpeg 151
#   RLE:                pylibjpeg 10, pydicom 40
# gdcm is fastest for two of them but is never used: on a corrupt codestream, or a header
# that disagrees with it (Samples per Pixel, Bits Allocated, Rows...), python-gdcm lets a
# C++ exception escape and the whole process aborts (std::terminate). Fuzzing found this
# for JPEG baseline, JPEG-LS and JPEG 2000, so one hostile file could kill the node; a
# slower decode is the price. pylibjpeg, pyjpegls and Pillow raise Python exceptions.
# libjpeg decodes 12-bit JPEG Extended, hence libjpeg first for the lossy JPEG processes.
# Plugins that are not installed are skipped; the next ones are tried when one refuses a
# file.
UNSAFE_PLUGINS = frozenset({"gdcm"})
_J2K = ("pylibjpeg", "pillow")
_JLS = ("pyjpegls", "pylibjpeg")
_JPEG_LOSSY = ("pylibjpeg", "pillow")
_JPEG_LOSSLESS = ("pylibjpeg",)
DECODER_PREFERENCE: dict[str, tuple[str, ...]] = {
    JPEG2000: _J2K,
    JPEG2000Lossless: _J2K,
    JPEGLSLossless: _JLS,
    JPEGLSNearLossless: _JLS,
    JPEGBaseline8Bit: _JPEG_LOSSY,
    JPEGExtended12Bit: _JPEG_LOSSY,
    JPEGLossless: _JPEG_LOSSLESS,
    JPEGLosslessSV1: _JPEG_LOSSLESS,
    RLELossless: ("pylibjpeg", "pydicom"),
}


# Syntaxes that in-process decoders do not read on real files, so they are offered only
# when the isolated decoder (dicom/isolated.py) is installed: libjpeg reads 1 of the 7 real
# 12-bit JPEG Extended files here (the others have a scan header with Ss/Se other than
# 0/63, error -1038) and Pillow has no 12-bit JPEG; DCMTK's dcmdjpeg reads all 7.
NEEDS_ISOLATED = frozenset({JPEGExtended12Bit})


# Syntaxes whose frames carry their own image size (SOF / SIZ markers); RLE does not.
_CODESTREAM_SYNTAXES = {u for u in DECODER_PREFERENCE if u != RLELossless}


def decoder_plugins(uid: str) -> list[str]:
    """Installed decoding plugins for a transfer syntax, in the order they are tried
    (never one of :data:`UNSAFE_PLUGINS`)."""
    try:
        decoder = get_decoder(UID(uid))
    except NotImplementedError:
        return []
    available = [p for p in decoder.available_plugins if p not in UNSAFE_PLUGINS]
    preferred = [p for p in DECODER_PREFERENCE.get(uid, ()) if p in available]
    return preferred + [p for p in available if p not in preferred]


# --- reading ----------------------------------------------------------------------------


def _inflate_capped(raw: bytes, offset: int, cap: int) -> None:
    """Inflate a deflated dataset body in chunks, refusing it once it passes ``cap`` bytes."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pos = offset
    while pos < len(raw):
        chunk = raw[pos : pos + (1 << 16)]
        pos += len(chunk)
        out = d.decompress(chunk, 1 << 20)
        total += len(out)
        while d.unconsumed_tail:
            out = d.decompress(d.unconsumed_tail, 1 << 20)
            total += len(out)
            if total > cap:
                break
        if total > cap:
            raise ImageTooLarge(f"deflated dataset inflates beyond {cap >> 20} MiB")
        if d.eof:
            break


def _read(path: Path, limits: PixelLimits) -> Dataset:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NotDicom(f"cannot read {path.name}: {e}") from e
    # Only the File Meta Information: dcmread, even with stop_before_pixels, would inflate
    # a deflated body in full, which is the very allocation the cap below is there to stop
    # (a 3 MB file cost 6 GiB here before the guard could run).
    bio = io.BytesIO(raw)
    try:
        pydicom.filereader.read_preamble(bio, force=True)
        meta = pydicom.filereader._read_file_meta_info(bio)
    except _PARSE_ERRORS as e:
        raise NotDicom(f"{path.name} is not a readable DICOM file: {e}") from e
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # The body starts after the file meta group; pydicom inflates all of it at once.
        try:
            _inflate_capped(raw, bio.tell(), int(limits.max_decoded_mb * 2**20) + (16 << 20))
        except zlib.error as e:
            raise NotDicom(f"{path.name}: the deflated data set is corrupt: {e}") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(raw), force=True)
    except _PARSE_ERRORS as e:
        raise NotDicom(f"{path.name} is not a readable DICOM file: {e}") from e


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        uid = UID(ts)
        if not uid.is_transfer_syntax:
            raise UnsupportedTransferSyntax(f"{uid} is not a known transfer syntax")
        return uid
    # No file meta (a raw dataset): the encoding pydicom detected is all there is, and it
    # can only be a native one; encapsulated data would need the meta to be decodable.
    elem = ds.get("PixelData") if "PixelData" in ds else None
    if elem is not None and getattr(elem, "is_undefined_length", False):
        raise UnsupportedTransferSyntax("encapsulated pixel data without a Transfer Syntax UID")
    implicit, little = ds.original_encoding if hasattr(ds, "original_encoding") else (True, True)
    if implicit is None:
        implicit, little = True, True
    uid = (
        ImplicitVRLittleEndian
        if implicit
        else ExplicitVRLittleEndian
        if little
        else ExplicitVRBigEndian
    )
    if ds.file_meta is None or not isinstance(ds.file_meta, FileMetaDataset):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


# --- guards -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str


def _geometry(ds: Dataset) -> _Geometry:
    def _int(key: str, default: int | None = None) -> int:
        v = ds.get(key, default)
        if v is None or v == "":
            raise CorruptPixelData(f"{key} is missing")
        try:
            return int(v)
        except (TypeError, ValueError) as e:
            raise CorruptPixelData(f"{key} is not an integer: {v!r}") from e

    rows, cols = _int("Rows"), _int("Columns")
    frames = _int("NumberOfFrames", 1) or 1
    samples = _int("SamplesPerPixel", 1)
    float_data = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
    ba = _int("BitsAllocated", 32 if "FloatPixelData" in ds else 64 if float_data else None)
    bs = _int("BitsStored", ba)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise CorruptPixelData(f"invalid image size {rows}x{cols}x{frames}")
    if samples not in (1, 3, 4):
        raise CorruptPixelData(f"SamplesPerPixel {samples} is not 1 or 3")
    if ba not in (1, 8, 16, 32, 64) or not 1 <= bs <= ba:
        raise CorruptPixelData(f"BitsAllocated {ba} / BitsStored {bs} are not valid")
    photometric = (
        str(ds.get("PhotometricInterpretation", "MONOCHROME2" if samples == 1 else "RGB"))
        .strip()
        .upper()
    )
    return _Geometry(
        rows,
        cols,
        frames,
        samples,
        ba,
        bs,
        int(ds.get("PixelRepresentation", 0) or 0) == 1,
        photometric,
    )


def _check_limits(g: _Geometry, limits: PixelLimits) -> None:
    samples = g.rows * g.cols * g.frames * g.samples
    if samples > limits.max_megapixels * 1e6:
        raise ImageTooLarge(
            f"declared {g.rows}x{g.cols}x{g.frames} frames x {g.samples} samples = {samples / 1e6:.0f} MP exceeds {limits.max_megapixels:.0f} MP"
        )
    decoded = samples * g.bits_allocated / 8
    if decoded > limits.max_decoded_mb * 2**20:
        raise ImageTooLarge(
            f"declared decoded size {decoded / 2**20:.0f} MiB exceeds {limits.max_decoded_mb:.0f} MiB"
        )


def _check_native_length(ds: Dataset, g: _Geometry, frame: int) -> None:
    elem = (
        ds["PixelData"]
        if "PixelData" in ds
        else ds["FloatPixelData"]
        if "FloatPixelData" in ds
        else ds["DoubleFloatPixelData"]
    )
    actual = len(elem.value) if elem.value is not None else 0
    per_frame_bits = g.rows * g.cols * g.samples * g.bits_allocated
    needed = -(-per_frame_bits * (frame + 1) // 8)
    if needed > actual:
        declared = -(-per_frame_bits * g.frames // 8)
        raise TruncatedPixelData(f"declared {declared} bytes of pixel data, {actual} present")


@dataclass(frozen=True)
class _FrameHeader:
    """Image size and component sampling as a codestream declares them."""

    marker: int  # JPEG SOFn (0xF7 for JPEG-LS), or 0x51 for a JPEG 2000 SIZ
    rows: int
    cols: int
    sampling: tuple[tuple[int, int], ...] = ()  # JPEG (H, V) per component


_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xF7}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI
_SOF_HUFFMAN_DCT = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended, progressive
_SOF_HUFFMAN_LOSSLESS = frozenset({0xC3})
_SOF_JPEG_LS = 0xF7


def _frame_header(frame: bytes) -> _FrameHeader | None:
    """The image size from a JPEG 2000 SIZ or a JPEG / JPEG-LS SOF, if there is one.

    JPEG marker segments are walked as a decoder walks them, so APPn segments of any size
    before the SOF cannot hide it (a scan of the first bytes could be outrun).
    """
    j2k = frame.find(b"\xff\x4f\xff\x51")  # SOC, SIZ
    if j2k >= 0 and len(frame) >= j2k + 4 + 2 + 2 + 16:
        o = j2k + 4 + 2 + 2  # SOC, SIZ marker, Lsiz, Rsiz
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", frame[o : o + 16])
        return _FrameHeader(0x51, ysiz - yo, xsiz - xo)
    i = frame.find(b"\xff\xd8")  # SOI
    if i < 0:
        return None
    i += 2
    n = len(frame)
    while i + 4 <= n:
        if frame[i] != 0xFF:  # junk between segments: decoders skip to the next marker
            i = frame.find(b"\xff", i)
            if i < 0:
                return None
            continue
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        if marker in _SOF_MARKERS:
            if i + 10 > n:
                return None
            rows, cols = struct.unpack(">HH", frame[i + 5 : i + 9])
            comps = frame[i + 10 : i + 10 + 3 * frame[i + 9]]
            sampling = tuple(
                (comps[k + 1] >> 4, comps[k + 1] & 0x0F) for k in range(0, len(comps) - 2, 3)
            )
            return _FrameHeader(marker, rows, cols, sampling)
        (length,) = struct.unpack(">H", frame[i + 2 : i + 4])
        i += 2 + length
    return None


def _min_codestream_bits(h: _FrameHeader, rows: int) -> int:
    """A lower bound on the size of any complete codestream of this frame header, in bits.

    Huffman codes are at least one bit long, so a Huffman DCT stream (baseline, extended,
    progressive) has at least one bit per 8x8 block of each component (its DC difference),
    and a lossless one at least one bit per sample. JPEG-LS run mode can code a whole line
    in one bit, so it has at least one bit per line. JPEG 2000 and arithmetic coding have
    no useful bound (0): only the size limits stand before them.
    """
    height = h.rows or rows  # 0: the height is defined later by a DNL marker
    if h.marker == _SOF_JPEG_LS:
        return height
    if h.marker not in _SOF_HUFFMAN_DCT | _SOF_HUFFMAN_LOSSLESS or not h.sampling:
        return 0
    hmax = max(hc for hc, _ in h.sampling) or 1
    vmax = max(vc for _, vc in h.sampling) or 1
    bits = 0
    for hc, vc in h.sampling:
        width_c, height_c = -(-h.cols * hc // hmax), -(-height * vc // vmax)
        if h.marker in _SOF_HUFFMAN_DCT:
            bits += -(-width_c // 8) * -(-height_c // 8)
        else:
            bits += width_c * height_c
    return bits


def _encapsulated_frame(ds: Dataset, g: _Geometry, frame: int) -> bytes:
    from pydicom.encaps import get_frame

    if not isinstance(ds.PixelData, bytes):  # empty (None) or read with a wrong VR
        raise CorruptPixelData(
            f"encapsulated Pixel Data is {type(ds.PixelData).__name__}, not bytes"
        )
    try:
        return get_frame(ds.PixelData, frame, number_of_frames=g.frames)
    except (ValueError, IndexError, KeyError, struct.error) as e:
        raise CorruptPixelData(
            f"cannot find frame {frame} in the encapsulated pixel data: {e}"
        ) from e


def _check_rle(data: bytes, g: _Geometry) -> None:
    """RLE (PS3.5 G.3.1, PackBits) expands at most 64x: a replicate run of up to 128
    bytes costs 2. A frame too short for its declared size is refused before a decoder
    allocates the declared size (pylibjpeg-rle allocates first, then finds out)."""
    needed = g.rows * g.cols * g.samples * -(-g.bits_allocated // 8)
    most = 64 * max(len(data) - 64, 0)  # after the 64-byte RLE header
    if needed > most:
        raise CorruptPixelData(
            f"RLE frame of {len(data)} bytes cannot hold {g.rows}x{g.cols}x{g.samples} ({needed} bytes)"
        )


def _check_codestream(data: bytes, g: _Geometry) -> None:
    header = _frame_header(data)
    if header is None:
        return
    # JPEG allows height 0 in the SOF (defined later by DNL); only a larger size is a threat.
    if header.rows > g.rows or header.cols > g.cols:
        raise CorruptPixelData(
            f"codestream declares {header.rows}x{header.cols}, the header {g.rows}x{g.cols}"
        )
    # Decoders allocate the declared size and then fill what the data does not cover
    # (libjpeg: 'premature end of data'), so a few hundred bytes could become gigabytes.
    needed = _min_codestream_bits(header, g.rows)
    if len(data) * 8 < needed:
        raise CorruptPixelData(
            f"codestream of {len(data)} bytes is too short for {header.rows or g.rows}x{header.cols} "
            f"(at least {-(-needed // 8)} bytes)"
        )


# --- decoding ----------------------------------------------------------------------------


def _decode(ds: Dataset, ts: UID, frame: int, g: _Geometry, limits: PixelLimits) -> np.ndarray:
    native = ts in NATIVE_SYNTAXES or not ts.is_compressed
    plugins = [""] if native else decoder_plugins(ts)
    argv = None if native else isolated.command_for(ts)
    if not plugins and argv is None:
        raise UnsupportedTransferSyntax(f"no installed decoder for {ts.name} ({ts})")
    errors = []
    for plugin in plugins:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pixel_array(ds, index=frame, decoding_plugin=plugin)
        except NotImplementedError as e:
            raise UnsupportedTransferSyntax(f"{ts.name}: {e}") from e
        # Decoders raise anything from RuntimeError to OSError on bad codestreams; each is
        # recorded and the next decoder tried, and all of them end as one typed error.
        except Exception as e:  # noqa: BLE001
            errors.append(
                f"{plugin or 'pydicom'}: {str(e).splitlines()[-1][:200] if str(e) else type(e).__name__}"
            )
        except BaseException as e:
            if not _is_decoder_panic(e):
                raise
            errors.append(f"{plugin}: decoder panic: {str(e)[:200]}")
    if argv is not None:
        # Last, as it costs a process start (15-30 ms) and only matters when the
        # in-process decoders refused the frame; it runs outside the node, limited.
        started = time.perf_counter()
        try:
            arr = isolated.decode_frame(
                ds,
                ts,
                _encapsulated_frame(ds, g, frame),
                g.rows,
                g.cols,
                g.samples,
                g.bits_allocated,
                argv,
                limits.isolated,
            )
        except IsolatedDecodeFailed as e:
            log.warning(
                "pixels.isolated_decode_failed",
                transfer_syntax=str(ts),
                decoder=Path(argv[0]).name,
                reason=e.reason,
                error=str(e)[:300],
            )
            errors.append(f"{Path(argv[0]).name} (isolated process): {e}")
        else:
            log.info(
                "pixels.isolated_decoded",
                transfer_syntax=str(ts),
                decoder=Path(argv[0]).name,
                ms=round((time.perf_counter() - started) * 1000, 1),
                refused_in_process="; ".join(errors)[:300],
            )
            return arr
    raise CorruptPixelData(f"{ts.name}: no decoder could read the pixel data ({'; '.join(errors)})")


# JPEG 2000 codes an image as a pyramid of resolution levels, so a decoder can stop
# at a lower one and skip most of the work (a quarter of the samples per level skipped,
# 4x faster per level on the 2140 x 1760 WG04 CR here). The node's own uses of a display
# image need no more than a known size (the model 224 px, the overlays 1024, the maps
# 256), so ``max_side`` lets a J2K image come back at the lowest level at least that wide.
_REDUCIBLE = frozenset({JPEG2000, JPEG2000Lossless})


def _j2k_main_header(frame: bytes) -> tuple[int, bool, int] | None:
    """(decomposition levels of the main header's COD, whether component 0 is signed, its
    precision in bits), or None when the main header has no readable SIZ + COD."""
    i = frame.find(b"\xff\x4f\xff\x51")  # SOC, SIZ
    if i < 0 or len(frame) < i + 4 + 38 + 3:
        return None
    ssiz = frame[i + 4 + 38]  # Ssiz of component 0: bit 7 = signed, then precision - 1
    signed, precision = bool(ssiz & 0x80), (ssiz & 0x7F) + 1
    i += 2
    while i + 4 <= len(frame) and frame[i] == 0xFF:
        marker = frame[i + 1]
        if marker == 0x90:  # SOT: the main header ended without a COD
            return None
        (length,) = struct.unpack(">H", frame[i + 2 : i + 4])
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4 bytes), then SPcod's levels
            return (frame[i + 9], signed, precision) if i + 9 < len(frame) else None
        i += 2 + length
    return None


def _reduction(g: _Geometry, levels: int, max_side: int) -> int:
    """How many resolution levels can be dropped with the long side still >= max_side."""
    r = 0
    while r < levels and -(-max(g.rows, g.cols) // (1 << (r + 1))) >= max_side:
        r += 1
    return r


def _decode_reduced(ds: Dataset, g: _Geometry, frame: int, max_side: int) -> np.ndarray | None:
    """The frame at the lowest resolution level whose long side is at least ``max_side``
    (Pillow's OpenJPEG binding, which can stop at a level); None when nothing would be
    saved or the codestream is not one this path takes (the full decode then runs)."""
    if g.samples != 1 or g.bits_allocated not in (8, 16) or g.signed:
        return None
    data = _encapsulated_frame(ds, g, frame)
    header = _j2k_main_header(data)
    if header is None or header[1] or not 1 <= header[2] <= g.bits_allocated:
        return None
    r = _reduction(g, header[0], max_side)
    if r == 0:
        return None
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                im.reduce = r  # type: ignore[method-assign,assignment]  # Jpeg2KImageFile's setter
                im.load()
                arr = np.asarray(im)
    # A codestream the reduced path cannot read (a tile header with fewer levels, a
    # truncated stream...) is not an error yet: the full decoders get their say.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        log.info("pixels.reduced_decode_refused", error=str(e)[:200], levels_dropped=r)
        return None
    want = (-(-g.rows // (1 << r)), -(-g.cols // (1 << r)))
    if arr.ndim != 2 or abs(arr.shape[0] - want[0]) > 1 or abs(arr.shape[1] - want[1]) > 1:
        return None
    # Pillow scales samples up to fill its mode (10-bit data comes as 0..65472 in I;16):
    # shifted back, they are the values the full decoders give.
    shift = 8 * arr.dtype.itemsize - header[2]
    return np.right_shift(arr, shift) if shift > 0 else arr


def _decode_frame(
    ds: Dataset, ts: UID, frame: int, g: _Geometry, limits: PixelLimits, max_side: int | None
) -> np.ndarray:
    """The frame's samples: at a reduced resolution where ``max_side`` allows it, else
    at Rows x Columns."""
    if max_side is not None and ts in _REDUCIBLE:
        reduced = _decode_reduced(ds, g, frame, max_side)
        if reduced is not None:
            return reduced
    arr = _decode(ds, ts, frame, g, limits)
    if arr.ndim == 3 and g.samples == 1:  # defensive: a single frame must be 2-D
        arr = arr[0]
    if arr.shape[:2] != (g.rows, g.cols):
        raise CorruptPixelData(f"decoded shape {arr.shape} does not match {g.rows}x{g.cols}")
    return arr


def _mask_high_bits(arr: np.ndarray, g: _Geometry) -> np.ndarray:
    """Keep only Bits Stored bits (high bits may carry overlays), sign-extending if signed."""
    if arr.dtype.kind not in "iu" or g.bits_stored >= g.bits_allocated or g.bits_allocated > 32:
        return arr
    if not g.signed and arr.dtype.kind == "u":
        # Unsigned: one pass in the decoded dtype (a 2048 x 2048 image is 8 MiB, not the
        # 32 MiB of an int64 copy).
        return np.bitwise_and(arr, arr.dtype.type((1 << g.bits_stored) - 1))
    a = arr.astype(np.int64)
    mask = (1 << g.bits_stored) - 1
    a &= mask
    if g.signed:
        sign = 1 << (g.bits_stored - 1)
        a = (a ^ sign) - sign
    return a


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((arr - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError("LINEAR window width must be >= 1")
    w1 = width - 1 if width > 1 else 1.0
    return np.clip((arr - (center - 0.5)) / w1 + 0.5, 0.0, 1.0)


# The percentiles come from a regular sub-grid of at most about this many pixels: for a
# 2048 x 2048 image (every second row and column) the window moves by a fraction of a
# grey level, and finding it costs a quarter of the time.
PERCENTILE_SAMPLE_PIXELS = 1 << 20


def _percentile_window(arr: np.ndarray) -> np.ndarray:
    """Robust auto-window: 0.5th-99.5th percentiles (min-max when those coincide)."""
    step = max(1, int(np.ceil(np.sqrt(arr.size / PERCENTILE_SAMPLE_PIXELS))))
    sample = arr[::step, ::step] if arr.ndim >= 2 else arr[:: step * step]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.float64)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        finite = arr[np.isfinite(arr)]  # min-max over every pixel, not just the sample
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    # One new array, scaled and clipped in place: three passes over a 2048 x 2048 image
    # instead of five.
    out = np.subtract(arr, lo)
    out *= 1.0 / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _first(v: object) -> float:
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        v = v[0]
    return float(v)  # type: ignore[arg-type]


def _voi(arr: np.ndarray, ds: Dataset, g: _Geometry) -> tuple[np.ndarray, str]:
    """VOI transform to [0, 1]: LUT sequence, window, or the percentile fallback."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        try:
            # LUT lookup needs integer input; values are integral after a LUT/integer rescale.
            idx = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr
            out = apply_voi_lut(idx, ds, index=0, prefer_lut=True)
            lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
            lo, hi = float(lut.min()), float(lut.max())
            if hi > lo:
                return np.clip((out.astype(np.float64) - lo) / (hi - lo), 0, 1), "voi_lut_sequence"
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            log.info("pixels.voi_lut_unusable", error=str(e)[:200])
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
            fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            if w > 0 and np.isfinite(c) and np.isfinite(w):
                out = _window(np.asarray(arr, dtype=np.float64), c, w, fn)
                # A header window that puts every pixel on one side shows nothing: a
                # mislabelled window (seen after rescaling by gateways); use the data instead.
                if float(out.max()) - float(out.min()) > 1e-6 or float(arr.max()) == float(
                    arr.min()
                ):
                    return out, f"window {fn.lower()}"
                log.info("pixels.window_outside_data", center=c, width=w)
        except (ValueError, TypeError, IndexError) as e:
            log.info("pixels.window_unusable", error=str(e)[:200])
    # asarray: the caller's array is already float64, a copy would be a wasted pass.
    return _percentile_window(np.asarray(arr, dtype=np.float64)), "percentile"


def _to_gray(arr: np.ndarray, ds: Dataset, g: _Geometry, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        top = float(2**16 - 1) if arr.dtype.itemsize > 1 else 255.0
    else:
        top = float(2**g.bits_stored - 1)
    rgb = arr[..., :3].astype(np.float64)
    if photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
        # pydicom converts YBR to RGB for most decoders; a native YBR_FULL image is converted here.
        from pydicom.pixels import convert_color_space

        rgb = convert_color_space(arr[..., :3], photometric, "RGB").astype(np.float64)
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(gray / top, 0.0, 1.0)


def load_display_image(
    source: Dataset | str | Path,
    frame: int = 0,
    limits: PixelLimits | None = None,
    max_side: int | None = None,
) -> np.ndarray:
    """A DICOM image (dataset or file) -> float32 HxW in [0, 1], bright = dense.

    HxW is Rows x Columns, unless ``max_side`` is given and the image is JPEG 2000: it may
    then come from a lower resolution level, scaled by a power of two, with its long side
    still at least ``max_side`` (the same image, decoded a few times faster).

    Raises a :class:`PixelDataError` subclass for anything that cannot be displayed.
    """
    try:
        return _display_image(source, frame, limits or PixelLimits(), max_side)
    except PixelDataError:
        raise
    except _VALUE_ERRORS as e:
        # An attribute whose raw value breaks its VR fails when first used (Rows with 3
        # bytes, a LUT descriptor of the wrong length, an unknown VR...), anywhere below.
        raise CorruptPixelData(
            f"malformed attribute value: {type(e).__name__}: {str(e)[:200]}"
        ) from e


def _display_image(  # noqa: C901 - the pixel pipeline of PS3.3 C.11, step by step
    source: Dataset | str | Path, frame: int, limits: PixelLimits, max_side: int | None = None
) -> np.ndarray:
    ds = _read(Path(source), limits) if isinstance(source, (str, Path)) else source
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NoPixelData("the dataset has no Pixel Data")
    g = _geometry(ds)
    _check_limits(g, limits)
    if frame < 0 or frame >= g.frames:
        raise FrameOutOfRange(f"frame {frame} asked for, the image has {g.frames}")
    ts = _transfer_syntax(ds)
    if ts in NATIVE_SYNTAXES or not ts.is_compressed:
        _check_native_length(ds, g, frame)
    else:
        if "PixelData" not in ds:
            raise CorruptPixelData("compressed transfer syntax without encapsulated Pixel Data")
        if ts == RLELossless:
            _check_rle(_encapsulated_frame(ds, g, frame), g)
        elif ts in _CODESTREAM_SYNTAXES:
            _check_codestream(_encapsulated_frame(ds, g, frame), g)
    arr = _decode_frame(ds, ts, frame, g, limits, max_side)

    photometric = g.photometric
    if g.samples == 1 and photometric != "PALETTE COLOR":
        if arr.dtype.kind != "f":
            arr = _mask_high_bits(arr, g)
        try:
            arr = apply_modality_lut(arr, ds) if arr.dtype.kind != "f" else arr
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            log.info("pixels.modality_lut_unusable", error=str(e)[:200])
        arr = np.asarray(arr, dtype=np.float64)
        # One pass when every value is finite (always, for integer pixels with a finite
        # rescale): the repairs below cost four more over the whole image.
        finite = np.isfinite(arr)
        if not finite.all():
            arr[~finite] = np.nan
            if np.isnan(arr).all():
                raise CorruptPixelData("no finite pixel values")
            arr = np.nan_to_num(arr, nan=float(np.nanmin(arr)))
        out, how = _voi(arr, ds, g)
        if photometric == "MONOCHROME1":
            out = 1.0 - out
    elif g.samples >= 3 or photometric == "PALETTE COLOR":
        # pydicom returns RGB for YBR JPEG by default (as_rgb); the dataset's tag still says YBR.
        decoded_is_rgb = not (ts in NATIVE_SYNTAXES and photometric.startswith("YBR"))
        out = _to_gray(
            arr, ds, g, "RGB" if decoded_is_rgb and photometric != "PALETTE COLOR" else photometric
        )
        how = "colour -> BT.601 luma"
    else:  # pragma: no cover - _geometry limits samples to 1, 3, 4
        raise CorruptPixelData(f"unsupported photometric interpretation {photometric}")
    out = np.asarray(out, dtype=np.float32)
    if not np.isfinite(out).all():  # windows and LUTs clip; only a repair needs the passes
        out = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    _ = how  # kept for debugging sessions; not logged per image (the worker logs per study)
    return np.clip(out, 0.0, 1.0, out=out)
