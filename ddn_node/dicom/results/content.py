"""What every outgoing object takes from its source images, and the text we add to them.

The result objects go back into the source study (PS3.3 C.7.2.1 General Study, C.7.1.1
Patient), so the PACS files them next to the images. This module:

- copies the patient and study attributes from a source header (:func:`copy_patient_and_study`),
  keeping the source's Specific Character Set (0008,0005) so that names in Cyrillic,
  Japanese (ISO 2022) or UTF-8 are written back exactly as they came;
- builds the small de-identified header (:func:`reference_header`) that is handed to
  highdicom, which would otherwise read (and, for names without a caret, *log*) the
  patient's name; the real attributes are copied afterwards by this module;
- makes UIDs, deterministic when the caller gives a seed, so that rebuilding the results
  of one analysis (after a crash between building and recording them) yields the same
  SOP Instance UIDs and the delivery rows stay idempotent;
- fits our own text to the VR lengths and to the character set of the object.

Copy policy for values that break their VR in the source (real PACS data does this, see
``../shared/data/dicom/chest_xray_real``): identifiers that the PACS and RIS use to match
objects (patient name and ID, issuer, accession number, study ID, referring physician,
study description) are copied verbatim even when too long, because a "corrected" value
would split the study; dates, times, sex and age, which identify nothing and which a
validator rejects, are emptied (Type 2) or dropped (Type 3) when invalid.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from types import MappingProxyType

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ddn_node.model.types import Code

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

# Patient (C.7.1.1), General Study (C.7.2.1) and Patient Study (C.7.2.2) attributes that
# are copied from the source. Study Instance UID is set by the builders themselves.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "QualityControlSubject",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # General Study
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
    "ProcedureCodeSequence",
    # Patient Study
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)

# Type 2 in the Patient and General Study modules: present, possibly empty.
TYPE2_PATIENT_STUDY: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# Attributes whose VR has a fixed format (PS3.5 6.2) and that identify nothing: checked,
# and emptied (Type 2) or dropped (Type 3) when invalid. They are read from the raw bytes,
# never through pydicom's own validation, whose warnings quote the value (a birth date is
# patient data, and those warnings go to the log).
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_CS = re.compile(r"^[A-Z0-9 _]{1,16}$")


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


_CHECKED: Mapping[str, Callable[[str], object]] = MappingProxyType(
    {
        "PatientBirthDate": _DA.match,
        "StudyDate": _DA.match,
        "PatientBirthTime": _TM.match,
        "StudyTime": _TM.match,
        "PatientAge": re.compile(r"^\d{3}[DWMY]$").match,
        "PatientSex": re.compile(r"^[MFO]$").match,
        # 0 is what many modalities write for "not measured"; it is not a size.
        "PatientSize": _positive,
        "PatientWeight": _positive,
        "TypeOfPatientID": _CS.match,
        "QualityControlSubject": re.compile(r"^(YES|NO)$").match,
        "ResponsiblePersonRole": _CS.match,
        "PatientIdentityRemoved": re.compile(r"^(YES|NO)$").match,
    }
)


# Attributes of the source image that references and geometry need (never patient data).
_REFERENCE_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "FrameOfReferenceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "PatientOrientation",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
)

# Transfer syntaxes whose compression is (or may be) lossy, with the method term of
# Lossy Image Compression Method (0028,2114), PS3.3 C.7.6.1.1.5.1.
_LOSSY_TRANSFER_SYNTAXES: Mapping[str, str] = MappingProxyType(
    {
        "1.2.840.10008.1.2.4.50": "ISO_10918_1",
        "1.2.840.10008.1.2.4.51": "ISO_10918_1",
        "1.2.840.10008.1.2.4.81": "ISO_14495_1",
        "1.2.840.10008.1.2.4.91": "ISO_15444_1",
        "1.2.840.10008.1.2.4.203": "ISO_15444_15",
    }
)


def check_sources(sources: Sequence[Dataset]) -> None:
    """Refuse sources the results could not reference correctly.

    Raises:
        ValueError: no sources, a missing UID, or sources from more than one study
            (every result object belongs to exactly one study, PS3.3 C.7.2.1).
    """
    if not sources:
        raise ValueError("at least one source image is needed")
    for ds in sources:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"a source image has no {keyword}")
    studies = {ds.StudyInstanceUID for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources belong to {len(studies)} studies; results go into one study")


def reference_header(source: Dataset) -> Dataset:
    """A header with the source's UIDs and geometry, and no patient data.

    highdicom reads patient and study attributes from the evidence it is given; giving it
    this header instead of the source keeps names and IDs out of its log messages, and
    tolerates sources whose Type 2 attributes are missing. The builders copy the real
    attributes, and the Specific Character Set, with :func:`copy_patient_and_study`
    afterwards (highdicom 0.28 refuses the empty first value of an ISO 2022 character
    set such as ``\\ISO 2022 IR 87``, which is valid, PS3.3 C.12.1.1.2).
    """
    header = Dataset()
    for keyword in _REFERENCE_KEYWORDS:
        if keyword in source and not source[keyword].is_empty:
            header.add(copy.deepcopy(source[keyword]))
    if "LossyImageCompression" not in header:
        # Once lossy, always lossy (C.7.6.1.1.5): a source received in a lossy transfer
        # syntax without the attribute still passes its history on to what we derive.
        syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
        method = _LOSSY_TRANSFER_SYNTAXES.get(syntax)
        if method is not None:
            header.LossyImageCompression = "01"
            header.LossyImageCompressionMethod = method
    for keyword in TYPE2_PATIENT_STUDY:
        setattr(header, keyword, None)
    return header


def copy_patient_and_study(target: Dataset, source: Dataset) -> None:
    """Copy patient and study attributes from ``source`` into ``target``.

    Sets Specific Character Set to the source's (or removes it when the source uses the
    default repertoire), so the copied names are re-encoded in the character set they were
    decoded from. See the module docstring for the treatment of invalid values.
    """
    if source.get("SpecificCharacterSet"):
        target.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in target:
            delattr(target, keyword)
        if keyword not in source:
            continue
        check = _CHECKED.get(keyword)
        if check is None:
            # Identifiers and names: verbatim (pydicom's length warnings name no value).
            target[source[keyword].tag] = copy.deepcopy(source[keyword])
            continue
        text = _raw_text(source, keyword)
        if text and check(text):
            setattr(target, keyword, text)
        elif keyword in TYPE2_PATIENT_STUDY:
            setattr(target, keyword, None)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in target:
            setattr(target, keyword, None)
    target.StudyInstanceUID = source.StudyInstanceUID


def _raw_text(source: Dataset, keyword: str) -> str:
    """The value of a fixed-format attribute as text, without pydicom converting it."""
    element = source.get_item(keyword)
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        # These VRs use the default repertoire only (PS3.5 6.2): ASCII.
        text = value.decode("ascii", errors="replace")
    elif isinstance(value, (list, tuple)):
        return ""  # multiple values where one belongs: invalid
    else:
        text = str(value)
    return text.strip(" \x00")


def make_uid(seed: str | None, *parts: object) -> str:
    """A new UID; the same UID for the same ``seed`` and ``parts`` when a seed is given.

    pydicom derives deterministic UIDs from a SHA-512 of the entropy sources under its
    registered root (PS3.5 9 and B.2); without a seed the UID is random.
    """
    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[seed, *(str(p) for p in parts)]))


def charsets_of(ds: Dataset) -> list[str]:
    """The Specific Character Set terms of ``ds`` as a list ([] for the default)."""
    value = ds.get("SpecificCharacterSet")
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def fit_text(text: str, max_len: int | None = None, charsets: Iterable[str] = ()) -> str:
    """``text`` made writable in an object: encodable and at most ``max_len`` characters.

    Text we author (series descriptions, label names from the model manifest, comments)
    must be representable in the *source's* character set, which we keep for the patient
    name's sake. ASCII always is; anything else is tried against the character set and,
    failing that, transliterated to ASCII (accents dropped, other characters as ``?``).
    """
    if not text.isascii() and not _encodable(text, list(charsets)):
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(
            c if c.isascii() else "?" for c in decomposed if not unicodedata.combining(c)
        )
    if max_len is not None and len(text) > max_len:
        text = text[: max_len - 1].rstrip() + "~"
    return text


def _encodable(text: str, charsets: list[str]) -> bool:
    # G0 is the default repertoire, ASCII, whatever else is declared (PS3.3 C.12.1.1.2);
    # pydicom maps ISO_IR 6 to Latin-1 for lenient decoding, which is too generous here.
    encodings = ["ascii"]
    for term in charsets:
        if term and term not in ("ISO_IR 6", "ISO 2022 IR 6"):
            encodings.extend(convert_encodings([term]))
    for encoding in encodings:
        try:
            text.encode(encoding)
        except (UnicodeEncodeError, LookupError):
            continue
        return True
    return False


def describe(prefix: str, label: str, kind: str, is_demo: bool, charsets: list[str]) -> str:
    """A Series Description (LO, 64 characters) that never loses its warning.

    ``"<prefix> <label> (<kind>)"`` plus ``" - NOT FOR DIAGNOSTIC USE"`` for demo models;
    when too long, the label is shortened, not the warning.
    """
    suffix = f" ({kind})" + (f" - {NOT_FOR_DIAGNOSTIC_USE}" if is_demo else "")
    room = 64 - len(prefix) - 1 - len(suffix)
    return f"{prefix} {fit_text(label, max(room, 1), charsets)}{suffix}"


@functools.lru_cache(maxsize=1)
def _anatomic_regions() -> Mapping[str, tuple[Code, bool]]:
    """PS3.16 Annex L: Body Part Examined -> (anatomic region code, paired structure).

    highdicom ships this table (generated from the standard) as a data file; reading it
    saves transcribing 300 rows. If a highdicom release moves it, anatomy is simply not
    described (Laterality is then written empty, which is valid).
    """
    try:
        path = resources.files("highdicom") / "_standard" / "anatomic_regions.json"
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ModuleNotFoundError):
        return MappingProxyType({})
    table = {
        str(key): (Code(str(v[1]), str(v[0]), str(v[2])), bool(v[3]))
        for key, v in raw.items()
        if isinstance(v, list) and len(v) == 4
    }
    return MappingProxyType(table)


def anatomic_region(source: Dataset) -> tuple[Code, bool] | None:
    """The anatomic region code of the source and whether it is paired, when known."""
    body_part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    if not body_part:
        return None
    return _anatomic_regions().get(body_part)


def add_series_anatomy(target: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality of the new series (PS3.3 C.7.3.1).

    Laterality is Type 2C: required for paired structures unless given per image, and not
    to be sent for unpaired ones (a chest). When the body part is unknown it is sent empty
    ("unknown"), which is always allowed.
    """
    body_part = str(source.get("BodyPartExamined", "") or "").strip()
    if body_part and len(body_part) <= 16:
        target.BodyPartExamined = body_part
    region = anatomic_region(source)
    if region is not None and not region[1]:
        if "Laterality" in target:
            del target.Laterality
        return
    laterality = str(source.get("Laterality", "") or "").strip()
    target.Laterality = laterality if laterality in ("R", "L") else None


def source_laterality(source: Dataset) -> str | None:
    """Image Laterality (or series Laterality) of the source as R, L, B or U, if given."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").strip()
        if value in ("R", "L", "B", "U"):
            return value
    return None
