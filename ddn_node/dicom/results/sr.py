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
(PS3.3 C.17.2.1) points at the SR it supersedes. :func:`read_sr` parses all of this
back; the node and the tests use it to check what the PACS holds.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
from ddn_node.dicom.results.enum import TriagePriority
from ddn_node.dicom.results.equipment import (
    algorithm_equipment,
    algorithm_identification,
    device_observer,
    general_equipment,
)
from ddn_node.model.types import Code, ImagePrediction, LabelSpec, StudyPrediction

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
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
    priority: TriagePriority,
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
    priority: TriagePriority,
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


# --- Reading an SR back ------------------------------------------------------------------


@dataclass(frozen=True)
class SRFinding:
    """One label's measurement group, as read back from an SR."""

    label: str
    code: Code
    probability: float
    present: bool
    threshold: float | None
    image_probabilities: dict[str, float] = field(default_factory=dict)
    source_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class SRContent:
    """What :func:`read_sr` finds in a DDN SR (or any TID 1500 SR of the same shape)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    findings: dict[str, SRFinding]
    abnormality_score: float | None
    priority: TriagePriority | None
    algorithm_name: str | None
    algorithm_version: str | None
    device_observer_uid: str | None
    procedure: Code | None
    predecessors: tuple[SRReference, ...]
    evidence: tuple[str, ...]
    comments: tuple[str, ...]
    series_description: str

    @property
    def positive(self) -> list[str]:
        return [name for name, f in self.findings.items() if f.present]

    @property
    def not_for_diagnostic_use(self) -> bool:
        """Whether the SR says so, in its comment or its Series Description."""
        texts = (*self.comments, self.series_description)
        return any(NOT_FOR_DIAGNOSTIC_USE in text for text in texts)


def read_sr(ds: Dataset) -> SRContent:
    """Parse the findings, score, priority and references out of a DDN SR.

    Works on a dataset as built or as read back from a file or a PACS. Raises
    ``ValueError`` when the document is not a TID 1500 Measurement Report or its content
    is malformed.
    """
    try:
        return _read_sr(ds)
    except (AttributeError, IndexError, KeyError, TypeError) as exc:
        # A malformed tree (an item without its value, an empty code sequence) is bad
        # input, like any other: one documented error type for callers.
        raise ValueError(f"malformed TID 1500 content: {type(exc).__name__}: {exc}") from exc


def _read_sr(ds: Dataset) -> SRContent:
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise ValueError("not a TID 1500 Measurement Report")

    algorithm_name = algorithm_version = device_uid = None
    procedure: Code | None = None
    findings: dict[str, SRFinding] = {}
    score: float | None = None
    priority: TriagePriority | None = None
    comments: list[str] = []

    for item in ds.ContentSequence:
        name = _name(item)
        if name == ("121012", "DCM"):  # Device Observer UID
            device_uid = str(item.UID)
        elif name == ("121058", "DCM"):  # Procedure reported
            procedure = _code_value(item)
        elif name == ("126010", "DCM"):  # Imaging Measurements
            for group in item.get("ContentSequence", []):
                parsed = _read_group(group)
                if parsed is None:
                    continue
                kind, payload, algo = parsed
                algorithm_name = algorithm_name or algo[0]
                algorithm_version = algorithm_version or algo[1]
                if kind == "finding":
                    assert isinstance(payload, SRFinding)
                    findings[payload.label] = payload
                else:
                    assert isinstance(payload, tuple)
                    score, priority = payload
        elif name == (C.QUALITATIVE_EVALUATIONS.value, C.QUALITATIVE_EVALUATIONS.scheme):
            comments.extend(
                str(child.TextValue)
                for child in item.get("ContentSequence", [])
                if child.get("ValueType") == "TEXT"
            )

    predecessors = tuple(
        SRReference(
            sop_class_uid=str(inst.ReferencedSOPClassUID),
            sop_instance_uid=str(inst.ReferencedSOPInstanceUID),
            series_instance_uid=str(series.SeriesInstanceUID),
            study_instance_uid=str(study.StudyInstanceUID),
        )
        for study in ds.get("PredecessorDocumentsSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for inst in series.get("ReferencedSOPSequence", [])
    )
    evidence = tuple(
        str(inst.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for inst in series.get("ReferencedSOPSequence", [])
    )
    return SRContent(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        findings=findings,
        abnormality_score=score,
        priority=priority,
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        device_observer_uid=device_uid,
        procedure=procedure,
        predecessors=predecessors,
        evidence=evidence,
        comments=tuple(comments),
        series_description=str(ds.get("SeriesDescription", "")),
    )


def _name(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (C.code_value(seq[0]) or "", str(seq[0].CodingSchemeDesignator))


def _code_value(item: Dataset) -> Code:
    code = item.ConceptCodeSequence[0]
    return Code(C.code_value(code) or "", str(code.CodingSchemeDesignator), str(code.CodeMeaning))


def _num_value(item: Dataset) -> float:
    measured = item.MeasuredValueSequence[0]
    # FloatingPointValue carries the exact value when the DS text could not (C.18.1.1).
    if "FloatingPointValue" in measured:
        return float(measured.FloatingPointValue)
    return float(measured.NumericValue)


_Triage = tuple[float | None, TriagePriority | None]
_Algorithm = tuple[str | None, str | None]


def _read_group(group: Dataset) -> tuple[str, SRFinding | _Triage, _Algorithm] | None:
    tracking = None
    finding: Code | None = None
    threshold: float | None = None
    algo_name = algo_version = None
    study_probability: float | None = None
    image_probabilities: dict[str, float] = {}
    evaluation: tuple[Code, Code] | None = None
    sources: list[str] = []
    score: float | None = None
    priority: TriagePriority | None = None

    for item in group.get("ContentSequence", []):
        name = _name(item)
        value_type = item.get("ValueType")
        if name == ("112039", "DCM"):  # Tracking Identifier
            tracking = str(item.TextValue)
        elif name == ("121071", "DCM"):  # Finding
            finding = _code_value(item)
        elif name == ("111001", "DCM"):
            algo_name = str(item.TextValue)
        elif name == ("111003", "DCM"):
            algo_version = str(item.TextValue)
        elif name == ("111002", "DCM"):
            text = str(item.TextValue)
            if text.startswith(_THRESHOLD_PARAMETER):
                threshold = float(text[len(_THRESHOLD_PARAMETER) :])
        elif value_type == "NUM" and name == (C.PROBABILITY.value, C.PROBABILITY.scheme):
            value = _num_value(item)
            images = [
                str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                for ref in item.get("ContentSequence", [])
                if ref.get("ValueType") == "IMAGE"
            ]
            derived = any(
                _name(mod) == ("121401", "DCM")  # Derivation
                and C.same_code(mod.ConceptCodeSequence[0], C.MAXIMUM)
                for mod in item.get("ContentSequence", [])
                if mod.get("ValueType") == "CODE"
            )
            if derived or not images:
                study_probability = value
            else:
                for uid in images:
                    image_probabilities[uid] = value
        elif value_type == "NUM" and name == (C.ABNORMALITY_SCORE.value, C.DDN_SCHEME):
            score = _num_value(item)
        elif value_type == "CODE" and name == (C.PRIORITY.value, C.PRIORITY.scheme):
            value_code = item.ConceptCodeSequence[0]
            for prio, code in C.PRIORITY_CODES.items():
                if C.same_code(value_code, code):
                    priority = prio
        elif value_type == "CODE" and name is not None:
            evaluation = (
                Code(name[0], name[1], str(item.ConceptNameCodeSequence[0].CodeMeaning)),
                _code_value(item),
            )
        elif value_type == "IMAGE":
            sources.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))

    algo = (algo_name, algo_version)
    if score is not None or priority is not None:
        return "triage", (score, priority), algo
    if finding is None or study_probability is None or tracking is None:
        return None
    present = evaluation is not None and (evaluation[1].value, evaluation[1].scheme) == (
        C.PRESENT.value,
        C.PRESENT.scheme,
    )
    return (
        "finding",
        SRFinding(
            label=tracking,
            code=finding,
            probability=study_probability,
            present=present,
            threshold=threshold,
            image_probabilities=image_probabilities,
            source_images=tuple(sources),
        ),
        algo,
    )
