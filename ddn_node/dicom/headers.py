"""Reading the header attributes the node indexes, without touching pixel data.

Only the tags listed here are parsed (pydicom ``specific_tags``), and parsing stops before
the pixel data, so a 500 MB instance costs the same as a 5 KB one.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from ddn_node.vocabulary import ORDER_PRIORITIES, URGENCY_RANK

INDEXED_TAGS = [
    Tag(k)
    for k in (
        "SpecificCharacterSet",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "ReferringPhysicianName",
        "Modality",
        "BodyPartExamined",
        "SeriesNumber",
        "SeriesDescription",
        "InstanceNumber",
        "ViewPosition",
        "ImageLaterality",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        # What the instance is: an acquisition, or a result of this node or of another
        # algorithm (dicom/origin.py).
        "ImageType",
        "ConversionType",
        # What routing selects on besides the above (pipeline/routing.py).
        "StationName",
        "InstitutionName",
        "NumberOfFrames",
        "Manufacturer",
        "ManufacturerModelName",
        "ContributingEquipmentSequence",
        # How urgent the order is, and where the study comes from: the analysis queue's
        # order (pipeline/urgency.py; StationName above counts too). Modalities copy the
        # worklist's priority either at the top level or into the Request Attributes
        # Sequence.
        "InstitutionalDepartmentName",
        "RequestAttributesSequence",
        "RequestedProcedurePriority",
        "ScheduledProcedureStepPriority",
    )
]


# What pydicom raises on malformed input. BytesLengthException (a value whose length does
# not fit its VR) derives from Exception only, and RecursionError comes from sequences
# nested deeper than the interpreter's stack (undefined-length items never closed): both
# are the sender's fault, not ours, so both mean "cannot be parsed" (0xC000).
# What pydicom raises on malformed input (callers parsing untrusted files catch these).
PARSE_ERRORS = (
    InvalidDicomError,
    EOFError,
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    OSError,
    BytesLengthException,
    RecursionError,
    NotImplementedError,  # an unknown VR
    zlib.error,
)
# Errors of converting one raw value (lazily, on first access; a value read as SQ is
# parsed then, hence OSError and RecursionError too): index what we can.
_VALUE_ERRORS = (
    ValueError,
    TypeError,
    LookupError,
    BytesLengthException,
    struct.error,
    NotImplementedError,
    OSError,
    RecursionError,
)


class HeaderError(ValueError):
    """The dataset cannot be understood well enough to be stored (C-STORE 0xC000 range)."""

    def __init__(self, message: str, status: int = 0xC000):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Header:
    """The indexed attributes of one instance, decoded to text."""

    values: dict[str, Any]

    def text(self, keyword: str) -> str:
        return str(self.values.get(keyword, "") or "")

    def integer(self, keyword: str) -> int | None:
        value = self.values.get(keyword)
        try:
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None


def _as_text(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    if isinstance(value, (int, float)):
        return value
    return str(value).strip().rstrip("\x00")


def _contributors(items: Any) -> dict[str, str]:
    """The Device UIDs and Purpose of Reference codes of a Contributing Equipment Sequence,
    backslash-joined (``ContributingDeviceUIDs``, ``ContributingPurposes``)."""
    uids, purposes = [], []
    for item in items or []:
        uid = item.get("DeviceUID")
        if uid:
            uids.append(str(uid))
        for code in item.get("PurposeOfReferenceCodeSequence", []) or []:
            purposes.append(f"{code.get('CodeValue', '')}^{code.get('CodingSchemeDesignator', '')}")
    return {"ContributingDeviceUIDs": "\\".join(uids), "ContributingPurposes": "\\".join(purposes)}


# Items of the Request Attributes Sequence looked at: one per requested procedure; a
# sender's thousand-item sequence is not a thousand orders.
_MAX_REQUESTS = 16


def _requested_priorities(items: Any) -> str:
    """The Requested Procedure Priority of each Request Attributes item, backslash-joined
    (``RequestedPriorities``)."""
    said = []
    for item in list(items or [])[:_MAX_REQUESTS]:
        value = item.get("RequestedProcedurePriority")
        if value:
            said.append(str(value).strip())
    return "\\".join(said)


def order_priority(header: Header) -> str:
    """The most urgent priority the instance's order gives, as written (``STAT``,
    ``MEDIUM``...); "" when it gives none the node knows (``ORDER_PRIORITIES``)."""
    said = [
        header.text("RequestedProcedurePriority"),
        *header.text("RequestedPriorities").split("\\"),
        header.text("ScheduledProcedureStepPriority"),
    ]
    known = [v.strip().upper() for v in said if v.strip().upper() in ORDER_PRIORITIES]
    return min(known, key=lambda v: URGENCY_RANK[ORDER_PRIORITIES[v]], default="")


# (tag, keyword) of each indexed attribute, looked up once: per instance the lookups were
# ~1% of the SCP's Python time.
_INDEXED_KEYWORDS = [(tag, pydicom.datadict.keyword_for_tag(tag)) for tag in INDEXED_TAGS]


def header_from_dataset(ds: Dataset) -> Header:
    values: dict[str, Any] = {}
    for tag, keyword in _INDEXED_KEYWORDS:
        try:
            raw = ds.get_item(tag, keep_deferred=True)
            if raw is None:
                continue
            if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
                # Longer than defer_size: no indexed attribute is (UI, LO, PN... are at
                # most a few hundred bytes), and reading it would load whatever length
                # the sender declared.
                values[keyword] = ""
                values.setdefault("_warnings", []).append(
                    f"{keyword}: {raw.length} bytes, not indexed"
                )
                continue
            # pydicom converts a raw value on first access (ds.get), so a value whose
            # length or bytes do not fit its VR raises here, not in dcmread.
            elem = ds.get(tag)
            if elem is None:
                continue
            if keyword == "ContributingEquipmentSequence":
                values.update(_contributors(elem.value))
                continue
            if keyword == "RequestAttributesSequence":
                values["RequestedPriorities"] = _requested_priorities(elem.value)
                continue
            values[keyword] = _as_text(elem.value)
        except _VALUE_ERRORS as exc:
            # A value in a wrong VR or an unknown character set: index what we can.
            values[keyword] = ""
            values.setdefault("_warnings", []).append(f"{keyword}: {exc}")
    return Header(values)


# The most of a deflated data set that is inflated to find the indexed attributes. They
# sit in groups 0008-0028, before anything large (sequences of group 0040, pixel data),
# so a few MiB is plenty; the cap keeps a "zip bomb" (deflate reaches ~1000:1, so 1 MB on
# the wire could be 1 GB in memory) from costing the DIMSE thread more than this.
DEFLATED_HEADER_LIMIT = 16 << 20
_LAST_INDEXED = max(INDEXED_TAGS)


class ClampedReader(io.BufferedReader):
    """A file whose ``read(n)`` never asks for more than what is left of it.

    pydicom reads a value with ``fp.read(length)``, and CPython allocates ``length`` bytes
    before reading. Specific Character Set is read even past ``defer_size``, so a 1 kB
    file declaring it 4 GiB long asked for a 4 GiB buffer in the DIMSE thread (a
    MemoryError, not a HeaderError, where address space is limited).
    """

    def __init__(self, path: Path | str, mode: str = "rb"):
        super().__init__(io.FileIO(str(path), mode))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = max(min(size, self._size - self.tell()), 0)
            if size == 0:
                return b""
        return super().read(size)


def _is_deflated(path: Path) -> bool:
    # As pydicom.filereader.read_file_meta_info, but through the clamped reader.
    try:
        with ClampedReader(path) as handle:
            pydicom.filereader.read_preamble(handle, False)
            meta = pydicom.filereader._read_file_meta_info(handle)
    except PARSE_ERRORS:
        return False  # no (readable) file meta: dcmread below decides what it is
    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def _inflate_prefix(path: Path, offset: int, limit: int) -> bytes:
    """At most ``limit`` bytes of the deflated data set that starts at ``offset``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    with open(path, "rb") as handle:
        handle.seek(offset)
        while len(out) < limit and not inflater.eof:
            chunk = inflater.unconsumed_tail or handle.read(1 << 16)
            if not chunk:
                break
            out += inflater.decompress(chunk, limit - len(out))
    return bytes(out)


def _read_deflated(path: Path, offset: int | None = None) -> Dataset:
    """pydicom inflates a whole deflated data set in memory before parsing it; this
    inflates only a bounded prefix and parses the indexed attributes out of it."""
    start = dataset_offset(path) if offset is None else offset
    body = _inflate_prefix(path, start, DEFLATED_HEADER_LIMIT)
    return pydicom.filereader.read_dataset(
        io.BytesIO(body),
        is_implicit_VR=False,
        is_little_endian=True,
        stop_when=lambda tag, _vr, _length: tag > _LAST_INDEXED,
        # no defer_size: a deferred value is re-read from a file. cast: pydicom annotates
        # this parameter as an invariant list[BaseTag | int], so a list[BaseTag] is refused.
        specific_tags=cast("list[BaseTag | int]", INDEXED_TAGS),
    )


def read_header(path: Path) -> Header:
    """Parse the indexed attributes of a DICOM Part 10 file."""
    try:
        if _is_deflated(path):
            ds = _read_deflated(path)
        else:
            with ClampedReader(path) as handle:
                ds = pydicom.dcmread(
                    handle,
                    stop_before_pixels=True,
                    specific_tags=INDEXED_TAGS,
                    force=True,
                    defer_size=4096,
                )
    except PARSE_ERRORS as exc:
        raise HeaderError(f"unparseable dataset: {type(exc).__name__}: {exc}") from exc
    return header_from_dataset(ds)


def read_received_header(
    path: Path, offset: int, transfer_syntax: str, head: bytes = b"", dataset_bytes: int = 0
) -> Header:
    """:func:`read_header` of a file the SCP wrote itself: the data set as it came over the
    wire from ``offset`` on, in the negotiated ``transfer_syntax``. The File Meta
    Information pynetdicom wrote says nothing the SCP does not know already, so it is not
    parsed again (twice, by read_header: for deflate, then by dcmread), which was ~40% of
    the header's cost.

    ``head``: the data set's first bytes as they arrived (of its ``dataset_bytes``),
    parsed instead of the file when the attributes end within them (pydicom asks a file
    for its position once per element, a system call each time); otherwise, or where they
    raise, the file decides."""
    try:
        ds: Dataset | None = None
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            ds = _read_deflated(path, offset)
        else:
            implicit = transfer_syntax == ImplicitVRLittleEndian
            little = transfer_syntax != ExplicitVRBigEndian
            if head:
                ds = _read_head(head, implicit, little, whole=len(head) >= dataset_bytes)
            if ds is None:
                with ClampedReader(path) as handle:
                    handle.seek(offset)
                    ds = _read_plain(handle, implicit, little)
    except PARSE_ERRORS as exc:
        raise HeaderError(f"unparseable dataset: {type(exc).__name__}: {exc}") from exc
    return header_from_dataset(ds)


def _read_plain(source: Any, implicit: bool, little: bool) -> Dataset:
    return pydicom.filereader.read_dataset(
        source,
        is_implicit_VR=implicit,
        is_little_endian=little,
        # As dcmread(stop_before_pixels=True): what lies before the pixels must parse,
        # as read_header requires.
        stop_when=lambda tag, _vr, _length: tag in _PIXEL_TAGS,
        defer_size=4096,
        specific_tags=cast("list[BaseTag | int]", INDEXED_TAGS),
    )


def _read_head(head: bytes, implicit: bool, little: bool, *, whole: bool) -> Dataset | None:
    """The data set parsed from its first bytes (all of it: ``whole``); None when they do
    not hold all that the file's parse would read (it stopped at their end, or past it
    skipping a long value, or they end inside an element) and the file has more."""
    source = io.BytesIO(head)
    try:
        ds = _read_plain(source, implicit, little)
    except PARSE_ERRORS:
        if whole:
            raise
        return None
    if source.tell() >= len(head) and not whole:
        return None
    return ds


# The pixel data tags dcmread's stop_before_pixels stops at.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})


def dataset_offset(path: Path) -> int:
    """Byte offset of the data set after the preamble and File Meta Information (PS3.10 7.1).

    The bytes from there on are exactly what the sender put on the wire, so their hash
    identifies an instance whatever file meta each side wrote.
    """
    with open(path, "rb") as handle:
        head = handle.read(144)
    if len(head) < 144 or head[128:132] != b"DICM":
        return 0
    # (0002,0000) UL, explicit VR little endian: tag(4) VR(2) length(2) value(4)
    if head[132:136] != b"\x02\x00\x00\x00":
        raise HeaderError("file meta information without a group length")
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + group_length
