"""Coded concepts that the result objects use, with where each one comes from.

Codes are kept as frozen :class:`ddn_node.model.types.Code` values (immutable, hashable)
and turned into fresh highdicom ``CodedConcept`` datasets with :func:`coded` at the point
of use, so no two outgoing objects share a mutable code item.

Standard codes (checked against the DICOM content mapping resource PS3.16, as shipped in
pydicom's generated code dictionaries, or against the cited source):

=============================  =========  ==========================================  =====
concept                        scheme     meaning                                     source
=============================  =========  ==========================================  =====
document title                 DCM 126000 Imaging Measurement Report                  CID 7021
procedure reported (name)      DCM 121058 Procedure reported                          TID 1500
procedure reported (value)     SCT        363679005 Imaging procedure                 CID 100
image library / group          DCM 111028 Image Library / 126200 Image Library Group  TID 1600
image library entry            SCT        260753009 Source                            TID 1601
imaging measurements           DCM 126010 Imaging Measurements                        TID 1500
present / absent               SCT        52101004 Present / 272519000 Absent         CID 241
finding probability            DCM 122157 Probability                                 PS3.16 Annex D
unit of probabilities/scores   UCUM %     Percent                                     CID 7181
unit of Grad-CAM values        UCUM 1     no units                                    CID 7181
triage priority (name)         SCT        260870009 Priority                          SNOMED CT
algorithm name / version       DCM        111001 / 111003                             TID 4019
heat-map quantity              DCM 130403 Gradient-weighted class activation          CID 7180
purpose of equipment ref.      DCM 109102 Processing Equipment                        CID 7005
comment                        DCM 121106 Comment                                     TID 1500
qualitative evaluations        UMLS       C0034375 Qualitative Evaluations            TID 1500
=============================  =========  ==========================================  =====

Notes on the choices:

- IHE AI Results (AIR) Rev 1.1, 6.5.3.1, asks for the algorithm in the Contributing
  Equipment Sequence with Purpose of Reference ``(Newcode1, 99IHE, "Processing
  Algorithm")``, a provisional code awaiting a DICOM one. We use the standard
  ``(109102, DCM, "Processing Equipment")`` from CID 7005, which validators and highdicom
  accept; the other AIR items (Manufacturer, Manufacturer's Model Name, Software Versions,
  Device UID) are as AIR asks (see :mod:`.equipment`).
- Probabilities and scores are given in percent, UCUM ``%`` (CID 7181): viewers print a
  NUM as its value and unit, and "91.0 %" reads where "0.91 1" (the dimensionless ``1``)
  did not. Grad-CAM values in the Parametric Maps stay dimensionless (``1``).
- "Procedure reported" takes its value from CID 100, which has no chest X-ray code in any
  release (PixelMed flags 399208008 "Plain chest X-ray" as outside it): "Imaging
  procedure" is the entry that fits any projection radiograph.

Private codes, coding scheme designator ``99DDN`` (PS3.16 8.2: a "99" prefix marks a
private scheme; the SR carries its Coding Scheme Identification Sequence item, PS3.3
C.12.1.1.4 / Table C.12-1, made by :func:`ddn_coding_scheme`). They exist only where no
standard code says the same:

===============  =========================================  ==============================
code value       meaning                                    used for
===============  =========================================  ==============================
ABN-SCORE        Abnormality score                          study-level score (NUM, 0..1)
PRIO-STAT        STAT priority                              triage class (CODE value)
PRIO-HIGH        High priority                              triage class (CODE value)
PRIO-ROUTINE     Routine priority                           triage class (CODE value)
===============  =========================================  ==============================

The abnormality score is defined by the model manifest (for example the highest
calibrated finding probability); its meaning is model-specific, hence a private concept
rather than a generic "score".
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

from ddn_node.model.types import Code
from ddn_node.vocabulary import Priority

DDN_SCHEME = "99DDN"

# --- Standard codes ----------------------------------------------------------------------
TITLE_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
PROCEDURE_REPORTED = Code("121058", "DCM", "Procedure reported")
PROCEDURE_IMAGING = Code("363679005", "SCT", "Imaging procedure")
IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
IMAGE_LIBRARY_GROUP = Code("126200", "DCM", "Image Library Group")
SOURCE = Code("260753009", "SCT", "Source")
IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
UNIT_ONE = Code("1", "UCUM", "no units")
UNIT_PERCENT = Code("%", "UCUM", "Percent")
PRIORITY = Code("260870009", "SCT", "Priority")
GRADCAM = Code("130403", "DCM", "Gradient-weighted class activation")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# --- Private codes (99DDN) -------------------------------------------------------------
ABNORMALITY_SCORE = Code("ABN-SCORE", DDN_SCHEME, "Abnormality score")
PRIORITY_CODES: dict[Priority, Code] = {
    Priority.STAT: Code("PRIO-STAT", DDN_SCHEME, "STAT priority"),
    Priority.HIGH: Code("PRIO-HIGH", DDN_SCHEME, "High priority"),
    Priority.ROUTINE: Code("PRIO-ROUTINE", DDN_SCHEME, "Routine priority"),
}


def coded(code: Code) -> CodedConcept:
    """A fresh highdicom ``CodedConcept`` (PS3.3 8.8 Code Sequence Macro) for ``code``.

    Values longer than 16 characters (SNOMED CT identifiers reach 18 digits) go into Long
    Code Value (0008,0119), which highdicom does by itself; a meaning longer than LO's 64
    characters is shortened (it is display text; the value identifies the concept).
    """
    meaning = code.meaning if len(code.meaning) <= 64 else code.meaning[:63] + "~"
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=meaning)


def code_value(item: object) -> str | None:
    """Code Value, Long Code Value or URN Code Value of a code item (PS3.3 8.8)."""
    for keyword in ("CodeValue", "LongCodeValue", "URNCodeValue"):
        value = getattr(item, keyword, None)
        if value:
            return str(value)
    return None


def same_code(item: object, code: Code) -> bool:
    """Whether a code item (a dataset with the 8.8 attributes) denotes ``code``.

    Compares value and designator only: the meaning is display text and may differ
    between releases or languages.
    """
    scheme = getattr(item, "CodingSchemeDesignator", None)
    return code_value(item) == code.value and scheme == code.scheme


def ddn_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item for ``99DDN`` (PS3.3 C.12.1.1.4)."""
    return CodingSchemeIdentificationItem(
        designator=DDN_SCHEME,
        name="ddn-node private codes",
        version="1",
        responsible_organization="ddn-node project",
    )
