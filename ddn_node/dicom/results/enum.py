"""Enumerations shared by the result builders."""

from __future__ import annotations

from enum import StrEnum


class TriagePriority(StrEnum):
    """The node's triage priority classes, as they leave the node in the SR.

    The values equal ``ddn_node.config.Priority`` (minus ``NOT_ANALYSED``: a study that
    was not analysed has no SR). They are encoded with the private codes of
    :data:`ddn_node.dicom.results.codes.PRIORITY_CODES`, because no DICOM context group
    holds triage classes (PS3.16 has none; UPS Priority (0074,1200) uses HIGH / MEDIUM /
    LOW as plain text, not codes).
    """

    STAT = "STAT"
    HIGH = "HIGH"
    ROUTINE = "ROUTINE"


class ResultKind(StrEnum):
    """What a built object is, as the delivery rows record it (``Delivery.kind``)."""

    SR = "sr"
    PM = "pm"
    SC = "sc"
