"""The audit trail over TLS syslog (RFC 5425) to a real receiver written here: an ssl server
socket with a throw-away certificate that reads octet-counted frames (``MSG-LEN SP
SYSLOG-MSG``). The repository's certificate and name are verified; a failed delivery leaves
the rows unexported for the next run. Every message, of every event kind, is validated
against the DICOM audit message schema (PS3.15 A.5.1, tests/support/schemas)."""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import func, select
from support.peers.tls import Pki, TlsIdentity, make_pki, openssl_available

from ddn_node.config import AuditSettings
from ddn_node.pipeline.audit_export import SyslogSink, audit_message, export_new
from ddn_node.store.audit import AuditEventName, audit
from ddn_node.store.engine import Database
from ddn_node.store.models import AuditEvent

pytestmark = pytest.mark.skipif(not openssl_available(), reason="openssl not installed")

SCHEMA = Path(__file__).resolve().parents[1] / "support" / "schemas" / "dicom-audit-message.rng"


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def read_frames(stream: bytes) -> list[bytes]:
    """RFC 5425 4.3 octet counting: MSG-LEN SP SYSLOG-MSG, back to back."""
    frames = []
    while stream:
        length, sep, rest = stream.partition(b" ")
        assert sep and length.isdigit() and not length.startswith(b"0"), stream[:40]
        size = int(length)
        assert len(rest) >= size, "a frame cut short"
        frames.append(rest[:size])
        stream = rest[size:]
    return frames


@dataclass
class Receiver:
    """A TLS syslog receiver on a loopback port: one thread, any number of connections."""

    identity: TlsIdentity
    require_client_cert: bool = False
    port: int = 0
    frames: list[bytes] = field(default_factory=list)
    handshake_errors: list[str] = field(default_factory=list)
    connections: int = 0
    _done: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.identity.cert), str(self.identity.key))
        if self.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            for ca in self.identity.trusted:
                context.load_verify_locations(cafile=str(ca))
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(10)
            chunks: list[bytes] = []
            try:
                with self._context.wrap_socket(raw, server_side=True) as tls:
                    while chunk := tls.recv(65536):  # b"" at the sender's close_notify
                        chunks.append(chunk)
                    with contextlib.suppress(OSError):
                        tls.unwrap()  # answer close_notify
            except (ssl.SSLError, OSError) as exc:
                self.handshake_errors.append(str(exc))
            with self._done:
                self.frames.extend(read_frames(b"".join(chunks)))
                self.connections += 1
                self._done.notify_all()

    def wait_connections(self, n: int, timeout: float = 10) -> None:
        with self._done:
            assert self._done.wait_for(lambda: self.connections >= n, timeout), self.connections

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def tls_sink(port: int, pki: Pki, **audit: object) -> SyslogSink:
    settings = AuditSettings.model_validate(
        {
            "syslog_host": "127.0.0.1",
            "syslog_port": port,
            "syslog_transport": "tls",
            "syslog_ca": str(pki.ca_cert),
            **audit,
        }
    )
    return SyslogSink.from_settings(settings)


def unexported(db: Database) -> int:
    with db.read() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.exported_at.is_(None))
            )
            or 0
        )


def some_events(db: Database) -> None:
    audit(
        db,
        AuditEventName.ASSOCIATION_REJECTED,
        actor="INTRUDER",
        host="10.0.0.9",
        outcome="failure",
    )
    audit(
        db, AuditEventName.INSTANCES_RECEIVED, actor="ORTHANC", host="127.0.0.1", study_uid="1.2.3"
    )
    audit(
        db,
        AuditEventName.STUDY_VIEWED,
        actor="radiologist",
        host="10.1.1.1",
        study_uid="1.2.3",
        via="ui",
    )


def test_audit_trail_over_tls_syslog_octet_counted_and_valid(
    db: Database, pki: Pki, receivers: list[Receiver], schema: etree.RelaxNG
) -> None:
    receiver = Receiver(pki.server)
    receivers.append(receiver)
    some_events(db)
    sink = tls_sink(receiver.port, pki)
    assert export_new(db, sink, "DDN_NODE") == 3
    receiver.wait_connections(1)
    assert export_new(db, sink, "DDN_NODE") == 0  # each row once
    assert receiver.handshake_errors == []
    assert len(receiver.frames) == 3
    codes = []
    for frame in receiver.frames:
        # RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
        pri, stamp, _host, app, procid, msgid, sd, xml = frame.split(b" ", 7)
        assert (pri, app, procid, msgid, sd) == (
            b"<85>1",
            b"ddn-node",
            b"-",
            b"DICOM+RFC3881",
            b"-",
        )
        assert stamp.endswith(b"Z") and dt.datetime.fromisoformat(stamp.decode())
        message = etree.fromstring(xml)
        assert schema.validate(message), schema.error_log
        codes.append(message.find("EventIdentification/EventID").get("csd-code"))
    assert codes == ["110113", "110104", "110103"]


def test_a_repository_that_cannot_be_verified_gets_nothing_and_rows_wait(
    db: Database, pki: Pki, receivers: list[Receiver]
) -> None:
    some_events(db)
    # Its certificate is signed by a CA the node was not told to trust.
    stranger = Receiver(pki.other_server)
    receivers.append(stranger)
    assert export_new(db, tls_sink(stranger.port, pki), "DDN_NODE") == 0
    stranger.wait_connections(1)
    assert stranger.frames == [] and unexported(db) == 3

    # The right CA, but not the name the node expects it to carry.
    right = Receiver(pki.server)
    receivers.append(right)
    wrong_name = tls_sink(right.port, pki, syslog_server_name="audit.hospital.example")
    assert export_new(db, wrong_name, "DDN_NODE") == 0
    right.wait_connections(1)
    assert right.frames == [] and unexported(db) == 3

    # Nothing listening at all.
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert export_new(db, tls_sink(port, pki), "DDN_NODE") == 0 and unexported(db) == 3

    # The right repository: everything that waited goes out.
    assert (
        export_new(db, tls_sink(right.port, pki, syslog_server_name="localhost"), "DDN_NODE") == 3
    )
    right.wait_connections(2)
    assert len(right.frames) == 3 and unexported(db) == 0


def test_mutual_tls_when_the_repository_asks_for_the_nodes_certificate(
    db: Database, pki: Pki, receivers: list[Receiver]
) -> None:
    some_events(db)
    receiver = Receiver(pki.server, require_client_cert=True)
    receivers.append(receiver)
    # Without a certificate of its own the node is refused, and keeps the rows.
    assert export_new(db, tls_sink(receiver.port, pki), "DDN_NODE") == 0
    receiver.wait_connections(1)
    assert receiver.frames == [] and unexported(db) == 3
    with_cert = tls_sink(
        receiver.port, pki, syslog_cert=str(pki.client.cert), syslog_key=str(pki.client.key)
    )
    assert export_new(db, with_cert, "DDN_NODE") == 3
    receiver.wait_connections(2)
    assert len(receiver.frames) == 3 and unexported(db) == 0


def test_tls_needs_a_ca_of_its_own() -> None:
    with pytest.raises(ValueError, match="needs syslog_ca"):
        AuditSettings(syslog_host="audit", syslog_transport="tls")
    with pytest.raises(ValueError, match="go together"):
        AuditSettings(syslog_cert=Path("node.pem"))


def event_kinds() -> list[str]:
    return sorted(
        value
        for name, value in vars(AuditEventName).items()
        if name.isupper() and isinstance(value, str)
    )


@pytest.mark.parametrize("event", event_kinds())
def test_every_event_kind_is_a_valid_dicom_audit_message(event: str, schema: etree.RelaxNG) -> None:
    at = dt.datetime(2026, 12, 1, 9, 30, 0, 123456, tzinfo=dt.UTC)
    variants = [
        AuditEvent(
            event=event, at=at, outcome="success", actor="ORTHANC", host="10.0.0.5",
            study_uid="1.2.826.0.1.3680043.2.1125.1", detail={},
        ),
        AuditEvent(event=event, at=at, outcome="failure", actor="", host="", study_uid="", detail={}),
        AuditEvent(
            event=event, at=at, outcome="success", actor="token:ris", host="::1",
            study_uid="1.2.3", detail={"sop_instance_uid": "1.2.3.4.5", "via": "api",
                                       "user": "radiologist", "query": "unread=false&x=<&>"},
        ),
        AuditEvent(
            event=event, at=at, outcome="success", actor="officer", host="10.0.0.7",
            study_uid="", detail={"user": "radiologist", "query": "modality=CR", "events": 3},
        ),
    ]  # fmt: skip
    for row in variants:
        message = etree.fromstring(audit_message(row, "DDN_NODE"))
        assert schema.validate(message), (event, row.detail, schema.error_log)


def test_the_schema_refuses_what_the_standard_refuses(schema: etree.RelaxNG) -> None:
    """The transcription is not a rubber stamp: messages the standard's schema refuses."""
    row = AuditEvent(
        event=AuditEventName.STUDY_VIEWED, at=dt.datetime.now(dt.UTC), outcome="success",
        actor="radiologist", host="10.0.0.1", study_uid="1.2.3", detail={},
    )  # fmt: skip
    good = etree.fromstring(audit_message(row, "DDN_NODE"))
    assert schema.validate(good)

    def broken(change: str) -> etree._Element:
        message = etree.fromstring(audit_message(row, "DDN_NODE"))
        if change == "no source":
            message.remove(message.find("AuditSourceIdentification"))
        elif change == "no participant":
            for p in message.findall("ActiveParticipant"):
                message.remove(p)
        elif change == "bad outcome":
            message.find("EventIdentification").set("EventOutcomeIndicator", "1")
        elif change == "no name":  # CP-2399: ParticipantObjectName or Query is required
            obj = message.find("ParticipantObjectIdentification")
            obj.remove(obj.find("ParticipantObjectName"))
        elif change == "no code meaning":
            message.find("EventIdentification/EventID").attrib.pop("originalText")
        elif change == "wrong order":
            source = message.find("AuditSourceIdentification")
            message.remove(source)
            message.insert(0, source)
        return message

    for change in (
        "no source",
        "no participant",
        "bad outcome",
        "no name",
        "no code meaning",
        "wrong order",
    ):
        assert not schema.validate(broken(change)), change
