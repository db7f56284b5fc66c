"""What the adapters are told, what they hand back, and the pieces all three share.

A :class:`StudySummary` is what the worker knows once a study is analysed. Each adapter
turns it into an :class:`OutgoingMessage` (the exact bytes that go on the wire), and one
delivery attempt gives a :class:`NotifyResult`.

Priority mappings (one table, so the three channels never disagree):

=========  =======================  ===========================  ==================
node       HL7 v2 OBR-27.6 / TQ1-9  FHIR R4 ``Task.priority``    meaning
=========  =======================  ===========================  ==================
STAT       ``S`` (Stat)             ``stat``                     read immediately
HIGH       ``A`` (ASAP)             ``asap``                     read before routine
ROUTINE    ``R`` (Routine)          ``routine``                  normal order
=========  =======================  ===========================  ==================

Sources:

* HL7 v2.5.1 table 0027 (priority, component 6 of the TQ data type in OBR-27) and table
  0485 (extended priority codes, TQ1-9, "added v2.5"): ``S`` Stat (do immediately), ``A``
  As soon as possible (a priority lower than stat), ``R`` Routine. Neither table has an
  "urgent" code, so ``A`` is the only code between ``R`` and ``S`` (``P`` pre-op, ``C``
  callback and ``T`` timing critical mean other things).
* FHIR R4 RequestPriority (http://hl7.org/fhir/request-priority, bound *required* to
  ``Task.priority``): routine < urgent < asap < stat.
* HL7 "Version 2 to FHIR" ConceptMap table-hl70485-to-request-priority maps ``S``->stat,
  ``A``->asap, ``R``->routine. HIGH therefore becomes ``asap`` rather than ``urgent``: an
  interface engine that converts our ORU to FHIR then lands on the very code our own FHIR
  adapter sends, and the node's three ranks map ordinally onto the first, second and last
  ranks of both scales. ``urgent`` is deliberately unused.

``NOT_ANALYSED`` has no mapping: the adapters speak only about analysed studies.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ddn_node.vocabulary import Priority

# Fixed namespace for the notification identifiers (uuid5). Never change it: retries and
# re-sends across versions must keep producing the same identifiers.
NOTIFY_NAMESPACE = uuid.UUID("6f1d3c2a-8e0b-5d47-9a36-2b7c9e4f10d5")

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
DEMO_NOTICE = f"{DISCLAIMER}: results of a demonstration model"
AI_NOTICE = "AI triage result for reading-list priority; not a radiology report"

HL7_PRIORITY: dict[str, tuple[str, str]] = {
    Priority.STAT.value: ("S", "Stat"),
    Priority.HIGH.value: ("A", "ASAP"),
    Priority.ROUTINE.value: ("R", "Routine"),
}
"""Node priority -> (HL7 table 0027/0485 code, its display text)."""

FHIR_PRIORITY: dict[str, str] = {
    Priority.STAT.value: "stat",
    Priority.HIGH.value: "asap",
    Priority.ROUTINE.value: "routine",
}
"""Node priority -> FHIR R4 RequestPriority code."""

ANALYSED_PRIORITIES = frozenset(HL7_PRIORITY)

Finding = tuple[str, float, bool]


@dataclass(frozen=True)
class StudySummary:
    """What the worker knows after analysing a study (patient fields as in the DICOM header).

    ``analysed_at`` must carry a time zone (the store hands out UTC-aware datetimes); it is
    kept in UTC. ``findings`` are ``(label, probability, present)``; they are stored as a
    tuple sorted by descending probability (then label) so that equal summaries give
    byte-identical messages whatever order the caller listed them in.
    """

    study_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    modalities: str
    study_description: str
    priority: str
    priority_reason: str
    abnormality_score: float
    findings: Sequence[Finding]
    model_name: str
    model_version: str
    is_demo: bool
    analysed_at: dt.datetime
    notification_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        priority = str(
            self.priority.value if isinstance(self.priority, Priority) else self.priority
        )
        if priority not in ANALYSED_PRIORITIES:
            raise ValueError(
                f"priority must be one of {sorted(ANALYSED_PRIORITIES)} to notify, got {priority!r}"
            )
        if not self.study_uid:
            raise ValueError("study_uid is required")
        if self.analysed_at.tzinfo is None or self.analysed_at.utcoffset() is None:
            raise ValueError("analysed_at must be time-zone aware (UTC)")
        score = _check_probability("abnormality_score", self.abnormality_score)
        findings: list[Finding] = []
        for label, probability, present in self.findings:
            findings.append(
                (
                    str(label),
                    _check_probability(f"probability of {label!r}", probability),
                    bool(present),
                )
            )
        findings.sort(key=lambda f: (-f[1], f[0]))
        analysed_at = self.analysed_at.astimezone(dt.UTC)
        object.__setattr__(self, "priority", priority)
        object.__setattr__(self, "abnormality_score", score)
        object.__setattr__(self, "findings", tuple(findings))
        object.__setattr__(self, "analysed_at", analysed_at)
        object.__setattr__(
            self,
            "notification_id",
            str(uuid.uuid5(NOTIFY_NAMESPACE, f"{self.study_uid}|{iso_utc(analysed_at)}")),
        )


def _check_probability(what: str, value: float) -> float:
    """``value`` as a Python float (numpy scalars welcome), or ValueError outside [0, 1]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return number


@dataclass(frozen=True)
class OutgoingMessage:
    """One message for one adapter: exactly the bytes that go on the wire.

    ``payload`` is the HL7 message without MLLP framing (segments ended by CR, UTF-8), or
    the JSON document (UTF-8) for FHIR and the webhook.
    """

    kind: str  # "hl7" | "fhir" | "webhook"
    payload: bytes
    content_type: str


@dataclass(frozen=True)
class NotifyResult:
    """The outcome of one delivery attempt.

    ``status`` is the HTTP status for FHIR and the webhook (``None`` when no answer came),
    always ``None`` for HL7, whose ``error`` carries the MSA/ERR text of a negative ACK.
    """

    ok: bool
    status: int | None
    error: str


def iso_utc(moment: dt.datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` (a valid FHIR ``dateTime``/``instant``)."""
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def finding_lines(summary: StudySummary) -> list[str]:
    """The findings as short human-readable lines, highest probability first."""
    if not summary.findings:
        return ["No findings reported by the model"]
    return [
        f"{label}: {probability:.2f} ({'present' if present else 'absent'})"
        for label, probability, present in summary.findings
    ]


def summary_lines(summary: StudySummary, disclaimer: bool = True) -> list[str]:
    """The text summary shared by the HL7 OBX lines and the FHIR Task: no patient data.

    Starts with the "NOT FOR DIAGNOSTIC USE" notice for a demonstration model unless
    ``disclaimer`` is False (for a caller that states it separately).
    """
    lines = [DEMO_NOTICE] if summary.is_demo and disclaimer else []
    reason = f" ({summary.priority_reason})" if summary.priority_reason else ""
    lines.append(f"AI triage priority: {summary.priority}{reason}")
    lines.append(f"Abnormality score: {summary.abnormality_score:.2f}")
    lines.append("Findings (probability; present/absent at the model's threshold):")
    lines.extend(f"  {line}" for line in finding_lines(summary))
    lines.append(
        f"Model: {summary.model_name} {summary.model_version}; "
        f"analysed {iso_utc(summary.analysed_at)}"
    )
    lines.append(AI_NOTICE)
    return lines


def json_bytes(document: object) -> bytes:
    """Compact, deterministic UTF-8 JSON with ``<``, ``>`` and ``&`` written as ``\\u00XX``.

    Those three characters only ever occur inside JSON strings, so the escaped form means
    the same to every JSON parser while a receiver that pastes values into HTML unescaped
    still gets no markup from a hostile DICOM header (``<script>`` in PatientName).
    """
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.encode("utf-8")
