"""The findings as a Comprehensive 3D SR with TID 1500 Measurement Report as its root.

Content tree (PS3.16 TID 1500, as IHE AI Results asks for qualitative findings)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")          TID 1500
      HAS CONCEPT MOD  Language of Content Item and Descendants    TID 1204
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID  TID 1002/1004
                       (the model's Device UID), name, manufacturer
      HAS CONCEPT MOD  Procedure reported                          row 4
      CONTAINS         Image Library (the scored source images)    TID 1600
      CONTAINS CONTAINER Imaging Measurements                      row 6
        CONTAINS CONTAINER Measurement Group, one per label        TID 1501
          HAS OBS CONTEXT Tracking Identifier = label name, Tracking Unique Identifier
          CONTAINS CODE   Finding = the label's code (model manifest)
          HAS CONCEPT MOD Algorithm Name / Version / Manufacturer / Parameters  TID 4019
                          (parameter "threshold=<t>": the operating point)
          CONTAINS NUM    Probability, unit 1, derivation Maximum   TID 300
                          = study level (max over the scored images)
          CONTAINS NUM    Probability, unit 1, per scored image      TID 300
                          -> INFERRED FROM IMAGE (that image)
          CONTAINS CODE   <label code> = Present | Absent           (by the threshold)
          CONTAINS IMAGE  Source (each scored image)
        CONTAINS CONTAINER Measurement Group "Study triage"          TID 1501
          CONTAINS NUM    Abnormality score (99DDN), unit 1
          CONTAINS CODE   Priority = STAT | HIGH | ROUTINE (99DDN values)
      CONTAINS CONTAINER Qualitative Evaluations                    row 12
        CONTAINS TEXT    Comment = "NOT FOR DIAGNOSTIC USE ..."     (demo models only)

A study re-opened by a late instance gets a new SR whose Predecessor Documents Sequence
(PS3.3 C.17.2.1) points at the SR it supersedes. (The tests read it back with
``tests/support/sr_reader.py``.)
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from highdicom.sr import (
    Comprehensive3DSR,
    ContainerContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import ImageLibraryEntryDescriptors
from pydicom.dataset import Dataset

from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.content import (
    NOT_FOR_DIAGNOSTIC_USE,
    charsets_of,
    copy_patient_and_study,
    fit_text,
    make_uid,
)
from ddn_node.dicom.results.equipment import (
    algorithm_equipment,
    algorithm_identification,
    device_observer,
    general_equipment,
)
from ddn_node.model.types import Code, ImagePrediction, LabelSpec, StudyPrediction
from ddn_node.vocabulary import Priority

TRIAGE_TRACKING_ID = "Study triage"
_THRESHOLD_PARAMETER = "threshold="


@dataclass(frozen=True)
class SRReference:
    """An earlier SR of the same study that a new SR supersedes (PS3.3 C.17.2.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SRReference:
        return cls(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
        )

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.StudyInstanceUID = self.study_instance_uid
        return ds


def sr_series_description(is_demo: bool) -> str:
    text = "DDN AI findings (SR)"
    return f"{text} - {NOT_FOR_DIAGNOSTIC_USE}" if is_demo else text


def procedure_reported(sources: Sequence[Dataset]) -> Code:
    """The imaging procedure analysed (TID 1500 row 4; AIR: the procedure, not the AI).

    The study's own Procedure Code Sequence wins when the modality filled it in; a
    projection radiograph of the chest (or of an unstated body part: the node routes only
    chest radiographs to the CXR model) is a plain chest X-ray; anything else falls back
    to the generic "Imaging procedure" of CID 100.
    """
    first = sources[0]
    for item in first.get("ProcedureCodeSequence", []):
        value = C.code_value(item)
        if value and item.get("CodingSchemeDesignator") and item.get("CodeMeaning"):
            return Code(value, str(item.CodingSchemeDesignator), str(item.CodeMeaning))
    modality = str(first.get("Modality", "") or "").upper()
    body_part = str(first.get("BodyPartExamined", "") or "").upper()
    if modality in ("CR", "DX", "DR", "RG", "") and body_part in ("", "CHEST", "THORAX", "LUNG"):
        return C.PROCEDURE_PLAIN_CHEST_XRAY
    return C.PROCEDURE_IMAGING


def build_sr(
    sources: Sequence[Dataset],
    headers: Sequence[Dataset],
    prediction: StudyPrediction,
    priority: Priority,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    predecessor: SRReference | None = None,
    uid_seed: str | None = None,
    now: datetime.datetime | None = None,
) -> Comprehensive3DSR:
    """Build the TID 1500 SR of one analysis.

    Args:
        sources: the scored source images (headers suffice); patient and study attributes
            are copied from the first.
        headers: :func:`~.content.reference_header` of each source, in the same order.
        prediction: the model output; every label in ``prediction.labels`` must have a
            study-level probability.
        priority: the study's triage class.
        predecessor: the SR this one supersedes, if the study was analysed before.
        uid_seed: makes Tracking Unique Identifiers reproducible (see ``make_uid``).
    """
    algorithm = prediction.algorithm
    charsets = charsets_of(sources[0])
    by_uid = {str(h.SOPInstanceUID): h for h in headers}
    scored = [img for img in prediction.images if img.sop_instance_uid in by_uid]
    unknown = [i.sop_instance_uid for i in prediction.images if i.sop_instance_uid not in by_uid]
    if unknown:
        raise ValueError(f"predictions for images that are not among the sources: {unknown}")
    scored_headers = [by_uid[img.sop_instance_uid] for img in scored] or list(headers)

    groups: list[MeasurementsAndQualitativeEvaluations] = []
    for spec in prediction.labels:
        if spec.name not in prediction.probabilities:
            raise ValueError(f"no study-level probability for label {spec.name!r}")
        groups.append(
            _finding_group(spec, prediction, scored, by_uid, scored_headers, charsets, uid_seed)
        )
    groups.append(_triage_group(prediction, priority, scored_headers, uid_seed))

    # TID 1600 is optional; highdicom describes projection images only when they carry
    # Patient Orientation and Imager Pixel Spacing. A library listing only some of the
    # images would misinform, so it is all or nothing (the references are elsewhere too).
    image_library = [h for h in scored_headers if _describable(h)]
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device_observer(algorithm)),
        procedure_reported=C.coded(procedure_reported(sources)),
        imaging_measurements=groups,
        title=C.coded(C.TITLE_MEASUREMENT_REPORT),
        referenced_images=image_library if len(image_library) == len(scored_headers) else None,
    )
    if algorithm.is_demo:
        report[0].ContentSequence.append(_demo_comment(algorithm.name, algorithm.version))

    equipment = general_equipment(algorithm)
    sr = Comprehensive3DSR(
        evidence=list(headers),
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=equipment["manufacturer"],
        manufacturer_model_name=equipment["manufacturer_model_name"],
        software_versions=equipment["software_versions"],
        device_serial_number=equipment["device_serial_number"],
        # All labels of the model are reported: the content is complete. The report is
        # not verified by a person, so it stays PRELIMINARY and UNVERIFIED (C.17.2).
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor.as_dataset()] if predecessor is not None else None,
        contributing_equipment=[algorithm_equipment(algorithm, now)],
        series_description=fit_text(sr_series_description(algorithm.is_demo), 64, charsets),
        coding_schemes=[C.ddn_coding_scheme()],
        specific_character_set=None,  # set with the patient attributes, see content.py
    )
    copy_patient_and_study(sr, sources[0])
    return sr


def _describable(header: Dataset) -> bool:
    """Whether highdicom can make an Image Library entry (TID 1601) for the header."""
    if "Rows" not in header or "Columns" not in header:
        return False
    try:
        ImageLibraryEntryDescriptors(header)
    except (ValueError, KeyError, AttributeError, TypeError):
        return False
    return True


def _finding_group(
    spec: LabelSpec,
    prediction: StudyPrediction,
    scored: Sequence[ImagePrediction],
    by_uid: Mapping[str, Dataset],
    scored_headers: Sequence[Dataset],
    charsets: list[str],
    uid_seed: str | None,
) -> MeasurementsAndQualitativeEvaluations:
    probability = float(prediction.probabilities[spec.name])
    finding = C.coded(spec.code)
    per_image = [
        Measurement(
            name=C.coded(C.PROBABILITY),
            value=float(img.probabilities[spec.name]),
            unit=C.coded(C.UNIT_ONE),
            referenced_images=[_source_for_measurement(by_uid[img.sop_instance_uid])],
        )
        for img in scored
        if spec.name in img.probabilities
    ]
    study_level = Measurement(
        name=C.coded(C.PROBABILITY),
        value=probability,
        unit=C.coded(C.UNIT_ONE),
        derivation=C.coded(C.MAXIMUM),
    )
    present = probability >= spec.threshold
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=make_uid(uid_seed, "tracking", spec.name),
            identifier=fit_text(spec.name, None, charsets),
        ),
        finding_type=finding,
        algorithm_id=algorithm_identification(
            prediction.algorithm, parameters=[f"{_THRESHOLD_PARAMETER}{spec.threshold:g}"]
        ),
        measurements=[study_level, *per_image],
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=C.coded(spec.code), value=C.coded(C.PRESENT if present else C.ABSENT)
            )
        ],
        source_images=[_source_for_group(h) for h in scored_headers],
    )


def _triage_group(
    prediction: StudyPrediction,
    priority: Priority,
    scored_headers: Sequence[Dataset],
    uid_seed: str | None,
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=make_uid(uid_seed, "tracking", TRIAGE_TRACKING_ID), identifier=TRIAGE_TRACKING_ID
        ),
        algorithm_id=algorithm_identification(prediction.algorithm),
        measurements=[
            Measurement(
                name=C.coded(C.ABNORMALITY_SCORE),
                value=float(prediction.abnormality_score),
                unit=C.coded(C.UNIT_ONE),
            )
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=C.coded(C.PRIORITY), value=C.coded(C.PRIORITY_CODES[priority])
            )
        ],
        source_images=[_source_for_group(h) for h in scored_headers],
    )


def _source_for_measurement(header: Dataset) -> SourceImageForMeasurement:
    return SourceImageForMeasurement(str(header.SOPClassUID), str(header.SOPInstanceUID))


def _source_for_group(header: Dataset) -> SourceImageForMeasurementGroup:
    return SourceImageForMeasurementGroup(str(header.SOPClassUID), str(header.SOPInstanceUID))


def _demo_comment(name: str, version: str) -> ContainerContentItem:
    """TID 1500 rows 12-14: a Qualitative Evaluations container holding a TEXT comment."""
    container = ContainerContentItem(
        name=C.coded(C.QUALITATIVE_EVALUATIONS),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = [
        TextContentItem(
            name=C.coded(C.COMMENT),
            value=(
                f"{NOT_FOR_DIAGNOSTIC_USE}: produced by the demonstration model {name} "
                f"{version}, which is not validated for clinical use."
            ),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    ]
    return container
