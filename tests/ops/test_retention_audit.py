"""Retention purges old, settled studies (never pending ones) and audits it; the audit trail
goes out as DICOM audit messages (PS3.15 A.5) over syslog."""

from __future__ import annotations

import datetime as dt
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

from sqlalchemy import select

from ddn_node.config import RetentionSettings
from ddn_node.dicom.spool import Spool
from ddn_node.pipeline.audit_export import SyslogSink, export_new
from ddn_node.pipeline.retention import purge_expired
from ddn_node.store.audit import AuditEventName, audit
from ddn_node.store.engine import Database
from ddn_node.store.ingest import InstanceRecord, record_instance
from ddn_node.store.models import AuditEvent, Delivery, Instance, Study, utcnow


def _study(db: Database, spool: Spool, uid: str, age_days: float, state: str) -> int:
    at = utcnow() - dt.timedelta(days=age_days)
    relpath = spool.instance_relpath(uid, f"{uid}.1.1")
    spool.write_bytes(relpath, b"DICM-ish")
    rec = InstanceRecord(
        study_uid=uid,
        series_uid=f"{uid}.1",
        sop_instance_uid=f"{uid}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=relpath,
        size=8,
        sha256="0" * 64,
        modality="CR",
    )
    outcome = record_instance(db, rec, quiet_period_s=1, force_complete_s=10, now=at)
    with db.session() as s:
        s.get(Study, outcome.study_id).state = state
    return outcome.study_id


def test_retention_purges_only_settled_old_studies(db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    old = _study(db, spool, "1.1", 40, "analysed")
    _study(db, spool, "1.2", 40, "receiving")  # still pending: kept
    _study(db, spool, "1.3", 5, "analysed")  # young: kept
    waiting = _study(db, spool, "1.4", 40, "analysed")
    with db.session() as s:
        s.add(
            Delivery(
                study_id=waiting,
                destination="pacs",
                kind="sr",
                sop_class_uid="x",
                sop_instance_uid="9.9",
                path="results/x",
                state="pending",
            )
        )
    purged = purge_expired(db, spool, RetentionSettings(enabled=True, max_age_days=30))
    assert [p.study_uid for p in purged] == ["1.1"]
    with db.read() as s:
        assert sorted(st.study_uid for st in s.scalars(select(Study))) == ["1.2", "1.3", "1.4"]
        assert s.scalar(select(Instance.id).where(Instance.study_id == old)) is None
        events = list(
            s.scalars(select(AuditEvent).where(AuditEvent.event == AuditEventName.PURGED))
        )
    assert [(e.study_uid, e.detail["instances"]) for e in events] == [("1.1", 1)]
    assert not (spool.studies / "1.1").exists() and (spool.studies / "1.2").exists()


def test_audit_events_go_out_as_dicom_audit_messages(db: Database) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    audit(
        db,
        AuditEventName.ASSOCIATION_REJECTED,
        actor="INTRUDER",
        host="10.0.0.9",
        outcome="failure",
        reason="x",
    )
    audit(
        db, AuditEventName.INSTANCES_RECEIVED, actor="ORTHANC", host="127.0.0.1", study_uid="1.2.3"
    )
    sink = SyslogSink("127.0.0.1", port)
    assert export_new(db, sink, "DDN_NODE") == 2
    assert export_new(db, sink, "DDN_NODE") == 0  # each row once
    messages = [receiver.recv(65535) for _ in range(2)]
    receiver.close()
    parsed = []
    for raw in messages:
        header, _, xml = raw.partition(b" - DICOM+RFC3881 - ")
        assert header.startswith(b"<85>1 ")  # authpriv.notice, RFC 5424
        parsed.append(ET.fromstring(xml))
    codes = [m.find("EventIdentification/EventID").get("csd-code") for m in parsed]
    assert codes == ["110113", "110104"]
    rejected, received = parsed
    assert rejected.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert received.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "1.2.3"
    assert {p.get("UserID") for p in received.findall("ActiveParticipant")} == {
        "ORTHANC",
        "DDN_NODE",
    }
