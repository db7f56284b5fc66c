"""Coded concepts for the labels the bundled heads know.

Each code was checked against the source named in :data:`CODES_SOURCE` (recorded in the
manifest and the model card). A label without a known code gets a private ``99DDN`` code
built from its name, so an operator's own labels still produce valid coded SR content.
"""

from __future__ import annotations

import re

from ddn_node.model.types import Code

CODES_SOURCE = "PENDING VERIFICATION"

SCT = "SCT"

KNOWN_CODES: dict[str, Code] = {
    # NIH ChestX-ray14 findings
    "Atelectasis": Code("46621007", SCT, "Atelectasis"),
    "Cardiomegaly": Code("8186001", SCT, "Cardiomegaly"),
    "Effusion": Code("60046008", SCT, "Pleural effusion"),
    "Infiltration": Code("409609008", SCT, "Radiologic infiltrate of lung"),
    "Mass": Code("309529002", SCT, "Lung mass"),
    "Nodule": Code("427359005", SCT, "Solitary nodule of lung"),
    "Pneumonia": Code("233604007", SCT, "Pneumonia"),
    "Pneumothorax": Code("36118008", SCT, "Pneumothorax"),
    "Consolidation": Code("95436008", SCT, "Lung consolidation"),
    "Edema": Code("19242006", SCT, "Pulmonary edema"),
    "Emphysema": Code("87433001", SCT, "Pulmonary emphysema"),
    "Fibrosis": Code("51615001", SCT, "Fibrosis of lung"),
    "Pleural_Thickening": Code("44608003", SCT, "Pleural thickening"),
    "Hernia": Code("84089009", SCT, "Hiatal hernia"),
    # Brain MRI demonstration head (Kaggle Brain Tumor MRI classes)
    "glioma": Code("393563007", SCT, "Glioma"),
    "meningioma": Code("302820008", SCT, "Intracranial meningioma"),
    "pituitary": Code("254956000", SCT, "Pituitary adenoma"),
    "notumor": Code("373572006", SCT, "Clinical finding absent"),
}


def code_for(label: str) -> Code:
    """The verified code of a known label, else a private ``99DDN`` code."""
    if label in KNOWN_CODES:
        return KNOWN_CODES[label]
    value = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").upper()[:16] or "LABEL"
    return Code(value, "99DDN", label.replace("_", " "))
