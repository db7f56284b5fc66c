"""Withdrawing superseded results: an IOCM rejection note (IHE Radiology IOCM; a Key Object
Selection Document, PS3.3 A.35.4, whose title is a rejection code of CID 7010).

When a late image re-opens a study, the node analyses it again and sends a new SR that
supersedes the old one (Predecessor Documents Sequence). The old SR, Parametric Maps and
overlays would otherwise stay in the PACS beside the new ones, saying other things; to a
destination that honours rejection notes (``[[destinations]] withdraw_superseded``; for
Orthanc, ``deploy/orthanc/iocm-rejection.lua``) the node sends one note referencing them.

Title: (113001, DCM, "Rejected for Quality Reasons"). CID 7010 has no "superseded" title;
of its four, it is the one whose meaning (the objects should not be used) fits, and the one
IOCM archives act on without patient-safety workflows (113037) or retention rules (113039).
The Key Object Description says why in words.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset

from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.content import copy_patient_and_study, reference_header
from ddn_node.dicom.results.equipment import algorithm_equipment, device_observer, general_equipment
from ddn_node.model.types import AlgorithmInfo, Code

REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")


@dataclass(frozen=True)
class Withdrawn:
    """One superseded object: what a reference to it needs."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


def build_rejection_note(
    source: Dataset,
    withdrawn: Sequence[Withdrawn],
    *,
    superseded_by: str,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    now: datetime.datetime | None = None,
) -> KeyObjectSelectionDocument:
    """The rejection note of ``withdrawn`` (objects of ``source``'s study), which the SR
    ``superseded_by`` (its SOP Instance UID) replaces."""
    if not withdrawn:
        raise ValueError("a rejection note needs at least one object to withdraw")
    study_uid = str(source.StudyInstanceUID)
    references = []
    for item in withdrawn:
        ref = reference_header(source)
        ref.SOPClassUID, ref.SOPInstanceUID = item.sop_class_uid, item.sop_instance_uid
        ref.SeriesInstanceUID, ref.StudyInstanceUID = item.series_instance_uid, study_uid
        references.append(ref)
    equipment = general_equipment(algorithm)
    note = KeyObjectSelectionDocument(
        evidence=references,
        content=KeyObjectSelection(
            document_title=C.coded(REJECTED_FOR_QUALITY_REASONS),
            referenced_objects=references,
            observer_device_context=device_observer(algorithm),
            description=(
                f"Superseded AI results of {algorithm.name} {algorithm.version}: the study was "
                f"analysed again, and the SR {superseded_by} replaces them."
            )[:1024],
        ),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        contributing_equipment=[algorithm_equipment(algorithm, now)],
    )
    copy_patient_and_study(note, source)
    # What made the note, in General Equipment like every other result of the node: the
    # node recognises it when a PACS sends it back (dicom/origin.py).
    note.ManufacturerModelName = equipment.manufacturer_model_name
    note.SoftwareVersions = list(equipment.software_versions)  # type: ignore[assignment]  # VM 1-n
    note.SeriesDescription = "DDN withdrawn results (KO)"
    return note
