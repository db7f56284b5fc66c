"""Sending the audit trail to the hospital's audit repository as DICOM audit messages.

Each ``audit_events`` row becomes an RFC 3881 / DICOM PS3.15 A.5 ``AuditMessage`` (XML)
carried by syslog (RFC 5424 over UDP, RFC 5426), facility authpriv. Rows are exported by a
periodic job that claims unexported rows, so the database stays the record and the
repository gets every event at least once, whichever process runs the job.
"""

from __future__ import annotations

import datetime as dt
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import structlog
from sqlalchemy import select, update

from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent, utcnow

log = structlog.get_logger("ddn_node.audit")

# (EventID code, meaning, EventActionCode, EventTypeCode or None) per PS3.15 A.5.3 / PS3.16 CID 400-403
_EVENTS: dict[str, tuple[str, str, str, tuple[str, str] | None]] = {
    AuditEventName.ASSOCIATION_ACCEPTED: (
        "110114",
        "User Authentication",
        "E",
        ("110122", "Login"),
    ),
    AuditEventName.ASSOCIATION_REJECTED: (
        "110113",
        "Security Alert",
        "E",
        ("110126", "Node Authentication"),
    ),
    AuditEventName.INSTANCES_RECEIVED: ("110104", "DICOM Instances Transferred", "C", None),
    AuditEventName.RESULTS_SENT: ("110104", "DICOM Instances Transferred", "R", None),
    AuditEventName.USER_LOGIN: ("110114", "User Authentication", "E", ("110122", "Login")),
    AuditEventName.USER_LOGIN_FAILED: ("110114", "User Authentication", "E", ("110122", "Login")),
    AuditEventName.WORKLIST_CHANGED: ("110103", "DICOM Instances Accessed", "U", None),
    AuditEventName.PURGED: ("110105", "DICOM Study Deleted", "D", None),
}

SYSLOG_PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5)


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = "DCM") -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning}
    )


def audit_message(row: AuditEvent, node_ae: str) -> bytes:
    """The PS3.15 A.5.1 AuditMessage XML for one audit row."""
    event_id, meaning, action, event_type = _EVENTS.get(
        row.event, ("110100", "Application Activity", "E", None)
    )
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": row.at.astimezone(dt.UTC).isoformat(),
            # 0 success, 4 minor failure (PS3.15 A.5.1 EventOutcomeIndicator)
            "EventOutcomeIndicator": "0" if row.outcome == "success" else "4",
        },
    )
    _code(ident, "EventID", event_id, meaning)
    if event_type is not None:
        _code(ident, "EventTypeCode", *event_type)
    requestor_is_peer = row.event not in (AuditEventName.RESULTS_SENT, AuditEventName.PURGED)
    if row.actor:
        peer = ET.SubElement(
            root,
            "ActiveParticipant",
            {
                "UserID": row.actor,
                "UserIsRequestor": "true" if requestor_is_peer else "false",
                **(
                    {"NetworkAccessPointID": row.host, "NetworkAccessPointTypeCode": "2"}
                    if row.host
                    else {}
                ),
            },
        )
        if row.event in (AuditEventName.INSTANCES_RECEIVED, AuditEventName.RESULTS_SENT):
            role = (
                ("110153", "Source Role ID")
                if requestor_is_peer
                else ("110152", "Destination Role ID")
            )
            _code(peer, "RoleIDCode", *role)
    ET.SubElement(
        root,
        "ActiveParticipant",
        {"UserID": node_ae, "UserIsRequestor": "false" if requestor_is_peer else "true"},
    )
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": node_ae})
    if row.study_uid:
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row.study_uid,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


@dataclass(frozen=True)
class SyslogSink:
    host: str
    port: int
    app_name: str = "ddn-node"

    def send(self, msg_id: str, payload: bytes) -> None:
        stamp = utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = (
            f"<{SYSLOG_PRI}>1 {stamp} {socket.gethostname()} {self.app_name} - {msg_id} - ".encode()
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(header + payload, (self.host, self.port))


def export_new(database: Database, sink: SyslogSink, node_ae: str, batch: int = 200) -> int:
    """Send unexported audit rows; returns how many were sent."""
    with database.session() as session:
        stmt = (
            select(AuditEvent)
            .where(AuditEvent.exported_at.is_(None))
            .order_by(AuditEvent.id)
            .limit(batch)
        )
        if database.is_postgres:
            stmt = stmt.with_for_update(skip_locked=True)
        rows = list(session.scalars(stmt))
        for row in rows:
            sink.send("DICOM+RFC3881", audit_message(row, node_ae))
        if rows:
            session.execute(
                update(AuditEvent)
                .where(AuditEvent.id.in_([r.id for r in rows]))
                .values(exported_at=utcnow())
            )
    if rows:
        log.info("audit.exported", events=len(rows))
    return len(rows)
