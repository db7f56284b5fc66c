"""Reading a DDN SR back, for the tests: what the PACS holds, parsed into plain values.

Test support, not product code: the node never reads its SRs back (what it said is in the
database). It walks the TID 1500 tree the node writes (ddn_node/dicom/results/sr.py):
planar ROI groups under Imaging Measurements, and the Qualitative Evaluations container.
``tests/dicom_results/test_sr.py`` also parses the same SRs with highdicom's own reader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.content import NOT_FOR_DIAGNOSTIC_USE
from ddn_node.dicom.results.sr import THRESHOLD_PARAMETER, SRReference
from ddn_node.model.types import Code
from ddn_node.vocabulary import Priority

_PROBABILITY_TEXT = re.compile(
    r"^(?P<label>.*): probability (?P<p>[\d.]+) %, threshold (?P<t>[\d.]+) %$", re.S
)


@dataclass(frozen=True)
class SRRegion:
    """One outline of a finding: on which image, what shape, how many points."""

    sop_instance_uid: str
    graphic_type: str
    points: tuple[tuple[float, float], ...]
    probability: float  # on that image, 0..1 (the group's NUM, in %)
    tracking_uid: str


@dataclass(frozen=True)
class SRFinding:
    """One label as read back from an SR."""

    label: str
    code: Code
    probability: float  # study level, 0..1, as the SR's text gives it (one decimal of %)
    present: bool
    threshold: float | None
    regions: tuple[SRRegion, ...] = ()

    @property
    def image_probabilities(self) -> dict[str, float]:
        return {r.sop_instance_uid: r.probability for r in self.regions}

    @property
    def source_images(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.sop_instance_uid for r in self.regions))


@dataclass(frozen=True)
class SRContent:
    """What :func:`read_sr` finds in a DDN SR."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    findings: dict[str, SRFinding]
    abnormality_score: float | None
    priority: Priority | None
    algorithm_name: str | None
    algorithm_version: str | None
    device_observer_uid: str | None
    procedure: Code | None
    predecessors: tuple[SRReference, ...]
    evidence: tuple[str, ...]
    library: tuple[str, ...]
    comments: tuple[str, ...]
    series_description: str
    groups: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # label -> "no heat map: ..." comment
    # The "Whole image" group of each scored image: SOP Instance UID -> the meaning of each
    # NUM's concept ("Abnormality score", a finding's code meaning) -> its value, 0..1.
    whole_image: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def positive(self) -> list[str]:
        return [name for name, f in self.findings.items() if f.present]

    @property
    def not_for_diagnostic_use(self) -> bool:
        """Whether the SR says so, in a comment or its Series Description."""
        return any(
            NOT_FOR_DIAGNOSTIC_USE in text for text in (*self.comments, self.series_description)
        )


def read_sr(ds: Dataset) -> SRContent:
    """Parse findings, outlines, score, priority and references out of a DDN SR.

    Raises ``ValueError`` when the document is not a TID 1500 Measurement Report or its
    content is malformed.
    """
    try:
        return _read_sr(ds)
    # NotImplementedError: pydicom's answer, on first access, to a VR it does not know.
    except (AttributeError, IndexError, KeyError, NotImplementedError, TypeError) as exc:
        raise ValueError(f"malformed TID 1500 content: {type(exc).__name__}: {exc}") from exc


def _name(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (C.code_value(seq[0]) or "", str(seq[0].CodingSchemeDesignator))


def _code(item: Dataset) -> Code:
    code = item.ConceptCodeSequence[0]
    return Code(C.code_value(code) or "", str(code.CodingSchemeDesignator), str(code.CodeMeaning))


def _is(name: tuple[str, str] | None, code: Code) -> bool:
    return name == (code.value, code.scheme)


def _read_sr(ds: Dataset) -> SRContent:
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise ValueError("not a TID 1500 Measurement Report")
    out: dict[str, object] = {"device_uid": None, "procedure": None, "library": ()}
    regions: dict[tuple[str, str], list[SRRegion]] = {}
    labels: dict[tuple[str, str], str] = {}
    whole_image: dict[str, dict[str, float]] = {}
    algorithm: dict[str, str] = {}
    evaluation: dict[str, object] = {}
    groups = 0
    for item in ds.ContentSequence:
        name = _name(item)
        if name == ("121012", "DCM"):  # Device Observer UID
            out["device_uid"] = str(item.UID)
        elif _is(name, C.PROCEDURE_REPORTED):
            out["procedure"] = _code(item)
        elif _is(name, C.IMAGE_LIBRARY):
            out["library"] = tuple(
                str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                for group in item.get("ContentSequence", [])
                for entry in group.get("ContentSequence", [])
                if entry.get("ValueType") == "IMAGE"
            )
        elif _is(name, C.IMAGING_MEASUREMENTS):
            for group in item.get("ContentSequence", []):
                groups += 1
                _read_group(group, regions, labels, algorithm, whole_image)
        elif _is(name, C.QUALITATIVE_EVALUATIONS):
            evaluation = _read_evaluations(item)
    findings = _findings(evaluation, regions, labels)
    comments = tuple(evaluation.get("comments", ()))  # type: ignore[arg-type]
    notes = {}
    for text in comments:
        label, sep, rest = text.partition(": ")
        if sep and rest.startswith("no heat map"):
            notes[label] = rest
    return SRContent(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        findings=findings,
        abnormality_score=evaluation.get("score"),  # type: ignore[arg-type]
        priority=evaluation.get("priority"),  # type: ignore[arg-type]
        algorithm_name=evaluation.get("algorithm_name") or algorithm.get("name"),  # type: ignore[arg-type]
        algorithm_version=evaluation.get("algorithm_version") or algorithm.get("version"),  # type: ignore[arg-type]
        device_observer_uid=out["device_uid"],  # type: ignore[arg-type]
        procedure=out["procedure"],  # type: ignore[arg-type]
        predecessors=_references(ds, "PredecessorDocumentsSequence"),
        evidence=tuple(
            r.sop_instance_uid for r in _references(ds, "CurrentRequestedProcedureEvidenceSequence")
        ),
        library=out["library"],  # type: ignore[arg-type]
        comments=comments,
        series_description=str(ds.get("SeriesDescription", "")),
        groups=groups,
        notes=notes,
        whole_image=whole_image,
    )


def _read_group(
    group: Dataset,
    regions: dict[tuple[str, str], list[SRRegion]],
    labels: dict[tuple[str, str], str],
    algorithm: dict[str, str],
    whole_image: dict[str, dict[str, float]],
) -> None:
    finding: tuple[str, str] | None = None
    values: dict[str, float] = {}
    tracking = tracking_uid = ""
    region: tuple[str, str, tuple[tuple[float, float], ...]] | None = None
    probability: float | None = None
    for item in group.get("ContentSequence", []):
        name, value_type = _name(item), item.get("ValueType")
        if name == ("112039", "DCM"):
            tracking = str(item.TextValue)
        elif name == ("112040", "DCM"):
            tracking_uid = str(item.UID)
        elif name == ("121071", "DCM"):  # Finding
            code = item.ConceptCodeSequence[0]
            finding = (C.code_value(code) or "", str(code.CodingSchemeDesignator))
        elif value_type == "SCOORD":
            ref = item.ContentSequence[0].ReferencedSOPSequence[0]
            data = [float(v) for v in item.GraphicData]
            region = (
                str(ref.ReferencedSOPInstanceUID),
                str(item.GraphicType),
                tuple(zip(data[0::2], data[1::2], strict=True)),
            )
        elif value_type == "NUM":
            probability = _num(item) / 100.0
            values[str(item.ConceptNameCodeSequence[0].CodeMeaning)] = probability
        elif _is(name, C.ALGORITHM_NAME):
            algorithm["name"] = str(item.TextValue)
        elif _is(name, C.ALGORITHM_VERSION):
            algorithm["version"] = str(item.TextValue)
    if region is None or probability is None:
        raise ValueError("a measurement group without region or measurement")
    if finding is None:  # the whole image's group
        whole_image[region[0]] = values
        return
    labels[finding] = tracking
    regions.setdefault(finding, []).append(
        SRRegion(region[0], region[1], region[2], probability, tracking_uid)
    )


def _num(item: Dataset) -> float:
    measured = item.MeasuredValueSequence[0]
    if "FloatingPointValue" in measured:  # the exact value, when DS could not carry it
        return float(measured.FloatingPointValue)
    return float(measured.NumericValue)


def _read_evaluations(container: Dataset) -> dict[str, object]:
    presence: dict[tuple[str, str], tuple[Code, bool]] = {}
    texts: dict[tuple[str, str], tuple[str, float, float]] = {}
    comments: list[str] = []
    out: dict[str, object] = {}
    for item in container.get("ContentSequence", []):
        name, value_type = _name(item), item.get("ValueType")
        if value_type == "CODE" and _is(name, C.PRIORITY):
            value = item.ConceptCodeSequence[0]
            out["priority"] = next(
                (p for p, code in C.PRIORITY_CODES.items() if C.same_code(value, code)), None
            )
        elif value_type == "CODE" and name is not None:
            concept = item.ConceptNameCodeSequence[0]
            code = Code(name[0], name[1], str(concept.CodeMeaning))
            presence[name] = (code, C.same_code(item.ConceptCodeSequence[0], C.PRESENT))
        elif value_type == "TEXT":
            text = str(item.TextValue)
            if _is(name, C.ABNORMALITY_SCORE):
                out["score"] = float(text.split()[0]) / 100.0
            elif _is(name, C.COMMENT):
                comments.append(text)
            elif _is(name, C.ALGORITHM_NAME):
                out["algorithm_name"] = text
            elif _is(name, C.ALGORITHM_VERSION):
                out["algorithm_version"] = text
            elif name is not None and (match := _PROBABILITY_TEXT.match(text)):
                texts[name] = (match["label"], float(match["p"]) / 100.0, float(match["t"]) / 100.0)
    out.update(presence=presence, texts=texts, comments=comments)
    return out


def _findings(
    evaluation: dict[str, object],
    regions: dict[tuple[str, str], list[SRRegion]],
    labels: dict[tuple[str, str], str],
) -> dict[str, SRFinding]:
    presence: dict[tuple[str, str], tuple[Code, bool]] = evaluation.get("presence", {})  # type: ignore[assignment]
    texts: dict[tuple[str, str], tuple[str, float, float]] = evaluation.get("texts", {})  # type: ignore[assignment]
    out = {}
    for key, (code, present) in presence.items():
        label, probability, threshold = texts.get(
            key, (labels.get(key, code.meaning), float("nan"), None)
        )
        out[label] = SRFinding(
            label=label,
            code=code,
            probability=probability,
            present=present,
            threshold=threshold,
            regions=tuple(regions.get(key, ())),
        )
    return out


def _references(ds: Dataset, keyword: str) -> tuple[SRReference, ...]:
    return tuple(
        SRReference(
            sop_class_uid=str(inst.ReferencedSOPClassUID),
            sop_instance_uid=str(inst.ReferencedSOPInstanceUID),
            series_instance_uid=str(series.SeriesInstanceUID),
            study_instance_uid=str(study.StudyInstanceUID),
        )
        for study in ds.get(keyword, [])
        for series in study.get("ReferencedSeriesSequence", [])
        for inst in series.get("ReferencedSOPSequence", [])
    )


__all__ = ["THRESHOLD_PARAMETER", "SRContent", "SRFinding", "SRRegion", "read_sr"]
