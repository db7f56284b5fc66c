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
procedure reported (CXR)       SCT        399208008 Plain chest X-ray                 SNOMED CT
procedure reported (other)     SCT        363679005 Imaging procedure                 CID 100
present / absent               SCT        52101004 Present / 272519000 Absent         CID 241
finding probability            DCM 122157 Probability                                 PS3.16 Annex D
unit of probabilities/scores   UCUM 1     no units                                    CID 7181
study-level derivation         SCT        56851009 Maximum                            CID 7464
triage priority (name)         SCT        260870009 Priority                          SNOMED CT
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
- Probabilities and scores are dimensionless: UCUM ``1`` ("no units", CID 7181). UCUM
  also allows the annotation ``{probability}``, which means the same unit 1 but is not in
  any DICOM context group, so viewers that look units up would not recognise it.

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
PROCEDURE_PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROCEDURE_IMAGING = Code("363679005", "SCT", "Imaging procedure")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
UNIT_ONE = Code("1", "UCUM", "no units")
MAXIMUM = Code("56851009", "SCT", "Maximum")
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
