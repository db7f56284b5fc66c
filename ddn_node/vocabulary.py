"""The node's shared words, each defined once: priorities and their reading order, read
status, the kinds of result the node sends, and the states of studies, jobs and deliveries.

Every layer speaks these words (the worklist, the SR builder, the HL7 adapter, the
database), so they live below all of them: this module imports nothing of ``ddn_node``.
Values are the strings stored in the database and shown in the API; changing one means a
migration.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class Priority(StrEnum):
    """A study's reading priority. Triage decides one of the first three from the
    findings; ``NOT_ANALYSED`` is the fact that it has none yet (waiting, failed or not
    routed to a model)."""

    STAT = "STAT"
    HIGH = "HIGH"
    ROUTINE = "ROUTINE"
    NOT_ANALYSED = "NOT_ANALYSED"


# What triage decides, what an SR reports and what a radiologist may set by hand: "not
# analysed" is a fact, never a decision.
TRIAGE_PRIORITIES: tuple[Priority, ...] = (Priority.STAT, Priority.HIGH, Priority.ROUTINE)

# Reading order of the priority classes (0 is read first). Not analysed studies sit in
# the routine band, by arrival: listed, never hidden below it.
RANK: Mapping[Priority, int] = MappingProxyType(
    {Priority.STAT: 0, Priority.HIGH: 1, Priority.ROUTINE: 2, Priority.NOT_ANALYSED: 2}
)


def band_of(rank: int) -> Priority:
    """The priority band a rank sorts in (rank 2 is the routine band)."""
    for priority in TRIAGE_PRIORITIES:
        if RANK[priority] == rank:
            return priority
    return Priority.ROUTINE


class Urgency(StrEnum):
    """How soon a study's analysis is wanted: the analysis queue's classes, served most
    urgent first and first in, first out within a class. Decided at completion from the
    order's priority and the ``[queue] urgency`` rules (``pipeline/urgency.py``); not a
    reading priority (that is triage's, from the findings)."""

    STAT = "STAT"
    HIGH = "HIGH"
    ROUTINE = "ROUTINE"
    LOW = "LOW"


# The queue's order (0 is claimed first); stored as ``jobs.urgency``.
URGENCY_RANK: Mapping[Urgency, int] = MappingProxyType(
    {Urgency.STAT: 0, Urgency.HIGH: 1, Urgency.ROUTINE: 2, Urgency.LOW: 3}
)

# What an order's priority says, as DICOM writes it: Requested Procedure Priority
# (0040,1003) has the defined terms STAT, HIGH, ROUTINE, MEDIUM, LOW; Scheduled Procedure
# Step Priority (0074,1200) HIGH, MEDIUM, LOW. MEDIUM is the routine middle of both.
ORDER_PRIORITIES: Mapping[str, Urgency] = MappingProxyType(
    {
        "STAT": Urgency.STAT,
        "HIGH": Urgency.HIGH,
        "ROUTINE": Urgency.ROUTINE,
        "MEDIUM": Urgency.ROUTINE,
        "LOW": Urgency.LOW,
    }
)


class ReadStatus(StrEnum):
    """Where a radiologist is with a study; only ``READ`` takes it off the default list."""

    UNREAD = "unread"
    OPENED = "opened"
    READ = "read"


class ResultKind(StrEnum):
    """The DICOM objects the node sends into a study (``Delivery.kind``), in the order a
    destination receives them: the report first."""

    SR = "sr"  # the findings: Comprehensive 3D SR, TID 1500
    PM = "pm"  # the heat maps, machine-readable: Parametric Map
    SC = "sc"  # the findings drawn on the image, as any viewer shows them: Secondary Capture
    KO = "ko"  # the withdrawal of superseded results: an IOCM rejection note


class MessageKind(StrEnum):
    """The notifications sent to other systems (``Delivery.kind`` of adapter rows)."""

    HL7 = "hl7"  # the ORU^R01 result
    # The ORM^O01 order change: its own kind, so that it has its own delivery row (and its
    # own retries) beside the ORU of the same analysis.
    HL7_ORDER = "hl7_order"
    FHIR = "fhir"
    WEBHOOK = "webhook"


class HeatMapPolicy(StrEnum):
    """Which reported findings get a heat map (``[worker] heat_maps``)."""

    EVIDENCE = "evidence"  # those whose localisation beat the baselines in the model's evaluation
    ALL = "all"  # every reported finding (the operator has evidence of their own)
    NONE = "none"


class InstanceOrigin(StrEnum):
    """What a received instance is (see ``dicom/origin.py``)."""

    SOURCE = "source"  # an image from an acquisition
    OWN = "own"  # a result this node made, sent back by the PACS
    OTHER = "other"  # a result or derived object of another algorithm or workstation


class ConflictKind(StrEnum):
    """Why an instance was refused: its identity contradicts what the node holds."""

    INSTANCE_OTHER_STUDY = "instance_in_other_study"  # known SOP Instance UID, another study
    INSTANCE_OTHER_SERIES = "instance_in_other_series"
    SERIES_OTHER_STUDY = "series_in_other_study"  # known Series UID, another study
    STUDY_OTHER_PATIENT = "study_of_other_patient"  # known Study UID, another Patient ID


class StudyState(StrEnum):
    """A study's place in the lifecycle (see ``store/lifecycle.py`` for the transitions)."""

    RECEIVING = "receiving"  # instances arriving; quiet period running
    QUEUED = "queued"  # complete, analysis job waiting
    ANALYSING = "analysing"
    ANALYSED = "analysed"
    NOT_ROUTED = "not_routed"  # complete, no routing rule matches: stored and listed only
    FAILED = "failed"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # the study re-opened before this job ran


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    REFUSED = "refused"  # the destination will not take it (never retried)
    FAILED = "failed"  # deferred until the attempts ran out


class CommitmentState(StrEnum):
    """Storage Commitment (PS3.4 J) of a sent object, where the destination offers it."""

    REQUESTED = "requested"
    COMMITTED = "committed"  # the destination says it keeps it
    FAILED = "failed"  # the destination says it does not (its N-EVENT-REPORT gives why)


class Verdict(StrEnum):
    """A radiologist's word on one label of a result (``feedback_findings.verdict``).

    Said of what the model called present (a reported finding) or absent: *disagree* with
    an absent label is a finding the model missed. The radiologist's answer is therefore
    ``model_present`` XOR ``verdict == disagree``.
    """

    AGREE = "agree"
    DISAGREE = "disagree"
