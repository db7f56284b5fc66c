"""Seed instances and mutations for the hostile-input tests.

Every seed is a small, valid DICOM Part 10 file (a few kB) in one of the encodings the node
accepts. Mutations change only the data set after the File Meta Information, so that a
raw-bytes sender (pynetdicom's chunked C-STORE, which reads the meta to build the command)
can still put the result on the wire exactly as it is; ``mutate_meta`` exists for the
in-process parsers, which read whole files.

The mutations are the classic ones for a TLV format: bit flips, truncation, overwritten and
inserted bytes, wrong or huge element lengths, wrong VRs, undefined-length sequences that
are never closed (nested deep enough to exhaust a recursive parser), and "bombs": images
that declare Rows x Columns x frames far beyond the bytes that follow.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import data_element_generator
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from support.dicomgen import make_cr, to_file_bytes

# VRs whose explicit-VR length field is 4 bytes (after 2 reserved bytes), PS3.5 7.1.2.
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
ALL_VRS = [
    b"AE",
    b"AS",
    b"AT",
    b"CS",
    b"DA",
    b"DS",
    b"DT",
    b"FD",
    b"FL",
    b"IS",
    b"LO",
    b"LT",
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"PN",
    b"SH",
    b"SL",
    b"SQ",
    b"SS",
    b"ST",
    b"SV",
    b"TM",
    b"UC",
    b"UI",
    b"UL",
    b"UN",
    b"UR",
    b"US",
    b"UT",
    b"UV",
]
UNDEFINED = 0xFFFFFFFF
ITEM = b"\xfe\xff\x00\xe0"
SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@dataclass(frozen=True)
class Element:
    """Where one top-level element of a seed's data set sits (offsets from the body start)."""

    start: int  # first byte of the tag
    value_at: int  # first byte of the value
    length: int  # as declared (UNDEFINED for undefined length)
    long_form: bool  # explicit VR with a 4-byte length field (or implicit VR)
    tag: int


@dataclass(frozen=True)
class Seed:
    name: str
    meta: bytes  # preamble + "DICM" + File Meta Information
    body: bytes  # the data set as it goes on the wire
    implicit: bool
    little: bool
    elements: tuple[Element, ...]
    sop_class: str
    syntax: str

    @property
    def file(self) -> bytes:
        return self.meta + self.body


def _split(raw: bytes) -> tuple[bytes, bytes]:
    (group_length,) = struct.unpack("<I", raw[140:144])
    at = 144 + group_length
    return raw[:at], raw[at:]


def _elements(body: bytes, implicit: bool, little: bool) -> tuple[Element, ...]:
    out = []
    fp = io.BytesIO(body)
    for raw in data_element_generator(fp, implicit, little, defer_size=None):
        length = raw.length
        if implicit:
            header, long_form = 8, True
        else:
            vr = (raw.VR or "UN").encode()
            long_form = vr in LONG_VRS
            header = 12 if long_form else 8
        # For undefined-length elements pydicom reports the value position after the
        # header as well; the header itself always ends at value_tell.
        out.append(
            Element(raw.value_tell - header, raw.value_tell, length, long_form, int(raw.tag))
        )
    return tuple(out)


def _seed(name: str, ds: Dataset) -> Seed:
    raw = to_file_bytes(ds)
    meta, body = _split(raw)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    # A deflated body is one zlib stream: mutate it as bytes, element offsets mean nothing.
    elements = () if syntax == DeflatedExplicitVRLittleEndian else _elements(body, implicit, little)
    return Seed(name, meta, body, implicit, little, elements, str(ds.SOPClassUID), syntax)


def _cr(size: int = 16, **kw: object) -> Dataset:
    return make_cr("1.2.3", size=size, seed=7, **kw)  # type: ignore[arg-type]  # UIDs: _fixed_uids


def _recode(ds: Dataset, syntax: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _jpeg_baseline() -> Dataset:
    from PIL import Image

    ds = _cr(16)
    arr = (np.arange(16 * 16).reshape(16, 16) % 251).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def _compressed(syntax: str, size: int = 16) -> Dataset:
    ds = _cr(size)
    ds.compress(syntax)
    return ds


def _sr() -> Dataset:
    """A small SR-shaped data set: nested content sequences, as TID 1500 documents have."""
    ds = _cr(16)
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PixelData",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.Modality = "SR"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "1500"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ValueType = "CONTAINER"

    def item(depth: int) -> Dataset:
        it = Dataset()
        it.RelationshipType, it.ValueType = "CONTAINS", "CONTAINER" if depth else "TEXT"
        name = Dataset()
        name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = (
            "126010",
            "DCM",
            "Imaging Measurements",
        )
        it.ConceptNameCodeSequence = Sequence([name])
        if depth:
            it.ContentSequence = Sequence([item(depth - 1)])
        else:
            it.TextValue = "finding"
        return it

    ds.ContentSequence = Sequence([item(3)])
    return ds


def _multiframe() -> Dataset:
    ds = _cr(8)
    frames = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    return ds


SEED_BUILDERS: dict[str, Callable[[], Dataset]] = {
    "explicit_le": lambda: _cr(16),
    "implicit_le": lambda: _recode(_cr(16), ImplicitVRLittleEndian),
    "explicit_be": lambda: _recode(_cr(16), ExplicitVRBigEndian),
    "deflate": lambda: _recode(_cr(16), DeflatedExplicitVRLittleEndian),
    "rle": lambda: _compressed(RLELossless),
    "jpeg_ls": lambda: _compressed(JPEGLSLossless),
    "jpeg2000": lambda: _compressed(JPEG2000Lossless, 64),  # OpenJPEG: >= 2^levels px
    "jpeg_baseline": _jpeg_baseline,
    "multiframe": _multiframe,
    "sr": _sr,
}


ROOT = "1.2.826.0.1.3680043.10.1"


def _fixed_uids(ds: Dataset, n: int) -> Dataset:
    """The same UIDs on every run: mutations land on the same bytes, so a derandomized
    hypothesis run is the same run everywhere."""
    ds.StudyInstanceUID = f"{ROOT}.{n}.1"
    ds.SeriesInstanceUID = f"{ROOT}.{n}.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.{n}.3"
    return ds


@cache
def seeds() -> tuple[Seed, ...]:
    return tuple(
        _seed(name, _fixed_uids(build(), n))
        for n, (name, build) in enumerate(SEED_BUILDERS.items(), 1)
    )


def seed(name: str) -> Seed:
    return next(s for s in seeds() if s.name == name)


# -- mutations (each returns new body bytes) ----------------------------------------------


def _pack_length(seed_: Seed, el: Element, value: int) -> tuple[int, bytes]:
    """Offset and bytes of a new length field for ``el``."""
    order = "<" if seed_.little else ">"
    if el.long_form:
        return el.value_at - 4, struct.pack(order + "I", value & 0xFFFFFFFF)
    return el.value_at - 2, struct.pack(order + "H", value & 0xFFFF)


def _element_header(seed_: Seed, tag: int, vr: bytes, length: int) -> bytes:
    order = "<" if seed_.little else ">"
    group_elem = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if seed_.implicit:
        return group_elem + struct.pack(order + "I", length & 0xFFFFFFFF)
    if vr in LONG_VRS:
        return group_elem + vr + b"\0\0" + struct.pack(order + "I", length & 0xFFFFFFFF)
    return group_elem + vr + struct.pack(order + "H", length & 0xFFFF)


def unclosed_sequences(seed_: Seed, depth: int, tag: int = 0x00081115) -> bytes:
    """``depth`` nested undefined-length sequences, each opened by an undefined-length item,
    none ever closed (what a recursive parser meets as "read until the delimiter")."""
    order = "<" if seed_.little else ">"
    item = struct.pack(order + "HHI", 0xFFFE, 0xE000, UNDEFINED)
    return (_element_header(seed_, tag, b"SQ", UNDEFINED) + item) * depth


@st.composite
def body_mutation(draw: st.DrawFn, seed_: Seed) -> tuple[str, Callable[[bytes], bytes]]:
    """One mutation of a data set body, with a short description for failure reports."""
    body_len = len(seed_.body)
    kinds = ["bitflip", "truncate", "overwrite", "insert"]
    if seed_.elements:
        kinds += ["length", "length", "vr", "unclosed", "tag"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bitflip":
        flips = draw(
            st.lists(
                st.tuples(st.integers(0, max(body_len - 1, 0)), st.integers(0, 7)),
                min_size=1,
                max_size=8,
            )
        )

        def bitflip(b: bytes) -> bytes:
            out = bytearray(b)
            for pos, bit in flips:
                if pos < len(out):
                    out[pos] ^= 1 << bit
            return bytes(out)

        return f"bitflip {flips}", bitflip
    if kind == "truncate":
        at = draw(st.integers(0, body_len))
        return f"truncate at {at}", lambda b: b[:at]
    if kind == "overwrite":
        at = draw(st.integers(0, max(body_len - 1, 0)))
        junk = draw(st.binary(min_size=1, max_size=32))
        return f"overwrite {junk!r} at {at}", lambda b: b[:at] + junk + b[at + len(junk) :]
    if kind == "insert":
        at = draw(st.integers(0, body_len))
        junk = draw(st.binary(min_size=1, max_size=64))
        return f"insert {junk!r} at {at}", lambda b: b[:at] + junk + b[at:]

    el = draw(st.sampled_from(seed_.elements))
    if kind == "length":
        value = draw(
            st.one_of(
                st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, UNDEFINED]),
                st.integers(
                    max(el.length - 3, 0) if el.length != UNDEFINED else 0,
                    (el.length + 3) if el.length != UNDEFINED else 8,
                ),
                st.integers(0, 0xFFFFFFFF),
            )
        )
        pos, field = _pack_length(seed_, el, value)
        return (
            f"length of ({el.tag:08X}) -> 0x{value:X}",
            lambda b: b[:pos] + field + b[pos + len(field) :],
        )
    if kind == "vr":
        if seed_.implicit:
            # No VR on the wire: give the tag a different meaning instead (a private or
            # a sequence tag) so the dictionary VR no longer fits the value.
            tag = draw(
                st.sampled_from([0x00081115, 0x00091010, 0x7FE00010, 0x00280010, 0xFFFEE000])
            )
            field = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
            return (
                f"tag ({el.tag:08X}) -> ({tag:08X})",
                lambda b: b[: el.start] + field + b[el.start + 4 :],
            )
        vr = draw(st.one_of(st.sampled_from(ALL_VRS), st.binary(min_size=2, max_size=2)))
        return (
            f"VR of ({el.tag:08X}) -> {vr!r}",
            lambda b: b[: el.start + 4] + vr + b[el.start + 6 :],
        )
    if kind == "unclosed":
        depth = draw(st.one_of(st.integers(1, 8), st.sampled_from([100, 1000, 3000])))
        blob = unclosed_sequences(seed_, depth)
        cut = draw(st.booleans())  # drop everything after (never closed) or keep it (swallowed)
        return (
            f"{depth} unclosed sequences before ({el.tag:08X}){' , rest dropped' if cut else ''}",
            lambda b: b[: el.start] + blob + (b"" if cut else b[el.start :]),
        )
    # "tag": an extra element with an arbitrary tag, VR and (possibly lying) length
    tag = draw(
        st.one_of(
            st.integers(0, 0xFFFFFFFF),
            st.sampled_from([0x7FE00010, 0x00280008, 0xFFFEE0DD, 0x00020010]),
        )
    )
    vr = draw(st.sampled_from(ALL_VRS))
    value = draw(st.binary(max_size=16))
    length = draw(st.one_of(st.just(len(value)), st.integers(0, 0xFFFFFFFF)))
    blob = _element_header(seed_, tag, vr, length) + value
    return (
        f"extra ({tag:08X}) {vr!r} length 0x{length:X}",
        lambda b: b[: el.start] + blob + b[el.start :],
    )


# -- bombs: declared geometry far beyond the data -----------------------------------------


def _set_us(seed_: Seed, body: bytes, tag: int, value: int) -> bytes:
    """Overwrite the value of a top-level US element (Rows, Columns, BitsAllocated...)."""
    el = next((e for e in seed_.elements if e.tag == tag), None)
    if el is None or el.length != 2:
        return body
    order = "<" if seed_.little else ">"
    return body[: el.value_at] + struct.pack(order + "H", value & 0xFFFF) + body[el.value_at + 2 :]


def _patch_codestream(frame: bytes, rows: int, cols: int) -> bytes:
    """Make a JPEG / JPEG-LS SOF or a JPEG 2000 SIZ declare rows x cols."""
    out = bytearray(frame)
    siz = out.find(b"\xff\x4f\xff\x51")
    if siz >= 0:
        o = siz + 8
        out[o : o + 16] = struct.pack(">IIII", cols, rows, 0, 0)
        return bytes(out)
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"):
        i = out.find(marker)
        if i >= 0:
            out[i + 5 : i + 9] = struct.pack(">HH", rows & 0xFFFF, cols & 0xFFFF)
            return bytes(out)
    return bytes(out)


def bomb(
    seed_name: str,
    rows: int,
    cols: int,
    frames: int | None = None,
    keep: float = 1.0,
    bits_allocated: int | None = None,
    samples: int | None = None,
) -> bytes:
    """A seed re-encoded to declare ``rows x cols (x frames)`` while carrying its own
    (tiny) pixel data; compressed frames get the same size in their codestream header, and
    ``keep`` < 1 truncates the frame as well. Returns a whole Part 10 file."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(seed(seed_name).file))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit):
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        frame = _patch_codestream(frame, rows, cols)
        frame = frame[: max(int(len(frame) * keep), 1)]
        ds.PixelData = encapsulate([frame])
    elif keep < 1.0:
        ds.PixelData = ds.PixelData[: max(int(len(ds.PixelData) * keep) & ~1, 2)]
    ds.Rows, ds.Columns = rows & 0xFFFF, cols & 0xFFFF
    if frames is not None:
        ds.NumberOfFrames = frames
    if bits_allocated is not None:
        ds.BitsAllocated = bits_allocated
        ds.BitsStored = min(int(ds.BitsStored), bits_allocated)
        ds.HighBit = int(ds.BitsStored) - 1
    if samples is not None:
        ds.SamplesPerPixel = samples
    return to_file_bytes(ds)


@st.composite
def bombs(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(
        st.sampled_from(
            [
                "explicit_le",
                "implicit_le",
                "multiframe",
                "rle",
                "jpeg_ls",
                "jpeg2000",
                "jpeg_baseline",
            ]
        )
    )
    rows = draw(st.one_of(st.sampled_from([1024, 4096, 20000, 65535]), st.integers(1, 65535)))
    cols = draw(st.one_of(st.sampled_from([1024, 4096, 20000, 65535]), st.integers(1, 65535)))
    frames = draw(
        st.one_of(st.none(), st.sampled_from([1, 2, 1000, 2**31 - 1]), st.integers(1, 100000))
    )
    keep = draw(st.sampled_from([1.0, 1.0, 0.5, 0.1]))
    bits = draw(st.one_of(st.none(), st.sampled_from([8, 16, 32, 64])))
    samples = draw(st.one_of(st.none(), st.sampled_from([1, 3])))
    desc = f"bomb {name} {rows}x{cols} frames={frames} keep={keep} bits={bits} samples={samples}"
    return desc, bomb(name, rows, cols, frames, keep, bits, samples)


@st.composite
def mutated_files(draw: st.DrawFn, body_only: bool = False) -> tuple[str, Seed, bytes]:
    """(description, seed, Part 10 file bytes): a seed with 1-3 mutations of its data set,
    or (in-process only) of its File Meta Information, or a bomb."""
    choice = draw(st.sampled_from(["body"] * 6 + ["bomb"] + ([] if body_only else ["meta"])))
    if choice == "bomb":
        desc, data = draw(bombs())
        name = desc.split()[1]
        return desc, seed(name), data
    seed_ = draw(st.sampled_from(seeds()))
    if choice == "meta":
        at = draw(st.integers(0, len(seed_.meta) - 1))
        junk = draw(st.binary(min_size=1, max_size=8))
        meta = seed_.meta[:at] + junk + seed_.meta[at + len(junk) :]
        return f"{seed_.name}: meta overwrite {junk!r} at {at}", seed_, meta + seed_.body
    body = seed_.body
    descs = []
    for desc, apply in draw(st.lists(body_mutation(seed_), min_size=1, max_size=3)):
        body = apply(body)
        descs.append(desc)
    return f"{seed_.name}: " + "; ".join(descs), seed_, seed_.meta + body
