"""Sending the audit trail to the hospital's audit repository as DICOM audit messages.

Each ``audit_events`` row becomes a DICOM PS3.15 A.5 ``AuditMessage`` (XML, valid against
the schema of A.5.1; ``tests/ops/test_audit_export_tls.py`` validates every event kind)
carried by syslog, facility authpriv, in an RFC 5424 message:

* ``udp``: one datagram per message (RFC 5426);
* ``tls``: RFC 5425, TLS 1.2+ to the repository, whose certificate is verified against the
  configured CA and its name; each message framed as ``MSG-LEN SP SYSLOG-MSG`` (octet
  counting). One connection per batch, closed with close_notify both ways: the
  repository's answer is the acknowledgement that it read the batch.

Rows are exported by a periodic job that claims unexported rows and marks them exported
only after the batch went out, so the database stays the record and the repository gets
every event at least once, whichever process runs the job. Patient names and IDs are not
in the audit rows, so they are not in the messages either: the Study Instance UID
identifies the study (the repository can resolve it against the PACS).
"""

from __future__ import annotations

import base64
import datetime as dt
import selectors
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from sqlalchemy import select, update

from ddn_node.config import AuditSettings
from ddn_node.store.audit import AuditEventName
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent, utcnow

log = structlog.get_logger("ddn_node.audit")

Code = tuple[str, str]  # (csd-code, originalText), code system DCM


@dataclass(frozen=True)
class _Kind:
    """How one audit row kind reads as a PS3.15 A.5.3 message (codes from PS3.16 CID 400-403)."""

    event_id: Code
    action: Literal["C", "R", "U", "D", "E"]
    event_type: Code | None = None
    # The row's actor asked for it (a peer sending, a user reading); else the node acted.
    actor_is_requestor: bool = True


_LOGIN: Code = ("110122", "Login")
_LOGOUT: Code = ("110123", "Logout")
_USER_AUTH: Code = ("110114", "User Authentication")
_ACCESSED: Code = ("110103", "DICOM Instances Accessed")
_TRANSFERRED: Code = ("110104", "DICOM Instances Transferred")

_KINDS: dict[str, _Kind] = {
    AuditEventName.ASSOCIATION_ACCEPTED: _Kind(_USER_AUTH, "E", _LOGIN),
    AuditEventName.ASSOCIATION_REJECTED: _Kind(
        ("110113", "Security Alert"), "E", ("110126", "Node Authentication")
    ),
    AuditEventName.INSTANCES_RECEIVED: _Kind(_TRANSFERRED, "C"),
    AuditEventName.INSTANCE_REPLACED: _Kind(_TRANSFERRED, "U"),
    AuditEventName.IDENTITY_CONFLICT: _Kind(_TRANSFERRED, "C"),
    AuditEventName.CONFLICT_DISCARDED: _Kind(("110105", "DICOM Study Deleted"), "D"),
    AuditEventName.RESULTS_SENT: _Kind(_TRANSFERRED, "R", actor_is_requestor=False),
    AuditEventName.USER_LOGIN: _Kind(_USER_AUTH, "E", _LOGIN),
    AuditEventName.USER_LOGIN_FAILED: _Kind(_USER_AUTH, "E", _LOGIN),
    AuditEventName.USER_LOGOUT: _Kind(_USER_AUTH, "E", _LOGOUT),
    AuditEventName.SESSIONS_ENDED: _Kind(_USER_AUTH, "E", _LOGOUT),
    AuditEventName.WORKLIST_VIEWED: _Kind(("110112", "Query"), "E"),
    AuditEventName.STUDY_VIEWED: _Kind(_ACCESSED, "R"),
    AuditEventName.IMAGE_VIEWED: _Kind(_ACCESSED, "R"),
    AuditEventName.AUDIT_READ: _Kind(("110101", "Audit Log Used"), "R"),
    AuditEventName.WORKLIST_CHANGED: _Kind(_ACCESSED, "U"),
    # New data about the study (the radiologist's verdicts), none of its instances changed.
    AuditEventName.FEEDBACK_RECORDED: _Kind(_ACCESSED, "C"),
    AuditEventName.PURGED: _Kind(("110105", "DICOM Study Deleted"), "D", actor_is_requestor=False),
    # The node's own finding about the model it runs: no instance, no user asked for it.
    AuditEventName.DRIFT_ALARM: _Kind(
        ("110100", "Application Activity"), "E", actor_is_requestor=False
    ),
    # A change of the software that produces results (PS3.15 A.5.3.11 Security Alert,
    # CID 403 "Software Configuration"), by the engineer named on the row.
    **{
        name: _Kind(("110113", "Security Alert"), "E", ("110131", "Software Configuration"))
        for name in (
            AuditEventName.MODEL_SHADOW,
            AuditEventName.MODEL_SHADOW_STOPPED,
            AuditEventName.MODEL_PROMOTED,
            AuditEventName.MODEL_ROLLED_BACK,
        )
    },
}
_UNKNOWN = _Kind(("110100", "Application Activity"), "E")

SYSLOG_PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5)
MSG_ID = "DICOM+RFC3881"
# TLS 1.3 verifies the client's certificate after the handshake: the repository's verdict
# (session tickets, or an alert) is a record that follows at once. At most this long.
VERDICT_WAIT_S = 1.0


def _code(parent: ET.Element, tag: str, code: Code, system: str = "DCM") -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": system, "originalText": code[1]}
    )


def _participant(
    root: ET.Element, user: str, requestor: bool, host: str = "", role: Code | None = None
) -> None:
    attrs = {"UserID": user, "UserIsRequestor": "true" if requestor else "false"}
    if host:
        attrs |= {"NetworkAccessPointID": host, "NetworkAccessPointTypeCode": "2"}
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        _code(element, "RoleIDCode", role)


def audit_message(row: AuditEvent, node_ae: str) -> bytes:
    """The PS3.15 A.5.1 AuditMessage XML for one audit row.

    The schema fixes the order: EventIdentification, ActiveParticipant (one or more),
    AuditSourceIdentification, then ParticipantObjectIdentification (any).
    """
    kind = _KINDS.get(row.event, _UNKNOWN)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": kind.action,
            "EventDateTime": row.at.astimezone(dt.UTC).isoformat(),
            # 0 success, 4 minor failure (PS3.15 A.5.1 EventOutcomeIndicator)
            "EventOutcomeIndicator": "0" if row.outcome == "success" else "4",
        },
    )
    _code(ident, "EventID", kind.event_id)
    if kind.event_type is not None:
        _code(ident, "EventTypeCode", kind.event_type)

    # Instances transferred: the sender is the Source, the receiver the Destination.
    actor_role = node_role = None
    if row.event in (AuditEventName.INSTANCES_RECEIVED, AuditEventName.RESULTS_SENT):
        source: Code = ("110153", "Source Role ID")
        destination: Code = ("110152", "Destination Role ID")
        actor_role, node_role = (
            (source, destination) if kind.actor_is_requestor else (destination, source)
        )
    if row.actor:
        _participant(root, row.actor, kind.actor_is_requestor, row.host, actor_role)
    detail = row.detail if isinstance(row.detail, dict) else {}
    subject = detail.get("user")
    if row.event == AuditEventName.SESSIONS_ENDED and isinstance(subject, str) and subject:
        _participant(root, subject, False)  # whose sessions an admin ended
    _participant(root, node_ae, not (kind.actor_is_requestor and row.actor), role=node_role)
    reporter = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": node_ae})
    ET.SubElement(reporter, "AuditSourceTypeCode", {"csd-code": "4"})  # application server

    if row.study_uid:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": row.study_uid,
                "ParticipantObjectTypeCode": "2",  # system object
                "ParticipantObjectTypeCodeRole": "3",  # report
            },
        )
        _code(study, "ParticipantObjectIDTypeCode", ("110180", "Study Instance UID"))
        # Name or Query is required (CP-2399); the patient's name stays out of the
        # audit trail, so the study is named by its UID.
        ET.SubElement(study, "ParticipantObjectName").text = row.study_uid
        sop_uid = detail.get("sop_instance_uid")
        if isinstance(sop_uid, str) and sop_uid:
            described = ET.SubElement(study, "ParticipantObjectDescription")
            sop_class = ET.SubElement(described, "SOPClass", {"NumberOfInstances": "1"})
            ET.SubElement(sop_class, "Instance", {"UID": sop_uid})
    elif row.event == AuditEventName.WORKLIST_VIEWED:
        query = detail.get("query")
        if isinstance(query, str):
            # PS3.15 A.5.3.10: the query itself, base64 (it may hold any characters).
            worklist = ET.SubElement(
                root,
                "ParticipantObjectIdentification",
                {
                    "ParticipantObjectID": "worklist",
                    "ParticipantObjectTypeCode": "2",
                    "ParticipantObjectTypeCodeRole": "24",  # query
                },
            )
            _code(worklist, "ParticipantObjectIDTypeCode", ("12", "URI"), system="RFC-3881")
            ET.SubElement(worklist, "ParticipantObjectQuery").text = base64.b64encode(
                query.encode("utf-8")
            ).decode("ascii")
    elif row.event == AuditEventName.AUDIT_READ:
        # PS3.15 A.5.3.2: the audit log is the object, a security resource.
        trail = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": "audit_events",
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "13",  # security resource
            },
        )
        _code(trail, "ParticipantObjectIDTypeCode", ("12", "URI"), system="RFC-3881")
        ET.SubElement(trail, "ParticipantObjectName").text = "Security Audit Log"
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


@dataclass(frozen=True)
class SyslogSink:
    """An audit repository reached by syslog over UDP or TLS."""

    host: str
    port: int
    app_name: str = "ddn-node"
    transport: Literal["udp", "tls"] = "udp"
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name its certificate must carry; default: host
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, audit: AuditSettings) -> SyslogSink:
        if not audit.syslog_host:
            raise ValueError("no [audit] syslog_host configured")
        return cls(
            host=audit.syslog_host,
            port=audit.syslog_port,
            transport=audit.syslog_transport,
            ca=audit.syslog_ca,
            cert=audit.syslog_cert,
            key=audit.syslog_key,
            server_name=audit.syslog_server_name,
            timeout_s=audit.syslog_timeout_s,
        )

    def message(self, msg_id: str, payload: bytes) -> bytes:
        """One RFC 5424 SYSLOG-MSG: header, no structured data, the payload as MSG."""
        stamp = utcnow().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = (
            f"<{SYSLOG_PRI}>1 {stamp} {socket.gethostname()} {self.app_name} - {msg_id} - ".encode()
        )
        return header + payload

    def tls_context(self) -> ssl.SSLContext:
        # PROTOCOL_TLS_CLIENT: CERT_REQUIRED and check_hostname on. Only the configured CA
        # is trusted ([audit] requires one for tls; the system store is for direct use).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca is not None:
            context.load_verify_locations(cafile=str(self.ca))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def send(self, msg_id: str, payload: bytes) -> None:
        self.send_all([(msg_id, payload)])

    def send_all(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Send every message or raise OSError (ssl.SSLError is one): none is then
        marked exported, and the next run sends them again."""
        frames = [self.message(msg_id, payload) for msg_id, payload in messages]
        if self.transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for frame in frames:
                    sock.sendto(frame, (self.host, self.port))
            return
        context = self.tls_context()
        with (
            socket.create_connection((self.host, self.port), timeout=self.timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=self.server_name or self.host) as tls,
        ):
            self._await_verdict(tls)
            # RFC 5425 4.3: octet counting, MSG-LEN SP SYSLOG-MSG, no trailer.
            tls.sendall(b"".join(b"%d %s" % (len(frame), frame) for frame in frames))
            # Syslog has no acknowledgement; the receiver's close_notify in answer to ours
            # (RFC 5425 4.4: it MUST reply) is the one sign that it read everything before
            # it. A refusal after the handshake (TLS 1.3 verifies a client certificate
            # then) arrives here as an alert, a reset or no answer: all OSError.
            tls.unwrap()

    def _await_verdict(self, tls: ssl.SSLSocket) -> None:
        """Under TLS 1.3, wait briefly for the repository's first record after the
        handshake: a refused client certificate arrives as an alert (raised here, so the
        batch is not sent into a closed connection and counted as delivered: OpenSSL
        would take that alert for the end of the connection at close_notify time).
        A session ticket means accepted; silence (a server that issues no tickets) too."""
        if tls.version() != "TLSv1.3":
            return  # TLS 1.2 checks the client's certificate inside the handshake
        with selectors.DefaultSelector() as waiting:
            waiting.register(tls, selectors.EVENT_READ)
            if not waiting.select(VERDICT_WAIT_S):
                return
        tls.setblocking(False)
        try:
            if tls.recv(1) == b"":
                raise ConnectionError("the audit repository closed the connection")
        except ssl.SSLWantReadError:
            pass  # only session tickets: accepted
        finally:
            tls.settimeout(self.timeout_s)


def export_new(database: Database, sink: SyslogSink, node_ae: str, batch: int = 200) -> int:
    """Send unexported audit rows; returns how many were sent (0 when the repository could
    not be reached: they stay unexported and go with the next run)."""
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
        if not rows:
            return 0
        try:
            sink.send_all([(MSG_ID, audit_message(row, node_ae)) for row in rows])
        except OSError as exc:
            log.warning(
                "audit.export_failed", events=len(rows), transport=sink.transport, error=str(exc)
            )
            return 0
        session.execute(
            update(AuditEvent)
            .where(AuditEvent.id.in_([r.id for r in rows]))
            .values(exported_at=utcnow())
        )
    log.info("audit.exported", events=len(rows), transport=sink.transport)
    return len(rows)
