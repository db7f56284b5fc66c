"""Reading a DDN SR back, for the tests: what the PACS holds, parsed into plain values.

Test support, not product code: the node never reads its SRs back (what it said is in the
database). Parses the TID 1500 tree the node writes (see ddn_node/dicom/results/sr.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from ddn_node.dicom.results import codes as C
from ddn_node.dicom.results.content import NOT_FOR_DIAGNOSTIC_USE
from ddn_node.dicom.results.sr import _THRESHOLD_PARAMETER, SRReference
from ddn_node.model.types import Code
from ddn_node.vocabulary import Priority


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
    priority: Priority | None
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
    priority: Priority | None = None
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


_Triage = tuple[float | None, Priority | None]
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
    priority: Priority | None = None

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
