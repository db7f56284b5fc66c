"""Coded concepts for the labels of the bundled heads, each with the source it was checked against.

Preference: a concept the DICOM standard itself uses (PS3.16 context groups, read from the
concept dictionary that pydicom 3.0.2 generates from PS3.16: ``pydicom.sr._concepts_dict``),
then SNOMED CT value sets published in HL7 FHIR implementation guides, then independent
code mappings. A label for which no code could be checked gets a private ``99DDN`` code and
says so, rather than a guessed SNOMED CT number in a patient's report.
"""

from __future__ import annotations

import re

from ddn_node.model.types import Code

SCT, DCM, PRIVATE = "SCT", "DCM", "99DDN"

_PS3_16 = "DICOM PS3.16 (pydicom 3.0.2 concept dictionary)"

# label -> (code, where it was checked)
_TABLE: dict[str, tuple[Code, str]] = {
    # NIH ChestX-ray14 findings
    "Atelectasis": (
        Code("46621007", SCT, "Atelectasis"),
        "MedDRA 10003598 'Atelectasis' -> SCT 46621007 'equivalent' FHIR ConceptMap; same code in independent CXR label maps",
    ),
    "Cardiomegaly": (
        Code("287272002", SCT, "Cardiomegaly"),
        f"{_PS3_16}: CID 12248/12249 'Cardiomegaly'",
    ),
    "Effusion": (
        Code("60046008", SCT, "Pleural effusion"),
        f"{_PS3_16}: CID 645/8134 'Pleural effusion'",
    ),
    "Infiltration": (
        Code("112121", DCM, "Infiltrate"),
        f"{_PS3_16}: CID 6102 Chest Finding or Feature, DCM 112121 'Infiltrate'",
    ),
    "Mass": (Code("4147007", SCT, "Mass"), f"{_PS3_16}: CID 6102 Chest Finding or Feature 'Mass'"),
    "Nodule": (
        Code("27925004", SCT, "Nodule"),
        f"{_PS3_16}: CID 6102 Chest Finding or Feature 'Nodule'",
    ),
    "Pneumonia": (
        Code("233604007", SCT, "Pneumonia"),
        "SNOMED CT release relationship extract: concept 233604007 'Pneumonia (disorder)'",
    ),
    "Pneumothorax": (
        Code("36118008", SCT, "Pneumothorax"),
        f"{_PS3_16}: CID 6102/6105 'Pneumothorax'",
    ),
    "Consolidation": (
        Code("95436008", SCT, "Lung consolidation"),
        "SNOMED CT release relationship extract: 95436008 'Lung consolidation (disorder)', parent of Pneumonia",
    ),
    "Edema": (Code("19242006", SCT, "Pulmonary edema"), f"{_PS3_16}: CID 3700 'Pulmonary edema'"),
    "Emphysema": (
        Code("87433001", SCT, "Pulmonary emphysema"),
        "HL7 Lithuania lung IG value set 'incidental-finding' (tx.fhir.org expansion): 87433001 'Pulmonary emphysema (disorder)'",
    ),
    "Fibrosis": (
        Code("51615001", SCT, "Pulmonary fibrosis"),
        "MedDRA 10037383 'Pulmonary fibrosis' -> SCT 51615001 'equivalent' FHIR ConceptMap; FHIR display 'Pulmonary fibrosis'",
    ),
    "Pleural_Thickening": (
        Code("PLEURAL-THICK", PRIVATE, "Pleural thickening"),
        "no SNOMED CT / RadLex code could be verified in this session: private code",
    ),
    "Hernia": (
        Code("84089009", SCT, "Hiatal hernia"),
        "ICD-10 K44.9 <-> SCT 84089009 'hiatal hernia' mappings (NIH's 'Hernia' label is almost always a hiatal hernia on CXR)",
    ),
    # Brain MRI demonstration head (Kaggle Brain Tumor MRI classes)
    "glioma": (
        Code("GLIOMA", PRIVATE, "Glioma"),
        "SCT 393563007 is given as 'Glioma' and as 'Glioblastoma multiforme' by different sources: not verified, private code",
    ),
    "meningioma": (
        Code("109913001", SCT, "Benign neoplasm of meninges"),
        "HL7 mCODE STU4 value set BenignUncertainNeoplasmBrainCNSDisorderVS: 109913001 'Benign neoplasm of meninges'",
    ),
    "pituitary": (
        Code("92296004", SCT, "Benign neoplasm of pituitary gland"),
        "HL7 mCODE STU4 value set BenignUncertainNeoplasmBrainCNSDisorderVS: 92296004 'Benign neoplasm of pituitary gland'",
    ),
    "notumor": (
        Code("NO-TUMOUR", PRIVATE, "No tumour"),
        "the data set's 'no tumour' class has no finding code: private code",
    ),
}

KNOWN_CODES: dict[str, Code] = {k: v[0] for k, v in _TABLE.items()}
CODE_SOURCES: dict[str, str] = {k: v[1] for k, v in _TABLE.items()}
CODES_SOURCE = "; ".join(f"{k}: {v}" for k, v in CODE_SOURCES.items())


def code_for(label: str) -> Code:
    """The checked code of a known label, else a private ``99DDN`` code built from its name."""
    if label in KNOWN_CODES:
        return KNOWN_CODES[label]
    value = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").upper()[:16] or "LABEL"
    return Code(value, PRIVATE, label.replace("_", " "))
